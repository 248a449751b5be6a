//! `cargo xtask bench balance`: what automatic balancing buys, on a real local cluster.
//!
//! Eight equal CPU-bound jobs (`rmx-job spin`, release build) are started at once with `mosrun` by the
//! ordinary test user on node 1 of a 2-node cluster whose nodes have one CPU of this machine each. The
//! makespan (from the first `mosrun` to the last job's exit) is measured in two conditions on the same
//! cluster, one after the other in each round, the order turned every round: *balanced*, with migd's
//! balancer as configured by default; *one node*, with node 1's policy set to `stay` (`mosctl stay`: nothing
//! leaves it by itself), so the eight share its one CPU. Every job's output is checked against an unmoved
//! run's. The figure is the median over rounds of balanced / one node; the ideal is 0.5, the target 0.55.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use rmosix_testcluster::user::{TestUser, test_user};
use rmosix_testcluster::{Cluster, Spec};

use crate::benchmarks::{load_average, machine, verdict};

/// Jobs started at once on node 1.
const JOBS: usize = 8;
/// The most balanced / one node may be.
const TARGET: f64 = 0.55;

/// Options of `cargo xtask bench balance`.
#[derive(Debug, Args)]
pub struct BalanceBenchArgs {
    /// Rounds (each runs both conditions once); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds one job takes alone on one CPU (the steps of `rmx-job spin` are calibrated to it).
    #[arg(long, default_value_t = 8.0)]
    job_secs: f64,
    /// One round of 3-second jobs, and BENCHMARKS.md is not written.
    #[arg(long)]
    quick: bool,
    /// Print the section instead of writing it to BENCHMARKS.md.
    #[arg(long)]
    no_write: bool,
}

/// `rmx-job spin` work per step.
const WORK: &str = "2000000";

/// Runs the benchmark.
pub fn run(args: &BalanceBenchArgs) -> anyhow::Result<()> {
    let (rounds, job_secs) = if args.quick { (1, 3.0) } else { (args.rounds.max(1), args.job_secs) };
    crate::setup::run()?;
    crate::build_release()?;
    let bins = crate::release_bin_dir();
    // Where the ordinary user who runs the jobs can reach it.
    let job = rmosix_testcluster::user::reachable_tools(&bins)?.join("rmx-job");
    let steps = calibrate(&job, job_secs)?;
    let args_of = [String::from("spin"), steps.to_string(), WORK.to_owned()];
    let reference = Command::new(&job).args(&args_of).output().context("cannot run rmx-job")?;
    ensure!(reference.status.success(), "rmx-job failed alone");
    let load_before = load_average();
    let cluster = Cluster::up(Spec { balance: true, ..Spec::new("benchbal", 2, bins.clone()) })?;
    let user = test_user()?;
    let mut balanced = Vec::new();
    let mut single = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [true, false] } else { [false, true] };
        for spread in order {
            mosctl(&cluster, if spread { "nostay" } else { "stay" })?;
            let (makespan, moves) = makespan(&cluster, &user, &job, &args_of, &reference.stdout)?;
            eprintln!(
                "bench balance: round {} {}: {:.1} s, {moves} moves",
                round + 1,
                if spread { "balanced" } else { "one node" },
                makespan.as_secs_f64()
            );
            if spread { balanced.push((makespan, moves)) } else { single.push((makespan, moves)) }
        }
    }
    mosctl(&cluster, "nostay")?;
    drop(cluster);
    let ratios: Vec<f64> = balanced.iter().zip(&single).map(|(b, s)| b.0.as_secs_f64() / s.0.as_secs_f64()).collect();
    let ratio = median(&ratios);
    let med = |runs: &[(Duration, u32)]| median(&runs.iter().map(|r| r.0.as_secs_f64()).collect::<Vec<_>>());
    let moves = median(&balanced.iter().map(|r| f64::from(r.1)).collect::<Vec<_>>());
    let mut body = format!(
        "Reproduce: `cargo xtask bench balance` (release build; `--rounds {rounds} --job-secs {job_secs}`). Run {}; \
         load average {load_before} before, {} after.\n\n\
         {JOBS} equal CPU-bound jobs (`rmx-job spin {steps} {WORK}`, {job_secs} s each alone on one CPU) started at \
         once with `mosrun` by an ordinary user on node 1 of a 2-node local cluster, one CPU of this machine per \
         node. *Balanced*: migd's balancer with the default `[balance]` settings (1 s interval, 30 % margin, 3 s \
         residence). *One node*: node 1 set to `mosctl stay`, so all {JOBS} share its CPU. Both conditions on the \
         same cluster in every round, their order turned each round; makespan from the first `mosrun` to the \
         last exit; every job's output checked against an unmoved run's.\n\n\
         | round | balanced | moves | one node | balanced / one node |\n|---|---|---|---|---|\n",
        machine(),
        load_average()
    );
    for (i, ((b, m), (s, _))) in balanced.iter().zip(&single).enumerate() {
        let _ = writeln!(
            body,
            "| {} | {:.1} s | {m} | {:.1} s | {:.3} |",
            i + 1,
            b.as_secs_f64(),
            s.as_secs_f64(),
            b.as_secs_f64() / s.as_secs_f64()
        );
    }
    let _ = writeln!(
        body,
        "| median | {:.1} s | {moves} | {:.1} s | {ratio:.3} |\n\nTarget: balanced / one node <= {TARGET} (ideal 0.5).",
        med(&balanced),
        med(&single)
    );
    println!("{body}");
    if args.quick || args.no_write {
        eprintln!("bench balance: BENCHMARKS.md not written");
    } else {
        crate::benchmarks::update_section("balance", "balance: jobs spreading by themselves", &body)?;
    }
    println!(
        "balance: makespan of {JOBS} jobs balanced over 2 nodes {ratio:.3}x that on one node, median of {rounds} rounds \
         (target <= {TARGET}): {}",
        verdict(ratio <= TARGET)
    );
    Ok(())
}

