//! Jobs outlive migd: every job running here is handed to the keeper ([`crate::keeper`]), and a migd that
//! starts takes up the jobs the keeper holds, finding out from each job's home what became of a move the
//! previous migd was in the middle of.

use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rmosix_checkpoint::criu::Owner;
use rmosix_checkpoint::job::Job;
use rmosix_common::cgroup::JobCgroups;
use rmosix_common::NodeId;
use tracing::{info, warn};

use super::{Daemon, Runner};
use crate::keeper::Kept;
use crate::protocol::Ask;

impl Daemon {
    /// Hands a job's pipes to the keeper. `arriving`: restored here and not yet let run.
    pub(super) fn keep(&self, runner: &Runner, stdout: BorrowedFd<'_>, stderr: BorrowedFd<'_>, arriving: bool) {
        let Some(keeper) = &self.keeper else { return };
        let stdin = runner.stdin.lock().expect("stdin").clone();
        let mut fds: Vec<BorrowedFd<'_>> = stdin.as_ref().map(|f| f.as_fd()).into_iter().collect();
        fds.extend([stdout, stderr, runner.job.status_fd()]);
        if let Err(error) = keeper.keep(&runner.kept(None, arriving), &fds) {
            warn!(home_pid = runner.home_pid, %error, "the keeper does not hold the job: it ends if migd ends");
        }
    }

    /// Tells the keeper where the job is in a move (`moving_to`: frozen for a move there) or that it runs.
    pub(super) fn kept_update(&self, runner: &Runner, moving_to: Option<u32>, arriving: bool) {
        let Some(keeper) = &self.keeper else { return };
        if let Err(error) = keeper.keep(&runner.kept(moving_to, arriving), &[]) {
            warn!(home_pid = runner.home_pid, %error, "cannot tell the keeper about the job");
        }
    }

    /// Takes up every job the keeper holds (they ran on while no migd was here). Jobs homed here wait for
    /// their deputies (`reattach`) for the silence limit; guests link home again.
    pub(super) fn adopt_kept(self: &Arc<Self>) {
        let Some(keeper) = &self.keeper else { return };
        let held = match keeper.list() {
            Ok(held) => held,
            Err(error) => {
                warn!(%error, "cannot ask the keeper for the jobs it holds");
                return;
            }
        };
        for (kept, fds) in held {
            let id = kept.id();
            // We hold the descriptors now; `adopt` hands them back if the job goes on.
            let _ = keeper.forget(&id);
            let mut fds = fds.into_iter();
            let stdin = if kept.stdin_open { fds.next() } else { None };
            match (fds.next(), fds.next(), fds.next(), fds.next()) {
                (Some(stdout), Some(stderr), Some(status), None) if kept.stdin_open == stdin.is_some() => {
                    self.adopt(&kept, stdin, [stdout, stderr, status]);
                }
                _ => warn!(%id, "the keeper holds a job without its pipes; dropped"),
            }
        }
    }

    fn adopt(self: &Arc<Self>, kept: &Kept, stdin: Option<OwnedFd>, [stdout, stderr, status]: [OwnedFd; 3]) {
        let owner = Some(Owner { uid: kept.uid, gid: kept.gid });
        let job = Job::adopt(kept.pid, kept.pipes, owner, status);
        let cgroup = self.jobs_cgroup.as_ref().and_then(|parent| {
            let name = format!("{}-{}", JobCgroups::name(NodeId(kept.home_node), kept.home_pid.unsigned_abs()), kept.epoch);
            JobCgroups::open(parent, &name).ok()
        });
        let runner = Arc::new(Runner::new(kept.into(), job, stdin, kept.epoch, cgroup).kept_by(self.keeper.as_ref()));
        let home_pid = kept.home_pid;
        if kept.moving_to.is_some() || kept.arriving {
            // In the middle of a move when the previous migd ended: only home knows whether this copy is
            // the job's.
            let ask = Ask { home_pid, change: None, lost: None };
            let ours = match self.ask_home(kept.home_node, &ask, self.silence(), || {}) {
                Ok(state) => !state.ended && state.node == self.me().0 && state.epoch == kept.epoch,
                Err(_) => false,
            };
            if !ours {
                info!(home_pid, pid = kept.pid, "a copy left by a move that happened elsewhere; killed");
                runner.kill_and_clean();
                return;
            }
            if kept.moving_to.is_some() {
                info!(home_pid, pid = kept.pid, "a move the previous migd began did not happen; the job runs on");
                runner.job.resume();
            }
        }
        self.keep(&runner, stdout.as_fd(), stderr.as_fd(), kept.arriving);
        self.runners.lock().expect("runners").insert((kept.home_node, home_pid), Arc::clone(&runner));
        self.observer.poke();
        if kept.home_node == self.me().0 {
            info!(home_pid, pid = kept.pid, "took up a job of this node; waiting for its deputy");
            self.adopted.lock().expect("adopted").insert(home_pid, (Arc::clone(&runner), stdout, stderr, kept.arriving));
            let daemon = Arc::clone(self);
            std::thread::spawn(move || {
                std::thread::sleep(daemon.silence());
                if daemon.adopted.lock().expect("adopted").remove(&home_pid).is_some() {
                    warn!(home_pid, "its deputy did not come back; the job is killed");
                    runner.kill_and_clean();
                    daemon.runners.lock().expect("runners").remove(&(runner.home_node, home_pid));
                }
            });
        } else if let Err(error) = self.run_guest(&runner, (stdout, stderr), None, kept.arriving) {
            warn!(home_pid, %error, "home does not take the job up again; killed");
            runner.kill_and_clean();
            self.runners.lock().expect("runners").remove(&(runner.home_node, home_pid));
        } else {
            info!(home_pid, pid = kept.pid, "took up a guest job; linked home again");
        }
    }
}
