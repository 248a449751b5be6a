//! Project automation: `cargo xtask setup | test | demo | faults | cluster ... | bench ... | fuzz`.
//!
//! Exit status: 0 on success, 1 on any failure (the error is printed), and for `cluster exec` the status
//! of the command run on the node.

mod bench_balance;
mod bench_balance_sim;
mod bench_checkpoint;
mod bench_classes;
mod bench_gossip;
mod bench_infod;
mod bench_migrate;
mod bench_probes;
mod benchmarks;
mod criu;
mod demo;
mod faults;
mod fuzz;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, ensure};
use clap::{Args, Parser, Subcommand};
use rmosix_testcluster::{Cluster, Spec};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install every prerequisite (Debian packages); safe to run again.
    Setup,
    /// Set up, build, and run every test: unit, integration, and the privileged multi-node tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, start a local 4-node cluster, and show the cluster spreading load information.
    Demo(demo::DemoArgs),
    /// The local test cluster: nodes in network namespaces with their own cgroups and daemons.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Faults during moves on a local 3-node cluster: a trial per fault and phase, checked for a lost or
    /// doubled job and for leftovers; a full run writes its table into RELIABILITY.md.
    Faults(faults::FaultsArgs),
    /// Benchmarks; each ends with one line `NAME: <figure> (target <target>)` and updates BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
    /// Long libFuzzer runs of the fuzz targets (nightly), one at a time; updates RELIABILITY.md.
    Fuzz(fuzz::FuzzArgs),
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Build the workspace and start a cluster (replacing a leftover one of the same name).
    Up {
        /// Number of nodes.
        #[arg(long, short, default_value_t = 4)]
        nodes: u32,
        /// Cluster name (1 to 8 of a-z0-9).
        #[arg(long, default_value = "local")]
        name: String,
        /// Memory limit of each node, MiB.
        #[arg(long, default_value_t = 4096)]
        mem_mb: u64,
    },
    /// Stop a cluster and remove everything it made.
    Down {
        /// Cluster name.
        #[arg(long, default_value = "local")]
        name: String,
    },
    /// Run a command on node NODE (its namespace, cgroups and daemon sockets; fresh binaries first on PATH).
    Exec {
        /// Cluster name.
        #[arg(long, default_value = "local")]
        name: String,
        /// Node id.
        node: u32,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List the clusters that are up.
    List,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// infod's dissemination over a simulated network and clock, beside an all-to-all exchange.
    Gossip(GossipBenchArgs),
    /// Resident memory and CPU of infod on a local 4-node cluster.
    Infod(bench_infod::InfodBenchArgs),
    /// Freeze time of a job moved between two nodes, beside CLI criu dump + restore.
    Checkpoint(bench_checkpoint::CheckpointBenchArgs),
    /// `migrate` between two nodes of a local cluster, beside CLI criu dump + restore.
    Migrate(bench_migrate::MigrateBenchArgs),
    /// What the eBPF probes cost a node's processes (system calls, context switches, CPU), beside no probes.
    Probes(bench_probes::ProbesBenchArgs),
    /// Makespan of 8 CPU-bound jobs started on one node of a 2-node cluster, balanced vs kept on one node.
    Balance(bench_balance::BalanceBenchArgs),
    /// Load balancing on simulated clusters of 64 to 10,000 nodes, beside placement only and an omniscient scheduler.
    BalanceSim(bench_balance_sim::SimArgs),
}

/// Options of `cargo xtask bench gossip`.
#[derive(Debug, Args)]
pub struct GossipBenchArgs {
    /// Cluster sizes to simulate.
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64, 256, 1024, 10_000])]
    pub nodes: Vec<usize>,
    /// Simulated seconds per run.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

/// Whether `cargo xtask test` (without a test filter) ends with [`FAULT_TRIALS_IN_TEST`] trials of
/// `cargo xtask faults`, chosen at random, and fails if any of them loses or doubles the job or leaves
/// something behind.
const FAULTS_IN_TEST: bool = true;
/// How many fault trials `cargo xtask test` runs when [`FAULTS_IN_TEST`] is on.
const FAULT_TRIALS_IN_TEST: u32 = 10;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_owned()
}

/// Where cargo puts the debug binaries.
pub fn bin_dir() -> PathBuf {
    target_dir().join("debug")
}

