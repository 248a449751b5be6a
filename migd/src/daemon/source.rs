//! The source of a move: the node a job runs on sends it to another. See `ownership` for who owns the job
//! at each step and what happens when a step breaks.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmosix_checkpoint::criu::Placement;
use rmosix_checkpoint::images::ImageDir;
use rmosix_checkpoint::job::JobError;
use rmosix_checkpoint::transfer;
use rmosix_common::NodeId;
use rmosix_common::control::Refusal;
use tracing::{info, warn};

use super::{Daemon, FrameOut, MoveError, Phase, Pulse, Runner, SharedWriter, enter};
use crate::channel::blocking::{Channel, Reader, Writer};
use crate::protocol::{self, Change, Go, Moved, Offer, Verdict};

/// What the destination made of a committed move.
enum Arrival {
    /// The job runs there, linked home (or it has ended since): the images here are no longer needed.
    Runs,
    /// It does not run there and home has given the job back to nobody yet: take it back.
    Failed(String),
    /// Home cannot be reached to find out, for longer than the silence limit: home has declared the job
    /// lost by now.
    Unknown(String),
}

impl Daemon {
    /// Moves a job running on this node to node `to`. On success the copy here is gone and its output has
    /// been relayed to the end; on failure the job runs on here (possibly as a new copy restored from its
    /// images, when the destination failed after the commit).
    pub(super) fn move_runner(self: &Arc<Self>, runner: &Arc<Runner>, to: u32) -> Result<Duration, MoveError> {
        if runner.in_move.swap(true, Ordering::AcqRel) {
            return Err(MoveError::new(Refusal::Busy, "a move of this job is under way; try again once it is done"));
        }
        let result = self.move_runner_guarded(runner, to);
        runner.in_move.store(false, Ordering::Release);
        result
    }

