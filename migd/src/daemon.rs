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
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use rmosix_checkpoint::criu::{Criu, Owner, Placement};
use rmosix_checkpoint::images::prepare_store;
use rmosix_checkpoint::job::{Credentials, Job, JobSpec};
use rmosix_checkpoint::migratable;
use rmosix_common::NodeId;
use rmosix_common::cgroup::{CONTROLLERS, Cgroup, Hierarchy, JOB_PREFIX, JobCgroups};
use rmosix_common::control::{self, ControlError, JobFacts, Refusal, Request, Response, Run, Target, Where};
use rmosix_common::node::Settings;
use rmosix_common::query;
use tracing::{info, warn};

use crate::channel::blocking::{Channel, Reader, Writer};
use crate::protocol::{self, Ask, Attach, Moved, Offer};

mod adoption;
mod destination;
mod jobs;
mod ownership;
mod source;
use crate::records::{JobRecord, JobState, RecordStore, RecordsError};
use crate::keeper::{Keeper, Kept};
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
    /// The destination holds the images; home records the move; the source ends its copy.
    Commit,
    /// The destination has restored the job; home takes its link; the job runs.
    Resume,
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
            Phase::Resume => "resume",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        };
        f.write_str(name)
    }
}

/// Where a move is now, for a test harness to strike at: `RMOSIX_PHASE_DELAY=<phase>:<ms>` makes every
/// move pause that long as it enters that phase (and says so in the log). Unset in normal operation.
fn enter(phase: Phase) {
    static DELAY: std::sync::OnceLock<Option<(String, Duration)>> = std::sync::OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let value = std::env::var("RMOSIX_PHASE_DELAY").ok()?;
        let (name, ms) = value.split_once(':')?;
        Some((name.to_owned(), Duration::from_millis(ms.parse().ok()?)))
    });
    if let Some((name, pause)) = delay
        && *name == phase.to_string()
    {
        warn!(%phase, pause_ms = pause.as_millis(), "pausing at this phase (RMOSIX_PHASE_DELAY)");
        std::thread::sleep(*pause);
    }
}

/// Sends `KEEPALIVE` on a link every interval until dropped, so the other end can tell silence from a
/// node that has nothing to say.
struct Pulse {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Pulse {
    fn start(out: Arc<dyn FrameOut>, every: Duration) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if out.send_frame(protocol::KEEPALIVE, &[]).is_err() {
                    break;
                }
            }
        });
        Self { _stop: stop }
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
struct LinkSlot {
    /// The numbering of this slot's output frames ([`Attach::stream`]).
    stream: u64,
    writer: Mutex<Option<Writer<TcpStream>>>,
    changed: Condvar,
    gone: AtomicBool,
    /// Output frames sent but not yet written out at home (sequence number, kind, payload): sent again on
    /// the next link if this one breaks, so no output is lost when home restarts.
    unacked: Mutex<(u64, std::collections::VecDeque<OutputFrame>)>,
}

/// An output frame kept for sending again: sequence number, kind, payload.
type OutputFrame = (u64, u8, Vec<u8>);

impl Default for LinkSlot {
    fn default() -> Self {
        Self {
            stream: rand::random(),
            writer: Mutex::default(),
            changed: Condvar::default(),
            gone: AtomicBool::default(),
            unacked: Mutex::default(),
        }
    }
}

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

/// The stdin of a job running here, as the deputy's input is relayed into it.
struct RunnerStdin(Arc<Runner>);

impl Sink for RunnerStdin {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        SharedPipe(Arc::clone(&self.0.stdin)).put(data)
    }

    fn end(&mut self) -> std::io::Result<()> {
        self.0.close_stdin();
        Ok(())
    }
}

/// Which job a copy belongs to and whose it is: the key of its home record, and the identity every copy of
/// it runs with, no more and no less.
#[derive(Debug, Clone)]
struct Whose {
    home_node: u32,
    home_pid: i32,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    command: Vec<String>,
    facts: JobFacts,
}

impl From<&crate::protocol::Offer> for Whose {
    fn from(offer: &crate::protocol::Offer) -> Self {
        Self {
            home_node: offer.home_node,
            home_pid: offer.home_pid,
            uid: offer.uid,
            gid: offer.gid,
            groups: offer.groups.clone(),
            command: offer.command.clone(),
            facts: offer.facts,
        }
    }
}

