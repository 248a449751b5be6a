//! `migd`: the migration daemon. See the crate documentation of `rmosix_migd`.
//!
//! Exit codes: 0 after a passing `--check`; 1 on a bad configuration, map or key, or when the daemon
//! cannot start (it runs until killed otherwise).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use rmosix_common::config::Config;
use rmosix_common::node::Settings;
use rmosix_migd::daemon::Daemon;

/// Runs the jobs started with mosrun on this node and keeps their home records.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (default: `$RMOSIX_CONFIG`, else /etc/rmosix/rmosix.toml if present, else built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate configuration, map, key and CRIU, print a summary, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // migd serves each connection and job on a thread of its own, hundreds at a burst; glibc would give
    // them up to eight arenas per core, which it keeps (and fragments) once the burst is over. Two are
    // plenty for what these threads allocate.
    // SAFETY: mallopt before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let (config, _) = Config::load(args.config.as_deref())?;
    let settings = Settings::load(config)?;
    // Jobs are our children; orphans of their restores come to us too.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let daemon = Arc::new(Daemon::new(settings)?);
    if args.check {
        println!(
            "migd: node {} ok, CRIU {} at {}",
            daemon.me(),
            daemon.criu().version(),
            daemon.criu().path().display()
        );
        return Ok(());
    }
    daemon.serve()?;
    Ok(())
}
