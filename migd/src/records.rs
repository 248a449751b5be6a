//! Home records: what the home node knows about every job homed there.
//!
//! A job started with `mosrun` keeps its home node for life, while the job itself may run anywhere in the
//! cluster. `migrate`, `mosctl` and `mtop` name a job by its *home PID* (the PID of its deputy, the `mosrun`
//! process on the home node), so the home node's migd must always be able to answer "where is job N now,
//! in which state, owned by whom". That answer must outlive migd itself: after a migd restart (crash,
//! upgrade) the jobs running on other nodes still exist and their deputies still wait at home, so the
//! records are kept on disk and reloaded by [`RecordStore::open`].
//!
//! The store is a directory with one JSON file per job, `<home PID>.json`. One file per record keeps every
//! update O(1) and independent of the other jobs, and a damaged file costs one record, not the store. An
//! update writes a temporary file in the same directory, fsyncs it, renames it over the record and fsyncs
//! the directory, so a crash at any point leaves either the old or the new record on disk, never a torn
//! one. Each file carries a `format_version`, so a migd meeting records written by a different version
//! reports them instead of misreading them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rmosix_common::NodeId;
use serde::{Deserialize, Serialize};

/// Version of the on-disk record format. Any change to [`JobRecord`] or [`JobState`] as serialized
/// (a field added, renamed or retyped, a state added) must bump it: records are decoded strictly, and a
/// file of another version is reported by [`RecordStore::open`] rather than guessed at.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this version still reads: version 1 lacks `stay_home`, which it reads as false.
pub const OLDEST_READABLE: u32 = 1;

/// Mode of the records directory: the records hold command lines (which may carry secrets) and only migd
/// (root) should read or replace them.
const DIR_MODE: u32 = 0o700;

/// Mode of each record file, for the same reason as [`DIR_MODE`].
const FILE_MODE: u32 = 0o600;

/// Suffix of a record file, after the home PID.
const RECORD_SUFFIX: &str = ".json";

/// Suffix of the temporary file an update is written to before it is renamed over the record.
const TEMP_SUFFIX: &str = ".json.tmp";

/// Where a job is in its life, as the home node last knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobState {
    /// `mosrun` asked for the job, and it is being set up; it has not run user code yet.
    Starting,
    /// The job runs on [`JobRecord::node`].
    Running,
    /// The job is being checkpointed on [`JobRecord::node`] to be restored on node `to`. If migd restarts
    /// in this state, the migration's outcome must be found out from the two nodes.
    Migrating {
        /// The destination node of the migration under way.
        to: NodeId,
    },
    /// The job has ended and its deputy was told.
    Exited {
        /// The job's exit status as a shell reports it: the exit code, or 128 + the signal number when
        /// a signal killed it.
        code: i32,
    },
    /// The job can no longer be reached or restored (its node died, a migration failed beyond repair).
    Lost {
        /// What happened, for `mosctl` and the logs.
        reason: String,
    },
}

impl JobState {
    /// Whether the job has ended, one way or another: its record is then kept only for reporting, and
    /// [`RecordStore::insert`] may replace it when the OS hands its home PID to a new `mosrun`.
    pub fn has_ended(&self) -> bool {
        matches!(self, Self::Exited { .. } | Self::Lost { .. })
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Starting => f.write_str("starting"),
            Self::Running => f.write_str("running"),
            Self::Migrating { to } => write!(f, "migrating to node {to}"),
            Self::Exited { code } => write!(f, "exited with status {code}"),
            Self::Lost { reason } => write!(f, "lost ({reason})"),
        }
    }
}

/// The home node's record of one job homed there.
///
/// Text fields are kept as lossy UTF-8 (see [`JobRecord::lossy_command`] and [`JobRecord::lossy_path`]):
/// the record is for naming and showing the job, not for running it (the checkpoint image carries the
/// exact bytes), and JSON strings must be UTF-8.
///
/// Times are kept to the millisecond, as on disk; [`RecordStore`] rounds them down when it stores a record,
/// so a record read back compares equal to the one in memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    /// PID of the job's deputy (`mosrun`) on the home node: the job's name for the tools, and the key of
    /// the store.
    pub home_pid: i32,
    /// User id the job runs as; the tools let only this user (or root) act on the job.
    pub uid: u32,
    /// Group id the job runs as, restored with it on every node.
    pub gid: u32,
    /// Program and arguments as given to `mosrun`, lossy UTF-8.
    pub command: Vec<String>,
    /// Working directory the job was started in, lossy UTF-8.
    pub cwd: String,
    /// Node the job runs on now (the home node itself until it first migrates; the source node while
    /// [`JobState::Migrating`]).
    pub node: NodeId,
    /// Host PID, on [`JobRecord::node`], of the job's init process; what that node's migd signals and
    /// checkpoints.
    pub node_pid: i32,
    /// Where the job is in its life.
    pub state: JobState,
    /// How many times the job has moved, for `mtop` and to tell a ping-ponging job.
    pub migrations: u32,
    /// When `mosrun` started the job.
    #[serde(rename = "started_at_ms", with = "epoch_ms")]
    pub started_at: SystemTime,
    /// When the record last changed; stamped by [`RecordStore`] on every write.
    #[serde(rename = "updated_at_ms", with = "epoch_ms")]
    pub updated_at: SystemTime,
    /// Started to stay on its home node (`mosrun -h`); kept so a deputy that reattaches keeps it. New in
    /// version 2.
    #[serde(default)]
    pub stay_home: bool,
}

