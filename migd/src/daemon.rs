//! The migd daemon: the control socket for local users, and the jobs homed on this node.
//!
//! Every `mosrun` is one control connection. The deputy passes its stdin, stdout and stderr with its
//! `Run` request; migd starts the job under `rmosix-init` in its own PID namespace, with the deputy's uid,
//! gid and groups, relays the job's output into the deputy's descriptors and the deputy's input into the
//! job, forwards the signals the deputy reports, and answers `Exited` with the job's status when it ends. If
//! the deputy goes away, the job is killed. Who may do what comes from the socket's peer credentials.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::sys::signal::Signal;
use rmosix_checkpoint::criu::{Criu, Placement};
use rmosix_checkpoint::job::{Credentials, Job, JobSpec};
use rmosix_common::NodeId;
use rmosix_common::control::{self, ControlError, Refusal, Request, Response, Where};
use rmosix_common::node::Settings;
use tracing::{info, warn};

use crate::records::{JobRecord, JobState, RecordStore, RecordsError};
use crate::relay::{self, PipeSink, Switch};

/// migd could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error(transparent)]
    Criu(#[from] rmosix_checkpoint::criu::CriuError),
    #[error("rmosix-init not found at {0} (set migd.init)")]
    NoInit(PathBuf),
}

/// A job homed here whose deputy is connected.
#[derive(Debug)]
struct HomeJob {
    /// The job while it runs on this node.
    local: Mutex<Option<Arc<Job>>>,
}

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    init: PathBuf,
    records: RecordStore,
    criu: Criu,
    jobs: Mutex<HashMap<i32, Arc<HomeJob>>>,
}

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
}

