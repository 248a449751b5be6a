//! [`Probes`]: the eBPF programs of `bpf/probes.bpf.c` loaded and attached, the maps user space shares
//! with them, and the readings that join those maps with `/proc`.
//!
//! # A reading
//!
//! A job's counters are the sum, over its processes, of what their threads used: the threads alive now,
//! read from `/proc` ([`procfs::threads`]), and the threads that exited, which the programs added up as
//! each exited (`process_exits`, per process). Each thread must be counted exactly once, on one side or the
//! other, although it moves from one to the other at any moment. So:
//!
//! 1. The exits are read first.
//! 2. Then the live threads, from `/proc`, skipping those with `PF_EXITING` (or zombies): `do_exit()` sets
//!    it before `sched_process_exit`, so a thread the map has counted is always skipped, and a thread
//!    whose files show no `PF_EXITING` is counted in the map only at a later reading.
//!
//! What can go wrong is on the low side only, and lasts one reading: a thread that begins to exit after
//! the map was read and before its own files are, or that is between `PF_EXITING` and
//! `sched_process_exit` (microseconds) when the map is read, is in neither. Nothing is counted twice.
//!
//! # Ended processes
//!
//! The exit that finds a process's `signal->live` at 0 marks it ended in `watched`. Its entries are
//! collected by user space ([`collect`]) once it has been seen ended for [`COLLECT_AFTER`] (a thread that
//! counted itself out of `signal->live` before the last one may reach `sched_process_exit` after it, by
//! microseconds): its exits move to the job's sums kept here, and it leaves both maps. The programs never
//! delete from a map another program or user space writes, so taking an entry is reading it and deleting
//! it, here. A process that disappeared without being marked (an exit the program did not see) is
//! collected the same way once `/proc` has not shown it for as long.
//!
//! # Counting from the watch
//!
//! The kernel's totals start with each thread, and a process given to [`Probes::watch`] has a past. What
//! it had used by then is its offset, kept here, per process and summed per job, and subtracted from every
//! reading: its threads count from the watch, whether they are alive at a reading or have exited since. A
//! process forked by a watched one has no offset: it counts from its fork.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray};
use aya::programs::{BtfTracePoint, ProgramError, RawTracePoint};
use aya::{Btf, BtfError, Ebpf, EbpfError, EbpfLoader, Pod};

use crate::Counters;
use crate::procfs;
use crate::totals::Totals;

/// The probes built as BTF-typed tracepoints (`tp_btf`), see `build.rs`.
static TP_BTF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.tp_btf.o"));

/// The same probes built as raw tracepoints (`raw_tp`).
static RAW_TP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.raw_tp.o"));

/// How many processes, over all jobs, can be watched at once (`MAX_PROCESSES` in `bpf/probes.h`), alive
/// or ended and not yet collected. [`Probes::watch`] fails beyond it; a fork beyond it goes uncounted and
/// shows in [`Usage::dropped_processes`].
pub const MAX_PROCESSES: usize = 16384;

/// The tracepoints the probes attach to, all rare events. Each program is named after its tracepoint.
const TRACEPOINTS: &[&str] = &["sched_process_fork", "sched_process_exit", "sched_process_free"];

/// How many lines of the verifier's log an error keeps: the reason for a refusal is at its end, and the
/// whole log can run to megabytes.
const VERIFIER_LOG_LINES: usize = 25;

/// How long a process is seen ended, or gone from `/proc`, before its entries are collected: late threads
/// reach `sched_process_exit` within microseconds of the last one.
const COLLECT_AFTER: Duration = Duration::from_secs(1);

/// How the probes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// BTF-enabled raw tracepoints (Linux 5.5+): typed arguments, checked by the verifier. Preferred.
    TpBtf,
    /// Raw tracepoints (Linux 4.17+): the same arguments, untyped. Used when `tp_btf` will not load.
    RawTp,
}

