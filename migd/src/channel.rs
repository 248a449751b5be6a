//! The authenticated connection between two migds.
//!
//! migds move jobs and relay a running job's stdio and signals over TCP. Anyone who can open a connection to
//! a node could otherwise push a forged job onto it or inject keystrokes into someone's job, so every
//! connection first proves that both ends hold the cluster key, and every message after that is
//! integrity-protected with keys unique to the connection and direction. A peer that fails the handshake
//! gets an error and nothing it sent is ever returned to the caller; the caller logs the error with the
//! peer's address (this module does not know it) and drops the connection.
//!
//! Messages are authenticated, not encrypted: no AEAD crate is among migd's dependencies. Confidentiality
//! would need one (e.g. `chacha20poly1305`); the framing keeps a 32-byte trailer where its tag would go.
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
//! still sends its own hello (without proof), so the client can name both versions too. The whole
//! handshake must finish within [`HANDSHAKE_TIMEOUT`].
//!
//! Session keys, all `HMAC-SHA256(cluster key, label | 0x00 | T)`, fresh per connection because both
//! nonces are: `"rmosix-migd c2s frames"` and `"rmosix-migd s2c frames"` key the two directions' frame
//! MACs, and `"rmosix-migd bulk"` is the [`Channel::bulk_key`] for keyed BLAKE3 of image streams.
//!
//! # Frames
//!
//! ```text
//! frame = payload length u32 (4) | kind u8 (1) | payload (length bytes, at most MAX_PAYLOAD) | tag (32)
//! tag   = HMAC-SHA256(direction key, sequence u64 | payload length u32 | kind u8 | payload)
//! ```
//!
//! Each direction numbers its frames from 0, one per frame; the number is not sent, each end counts. A
//! replayed, reordered, dropped or altered frame, or one taken from another connection, fails its MAC.
//! A length above [`MAX_PAYLOAD`] is refused before anything is allocated. After any such failure, a
//! truncated frame or an interrupted send, the channel refuses further use ([`ChannelError::Poisoned`]):
//! the byte stream can no longer be trusted to be in step. The peer closing its direction between frames
//! ([`ChannelError::Closed`]) is not such a failure: ours stays usable, as with a TCP half-close. The
//! `kind` byte is the caller's: this module only authenticates it.
//!
//! # Raw bulk bytes
//!
//! A job's images (gigabytes) go over the same connection unframed, for speed. The channel reads and
//! writes the stream without buffering ahead, so between frames the caller can take the stream with
//! [`Channel::raw_mut`], move exactly the number of bytes announced in a preceding frame, and then go on
//! framing with the same sequence numbers. Raw bytes are not covered by frame MACs: the sender follows them
//! with a frame carrying their keyed BLAKE3 hash under [`Channel::bulk_key`], which the receiver compares
//! before using them.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hmac::{Hmac, KeyInit as _, Mac as _};
use rmosix_common::key::ClusterKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf};

type HmacSha256 = Hmac<Sha256>;

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"RMXM";
/// The channel protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes in a hello.
pub const HELLO_LEN: usize = 42;
/// Bytes in a handshake proof.
pub const PROOF_LEN: usize = 32;
/// Longest a handshake may take before the connection is dropped; keeps a silent or slow peer from
/// holding a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a frame before its payload (length and kind).
pub const FRAME_HEADER_LEN: usize = 5;
/// Bytes of a frame's MAC tag.
pub const TAG_LEN: usize = 32;
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
    /// A received frame failed its MAC: altered, replayed, reordered, dropped, or from another connection.
    #[error("frame {seq} failed its MAC check (altered, replayed, reordered or from another connection)")]
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
    /// An earlier error (or a send cancelled half-way) left the stream out of step; the channel must be
    /// dropped.
    #[error("channel is unusable after an earlier error or an interrupted send")]
    Poisoned,
    /// [`Channel::raw_mut`] was called while a cancelled [`Channel::recv`] had read part of a frame.
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

async fn read_handshake<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    step: &'static str,
) -> Result<(), ChannelError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ChannelError::HandshakeClosed { step }),
        Err(source) => Err(ChannelError::Io { doing: step, source }),
    }
}

async fn write_handshake<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    step: &'static str,
) -> Result<(), ChannelError> {
    let written = async {
        stream.write_all(bytes).await?;
        stream.flush().await
    };
    written.await.map_err(|source| ChannelError::Io { doing: step, source })
}

/// Reads a hello, refusing a foreign magic or another version before reading past the shared prefix.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    version: u16,
    step: &'static str,
) -> Result<Hello, ChannelError> {
    let mut prefix = [0; HELLO_PREFIX_LEN];
    read_handshake(stream, &mut prefix, step).await?;
    let [m0, m1, m2, m3, v0, v1] = prefix;
    if [m0, m1, m2, m3] != MAGIC {
        return Err(ChannelError::BadMagic { found: [m0, m1, m2, m3] });
    }
    let theirs = u16::from_le_bytes([v0, v1]);
    if theirs != version {
        return Err(ChannelError::VersionMismatch { ours: version, theirs });
    }
    let mut rest = [0; HELLO_LEN - HELLO_PREFIX_LEN];
    read_handshake(stream, &mut rest, step).await?;
    let (node, nonce) = rest.split_at(4);
    Ok(Hello {
        version: theirs,
        node: u32::from_le_bytes(node.try_into().expect("4 bytes")),
        nonce: nonce.try_into().expect("32 bytes"),
    })
}

