//! Image transfer: an image directory packed into one encrypted, authenticated stream, and unpacked on the
//! other side.
//!
//! Nodes share no filesystem, so migd moves a job's CRIU images over the migration's TCP connection. The
//! images are the job's whole memory (its keys and passwords too), so they travel encrypted; and a restored
//! job runs with its owner's credentials, so its images must come from a node that holds the cluster key.
//! The job is frozen the whole time, so this is on the critical path of every migration: the format is a
//! plain sequence of files read and written in large records, each sealed with AES-256-GCM under a key
//! unique to the stream (AES-NI and carry-less multiplication make it cost about as much as the keyed
//! BLAKE3 MAC it replaced; see `cargo xtask bench migrate`). The decoder treats every byte as hostile all
//! the same: it never panics, uses nothing it has not authenticated, holds at most one record in memory,
//! refuses names that could leave the target directory, and refuses more files or bytes than its caller's
//! [`Limits`] before creating anything.
//!
//! # Format, version 3
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic "RMXIMAGE" (8) | version u32 = 3 | protection u8 | salt (32)             in clear, 45 bytes
//! record   length u32 (bits 0-30: 1..=RECORD_MAX body bytes; bit 31: final record) | body | tag (16)
//!          ... as many as needed; the body is sealed, length and flag are authenticated
//! nonce    record number u64 (from 0) | 0u32          associated data: record number u64 | length u32
//! key      BLAKE3 derive_key(KDF_CONTEXT, connection key | protection | salt)
//! ```
//!
//! The bodies of all records, in order, are the *contents*:
//!
//! ```text
//! totals   file count u32 | total content bytes u64                      (alone in record 0)
//! file     tag b'F' | name length u16 | name (UTF-8, 1..=255 bytes, no '/', not "." or "..") | size u64 | contents
//!          ... once per file, in name order
//! trailer  tag b'E' | file count u32 | total content bytes u64           (ends the final record)
//! ```
//!
//! Magic and version come first so that a reader meeting a future version refuses it by number, before
//! reading anything else. A fresh random salt per stream gives every stream its own key, so one connection
//! key may carry several streams without ever reusing a nonce. The protection byte is part of the key, so
//! a stream cannot be passed off as another protection than it was sealed with. Record numbers in the
//! nonce make a reordered, dropped, replayed or spliced record fail; the final flag, authenticated with
//! it, makes a stream cut at a record boundary an error, never a smaller image set. The totals travel
//! alone in the first record, so a receiver refuses an image set too large for it after reading 77 bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blake3::Hasher;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};

/// The key an image stream's keys are derived from (32 bytes, derived per connection by the migration
/// protocol: `Channel::bulk_key` in migd).
pub type StreamKey = [u8; 32];

/// The first bytes of every image stream.
pub const MAGIC: [u8; 8] = *b"RMXIMAGE";

/// The format version this module writes, and the only one it reads.
pub const VERSION: u32 = 3;

/// The most files one image set may hold; a CRIU dump of a job has a few dozen.
pub const MAX_FILES: u32 = 100_000;

/// The longest file name accepted: Linux's `NAME_MAX`, since a name is a single path component.
pub const MAX_NAME_LEN: usize = 255;

/// The most body bytes in one record, and so the one buffer each side uses: large enough that system calls
/// and per-record work cost little (1 MiB records ran 5 % faster than 256 KiB ones here), small enough to
/// bound what a receiver holds before it has authenticated it.
pub const RECORD_MAX: usize = 1 << 20;

/// Memory an automatic image limit leaves free at least: see [`image_limit`].
pub const LIMIT_MARGIN_MIN: u64 = 256 << 20;

/// BLAKE3 key derivation context of the stream keys; never to be used for anything else.
const KDF_CONTEXT: &str = "rmosix 2026-12 image stream v3 record key";

/// Bytes of the salt in the header.
const SALT_LEN: usize = 32;

/// Header: magic, version, protection, salt.
const HEADER_LEN: usize = 8 + 4 + 1 + SALT_LEN;

/// Bytes before a record's body: its length and final flag.
const RECORD_HEADER_LEN: usize = 4;

/// The final-record flag in a record's length word.
const FINAL_RECORD: u32 = 1 << 31;

/// Bytes of a record's tag.
const TAG_LEN: usize = 16;

/// Totals at the start of the contents: file count, total bytes.
const TOTALS_LEN: usize = 4 + 8;

/// File record before the name: tag and name length.
const RECORD_PREFIX_LEN: usize = 1 + 2;

/// Trailer: tag, file count, total bytes.
const TRAILER_LEN: usize = 1 + 4 + 8;

/// Tag of a file record.
const TAG_FILE: u8 = b'F';

/// Tag of the trailer.
const TAG_END: u8 = b'E';

/// Where the automatic image limit reads the node's memory.
const MEMINFO: &str = "/proc/meminfo";

/// How a stream's records are sealed. Chosen by the caller on both ends and written in the header; a
/// receiver refuses a stream of another protection than it asked for, so a sender cannot choose less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protection {
    /// AES-256-GCM: encrypted and authenticated. What migd uses.
    #[default]
    Encrypted,
    /// A keyed BLAKE3 tag per record, contents in clear: what image streams had before they were
    /// encrypted. Kept so that `cargo xtask bench migrate` measures what encryption costs on the same code.
    Authenticated,
}

impl Protection {
    /// The header byte.
    fn byte(self) -> u8 {
        match self {
            Self::Encrypted => 1,
            Self::Authenticated => 2,
        }
    }
}