    fn move_runner_guarded(self: &Arc<Self>, runner: &Arc<Runner>, to: u32) -> Result<Duration, MoveError> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "migration",
            migration_id = %format!("{}.{}-{}", runner.home_node, runner.home_pid, runner.epoch + 1),
            role = "source",
            to
        );
        let _span = span.enter();
        self.kept_update(runner, Some(to), false);
        let result = self.move_runner_steps(runner, to, started);
        if result.is_err() && !runner.moving.load(Ordering::Relaxed) {
            self.kept_update(runner, None, false);
        }
        if let Err(e) = &result {
            warn!(phase = %Phase::Aborted, why = ?e.why, error = %e, "move failed; the job runs on where it was");
        }
        result
    }

    /// Connects to node `to`'s migd for a move, with this node's I/O bounds.
    fn connect_peer(&self, to: u32) -> Result<Channel<TcpStream>, MoveError> {
        let dest = self
            .settings
            .map
            .get(NodeId(to))
            .ok_or_else(|| MoveError::new(Refusal::NoSuchNode, format!("node {to} is not in the cluster map; `mosctl status` lists the nodes")))?;
        let addr = SocketAddr::from((dest.addr, self.settings.config.migd.port));
        let stream = TcpStream::connect_timeout(&addr, self.patience().min(Duration::from_secs(5))).map_err(|e| {
            MoveError::new(Refusal::TargetDown, format!("node {to} is unreachable ({e}); `mosctl status` shows whether it is up"))
        })?;
        let _ = stream.set_nodelay(true);
        self.bound_io(&stream);
        Channel::client_tcp(stream, &self.settings.key, self.me().0).map_err(|e| {
            MoveError::new(
                Refusal::TargetDown,
                format!("node {to} did not accept the connection ({e}); are its cluster key and migd the same as ours?"),
            )
        })
    }

    fn move_runner_steps(self: &Arc<Self>, runner: &Arc<Runner>, to: u32, started: Instant) -> Result<Duration, MoveError> {
        let home_pid = runner.home_pid;
        enter(Phase::Dump);
        info!(phase = %Phase::Dump, "moving");
        if self.settings.map.get(NodeId(to)).is_none() {
            return Err(MoveError::new(Refusal::NoSuchNode, format!("node {to} is not in the cluster map; `mosctl status` lists the nodes")));
        }
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
        enter(Phase::Offer);
        info!(phase = %Phase::Offer, image_bytes, dumped_ms = freeze_start.elapsed().as_millis(), "dumped");
        let mut link = self.connect_peer(to)?;
        let offer = Offer {
            home_node: runner.home_node,
            home_pid,
            uid: runner.uid,
            gid: runner.gid,
            groups: runner.groups.clone(),
            command: runner.command.clone(),
            image_bytes,
            epoch: runner.epoch + 1,
            facts: rmosix_common::control::JobFacts { migrations: runner.facts.migrations + 1, ..runner.facts() },
        };
        let net = |e: crate::channel::ChannelError| failed(Refusal::TargetDown, &format!("the connection to node {to} broke ({e})"));
        link.send_json(protocol::OFFER, &offer).map_err(net)?;
        let (_, verdict): (u8, Verdict) = link.recv_json().map_err(net)?;
        if !verdict.ok {
            return Err(MoveError::new(verdict.refusal.unwrap_or(Refusal::Failed), verdict.message));
        }
        enter(Phase::Transfer);
        info!(phase = %Phase::Transfer, "accepted");
        link.send(protocol::IMAGES, &[]).map_err(net)?;
        let key = *link.bulk_key();
        let raw = link.raw_mut().map_err(net)?;
        transfer::pack(images.path(), raw, &key).map_err(|e| failed(Refusal::Failed, &e))?;
        match link.recv_json::<Verdict>().map_err(net)? {
            (protocol::RECEIVED, verdict) if verdict.ok => {}
            (_, verdict) => return Err(MoveError::new(verdict.refusal.unwrap_or(Refusal::Failed), verdict.message)),
        }
        let (mut reader, writer) = link.into_split().map_err(net)?;
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        let pulse = Pulse::start(Arc::clone(&writer) as Arc<dyn FrameOut>, self.keepalive_every());
        self.relinked_before_commit(runner);
        enter(Phase::Commit);
        info!(phase = %Phase::Commit, "images at the destination; recording the move at home");
        let change = Change { from_node: self.me().0, from_epoch: runner.epoch, to_node: to };
        match self.commit(runner.home_node, home_pid, change, || {}) {
            Ok(state) if state.changed => {}
            Ok(state) => {
                // Dropping the connection tells the destination; it finds the record unchanged and drops
                // its images.
                frozen.abort();
                let now = if state.ended { "has ended".to_owned() } else { format!("is at node {} generation {}", state.node, state.epoch) };
                return Err(MoveError::new(Refusal::Failed, format!("home did not record the move (its record says the job {now})")));
            }
            Err(e) => {
                // Home has not answered for the whole silence limit: it has declared the job lost to its
                // deputy by now, so no copy may run anywhere.
                runner.moving.store(true, Ordering::Relaxed);
                let _ = frozen.commit();
                self.left_here(runner, None, Duration::ZERO);
                return Err(MoveError::new(Refusal::TargetDown, format!("the job is lost: {e}")));
            }
        }
        // The job is the destination's now. Let go of everything the copy here holds (locks, FIFOs) before
        // the destination restores it; the images stay until it runs there.
        runner.moving.store(true, Ordering::Relaxed);
        if let Err(e) = frozen.commit() {
            warn!(home_pid, error = %e, "cannot end the frozen copy");
        }
        let freeze = freeze_start.elapsed();
        self.left_here(runner, Some(to), freeze);
        let go = Go { frozen_so_far: freeze.as_secs_f64() };
        if let Err(e) = writer.lock().expect("link").send_json(protocol::COMMITTED, &go) {
            warn!(home_pid, to, error = %e, "node {to} did not hear the commit; it asks home");
        }
        match self.await_arrival(&mut reader, runner, to) {
            Arrival::Runs => {
                drop(pulse);
                drop(images);
                info!(phase = %Phase::Done, home_pid, to, seconds = started.elapsed().as_secs_f64(), frozen = freeze.as_secs_f64(), "job moved");
                Ok(freeze)
            }
            Arrival::Unknown(why) => {
                drop(pulse);
                Err(MoveError::new(Refusal::TargetDown, format!("the job is lost: {why}")))
            }
            Arrival::Failed(why) => {
                drop(pulse);
                Err(self.take_back(runner, &images, to, &why))
            }
        }
    }

    /// After the commit: waits for the destination to say the job runs there; if it falls silent, asks
    /// home until the silence limit has passed since it was last heard.
    fn await_arrival(&self, reader: &mut Reader<TcpStream>, runner: &Runner, to: u32) -> Arrival {
        let mut heard = Instant::now();
        loop {
            match reader.recv() {
                Ok((protocol::KEEPALIVE, _)) => heard = Instant::now(),
                Ok((protocol::RESTORED, _)) => return Arrival::Runs,
                Ok((protocol::FAILED, data)) => {
                    let why = serde_json::from_slice::<Verdict>(&data).map_or_else(|_| "its restore failed".into(), |v| v.message);
                    return Arrival::Failed(why);
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(home_pid = runner.home_pid, to, error = %e, "destination went silent; asking home");
                    break;
                }
            }
        }
        let epoch = runner.epoch + 1;
        let ask = crate::protocol::Ask { home_pid: runner.home_pid, change: None, lost: None };
        loop {
            match self.ask_home_once(runner.home_node, &ask) {
                Ok(state) if state.ended || state.epoch > epoch || (state.node == to && state.attached) => return Arrival::Runs,
                Ok(state) if state.node != to || state.epoch != epoch => {
                    return Arrival::Unknown(format!("home has it at node {} generation {}", state.node, state.epoch));
                }
                Ok(_) if heard.elapsed() > self.silence() => {
                    return Arrival::Failed(format!("node {to} went silent before the job ran there"));
                }
                Err(e) if heard.elapsed() > self.silence() => return Arrival::Unknown(e.to_string()),
                Ok(_) | Err(_) => {}
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The destination failed after the commit: has home give the job back to this node, then restores it
    /// from the images kept here. Returns what to tell whoever asked for the move.
    fn take_back(self: &Arc<Self>, runner: &Arc<Runner>, images: &ImageDir, to: u32, why: &str) -> MoveError {
        let home_pid = runner.home_pid;
        let epoch = runner.epoch + 1;
        warn!(home_pid, to, %why, "the destination did not start the job; taking it back");
        let change = Change { from_node: to, from_epoch: epoch, to_node: self.me().0 };
        match self.commit(runner.home_node, home_pid, change, || {}) {
            Ok(state) if state.changed => {}
            Ok(state) if state.node == to && state.epoch == epoch && state.attached => {
                // It runs there after all.
                return MoveError::new(Refusal::Failed, format!("node {to} reported a failure but runs the job"));
            }
            Ok(state) => return MoveError::new(Refusal::Failed, format!("home did not give the job back (ended: {}, node {} generation {})", state.ended, state.node, state.epoch)),
            Err(e) => return MoveError::new(Refusal::TargetDown, format!("the job is lost: {e}")),
        }
        match self.restore_here(runner, images, epoch + 1) {
            Ok(()) => MoveError::new(Refusal::Failed, format!("it could not start on node {to} ({why}); it runs on here")),
            Err(e) => {
                let reason = format!("it could not start on node {to} ({why}), nor again here ({e})");
                self.give_up(runner.home_node, home_pid, &reason);
                MoveError::new(Refusal::Failed, format!("the job is lost: {reason}"))
            }
        }
    }

    /// Restores generation `epoch` of a job from `images` on this node (home has recorded it here) and lets
    /// it run, linked to its deputy.
    fn restore_here(self: &Arc<Self>, old: &Runner, images: &ImageDir, epoch: u32) -> Result<(), String> {
        let (runner, stdout, stderr) = self.restore_copy(images, old.whose(), epoch)?;
        if old.home_node == self.me().0 {
            self.arrive_home(&runner, stdout, stderr, None)
        } else {
            self.run_guest(&runner, (stdout, stderr), None, true)
        }
        .inspect_err(|_| runner.kill_and_clean())
    }

    /// Tells the job's home that it cannot be run anywhere any more.
    pub(super) fn give_up(&self, home: u32, home_pid: i32, reason: &str) {
        let ask = crate::protocol::Ask { home_pid, change: None, lost: Some(reason.to_owned()) };
        if let Err(e) = self.ask_home(home, &ask, self.silence(), || {}) {
            warn!(home_pid, error = %e, "cannot tell home that the job is lost");
        }
    }

    /// A guest whose link home broke (its home migd restarting) holds output home has not acknowledged;
    /// once the move is recorded, home takes no link of this generation any more. So wait, for up to the
    /// silence limit, until the guest's link loop (`serve_guest_link`) has linked again, which sends that
    /// output again; it then goes before the link's last word (`MOVED`).
    fn relinked_before_commit(&self, runner: &Runner) {
        let Some(slot) = runner.link.lock().expect("link").clone() else { return };
        let deadline = Instant::now() + self.silence();
        let mut said = false;
        while !slot.writer.lock().expect("slot").as_ref().is_some_and(Writer::established) {
            if Instant::now() > deadline || slot.gone.load(Ordering::Relaxed) {
                warn!(home_pid = runner.home_pid, "no link home; output not acknowledged yet may be lost");
                return;
            }
            if !said {
                info!(home_pid = runner.home_pid, "waiting for the link home before recording the move");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The copy here has ended because the job moved to `to` (or, `None`, is lost): relays its last output,
    /// forgets it, and ends its generation at home.
    pub(super) fn left_here(&self, runner: &Runner, to: Option<u32>, freeze: Duration) {
        let slot = runner.link.lock().expect("link").take();
        if let Some(slot) = &slot {
            // Its output goes home over a link that may be down now, and nothing relinks it while this
            // thread moves the job: don't wait for ever.
            let watchdog = Arc::clone(slot);
            let limit = self.patience();
            std::thread::spawn(move || {
                std::thread::sleep(limit);
                watchdog.give_up();
            });
        }
        // What the old copy wrote before the freeze is still in its pipes: relay it to the end first.
        for relay in runner.outputs.lock().expect("outputs").drain(..) {
            let _ = relay.join();
        }
        *runner.stdin.lock().expect("stdin") = None;
        self.runners.lock().expect("runners").remove(&(runner.home_node, runner.home_pid));
        if runner.home_node == self.me().0 {
            if let Some(home) = self.homes.lock().expect("homes lock").get(&runner.home_pid).cloned() {
                *home.location.lock().expect("location") = super::Location::Moving;
                *home.frozen.lock().expect("frozen") = freeze.as_secs_f64();
                home.stdin.set(None);
                home.end_epoch(runner.epoch + 1);
            }
        } else if let Some(slot) = slot {
            // Only on a link that is up: nothing relinks while this thread moves the job, and home learns
            // of the move from its record anyway.
            if let Some(mut w) = slot.writer.lock().expect("slot").take() {
                if let Some(to) = to {
                    let moved = Moved { to, seconds: freeze.as_secs_f64(), frozen: freeze.as_secs_f64() };
                    let _ = w.send_json(protocol::MOVED, &moved);
                }
                let _ = w.shutdown();
            }
            slot.give_up();
        }
    }
}