impl JobRecord {
    /// A command line as kept in a record: each argument converted to UTF-8, invalid sequences replaced
    /// by U+FFFD.
    pub fn lossy_command<I>(argv: I) -> Vec<String>
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        argv.into_iter().map(|arg| arg.as_ref().to_string_lossy().into_owned()).collect()
    }

    /// A path as kept in a record: converted to UTF-8, invalid sequences replaced by U+FFFD.
    pub fn lossy_path(path: &Path) -> String {
        path.to_string_lossy().into_owned()
    }
}

/// A record file as written: the version first, so it can be checked before the record is decoded.
#[derive(Serialize)]
struct OnDiskRef<'a> {
    format_version: u32,
    record: &'a JobRecord,
}

/// A record file as read, once its version is known to be [`FORMAT_VERSION`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    #[expect(dead_code, reason = "checked through VersionProbe before the whole file is decoded")]
    format_version: u32,
    record: JobRecord,
}

/// Reads only the version of a record file, whatever else it holds, so a file of another version is
/// reported as such rather than as corrupt.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

/// Errors of the home records. Each names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The records directory could not be created, or its mode set to 0700.
    #[error("cannot prepare the records directory {path} (mode 0700)")]
    PrepareDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The records path exists but is not a directory (a symbolic link is refused too).
    #[error("records path {path} is not a directory")]
    NotADirectory { path: PathBuf },
    /// Another process (another migd) holds the records directory.
    #[error("records directory {path} is in use by another process (is another migd running?)")]
    Locked { path: PathBuf },
    /// The records directory could not be opened or locked.
    #[error("cannot open and lock the records directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The records directory could not be listed.
    #[error("cannot list the records directory {path}")]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record file could not be read.
    #[error("cannot read job record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record file is not a record: not JSON, or not of the shape of its version.
    #[error("job record {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A record file was written in another format version.
    #[error("job record {path} has format version {found}; this migd reads versions 1 to {expected}")]
    UnsupportedVersion { path: PathBuf, found: u32, expected: u32 },
    /// A record file holds the record of another job than its name says.
    #[error("job record {path} holds home PID {found}, not the one its file name says")]
    PidMismatch { path: PathBuf, found: i32 },
    /// A temporary file left by a crash could not be removed.
    #[error("cannot remove the stale temporary record {path}")]
    RemoveTemp {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A home PID that no process can have (zero or negative).
    #[error("home PID {home_pid} is not a process id; no record {path} is kept for it")]
    InvalidPid { home_pid: i32, path: PathBuf },
    /// A record could not be serialized.
    #[error("cannot encode the record of job {home_pid} for {path}")]
    Encode {
        home_pid: i32,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be written durably (the temporary file, its fsync, the rename).
    #[error("cannot write job record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The directory could not be fsynced after a rename or removal, so the change may not survive a
    /// crash.
    #[error("cannot sync the records directory {path}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A record file could not be removed.
    #[error("cannot remove job record {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A job with this home PID is recorded and has not ended: the new record was not stored.
    #[error("job {home_pid} is already recorded in {path} and is still {state}")]
    StillLive { home_pid: i32, path: PathBuf, state: JobState },
    /// No job is recorded with this home PID.
    #[error("no job {home_pid} is recorded (no {path})")]
    NotFound { home_pid: i32, path: PathBuf },
    /// An update tried to change the record's home PID, which is its key: nothing was stored.
    #[error("the update of job record {path} changed its home PID to {new}; not stored")]
    HomePidChanged { path: PathBuf, new: i32 },
}

/// The home records of this node, kept in a directory.
///
/// Internally synchronized: every method takes `&self`, so the store can be shared (in an `Arc`) by the
/// tasks of migd. A write holds the store's lock while it fsyncs, so writes are serialized, and the order
/// of two updates of a record is the same in memory and on disk. The methods block on disk I/O; async
/// code calls them from `spawn_blocking` or a thread of its own.
///
/// Reads ([`get`](Self::get), [`list`](Self::list)) are served from memory, loaded at
/// [`open`](Self::open) and kept in step with the files: a write that fails leaves the memory as it was,
/// unless only the final fsync of the directory failed, when the new file is already in place and the
/// memory follows it.
///
/// The directory is locked (`flock`) for as long as the store is open, so two migds never share it and
/// the cleanup of temporary files at open cannot race a writer.
#[derive(Debug)]
pub struct RecordStore {
    /// The records directory.
    dir: PathBuf,
    /// The open directory: locked for the store's life, and fsynced after each rename or removal so the
    /// change of the directory entry is durable.
    dir_handle: Flock<File>,
    /// Every record that loaded, by home PID (so listing is sorted).
    records: Mutex<BTreeMap<i32, JobRecord>>,
    /// What went wrong while loading, kept for the caller to show.
    problems: Vec<RecordsError>,
}

impl RecordStore {
    /// Opens the records in `dir`, creating the directory (and its parents) with mode 0700 if missing,
    /// and setting an existing one to 0700.
    ///
    /// Every record file is loaded. A file that cannot be read or decoded, or is of another format
    /// version, is logged, left in place for inspection, and listed in [`problems`](Self::problems); the
    /// other records load regardless. Temporary files left by a crash in the middle of a write are
    /// removed (the record they were replacing is intact). Other files are ignored.
    ///
    /// Fails if the directory cannot be prepared, locked or listed, or if another process holds it.
    pub fn open(dir: &Path) -> Result<Self, RecordsError> {
        prepare_dir(dir)?;
        let dir_handle = lock_dir(dir)?;
        let entries = fs::read_dir(dir).map_err(|source| RecordsError::ListDir { path: dir.to_owned(), source })?;
        let mut records = BTreeMap::new();
        let mut problems = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| RecordsError::ListDir { path: dir.to_owned(), source })?;
            let path = entry.path();
            let loaded = match classify(&entry.file_name()) {
                Entry::Record(home_pid) => load_record(&path, home_pid).map(|record| {
                    records.insert(home_pid, record);
                }),
                Entry::Temp => remove_temp(&path),
                Entry::Other => {
                    tracing::debug!(path = %path.display(), "ignoring a file that is not a job record");
                    Ok(())
                }
            };
            if let Err(problem) = loaded {
                tracing::warn!(error = %error_chain(&problem), "skipping a job record");
                problems.push(problem);
            }
        }
        tracing::info!(dir = %dir.display(), records = records.len(), problems = problems.len(), "home records loaded");
        Ok(Self { dir: dir.to_owned(), dir_handle, records: Mutex::new(records), problems })
    }

    /// The records directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What went wrong while loading at [`open`](Self::open): record files that were skipped, and
    /// temporary files that could not be removed.
    pub fn problems(&self) -> &[RecordsError] {
        &self.problems
    }

    /// Stores the record of a new job, durably, stamping its `updated_at`.
    ///
    /// The OS reuses PIDs, so a new `mosrun` may get the home PID of an earlier job. If that job has
    /// ended ([`JobState::has_ended`]) its record is replaced and returned. If it has not, the new record
    /// is refused with [`RecordsError::StillLive`]: the old record may describe a job still running
    /// elsewhere, and it is for the caller to settle its fate (mark it lost, say) before reusing the PID.
    pub fn insert(&self, mut record: JobRecord) -> Result<Option<JobRecord>, RecordsError> {
        let home_pid = record.home_pid;
        let path = self.record_path(home_pid)?;
        let mut records = self.lock();
        if let Some(old) = records.get(&home_pid)
            && !old.state.has_ended()
        {
            return Err(RecordsError::StillLive { home_pid, path, state: old.state.clone() });
        }
        record.started_at = whole_millis(record.started_at);
        record.updated_at = whole_millis(SystemTime::now());
        let written = self.write(&record);
        let replaced = if published(&written) { records.insert(home_pid, record) } else { None };
        written?;
        if let Some(old) = &replaced {
            tracing::info!(pid = home_pid, old_state = %old.state, "home PID reused: replaced the record of an ended job");
        }
        Ok(replaced)
    }

    /// Changes the record of job `home_pid` with `change`, durably, and returns what `change` returned.
    ///
    /// `change` works on a copy: the record in memory is replaced only once the new one is on disk, so
    /// a failed write leaves both as they were. If `change` leaves the record as it was, nothing is
    /// written (so a closure may decline to change a record it finds in an unexpected state);
    /// otherwise `updated_at` is stamped. `change` must not alter `home_pid`.
    pub fn update<T>(&self, home_pid: i32, change: impl FnOnce(&mut JobRecord) -> T) -> Result<T, RecordsError> {
        let path = self.record_path(home_pid)?;
        let mut records = self.lock();
        let Some(old) = records.get(&home_pid) else {
            return Err(RecordsError::NotFound { home_pid, path });
        };
        let mut record = old.clone();
        let result = change(&mut record);
        if record.home_pid != home_pid {
            return Err(RecordsError::HomePidChanged { path, new: record.home_pid });
        }
        record.started_at = whole_millis(record.started_at);
        if record == *old {
            return Ok(result);
        }
        record.updated_at = whole_millis(SystemTime::now());
        let written = self.write(&record);
        if published(&written) {
            records.insert(home_pid, record);
        }
        written.map(|()| result)
    }

    /// The record of job `home_pid`, if there is one.
    pub fn get(&self, home_pid: i32) -> Option<JobRecord> {
        self.lock().get(&home_pid).cloned()
    }

    /// Deletes the record of job `home_pid`, durably, and returns it; `Ok(None)` if there was none.
    pub fn remove(&self, home_pid: i32) -> Result<Option<JobRecord>, RecordsError> {
        let path = self.record_path(home_pid)?;
        let mut records = self.lock();
        if !records.contains_key(&home_pid) {
            return Ok(None);
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            // Already gone from disk: the goal is reached.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(RecordsError::Remove { path, source }),
        }
        let removed = records.remove(&home_pid);
        self.sync_dir()?;
        Ok(removed)
    }

    /// Every record, sorted by home PID.
    pub fn list(&self) -> Vec<JobRecord> {
        self.lock().values().cloned().collect()
    }

    /// The lock of the records in memory. A panic while it was held cannot have left them half-changed
    /// (a new record replaces the old only after its write succeeded), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<i32, JobRecord>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The file of job `home_pid`, or an error if no process can have that PID (its file would be
    /// skipped when loading).
    fn record_path(&self, home_pid: i32) -> Result<PathBuf, RecordsError> {
        let path = self.dir.join(format!("{home_pid}{RECORD_SUFFIX}"));
        if home_pid <= 0 {
            return Err(RecordsError::InvalidPid { home_pid, path });
        }
        Ok(path)
    }

    /// Writes `record` over its file so that a crash leaves the old or the new file, whole: temporary
    /// file in the same directory (same file system, so the rename is atomic), fsync, rename, fsync of
    /// the directory. Called with the records locked, so no two writers share the temporary file.
    fn write(&self, record: &JobRecord) -> Result<(), RecordsError> {
        let home_pid = record.home_pid;
        let path = self.record_path(home_pid)?;
        let temp = self.dir.join(format!("{home_pid}{TEMP_SUFFIX}"));
        let mut bytes = serde_json::to_vec_pretty(&OnDiskRef { format_version: FORMAT_VERSION, record })
            .map_err(|source| RecordsError::Encode { home_pid, path: path.clone(), source })?;
        bytes.push(b'\n');
        let written = write_synced(&temp, &bytes).and_then(|()| fs::rename(&temp, &path));
        if let Err(source) = written {
            // Best effort: a temporary file left here is removed at the next open anyway.
            let _ = fs::remove_file(&temp);
            return Err(RecordsError::Write { path, source });
        }
        self.sync_dir()
    }

    /// Makes the last rename or removal in the directory durable.
    fn sync_dir(&self) -> Result<(), RecordsError> {
        self.dir_handle.sync_all().map_err(|source| RecordsError::SyncDir { path: self.dir.clone(), source })
    }
}

