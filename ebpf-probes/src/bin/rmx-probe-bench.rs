//! `rmx-probe-bench`: what the eBPF probes cost the processes of a node. `cargo xtask bench probes` runs it,
//! reads its standard output and writes BENCHMARKS.md; it lives in this crate, not in xtask, because
//! building the probes needs clang, which `cargo xtask setup` installs. It needs root (it loads the probes).
//!
//! # Workloads
//!
//! Each sample is one child process (this program again, `work`), pinned to one CPU, that waits for a byte
//! on its standard input, then does a fixed number of operations and prints the time they took:
//!
//! - `getppid`: `getppid()` by raw `syscall(2)`, nothing else: the cheapest system call, where anything
//!   the kernel runs on every system call (the `raw_syscalls` tracepoints of earlier probes) shows most.
//! - `read-zero`: 1-byte `read()`s of `/dev/zero`: a system call with a result, counted by the kernel's
//!   task I/O accounting that the probes report.
//! - `ping-pong`: a byte sent back and forth over two pipes between the child and a partner it forks after
//!   the start (so a watched job's partner is found by the probes' fork handling); both on the one CPU, so
//!   every round trip is two context switches, two wake-ups and four system calls.
//! - `cpu-loop`: 1024 xorshift steps per operation, no system call: only the scheduler's switches and ticks.
//!
//! The probes run on forks, exits and frees only, so none of these should pay anything for them but the
//! partner's fork and the exits; the workloads are the ones that measured the earlier, per-event probes.
//!
//! The time is measured by the child around its operations only (not its start, nor the fork of the
//! partner): wall time (`CLOCK_MONOTONIC`) and CPU time (`CLOCK_PROCESS_CPUTIME_ID`; for `ping-pong` the
//! partner's is added). The CPU time includes the probes' own run time, which the kernel charges to the task
//! current when they run (for a fork or an exit, the workload's process), and leaves out the time other
//! processes of a busy node take from the CPU, so it is the steadier figure.
//!
//! # Conditions
//!
//! - `a`: no probes loaded (this program has none; `others` says whether anyone else had some).
//! - `a2`: the same again, later in the round: `a2` against `a` is the noise floor of the comparison.
//! - `b`: probes loaded and attached; the child is in no job, so each of its events the probes run on (its
//!   partner's fork, the exits and frees) costs the lookup that finds it is not watched.
//! - `c`: probes loaded; the child is watched as a job (`Probes::watch` with its pid, before its start
//!   byte) and counted, with its partner. After the sample the job's counters are checked against the work
//!   done (a watch that counted nothing would measure `b` twice) and the job is unwatched. The reading
//!   (`/proc` and the maps, by this program) is not part of the child's time.
//!
//! The operation counts are calibrated once, at the start, from a short run of each workload with no
//! probes, to take `--sample-ms` each. Then each round runs every condition, in the order `a b c a2`
//! turned by one place every second round and run backwards in the rounds between, and within a condition
//! every workload, in an order also turned per round: drift of the machine spreads over all conditions, and
//! `b` and `c` come first after a load equally often. The probes are loaded when a round enters `b` or `c`
//! with none loaded and dropped (detached and unloaded) when it enters `a` or `a2`, a few times per round;
//! each change is followed by a pause, so that what the kernel does late (freeing, patching the
//! trampolines of every CPU) does not land in a sample.
//! This program stays off the benchmark CPU when it may use another.
//!
//! # Output
//!
//! Standard output, one record per line, read by xtask (`xtask/src/bench_probes.rs`):
//!
//! ```text
//! bench cpu=1 rounds=11 sample_ms=1000
//! workload getppid 9523810 getppid() by syscall(2)
//! probes kind=tp_btf programs=3
//! sample round=0 condition=a workload=getppid ops=9523810 wall_ns=... cpu_ns=... others=0
//! sample round=0 condition=c workload=getppid ops=9523810 wall_ns=... cpu_ns=... others=0 syscalls=... job_cpu_ns=...
//! end
//! ```
//!
//! `workload` lines give the name, the operations per sample and what one operation is; `probes` the kind
//! loaded and how many tracing programs loading them added; `others` counts tracing programs loaded by
//! someone else when the sample started or ended (a sample with others is disturbed); `syscalls` and
//! `job_cpu_ns` are what the probes counted for a watched sample. Progress goes to standard error.
//!
//! Exit status: 0 when every sample ran, 1 otherwise (the error is printed).

