//! The infod daemon: the engine wired to a UDP socket, a clock, the node's resources and a local query
//! socket.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rmosix_common::config::{Config, ResourceSource};
use rmosix_common::control::{self, ControlError};
use rmosix_common::load::{Decay, LoadVector};
use rmosix_common::map::ClusterMap;
use rmosix_common::query::{Request, Response};
use rmosix_common::wire::{self, MAX_DATAGRAM};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::engine::{Engine, EngineConfig};
use crate::resources::{Cgroup, Host, ResourceView};

pub use rmosix_common::node::{Settings, local_node};

/// infod could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Node(#[from] rmosix_common::node::NodeError),
    #[error("cannot bind UDP {addr}: {source}")]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}: {source}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot measure the node through its cgroup {path}: {source}")]
    Cgroup {
        path: rmosix_common::cgroup::CgroupPath,
        #[source]
        source: rmosix_common::cgroup::CgroupError,
    },
}

/// The resource view the configuration asks for.
pub fn resources(config: &Config) -> Result<Box<dyn ResourceView>, StartError> {
    Ok(match config.resources.source {
        ResourceSource::Host => Box::new(Host),
        ResourceSource::Cgroup => {
            let path = config.resources.cgroup.as_ref().expect("validated");
            Box::new(Cgroup::open(path).map_err(|source| StartError::Cgroup { path: path.clone(), source })?)
        }
    })
}

