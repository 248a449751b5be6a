//! Target `image_stream`: `rmosix_checkpoint::transfer::unpack_with`, which writes the image files a peer
//! streams to us into a fresh directory on the image store.
//!
//! The first input byte picks a mode (bits 0-1):
//! - 0 and 3, hostile bytes: the rest is the stream, unpacked as encrypted (0) or authenticated-only (3).
//! - 1, packed: the rest describes an image set (up to six files), optional limits, and tamperings (flip,
//!   cut, insert, append); the set is packed with `transfer::pack_with` (bit 3: authenticated-only instead
//!   of encrypted), tampered with, and unpacked.
//! - 2, sealed contents: the rest is the stream's *contents* (totals, file records, trailer), cut into
//!   records (sizes from the input) and given valid tags under the fuzzing key by [`seal`], as a node
//!   holding the cluster key but sending nonsense would. Without this nothing past the first record's tag
//!   would ever be reached: names, sizes and totals are only parsed once authenticated.
//!
//! Bit 2 plants, in the destination of modes 1 and 2, a symbolic link named like the first file and
//! pointing outside.
//!
//! Checked, on top of no panic (the replay's allocator also checks that no allocation exceeds a few MiB):
//! - nothing is ever written outside the destination: its parent holds exactly what it held before, and
//!   the planted link and its target are untouched;
//! - on error the destination is left as it was found; on success it holds regular files of mode 0600 and
//!   nothing else, as many and as large as the call reports, and exactly the stream's bytes were read;
//! - a packed set unpacks to the same files, unless the stream was changed (any flip, cut or insertion is
//!   refused; appended bytes are left unread), the limits are too small, or a name was taken already;
//! - what hostile bytes or contents unpack to packs and unpacks again to the same files.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use rmosix_checkpoint::transfer::{self, Limits, Protection, Stats};

use crate::STREAM_KEY;
use crate::input::{Builder, Input};

/// Pieces of streams worth splicing in.
pub const TOKENS: &[&[u8]] =
    &[b"RMXIMAGE", &[3, 0, 0, 0], b"F", b"E", b"..", b"/", &[0], &[0xff; 8], &[0, 0, 0x10, 0x80], &[0, 0, 0, 0x80]];

const MAX_FILES: u8 = 6;
const MAX_FILE_BYTES: usize = 4096;
const NAME_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._-";

/// An image directory's files: name to contents.
type Files = BTreeMap<String, Vec<u8>>;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let plant = mode & 4 != 0;
    match mode % 4 {
        0 => hostile(rest, Protection::Encrypted),
        3 => hostile(rest, Protection::Authenticated),
        1 => packed(plant, if mode & 8 == 0 { Protection::Encrypted } else { Protection::Authenticated }, rest),
        _ => sealed(plant, rest),
    }
}

/// A scratch directory on a tmpfs when there is one: this target creates and removes files all the time.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let builder = tempfile::Builder::new().prefix("rmosix-fuzz-").clone();
    if shm.is_dir() { builder.tempdir_in(shm) } else { builder.tempdir() }.expect("a scratch directory")
}

/// The names directly in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("listing a scratch directory")
        .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The files of an unpacked directory, checked to be regular files of mode 0600 (`except` aside).
fn unpacked_files(dir: &Path, except: Option<&str>) -> Files {
    let mut files = Files::new();
    for name in entries(dir) {
        if Some(name.as_str()) == except {
            continue;
        }
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path).expect("metadata of an unpacked file");
        assert!(meta.is_file(), "unpack made {} a {:?}", path.display(), meta.file_type());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "mode of {}", path.display());
        files.insert(name, fs::read(&path).expect("reading an unpacked file"));
    }
    files
}

fn check_stats(stats: &Stats, files: &Files, consumed: u64) {
    let bytes: usize = files.values().map(Vec::len).sum();
    assert_eq!(stats.files, files.len() as u64, "files reported and found differ");
    assert_eq!(stats.bytes, bytes as u64, "bytes reported and found differ");
    assert_eq!(stats.stream_bytes, consumed, "stream bytes reported and read differ");
}

