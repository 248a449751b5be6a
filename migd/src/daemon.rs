//! The migd daemon: the jobs homed on this node (their deputies), the jobs running on this node (home or
//! guest), and the moves between nodes.
//!
//! Every `mosrun` is one control connection: the deputy passes its stdin, stdout and stderr with its `Run`
//! request; migd starts the job under `rmosix-init` with the deputy's uid, gid and groups, relays its output
//! into the deputy's descriptors and the deputy's input into it, forwards the deputy's signals, and answers
//! `Exited` with the job's status. When the job runs elsewhere, its node links back here ([`protocol`]'s job
//! link) and the same happens over the network. If the deputy goes away, the job is killed wherever it runs.
//!
//! Threads and blocking I/O throughout: CRIU and the image transfer block, the number of jobs per node is
//! small, and every flow is a sequence that reads best as straight-line code.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use rmosix_checkpoint::criu::{Criu, Owner, Placement};
use rmosix_checkpoint::images::{ImageDir, prepare_store};
use rmosix_checkpoint::job::{Credentials, Job, JobError, JobSpec};
use rmosix_checkpoint::{migratable, transfer};
use rmosix_common::NodeId;
use rmosix_common::cgroup::{CONTROLLERS, Cgroup, Hierarchy, JOB_PREFIX, JobCgroups};
use rmosix_common::control::{self, ControlError, Refusal, Request, Response, Run, Target, Where};
use rmosix_common::node::Settings;
use rmosix_common::query;
use tracing::{info, warn};

use crate::channel::blocking::{Channel, Reader, Writer};
use crate::protocol::{self, Attach, Moved, Offer, Verdict};
use crate::records::{JobRecord, JobState, RecordStore, RecordsError};
use crate::relay::{self, SharedPipe, Sink, Switch};

/// migd could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error(transparent)]
    Criu(#[from] rmosix_checkpoint::criu::CriuError),
    #[error(transparent)]
    Images(#[from] rmosix_checkpoint::images::ImagesError),
    #[error("rmosix-init not found at {0} (set migd.init)")]
    NoInit(PathBuf),
}

/// The steps of a move, in order, as they appear in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The source freezes the job and writes its images.
    Dump,
    /// The source offers the job; the destination accepts or refuses.
    Offer,
    /// The images travel.
    Transfer,
    /// The destination restores the job stopped and checks its owner.
    Restore,
    /// The source ends its copy; the destination lets the job run.
    Commit,
    /// The job runs at the destination.
    Done,
    /// The move failed; the job runs on at the source.
    Aborted,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Phase::Dump => "dump",
            Phase::Offer => "offer",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        };
        f.write_str(name)
    }
}

/// A move that did not happen; the job runs on where it was.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct MoveError {
    why: Refusal,
    message: String,
}

impl MoveError {
    fn new(why: Refusal, message: impl Into<String>) -> Self {
        Self { why, message: message.into() }
    }
}

type SharedWriter = Arc<Mutex<Writer<TcpStream>>>;

/// Somewhere frames can be sent.
trait FrameOut: Send + Sync {
    fn send_frame(&self, kind: u8, data: &[u8]) -> std::io::Result<()>;
}

impl FrameOut for Mutex<Writer<TcpStream>> {
    fn send_frame(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        self.lock().expect("link lock").send(kind, data).map_err(std::io::Error::other)
    }
}

/// A guest job's link home, which survives the home migd restarting: while the link is down, senders wait
/// (the job's pipes hold its output meanwhile) until it is back or given up.
#[derive(Default)]
struct LinkSlot {
    writer: Mutex<Option<Writer<TcpStream>>>,
    changed: Condvar,
    gone: AtomicBool,
    /// Output frames sent but not yet written out at home (sequence number, kind, payload): sent again on
    /// the next link if this one breaks, so no output is lost when home restarts.
    unacked: Mutex<(u64, std::collections::VecDeque<OutputFrame>)>,
}

/// An output frame kept for sending again: sequence number, kind, payload.
type OutputFrame = (u64, u8, Vec<u8>);

impl LinkSlot {
    fn set(&self, writer: Option<Writer<TcpStream>>) {
        *self.writer.lock().expect("slot") = writer;
        self.changed.notify_all();
    }

    fn give_up(&self) {
        self.gone.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Sends job output, numbered, keeping it until home acknowledges it.
    fn send_output(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let payload = {
            let mut q = self.unacked.lock().expect("unacked");
            let seq = q.0;
            q.0 += 1;
            let mut payload = Vec::with_capacity(8 + data.len());
            payload.extend_from_slice(&seq.to_le_bytes());
            payload.extend_from_slice(data);
            q.1.push_back((seq, kind, payload.clone()));
            payload
        };
        self.send_frame(kind, &payload)
    }

    /// Home wrote everything up to `seq` out.
    fn ack(&self, seq: u64) {
        let mut q = self.unacked.lock().expect("unacked");
        while q.1.front().is_some_and(|(s, _, _)| *s <= seq) {
            q.1.pop_front();
        }
    }

    /// Sends the unacknowledged output again on a new link, then makes it the link.
    fn relink(&self, mut writer: Writer<TcpStream>) -> Result<(), crate::channel::ChannelError> {
        let pending: Vec<OutputFrame> = self.unacked.lock().expect("unacked").1.iter().cloned().collect();
        for (_, kind, payload) in pending {
            writer.send(kind, &payload)?;
        }
        self.set(Some(writer));
        Ok(())
    }
}

/// Job output going home over a guest's link.
struct OutputSink {
    slot: Arc<LinkSlot>,
    kind: u8,
}

impl Sink for OutputSink {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.slot.send_output(self.kind, data)
    }
}

impl FrameOut for LinkSlot {
    fn send_frame(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
        let mut guard = self.writer.lock().expect("slot");
        loop {
            if self.gone.load(Ordering::Relaxed) {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            if let Some(w) = guard.as_mut() {
                match w.send(kind, data) {
                    Ok(()) => return Ok(()),
                    // The link broke: wait for the next one (the frame goes again on it).
                    Err(_) => *guard = None,
                }
            }
            guard = self.changed.wait_timeout(guard, Duration::from_millis(200)).expect("slot").0;
        }
    }
}

/// A job link as a byte sink of one kind of frame.
struct FrameSink {
    out: Arc<dyn FrameOut>,
    kind: u8,
    eof_kind: Option<u8>,
}

impl Sink for FrameSink {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.out.send_frame(self.kind, data)
    }

    fn end(&mut self) -> std::io::Result<()> {
        match self.eof_kind {
            Some(kind) => self.out.send_frame(kind, &[]),
            None => Ok(()),
        }
    }
}

/// Where a running job reports its end.
enum Report {
    /// To the deputy session on this node (the job is home).
    Home(Arc<HomeJob>),
    /// Over the job link to its home node.
    Link(Arc<LinkSlot>),
}

/// A job running on this node.
struct Runner {
    home_node: u32,
    home_pid: i32,
    uid: u32,
    gid: u32,
    /// The owner's supplementary groups when the job started: a restored job must have these and no more.
    groups: Vec<u32>,
    command: Vec<String>,
    job: Arc<Job>,
    /// Write end of the job's stdin pipe, while open.
    stdin: Arc<Mutex<Option<Arc<File>>>>,
    /// Set just before the copy here is killed because it runs elsewhere now.
    moving: AtomicBool,
    /// Set when the job has ended here and its exit status is on its way home: the link's end is then the
    /// job's end, not something to repair.
    exited: AtomicBool,
    /// The relays of the job's stdout and stderr.
    outputs: Mutex<Vec<JoinHandle<u64>>>,
    epoch: u32,
    /// The job's cgroup on this node, removed when the job ends here or leaves.
    cgroup: Option<JobCgroups>,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("home_pid", &self.home_pid).field("pid", &self.job.pid()).finish_non_exhaustive()
    }
}

