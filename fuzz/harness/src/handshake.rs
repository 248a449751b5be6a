//! Target `migd_handshake`: hostile bytes fed to one end of a migd channel, the first thing a migd does
//! with a TCP connection from anyone.
//!
//! The first input byte picks the end of a `blocking::Channel` (what the daemon uses): its lowest bit a
//! server (0) or a client (1). Its second bit used to pick the async channel, which is gone; it selects
//! nothing now, but the byte is still read, so each input kept in `fuzz/corpus/migd_handshake/` still feeds
//! the same bytes to the same kind of end. The rest is everything the peer "sends", from an in-memory stream
//! that ends after it; what the end writes is kept.
//!
//! Checked, besides returning whatever the bytes: the handshake fails (nobody without the cluster key can
//! answer a fresh nonce); the client sends nothing but its hello to a server that has not proved the key,
//! and the server reads nothing but a hello and a proof before the client has proved it, as the channel
//! promises; the failure is not a timeout, since the stream ended.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;

use rmosix_migd::channel::{self, ChannelError, blocking};

/// Pieces of handshakes worth splicing in.
pub const TOKENS: &[&[u8]] = &[b"RMXM", &[1, 0], &[2, 0], &[0xff, 0xff]];

/// The node id of the end under test.
const OUR_NODE: u32 = 7;

/// What an in-memory stream has read and written.
#[derive(Debug, Default)]
struct Exchange {
    input: Vec<u8>,
    read: usize,
    written: Vec<u8>,
}

/// An in-memory stream: reads `input` then the end of the stream; keeps what is written. Shared, so the
/// test sees the exchange after the channel has dropped the stream.
#[derive(Debug, Clone, Default)]
struct MemStream(Rc<RefCell<Exchange>>);

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut ex = self.0.borrow_mut();
        let n = buf.len().min(ex.input.len() - ex.read);
        buf[..n].copy_from_slice(&ex.input[ex.read..ex.read + n]);
        ex.read += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let stream = MemStream::default();
    stream.0.borrow_mut().input = rest.to_vec();
    let key = crate::cluster_key();
    let server = mode % 2 == 0;
    let result = if server {
        blocking::Channel::server(stream.clone(), &key, OUR_NODE).map(drop)
    } else {
        blocking::Channel::client(stream.clone(), &key, OUR_NODE).map(drop)
    };
    let ex = stream.0.borrow();
    let end = if server { "server" } else { "client" };
    let error: ChannelError = match result {
        Ok(()) => panic!("a {end} finished a handshake with a peer that has no key"),
        Err(e) => e,
    };
    assert!(!error.is_timeout(), "a {end} timed out on a stream that had ended: {error}");
    assert!(!error.to_string().is_empty());
    let handshake_bytes = channel::HELLO_LEN + channel::PROOF_LEN;
    assert!(ex.read <= handshake_bytes, "an unauthenticated {end} read {} bytes of its peer's", ex.read);
    if server {
        assert!(ex.written.len() <= handshake_bytes, "the server wrote {} bytes", ex.written.len());
    } else {
        assert!(
            ex.written.len() <= channel::HELLO_LEN,
            "the client sent {} bytes to a server that has not proved the key",
            ex.written.len()
        );
    }
}

/// Hellos of this version and others, with and without proofs, for both ends.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&channel::MAGIC);
    hello.extend_from_slice(&channel::VERSION.to_le_bytes());
    hello.extend_from_slice(&3u32.to_le_bytes());
    hello.resize(channel::HELLO_LEN, 0x5a);
    let mut other_version = hello.clone();
    other_version[4..6].copy_from_slice(&channel::VERSION.wrapping_add(1).to_le_bytes());
    let with_proof = [&hello[..], &[0x11; channel::PROOF_LEN], &[0x22; 64]].concat();
    let mut seeds = Vec::new();
    for mode in 0..2 {
        for body in [&hello[..], &other_version[..], &with_proof[..], &hello[..10], b"GET / HTTP/1.1\r\n\r\n"] {
            seeds.push([&[mode][..], body].concat());
        }
    }
    seeds
}