use std::fs::File;
use std::hint::black_box;
use std::io::{self, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use aya::programs::{ProgramType, loaded_programs};
use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::sys::wait::waitpid;
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{ForkResult, Pid, fork, pipe};
use rmosix_ebpf_probes::{Counters, Probes};

/// How long to wait after loading or dropping the probes before the next sample.
const SETTLE: Duration = Duration::from_millis(500);

/// xorshift steps in one operation of `cpu-loop`.
const STEPS_PER_OP: u32 = 1024;

/// Round trips of `ping-pong` before its clocks start: the partner is running and both are warm.
const PING_PONG_WARMUP: u64 = 1000;

/// The byte of the first timed round trip of `ping-pong`; the partner starts its CPU clock on it.
const PING_PONG_START: u8 = 1;

/// The program types that run on tracepoints and probes: another user of them on the node disturbs a sample.
const TRACING_TYPES: [ProgramType; 5] = [
    ProgramType::Tracing,
    ProgramType::RawTracePoint,
    ProgramType::RawTracePointWritable,
    ProgramType::TracePoint,
    ProgramType::KProbe,
];

#[derive(Debug, Parser)]
#[command(name = "rmx-probe-bench", about = "What the eBPF probes cost the processes of a node (needs root)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Every workload in every condition, round after round; one line per sample on standard output.
    Run(RunArgs),
    /// One sample (run by `run`): pin to CPU, wait for a byte on standard input, work, print the times.
    #[command(hide = true)]
    Work {
        /// What to do.
        workload: Workload,
        /// How many operations.
        ops: u64,
        /// The CPU to run on.
        #[arg(long)]
        cpu: usize,
    },
}

/// Options of `rmx-probe-bench run`.
#[derive(Debug, Args)]
struct RunArgs {
    /// Rounds; each runs every workload in every condition once.
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// How long one sample should take, ms (the operation counts are calibrated to it at the start).
    #[arg(long, default_value_t = 1000)]
    sample_ms: u64,
    /// The CPU the workloads run on; by default the last one this process may use.
    #[arg(long)]
    cpu: Option<usize>,
}

/// What a sample's child does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// `getppid()` by raw system call.
    Getppid,
    /// 1-byte `read()`s of `/dev/zero`.
    ReadZero,
    /// 1-byte round trips over two pipes with a forked partner on the same CPU.
    PingPong,
    /// Arithmetic, no system calls.
    CpuLoop,
}

impl Workload {
    const ALL: [Workload; 4] = [Workload::Getppid, Workload::ReadZero, Workload::PingPong, Workload::CpuLoop];

    /// The name on the command line and in the output.
    fn name(self) -> &'static str {
        match self {
            Workload::Getppid => "getppid",
            Workload::ReadZero => "read-zero",
            Workload::PingPong => "ping-pong",
            Workload::CpuLoop => "cpu-loop",
        }
    }

    /// What one operation is.
    fn op(self) -> &'static str {
        match self {
            Workload::Getppid => "getppid() by syscall(2)",
            Workload::ReadZero => "1-byte read() of /dev/zero",
            Workload::PingPong => "1-byte round trip over two pipes, two processes on one CPU",
            Workload::CpuLoop => "1024 xorshift64 steps",
        }
    }

    /// Operations of the calibration run: a few tens of milliseconds.
    fn calibration_ops(self) -> u64 {
        match self {
            Workload::Getppid => 200_000,
            Workload::ReadZero => 100_000,
            Workload::PingPong => 10_000,
            Workload::CpuLoop => 20_000,
        }
    }

    /// The fewest system calls the probes must count for a watched sample of `ops` operations. They count
    /// read- and write-family calls only (the kernel's `syscr` and `syscw`): not `getppid`.
    fn min_syscalls(self, ops: u64) -> u64 {
        match self {
            Workload::ReadZero => ops,
            // A write and a read on each side.
            Workload::PingPong => 4 * ops,
            Workload::Getppid | Workload::CpuLoop => 0,
        }
    }

    /// Does `ops` operations and returns their times.
    fn work(self, ops: u64) -> anyhow::Result<Times> {
        match self {
            Workload::Getppid => Ok(getppid_loop(ops)),
            Workload::ReadZero => read_zero(ops),
            Workload::PingPong => ping_pong(ops),
            Workload::CpuLoop => Ok(cpu_loop(ops)),
        }
    }
}

/// The probes' state during a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    /// No probes loaded.
    Unloaded,
    /// No probes loaded, a second time: the noise floor.
    UnloadedAgain,
    /// Probes loaded, the workload not watched.
    Loaded,
    /// Probes loaded, the workload watched as a job.
    Watched,
}

