//! What each job running on this node does, and what kind of job that makes it: CPU-bound, I/O-bound,
//! sleeping, or unmigratable. MOSIX knew this from inside the kernel; migd knows it from the eBPF probes of
//! `rmosix_ebpf_probes`, or, where they cannot load, from `/proc` (coarser: the counts of a job's processes
//! that have exited are gone with them).
//!
//! Every second the sampler reads each job's counters, turns their growth into rates, and decays them
//! into two averages, as MOSIX decayed its load: a fast one (half-life [`FAST_HALF_LIFE`]) that the class
//! follows, so a job is classed within seconds of starting or of changing what it does, and a slow one
//! (half-life [`SLOW_HALF_LIFE`]) of what the job has been doing lately, for the balancer.
//!
//! A new job is sampled as soon as migd starts it or takes it in ([`Observer::poke`]), and then every
//! [`YOUNG_EVERY`] until it has been seen a few times. Its first rates are what `/proc` says it did since
//! it started, weighed by how long that was: an average is the decayed sum of what was seen divided by the
//! decayed weight of the time seen ([`Average`]), so a few milliseconds of start-up count for little and
//! a job is classed from its first second, not after the averages have filled. The class is a
//! pure function of the fast rates ([`classify`]); a user's hint (`mosrun -c`, `-i`) fixes it, and a job
//! that cannot move is unmigratable whatever it does, with the reason.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use rmosix_common::control::{Class, Hint};
use rmosix_ebpf_probes::{Counters, Probes};
use tracing::{info, warn};

/// Half-life of the rates the class follows.
pub const FAST_HALF_LIFE: Duration = Duration::from_secs(1);
/// Half-life of the rates of what a job has been doing lately.
pub const SLOW_HALF_LIFE: Duration = Duration::from_secs(16);

/// A job that uses at least this much of a CPU (running or waiting to run) wants a CPU.
pub const CPU_DEMAND: f64 = 0.2;
/// A job that does storage I/O and runs for less than this long (seconds of CPU) between two of its
/// sleeps is held up by its I/O: it computes a little, then waits for the disk. Moving it would not make it
/// faster, and its I/O would have to come along. A compressor reading a file from disk sleeps too, but
/// computes for milliseconds between its reads, and wants a CPU. CPU time per sleep does not depend on how
/// busy the node is: on a crowded CPU an I/O-bound job spends most of its time waiting for the CPU after
/// each wake-up, as a CPU-bound one waits for it all the time, so neither its share of the CPU nor its
/// demand tells them apart there.
pub const IO_CPU_PER_SLEEP: f64 = 1e-3;
/// Storage I/O caused by a job (reads that reach the disk, writes it dirtied) at this rate is I/O.
pub const IO_BLOCK_BPS: f64 = 64.0 * 1024.0;

/// How often the jobs are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// How often they are sampled while one of them is young (seen fewer than [`YOUNG_SAMPLES`] times).
pub const YOUNG_EVERY: Duration = Duration::from_millis(250);
/// Samples after which a job is no longer young.
const YOUNG_SAMPLES: u32 = 8;

/// A job's rates, per second: CPUs used and waited for (1.0 is one whole CPU), bytes and events.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    pub cpu: f64,
    pub wait: f64,
    pub read_bps: f64,
    pub write_bps: f64,
    pub block_bps: f64,
    pub syscalls: f64,
    pub voluntary_switches: f64,
    pub faults: f64,
}

impl Rates {
    /// The growth of `counters` over `dt`.
    pub fn of(counters: &Counters, dt: Duration) -> Self {
        let secs = dt.as_secs_f64().max(1e-3);
        #[expect(clippy::cast_precision_loss, reason = "rates need no more than f64's 52 bits")]
        let per_sec = |n: u64| n as f64 / secs;
        Self {
            cpu: per_sec(counters.cpu_ns) / 1e9,
            wait: per_sec(counters.wait_ns) / 1e9,
            read_bps: per_sec(counters.read_bytes),
            write_bps: per_sec(counters.write_bytes),
            block_bps: per_sec(counters.block_bytes),
            syscalls: per_sec(counters.syscalls),
            voluntary_switches: per_sec(counters.voluntary_switches),
            faults: per_sec(counters.minor_faults + counters.major_faults),
        }
    }

    /// These rates moved toward `now` after `dt` with half-life `half_life`.
    #[must_use]
    pub fn decayed(self, now: Rates, dt: Duration, half_life: Duration) -> Self {
        self.mixed(now, 0.5_f64.powf(dt.as_secs_f64() / half_life.as_secs_f64()))
    }

