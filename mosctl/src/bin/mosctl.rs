//! `mosctl`: node administration and cluster status.
//!
//! Exit codes: 0 success; 1 failure (infod unreachable, bad arguments to the daemon, I/O error);
//! 2 bad command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use rmosix_common::key::ClusterKey;
use rmosix_common::query::{Request, Response, ask};
use rmosix_common::control;
use rmosix_common::policy::Change;
use rmosix_mosctl::{JobFilter, infod_socket, jobs_json, jobs_table, status_json, status_table};

/// Administer an rmosix node and look at the cluster.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (default: `$RMOSIX_CONFIG`, else /etc/rmosix/rmosix.toml).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// infod's query socket (default: `$RMOSIX_INFOD_SOCKET`, else the configuration's `infod.socket`).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show every node of the cluster as this node sees it.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the id of the best node for a new job.
    Best {
        /// Memory the job needs, in MiB; nodes with less free memory are passed over.
        #[arg(long, short, default_value_t = 0)]
        mem: u64,
    },
    /// Show every job of the cluster wherever it runs: asked of every live node's migd.
    Jobs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the jobs running on node N.
        #[arg(long)]
        node: Option<u32>,
        /// Only the jobs of user U (a name or a uid).
        #[arg(long)]
        user: Option<String>,
        /// migd's control socket (default: `$RMOSIX_MIGD_SOCKET`, else the configuration's `migd.socket`).
        #[arg(long)]
        migd_socket: Option<PathBuf>,
    },
    /// Write a new random cluster key to FILE (mode 0600); copy it to every node.
    Genkey { file: PathBuf },
    /// Refuse guest jobs from other nodes (root; kept across restarts, advertised to the cluster).
    Block,
    /// Take guest jobs again (root).
    Noblock,
    /// Nothing leaves this node by itself, neither its jobs nor its guests; `migrate` still moves them (root).
    Stay,
    /// Jobs leave this node by themselves again (root).
    Nostay,
    /// The jobs started on this node do not leave it by themselves; guests still may (root).
    Lstay,
    /// The jobs started on this node leave it by themselves again (root).
    Nolstay,
    /// Block guests and send every guest home, or elsewhere when home cannot take it (root).
    Expel,
    /// Advertise this relative CPU speed instead of the map's (root).
    Setspeed { speed: f64 },
    /// Show this node's policy.
    Policy,
    /// Keep one of your jobs where it runs: it moves only when someone asks (on the job's home node).
    Pin { pid: i32 },
    /// Let one of your jobs move by itself again.
    Unpin { pid: i32 },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let socket = || infod_socket(args.socket.as_deref(), args.config.as_deref());
    match args.command {
        Command::Status { json } => {
            let Response::View(view) = ask(&socket()?, &Request::View)? else {
                bail!("infod answered a status request with something else");
            };
            // What this node's migd has to say (memory short and nothing can go), when it is there.
            let stuck = match ask_migd(&args, &control::Request::Policy { change: None }) {
                Ok(control::Response::Policy { stuck, .. }) => stuck,
                _ => None,
            };
            if json {
                let mut json = status_json(&view);
                json["stuck"] = serde_json::json!(stuck);
                println!("{json}");
            } else {
                print!("{}", status_table(&view));
                if let Some(stuck) = stuck {
                    println!("node {}: {stuck}", view.node);
                }
            }
        }
        Command::Best { mem } => {
            let mem_bytes = mem.checked_mul(1 << 20).context("--mem is too large")?;
            let Response::Best { node } = ask(&socket()?, &Request::Best { mem_bytes })? else {
                bail!("infod answered a best-node request with something else");
            };
            println!("{node}");
        }
        Command::Jobs { json, node, user, migd_socket } => {
            let uid = user.map(|u| uid_of(&u)).transpose()?;
            let socket = rmosix_mosctl::migd_socket(migd_socket.as_deref(), args.config.as_deref())?;
            let mut stream = std::os::unix::net::UnixStream::connect(&socket)
                .with_context(|| format!("cannot reach migd at {} (is migd running?)", socket.display()))?;
            control::send(&mut stream, &control::Request::Jobs)?;
            let control::Response::Jobs { nodes, unreachable } =
                control::recv::<control::Response>(&mut stream).context("migd did not answer")?
            else {
                bail!("migd answered a jobs request with something else");
            };
            let filter = JobFilter { node, uid };
            if json {
                println!("{}", jobs_json(&nodes, &unreachable, &filter));
            } else {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                print!("{}", jobs_table(&nodes, &unreachable, &filter, now));
            }
        }
        Command::Genkey { file } => {
            ClusterKey::generate().write_new(&file)?;
            println!("wrote a new cluster key to {}", file.display());
        }
        Command::Block => policy(&args, Some(Change::Block))?,
        Command::Noblock => policy(&args, Some(Change::NoBlock))?,
        Command::Stay => policy(&args, Some(Change::Stay))?,
        Command::Nostay => policy(&args, Some(Change::NoStay))?,
        Command::Lstay => policy(&args, Some(Change::LStay))?,
        Command::Nolstay => policy(&args, Some(Change::NoLStay))?,
        Command::Setspeed { speed } => policy(&args, Some(Change::SetSpeed(speed)))?,
        Command::Policy => policy(&args, None)?,
        Command::Expel => match ask_migd(&args, &control::Request::Expel)? {
            control::Response::Expelled { moved, failed } => {
                println!("{moved} guest(s) sent away; this node now blocks guests");
                for f in &failed {
                    println!("could not send away {f}");
                }
                if !failed.is_empty() {
                    bail!("{} guest(s) could not go", failed.len());
                }
            }
            other => bail!("migd answered an expel request with {other:?}"),
        },
        Command::Pin { pid } | Command::Unpin { pid } => {
            let pinned = matches!(args.command, Command::Pin { .. });
            match ask_migd(&args, &control::Request::Pin { home_pid: pid, pinned })? {
                control::Response::Pinned { home_pid, pinned } => {
                    println!("{home_pid} {}", if pinned { "is pinned: it moves only when asked" } else { "may move by itself again" });
                }
                other => bail!("migd answered a pin request with {other:?}"),
            }
        }
    }
    Ok(())
}

