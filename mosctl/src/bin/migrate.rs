//! `migrate PID NODE|home|balance`: move a job, by its home PID, on its home node.
//!
//! Exit codes: 0 when the job moved; 1 when migd refused (the reason is printed); 2 on a bad command line.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use rmosix_common::config::Config;
use rmosix_common::control::{self, Request, Response, SOCKET_ENV, Target};

/// Move a job to another node, back home, or wherever the cluster is least loaded.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The job's home PID (its mosrun's PID on this node).
    pid: i32,
    /// A node id, `home`, or `balance`.
    target: String,
    /// Return once migd has the request, without waiting for the move.
    #[arg(long = "async")]
    no_wait: bool,
    /// migd's control socket (default: `$RMOSIX_MIGD_SOCKET`, else the configuration's `migd.socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Configuration file (default: `$RMOSIX_CONFIG`, else /etc/rmosix/rmosix.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn target(text: &str) -> anyhow::Result<Target> {
    Ok(match text {
        "home" => Target::Home,
        "balance" => Target::Balance,
        n => Target::Node(n.parse().with_context(|| format!("{n:?} is not a node id, `home` or `balance`"))?),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let target = target(&args.target)?;
    let socket = match (&args.socket, std::env::var_os(SOCKET_ENV)) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => PathBuf::from(s),
        (None, None) => Config::load(args.config.as_deref())?.0.migd.socket,
    };
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot reach migd at {} (is migd running?)", socket.display()))?;
    control::send(&mut stream, &Request::Migrate { home_pid: args.pid, target })?;
    if args.no_wait {
        // migd goes on with the move; its result is in the job's record and migd's log.
        println!("moving {} to {}", args.pid, args.target);
        return Ok(());
    }
    match control::recv::<Response>(&mut stream).context("migd did not answer")? {
        Response::Moved { home_pid, from, to, seconds, frozen } => {
            println!("moved {home_pid} from node {from} to node {to} in {seconds:.2} s (frozen {frozen:.3} s)");
            Ok(())
        }
        Response::Stayed { home_pid, node, why } => {
            println!("{home_pid} stays on node {node}: {why}");
            Ok(())
        }
        Response::Refused { message, .. } => anyhow::bail!("cannot move {}: {message}", args.pid),
        other => anyhow::bail!("unexpected answer from migd: {other:?}"),
    }
}