    /// `keep` of these rates and `1 - keep` of `now`.
    #[must_use]
    fn mixed(self, now: Rates, keep: f64) -> Self {
        let mix = |old: f64, new: f64| old * keep + new * (1.0 - keep);
        Self {
            cpu: mix(self.cpu, now.cpu),
            wait: mix(self.wait, now.wait),
            read_bps: mix(self.read_bps, now.read_bps),
            write_bps: mix(self.write_bps, now.write_bps),
            block_bps: mix(self.block_bps, now.block_bps),
            syscalls: mix(self.syscalls, now.syscalls),
            voluntary_switches: mix(self.voluntary_switches, now.voluntary_switches),
            faults: mix(self.faults, now.faults),
        }
    }

    /// CPUs the job would use if it had them: its time running and its time waiting for a CPU.
    pub fn demand(&self) -> f64 {
        self.cpu + self.wait
    }

    /// Whether the job does storage I/O. Bytes through pipes between its own processes (a shell pipeline)
    /// are not I/O that holds it up; sockets to the outside make a job unmigratable anyway.
    pub fn does_io(&self) -> bool {
        self.block_bps >= IO_BLOCK_BPS
    }

    /// CPU seconds between two sleeps (voluntary switches); infinite for a job that never sleeps.
    pub fn cpu_per_sleep(&self) -> f64 {
        if self.voluntary_switches > 0.0 { self.cpu / self.voluntary_switches } else { f64::INFINITY }
    }

    /// Held up by its storage I/O: it does some, and computes only briefly between its sleeps.
    pub fn io_bound(&self) -> bool {
        self.does_io() && self.cpu_per_sleep() < IO_CPU_PER_SLEEP
    }
}

/// An exponentially decayed average of rates over the time a job has been seen: the decayed sum of each
/// interval's rates times its weight, over the decayed sum of the weights. An interval of length `dt`
/// weighs `1 - 2^(-dt/half_life)` at its end, and everything before it is multiplied by `2^(-dt/half_life)`,
/// so once the job has been seen for several half-lives the weight is 1 and this is the usual decayed
/// average; before that, the little that was seen is not mixed with zeros that were never measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Average {
    pub rates: Rates,
    /// The decayed weight of the time seen, in [0, 1].
    weight: f64,
}

impl Average {
    /// An average of `rates` seen over `dt`, moved on by `dt` with half-life `half_life`.
    #[must_use]
    pub fn then(self, rates: Rates, dt: Duration, half_life: Duration) -> Self {
        let keep = 0.5_f64.powf(dt.as_secs_f64() / half_life.as_secs_f64());
        let weight = self.weight * keep + (1.0 - keep);
        if weight <= 0.0 {
            return self;
        }
        // (old * old weight * keep + new * (1 - keep)) / weight, as a mix of old and new.
        Self { rates: self.rates.mixed(rates, self.weight * keep / weight), weight }
    }
}

/// The class of a job from its fast rates, its owner's hint and whether it can move.
pub fn classify(fast: &Rates, hint: Option<Hint>, unmigratable: bool) -> Class {
    if unmigratable {
        return Class::Unmigratable;
    }
    match hint {
        Some(Hint::CpuBound) => return Class::Cpu,
        Some(Hint::IoBound) => return Class::Io,
        None => {}
    }
    if fast.io_bound() {
        Class::Io
    } else if fast.demand() >= CPU_DEMAND {
        Class::Cpu
    } else if fast.does_io() {
        Class::Io
    } else {
        Class::Sleeping
    }
}

/// Where the counters come from.
#[derive(Debug)]
enum Source {
    Bpf(Box<Probes>),
    /// `/proc`, and why the probes did not load.
    Proc(String),
}

/// What the sampler knows of one job.
#[derive(Debug, Clone)]
pub struct Seen {
    pub class: Class,
    /// Why the job cannot move, when it cannot.
    pub reason: Option<String>,
    pub fast: Average,
    pub slow: Average,
    /// Resident memory of all its processes, bytes.
    pub rss: u64,
    /// Some process of the job is stopped (by a signal, not by a move).
    pub stopped: bool,
    /// Counters at the last sample, and when.
    last: Counters,
    at: Instant,
    samples: u32,
}

/// The job a sampler is told about: its key (the host PID of its root), and how it was started.
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pub root: i32,
    pub hint: Option<Hint>,
}