impl Condition {
    /// The order within round 0.
    const ORDER: [Condition; 4] =
        [Condition::Unloaded, Condition::Loaded, Condition::Watched, Condition::UnloadedAgain];

    /// The order within round `round`: [`Condition::ORDER`] turned by one place every second round, and
    /// backwards in odd rounds, so that `b` and `c` each follow a load of the probes as often as the other.
    fn order(round: usize) -> [Condition; 4] {
        let mut order: [Condition; 4] =
            std::array::from_fn(|i| Condition::ORDER[(round / 2 + i) % Condition::ORDER.len()]);
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }

    /// The name in the output.
    fn name(self) -> &'static str {
        match self {
            Condition::Unloaded => "a",
            Condition::UnloadedAgain => "a2",
            Condition::Loaded => "b",
            Condition::Watched => "c",
        }
    }

    fn needs_probes(self) -> bool {
        matches!(self, Condition::Loaded | Condition::Watched)
    }
}

/// What some work took.
#[derive(Debug, Clone, Copy, Default)]
struct Times {
    /// Wall time, ns.
    wall_ns: u64,
    /// CPU time of the workload's processes, ns.
    cpu_ns: u64,
}

/// Clock readings at the start of some work.
struct Start {
    wall_ns: u64,
    cpu_ns: u64,
}

impl Start {
    fn now() -> Start {
        Start { wall_ns: clock_ns(ClockId::CLOCK_MONOTONIC), cpu_ns: clock_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID) }
    }

    fn elapsed(&self) -> Times {
        let cpu_ns = clock_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        let wall_ns = clock_ns(ClockId::CLOCK_MONOTONIC);
        Times { wall_ns: wall_ns.saturating_sub(self.wall_ns), cpu_ns: cpu_ns.saturating_sub(self.cpu_ns) }
    }
}

/// A clock, in ns.
fn clock_ns(clock: ClockId) -> u64 {
    let now = clock_gettime(clock).expect("the monotonic and process CPU clocks are always there");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Work { workload, ops, cpu } => work(workload, ops, cpu),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rmx-probe-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs every sample and prints them.
fn run(args: &RunArgs) -> anyhow::Result<()> {
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.sample_ms >= 1, "--sample-ms must be at least 1");
    let bench = Bench { exe: std::env::current_exe().context("cannot find this program")?, cpu: bench_cpu(args.cpu)? };
    keep_off(bench.cpu)?;
    println!("bench cpu={} rounds={} sample_ms={}", bench.cpu, args.rounds, args.sample_ms);

    let mut ops = Vec::new();
    for workload in Workload::ALL {
        let calibration = workload.calibration_ops();
        let sample = bench.sample(workload, calibration, None)?;
        let n =
            u128::from(args.sample_ms) * 1_000_000 * u128::from(calibration) / u128::from(sample.times.wall_ns.max(1));
        let n = u64::try_from(n).unwrap_or(u64::MAX).max(1);
        println!("workload {} {n} {}", workload.name(), workload.op());
        ops.push((workload, n));
    }

    let base = tracing_programs()?;
    let mut probes: Option<Probes> = None;
    let mut ours: Option<usize> = None;
    for round in 0..args.rounds {
        for condition in Condition::order(round) {
            if condition.needs_probes() != probes.is_some() {
                probes = None;
                if condition.needs_probes() {
                    let loaded = Probes::load().context("cannot load the probes")?;
                    if ours.is_none() {
                        let programs = tracing_programs()?.saturating_sub(base);
                        println!("probes kind={} programs={programs}", loaded.kind());
                        ours = Some(programs);
                    }
                    probes = Some(loaded);
                }
                std::thread::sleep(SETTLE);
            }
            let expected = if probes.is_some() { ours.unwrap_or(0) } else { 0 };
            for j in 0..ops.len() {
                let (workload, n) = ops[(round + j) % ops.len()];
                let watch = match (&probes, condition) {
                    (Some(probes), Condition::Watched) => Some(probes),
                    _ => None,
                };
                let before = tracing_programs()?.saturating_sub(expected);
                let sample = bench.sample(workload, n, watch)?;
                let others = before.max(tracing_programs()?.saturating_sub(expected));
                let counted = sample
                    .counted
                    .map_or_else(String::new, |c| format!(" syscalls={} job_cpu_ns={}", c.syscalls, c.cpu_ns));
                println!(
                    "sample round={round} condition={} workload={} ops={n} wall_ns={} cpu_ns={} others={others}{counted}",
                    condition.name(),
                    workload.name(),
                    sample.times.wall_ns,
                    sample.times.cpu_ns,
                );
            }
        }
        eprintln!("rmx-probe-bench: round {} of {} done", round + 1, args.rounds);
    }
    println!("end");
    Ok(())
}