/// Why an image set could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The image directory could not be listed or one of its entries examined.
    #[error("cannot list image directory {path}")]
    ListDir {
        /// The directory or entry that failed.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The image directory holds something other than a regular file; CRIU writes only regular files.
    #[error("{path} is a {kind}, not a regular file: image sets hold regular files only")]
    NotRegularFile {
        /// The entry.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// A file name in the image directory is not UTF-8; CRIU's names are ASCII.
    #[error("image file name {path} is not UTF-8")]
    NameNotUtf8 {
        /// The file.
        path: PathBuf,
    },
    /// More files than [`MAX_FILES`] (packing) or the receiver's limit (unpacking).
    #[error("image set of {count} files, more than the {max} allowed")]
    TooManyFiles {
        /// The number of files found or announced.
        count: u64,
        /// The limit.
        max: u32,
    },
    /// The announced content bytes exceed the receiver's limit.
    #[error(
        "image set of {claimed} bytes ({} MiB), more than the limit of {max} bytes ({} MiB) this receiver accepts",
        claimed >> 20,
        max >> 20
    )]
    TooLarge {
        /// The size announced.
        claimed: u64,
        /// The limit.
        max: u64,
    },
    /// The files of the image directory add up to more bytes than a `u64` counts (sparse files can).
    #[error("the files of image directory {dir} add up to more than 2^64 bytes")]
    SizeOverflow {
        /// The directory being packed.
        dir: PathBuf,
    },
    /// An image file could not be opened for packing.
    #[error("cannot open image file {path}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An image file could not be read while packing.
    #[error("cannot read image file {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An image file changed size (or was replaced) while being packed.
    #[error("image file {path} changed while being packed (it had {expected} bytes)")]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// Its size when the directory was listed.
        expected: u64,
    },
    /// Writing the stream failed (for example, the connection broke).
    #[error("cannot send image stream of {dir} (after {offset} bytes)")]
    Send {
        /// The directory being packed.
        dir: PathBuf,
        /// Stream bytes written before the failure.
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Reading the stream failed other than by its end.
    #[error("cannot receive image stream into {dir} (after {offset} bytes)")]
    Receive {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Stream bytes read before the failure.
        offset: u64,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The stream ended before its final record.
    #[error("image stream for {dir} ends after {offset} bytes, in the {part}")]
    Truncated {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Stream bytes read.
        offset: u64,
        /// The part of the stream that was cut.
        part: String,
    },
    /// The stream does not start with [`MAGIC`]: it is not an image stream at all.
    #[error("not an rmosix image stream (for {dir}): starts with {found:02x?}")]
    BadMagic {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The first bytes received.
        found: [u8; 8],
    },
    /// The stream is of a format version this build does not read.
    #[error("image stream for {dir} is format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The stream's version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The stream's protection is not the one the receiver asked for.
    #[error("image stream for {dir} has protection byte {found}; this receiver takes only {expected:?} streams")]
    WrongProtection {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The header's protection byte.
        found: u8,
        /// The protection asked for.
        expected: Protection,
    },
    /// A record header announces an empty record or more than [`RECORD_MAX`] bytes; refused before reading
    /// its body.
    #[error("image stream for {dir} has a record of {len} bytes at byte {offset}; records hold 1 to {RECORD_MAX}")]
    BadRecord {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Where the record header is in the stream.
        offset: u64,
        /// The announced body length.
        len: u64,
    },
    /// A record failed authentication: altered, reordered, replayed, taken from another stream, or not
    /// sealed with this connection's key.
    #[error(
        "image stream for {dir}: record {record} (at byte {offset}) fails authentication: corrupted, reordered, \
         or not sent with this connection's key"
    )]
    Forged {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The record's number.
        record: u64,
        /// Where the record header is in the stream.
        offset: u64,
    },
    /// The final record does not end exactly with the trailer: authentic, so the sender framed it wrongly.
    #[error("image stream for {dir} is malformed at byte {offset}: {what}")]
    BadFraming {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Stream bytes read.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A record does not start with the tag expected there.
    #[error("image stream for {dir} is malformed in record {record}: expected {expected}, found tag byte {found:#04x}")]
    BadTag {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The record holding the tag.
        record: u64,
        /// What should be there.
        expected: String,
        /// The byte found.
        found: u8,
    },
    /// A file name is longer than [`MAX_NAME_LEN`].
    #[error("image stream for {dir} names a file of {len} bytes in record {record}; at most {max} allowed")]
    NameTooLong {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The record holding the name length.
        record: u64,
        /// The claimed length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A file name that is not a plain name inside the target directory.
    #[error("image stream for {dir} holds a file named {name:?}, refused: {reason}")]
    BadName {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// The name, lossily decoded.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file's size runs past the total the header announced.
    #[error("image file {path} claims {size} bytes, but only {remaining} of the announced total remain")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its claimed size.
        size: u64,
        /// Announced bytes not yet used by earlier files.
        remaining: u64,
    },
    /// The header's or trailer's totals differ from what the stream carried.
    #[error("image stream for {dir}: the {what} is {announced}, but the stream carried {carried}")]
    TotalsMismatch {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Which total.
        what: &'static str,
        /// The total in the header or trailer.
        announced: u64,
        /// What the stream carried.
        carried: u64,
    },
    /// An image file could not be created (an existing file of the same name counts).
    #[error("cannot create image file {path}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// An image file could not be written.
    #[error("cannot write image file {path}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The system's random number generator failed, so no stream key could be made.
    #[error("cannot draw a random salt for the image stream of {dir}")]
    Random {
        /// The directory being packed.
        dir: PathBuf,
    },
    /// The node's free memory could not be read for the automatic image limit.
    #[error("cannot read the node's free memory from {path} for the automatic image limit")]
    MemInfo {
        /// The file read.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The node's memory file lacks `MemTotal` or `MemAvailable`.
    #[error("{path} has no MemTotal or MemAvailable line; set an image limit in the configuration")]
    MemInfoFormat {
        /// The file read.
        path: PathBuf,
    },
}

/// What a pack or unpack moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Number of files.
    pub files: u64,
    /// Content bytes of all files: what lands on the receiver's tmpfs.
    pub bytes: u64,
    /// Bytes of the whole stream, framing included: what crossed the connection.
    pub stream_bytes: u64,
    /// BLAKE3 of the records' tags in order: equal on both ends when the whole stream arrived, to log.
    pub checksum: [u8; 32],
    /// Time from the call to the last byte written or verified.
    pub elapsed: Duration,
}

/// How much an unpack accepts, checked against the stream's totals before anything is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most files; at most [`MAX_FILES`], which is the default.
    pub max_files: u32,
    /// The most content bytes; no limit by default. A receiver should pass what the migration offer
    /// announced, capped by [`image_limit`], so a peer can't fill its memory.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_files: MAX_FILES, max_bytes: u64::MAX }
    }
}

/// The most image bytes this node accepts now: `configured` if it is not 0; otherwise (automatic) the
/// node's `MemAvailable` less a margin of 10 % of its memory or [`LIMIT_MARGIN_MIN`], whichever is larger.
///
/// Images land on a tmpfs, that is in memory, and a restore needs as much again, so an image set the node
/// cannot hold would push it into swap or the OOM killer; the margin keeps room for everything else on the
/// node. The automatic value changes with the node's load: compute it when an offer arrives.
pub fn image_limit(configured: u64) -> Result<u64, TransferError> {
    if configured > 0 {
        return Ok(configured);
    }
    let path = Path::new(MEMINFO);
    let text = fs::read_to_string(path).map_err(|source| TransferError::MemInfo { path: path.to_owned(), source })?;
    automatic_limit(&text).ok_or_else(|| TransferError::MemInfoFormat { path: path.to_owned() })
}

/// The automatic image limit from the text of `/proc/meminfo`.
fn automatic_limit(meminfo: &str) -> Option<u64> {
    let kib = |key: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?.trim();
            value.strip_suffix("kB").unwrap_or(value).trim().parse::<u64>().ok()
        })
    };
    let total = kib("MemTotal")?.saturating_mul(1024);
    let available = kib("MemAvailable")?.saturating_mul(1024);
    Some(available.saturating_sub((total / 10).max(LIMIT_MARGIN_MIN)))
}

/// Packs the regular files of `dir` into `out` as one encrypted image stream keyed by `key`, and flushes
/// `out`. See [`pack_with`].
pub fn pack(dir: &Path, out: &mut impl Write, key: &StreamKey) -> Result<Stats, TransferError> {
    pack_with(dir, out, key, Protection::Encrypted)
}

/// Packs the regular files of `dir` into `out` as one image stream with `protection`, and flushes `out`.
///
/// `out` is written one record (about a megabyte) at a time: wrapping it in a `BufWriter` only adds a
/// copy. On a `TcpStream`, `TCP_NODELAY` spares the last, short record a possible wait for an
/// acknowledgement. Anything in `dir` that is not a regular file (a directory, a symbolic link) is
/// refused, as is a file that changes size while being packed. On error, part of a stream may have been
/// written; the receiver refuses it, since only a complete stream has a final record.
pub fn pack_with(
    dir: &Path,
    out: &mut impl Write,
    key: &StreamKey,
    protection: Protection,
) -> Result<Stats, TransferError> {
    let started = Instant::now();
    let files = list_files(dir)?;
    let count = u32::try_from(files.len())
        .ok()
        .filter(|&count| count <= MAX_FILES)
        .ok_or(TransferError::TooManyFiles { count: files.len() as u64, max: MAX_FILES })?;
    let total = files
        .iter()
        .try_fold(0u64, |total, (_, size)| total.checked_add(*size))
        .ok_or_else(|| TransferError::SizeOverflow { dir: dir.to_owned() })?;

    let mut salt = [0; SALT_LEN];
    SystemRandom::new().fill(&mut salt).map_err(|_| TransferError::Random { dir: dir.to_owned() })?;
    let mut sink = Sink::new(dir, out, Sealer::new(key, protection, &salt));
    sink.record[..8].copy_from_slice(&MAGIC);
    sink.record[8..12].copy_from_slice(&VERSION.to_le_bytes());
    sink.record[12] = protection.byte();
    sink.record[13..HEADER_LEN].copy_from_slice(&salt);

    let mut totals = [0; TOTALS_LEN];
    totals[..4].copy_from_slice(&count.to_le_bytes());
    totals[4..].copy_from_slice(&total.to_le_bytes());
    sink.put(&totals)?;
    // Alone in the first record, so a receiver refuses an image set too large for it early and cheaply.
    sink.seal_record(false)?;

    for (name, size) in &files {
        let path = dir.join(name);
        let mut file = open_image(&path, *size)?;
        let name_len = u16::try_from(name.len()).expect("a directory entry's name is at most NAME_MAX bytes");
        sink.put(&[TAG_FILE])?;
        sink.put(&name_len.to_le_bytes())?;
        sink.put(name.as_bytes())?;
        sink.put(&size.to_le_bytes())?;
        sink.copy_file(&mut file, &path, *size)?;
    }

    let mut trailer = [0; TRAILER_LEN];
    trailer[0] = TAG_END;
    trailer[1..5].copy_from_slice(&count.to_le_bytes());
    trailer[5..].copy_from_slice(&total.to_le_bytes());
    sink.put(&trailer)?;
    let (checksum, stream_bytes) = sink.finish()?;
    let stats = Stats { files: count.into(), bytes: total, stream_bytes, checksum, elapsed: started.elapsed() };
    tracing::debug!(
        dir = %dir.display(),
        files = stats.files,
        bytes = stats.bytes,
        ?protection,
        elapsed = ?stats.elapsed,
        "image set packed"
    );
    Ok(stats)
}