impl Kind {
    /// The embedded object with the programs of this kind.
    fn object(self) -> &'static [u8] {
        match self {
            Kind::TpBtf => TP_BTF_OBJECT,
            Kind::RawTp => RAW_TP_OBJECT,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::TpBtf => "tp_btf",
            Kind::RawTp => "raw_tp",
        })
    }
}

/// `struct watched` of `bpf/probes.h`: a watched process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Watched {
    /// Its job.
    job: u32,
    /// Not 0 once its last thread has begun to exit.
    ended: u32,
    /// Its `signal_struct`, set with `ended`.
    signal: u64,
}

// SAFETY: `repr(C)`, integers only, no implicit padding: every bit pattern is a valid value.
unsafe impl Pod for Watched {}

/// `struct process_exits` of `bpf/probes.h`: the exited threads of one process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ProcessExits {
    /// The process's job when the entry was made.
    job: u32,
    /// Explicit padding, so that the struct has no uninitialised bytes.
    _pad: u32,
    /// Their totals, summed.
    totals: Totals,
}

// SAFETY: as for `Watched`.
unsafe impl Pod for ProcessExits {}

/// Indexes of the `overflows` map (`OVERFLOW_*` in `bpf/probes.h`).
const OVERFLOW_PROCESSES: u32 = 0;
const OVERFLOW_EXITS: u32 = 1;

/// How full the probes' maps are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Processes watched, of [`MAX_PROCESSES`]: live ones, and ended ones not collected yet (a second or
    /// so after they end).
    pub processes: usize,
    /// Threads of the live watched processes that `/proc` lists now. The probes keep no state per live
    /// thread: this is what a reading reads.
    pub threads: usize,
    /// Processes forked by watched ones and left uncounted since the load, because `watched` was full.
    pub dropped_processes: u64,
    /// Thread exits left uncounted since the load, because `process_exits` was full.
    pub dropped_threads: u64,
}

/// The maps shared with the programs, and what user space keeps beside them.
struct Maps {
    /// tgid -> the process's job, and whether it has ended.
    watched: BpfHashMap<MapData, u32, Watched>,
    /// tgid -> the exited threads of a watched process.
    process_exits: BpfHashMap<MapData, u32, ProcessExits>,
    /// Events dropped because a map was full.
    overflows: PerCpuArray<MapData, u64>,
    /// The jobs being watched: what [`Probes::unwatch_job`] has not ended.
    jobs: HashSet<u32>,
    /// Per job, its collected processes: their exits, taken out of the maps.
    collected: HashMap<u32, Totals>,
    /// Processes seen ended or gone, since when: collected [`COLLECT_AFTER`] later.
    ending: HashMap<u32, Instant>,
    /// Per job, the sum of its processes' offsets: what they had used when they were watched.
    job_offsets: HashMap<u32, Totals>,
    /// tgid -> (job, offset), for the live processes given to [`Probes::watch`]; a process's offset stays
    /// in its job's after the process ends.
    process_offsets: HashMap<u32, (u32, Totals)>,
}

/// One reading: totals since each thread started, offsets not yet subtracted.
#[derive(Debug, Default)]
struct Reading {
    /// Live watched processes: tgid -> (job, live threads + exited threads).
    processes: HashMap<u32, (u32, Totals)>,
    /// Watched jobs: job -> its processes, live and ended.
    jobs: HashMap<u32, Totals>,
}

/// The probes, loaded and attached: they follow the processes of watched jobs until dropped.
///
/// Loading needs root (`CAP_BPF` and `CAP_PERFMON`, or `CAP_SYS_ADMIN`) and the kernel's BTF; readings
/// read `/proc/PID/task/TID/io`, which needs the right to trace the process (root, or its owner). All
/// methods take `&self`; the maps are behind a mutex, so one `Probes` can be shared between threads. Read
/// at least every few seconds: ended processes are collected at readings (and by [`Probes::usage`]), and
/// until then they hold their place in the maps.
pub struct Probes {
    /// How the programs are attached.
    kind: Kind,
    /// The maps, and what is kept beside them.
    maps: Mutex<Maps>,
    /// The programs and their links: dropping it detaches and unloads them.
    _ebpf: Ebpf,
}