/// The counters, classes and rates of the jobs running here.
#[derive(Debug)]
pub struct Observer {
    source: Source,
    seen: Mutex<HashMap<i32, Seen>>,
    /// Set by [`Observer::poke`]: a job has started or arrived, sample now.
    poked: (Mutex<bool>, Condvar),
}

impl Observer {
    /// Loads the eBPF probes; when they cannot load, says why once and counts from `/proc`.
    pub fn start() -> Self {
        let source = match Probes::load() {
            Ok(probes) => {
                info!(kind = %probes.kind(), "eBPF probes attached");
                Source::Bpf(Box::new(probes))
            }
            Err(error) => {
                warn!(%error, "eBPF probes cannot load; jobs are observed through /proc, coarser");
                Source::Proc(error.to_string())
            }
        };
        Self { source, seen: Mutex::new(HashMap::new()), poked: (Mutex::new(false), Condvar::new()) }
    }

    /// Observes through `/proc` only (`why` says why).
    pub fn without_probes(why: &str) -> Self {
        Self {
            source: Source::Proc(why.to_owned()),
            seen: Mutex::new(HashMap::new()),
            poked: (Mutex::new(false), Condvar::new()),
        }
    }

    /// Which source is in use, in words: `bpf (tp_btf)` or `proc (why)`.
    pub fn source(&self) -> String {
        match &self.source {
            Source::Bpf(probes) => format!("bpf ({})", probes.kind()),
            Source::Proc(why) => format!("proc ({why})"),
        }
    }

    /// Starts counting a job that runs here now (started, arrived or taken up).
    fn watch(&self, root: i32) {
        if let Source::Bpf(probes) = &self.source {
            let pids: Vec<u32> = rmosix_checkpoint::migratable::job_processes(root)
                .unwrap_or_else(|_| vec![root])
                .into_iter()
                .filter_map(|p| u32::try_from(p).ok())
                .collect();
            if let Err(error) = probes.watch(root.unsigned_abs(), &pids) {
                warn!(root, %error, "cannot watch the job's processes");
            }
        }
    }

    /// Stops counting a job that no longer runs here.
    fn unwatch(&self, root: i32) {
        if let Source::Bpf(probes) = &self.source
            && let Err(error) = probes.unwatch_job(root.unsigned_abs())
        {
            warn!(root, %error, "cannot stop watching the job");
        }
    }

    /// Wakes the sampler: a job has started here or arrived, and is to be watched at once (the probes
    /// count only what a job's processes do, and fork, once it is watched).
    pub fn poke(&self) {
        *self.poked.0.lock().expect("poked") = true;
        self.poked.1.notify_all();
    }

    /// Waits until the next sample is due: [`SAMPLE_EVERY`] after the last, [`YOUNG_EVERY`] while a job is
    /// young, or at once when poked.
    pub fn wait_for_next(&self) {
        let young = self.seen.lock().expect("seen").values().any(|s| s.samples < YOUNG_SAMPLES);
        let every = if young { YOUNG_EVERY } else { SAMPLE_EVERY };
        let (lock, wake) = &self.poked;
        let poked = lock.lock().expect("poked");
        let (mut poked, _) = wake.wait_timeout_while(poked, every, |poked| !*poked).expect("poked");
        *poked = false;
    }

    /// What is known of the job whose root is `root`.
    pub fn seen(&self, root: i32) -> Option<Seen> {
        self.seen.lock().expect("seen").get(&root).cloned()
    }

