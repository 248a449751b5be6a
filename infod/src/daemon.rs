//! The infod daemon: the engine wired to a UDP socket, a clock, the node's resources and a local query
//! socket.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rmosix_common::config::{Config, ResourceSource};
use rmosix_common::load::{Decay, FLAG_BLOCKS_GUESTS, LoadVector};
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

/// Measures the node and builds its load vector.
struct Meter {
    resources: Box<dyn ResourceView>,
    decay: Decay,
    samples: Vec<f64>,
    per_interval: usize,
    vector: LoadVector,
    /// migd's control socket, asked for the number of guest jobs.
    migd_socket: PathBuf,
}

impl Meter {
    fn new(settings: &Settings, resources: Box<dyn ResourceView>, incarnation: u64) -> Self {
        let node = settings.map.get(settings.me).expect("checked at load");
        let speed = settings.config.resources.speed.unwrap_or(node.speed);
        let flags = if settings.config.policy.block_guests { FLAG_BLOCKS_GUESTS } else { 0 };
        Self {
            resources,
            decay: Decay::new(&settings.config.load),
            samples: Vec::new(),
            per_interval: settings.config.load.samples_per_interval as usize,
            migd_socket: std::env::var_os(rmosix_common::control::SOCKET_ENV)
                .map_or_else(|| settings.config.migd.socket.clone(), PathBuf::from),
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
        // Guest jobs are migd's to count; without migd there are none.
        v.guests = rmosix_common::control::ask_guests(&self.migd_socket).unwrap_or(0);
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
    let mut meter = Meter::new(&settings, resources, incarnation);
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