/// Where and how samples run.
struct Bench {
    /// This program, run again for each sample.
    exe: PathBuf,
    /// The CPU the workloads are pinned to.
    cpu: usize,
}

/// One sample's result.
struct Sample {
    /// As measured by the workload.
    times: Times,
    /// What the probes counted, when the workload was watched.
    counted: Option<Counters>,
}

impl Bench {
    /// Runs `ops` operations of `workload` in a child; watched as a job by `watch` if given.
    fn sample(&self, workload: Workload, ops: u64, watch: Option<&Probes>) -> anyhow::Result<Sample> {
        let mut child = Command::new(&self.exe)
            .args(["work", workload.name(), &ops.to_string(), "--cpu", &self.cpu.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.exe.display()))?;
        // The child's pid is its job's key, as the host pid of a job's root is for migd.
        let job = child.id();
        if let Some(probes) = watch
            && let Err(error) = probes.watch(job, &[job])
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(error).with_context(|| format!("cannot watch the {} workload, pid {job}", workload.name()));
        }
        // The start byte; closing the pipe after it would do as well.
        child.stdin.take().context("no stdin")?.write_all(b"g").context("cannot start the workload")?;
        let output = child.wait_with_output().context("cannot wait for the workload")?;
        ensure!(output.status.success(), "the {} workload, pid {job}, failed ({})", workload.name(), output.status);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let times = parse_times(&stdout)
            .with_context(|| format!("the {} workload printed {:?}", workload.name(), stdout.trim()))?;
        let counted = match watch {
            None => None,
            Some(probes) => {
                let counters = probes.job_counters(job).context("cannot read the probes")?;
                probes.unwatch_job(job).context("cannot unwatch the job")?;
                check_counted(workload, ops, times, &counters)?;
                Some(counters)
            }
        };
        Ok(Sample { times, counted })
    }
}

/// Fails unless the probes counted a watched sample's work: otherwise `c` would measure `b` again.
fn check_counted(workload: Workload, ops: u64, times: Times, counters: &Counters) -> anyhow::Result<()> {
    let min_syscalls = workload.min_syscalls(ops);
    if counters.syscalls < min_syscalls || counters.cpu_ns < times.cpu_ns / 2 {
        bail!(
            "the probes did not follow the watched {} workload: they counted {} system calls and {} ns on a CPU, \
             for work of at least {min_syscalls} system calls and {} ns",
            workload.name(),
            counters.syscalls,
            counters.cpu_ns,
            times.cpu_ns
        );
    }
    Ok(())
}

/// `wall_ns=W cpu_ns=C`, as [`work`] prints it.
fn parse_times(line: &str) -> Option<Times> {
    let mut times = Times::default();
    for word in line.split_whitespace() {
        match word.split_once('=')? {
            ("wall_ns", v) => times.wall_ns = v.parse().ok()?,
            ("cpu_ns", v) => times.cpu_ns = v.parse().ok()?,
            _ => return None,
        }
    }
    (times.wall_ns > 0).then_some(times)
}

/// The CPU to run the workloads on: `wanted`, or the last one this process may use.
fn bench_cpu(wanted: Option<usize>) -> anyhow::Result<usize> {
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("cannot read this process's CPU affinity")?;
    let usable = |cpu: usize| allowed.is_set(cpu).unwrap_or(false);
    match wanted {
        Some(cpu) => {
            ensure!(usable(cpu), "CPU {cpu} is not one this process may use");
            Ok(cpu)
        }
        None => (0..CpuSet::count()).rev().find(|&cpu| usable(cpu)).context("this process may use no CPU"),
    }
}

/// Keeps this process (loading probes, reading maps, spawning) off the benchmark CPU, if it has another.
fn keep_off(cpu: usize) -> anyhow::Result<()> {
    let mut allowed = sched_getaffinity(Pid::from_raw(0)).context("cannot read this process's CPU affinity")?;
    allowed.unset(cpu).context("bad CPU number")?;
    if (0..CpuSet::count()).any(|c| allowed.is_set(c).unwrap_or(false)) {
        sched_setaffinity(Pid::from_raw(0), &allowed).context("cannot move off the benchmark CPU")?;
    }
    Ok(())
}

