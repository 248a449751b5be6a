//! The guest side: a job running away from its home node keeps one link home (`LinkSlot`), over which its
//! output goes (numbered, so a relinked stream resumes where home stopped reading) and its deputy's input,
//! signals and keepalives come. A link that breaks is made again within the silence limit, or the job is
//! given up.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmosix_common::NodeId;
use tracing::{info, warn};

use crate::channel::blocking::{Channel, Reader, Writer};
use crate::protocol::Attach;
use crate::relay::Sink;
use crate::{protocol, relay};
use super::runner::{Report, Runner, RunnerStdin};
use super::{Daemon, FrameOut, Pulse};

/// A guest job's link home, which survives the home migd restarting: while the link is down, senders wait
/// (the job's pipes hold its output meanwhile) until it is back or given up.
pub(super) struct LinkSlot {
    /// The numbering of this slot's output frames ([`Attach::stream`]).
    pub(super) stream: u64,
    pub(super) writer: Mutex<Option<Writer<TcpStream>>>,
    pub(super) changed: Condvar,
    pub(super) gone: AtomicBool,
    /// Output frames sent but not yet written out at home (sequence number, kind, payload): sent again on
    /// the next link if this one breaks, so no output is lost when home restarts.
    pub(super) unacked: Mutex<(u64, std::collections::VecDeque<OutputFrame>)>,
}

/// An output frame kept for sending again: sequence number, kind, payload.
pub(super) type OutputFrame = (u64, u8, Vec<u8>);

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
    pub(super) fn set(&self, writer: Option<Writer<TcpStream>>) {
        *self.writer.lock().expect("slot") = writer;
        self.changed.notify_all();
    }

    pub(super) fn give_up(&self) {
        self.gone.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Sends job output, numbered, keeping it until home acknowledges it.
    pub(super) fn send_output(&self, kind: u8, data: &[u8]) -> std::io::Result<()> {
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
    pub(super) fn ack(&self, seq: u64) {
        let mut q = self.unacked.lock().expect("unacked");
        while q.1.front().is_some_and(|(s, _, _)| *s <= seq) {
            q.1.pop_front();
        }
    }

    /// Sends the unacknowledged output again on a new link, then makes it the link.
    pub(super) fn relink(&self, mut writer: Writer<TcpStream>) -> Result<(), crate::channel::ChannelError> {
        let pending: Vec<OutputFrame> = self.unacked.lock().expect("unacked").1.iter().cloned().collect();
        for (_, kind, payload) in pending {
            writer.send(kind, &payload)?;
        }
        self.set(Some(writer));
        Ok(())
    }
}

/// Job output going home over a guest's link.
pub(super) struct OutputSink {
    pub(super) slot: Arc<LinkSlot>,
    pub(super) kind: u8,
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

/// Why a node could not link a job home.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    /// Home says the job is not this node's to run (any more).
    #[error("home refuses the job: {0}")]
    Refused(String),
    #[error("cannot reach {0}")]
    Unreachable(String),
}

impl Daemon {
    /// Connects to the job's home node and links the job there; home answers once the job's previous
    /// location has ended and its record names this node and the job's generation.
    pub(super) fn link_home(&self, runner: &Runner, frozen: Option<f64>, stream_id: u64) -> Result<(Reader<TcpStream>, Writer<TcpStream>), LinkError> {
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
    pub(super) fn first_link_home(
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
    pub(super) fn run_guest(
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
    pub(super) fn serve_guest_link(self: &Arc<Self>, runner: &Arc<Runner>, slot: &Arc<LinkSlot>, mut reader: Reader<TcpStream>) {
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
                Ok((protocol::PIN, data)) => {
                    if let Ok(pinned) = serde_json::from_slice::<bool>(&data) {
                        runner.pinned.store(pinned, Ordering::Relaxed);
                        self.kept_update(runner, None, false);
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
                    // The move runs beside this loop, which goes on taking home's acknowledgements and
                    // linking again if home's migd restarts meanwhile; the link ends with the move (`MOVED`
                    // is its last word), and this loop with it.
                    let (daemon, runner, slot) = (Arc::clone(self), Arc::clone(runner), Arc::clone(slot));
                    std::thread::spawn(move || {
                        let moved = if to == protocol::BALANCE { daemon.rebalance(&runner) } else { daemon.move_runner(&runner, to) };
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
    pub(super) fn relink(self: &Arc<Self>, runner: &Runner, slot: &LinkSlot, error: &dyn std::fmt::Display) -> Option<Reader<TcpStream>> {
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
}