/// Whether the result of [`RecordStore::write`] means the new file replaced the old one: it did, or only
/// the fsync of the directory after the rename failed.
fn published(written: &Result<(), RecordsError>) -> bool {
    matches!(written, Ok(()) | Err(RecordsError::SyncDir { .. }))
}

/// What a directory entry is, by its name.
enum Entry {
    /// `<home PID>.json`.
    Record(i32),
    /// `<home PID>.json.tmp`, a write that a crash interrupted.
    Temp,
    /// Anything else.
    Other,
}

fn classify(name: &OsStr) -> Entry {
    let Some(name) = name.to_str() else {
        return Entry::Other;
    };
    if name.strip_suffix(TEMP_SUFFIX).and_then(parse_pid).is_some() {
        return Entry::Temp;
    }
    match name.strip_suffix(RECORD_SUFFIX).and_then(parse_pid) {
        Some(pid) => Entry::Record(pid),
        None => Entry::Other,
    }
}

/// A positive PID written the way the store writes it (no sign, no leading zero), so that exactly one
/// file name maps to each PID.
fn parse_pid(text: &str) -> Option<i32> {
    let pid: i32 = text.parse().ok()?;
    (pid > 0 && pid.to_string() == text).then_some(pid)
}

/// Creates `dir` with mode 0700 if missing, and leaves it (or an existing one) with exactly that mode.
fn prepare_dir(dir: &Path) -> Result<(), RecordsError> {
    let prepare = |source| RecordsError::PrepareDir { path: dir.to_owned(), source };
    let not_a_directory = || RecordsError::NotADirectory { path: dir.to_owned() };
    if let Err(error) = DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir) {
        return Err(match fs::symlink_metadata(dir) {
            Ok(metadata) if !metadata.is_dir() => not_a_directory(),
            _ => prepare(error),
        });
    }
    let metadata = fs::symlink_metadata(dir).map_err(prepare)?;
    if !metadata.is_dir() {
        return Err(not_a_directory());
    }
    let mode = metadata.permissions().mode() & 0o7777;
    if mode != DIR_MODE {
        // A fresh directory may lack bits through the umask; an existing one may have too many.
        if mode & !DIR_MODE != 0 {
            tracing::warn!(dir = %dir.display(), mode = format_args!("{mode:o}"), "records directory was open to others; setting it to 0700");
        }
        fs::set_permissions(dir, Permissions::from_mode(DIR_MODE)).map_err(prepare)?;
    }
    Ok(())
}

