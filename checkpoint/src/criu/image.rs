//! The little we read of CRIU's own image files, after a dump: which processes were stopped, and which
//! temporary names (`link_remap.N`) the dump gave to files the job holds.
//!
//! CRIU records a process's state as it found it, in the core image, and restores it: without
//! `leave_stopped` a process that was stopped at dump time is stopped again after the restore. With
//! `leave_stopped`, which a move needs (the restored job must not run before the source's copy is gone),
//! every process ends up stopped, and whoever resumes the job must know which ones were stopped before, or
//! it would continue a child the job had stopped itself. The images are what the restore uses, written
//! while the job was frozen, so they are the one record of that, free of races with the running job.
//!
//! The image format is CRIU's (`criu/image.c`, `images/*.proto`): a head magic, the image's own magic, then
//! entries, each a `u32` length and a protobuf message. Only the fields named here are read, with
//! protobuf's wire-level reader, so no generated code is needed; unknown fields are skipped, as protobuf
//! requires.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

use protobuf::CodedInputStream;
use protobuf::rt::WireType;

use super::CriuError;

/// Magic at the head of every image but the inventory (`IMG_COMMON_MAGIC`).
const HEAD_MAGIC: u32 = 0x5456_4319;
/// `core-<pid>.img`.
const CORE_MAGIC: u32 = 0x5505_3847;
/// `files.img`: every open file of the job.
const FILES_MAGIC: u32 = 0x5630_3138;
/// `remap-fpath.img`: files reached through another name.
const REMAP_FPATH_MAGIC: u32 = 0x5913_3954;

/// `task_state` of a stopped process (`COMPEL_TASK_STOPPED`).
const TASK_STOPPED: u64 = 3;
/// `fd_types.REG`.
const REGULAR_FILE: u64 = 1;
/// `remap_type.LINKED`.
const LINKED: u64 = 0;
/// Images without `remap_type` mark ghost files with this bit of `remap_id`.
const LEGACY_GHOST_BIT: u64 = 1 << 31;

/// The PIDs (in the job's own PID namespace) of the processes that were stopped when the images in `dir`
/// were made. Threads have core images of their own, without a task state, and are skipped.
pub fn stopped_tasks(dir: &Path) -> Result<HashSet<i32>, CriuError> {
    let mut stopped = HashSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, &e.to_string()))?;
    for entry in entries {
        let name = entry.map_err(|e| bad(dir, &e.to_string()))?.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("core-")?.strip_suffix(".img")?.parse().ok()) else {
            continue;
        };
        let path = dir.join(&name);
        let core = entries_of(&path, CORE_MAGIC)?;
        let Some(core) = core.first() else { return Err(bad(&path, "no core entry")) };
        // core_entry.tc (3) -> task_core_entry.task_state (1).
        let state = match message(core, 3).map_err(|e| bad(&path, &e))? {
            Some(tc) => varint(&tc, 1).map_err(|e| bad(&path, &e))?,
            None => None,
        };
        if state == Some(TASK_STOPPED) {
            stopped.insert(pid);
        }
    }
    Ok(stopped)
}

/// The names (in the job's mount namespace) the dump in `dir` linked files to that the job holds and whose
/// own names are gone: `link_remap.N` beside each. They exist until a restore opens and removes them.
pub fn link_remaps(dir: &Path) -> Result<Vec<PathBuf>, CriuError> {
    let remap_path = dir.join("remap-fpath.img");
    if !remap_path.exists() {
        return Ok(Vec::new());
    }
    let mut linked = HashSet::new();
    for entry in entries_of(&remap_path, REMAP_FPATH_MAGIC)? {
        let fields = (|| -> Result<_, String> { Ok((varint(&entry, 2)?, varint(&entry, 3)?)) })();
        let (remap_id, remap_type) = fields.map_err(|e| bad(&remap_path, &e))?;
        let Some(remap_id) = remap_id else { return Err(bad(&remap_path, "a remap without remap_id")) };
        let is_linked = remap_type.map_or(remap_id & LEGACY_GHOST_BIT == 0, |t| t == LINKED);
        if is_linked {
            linked.insert(remap_id);
        }
    }
    if linked.is_empty() {
        return Ok(Vec::new());
    }
    let files_path = dir.join("files.img");
    let mut names = Vec::new();
    for entry in entries_of(&files_path, FILES_MAGIC)? {
        let file = (|| -> Result<_, String> { Ok((varint(&entry, 1)?, varint(&entry, 2)?, message(&entry, 3)?)) })();
        // file_entry: type (1), id (2), reg (3) -> reg_file_entry.name (6).
        let (kind, id, reg) = file.map_err(|e| bad(&files_path, &e))?;
        if kind != Some(REGULAR_FILE) || !id.is_some_and(|id| linked.contains(&id)) {
            continue;
        }
        let name = reg.map(|reg| bytes(&reg, 6)).transpose().map_err(|e| bad(&files_path, &e))?.flatten();
        let Some(name) = name else { return Err(bad(&files_path, "a linked remap without a name")) };
        names.push(PathBuf::from(OsString::from_vec(name)));
    }
    Ok(names)
}

