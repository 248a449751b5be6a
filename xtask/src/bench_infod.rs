//! `cargo xtask bench infod`: what infod costs a node. Starts a local 4-node cluster, lets it run, and reads
//! each infod's resident memory (`VmRSS`, `VmHWM` from `/proc/PID/status`) and CPU time (`utime + stime` from
//! `/proc/PID/stat`) over the measurement window. Beside it, the same figures for `sleep` started in the same
//! node cgroup: the floor any process pays.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rmosix_testcluster::{Cluster, Spec};

/// Options of `cargo xtask bench infod`.
#[derive(Debug, Args)]
pub struct InfodBenchArgs {
    /// Seconds to measure for.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

struct Usage {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_ticks: u64,
}

fn usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("bad stat")?.1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based, see proc(5)).
    let ticks = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Usage { rss_kib: kib("VmRSS:")?, hwm_kib: kib("VmHWM:")?, cpu_ticks: ticks })
}

#[expect(clippy::cast_precision_loss, reason = "small figures for display")]
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the benchmark.
pub fn run(args: &InfodBenchArgs) -> anyhow::Result<()> {
    crate::build_release()?;
    let cluster = Cluster::up(Spec::new("benchi", 4, crate::release_bin_dir()))?;
    let mut sleeper = cluster.command(1, "sleep")?.arg("100000").spawn()?;
    cluster.wait_for(Duration::from_secs(15), "all up", |_, v| v.nodes.iter().all(|n| n.alive))?;
    let pids: Vec<u32> = cluster
        .node_ids()
        .map(|i| -> anyhow::Result<u32> {
            Ok(std::fs::read_to_string(cluster.node_dir(i).join("infod.pid"))?.trim().parse()?)
        })
        .collect::<Result<_, _>>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let before: Vec<Usage> = pids.iter().map(|&p| usage(p)).collect::<Result<_, _>>()?;
    let start = Instant::now();
    eprintln!("bench infod: measuring 4 infod processes for {} s", args.seconds);
    std::thread::sleep(Duration::from_secs(args.seconds));
    let elapsed = start.elapsed().as_secs_f64();
    let after: Vec<Usage> = pids.iter().map(|&p| usage(p)).collect::<Result<_, _>>()?;
    let sleep_usage = usage(sleeper.id())?;
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let views = cluster.view(1)?;

    let mut table = String::from(
        "| process | resident now (MiB) | peak resident (MiB) | CPU over the window (% of one core) |\n|---|---|---|---|\n",
    );
    let mut worst_rss: f64 = 0.0;
    let mut worst_cpu: f64 = 0.0;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
        let cpu = (a.cpu_ticks - b.cpu_ticks) as f64 / hz as f64 / elapsed * 100.0;
        worst_rss = worst_rss.max(mib(a.hwm_kib));
        worst_cpu = worst_cpu.max(cpu);
        let _ = writeln!(
            table,
            "| infod, node {} | {:.1} | {:.1} | {:.3} |",
            i + 1,
            mib(a.rss_kib),
            mib(a.hwm_kib),
            cpu
        );
    }
    let _ = writeln!(
        table,
        "| baseline: `sleep` in node 1's cgroup | {:.1} | {:.1} | 0 |",
        mib(sleep_usage.rss_kib),
        mib(sleep_usage.hwm_kib)
    );
    let c = &views.counters;
    let body = format!(
        "Measured {} s on a local 4-node cluster (`cargo xtask bench infod`; {}), release build, default \
         configuration (1 s interval, window 20). Resident memory from `/proc/PID/status` (VmRSS, VmHWM); CPU time from \
         `/proc/PID/stat` (utime+stime, {hz} ticks/s) over the window. Node 1 sent {} datagrams and accepted {} \
         in its life so far.\n\n{table}",
        args.seconds,
        crate::benchmarks::machine(),
        c.sent,
        c.accepted,
    );
    println!("{body}");
    if !args.no_write {
        crate::benchmarks::update_section("infod", "infod: resident memory and CPU", &body)?;
    }
    println!(
        "infod: {worst_rss:.1} MiB peak resident, {worst_cpu:.3}% of a core (target < 15 MB and < 1% of a core): {}",
        crate::benchmarks::verdict(worst_rss * 1_048_576.0 < 15e6 && worst_cpu < 1.0)
    );
    Ok(())
}