/// Opens `dir` (not following a symbolic link) and takes its exclusive lock without waiting.
fn lock_dir(dir: &Path) -> Result<Flock<File>, RecordsError> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| RecordsError::Lock { path: dir.to_owned(), source })?;
    Flock::lock(handle, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        Errno::EWOULDBLOCK => RecordsError::Locked { path: dir.to_owned() },
        errno => RecordsError::Lock { path: dir.to_owned(), source: errno.into() },
    })
}

/// Reads and decodes the record file `path`, which its name says holds job `home_pid`.
fn load_record(path: &Path, home_pid: i32) -> Result<JobRecord, RecordsError> {
    let bytes = fs::read(path).map_err(|source| RecordsError::Read { path: path.to_owned(), source })?;
    let corrupt = |source| RecordsError::Corrupt { path: path.to_owned(), source };
    let probe: VersionProbe = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if !(OLDEST_READABLE..=FORMAT_VERSION).contains(&probe.format_version) {
        return Err(RecordsError::UnsupportedVersion {
            path: path.to_owned(),
            found: probe.format_version,
            expected: FORMAT_VERSION,
        });
    }
    let on_disk: OnDisk = serde_json::from_slice(&bytes).map_err(corrupt)?;
    if on_disk.record.home_pid != home_pid {
        return Err(RecordsError::PidMismatch { path: path.to_owned(), found: on_disk.record.home_pid });
    }
    Ok(on_disk.record)
}

