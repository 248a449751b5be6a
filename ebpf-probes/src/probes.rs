//! [`Probes`]: the eBPF programs of `bpf/probes.bpf.c` loaded and attached, and the maps user space
//! shares with them.
//!
//! The C side counts into per-CPU, per-process maps and keeps per-thread timestamps; this side tells it
//! which processes to watch, sums the per-CPU copies, adds the time of slices still in progress, and folds
//! the counts of processes that exited into their job, so that the kernel maps hold live processes only.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};
use aya::programs::{BtfTracePoint, ProgramError, RawTracePoint};
use aya::{Btf, BtfError, Ebpf, EbpfError, EbpfLoader, Pod};
use nix::time::{ClockId, clock_gettime};

use crate::Counters;

/// The probes built as BTF-typed tracepoints (`tp_btf`), see `build.rs`.
static TP_BTF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.tp_btf.o"));

/// The same probes built as raw tracepoints (`raw_tp`).
static RAW_TP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probes.raw_tp.o"));

/// How many processes, over all jobs, can be watched at once (`MAX_PROCESSES` in `bpf/probes.h`).
/// [`Probes::watch`] fails beyond it; a fork beyond it goes uncounted and shows in
/// [`Usage::dropped_processes`].
pub const MAX_PROCESSES: usize = 16384;

/// How many threads of watched processes are tracked at once (`MAX_THREADS` in `bpf/probes.h`). Beyond
/// it a thread's CPU time, run delay and faults go uncounted, and show in [`Usage::dropped_threads`].
pub const MAX_THREADS: usize = 16384;

/// The tracepoints the probes attach to. Each program is named after its tracepoint.
const TRACEPOINTS: &[&str] = &[
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
    "sched_process_fork",
    "sched_process_exit",
    "sched_process_exec",
    "sys_enter",
    "sys_exit",
    "block_bio_queue",
];

/// How many lines of the verifier's log an error keeps: the reason for a refusal is at its end, and the
/// whole log can run to megabytes.
const VERIFIER_LOG_LINES: usize = 25;

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

/// `struct counters` of `bpf/probes.h`: one CPU's copy of a process's counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawCounters {
    /// The job; set in the copy of the CPU that created the entry (all copies when user space did).
    job: u32,
    /// Explicit padding, so that the struct has no uninitialised bytes.
    _pad: u32,
    /// See [`Counters`] for the rest.
    cpu_ns: u64,
    wait_ns: u64,
    voluntary_switches: u64,
    involuntary_switches: u64,
    syscalls: u64,
    read_bytes: u64,
    write_bytes: u64,
    block_bytes: u64,
    minor_faults: u64,
    major_faults: u64,
}

// SAFETY: `repr(C)`, integers only, no implicit padding: every bit pattern is a valid value.
unsafe impl Pod for RawCounters {}

impl From<&RawCounters> for Counters {
    fn from(raw: &RawCounters) -> Counters {
        Counters {
            cpu_ns: raw.cpu_ns,
            wait_ns: raw.wait_ns,
            voluntary_switches: raw.voluntary_switches,
            involuntary_switches: raw.involuntary_switches,
            syscalls: raw.syscalls,
            read_bytes: raw.read_bytes,
            write_bytes: raw.write_bytes,
            block_bytes: raw.block_bytes,
            minor_faults: raw.minor_faults,
            major_faults: raw.major_faults,
        }
    }
}

/// `struct thread_state` of `bpf/probes.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawThread {
    /// The thread's process.
    tgid: u32,
    /// Explicit padding.
    _pad: u32,
    /// `CLOCK_MONOTONIC` ns of its switch in; 0 while off CPU.
    oncpu_since: u64,
    /// `CLOCK_MONOTONIC` ns since it has been waiting for a CPU; 0 when not waiting.
    queued_since: u64,
    /// Its fault counts when last seen.
    min_flt: u64,
    maj_flt: u64,
}