/// Unpacks one encrypted image stream from `input` into `dir`, accepting at most the node's automatic
/// image limit ([`image_limit`]`(0)`: free memory less a margin). See [`unpack_with`].
pub fn unpack(input: &mut impl Read, dir: &Path, key: &StreamKey) -> Result<Stats, TransferError> {
    unpack_limited(input, dir, key, image_limit(0)?)
}

/// Unpacks one encrypted image stream from `input` into `dir`, accepting at most `max_bytes` of image
/// contents: a stream announcing more is refused with [`TransferError::TooLarge`] (naming the limit) after
/// its first record, before any file is created; one whose files add up to more than it announced is
/// refused at the first file that does not fit ([`TransferError::SizeMismatch`]). Pass
/// `image_limit(configured)?.min(offer.image_bytes)`. See [`unpack_with`].
pub fn unpack_limited(
    input: &mut impl Read,
    dir: &Path,
    key: &StreamKey,
    max_bytes: u64,
) -> Result<Stats, TransferError> {
    unpack_with(input, dir, key, &Limits { max_files: MAX_FILES, max_bytes }, Protection::Encrypted)
}

/// Unpacks one encrypted image stream from `input` into `dir` within `limits`. See [`unpack_with`].
pub fn unpack_with_limits(
    input: &mut impl Read,
    dir: &Path,
    key: &StreamKey,
    limits: &Limits,
) -> Result<Stats, TransferError> {
    unpack_with(input, dir, key, limits, Protection::Encrypted)
}

/// Unpacks one image stream sealed with `protection` from `input` into the existing directory `dir`.
///
/// Guarantees:
/// - `Ok` only once the whole stream has arrived and every record was authenticated and every size
///   matched. The files appear in `dir` as they arrive, so they mean nothing until `Ok`.
/// - On any error, every file this call created has been removed again (also if it unwinds), and no file
///   that was in `dir` before has been touched: a name that already exists is an error. So `dir` is left as
///   it was found.
/// - Files are created with mode 0600, only directly in `dir`: names with `/`, `.`, `..`, NUL or longer
///   than [`MAX_NAME_LEN`] are refused.
/// - Exactly the stream's bytes are read from `input`, nothing after them: a connection can carry more
///   messages after an image stream. Wrapping `input` in a `BufReader` would break that and only add a copy.
/// - Every read is bounded: a record's announced length is checked against [`RECORD_MAX`] before its body
///   is read, and at most one record (1 MiB) is held, whatever the stream claims; the totals (file count,
///   content bytes) are checked against `limits` before anything is created, every file's size against
///   what remains of them, and the stream ends with the record that holds the trailer.
pub fn unpack_with(
    input: &mut impl Read,
    dir: &Path,
    key: &StreamKey,
    limits: &Limits,
    protection: Protection,
) -> Result<Stats, TransferError> {
    let started = Instant::now();
    let mut source = Source::start(dir, input, key, protection)?;
    let totals: [u8; TOTALS_LEN] = source.array("totals")?;
    let count = u32::from_le_bytes(totals[..4].try_into().expect("4 bytes"));
    let total = u64::from_le_bytes(totals[4..].try_into().expect("8 bytes"));
    let max_files = limits.max_files.min(MAX_FILES);
    if count > max_files {
        return Err(TransferError::TooManyFiles { count: count.into(), max: max_files });
    }
    if total > limits.max_bytes {
        return Err(TransferError::TooLarge { claimed: total, max: limits.max_bytes });
    }

    let mut created = CreatedFiles { paths: Vec::new() };
    let mut remaining = total;
    for index in 0..count {
        let prefix: [u8; RECORD_PREFIX_LEN] = source.array("file record")?;
        if prefix[0] != TAG_FILE {
            return Err(source.bad_tag(format!("file {} of {count}", index + 1), prefix[0]));
        }
        let name_len = usize::from(u16::from_le_bytes([prefix[1], prefix[2]]));
        if name_len > MAX_NAME_LEN {
            return Err(TransferError::NameTooLong {
                dir: dir.to_owned(),
                record: source.index - 1,
                len: name_len,
                max: MAX_NAME_LEN,
            });
        }
        // Name and size in one read; the name is bounded by MAX_NAME_LEN, so this lives on the stack.
        let mut name_and_size = [0; MAX_NAME_LEN + 8];
        source.exact(&mut name_and_size[..name_len + 8], "file name and size")?;
        let name = check_name(dir, &name_and_size[..name_len])?;
        let size = u64::from_le_bytes(name_and_size[name_len..name_len + 8].try_into().expect("8 bytes"));
        let path = dir.join(name);
        if size > remaining {
            return Err(TransferError::SizeMismatch { path, size, remaining });
        }
        remaining -= size;
        let mut file = created.create(path)?;
        source.copy_to_file(&mut file, created.last(), size)?;
    }

    let trailer: [u8; TRAILER_LEN] = source.array("trailer")?;
    if trailer[0] != TAG_END {
        return Err(source.bad_tag("the trailer".to_owned(), trailer[0]));
    }
    source.end()?;
    // Authentic, so these only catch a sender that framed its stream wrongly.
    let carried = total - remaining;
    let trailer_count = u32::from_le_bytes(trailer[1..5].try_into().expect("4 bytes"));
    let trailer_total = u64::from_le_bytes(trailer[5..].try_into().expect("8 bytes"));
    for (what, announced, carried) in [
        ("header's byte count", total, carried),
        ("trailer's file count", trailer_count.into(), count.into()),
        ("trailer's byte count", trailer_total, carried),
    ] {
        if announced != carried {
            return Err(TransferError::TotalsMismatch { dir: dir.to_owned(), what, announced, carried });
        }
    }
    created.paths.clear();
    let stats = Stats {
        files: count.into(),
        bytes: total,
        stream_bytes: source.wire.read,
        checksum: *source.tags.finalize().as_bytes(),
        elapsed: started.elapsed(),
    };
    tracing::debug!(
        dir = %dir.display(),
        files = stats.files,
        bytes = stats.bytes,
        ?protection,
        elapsed = ?stats.elapsed,
        "image set unpacked"
    );
    Ok(stats)
}

/// The regular files of `dir` with their sizes, in name order.
fn list_files(dir: &Path) -> Result<Vec<(String, u64)>, TransferError> {
    let list_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TransferError::ListDir { path, source }
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(list_error(dir))? {
        let entry = entry.map_err(list_error(dir))?;
        let path = entry.path();
        // Not following symbolic links: a link could make us send any file this process can read.
        let metadata = fs::symlink_metadata(&path).map_err(list_error(&path))?;
        let kind = file_kind(metadata.file_type());
        if kind != "regular file" {
            return Err(TransferError::NotRegularFile { path, kind });
        }
        let name = entry.file_name().into_string().map_err(|_| TransferError::NameNotUtf8 { path })?;
        files.push((name, metadata.len()));
    }
    files.sort_unstable();
    Ok(files)
}

/// Opens an image file for packing, checking it is still the regular file of the size listed.
fn open_image(path: &Path, size: u64) -> Result<File, TransferError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| TransferError::OpenFile { path: path.to_owned(), source })?;
    let metadata = file.metadata().map_err(|source| TransferError::ReadFile { path: path.to_owned(), source })?;
    if !metadata.is_file() || metadata.len() != size {
        return Err(TransferError::FileChanged { path: path.to_owned(), expected: size });
    }
    Ok(file)
}

/// What a directory entry is, for error messages.
fn file_kind(file_type: fs::FileType) -> &'static str {
    if file_type.is_file() {
        "regular file"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "file of unknown type"
    }
}

/// Checks that a received name is a plain file name, and returns it.
fn check_name<'a>(dir: &Path, name: &'a [u8]) -> Result<&'a str, TransferError> {
    let bad = |reason| TransferError::BadName {
        dir: dir.to_owned(),
        name: String::from_utf8_lossy(name).into_owned(),
        reason,
    };
    let name = std::str::from_utf8(name).map_err(|_| bad("not UTF-8"))?;
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name == "." || name == ".." {
        return Err(bad("names a directory"));
    }
    if name.contains('/') {
        return Err(bad("contains '/'"));
    }
    if name.contains('\0') {
        return Err(bad("contains NUL"));
    }
    Ok(name)
}

/// Seals and opens the records of one stream.
enum Sealer {
    /// [`Protection::Encrypted`]; boxed, as its key schedule is large.
    Aead(Box<LessSafeKey>),
    /// [`Protection::Authenticated`]: the key of the records' keyed BLAKE3 tags.
    Mac([u8; 32]),
}