impl fmt::Debug for Probes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probes").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Probes {
    /// Loads and attaches the `tp_btf` probes, or if they fail, the `raw_tp` ones (the failure is logged).
    pub fn load() -> Result<Probes, ProbeError> {
        match Probes::load_kind(Kind::TpBtf) {
            Ok(probes) => Ok(probes),
            Err(tp_btf) => {
                tracing::warn!(error = %tp_btf, "the tp_btf probes do not load; trying raw_tp");
                Probes::load_kind(Kind::RawTp)
                    .map_err(|raw_tp| ProbeError::Unavailable { tp_btf: Box::new(tp_btf), raw_tp: Box::new(raw_tp) })
            }
        }
    }

    /// Loads and attaches the probes of one kind, with no fallback.
    pub fn load_kind(kind: Kind) -> Result<Probes, ProbeError> {
        // Both kinds need it: CO-RE relocations are resolved against it.
        let btf = Btf::from_sys_fs().map_err(ProbeError::NoBtf)?;
        let mut ebpf = EbpfLoader::new().btf(Some(&btf)).load(kind.object()).map_err(|source| ProbeError::Object {
            kind,
            hint: permission_hint(&source),
            source,
        })?;
        for &tracepoint in TRACEPOINTS {
            attach(&mut ebpf, kind, tracepoint, &btf)?;
        }
        let maps = Maps {
            watched: take_map(&mut ebpf, "watched")?,
            process_exits: take_map(&mut ebpf, "process_exits")?,
            overflows: take_map(&mut ebpf, "overflows")?,
            jobs: HashSet::new(),
            collected: HashMap::new(),
            ending: HashMap::new(),
            job_offsets: HashMap::new(),
            process_offsets: HashMap::new(),
        };
        tracing::debug!(%kind, "eBPF probes attached");
        Ok(Probes { kind, maps: Mutex::new(maps), _ebpf: ebpf })
    }

    /// How the probes are attached.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Counts for `job` the live processes `pids` (host process IDs, not thread IDs) from now on, and
    /// every process they fork from now on. Watch a job's processes as early as possible, its init before
    /// it forks: a process forked before its parent was watched is not added. A process already watched
    /// for this job keeps its counts; one watched for another job moves to this one and starts from zero
    /// (its old job loses what it counted for it). A process that has already gone is left out. Job 0 and
    /// process 0 are reserved.
    pub fn watch(&self, job: u32, pids: &[u32]) -> Result<(), ProbeError> {
        if job == 0 || pids.contains(&0) {
            return Err(ProbeError::Reserved);
        }
        let mut maps = self.lock();
        maps.jobs.insert(job);
        for &pid in pids {
            let before = maps.watched.get(&pid, 0).ok();
            match before {
                Some(entry) if entry.job == job && entry.ended == 0 => continue,
                // Its pid's last process has ended, and this is another: the last one's exits first.
                Some(entry) if entry.ended != 0 => collect_one(&mut maps, pid)?,
                Some(entry) => {
                    remove(&mut maps.process_exits, "process_exits", pid)?;
                    if let Some((_, offset)) = maps.process_offsets.remove(&pid)
                        && let Some(old_offset) = maps.job_offsets.get_mut(&entry.job)
                    {
                        *old_offset = old_offset.saturating_sub(&offset);
                    }
                }
                None => {}
            }
            // In this order: from the insertion on, the programs count the exits of the process's threads.
            // The offset, read after it, takes in the threads alive then and those that exited meanwhile.
            let entry = Watched { job, ..Watched::default() };
            maps.watched.insert(pid, entry, 0).map_err(|source| update_error("watched", source))?;
            let threads = match procfs::threads(pid) {
                Ok(threads) => threads,
                Err(source) => {
                    // Not counted at all rather than counted without its offset.
                    remove(&mut maps.watched, "watched", pid)?;
                    return Err(ProbeError::Proc { pid, source });
                }
            };
            let exited = maps.process_exits.get(&pid, 0).ok();
            if threads.is_empty() && exited.is_none() {
                // Gone before it was watched: nothing to count.
                remove(&mut maps.watched, "watched", pid)?;
                continue;
            }
            let offset = live(&threads) + exited.map(|e| e.totals).unwrap_or_default();
            maps.process_offsets.insert(pid, (job, offset));
            *maps.job_offsets.entry(job).or_default() += offset;
        }
        Ok(())
    }

    /// Stops counting for `job`: its processes leave the maps, and its counts are forgotten. Its
    /// processes run on untouched.
    pub fn unwatch_job(&self, job: u32) -> Result<(), ProbeError> {
        let mut maps = self.lock();
        maps.jobs.remove(&job);
        maps.collected.remove(&job);
        maps.job_offsets.remove(&job);
        maps.process_offsets.retain(|_, (j, _)| *j != job);
        for (tgid, _) in entries(maps.watched.iter(), "watched")?.into_iter().filter(|(_, w)| w.job == job) {
            remove(&mut maps.watched, "watched", tgid)?;
            maps.ending.remove(&tgid);
        }
        // Twice: an exit that found its process in `watched` just before it left may have made an entry.
        for _ in 0..2 {
            let exits = entries(maps.process_exits.iter(), "process_exits")?;
            for (tgid, _) in exits.into_iter().filter(|(_, e)| e.job == job) {
                remove(&mut maps.process_exits, "process_exits", tgid)?;
            }
        }
        Ok(())
    }

    /// The counters of every live watched process, by process ID: its live threads and those that
    /// exited, since the process was watched or forked.
    pub fn counters(&self) -> Result<HashMap<u32, Counters>, ProbeError> {
        let mut maps = self.lock();
        let reading = read(&mut maps, None)?;
        Ok(reading
            .processes
            .into_iter()
            .map(|(tgid, (job, totals))| {
                let offset = match maps.process_offsets.get(&tgid) {
                    Some(&(j, offset)) if j == job => offset,
                    _ => Totals::default(),
                };
                (tgid, totals.saturating_sub(&offset).counters())
            })
            .collect())
    }

    /// The counters of one job: its live processes, and those that ended since it was watched. Zero for a
    /// job not watched.
    pub fn job_counters(&self, job: u32) -> Result<Counters, ProbeError> {
        let mut maps = self.lock();
        if !maps.jobs.contains(&job) {
            return Ok(Counters::default());
        }
        let reading = read(&mut maps, Some(job))?;
        Ok(job_counters(&maps, &reading, job))
    }

    /// The counters of every watched job, as [`Probes::job_counters`], in one reading.
    pub fn jobs(&self) -> Result<HashMap<u32, Counters>, ProbeError> {
        let mut maps = self.lock();
        let reading = read(&mut maps, None)?;
        Ok(maps.jobs.iter().map(|&job| (job, job_counters(&maps, &reading, job))).collect())
    }

    /// How full the maps are, and what was dropped because they were full. Collects ended processes, as
    /// a reading does.
    pub fn usage(&self) -> Result<Usage, ProbeError> {
        let mut maps = self.lock();
        let watched = entries(maps.watched.iter(), "watched")?;
        collect(&mut maps, &watched)?;
        let dropped = |slot: u32| -> Result<u64, ProbeError> {
            let values = maps.overflows.get(&slot, 0).map_err(|source| ProbeError::Map {
                map: "overflows",
                action: "read",
                source,
            })?;
            Ok(values.iter().sum())
        };
        let watched = entries(maps.watched.iter(), "watched")?;
        let mut threads = 0;
        for &(tgid, _) in watched.iter().filter(|(_, w)| w.ended == 0) {
            threads += procfs::threads(tgid).map_err(|source| ProbeError::Proc { pid: tgid, source })?.len();
        }
        Ok(Usage {
            processes: watched.len(),
            threads,
            dropped_processes: dropped(OVERFLOW_PROCESSES)?,
            dropped_threads: dropped(OVERFLOW_EXITS)?,
        })
    }

    /// The maps, for one operation.
    fn lock(&self) -> MutexGuard<'_, Maps> {
        // The maps stay consistent whatever panicked while holding them: every change is one map update,
        // and an offset missed by a panic only makes a job count more.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sum of the threads that are not exiting.