    /// Samples the jobs running here, `jobs`, once: a job new since the last sample starts being counted
    /// (from nothing, now), a job no longer in `jobs` stops; for the others, counters, rates,
    /// migratability and class.
    pub fn sample(&self, jobs: &[Watched]) {
        let mut seen = self.seen.lock().expect("seen");
        let gone: Vec<i32> = seen.keys().filter(|root| !jobs.iter().any(|j| j.root == **root)).copied().collect();
        for root in gone {
            seen.remove(&root);
            self.unwatch(root);
        }
        let bpf = match &self.source {
            Source::Bpf(probes) => match probes.jobs() {
                Ok(all) => Some(all),
                Err(error) => {
                    warn!(%error, "cannot read the probes' counters");
                    return;
                }
            },
            Source::Proc(_) => None,
        };
        let now = Instant::now();
        for job in jobs {
            let processes = rmosix_checkpoint::migratable::job_processes(job.root).unwrap_or_default();
            let reason = match rmosix_checkpoint::migratable::check(job.root) {
                Ok(reasons) if !reasons.is_empty() => {
                    Some(reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
                }
                _ => None,
            };
            let (rss, stopped) = processes.iter().fold((0, false), |(rss, stopped), &p| {
                let (r, s) = resident_and_stopped(p);
                (rss + r, stopped || s)
            });
            let counters = match &bpf {
                Some(all) => all.get(&job.root.unsigned_abs()).copied().unwrap_or_default(),
                None => processes
                    .iter()
                    .filter_map(|&p| rmosix_ebpf_probes::proc_counters(p.unsigned_abs()).ok())
                    .fold(Counters::default(), |sum, c| sum + c),
            };
            let Some(before) = seen.get(&job.root) else {
                self.watch(job.root);
                // What it did from its start until now, from /proc (the probes count from now on).
                let life = processes
                    .iter()
                    .filter_map(|&p| rmosix_ebpf_probes::proc_counters(p.unsigned_abs()).ok())
                    .fold(Counters::default(), |sum, c| sum + c);
                let (fast, slow) = match age(job.root) {
                    Some(age) if !age.is_zero() => {
                        let rates = Rates::of(&life, age);
                        (
                            Average::default().then(rates, age, FAST_HALF_LIFE),
                            Average::default().then(rates, age, SLOW_HALF_LIFE),
                        )
                    }
                    _ => (Average::default(), Average::default()),
                };
                let fresh = Seen {
                    class: classify(&fast.rates, job.hint, reason.is_some()),
                    reason,
                    fast,
                    slow,
                    rss,
                    stopped,
                    last: counters,
                    at: now,
                    samples: 0,
                };
                seen.insert(job.root, fresh);
                continue;
            };
            let dt = now.duration_since(before.at);
            let rates = Rates::of(&counters.since(&before.last), dt);
            let fast = before.fast.then(rates, dt, FAST_HALF_LIFE);
            let slow = before.slow.then(rates, dt, SLOW_HALF_LIFE);
            let next = Seen {
                class: classify(&fast.rates, job.hint, reason.is_some()),
                reason,
                fast,
                slow,
                rss,
                stopped,
                last: counters,
                at: now,
                samples: before.samples + 1,
            };
            seen.insert(job.root, next);
        }
    }
}

/// How long process `pid` has been running: `starttime` of `/proc/PID/stat` (clock ticks after boot)
/// against the boot-time clock.
fn age(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // starttime is field 22 of stat, the 20th after the command.
    let ticks: u64 = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf with a constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&hz| hz > 0)?;
    let started = Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz);
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::from(boot).saturating_sub(started))
}

/// Resident bytes of process `pid` and whether it is stopped (`T` in `/proc/PID/stat`).
fn resident_and_stopped(pid: i32) -> (u64, bool) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command, which is in parentheses and may hold anything.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let stopped = fields.first().is_some_and(|s| *s == "T");
    // rss (in pages) is field 24 of stat, the 22nd after the command.
    let pages: u64 = fields.get(21).and_then(|v| v.parse().ok()).unwrap_or(0);
    (pages * page_size(), stopped)
}

