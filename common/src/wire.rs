//! The datagram infod daemons exchange, and its authenticated framing.
//!
//! ```text
//! 0       4        6      7         8             12              12+len          12+len+32
//! | magic | version | kind | reserved | payload len | payload (rkyv) | HMAC-SHA256 |
//! ```
//!
//! The HMAC, keyed with the cluster key, covers every byte before it. It is checked before the payload is
//! looked at, so bytes from outside the cluster never reach the decoder; the decoder still validates
//! everything (rkyv's checked access), because a node holding the key may be buggy. Decoding never panics.
//! The version field lets a future format be refused cleanly instead of misread.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::key::ClusterKey;
use crate::load::LoadVector;

/// First bytes of every infod datagram.
pub const MAGIC: [u8; 4] = *b"RMXI";
/// The wire version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes of the header before the payload.
pub const HEADER_LEN: usize = 12;
/// Bytes of the trailing MAC.
pub const MAC_LEN: usize = 32;
/// Largest datagram accepted or produced.
pub const MAX_DATAGRAM: usize = 60 * 1024;
/// Most window entries one datagram may carry.
pub const MAX_ENTRIES: usize = 256;

/// Kind of a datagram (byte 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A [`Gossip`] message.
    Gossip = 1,
}

/// One entry about another node, as forwarded in a datagram.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Entry {
    /// How old the information was when sent, in milliseconds. Ages, not timestamps, travel between nodes,
    /// so the window works without synchronised clocks.
    pub age_ms: u32,
    /// The node's vector.
    pub vector: LoadVector,
}

/// What infod sends to a random peer every interval.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Gossip {
    /// Sending node.
    pub sender: u32,
    /// Sender's incarnation (its start time in nanoseconds).
    pub incarnation: u64,
    /// Datagram number within the incarnation; strictly increasing, so a replay is recognised.
    pub counter: u64,
    /// Sender's wall clock at sending, milliseconds since the epoch; bounds how old a replay can be.
    pub sent_at_ms: u64,
    /// The sender's own fresh vector.
    pub own: LoadVector,
    /// The freshest entries of the sender's window.
    pub entries: Vec<Entry>,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram of {len} bytes is shorter than header and MAC")]
    TooShort { len: usize },
    #[error("datagram of {len} bytes is longer than {MAX_DATAGRAM}")]
    TooLong { len: usize },
    #[error("not an rmosix datagram (bad magic)")]
    BadMagic,
    #[error("wire version {0} is not supported (this node speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    #[error("payload length {declared} does not match the {actual} bytes received")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("MAC check failed: wrong cluster key, or the datagram was altered")]
    BadMac,
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("payload values out of range")]
    Insane,
}

impl DecodeError {
    /// Short stable name, used as the key of drop counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooShort { .. } | Self::TooLong { .. } | Self::LengthMismatch { .. } => "length",
            Self::BadMagic => "magic",
            Self::UnsupportedVersion(_) => "version",
            Self::UnknownKind(_) => "kind",
            Self::BadMac => "mac",
            Self::Malformed(_) | Self::Insane => "malformed",
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot serialize message: {0}")]
    Serialize(String),
    #[error("message of {len} bytes exceeds {MAX_DATAGRAM}")]
    TooLong { len: usize },
}

fn mac(key: &ClusterKey) -> Hmac<Sha256> {
    <Hmac<Sha256>>::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length")
}

