//! The encrypted, authenticated connection between two migds.
//!
//! migds move jobs and relay a running job's stdio and signals over TCP. Anyone who can open a connection to
//! a node could otherwise push a forged job onto it or inject keystrokes into someone's job, and anyone on
//! the path could read a job's output, input and memory image. So every connection first proves that both
//! ends hold the cluster key, and every message after that is sealed with AES-256-GCM (encrypted and
//! authenticated) under keys unique to the connection and direction. A peer that fails the handshake gets
//! an error and nothing it sent is ever returned to the caller; the caller logs the error with the peer's
//! address (this module does not know it) and drops the connection.
//!
//! AES-256-GCM is `ring`'s: with AES-NI and carry-less multiplication it sealed 2.2-2.6 GB/s on one core of
//! this project's machines, 2.4 times the `aes-gcm` crate and twice `ring`'s own ChaCha20-Poly1305 (`cargo
//! xtask bench migrate` shows what it costs a move). Message sizes and timing stay visible.
//!
//! # Handshake
//!
//! All integers are little-endian, as in the infod datagram format.
//!
//! ```text
//! hello  = magic "RMXM" (4) | version u16 (2) | node id u32 (4) | nonce (32)        = 42 bytes
//! proof  = HMAC-SHA256(cluster key, label | 0x00 | T)                              = 32 bytes
//! T      = client nonce | server nonce | client node u32 | server node u32 | version u16   (74 bytes)
//!
//! client -> server   hello(client)
//! server -> client   hello(server) | proof("rmosix-migd server proof")
//! client -> server   proof("rmosix-migd client proof")
//! ```
//!
//! The server proves first, so a client never sends anything key-dependent to an impostor; the server
//! reads nothing but the fixed-size hello and proof before the client's proof has verified, so bytes an
//! unauthenticated client sends after them are never read. Magic and version are the first 6 bytes of
//! every hello in every version: an end reads them first and refuses another version with
//! [`ChannelError::VersionMismatch`] before reading the rest. A server that refuses the client's version
//! still sends its own hello (without proof), so the client can name both versions too. Over TCP
//! ([`blocking::Channel::client_tcp`], [`blocking::Channel::server_tcp`]) the whole handshake must finish
//! within [`HANDSHAKE_TIMEOUT`].
//!
//! Session keys, all `HMAC-SHA256(cluster key, label | 0x00 | T)`, fresh per connection because both
//! nonces are: `"rmosix-migd c2s frames"` and `"rmosix-migd s2c frames"` are the two directions' AES-256-GCM
//! frame keys, and `"rmosix-migd bulk"` is the [`blocking::Channel::bulk_key`] for raw image streams. The
//! version is in `T`, so keys of one protocol version are never those of another.
//!
//! # Frames
//!
//! ```text
//! frame = payload length u32 (4) | kind u8 (1) | sealed payload (length bytes, at most MAX_PAYLOAD) | tag (16)
//! AES-256-GCM(direction key, nonce = sequence u64 | 0u32, associated data = payload length u32 | kind u8)
//! ```
//!
//! Each direction numbers its frames from 0, one per frame; the number is not sent, each end counts, and
//! each direction has its own key, so a nonce is never used twice under one key. A replayed, reordered,
//! dropped or altered frame, or one taken from another connection or the other direction, fails
//! authentication ([`ChannelError::BadMac`]), and nothing of it is returned. Length and kind travel in clear
//! (a receiver must know how much to read) but are authenticated. A length above [`MAX_PAYLOAD`] is refused
//! before anything is allocated, so every read has a bound. After any such failure, a truncated frame or an
//! interrupted send, the channel refuses further use ([`ChannelError::Poisoned`]): the byte stream can no
//! longer be trusted to be in step. The peer closing its direction between frames ([`ChannelError::Closed`])
//! is not such a failure: ours stays usable, as with a TCP half-close. The `kind` byte is the caller's: this
//! module only authenticates it.
//!
//! # Raw bulk bytes
//!
//! A job's images (gigabytes) go over the same connection unframed, in records of a megabyte instead of
//! frames of at most [`MAX_PAYLOAD`]. The channel reads and writes the stream without buffering ahead, so
//! between frames the caller can take the stream with [`blocking::Channel::raw_mut`], move a
//! self-delimiting stream or exactly the number of bytes announced in a preceding frame, and then go on
//! framing with the same sequence numbers. Raw bytes are not sealed by the channel: the caller seals them
//! under [`blocking::Channel::bulk_key`], as `rmosix_checkpoint::transfer::pack` and `unpack` do
//! (AES-256-GCM records under a key derived from it and a salt of the stream's own).
//!
//! # Driving it
//!
//! [`blocking::Channel`] runs the channel over blocking `std::io` streams, on migd's threads (CRIU and the
//! moving of images block). The handshake (`Handshake`) and the building and checking of frames
//! (`Outbound`, `Inbound`) are state machines without I/O: every decision and every error is theirs, and
//! the driver only does the reads and writes they ask for.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit as _, Mac as _};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rmosix_common::key::ClusterKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"RMXM";
/// The channel protocol version this build speaks. Version 2: frames sealed with AES-256-GCM.
pub const VERSION: u16 = 2;
/// Bytes in a hello.
pub const HELLO_LEN: usize = 42;
/// Bytes in a handshake proof.
pub const PROOF_LEN: usize = 32;
/// Longest a handshake may take before the connection is dropped; keeps a silent or slow peer from
/// holding a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a frame before its payload (length and kind).
pub const FRAME_HEADER_LEN: usize = 5;
/// Bytes of a frame's authentication tag (AES-GCM's).
pub const TAG_LEN: usize = 16;
/// Largest frame payload sent or accepted. Control messages are small; stdio is relayed in pieces.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes of the bulk key.
pub const BULK_KEY_LEN: usize = 32;

/// Bytes of a hello that every protocol version shares: magic and version.
const HELLO_PREFIX_LEN: usize = 6;
const NONCE_LEN: usize = 32;
/// Bytes of the transcript both proofs and all session keys are derived from.
const TRANSCRIPT_LEN: usize = 2 * NONCE_LEN + 4 + 4 + 2;

const LABEL_SERVER_PROOF: &[u8] = b"rmosix-migd server proof";
const LABEL_CLIENT_PROOF: &[u8] = b"rmosix-migd client proof";
const LABEL_C2S: &[u8] = b"rmosix-migd c2s frames";
const LABEL_S2C: &[u8] = b"rmosix-migd s2c frames";
const LABEL_BULK: &[u8] = b"rmosix-migd bulk";

/// Which end of a connection: the client opened it, the server accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The end that connected.
    Client,
    /// The end that accepted.
    Server,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Server => "server",
        })
    }
}

/// Why a handshake failed or a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The stream failed.
    #[error("channel I/O failed while {doing}")]
    Io {
        /// What the channel was doing.
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks migd channel protocol version {theirs}, this node speaks version {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer did not start with a migd hello: it is not a migd.
    #[error("peer is not a migd: its hello starts with {found:02x?}, expected {MAGIC:02x?} (\"RMXM\")")]
    BadMagic {
        /// The first four bytes it sent.
        found: [u8; 4],
    },
    /// The peer failed to prove that it holds the cluster key.
    #[error("peer ({peer}) failed to prove it holds the cluster key: wrong key, or not a cluster member")]
    AuthFailed {
        /// The role of the peer that failed.
        peer: Role,
    },
    /// The peer closed the connection before the handshake finished. A server sees this when the client
    /// refused the server's proof (wrong key on one side).
    #[error("peer closed the connection during the handshake, while {step}")]
    HandshakeClosed {
        /// Which handshake step was under way.
        step: &'static str,
    },
    /// The handshake did not finish in time.
    #[error("handshake did not finish within {after:?}")]
    HandshakeTimeout {
        /// The limit that passed.
        after: Duration,
    },
    /// A received frame failed authentication: altered, replayed, reordered, dropped, or from another
    /// connection or direction.
    #[error("frame {seq} failed authentication (altered, replayed, reordered or from another connection)")]
    BadMac {
        /// The sequence number the frame should have had.
        seq: u64,
    },
    /// A frame's payload exceeds [`MAX_PAYLOAD`]. When sending, nothing was written and the channel is
    /// still usable; when receiving, the channel is poisoned.
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD}")]
    FrameTooLarge {
        /// The payload length sent or announced.
        len: usize,
    },
    /// The peer closed its direction cleanly between frames. Not a failure of the channel: our direction
    /// can still be used.
    #[error("peer closed the connection")]
    Closed,
    /// The connection ended in the middle of a frame.
    #[error("connection ended in the middle of a frame, while {step}")]
    Truncated {
        /// Which part of the frame was being read.
        step: &'static str,
    },
    /// An earlier error (or a send interrupted half-way) left the stream out of step; the channel must be
    /// dropped.
    #[error("channel is unusable after an earlier error or an interrupted send")]
    Poisoned,
    /// [`blocking::Channel::raw_mut`] was called while a receive that timed out had read part of a frame.
    #[error("raw access refused: part of a frame has been received")]
    PartialFrame,
    /// A message could not be serialized to JSON. Nothing was sent.
    #[error("cannot encode a kind {kind} message as JSON")]
    Encode {
        /// The kind it was to be sent as.
        kind: u8,
        #[source]
        source: serde_json::Error,
    },
    /// An authenticated frame did not hold the expected JSON. The channel is still in step.
    #[error("cannot decode the kind {kind} message received")]
    Decode {
        /// The kind it arrived as.
        kind: u8,
        #[source]
        source: serde_json::Error,
    },
}

