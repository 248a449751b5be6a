//! Target `migd_channel`: two real migd channel ends, a client and a server holding the same key, with a
//! relay between them that flips, cuts, drops or replays bytes of either direction, as an attacker on the
//! network could.
//!
//! Both ends are `blocking::Channel`s, as migd uses them, each on a thread of its own over a Unix socket
//! pair whose other end a relay thread reads; the relays pass each direction's bytes on, tampered, to the
//! other end's pair.
//!
//! The input is a script: a first byte that used to pick the implementation (the async channel, which is
//! gone, or the blocking one) and selects nothing now, still read so the inputs kept in
//! `fuzz/corpus/migd_channel/` keep their meaning; the frames each end sends (then it closes its direction
//! and reads until the end); and the tamperings. Drops and replays start after the handshake's bytes; flips
//! and cuts go anywhere.
//!
//! Checked, on top of no panic and no timeout:
//! - each end receives a prefix of the frames the other sent, never a frame it did not send;
//! - without tampering, both handshakes succeed and each end receives every frame and then the end;
//! - when both handshakes succeed, each end names the other's node and both hold the same bulk key;
//! - a direction left alone delivers every frame and then the end;
//! - a direction whose bytes were flipped, dropped from its middle or replayed ends in an error, not in
//!   a clean end: tampering is detected, not passed on.

use std::io::{Read as _, Write as _};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::time::Duration;

use rmosix_migd::channel::{self, ChannelError, blocking};

use crate::input::{Builder, Input};

const CLIENT_NODE: u32 = 1;
const SERVER_NODE: u32 = 2;
const MAX_FRAMES: u8 = 8;
const MAX_PAYLOAD: usize = 1024;
/// An end or a relay that waits this long is stuck; the target fails rather than hang.
const STUCK: Duration = Duration::from_secs(5);

/// One frame: kind and payload.
type Frame = (u8, Vec<u8>);

/// What the relay does to a direction's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// XOR the byte at `offset` with `xor`.
    Flip,
    /// Forward nothing from `offset` on, and end the direction.
    Cut,
    /// Leave out `len` bytes from `offset`.
    Drop,
    /// Send the `len` bytes from `offset` once more, right after them.
    Replay,
}

#[derive(Debug, Clone, Copy)]
struct Tamper {
    op: Op,
    offset: usize,
    len: usize,
    xor: u8,
}

/// One direction's relay: the tamperings, every byte the sender sent, and every byte passed on.
#[derive(Debug, Default)]
struct Transform {
    tampers: Vec<Tamper>,
    sent: Vec<u8>,
    forwarded: Vec<u8>,
    cut: bool,
}

impl Transform {
    /// Takes the sender's next bytes and appends what goes to the receiver to `out`; false once the
    /// direction is cut.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        for &byte in bytes {
            let at = self.sent.len();
            self.sent.push(byte);
            if self.cut || self.tampers.iter().any(|t| t.op == Op::Cut && t.offset == at) {
                self.cut = true;
                continue;
            }
            let flipped =
                self.tampers.iter().filter(|t| t.op == Op::Flip && t.offset == at).fold(byte, |b, t| b ^ t.xor);
            if !self.tampers.iter().any(|t| t.op == Op::Drop && (t.offset..t.offset + t.len).contains(&at)) {
                out.push(flipped);
            }
            for t in self.tampers.iter().filter(|t| t.op == Op::Replay && t.offset + t.len - 1 == at) {
                out.extend_from_slice(&self.sent[t.offset..=at]);
            }
        }
        self.forwarded.extend_from_slice(&out[start..]);
        !self.cut
    }

    /// True when the receiver was sent bytes other than a prefix of what the sender sent. Judged on the
    /// bytes, not on the operations: a replay of bytes equal to those that follow changes nothing.
    fn modified(&self) -> bool {
        !self.sent.starts_with(&self.forwarded)
    }

    /// True when the receiver was sent anything but exactly what the sender sent.
    fn touched(&self) -> bool {
        self.forwarded != self.sent
    }
}

/// How an end's reading ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Closed,
    Error(String),
}

/// What one end saw.
#[derive(Debug)]
struct Outcome {
    /// `Err` with the message when the handshake failed.
    handshake: Result<(u32, [u8; 32]), String>,
    received: Vec<Frame>,
    end: End,
}