/// How many programs that run on tracepoints or probes are loaded on the node.
fn tracing_programs() -> anyhow::Result<usize> {
    let mut count = 0;
    for program in loaded_programs() {
        let program = program.context("cannot list the loaded eBPF programs")?;
        let kind = program.program_type();
        if TRACING_TYPES.into_iter().any(|t| kind == t.into()) {
            count += 1;
        }
    }
    Ok(count)
}

/// A sample's child: pins itself, waits for the start byte, works, prints `wall_ns=W cpu_ns=C`.
fn work(workload: Workload, ops: u64, cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu).context("bad CPU number")?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("cannot pin to CPU {cpu}"))?;
    let mut start = [0u8; 1];
    io::stdin().read_exact(&mut start).context("no start byte")?;
    let times = workload.work(ops)?;
    println!("wall_ns={} cpu_ns={}", times.wall_ns, times.cpu_ns);
    Ok(())
}

fn getppid_loop(ops: u64) -> Times {
    let start = Start::now();
    for _ in 0..ops {
        // SAFETY: getppid has no arguments and cannot fail. By raw syscall: no library caches it.
        black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
    start.elapsed()
}

fn read_zero(ops: u64) -> anyhow::Result<Times> {
    let mut zero = File::open("/dev/zero").context("cannot open /dev/zero")?;
    let mut byte = [0u8; 1];
    let start = Start::now();
    for _ in 0..ops {
        ensure!(zero.read(&mut byte).context("cannot read /dev/zero")? == 1, "short read of /dev/zero");
    }
    Ok(start.elapsed())
}

fn cpu_loop(ops: u64) -> Times {
    let mut x: u64 = black_box(0x9E37_79B9_7F4A_7C15);
    let start = Start::now();
    for _ in 0..ops {
        for _ in 0..STEPS_PER_OP {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        x = black_box(x);
    }
    let times = start.elapsed();
    black_box(x);
    times
}

fn ping_pong(ops: u64) -> anyhow::Result<Times> {
    let (to_partner_rx, to_partner_tx) = pipe().context("cannot make a pipe")?;
    let (from_partner_rx, from_partner_tx) = pipe().context("cannot make a pipe")?;
    // SAFETY: this process has one thread; the child only reads, writes and exits.
    match unsafe { fork() }.context("cannot fork the partner")? {
        ForkResult::Child => {
            drop(to_partner_tx);
            drop(from_partner_rx);
            let status = i32::from(partner(File::from(to_partner_rx), File::from(from_partner_tx)).is_err());
            // SAFETY: ends the partner at once, without the destructors and buffers it shares with its parent.
            unsafe { libc::_exit(status) }
        }
        ForkResult::Parent { child } => {
            drop(to_partner_rx);
            drop(from_partner_tx);
            let mut tx = File::from(to_partner_tx);
            let mut rx = File::from(from_partner_rx);
            for _ in 0..PING_PONG_WARMUP {
                round_trip(&mut tx, &mut rx, 0)?;
            }
            let start = Start::now();
            round_trip(&mut tx, &mut rx, PING_PONG_START)?;
            for _ in 1..ops {
                round_trip(&mut tx, &mut rx, 0)?;
            }
            let mine = start.elapsed();
            // End of input: the partner sends its CPU time and exits.
            drop(tx);
            let mut partner_cpu = [0u8; 8];
            rx.read_exact(&mut partner_cpu).context("the partner did not report its CPU time")?;
            waitpid(child, None).context("cannot wait for the partner")?;
            Ok(Times { wall_ns: mine.wall_ns, cpu_ns: mine.cpu_ns + u64::from_le_bytes(partner_cpu) })
        }
    }
}

fn round_trip(tx: &mut File, rx: &mut File, byte: u8) -> anyhow::Result<()> {
    tx.write_all(&[byte]).context("cannot write to the partner")?;
    let mut back = [0u8; 1];
    rx.read_exact(&mut back).context("the partner did not answer")?;
    Ok(())
}

/// The other end of `ping-pong`: echoes every byte until end of input, then sends its CPU time since the
/// start byte.
fn partner(mut rx: File, mut tx: File) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut cpu_start = clock_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID);
    while rx.read(&mut byte)? == 1 {
        if byte[0] == PING_PONG_START {
            cpu_start = clock_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        }
        tx.write_all(&byte)?;
    }
    let cpu = clock_ns(ClockId::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu_start);
    tx.write_all(&cpu.to_le_bytes())
}