/// What was accepted is an image set like any other: it goes through pack and unpack unchanged.
fn check_repacks(scratch: &Path, files: &Files, dst: &Path) {
    let mut again = Vec::new();
    transfer::pack(dst, &mut again, &STREAM_KEY).expect("packing what was unpacked");
    let dst2 = scratch.join("again");
    fs::create_dir(&dst2).expect("a second directory");
    transfer::unpack_with_limits(&mut Cursor::new(&again), &dst2, &STREAM_KEY, &Limits::default())
        .expect("unpacking what was packed");
    assert_eq!(&unpacked_files(&dst2, None), files, "the image set changed through pack and unpack");
}

fn hostile(stream: &[u8], protection: Protection) {
    let scratch = scratch();
    let dst = scratch.path().join("images");
    fs::create_dir(&dst).expect("a destination directory");
    let mut input = Cursor::new(stream);
    let result = transfer::unpack_with(&mut input, &dst, &STREAM_KEY, &Limits::default(), protection);
    assert_eq!(entries(scratch.path()), ["images"], "unpack wrote outside its directory");
    let Ok(stats) = result else {
        assert!(entries(&dst).is_empty(), "a failed unpack left files behind");
        return;
    };
    let files = unpacked_files(&dst, None);
    check_stats(&stats, &files, input.position());
    check_repacks(scratch.path(), &files, &dst);
}

/// The protection byte of the authenticated-only records, as `transfer` writes it.
const AUTHENTICATED: u8 = 2;

/// The key derivation context of `transfer`'s record keys, as its module documents the format.
const KDF_CONTEXT: &str = "rmosix 2026-12 image stream v3 record key";

/// An authenticated-only image stream (`Protection::Authenticated`, the format `transfer`'s module doc
/// describes) with `contents` cut into records of `record_len` bytes (the first `first_len`), every tag
/// valid under [`STREAM_KEY`], the last record final unless `no_final`. The unit test below checks that
/// `transfer` accepts what this makes, so a change of the format cannot quietly leave this target at the
/// first tag.
pub fn seal(contents: &[u8], first_len: usize, record_len: usize, no_final: bool) -> Vec<u8> {
    let salt = [0x5a; 32];
    let mut stream = transfer::MAGIC.to_vec();
    stream.extend_from_slice(&transfer::VERSION.to_le_bytes());
    stream.push(AUTHENTICATED);
    stream.extend_from_slice(&salt);
    let mut material = STREAM_KEY.to_vec();
    material.push(AUTHENTICATED);
    material.extend_from_slice(&salt);
    let key = blake3::derive_key(KDF_CONTEXT, &material);
    let mut rest = contents;
    let mut index = 0u64;
    while !rest.is_empty() {
        let len = if index == 0 { first_len } else { record_len }.clamp(1, transfer::RECORD_MAX).min(rest.len());
        let (body, after) = rest.split_at(len);
        let last = after.is_empty() && !no_final;
        let word = u32::try_from(len).expect("at most RECORD_MAX") | if last { 1 << 31 } else { 0 };
        let mut hasher = blake3::Hasher::new_keyed(&key);
        hasher.update(&index.to_le_bytes());
        hasher.update(&word.to_le_bytes());
        hasher.update(body);
        stream.extend_from_slice(&word.to_le_bytes());
        stream.extend_from_slice(body);
        stream.extend_from_slice(&hasher.finalize().as_bytes()[..16]);
        rest = after;
        index += 1;
    }
    stream
}