fn live(threads: &[procfs::Thread]) -> Totals {
    threads.iter().filter(|thread| !thread.exiting).map(|thread| thread.totals).sum()
}

/// One job's counters from a reading: its totals less its offset.
fn job_counters(maps: &Maps, reading: &Reading, job: u32) -> Counters {
    let totals = reading.jobs.get(&job).copied().unwrap_or_default();
    let offset = maps.job_offsets.get(&job).copied().unwrap_or_default();
    totals.saturating_sub(&offset).counters()
}

/// Reads the watched jobs, or only `only` (see the module docs for the order, which matters), then
/// collects the processes that have ended.
fn read(maps: &mut Maps, only: Option<u32>) -> Result<Reading, ProbeError> {
    let wanted = |job: u32| maps.jobs.contains(&job) && only.is_none_or(|only| only == job);
    let process_exits: HashMap<u32, ProcessExits> =
        entries(maps.process_exits.iter(), "process_exits")?.into_iter().collect();
    let mut reading = Reading::default();
    for (&job, &totals) in &maps.collected {
        if wanted(job) {
            *reading.jobs.entry(job).or_default() += totals;
        }
    }
    for exits in process_exits.values() {
        if wanted(exits.job) {
            *reading.jobs.entry(exits.job).or_default() += exits.totals;
        }
    }
    let watched = entries(maps.watched.iter(), "watched")?;
    for &(tgid, entry) in &watched {
        // An ended process is all in its exits.
        if !wanted(entry.job) || entry.ended != 0 {
            continue;
        }
        let threads = procfs::threads(tgid).map_err(|source| ProbeError::Proc { pid: tgid, source })?;
        let live = live(&threads);
        *reading.jobs.entry(entry.job).or_default() += live;
        if threads.iter().any(|thread| !thread.exiting) {
            let exited = process_exits.get(&tgid).map(|e| e.totals).unwrap_or_default();
            reading.processes.insert(tgid, (entry.job, live + exited));
        }
    }
    // After the reading: what it collects counts from the next one on, no longer in the maps.
    collect(maps, &watched)?;
    Ok(reading)
}