/// Sends `request` to this node's migd and returns its answer; a refusal is an error with migd's words.
fn ask_migd(args: &Args, request: &control::Request) -> anyhow::Result<control::Response> {
    let socket = rmosix_mosctl::migd_socket(None, args.config.as_deref())?;
    let mut stream = std::os::unix::net::UnixStream::connect(&socket)
        .with_context(|| format!("cannot reach migd at {} (is migd running?)", socket.display()))?;
    // Expelling guests takes as long as their moves; anything else is answered at once.
    let limit = if matches!(request, control::Request::Expel) { 600 } else { 10 };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(limit)))?;
    control::send(&mut stream, request)?;
    match control::recv::<control::Response>(&mut stream).context("migd did not answer")? {
        control::Response::Refused { message, .. } => bail!("{message}"),
        response => Ok(response),
    }
}

/// Shows this node's policy after `change`, if any.
fn policy(args: &Args, change: Option<Change>) -> anyhow::Result<()> {
    match ask_migd(args, &control::Request::Policy { change })? {
        control::Response::Policy { node, policy, stuck, moves } => {
            println!("node {node}: {}", policy.words());
            if change.is_none() {
                println!(
                    "node {node}: moved {} job(s) to balance the load and {} to free memory by itself; {} move(s) failed",
                    moves.balanced, moves.ushered, moves.failed
                );
            }
            if let Some(stuck) = stuck {
                println!("node {node}: {stuck}");
            }
        }
        other => bail!("migd answered a policy request with {other:?}"),
    }
    Ok(())
}

/// A user name or uid as a uid.
fn uid_of(user: &str) -> anyhow::Result<u32> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => bail!("no user {user:?} on this node"),
    }
}