impl ChannelError {
    /// Whether this is a timeout: [`ChannelError::HandshakeTimeout`], or a read or write timeout set on a
    /// blocking socket (`set_read_timeout`; Unix reports `WouldBlock`, other systems `TimedOut`). After a
    /// receive's read timeout the channel is still usable and the receive can be called again; after a
    /// send's write timeout it is poisoned.
    pub fn is_timeout(&self) -> bool {
        match self {
            Self::HandshakeTimeout { .. } => true,
            Self::Io { source, .. } => {
                matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
            }
            _ => false,
        }
    }
}

/// Keyed HMAC-SHA256 from a key of any length.
fn hmac(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// `HMAC(cluster key, label | 0 | transcript)`: the handshake proofs and session keys.
fn derive(key: &ClusterKey, label: &[u8], transcript: &[u8; TRANSCRIPT_LEN]) -> HmacSha256 {
    let mut m = hmac(key.as_bytes());
    m.update(label);
    m.update(&[0]);
    m.update(transcript);
    m
}

fn derive_bytes(key: &ClusterKey, label: &[u8], transcript: &[u8; TRANSCRIPT_LEN]) -> [u8; 32] {
    derive(key, label, transcript).finalize().into_bytes().into()
}

/// One end's hello.
struct Hello {
    version: u16,
    node: u32,
    nonce: [u8; NONCE_LEN],
}

impl Hello {
    fn fresh(version: u16, node: u32) -> Self {
        let mut nonce = [0; NONCE_LEN];
        rand::fill(&mut nonce[..]);
        Self { version, node, nonce }
    }

    fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0; HELLO_LEN];
        out[..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..10].copy_from_slice(&self.node.to_le_bytes());
        out[10..].copy_from_slice(&self.nonce);
        out
    }

    /// The hello whose bytes after the shared prefix are `rest`, once magic and `version` have been checked.
    fn decode_after_prefix(version: u16, rest: &[u8]) -> Self {
        let (node, nonce) = rest.split_at(4);
        Self {
            version,
            node: u32::from_le_bytes(node.try_into().expect("4 bytes of node id")),
            nonce: nonce.try_into().expect("32 bytes of nonce"),
        }
    }
}

/// The handshake transcript both proofs and all keys cover.
fn transcript(client: &Hello, server: &Hello, version: u16) -> [u8; TRANSCRIPT_LEN] {
    let mut t = [0; TRANSCRIPT_LEN];
    t[..32].copy_from_slice(&client.nonce);
    t[32..64].copy_from_slice(&server.nonce);
    t[64..68].copy_from_slice(&client.node.to_le_bytes());
    t[68..72].copy_from_slice(&server.node.to_le_bytes());
    t[72..74].copy_from_slice(&version.to_le_bytes());
    t
}

/// What a finished handshake yields.
struct Session {
    peer_node: u32,
    send: FrameKey,
    recv: FrameKey,
    bulk_key: [u8; BULK_KEY_LEN],
}

impl Session {
    fn new(key: &ClusterKey, transcript: &[u8; TRANSCRIPT_LEN], role: Role, peer_node: u32) -> Self {
        let c2s = FrameKey::new(&derive_bytes(key, LABEL_C2S, transcript));
        let s2c = FrameKey::new(&derive_bytes(key, LABEL_S2C, transcript));
        let (send, recv) = match role {
            Role::Client => (c2s, s2c),
            Role::Server => (s2c, c2s),
        };
        Self { peer_node, send, recv, bulk_key: derive_bytes(key, LABEL_BULK, transcript) }
    }
}

/// One I/O operation a [`Handshake`] asks its driver for.
enum HandshakeIo {
    /// Write all of these bytes and flush.
    Write(Vec<u8>),
    /// Read exactly this many bytes.
    Read(usize),
    /// The handshake is over and the peer has proved itself.
    Done(Box<Session>),
}

/// Where a [`Handshake`] is; each stage says what the result of the I/O it asked for means.
enum Stage {
    /// Nothing done yet.
    Start,
    /// The client's hello has been written.
    ClientHelloSent,
    /// The peer hello's magic and version were read.
    PeerPrefix,
    /// The rest of the peer's hello was read.
    PeerHelloRest,
    /// The server's hello and proof have been written.
    ServerProofSent { peer_node: u32, transcript: [u8; TRANSCRIPT_LEN] },
    /// The peer's proof was read.
    PeerProof { peer_node: u32, transcript: [u8; TRANSCRIPT_LEN] },
    /// The client's proof has been written.
    ClientProofSent { peer_node: u32, transcript: [u8; TRANSCRIPT_LEN] },
    /// Our hello has been written, best effort, to a peer of another version: fail with this.
    Refusing(ChannelError),
    /// Failed or finished.
    Over,
}

/// One end's handshake as a state machine without I/O. Its driver does each [`HandshakeIo`] it asks for and
/// hands the result to the next [`Handshake::advance`]; every decision and every error is made here.
struct Handshake<'k> {
    key: &'k ClusterKey,
    role: Role,
    version: u16,
    ours: Hello,
    stage: Stage,
    /// The step whose I/O is under way, named in its errors.
    step: &'static str,
}

impl<'k> Handshake<'k> {
    fn new(key: &'k ClusterKey, our_node: u32, role: Role, version: u16) -> Self {
        Self {
            key,
            role,
            version,
            ours: Hello::fresh(version, our_node),
            stage: Stage::Start,
            step: "starting",
        }
    }

    /// Takes the result of the last I/O asked for (for the first call and after a write, `Ok` of nothing;
    /// after a read, the bytes read) and says what to do next.
    fn advance(&mut self, done: io::Result<Vec<u8>>) -> Result<HandshakeIo, ChannelError> {
        let stage = std::mem::replace(&mut self.stage, Stage::Over);
        if let Stage::Refusing(error) = stage {
            // Whether the peer got our hello does not matter: the version mismatch is the error.
            return Err(error);
        }
        let step = self.step;
        let input = done.map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                ChannelError::HandshakeClosed { step }
            } else {
                ChannelError::Io { doing: step, source }
            }
        })?;
        let (hello_step, proof_step) = match self.role {
            Role::Client => ("reading the server hello", "reading the server proof"),
            Role::Server => ("reading the client hello", "reading the client proof"),
        };
        let read_prefix = HandshakeIo::Read(HELLO_PREFIX_LEN);
        Ok(match (stage, self.role) {
            (Stage::Start, Role::Client) => self.then(
                Stage::ClientHelloSent,
                "sending the client hello",
                HandshakeIo::Write(self.ours.encode().into()),
            ),
            (Stage::Start, Role::Server) | (Stage::ClientHelloSent, _) => {
                self.then(Stage::PeerPrefix, hello_step, read_prefix)
            }
            (Stage::PeerPrefix, role) => match check_hello_prefix(&input, self.version) {
                Ok(()) => self.then(
                    Stage::PeerHelloRest,
                    hello_step,
                    HandshakeIo::Read(HELLO_LEN - HELLO_PREFIX_LEN),
                ),
                Err(error @ ChannelError::VersionMismatch { .. }) if role == Role::Server => {
                    // So the client can name both versions too.
                    let hello = HandshakeIo::Write(self.ours.encode().into());
                    self.then(Stage::Refusing(error), "sending the server hello", hello)
                }
                Err(error) => return Err(error),
            },
            (Stage::PeerHelloRest, Role::Client) => {
                let peer = Hello::decode_after_prefix(self.version, &input);
                let transcript = transcript(&self.ours, &peer, self.version);
                let next = Stage::PeerProof { peer_node: peer.node, transcript };
                self.then(next, proof_step, HandshakeIo::Read(PROOF_LEN))
            }
            (Stage::PeerHelloRest, Role::Server) => {
                let peer = Hello::decode_after_prefix(self.version, &input);
                let transcript = transcript(&peer, &self.ours, self.version);
                let mut reply = Vec::with_capacity(HELLO_LEN + PROOF_LEN);
                reply.extend_from_slice(&self.ours.encode());
                reply.extend_from_slice(&derive_bytes(self.key, LABEL_SERVER_PROOF, &transcript));
                let next = Stage::ServerProofSent { peer_node: peer.node, transcript };
                self.then(next, "sending the server hello and proof", HandshakeIo::Write(reply))
            }
            (Stage::ServerProofSent { peer_node, transcript }, _) => self.then(
                Stage::PeerProof { peer_node, transcript },
                proof_step,
                HandshakeIo::Read(PROOF_LEN),
            ),
            (Stage::PeerProof { peer_node, transcript }, Role::Client) => {
                derive(self.key, LABEL_SERVER_PROOF, &transcript)
                    .verify_slice(&input)
                    .map_err(|_| ChannelError::AuthFailed { peer: Role::Server })?;
                let proof = derive_bytes(self.key, LABEL_CLIENT_PROOF, &transcript).into();
                let next = Stage::ClientProofSent { peer_node, transcript };
                self.then(next, "sending the client proof", HandshakeIo::Write(proof))
            }
            (Stage::PeerProof { peer_node, transcript }, Role::Server) => {
                derive(self.key, LABEL_CLIENT_PROOF, &transcript)
                    .verify_slice(&input)
                    .map_err(|_| ChannelError::AuthFailed { peer: Role::Client })?;
                HandshakeIo::Done(Box::new(Session::new(self.key, &transcript, Role::Server, peer_node)))
            }
            (Stage::ClientProofSent { peer_node, transcript }, _) => {
                HandshakeIo::Done(Box::new(Session::new(self.key, &transcript, Role::Client, peer_node)))
            }
            (Stage::Refusing(_) | Stage::Over, _) => {
                unreachable!("a handshake advanced after it ended")
            }
        })
    }

    fn then(&mut self, stage: Stage, step: &'static str, io: HandshakeIo) -> HandshakeIo {
        self.stage = stage;
        self.step = step;
        io
    }
}