/// What a finished handshake yields.
struct Session {
    peer_node: u32,
    send: HmacSha256,
    recv: HmacSha256,
    bulk_key: [u8; BULK_KEY_LEN],
}

impl Session {
    fn new(key: &ClusterKey, transcript: &[u8; TRANSCRIPT_LEN], role: Role, peer_node: u32) -> Self {
        let c2s = hmac(&derive_bytes(key, LABEL_C2S, transcript));
        let s2c = hmac(&derive_bytes(key, LABEL_S2C, transcript));
        let (send, recv) = match role {
            Role::Client => (c2s, s2c),
            Role::Server => (s2c, c2s),
        };
        Self { peer_node, send, recv, bulk_key: derive_bytes(key, LABEL_BULK, transcript) }
    }
}

async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    our_node: u32,
    version: u16,
) -> Result<Session, ChannelError> {
    let ours = Hello::fresh(version, our_node);
    write_handshake(stream, &ours.encode(), "sending the client hello").await?;
    let theirs = read_hello(stream, version, "reading the server hello").await?;
    let t = transcript(&ours, &theirs, version);
    let mut proof = [0; PROOF_LEN];
    read_handshake(stream, &mut proof, "reading the server proof").await?;
    derive(key, LABEL_SERVER_PROOF, &t)
        .verify_slice(&proof)
        .map_err(|_| ChannelError::AuthFailed { peer: Role::Server })?;
    write_handshake(stream, &derive_bytes(key, LABEL_CLIENT_PROOF, &t), "sending the client proof").await?;
    Ok(Session::new(key, &t, Role::Client, theirs.node))
}

async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    key: &ClusterKey,
    our_node: u32,
    version: u16,
) -> Result<Session, ChannelError> {
    let ours = Hello::fresh(version, our_node);
    let theirs = match read_hello(stream, version, "reading the client hello").await {
        Ok(hello) => hello,
        Err(e @ ChannelError::VersionMismatch { .. }) => {
            // Best effort, so the client can report both versions; the error that matters is ours.
            let _ = write_handshake(stream, &ours.encode(), "sending the server hello").await;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let t = transcript(&theirs, &ours, version);
    let mut reply = [0; HELLO_LEN + PROOF_LEN];
    reply[..HELLO_LEN].copy_from_slice(&ours.encode());
    reply[HELLO_LEN..].copy_from_slice(&derive_bytes(key, LABEL_SERVER_PROOF, &t));
    write_handshake(stream, &reply, "sending the server hello and proof").await?;
    let mut proof = [0; PROOF_LEN];
    read_handshake(stream, &mut proof, "reading the client proof").await?;
    derive(key, LABEL_CLIENT_PROOF, &t)
        .verify_slice(&proof)
        .map_err(|_| ChannelError::AuthFailed { peer: Role::Client })?;
    Ok(Session::new(key, &t, Role::Server, theirs.node))
}

/// The MAC of the frame with sequence number `seq`.
fn frame_mac(key: &HmacSha256, seq: u64, len: u32, kind: u8, payload: &[u8]) -> HmacSha256 {
    let mut m = key.clone();
    m.update(&seq.to_le_bytes());
    m.update(&len.to_le_bytes());
    m.update(&[kind]);
    m.update(payload);
    m
}

/// The sending side of a channel: its direction's key and sequence number.
struct Outbound {
    /// HMAC pre-keyed with this direction's session key; cloned per frame.
    key: HmacSha256,
    /// Number of the next frame to send.
    seq: u64,
    /// Set while a frame is being written: still set on entry means a send was cancelled half-way and
    /// the peer has a partial frame.
    in_flight: bool,
    /// Shared with the receiving side: a failure on either makes the whole channel unusable.
    poisoned: Arc<AtomicBool>,
}

impl Outbound {
    async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut W,
        kind: u8,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        if self.in_flight || self.poisoned.load(Ordering::Acquire) {
            self.poisoned.store(true, Ordering::Release);
            return Err(ChannelError::Poisoned);
        }
        let len = match u32::try_from(payload.len()) {
            Ok(len) if payload.len() <= MAX_PAYLOAD => len,
            _ => return Err(ChannelError::FrameTooLarge { len: payload.len() }),
        };
        // One buffer, one write: separate small writes would meet Nagle's algorithm on TCP.
        let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len() + TAG_LEN);
        frame.extend_from_slice(&len.to_le_bytes());
        frame.push(kind);
        frame.extend_from_slice(payload);
        frame.extend_from_slice(&frame_mac(&self.key, self.seq, len, kind, payload).finalize().into_bytes());
        self.in_flight = true;
        let written = async {
            stream.write_all(&frame).await?;
            stream.flush().await
        };
        match written.await {
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

    async fn send_json<W: AsyncWrite + Unpin, T: Serialize + ?Sized>(
        &mut self,
        stream: &mut W,
        kind: u8,
        msg: &T,
    ) -> Result<(), ChannelError> {
        let payload = serde_json::to_vec(msg).map_err(|source| ChannelError::Encode { kind, source })?;
        self.send(stream, kind, &payload).await
    }

    async fn shutdown<W: AsyncWrite + Unpin>(&mut self, stream: &mut W) -> Result<(), ChannelError> {
        stream.shutdown().await.map_err(|source| ChannelError::Io { doing: "closing the connection", source })
    }
}

/// The receiving side of a channel. Keeps a partly received frame across calls, so [`Inbound::recv`] is
/// cancel-safe.
struct Inbound {
    /// HMAC pre-keyed with this direction's session key; cloned per frame.
    key: HmacSha256,
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

impl Inbound {
    fn mid_frame(&self) -> bool {
        self.header_filled > 0
    }

    async fn recv<R: AsyncRead + Unpin>(&mut self, stream: &mut R) -> Result<(u8, Vec<u8>), ChannelError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(ChannelError::Poisoned);
        }
        let received = self.recv_frame(stream).await;
        // A clean end of the peer's direction leaves the stream in step: ours may still be used (half-close).
        if received.as_ref().is_err_and(|e| !matches!(e, ChannelError::Closed)) {
            self.poisoned.store(true, Ordering::Release);
        }
        received
    }

    async fn recv_json<R: AsyncRead + Unpin, T: DeserializeOwned>(
        &mut self,
        stream: &mut R,
    ) -> Result<(u8, T), ChannelError> {
        let (kind, payload) = self.recv(stream).await?;
        let msg = serde_json::from_slice(&payload).map_err(|source| ChannelError::Decode { kind, source })?;
        Ok((kind, msg))
    }

    /// Reads into the frame state with plain cancel-safe `read`s of no more than the frame still needs,
    /// so nothing past the frame is consumed (raw bulk bytes may follow it).
    async fn recv_frame<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
    ) -> Result<(u8, Vec<u8>), ChannelError> {
        const HEADER: &str = "reading a frame header";
        const BODY: &str = "reading a frame payload and tag";
        while self.header_filled < FRAME_HEADER_LEN {
            let n = stream
                .read(&mut self.header[self.header_filled..])
                .await
                .map_err(|source| ChannelError::Io { doing: HEADER, source })?;
            if n == 0 {
                return Err(if self.header_filled == 0 {
                    ChannelError::Closed
                } else {
                    ChannelError::Truncated { step: HEADER }
                });
            }
            self.header_filled += n;
        }
        let [l0, l1, l2, l3, kind] = self.header;
        let len32 = u32::from_le_bytes([l0, l1, l2, l3]);
        let len = usize::try_from(len32).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(ChannelError::FrameTooLarge { len });
        }
        let body_len = len + TAG_LEN;
        if self.body.is_empty() {
            self.body = vec![0; body_len];
            self.body_filled = 0;
        }
        while self.body_filled < body_len {
            let n = stream
                .read(&mut self.body[self.body_filled..])
                .await
                .map_err(|source| ChannelError::Io { doing: BODY, source })?;
            if n == 0 {
                return Err(ChannelError::Truncated { step: BODY });
            }
            self.body_filled += n;
        }
        let mut payload = std::mem::take(&mut self.body);
        self.header_filled = 0;
        self.body_filled = 0;
        let tag = payload.split_off(len);
        frame_mac(&self.key, self.seq, len32, kind, &payload)
            .verify_slice(&tag)
            .map_err(|_| ChannelError::BadMac { seq: self.seq })?;
        self.seq += 1;
        Ok((kind, payload))
    }
}

