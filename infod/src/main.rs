//! `infod`: the information daemon. See the crate documentation of `rmosix_infod`.
//!
//! Exit codes: 0 on a clean stop (SIGTERM/SIGINT) or a passing `--check`; 1 on a bad configuration, map or
//! key, or when the daemon cannot start.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use rmosix_common::config::Config;
use rmosix_infod::daemon::{self, Settings};

/// Measures this node's load and spreads it through the cluster.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (default: `$RMOSIX_CONFIG`, else /etc/rmosix/rmosix.toml if present, else built-in defaults).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Cluster map, overriding the configuration's `map`.
    #[arg(long, short)]
    map: Option<PathBuf>,
    /// Validate configuration, map and key, print a summary, and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("infod: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (mut config, path) = Config::load(args.config.as_deref())?;
    if let Some(map) = args.map {
        config.map = map;
    }
    let settings = Settings::load(config)?;
    if args.check {
        let node = settings.map.get(settings.me).expect("found at load");
        println!(
            "infod: configuration {} ok: {} nodes in {}, this is node {} ({}), key {}",
            path.map_or_else(|| "(built-in defaults)".to_owned(), |p| p.display().to_string()),
            settings.map.len(),
            settings.config.map.display(),
            node.id,
            node.addr,
            settings.config.cluster_key.display(),
        );
        return Ok(());
    }
    let resources = daemon::resources(&settings.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        daemon::run(settings, resources, shutdown).await
    })?;
    Ok(())
}
