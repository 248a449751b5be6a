//! Image transfer: an image directory packed into one authenticated stream, and unpacked on the other side.
//!
//! Nodes share no filesystem, so migd moves a job's CRIU images over the migration's TCP connection. The
//! job is frozen the whole time, so this is on the critical path of every migration: the format is a plain
//! sequence of files read and written in large chunks, covered by one running keyed BLAKE3 hash, a MAC with
//! a key the two migds derived for this connection. BLAKE3 runs at several GB/s with the SIMD the CPU has, so
//! it costs less than the copies around it, and it makes the image set both corruption-proof and
//! unforgeable: a restored job runs with its owner's credentials, so its images must come from a node that
//! holds the cluster key. The decoder treats every byte as hostile all the same: it never panics,
//! allocates at most one chunk, and refuses names that could leave the target directory.
//!
//! # Format, version 2
//!
//! All integers are little-endian.
//!
//! ```text
//! header   magic "RMXIMAGE" (8 bytes) | version u32 = 2 | file count u32 | total content bytes u64
//! file     tag b'F' | name length u16 | name (UTF-8, 1..=255 bytes, no '/', not "." or "..") | size u64 | contents
//!          ... once per file, in name order
//! trailer  tag b'E' | file count u32 | total content bytes u64 | keyed BLAKE3 of every byte before it, 32 bytes
//! ```
//!
//! Magic and version come first so that a reader meeting a future version refuses it by number, before
//! reading anything else. The header announces the totals, so a receiver can refuse an image set too large
//! for it before writing a byte; the trailer repeats them and ends the stream, so a stream cut anywhere is
//! an error, never a smaller image set.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blake3::Hasher;

/// The key of an image stream's MAC (32 bytes, derived per connection by the migration protocol).
pub type StreamKey = [u8; 32];
/// Bytes of the MAC at the end of a stream.
const MAC_LEN: usize = 32;

/// The first bytes of every image stream.
pub const MAGIC: [u8; 8] = *b"RMXIMAGE";

/// The format version this module writes, and the only one it reads.
pub const VERSION: u32 = 2;

/// The most files one image set may hold; a CRIU dump of a job has a few dozen.
pub const MAX_FILES: u32 = 100_000;

/// The longest file name accepted: Linux's `NAME_MAX`, since a name is a single path component.
pub const MAX_NAME_LEN: usize = 255;

/// The size of the one buffer each side uses: large enough that system calls cost little, small enough to
/// stay in the L2 cache between the copy into it, the hash and the copy out of it.
const CHUNK: usize = 1 << 20;

/// Header: magic, version, file count, total bytes.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;

/// File record before the name: tag and name length.
const RECORD_PREFIX_LEN: usize = 1 + 2;

/// Trailer before the checksum: tag, file count, total bytes.
const TRAILER_LEN: usize = 1 + 4 + 8;

/// Tag of a file record.
const TAG_FILE: u8 = b'F';

/// Tag of the trailer.
const TAG_END: u8 = b'E';

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
    #[error("image set of {claimed} bytes, more than the {max} allowed")]
    TooLarge {
        /// The size found or announced.
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
    /// The stream ended before its trailer.
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
    /// A record does not start with the tag expected there.
    #[error("image stream for {dir} is malformed at byte {offset}: expected {expected}, found tag byte {found:#04x}")]
    BadTag {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Where the tag is in the stream.
        offset: u64,
        /// What should be there.
        expected: String,
        /// The byte found.
        found: u8,
    },
    /// A file name is longer than [`MAX_NAME_LEN`].
    #[error("image stream for {dir} names a file of {len} bytes at byte {offset}; at most {max} allowed")]
    NameTooLong {
        /// The directory being unpacked into.
        dir: PathBuf,
        /// Where the name length is in the stream.
        offset: u64,
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
    /// The data received is not the data sent.
    #[error("image stream for {dir} fails its MAC: corrupted, or not sent with this connection's key")]
    ChecksumMismatch {
        /// The directory being unpacked into.
        dir: PathBuf,
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
    /// The stream's MAC, to log on both sides.
    pub checksum: [u8; 32],
    /// Time from the call to the last byte written or verified.
    pub elapsed: Duration,
}

/// How much an unpack accepts, checked against the header before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most files; at most [`MAX_FILES`], which is the default.
    pub max_files: u32,
    /// The most content bytes; no limit by default. A receiver should pass what the migration offer
    /// announced (or what its tmpfs can spare), so a peer can't fill its memory.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_files: MAX_FILES, max_bytes: u64::MAX }
    }
}