/// Where a job homed here runs.
enum Location {
    Here(Arc<Runner>),
    Away { link: SharedWriter },
    /// Between two nodes, or between a link's end and the next one's start.
    Moving,
}

/// A job homed on this node, with its deputy.
struct HomeJob {
    home_pid: i32,
    /// Never leaves home (`mosrun -h`).
    stay_home: bool,
    /// The deputy's stdout and stderr (output from any node ends here).
    out: Mutex<File>,
    err: Mutex<File>,
    /// Where the deputy's input goes now.
    stdin: Switch,
    stop_stdin: Arc<AtomicBool>,
    deputy: Mutex<UnixStream>,
    location: Mutex<Location>,
    /// How many of the job's locations (generations) have ended; generation N starts once N have.
    finished_epoch: Mutex<u32>,
    epoch_changed: Condvar,
    /// Outcome of the move in progress, for the `migrate` that asked.
    move_result: Mutex<Option<Result<u32, MoveError>>>,
    move_changed: Condvar,
    /// Seconds the job was frozen during its last move.
    frozen: Mutex<f64>,
    /// Job links from other nodes so far.
    links: std::sync::atomic::AtomicU32,
    /// Generation of the job's link and the last output frame of it written to the deputy.
    written: Mutex<(u32, Option<u64>)>,
    /// The deputy asked for SIGKILL while the job was between nodes: deliver it on arrival.
    killed: AtomicBool,
    done: AtomicBool,
}

impl std::fmt::Debug for HomeJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeJob").field("home_pid", &self.home_pid).finish_non_exhaustive()
    }
}