/// Collects the processes seen ended, or gone from `/proc`, for [`COLLECT_AFTER`]: their exits move to
/// their job's sums here, and they leave both maps.
fn collect(maps: &mut Maps, watched: &[(u32, Watched)]) -> Result<(), ProbeError> {
    let now = Instant::now();
    let mut over = HashSet::new();
    for &(tgid, entry) in watched {
        if entry.ended == 0 && Path::new("/proc").join(tgid.to_string()).exists() {
            continue;
        }
        over.insert(tgid);
        let since = *maps.ending.entry(tgid).or_insert(now);
        if now.duration_since(since) >= COLLECT_AFTER {
            collect_one(maps, tgid)?;
        }
    }
    maps.ending.retain(|tgid, _| over.contains(tgid));
    Ok(())
}

/// Takes one process out of the maps, its exits into its job's sums here. Its offset stays in its job's.
fn collect_one(maps: &mut Maps, tgid: u32) -> Result<(), ProbeError> {
    // `watched` first: no exit counts into `process_exits` once the process has left it.
    remove(&mut maps.watched, "watched", tgid)?;
    if let Ok(exits) = maps.process_exits.get(&tgid, 0) {
        remove(&mut maps.process_exits, "process_exits", tgid)?;
        if maps.jobs.contains(&exits.job) {
            *maps.collected.entry(exits.job).or_default() += exits.totals;
        }
    }
    maps.ending.remove(&tgid);
    maps.process_offsets.remove(&tgid);
    Ok(())
}