fn sealed(plant: bool, data: &[u8]) {
    let mut input = Input::new(data);
    // 0 is a record as large as can be.
    let size = |n: usize| if n == 0 { transfer::RECORD_MAX } else { n };
    let (first_len, record_len) = (size(usize::from(input.u8())), size(usize::from(input.u16())));
    let no_final = input.u8() == 0xff;
    let contents = input.rest();
    let stream = seal(contents, first_len, record_len, no_final);
    let scratch = scratch();
    let dst = scratch.path().join("images");
    fs::create_dir(&dst).expect("a destination directory");
    // The first name the contents give, if any: a link there points outside.
    let planted = plant.then(|| first_name(contents)).flatten();
    if let Some(name) = &planted {
        std::os::unix::fs::symlink("../victim", dst.join(name)).expect("planting a link");
    }
    let mut reader = Cursor::new(&stream);
    let result = transfer::unpack_with(&mut reader, &dst, &STREAM_KEY, &Limits::default(), Protection::Authenticated);
    assert_eq!(entries(scratch.path()), ["images"], "unpack wrote outside its directory");
    check_planted(&dst, planted.as_deref());
    match result {
        Ok(stats) => {
            assert!(planted.is_none(), "unpack went past a name that was taken");
            let files = unpacked_files(&dst, None);
            check_stats(&stats, &files, reader.position());
            check_repacks(scratch.path(), &files, &dst);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(unpacked_files(&dst, planted.as_deref()).is_empty(), "a failed unpack left files behind");
        }
    }
}

/// The name of the first file record of some contents, if it is a plain name.
fn first_name(contents: &[u8]) -> Option<String> {
    let record = contents.get(12..)?;
    let len = usize::from(u16::from_le_bytes([*record.get(1)?, *record.get(2)?]));
    let name = std::str::from_utf8(record.get(3..3 + len)?).ok()?;
    let plain = !name.is_empty() && name.len() <= transfer::MAX_NAME_LEN && name != "." && name != "..";
    let plain = plain && !name.contains(['/', '\0']);
    plain.then(|| name.to_owned())
}

fn check_planted(dst: &Path, planted: Option<&str>) {
    if let Some(name) = planted {
        let link = fs::read_link(dst.join(name)).expect("the planted link is still there");
        assert_eq!(link, Path::new("../victim"));
    }
}

/// What a packed-mode input asks for.
#[derive(Debug)]
struct Plan {
    files: Files,
    limits: Option<Limits>,
    /// (operation, offset, value): flip, cut, insert, append.
    tampers: Vec<(u8, u32, u8)>,
}

impl Plan {
    fn read(data: &[u8]) -> Self {
        let mut input = Input::new(data);
        let mut files = Files::new();
        for _ in 0..input.u8() % (MAX_FILES + 1) {
            let raw = input.chunk(24);
            let mut name: String =
                raw.iter().map(|&b| char::from(NAME_CHARS[usize::from(b) % NAME_CHARS.len()])).collect();
            if name.is_empty() || name == "." || name == ".." {
                name.insert(0, 'x');
            }
            let contents = input.chunk(MAX_FILE_BYTES).to_vec();
            files.entry(name).or_insert(contents);
        }
        let limits = (input.u8() % 2 == 1)
            .then(|| Limits { max_files: u32::from(input.u8() % 8), max_bytes: u64::from(input.u16()) });
        let tampers = (0..input.u8() % 4).map(|_| (input.u8() % 4, input.u32(), input.u8())).collect();
        Self { files, limits, tampers }
    }
}

/// Applies the tamperings.
fn tamper(stream: &mut Vec<u8>, tampers: &[(u8, u32, u8)]) {
    let len = stream.len();
    for &(op, offset, value) in tampers {
        // Offsets within the stream as it was packed: earlier tamperings may have moved it, which only
        // changes where a later one lands.
        let at = usize::try_from(offset).unwrap_or(usize::MAX) % (len + 1);
        match op {
            0 if at < stream.len() => stream[at] ^= value.max(1),
            1 if at < stream.len() => stream.truncate(at),
            2 if at <= stream.len() => stream.insert(at, value),
            3 => stream.push(value),
            _ => {}
        }
    }
}

