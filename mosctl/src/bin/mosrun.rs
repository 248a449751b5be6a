//! `mosrun`: start a migratable job and stay as its deputy.
//!
//! mosrun asks the local migd to start the program as a job with the caller's identity, environment,
//! working directory and umask, hands it its own stdin, stdout and stderr, forwards the signals it receives
//! to the job wherever it runs, and exits with the job's status (128+N if the job died of signal N). Its PID
//! is the job's home PID, which `migrate` and `mosctl` take. Killing mosrun kills the job.
//!
//! Exit codes: the job's; 125 when the job could not be started (the reason is printed); 255 when the job
//! was lost with its node.

use std::ffi::OsString;
use std::os::fd::AsFd as _;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use rmosix_common::config::Config;
use rmosix_common::control::{self, Hint, Request, Response, Run, RunOptions, SOCKET_ENV, Where};
use rmosix_common::map::ClusterMap;

/// Run a program as a migratable job; mosrun stays as its deputy (stdio, signals, exit status).
#[derive(Debug, Parser)]
#[command(version, disable_help_flag = true)]
#[expect(clippy::struct_excessive_bools, reason = "MOSIX's one-letter flags, each a yes/no")]
struct Args {
    /// Start on the best node of the cluster (as infod sees it).
    #[arg(short = 'b')]
    best: bool,
    /// Start on the node with this host name or address.
    #[arg(short = 'r', value_name = "HOST")]
    host: Option<String>,
    /// Start on the node with this id.
    #[arg(short = 'N', value_name = "ID")]
    node: Option<u32>,
    /// Stay home: never migrate.
    #[arg(short = 'h')]
    stay_home: bool,
    /// No automatic migration (manual `migrate` only).
    #[arg(short = 'L')]
    no_auto: bool,
    /// Hint: CPU-bound.
    #[arg(short = 'c', conflicts_with = "io_bound")]
    cpu_bound: bool,
    /// Hint: I/O-bound.
    #[arg(short = 'i')]
    io_bound: bool,
    /// Memory the job will need, MiB.
    #[arg(short = 'm', value_name = "MB")]
    mem: Option<u64>,
    /// migd's control socket (default: `$RMOSIX_MIGD_SOCKET`, else the configuration's `migd.socket`).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Configuration file (default: `$RMOSIX_CONFIG`, else /etc/rmosix/rmosix.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print help.
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

use rmosix_common::control::FORWARDED_SIGNALS as FORWARDED;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            eprintln!("mosrun: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn place(args: &Args, config: &Config) -> anyhow::Result<Where> {
    if let Some(id) = args.node {
        return Ok(Where::Node(id));
    }
    if let Some(host) = &args.host {
        let map = ClusterMap::load(&config.map)?;
        let addr = rmosix_common::map::system_resolve(host).map_err(|e| anyhow::anyhow!("cannot resolve {host}: {e}"))?;
        let node = map.by_addr(addr.into()).with_context(|| format!("{host} ({addr}) is not in the cluster map"))?;
        return Ok(Where::Node(node.id.0));
    }
    Ok(if args.best { Where::Best } else { Where::Home })
}

fn run(args: Args) -> anyhow::Result<i32> {
    let (config, _) = Config::load(args.config.as_deref())?;
    let socket = args
        .socket
        .clone()
        .or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| config.migd.socket.clone());
    let place = place(&args, &config)?;
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("cannot reach migd at {} (is migd running?)", socket.display()))?;
    // SAFETY: umask only reads and restores the process's mask.
    let umask = unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    };
    let mut command = args.command.into_iter();
    let program = command.next().expect("clap requires a program").into_vec();
    let request = Request::Run(Run {
        program,
        args: command.map(OsString::into_vec).collect(),
        env: std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend(v.into_vec());
                kv
            })
            .collect(),
        cwd: std::env::current_dir().context("cannot read the working directory")?,
        umask,
        rlimits: control::rlimits_of_self(),
        place,
        options: RunOptions {
            stay_home: args.stay_home,
            no_auto_migrate: args.no_auto,
            hint: if args.cpu_bound {
                Some(Hint::CpuBound)
            } else if args.io_bound {
                Some(Hint::IoBound)
            } else {
                None
            },
            mem_mb: args.mem,
        },
    });
    // Block the forwarded signals before any thread exists, so one thread can take them all with sigwait.
    let mut forwarded = SigSet::empty();
    for sig in FORWARDED {
        forwarded.add(sig);
    }
    forwarded.thread_block().context("cannot block signals")?;
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    control::send_with_fds(&stream, &request, &[stdin.as_fd(), stdout.as_fd(), stderr.as_fd()])
        .context("cannot send the request to migd")?;
    match control::recv::<Response>(&mut stream).context("migd did not answer")? {
        Response::Started { .. } => {}
        Response::Refused { message, .. } => bail!("cannot start the job: {message}"),
        other => bail!("unexpected answer from migd: {other:?}"),
    }
    let session = std::sync::Arc::new(std::sync::Mutex::new(stream.try_clone().context("cannot clone the control connection")?));
    let signals = std::sync::Arc::clone(&session);
    std::thread::spawn(move || {
        loop {
            let Ok(sig) = forwarded.wait() else { continue };
            // A signal while migd restarts is sent once the session is back.
            let _ = control::send(&mut signals.lock().expect("session"), &Request::Signal { signo: sig as i32 });
            if sig == Signal::SIGTSTP {
                // Stop the deputy too, so the shell gets the terminal back; `fg` sends SIGCONT, forwarded above.
                let _ = nix::sys::signal::raise(Signal::SIGSTOP);
            }
        }
    });
    loop {
        match control::recv::<Response>(&mut stream) {
            Ok(Response::Exited { code }) => return Ok(code),
            Ok(Response::Lost { reason }) => {
                eprintln!("mosrun: the job was lost: {reason}");
                return Ok(255);
            }
            Ok(_) => {}
            Err(e) => {
                // migd went away: it keeps the job's record, so wait for it to come back and take the job up again.
                match reattach(&socket, &mut session.lock().expect("session")) {
                    Ok(s) => stream = s,
                    Err(again) => {
                        eprintln!("mosrun: lost contact with migd ({e}) and could not get it back: {again:#}");
                        return Ok(255);
                    }
                }
            }
        }
    }
}

/// Reconnects to a restarted migd (for up to a minute) and takes the job up again.
fn reattach(socket: &std::path::Path, session: &mut UnixStream) -> anyhow::Result<UnixStream> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    loop {
        if let Ok(mut stream) = UnixStream::connect(socket) {
            let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
            let sent = control::send_with_fds(&stream, &Request::Reattach, &[stdin.as_fd(), stdout.as_fd(), stderr.as_fd()]);
            // A migd still starting may drop the connection: try again until the deadline.
            match sent.and_then(|()| control::recv::<Response>(&mut stream)) {
                Ok(Response::Started { .. }) => {
                    *session = stream.try_clone()?;
                    return Ok(stream);
                }
                Ok(Response::Refused { why, message }) => {
                    bail!("migd refused to take the job up again ({why:?}): {message}")
                }
                Ok(other) => bail!("unexpected answer from migd: {other:?}"),
                Err(_) => {}
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("migd did not come back within a minute");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