fn bad(path: &Path, reason: &str) -> CriuError {
    CriuError::Image { path: path.to_owned(), reason: reason.to_owned() }
}

/// The entries of the image at `path`, after checking its magics.
fn entries_of(path: &Path, magic: u32) -> Result<Vec<Vec<u8>>, CriuError> {
    let data = std::fs::read(path).map_err(|e| bad(path, &e.to_string()))?;
    let word = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if word(0) != Some(HEAD_MAGIC) || word(4) != Some(magic) {
        return Err(bad(path, &format!("not an image of magic {magic:#010x}")));
    }
    let mut entries = Vec::new();
    let mut at = 8;
    while at < data.len() {
        let len = word(at).ok_or_else(|| bad(path, "cut in an entry's length"))? as usize;
        let body = data.get(at + 4..at + 4 + len).ok_or_else(|| bad(path, "cut in an entry"))?;
        entries.push(body.to_vec());
        at += 4 + len;
    }
    Ok(entries)
}

/// A protobuf field as found on the wire.
enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// The last value of field `number` in `msg` (protobuf: the last one wins), skipping every other field.
fn field(msg: &[u8], number: u32) -> Result<Option<Value>, String> {
    let mut input = CodedInputStream::from_bytes(msg);
    let mut found = None;
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        let wire_type = WireType::new(tag & 7).ok_or_else(|| format!("wire type {} in tag {tag}", tag & 7))?;
        match wire_type {
            WireType::Varint if tag >> 3 == number => {
                found = Some(Value::Varint(input.read_raw_varint64().map_err(|e| e.to_string())?));
            }
            WireType::LengthDelimited if tag >> 3 == number => {
                found = Some(Value::Bytes(input.read_bytes().map_err(|e| e.to_string())?));
            }
            other => input.skip_field(other).map_err(|e| e.to_string())?,
        }
    }
    Ok(found)
}

fn varint(msg: &[u8], number: u32) -> Result<Option<u64>, String> {
    match field(msg, number)? {
        Some(Value::Varint(v)) => Ok(Some(v)),
        Some(Value::Bytes(_)) => Err(format!("field {number} is not a number")),
        None => Ok(None),
    }
}

fn bytes(msg: &[u8], number: u32) -> Result<Option<Vec<u8>>, String> {
    match field(msg, number)? {
        Some(Value::Bytes(b)) => Ok(Some(b)),
        Some(Value::Varint(_)) => Err(format!("field {number} is not a string or message")),
        None => Ok(None),
    }
}

