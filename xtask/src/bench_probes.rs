//! `cargo xtask bench probes`: what the eBPF probes (`ebpf-probes`) cost the processes of a node, beside
//! the same processes with no probes loaded, in the same run, on the same CPU.
//!
//! The measuring is done by `rmx-probe-bench` (`ebpf-probes/src/bin/rmx-probe-bench.rs`, where the
//! method is described in full): xtask must build before `cargo xtask setup` has installed clang, so it
//! does not link the probes; it builds and runs that program, reads its samples, and does the statistics.
//!
//! Four workloads, each sample one child process pinned to one CPU doing a fixed amount of work, timed by
//! the child around the work only: `getppid` by raw system call, 1-byte `read`s of `/dev/zero`, a 1-byte
//! ping-pong over two pipes with a partner process on the same CPU (two context switches per round trip),
//! and a CPU-bound arithmetic loop. Each in four conditions: (a) no probes loaded, (b) probes loaded and
//! attached, the workload in no job (each fork, exit or free pays the lookup that finds it unwatched),
//! (c) probes loaded, the workload watched as a job from before its start (its partner followed through
//! the fork), and (a2) no probes again, the noise floor. Every round runs each condition once, the order of the
//! conditions turned by one place every second round and backwards in the rounds between (so b and c follow
//! a load equally often), that of the workloads turned by one place per round; the probes are loaded once on
//! entering b or c and dropped (detached, unloaded) on entering a or a2, with a pause of half a second after.
//!
//! The figure is CPU time per operation (`CLOCK_PROCESS_CPUTIME_ID` of the workload's processes): it
//! includes the probes' run time, charged by the kernel to the task they run in, and not the time other
//! processes of a shared machine take from the CPU. Wall time is reported beside it. The overhead of b
//! (and c, and a2) is the median over rounds of each round's b/a - 1: samples of one round ran seconds
//! apart, so the ratio cancels most of the machine's drift; its interquartile range over rounds is the
//! spread. Targets (per workload): under 2 % for watched jobs (c), under 0.5 % for processes outside jobs
//! (b); met only if every workload meets both. The noise floor (a2 vs a) says how far those figures can
//! be trusted: on a shared VM it is often near 0.5 % itself.

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

use crate::benchmarks::{load_average, machine, verdict};

/// Options of `cargo xtask bench probes`.
#[derive(Debug, Args)]
pub struct ProbesBenchArgs {
    /// Rounds; each runs every workload in every condition once (the median over rounds is reported).
    #[arg(long, default_value_t = 11)]
    pub rounds: usize,
    /// How long one sample runs, ms (operation counts are calibrated to it at the start).
    #[arg(long, default_value_t = 1000)]
    pub sample_ms: u64,
    /// A check that everything works: 3 rounds of 150 ms samples, in about half a minute. Does not write
    /// BENCHMARKS.md: its figures are too few to keep.
    #[arg(long)]
    pub quick: bool,
    /// The CPU the workloads run on; by default the last one.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
    /// Rounds of the 20-job classification mix (`--quick`: 1).
    #[arg(long, default_value_t = 3)]
    pub class_rounds: usize,
}

/// The most the probes may add to a watched job's operations, percent.
const TARGET_JOBS_PERCENT: f64 = 2.0;
/// The most the probes may add to the operations of a process outside any job, percent.
const TARGET_OUTSIDE_PERCENT: f64 = 0.5;
/// `--quick`: rounds, and ms per sample.
const QUICK: (usize, u64) = (3, 150);
/// The fewest rounds whose median the section is written from.
const MIN_ROUNDS_TO_WRITE: usize = 7;

/// The probes' state during a sample (`condition=` in the program's output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    /// a: no probes loaded.
    Unloaded,
    /// a2: no probes loaded, again.
    UnloadedAgain,
    /// b: loaded, the workload not watched.
    Loaded,
    /// c: loaded, the workload watched as a job.
    Watched,
}

impl Condition {
    fn parse(name: &str) -> Option<Condition> {
        Some(match name {
            "a" => Condition::Unloaded,
            "a2" => Condition::UnloadedAgain,
            "b" => Condition::Loaded,
            "c" => Condition::Watched,
            _ => return None,
        })
    }
}

/// A workload, as `rmx-probe-bench` described it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Workload {
    name: String,
    /// Operations per sample.
    ops: u64,
    /// What one operation is.
    op: String,
}