/// Packs the regular files of `dir` into `out` as one image stream, and flushes `out`.
///
/// `out` is written in chunks of about a megabyte: wrapping it in a `BufWriter` only adds a copy. On a
/// `TcpStream`, `TCP_NODELAY` is harmless and spares the last, short chunk a possible wait for an
/// acknowledgement (none was seen on loopback).
/// Anything in `dir` that is not a regular file (a directory, a symbolic link) is refused, as is a file
/// that changes size while being packed. On error, part of a stream may have been written; the receiver
/// refuses it, since only a complete stream has a trailer.
pub fn pack(dir: &Path, out: &mut impl Write, key: &StreamKey) -> Result<Stats, TransferError> {
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

    let mut sink = Sink { dir, out, buffer: vec![0; CHUNK], filled: 0, hasher: Hasher::new_keyed(key), written: 0 };
    let mut header = [0; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&count.to_le_bytes());
    header[16..].copy_from_slice(&total.to_le_bytes());
    sink.put(&header)?;

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
        elapsed = ?stats.elapsed,
        "image set packed"
    );
    Ok(stats)
}

/// Unpacks one image stream from `input` into `dir`, with the default [`Limits`].
///
/// See [`unpack_with_limits`].
pub fn unpack(input: &mut impl Read, dir: &Path, key: &StreamKey) -> Result<Stats, TransferError> {
    unpack_with_limits(input, dir, key, &Limits::default())
}