impl Sealer {
    /// The sealer of the stream with this `salt`, under the connection's `key`.
    fn new(key: &StreamKey, protection: Protection, salt: &[u8; SALT_LEN]) -> Self {
        let mut material = [0; 32 + 1 + SALT_LEN];
        material[..32].copy_from_slice(key);
        material[32] = protection.byte();
        material[33..].copy_from_slice(salt);
        let record_key = blake3::derive_key(KDF_CONTEXT, &material);
        match protection {
            Protection::Encrypted => Self::Aead(Box::new(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &record_key).expect("32 bytes make an AES-256 key"),
            ))),
            Protection::Authenticated => Self::Mac(record_key),
        }
    }

    /// Seals `body`, record `index` with length word `header`, in place; returns its tag.
    fn seal(&self, index: u64, header: [u8; RECORD_HEADER_LEN], body: &mut [u8]) -> [u8; TAG_LEN] {
        let (nonce, aad) = nonce_and_aad(index, header);
        match self {
            Self::Aead(key) => {
                let tag = key
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
                    .expect("a record is far below AES-GCM's message limit");
                tag.as_ref().try_into().expect("AES-GCM tags are 16 bytes")
            }
            Self::Mac(key) => mac_tag(key, &aad, body),
        }
    }

    /// Opens record `index` with length word `header`: `sealed` is its body and tag; on success its first
    /// `sealed.len() - TAG_LEN` bytes are the body in clear.
    fn open(&self, index: u64, header: [u8; RECORD_HEADER_LEN], sealed: &mut [u8]) -> Result<(), ()> {
        let (nonce, aad) = nonce_and_aad(index, header);
        match self {
            Self::Aead(key) => key
                .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
                .map(|_| ())
                .map_err(|_| ()),
            Self::Mac(key) => {
                let (body, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                let expected = mac_tag(key, &aad, body);
                // Constant time: no early exit on the first differing byte.
                let differs = expected.iter().zip(tag).fold(0, |acc, (a, b)| acc | (a ^ b));
                if std::hint::black_box(differs) == 0 { Ok(()) } else { Err(()) }
            }
        }
    }
}

/// A record's nonce (its number, then zeros) and associated data (its number and length word). Every
/// stream has a key of its own, so numbering from 0 never reuses a nonce under one key.
fn nonce_and_aad(index: u64, header: [u8; RECORD_HEADER_LEN]) -> ([u8; 12], [u8; 12]) {
    let mut nonce = [0; 12];
    nonce[..8].copy_from_slice(&index.to_le_bytes());
    let mut aad = [0; 12];
    aad[..8].copy_from_slice(&index.to_le_bytes());
    aad[8..].copy_from_slice(&header);
    (nonce, aad)
}

/// The keyed BLAKE3 tag of an authenticated-only record, cut to [`TAG_LEN`].
fn mac_tag(key: &[u8; 32], aad: &[u8; 12], body: &[u8]) -> [u8; TAG_LEN] {
    let mut hasher = Hasher::new_keyed(key);
    hasher.update(aad);
    hasher.update(body);
    hasher.finalize().as_bytes()[..TAG_LEN].try_into().expect("16 of 32 bytes")
}

/// A record's length word.
fn record_header(len: usize, last: bool) -> [u8; RECORD_HEADER_LEN] {
    let len = u32::try_from(len).expect("a record is at most RECORD_MAX bytes");
    (len | if last { FINAL_RECORD } else { 0 }).to_le_bytes()
}

/// Where a record's body starts in [`Sink::record`]: after room for the stream header, sent with the first
/// record in one write (two small writes could wait on each other under Nagle's algorithm).
const BODY_AT: usize = HEADER_LEN + RECORD_HEADER_LEN;

/// The sending side: one record at a time, filled, sealed in place and written out.
struct Sink<'a, W> {
    /// The directory being packed, for error messages.
    dir: &'a Path,
    /// Where the stream goes.
    out: &'a mut W,
    /// Seals the records.
    sealer: Sealer,
    /// Stream header (sent with the first record only), length word, body, tag.
    record: Vec<u8>,
    /// Bytes of body in `record`.
    filled: usize,
    /// Number of the next record.
    index: u64,
    /// Hash of the tags so far, for [`Stats::checksum`].
    tags: Hasher,
    /// Stream bytes written so far.
    written: u64,
}

impl<'a, W: Write> Sink<'a, W> {
    fn new(dir: &'a Path, out: &'a mut W, sealer: Sealer) -> Self {
        Self {
            dir,
            out,
            sealer,
            record: vec![0; BODY_AT + RECORD_MAX + TAG_LEN],
            filled: 0,
            index: 0,
            tags: Hasher::new(),
            written: 0,
        }
    }

    /// Appends framing bytes, sealing full records on the way.
    fn put(&mut self, mut bytes: &[u8]) -> Result<(), TransferError> {
        while !bytes.is_empty() {
            if self.filled == RECORD_MAX {
                self.seal_record(false)?;
            }
            let n = bytes.len().min(RECORD_MAX - self.filled);
            self.record[BODY_AT + self.filled..BODY_AT + self.filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Appends `size` bytes read from `file`, straight into the record, and checks that the file ends there.
    fn copy_file(&mut self, file: &mut File, path: &Path, size: u64) -> Result<(), TransferError> {
        let read_error = |source| TransferError::ReadFile { path: path.to_owned(), source };
        let mut remaining = size;
        while remaining > 0 {
            if self.filled == RECORD_MAX {
                self.seal_record(false)?;
            }
            let room = (RECORD_MAX - self.filled).min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let at = BODY_AT + self.filled;
            match file.read(&mut self.record[at..at + room]) {
                Ok(0) => return Err(TransferError::FileChanged { path: path.to_owned(), expected: size }),
                Ok(n) => {
                    self.filled += n;
                    remaining -= n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(read_error(error)),
            }
        }
        // A file that grew would otherwise be sent cut short without anyone noticing.
        let mut probe = [0];
        loop {
            match file.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(TransferError::FileChanged { path: path.to_owned(), expected: size }),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(read_error(error)),
            }
        }
    }

    /// Seals the record's body in place and writes the record out (after the stream header, if it is the
    /// first).
    fn seal_record(&mut self, last: bool) -> Result<(), TransferError> {
        debug_assert!(self.filled > 0, "records are never empty");
        let header = record_header(self.filled, last);
        let end = BODY_AT + self.filled;
        self.record[HEADER_LEN..BODY_AT].copy_from_slice(&header);
        let tag = self.sealer.seal(self.index, header, &mut self.record[BODY_AT..end]);
        self.record[end..end + TAG_LEN].copy_from_slice(&tag);
        self.tags.update(&tag);
        let from = if self.index == 0 { 0 } else { HEADER_LEN };
        let bytes = &self.record[from..end + TAG_LEN];
        self.out.write_all(bytes).map_err(|source| TransferError::Send {
            dir: self.dir.to_owned(),
            offset: self.written,
            source,
        })?;
        self.written += bytes.len() as u64;
        self.index += 1;
        self.filled = 0;
        Ok(())
    }

    /// Seals and writes the final record, flushes; returns the tags' hash and the stream's length.
    fn finish(mut self) -> Result<([u8; 32], u64), TransferError> {
        self.seal_record(true)?;
        self.out.flush().map_err(|source| TransferError::Send {
            dir: self.dir.to_owned(),
            offset: self.written,
            source,
        })?;
        Ok((*self.tags.finalize().as_bytes(), self.written))
    }
}

/// Exact reads from the stream, counted.
struct Wire<'a, R> {
    /// The directory being unpacked into, for error messages.
    dir: &'a Path,
    /// Where the stream comes from.
    input: &'a mut R,
    /// Stream bytes read so far.
    read: u64,
}

impl<R: Read> Wire<'_, R> {
    /// Fills `buffer` from the stream; `part` names what is read, for errors.
    fn exact(&mut self, buffer: &mut [u8], part: &str) -> Result<(), TransferError> {
        let mut filled = 0;
        while filled < buffer.len() {
            match self.input.read(&mut buffer[filled..]) {
                Ok(0) => {
                    return Err(TransferError::Truncated {
                        dir: self.dir.to_owned(),
                        offset: self.read,
                        part: part.to_owned(),
                    });
                }
                Ok(n) => {
                    filled += n;
                    self.read += n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransferError::Receive { dir: self.dir.to_owned(), offset: self.read, source });
                }
            }
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, part: &str) -> Result<[u8; N], TransferError> {
        let mut bytes = [0; N];
        self.exact(&mut bytes, part)?;
        Ok(bytes)
    }
}

/// The receiving side: the contents of the stream, record by record, each authenticated before any of
/// it is used.
struct Source<'a, R> {
    /// The stream.
    wire: Wire<'a, R>,
    /// Opens the records.
    sealer: Sealer,
    /// The current record: body in clear (after opening) and tag; grows to at most `RECORD_MAX + TAG_LEN`.
    record: Vec<u8>,
    /// Where the unread part of the current record's body starts.
    start: usize,
    /// Where the current record's body ends.
    end: usize,
    /// Number of the next record.
    index: u64,
    /// Whether the current record is the final one.
    last: bool,
    /// Hash of the tags so far, for [`Stats::checksum`].
    tags: Hasher,
}

