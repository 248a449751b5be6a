//! The destination of a move: a node takes a job another node sends. See `ownership` for who owns the
//! job at each step and what happens when a step breaks.

use std::net::TcpStream;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rmosix_checkpoint::criu::Owner;
use rmosix_checkpoint::images::ImageDir;
use rmosix_checkpoint::job::Job;
use rmosix_checkpoint::transfer;
use rmosix_common::control::Refusal;
use tracing::{info, warn};

use super::{Daemon, FrameOut, Phase, Pulse, Runner, SharedWriter, Whose, check_owner, enter};
use crate::channel::blocking::{Channel, Reader};
use crate::protocol::{self, Ask, Go, Offer, Verdict};

impl Daemon {
    /// The destination of a move.
    #[expect(clippy::needless_pass_by_value, reason = "the offer is consumed by the move it starts")]
    pub(super) fn receive_job(self: Arc<Self>, link: Channel<TcpStream>, from: u32, offer: Offer) {
        let span = tracing::info_span!(
            "migration",
            migration_id = %format!("{}.{}-{}", offer.home_node, offer.home_pid, offer.epoch),
            role = "destination",
            from
        );
        let _span = span.enter();
        info!(phase = %Phase::Offer, image_bytes = offer.image_bytes, "offered a job");
        self.receive_job_steps(link, from, &offer);
    }

    fn receive_job_steps(self: Arc<Self>, mut link: Channel<TcpStream>, from: u32, offer: &Offer) {
        let home_pid = offer.home_pid;
        if let Err((why, message)) = self.admit(offer) {
            info!(home_pid, from, %message, "offer refused");
            let _ = link.send_json(protocol::VERDICT, &Verdict::no(why, message));
            return;
        }
        if link.send_json(protocol::VERDICT, &Verdict::yes(0)).is_err() {
            return;
        }
        enter(Phase::Transfer);
        let images = match self.receive_images(&mut link, offer.image_bytes) {
            Ok(images) => images,
            Err(e) => {
                warn!(home_pid, from, error = %e, "image transfer failed");
                let _ = link.send_json(protocol::RECEIVED, &Verdict::no(Refusal::Failed, e));
                return;
            }
        };
        if link.send_json(protocol::RECEIVED, &Verdict::yes(0)).is_err() {
            warn!(home_pid, from, "the source went away after the transfer");
        }
        let Ok((mut reader, writer)) = link.into_split() else { return };
        let writer: SharedWriter = Arc::new(Mutex::new(writer));
        let _pulse = Pulse::start(Arc::clone(&writer) as Arc<dyn FrameOut>, self.keepalive_every());
        let waited = Instant::now();
        let Some(frozen_before) = self.await_commit(&mut reader, offer) else {
            info!(home_pid, from, phase = %Phase::Aborted, "the move was not recorded at home; images dropped");
            return;
        };
        let say = |kind, verdict: &Verdict| {
            let _ = writer.lock().expect("link").send_json(kind, verdict);
        };
        enter(Phase::Restore);
        info!(phase = %Phase::Restore, "move recorded at home; restoring");
        let (runner, stdout, stderr) = match self.restore_arrival(&images, offer) {
            Ok(restored) => restored,
            Err(e) => {
                warn!(home_pid, from, error = %e, "restore failed; the source takes the job back");
                say(protocol::FAILED, &Verdict::no(Refusal::Failed, e));
                return;
            }
        };
        enter(Phase::Resume);
        info!(phase = %Phase::Resume, "restored; linking home");
        let frozen = frozen_before + waited.elapsed().as_secs_f64();
        let linked = if offer.home_node == self.me().0 {
            self.arrive_home(&runner, stdout, stderr, Some(frozen))
        } else {
            self.run_guest(&runner, (stdout, stderr), Some(frozen), true)
        };
        match linked {
            Ok(()) => {
                info!(phase = %Phase::Done, home_pid, from, pid = runner.job.pid(), "job runs here");
                say(protocol::RESTORED, &Verdict::yes(runner.job.pid()));
            }
            Err(e) => {
                warn!(home_pid, from, error = %e, "home did not take the job; dropped here");
                runner.kill_and_clean();
                say(protocol::FAILED, &Verdict::no(Refusal::Failed, e));
            }
        }
    }