fn page_size() -> u64 {
    // SAFETY: sysconf with a constant.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(cpu: f64, wait: f64, block_bps: f64, io_bps: f64, sleeps: f64) -> Rates {
        Rates { cpu, wait, block_bps, read_bps: io_bps, voluntary_switches: sleeps, ..Rates::default() }
    }

    #[test]
    fn a_spinner_is_cpu_bound_even_when_it_mostly_waits_for_a_cpu() {
        assert_eq!(classify(&rates(0.98, 0.0, 0.0, 0.0, 0.0), None, false), Class::Cpu);
        assert_eq!(classify(&rates(0.3, 0.7, 0.0, 0.0, 1.0), None, false), Class::Cpu);
    }

    #[test]
    fn synchronous_writes_are_io_bound_and_a_compressor_reading_cached_files_is_not() {
        // dd oflag=dsync: little CPU, blocks submitted, sleeping on each; on a busy node, it waits for a
        // CPU after each (measured with 8 spinners on its CPU: 1-6 % CPU, 70-95 % waiting, 300-3500 sleeps/s).
        assert_eq!(classify(&rates(0.1, 0.0, 2e6, 1e6, 250.0), None, false), Class::Io);
        assert_eq!(classify(&rates(0.02, 0.9, 2e6, 1e6, 1500.0), None, false), Class::Io);
        // gzip of a cached file: a whole CPU, bytes through read and write, rarely sleeping.
        assert_eq!(classify(&rates(0.95, 0.0, 0.0, 5e7, 2.0), None, false), Class::Cpu);
        // gzip of a file on disk: it reads from the disk, but computes for milliseconds between its reads.
        assert_eq!(classify(&rates(0.95, 0.0, 5e7, 5e7, 200.0), None, false), Class::Cpu);
        // A python spinner in the crowd, seconds after it read its modules from a cold disk: most of its time
        // waiting for the CPU, its start-up reads not yet forgotten, but it no longer sleeps.
        assert_eq!(classify(&rates(0.12, 0.85, 3e6, 0.0, 10.0), None, false), Class::Cpu);
    }

    #[test]
    fn a_sleeper_sleeps_and_a_hint_or_a_reason_decides() {
        assert_eq!(classify(&rates(0.001, 0.0, 0.0, 10.0, 1.0), None, false), Class::Sleeping);
        assert_eq!(classify(&rates(0.001, 0.0, 0.0, 0.0, 1.0), Some(Hint::CpuBound), false), Class::Cpu);
        assert_eq!(classify(&rates(0.99, 0.0, 0.0, 0.0, 0.0), Some(Hint::IoBound), false), Class::Io);
        assert_eq!(classify(&rates(0.99, 0.0, 0.0, 0.0, 0.0), Some(Hint::CpuBound), true), Class::Unmigratable);
    }

    #[test]
    fn fast_rates_follow_a_change_within_seconds_and_slow_ones_remember() {
        let busy = rates(1.0, 0.0, 0.0, 0.0, 0.0);
        let idle = Rates::default();
        let (mut fast, mut slow) = (busy, busy);
        for _ in 0..4 {
            fast = fast.decayed(idle, Duration::from_secs(1), FAST_HALF_LIFE);
            slow = slow.decayed(idle, Duration::from_secs(1), SLOW_HALF_LIFE);
        }
        assert_eq!(classify(&fast, None, false), Class::Sleeping, "{fast:?}");
        assert!(slow.cpu > 0.8, "{slow:?}");
    }

    #[test]
    fn a_first_look_gives_the_rates_seen_and_weighs_as_long_as_it_lasted() {
        let busy = rates(1.0, 0.0, 0.0, 0.0, 0.0);
        let idle = Rates::default();
        let first = Average::default().then(busy, Duration::from_millis(100), FAST_HALF_LIFE);
        assert!((first.rates.cpu - 1.0).abs() < 1e-9, "{first:?}");
        // 100 ms of start-up, then half a second asleep: a sleeper.
        let sleeper = first.then(idle, Duration::from_millis(500), FAST_HALF_LIFE);
        assert_eq!(classify(&sleeper.rates, None, false), Class::Sleeping, "{sleeper:?}");
        // Two seconds busy, then half a second asleep: still wants a CPU.
        let spinner = Average::default()
            .then(busy, Duration::from_secs(2), FAST_HALF_LIFE)
            .then(idle, Duration::from_millis(500), FAST_HALF_LIFE);
        assert_eq!(classify(&spinner.rates, None, false), Class::Cpu, "{spinner:?}");
        // Seen long enough, it is the usual decayed average.
        let mut long = Average::default();
        for _ in 0..40 {
            long = long.then(busy, Duration::from_millis(250), FAST_HALF_LIFE);
        }
        assert!((long.weight - 1.0).abs() < 1e-3, "{long:?}");
        let decayed = busy.decayed(idle, Duration::from_secs(1), FAST_HALF_LIFE);
        let averaged = long.then(idle, Duration::from_secs(1), FAST_HALF_LIFE);
        assert!((averaged.rates.cpu - decayed.cpu).abs() < 1e-3, "{averaged:?} {decayed:?}");
    }

    #[test]
    fn a_process_is_as_old_as_its_stat_says() {
        let mine = age(std::process::id().cast_signed()).unwrap();
        assert!(mine < Duration::from_hours(1), "{mine:?}");
        assert_eq!(age(i32::MAX), None);
    }

    #[test]
    fn rates_are_per_second() {
        let c = Counters { cpu_ns: 500_000_000, read_bytes: 2048, ..Counters::default() };
        let r = Rates::of(&c, Duration::from_secs(2));
        assert!((r.cpu - 0.25).abs() < 1e-9 && (r.read_bps - 1024.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn resident_memory_and_stop_state_are_read_from_stat() {
        let (rss, stopped) = resident_and_stopped(std::process::id().cast_signed());
        assert!(rss > 0 && !stopped);
    }
}