impl<'a, R: Read> Source<'a, R> {
    /// Reads and checks the stream header.
    fn start(dir: &'a Path, input: &'a mut R, key: &StreamKey, protection: Protection) -> Result<Self, TransferError> {
        let mut wire = Wire { dir, input, read: 0 };
        // Magic and version alone first: a later version may frame everything after them differently.
        let start: [u8; 12] = wire.array("header")?;
        let magic: [u8; 8] = start[..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(TransferError::BadMagic { dir: dir.to_owned(), found: magic });
        }
        let version = u32::from_le_bytes(start[8..].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(TransferError::UnsupportedVersion { dir: dir.to_owned(), found: version, supported: VERSION });
        }
        let [found]: [u8; 1] = wire.array("header")?;
        if found != protection.byte() {
            return Err(TransferError::WrongProtection { dir: dir.to_owned(), found, expected: protection });
        }
        let salt: [u8; SALT_LEN] = wire.array("header")?;
        Ok(Self {
            wire,
            sealer: Sealer::new(key, protection, &salt),
            record: Vec::new(),
            start: 0,
            end: 0,
            index: 0,
            last: false,
            tags: Hasher::new(),
        })
    }

    /// Reads and opens the next record; `part` names what the contents are wanted for, for errors.
    fn next_record(&mut self, part: &str) -> Result<(), TransferError> {
        let dir = self.wire.dir;
        if self.last {
            let what = "the final record ends before the trailer";
            return Err(TransferError::BadFraming { dir: dir.to_owned(), offset: self.wire.read, what });
        }
        let at = self.wire.read;
        let header: [u8; RECORD_HEADER_LEN] = self.wire.array(part)?;
        let word = u32::from_le_bytes(header);
        let len = usize::try_from(word & !FINAL_RECORD).expect("31 bits fit");
        if len == 0 || len > RECORD_MAX {
            return Err(TransferError::BadRecord { dir: dir.to_owned(), offset: at, len: len as u64 });
        }
        let sealed = len + TAG_LEN;
        if self.record.len() < sealed {
            self.record.resize(sealed, 0);
        }
        self.wire.exact(&mut self.record[..sealed], part)?;
        self.sealer
            .open(self.index, header, &mut self.record[..sealed])
            .map_err(|()| TransferError::Forged { dir: dir.to_owned(), record: self.index, offset: at })?;
        self.tags.update(&self.record[len..sealed]);
        self.index += 1;
        self.start = 0;
        self.end = len;
        self.last = word & FINAL_RECORD != 0;
        Ok(())
    }

    /// Fills `buffer` from the contents.
    fn exact(&mut self, buffer: &mut [u8], part: &str) -> Result<(), TransferError> {
        let mut filled = 0;
        while filled < buffer.len() {
            if self.start == self.end {
                self.next_record(part)?;
            }
            let n = (buffer.len() - filled).min(self.end - self.start);
            buffer[filled..filled + n].copy_from_slice(&self.record[self.start..self.start + n]);
            self.start += n;
            filled += n;
        }
        Ok(())
    }

    /// Reads a fixed-size part of the contents.
    fn array<const N: usize>(&mut self, part: &str) -> Result<[u8; N], TransferError> {
        let mut bytes = [0; N];
        self.exact(&mut bytes, part)?;
        Ok(bytes)
    }

    /// Copies `size` bytes of the contents into `file`, straight from the records.
    fn copy_to_file(&mut self, file: &mut File, path: &Path, size: u64) -> Result<(), TransferError> {
        let part = format!("contents of {}", path.display());
        let mut remaining = size;
        while remaining > 0 {
            if self.start == self.end {
                self.next_record(&part)?;
            }
            let n = (self.end - self.start).min(usize::try_from(remaining).unwrap_or(usize::MAX));
            file.write_all(&self.record[self.start..self.start + n])
                .map_err(|source| TransferError::WriteFile { path: path.to_owned(), source })?;
            self.start += n;
            remaining -= n as u64;
        }
        Ok(())
    }

    /// Checks that the trailer just read ended the final record: nothing more is read.
    fn end(&self) -> Result<(), TransferError> {
        let what = if !self.last {
            "the trailer is not in the final record"
        } else if self.start != self.end {
            "the final record goes on after the trailer"
        } else {
            return Ok(());
        };
        Err(TransferError::BadFraming { dir: self.wire.dir.to_owned(), offset: self.wire.read, what })
    }

    /// The error for an unexpected tag in the current record.
    fn bad_tag(&self, expected: String, found: u8) -> TransferError {
        TransferError::BadTag { dir: self.wire.dir.to_owned(), record: self.index - 1, expected, found }
    }
}

/// The files an unpack has created so far, removed on drop unless the unpack succeeded and emptied the list.
struct CreatedFiles {
    /// Every file created, in order.
    paths: Vec<PathBuf>,
}

impl CreatedFiles {
    /// Creates a new file (never an existing one, never through a symbolic link) and remembers it.
    fn create(&mut self, path: PathBuf) -> Result<File, TransferError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| TransferError::CreateFile { path: path.clone(), source })?;
        self.paths.push(path);
        Ok(file)
    }

    /// The file created last.
    fn last(&self) -> &Path {
        self.paths.last().expect("called after create")
    }
}

impl Drop for CreatedFiles {
    fn drop(&mut self) {
        for path in &self.paths {
            if let Err(error) = fs::remove_file(path)
                && error.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "cannot remove partly received image file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::{TcpListener, TcpStream};
    use std::ops::Range;

    const KEY: StreamKey = [7; 32];

    fn pack(dir: &Path, out: &mut impl Write) -> Result<Stats, TransferError> {
        super::pack(dir, out, &KEY)
    }

    fn unpack(input: &mut impl Read, dir: &Path) -> Result<Stats, TransferError> {
        super::unpack(input, dir, &KEY)
    }

    fn unpack_with_limits(input: &mut impl Read, dir: &Path, limits: &Limits) -> Result<Stats, TransferError> {
        super::unpack_with_limits(input, dir, &KEY, limits)
    }

    /// Deterministic bytes that don't compress or repeat, like memory pages.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    }

    /// The size of the big file of [`image_set`]: several records and a part.
    const PAGES_LEN: usize = 5 * RECORD_MAX + 123;

    /// A directory shaped like a CRIU dump: one big pages file, an empty file and several small ones.
    fn image_set() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("pages-1.img"), noise(PAGES_LEN, 1)).unwrap();
        fs::write(dir.path().join("empty.img"), b"").unwrap();
        fs::write(dir.path().join("core-1.img"), noise(3000, 2)).unwrap();
        fs::write(dir.path().join("inventory.img"), b"inventory").unwrap();
        fs::write(dir.path().join("stats-dump"), noise(40, 3)).unwrap();
        dir
    }