/// Removes a temporary file left by a crash: the rename that would have published it never happened,
/// so the record it was meant to replace is still whole.
fn remove_temp(path: &Path) -> Result<(), RecordsError> {
    match fs::remove_file(path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "removed a temporary record left by an interrupted write");
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordsError::RemoveTemp { path: path.to_owned(), source }),
    }
}

/// Creates (or truncates) `path` with mode 0600, writes `bytes` and fsyncs them.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// An error and its causes on one line, for the logs.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Milliseconds since the epoch; a time before the epoch (a clock gone badly wrong) counts as 0.
fn to_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// The time `millis` after the epoch, if the platform can represent it.
fn from_millis(millis: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

/// `time` rounded down to the millisecond, as it will read back from disk.
fn whole_millis(time: SystemTime) -> SystemTime {
    from_millis(to_millis(time)).unwrap_or(time)
}

/// (De)serializes a [`SystemTime`] as whole milliseconds since the epoch.
mod epoch_ms {
    use std::time::SystemTime;

    use serde::de::Error as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(super::to_millis(*time))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let millis = u64::deserialize(deserializer)?;
        super::from_millis(millis)
            .ok_or_else(|| D::Error::custom(format!("time {millis} ms after the epoch is out of range")))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;

    use super::*;

    /// Waits until the wall clock, in the whole milliseconds records keep, is past `time`: a write after
    /// this stamps a later time than one before.
    fn clock_passes(time: SystemTime) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while whole_millis(SystemTime::now()) <= time {
            assert!(std::time::Instant::now() < deadline, "the wall clock did not pass {time:?}");
            std::thread::yield_now();
        }
    }

    fn record(home_pid: i32) -> JobRecord {
        JobRecord {
            home_pid,
            uid: 1000,
            gid: 100,
            command: JobRecord::lossy_command(["./simulation", "--steps", "1000"]),
            cwd: JobRecord::lossy_path(Path::new("/home/ada/run")),
            node: NodeId(1),
            node_pid: home_pid + 1,
            state: JobState::Running,
            migrations: 0,
            started_at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            updated_at: UNIX_EPOCH,
            stay_home: false,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        assert!(store.list().is_empty());
        assert_eq!(store.insert(record(42)).unwrap(), None);
        let stored = store.get(42).unwrap();
        assert_eq!(JobRecord { updated_at: UNIX_EPOCH, ..stored.clone() }, record(42));
        assert!(stored.updated_at > UNIX_EPOCH, "insert stamps updated_at");
        assert_eq!(store.get(43), None);
        assert_eq!(file_names(scratch.path()), ["42.json"]);
        assert_eq!(mode_of(&scratch.path().join("42.json")), 0o600);
    }

    #[test]
    fn records_survive_a_restart() {
        let scratch = tempfile::tempdir().unwrap();
        let before = {
            let store = RecordStore::open(scratch.path()).unwrap();
            for pid in [300, 7, 45] {
                store.insert(record(pid)).unwrap();
            }
            store.update(45, |r| r.state = JobState::Migrating { to: NodeId(9) }).unwrap();
            store.list()
        };
        let store = RecordStore::open(scratch.path()).unwrap();
        assert!(store.problems().is_empty(), "{:?}", store.problems());
        let after = store.list();
        assert_eq!(after, before);
        assert_eq!(after.iter().map(|r| r.home_pid).collect::<Vec<_>>(), [7, 45, 300], "sorted by home PID");
        assert_eq!(after[1].state, JobState::Migrating { to: NodeId(9) });
    }

    #[test]
    fn update_is_applied_and_persisted() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        store.insert(record(10)).unwrap();
        let stamped = store.get(10).unwrap().updated_at;
        clock_passes(stamped);
        let migrations = store
            .update(10, |r| {
                r.node = NodeId(4);
                r.node_pid = 9999;
                r.migrations += 1;
                r.migrations
            })
            .unwrap();
        assert_eq!(migrations, 1);
        let updated = store.get(10).unwrap();
        assert_eq!((updated.node, updated.node_pid, updated.migrations), (NodeId(4), 9999, 1));
        assert!(updated.updated_at > stamped, "update stamps updated_at");
        drop(store);
        assert_eq!(RecordStore::open(scratch.path()).unwrap().get(10).unwrap(), updated);
    }

    #[test]
    fn update_without_change_writes_nothing() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        store.insert(record(10)).unwrap();
        let before = store.get(10).unwrap();
        clock_passes(before.updated_at);
        let declined = store.update(10, |r| r.state.has_ended()).unwrap();
        assert!(!declined);
        assert_eq!(store.get(10).unwrap(), before, "updated_at is not bumped for no change");
    }

    #[test]
    fn update_of_missing_or_rekeyed_record_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        let err = store.update(10, |r| r.migrations += 1).unwrap_err();
        assert!(matches!(err, RecordsError::NotFound { home_pid: 10, .. }), "{err}");
        assert!(err.to_string().contains(&scratch.path().join("10.json").display().to_string()), "{err}");

        store.insert(record(10)).unwrap();
        let before = store.get(10).unwrap();
        let err = store.update(10, |r| r.home_pid = 11).unwrap_err();
        assert!(matches!(err, RecordsError::HomePidChanged { new: 11, .. }), "{err}");
        assert_eq!(store.get(10).unwrap(), before);
        assert_eq!(store.get(11), None);
        assert_eq!(file_names(scratch.path()), ["10.json"]);
    }

    #[test]
    fn corrupt_records_are_reported_and_skipped() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        {
            let store = RecordStore::open(dir).unwrap();
            store.insert(record(1)).unwrap();
            store.insert(record(2)).unwrap();
            store.insert(record(6)).unwrap();
        }
        // A torn file, not JSON at all.
        fs::write(dir.join("3.json"), b"{\"format_version\":1,\"record\":{\"home_pid\":3,\"ui").unwrap();
        fs::write(dir.join("4.json"), b"\x00\xff garbage").unwrap();
        // A record from a future migd.
        let six = fs::read_to_string(dir.join("6.json")).unwrap();
        fs::write(dir.join("5.json"), six.replace("\"format_version\": 2", "\"format_version\": 3").replace('6', "5"))
            .unwrap();
        // The right version, but a field missing.
        fs::write(dir.join("6.json"), six.replace("\"migrations\": 0,", "")).unwrap();
        // Another job's record under this name.
        fs::write(dir.join("8.json"), fs::read(dir.join("1.json")).unwrap()).unwrap();
        // Not records at all: ignored.
        fs::write(dir.join("notes.txt"), b"hello").unwrap();
        fs::write(dir.join("007.json"), b"{}").unwrap();

        let store = RecordStore::open(dir).unwrap();
        assert_eq!(store.list(), [store.get(1).unwrap(), store.get(2).unwrap()]);
        let mut problems: Vec<(String, &RecordsError)> = store
            .problems()
            .iter()
            .map(|problem| {
                let path = match problem {
                    RecordsError::Corrupt { path, .. }
                    | RecordsError::UnsupportedVersion { path, .. }
                    | RecordsError::PidMismatch { path, .. } => path,
                    other => panic!("unexpected problem {other}"),
                };
                assert!(problem.to_string().contains(&path.display().to_string()), "{problem}");
                (path.file_name().unwrap().to_str().unwrap().to_owned(), problem)
            })
            .collect();
        problems.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = problems.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["3.json", "4.json", "5.json", "6.json", "8.json"]);
        assert!(matches!(problems[0].1, RecordsError::Corrupt { .. }));
        assert!(matches!(problems[1].1, RecordsError::Corrupt { .. }));
        assert!(matches!(problems[2].1, RecordsError::UnsupportedVersion { found: 3, expected: 2, .. }));
        assert!(matches!(problems[3].1, RecordsError::Corrupt { .. }));
        assert!(matches!(problems[4].1, RecordsError::PidMismatch { found: 1, .. }));
        // Left in place for inspection.
        assert!(dir.join("3.json").exists() && dir.join("5.json").exists());
    }

    #[test]
    fn leftover_temp_file_is_removed_on_open() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path();
        {
            let store = RecordStore::open(dir).unwrap();
            store.insert(record(5)).unwrap();
        }
        // A crash between the write of the temporary file and the rename.
        fs::write(dir.join("5.json.tmp"), b"{\"format_version\":1,\"rec").unwrap();
        fs::write(dir.join("6.json.tmp"), b"").unwrap();
        let store = RecordStore::open(dir).unwrap();
        assert!(store.problems().is_empty(), "{:?}", store.problems());
        assert_eq!(file_names(dir), ["5.json"]);
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.get(5).unwrap().command, ["./simulation", "--steps", "1000"]);
    }

    #[test]
    fn insert_over_live_record_is_refused_over_ended_allowed() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        store.insert(record(77)).unwrap();
        let mut newer = record(77);
        newer.command = vec!["./other".to_owned()];
        for live in [JobState::Starting, JobState::Running, JobState::Migrating { to: NodeId(2) }] {
            store.update(77, |r| r.state = live.clone()).unwrap();
            let err = store.insert(newer.clone()).unwrap_err();
            assert!(matches!(&err, RecordsError::StillLive { home_pid: 77, state, .. } if *state == live), "{err}");
            assert_eq!(store.get(77).unwrap().state, live, "the live record is kept");
        }
        for ended in [JobState::Exited { code: 0 }, JobState::Lost { reason: "node 3 died".to_owned() }] {
            store.update(77, |r| r.state = ended.clone()).unwrap();
            let replaced = store.insert(newer.clone()).unwrap().unwrap();
            assert_eq!(replaced.state, ended);
            assert_eq!(store.get(77).unwrap().command, ["./other"]);
        }
        drop(store);
        let store = RecordStore::open(scratch.path()).unwrap();
        assert_eq!(store.get(77).unwrap().command, ["./other"], "the replacement is on disk");
    }

    #[test]
    fn remove_deletes_the_file() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        store.insert(record(12)).unwrap();
        store.insert(record(13)).unwrap();
        assert_eq!(store.remove(12).unwrap().unwrap().home_pid, 12);
        assert_eq!(store.remove(12).unwrap(), None);
        assert_eq!(store.get(12), None);
        assert_eq!(file_names(scratch.path()), ["13.json"]);
        drop(store);
        assert_eq!(RecordStore::open(scratch.path()).unwrap().list().len(), 1);
    }

    #[test]
    fn invalid_home_pid_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        for pid in [0, -1] {
            let err = store.insert(record(pid)).unwrap_err();
            assert!(matches!(err, RecordsError::InvalidPid { home_pid, .. } if home_pid == pid), "{err}");
        }
        assert!(file_names(scratch.path()).is_empty());
    }

    #[test]
    fn directory_is_created_and_kept_private() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("var/lib/rmosix/records");
        drop(RecordStore::open(&dir).unwrap());
        assert_eq!(mode_of(&dir), 0o700);
        fs::set_permissions(&dir, Permissions::from_mode(0o755)).unwrap();
        drop(RecordStore::open(&dir).unwrap());
        assert_eq!(mode_of(&dir), 0o700, "an existing directory open to others is tightened");

        let file = scratch.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(RecordStore::open(&file).unwrap_err(), RecordsError::NotADirectory { .. }));
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let scratch = tempfile::tempdir().unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        let err = RecordStore::open(scratch.path()).unwrap_err();
        assert!(matches!(err, RecordsError::Locked { .. }), "{err}");
        drop(store);
        RecordStore::open(scratch.path()).unwrap();
    }

    #[test]
    fn concurrent_updates_are_all_applied() {
        const THREADS: u32 = 8;
        const ROUNDS: u32 = 25;
        let scratch = tempfile::tempdir().unwrap();
        let store = Arc::new(RecordStore::open(scratch.path()).unwrap());
        store.insert(record(1)).unwrap();
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let own = i32::try_from(thread).unwrap() + 100;
                    store.insert(record(own)).unwrap();
                    for _ in 0..ROUNDS {
                        store.update(1, |r| r.migrations += 1).unwrap();
                        store.update(own, |r| r.migrations += 1).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let check = |store: &RecordStore| {
            assert_eq!(store.get(1).unwrap().migrations, THREADS * ROUNDS);
            assert_eq!(store.list().len(), 1 + THREADS as usize);
            assert!(store.list().iter().skip(1).all(|r| r.migrations == ROUNDS));
        };
        check(&store);
        drop(store);
        check(&RecordStore::open(scratch.path()).unwrap());
        assert_eq!(file_names(scratch.path()).len(), 1 + THREADS as usize, "no temporary file left");
    }

    /// The version-1 format, written out: if this stops decoding, the format changed and
    /// [`FORMAT_VERSION`] must be bumped.
    #[test]
    fn version_1_format_is_stable() {
        let text = r#"{
  "format_version": 1,
  "record": {
    "home_pid": 4242,
    "uid": 1000,
    "gid": 100,
    "command": ["./simulation", "--steps", "1000"],
    "cwd": "/home/ada/run",
    "node": 3,
    "node_pid": 81,
    "state": { "kind": "migrating", "to": 7 },
    "migrations": 2,
    "started_at_ms": 1700000000123,
    "updated_at_ms": 1700000060456
  }
}"#;
        let scratch = tempfile::tempdir().unwrap();
        fs::write(scratch.path().join("4242.json"), text).unwrap();
        let store = RecordStore::open(scratch.path()).unwrap();
        assert!(store.problems().is_empty(), "{:?}", store.problems());
        let expected = JobRecord {
            home_pid: 4242,
            node: NodeId(3),
            node_pid: 81,
            state: JobState::Migrating { to: NodeId(7) },
            migrations: 2,
            updated_at: UNIX_EPOCH + Duration::from_millis(1_700_000_060_456),
            ..record(4242)
        };
        assert_eq!(store.get(4242).unwrap(), expected);

        for (state, json) in [
            (JobState::Starting, r#"{"kind":"starting"}"#),
            (JobState::Running, r#"{"kind":"running"}"#),
            (JobState::Exited { code: 137 }, r#"{"kind":"exited","code":137}"#),
            (JobState::Lost { reason: "node 3 died".to_owned() }, r#"{"kind":"lost","reason":"node 3 died"}"#),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), json);
            assert_eq!(serde_json::from_str::<JobState>(json).unwrap(), state);
        }
        assert!(serde_json::from_str::<JobState>(r#"{"kind":"exited","code":0,"extra":1}"#).is_err());
    }

    #[test]
    fn lossy_conversions() {
        use std::os::unix::ffi::OsStrExt as _;
        let arg = OsStr::from_bytes(b"caf\xe9");
        assert_eq!(JobRecord::lossy_command([OsStr::new("./a"), arg]), ["./a", "caf\u{fffd}"]);
        assert_eq!(JobRecord::lossy_path(Path::new(arg)), "caf\u{fffd}");
    }

    #[test]
    fn times_before_the_epoch_or_beyond_range_do_not_panic() {
        assert_eq!(to_millis(UNIX_EPOCH - Duration::from_secs(5)), 0);
        let huge = r#"{"format_version":1,"record":{"home_pid":1,"uid":0,"gid":0,"command":[],"cwd":"/","node":1,"node_pid":2,"state":{"kind":"running"},"migrations":0,"started_at_ms":18446744073709551615,"updated_at_ms":0}}"#;
        // Either representable, and then kept exactly, or a decode error naming the time; never a panic.
        match serde_json::from_str::<OnDisk>(huge) {
            Ok(on_disk) => assert_eq!(to_millis(on_disk.record.started_at), u64::MAX),
            Err(e) => assert!(e.to_string().contains("time 18446744073709551615 ms after the epoch is out of range"), "{e}"),
        }
    }
}
