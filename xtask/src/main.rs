//! Project automation: `cargo xtask setup | test | demo | cluster ... | bench ...`.

mod bench_gossip;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks; each ends with one line `NAME: <figure> (target <target>)` and updates BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// infod's dissemination over a simulated network and clock, beside an all-to-all exchange.
    Gossip(GossipBenchArgs),
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench { bench: Bench::Gossip(args) } => bench_gossip::run(&args),
    }
}