    /// Waits for the source's word that home recorded the move and its copy is gone; returns how long the
    /// job had been frozen by then. If the source falls silent first, asks home whether the move was
    /// recorded (the source may have died right after): `None` if it was not within the silence limit.
    fn await_commit(&self, reader: &mut Reader<TcpStream>, offer: &Offer) -> Option<f64> {
        loop {
            match reader.recv() {
                Ok((protocol::KEEPALIVE, _)) => {}
                Ok((protocol::COMMITTED, data)) => {
                    return Some(serde_json::from_slice::<Go>(&data).map_or(0.0, |go| go.frozen_so_far));
                }
                Ok((kind, _)) => {
                    warn!(home_pid = offer.home_pid, kind, "unexpected message while waiting for the commit");
                    break;
                }
                Err(e) => {
                    warn!(home_pid = offer.home_pid, error = %e, "the source went silent before the commit; asking home");
                    break;
                }
            }
        }
        let ask = Ask { home_pid: offer.home_pid, change: None, lost: None };
        let deadline = Instant::now() + self.silence();
        loop {
            match self.ask_home_once(offer.home_node, &ask) {
                Ok(state) if !state.ended && state.node == self.me().0 && state.epoch == offer.epoch => return Some(0.0),
                // Not (yet) recorded: the source may still be asking home, until the silence limit.
                Ok(state) if !state.ended && state.epoch + 1 == offer.epoch && Instant::now() < deadline => {}
                Ok(_) => return None,
                Err(_) if Instant::now() < deadline => {}
                Err(e) => {
                    warn!(home_pid = offer.home_pid, error = %e, "home unreachable");
                    return None;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Restores an arriving job stopped, in a cgroup of its own, and checks it runs as its owner.
    fn restore_arrival(&self, images: &ImageDir, offer: &Offer) -> Result<(Arc<Runner>, OwnedFd, OwnedFd), String> {
        self.restore_copy(images, offer.into(), offer.epoch)
    }

    /// Restores generation `epoch` of the job `whose` from `images`, stopped, in a cgroup of its own; checks
    /// that every process runs as the owner and no one else, and gives the copy to the keeper. Returns the
    /// runner and the job's stdout and stderr.
    pub(super) fn restore_copy(
        &self,
        images: &ImageDir,
        whose: Whose,
        epoch: u32,
    ) -> Result<(Arc<Runner>, OwnedFd, OwnedFd), String> {
        let owner = Owner { uid: whose.uid, gid: whose.gid };
        let (cgroup, placement) = self.job_cgroup(whose.home_node, whose.home_pid, epoch);
        let (job, pipes) = match Job::restore_stopped(&self.criu, images, placement, Some(owner)) {
            Ok(restored) => restored,
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    let _ = cgroup.remove();
                }
                return Err(e.to_string());
            }
        };
        let groups = whose.groups.clone();
        let runner = Arc::new(Runner::new(whose, job, Some(pipes.stdin), epoch, cgroup).kept_by(self.keeper.as_ref()));
        // The job runs with its owner's credentials and no other: check every process before it runs.
        if let Err(e) = check_owner(runner.job.pid(), owner, &groups) {
            runner.kill_and_clean();
            return Err(format!("the restored job has the wrong owner: {e}"));
        }
        self.keep(&runner, pipes.stdout.as_fd(), pipes.stderr.as_fd(), true);
        Ok((runner, pipes.stdout, pipes.stderr))
    }

    /// A restored job arrives at its home node: home binds it, attaches it to its deputy and lets it run.
    pub(super) fn arrive_home(
        self: &Arc<Self>,
        runner: &Arc<Runner>,
        stdout: OwnedFd,
        stderr: OwnedFd,
        frozen: Option<f64>,
    ) -> Result<(), String> {
        let home_pid = runner.home_pid;
        let home = self.homes.lock().expect("homes lock").get(&home_pid).cloned().ok_or_else(|| format!("job {home_pid} has no deputy here"))?;
        if !home.wait_epoch(runner.epoch, self.silence()) {
            return Err("the job's previous location did not end".into());
        }
        self.bind(home_pid, self.me().0, runner.epoch, runner.job.pid())?;
        if let Some(frozen) = frozen {
            *home.frozen.lock().expect("frozen") = frozen;
        }
        self.attach_here(&home, runner, stdout, stderr);
        runner.job.resume();
        self.kept_update(runner, None, false);
        if home.killed.load(Ordering::Relaxed) {
            home.signal(Signal::SIGKILL as i32);
        }
        home.arrived(self.me().0);
        info!(home_pid, "job is home again");
        Ok(())
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
        if self.policy().block_guests {
            let why = format!("node {me} blocks guests (mosctl block, or block_guests in its configuration); choose another node");
            return Err((Refusal::TargetBlocksGuests, why));
        }
        // Images land in memory (a tmpfs) and the restore needs as much again: refuse before a byte is sent
        // what this node cannot hold.
        match transfer::image_limit(self.settings.config.migd.max_image_bytes) {
            Ok(limit) if offer.image_bytes > limit => {
                let why = format!(
                    "node {me} has room for {} MiB of images now and the job's are {} MiB; choose another node",
                    limit >> 20,
                    offer.image_bytes.div_ceil(1 << 20)
                );
                return Err((Refusal::Busy, why));
            }
            Ok(_) => {}
            Err(e) => return Err((Refusal::Failed, format!("node {me} cannot tell how much memory it has: {e}"))),
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

    /// Receives a job's images into a new image directory of the store: no more than the offer announced,
    /// nor than this node's image limit.
    fn receive_images(&self, link: &mut Channel<TcpStream>, announced: u64) -> Result<ImageDir, String> {
        let limit = transfer::image_limit(self.settings.config.migd.max_image_bytes).map_err(|e| e.to_string())?.min(announced);
        let images = ImageDir::create(&self.store).map_err(|e| e.to_string())?;
        let key = *link.bulk_key();
        match link.recv() {
            Ok((protocol::IMAGES, _)) => {
                let raw = link.raw_mut().map_err(|e| e.to_string())?;
                transfer::unpack_limited(raw, images.path(), &key, limit).map_err(|e| e.to_string())?;
                Ok(images)
            }
            Ok((kind, _)) => Err(format!("expected images, got message {kind}")),
            Err(e) => Err(e.to_string()),
        }
    }
}