/// Refuses a foreign magic or another version, from the first bytes of a hello that every version shares.
fn check_hello_prefix(prefix: &[u8], version: u16) -> Result<(), ChannelError> {
    let [m0, m1, m2, m3, v0, v1] = <[u8; HELLO_PREFIX_LEN]>::try_from(prefix).expect("a whole hello prefix");
    if [m0, m1, m2, m3] != MAGIC {
        return Err(ChannelError::BadMagic { found: [m0, m1, m2, m3] });
    }
    let theirs = u16::from_le_bytes([v0, v1]);
    if theirs != version {
        return Err(ChannelError::VersionMismatch { ours: version, theirs });
    }
    Ok(())
}

/// One direction's AES-256-GCM key. Boxed: the expanded key schedule is large and moves with the channel.
struct FrameKey(Box<LessSafeKey>);

impl FrameKey {
    fn new(key: &[u8; 32]) -> Self {
        Self(Box::new(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32 bytes make an AES-256 key"))))
    }

    /// Encrypts `payload` in place as frame `seq` with `header` (length and kind); returns the tag.
    fn seal(&self, seq: u64, header: [u8; FRAME_HEADER_LEN], payload: &mut [u8]) -> [u8; TAG_LEN] {
        let tag = self
            .0
            .seal_in_place_separate_tag(frame_nonce(seq), Aad::from(header), payload)
            .expect("a frame is far below AES-GCM's message limit");
        tag.as_ref().try_into().expect("AES-GCM tags are 16 bytes")
    }

    /// Decrypts and checks frame `seq` in place: `sealed` is its payload and tag; on success the payload in
    /// clear is its first `sealed.len() - TAG_LEN` bytes.
    fn open(&self, seq: u64, header: [u8; FRAME_HEADER_LEN], sealed: &mut [u8]) -> Result<(), ChannelError> {
        match self.0.open_in_place(frame_nonce(seq), Aad::from(header), sealed) {
            Ok(_) => Ok(()),
            Err(_) => Err(ChannelError::BadMac { seq }),
        }
    }
}

/// The nonce of frame `seq`: the number itself, then zeros. Each direction has its own key and numbers its
/// frames once each, so no nonce repeats under a key.
fn frame_nonce(seq: u64) -> Nonce {
    let mut nonce = [0; 12];
    nonce[..8].copy_from_slice(&seq.to_le_bytes());
    Nonce::assume_unique_for_key(nonce)
}

fn encode_json<T: Serialize + ?Sized>(kind: u8, msg: &T) -> Result<Vec<u8>, ChannelError> {
    serde_json::to_vec(msg).map_err(|source| ChannelError::Encode { kind, source })
}

fn decode_json<T: DeserializeOwned>((kind, payload): (u8, Vec<u8>)) -> Result<(u8, T), ChannelError> {
    let msg = serde_json::from_slice(&payload).map_err(|source| ChannelError::Decode { kind, source })?;
    Ok((kind, msg))
}

fn shutdown_failed(source: io::Error) -> ChannelError {
    ChannelError::Io { doing: "closing the connection", source }
}

/// The sending side of a channel: its direction's key and sequence number. Builds frames and keeps the
/// books; the sender only writes what [`Outbound::start`] returns.
struct Outbound {
    /// This direction's key.
    key: FrameKey,
    /// Number of the next frame to send.
    seq: u64,
    /// Set while a frame is being written: still set on entry means an earlier send stopped half-way (its
    /// write failed or panicked) and the peer may have a partial frame.
    in_flight: bool,
    /// Shared with the receiving side: a failure on either makes the whole channel unusable.
    poisoned: Arc<AtomicBool>,
}

impl Outbound {
    /// Refuses a poisoned channel or an oversized payload, else returns the frame to write in one piece
    /// (separate small writes would meet Nagle's algorithm on TCP) and marks it in flight.
    fn start(&mut self, kind: u8, payload: &[u8]) -> Result<Vec<u8>, ChannelError> {
        if self.in_flight || self.poisoned.load(Ordering::Acquire) {
            self.poisoned.store(true, Ordering::Release);
            return Err(ChannelError::Poisoned);
        }
        let len = match u32::try_from(payload.len()) {
            Ok(len) if payload.len() <= MAX_PAYLOAD => len,
            _ => return Err(ChannelError::FrameTooLarge { len: payload.len() }),
        };
        let mut header = [0; FRAME_HEADER_LEN];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4] = kind;
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len() + TAG_LEN);
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        let tag = self.key.seal(self.seq, header, &mut frame[FRAME_HEADER_LEN..]);
        frame.extend_from_slice(&tag);
        self.in_flight = true;
        Ok(frame)
    }

    /// Books the outcome of writing the frame from [`Outbound::start`]; a failed write poisons.
    fn finish(&mut self, written: io::Result<()>) -> Result<(), ChannelError> {
        match written {
            Ok(()) => {
                self.in_flight = false;
                self.seq += 1;
                Ok(())
            }
            Err(source) => {
                self.poisoned.store(true, Ordering::Release);
                Err(ChannelError::Io { doing: "sending a frame", source })
            }
        }
    }
}

/// The receiving side of a channel. Keeps a partly received frame across calls, so a receive can stop
/// between reads (a socket read timeout) and go on later. Says where the next read goes and checks what
/// arrived; the receiver only does the reads.
struct Inbound {
    /// This direction's key.
    key: FrameKey,
    /// Number of the next frame expected.
    seq: u64,
    /// Length and kind of the frame being received.
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes of `header` received so far.
    header_filled: usize,
    /// Payload and tag of the frame being received; empty until its header is complete and checked.
    body: Vec<u8>,
    /// Bytes of `body` received so far.
    body_filled: usize,
    /// Shared with the sending side.
    poisoned: Arc<AtomicBool>,
}

const READING_HEADER: &str = "reading a frame header";
const READING_BODY: &str = "reading a frame payload and tag";

impl Inbound {
    fn mid_frame(&self) -> bool {
        self.header_filled > 0
    }

    fn check_usable(&self) -> Result<(), ChannelError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(ChannelError::Poisoned);
        }
        Ok(())
    }

    /// Poisons the channel on a failed receive, except for two that leave the stream in step: a clean end of
    /// the peer's direction (ours may still be used, as with a TCP half-close) and a read timeout set on a
    /// blocking socket (nothing was consumed; the partial frame is kept for the next receive).
    fn settle<T>(&self, received: Result<T, ChannelError>) -> Result<T, ChannelError> {
        if received.as_ref().is_err_and(|e| !matches!(e, ChannelError::Closed) && !e.is_timeout()) {
            self.poisoned.store(true, Ordering::Release);
        }
        received
    }

    /// What the next read is for, named in its errors.
    fn doing(&self) -> &'static str {
        if self.header_filled < FRAME_HEADER_LEN { READING_HEADER } else { READING_BODY }
    }

    /// Where the next read goes: never past the end of the frame, so nothing after it is consumed (raw
    /// bulk bytes may follow).
    fn buffer(&mut self) -> &mut [u8] {
        if self.header_filled < FRAME_HEADER_LEN {
            &mut self.header[self.header_filled..]
        } else {
            &mut self.body[self.body_filled..]
        }
    }

    /// Books `n` bytes read into [`Inbound::buffer`] (0: the end of the stream). Returns the frame once it
    /// is complete and authentic.
    fn filled(&mut self, n: usize) -> Result<Option<(u8, Vec<u8>)>, ChannelError> {
        if self.header_filled < FRAME_HEADER_LEN {
            if n == 0 {
                return Err(if self.header_filled == 0 {
                    ChannelError::Closed
                } else {
                    ChannelError::Truncated { step: READING_HEADER }
                });
            }
            self.header_filled += n;
            if self.header_filled == FRAME_HEADER_LEN {
                let len = usize::try_from(self.announced()).unwrap_or(usize::MAX);
                if len > MAX_PAYLOAD {
                    return Err(ChannelError::FrameTooLarge { len });
                }
                self.body = vec![0; len + TAG_LEN];
                self.body_filled = 0;
            }
            return Ok(None);
        }
        if n == 0 {
            return Err(ChannelError::Truncated { step: READING_BODY });
        }
        self.body_filled += n;
        if self.body_filled < self.body.len() {
            return Ok(None);
        }
        let kind = self.header[FRAME_HEADER_LEN - 1];
        let mut payload = std::mem::take(&mut self.body);
        self.header_filled = 0;
        self.body_filled = 0;
        self.key.open(self.seq, self.header, &mut payload)?;
        payload.truncate(payload.len() - TAG_LEN);
        self.seq += 1;
        Ok(Some((kind, payload)))
    }

    /// The payload length in the frame header.
    fn announced(&self) -> u32 {
        let [l0, l1, l2, l3, _kind] = self.header;
        u32::from_le_bytes([l0, l1, l2, l3])
    }
}