/// Monotonic milliseconds. Starts far from zero so that ages subtracted from it never saturate.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    const BASE_MS: u64 = 1 << 40;

    fn now_ms(self) -> u64 {
        Self::BASE_MS + u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long migd has to take the question for the guest count and answer it. A migd this slow is busy
/// (a burst of jobs, a move): the count it gave last stands meanwhile.
const ASK_MIGD: Duration = Duration::from_millis(250);

/// The number of guest jobs on this node, as migd last said. Asked off infod's loop, on a blocking thread
/// of the runtime and with [`ASK_MIGD`] for each step, so a migd that is stuck or hostile to infod (it runs
/// a socket path from the configuration) cannot hold up the datagrams, the queries or the sampling.
#[derive(Debug)]
struct Guests {
    /// migd's control socket.
    socket: PathBuf,
    /// How long migd has for each step of an answer.
    timeout: Duration,
    /// The last count migd gave: 0 until it answers, and while no migd runs.
    last: Arc<AtomicU32>,
    /// An ask is under way: never more than one, however long migd takes.
    asking: Arc<AtomicBool>,
}

impl Guests {
    fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self { socket, timeout, last: Arc::default(), asking: Arc::default() }
    }

    /// Asks migd again unless an ask is still under way; the answer lands in `last`.
    fn ask(&self) {
        if self.asking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (socket, timeout) = (self.socket.clone(), self.timeout);
        let (last, asking) = (Arc::clone(&self.last), Arc::clone(&self.asking));
        tokio::task::spawn_blocking(move || {
            match control::ask_guests(&socket, timeout) {
                Ok(count) => last.store(count, Ordering::Relaxed),
                // Guest jobs are migd's to count; without migd there are none.
                Err(ControlError::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
                {
                    last.store(0, Ordering::Relaxed);
                }
                Err(e) => debug!(socket = %socket.display(), error = %e, "migd did not give the guest count; keeping the last"),
            }
            asking.store(false, Ordering::Release);
        });
    }

    fn last(&self) -> u32 {
        self.last.load(Ordering::Relaxed)
    }
}

/// Measures the node and builds its load vector.
struct Meter {
    resources: Box<dyn ResourceView>,
    decay: Decay,
    samples: Vec<f64>,
    per_interval: usize,
    vector: LoadVector,
    /// The guest count, from migd.
    guests: Guests,
    /// The configuration, for the node's policy (`rmosix_common::policy`), read again every interval.
    config: rmosix_common::config::Config,
    /// The speed of the map or the configuration, which `mosctl setspeed` overrides.
    configured_speed: f64,
    /// The last policy error logged, so a lasting one is logged once.
    policy_error: Option<String>,
}

impl Meter {
    fn new(settings: &Settings, resources: Box<dyn ResourceView>, incarnation: u64, ask_migd: Duration) -> Self {
        let node = settings.map.get(settings.me).expect("checked at load");
        let speed = settings.config.resources.speed.unwrap_or(node.speed);
        let flags = rmosix_common::policy::NodePolicy::configured(&settings.config).flags();
        let migd_socket =
            std::env::var_os(control::SOCKET_ENV).map_or_else(|| settings.config.migd.socket.clone(), PathBuf::from);
        Self {
            resources,
            decay: Decay::new(&settings.config.load),
            samples: Vec::new(),
            per_interval: settings.config.load.samples_per_interval as usize,
            guests: Guests::new(migd_socket, ask_migd),
            config: settings.config.clone(),
            configured_speed: speed,
            policy_error: None,
            vector: LoadVector {
                node: settings.me.0,
                cpus: 1,
                speed,
                load: 0.0,
                mem_free: 0,
                mem_total: 0,
                guests: 0,
                flags,
                incarnation,
                seq: 0,
            },
        }
    }

    /// Takes one run-queue sample; every `per_interval` samples returns a fresh vector.
    fn sample(&mut self) -> Option<LoadVector> {
        if self.samples.is_empty() {
            // At the start of an interval, so the answer is in by its end.
            self.guests.ask();
        }
        match self.resources.runnable() {
            Ok(r) => self.samples.push(r),
            Err(e) => warn!(error = %e, "cannot sample the run queue"),
        }
        if self.samples.len() < self.per_interval {
            return None;
        }
        #[expect(clippy::cast_precision_loss, reason = "a handful of samples")]
        let mean = self.samples.iter().sum::<f64>() / self.samples.len() as f64;
        self.samples.clear();
        let v = &mut self.vector;
        v.load = self.decay.update(mean);
        match self.resources.cpus() {
            Ok(cpus) => v.cpus = cpus,
            Err(e) => warn!(error = %e, "cannot read the CPUs"),
        }
        match self.resources.memory() {
            Ok((free, total)) => (v.mem_free, v.mem_total) = (free, total),
            Err(e) => warn!(error = %e, "cannot read the memory"),
        }
        v.guests = self.guests.last();
        match rmosix_common::policy::NodePolicy::load(&self.config) {
            Ok(policy) => {
                v.flags = policy.flags();
                v.speed = policy.speed.unwrap_or(self.configured_speed);
                self.policy_error = None;
            }
            Err(e) => {
                // The last policy known stays in force.
                let e = e.to_string();
                if self.policy_error.as_ref() != Some(&e) {
                    warn!(error = %e, "cannot read the node's policy; the last one known stays");
                    self.policy_error = Some(e);
                }
            }
        }
        v.seq += 1;
        Some(v.clone())
    }
}

/// Runs infod until `shutdown` completes.
pub async fn run(
    settings: Settings,
    resources: Box<dyn ResourceView>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    run_asking(settings, resources, shutdown, ASK_MIGD).await
}

/// [`run`], giving migd `ask_migd` to answer the guest count.
async fn run_asking(
    settings: Settings,
    resources: Box<dyn ResourceView>,
    shutdown: impl Future<Output = ()>,
    ask_migd: Duration,
) -> Result<(), StartError> {
    let clock = Clock(Instant::now());
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let port = settings.config.infod.port;
    let bind = SocketAddr::new(IpAddr::V4(settings.addr()), port);
    let udp = UdpSocket::bind(bind).await.map_err(|source| StartError::BindUdp { addr: bind, source })?;
    let socket_path = settings.config.infod.socket.clone();
    let listener = listen_unix(&socket_path)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;

    let engine = Engine::new(
        settings.me,
        Arc::new(settings.map.clone()),
        EngineConfig::from(&settings.config.infod),
        incarnation,
        incarnation ^ u64::from(settings.me.0),
    );
    let engine = Arc::new(Mutex::new(engine));
    let mut meter = Meter::new(&settings, resources, incarnation, ask_migd);
    let interval = Duration::from_millis(settings.config.infod.interval_ms);
    let mut sampler = tokio::time::interval(interval / settings.config.load.samples_per_interval);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    info!(node = %settings.me, %bind, socket = %socket_path.display(), nodes = settings.map.len(), "infod started");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = sampler.tick() => {
                let Some(own) = meter.sample() else { continue };
                let out = engine.lock().expect("engine lock").tick(clock.now_ms(), wall_ms(), own);
                let Some((to, msg)) = out else { continue };
                let addr = engine.lock().expect("engine lock").map().get(to).map(|n| n.addr);
                let (Some(addr), Ok(bytes)) = (addr, wire::encode(&settings.key, &msg)) else { continue };
                let sent = udp.send_to(&bytes, (addr, port)).await;
                if let Err(e) = &sent {
                    debug!(node = %to, error = %e, "send failed");
                }
                engine.lock().expect("engine lock").note_sent(sent.is_ok());
            }
            received = udp.recv_from(&mut buf) => {
                let (len, from) = match received {
                    Ok(r) => r,
                    Err(e) => { debug!(error = %e, "receive failed"); continue; }
                };
                let from = match from.ip() { IpAddr::V4(a) => Some(a), IpAddr::V6(_) => None };
                let msg = wire::decode(&settings.key, &buf[..len]);
                let result = engine.lock().expect("engine lock").receive(clock.now_ms(), wall_ms(), from, msg);
                if let Err(reason) = result {
                    debug!(?from, ?reason, "datagram dropped");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { tokio::spawn(serve(stream, engine.clone(), clock)); }
                Err(e) => warn!(error = %e, "accept on the query socket failed"),
            },
            _ = hup.recv() => match ClusterMap::load(&settings.config.map) {
                Ok(map) => {
                    if map.get(settings.me).is_none_or(|n| n.addr != settings.addr()) {
                        error!(map = %settings.config.map.display(), "new map moves or drops this node; keeping the old map");
                    } else {
                        info!(nodes = map.len(), "cluster map reloaded");
                        engine.lock().expect("engine lock").set_map(Arc::new(map));
                    }
                }
                Err(e) => error!(error = %e, "bad cluster map; keeping the old one"),
            },
        }
    }
    let _ = std::fs::remove_file(&socket_path);
    info!("infod stopped");
    Ok(())
}