/// The steps of `rmx-job spin` that take `secs` alone.
fn calibrate(job: &std::path::Path, secs: f64) -> anyhow::Result<u64> {
    let probe = 200u64;
    let started = Instant::now();
    let out = Command::new(job).args(["spin", &probe.to_string(), WORK]).output().context("cannot run rmx-job")?;
    ensure!(out.status.success(), "rmx-job spin failed");
    let per_step = started.elapsed().as_secs_f64() / 200.0;
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a positive step count")]
    let steps = (secs / per_step.max(1e-6)).round().max(1.0) as u64;
    Ok(steps)
}

/// `mosctl WORD` on node 1, as root.
fn mosctl(c: &Cluster, word: &str) -> anyhow::Result<()> {
    let out = c.command(1, "mosctl")?.arg(word).output()?;
    ensure!(out.status.success(), "mosctl {word}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Starts the jobs, waits for them all, checks their output; the makespan and the moves they made.
fn makespan(c: &Cluster, user: &TestUser, job: &std::path::Path, args: &[String], expected: &[u8]) -> anyhow::Result<(Duration, u32)> {
    let started = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    for _ in 0..JOBS {
        children.push(
            c.command_as(1, user, "mosrun")?
                .arg(job)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let mut outputs = Vec::new();
    for child in children {
        outputs.push(child.wait_with_output()?);
    }
    let took = started.elapsed();
    let mut moves = 0;
    for (pid, out) in pids.iter().zip(&outputs) {
        if !out.status.success() || out.stdout != expected {
            bail!("job {pid} ended with {} and {} bytes of output, not the unmoved run's", out.status, out.stdout.len());
        }
        let record = std::fs::read_to_string(c.node_dir(1).join("records").join(format!("{pid}.json")))?;
        let record: serde_json::Value = serde_json::from_str(&record)?;
        moves += u32::try_from(record["record"]["migrations"].as_u64().unwrap_or(0)).unwrap_or(0);
    }
    Ok((took, moves))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => f64::midpoint(sorted[n / 2 - 1], sorted[n / 2]),
    }
}