fn packed(plant: bool, protection: Protection, data: &[u8]) {
    let plan = Plan::read(data);
    let scratch = scratch();
    let (src, dst) = (scratch.path().join("src"), scratch.path().join("images"));
    fs::create_dir(&src).expect("a source directory");
    fs::create_dir(&dst).expect("a destination directory");
    for (name, contents) in &plan.files {
        fs::write(src.join(name), contents).expect("writing an image file");
    }
    let planted = plan.files.keys().next().filter(|_| plant).cloned();
    if let Some(name) = &planted {
        std::os::unix::fs::symlink("../victim", dst.join(name)).expect("planting a link");
    }
    let mut stream = Vec::new();
    let packed = transfer::pack_with(&src, &mut stream, &STREAM_KEY, protection).expect("packing an image set");
    assert_eq!(packed.stream_bytes, stream.len() as u64);
    let original = stream.clone();
    tamper(&mut stream, &plan.tampers);
    // Bytes after the stream are not its own: unpack must leave them unread.
    let changed = !stream.starts_with(&original);
    let mut input = Cursor::new(&stream);
    let limits = plan.limits.unwrap_or_default();
    let result = transfer::unpack_with(&mut input, &dst, &STREAM_KEY, &limits, protection);

    assert_eq!(entries(scratch.path()), ["images", "src"], "unpack wrote outside its directory");
    check_planted(&dst, planted.as_deref());
    let bytes: usize = plan.files.values().map(Vec::len).sum();
    let fits = plan.files.len() as u64 <= u64::from(limits.max_files) && bytes as u64 <= limits.max_bytes;
    match result {
        Ok(stats) => {
            assert!(!changed, "a tampered stream was accepted: {:?}", plan.tampers);
            assert!(fits, "a set of {} files, {bytes} bytes passed {limits:?}", plan.files.len());
            assert!(planted.is_none(), "unpack went past a name that was taken");
            let files = unpacked_files(&dst, None);
            assert_eq!(files, plan.files, "the image set changed through pack and unpack");
            check_stats(&stats, &files, input.position());
            assert_eq!((stats.stream_bytes, stats.checksum), (packed.stream_bytes, packed.checksum));
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(changed || !fits || planted.is_some(), "a packed set was refused: {e}");
            assert!(unpacked_files(&dst, planted.as_deref()).is_empty(), "a failed unpack left files behind");
        }
    }
}

/// The contents of a stream holding `files` in this order, as `transfer` frames them.
fn contents(files: &[(&[u8], &[u8])]) -> Vec<u8> {
    let total: usize = files.iter().map(|(_, c)| c.len()).sum();
    let count = u32::try_from(files.len()).expect("few");
    let mut out = count.to_le_bytes().to_vec();
    out.extend_from_slice(&(total as u64).to_le_bytes());
    for (name, data) in files {
        out.push(b'F');
        out.extend_from_slice(&u16::try_from(name.len()).expect("short").to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
    }
    out.push(b'E');
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(total as u64).to_le_bytes());
    out
}