// SAFETY: as for `RawCounters`.
unsafe impl Pod for RawThread {}

/// Indexes of the `overflows` map (`OVERFLOW_*` in `bpf/probes.h`).
const OVERFLOW_PROCESSES: u32 = 0;
const OVERFLOW_THREADS: u32 = 1;

/// How full the probes' maps are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Live processes watched, of [`MAX_PROCESSES`].
    pub processes: usize,
    /// Threads tracked, of [`MAX_THREADS`].
    pub threads: usize,
    /// Processes left uncounted since the load because the process maps were full.
    pub dropped_processes: u64,
    /// Thread events left uncounted since the load because the thread map was full.
    pub dropped_threads: u64,
}

/// The maps shared with the programs, and what user space keeps beside them.
struct Maps {
    /// tgid -> job: the processes the programs count.
    watched: BpfHashMap<MapData, u32, u32>,
    /// tgid -> per-CPU counters.
    counters: PerCpuHashMap<MapData, u32, RawCounters>,
    /// tid -> thread state.
    threads: BpfHashMap<MapData, u32, RawThread>,
    /// Events dropped because a map was full.
    overflows: PerCpuArray<MapData, u64>,
    /// The jobs being watched: what [`Probes::unwatch_job`] has not ended.
    jobs: HashSet<u32>,
    /// The counts of each job's processes that exited, taken out of `counters` to keep it small.
    exited: HashMap<u32, Counters>,
}

/// One process's reading.
struct Reading {
    /// The process (thread group) ID.
    tgid: u32,
    /// Its job.
    job: u32,
    /// Its counters, slices in progress included.
    counters: Counters,
}

