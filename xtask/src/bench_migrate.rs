//! `cargo xtask bench migrate`: what `migrate` costs a job, beside plain `criu dump` + `criu restore` by the
//! CLI on tmpfs in the same run.
//!
//! A local 2-node cluster runs migd on each node; `mosrun rmx-job mem SIZE ...` starts a job on node 1 and
//! `migrate PID 2` moves it. The freeze time is what migd reports (from the start of the dump until the
//! destination may run the job); the total is the wall time of the `migrate` command. After each move the
//! job runs to its end at the deputy, and its output is checked against an unmoved run.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use rmosix_testcluster::Cluster;

use crate::benchmarks::{lines, move_cluster, until_filled};

use crate::bench_checkpoint::{PLAIN_TMPFS, baseline, job_args, reference_output};

/// Options of `cargo xtask bench migrate`.
#[derive(Debug, Args)]
pub struct MigrateBenchArgs {
    /// Resident sizes of the job, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024, 2048])]
    pub sizes: Vec<u64>,
    /// Runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

#[derive(Debug, Clone, Copy)]
struct Move {
    frozen: Duration,
    total: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the benchmark.
pub fn run(args: &MigrateBenchArgs) -> anyhow::Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    crate::setup::run()?;
    crate::build_release()?;
    let bins = crate::release_bin_dir();
    let criu = rmosix_testcluster::criu_path();
    let cluster = move_cluster("benchm", args.sizes.iter().copied().max().unwrap_or(0), &bins)?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let reference = reference_output(&bins, size)?;
        let mut cli = Vec::new();
        let mut moves = Vec::new();
        for run in 0..args.runs {
            let b = baseline(&criu, &bins, size, Path::new(PLAIN_TMPFS))?;
            cli.push(b.dump + b.restore);
            let m = migrate_once(&cluster, &bins, size, &reference)?;
            eprintln!(
                "bench migrate: {size} MiB run {}: CLI dump+restore {:.0} ms; migrate frozen {:.0} ms, total {:.0} ms",
                run + 1,
                ms(b.dump + b.restore),
                ms(m.frozen),
                ms(m.total)
            );
            moves.push(m);
        }
        cli.sort();
        moves.sort_by_key(|m| m.frozen);
        rows.push((size, cli[cli.len() / 2], moves[moves.len() / 2]));
    }
    drop(cluster);

    let mut table = String::from(
        "| resident | CLI dump+restore | migrate: frozen | migrate: total | frozen / CLI |\n|---|---|---|---|---|\n",
    );
    let mut headline = None;
    for (size, cli, m) in &rows {
        let ratio = m.frozen.as_secs_f64() / cli.as_secs_f64();
        let _ = writeln!(
            table,
            "| {size} MiB | {:.0} ms | {:.0} ms | {:.0} ms | {ratio:.2}x |",
            ms(*cli),
            ms(m.frozen),
            ms(m.total)
        );
        if *size == 1024 || headline.is_none() {
            headline = Some((*size, *cli, *m, ratio));
        }
    }
    let body = format!(
        "Reproduce: `cargo xtask bench migrate` (release build; `--sizes 64,256,1024,2048 --runs 3`). Run {}; the \
         median of {} runs per size.\n\n\
         A local 2-node cluster runs infod and migd on each node. `mosrun rmx-job mem SIZE ...` starts a job on \
         node 1; once it has filled its memory, `migrate PID 2` moves it: migd dumps it (left frozen), offers it \
         to node 2 over the authenticated migration connection, streams the images (keyed BLAKE3), node 2 \
         restores them stopped, checks the owner, node 1 kills its copy and node 2 lets the job run; its output \
         then flows home to the deputy. *Frozen*: as migd measures it, from the start of the dump until the \
         destination may run the job. *Total*: wall time of the `migrate` command. *CLI*: the same program as a \
         plain process, `criu dump` then `criu restore -d` on /dev/shm, no transfer. Every moved job ran to its \
         end and its output at the deputy matched an unmoved run.\n\n{table}",
        crate::benchmarks::machine(),
        args.runs,
    );
    println!("{body}");
    if !args.no_write {
        crate::benchmarks::update_section("migrate", "migrate: moving a job between two nodes", &body)?;
    }
    let (size, cli, m, ratio) = headline.context("no sizes measured")?;
    println!(
        "migrate: {size} MiB job frozen {:.0} ms = {ratio:.2}x CLI criu dump+restore {:.0} ms, migrate total {:.0} ms (target <= 1.5x at 1024 MiB): {}",
        ms(m.frozen),
        ms(cli),
        ms(m.total),
        crate::benchmarks::verdict(size == 1024 && ratio <= 1.5)
    );
    Ok(())
}

fn migrate_once(cluster: &Cluster, bins: &Path, size: u64, reference: &[String]) -> anyhow::Result<Move> {
    let mut deputy = cluster
        .command(1, "mosrun")?
        .arg(bins.join("rmx-job"))
        .args(job_args(size))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start mosrun")?;
    let rx = lines(deputy.stdout.take().context("no stdout")?);
    let mut seen = until_filled(&rx)?;
    let start = Instant::now();
    let said = cluster.command(1, "migrate")?.args([deputy.id().to_string().as_str(), "2"]).output()?;
    let total = start.elapsed();
    let text = String::from_utf8_lossy(&said.stdout).into_owned();
    ensure!(said.status.success(), "migrate failed: {}", String::from_utf8_lossy(&said.stderr));
    // "moved P from node 1 to node 2 in 0.41 s (frozen 0.35 s)"
    let frozen: f64 = text
        .split("(frozen ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the freeze time in {text:?}"))?;
    seen.extend(rx.iter());
    let status = deputy.wait()?;
    if !status.success() {
        bail!("the moved job ended with {status}");
    }
    ensure!(seen == reference, "the moved job's output differs from an unmoved run's ({} lines vs {})", seen.len(), reference.len());
    Ok(Move { frozen: Duration::from_secs_f64(frozen), total })
}