/// Unpacks one image stream from `input` into the existing directory `dir`.
///
/// Guarantees:
/// - `Ok` only once the whole stream has arrived, every size matched and the checksum of every byte was
///   verified. The files appear in `dir` as they arrive, so they mean nothing until `Ok`.
/// - On any error, every file this call created has been removed again (also if it unwinds), and no file
///   that was in `dir` before has been touched: a name that already exists is an error. So `dir` is left as
///   it was found.
/// - Files are created with mode 0600, only directly in `dir`: names with `/`, `.`, `..`, NUL or longer
///   than [`MAX_NAME_LEN`] are refused.
/// - Exactly the stream's bytes are read from `input`, nothing after them: a connection can carry more
///   messages after an image stream. Wrapping `input` in a `BufReader` would break that and only add a copy.
/// - At most one chunk (1 MiB) is allocated, whatever the stream claims; the header's file count and total
///   bytes are checked against `limits` before anything is created.
pub fn unpack_with_limits(
    input: &mut impl Read,
    dir: &Path,
    key: &StreamKey,
    limits: &Limits,
) -> Result<Stats, TransferError> {
    let started = Instant::now();
    let mut source = Source { dir, input, hasher: Hasher::new_keyed(key), read: 0 };

    // Magic and version alone first: a later version may frame everything after them differently.
    let start: [u8; 12] = source.array("header")?;
    let magic: [u8; 8] = start[..8].try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(TransferError::BadMagic { dir: dir.to_owned(), found: magic });
    }
    let version = u32::from_le_bytes(start[8..].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(TransferError::UnsupportedVersion { dir: dir.to_owned(), found: version, supported: VERSION });
    }
    let totals: [u8; HEADER_LEN - 12] = source.array("header")?;
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
    let mut buffer = vec![0; usize::try_from(total).unwrap_or(usize::MAX).clamp(1, CHUNK)];
    let mut remaining = total;
    for index in 0..count {
        let prefix: [u8; RECORD_PREFIX_LEN] = source.array("file record")?;
        if prefix[0] != TAG_FILE {
            return Err(source.bad_tag(RECORD_PREFIX_LEN, format!("file {} of {count}", index + 1), prefix[0]));
        }
        let name_len = usize::from(u16::from_le_bytes([prefix[1], prefix[2]]));
        if name_len > MAX_NAME_LEN {
            return Err(TransferError::NameTooLong {
                dir: dir.to_owned(),
                offset: source.read - 2,
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
        source.copy_to_file(&mut file, created.last(), size, &mut buffer)?;
    }

    let trailer: [u8; TRAILER_LEN] = source.array("trailer")?;
    if trailer[0] != TAG_END {
        return Err(source.bad_tag(TRAILER_LEN, "the trailer".to_owned(), trailer[0]));
    }
    let computed = source.hasher.finalize();
    let received: [u8; MAC_LEN] = source.unhashed_array("MAC")?;
    // Checked once the whole stream is read, so a complete stream is always consumed to its end. The
    // comparison of `blake3::Hash` takes constant time.
    if computed != blake3::Hash::from_bytes(received) {
        return Err(TransferError::ChecksumMismatch { dir: dir.to_owned() });
    }
    let computed = *computed.as_bytes();
    // With the checksum right, these only catch a sender that framed its stream wrongly.
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
        stream_bytes: source.read,
        checksum: computed,
        elapsed: started.elapsed(),
    };
    tracing::debug!(
        dir = %dir.display(),
        files = stats.files,
        bytes = stats.bytes,
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

/// The sending side: a buffer that is hashed and written out whenever it fills.
struct Sink<'a, W> {
    /// The directory being packed, for error messages.
    dir: &'a Path,
    /// Where the stream goes.
    out: &'a mut W,
    /// Framing and file contents on their way out; always `CHUNK` long.
    buffer: Vec<u8>,
    /// How much of `buffer` holds data.
    filled: usize,
    /// Hash of everything written so far.
    hasher: Hasher,
    /// Stream bytes written so far.
    written: u64,
}

impl<W: Write> Sink<'_, W> {
    /// Appends framing bytes.
    fn put(&mut self, bytes: &[u8]) -> Result<(), TransferError> {
        if self.buffer.len() - self.filled < bytes.len() {
            self.flush_buffer()?;
        }
        self.buffer[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
        Ok(())
    }

    /// Appends `size` bytes read from `file`, straight into the buffer, and checks that the file ends there.
    fn copy_file(&mut self, file: &mut File, path: &Path, size: u64) -> Result<(), TransferError> {
        let read_error = |source| TransferError::ReadFile { path: path.to_owned(), source };
        let mut remaining = size;
        while remaining > 0 {
            if self.filled == self.buffer.len() {
                self.flush_buffer()?;
            }
            let room = (self.buffer.len() - self.filled).min(usize::try_from(remaining).unwrap_or(usize::MAX));
            match file.read(&mut self.buffer[self.filled..self.filled + room]) {
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

    /// Hashes and writes out what the buffer holds.
    fn flush_buffer(&mut self) -> Result<(), TransferError> {
        let data = &self.buffer[..self.filled];
        self.hasher.update(data);
        self.out.write_all(data).map_err(|source| TransferError::Send {
            dir: self.dir.to_owned(),
            offset: self.written,
            source,
        })?;
        self.written += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes out the rest followed by the checksum, which is not itself hashed; returns the checksum and
    /// the stream's length.
    fn finish(mut self) -> Result<([u8; MAC_LEN], u64), TransferError> {
        self.hasher.update(&self.buffer[..self.filled]);
        let checksum = *self.hasher.finalize().as_bytes();
        if self.buffer.len() - self.filled < MAC_LEN {
            // Hashed already: write it out without hashing it again.
            let filled = self.filled;
            self.write_raw(..filled)?;
            self.filled = 0;
        }
        self.buffer[self.filled..self.filled + MAC_LEN].copy_from_slice(&checksum);
        self.filled += MAC_LEN;
        self.write_raw(..self.filled)?;
        self.out.flush().map_err(|source| TransferError::Send {
            dir: self.dir.to_owned(),
            offset: self.written,
            source,
        })?;
        Ok((checksum, self.written))
    }

    /// Writes part of the buffer without hashing it.
    fn write_raw(&mut self, range: std::ops::RangeTo<usize>) -> Result<(), TransferError> {
        self.out.write_all(&self.buffer[range]).map_err(|source| TransferError::Send {
            dir: self.dir.to_owned(),
            offset: self.written,
            source,
        })?;
        self.written += range.end as u64;
        Ok(())
    }
}

/// The receiving side: exact reads from the stream, hashed as they arrive.
struct Source<'a, R> {
    /// The directory being unpacked into, for error messages.
    dir: &'a Path,
    /// Where the stream comes from.
    input: &'a mut R,
    /// Hash of everything read so far, except the checksum.
    hasher: Hasher,
    /// Stream bytes read so far.
    read: u64,
}

impl<R: Read> Source<'_, R> {
    /// Fills `buffer` from the stream without hashing it; `part` names what is read, for errors.
    fn exact_unhashed(&mut self, buffer: &mut [u8], part: &str) -> Result<(), TransferError> {
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

    /// Fills `buffer` from the stream and hashes it.
    fn exact(&mut self, buffer: &mut [u8], part: &str) -> Result<(), TransferError> {
        self.exact_unhashed(buffer, part)?;
        self.hasher.update(buffer);
        Ok(())
    }

    /// Reads and hashes a fixed-size part of the stream.
    fn array<const N: usize>(&mut self, part: &str) -> Result<[u8; N], TransferError> {
        let mut bytes = [0; N];
        self.exact(&mut bytes, part)?;
        Ok(bytes)
    }

    /// Reads a fixed-size part of the stream without hashing it.
    fn unhashed_array<const N: usize>(&mut self, part: &str) -> Result<[u8; N], TransferError> {
        let mut bytes = [0; N];
        self.exact_unhashed(&mut bytes, part)?;
        Ok(bytes)
    }

    /// Copies `size` bytes of the stream into `file`, a buffer at a time.
    fn copy_to_file(
        &mut self,
        file: &mut File,
        path: &Path,
        size: u64,
        buffer: &mut [u8],
    ) -> Result<(), TransferError> {
        let part = format!("contents of {}", path.display());
        let mut remaining = size;
        while remaining > 0 {
            let chunk = &mut buffer[..usize::try_from(remaining).unwrap_or(usize::MAX).min(CHUNK)];
            self.exact(chunk, &part)?;
            file.write_all(chunk).map_err(|source| TransferError::WriteFile { path: path.to_owned(), source })?;
            remaining -= chunk.len() as u64;
        }
        Ok(())
    }

    /// The error for an unexpected tag, which was the first of the last `record_len` bytes read.
    fn bad_tag(&self, record_len: usize, expected: String, found: u8) -> TransferError {
        TransferError::BadTag { dir: self.dir.to_owned(), offset: self.read - record_len as u64, expected, found }
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

    /// The size of the big file of [`image_set`]: several chunks and a part.
    const PAGES_LEN: usize = 5 * CHUNK + 123;

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

    /// Builds a stream by hand, with a correct checksum, to test what a correct checksum can't catch.
    fn stream_of(files: &[(&[u8], &[u8])], announced_total: Option<u64>) -> Vec<u8> {
        let total = files.iter().map(|(_, data)| data.len() as u64).sum::<u64>();
        let count = u32::try_from(files.len()).unwrap();
        let mut stream = MAGIC.to_vec();
        stream.extend(VERSION.to_le_bytes());
        stream.extend(count.to_le_bytes());
        stream.extend(announced_total.unwrap_or(total).to_le_bytes());
        for (name, data) in files {
            stream.push(TAG_FILE);
            stream.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
            stream.extend(*name);
            stream.extend((data.len() as u64).to_le_bytes());
            stream.extend(*data);
        }
        stream.push(TAG_END);
        stream.extend(count.to_le_bytes());
        stream.extend(total.to_le_bytes());
        let mut hasher = Hasher::new_keyed(&KEY);
        hasher.update(&stream);
        stream.extend(hasher.finalize().as_bytes());
        stream
    }

    /// Unpacks `stream` into a fresh directory, expecting failure, and checks that nothing was left there.
    fn refused(stream: &[u8]) -> TransferError {
        let target = tempfile::tempdir().unwrap();
        let result = unpack(&mut Cursor::new(stream), target.path());
        assert_eq!(fs::read_dir(target.path()).unwrap().count(), 0, "files left behind after {result:?}");
        result.expect_err("a bad stream was accepted")
    }

    #[test]
    fn round_trip_in_memory() {
        let source = image_set();
        let mut stream = Vec::new();
        let sent = pack(source.path(), &mut stream).unwrap();
        assert_eq!(sent.files, 5);
        assert_eq!(sent.bytes, PAGES_LEN as u64 + 3000 + 9 + 40);
        assert_eq!(sent.stream_bytes, stream.len() as u64);

        // Bytes after the stream belong to whoever reads next, and must stay unread.
        stream.extend(b"next message");
        let target = tempfile::tempdir().unwrap();
        let mut input = Cursor::new(&stream);
        let received = unpack(&mut input, target.path()).unwrap();
        assert_eq!(input.position(), sent.stream_bytes);
        assert_eq!(
            (received.files, received.bytes, received.stream_bytes),
            (sent.files, sent.bytes, sent.stream_bytes)
        );
        assert_eq!(received.checksum, sent.checksum);
        assert_eq!(contents(target.path()), contents(source.path()));
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
        assert_eq!(stream.len(), HEADER_LEN + TRAILER_LEN + MAC_LEN);
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
                // Flips that change the framing are caught by its checks, the others by the checksum.
                if !matches!(
                    error,
                    TransferError::ChecksumMismatch { .. }
                        | TransferError::BadMagic { .. }
                        | TransferError::UnsupportedVersion { .. }
                        | TransferError::TooManyFiles { .. }
                        | TransferError::BadTag { .. }
                        | TransferError::NameTooLong { .. }
                        | TransferError::BadName { .. }
                        | TransferError::SizeMismatch { .. }
                        | TransferError::Truncated { .. }
                        | TransferError::CreateFile { .. }
                ) {
                    panic!("flip {flip:#x} at {position}: unexpected {error}");
                }
            }
        }
    }

    #[test]
    fn corrupt_contents_fail_the_checksum() {
        let source = image_set();
        let mut stream = packed(source.path());
        // Deep inside pages-1.img, the last file in name order.
        let position = stream.len() - 1000;
        stream[position] ^= 0x10;
        let error = refused(&stream);
        assert!(matches!(error, TransferError::ChecksumMismatch { .. }), "{error}");
        assert!(error.to_string().contains("corrupt"), "{error}");
    }

    #[test]
    fn corrupt_size_is_refused() {
        let mut stream = packed(small_set().path());
        // The first file is "a.img": its size's most significant byte follows the 5-byte name.
        let size_at = HEADER_LEN + RECORD_PREFIX_LEN + 5;
        assert_eq!(&stream[size_at - 5..size_at], b"a.img");
        stream[size_at + 7] ^= 0x01;
        let error = refused(&stream);
        assert!(matches!(&error, TransferError::SizeMismatch { path, .. } if path.ends_with("a.img")), "{error}");
        assert!(error.to_string().contains("a.img"), "{error}");
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
        assert!(matches!(error, TransferError::ChecksumMismatch { .. }), "{error}");
    }

    #[test]
    fn other_versions_are_refused_by_number() {
        let mut stream = packed(small_set().path());
        stream[8..12].copy_from_slice(&3u32.to_le_bytes());
        // A future version may change everything after the version: only the first 12 bytes are looked at.
        stream.truncate(12);
        let error = refused(&stream);
        assert!(matches!(error, TransferError::UnsupportedVersion { found: 3, supported: 2, .. }), "{error}");
        assert!(error.to_string().contains("version 3"), "{error}");
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
        let mut stream = stream_of(&[(b"x", b"")], None);
        stream[HEADER_LEN + 1..HEADER_LEN + 3].copy_from_slice(&u16::MAX.to_le_bytes());
        let error = refused(&stream);
        assert!(matches!(error, TransferError::NameTooLong { len: 65535, .. }), "{error}");

        let long_name = vec![b'n'; MAX_NAME_LEN + 1];
        let error = refused(&stream_of(&[(&long_name, b"")], None));
        assert!(matches!(error, TransferError::NameTooLong { len: 256, .. }), "{error}");

        // Four billion files.
        let mut stream = stream_of(&[], None);
        stream[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = refused(&stream);
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
    fn totals_must_match() {
        // Files that fall short of the announced total, under a correct checksum: a framing bug.
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
        let mut sink =
            Sink { dir: source.path(), out: &mut out, buffer: vec![0; 16], filled: 0, hasher: Hasher::new_keyed(&KEY), written: 0 };
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
