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
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmosix_checkpoint::criu::{Criu, Placement};
use rmosix_checkpoint::images::prepare_store;
use rmosix_common::NodeId;
use rmosix_common::cgroup::{CONTROLLERS, Cgroup, Hierarchy, JOB_PREFIX, JobCgroups};
use rmosix_common::control::Refusal;
use rmosix_common::node::Settings;
use tracing::{info, warn};

use crate::channel::blocking::{Channel, Writer};
use crate::protocol::{self, Ask, Attach, Offer};

use crate::keeper::Keeper;
use crate::records::{JobState, RecordStore, RecordsError};
use crate::relay::Sink;

mod adoption;
mod balancer;
mod control;
mod destination;
mod guest;
mod home;
mod jobs;
mod ownership;
mod policy;
mod runner;
mod source;

use home::{HomeJob, Location};
use runner::{Runner, Whose, check_owner};

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
    /// What the balancer remembers between its decisions.
    balancer: balancer::BalancerState,
    /// This node's policy (`mosctl block`, `stay`, ...), as kept in `[policy] state`.
    policy: Mutex<rmosix_common::policy::NodePolicy>,
}

/// A job homed here, taken up from the keeper: the runner, its stdout and stderr read ends, and whether
/// it is still stopped (it had just arrived).
type Adopted = (Arc<Runner>, OwnedFd, OwnedFd, bool);

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
        let policy = rmosix_common::policy::NodePolicy::load(&settings.config).unwrap_or_else(|error| {
            warn!(%error, "cannot read the node's policy; the configuration's holds until mosctl sets one");
            rmosix_common::policy::NodePolicy::configured(&settings.config)
        });
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
            balancer: balancer::BalancerState::default(),
            policy: Mutex::new(policy),
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
        self.start_balancing();
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