impl From<&Kept> for Whose {
    fn from(kept: &Kept) -> Self {
        Self {
            home_node: kept.home_node,
            home_pid: kept.home_pid,
            uid: kept.uid,
            gid: kept.gid,
            groups: kept.groups.clone(),
            command: kept.command.clone(),
            facts: kept.facts,
        }
    }
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
    facts: JobFacts,
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
    /// A guest's link home, while it has one.
    link: Mutex<Option<Arc<LinkSlot>>>,
    /// A move of this copy, asked for over its link, is under way.
    in_move: AtomicBool,
    /// The keeper holding the job's pipes too, told when the job's stdin ends (its copy of the write end
    /// would keep the job from seeing the end).
    keeper: Option<Keeper>,
}

impl Runner {
    fn new(whose: Whose, job: Job, stdin: Option<OwnedFd>, epoch: u32, cgroup: Option<JobCgroups>) -> Self {
        let Whose { home_node, home_pid, uid, gid, groups, command, facts } = whose;
        Self {
            home_node,
            home_pid,
            uid,
            gid,
            groups,
            command,
            facts,
            job: Arc::new(job),
            stdin: Arc::new(Mutex::new(stdin.map(|fd| Arc::new(File::from(fd))))),
            moving: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            outputs: Mutex::new(Vec::new()),
            epoch,
            cgroup,
            link: Mutex::new(None),
            in_move: AtomicBool::new(false),
            keeper: None,
        }
    }

    /// Which job this copy is, and whose.
    fn whose(&self) -> Whose {
        Whose {
            home_node: self.home_node,
            home_pid: self.home_pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            command: self.command.clone(),
            facts: self.facts,
        }
    }

    /// The runner of a job whose pipes `keeper` holds too.
    fn kept_by(mut self, keeper: Option<&Keeper>) -> Self {
        self.keeper = keeper.cloned();
        self
    }

    /// The end of the job's input: the job reads what is in its stdin pipe, then end of file.
    fn close_stdin(&self) {
        let was_open = self.stdin.lock().expect("stdin").take().is_some();
        if was_open
            && let Some(keeper) = &self.keeper
            && let Err(error) = keeper.close_stdin(&self.kept(None, false).id())
        {
            warn!(home_pid = self.home_pid, %error, "the keeper keeps the job's stdin open");
        }
    }

    /// What the keeper is told of this job.
    fn kept(&self, moving_to: Option<u32>, arriving: bool) -> Kept {
        Kept {
            home_node: self.home_node,
            home_pid: self.home_pid,
            epoch: self.epoch,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            command: self.command.clone(),
            pid: self.job.pid(),
            pipes: self.job.pipes(),
            stdin_open: self.stdin.lock().expect("stdin").is_some(),
            facts: self.facts,
            moving_to,
            arriving,
        }
    }

    /// Kills a copy that must not run (it was never let run) and removes its cgroup.
    fn kill_and_clean(&self) {
        self.moving.store(true, Ordering::Relaxed);
        let _ = self.job.signal(Signal::SIGKILL);
        let _ = self.job.wait();
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.remove();
        }
        self.unkeep();
    }

    /// The keeper lets go of the job: it ended here, left, or was killed.
    fn unkeep(&self) {
        if let Some(keeper) = &self.keeper
            && let Err(error) = keeper.forget(&self.kept(None, false).id())
        {
            warn!(home_pid = self.home_pid, %error, "cannot tell the keeper the job is gone");
        }
    }
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
    /// Why the move in progress failed after it was recorded, when the job was taken back: the `migrate`
    /// that asked hears it once the job runs again.
    taken_back: Mutex<Option<String>>,
    move_changed: Condvar,
    /// Seconds the job was frozen during its last move.
    frozen: Mutex<f64>,
    /// Job links from other nodes so far.
    links: std::sync::atomic::AtomicU32,
    /// Generation and output stream of the job's link, and the last output frame of it written to the
    /// deputy.
    written: Mutex<(u32, u64, Option<u64>)>,
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
    /// Held while a home record's location is read and changed (a move recorded, a link taken), so two
    /// nodes can never both be given the job (see `ownership`).
    ownership: Mutex<()>,
    /// Holds every job's pipes so the jobs outlive this migd (see [`crate::keeper`]); `None` when it could
    /// not be started (jobs then end with migd).
    keeper: Option<Keeper>,
    /// Jobs homed here that ran on when the previous migd ended, taken up from the keeper, waiting for
    /// their deputies to come back: the runner, its stdout and stderr, and whether it must still be let run.
    adopted: Mutex<HashMap<i32, Adopted>>,
    /// What the jobs running here do, and their class.
    observer: crate::observe::Observer,
}