fn listen_unix(path: &std::path::Path) -> Result<UnixListener, StartError> {
    let err = |source| StartError::BindUnix { path: path.to_owned(), source };
    // Queries only read the cluster view: every local user may ask.
    let listener = rmosix_common::node::bind_local_socket(path).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    UnixListener::from_std(listener).map_err(err)
}

/// Answers the requests of one local client, one JSON line each.
async fn serve(stream: UnixStream, engine: Arc<Mutex<Engine>>, clock: Clock) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(64 * 1024)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::View) => Response::View(engine.lock().expect("engine lock").view(clock.now_ms())),
            Ok(Request::Best { mem_bytes }) => Response::Best {
                node: engine.lock().expect("engine lock").best(clock.now_ms(), mem_bytes).0,
            },
            Err(e) => Response::Error { message: format!("bad request: {e}") },
        };
        let mut out = serde_json::to_string(&response).expect("responses serialize");
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    //! infod against a fake migd, on loopback: infod is node 1 at 127.0.0.1, the test node 2 at 127.0.0.2,
    //! and every datagram infod sends goes to the test.

    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::sync::atomic::AtomicUsize;

    use rmosix_common::NodeId;
    use rmosix_common::key::ClusterKey;
    use rmosix_common::map::Node;

    use super::*;
    use crate::resources::ResourceError;

    const KEY: [u8; 32] = [7; 32];
    /// Only keeps a broken test from hanging; nothing here is expected to take long.
    const PATIENCE: Duration = Duration::from_mins(1);

    /// An idle node.
    struct Idle;

    impl ResourceView for Idle {
        fn runnable(&mut self) -> Result<f64, ResourceError> {
            Ok(0.0)
        }
        fn cpus(&mut self) -> Result<u32, ResourceError> {
            Ok(1)
        }
        fn memory(&mut self) -> Result<(u64, u64), ResourceError> {
            Ok((1 << 30, 2 << 30))
        }
    }

    /// infod running as node 1 on a thread of its own, and the test's node 2 receiving its datagrams.
    struct Loopback {
        node2: UdpSocket,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        infod: Option<std::thread::JoinHandle<Result<(), StartError>>>,
    }

    impl Loopback {
        fn start(dir: &std::path::Path, migd: &std::path::Path, ask_migd: Duration) -> Self {
            let node2 = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), 0)).expect("bind 127.0.0.2 (loopback)");
            node2.set_read_timeout(Some(PATIENCE)).unwrap();
            let port = node2.local_addr().unwrap().port();
            let node = |id, addr| Node { id: NodeId(id), addr, speed: 1.0, mem_weight: 1.0, line: 0 };
            let map = ClusterMap::from_nodes([node(1, Ipv4Addr::LOCALHOST), node(2, Ipv4Addr::new(127, 0, 0, 2))]);
            let mut config = Config::default();
            config.infod.port = port;
            config.infod.interval_ms = 50;
            config.infod.socket = dir.join("infod.sock");
            config.migd.socket = migd.to_owned();
            let settings = Settings { config, map, key: ClusterKey::from_bytes(&KEY), me: NodeId(1) };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let infod = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(run_asking(settings, Box::new(Idle), async { stopped.await.unwrap_or(()) }, ask_migd))
            });
            Self { node2, stop: Some(stop), infod: Some(infod) }
        }

        /// The vector of infod's next datagram.
        fn next(&self) -> LoadVector {
            let mut buf = vec![0u8; MAX_DATAGRAM + 1];
            let (len, _) = self.node2.recv_from(&mut buf).expect("a datagram from infod");
            wire::decode(&ClusterKey::from_bytes(&KEY), &buf[..len]).expect("a datagram of node 1").own
        }

        fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.infod.take().unwrap().join().unwrap().unwrap();
        }
    }

    /// A migd on `socket` that answers `answers` (one per connection, in order) and then takes every
    /// connection and never answers; it counts the ones it holds.
    fn fake_migd(socket: &std::path::Path, answers: Vec<u32>) -> (Arc<AtomicUsize>, Arc<Mutex<Vec<UnixStream>>>) {
        let listener = UnixListener::bind(socket).unwrap();
        let silent = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(Mutex::new(Vec::new()));
        let (count, keep) = (Arc::clone(&silent), Arc::clone(&held));
        std::thread::spawn(move || {
            let mut answers = answers.into_iter();
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                if let Some(count) = answers.next() {
                    if control::recv::<control::Request>(&mut conn).is_ok() {
                        let _ = control::send(&mut conn, &control::Response::Guests { count });
                    }
                    continue;
                }
                keep.lock().unwrap().push(conn);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        (silent, held)
    }

    #[test]
    fn a_migd_that_never_answers_does_not_hold_up_the_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let migd = dir.path().join("migd.sock");
        let (silent, held) = fake_migd(&migd, Vec::new());
        // An hour for migd to answer: an ask made on infod's loop would stop it for that long.
        let infod = Loopback::start(dir.path(), &migd, Duration::from_hours(1));
        let mut first = infod.next();
        while silent.load(Ordering::SeqCst) == 0 {
            first = infod.next();
        }
        // migd holds infod's question, unanswered; infod goes on.
        let later: Vec<LoadVector> = (0..5).map(|_| infod.next()).collect();
        assert!(later.windows(2).all(|w| w[1].seq > w[0].seq) && later[0].seq > first.seq, "{later:?}");
        assert!(later.iter().all(|v| v.guests == 0), "{later:?}");
        assert_eq!(silent.load(Ordering::SeqCst), 1, "one question at a time");
        // Let the question end, so that the runtime can stop.
        held.lock().unwrap().clear();
        infod.stop();
    }

    #[test]
    fn a_silent_migd_leaves_the_last_count_and_no_migd_means_no_guests() {
        let dir = tempfile::tempdir().unwrap();
        let migd = dir.path().join("migd.sock");
        let (silent, held) = fake_migd(&migd, vec![7]);
        let infod = Loopback::start(dir.path(), &migd, Duration::from_millis(20));
        while infod.next().guests != 7 {}
        // migd falls silent: each question ends unanswered after its time, a new one follows, and the
        // count stays what migd said last.
        while silent.load(Ordering::SeqCst) < 3 {
            let v = infod.next();
            assert_eq!(v.guests, 7, "{v:?}");
        }
        // migd is gone: no guests.
        std::fs::remove_file(&migd).unwrap();
        held.lock().unwrap().clear();
        while infod.next().guests != 0 {}
        infod.stop();
    }
}