    /// A small directory, for tests that try every byte of the stream.
    fn small_set() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.img"), b"alpha").unwrap();
        fs::write(dir.path().join("b.img"), b"").unwrap();
        fs::write(dir.path().join("c.img"), noise(50, 4)).unwrap();
        dir
    }

    /// Names and contents of every entry of a directory, in name order.
    fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| {
                let entry = entry.unwrap();
                (entry.file_name().into_string().unwrap(), fs::read(entry.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    }

    fn packed(dir: &Path) -> Vec<u8> {
        let mut stream = Vec::new();
        pack(dir, &mut stream).unwrap();
        stream
    }

    /// The byte ranges of a stream's records (length word, body, tag), in order.
    fn records(stream: &[u8]) -> Vec<Range<usize>> {
        let mut at = HEADER_LEN;
        let mut found = Vec::new();
        while at < stream.len() {
            let word = u32::from_le_bytes(stream[at..at + 4].try_into().unwrap());
            let len = (word & !FINAL_RECORD) as usize;
            found.push(at..at + RECORD_HEADER_LEN + len + TAG_LEN);
            at += RECORD_HEADER_LEN + len + TAG_LEN;
        }
        found
    }

    /// Seals `bodies` as the records of a stream under [`KEY`], the last one final if `last_final`.
    fn seal_stream(protection: Protection, salt: [u8; SALT_LEN], bodies: &[&[u8]], last_final: bool) -> Vec<u8> {
        let sealer = Sealer::new(&KEY, protection, &salt);
        let mut stream = MAGIC.to_vec();
        stream.extend(VERSION.to_le_bytes());
        stream.push(protection.byte());
        stream.extend(salt);
        for (index, body) in bodies.iter().enumerate() {
            let header = record_header(body.len(), last_final && index + 1 == bodies.len());
            let mut body = body.to_vec();
            let tag = sealer.seal(index as u64, header, &mut body);
            stream.extend(header);
            stream.extend(body);
            stream.extend(tag);
        }
        stream
    }

    /// The contents (totals, file records, trailer) of an image set, framed by hand.
    fn contents_of(files: &[(&[u8], &[u8])], announced_total: Option<u64>) -> Vec<u8> {
        let total = files.iter().map(|(_, data)| data.len() as u64).sum::<u64>();
        let count = u32::try_from(files.len()).unwrap();
        let mut contents = count.to_le_bytes().to_vec();
        contents.extend(announced_total.unwrap_or(total).to_le_bytes());
        for (name, data) in files {
            contents.push(TAG_FILE);
            contents.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
            contents.extend(*name);
            contents.extend((data.len() as u64).to_le_bytes());
            contents.extend(*data);
        }
        contents.push(TAG_END);
        contents.extend(count.to_le_bytes());
        contents.extend(total.to_le_bytes());
        contents
    }

    /// A correctly sealed stream of `contents`, framed as the sender does (the totals alone first), to test
    /// what authentication can't catch.
    fn sealed_contents(contents: &[u8]) -> Vec<u8> {
        seal_stream(Protection::Encrypted, [9; SALT_LEN], &[&contents[..TOTALS_LEN], &contents[TOTALS_LEN..]], true)
    }

    fn stream_of(files: &[(&[u8], &[u8])], announced_total: Option<u64>) -> Vec<u8> {
        sealed_contents(&contents_of(files, announced_total))
    }

    /// Unpacks `stream` into a fresh directory, expecting failure, and checks that nothing was left there.
    fn refused(stream: &[u8]) -> TransferError {
        let target = tempfile::tempdir().unwrap();
        let result = unpack(&mut Cursor::new(stream), target.path());
        assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0, "files left behind after {result:?}");
        result.expect_err("a bad stream was accepted")
    }

    #[test]
    fn round_trip_in_memory_with_either_protection() {
        let source = image_set();
        for protection in [Protection::Encrypted, Protection::Authenticated] {
            let mut stream = Vec::new();
            let sent = pack_with(source.path(), &mut stream, &KEY, protection).unwrap();
            assert_eq!(sent.files, 5);
            assert_eq!(sent.bytes, PAGES_LEN as u64 + 3000 + 9 + 40);
            assert_eq!(sent.stream_bytes, stream.len() as u64);

            // Bytes after the stream belong to whoever reads next, and must stay unread.
            stream.extend(b"next message");
            let target = tempfile::tempdir().unwrap();
            let mut input = Cursor::new(&stream);
            let received = unpack_with(&mut input, target.path(), &KEY, &Limits::default(), protection).unwrap();
            assert_eq!(input.position(), sent.stream_bytes);
            assert_eq!(
                (received.files, received.bytes, received.stream_bytes),
                (sent.files, sent.bytes, sent.stream_bytes)
            );
            assert_eq!(received.checksum, sent.checksum);
            assert_eq!(contents(target.path()), contents(source.path()));
        }
    }

    #[test]
    fn records_are_full_and_the_totals_travel_alone() {
        let stream = packed(image_set().path());
        let lengths: Vec<(usize, bool)> = records(&stream)
            .into_iter()
            .map(|range| {
                let word = u32::from_le_bytes(stream[range.start..range.start + 4].try_into().unwrap());
                ((word & !FINAL_RECORD) as usize, word & FINAL_RECORD != 0)
            })
            .collect();
        assert_eq!(lengths[0], (TOTALS_LEN, false));
        let (last, middle) = lengths[1..].split_last().unwrap();
        assert!(middle.iter().all(|&record| record == (RECORD_MAX, false)), "{middle:?}");
        assert!(last.1 && last.0 > 0 && last.0 <= RECORD_MAX, "{last:?}");
    }

    #[test]
    fn the_contents_are_encrypted() {
        let source = tempfile::tempdir().unwrap();
        let secret = b"password=hunter2;".repeat(100);
        fs::write(source.path().join("secret-name.img"), &secret).unwrap();
        let encrypted = packed(source.path());
        let mut clear = Vec::new();
        pack_with(source.path(), &mut clear, &KEY, Protection::Authenticated).unwrap();
        let holds = |stream: &[u8], needle: &[u8]| stream.windows(needle.len()).any(|w| w == needle);
        // The authenticated-only stream shows both, so the check below would see them if they were there.
        assert!(holds(&clear, b"password=hunter2") && holds(&clear, b"secret-name"));
        assert!(!holds(&encrypted, b"password=hunter2"), "file contents in clear");
        assert!(!holds(&encrypted, b"secret-name"), "file name in clear");
        // Same length, other bytes: the records' bodies are ciphertext.
        assert_eq!(encrypted.len(), clear.len());
        let body = records(&encrypted)[1].start + RECORD_HEADER_LEN;
        assert_ne!(encrypted[body..body + 64], clear[body..body + 64]);
        // A fresh salt per stream: the same images never give the same stream twice.
        let again = packed(source.path());
        assert_ne!(again[HEADER_LEN..], encrypted[HEADER_LEN..]);
        let target = tempfile::tempdir().unwrap();
        unpack(&mut Cursor::new(&again), target.path()).unwrap();
        assert_eq!(fs::read(target.path().join("secret-name.img")).unwrap(), secret);
    }

    #[test]
    fn received_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let target = tempfile::tempdir().unwrap();
        unpack(&mut Cursor::new(packed(small_set().path())), target.path()).unwrap();
        for entry in fs::read_dir(target.path()).unwrap() {
            assert_eq!(entry.unwrap().metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn round_trip_of_an_empty_directory() {
        let source = tempfile::tempdir().unwrap();
        let stream = packed(source.path());
        let framing = 2 * (RECORD_HEADER_LEN + TAG_LEN);
        assert_eq!(stream.len(), HEADER_LEN + framing + TOTALS_LEN + TRAILER_LEN);
        let target = tempfile::tempdir().unwrap();
        let stats = unpack(&mut Cursor::new(stream), target.path()).unwrap();
        assert_eq!((stats.files, stats.bytes), (0, 0));
    }

    #[test]
    fn round_trip_over_loopback_tcp() {
        let source = image_set();
        let target = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let (sent, received) = std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                let mut stream = TcpStream::connect(address).unwrap();
                stream.set_nodelay(true).unwrap();
                let stats = pack(source.path(), &mut stream).unwrap();
                // The connection goes on after the image stream.
                stream.write_all(b"restore please").unwrap();
                stats
            });
            let (mut stream, _) = listener.accept().unwrap();
            let stats = unpack(&mut stream, target.path()).unwrap();
            let mut rest = String::new();
            stream.read_to_string(&mut rest).unwrap();
            assert_eq!(rest, "restore please");
            (sender.join().unwrap(), stats)
        });
        assert_eq!(sent.checksum, received.checksum);
        assert_eq!(sent.stream_bytes, received.stream_bytes);
        assert_eq!(contents(target.path()), contents(source.path()));
    }

    #[test]
    fn every_truncation_is_refused() {
        let stream = packed(small_set().path());
        let boundaries: Vec<usize> = records(&stream).iter().map(|r| r.end).collect();
        assert_eq!(boundaries.len(), 2);
        for len in 0..stream.len() {
            let error = refused(&stream[..len]);
            assert!(
                matches!(error, TransferError::Truncated { offset, .. } if offset == len as u64),
                "cut at {len}: {error}"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let stream = packed(small_set().path());
        for position in 0..stream.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupt = stream.clone();
                corrupt[position] ^= flip;
                let error = refused(&corrupt);
                // Nothing after the header is used before it is authenticated: flips there fail a record's
                // tag, or change a length so that the record is refused or the stream ends early.
                if !matches!(
                    error,
                    TransferError::Forged { .. }
                        | TransferError::BadMagic { .. }
                        | TransferError::UnsupportedVersion { .. }
                        | TransferError::WrongProtection { .. }
                        | TransferError::BadRecord { .. }
                        | TransferError::Truncated { .. }
                ) {
                    panic!("flip {flip:#x} at {position}: unexpected {error}");
                }
                let in_a_body = records(&stream).iter().any(|r| position >= r.start + RECORD_HEADER_LEN && position < r.end);
                if in_a_body || (HEADER_LEN - SALT_LEN..HEADER_LEN).contains(&position) {
                    assert!(matches!(error, TransferError::Forged { .. }), "flip {flip:#x} at {position}: {error}");
                }
            }
        }
    }

    #[test]
    fn corrupt_contents_fail_authentication() {
        let source = image_set();
        let mut stream = packed(source.path());
        // Deep inside pages-1.img, the last file in name order.
        let position = stream.len() - 1000;
        stream[position] ^= 0x10;
        let error = refused(&stream);
        let last = records(&stream).len() as u64 - 1;
        assert!(matches!(error, TransferError::Forged { record, .. } if record == last), "{error}");
        assert!(error.to_string().contains("corrupted"), "{error}");
    }

    #[test]
    fn reordered_replayed_spliced_and_dropped_records_are_refused() {
        let stream = packed(image_set().path());
        let parts = records(&stream);
        let assemble = |order: &[usize]| {
            let mut out = stream[..HEADER_LEN].to_vec();
            for &i in order {
                out.extend(&stream[parts[i].clone()]);
            }
            out
        };
        let n = parts.len();
        assert!(n >= 5);
        let mut swapped: Vec<usize> = (0..n).collect();
        swapped.swap(2, 3);
        let error = refused(&assemble(&swapped));
        assert!(matches!(error, TransferError::Forged { record: 2, .. }), "{error}");

        let mut replayed: Vec<usize> = (0..n).collect();
        replayed[3] = 2;
        let error = refused(&assemble(&replayed));
        assert!(matches!(error, TransferError::Forged { record: 3, .. }), "{error}");

        // Without its final record, the stream is cut, not a smaller image set.
        let error = refused(&assemble(&(0..n - 1).collect::<Vec<_>>()));
        assert!(matches!(error, TransferError::Truncated { .. }), "{error}");
        // A middle record left out.
        let mut dropped: Vec<usize> = (0..n).collect();
        dropped.remove(2);
        let error = refused(&assemble(&dropped));
        assert!(matches!(error, TransferError::Forged { record: 2, .. }), "{error}");

        // A record of another stream of the same images, same connection key, same place.
        let other = packed(image_set().path());
        let mut spliced = stream.clone();
        let at = parts[2].clone();
        spliced[at.clone()].copy_from_slice(&other[at]);
        let error = refused(&spliced);
        assert!(matches!(error, TransferError::Forged { record: 2, .. }), "{error}");

        // The final flag taken off the last record, or put on an earlier one.
        let mut unflagged = stream.clone();
        unflagged[parts[n - 1].start + 3] ^= 0x80;
        assert!(matches!(refused(&unflagged), TransferError::Forged { .. }));
        let mut early = stream.clone();
        early[parts[1].start + 3] ^= 0x80;
        assert!(matches!(refused(&early), TransferError::Forged { record: 1, .. }));
    }

    #[test]
    fn the_protection_cannot_be_chosen_by_the_sender() {
        let source = small_set();
        let mut clear = Vec::new();
        pack_with(source.path(), &mut clear, &KEY, Protection::Authenticated).unwrap();
        let error = refused(&clear);
        assert!(
            matches!(error, TransferError::WrongProtection { found: 2, expected: Protection::Encrypted, .. }),
            "{error}"
        );
        // An encrypted stream relabelled as authenticated-only fails: the label is part of the key.
        let mut relabelled = packed(source.path());
        relabelled[12] = Protection::Authenticated.byte();
        let target = tempfile::tempdir().unwrap();
        let error = unpack_with(&mut Cursor::new(relabelled), target.path(), &KEY, &Limits::default(), Protection::Authenticated)
            .unwrap_err();
        assert!(matches!(error, TransferError::Forged { record: 0, .. }), "{error}");
    }

    #[test]
    fn wrong_magic_is_refused() {
        let mut stream = packed(small_set().path());
        stream[..8].copy_from_slice(b"GIF89a\0\0");
        let error = refused(&stream);
        assert!(matches!(error, TransferError::BadMagic { found, .. } if &found == b"GIF89a\0\0"), "{error}");
    }

    #[test]
    fn a_stream_made_with_another_key_is_refused() {
        let source = small_set();
        let mut stream = Vec::new();
        super::pack(source.path(), &mut stream, &[8; 32]).unwrap();
        let error = refused(&stream);
        assert!(matches!(error, TransferError::Forged { record: 0, offset, .. } if offset == HEADER_LEN as u64), "{error}");
    }

    #[test]
    fn other_versions_are_refused_by_number() {
        let mut stream = packed(small_set().path());
        stream[8..12].copy_from_slice(&4u32.to_le_bytes());
        // A future version may change everything after the version: only the first 12 bytes are looked at.
        stream.truncate(12);
        let error = refused(&stream);
        assert!(matches!(error, TransferError::UnsupportedVersion { found: 4, supported: 3, .. }), "{error}");
        assert!(error.to_string().contains("version 4"), "{error}");
    }

    #[test]
    fn hostile_names_are_refused() {
        for (name, reason) in [
            (&b".."[..], "names a directory"),
            (b".", "names a directory"),
            (b"../escape", "contains '/'"),
            (b"/etc/passwd", "contains '/'"),
            (b"a/b", "contains '/'"),
            (b"", "empty"),
            (b"nul\0byte", "contains NUL"),
            (b"\xff\xfe", "not UTF-8"),
        ] {
            let stream = stream_of(&[(b"ok.img", b"fine"), (name, b"payload")], None);
            let error = refused(&stream);
            assert!(
                matches!(&error, TransferError::BadName { reason: found, .. } if *found == reason),
                "{name:?}: {error}"
            );
        }
    }

    #[test]
    fn oversized_claims_are_refused_without_allocating() {
        // A name length of 65535 is refused before anything is read or allocated for it.
        let mut contents = contents_of(&[(b"x", b"")], None);
        contents[TOTALS_LEN + 1..TOTALS_LEN + 3].copy_from_slice(&u16::MAX.to_le_bytes());
        let error = refused(&sealed_contents(&contents));
        assert!(matches!(error, TransferError::NameTooLong { len: 65535, record: 1, .. }), "{error}");

        let long_name = vec![b'n'; MAX_NAME_LEN + 1];
        let error = refused(&stream_of(&[(&long_name, b"")], None));
        assert!(matches!(error, TransferError::NameTooLong { len: 256, .. }), "{error}");

        // Four billion files.
        let mut contents = contents_of(&[], None);
        contents[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = refused(&sealed_contents(&contents));
        assert!(matches!(error, TransferError::TooManyFiles { count: 4_294_967_295, max: MAX_FILES }), "{error}");

        // A file bigger than the announced total: refused before the file is created.
        let error = refused(&stream_of(&[(b"big", b"12345678")], Some(7)));
        assert!(matches!(error, TransferError::SizeMismatch { size: 8, remaining: 7, .. }), "{error}");

        // An announced total the receiver can't take.
        let target = tempfile::tempdir().unwrap();
        let limits = Limits { max_files: 10, max_bytes: 1000 };
        let error =
            unpack_with_limits(&mut Cursor::new(stream_of(&[(b"big", &[0; 1001])], None)), target.path(), &limits)
                .unwrap_err();
        assert!(matches!(error, TransferError::TooLarge { claimed: 1001, max: 1000 }), "{error}");
        let files: Vec<(&[u8], &[u8])> = vec![(b"a", b""), (b"b", b"")];
        let limits = Limits { max_files: 1, max_bytes: 1000 };
        let error = unpack_with_limits(&mut Cursor::new(stream_of(&files, None)), target.path(), &limits).unwrap_err();
        assert!(matches!(error, TransferError::TooManyFiles { count: 2, max: 1 }), "{error}");
        assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0);
    }

    #[test]
    fn record_lengths_are_bounded_before_the_body_is_read() {
        let stream = packed(small_set().path());
        for (word, len) in [(u32::try_from(RECORD_MAX + 1).unwrap(), RECORD_MAX as u64 + 1), (u32::MAX, u64::from(u32::MAX >> 1)), (0, 0), (FINAL_RECORD, 0)] {
            let mut bad = stream[..HEADER_LEN].to_vec();
            bad.extend(word.to_le_bytes());
            // No body follows: the length alone is refused, nothing is waited for.
            let error = refused(&bad);
            assert!(
                matches!(error, TransferError::BadRecord { offset, len: found, .. } if offset == HEADER_LEN as u64 && found == len),
                "{word:#x}: {error}"
            );
        }
    }

    #[test]
    fn an_image_limit_refuses_early_and_names_itself() {
        let source = image_set();
        let stream = packed(source.path());
        let bytes = PAGES_LEN as u64 + 3000 + 9 + 40;
        let target = tempfile::tempdir().unwrap();
        let mut input = Cursor::new(&stream);
        let error = unpack_limited(&mut input, target.path(), &KEY, bytes - 1).unwrap_err();
        assert!(matches!(error, TransferError::TooLarge { claimed, max } if claimed == bytes && max == bytes - 1));
        let message = error.to_string();
        assert!(message.contains(&format!("limit of {} bytes", bytes - 1)), "{message}");
        // Refused after the header and the first record, the totals: not one file byte was read.
        let first = records(&stream)[0].end as u64;
        assert_eq!(input.position(), first);
        assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0);
        unpack_limited(&mut Cursor::new(&stream), target.path(), &KEY, bytes).unwrap();
        assert_eq!(contents(target.path()), contents(source.path()));
    }

    #[test]
    fn the_automatic_image_limit_keeps_a_margin() {
        let meminfo = |total_kib: u64, available_kib: u64| {
            format!("MemTotal:       {total_kib} kB\nMemFree:         1 kB\nMemAvailable:   {available_kib} kB\n")
        };
        // 24 GiB with 20 GiB available: 10 % of the node is the larger margin.
        let limit = automatic_limit(&meminfo(24 << 20, 20 << 20)).unwrap();
        assert_eq!(limit, (20u64 << 30) - (24u64 << 30) / 10);
        // 1 GiB with 512 MiB available: the 256 MiB floor is larger.
        assert_eq!(automatic_limit(&meminfo(1 << 20, 512 << 10)), Some(256 << 20));
        // Less available than the margin: nothing is accepted.
        assert_eq!(automatic_limit(&meminfo(1 << 20, 100 << 10)), Some(0));
        assert_eq!(automatic_limit("MemTotal: 1024 kB\n"), None);
        assert_eq!(automatic_limit("MemAvailable: 1024 kB\n"), None);

        assert_eq!(image_limit(12345).unwrap(), 12345, "a configured limit is taken as it is");
        // This node's, read now: below its memory by at least the margin (free memory itself changes).
        let meminfo = fs::read_to_string(MEMINFO).unwrap();
        let total_kib: u64 =
            meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
        let now = image_limit(0).unwrap();
        assert!(now <= (total_kib << 10) - LIMIT_MARGIN_MIN, "{now} bytes on a node of {total_kib} kB");
    }

    #[test]
    fn the_final_record_must_end_with_the_trailer() {
        let contents = contents_of(&[(b"a", b"12")], None);
        let (totals, rest) = contents.split_at(TOTALS_LEN);
        let salt = [3; SALT_LEN];
        // The trailer in a record not marked final, and a final record after it.
        let stream = seal_stream(Protection::Encrypted, salt, &[totals, rest, b"x"], true);
        let error = refused(&stream);
        assert!(matches!(error, TransferError::BadFraming { what: "the trailer is not in the final record", .. }), "{error}");
        // Something after the trailer in the final record.
        let mut longer = rest.to_vec();
        longer.push(0);
        let error = refused(&seal_stream(Protection::Encrypted, salt, &[totals, &longer], true));
        assert!(matches!(error, TransferError::BadFraming { what: "the final record goes on after the trailer", .. }), "{error}");
        // A final record that ends before the trailer.
        let error = refused(&seal_stream(Protection::Encrypted, salt, &[totals, &rest[..rest.len() - 1]], true));
        assert!(matches!(error, TransferError::BadFraming { what: "the final record ends before the trailer", .. }), "{error}");
        // The same records, split differently, are fine: records are only containers.
        let target = tempfile::tempdir().unwrap();
        let (a, b) = rest.split_at(5);
        let stream = seal_stream(Protection::Encrypted, salt, &[totals, a, b], true);
        unpack(&mut Cursor::new(stream), target.path()).unwrap();
        assert_eq!(fs::read(target.path().join("a")).unwrap(), b"12");
    }

    #[test]
    fn totals_must_match() {
        // Files that fall short of the announced total, in an authentic stream: a framing bug.
        let error = refused(&stream_of(&[(b"a", b"12")], Some(3)));
        assert!(matches!(error, TransferError::TotalsMismatch { announced: 3, carried: 2, .. }), "{error}");
    }

    #[test]
    fn duplicate_and_existing_names_are_refused_and_nothing_is_touched() {
        let error = refused(&stream_of(&[(b"a", b"1"), (b"a", b"2")], None));
        assert!(
            matches!(&error, TransferError::CreateFile { source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
        );

        let target = tempfile::tempdir().unwrap();
        fs::write(target.path().join("b.img"), b"mine").unwrap();
        let error = unpack(&mut Cursor::new(packed(small_set().path())), target.path()).unwrap_err();
        assert!(matches!(&error, TransferError::CreateFile { path, .. } if path.ends_with("b.img")), "{error}");
        // a.img, created before the clash, is gone again; b.img is untouched.
        assert_eq!(contents(target.path()), vec![("b.img".to_owned(), b"mine".to_vec())]);
    }

    #[test]
    fn pack_refuses_what_is_not_a_regular_file() {
        let source = small_set();
        fs::create_dir(source.path().join("sub")).unwrap();
        let error = pack(source.path(), &mut Vec::new()).unwrap_err();
        assert!(matches!(error, TransferError::NotRegularFile { kind: "directory", .. }), "{error}");
        assert!(error.to_string().contains("sub"), "{error}");
        fs::remove_dir(source.path().join("sub")).unwrap();

        std::os::unix::fs::symlink("/etc/passwd", source.path().join("link.img")).unwrap();
        let error = pack(source.path(), &mut Vec::new()).unwrap_err();
        assert!(matches!(error, TransferError::NotRegularFile { kind: "symbolic link", .. }), "{error}");
        fs::remove_file(source.path().join("link.img")).unwrap();

        nix::unistd::mkfifo(&source.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let error = pack(source.path(), &mut Vec::new()).unwrap_err();
        assert!(matches!(error, TransferError::NotRegularFile { kind: "FIFO", .. }), "{error}");
    }

    #[test]
    fn pack_reports_a_broken_connection() {
        /// Accepts some bytes, then fails like a reset connection.
        struct Breaks(usize);
        impl Write for Breaks {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                let n = bytes.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let source = image_set();
        let error = pack(source.path(), &mut Breaks(3 << 20)).unwrap_err();
        assert!(matches!(&error, TransferError::Send { offset, .. } if *offset > 0), "{error}");
        assert!(error.to_string().contains(&source.path().display().to_string()), "{error}");
    }

    #[test]
    fn files_that_change_while_packed_are_refused() {
        let source = small_set();
        let path = source.path().join("c.img");
        // Shrunk or grown between listing and opening.
        let error = open_image(&path, 49).unwrap_err();
        assert!(matches!(&error, TransferError::FileChanged { expected: 49, .. }), "{error}");
        assert!(error.to_string().contains("c.img"), "{error}");
        // Grown or shrunk between opening and reading to the end.
        let mut out = Vec::new();
        let mut sink = Sink::new(source.path(), &mut out, Sealer::new(&KEY, Protection::Encrypted, &[0; SALT_LEN]));
        for size in [49, 51] {
            let mut file = File::open(&path).unwrap();
            let error = sink.copy_file(&mut file, &path, size).unwrap_err();
            assert!(matches!(error, TransferError::FileChanged { expected, .. } if expected == size), "{error}");
        }
    }

    #[test]
    fn receive_errors_are_not_truncation() {
        /// Gives the stream's first bytes, then fails like a reset connection.
        struct Resets<'a>(&'a [u8]);
        impl Read for Resets<'_> {
            fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                let n = buffer.len().min(self.0.len());
                buffer[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let stream = packed(small_set().path());
        let target = tempfile::tempdir().unwrap();
        let error = unpack(&mut Resets(&stream[..60]), target.path()).unwrap_err();
        assert!(matches!(error, TransferError::Receive { offset: 60, .. }), "{error}");
        assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0);
    }
}