/// An authenticated connection to another migd, made by [`Channel::client`] or [`Channel::server`].
///
/// Sending and receiving work on the stream directly, without buffering ahead. [`Channel::recv`] is
/// cancel-safe (a partly received frame is kept); [`Channel::send`] is not: cancelling it half-way
/// poisons the channel. For TCP, set `TCP_NODELAY` on the stream: every frame is one write.
pub struct Channel<S> {
    /// The connection.
    stream: S,
    /// Frames to the peer.
    outbound: Outbound,
    /// Frames from the peer.
    inbound: Inbound,
    /// The node id the peer proved its hello with.
    peer_node: u32,
    /// Key for keyed BLAKE3 of raw bulk bytes on this connection.
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

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    /// Runs the handshake as the end that connected, as node `our_node`. On success the server has proved
    /// it holds `key`; the caller checks [`Channel::peer_node`] against the cluster map and the address it
    /// connected to.
    pub async fn client(stream: S, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
        Self::handshake(stream, key, our_node, Role::Client, VERSION, HANDSHAKE_TIMEOUT).await
    }

    /// Runs the handshake as the end that accepted, as node `our_node`. Returns only once the client has
    /// proved it holds `key`; until then nothing the client sent beyond its hello and proof was read. The
    /// caller checks [`Channel::peer_node`] against the cluster map and the source address.
    pub async fn server(stream: S, key: &ClusterKey, our_node: u32) -> Result<Self, ChannelError> {
        Self::handshake(stream, key, our_node, Role::Server, VERSION, HANDSHAKE_TIMEOUT).await
    }

    async fn handshake(
        mut stream: S,
        key: &ClusterKey,
        our_node: u32,
        role: Role,
        version: u16,
        limit: Duration,
    ) -> Result<Self, ChannelError> {
        let steps = async {
            match role {
                Role::Client => client_handshake(&mut stream, key, our_node, version).await,
                Role::Server => server_handshake(&mut stream, key, our_node, version).await,
            }
        };
        let session = tokio::time::timeout(limit, steps)
            .await
            .map_err(|_| ChannelError::HandshakeTimeout { after: limit })??;
        let poisoned = Arc::new(AtomicBool::new(false));
        Ok(Self {
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
        })
    }