pub mod blocking {
    //! The channel over blocking `std::io` streams, for migd's plain threads (CRIU and the image transfer
    //! block).
    //!
    //! Timeouts are the socket's. [`Channel::client_tcp`] and [`Channel::server_tcp`] bound the whole
    //! handshake by [`HANDSHAKE_TIMEOUT`]; the generic [`Channel::client`] and [`Channel::server`] have no
    //! limit of their own. A read timeout the caller sets on the socket makes a receive return an error for
    //! which [`ChannelError::is_timeout`] holds, and leaves the channel usable with any partly received frame
    //! kept for the next receive; a send that times out half-way poisons the channel.

    use std::fmt;
    use std::io::{self, Read, Write};
    use std::net::{Shutdown, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use rmosix_common::key::ClusterKey;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{
        BULK_KEY_LEN, ChannelError, FRAME_HEADER_LEN, HANDSHAKE_TIMEOUT, Handshake, HandshakeIo, Inbound,
        Outbound, Role, Session, VERSION, decode_json, encode_json, shutdown_failed,
    };

    /// A socket that can close its sending direction and be split by cloning its handle, as
    /// [`Channel::shutdown`] and [`Channel::into_split`] need: `TcpStream` and `UnixStream`.
    pub trait Socket: Read + Write + Sized {
        /// Closes the sending direction (`SHUT_WR`), so the peer reads the end of the stream.
        fn shutdown_write(&self) -> io::Result<()>;
        /// Another handle to the same socket.
        fn try_clone_handle(&self) -> io::Result<Self>;
    }

    impl Socket for TcpStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shutdown(Shutdown::Write)
        }