/// An embedded message is length-delimited like bytes.
fn message(msg: &[u8], number: u32) -> Result<Option<Vec<u8>>, String> {
    bytes(msg, number)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding of the few shapes the images use.
    fn key(number: u32, wire: u32, out: &mut Vec<u8>) {
        put_varint(u64::from(number << 3 | wire), out);
    }

    fn put_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(u8::try_from(v & 0x7f).unwrap() | 0x80);
            v >>= 7;
        }
        out.push(u8::try_from(v).unwrap());
    }

    fn num(number: u32, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        key(number, 0, &mut out);
        put_varint(v, &mut out);
        out
    }

    fn len(number: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        key(number, 2, &mut out);
        put_varint(body.len() as u64, &mut out);
        out.extend(body);
        out
    }

    /// An image as CRIU writes it: the head magic (its bytes as in every CRIU image, not our constant),
    /// the image's magic, the entries.
    fn image(dir: &Path, name: &str, magic: u32, entries: &[Vec<u8>]) {
        let mut data = b"\x19\x43\x56\x54".to_vec();
        data.extend(magic.to_le_bytes());
        for entry in entries {
            data.extend(u32::try_from(entry.len()).unwrap().to_le_bytes());
            data.extend(entry);
        }
        std::fs::write(dir.join(name), data).unwrap();
    }

    /// A core entry: an architecture (1), a `thread_info` (2) that is skipped, and a task core (3) with the
    /// task state (1) among other fields, as CRIU writes them.
    fn core(state: Option<u64>) -> Vec<u8> {
        let mut entry = num(1, 1);
        entry.extend(len(2, &[8, 1, 16, 2]));
        if let Some(state) = state {
            let mut tc = num(1, state);
            tc.extend(num(2, 0));
            tc.extend(len(3, b"python3"));
            tc.extend(num(21, 19));
            entry.extend(len(3, &tc));
        }
        entry
    }

    #[test]
    fn stopped_processes_are_read_from_their_core_images_and_threads_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        image(dir.path(), "core-1.img", CORE_MAGIC, &[core(Some(1))]);
        image(dir.path(), "core-2.img", CORE_MAGIC, &[core(Some(1))]);
        image(dir.path(), "core-3.img", CORE_MAGIC, &[core(Some(TASK_STOPPED))]);
        // A thread of process 2: no task core.
        image(dir.path(), "core-4.img", CORE_MAGIC, &[core(None)]);
        image(dir.path(), "pstree.img", 0x5027_3030, &[num(1, 1)]);
        assert_eq!(stopped_tasks(dir.path()).unwrap(), HashSet::from([3]));
    }

    #[test]
    fn a_broken_core_image_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("core-7.img"), b"garbage").unwrap();
        let error = stopped_tasks(dir.path()).unwrap_err().to_string();
        assert!(error.contains("core-7.img") && error.contains("not an image"), "{error}");
        image(dir.path(), "core-7.img", CORE_MAGIC, &[core(Some(1))]);
        let mut cut = std::fs::read(dir.path().join("core-7.img")).unwrap();
        cut.truncate(cut.len() - 3);
        std::fs::write(dir.path().join("core-7.img"), cut).unwrap();
        let error = stopped_tasks(dir.path()).unwrap_err().to_string();
        assert!(error.contains("core-7.img") && error.contains("cut"), "{error}");
    }

    /// A regular file entry (type 1) with its id, and a `reg_file_entry` with id (1), flags (2), pos (3), fown
    /// (5) and name (6).
    fn file(id: u64, name: &str) -> Vec<u8> {
        let mut reg = num(1, id);
        reg.extend(num(2, 0o100_002));
        reg.extend(num(3, 0));
        reg.extend(len(5, &num(1, 0)));
        reg.extend(len(6, name.as_bytes()));
        let mut entry = num(1, REGULAR_FILE);
        entry.extend(num(2, id));
        entry.extend(len(3, &reg));
        entry
    }

    fn remap(orig: u64, remap: u64, kind: Option<u64>) -> Vec<u8> {
        let mut entry = num(1, orig);
        entry.extend(num(2, remap));
        if let Some(kind) = kind {
            entry.extend(num(3, kind));
        }
        entry
    }

    #[test]
    fn link_remaps_are_the_names_of_linked_remaps_only() {
        let dir = tempfile::tempdir().unwrap();
        assert!(link_remaps(dir.path()).unwrap().is_empty(), "no remap image: nothing to remove");
        image(
            dir.path(),
            "files.img",
            FILES_MAGIC,
            &[file(5, "/home/u/data"), file(19, "/home/u/link_remap.19"), file(20, "/tmp/link_remap.20")],
        );
        image(
            dir.path(),
            "remap-fpath.img",
            REMAP_FPATH_MAGIC,
            // Linked, a ghost (its id is a ghost file's, not a file's), and an old-style linked remap.
            &[remap(5, 19, Some(LINKED)), remap(6, 5, Some(1)), remap(7, 20, None)],
        );
        assert_eq!(
            link_remaps(dir.path()).unwrap(),
            [PathBuf::from("/home/u/link_remap.19"), PathBuf::from("/tmp/link_remap.20")]
        );
    }
}