    /// Sends one frame. A payload over [`MAX_PAYLOAD`] is refused with nothing sent.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
        self.outbound.send(&mut self.stream, kind, payload).await
    }

    /// Receives the next frame: its kind and payload. Cancel-safe.
    pub async fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
        self.inbound.recv(&mut self.stream).await
    }

    /// Sends `msg` as JSON in a frame of `kind`.
    pub async fn send_json<T: Serialize + ?Sized>(&mut self, kind: u8, msg: &T) -> Result<(), ChannelError> {
        self.outbound.send_json(&mut self.stream, kind, msg).await
    }

    /// Receives the next frame and decodes its payload as JSON. A payload that does not decode gives
    /// [`ChannelError::Decode`] and leaves the channel usable.
    pub async fn recv_json<T: DeserializeOwned>(&mut self) -> Result<(u8, T), ChannelError> {
        self.inbound.recv_json(&mut self.stream).await
    }

    /// Closes our sending direction (TCP FIN); the peer's next [`Channel::recv`] gives
    /// [`ChannelError::Closed`].
    pub async fn shutdown(&mut self) -> Result<(), ChannelError> {
        self.outbound.shutdown(&mut self.stream).await
    }

    /// The stream, for raw bulk bytes between frames.
    ///
    /// The caller must read or write exactly the number of bytes both ends agreed on in a preceding frame
    /// (`read_exact`, `write_all`, `AsyncReadExt::take(len)`; never an unbounded `read_to_end`), then
    /// authenticate them with a keyed BLAKE3 hash under [`Channel::bulk_key`] sent in a following frame.
    /// Framing then goes on with the same sequence numbers. If raw I/O fails, drop the channel.
    ///
    /// Refused on a poisoned channel, and while a cancelled [`Channel::recv`] holds part of a frame.
    pub fn raw_mut(&mut self) -> Result<&mut S, ChannelError> {
        if self.outbound.in_flight || self.outbound.poisoned.load(Ordering::Acquire) {
            return Err(ChannelError::Poisoned);
        }
        if self.inbound.mid_frame() {
            return Err(ChannelError::PartialFrame);
        }
        Ok(&mut self.stream)
    }

    /// Splits into a receiving and a sending half that can be used from different tasks, with
    /// `tokio::io::split`. For a `TcpStream`, `into_split_with(TcpStream::into_split)` avoids its lock.
    pub fn into_split(self) -> (ChannelReader<ReadHalf<S>>, ChannelWriter<WriteHalf<S>>) {
        self.into_split_with(tokio::io::split)
    }
}

impl<S> Channel<S> {
    /// The node id the peer gave in its authenticated hello.
    pub fn peer_node(&self) -> u32 {
        self.peer_node
    }

    /// Key for keyed BLAKE3 (`blake3::keyed_hash`, `blake3::Hasher::new_keyed`) of raw bulk bytes on this
    /// connection. Both ends have the same one; every connection has another.
    pub fn bulk_key(&self) -> &[u8; BULK_KEY_LEN] {
        &self.bulk_key
    }

    /// Splits into a receiving and a sending half with `split`, e.g. `TcpStream::into_split`. Each half
    /// keeps its direction's key and sequence number; an error on either poisons both.
    pub fn into_split_with<R, W>(
        self,
        split: impl FnOnce(S) -> (R, W),
    ) -> (ChannelReader<R>, ChannelWriter<W>) {
        let (read, write) = split(self.stream);
        (
            ChannelReader { stream: read, inbound: self.inbound, peer_node: self.peer_node },
            ChannelWriter { stream: write, outbound: self.outbound, peer_node: self.peer_node },
        )
    }
}

/// The receiving half of a [`Channel`].
pub struct ChannelReader<R> {
    /// The connection's reading half.
    stream: R,
    /// Frames from the peer.
    inbound: Inbound,
    /// The authenticated peer, kept for logging.
    peer_node: u32,
}

impl<R> fmt::Debug for ChannelReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelReader")
            .field("peer_node", &self.peer_node)
            .field("received", &self.inbound.seq)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> ChannelReader<R> {
    /// Receives the next frame: its kind and payload. Cancel-safe.
    pub async fn recv(&mut self) -> Result<(u8, Vec<u8>), ChannelError> {
        self.inbound.recv(&mut self.stream).await
    }

    /// Receives the next frame and decodes its payload as JSON.
    pub async fn recv_json<T: DeserializeOwned>(&mut self) -> Result<(u8, T), ChannelError> {
        self.inbound.recv_json(&mut self.stream).await
    }
}

impl<R> ChannelReader<R> {
    /// The node id the peer authenticated as.
    pub fn peer_node(&self) -> u32 {
        self.peer_node
    }
}

/// The sending half of a [`Channel`].
pub struct ChannelWriter<W> {
    /// The connection's writing half.
    stream: W,
    /// Frames to the peer.
    outbound: Outbound,
    /// The authenticated peer, kept for logging.
    peer_node: u32,
}

impl<W> fmt::Debug for ChannelWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelWriter")
            .field("peer_node", &self.peer_node)
            .field("sent", &self.outbound.seq)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> ChannelWriter<W> {
    /// Sends one frame; see [`Channel::send`]. Not cancel-safe.
    pub async fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ChannelError> {
        self.outbound.send(&mut self.stream, kind, payload).await
    }

    /// Sends `msg` as JSON in a frame of `kind`.
    pub async fn send_json<T: Serialize + ?Sized>(&mut self, kind: u8, msg: &T) -> Result<(), ChannelError> {
        self.outbound.send_json(&mut self.stream, kind, msg).await
    }

    /// Closes our sending direction; the peer's next receive gives [`ChannelError::Closed`].
    pub async fn shutdown(&mut self) -> Result<(), ChannelError> {
        self.outbound.shutdown(&mut self.stream).await
    }
}