        fn try_clone_handle(&self) -> io::Result<Self> {
            self.try_clone()
        }
    }

    impl Socket for UnixStream {
        fn shutdown_write(&self) -> io::Result<()> {
            self.shutdown(Shutdown::Write)
        }

        fn try_clone_handle(&self) -> io::Result<Self> {
            self.try_clone()
        }
    }

    /// An authenticated connection to another migd, made by [`Channel::client`] or [`Channel::server`]
    /// (over TCP, [`Channel::client_tcp`] or [`Channel::server_tcp`]); see the [module](self) docs and those
    /// of the [channel](super).
    ///
    /// Sending and receiving work on the stream directly, without buffering ahead. For TCP, set
    /// `TCP_NODELAY` on the stream: every frame is one write.
    pub struct Channel<S> {
        /// The connection.
        stream: S,
        /// Frames to the peer.
        outbound: Outbound,
        /// Frames from the peer.
        inbound: Inbound,
        /// The node id the peer proved its hello with.
        peer_node: u32,
        /// Key for sealing raw bulk bytes on this connection.
        bulk_key: [u8; BULK_KEY_LEN],
    }

    impl<S> fmt::Debug for Channel<S> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Channel")
                .field("peer_node", &self.peer_node)
                .field("sent", &self.outbound.seq)
                .field("received", &self.inbound.seq)
                .field("poisoned", &self.outbound.poisoned.load(Ordering::Relaxed))
                .finish_non_exhaustive()
        }
    }

    impl<S: Read + Write> Channel<S> {
        /// Runs the handshake as the end that connected, as node `our_node`. On success the server has
        /// proved it holds `key`; the caller checks [`Channel::peer_node`] against the cluster map and the
        /// address it connected to. No time limit: bound it with socket timeouts, or use
        /// [`Channel::client_tcp`].
        pub fn client(stream: S, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
            Self::handshake(stream, key, our_node, Role::Client, VERSION)
        }

        /// Runs the handshake as the end that accepted, as node `our_node`. Returns only once the client has
        /// proved it holds `key`; until then nothing the client sent beyond its hello and proof was read.
        /// The caller checks [`Channel::peer_node`] against the cluster map and the source address. No time
        /// limit: bound it with socket timeouts, or use [`Channel::server_tcp`].
        pub fn server(stream: S, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
            Self::handshake(stream, key, our_node, Role::Server, VERSION)
        }

        pub(super) fn handshake(
            mut stream: S,
            key: &ClusterKey,
            our_node: u32,
            role: Role,
            version: u16,
        ) -> Result<Self, ChannelError> {
            let session = handshake(&mut stream, Handshake::new(key, our_node, role, version))?;
            Ok(Self::established(stream, session))
        }

        /// Sends one frame. A payload over [`MAX_PAYLOAD`](super::MAX_PAYLOAD) is refused with nothing
        /// sent. A send that fails or times out half-way poisons the channel.
        pub fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
            send(&mut self.outbound, &mut self.stream, kind, payload)
        }

        /// Receives the next frame: its kind and payload. After a read timeout it can be called again: a
        /// partly received frame is kept.
        pub fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
            recv(&mut self.inbound, &mut self.stream)
        }

        /// Sends `msg` as JSON in a frame of `kind`.
        pub fn send_json<T: Serialize + ?Sized>(&mut self, kind: u8, msg: &T) -> Result<(), ChannelError> {
            self.send(kind, &encode_json(kind, msg)?)
        }

        /// Receives the next frame and decodes its payload as JSON. A payload that does not decode gives
        /// [`ChannelError::Decode`] and leaves the channel usable.
        pub fn recv_json<T: DeserializeOwned>(&mut self) -> Result<(u8, T), ChannelError> {
            decode_json(self.recv()?)
        }
    }

    impl Channel<TcpStream> {
        /// [`Channel::client`] with the whole handshake bounded by [`HANDSHAKE_TIMEOUT`]
        /// ([`ChannelError::HandshakeTimeout`]). The stream's own read and write timeouts are restored
        /// afterwards.
        pub fn client_tcp(stream: TcpStream, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
            Self::handshake_tcp(stream, key, our_node, Role::Client, HANDSHAKE_TIMEOUT)
        }

        /// [`Channel::server`] with the whole handshake bounded by [`HANDSHAKE_TIMEOUT`]
        /// ([`ChannelError::HandshakeTimeout`]). The stream's own read and write timeouts are restored
        /// afterwards.
        pub fn server_tcp(stream: TcpStream, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
            Self::handshake_tcp(stream, key, our_node, Role::Server, HANDSHAKE_TIMEOUT)
        }

        pub(super) fn handshake_tcp(
            stream: TcpStream,
            key: &ClusterKey,
            our_node: u32,
            role: Role,
            limit: Duration,
        ) -> Result<Self, ChannelError> {
            let io_error = |doing| move |source| ChannelError::Io { doing, source };
            let read_timeout = stream.read_timeout().map_err(io_error("reading the socket timeouts"))?;
            let write_timeout = stream.write_timeout().map_err(io_error("reading the socket timeouts"))?;
            let mut bounded = Deadline { stream: &stream, deadline: Instant::now() + limit };
            let session =
                handshake(&mut bounded, Handshake::new(key, our_node, role, VERSION)).map_err(|e| {
                    if e.is_timeout() { ChannelError::HandshakeTimeout { after: limit } } else { e }
                })?;
            stream.set_read_timeout(read_timeout).map_err(io_error("restoring the socket timeouts"))?;
            stream.set_write_timeout(write_timeout).map_err(io_error("restoring the socket timeouts"))?;
            Ok(Self::established(stream, session))
        }
    }

    impl<S: Socket> Channel<S> {
        /// Closes our sending direction (for TCP, a FIN); the peer's next receive gives
        /// [`ChannelError::Closed`], and ours can go on.
        pub fn shutdown(&mut self) -> Result<(), ChannelError> {
            self.stream.shutdown_write().map_err(shutdown_failed)
        }

        /// Splits into halves over two handles to the socket, for a reading and a writing thread. If the
        /// handle cannot be cloned (out of file descriptors), the channel is dropped with the error.
        pub fn into_split(self) -> Result<(Reader<S>, Writer<S>), ChannelError> {
            self.try_into_split_with(|s| Ok((s.try_clone_handle()?, s)))
        }
    }

    impl<S> Channel<S> {
        /// The channel over `stream` after a handshake on it.
        fn established(stream: S, session: Session) -> Self {
            let poisoned = Arc::new(AtomicBool::new(false));
            Self {
                stream,
                outbound: Outbound {
                    key: session.send,
                    seq: 0,
                    in_flight: false,
                    poisoned: Arc::clone(&poisoned),
                },
                inbound: Inbound {
                    key: session.recv,
                    seq: 0,
                    header: [0; FRAME_HEADER_LEN],
                    header_filled: 0,
                    body: Vec::new(),
                    body_filled: 0,
                    poisoned,
                },
                peer_node: session.peer_node,
                bulk_key: session.bulk_key,
            }
        }

        /// The stream, for raw bulk bytes between frames.
        ///
        /// The caller must read or write exactly the bytes both ends agreed on: a self-delimiting stream that
        /// reads nothing past its end (`rmosix_checkpoint::transfer`), or a length announced in a preceding
        /// frame (`read_exact`, `write_all`, `Read::take(len)`; never an unbounded `read_to_end`). The
        /// channel does not seal these bytes: the caller encrypts and authenticates them under
        /// [`Channel::bulk_key`]. Framing then goes on with the same sequence numbers. If raw I/O fails, drop
        /// the channel.
        ///
        /// Refused on a poisoned channel, and while a receive that timed out holds part of a frame.
        pub fn raw_mut(&mut self) -> Result<&mut S, ChannelError> {
            if self.outbound.in_flight || self.outbound.poisoned.load(Ordering::Acquire) {
                return Err(ChannelError::Poisoned);
            }
            if self.inbound.mid_frame() {
                return Err(ChannelError::PartialFrame);
            }
            Ok(&mut self.stream)
        }

        /// The node id the peer gave in its authenticated hello.
        pub fn peer_node(&self) -> u32 {
            self.peer_node
        }

        /// Key for sealing raw bulk bytes on this connection: the `key` of `rmosix_checkpoint::transfer::pack`
        /// and `unpack`, which derive a key per stream from it. Both ends have the same one; every connection
        /// has another. Derived from the handshake like the frame keys, never sent.
        pub fn bulk_key(&self) -> &[u8; BULK_KEY_LEN] {
            &self.bulk_key
        }

        /// Splits into a receiving and a sending half with `split`. Each half keeps its direction's key and
        /// sequence number; an error on either poisons both.
        pub fn into_split_with<R, W>(self, split: impl FnOnce(S) -> (R, W)) -> (Reader<R>, Writer<W>) {
            let Self { stream, outbound, inbound, peer_node, .. } = self;
            let (read, write) = split(stream);
            (Reader { stream: read, inbound, peer_node }, Writer { stream: write, outbound, peer_node })
        }

        /// [`Channel::into_split_with`] with a `split` that can fail, e.g. `|s| Ok((s.try_clone()?, s))`
        /// for a `TcpStream`. On failure the channel is dropped with the error.
        pub fn try_into_split_with<R, W>(
            self,
            split: impl FnOnce(S) -> io::Result<(R, W)>,
        ) -> Result<(Reader<R>, Writer<W>), ChannelError> {
            let Self { stream, outbound, inbound, peer_node, .. } = self;
            let (read, write) =
                split(stream).map_err(|source| ChannelError::Io { doing: "splitting the channel", source })?;
            Ok((Reader { stream: read, inbound, peer_node }, Writer { stream: write, outbound, peer_node }))
        }
    }

    /// The receiving half of a [`Channel`].
    pub struct Reader<R> {
        /// The connection's reading half.
        stream: R,
        /// Frames from the peer.
        inbound: Inbound,
        /// The authenticated peer, kept for logging.
        peer_node: u32,
    }

    impl<R> fmt::Debug for Reader<R> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Reader")
                .field("peer_node", &self.peer_node)
                .field("received", &self.inbound.seq)
                .finish_non_exhaustive()
        }
    }

    impl<R: Read> Reader<R> {
        /// Receives the next frame: its kind and payload; see [`Channel::recv`].
        pub fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
            recv(&mut self.inbound, &mut self.stream)
        }

        /// Receives the next frame and decodes its payload as JSON.
        pub fn recv_json<T: DeserializeOwned>(&mut self) -> Result<(u8, T), ChannelError> {
            decode_json(self.recv()?)
        }
    }

    impl<R> Reader<R> {
        /// The node id the peer authenticated as.
        pub fn peer_node(&self) -> u32 {
            self.peer_node
        }
    }

    /// The sending half of a [`Channel`].
    pub struct Writer<W> {
        /// The connection's writing half.
        stream: W,
        /// Frames to the peer.
        outbound: Outbound,
        /// The authenticated peer, kept for logging.
        peer_node: u32,
    }

    impl<W> fmt::Debug for Writer<W> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Writer")
                .field("peer_node", &self.peer_node)
                .field("sent", &self.outbound.seq)
                .finish_non_exhaustive()
        }
    }

    impl<W: Write> Writer<W> {
        /// Sends one frame; see [`Channel::send`].
        pub fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
            send(&mut self.outbound, &mut self.stream, kind, payload)
        }

        /// Sends `msg` as JSON in a frame of `kind`.
        pub fn send_json<T: Serialize + ?Sized>(&mut self, kind: u8, msg: &T) -> Result<(), ChannelError> {
            self.send(kind, &encode_json(kind, msg)?)
        }
    }

    impl<W: Socket> Writer<W> {
        /// Closes our sending direction; the peer's next receive gives [`ChannelError::Closed`].
        pub fn shutdown(&mut self) -> Result<(), ChannelError> {
            self.stream.shutdown_write().map_err(shutdown_failed)
        }
    }

    impl<W> Writer<W> {
        /// The node id the peer authenticated as.
        pub fn peer_node(&self) -> u32 {
            self.peer_node
        }
    }

    impl Writer<TcpStream> {
        /// Whether the connection is still established as far as this end's kernel knows: not closed or
        /// reset by the peer (its end of a connection whose process died is closed), whatever unread data
        /// is queued before that. Looks without reading or waiting.
        pub fn established(&self) -> bool {
            use std::os::fd::AsRawFd as _;
            // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes of it.
            unsafe {
                let mut info: libc::tcp_info = std::mem::zeroed();
                let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).expect("small");
                let got = libc::getsockopt(
                    self.stream.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&raw mut info).cast(),
                    &raw mut len,
                );
                got == 0 && info.tcpi_state == TCP_ESTABLISHED
            }
        }
    }

    /// `TCP_ESTABLISHED` of the kernel's `tcp_states.h`, as `tcpi_state` gives it.
    const TCP_ESTABLISHED: u8 = 1;

    /// Runs a handshake over a blocking stream.
    fn handshake<S: Read + Write>(
        stream: &mut S,
        mut handshake: Handshake<'_>,
    ) -> Result<Session, ChannelError> {
        let mut done = Ok(Vec::new());
        loop {
            done = match handshake.advance(done)? {
                HandshakeIo::Write(bytes) => {
                    stream.write_all(&bytes).and_then(|()| stream.flush()).map(|()| Vec::new())
                }
                HandshakeIo::Read(len) => {
                    let mut buf = vec![0; len];
                    stream.read_exact(&mut buf).map(|()| buf)
                }
                HandshakeIo::Done(session) => return Ok(*session),
            };
        }
    }

    fn send<W: Write>(
        outbound: &mut Outbound,
        stream: &mut W,
        kind: u8,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        let frame = outbound.start(kind, payload)?;
        let written = stream.write_all(&frame).and_then(|()| stream.flush());
        outbound.finish(written)
    }

    fn recv<R: Read>(inbound: &mut Inbound, stream: &mut R) -> Result<(u8, Vec<u8>), ChannelError> {
        inbound.check_usable()?;
        let received = recv_frame(inbound, stream);
        inbound.settle(received)
    }

    fn recv_frame<R: Read>(inbound: &mut Inbound, stream: &mut R) -> Result<(u8, Vec<u8>), ChannelError> {
        loop {
            let doing = inbound.doing();
            let n = match stream.read(inbound.buffer()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ChannelError::Io { doing, source }),
            };
            if let Some(frame) = inbound.filled(n)? {
                return Ok(frame);
            }
        }
    }

    /// A TCP stream whose reads and writes must all finish by `deadline`: bounds the whole handshake, where
    /// a socket timeout alone would bound each read and let a peer trickle bytes forever.
    struct Deadline<'s> {
        stream: &'s TcpStream,
        deadline: Instant,
    }

    impl Deadline<'_> {
        fn left(&self) -> io::Result<Duration> {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() { Err(io::ErrorKind::TimedOut.into()) } else { Ok(left) }
        }
    }

    impl Read for Deadline<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.stream.set_read_timeout(Some(self.left()?))?;
            self.stream.read(buf)
        }
    }

    impl Write for Deadline<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.stream.set_write_timeout(Some(self.left()?))?;
            self.stream.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::blocking::{Channel, Socket as _};
    use super::*;

    const CLIENT_NODE: u32 = 11;
    const SERVER_NODE: u32 = 22;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    fn other_key() -> ClusterKey {
        ClusterKey::from_bytes(b"fedcba9876543210fedcba9876543210")
    }

    fn frame_len(payload: usize) -> usize {
        FRAME_HEADER_LEN + payload + TAG_LEN
    }

    fn hello_bytes(version: u16, node: u32) -> [u8; HELLO_LEN] {
        Hello::fresh(version, node).encode()
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Offer {
        job: u64,
        image_bytes: u64,
        argv: Vec<String>,
    }

    /// A client and a server channel over a socket pair.
    fn pair() -> (Channel<UnixStream>, Channel<UnixStream>) {
        let (c, s) = UnixStream::pair().unwrap();
        let k = &key();
        thread::scope(|scope| {
            let server = scope.spawn(move || Channel::server(s, k, SERVER_NODE));
            let client = Channel::client(c, k, CLIENT_NODE).unwrap();
            (client, server.join().unwrap().unwrap())
        })
    }

    /// A man in the middle over two socket pairs: the test moves bytes between them itself.
    struct Mitm {
        /// Our end of the client's pair.
        client_side: UnixStream,
        /// Our end of the server's pair.
        server_side: UnixStream,
    }

    impl Mitm {
        /// Takes the next `n` bytes the client sent.
        fn take_from_client(&mut self, n: usize) -> Vec<u8> {
            let mut buf = vec![0; n];
            self.client_side.read_exact(&mut buf).unwrap();
            buf
        }

        /// Takes the next `n` bytes the server sent.
        fn take_from_server(&mut self, n: usize) -> Vec<u8> {
            let mut buf = vec![0; n];
            self.server_side.read_exact(&mut buf).unwrap();
            buf
        }

        fn send_to_server(&mut self, bytes: &[u8]) {
            self.server_side.write_all(bytes).unwrap();
        }

        fn forward_to_server(&mut self, n: usize) -> Vec<u8> {
            let bytes = self.take_from_client(n);
            self.send_to_server(&bytes);
            bytes
        }

        fn forward_to_client(&mut self, n: usize) {
            let bytes = self.take_from_server(n);
            self.client_side.write_all(&bytes).unwrap();
        }
    }

    /// A client and a server channel that reach each other only through a [`Mitm`].
    fn mitm_pair() -> (Channel<UnixStream>, Channel<UnixStream>, Mitm) {
        let (c, client_side) = UnixStream::pair().unwrap();
        let (s, server_side) = UnixStream::pair().unwrap();
        let mut mitm = Mitm { client_side, server_side };
        let k = &key();
        let (client, server) = thread::scope(|scope| {
            let client = scope.spawn(move || Channel::client(c, k, CLIENT_NODE));
            let server = scope.spawn(move || Channel::server(s, k, SERVER_NODE));
            mitm.forward_to_server(HELLO_LEN);
            mitm.forward_to_client(HELLO_LEN + PROOF_LEN);
            mitm.forward_to_server(PROOF_LEN);
            (client.join().unwrap().unwrap(), server.join().unwrap().unwrap())
        });
        (client, server, mitm)
    }

    fn tcp_pair() -> (Channel<TcpStream>, Channel<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let k = &key();
        thread::scope(|scope| {
            let server = scope.spawn(move || {
                let (stream, _) = listener.accept().unwrap();
                stream.set_nodelay(true).unwrap();
                Channel::server_tcp(stream, k, SERVER_NODE).unwrap()
            });
            let stream = TcpStream::connect(addr).unwrap();
            stream.set_nodelay(true).unwrap();
            // The caller's own timeout survives the handshake's deadline.
            stream.set_read_timeout(Some(Duration::from_mins(1))).unwrap();
            let client = Channel::client_tcp(stream, k, CLIENT_NODE).unwrap();
            (client, server.join().unwrap())
        })
    }
    #[test]
    fn tcp_handshake_messages_both_ways_and_half_close() {
        let (mut client, mut server) = tcp_pair();
        assert_eq!(client.peer_node(), SERVER_NODE);
        assert_eq!(server.peer_node(), CLIENT_NODE);
        assert_eq!(client.bulk_key(), server.bulk_key());
        let timeout = client.raw_mut().unwrap().read_timeout().unwrap();
        assert_eq!(timeout, Some(Duration::from_mins(1)), "the handshake restores the socket's timeouts");
        assert_eq!(server.raw_mut().unwrap().read_timeout().unwrap(), None);

        client.send(1, b"migrate job 42").unwrap();
        client.send(2, b"").unwrap();
        assert_eq!(server.recv().unwrap(), (1, b"migrate job 42".to_vec()));
        assert_eq!(server.recv().unwrap(), (2, Vec::new()));
        server.send(3, b"accepted").unwrap();
        assert_eq!(client.recv().unwrap(), (3, b"accepted".to_vec()));

        let offer = Offer { job: 7, image_bytes: 1 << 30, argv: vec!["sim".into(), "--steps=9".into()] };
        client.send_json(9, &offer).unwrap();
        assert_eq!(server.recv_json::<Offer>().unwrap(), (9, offer));
        client.send(9, b"not json").unwrap();
        assert!(matches!(server.recv_json::<Offer>(), Err(ChannelError::Decode { kind: 9, .. })));

        // An authentic frame that is not the expected JSON leaves the channel in step; one byte over the
        // largest payload is refused before anything is sent.
        let too_big = vec![0; MAX_PAYLOAD + 1];
        assert!(matches!(
            client.send(5, &too_big),
            Err(ChannelError::FrameTooLarge { len }) if len == MAX_PAYLOAD + 1
        ));
        client.send(6, b"still usable").unwrap();
        assert_eq!(server.recv().unwrap(), (6, b"still usable".to_vec()));

        // Half-close: after the client's end, the server can still answer.
        client.shutdown().unwrap();
        assert!(matches!(server.recv(), Err(ChannelError::Closed)));
        assert!(matches!(server.recv(), Err(ChannelError::Closed)));
        server.send(7, b"final report").unwrap();
        assert_eq!(client.recv().unwrap(), (7, b"final report".to_vec()));
    }

    #[test]
    fn the_largest_payload_goes_through_a_socket_pair() {
        let (mut client, mut server) = pair();
        let big = vec![0xa5; MAX_PAYLOAD];
        thread::scope(|scope| {
            scope.spawn(|| client.send(4, &big).unwrap());
            assert_eq!(server.recv().unwrap(), (4, big.clone()));
        });
        server.send(5, b"done").unwrap();
        assert_eq!(client.recv().unwrap(), (5, b"done".to_vec()));
    }

    #[test]
    fn an_image_stream_between_frames_under_the_bulk_key() {
        use rmosix_checkpoint::transfer;
        let source = tempfile::tempdir().unwrap();
        let pages: Vec<u8> = (0..3_000_000u32).map(|i| u8::try_from(i % 241).unwrap()).collect();
        std::fs::write(source.path().join("pages-1.img"), &pages).unwrap();
        std::fs::write(source.path().join("core-1.img"), b"registers").unwrap();
        let target = tempfile::tempdir().unwrap();
        let (mut client, mut server) = tcp_pair();
        thread::scope(|scope| {
            scope.spawn(|| {
                client.send(1, b"images follow").unwrap();
                let key = *client.bulk_key();
                transfer::pack(source.path(), client.raw_mut().unwrap(), &key).unwrap();
                client.send(2, b"restore now").unwrap();
            });
            assert_eq!(server.recv().unwrap(), (1, b"images follow".to_vec()));
            let key = *server.bulk_key();
            let stats = transfer::unpack_limited(server.raw_mut().unwrap(), target.path(), &key, 4 << 20).unwrap();
            assert_eq!(stats.files, 2);
            // The stream read nothing past its end: framing goes on in step.
            assert_eq!(server.recv().unwrap(), (2, b"restore now".to_vec()));
        });
        assert_eq!(std::fs::read(target.path().join("pages-1.img")).unwrap(), pages);

        // A stream sealed under another connection's bulk key is refused, and nothing is left.
        let (mut client, mut server) = tcp_pair();
        let (other, _) = tcp_pair();
        let target = tempfile::tempdir().unwrap();
        thread::scope(|scope| {
            scope.spawn(|| {
                let key = *other.bulk_key();
                let _ = transfer::pack(source.path(), client.raw_mut().unwrap(), &key);
            });
            let key = *server.bulk_key();
            let refused = transfer::unpack(server.raw_mut().unwrap(), target.path(), &key).unwrap_err();
            assert!(matches!(refused, transfer::TransferError::Forged { record: 0, .. }), "{refused}");
            // Closing ends the sender's writes, which the socket's buffers may not hold.
            drop(server);
        });
        assert_eq!(std::fs::read_dir(target.path()).unwrap().count(), 0);
    }

    #[test]
    fn raw_bulk_bytes_between_frames_then_split_halves_on_threads() {
        const N: u32 = 200;
        let (mut client, mut server) = tcp_pair();
        let image: Vec<u8> = (0..3_000_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        thread::scope(|scope| {
            scope.spawn(|| {
                client.send_json(1, &image.len()).unwrap();
                client.raw_mut().unwrap().write_all(&image).unwrap();
                let digest = blake3::keyed_hash(client.bulk_key(), &image);
                client.send(2, digest.as_bytes()).unwrap();
                client.send(3, b"restore now").unwrap();
            });
            let (_, len) = server.recv_json::<u64>().unwrap();
            let mut got = Vec::new();
            server.raw_mut().unwrap().take(len).read_to_end(&mut got).unwrap();
            let (kind, digest) = server.recv().unwrap();
            assert_eq!(kind, 2);
            assert_eq!(blake3::keyed_hash(server.bulk_key(), &got).as_bytes()[..], digest[..]);
            assert_eq!(server.recv().unwrap(), (3, b"restore now".to_vec()));
            assert_eq!(got, image);
        });

        let (mut c_rx, mut c_tx) = client.into_split().unwrap();
        let (mut s_rx, mut s_tx) =
            server.try_into_split_with(|s| Ok((s.try_clone_handle()?, s))).unwrap();
        assert_eq!(c_rx.peer_node(), SERVER_NODE);
        assert_eq!(s_tx.peer_node(), CLIENT_NODE);
        thread::scope(|scope| {
            scope.spawn(|| (0..N).for_each(|i| c_tx.send_json(1, &i).unwrap()));
            scope.spawn(|| (0..N).for_each(|i| s_tx.send_json(2, &(i * 2)).unwrap()));
            scope.spawn(|| (0..N).for_each(|i| assert_eq!(s_rx.recv_json::<u32>().unwrap(), (1, i))));
            scope.spawn(|| (0..N).for_each(|i| assert_eq!(c_rx.recv_json::<u32>().unwrap(), (2, i * 2))));
        });
        c_tx.shutdown().unwrap();
        assert!(matches!(s_rx.recv(), Err(ChannelError::Closed)));
    }

    #[test]
    fn wrong_key_or_version_fails_on_both_sides() {
        for (client_key, server_key) in [(other_key(), key()), (key(), other_key())] {
            let (c, s) = UnixStream::pair().unwrap();
            let (client, server) = thread::scope(|scope| {
                let server = scope.spawn(|| Channel::server(s, &server_key, SERVER_NODE));
                (Channel::client(c, &client_key, CLIENT_NODE), server.join().unwrap())
            });
            assert!(matches!(client, Err(ChannelError::AuthFailed { peer: Role::Server })));
            assert!(matches!(
                server,
                Err(ChannelError::HandshakeClosed { step: "reading the client proof" })
            ));
        }

        let (c, s) = UnixStream::pair().unwrap();
        let k = &key();
        let (client, server) = thread::scope(|scope| {
            let server =
                scope.spawn(move || Channel::handshake(s, k, SERVER_NODE, Role::Server, VERSION + 1));
            (Channel::client(c, k, CLIENT_NODE), server.join().unwrap())
        });
        assert!(matches!(
            client,
            Err(ChannelError::VersionMismatch { ours: VERSION, theirs }) if theirs == VERSION + 1
        ));
        assert!(matches!(
            server,
            Err(ChannelError::VersionMismatch { ours, theirs: VERSION }) if ours == VERSION + 1
        ));
        let message = client.unwrap_err().to_string();
        assert!(message.contains(&format!("version {}", VERSION + 1)), "{message}");
        assert!(message.contains(&format!("version {VERSION}")), "{message}");
    }

    #[test]
    fn flipped_bits_are_refused_and_poison_both_halves() {
        let payload = b"signal 15";
        let len = payload.len();
        for offset in [0, 4, FRAME_HEADER_LEN + 3, FRAME_HEADER_LEN + len + 7] {
            let (mut client, mut server, mut mitm) = mitm_pair();
            client.send(8, payload).unwrap();
            let mut frame = mitm.take_from_client(frame_len(len));
            frame[offset] ^= 0x01;
            mitm.send_to_server(&frame);
            assert!(
                matches!(server.recv(), Err(ChannelError::BadMac { seq: 0 })),
                "flip at byte {offset} was accepted"
            );
            assert!(matches!(server.recv(), Err(ChannelError::Poisoned)));
            assert!(matches!(server.send(1, b"x"), Err(ChannelError::Poisoned)));
            assert!(matches!(server.raw_mut(), Err(ChannelError::Poisoned)));
        }

        // Split first: the reader's failure poisons the writer too.
        let (mut client, server, mut mitm) = mitm_pair();
        let (mut rx, mut tx) = server.into_split().unwrap();
        client.send(8, payload).unwrap();
        let mut frame = mitm.take_from_client(frame_len(len));
        frame[FRAME_HEADER_LEN] ^= 0x80;
        mitm.send_to_server(&frame);
        assert!(matches!(rx.recv(), Err(ChannelError::BadMac { seq: 0 })));
        assert!(matches!(tx.send(1, b"x"), Err(ChannelError::Poisoned)));

        // A high length bit announces more than the limit.
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(8, payload).unwrap();
        let mut frame = mitm.take_from_client(frame_len(len));
        frame[3] ^= 0x80;
        mitm.send_to_server(&frame);
        assert!(matches!(server.recv(), Err(ChannelError::FrameTooLarge { .. })));
        assert!(matches!(server.recv(), Err(ChannelError::Poisoned)));

        // A longer length waits for bytes that never come: truncation when the connection ends.
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(8, payload).unwrap();
        let mut frame = mitm.take_from_client(frame_len(len));
        frame[0] ^= 0x04; // 9 -> 13
        mitm.send_to_server(&frame);
        drop(mitm);
        assert!(matches!(server.recv(), Err(ChannelError::Truncated { .. })));
    }

    #[test]
    fn a_read_timeout_keeps_the_partial_frame() {
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"in two pieces").unwrap();
        let frame = mitm.take_from_client(frame_len(13));
        mitm.send_to_server(&frame[..10]);
        server.raw_mut().unwrap().set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let timed_out = server.recv().unwrap_err();
        assert!(timed_out.is_timeout(), "{timed_out:?}");
        assert!(matches!(server.raw_mut(), Err(ChannelError::PartialFrame)));
        mitm.send_to_server(&frame[10..]);
        assert_eq!(server.recv().unwrap(), (1, b"in two pieces".to_vec()));
        assert!(server.raw_mut().is_ok());

        // A timeout between frames leaves the channel usable too; truncation still poisons.
        assert!(server.recv().unwrap_err().is_timeout());
        client.send(2, b"next").unwrap();
        let frame = mitm.take_from_client(frame_len(4));
        mitm.send_to_server(&frame);
        assert_eq!(server.recv().unwrap(), (2, b"next".to_vec()));
        mitm.send_to_server(&frame[..3]);
        drop(mitm);
        assert!(matches!(server.recv(), Err(ChannelError::Truncated { step: "reading a frame header" })));
        assert!(matches!(server.recv(), Err(ChannelError::Poisoned)));
    }

    #[test]
    fn tcp_handshake_times_out_with_a_silent_peer() {
        let limit = Duration::from_millis(50);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let server = Channel::handshake_tcp(stream, &key(), SERVER_NODE, Role::Server, limit);
        assert!(matches!(server, Err(ChannelError::HandshakeTimeout { after }) if after == limit));

        // A peer that trickles its hello a byte at a time is bounded by the whole handshake's limit.
        let mut trickle = TcpStream::connect(addr).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let started = std::time::Instant::now();
        let server = thread::spawn(move || {
            Channel::handshake_tcp(stream, &key(), SERVER_NODE, Role::Server, limit)
        });
        for byte in hello_bytes(VERSION, 66) {
            if trickle.write_all(&[byte]).is_err() || started.elapsed() > 10 * limit {
                break;
            }
            thread::sleep(limit / 5);
        }
        assert!(matches!(server.join().unwrap(), Err(ChannelError::HandshakeTimeout { .. })));

        // A server that takes the client's hello and never answers.
        let stream = TcpStream::connect(addr).unwrap();
        let _mute = listener.accept().unwrap();
        let client = Channel::handshake_tcp(stream, &key(), CLIENT_NODE, Role::Client, limit);
        assert!(matches!(client, Err(ChannelError::HandshakeTimeout { after }) if after == limit));
    }

    #[test]
    fn bulk_keys_differ_between_connections() {
        let (a, _) = pair();
        let (b, _) = pair();
        assert_ne!(a.bulk_key(), b.bulk_key());
    }

    #[test]
    fn forged_client_proof_is_refused_and_nothing_after_it_is_read() {
        let (mut raw, s) = UnixStream::pair().unwrap();
        // A hello, a guessed proof, then a frame the impostor hopes the server acts on; all sent before the
        // server answers, since a guess needs no answer.
        raw.write_all(&hello_bytes(VERSION, 66)).unwrap();
        raw.write_all(&[0x42; PROOF_LEN]).unwrap();
        let frame = [&[4, 0, 0, 0, 1][..], b"kill", &[0; TAG_LEN]].concat();
        raw.write_all(&frame).unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let server = Channel::server(&s, &key(), SERVER_NODE);
        assert!(matches!(server, Err(ChannelError::AuthFailed { peer: Role::Client })));
        // The frame after the proof was never read.
        let mut unread = Vec::new();
        (&s).read_to_end(&mut unread).unwrap();
        assert_eq!(unread, frame);
        // The server sent nothing after its hello and proof.
        drop(s);
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), HELLO_LEN + PROOF_LEN);
        assert_eq!(reply[..4], MAGIC);
    }

    #[test]
    fn a_future_hello_of_another_length_is_refused_on_its_prefix() {
        // A client of the next version whose hello is longer than ours: the server stops after magic and
        // version.
        let (mut raw, s) = UnixStream::pair().unwrap();
        let mut hello = b"RMXM".to_vec();
        hello.extend_from_slice(&(VERSION + 1).to_le_bytes());
        hello.extend_from_slice(&[0xee; 100]);
        raw.write_all(&hello).unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let server = Channel::server(&s, &key(), SERVER_NODE);
        assert!(matches!(
            server,
            Err(ChannelError::VersionMismatch { ours: VERSION, theirs }) if theirs == VERSION + 1
        ));
        let mut unread = Vec::new();
        (&s).read_to_end(&mut unread).unwrap();
        assert_eq!(unread, [0xee; 100]);
        drop(s);
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply.len(), HELLO_LEN, "a bare hello, no proof");
        assert_eq!(reply[4..6], VERSION.to_le_bytes());
    }

    #[test]
    fn garbage_instead_of_a_hello() {
        let (mut raw, s) = UnixStream::pair().unwrap();
        let request = b"GET / HTTP/1.1\r\nHost: node1\r\n\r\n";
        raw.write_all(request).unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let server = Channel::server(&s, &key(), SERVER_NODE);
        assert!(matches!(server, Err(ChannelError::BadMagic { found }) if &found == b"GET "));
        // The server read no more than the prefix every hello has.
        let mut unread = Vec::new();
        (&s).read_to_end(&mut unread).unwrap();
        assert_eq!(unread, request[HELLO_PREFIX_LEN..]);
        drop(s);
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert!(reply.is_empty(), "the server said nothing to a non-migd");

        let (c, mut raw) = UnixStream::pair().unwrap();
        raw.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
        let client = Channel::client(c, &key(), CLIENT_NODE);
        assert!(matches!(client, Err(ChannelError::BadMagic { found }) if &found == b"SSH-"));

        // A peer that says a few bytes and hangs up.
        let (mut raw, s) = UnixStream::pair().unwrap();
        raw.write_all(b"RMX").unwrap();
        drop(raw);
        let server = Channel::server(s, &key(), SERVER_NODE);
        assert!(matches!(server, Err(ChannelError::HandshakeClosed { step: "reading the client hello" })));
    }

    #[test]
    fn replayed_reordered_and_dropped_frames_are_refused() {
        // Replay: frame 0 delivered twice.
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"start job").unwrap();
        let frame = mitm.forward_to_server(frame_len(9));
        assert_eq!(server.recv().unwrap(), (1, b"start job".to_vec()));
        mitm.send_to_server(&frame);
        assert!(matches!(server.recv(), Err(ChannelError::BadMac { seq: 1 })));

        // Reorder: frame 1 before frame 0.
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"first").unwrap();
        client.send(1, b"second").unwrap();
        let first = mitm.take_from_client(frame_len(5));
        let second = mitm.take_from_client(frame_len(6));
        mitm.send_to_server(&second);
        mitm.send_to_server(&first);
        assert!(matches!(server.recv(), Err(ChannelError::BadMac { seq: 0 })));

        // Drop: frame 0 withheld.
        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"first").unwrap();
        client.send(1, b"second").unwrap();
        mitm.take_from_client(frame_len(5));
        mitm.forward_to_server(frame_len(6));
        assert!(matches!(server.recv(), Err(ChannelError::BadMac { seq: 0 })));

        // A server's frame reflected back to it (other direction, other key).
        let (_client, mut server, mut mitm) = mitm_pair();
        server.send(1, b"echo").unwrap();
        let frame = mitm.take_from_server(frame_len(4));
        mitm.send_to_server(&frame);
        assert!(matches!(server.recv(), Err(ChannelError::BadMac { seq: 0 })));
    }

    #[test]
    fn a_frame_from_another_connection_is_refused() {
        let (mut client_a, _server_a, mut mitm_a) = mitm_pair();
        let (_client_b, mut server_b, mut mitm_b) = mitm_pair();
        client_a.send(1, b"kill -9").unwrap();
        let frame = mitm_a.take_from_client(frame_len(7));
        mitm_b.send_to_server(&frame);
        assert!(matches!(server_b.recv(), Err(ChannelError::BadMac { seq: 0 })));
    }

    #[test]
    fn frames_are_encrypted() {
        let (mut client, mut server, mut mitm) = mitm_pair();
        let secret = b"stdin: my password is hunter2\n";
        client.send(7, secret).unwrap();
        client.send(7, secret).unwrap();
        let first = mitm.take_from_client(frame_len(secret.len()));
        let second = mitm.take_from_client(frame_len(secret.len()));
        // Length and kind are in clear (the receiver needs them to read the frame); the payload is not.
        let header = [&u32::try_from(secret.len()).unwrap().to_le_bytes()[..], &[7]].concat();
        assert_eq!(first[..FRAME_HEADER_LEN], header[..]);
        for frame in [&first, &second] {
            assert!(!frame.windows(8).any(|w| w == b"password"), "payload in clear: {frame:02x?}");
            assert_ne!(frame[FRAME_HEADER_LEN..FRAME_HEADER_LEN + secret.len()], secret[..]);
        }
        // The same payload twice gives other bytes: each frame has its own nonce.
        assert_ne!(first[FRAME_HEADER_LEN..], second[FRAME_HEADER_LEN..]);
        mitm.send_to_server(&first);
        mitm.send_to_server(&second);
        assert_eq!(server.recv().unwrap(), (7, secret.to_vec()));
        assert_eq!(server.recv().unwrap(), (7, secret.to_vec()));
    }

    #[test]
    fn every_flipped_bit_and_every_cut_of_a_frame_is_refused() {
        let payload = b"KILL 9";
        let len = frame_len(payload.len());
        for offset in 0..len {
            for bit in 0..8 {
                let (mut client, mut server, mut mitm) = mitm_pair();
                client.send(3, payload).unwrap();
                let mut frame = mitm.take_from_client(len);
                frame[offset] ^= 1 << bit;
                mitm.send_to_server(&frame);
                drop(mitm);
                // A longer length waits for bytes that never come; a huge one is refused at once; anything
                // else fails authentication. Never is the frame, or any part of it, returned.
                let received = server.recv();
                assert!(
                    matches!(
                        received,
                        Err(ChannelError::BadMac { seq: 0 }
                            | ChannelError::FrameTooLarge { .. }
                            | ChannelError::Truncated { .. })
                    ),
                    "bit {bit} of byte {offset}: {received:?}"
                );
                assert!(matches!(server.recv(), Err(ChannelError::Poisoned)));
            }
        }
        for cut in 0..len {
            let (mut client, mut server, mut mitm) = mitm_pair();
            client.send(3, payload).unwrap();
            let frame = mitm.take_from_client(len);
            mitm.send_to_server(&frame[..cut]);
            drop(mitm);
            let received = server.recv();
            if cut == 0 {
                assert!(matches!(received, Err(ChannelError::Closed)), "{received:?}");
            } else {
                assert!(matches!(received, Err(ChannelError::Truncated { .. })), "cut at {cut}: {received:?}");
            }
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let (_client, mut server, mut mitm) = mitm_pair();
        // Only a header announcing 4 GiB: refused at once, without waiting for or allocating the payload.
        mitm.send_to_server(&[0xff, 0xff, 0xff, 0xff, 1]);
        let refused = server.recv();
        assert!(matches!(refused, Err(ChannelError::FrameTooLarge { len }) if len == u32::MAX as usize));

        let (_client, mut server, mut mitm) = mitm_pair();
        let just_over = u32::try_from(MAX_PAYLOAD + 1).unwrap().to_le_bytes();
        mitm.send_to_server(&[just_over[0], just_over[1], just_over[2], just_over[3], 1]);
        assert!(matches!(server.recv(), Err(ChannelError::FrameTooLarge { .. })));
    }

    #[test]
    fn clean_close_and_truncation_are_told_apart() {
        let (_client, mut server, mitm) = mitm_pair();
        drop(mitm);
        assert!(matches!(server.recv(), Err(ChannelError::Closed)));

        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"partial").unwrap();
        let frame = mitm.take_from_client(frame_len(7));
        mitm.send_to_server(&frame[..2]);
        drop(mitm);
        assert!(matches!(server.recv(), Err(ChannelError::Truncated { step: "reading a frame header" })));

        let (mut client, mut server, mut mitm) = mitm_pair();
        client.send(1, b"partial").unwrap();
        let frame = mitm.take_from_client(frame_len(7));
        mitm.send_to_server(&frame[..frame.len() - 1]);
        drop(mitm);
        assert!(matches!(
            server.recv(),
            Err(ChannelError::Truncated { step: "reading a frame payload and tag" })
        ));
    }

    #[test]
    fn a_send_that_times_out_half_way_poisons_the_channel() {
        // The largest frame does not fit the socket's buffers and the server never reads: the write times
        // out with part of the frame sent.
        let (mut client, _server) = pair();
        client.raw_mut().unwrap().set_write_timeout(Some(Duration::from_millis(20))).unwrap();
        let timed_out = client.send(1, &vec![0; MAX_PAYLOAD]).unwrap_err();
        assert!(timed_out.is_timeout(), "{timed_out:?}");
        assert!(matches!(client.send(1, b"x"), Err(ChannelError::Poisoned)));
        assert!(matches!(client.raw_mut(), Err(ChannelError::Poisoned)));
    }
}