/// A job homed here, taken up from the keeper: the runner, its stdout and stderr read ends, and whether
/// it is still stopped (it had just arrived).
type Adopted = (Arc<Runner>, OwnedFd, OwnedFd, bool);

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
        let observer = if settings.config.migd.probes {
            let observer = crate::observe::Observer::start();
            // Loading parsed the kernel's BTF, megabytes that are free now: give them back, or migd stays
            // that much bigger, and the OOM killer of a node short of memory picks it over a job.
            // SAFETY: malloc_trim only takes the allocator's own locks.
            unsafe { libc::malloc_trim(0) };
            observer
        } else {
            crate::observe::Observer::without_probes("migd.probes = false")
        };
        let keeper_program = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("rmosix-keeper"))).unwrap_or_default();
        let keeper_socket = settings.config.migd.socket.with_file_name("keeper.sock");
        let keeper = match Keeper::connect_or_start(&keeper_socket, &keeper_program) {
            Ok(keeper) => Some(keeper),
            Err(error) => {
                warn!(%error, "no keeper: jobs running here end if migd ends");
                None
            }
        };
        Ok(Self {
            settings,
            init,
            store,
            records,
            criu,
            homes: Mutex::new(HashMap::new()),
            runners: Mutex::new(HashMap::new()),
            jobs_cgroup,
            ownership: Mutex::new(()),
            keeper,
            adopted: Mutex::new(HashMap::new()),
            observer,
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

    /// How long a node may be silent before it is taken for down.
    fn silence(&self) -> Duration {
        Duration::from_secs(u64::from(self.settings.config.migd.silence_secs.max(2)))
    }

    /// Half the silence limit: how long one wait for a peer lasts (a read, a link coming back); two of
    /// them make a silence.
    fn patience(&self) -> Duration {
        self.silence() / 2
    }

    /// How often links send a keepalive: several times per wait of [`Daemon::patience`].
    fn keepalive_every(&self) -> Duration {
        self.silence() / 6
    }

    /// Bounds every read and write on a connection to another node, so a silent node never blocks a
    /// thread for longer than [`Daemon::patience`].
    fn bound_io(&self, stream: &TcpStream) {
        let _ = stream.set_read_timeout(Some(self.patience()));
        let _ = stream.set_write_timeout(Some(self.patience()));
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
        // Before anyone can ask for them: the jobs that ran on while no migd was here.
        self.adopt_kept();
        self.start_sampling();
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

    /// Serves the control socket. Every local user may connect, so what one user can hold is bounded by
    /// `crate::limits` (per uid, from `SO_PEERCRED`): a thread is given only to connections within the
    /// user's limit; the rest wait without one or are refused in words.
    fn serve_control(self: &Arc<Self>) -> Result<(), StartError> {
        let path = self.settings.config.migd.socket.clone();
        let listen = |source| StartError::Listen { what: path.display().to_string(), source };
        // Everyone may connect; what they may do is decided per request from their credentials.
        let listener = rmosix_common::node::bind_local_socket(&path).map_err(listen)?;
        let limits = crate::limits::Limits::new(self.settings.config.migd.requests_per_user);
        let daemon = Arc::clone(self);
        let gate = crate::limits::Gate::new(limits, move |stream, ticket: crate::limits::Ticket<UnixStream>| {
            let daemon = Arc::clone(&daemon);
            let uid = ticket.uid();
            let serve = std::thread::Builder::new().name("control".into()).spawn(move || daemon.serve_client(stream, ticket));
            if let Err(e) = serve {
                warn!(uid, error = %e, "cannot start a thread for a control connection; closing it");
            }
        });
        gate.watch().map_err(listen)?;
        info!(node = %self.me(), socket = %path.display(), per_user = limits.per_user, "migd control socket ready");
        for stream in listener.incoming() {
            match stream.and_then(|stream| peer(&stream).map(|peer| (stream, peer))) {
                Ok((stream, peer)) => gate.arrive(peer.uid, stream),
                Err(e) => warn!(error = %e, "accept on the control socket failed"),
            }
        }
        Ok(())
    }

    /// One control connection: its first request, then a job's session or one answer. `ticket` counts the
    /// connection against its user until the request turns out to be a job's session, or is answered.
    fn serve_client(self: Arc<Self>, mut stream: UnixStream, ticket: crate::limits::Ticket<UnixStream>) {
        use crate::limits::Connection as _;
        let Ok(peer) = peer(&stream) else { return };
        let (request, fds) = match control::recv_with_fds::<Request>(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                match (ticket.expired(), e) {
                    (Some(why), _) => {
                        info!(uid = peer.uid, pid = peer.pid, "control connection sent no request in time; closed");
                        stream.refuse(&why);
                    }
                    (None, ControlError::Closed) => {}
                    (None, e) => refuse(&mut stream, Refusal::BadRequest, e.to_string()),
                }
                return;
            }
        };
        ticket.request_read();
        match request {
            Request::Run(run) => {
                // A job's session lasts as long as the job: it does not count against its user.
                drop(ticket);
                self.run(stream, peer, run, fds);
            }
            Request::Migrate { home_pid, target } => {
                let response = match self.migrate(peer, home_pid, target) {
                    Ok(r) => r,
                    Err(e) => Response::Refused { why: e.why, message: e.message },
                };
                let _ = control::send(&mut stream, &response);
            }
            Request::Reattach => {
                drop(ticket);
                self.reattach(stream, peer, fds);
            }
            Request::Guests => {
                let me = self.me().0;
                let count = self.runners.lock().expect("runners").keys().filter(|(home, _)| *home != me).count();
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                let _ = control::send(&mut stream, &Response::Guests { count });
            }
            Request::Jobs => {
                let _ = control::send(&mut stream, &self.cluster_jobs());
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
            let _ = job.wait();
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        info!(home_pid, uid = peer.uid, pid = job.pid(), command = ?command, stay_home = req.options.stay_home, "job started");
        let (job_stdout, job_stderr) = (pipes.stdout, pipes.stderr);
        let whose = Whose {
            home_node: self.me().0,
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            groups: credentials.groups,
            command,
            facts: JobFacts {
                hint: req.options.hint,
                started: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                migrations: 0,
            },
        };
        let runner = Arc::new(Runner::new(whose, job, Some(pipes.stdin), 0, cgroup).kept_by(self.keeper.as_ref()));
        self.keep(&runner, job_stdout.as_fd(), job_stderr.as_fd(), false);
        self.attach_here(&home, &runner, job_stdout, job_stderr);
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
        // A failed attempt leaves the job running here (maybe as a new copy taken back from the
        // destination): try a few times, with whatever copy runs here now, before settling for home.
        let mut runner = Arc::clone(runner);
        for attempt in 1..=3 {
            match self.move_runner(&runner, start_on) {
                Ok(_) => return,
                Err(e) if attempt < 3 && e.why == Refusal::Failed => {
                    warn!(home_pid, to = start_on, attempt, error = %e, "could not start the job on its node yet");
                    std::thread::sleep(Duration::from_millis(300));
                    let here = self.homes.lock().expect("homes lock").get(&home_pid).and_then(|home| {
                        match &*home.location.lock().expect("location") {
                            Location::Here(r) => Some(Arc::clone(r)),
                            _ => None,
                        }
                    });
                    match here {
                        Some(r) if r.job.alive() => runner = r,
                        _ => return,
                    }
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
            taken_back: Mutex::new(None),
            move_changed: Condvar::new(),
            frozen: Mutex::new(0.0),
            links: std::sync::atomic::AtomicU32::new(0),
            written: Mutex::new((u32::MAX, 0, None)),
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
        let adopted = self.adopted.lock().expect("adopted").remove(&home_pid);
        if let Some(adopted) = adopted {
            self.reattach_adopted(stream, [stdin, stdout, stderr], &record, adopted);
            return;
        }
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
        self.lose_unless_linked(&home, record.node.0, record.migrations);
        Self::deputy_session(stream, &home);
    }

    /// A deputy comes back to its job, which ran on here while migd was down.
    fn reattach_adopted(self: &Arc<Self>, mut stream: UnixStream, [stdin, stdout, stderr]: [OwnedFd; 3], record: &JobRecord, adopted: Adopted) {
        let (runner, job_stdout, job_stderr, arriving) = adopted;
        let home_pid = record.home_pid;
        let Some(home) = self.new_home(home_pid, false, record.migrations, stdout, stderr, &stream) else {
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        if arriving && let Err(why) = self.bind(home_pid, self.me().0, runner.epoch, runner.job.pid()) {
            warn!(home_pid, %why, "the job taken up was not this node's to run; killed");
            runner.kill_and_clean();
            self.finish_home(&home, Response::Lost { reason: why });
            return;
        }
        self.attach_here(&home, &runner, job_stdout, job_stderr);
        if arriving {
            runner.job.resume();
            self.kept_update(&runner, None, false);
        }
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));
        info!(home_pid, pid = runner.job.pid(), "deputy back; its job ran on here");
        if control::send(&mut stream, &Response::Started { home_pid, node: self.me().0 }).is_err() {
            return;
        }
        Self::deputy_session(stream, &home);
    }

    /// Declares the job lost if no node takes it up soon: its node linking again (generation `epoch` at
    /// `node`, already running: within half the silence limit, so a deputy hears of a silent node within
    /// the limit), or the node it moves to linking (a generation recorded but not yet running: within twice
    /// the limit, the time the source may wait before taking it back).
    fn lose_unless_linked(self: &Arc<Self>, home: &Arc<HomeJob>, node: u32, epoch: u32) {
        let links = home.links.load(Ordering::Relaxed);
        let daemon = Arc::clone(self);
        let home = Arc::clone(home);
        std::thread::spawn(move || {
            let (mut node, mut epoch) = (node, epoch);
            loop {
                let running = daemon.records.get(home.home_pid).is_some_and(|r| r.node_pid != 0);
                let wait = if running { daemon.patience() } else { daemon.silence() * 2 };
                let deadline = Instant::now() + wait;
                while Instant::now() < deadline {
                    if home.links.load(Ordering::Relaxed) != links || home.done.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                match daemon.records.get(home.home_pid) {
                    Some(r) if !r.state.has_ended() && (r.node.0, r.migrations) != (node, epoch) => {
                        // It moved on meanwhile (a move recorded): its old generations are over; watch
                        // the new one.
                        home.end_epoch(r.migrations);
                        (node, epoch) = (r.node.0, r.migrations);
                    }
                    _ => break,
                }
            }
            let reason = format!("node {node} went silent or is down (nothing heard for {} s)", daemon.silence().as_secs());
            daemon.finish_home(&home, Response::Lost { reason });
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
        home.stdin.set(Some(Box::new(RunnerStdin(Arc::clone(runner)))));
        *home.location.lock().expect("location") = Location::Here(Arc::clone(runner));
        self.runners.lock().expect("runners").insert((runner.home_node, runner.home_pid), Arc::clone(runner));
        self.observer.poke();
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

    /// Waits for a job running here to end and reports its status, unless it ended because it moved.
    fn wait_runner(&self, runner: &Runner, report: &Report) {
        let code = runner.job.wait().unwrap_or(255);
        runner.unkeep();
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
        self.bound_io(&stream);
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
            Ok((protocol::RECORD_ASK, payload)) => match serde_json::from_slice::<Ask>(&payload) {
                Ok(ask) => {
                    let state = self.record_state(&ask, node);
                    let _ = link.send_json(protocol::RECORD_STATE, &state);
                }
                Err(e) => warn!(%addr, error = %e, "bad record question"),
            },
            Ok((protocol::JOBS_ASK, _)) => {
                let _ = link.send_json(protocol::JOBS, &self.node_jobs());
            }
            Ok((kind, _)) => warn!(%addr, kind, "unexpected first message; dropped"),
            Err(e) => warn!(%addr, error = %e, "peer went away"),
        }
    }

    /// Connects to the job's home node and links the job there; home answers once the job's previous
    /// location has ended and its record names this node and the job's generation.
    fn link_home(&self, runner: &Runner, frozen: Option<f64>, stream_id: u64) -> Result<(Reader<TcpStream>, Writer<TcpStream>), LinkError> {
        let unreachable = |e: &dyn std::fmt::Display| LinkError::Unreachable(format!("home node {}: {e}", runner.home_node));
        let home = self.settings.map.get(NodeId(runner.home_node)).ok_or_else(|| unreachable(&"not in the cluster map"))?;
        let addr = SocketAddr::from((home.addr, self.settings.config.migd.port));
        let stream = TcpStream::connect_timeout(&addr, self.patience().min(Duration::from_secs(5))).map_err(|e| unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        let handle = stream.try_clone().map_err(|e| unreachable(&e))?;
        // Home may wait up to the silence limit for the job's previous location to end.
        let _ = stream.set_read_timeout(Some(self.silence() + self.patience()));
        let _ = stream.set_write_timeout(Some(self.patience()));
        let link = Channel::client_tcp(stream, &self.settings.key, self.me().0).map_err(|e| unreachable(&e))?;
        let (mut reader, mut writer) = link.into_split().map_err(|e| unreachable(&e))?;
        let attach = Attach { home_pid: runner.home_pid, pid: runner.job.pid(), epoch: runner.epoch, frozen, stream: stream_id };
        writer.send_json(protocol::ATTACH, &attach).map_err(|e| unreachable(&e))?;
        match reader.recv() {
            Ok((protocol::ATTACHED, _)) => {}
            Ok((protocol::REFUSED, why)) => {
                return Err(LinkError::Refused(serde_json::from_slice::<String>(&why).unwrap_or_else(|_| "refused".into())));
            }
            Ok((kind, _)) => return Err(unreachable(&format!("answered with message {kind}"))),
            Err(e) => return Err(unreachable(&e)),
        }
        self.bound_io(&handle);
        Ok((reader, writer))
    }

    /// The first link of a guest copy (arrived, or taken up after a migd restart): home may be down for a
    /// moment (its migd restarting), so an unreachable home is tried again for the silence limit; this copy
    /// may be the only one of the job. A refusal is final.
    fn first_link_home(
        &self,
        runner: &Runner,
        frozen: Option<f64>,
        stream: u64,
    ) -> Result<(Reader<TcpStream>, Writer<TcpStream>), String> {
        let deadline = Instant::now() + self.silence();
        let mut said = false;
        loop {
            match self.link_home(runner, frozen, stream) {
                Ok(link) => return Ok(link),
                Err(LinkError::Unreachable(why)) if Instant::now() < deadline && runner.job.alive() => {
                    if !said {
                        warn!(home_pid = runner.home_pid, %why, "home does not answer; trying again");
                        said = true;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Runs a guest job: links it to its home node (which must take it before it runs) and serves the link,
    /// linking again if it breaks (the home migd restarting) for up to the silence limit.
    /// `start`: the job is stopped (restored) and must be resumed once home has taken it.
    fn run_guest(
        self: &Arc<Self>,
        runner: &Arc<Runner>,
        (stdout, stderr): (OwnedFd, OwnedFd),
        frozen: Option<f64>,
        start: bool,
    ) -> Result<(), String> {
        let slot = Arc::new(LinkSlot::default());
        let (reader, writer) = self.first_link_home(runner, frozen, slot.stream)?;
        slot.set(Some(writer));
        *runner.link.lock().expect("link") = Some(Arc::clone(&slot));
        *runner.outputs.lock().expect("outputs") = vec![
            relay::spawn("guest-stdout", stdout, OutputSink { slot: Arc::clone(&slot), kind: protocol::STDOUT }),
            relay::spawn("guest-stderr", stderr, OutputSink { slot: Arc::clone(&slot), kind: protocol::STDERR }),
        ];
        self.runners.lock().expect("runners").insert((runner.home_node, runner.home_pid), Arc::clone(runner));
        self.observer.poke();
        {
            let daemon = Arc::clone(self);
            let runner = Arc::clone(runner);
            let report = Report::Link(Arc::clone(&slot));
            std::thread::spawn(move || daemon.wait_runner(&runner, &report));
        }
        if start {
            runner.job.resume();
        }
        self.kept_update(runner, None, false);
        info!(home_pid = runner.home_pid, home = runner.home_node, pid = runner.job.pid(), "guest job running");
        let daemon = Arc::clone(self);
        let runner = Arc::clone(runner);
        let pulse = Pulse::start(Arc::clone(&slot) as Arc<dyn FrameOut>, self.keepalive_every());
        std::thread::spawn(move || {
            daemon.serve_guest_link(&runner, &slot, reader);
            drop(pulse);
        });
        Ok(())
    }

    /// Orders from home for a guest job.
    fn serve_guest_link(self: &Arc<Self>, runner: &Arc<Runner>, slot: &Arc<LinkSlot>, mut reader: Reader<TcpStream>) {
        loop {
            match reader.recv() {
                Ok((protocol::STDIN, data)) => {
                    let _ = RunnerStdin(Arc::clone(runner)).put(&data);
                }
                Ok((protocol::STDIN_EOF, _)) => runner.close_stdin(),
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
                    if runner.in_move.swap(true, Ordering::AcqRel) {
                        let failure = serde_json::to_vec(&(Refusal::Busy, "a move of this job is under way")).expect("json");
                        let _ = slot.send_frame(protocol::MOVE_FAILED, &failure);
                        continue;
                    }
                    // The move runs beside this loop, which goes on taking home's acknowledgements and
                    // linking again if home's migd restarts meanwhile; the link ends with the move (`MOVED`
                    // is its last word), and this loop with it.
                    let (daemon, runner, slot) = (Arc::clone(self), Arc::clone(runner), Arc::clone(slot));
                    std::thread::spawn(move || {
                        let moved = daemon.move_runner(&runner, to);
                        runner.in_move.store(false, Ordering::Release);
                        // A copy that is gone has no link; home knows what became of the job.
                        if let Err(e) = moved
                            && !runner.moving.load(Ordering::Relaxed)
                        {
                            let failure = serde_json::to_vec(&(e.why, e.message)).expect("json");
                            let _ = slot.send_frame(protocol::MOVE_FAILED, &failure);
                        }
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    if runner.moving.load(Ordering::Relaxed)
                        || slot.gone.load(Ordering::Relaxed)
                        || runner.exited.load(Ordering::Relaxed)
                    {
                        return;
                    }
                    match self.relink(runner, slot, &e) {
                        Some(r) => reader = r,
                        None => return,
                    }
                }
            }
        }
    }

    /// Home went away or silent (its migd restarting, a partition): links again while it comes back, for
    /// up to the silence limit. A home migd that restarts within it takes the link (it waits half the limit
    /// for the job's node after it starts); a home that was there but did not hear from this node for the
    /// limit has declared the job lost and refuses it. Gives up, killing the job, when home cannot be
    /// reached by then or refuses the job.
    fn relink(self: &Arc<Self>, runner: &Runner, slot: &LinkSlot, error: &dyn std::fmt::Display) -> Option<Reader<TcpStream>> {
        warn!(home_pid = runner.home_pid, %error, "link to the home node lost; linking again");
        slot.set(None);
        let deadline = Instant::now() + self.silence();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            // Checked first: a home that accepts links and drops them at once must not keep this going.
            if Instant::now() > deadline || !runner.job.alive() {
                warn!(home_pid = runner.home_pid, "home node unreachable; killing the guest job");
                break;
            }
            match self.link_home(runner, None, slot.stream) {
                Ok((r, w)) => {
                    if slot.relink(w).is_ok() {
                        info!(home_pid = runner.home_pid, "linked to the home node again");
                        return Some(r);
                    }
                }
                Err(LinkError::Refused(why)) => {
                    warn!(home_pid = runner.home_pid, %why, "home refuses the job here; killing this copy");
                    break;
                }
                Err(LinkError::Unreachable(_)) => {}
            }
        }
        // Nobody can see this job's output or wait for it any more.
        slot.give_up();
        let _ = runner.job.signal(Signal::SIGKILL);
        None
    }

    /// Home side of a job link: the job runs on node `node`, if the record says so.
    fn serve_link(self: Arc<Self>, link: Channel<TcpStream>, node: u32, attach: &Attach) {
        let home_pid = attach.home_pid;
        // After a restart of this migd the deputy may come back a moment after the job's node.
        let deadline = Instant::now() + self.silence();
        let home = loop {
            if let Some(home) = self.homes.lock().expect("homes lock").get(&home_pid).cloned() {
                break Some(home);
            }
            let known = self.records.get(home_pid).is_some_and(|r| !r.state.has_ended());
            if !known || Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let Ok((mut reader, writer)) = link.into_split() else { return };
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        let refuse = |why: String| {
            warn!(home_pid, node, epoch = attach.epoch, %why, "job link refused");
            let _ = writer.lock().expect("link").send_json(protocol::REFUSED, &why);
        };
        let Some(home) = home else { return refuse(format!("job {home_pid} has no deputy here")) };
        if !home.wait_epoch(attach.epoch, self.silence()) {
            return refuse("the job's previous location has not ended".into());
        }
        if let Err(why) = self.bind(home_pid, node, attach.epoch, attach.pid) {
            return refuse(why);
        }
        let _ = writer.lock().expect("link").send(protocol::ATTACHED, &[]);
        let _pulse = Pulse::start(Arc::clone(&writer) as Arc<dyn FrameOut>, self.keepalive_every());
        *home.location.lock().expect("location") = Location::Away { link: Arc::clone(&writer) };
        let out: Arc<dyn FrameOut> = Arc::clone(&writer) as Arc<dyn FrameOut>;
        home.stdin.set(Some(Box::new(FrameSink { out, kind: protocol::STDIN, eof_kind: Some(protocol::STDIN_EOF) })));
        if home.killed.load(Ordering::Relaxed) {
            home.signal(Signal::SIGKILL as i32);
        }
        if let Some(frozen) = attach.frozen {
            *home.frozen.lock().expect("frozen") = frozen;
        }
        home.arrived(node);
        info!(home_pid, node, pid = attach.pid, epoch = attach.epoch, "job runs away from home");
        {
            // Output numbering starts again with each generation; a link again of the same one goes on.
            let mut written = home.written.lock().expect("written");
            if (written.0, written.1) != (attach.epoch, attach.stream) {
                *written = (attach.epoch, attach.stream, None);
            }
        }
        self.serve_link_frames(&home, &mut reader, &writer, node, attach.epoch);
    }

    /// The frames of a job link that home has taken, until it ends.
    fn serve_link_frames(self: &Arc<Self>, home: &Arc<HomeJob>, reader: &mut Reader<TcpStream>, writer: &SharedWriter, node: u32, epoch: u32) {
        let home_pid = home.home_pid;
        loop {
            match reader.recv() {
                Ok((kind @ (protocol::STDOUT | protocol::STDERR), data)) if data.len() >= 8 => {
                    let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
                    let mut written = home.written.lock().expect("written");
                    // A frame sent again after a broken link, already written: only acknowledge it.
                    if written.2.is_none_or(|last| seq > last) {
                        let target = if kind == protocol::STDOUT { &home.out } else { &home.err };
                        let _ = target.lock().expect("output").write_all(&data[8..]);
                        written.2 = Some(seq);
                    }
                    drop(written);
                    let _ = writer.lock().expect("link").send(protocol::ACK, &seq.to_le_bytes());
                }
                Ok((protocol::EXIT, data)) => {
                    let code = serde_json::from_slice::<i32>(&data).unwrap_or(255);
                    self.finish_home(home, Response::Exited { code });
                    return;
                }
                Ok((protocol::MOVED, data)) => {
                    let moved: Option<Moved> = serde_json::from_slice(&data).ok();
                    info!(home_pid, from = node, to = ?moved.map(|m| m.to), "job left node");
                    *home.location.lock().expect("location") = Location::Moving;
                    home.stdin.set(None);
                    home.end_epoch(epoch + 1);
                    return;
                }
                Ok((protocol::MOVE_FAILED, data)) => {
                    let (why, message): (Refusal, String) =
                        serde_json::from_slice(&data).unwrap_or((Refusal::Failed, "move failed".into()));
                    Self::set_move_result(home, Err(MoveError::new(why, message)));
                }
                Ok(_) => {}
                Err(e) => {
                    if home.done.load(Ordering::Relaxed) {
                        return;
                    }
                    let mut location = home.location.lock().expect("location");
                    if matches!(&*location, Location::Away { link } if Arc::ptr_eq(link, writer)) {
                        *location = Location::Moving;
                        home.stdin.set(None);
                    }
                    drop(location);
                    let moved_on = self.records.get(home_pid).is_some_and(|r| r.migrations > epoch);
                    if moved_on {
                        // The move was recorded and the source fell silent before its last word: its
                        // generation is over.
                        home.end_epoch(epoch + 1);
                    } else {
                        // Its node may be restarting its migd or briefly unreachable: give it time to link again.
                        warn!(home_pid, node, error = %e, "job link lost");
                    }
                    Self::set_move_result(home, Err(MoveError::new(Refusal::TargetDown, format!("node {node} went silent ({e})"))));
                    let (node, epoch) = self.records.get(home_pid).map_or((node, epoch), |r| (r.node.0, r.migrations));
                    self.lose_unless_linked(home, node, epoch);
                    return;
                }
            }
        }
    }
}

/// Why a node could not link a job home.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    /// Home says the job is not this node's to run (any more).
    #[error("home refuses the job: {0}")]
    Refused(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
}

impl HomeJob {
    /// The job runs at `node` now: the end of the move in progress, which failed if the job was taken back.
    fn arrived(&self, node: u32) {
        let result = match self.taken_back.lock().expect("taken back").take() {
            Some(why) => Err(MoveError::new(Refusal::Failed, why)),
            None => Ok(node),
        };
        Daemon::set_move_result(self, result);
    }

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
    /// Whether it came to that within `limit`.
    fn wait_epoch(&self, epoch: u32, limit: Duration) -> bool {
        let mut done = self.finished_epoch.lock().expect("epoch");
        let deadline = Instant::now() + limit;
        while *done < epoch && Instant::now() < deadline {
            done = self.epoch_changed.wait_timeout(done, Duration::from_millis(200)).expect("epoch").0;
        }
        *done >= epoch
    }

    /// The job's locations before generation `epoch` have all ended.
    fn end_epoch(&self, epoch: u32) {
        let mut done = self.finished_epoch.lock().expect("epoch");
        if *done < epoch {
            *done = epoch;
        }
        self.epoch_changed.notify_all();
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