/// Loads and attaches the program named after `tracepoint`.
fn attach(ebpf: &mut Ebpf, kind: Kind, tracepoint: &'static str, btf: &Btf) -> Result<(), ProbeError> {
    let program = ebpf.program_mut(tracepoint).ok_or(ProbeError::MissingProgram { kind, program: tracepoint })?;
    let attach_error =
        |source: ProgramError| ProbeError::Attach { kind, program: tracepoint, hint: permission_hint(&source), source };
    match kind {
        Kind::TpBtf => {
            let program: &mut BtfTracePoint = program.try_into().map_err(attach_error)?;
            program.load(tracepoint, btf).map_err(|error| refused(kind, tracepoint, error))?;
            program.attach().map_err(attach_error)?;
        }
        Kind::RawTp => {
            let program: &mut RawTracePoint = program.try_into().map_err(attach_error)?;
            program.load().map_err(|error| refused(kind, tracepoint, error))?;
            program.attach(tracepoint).map_err(attach_error)?;
        }
    }
    Ok(())
}

/// The error for a program the kernel would not load: the verifier's verdict when there is one.
fn refused(kind: Kind, program: &'static str, error: ProgramError) -> ProbeError {
    match error {
        ProgramError::LoadError { io_error, verifier_log } => ProbeError::Refused {
            kind,
            program,
            hint: io_hint(&io_error),
            verifier_log: trim_verifier_log(&verifier_log.to_string()),
            source: io_error,
        },
        source => ProbeError::Attach { kind, program, hint: permission_hint(&source), source },
    }
}

/// Takes a map out of the loaded object, typed.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ProbeError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap { map: name })?;
    M::try_from(map).map_err(|source| ProbeError::Map { map: name, action: "open", source })
}

/// Every entry of a map, read key by key (entries that vanish meanwhile are skipped).
fn entries<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, ProbeError> {
    iter.collect::<Result<Vec<_>, _>>().map_err(|source| ProbeError::Map { map, action: "read", source })
}

/// Removes a key; one already gone is fine.
fn remove<V: Pod>(map: &mut BpfHashMap<MapData, u32, V>, name: &'static str, key: u32) -> Result<(), ProbeError> {
    match map.remove(&key) {
        Err(MapError::SyscallError(ref error)) if error.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) | Ok(()) => Ok(()),
        Err(source) => Err(ProbeError::Map { map: name, action: "update", source }),
    }
}

/// The error for a failed insertion: [`ProbeError::Full`] when the map is.
fn update_error(map: &'static str, source: MapError) -> ProbeError {
    match &source {
        MapError::SyscallError(error) if error.io_error.raw_os_error() == Some(libc::E2BIG) => {
            ProbeError::Full { map, limit: MAX_PROCESSES }
        }
        _ => ProbeError::Map { map, action: "update", source },
    }
}

/// The last [`VERIFIER_LOG_LINES`] lines of a verifier log, where it says why it refused.
fn trim_verifier_log(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    match lines.len() {
        0 => "(empty)".to_owned(),
        n if n <= VERIFIER_LOG_LINES => lines.join("\n"),
        n => format!("[{} lines before]\n{}", n - VERIFIER_LOG_LINES, lines[n - VERIFIER_LOG_LINES..].join("\n")),
    }
}

/// A hint when `error`, or what caused it, is a refused permission.
fn permission_hint(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io_error) = error.downcast_ref::<io::Error>() {
            return io_hint(io_error);
        }
        cause = error.source();
    }
    ""
}

/// The hint for one system error. Only `EPERM`: `EACCES` from `BPF_PROG_LOAD` is the verifier's refusal.
fn io_hint(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EPERM) => {
            " (permission denied: loading eBPF needs root, or CAP_BPF and CAP_PERFMON, and no lockdown)"
        }
        _ => "",
    }
}