impl<W> ChannelWriter<W> {
    /// The node id the peer authenticated as.
    pub fn peer_node(&self) -> u32 {
        self.peer_node
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::DuplexStream;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const CLIENT_NODE: u32 = 11;
    const SERVER_NODE: u32 = 22;
    const PIPE: usize = 1 << 16;

    fn key() -> ClusterKey {
        ClusterKey::from_bytes(b"0123456789abcdef0123456789abcdef")
    }

    fn other_key() -> ClusterKey {
        ClusterKey::from_bytes(b"fedcba9876543210fedcba9876543210")
    }

    fn frame_len(payload: usize) -> usize {
        FRAME_HEADER_LEN + payload + TAG_LEN
    }

    /// A client and a server channel over one duplex pipe.
    async fn pair() -> (Channel<DuplexStream>, Channel<DuplexStream>) {
        let (c, s) = tokio::io::duplex(PIPE);
        let k = key();
        let (client, server) =
            tokio::join!(Channel::client(c, &k, CLIENT_NODE), Channel::server(s, &k, SERVER_NODE));
        (client.unwrap(), server.unwrap())
    }

    /// A man in the middle: the test moves bytes between the two pipes itself.
    struct Mitm {
        /// Our end of the client's pipe.
        client_side: DuplexStream,
        /// Our end of the server's pipe.
        server_side: DuplexStream,
    }

    impl Mitm {
        /// Takes the next `n` bytes the client sent.
        async fn take_from_client(&mut self, n: usize) -> Vec<u8> {
            let mut buf = vec![0; n];
            self.client_side.read_exact(&mut buf).await.unwrap();
            buf
        }

        async fn send_to_server(&mut self, bytes: &[u8]) {
            self.server_side.write_all(bytes).await.unwrap();
        }

        async fn forward_to_server(&mut self, n: usize) -> Vec<u8> {
            let bytes = self.take_from_client(n).await;
            self.send_to_server(&bytes).await;
            bytes
        }

        async fn forward_to_client(&mut self, n: usize) -> Vec<u8> {
            let mut buf = vec![0; n];
            self.server_side.read_exact(&mut buf).await.unwrap();
            self.client_side.write_all(&buf).await.unwrap();
            buf
        }
    }

    /// A client and a server channel that reach each other only through a [`Mitm`].
    async fn mitm_pair() -> (Channel<DuplexStream>, Channel<DuplexStream>, Mitm) {
        let (c, client_side) = tokio::io::duplex(PIPE);
        let (s, server_side) = tokio::io::duplex(PIPE);
        let mut mitm = Mitm { client_side, server_side };
        let k = key();
        let relay = async {
            mitm.forward_to_server(HELLO_LEN).await;
            mitm.forward_to_client(HELLO_LEN + PROOF_LEN).await;
            mitm.forward_to_server(PROOF_LEN).await;
        };
        let (client, server, ()) =
            tokio::join!(Channel::client(c, &k, CLIENT_NODE), Channel::server(s, &k, SERVER_NODE), relay);
        (client.unwrap(), server.unwrap(), mitm)
    }

    fn hello_bytes(version: u16, node: u32) -> [u8; HELLO_LEN] {
        Hello::fresh(version, node).encode()
    }

    #[tokio::test]
    async fn handshake_and_messages_both_ways() {
        let (mut client, mut server) = pair().await;
        assert_eq!(client.peer_node(), SERVER_NODE);
        assert_eq!(server.peer_node(), CLIENT_NODE);
        assert_eq!(client.bulk_key(), server.bulk_key());

        client.send(1, b"migrate job 42").await.unwrap();
        client.send(2, b"").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), (1, b"migrate job 42".to_vec()));
        assert_eq!(server.recv().await.unwrap(), (2, Vec::new()));
        server.send(3, b"accepted").await.unwrap();
        assert_eq!(client.recv().await.unwrap(), (3, b"accepted".to_vec()));

        // The largest payload goes through; one byte more is refused before anything is sent.
        let big = vec![0xa5; MAX_PAYLOAD];
        let (sent, received) = tokio::join!(client.send(4, &big), server.recv());
        sent.unwrap();
        assert_eq!(received.unwrap(), (4, big));
        let too_big = vec![0; MAX_PAYLOAD + 1];
        assert!(matches!(
            client.send(5, &too_big).await,
            Err(ChannelError::FrameTooLarge { len }) if len == MAX_PAYLOAD + 1
        ));
        client.send(6, b"still usable").await.unwrap();
        assert_eq!(server.recv().await.unwrap(), (6, b"still usable".to_vec()));