/// Where cargo puts the release binaries (benchmarks measure those).
pub fn release_bin_dir() -> PathBuf {
    target_dir().join("release")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

/// A `cargo` command run in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Builds every binary of the workspace (debug).
pub fn build() -> anyhow::Result<()> {
    let status = cargo().args(["build", "--quiet", "--workspace", "--bins"]).status().context("cannot run cargo")?;
    ensure!(status.success(), "cargo build failed ({status})");
    Ok(())
}

/// Builds every binary of the workspace (release).
pub fn build_release() -> anyhow::Result<()> {
    let status = cargo()
        .args(["build", "--quiet", "--release", "--workspace", "--bins"])
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "cargo build --release failed ({status})");
    Ok(())
}

/// Runs every test of the workspace (no doc tests: the crates have none), passing the output through, and
/// ends with one line counting them all.
fn run_tests(args: &[String]) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut child = cargo()
        .args(["test", "--workspace", "--no-fail-fast", "--lib", "--bins", "--tests"])
        .arg("--")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        println!("{line}");
        // "test result: ok. 12 passed; 0 failed; 0 ignored; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    ensure!(status.success() && failed == 0, "tests failed ({status})");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

/// Benchmarks measure optimized code: a debug xtask hands a `bench` command to a release build of itself.
fn bench_in_release() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let status = cargo()
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(&args)
        .status()
        .context("cannot run cargo")?;
    std::process::exit(status.code().unwrap_or(1));
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cfg!(debug_assertions) && matches!(cli.command, Cmd::Bench { .. }) {
        return bench_in_release();
    }
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => {
            setup::run()?;
            build()?;
            let tests = run_tests(&args);
            if FAULTS_IN_TEST && args.is_empty() {
                tests.and(faults::run_trials(&faults::FaultsArgs::for_test(FAULT_TRIALS_IN_TEST)))
            } else {
                tests
            }
        }
        Cmd::Demo(args) => demo::run(&args),
        Cmd::Faults(args) => faults::run(&args),
        Cmd::Cluster { command } => cluster(command),
        Cmd::Bench { bench: Bench::Gossip(args) } => bench_gossip::run(&args),
        Cmd::Bench { bench: Bench::Infod(args) } => bench_infod::run(&args),
        Cmd::Bench { bench: Bench::Checkpoint(args) } => bench_checkpoint::run(&args),
        Cmd::Bench { bench: Bench::Migrate(args) } => bench_migrate::run(&args),
        Cmd::Bench { bench: Bench::Probes(args) } => bench_probes::run(&args),
        Cmd::Bench { bench: Bench::Balance(args) } => bench_balance::run(&args),
        Cmd::Bench { bench: Bench::BalanceSim(args) } => {
            let report = bench_balance_sim::run(&args)?;
            println!("## {}\n\n{}", bench_balance_sim::TITLE, report.markdown);
            benchmarks::update_section("balance-sim", bench_balance_sim::TITLE, &report.markdown)?;
            println!("{}", report.summary);
            Ok(())
        }
        Cmd::Fuzz(args) => fuzz::run(&args),
    }
}

fn cluster(command: ClusterCmd) -> anyhow::Result<()> {
    match command {
        ClusterCmd::Up { nodes, name, mem_mb } => {
            build()?;
            let mut spec = Spec::new(&name, nodes, bin_dir());
            spec.mem_limit = mem_mb << 20;
            // A cluster for people: jobs spread by themselves, as on a real one.
            spec.balance = true;
            let mut cluster = Cluster::up(spec)?;
            cluster.keep();
            println!(
                "cluster {name} is up: {nodes} nodes, 10.213.0.1 ... 10.213.0.{nodes}, state in {}",
                cluster.dir().display()
            );
            println!("try: cargo xtask cluster exec --name {name} 1 -- mosctl status");
            Ok(())
        }
        ClusterCmd::Down { name } => {
            Cluster::remove(&name)?;
            println!("cluster {name} is down");
            Ok(())
        }
        ClusterCmd::Exec { name, node, command } => {
            build()?;
            let cluster = Cluster::attach(&name)?;
            let mut cmd = cluster.command(node, &command[0])?;
            cmd.args(&command[1..]);
            // Replace this process: stdin, stdout, stderr and the exit status are the command's own.
            let err = std::os::unix::process::CommandExt::exec(&mut cmd);
            Err(err).with_context(|| format!("cannot run {:?} on node {node}", command[0]))
        }
        ClusterCmd::List => {
            for name in Cluster::list() {
                println!("{name}");
            }
            Ok(())
        }
    }
}
