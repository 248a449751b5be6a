//! Target `infod_datagram`: `rmosix_common::wire::decode`, the first thing infod does with a UDP datagram.
//!
//! The first input byte picks a mode. Even: the rest is the datagram, as it came off the socket. Odd: the
//! rest is a payload that gets a correct header and a valid HMAC under the fuzzing key, as a node holding
//! the cluster key but sending nonsense would make it; without this the fuzzer would never get past the
//! MAC to the rkyv decoder and the sanity checks behind it.
//!
//! Checked: `decode` returns, whatever the bytes; a datagram it accepts keeps the promises of
//! `wire` (at most `MAX_ENTRIES` entries, every vector sane, the own vector's node is the sender), and
//! encodes again to a datagram that decodes to the same message.

use hmac::{Hmac, KeyInit as _, Mac as _};
use rmosix_common::load::LoadVector;
use rmosix_common::wire::{self, DecodeError, EncodeError, Entry, Gossip};
use sha2::Sha256;

/// Pieces of datagrams worth splicing in.
pub const TOKENS: &[&[u8]] = &[b"RMXI", &[1, 0], &[1, 0, 1, 0], &[0xff, 0xff, 0xff, 0xff]];

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = crate::cluster_key();
    let datagram = if mode % 2 == 0 { rest.to_vec() } else { sign(rest) };
    match wire::decode(&key, &datagram) {
        Ok(msg) => check_accepted(&key, &msg),
        Err(e) => {
            // The drop counters are keyed by the reason; the log shows the message.
            assert!(!e.reason().is_empty() && !e.to_string().is_empty());
            if let DecodeError::LengthMismatch { declared, actual } = e {
                assert_ne!(declared, actual);
            }
        }
    }
}

fn check_accepted(key: &rmosix_common::key::ClusterKey, msg: &Gossip) {
    assert!(msg.entries.len() <= wire::MAX_ENTRIES, "{} entries accepted", msg.entries.len());
    assert!(msg.own.is_sane(), "insane own vector accepted: {:?}", msg.own);
    assert_eq!(msg.own.node, msg.sender, "own vector of another node accepted");
    for entry in &msg.entries {
        assert!(entry.vector.is_sane(), "insane entry accepted: {entry:?}");
    }
    match wire::encode(key, msg) {
        Ok(again) => {
            let decoded = wire::decode(key, &again)
                .unwrap_or_else(|e| panic!("a message decode accepted, encoded again, is refused: {e}"));
            assert_eq!(&decoded, msg, "the round trip changed the message");
        }
        // A payload laid out more tightly than rkyv's own could in principle re-encode longer.
        Err(EncodeError::TooLong { .. }) => {}
        Err(e) => panic!("a message decode accepted does not encode: {e}"),
    }
}

/// A datagram with `payload`, a correct header and a valid MAC under the fuzzing key.
pub fn sign(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(wire::HEADER_LEN + payload.len() + wire::MAC_LEN);
    out.extend_from_slice(&wire::MAGIC);
    out.extend_from_slice(&wire::VERSION.to_le_bytes());
    out.push(wire::Kind::Gossip as u8);
    out.push(0);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(payload);
    let mut mac = <Hmac<Sha256>>::new_from_slice(crate::cluster_key().as_bytes()).expect("any key length");
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

fn vector(node: u32, load: f64) -> LoadVector {
    LoadVector {
        node,
        cpus: 2,
        speed: 1.5,
        load,
        mem_free: 1 << 30,
        mem_total: 4 << 30,
        guests: node % 3,
        flags: node % 2,
        incarnation: 1_700_000_000_000_000_000,
        seq: u64::from(node) * 7,
    }
}

fn gossip(entries: u32) -> Gossip {
    Gossip {
        sender: 1,
        incarnation: 1_700_000_000_000_000_000,
        counter: 42,
        sent_at_ms: 1_700_000_000_000,
        own: vector(1, 0.25),
        entries: (2..2 + entries).map(|n| Entry { age_ms: n * 10, vector: vector(n, f64::from(n) / 4.0) }).collect(),
    }
}

/// Valid datagrams (raw mode) and their payloads (signing mode), of several sizes.
pub fn seeds() -> Vec<Vec<u8>> {
    let key = crate::cluster_key();
    let mut seeds = Vec::new();
    for entries in [0, 1, 3, 20] {
        let datagram = wire::encode(&key, &gossip(entries)).expect("seed messages encode");
        let payload = datagram[wire::HEADER_LEN..datagram.len() - wire::MAC_LEN].to_vec();
        seeds.push([&[0][..], &datagram].concat());
        seeds.push([&[1][..], &payload].concat());
    }
    seeds.push(vec![0; 1 + wire::HEADER_LEN + wire::MAC_LEN]);
    seeds
}