/// One sample.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sample {
    round: usize,
    condition: Condition,
    workload: String,
    ops: u64,
    wall_ns: u64,
    cpu_ns: u64,
    /// Tracing programs someone else had loaded during the sample.
    others: usize,
}

impl Sample {
    /// CPU or wall time per operation, ns.
    fn per_op(&self, clock: Clock) -> f64 {
        let ns = match clock {
            Clock::Cpu => self.cpu_ns,
            Clock::Wall => self.wall_ns,
        };
        as_f64(ns) / as_f64(self.ops.max(1))
    }
}

/// Which time of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Cpu,
    Wall,
}

/// What `rmx-probe-bench run` printed.
#[derive(Debug, Default)]
struct Run {
    cpu: usize,
    /// The kind of probes loaded (`tp_btf` or `raw_tp`).
    kind: String,
    /// Tracing programs the probes are.
    programs: usize,
    workloads: Vec<Workload>,
    samples: Vec<Sample>,
}

impl Run {
    /// Reads the program's output (its format is in its module doc).
    fn parse(output: &str) -> anyhow::Result<Run> {
        let mut run = Run::default();
        let mut ended = false;
        for line in output.lines() {
            let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
            let fields = |rest: &str| -> Vec<(String, String)> {
                rest.split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            };
            match tag {
                "bench" => run.cpu = number(&fields(rest), "cpu", line)?,
                "workload" => {
                    let mut words = rest.splitn(3, ' ');
                    let (Some(name), Some(ops), Some(op)) = (words.next(), words.next(), words.next()) else {
                        bail!("bad workload line: {line}");
                    };
                    let ops = ops.parse().with_context(|| format!("bad workload line: {line}"))?;
                    run.workloads.push(Workload { name: name.to_owned(), ops, op: op.to_owned() });
                }
                "probes" => {
                    let f = fields(rest);
                    run.kind = text(&f, "kind", line)?;
                    run.programs = number(&f, "programs", line)?;
                }
                "sample" => {
                    let f = fields(rest);
                    let condition = text(&f, "condition", line)?;
                    run.samples.push(Sample {
                        round: number(&f, "round", line)?,
                        condition: Condition::parse(&condition)
                            .with_context(|| format!("unknown condition {condition}: {line}"))?,
                        workload: text(&f, "workload", line)?,
                        ops: number(&f, "ops", line)?,
                        wall_ns: number(&f, "wall_ns", line)?,
                        cpu_ns: number(&f, "cpu_ns", line)?,
                        others: number(&f, "others", line)?,
                    });
                }
                "end" => ended = true,
                _ => {}
            }
        }
        ensure!(ended, "rmx-probe-bench stopped before its end");
        ensure!(!run.workloads.is_empty() && !run.samples.is_empty(), "rmx-probe-bench measured nothing");
        Ok(run)
    }

    /// The samples of one workload in one condition, by round.
    fn samples(&self, workload: &str, condition: Condition) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.workload == workload && s.condition == condition)
    }

    /// How many rounds ran.
    fn rounds(&self) -> usize {
        self.samples.iter().map(|s| s.round + 1).max().unwrap_or(0)
    }
}

fn text(fields: &[(String, String)], key: &str, line: &str) -> anyhow::Result<String> {
    fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone()).with_context(|| format!("no {key}= in: {line}"))
}

fn number<T: std::str::FromStr>(fields: &[(String, String)], key: &str, line: &str) -> anyhow::Result<T> {
    text(fields, key, line)?.parse().map_err(|_| anyhow::anyhow!("bad {key}= in: {line}"))
}

#[expect(clippy::cast_precision_loss, reason = "counts and nanoseconds far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

/// Linear-interpolation quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n => {
            let position = q * as_f64(n as u64 - 1);
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 <= position < n")]
            let below = position.floor() as usize;
            let above = (below + 1).min(n - 1);
            sorted[below] + (sorted[above] - sorted[below]) * (position - position.floor())
        }
    }
}

/// A figure over rounds: its median and quartiles.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Spread {
    median: f64,
    q1: f64,
    q3: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread { median: quantile(&values, 0.5), q1: quantile(&values, 0.25), q3: quantile(&values, 0.75) }
    }

    /// `+1.23 % (IQR +0.90 to +1.50)`.
    fn percent(&self) -> String {
        format!("{:+.2} % ({:+.2} to {:+.2})", self.median, self.q1, self.q3)
    }
}