        // Half-close: after the client's end, the server can still answer.
        client.shutdown().await.unwrap();
        assert!(matches!(server.recv().await, Err(ChannelError::Closed)));
        assert!(matches!(server.recv().await, Err(ChannelError::Closed)));
        server.send(7, b"final report").await.unwrap();
        assert_eq!(client.recv().await.unwrap(), (7, b"final report".to_vec()));
    }

    #[tokio::test]
    async fn bulk_keys_differ_between_connections() {
        let (a, _) = pair().await;
        let (b, _) = pair().await;
        assert_ne!(a.bulk_key(), b.bulk_key());
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Offer {
        job: u64,
        image_bytes: u64,
        argv: Vec<String>,
    }

    #[tokio::test]
    async fn json_helpers() {
        let (mut client, mut server) = pair().await;
        let offer = Offer { job: 7, image_bytes: 1 << 30, argv: vec!["sim".into(), "--steps=9".into()] };
        client.send_json(9, &offer).await.unwrap();
        let (kind, got): (u8, Offer) = server.recv_json().await.unwrap();
        assert_eq!((kind, got), (9, offer));

        // A frame that is authentic but not the expected JSON is a decode error, not a broken channel.
        client.send(9, b"not json").await.unwrap();
        assert!(matches!(server.recv_json::<Offer>().await, Err(ChannelError::Decode { kind: 9, .. })));
        client.send_json(10, &[1, 2, 3]).await.unwrap();
        assert_eq!(server.recv_json::<Vec<u32>>().await.unwrap(), (10, vec![1, 2, 3]));
    }

    #[tokio::test]
    async fn split_halves_work_concurrently() {
        const N: u32 = 200;
        let (client, server) = pair().await;
        let (mut c_rx, mut c_tx) = client.into_split();
        let (mut s_rx, mut s_tx) = server.into_split();
        assert_eq!(c_rx.peer_node(), SERVER_NODE);
        assert_eq!(s_tx.peer_node(), CLIENT_NODE);
        let tasks = [
            tokio::spawn(async move {
                for i in 0..N {
                    c_tx.send_json(1, &i).await.unwrap();
                }
            }),
            tokio::spawn(async move {
                for i in 0..N {
                    s_tx.send_json(2, &(i * 2)).await.unwrap();
                }
            }),
            tokio::spawn(async move {
                for i in 0..N {
                    assert_eq!(s_rx.recv_json::<u32>().await.unwrap(), (1, i));
                }
            }),
            tokio::spawn(async move {
                for i in 0..N {
                    assert_eq!(c_rx.recv_json::<u32>().await.unwrap(), (2, i * 2));
                }
            }),
        ];
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn tcp_loopback_with_raw_bulk_transfer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let k = key();
        let accept = async {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            Channel::server(stream, &k, SERVER_NODE).await.unwrap()
        };
        let connect = async {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            Channel::client(stream, &k, CLIENT_NODE).await.unwrap()
        };
        let (mut server, mut client) = tokio::join!(accept, connect);
        assert_eq!(server.peer_node(), CLIENT_NODE);

        let image: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sender = async {
            client.send_json(1, &image.len()).await.unwrap();
            client.raw_mut().unwrap().write_all(&image).await.unwrap();
            let digest = blake3::keyed_hash(client.bulk_key(), &image);
            client.send(2, digest.as_bytes()).await.unwrap();
            client.send(3, b"restore now").await.unwrap();
        };
        let receiver = async {
            let (_, len) = server.recv_json::<u64>().await.unwrap();
            let mut got = Vec::new();
            server.raw_mut().unwrap().take(len).read_to_end(&mut got).await.unwrap();
            let (kind, digest) = server.recv().await.unwrap();
            assert_eq!(kind, 2);
            assert_eq!(blake3::keyed_hash(server.bulk_key(), &got).as_bytes()[..], digest[..]);
            assert_eq!(server.recv().await.unwrap(), (3, b"restore now".to_vec()));
            got
        };
        let ((), got) = tokio::join!(sender, receiver);
        assert_eq!(got, image);

        let (mut c_rx, mut c_tx) = client.into_split_with(TcpStream::into_split);
        let (mut s_rx, mut s_tx) = server.into_split_with(TcpStream::into_split);
        c_tx.send(4, b"stdin").await.unwrap();
        s_tx.send(5, b"stdout").await.unwrap();
        assert_eq!(s_rx.recv().await.unwrap(), (4, b"stdin".to_vec()));
        assert_eq!(c_rx.recv().await.unwrap(), (5, b"stdout".to_vec()));
    }

    #[tokio::test]
    async fn wrong_key_on_either_side_fails() {
        for (client_key, server_key) in [(other_key(), key()), (key(), other_key())] {
            let (c, s) = tokio::io::duplex(PIPE);
            let (client, server) = tokio::join!(
                Channel::client(c, &client_key, CLIENT_NODE),
                Channel::server(s, &server_key, SERVER_NODE)
            );
            // The client can't verify the server's proof, so it never sends its own.
            assert!(matches!(client, Err(ChannelError::AuthFailed { peer: Role::Server })));
            assert!(matches!(
                server,
                Err(ChannelError::HandshakeClosed { step: "reading the client proof" })
            ));
        }
    }

    #[tokio::test]
    async fn forged_client_proof_is_refused_and_nothing_after_it_is_read() {
        let (mut raw, s) = tokio::io::duplex(PIPE);
        let k = key();
        let impostor = async {
            raw.write_all(&hello_bytes(VERSION, 66)).await.unwrap();
            let mut reply = [0; HELLO_LEN + PROOF_LEN];
            raw.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply[..4], MAGIC);
            // A guessed proof, then a frame it hopes the server acts on.
            raw.write_all(&[0x42; PROOF_LEN]).await.unwrap();
            raw.write_all(&[4, 0, 0, 0, 1, b'k', b'i', b'l', b'l']).await.unwrap();
            raw.write_all(&[0; TAG_LEN]).await.unwrap();
        };
        let ((), server) = tokio::join!(impostor, Channel::server(s, &k, SERVER_NODE));
        assert!(matches!(server, Err(ChannelError::AuthFailed { peer: Role::Client })));
        // The server sent nothing after its hello and proof.
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn version_mismatch_names_both_versions() {
        let (c, s) = tokio::io::duplex(PIPE);
        let k = key();
        let (client, server) = tokio::join!(
            Channel::handshake(c, &k, CLIENT_NODE, Role::Client, VERSION, HANDSHAKE_TIMEOUT),
            Channel::handshake(s, &k, SERVER_NODE, Role::Server, VERSION + 1, HANDSHAKE_TIMEOUT)
        );
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

    #[tokio::test]
    async fn a_future_hello_of_another_length_is_refused_on_its_prefix() {
        // A version-2 client whose hello is longer than ours: the server stops after magic and version.
        let (mut raw, s) = tokio::io::duplex(PIPE);
        let mut hello = b"RMXM".to_vec();
        hello.extend_from_slice(&2u16.to_le_bytes());
        hello.extend_from_slice(&[0xee; 100]);
        raw.write_all(&hello).await.unwrap();
        let server = Channel::server(s, &key(), SERVER_NODE).await;
        assert!(matches!(server, Err(ChannelError::VersionMismatch { ours: VERSION, theirs: 2 })));
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply.len(), HELLO_LEN, "a bare hello, no proof");
        assert_eq!(reply[4..6], VERSION.to_le_bytes());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_hello() {
        let (mut raw, s) = tokio::io::duplex(PIPE);
        raw.write_all(b"GET / HTTP/1.1\r\nHost: node1\r\n\r\n").await.unwrap();
        let server = Channel::server(s, &key(), SERVER_NODE).await;
        assert!(matches!(server, Err(ChannelError::BadMagic { found }) if &found == b"GET "));
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).await.unwrap();
        assert!(reply.is_empty(), "the server said nothing to a non-migd");

        let (c, mut raw) = tokio::io::duplex(PIPE);
        raw.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        let client = Channel::client(c, &key(), CLIENT_NODE).await;
        assert!(matches!(client, Err(ChannelError::BadMagic { found }) if &found == b"SSH-"));

        // A peer that says a few bytes and hangs up.
        let (mut raw, s) = tokio::io::duplex(PIPE);
        raw.write_all(b"RMX").await.unwrap();
        drop(raw);
        let server = Channel::server(s, &key(), SERVER_NODE).await;
        assert!(matches!(server, Err(ChannelError::HandshakeClosed { step: "reading the client hello" })));
    }

    #[tokio::test]
    async fn flipped_bits_are_refused_and_poison_the_channel() {
        let payload = b"signal 15";
        let len = payload.len();
        // Offsets of one bit in the length, kind, payload and tag; all must fail the MAC.
        for offset in [0, 4, FRAME_HEADER_LEN + 3, FRAME_HEADER_LEN + len + 7] {
            let (mut client, mut server, mut mitm) = mitm_pair().await;
            client.send(8, payload).await.unwrap();
            let mut frame = mitm.take_from_client(frame_len(len)).await;
            frame[offset] ^= 0x01;
            mitm.send_to_server(&frame).await;
            // A shortened length (9 -> 8) leaves a byte over; the MAC fails before it matters.
            assert!(
                matches!(server.recv().await, Err(ChannelError::BadMac { seq: 0 })),
                "flip at byte {offset} was accepted"
            );
            assert!(matches!(server.recv().await, Err(ChannelError::Poisoned)));
            assert!(matches!(server.send(1, b"x").await, Err(ChannelError::Poisoned)));
            assert!(matches!(server.raw_mut(), Err(ChannelError::Poisoned)));
        }

        // A high length bit announces more than the limit.
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(8, payload).await.unwrap();
        let mut frame = mitm.take_from_client(frame_len(len)).await;
        frame[3] ^= 0x80;
        mitm.send_to_server(&frame).await;
        assert!(matches!(server.recv().await, Err(ChannelError::FrameTooLarge { .. })));
        assert!(matches!(server.recv().await, Err(ChannelError::Poisoned)));

        // A longer length waits for bytes that never come: truncation when the connection ends.
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(8, payload).await.unwrap();
        let mut frame = mitm.take_from_client(frame_len(len)).await;
        frame[0] ^= 0x04; // 9 -> 13
        mitm.send_to_server(&frame).await;
        drop(mitm);
        assert!(matches!(server.recv().await, Err(ChannelError::Truncated { .. })));
    }

    #[tokio::test]
    async fn replayed_reordered_and_dropped_frames_are_refused() {
        // Replay: frame 0 delivered twice.
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"start job").await.unwrap();
        let frame = mitm.forward_to_server(frame_len(9)).await;
        assert_eq!(server.recv().await.unwrap(), (1, b"start job".to_vec()));
        mitm.send_to_server(&frame).await;
        assert!(matches!(server.recv().await, Err(ChannelError::BadMac { seq: 1 })));

        // Reorder: frame 1 before frame 0.
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"first").await.unwrap();
        client.send(1, b"second").await.unwrap();
        let first = mitm.take_from_client(frame_len(5)).await;
        let second = mitm.take_from_client(frame_len(6)).await;
        mitm.send_to_server(&second).await;
        mitm.send_to_server(&first).await;
        assert!(matches!(server.recv().await, Err(ChannelError::BadMac { seq: 0 })));

        // Drop: frame 0 withheld.
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"first").await.unwrap();
        client.send(1, b"second").await.unwrap();
        mitm.take_from_client(frame_len(5)).await;
        mitm.forward_to_server(frame_len(6)).await;
        assert!(matches!(server.recv().await, Err(ChannelError::BadMac { seq: 0 })));

        // A server's frame reflected back to it (other direction, other key).
        let (_client, mut server, mut mitm) = mitm_pair().await;
        server.send(1, b"echo").await.unwrap();
        let mut frame = vec![0; frame_len(4)];
        mitm.server_side.read_exact(&mut frame).await.unwrap();
        mitm.send_to_server(&frame).await;
        assert!(matches!(server.recv().await, Err(ChannelError::BadMac { seq: 0 })));
    }

    #[tokio::test]
    async fn a_frame_from_another_connection_is_refused() {
        let (mut client_a, _server_a, mut mitm_a) = mitm_pair().await;
        let (_client_b, mut server_b, mut mitm_b) = mitm_pair().await;
        client_a.send(1, b"kill -9").await.unwrap();
        let frame = mitm_a.take_from_client(frame_len(7)).await;
        mitm_b.send_to_server(&frame).await;
        assert!(matches!(server_b.recv().await, Err(ChannelError::BadMac { seq: 0 })));
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_the_payload_arrives() {
        let (_client, mut server, mut mitm) = mitm_pair().await;
        // Only a header announcing 4 GiB: refused at once, without waiting for or allocating the payload.
        mitm.send_to_server(&[0xff, 0xff, 0xff, 0xff, 1]).await;
        let refused = server.recv().await;
        assert!(matches!(refused, Err(ChannelError::FrameTooLarge { len }) if len == u32::MAX as usize));

        let (_client, mut server, mut mitm) = mitm_pair().await;
        let just_over = u32::try_from(MAX_PAYLOAD + 1).unwrap().to_le_bytes();
        mitm.send_to_server(&[just_over[0], just_over[1], just_over[2], just_over[3], 1]).await;
        assert!(matches!(server.recv().await, Err(ChannelError::FrameTooLarge { .. })));
    }

    #[tokio::test]
    async fn clean_close_and_truncation_are_told_apart() {
        let (_client, mut server, mitm) = mitm_pair().await;
        drop(mitm);
        assert!(matches!(server.recv().await, Err(ChannelError::Closed)));

        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"partial").await.unwrap();
        let frame = mitm.take_from_client(frame_len(7)).await;
        mitm.send_to_server(&frame[..2]).await;
        drop(mitm);
        assert!(matches!(
            server.recv().await,
            Err(ChannelError::Truncated { step: "reading a frame header" })
        ));

        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"partial").await.unwrap();
        let frame = mitm.take_from_client(frame_len(7)).await;
        mitm.send_to_server(&frame[..frame.len() - 1]).await;
        drop(mitm);
        assert!(matches!(
            server.recv().await,
            Err(ChannelError::Truncated { step: "reading a frame payload and tag" })
        ));
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (mut client, mut server, mut mitm) = mitm_pair().await;
        client.send(1, b"in two pieces").await.unwrap();
        let frame = mitm.take_from_client(frame_len(13)).await;
        mitm.send_to_server(&frame[..10]).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(20), server.recv()).await;
        assert!(cancelled.is_err(), "recv returned on half a frame");
        assert!(matches!(server.raw_mut(), Err(ChannelError::PartialFrame)));
        mitm.send_to_server(&frame[10..]).await;
        assert_eq!(server.recv().await.unwrap(), (1, b"in two pieces".to_vec()));
        assert!(server.raw_mut().is_ok());
    }

    #[tokio::test]
    async fn an_interrupted_send_poisons_the_channel() {
        // A pipe too small for the frame: the send blocks half-way and is cancelled.
        let (c, s) = tokio::io::duplex(64);
        let k = key();
        let (client, _server) =
            tokio::join!(Channel::client(c, &k, CLIENT_NODE), Channel::server(s, &k, SERVER_NODE));
        let mut client = client.unwrap();
        let cancelled = tokio::time::timeout(Duration::from_millis(20), client.send(1, &[0; 1000])).await;
        assert!(cancelled.is_err());
        assert!(matches!(client.send(1, b"x").await, Err(ChannelError::Poisoned)));
        assert!(matches!(client.raw_mut(), Err(ChannelError::Poisoned)));
    }

    #[tokio::test]
    async fn handshake_times_out_with_a_silent_peer() {
        // Real time, briefly: tokio's `test-util` (for `time::pause`) is not enabled in this workspace.
        let limit = Duration::from_millis(50);
        let (s, _silent) = tokio::io::duplex(PIPE);
        let server = Channel::handshake(s, &key(), SERVER_NODE, Role::Server, VERSION, limit).await;
        assert!(matches!(server, Err(ChannelError::HandshakeTimeout { after }) if after == limit));

        // A server that reads the hello and never answers.
        let (c, _mute) = tokio::io::duplex(PIPE);
        let client = Channel::handshake(c, &key(), CLIENT_NODE, Role::Client, VERSION, limit).await;
        assert!(matches!(client, Err(ChannelError::HandshakeTimeout { .. })));
    }
}