/// The probes, loaded and attached: they count for the processes of watched jobs until dropped.
///
/// Loading needs root (`CAP_BPF` and `CAP_PERFMON`, or `CAP_SYS_ADMIN`) and the kernel's BTF. All methods
/// take `&self`; the maps are behind a mutex, so one `Probes` can be shared between threads.
pub struct Probes {
    /// How the programs are attached.
    kind: Kind,
    /// The maps, and the counts of exited processes.
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
            counters: take_map(&mut ebpf, "counters")?,
            threads: take_map(&mut ebpf, "threads")?,
            overflows: take_map(&mut ebpf, "overflows")?,
            jobs: HashSet::new(),
            exited: HashMap::new(),
        };
        tracing::debug!(%kind, "eBPF probes attached");
        Ok(Probes { kind, maps: Mutex::new(maps), _ebpf: ebpf })
    }

    /// How the probes are attached.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Counts for `job` the live processes `pids` (host process IDs, not thread IDs), and from now on every
    /// process they fork. Watch a job's processes as early as possible, its init before it forks: a
    /// process forked before its parent was watched is not added. A process already watched for this
    /// job keeps its counts; one watched for another job moves to this one and starts from zero.
    /// Job 0 and process 0 are reserved.
    pub fn watch(&self, job: u32, pids: &[u32]) -> Result<(), ProbeError> {
        if job == 0 || pids.contains(&0) {
            return Err(ProbeError::Reserved);
        }
        let mut maps = self.lock();
        maps.jobs.insert(job);
        for &pid in pids {
            if maps.watched.get(&pid, 0).ok() == Some(job) {
                continue;
            }
            // Counters first: the programs start counting as soon as the process is in `watched`.
            let fresh = per_cpu(RawCounters { job, ..RawCounters::default() })?;
            maps.counters.insert(pid, fresh, 0).map_err(|source| update_error("counters", source))?;
            maps.watched.insert(pid, job, 0).map_err(|source| update_error("watched", source))?;
        }
        Ok(())
    }

    /// Stops counting for `job`: its processes leave the maps, their threads' state too, and its counts
    /// are forgotten. Its processes run on untouched.
    pub fn unwatch_job(&self, job: u32) -> Result<(), ProbeError> {
        let mut maps = self.lock();
        maps.jobs.remove(&job);
        maps.exited.remove(&job);
        let mut tgids: HashSet<u32> =
            entries(maps.watched.iter(), "watched")?.into_iter().filter(|&(_, j)| j == job).map(|(t, _)| t).collect();
        tgids.extend(
            entries(maps.counters.iter(), "counters")?
                .into_iter()
                .filter(|(_, values)| job_of(values) == job)
                .map(|(t, _)| t),
        );
        for tgid in &tgids {
            remove(&mut maps.watched, "watched", *tgid)?;
        }
        for tgid in &tgids {
            remove_counters(&mut maps.counters, *tgid)?;
        }
        for (tid, _) in entries(maps.threads.iter(), "threads")?.into_iter().filter(|(_, t)| tgids.contains(&t.tgid)) {
            remove(&mut maps.threads, "threads", tid)?;
        }
        // A program that found a process in `watched` just before it left may have recreated its counters.
        for (tgid, _) in entries(maps.counters.iter(), "counters")?.into_iter().filter(|(_, v)| job_of(v) == job) {
            remove_counters(&mut maps.counters, tgid)?;
        }
        Ok(())
    }

    /// The counters of every live watched process, by process ID.
    pub fn counters(&self) -> Result<HashMap<u32, Counters>, ProbeError> {
        let mut maps = self.lock();
        Ok(read(&mut maps)?.into_iter().map(|r| (r.tgid, r.counters)).collect())
    }

    /// The counters of one job: its live processes, and those that exited since it was watched. Exited
    /// processes are folded into their job at each reading; read at least every few seconds, or a process
    /// whose pid is reused by a new process of the job before then loses its counts.
    pub fn job_counters(&self, job: u32) -> Result<Counters, ProbeError> {
        let mut maps = self.lock();
        // Reading first: it folds the processes that exited since the last reading into `exited`.
        let live: Counters = read(&mut maps)?.into_iter().filter(|r| r.job == job).map(|r| r.counters).sum();
        Ok(live + maps.exited.get(&job).copied().unwrap_or_default())
    }

    /// The counters of every watched job, as [`Probes::job_counters`], in one pass over the maps.
    pub fn jobs(&self) -> Result<HashMap<u32, Counters>, ProbeError> {
        let mut maps = self.lock();
        // Reading first: it folds the processes that exited since the last reading into `exited`.
        let readings = read(&mut maps)?;
        let mut jobs: HashMap<u32, Counters> = maps.jobs.iter().map(|&job| (job, Counters::default())).collect();
        for (job, counters) in &maps.exited {
            *jobs.entry(*job).or_default() += *counters;
        }
        for reading in readings {
            *jobs.entry(reading.job).or_default() += reading.counters;
        }
        Ok(jobs)
    }

    /// How full the maps are, and what was dropped because they were full.
    pub fn usage(&self) -> Result<Usage, ProbeError> {
        let maps = self.lock();
        let dropped = |slot: u32| -> Result<u64, ProbeError> {
            let values = maps.overflows.get(&slot, 0).map_err(|source| ProbeError::Map {
                map: "overflows",
                action: "read",
                source,
            })?;
            Ok(values.iter().sum())
        };
        Ok(Usage {
            processes: entries(maps.watched.iter(), "watched")?.len(),
            threads: entries(maps.threads.iter(), "threads")?.len(),
            dropped_processes: dropped(OVERFLOW_PROCESSES)?,
            dropped_threads: dropped(OVERFLOW_THREADS)?,
        })
    }

    /// The maps, for one operation.
    fn lock(&self) -> MutexGuard<'_, Maps> {
        // The maps stay consistent whatever panicked while holding them: every change is one map update.
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
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

/// A value for every possible CPU.
fn per_cpu<V: Pod>(value: V) -> Result<PerCpuValues<V>, ProbeError> {
    let cpus = aya::util::nr_cpus().map_err(|(path, source)| ProbeError::Cpus { path, source })?;
    PerCpuValues::try_from(vec![value; cpus]).map_err(|source| ProbeError::Cpus { path: "(count)", source })
}