/// One workload's figures, from one clock.
#[derive(Debug, Clone, Copy)]
struct Figures {
    /// Median ns per operation in a, b, c.
    a: f64,
    b: f64,
    c: f64,
    /// Per-round ratios to a, in percent above it.
    b_vs_a: Spread,
    c_vs_a: Spread,
    a2_vs_a: Spread,
}

impl Figures {
    fn of(run: &Run, workload: &str, clock: Clock) -> anyhow::Result<Figures> {
        let median_per_op = |condition| -> f64 {
            Spread::of(run.samples(workload, condition).map(|s| s.per_op(clock)).collect()).median
        };
        let vs_a = |condition| -> anyhow::Result<Spread> {
            let mut ratios = Vec::new();
            for sample in run.samples(workload, condition) {
                let a = run
                    .samples(workload, Condition::Unloaded)
                    .find(|a| a.round == sample.round)
                    .with_context(|| format!("no sample of {workload} without probes in round {}", sample.round))?;
                ratios.push((sample.per_op(clock) / a.per_op(clock) - 1.0) * 100.0);
            }
            ensure!(!ratios.is_empty(), "no samples of {workload}");
            Ok(Spread::of(ratios))
        };
        Ok(Figures {
            a: median_per_op(Condition::Unloaded),
            b: median_per_op(Condition::Loaded),
            c: median_per_op(Condition::Watched),
            b_vs_a: vs_a(Condition::Loaded)?,
            c_vs_a: vs_a(Condition::Watched)?,
            a2_vs_a: vs_a(Condition::UnloadedAgain)?,
        })
    }

    /// Both targets met.
    fn met(&self) -> bool {
        self.c_vs_a.median < TARGET_JOBS_PERCENT && self.b_vs_a.median < TARGET_OUTSIDE_PERCENT
    }
}

/// What the section and the summary line say.
#[derive(Debug)]
struct Report {
    /// Per workload: CPU-time and wall-time figures.
    rows: Vec<(Workload, Figures, Figures)>,
}