/// Packed sets of a few shapes, clean and tampered with; the same sets as hostile bytes; and contents
/// with good and bad names, sizes and totals, cut into records in several ways.
pub fn seeds() -> Vec<Vec<u8>> {
    let sets: [&[(&[u8], &[u8])]; 4] = [
        &[],
        &[(b"inventory.img", b"\x01\x02\x03")],
        &[(b"core-1.img", &[0x55; 300]), (b"mm-1.img", b""), (b"pages-1.img", &[0xaa; 2000])],
        &[(b"a", b"first"), (b"b", b"second")],
    ];
    let tampers: [&[(u8, u32, u8)]; 5] = [&[], &[(0, 30, 1)], &[(1, 40, 0)], &[(2, 5, 7)], &[(3, 0, 9)]];
    let mut seeds = Vec::new();
    for set in sets {
        let mut describe = Builder::new().u8(u8::try_from(set.len()).expect("few"));
        for (name, contents) in set {
            describe = describe.chunk(name).chunk(contents);
        }
        for (i, list) in tampers.iter().enumerate() {
            let mode = if i % 2 == 0 { 1 } else { 1 | 8 };
            let mut b = Builder::new().u8(mode).bytes(&describe.clone().build()).u8(0);
            b = b.u8(u8::try_from(list.len()).expect("few"));
            for &(op, offset, value) in *list {
                b = b.u8(op).u32(offset).u8(value);
            }
            seeds.push(b.build());
        }
        seeds.push(Builder::new().u8(1 | 4).bytes(&describe.clone().build()).u8(1).u8(1).u16(100).u8(0).build());
        seeds.push([&[0][..], &packed_stream(set, Protection::Encrypted)].concat());
        seeds.push([&[3][..], &packed_stream(set, Protection::Authenticated)].concat());
        seeds.push(Builder::new().u8(2).u8(12).u16(0).u8(0).bytes(&contents(set)).build());
    }
    let hostile_names: [&[(&[u8], &[u8])]; 6] = [
        &[(b"../escape", b"x")],
        &[(b"..", b"x")],
        &[(b"a/b", b"x")],
        &[(b"nul\0", b"x")],
        &[(b"same", b"1"), (b"same", b"2")],
        &[(&[b'n'; 256], b"x")],
    ];
    for set in hostile_names {
        seeds.push(Builder::new().u8(2).u8(12).u16(7).u8(0).bytes(&contents(set)).build());
    }
    let good = contents(&[(b"core-1.img", b"0123456789"), (b"pages-1.img", &[7; 100])]);
    for (first, len, no_final) in [(12, 0, 0), (1, 1, 0), (200, 200, 0), (12, 3, 0xff)] {
        seeds.push(Builder::new().u8(2 | 4).u8(first).u16(len).u8(no_final).bytes(&good).build());
    }
    let mut wrong_total = good.clone();
    wrong_total[4] ^= 1;
    seeds.push(Builder::new().u8(2).u8(12).u16(0).u8(0).bytes(&wrong_total).build());
    seeds
}

/// The stream `transfer::pack_with` makes of these files.
fn packed_stream(files: &[(&[u8], &[u8])], protection: Protection) -> Vec<u8> {
    let scratch = scratch();
    for (name, contents) in files {
        fs::write(scratch.path().join(String::from_utf8_lossy(name).as_ref()), contents).expect("a seed file");
    }
    let mut stream = Vec::new();
    transfer::pack_with(scratch.path(), &mut stream, &STREAM_KEY, protection).expect("packing a seed set");
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_contents_are_what_transfer_accepts() {
        let files: &[(&[u8], &[u8])] = &[(b"core-1.img", b"0123456789"), (b"pages-1.img", &[7; 100])];
        for (first, len) in [(12, 0), (1, 1), (12, 5), (4096, 4096)] {
            let dir = scratch();
            let stream = seal(&contents(files), first, len, false);
            let stats = transfer::unpack_with(
                &mut Cursor::new(&stream),
                dir.path(),
                &STREAM_KEY,
                &Limits::default(),
                Protection::Authenticated,
            )
            .unwrap_or_else(|e| panic!("the image stream format changed; update image::seal: {e}"));
            assert_eq!(stats.files, 2);
            assert_eq!(fs::read(dir.path().join("pages-1.img")).unwrap(), [7; 100]);
        }
    }

    #[test]
    fn a_stream_without_its_final_record_is_refused() {
        let dir = scratch();
        let stream = seal(&contents(&[(b"a", b"x")]), 12, 0, true);
        let result = transfer::unpack_with(
            &mut Cursor::new(&stream),
            dir.path(),
            &STREAM_KEY,
            &Limits::default(),
            Protection::Authenticated,
        );
        assert!(result.is_err());
        assert!(entries(dir.path()).is_empty());
    }
}