impl Outcome {
    fn failed(e: &ChannelError) -> Self {
        assert!(!e.is_timeout(), "a handshake timed out between two live ends: {e}");
        Self { handshake: Err(e.to_string()), received: Vec::new(), end: End::Error(e.to_string()) }
    }

    fn finish(&mut self, received: Result<Frame, ChannelError>) -> bool {
        match received {
            Ok(frame) => {
                self.received.push(frame);
                true
            }
            Err(ChannelError::Closed) => {
                self.end = End::Closed;
                false
            }
            Err(e) => {
                assert!(!e.is_timeout(), "an end is stuck waiting: {e}");
                self.end = End::Error(e.to_string());
                false
            }
        }
    }
}

/// The script an input describes.
#[derive(Debug, Default)]
struct Script {
    /// Frames the client sends, then those the server sends.
    frames: [Vec<Frame>; 2],
    /// Tamperings of client-to-server bytes, then of server-to-client ones.
    tampers: [Vec<Tamper>; 2],
}

impl Script {
    fn read(data: &[u8]) -> Self {
        let mut input = Input::new(data);
        // Once the choice of implementation; nothing now.
        let _ = input.u8();
        let mut script = Script::default();
        for frames in &mut script.frames {
            for _ in 0..input.u8() % (MAX_FRAMES + 1) {
                let kind = input.u8();
                frames.push((kind, input.chunk(MAX_PAYLOAD).to_vec()));
            }
        }
        let handshake = channel::HELLO_LEN + channel::PROOF_LEN;
        for _ in 0..input.u8() % 4 {
            let direction = usize::from(input.u8() % 2);
            let op = [Op::Flip, Op::Cut, Op::Drop, Op::Replay][usize::from(input.u8() % 4)];
            let offset = usize::from(input.u16());
            let len = usize::from(input.u8()).max(1);
            let xor = input.u8().max(1);
            // Bytes added or removed inside the handshake only make both ends wait for each other.
            let offset = if matches!(op, Op::Drop | Op::Replay) { offset + handshake } else { offset };
            script.tampers[direction].push(Tamper { op, offset, len, xor });
        }
        script
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let script = Script::read(data);
    let (client, server, transforms) = run_ends(&script);
    check(&script, &client, &server, &transforms);
}

fn check(script: &Script, client: &Outcome, server: &Outcome, transforms: &[Transform; 2]) {
    // Client-to-server frames are received by the server, and the other way round.
    let directions = [(&script.frames[0], server, &transforms[0]), (&script.frames[1], client, &transforms[1])];
    for (sent, receiver, _) in directions {
        assert!(
            receiver.received.len() <= sent.len() && receiver.received[..] == sent[..receiver.received.len()],
            "an end received frames that were not sent: sent {sent:?}, received {:?}",
            receiver.received
        );
    }
    if !transforms.iter().any(Transform::touched) {
        assert!(client.handshake.is_ok() && server.handshake.is_ok(), "handshake failed: {client:?} {server:?}");
    }
    let (Ok((server_peer, client_bulk)), Ok((client_peer, server_bulk))) = (&client.handshake, &server.handshake)
    else {
        return;
    };
    assert_eq!((*server_peer, *client_peer), (SERVER_NODE, CLIENT_NODE), "an end names the wrong peer");
    assert_eq!(client_bulk, server_bulk, "the ends hold different bulk keys");
    for (sent, receiver, transform) in directions {
        if !transform.touched() {
            assert_eq!(&receiver.received, sent, "a direction left alone lost frames");
            assert_eq!(receiver.end, End::Closed, "a direction left alone did not end cleanly");
        }
        if transform.modified() {
            assert!(
                matches!(receiver.end, End::Error(_)),
                "tampered bytes were not detected: {:?}, received {:?}",
                transform.tampers,
                receiver.received
            );
        }
    }
}

fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    // libFuzzer's main is not Rust's, which would have done this: a write to a closed socket must be an
    // error, not the end of the process.
    // SAFETY: setting a signal's disposition to SIG_IGN.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

fn socket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("a socket pair");
    for s in [&a, &b] {
        s.set_read_timeout(Some(STUCK)).expect("a read timeout");
        s.set_write_timeout(Some(STUCK)).expect("a write timeout");
    }
    (a, b)
}