impl Report {
    fn of(run: &Run) -> anyhow::Result<Report> {
        let rows = run
            .workloads
            .iter()
            .map(|w| Ok((w.clone(), Figures::of(run, &w.name, Clock::Cpu)?, Figures::of(run, &w.name, Clock::Wall)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Report { rows })
    }

    fn met(&self) -> bool {
        self.rows.iter().all(|(_, cpu, _)| cpu.met())
    }

    /// The workload with the largest median of `figure` (CPU time), and that median.
    fn worst(&self, figure: impl Fn(&Figures) -> Spread) -> (&str, f64) {
        self.rows
            .iter()
            .map(|(w, cpu, _)| (w.name.as_str(), figure(cpu).median))
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap_or(("none", f64::NAN))
    }

    /// The noise floor: the quartile of a2 vs a farthest from 0 over the workloads, percent: half the
    /// rounds of every workload had two runs with no probes at all closer than that.
    fn noise(&self) -> f64 {
        self.rows.iter().map(|(_, cpu, _)| cpu.a2_vs_a.q1.abs().max(cpu.a2_vs_a.q3.abs())).fold(0.0, f64::max)
    }

    /// The summary line without its verdict.
    fn figures(&self, rounds: usize) -> String {
        let (jobs, jobs_worst) = self.worst(|f| f.c_vs_a);
        let (outside, outside_worst) = self.worst(|f| f.b_vs_a);
        format!(
            "probes: CPU time per operation up to {jobs_worst:+.2}% in watched jobs ({jobs}), {outside_worst:+.2}% \
             outside jobs ({outside}), median of {rounds} rounds; noise floor (a2 vs a, quartiles) within \
             ±{:.2}% (target < {TARGET_JOBS_PERCENT}% in jobs and < {TARGET_OUTSIDE_PERCENT}% outside, every \
             workload)",
            self.noise(),
        )
    }

    fn tables(&self) -> (String, String) {
        let mut cpu = String::from(
            "| workload: one operation | per sample | a: no probes | b: loaded, not watched | c: watched job | \
             b vs a | c vs a | noise: a2 vs a | target |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        let mut wall = String::from(
            "| workload | a: no probes | b | c | b vs a | c vs a | noise: a2 vs a |\n|---|---|---|---|---|---|---|\n",
        );
        for (w, c, t) in &self.rows {
            let _ = writeln!(
                cpu,
                "| `{}`: {} | {} | {:.1} ns | {:.1} ns | {:.1} ns | {} | {} | {} | {} |",
                w.name,
                w.op,
                w.ops,
                c.a,
                c.b,
                c.c,
                c.b_vs_a.percent(),
                c.c_vs_a.percent(),
                c.a2_vs_a.percent(),
                verdict(c.met())
            );
            let _ = writeln!(
                wall,
                "| `{}` | {:.1} ns | {:.1} ns | {:.1} ns | {} | {} | {} |",
                w.name,
                t.a,
                t.b,
                t.c,
                t.b_vs_a.percent(),
                t.c_vs_a.percent(),
                t.a2_vs_a.percent()
            );
        }
        (cpu, wall)
    }
}

/// Runs the benchmark.
pub fn run(args: &ProbesBenchArgs) -> anyhow::Result<()> {
    let (rounds, sample_ms) = if args.quick { QUICK } else { (args.rounds, args.sample_ms) };
    ensure!(rounds >= 1 && sample_ms >= 1, "--rounds and --sample-ms must be at least 1");
    // clang, libbpf-dev and bpftool, which building the probes needs.
    crate::setup::run()?;
    // The one program this benchmark runs (the rest of the workspace plays no part in it).
    let status = crate::cargo()
        .args(["build", "--quiet", "--release", "--package", "rmosix-ebpf-probes", "--bin", "rmx-probe-bench"])
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "cargo build --release of rmx-probe-bench failed ({status})");
    let program = crate::release_bin_dir().join("rmx-probe-bench");

    let load_before = load_average();
    eprintln!(
        "bench probes: {rounds} rounds of 4 workloads x 4 conditions, {sample_ms} ms per sample (about {} s)",
        u64::try_from(rounds).unwrap_or(u64::MAX).saturating_mul(16 * sample_ms) / 1000 + 5
    );
    let mut command = Command::new(&program);
    command.args(["run", "--rounds", &rounds.to_string(), "--sample-ms", &sample_ms.to_string()]);
    if let Some(cpu) = args.cpu {
        command.args(["--cpu", &cpu.to_string()]);
    }
    let mut child =
        command.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot run {}", program.display()))?;
    let mut output = String::new();
    for line in std::io::BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line.context("cannot read rmx-probe-bench's output")?;
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait().context("cannot wait for rmx-probe-bench")?;
    ensure!(status.success(), "rmx-probe-bench failed ({status})");
    let load_after = load_average();

    let run = Run::parse(&output)?;
    let report = Report::of(&run)?;
    let (cpu_table, wall_table) = report.tables();
    let disturbed = run.samples.iter().filter(|s| s.others > 0).count();
    let disturbance = if disturbed == 0 {
        "No other tracing eBPF program was loaded during any sample.".to_owned()
    } else {
        format!(
            "**{disturbed} of {} samples ran while someone else had tracing eBPF programs loaded** (another user of \
             the tracepoints, such as a test run loading the probes): their figures include that cost.",
            run.samples.len()
        )
    };
    let body = format!(
        "Reproduce: `cargo xtask bench probes` (release build; `--rounds {rounds} --sample-ms {sample_ms}`). Run {}; \
         probes attached as `{}` ({} programs); workloads pinned to CPU {}, the benchmark's own process kept off it; \
         load average {load_before} before, {load_after} after. {disturbance}\n\n\
         Each sample is a child process doing a fixed number of operations (calibrated once to about {sample_ms} ms \
         with no probes), timed by itself around the operations only. Conditions: *a*, no probes loaded; *b*, the \
         probes loaded and attached, the workload in no job (each event the probes run on, a fork, an exit or a \
         free, pays the lookup that finds it unwatched); *c*, the workload watched as a job from before its start \
         (`ping-pong`'s partner is followed through its fork); *a2*, no probes again, the noise floor. Each round \
         runs every condition once, the order of conditions turned by one place every second round and backwards \
         in the rounds between (so that b and c follow a load equally often), that of the workloads by one place \
         per round; the probes are loaded on entering b or c and dropped (detached and unloaded) on entering a or \
         a2, with half a second's pause after each. Each of c's \
         samples is checked to have been counted by the probes.\n\n\
         CPU time per operation (`CLOCK_PROCESS_CPUTIME_ID` of the workload's processes: it includes what the \
         probes run in the kernel and leaves out what other processes take from the CPU), median of {} rounds. \
         *x vs a* is the median over rounds of that round's x / a - 1, with its interquartile range over rounds in \
         brackets. Target: under {TARGET_JOBS_PERCENT} % in c and under {TARGET_OUTSIDE_PERCENT} % in b, for every \
         workload. The noise floor says how far a figure near 0.5 % can be told from noise on this machine.\n\n\
         {cpu_table}\nWall time per operation, the same samples:\n\n{wall_table}",
        machine(),
        run.kind,
        run.programs,
        run.cpu,
        run.rounds(),
    );
    // The classification half: real jobs on a local cluster of the debug build.
    crate::build()?;
    let class_rounds = if args.quick { 1 } else { args.class_rounds.max(1) };
    eprintln!("bench probes: {class_rounds} rounds of the 20-job classification mix");
    let accuracy = crate::bench_classes::measure(class_rounds, &crate::bin_dir())?;
    let body = format!("{body}\n{}", crate::bench_classes::report(&accuracy));
    let (right, total) = accuracy.right();
    println!("{body}");
    if args.no_write || args.quick {
        eprintln!("bench probes: BENCHMARKS.md not written ({})", if args.quick { "--quick" } else { "--no-write" });
    } else if rounds < MIN_ROUNDS_TO_WRITE {
        eprintln!("bench probes: BENCHMARKS.md not written: fewer than {MIN_ROUNDS_TO_WRITE} rounds");
    } else {
        crate::benchmarks::update_section(
            "probes",
            "probes: what the eBPF probes cost the processes of a node",
            &body,
        )?;
    }
    println!(
        "{}; classes right {} s after start: {right} of {total} (target all): {}",
        report.figures(run.rounds()),
        crate::bench_classes::AFTER.as_secs(),
        verdict(report.met() && right == total)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rounds of two workloads: `slow` costs 10 % more with the probes, `fast` nothing.
    fn output() -> String {
        let mut out = String::from(
            "bench cpu=1 rounds=2 sample_ms=10\nworkload slow 100 one slow thing\nworkload fast 1000 a fast one\n",
        );
        out.push_str("probes kind=tp_btf programs=9\n");
        for round in 0..2u64 {
            for (condition, factor) in [("a", 100), ("b", 110), ("c", 120), ("a2", 100)] {
                let drift = 1 + round;
                let slow = 100 * factor * drift;
                let fast = 1000 * 100 * drift;
                let _ = writeln!(
                    out,
                    "sample round={round} condition={condition} workload=slow ops=100 wall_ns={slow} cpu_ns={slow} others=0"
                );
                let extra = if condition == "c" { " syscalls=5 job_cpu_ns=7" } else { "" };
                let _ = writeln!(
                    out,
                    "sample round={round} condition={condition} workload=fast ops=1000 wall_ns={fast} cpu_ns={fast} others=1{extra}"
                );
            }
        }
        out.push_str("end\n");
        out
    }

    #[test]
    fn the_programs_output_is_read() {
        let run = Run::parse(&output()).unwrap();
        assert_eq!((run.cpu, run.kind.as_str(), run.programs, run.rounds()), (1, "tp_btf", 9, 2));
        assert_eq!(run.workloads[0], Workload { name: "slow".into(), ops: 100, op: "one slow thing".into() });
        assert_eq!(run.samples.len(), 16);
        assert_eq!(run.samples.iter().filter(|s| s.others > 0).count(), 8);
        assert!(Run::parse(output().trim_end().trim_end_matches("end")).is_err(), "a run cut short is refused");
    }

    #[test]
    fn overheads_are_paired_by_round() {
        let run = Run::parse(&output()).unwrap();
        let report = Report::of(&run).unwrap();
        let (_, slow, _) = &report.rows[0];
        // Round 1 is twice as slow as round 0 in every condition: the ratios do not see it.
        assert!((slow.b_vs_a.median - 10.0).abs() < 1e-9, "{slow:?}");
        assert!((slow.c_vs_a.median - 20.0).abs() < 1e-9, "{slow:?}");
        assert!((slow.b_vs_a.q3 - slow.b_vs_a.q1).abs() < 1e-9, "{slow:?}");
        assert!(slow.a2_vs_a.median.abs() < 1e-9);
        assert!((slow.a - 150.0).abs() < 1e-9, "median of 100 and 200 ns per operation: {slow:?}");
        let (_, fast, _) = &report.rows[1];
        assert!(fast.met() && !slow.met() && !report.met());
        assert_eq!(report.worst(|f| f.c_vs_a).0, "slow");
        assert!(!report.met(), "{}", report.figures(2));
    }

    #[test]
    fn quantiles_interpolate() {
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.5).abs() < 1e-9);
        assert!((quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25) - 2.0).abs() < 1e-9);
        assert!((quantile(&[7.0], 0.75) - 7.0).abs() < 1e-9);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