/// The daemon's shared state.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    init: PathBuf,
    store: PathBuf,
    records: RecordStore,
    criu: Criu,
    homes: Mutex<HashMap<i32, Arc<HomeJob>>>,
    runners: Mutex<HashMap<(u32, i32), Arc<Runner>>>,
    /// migd's own cgroup, the parent of one cgroup per job running here; `None` when this machine gives
    /// migd none (jobs then run in migd's cgroup).
    jobs_cgroup: Option<Cgroup>,
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
    Ok(Peer { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

fn refuse(stream: &mut UnixStream, why: Refusal, message: impl Into<String>) {
    let _ = control::send(stream, &Response::Refused { why, message: message.into() });
}

impl Daemon {
    /// Opens the records, prepares the image store and checks CRIU; does not listen yet.
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        let init = settings.config.migd.init.clone().unwrap_or_else(|| {
            std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("rmosix-init"))).unwrap_or_default()
        });
        if !init.exists() {
            return Err(StartError::NoInit(init));
        }
        let records = RecordStore::open(&settings.config.migd.records)?;
        let criu = Criu::new(&settings.config.checkpoint.criu, &settings.config.checkpoint.log_dir)?;
        let store = settings.config.checkpoint.image_store.clone();
        prepare_store(&store)?;
        // Records of jobs whose deputy ended while migd was down: nobody waits for them any more.
        for r in records.list() {
            if !r.state.has_ended() && nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.home_pid), None).is_err() {
                let _ = records.update(r.home_pid, |r| {
                    r.state = JobState::Lost { reason: "its deputy ended while migd was down".into() };
                });
            }
        }
        let jobs_cgroup = jobs_cgroup();
        Ok(Self {
            settings,
            init,
            store,
            records,
            criu,
            homes: Mutex::new(HashMap::new()),
            runners: Mutex::new(HashMap::new()),
            jobs_cgroup,
        })
    }

    /// A cgroup of its own for generation `epoch` of a job that starts or arrives here, and the placement
    /// that puts the job (or the criu restoring it) there. Each generation has its own, so that on one
    /// machine (the test cluster) the cgroup of the copy that left is never the arriving copy's.
    fn job_cgroup(&self, home_node: u32, home_pid: i32, epoch: u32) -> (Option<JobCgroups>, Placement) {
        let Some(parent) = &self.jobs_cgroup else { return (None, Placement::default()) };
        let name = format!("{}-{epoch}", JobCgroups::name(NodeId(home_node), home_pid.unsigned_abs()));
        let opened = JobCgroups::create(parent, &name).map_err(|e| e.to_string()).and_then(|cgroup| {
            let files = cgroup.procs_files();
            let procs = files
                .iter()
                .map(|f| std::fs::OpenOptions::new().write(true).open(f).map_err(|e| format!("{}: {e}", f.display())))
                .collect::<Result<Vec<File>, String>>();
            match procs {
                Ok(cgroup_procs) => Ok((cgroup, cgroup_procs)),
                Err(e) => {
                    let _ = cgroup.remove();
                    Err(e)
                }
            }
        });
        match opened {
            Ok((cgroup, cgroup_procs)) => (Some(cgroup), Placement { netns: None, cgroup_procs }),
            Err(error) => {
                warn!(home_pid, %error, "cannot make a cgroup for the job; it runs in migd's");
                (None, Placement::default())
            }
        }
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

    /// Listens on the migration port and the control socket; serves both until the process ends.
    pub fn serve(self: &Arc<Self>) -> Result<(), StartError> {
        let addr = SocketAddr::from((self.settings.addr(), self.settings.config.migd.port));
        let tcp = TcpListener::bind(addr).map_err(|source| StartError::Listen { what: addr.to_string(), source })?;
        let daemon = Arc::clone(self);
        std::thread::Builder::new()
            .name("migd-tcp".into())
            .spawn(move || {
                for stream in tcp.incoming() {
                    match stream {
                        Ok(stream) => {
                            let daemon = Arc::clone(&daemon);
                            std::thread::spawn(move || daemon.serve_peer(stream));
                        }
                        Err(e) => warn!(error = %e, "accept on the migration port failed"),
                    }
                }
            })
            .expect("spawn listener thread");
        info!(node = %self.me(), %addr, "migd migration port ready");
        self.serve_control()
    }

    fn serve_control(self: &Arc<Self>) -> Result<(), StartError> {
        let path = self.settings.config.migd.socket.clone();
        let listen = |source| StartError::Listen { what: path.display().to_string(), source };
        // Everyone may connect; what they may do is decided per request from their credentials.
        let listener = rmosix_common::node::bind_local_socket(&path).map_err(listen)?;
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

    fn serve_client(self: Arc<Self>, mut stream: UnixStream) {
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
            Request::Run(run) => {
                self.run(stream, peer, run, fds);
            }
            Request::Migrate { home_pid, target } => {
                let response = match self.migrate(peer, home_pid, target) {
                    Ok(r) => r,
                    Err(e) => Response::Refused { why: e.why, message: e.message },
                };
                let _ = control::send(&mut stream, &response);
            }
            Request::Reattach => self.reattach(stream, peer, fds),
            Request::Guests => {
                let me = self.me().0;
                let count = self.runners.lock().expect("runners").keys().filter(|(home, _)| *home != me).count();
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                let _ = control::send(&mut stream, &Response::Guests { count });
            }
            Request::Signal { .. } => refuse(&mut stream, Refusal::BadRequest, "signal outside a run session"),
        }
    }

    // ---- the home side: deputies -------------------------------------------------------------------------

    /// What to start for a `Run` request, as `credentials`.
    fn job_spec(&self, req: &Run, credentials: Credentials) -> JobSpec {
        JobSpec {
            init: self.init.clone(),
            program: OsString::from_vec(req.program.clone()),
            args: req.args.iter().cloned().map(OsString::from_vec).collect(),
            env: req
                .env
                .iter()
                .filter_map(|kv| {
                    let eq = kv.iter().position(|&b| b == b'=')?;
                    Some((OsString::from_vec(kv[..eq].to_vec()), OsString::from_vec(kv[eq + 1..].to_vec())))
                })
                .collect(),
            cwd: req.cwd.clone(),
            credentials: Some(credentials),
            umask: req.umask,
            rlimits: req.rlimits.iter().map(|l| (l.resource, l.soft, l.hard)).collect(),
        }
    }

    #[expect(clippy::needless_pass_by_value, reason = "the session owns its connection and request")]
    fn run(self: &Arc<Self>, mut stream: UnixStream, peer: Peer, req: Run, fds: Vec<OwnedFd>) {
        let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
            refuse(&mut stream, Refusal::BadRequest, "a run request must carry stdin, stdout and stderr");
            return;
        };
        let start_on = match req.place {
            Where::Home => self.me().0,
            Where::Node(n) if self.settings.map.get(NodeId(n)).is_none() => {
                refuse(&mut stream, Refusal::NoSuchNode, format!("node {n} is not in the cluster map; `mosctl status` lists the nodes"));
                return;
            }
            Where::Node(n) => n,
            Where::Best => self.best_node(None, req.options.mem_mb.unwrap_or(0).saturating_mul(1 << 20)),
        };
        let credentials = match credentials(&stream, peer) {
            Ok(c) => c,
            Err(e) => {
                refuse(&mut stream, Refusal::Failed, format!("cannot read the groups of the deputy (uid {}): {e}", peer.uid));
                return;
            }
        };
        let spec = self.job_spec(&req, credentials.clone());
        let home_pid = peer.pid;
        let (cgroup, placement) = self.job_cgroup(self.me().0, home_pid, 0);
        let (job, pipes) = match Job::spawn(&spec, &placement) {
            Ok(j) => j,
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    let _ = cgroup.remove();
                }
                refuse(&mut stream, Refusal::Failed, e.to_string());
                return;
            }
        };
        let job = Arc::new(job);
        let mut command = vec![String::from_utf8_lossy(&req.program).into_owned()];
        command.extend(req.args.iter().map(|a| String::from_utf8_lossy(a).into_owned()));
        let now = SystemTime::now();
        let record = JobRecord {
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            command: command.clone(),
            cwd: JobRecord::lossy_path(&req.cwd),
            node: self.me(),
            node_pid: job.pid(),
            state: JobState::Running,
            migrations: 0,
            started_at: now,
            updated_at: now,
        };
        if let Err(e) = self.records.insert(record) {
            let _ = job.signal(Signal::SIGKILL);
            let _ = job.wait();
            refuse(&mut stream, Refusal::Busy, e.to_string());
            return;
        }
        let Some(home) = self.new_home(home_pid, req.options.stay_home, 0, stdout, stderr, &stream) else {
            let _ = job.signal(Signal::SIGKILL);
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        info!(home_pid, uid = peer.uid, pid = job.pid(), command = ?command, stay_home = req.options.stay_home, "job started");
        let runner = Arc::new(Runner {
            home_node: self.me().0,
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            groups: credentials.groups,
            command,
            job,
            stdin: Arc::new(Mutex::new(Some(Arc::new(File::from(pipes.stdin))))),
            moving: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            outputs: Mutex::new(Vec::new()),
            epoch: 0,
            cgroup,
        });
        self.attach_here(&home, &runner, pipes.stdout, pipes.stderr);
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));

        if control::send(&mut stream, &Response::Started { home_pid, node: start_on }).is_err() {
            let _ = runner.job.signal(Signal::SIGKILL);
        }
        if start_on != self.me().0 {
            // Started here, moved at once: the simplest way to start elsewhere with everything a move checks.
            let daemon = Arc::clone(self);
            std::thread::spawn(move || daemon.start_away(&runner, start_on));
        }
        Self::deputy_session(stream, &home);
    }

    /// Moves a job just started here to node `to`, where it was asked to start.
    fn start_away(self: &Arc<Self>, runner: &Arc<Runner>, start_on: u32) {
        let home_pid = runner.home_pid;
        // Not while rmosix-init is still starting the program: a tree caught mid-exec may not dump.
        let children = format!("/proc/{0}/task/{0}/children", runner.job.pid());
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::read_to_string(&children).is_ok_and(|c| c.trim().is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A failed attempt leaves the job running here: try a few times before settling for home.
        for attempt in 1..=3 {
            match self.move_runner(runner, start_on) {
                Ok(_) => return,
                Err(e) if attempt < 3 && runner.job.alive() && e.why == Refusal::Failed => {
                    warn!(home_pid, to = start_on, attempt, error = %e, "could not start the job on its node yet");
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => {
                    warn!(home_pid, to = start_on, error = %e, "could not start the job on its node; it runs at home");
                    return;
                }
            }
        }
    }

    /// The record of a job homed here, for its deputy: its output, its input, where it runs.
    fn new_home(
        &self,
        home_pid: i32,
        stay_home: bool,
        epoch: u32,
        stdout: OwnedFd,
        stderr: OwnedFd,
        stream: &UnixStream,
    ) -> Option<Arc<HomeJob>> {
        let (Ok(out), Ok(err), Ok(deputy)) =
            (File::from(stdout).try_clone(), File::from(stderr).try_clone(), stream.try_clone())
        else {
            return None;
        };
        let home = Arc::new(HomeJob {
            home_pid,
            stay_home,
            out: Mutex::new(out),
            err: Mutex::new(err),
            stdin: Switch::default(),
            stop_stdin: Arc::new(AtomicBool::new(false)),
            deputy: Mutex::new(deputy),
            location: Mutex::new(Location::Moving),
            finished_epoch: Mutex::new(epoch),
            epoch_changed: Condvar::new(),
            move_result: Mutex::new(None),
            move_changed: Condvar::new(),
            frozen: Mutex::new(0.0),
            links: std::sync::atomic::AtomicU32::new(0),
            written: Mutex::new((u32::MAX, None)),
            killed: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        self.homes.lock().expect("homes lock").insert(home_pid, Arc::clone(&home));
        Some(home)
    }

    /// Signals from the deputy; its end means the deputy is gone, and so must the job be.
    fn deputy_session(mut stream: UnixStream, home: &HomeJob) {
        loop {
            match control::recv::<Request>(&mut stream) {
                Ok(Request::Signal { signo }) => home.signal(signo),
                Ok(_) => {}
                Err(_) => {
                    if !home.done.load(Ordering::Relaxed) {
                        info!(home_pid = home.home_pid, "deputy gone; killing its job");
                        home.signal(Signal::SIGKILL as i32);
                    }
                    break;
                }
            }
        }
    }

    /// A deputy takes its job up again after this migd restarted: the job runs on another node, which links
    /// back here once it notices.
    fn reattach(self: &Arc<Self>, mut stream: UnixStream, peer: Peer, fds: Vec<OwnedFd>) {
        let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
            refuse(&mut stream, Refusal::BadRequest, "a reattach request must carry stdin, stdout and stderr");
            return;
        };
        let home_pid = peer.pid;
        let Some(record) = self.records.get(home_pid).filter(|r| !r.state.has_ended() && r.uid == peer.uid) else {
            refuse(&mut stream, Refusal::NoSuchJob, format!("no running job with home PID {home_pid} here"));
            return;
        };
        if record.node == self.me() || self.homes.lock().expect("homes lock").contains_key(&home_pid) {
            // It ran here, in the migd that ended: it ended with it.
            let _ = self.records.update(home_pid, |r| r.state = JobState::Lost { reason: "migd restarted".into() });
            refuse(&mut stream, Refusal::NoSuchJob, format!("job {home_pid} ran on this node and ended with migd"));
            return;
        }
        let Some(home) = self.new_home(home_pid, false, record.migrations, stdout, stderr, &stream) else {
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));
        info!(home_pid, node = %record.node, "deputy back; waiting for the job's node to link again");
        if control::send(&mut stream, &Response::Started { home_pid, node: record.node.0 }).is_err() {
            return;
        }
        self.lose_unless_linked(&home, record.node.0);
        Self::deputy_session(stream, &home);
    }

    /// Declares the job lost if its node does not link (again) soon.
    fn lose_unless_linked(self: &Arc<Self>, home: &Arc<HomeJob>, node: u32) {
        let links = home.links.load(Ordering::Relaxed);
        let daemon = Arc::clone(self);
        let home = Arc::clone(home);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if home.links.load(Ordering::Relaxed) != links || home.done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            daemon.finish_home(&home, Response::Lost { reason: format!("node {node} is down or unreachable") });
        });
    }

    /// Makes `runner` (restored or started here) the job's location and relays its output to the deputy.
    fn attach_here(self: &Arc<Self>, home: &Arc<HomeJob>, runner: &Arc<Runner>, stdout: OwnedFd, stderr: OwnedFd) {
        let (Ok(out), Ok(err)) = (home.out.lock().expect("out").try_clone(), home.err.lock().expect("err").try_clone())
        else {
            warn!(home_pid = home.home_pid, "cannot duplicate the deputy's descriptors");
            return;
        };
        *runner.outputs.lock().expect("outputs") =
            vec![relay::spawn("job-stdout", stdout, out), relay::spawn("job-stderr", stderr, err)];
        home.stdin.set(Some(Box::new(SharedPipe(Arc::clone(&runner.stdin)))));
        *home.location.lock().expect("location") = Location::Here(Arc::clone(runner));
        self.runners.lock().expect("runners").insert((runner.home_node, runner.home_pid), Arc::clone(runner));
        let daemon = Arc::clone(self);
        let runner = Arc::clone(runner);
        let report = Report::Home(Arc::clone(home));
        std::thread::spawn(move || daemon.wait_runner(&runner, &report));
    }

    #[expect(clippy::needless_pass_by_value, reason = "the response is the job's last word")]
    fn finish_home(&self, home: &HomeJob, response: Response) {
        if home.done.swap(true, Ordering::Relaxed) {
            return;
        }
        home.stop_stdin.store(true, Ordering::Relaxed);
        let state = match &response {
            Response::Exited { code } => JobState::Exited { code: *code },
            Response::Lost { reason } => JobState::Lost { reason: reason.clone() },
            _ => JobState::Lost { reason: "unknown".into() },
        };
        let _ = self.records.update(home.home_pid, |r| r.state = state);
        self.homes.lock().expect("homes lock").remove(&home.home_pid);
        info!(home_pid = home.home_pid, ?response, "job ended");
        let _ = home.out.lock().expect("out").flush();
        let _ = control::send(&mut home.deputy.lock().expect("deputy"), &response);
        // Wake a `migrate` waiting on this job.
        Self::set_move_result(home, Err(MoveError::new(Refusal::NoSuchJob, "the job ended")));
    }

    /// The home record follows the job.
    fn note_moved(&self, home_pid: i32, node: u32, pid: i32, epoch: u32) {
        let _ = self.records.update(home_pid, |r| {
            r.node = NodeId(node);
            r.node_pid = pid;
            // One generation per move: the link's generation is the number of moves so far.
            r.migrations = epoch;
            r.state = JobState::Running;
        });
    }

    fn set_move_result(home: &HomeJob, result: Result<u32, MoveError>) {
        let mut slot = home.move_result.lock().expect("move result");
        if slot.is_none() {
            *slot = Some(result);
        }
        home.move_changed.notify_all();
    }

    fn best_node(&self, exclude: Option<u32>, mem_bytes: u64) -> u32 {
        let socket = std::env::var_os(query::SOCKET_ENV)
            .map_or_else(|| self.settings.config.infod.socket.clone(), PathBuf::from);
        match query::ask(&socket, &query::Request::Best { mem_bytes }) {
            Ok(query::Response::Best { node }) if Some(node) != exclude => node,
            _ => self.me().0,
        }
    }

    fn migrate(self: &Arc<Self>, peer: Peer, home_pid: i32, target: Target) -> Result<Response, MoveError> {
        let record = self
            .records
            .get(home_pid)
            .filter(|r| !r.state.has_ended())
            .ok_or_else(|| MoveError::new(Refusal::NoSuchJob, format!(
                "no job of this node has home PID {home_pid} (give the PID of the job's mosrun, on the node where mosrun runs)"
            )))?;
        if peer.uid != 0 && peer.uid != record.uid {
            return Err(MoveError::new(
                Refusal::NotYours,
                format!("it is not your job (it belongs to {}); only its owner or root may move it", user_name(record.uid)),
            ));
        }
        let home = self
            .homes
            .lock()
            .expect("homes lock")
            .get(&home_pid)
            .cloned()
            .ok_or_else(|| MoveError::new(Refusal::NoSuchJob, format!("job {home_pid} has ended or is ending")))?;
        if home.stay_home {
            return Err(MoveError::new(Refusal::StaysHome, "it was started to stay on its home node (mosrun -h)"));
        }
        let from = record.node.0;
        let to = match target {
            Target::Home => self.me().0,
            Target::Node(n) => n,
            Target::Balance => self.best_node(Some(from), 0),
        };
        if self.settings.map.get(NodeId(to)).is_none() {
            return Err(MoveError::new(
                Refusal::NoSuchNode,
                format!("node {to} is not in the cluster map; `mosctl status` lists the nodes"),
            ));
        }
        if to == from {
            return Err(MoveError::new(Refusal::Failed, format!("it already runs on node {to}")));
        }
        let started = Instant::now();
        *home.move_result.lock().expect("move result") = None;
        let location = match &*home.location.lock().expect("location") {
            Location::Here(runner) => Ok(Arc::clone(runner)),
            Location::Away { link, .. } => Err(Arc::clone(link)),
            Location::Moving => return Err(MoveError::new(Refusal::Busy, "it is moving already; try again once that move is done")),
        };
        match location {
            Ok(runner) => {
                self.move_runner(&runner, to)?;
            }
            Err(link) => {
                link.lock()
                    .expect("link")
                    .send_json(protocol::MIGRATE, &to)
                    .map_err(|e| MoveError::new(Refusal::TargetDown, format!("node {from}, where it runs, is unreachable ({e}); `mosctl status` shows whether it is up")))?;
            }
        }
        // Wait until the job runs at its destination (or the move failed and it runs on where it was).
        let mut slot = home.move_result.lock().expect("move result");
        let deadline = Instant::now() + Duration::from_mins(10);
        while slot.is_none() && Instant::now() < deadline {
            slot = home.move_changed.wait_timeout(slot, Duration::from_millis(200)).expect("move result").0;
        }
        let result = slot.take().unwrap_or_else(|| Err(MoveError::new(Refusal::Failed, "the move did not finish within 10 minutes")));
        drop(slot);
        let to = result?;
        let frozen = *home.frozen.lock().expect("frozen");
        Ok(Response::Moved { home_pid, from, to, seconds: started.elapsed().as_secs_f64(), frozen })
    }

    // ---- moving a job that runs here -------------------------------------------------------------------

    /// Moves a job running on this node to node `to`. On success the copy here is gone and its output has
    /// been relayed to the end; on failure the job runs on here.
    fn move_runner(self: &Arc<Self>, runner: &Arc<Runner>, to: u32) -> Result<Duration, MoveError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "migration",
            migration_id = %format!("{}.{}-{}", runner.home_node, runner.home_pid, runner.epoch + 1),
            role = "source",
            to
        );
        let _span = span.enter();
        let result = self.move_runner_steps(runner, to, started);
        if let Err(e) = &result {
            warn!(phase = %Phase::Aborted, why = ?e.why, error = %e, "move failed; the job runs on here");
        }
        result
    }

    fn move_runner_steps(self: &Arc<Self>, runner: &Arc<Runner>, to: u32, started: Instant) -> Result<Duration, MoveError> {
        let home_pid = runner.home_pid;
        info!(phase = %Phase::Dump, "moving");
        let dest = self
            .settings
            .map
            .get(NodeId(to))
            .ok_or_else(|| MoveError::new(Refusal::NoSuchNode, format!("node {to} is not in the cluster map; `mosctl status` lists the nodes")))?;
        let failed = |why, e: &dyn std::fmt::Display| MoveError::new(why, format!("{e}"));
        let images = ImageDir::create(&self.store).map_err(|e| failed(Refusal::Failed, &e))?;
        let freeze_start = Instant::now();
        let frozen = runner.job.dump(&self.criu, &images, &Placement::default()).map_err(|e| match e {
            JobError::NotMigratable { reasons, .. } => MoveError::new(
                Refusal::NotMigratable,
                format!("it cannot move: {}", reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")),
            ),
            e => failed(Refusal::Failed, &format!("its checkpoint failed and it runs on where it was: {e}")),
        })?;
        let image_bytes = images.total_size().map_err(|e| failed(Refusal::Failed, &e))?;
        info!(phase = %Phase::Offer, image_bytes, dumped_ms = freeze_start.elapsed().as_millis(), "dumped");
        let stream = TcpStream::connect_timeout(&SocketAddr::from((dest.addr, self.settings.config.migd.port)), Duration::from_secs(5))
            .map_err(|e| failed(Refusal::TargetDown, &format!("node {to} is unreachable ({e}); `mosctl status` shows whether it is up")))?;
        let _ = stream.set_nodelay(true);
        let mut link = Channel::client_tcp(stream, &self.settings.key, self.me().0)
            .map_err(|e| failed(Refusal::TargetDown, &format!("node {to} did not accept the connection ({e}); are its cluster key and migd the same as ours?")))?;
        let offer = Offer {
            home_node: runner.home_node,
            home_pid,
            uid: runner.uid,
            gid: runner.gid,
            groups: runner.groups.clone(),
            command: runner.command.clone(),
            image_bytes,
            epoch: runner.epoch + 1,
        };
        let net = |e: crate::channel::ChannelError| failed(Refusal::TargetDown, &format!("the connection to node {to} broke ({e})"));
        link.send_json(protocol::OFFER, &offer).map_err(net)?;
        let (_, verdict): (u8, Verdict) = link.recv_json().map_err(net)?;
        if !verdict.ok {
            return Err(MoveError::new(verdict.refusal.unwrap_or(Refusal::Failed), verdict.message));
        }
        info!(phase = %Phase::Transfer, "accepted");
        link.send(protocol::IMAGES, &[]).map_err(net)?;
        let key = *link.bulk_key();
        let raw = link.raw_mut().map_err(net)?;
        transfer::pack(images.path(), raw, &key).map_err(|e| failed(Refusal::Failed, &e))?;
        let (_, verdict): (u8, Verdict) = link.recv_json().map_err(net)?;
        if !verdict.ok {
            return Err(MoveError::new(verdict.refusal.unwrap_or(Refusal::Failed), verdict.message));
        }
        info!(phase = %Phase::Commit, "restored stopped at the destination");
        // The destination holds a stopped copy: end ours, then let it run.
        runner.moving.store(true, Ordering::Relaxed);
        frozen.commit().map_err(|e| failed(Refusal::Failed, &e))?;
        let committed = link.send(protocol::COMMITTED, &[]);
        let freeze = freeze_start.elapsed();
        drop(images);
        // What the old copy wrote before the freeze is still in its pipes: relay it to the end first.
        for relay in runner.outputs.lock().expect("outputs").drain(..) {
            let _ = relay.join();
        }
        *runner.stdin.lock().expect("stdin") = None;
        self.runners.lock().expect("runners").remove(&(runner.home_node, home_pid));
        info!(phase = %Phase::Done, home_pid, to, pid = verdict.pid, seconds = started.elapsed().as_secs_f64(), frozen = freeze.as_secs_f64(), "job moved");
        if let Err(e) = committed {
            warn!(home_pid, to, error = %e, "node {to} did not hear the commit; the job may stay stopped there");
        }
        if runner.home_node == self.me().0
            && let Some(home) = self.homes.lock().expect("homes lock").get(&home_pid).cloned()
        {
            *home.location.lock().expect("location") = Location::Moving;
            *home.frozen.lock().expect("frozen") = freeze.as_secs_f64();
            home.stdin.set(None);
            let mut done = home.finished_epoch.lock().expect("epoch");
            *done = runner.epoch + 1;
            home.epoch_changed.notify_all();
        }
        Ok(freeze)
    }

    /// Waits for a job running here to end and reports its status, unless it ended because it moved.
    fn wait_runner(&self, runner: &Runner, report: &Report) {
        let code = runner.job.wait().unwrap_or(255);
        // Ended here or left: either way nothing of it stays on this node.
        if let Some(cgroup) = &runner.cgroup {
            if let Ok(cpu) = cgroup.cpu_time() {
                info!(home_pid = runner.home_pid, cpu_seconds = cpu.as_secs_f64(), "job's CPU time on this node");
            }
            if let Err(error) = cgroup.remove() {
                warn!(home_pid = runner.home_pid, %error, "cannot remove the job's cgroup");
            }
        }
        if runner.moving.load(Ordering::Relaxed) {
            return;
        }
        for relay in runner.outputs.lock().expect("outputs").drain(..) {
            let _ = relay.join();
        }
        self.runners.lock().expect("runners").remove(&(runner.home_node, runner.home_pid));
        match report {
            Report::Home(home) => self.finish_home(home, Response::Exited { code }),
            Report::Link(link) => {
                runner.exited.store(true, Ordering::Relaxed);
                let _ = link.send_frame(protocol::EXIT, &serde_json::to_vec(&code).expect("json"));
            }
        }
    }

    // ---- the network side -------------------------------------------------------------------------------

    fn serve_peer(self: Arc<Self>, stream: TcpStream) {
        let Ok(addr) = stream.peer_addr() else { return };
        let _ = stream.set_nodelay(true);
        let mut link = match Channel::server_tcp(stream, &self.settings.key, self.me().0) {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "peer failed authentication; dropped");
                return;
            }
        };
        let node = link.peer_node();
        if self.settings.map.get(NodeId(node)).is_none_or(|n| std::net::IpAddr::V4(n.addr) != addr.ip()) {
            warn!(%addr, node, "peer claims a node id that is not its map address; dropped");
            return;
        }
        match link.recv() {
            Ok((protocol::OFFER, payload)) => match serde_json::from_slice::<Offer>(&payload) {
                Ok(offer) => self.receive_job(link, node, offer),
                Err(e) => warn!(%addr, error = %e, "bad offer"),
            },
            Ok((protocol::ATTACH, payload)) => match serde_json::from_slice::<Attach>(&payload) {
                Ok(attach) => self.serve_link(link, node, &attach),
                Err(e) => warn!(%addr, error = %e, "bad attach"),
            },
            Ok((kind, _)) => warn!(%addr, kind, "unexpected first message; dropped"),
            Err(e) => warn!(%addr, error = %e, "peer went away"),
        }
    }

    /// The destination of a move.
    fn receive_job(self: Arc<Self>, link: Channel<TcpStream>, from: u32, offer: Offer) {
        let span = tracing::info_span!(
            "migration",
            migration_id = %format!("{}.{}-{}", offer.home_node, offer.home_pid, offer.epoch),
            role = "destination",
            from
        );
        let _span = span.enter();
        info!(phase = %Phase::Offer, image_bytes = offer.image_bytes, "offered a job");
        self.receive_job_steps(link, from, offer);
    }

    #[expect(clippy::needless_pass_by_value, reason = "the offer is consumed by the move it starts")]
    fn receive_job_steps(self: Arc<Self>, mut link: Channel<TcpStream>, from: u32, offer: Offer) {
        let home_pid = offer.home_pid;
        let at_home = offer.home_node == self.me().0;
        if let Err((why, message)) = self.admit(&offer) {
            info!(home_pid, from, %message, "offer refused");
            let _ = link.send_json(protocol::VERDICT, &Verdict::no(why, message));
            return;
        }
        if link.send_json(protocol::VERDICT, &Verdict::yes(0)).is_err() {
            return;
        }
        let images = match self.receive_images(&mut link) {
            Ok(images) => images,
            Err(e) => {
                warn!(home_pid, from, error = %e, "image transfer failed");
                let _ = link.send_json(protocol::RUNNING, &Verdict::no(Refusal::Failed, e));
                return;
            }
        };
        info!(phase = %Phase::Restore, "images received");
        let owner = Owner { uid: offer.uid, gid: offer.gid };
        let (cgroup, placement) = self.job_cgroup(offer.home_node, home_pid, offer.epoch);
        let drop_cgroup = || {
            if let Some(cgroup) = &cgroup {
                let _ = cgroup.remove();
            }
        };
        let (job, pipes) = match Job::restore_stopped(&self.criu, &images, placement, Some(owner)) {
            Ok(j) => j,
            Err(e) => {
                drop_cgroup();
                warn!(home_pid, from, error = %e, "restore failed");
                let _ = link.send_json(protocol::RUNNING, &Verdict::no(Refusal::Failed, e.to_string()));
                return;
            }
        };
        drop(images);
        // The job runs with its owner's credentials and no other: check every process before it runs.
        if let Err(e) = check_owner(job.pid(), owner, &offer.groups) {
            warn!(home_pid, from, error = %e, "restored job has the wrong owner; killed");
            let _ = job.signal(Signal::SIGKILL);
            let _ = job.wait();
            drop_cgroup();
            let _ = link.send_json(protocol::RUNNING, &Verdict::no(Refusal::Failed, e));
            return;
        }
        if link.send_json(protocol::RUNNING, &Verdict::yes(job.pid())).is_err()
            || !matches!(link.recv(), Ok((protocol::COMMITTED, _)))
        {
            // The source never let its copy go: it runs on there, so this one must not.
            warn!(home_pid, from, "no commit from the source; dropping the restored copy");
            let _ = job.signal(Signal::SIGKILL);
            let _ = job.wait();
            drop_cgroup();
            return;
        }
        let runner = Arc::new(Runner {
            home_node: offer.home_node,
            home_pid,
            uid: offer.uid,
            gid: offer.gid,
            groups: offer.groups.clone(),
            command: offer.command.clone(),
            job: Arc::new(job),
            stdin: Arc::new(Mutex::new(Some(Arc::new(File::from(pipes.stdin))))),
            moving: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            outputs: Mutex::new(Vec::new()),
            epoch: offer.epoch,
            cgroup,
        });
        if at_home {
            self.note_moved(home_pid, self.me().0, runner.job.pid(), offer.epoch);
            let Some(home) = self.homes.lock().expect("homes lock").get(&home_pid).cloned() else {
                let _ = runner.job.signal(Signal::SIGKILL);
                return;
            };
            home.wait_epoch(offer.epoch);
            self.attach_here(&home, &runner, pipes.stdout, pipes.stderr);
            runner.job.resume();
            if home.killed.load(Ordering::Relaxed) {
                home.signal(Signal::SIGKILL as i32);
            }
            Self::set_move_result(&home, Ok(self.me().0));
            info!(home_pid, from, "job is home again");
        } else if let Err(e) = self.run_guest(&runner, pipes.stdout, pipes.stderr) {
            warn!(home_pid, error = %e, "cannot link the job to its home; killed");
            let _ = runner.job.signal(Signal::SIGKILL);
        }
    }

    /// Whether this node takes the job offered: its policy, and for a job coming home, its deputy.
    fn admit(&self, offer: &Offer) -> Result<(), (Refusal, String)> {
        let me = self.me();
        let policy = &self.settings.config.policy;
        if offer.home_node == me.0 {
            if !self.homes.lock().expect("homes lock").contains_key(&offer.home_pid) {
                return Err((Refusal::NoSuchJob, format!("job {} has no deputy here", offer.home_pid)));
            }
            return Ok(());
        }
        if policy.block_guests {
            let why = format!("node {me} blocks guests (its policy block_guests is set); choose another node");
            return Err((Refusal::TargetBlocksGuests, why));
        }
        if offer.uid == 0 && !policy.allow_root_guests {
            let why = format!(
                "node {me} does not take root's jobs from other nodes (its policy allow_root_guests is off); \
                 run the job as an ordinary user"
            );
            return Err((Refusal::TargetRefusesRoot, why));
        }
        Ok(())
    }

    /// Receives a job's images into a new image directory of the store.
    fn receive_images(&self, link: &mut Channel<TcpStream>) -> Result<ImageDir, String> {
        let images = ImageDir::create(&self.store).map_err(|e| e.to_string())?;
        let key = *link.bulk_key();
        match link.recv() {
            Ok((protocol::IMAGES, _)) => {
                let raw = link.raw_mut().map_err(|e| e.to_string())?;
                transfer::unpack(raw, images.path(), &key).map_err(|e| e.to_string())?;
                Ok(images)
            }
            Ok((kind, _)) => Err(format!("expected images, got message {kind}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Connects to the job's home node and attaches the job there.
    fn link_home(&self, runner: &Runner) -> Result<(Reader<TcpStream>, Writer<TcpStream>), String> {
        let home = self.settings.map.get(NodeId(runner.home_node)).ok_or("home node not in the map")?;
        let addr = SocketAddr::from((home.addr, self.settings.config.migd.port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("cannot reach home node {}: {e}", runner.home_node))?;
        let _ = stream.set_nodelay(true);
        let link = Channel::client_tcp(stream, &self.settings.key, self.me().0).map_err(|e| e.to_string())?;
        let (reader, mut writer) = link.into_split().map_err(|e| e.to_string())?;
        let attach = Attach { home_pid: runner.home_pid, pid: runner.job.pid(), epoch: runner.epoch };
        writer.send_json(protocol::ATTACH, &attach).map_err(|e| e.to_string())?;
        Ok((reader, writer))
    }

    /// Runs a guest job: links it to its home node and serves the link, linking again if it breaks (the
    /// home migd restarting) for up to a minute.
    fn run_guest(self: &Arc<Self>, runner: &Arc<Runner>, stdout: OwnedFd, stderr: OwnedFd) -> Result<(), String> {
        let (reader, writer) = self.link_home(runner)?;
        let slot = Arc::new(LinkSlot::default());
        slot.set(Some(writer));
        *runner.outputs.lock().expect("outputs") = vec![
            relay::spawn("guest-stdout", stdout, OutputSink { slot: Arc::clone(&slot), kind: protocol::STDOUT }),
            relay::spawn("guest-stderr", stderr, OutputSink { slot: Arc::clone(&slot), kind: protocol::STDERR }),
        ];
        self.runners.lock().expect("runners").insert((runner.home_node, runner.home_pid), Arc::clone(runner));
        {
            let daemon = Arc::clone(self);
            let runner = Arc::clone(runner);
            let report = Report::Link(Arc::clone(&slot));
            std::thread::spawn(move || daemon.wait_runner(&runner, &report));
        }
        runner.job.resume();
        info!(home_pid = runner.home_pid, home = runner.home_node, pid = runner.job.pid(), "guest job running");
        let daemon = Arc::clone(self);
        let runner = Arc::clone(runner);
        std::thread::spawn(move || daemon.serve_guest_link(&runner, &slot, reader));
        Ok(())
    }

    /// Orders from home for a guest job.
    fn serve_guest_link(self: &Arc<Self>, runner: &Arc<Runner>, slot: &Arc<LinkSlot>, mut reader: Reader<TcpStream>) {
        // Since when home has been out of reach (links that drop at once do not count as reaching it).
        let mut lost_since: Option<Instant> = None;
        loop {
            let message = reader.recv();
            if message.is_ok() {
                lost_since = None;
            }
            match message {
                Ok((protocol::STDIN, data)) => {
                    let _ = SharedPipe(Arc::clone(&runner.stdin)).put(&data);
                }
                Ok((protocol::STDIN_EOF, _)) => *runner.stdin.lock().expect("stdin") = None,
                Ok((protocol::SIGNAL, data)) => {
                    if let Ok(Ok(sig)) = serde_json::from_slice::<i32>(&data).map(Signal::try_from) {
                        let _ = runner.job.signal(sig);
                    }
                }
                Ok((protocol::KILL, _)) => {
                    let _ = runner.job.signal(Signal::SIGKILL);
                }
                Ok((protocol::ACK, data)) => {
                    if let Ok(seq) = <[u8; 8]>::try_from(data.as_slice()) {
                        slot.ack(u64::from_le_bytes(seq));
                    }
                }
                Ok((protocol::MIGRATE, data)) => {
                    let Ok(to) = serde_json::from_slice::<u32>(&data) else { continue };
                    let started = Instant::now();
                    match self.move_runner(runner, to) {
                        Ok(frozen) => {
                            let moved = Moved { to, seconds: started.elapsed().as_secs_f64(), frozen: frozen.as_secs_f64() };
                            let _ = slot.send_frame(protocol::MOVED, &serde_json::to_vec(&moved).expect("json"));
                            if let Some(mut w) = slot.writer.lock().expect("slot").take() {
                                let _ = w.shutdown();
                            }
                            slot.give_up();
                            return;
                        }
                        Err(e) => {
                            let failure = serde_json::to_vec(&(e.why, e.message)).expect("json");
                            let _ = slot.send_frame(protocol::MOVE_FAILED, &failure);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if runner.moving.load(Ordering::Relaxed)
                        || slot.gone.load(Ordering::Relaxed)
                        || runner.exited.load(Ordering::Relaxed)
                    {
                        return;
                    }
                    // Home went away (its migd restarting, say): link again while it comes back.
                    warn!(home_pid = runner.home_pid, error = %e, "link to the home node lost; linking again");
                    slot.set(None);
                    let deadline = *lost_since.get_or_insert_with(Instant::now) + Duration::from_mins(1);
                    loop {
                        std::thread::sleep(Duration::from_millis(500));
                        // Checked first: a home that accepts links and drops them at once (it no longer
                        // knows the job) must not keep this loop going for ever.
                        if Instant::now() > deadline || !runner.job.alive() {
                            // Nobody can see this job's output or wait for it any more.
                            warn!(home_pid = runner.home_pid, "home node unreachable; killing the guest job");
                            slot.give_up();
                            let _ = runner.job.signal(Signal::SIGKILL);
                            return;
                        }
                        if let Ok((r, w)) = self.link_home(runner)
                            && slot.relink(w).is_ok()
                        {
                            reader = r;
                            info!(home_pid = runner.home_pid, "linked to the home node again");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Home side of a job link: the job runs on node `node`.
    fn serve_link(self: Arc<Self>, link: Channel<TcpStream>, node: u32, attach: &Attach) {
        // After a restart of this migd the deputy may come back a moment after the job's node.
        let deadline = Instant::now() + Duration::from_secs(30);
        let home = loop {
            if let Some(home) = self.homes.lock().expect("homes lock").get(&attach.home_pid).cloned() {
                break home;
            }
            let known = self.records.get(attach.home_pid).is_some_and(|r| !r.state.has_ended());
            if !known || Instant::now() > deadline {
                warn!(home_pid = attach.home_pid, node, "link for a job with no deputy here; dropped");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let Ok((mut reader, writer)) = link.into_split() else { return };
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        home.wait_epoch(attach.epoch);
        home.links.fetch_add(1, Ordering::Relaxed);
        *home.location.lock().expect("location") = Location::Away { link: Arc::clone(&writer) };
        let out: Arc<dyn FrameOut> = Arc::clone(&writer) as Arc<dyn FrameOut>;
        home.stdin.set(Some(Box::new(FrameSink { out, kind: protocol::STDIN, eof_kind: Some(protocol::STDIN_EOF) })));
        if home.killed.load(Ordering::Relaxed) {
            home.signal(Signal::SIGKILL as i32);
        }
        self.note_moved(attach.home_pid, node, attach.pid, attach.epoch);
        Self::set_move_result(&home, Ok(node));
        info!(home_pid = attach.home_pid, node, pid = attach.pid, "job runs away from home");
        {
            // Output numbering starts again with each generation; a link again of the same one goes on.
            let mut written = home.written.lock().expect("written");
            if written.0 != attach.epoch {
                *written = (attach.epoch, None);
            }
        }
        loop {
            match reader.recv() {
                Ok((kind @ (protocol::STDOUT | protocol::STDERR), data)) if data.len() >= 8 => {
                    let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                    let mut written = home.written.lock().expect("written");
                    // A frame sent again after a broken link, already written: only acknowledge it.
                    if written.1.is_none_or(|last| seq > last) {
                        let target = if kind == protocol::STDOUT { &home.out } else { &home.err };
                        let _ = target.lock().expect("output").write_all(&data[8..]);
                        written.1 = Some(seq);
                    }
                    drop(written);
                    let _ = writer.lock().expect("link").send(protocol::ACK, &seq.to_le_bytes());
                }
                Ok((protocol::EXIT, data)) => {
                    let code = serde_json::from_slice::<i32>(&data).unwrap_or(255);
                    self.finish_home(&home, Response::Exited { code });
                    return;
                }
                Ok((protocol::MOVED, data)) => {
                    let moved: Option<Moved> = serde_json::from_slice(&data).ok();
                    if let Some(m) = &moved {
                        *home.frozen.lock().expect("frozen") = m.frozen;
                    }
                    info!(home_pid = attach.home_pid, from = node, to = ?moved.map(|m| m.to), "job left node");
                    *home.location.lock().expect("location") = Location::Moving;
                    home.stdin.set(None);
                    let mut done = home.finished_epoch.lock().expect("epoch");
                    *done = attach.epoch + 1;
                    home.epoch_changed.notify_all();
                    return;
                }
                Ok((protocol::MOVE_FAILED, data)) => {
                    let (why, message): (Refusal, String) =
                        serde_json::from_slice(&data).unwrap_or((Refusal::Failed, "move failed".into()));
                    Self::set_move_result(&home, Err(MoveError::new(why, message)));
                }
                Ok(_) => {}
                Err(e) => {
                    if home.done.load(Ordering::Relaxed) {
                        return;
                    }
                    // The node may be restarting its migd or briefly unreachable: give it time to link again.
                    warn!(home_pid = attach.home_pid, node, error = %e, "job link lost");
                    *home.location.lock().expect("location") = Location::Moving;
                    home.stdin.set(None);
                    self.lose_unless_linked(&home, node);
                    return;
                }
            }
        }
    }
}

impl HomeJob {
    /// Forwards a signal to the job wherever it runs.
    fn signal(&self, signo: i32) {
        match &*self.location.lock().expect("location") {
            Location::Here(runner) => {
                if let Ok(sig) = Signal::try_from(signo) {
                    let _ = runner.job.signal(sig);
                }
            }
            Location::Away { link, .. } => {
                let kind = if signo == Signal::SIGKILL as i32 { protocol::KILL } else { protocol::SIGNAL };
                let _ = link.lock().expect("link").send_json(kind, &signo);
            }
            Location::Moving => {
                if signo == Signal::SIGKILL as i32 {
                    self.killed.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// Waits until the job's locations before generation `epoch` have ended, so generation `epoch` may start.
    fn wait_epoch(&self, epoch: u32) {
        let mut done = self.finished_epoch.lock().expect("epoch");
        let deadline = Instant::now() + Duration::from_mins(10);
        while *done < epoch && Instant::now() < deadline {
            done = self.epoch_changed.wait_timeout(done, Duration::from_millis(200)).expect("epoch").0;
        }
    }
}

/// Every process of the restored job runs as its owner and gained nothing by moving: the owner's uid and
/// gid (real, effective, saved, filesystem) and, for an ordinary user, no capabilities at all. The job's init
/// runs as the owner too, so the whole tree is checked.
fn check_owner(root: i32, owner: Owner, groups: &[u32]) -> Result<(), String> {
    let pids = migratable::job_processes(root).map_err(|e| e.to_string())?;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
        identity_of(&status, owner, groups).map_err(|what| format!("process {pid} of the restored job {what}"))?;
    }
    Ok(())
}

/// Checks one `/proc/PID/status` against `owner` and its supplementary `groups` (see [`check_owner`]).
fn identity_of(status: &str, owner: Owner, groups: &[u32]) -> Result<(), String> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let ids = |name: &str| -> Vec<u32> {
        field(name).map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect()).unwrap_or_default()
    };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    if uids.len() != 4 || uids.iter().any(|&u| u != owner.uid) {
        return Err(format!("runs as uids {uids:?}, not as its owner {}", owner.uid));
    }
    if gids.len() != 4 || gids.iter().any(|&g| g != owner.gid) {
        return Err(format!("runs with gids {gids:?}, not with its owner's group {}", owner.gid));
    }
    let mut has = ids("Groups:");
    let mut wanted = groups.to_vec();
    has.sort_unstable();
    wanted.sort_unstable();
    has.dedup();
    wanted.dedup();
    if has != wanted {
        return Err(format!("has supplementary groups {has:?}, not its owner's {wanted:?}"));
    }
    if owner.uid != 0 {
        for set in ["CapPrm:", "CapEff:", "CapAmb:"] {
            let caps = field(set).and_then(|v| u64::from_str_radix(v, 16).ok());
            if caps != Some(0) {
                return Err(format!("has capabilities ({set} {})", field(set).unwrap_or("?")));
            }
        }
    }
    Ok(())
}

/// migd's own cgroup, made ready to hold one cgroup per job (see [`Hierarchy::delegate_self`]), with the
/// empty job cgroups of an earlier migd removed. `None`, with the reason logged, when cgroups can't be used.
fn jobs_cgroup() -> Option<Cgroup> {
    let parent = match Hierarchy::detect().and_then(|h| h.delegate_self(CONTROLLERS, "supervisor")) {
        Ok(parent) => parent,
        Err(error) => {
            warn!(%error, "no cgroups for jobs; they run in migd's own cgroup");
            return None;
        }
    };
    // Only leftovers: empty, and old enough not to be a job cgroup another migd of this machine has just
    // made (the test cluster runs several under one parent on cgroup v1).
    match JobCgroups::remove_stale(&parent, JOB_PREFIX, Duration::from_mins(1)) {
        Ok(removed) if !removed.is_empty() => info!(?removed, "removed job cgroups left by an earlier migd"),
        Ok(_) => {}
        Err(error) => warn!(%error, "cannot remove job cgroups left by an earlier migd"),
    }
    info!(cgroup = %parent, "jobs get cgroups under this one");
    Some(parent)
}

/// A user's name for messages, or the uid when the user database has none.
fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

/// The deputy's identity: its uid and gid, and its supplementary groups as the kernel knows them
/// (`SO_PEERGROUPS`): the groups the deputy really has (after `newgrp` or `sg`, say), not the user database's.
fn credentials(stream: &UnixStream, peer: Peer) -> std::io::Result<Credentials> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: getsockopt writes at most `len` bytes into the buffer and says how many it needs.
        let ret = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed);
            return Ok(Credentials { uid: peer.uid, gid: peer.gid, groups });
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(uids: &str, gids: &str, groups: &str, caps: &str) -> String {
        format!(
            "Name:\tpython3\nUid:\t{uids}\nGid:\t{gids}\nGroups:\t{groups}\nCapInh:\t0000000000000000\n\
             CapPrm:\t{caps}\nCapEff:\t{caps}\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
        )
    }

    #[test]
    fn a_restored_job_must_be_its_owner_with_nothing_gained() {
        let owner = Owner { uid: 1001, gid: 1001 };
        let none = "0000000000000000";
        assert_eq!(identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "27 1001 ", none), owner, &[1001, 27]), Ok(()));
        let setuid_root = identity_of(&status("1001\t0\t1001\t1001", "1001\t1001\t1001\t1001", "", none), owner, &[]);
        assert!(setuid_root.unwrap_err().contains("uids [1001, 0, 1001, 1001]"));
        let other_group = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t0\t1001", "", none), owner, &[]);
        assert!(other_group.unwrap_err().contains("gids"));
        let more_groups = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "0 27", none), owner, &[27]);
        assert!(more_groups.unwrap_err().contains("supplementary groups [0, 27]"));
        let caps = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "", "0000000000200000"), owner, &[]);
        assert!(caps.unwrap_err().contains("capabilities"));
        // Root's job keeps root's capabilities.
        let root = Owner { uid: 0, gid: 0 };
        assert_eq!(identity_of(&status("0\t0\t0\t0", "0\t0\t0\t0", "", "000001ffffffffff"), root, &[]), Ok(()));
        assert!(identity_of("garbage", owner, &[]).is_err());
    }
}