/// Encodes and signs a gossip message.
pub fn encode(key: &ClusterKey, msg: &Gossip) -> Result<Vec<u8>, EncodeError> {
    let payload =
        rkyv::to_bytes::<rkyv::rancor::Error>(msg).map_err(|e| EncodeError::Serialize(e.to_string()))?;
    let len = HEADER_LEN + payload.len() + MAC_LEN;
    if len > MAX_DATAGRAM {
        return Err(EncodeError::TooLong { len });
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(Kind::Gossip as u8);
    out.push(0);
    out.extend_from_slice(&u32::try_from(payload.len()).expect("bounded above").to_le_bytes());
    out.extend_from_slice(&payload);
    let mut m = mac(key);
    m.update(&out);
    out.extend_from_slice(&m.finalize().into_bytes());
    Ok(out)
}

/// Checks and decodes a datagram. Never panics, whatever the bytes.
pub fn decode(key: &ClusterKey, bytes: &[u8]) -> Result<Gossip, DecodeError> {
    let len = bytes.len();
    if len < HEADER_LEN + MAC_LEN {
        return Err(DecodeError::TooShort { len });
    }
    if len > MAX_DATAGRAM {
        return Err(DecodeError::TooLong { len });
    }
    if bytes[0..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if bytes[6] != Kind::Gossip as u8 {
        return Err(DecodeError::UnknownKind(bytes[6]));
    }
    let declared = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let actual = len - HEADER_LEN - MAC_LEN;
    if declared != actual {
        return Err(DecodeError::LengthMismatch { declared, actual });
    }
    let (signed, tag) = bytes.split_at(len - MAC_LEN);
    let mut m = mac(key);
    m.update(signed);
    m.verify_slice(tag).map_err(|_| DecodeError::BadMac)?;

    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(actual);
    aligned.extend_from_slice(&signed[HEADER_LEN..]);
    let msg = rkyv::from_bytes::<Gossip, rkyv::rancor::Error>(&aligned)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if msg.entries.len() > MAX_ENTRIES
        || !msg.own.is_sane()
        || msg.own.node != msg.sender
        || msg.entries.iter().any(|e| !e.vector.is_sane())
    {
        return Err(DecodeError::Insane);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use rand::{RngExt as _, SeedableRng as _};

    use super::*;

    fn vector(node: u32) -> LoadVector {
        LoadVector {
            node,
            cpus: 4,
            speed: 1.0,
            load: 0.5,
            mem_free: 1 << 30,
            mem_total: 4 << 30,
            guests: 0,
            flags: 0,
            incarnation: 7,
            seq: 3,
        }
    }

    fn message() -> Gossip {
        Gossip {
            sender: 1,
            incarnation: 7,
            counter: 9,
            sent_at_ms: 1_700_000_000_000,
            own: vector(1),
            entries: (2..6).map(|n| Entry { age_ms: n * 100, vector: vector(n) }).collect(),
        }
    }

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&key(), &message()).unwrap();
        assert_eq!(decode(&key(), &bytes).unwrap(), message());
    }

    #[test]
    fn a_full_window_fits_a_datagram() {
        let mut msg = message();
        msg.entries = (2..2 + u32::try_from(MAX_ENTRIES).unwrap())
            .map(|n| Entry { age_ms: 1, vector: vector(n) })
            .collect();
        let len = encode(&key(), &msg).unwrap().len();
        assert!(len < MAX_DATAGRAM, "{len}");
    }

    #[test]
    fn wrong_key_and_any_flipped_bit_are_refused() {
        let bytes = encode(&key(), &message()).unwrap();
        let other = ClusterKey::from_bytes(b"another key of the right length!");
        assert_eq!(decode(&other, &bytes), Err(DecodeError::BadMac));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                // Each part of the header has its own check; the reserved byte, payload and MAC the MAC's.
                let expected = match i {
                    0..4 => "magic",
                    4..6 => "version",
                    6 => "kind",
                    8..12 => "length",
                    _ => "mac",
                };
                let reason = decode(&key(), &b).map_or_else(|e| e.reason(), |_| "none");
                assert_eq!(reason, expected, "flip of byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn truncations_are_refused() {
        let bytes = encode(&key(), &message()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode(&key(), &bytes[..cut]).unwrap_err();
            if cut < HEADER_LEN + MAC_LEN {
                assert_eq!(err, DecodeError::TooShort { len: cut });
            } else {
                let declared = bytes.len() - HEADER_LEN - MAC_LEN;
                assert_eq!(err, DecodeError::LengthMismatch { declared, actual: cut - HEADER_LEN - MAC_LEN });
            }
        }
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let mut bytes = encode(&key(), &message()).unwrap();
        bytes[4] = 2;
        assert_eq!(decode(&key(), &bytes), Err(DecodeError::UnsupportedVersion(2)));
    }

    #[test]
    fn validly_signed_garbage_is_refused_without_panicking() {
        // A node holding the key but sending nonsense: the MAC passes, the payload checker must hold. A few
        // changed bytes may still make a well-formed message (a changed load, say), which must then be sane;
        // everything else is refused as malformed or insane.
        let (mut refused, mut accepted) = (0, 0);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x5eed);
        let good = encode(&key(), &message()).unwrap();
        let payload_len = good.len() - HEADER_LEN - MAC_LEN;
        for round in 0..20_000 {
            let mut payload: Vec<u8> = if round % 2 == 0 {
                let mut p = good[HEADER_LEN..HEADER_LEN + payload_len].to_vec();
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..p.len());
                    p[i] = rng.random();
                }
                p
            } else {
                (0..rng.random_range(0..400)).map(|_| rng.random()).collect()
            };
            if round % 7 == 0 {
                payload.truncate(rng.random_range(0..=payload.len()));
            }
            let mut bytes = good[..HEADER_LEN].to_vec();
            bytes[8..12].copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
            bytes.extend_from_slice(&payload);
            let mut m = mac(&key());
            m.update(&bytes);
            bytes.extend_from_slice(&m.finalize().into_bytes());
            match decode(&key(), &bytes) {
                Ok(msg) => {
                    assert!(round % 2 == 0, "random bytes decoded as {msg:?}");
                    assert!(msg.own.is_sane() && msg.own.node == msg.sender && msg.entries.len() <= MAX_ENTRIES, "{msg:?}");
                    assert!(msg.entries.iter().all(|e| e.vector.is_sane()), "{msg:?}");
                    accepted += 1;
                }
                Err(DecodeError::Malformed(_) | DecodeError::Insane) => refused += 1,
                Err(e) => panic!("round {round}: refused before the payload: {e}"),
            }
        }
        assert_eq!(accepted + refused, 20_000);
        assert!(refused > 10_000, "only {refused} refused, {accepted} accepted");
    }

    #[test]
    fn random_bytes_are_refused() {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        for _ in 0..20_000 {
            let len = rng.random_range(0..200);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len >= 4 && rng.random_bool(0.5) {
                bytes[..4].copy_from_slice(&MAGIC);
            }
            assert!(decode(&key(), &bytes).is_err());
        }
    }

    #[test]
    fn insane_values_are_refused_even_when_signed() {
        let mut msg = message();
        msg.entries[0].vector.load = f64::INFINITY;
        let bytes = encode(&key(), &msg).unwrap();
        assert_eq!(decode(&key(), &bytes), Err(DecodeError::Insane));
        let mut msg = message();
        msg.own.node = 99;
        let bytes = encode(&key(), &msg).unwrap();
        assert_eq!(decode(&key(), &bytes), Err(DecodeError::Insane));
    }
}
