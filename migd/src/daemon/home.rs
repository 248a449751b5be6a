//! The home side: every job started here has a `HomeJob` (its deputy's session, its record, where it runs
//! now) for its whole life, wherever it runs. A job running here is attached directly; one running away
//! links back (`serve_link`), and its output, signals and exit status flow over that link.

use std::fs::File;
use std::io::Write as _;
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmosix_common::control::{self, Refusal, Request, Response};
use tracing::{info, warn};

use crate::channel::blocking::{Channel, Reader};
use crate::protocol::{Attach, Moved};
use crate::records::JobState;
use crate::relay::Switch;
use crate::{protocol, relay};
use super::runner::{Report, Runner, RunnerStdin};
use super::{Daemon, FrameOut, FrameSink, MoveError, Pulse, SharedWriter};

/// Where a job homed here runs.
pub(super) enum Location {
    Here(Arc<Runner>),
    Away { link: SharedWriter },
    /// Between two nodes, or between a link's end and the next one's start.
    Moving,
}

/// A job homed on this node, with its deputy.
pub(super) struct HomeJob {
    pub(super) home_pid: i32,
    /// Never leaves home (`mosrun -h`).
    pub(super) stay_home: bool,
    /// The deputy's stdout and stderr (output from any node ends here).
    pub(super) out: Mutex<File>,
    pub(super) err: Mutex<File>,
    /// Where the deputy's input goes now.
    pub(super) stdin: Switch,
    pub(super) stop_stdin: Arc<AtomicBool>,
    pub(super) deputy: Mutex<UnixStream>,
    pub(super) location: Mutex<Location>,
    /// How many of the job's locations (generations) have ended; generation N starts once N have.
    pub(super) finished_epoch: Mutex<u32>,
    pub(super) epoch_changed: Condvar,
    /// Outcome of the move in progress, for the `migrate` that asked.
    pub(super) move_result: Mutex<Option<Result<u32, MoveError>>>,
    /// Why the move in progress failed after it was recorded, when the job was taken back: the `migrate`
    /// that asked hears it once the job runs again.
    pub(super) taken_back: Mutex<Option<String>>,
    pub(super) move_changed: Condvar,
    /// Seconds the job was frozen during its last move.
    pub(super) frozen: Mutex<f64>,
    /// Job links from other nodes so far.
    pub(super) links: std::sync::atomic::AtomicU32,
    /// Generation and output stream of the job's link, and the last output frame of it written to the
    /// deputy.
    pub(super) written: Mutex<(u32, u64, Option<u64>)>,
    /// The deputy asked for SIGKILL while the job was between nodes: deliver it on arrival.
    pub(super) killed: AtomicBool,
    pub(super) done: AtomicBool,
}

impl std::fmt::Debug for HomeJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HomeJob").field("home_pid", &self.home_pid).finish_non_exhaustive()
    }
}

impl HomeJob {
    /// The job runs at `node` now: the end of the move in progress, which failed if the job was taken back.
    pub(super) fn arrived(&self, node: u32) {
        let result = match self.taken_back.lock().expect("taken back").take() {
            Some(why) => Err(MoveError::new(Refusal::Failed, why)),
            None => Ok(node),
        };
        Daemon::set_move_result(self, result);
    }

    /// Forwards a signal to the job wherever it runs.
    pub(super) fn signal(&self, signo: i32) {
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
    pub(super) fn wait_epoch(&self, epoch: u32, limit: Duration) -> bool {
        let mut done = self.finished_epoch.lock().expect("epoch");
        let deadline = Instant::now() + limit;
        while *done < epoch && Instant::now() < deadline {
            done = self.epoch_changed.wait_timeout(done, Duration::from_millis(200)).expect("epoch").0;
        }
        *done >= epoch
    }

    /// The job's locations before generation `epoch` have all ended.
    pub(super) fn end_epoch(&self, epoch: u32) {
        let mut done = self.finished_epoch.lock().expect("epoch");
        if *done < epoch {
            *done = epoch;
        }
        self.epoch_changed.notify_all();
    }
}

impl Daemon {
    /// Moves a job just started here to node `to`, where it was asked to start.
    pub(super) fn start_away(self: &Arc<Self>, runner: &Arc<Runner>, start_on: u32) {
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
    pub(super) fn new_home(
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
    pub(super) fn deputy_session(mut stream: UnixStream, home: &HomeJob) {
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

    /// Declares the job lost if no node takes it up soon: its node linking again (generation `epoch` at
    /// `node`, already running: within half the silence limit, so a deputy hears of a silent node within
    /// the limit), or the node it moves to linking (a generation recorded but not yet running: within twice
    /// the limit, the time the source may wait before taking it back).
    pub(super) fn lose_unless_linked(self: &Arc<Self>, home: &Arc<HomeJob>, node: u32, epoch: u32) {
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
    pub(super) fn attach_here(self: &Arc<Self>, home: &Arc<HomeJob>, runner: &Arc<Runner>, stdout: OwnedFd, stderr: OwnedFd) {
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
    pub(super) fn finish_home(&self, home: &HomeJob, response: Response) {
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

    pub(super) fn set_move_result(home: &HomeJob, result: Result<u32, MoveError>) {
        let mut slot = home.move_result.lock().expect("move result");
        if slot.is_none() {
            *slot = Some(result);
        }
        home.move_changed.notify_all();
    }

    /// Home side of a job link: the job runs on node `node`, if the record says so.
    pub(super) fn serve_link(self: Arc<Self>, link: Channel<TcpStream>, node: u32, attach: &Attach) {
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
    pub(super) fn serve_link_frames(self: &Arc<Self>, home: &Arc<HomeJob>, reader: &mut Reader<TcpStream>, writer: &SharedWriter, node: u32, epoch: u32) {
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