/// The job a process's counters belong to: the tag of the copy that created the entry.
fn job_of(values: &PerCpuValues<RawCounters>) -> u32 {
    values.iter().map(|v| v.job).find(|&job| job != 0).unwrap_or(0)
}

/// Every entry of a map, read key by key (entries that vanish meanwhile are skipped).
fn entries<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    map: &'static str,
) -> Result<Vec<(K, V)>, ProbeError> {
    iter.collect::<Result<Vec<_>, _>>().map_err(|source| ProbeError::Map { map, action: "read", source })
}

/// Removes a key; one the programs removed already is fine.
fn remove<V: Pod>(map: &mut BpfHashMap<MapData, u32, V>, name: &'static str, key: u32) -> Result<(), ProbeError> {
    ignore_missing(map.remove(&key)).map_err(|source| ProbeError::Map { map: name, action: "update", source })
}

/// [`remove`] for the per-CPU counters.
fn remove_counters(map: &mut PerCpuHashMap<MapData, u32, RawCounters>, key: u32) -> Result<(), ProbeError> {
    ignore_missing(map.remove(&key)).map_err(|source| ProbeError::Map { map: "counters", action: "update", source })
}

/// A removal's result, where "no such key" is success.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(ref error)) if error.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        other => other,
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

/// Reads every watched process, folding the processes that exited into their jobs (and out of the map).
fn read(maps: &mut Maps) -> Result<Vec<Reading>, ProbeError> {
    // In this order: a process forked between the first two reads looks exited and gets folded, with
    // next to nothing counted, and the programs start its counters afresh; a process that exits between
    // them is folded at the next reading.
    let watched: HashMap<u32, u32> = entries(maps.watched.iter(), "watched")?.into_iter().collect();
    let counters = entries(maps.counters.iter(), "counters")?;
    // Slices in progress: a thread that runs, or waits, without switching has nothing in `counters` yet.
    // Read after the counters, a switch in between loses a slice from this reading rather than counting
    // it twice.
    let threads = entries(maps.threads.iter(), "threads")?;
    let now = monotonic_ns();
    let mut in_progress: HashMap<u32, (u64, u64)> = HashMap::new();
    for (_, thread) in threads {
        let (cpu, wait) = in_progress.entry(thread.tgid).or_default();
        if thread.oncpu_since != 0 {
            *cpu += now.saturating_sub(thread.oncpu_since);
        }
        if thread.queued_since != 0 {
            *wait += now.saturating_sub(thread.queued_since);
        }
    }
    let mut readings = Vec::with_capacity(watched.len());
    for (tgid, values) in counters {
        let mut sum: Counters = values.iter().map(Counters::from).sum();
        if let Some(&job) = watched.get(&tgid) {
            if let Some(&(cpu, wait)) = in_progress.get(&tgid) {
                sum.cpu_ns += cpu;
                sum.wait_ns += wait;
            }
            readings.push(Reading { tgid, job, counters: sum });
        } else {
            let job = job_of(&values);
            if maps.jobs.contains(&job) {
                *maps.exited.entry(job).or_default() += sum;
            }
            remove_counters(&mut maps.counters, tgid)?;
        }
    }
    Ok(readings)
}

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap_or(0)
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
    /// Job 0 or process 0 was given: both are reserved (0 tags the per-CPU copies of no job; process 0 is
    /// the idle task).
    #[error("job 0 and process 0 are reserved and can't be watched")]
    Reserved,
    /// The possible CPUs could not be counted, which per-CPU map values need.
    #[error("cannot count the possible CPUs ({path})")]
    Cpus {
        /// Where they were read.
        path: &'static str,
        /// What the system said.
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
        // struct counters: two u32 and ten u64; struct thread_state: two u32 and four u64.
        assert_eq!(size_of::<RawCounters>(), 88);
        assert_eq!(size_of::<RawThread>(), 40);
    }
}