/// Runs the client and the server on threads of their own, with a relay thread for each direction.
fn run_ends(script: &Script) -> (Outcome, Outcome, [Transform; 2]) {
    ignore_sigpipe();
    let key = crate::cluster_key();
    let (client_io, client_side) = socket_pair();
    let (server_side, server_io) = socket_pair();
    let c2s = Transform { tampers: script.tampers[0].clone(), ..Transform::default() };
    let s2c = Transform { tampers: script.tampers[1].clone(), ..Transform::default() };
    let clone = |s: &UnixStream| s.try_clone().expect("a second handle");
    let (to_client, to_server) = (clone(&client_side), clone(&server_side));
    std::thread::scope(|scope| {
        let client = scope.spawn(|| match blocking::Channel::client(client_io, &key, CLIENT_NODE) {
            Ok(ch) => end(ch, &script.frames[0]),
            Err(e) => Outcome::failed(&e),
        });
        let server = scope.spawn(|| match blocking::Channel::server(server_io, &key, SERVER_NODE) {
            Ok(ch) => end(ch, &script.frames[1]),
            Err(e) => Outcome::failed(&e),
        });
        let c2s = scope.spawn(move || relay(client_side, to_server, c2s));
        let s2c = scope.spawn(move || relay(server_side, to_client, s2c));
        (join(client), join(server), [join(c2s), join(s2c)])
    })
}

/// A thread's result; its panic goes on in the caller.
fn join<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Sends `frames`, closes our direction and receives until the end.
fn end(mut ch: blocking::Channel<UnixStream>, frames: &[Frame]) -> Outcome {
    let mut outcome =
        Outcome { handshake: Ok((ch.peer_node(), *ch.bulk_key())), received: Vec::new(), end: End::Closed };
    for (kind, payload) in frames {
        if ch.send(*kind, payload).is_err() {
            break;
        }
    }
    let _ = ch.shutdown();
    while outcome.finish(ch.recv()) {}
    outcome
}

/// Passes one direction's bytes on through `t`. Reads the sender to its end whatever happens, so it never
/// waits on a full socket.
fn relay(mut from: UnixStream, mut to: UnixStream, mut t: Transform) -> Transform {
    let mut buf = vec![0; 4096];
    let mut out = Vec::new();
    let mut open = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                assert!(e.kind() != std::io::ErrorKind::WouldBlock, "the relay waited {STUCK:?} for a sender");
                break;
            }
        };
        out.clear();
        let going_on = t.feed(&buf[..n], &mut out);
        if open && !out.is_empty() && to.write_all(&out).is_err() {
            open = false;
        }
        if open && !going_on {
            let _ = to.shutdown(Shutdown::Write);
            open = false;
        }
    }
    if open {
        let _ = to.shutdown(Shutdown::Write);
    }
    t
}

/// Clean exchanges and one of each tampering.
pub fn seeds() -> Vec<Vec<u8>> {
    let frames = |b: Builder| {
        b.u8(3).u8(1).chunk(br#"{"home_node":1,"home_pid":42}"#).u8(11).chunk(b"output").u8(16).chunk(b"0")
    };
    let handshake = u16::try_from(channel::HELLO_LEN + channel::PROOF_LEN).expect("short");
    let tampers: [&[(u8, u8, u16, u8)]; 7] = [
        &[],
        &[(0, 0, 100, 1)],
        &[(1, 0, 10, 0x80)],
        &[(0, 1, handshake + 20, 1)],
        &[(1, 2, 4, 8)],
        &[(0, 3, 0, 60)],
        &[(0, 0, 3, 1), (1, 1, 50, 1)],
    ];
    let mut seeds = Vec::new();
    for list in tampers {
        // The first byte selects nothing; 1 picked the blocking ends when it still did.
        let mut b = frames(Builder::new().u8(1));
        b = b.u8(2).u8(2).chunk(br#"{"ok":true}"#).u8(13).chunk(b"input");
        b = b.u8(u8::try_from(list.len()).expect("short"));
        for &(direction, op, offset, len) in list {
            b = b.u8(direction).u8(op).u16(offset).u8(len).u8(0x41);
        }
        seeds.push(b.build());
    }
    seeds
}