fn peer(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(Peer {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

fn refuse(stream: &mut UnixStream, why: Refusal, message: impl Into<String>) {
    let _ = control::send(
        stream,
        &Response::Refused {
            why,
            message: message.into(),
        },
    );
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl Daemon {
    /// Opens the records and checks CRIU; does not listen yet.
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        let init = settings.config.migd.init.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("rmosix-init")))
                .unwrap_or_default()
        });
        if !init.exists() {
            return Err(StartError::NoInit(init));
        }
        let records = RecordStore::open(&settings.config.migd.records)?;
        let criu = Criu::new(
            &settings.config.checkpoint.criu,
            &settings.config.checkpoint.log_dir,
        )?;
        // Jobs whose deputy is gone with the old daemon can't be reached any more.
        for r in records.list() {
            if !r.state.has_ended()
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.home_pid), None).is_err()
            {
                let _ = records.update(r.home_pid, |r| {
                    r.state = JobState::Lost {
                        reason: "its deputy ended while migd was down".into(),
                    };
                });
            }
        }
        Ok(Self {
            settings,
            init,
            records,
            criu,
            jobs: Mutex::new(HashMap::new()),
        })
    }

    /// This node.
    pub fn me(&self) -> NodeId {
        self.settings.me
    }

    /// The CRIU in use.
    pub fn criu(&self) -> &Criu {
        &self.criu
    }

    /// The home records.
    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    /// Serves the control socket until the process ends.
    pub fn serve_control(self: &Arc<Self>) -> Result<(), StartError> {
        let path = &self.settings.config.migd.socket;
        let listen = |source| StartError::Listen {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(listen)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(listen(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another migd answers there",
            )));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(listen)?;
        // Everyone may connect; what they may do is decided per request from their credentials.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .map_err(listen)?;
        info!(node = %self.me(), socket = %path.display(), "migd control socket ready");
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let daemon = Arc::clone(self);
                    std::thread::spawn(move || daemon.serve_client(stream));
                }
                Err(e) => warn!(error = %e, "accept on the control socket failed"),
            }
        }
        Ok(())
    }

    fn serve_client(&self, mut stream: UnixStream) {
        let Ok(peer) = peer(&stream) else { return };
        let (request, fds) = match control::recv_with_fds::<Request>(&mut stream) {
            Ok(r) => r,
            Err(ControlError::Closed) => return,
            Err(e) => {
                refuse(&mut stream, Refusal::BadRequest, e.to_string());
                return;
            }
        };
        match request {
            Request::Run {
                program,
                args,
                env,
                cwd,
                umask,
                place,
                options,
            } => {
                let run = RunRequest {
                    program,
                    args,
                    env,
                    cwd,
                    umask,
                    place,
                    stay_home: options.stay_home,
                };
                self.run(stream, peer, run, fds);
            }
            Request::Migrate { home_pid, .. } => match self.records.get(home_pid) {
                None => refuse(
                    &mut stream,
                    Refusal::NoSuchJob,
                    format!("no job with home PID {home_pid} on this node"),
                ),
                Some(r) if peer.uid != 0 && peer.uid != r.uid => {
                    refuse(
                        &mut stream,
                        Refusal::NotYours,
                        format!("job {home_pid} belongs to uid {}", r.uid),
                    );
                }
                Some(_) => refuse(
                    &mut stream,
                    Refusal::Failed,
                    "moving jobs between nodes is not available yet",
                ),
            },
            Request::Signal { .. } => refuse(
                &mut stream,
                Refusal::BadRequest,
                "signal outside a run session",
            ),
        }
    }

    fn run(&self, mut stream: UnixStream, peer: Peer, req: RunRequest, fds: Vec<OwnedFd>) {
        let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
            refuse(
                &mut stream,
                Refusal::BadRequest,
                "a run request must carry stdin, stdout and stderr",
            );
            return;
        };
        match req.place {
            Where::Home => {}
            Where::Node(n) if n == self.me().0 => {}
            Where::Best => {}
            Where::Node(n) => {
                refuse(
                    &mut stream,
                    Refusal::Failed,
                    format!("starting on another node ({n}) is not available yet"),
                );
                return;
            }
        }
        let credentials = match credentials(peer) {
            Ok(c) => c,
            Err(e) => {
                refuse(
                    &mut stream,
                    Refusal::Failed,
                    format!("cannot look up the groups of uid {}: {e}", peer.uid),
                );
                return;
            }
        };
        let spec = JobSpec {
            init: self.init.clone(),
            program: OsString::from_vec(req.program.clone()),
            args: req.args.iter().cloned().map(OsString::from_vec).collect(),
            env: req
                .env
                .iter()
                .filter_map(|kv| {
                    let eq = kv.iter().position(|&b| b == b'=')?;
                    Some((
                        OsString::from_vec(kv[..eq].to_vec()),
                        OsString::from_vec(kv[eq + 1..].to_vec()),
                    ))
                })
                .collect(),
            cwd: req.cwd.clone(),
            credentials: Some(credentials),
            umask: req.umask,
        };
        let (job, pipes) = match Job::spawn(&spec, &Placement::default()) {
            Ok(j) => j,
            Err(e) => {
                refuse(&mut stream, Refusal::Failed, e.to_string());
                return;
            }
        };
        let job = Arc::new(job);
        let home_pid = peer.pid;
        let mut command = vec![String::from_utf8_lossy(&req.program).into_owned()];
        command.extend(
            req.args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        );
        let record = JobRecord {
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            command,
            cwd: JobRecord::lossy_path(&req.cwd),
            node: self.me(),
            node_pid: job.pid(),
            state: JobState::Running,
            migrations: 0,
            started_at: now(),
            updated_at: now(),
        };
        if let Err(e) = self.records.insert(record) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(job.pid()), Signal::SIGKILL);
            let _ = job.wait();
            refuse(&mut stream, Refusal::Busy, e.to_string());
            return;
        }
        let home = Arc::new(HomeJob { local: Mutex::new(Some(Arc::clone(&job))) });
        self.jobs
            .lock()
            .expect("jobs lock")
            .insert(home_pid, Arc::clone(&home));
        info!(home_pid, uid = peer.uid, pid = job.pid(), command = ?req.program_lossy(), stay_home = req.stay_home, "job started");

        // Output into the deputy's descriptors, input from them.
        let out = relay::spawn("job-stdout", pipes.stdout, File::from(stdout));
        let err = relay::spawn("job-stderr", pipes.stderr, File::from(stderr));
        let stop_input = Arc::new(AtomicBool::new(false));
        let stdin_switch = Switch::default();
        stdin_switch.set(Some(Box::new(PipeSink(Some(File::from(pipes.stdin))))));
        let input = relay::spawn_stoppable(
            "job-stdin",
            stdin,
            stdin_switch.clone(),
            Arc::clone(&stop_input),
        );

        if control::send(
            &mut stream,
            &Response::Started {
                home_pid,
                node: self.me().0,
            },
        )
        .is_err()
        {
            let _ = job.signal(Signal::SIGKILL);
        }
        // Signals from the deputy; its end means the deputy is gone, and so must the job be.
        let session = stream.try_clone();
        let watcher_job = Arc::clone(&job);
        let deputy_gone = Arc::new(AtomicBool::new(false));
        let gone = Arc::clone(&deputy_gone);
        if let Ok(mut session) = session {
            std::thread::spawn(move || {
                loop {
                    match control::recv::<Request>(&mut session) {
                        Ok(Request::Signal { signo }) => {
                            if let Ok(sig) = Signal::try_from(signo) {
                                let _ = watcher_job.signal(sig);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {
                            gone.store(true, Ordering::Relaxed);
                            let _ = watcher_job.signal(Signal::SIGKILL);
                            break;
                        }
                    }
                }
            });
        }

        let code = job.wait().unwrap_or(255);
        stop_input.store(true, Ordering::Relaxed);
        let _ = out.join();
        let _ = err.join();
        let _ = input.join();
        self.jobs.lock().expect("jobs lock").remove(&home_pid);
        *home.local.lock().expect("job lock") = None;
        let _ = self
            .records
            .update(home_pid, |r| r.state = JobState::Exited { code });
        info!(
            home_pid,
            code,
            deputy_gone = deputy_gone.load(Ordering::Relaxed),
            "job ended"
        );
        let _ = control::send(&mut stream, &Response::Exited { code });
    }
}

/// What a `Run` request asks for.
#[derive(Debug)]
struct RunRequest {
    program: Vec<u8>,
    args: Vec<Vec<u8>>,
    env: Vec<Vec<u8>>,
    cwd: PathBuf,
    umask: u32,
    place: Where,
    stay_home: bool,
}

impl RunRequest {
    fn program_lossy(&self) -> String {
        String::from_utf8_lossy(&self.program).into_owned()
    }
}

/// The deputy's identity: its uid, gid and the groups of that user.
fn credentials(peer: Peer) -> nix::Result<Credentials> {
    let uid = nix::unistd::Uid::from_raw(peer.uid);
    let gid = nix::unistd::Gid::from_raw(peer.gid);
    let groups = match nix::unistd::User::from_uid(uid)? {
        Some(user) => {
            let name = std::ffi::CString::new(user.name).map_err(|_| nix::errno::Errno::EINVAL)?;
            nix::unistd::getgrouplist(&name, gid)?
                .into_iter()
                .map(nix::unistd::Gid::as_raw)
                .collect()
        }
        None => vec![peer.gid],
    };
    Ok(Credentials {
        uid: peer.uid,
        gid: peer.gid,
        groups,
    })
}