/// Why the probes could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel's BTF is unreadable; both kinds of probes need it for their CO-RE relocations.
    #[error(
        "cannot read the kernel's BTF (/sys/kernel/btf/vmlinux): the probes are CO-RE and need a kernel built \
         with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf(#[source] BtfError),
    /// The object could not be loaded: its maps created, or its relocations resolved.
    #[error("cannot load the {kind} probe object{hint}")]
    Object {
        /// Which object.
        kind: Kind,
        /// A word on permissions when they were the problem.
        hint: &'static str,
        /// What aya said.
        #[source]
        source: EbpfError,
    },
    /// The kernel refused a program.
    #[error("the kernel refused the {kind} program {program}{hint}; the verifier's log ends with:\n{verifier_log}")]
    Refused {
        /// Which object.
        kind: Kind,
        /// The program, named after its tracepoint.
        program: &'static str,
        /// A word on permissions when they were the problem.
        hint: &'static str,
        /// The end of the verifier's log.
        verifier_log: String,
        /// What `BPF_PROG_LOAD` returned.
        #[source]
        source: io::Error,
    },
    /// A program loaded but could not be attached to its tracepoint.
    #[error("cannot attach the {kind} program {program}{hint}")]
    Attach {
        /// Which object.
        kind: Kind,
        /// The program, named after its tracepoint.
        program: &'static str,
        /// A word on permissions when they were the problem.
        hint: &'static str,
        /// What aya said.
        #[source]
        source: ProgramError,
    },
    /// Neither kind of probes loads.
    #[error("neither kind of eBPF probes loads: tp_btf: {tp_btf}; raw_tp: {raw_tp}")]
    Unavailable {
        /// Why the `tp_btf` probes did not load.
        tp_btf: Box<ProbeError>,
        /// Why the `raw_tp` probes did not load.
        #[source]
        raw_tp: Box<ProbeError>,
    },
    /// The object lacks a program this crate expects: `build.rs` built something else.
    #[error("the {kind} probe object has no program {program}")]
    MissingProgram {
        /// Which object.
        kind: Kind,
        /// The missing program.
        program: &'static str,
    },
    /// The object lacks a map this crate expects.
    #[error("the probe object has no map {map}")]
    MissingMap {
        /// The missing map.
        map: &'static str,
    },
    /// A map operation failed.
    #[error("cannot {action} the probe map {map}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was attempted: open (check its layout), read, update.
        action: &'static str,
        /// What aya said.
        #[source]
        source: MapError,
    },
    /// A map is full.
    #[error("the probe map {map} is full ({limit} entries): too many processes watched")]
    Full {
        /// The map.
        map: &'static str,
        /// Its size.
        limit: usize,
    },
    /// Job 0 or process 0 was given: both are reserved (process 0 is the idle task).
    #[error("job 0 and process 0 are reserved and can't be watched")]
    Reserved,
    /// A watched process's `/proc` files could not be read (they are, by root, as long as it exists).
    #[error("cannot read the threads of process {pid} in /proc")]
    Proc {
        /// The process.
        pid: u32,
        /// What the system said, with the file.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_logs_keep_their_end() {
        assert_eq!(trim_verifier_log(""), "(empty)");
        assert_eq!(trim_verifier_log("0: r1 = 0\n\n1: exit\n"), "0: r1 = 0\n1: exit");
        let long = (0..100).map(|i| format!("{i}: insn")).collect::<Vec<_>>().join("\n");
        let trimmed = trim_verifier_log(&long);
        assert!(trimmed.starts_with("[75 lines before]\n75: insn\n"), "{trimmed}");
        assert!(trimmed.ends_with("99: insn"), "{trimmed}");
    }

    #[test]
    fn permission_errors_get_a_hint() {
        let denied = io::Error::from_raw_os_error(libc::EPERM);
        assert!(io_hint(&denied).contains("root"));
        assert_eq!(io_hint(&io::Error::from_raw_os_error(libc::EACCES)), "", "the verifier says EACCES");
        let wrapped = MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_create", io_error: denied });
        assert!(permission_hint(&wrapped).contains("root"));
    }

    #[test]
    fn the_raw_layouts_match_probes_h() {
        // struct watched: two u32 and a u64; struct process_exits: two u32 and struct totals.
        assert_eq!(size_of::<Watched>(), 16);
        assert_eq!(size_of::<ProcessExits>(), 8 + size_of::<Totals>());
    }
}
