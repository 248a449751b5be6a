//! Node policies (`mosctl block|noblock|stay|nostay|lstay|nolstay|setspeed|expel`, root only) and pinned
//! jobs (`mosctl pin|unpin PID`, the job's owner or root). A policy change is written to the policy file
//! (`[policy] state`) before it is answered, so it survives restarts; infod reads the same file and
//! advertises it. What each part means:
//!
//! - `block`: this node refuses guests (`admit`); a job coming home is always taken.
//! - `stay`: the balancer and the usher of this node move nothing; `migrate` still does.
//! - `lstay`: they do not move the jobs started here while they run here; guests may still go.
//! - `expel`: `block`, then every guest goes home, or to the best other node if home cannot take it.
//! - `pin`: the job moves only when someone asks, wherever it runs (it travels with the job's facts).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rmosix_common::control::{Refusal, Response};
use rmosix_common::policy::{Change, NodePolicy};
use tracing::{info, warn};

use super::home::Location;
use super::runner::Runner;
use super::{Daemon, MoveError};
use crate::protocol;

impl Daemon {
    /// The policy in force on this node.
    pub(super) fn policy(&self) -> NodePolicy {
        *self.policy.lock().expect("policy")
    }

    /// `mosctl` asks for this node's policy, changed by `change` if given: root only for a change.
    pub(super) fn change_policy(&self, uid: u32, change: Option<Change>) -> Result<Response, MoveError> {
        let node = self.me().0;
        let Some(change) = change else {
            return Ok(Response::Policy { node, policy: self.policy(), stuck: self.stuck(), moves: self.auto_moves() });
        };
        if uid != 0 {
            return Err(MoveError::new(Refusal::NotRoot, format!("only root may change node {node}'s policy")));
        }
        let mut policy = self.policy.lock().expect("policy");
        let changed = policy.with(change).map_err(|e| MoveError::new(Refusal::BadRequest, e.to_string()))?;
        changed
            .save(&self.settings.config.policy.state)
            .map_err(|e| MoveError::new(Refusal::Failed, format!("cannot keep the policy, so it is unchanged: {e}")))?;
        *policy = changed;
        info!(?change, policy = %changed.words(), "node policy changed");
        Ok(Response::Policy { node, policy: changed, stuck: self.stuck(), moves: self.auto_moves() })
    }

    /// `mosctl expel`: blocks guests, then sends every guest home (or to the best other node that takes it
    /// when home cannot), one after the other; says what went and what could not.
    pub(super) fn expel(self: &Arc<Self>, uid: u32) -> Result<Response, MoveError> {
        if uid != 0 {
            return Err(MoveError::new(Refusal::NotRoot, format!("only root may expel node {}'s guests", self.me().0)));
        }
        self.change_policy(uid, Some(Change::Block))?;
        let me = self.me().0;
        let guests: Vec<Arc<Runner>> =
            self.runners.lock().expect("runners").values().filter(|r| r.home_node != me).cloned().collect();
        let (mut moved, mut failed) = (0, Vec::new());
        for runner in guests {
            match self.send_away(&runner) {
                Ok(to) => {
                    info!(home_node = runner.home_node, home_pid = runner.home_pid, to, "guest expelled");
                    moved += 1;
                }
                Err(e) => {
                    warn!(home_node = runner.home_node, home_pid = runner.home_pid, error = %e, "cannot expel a guest");
                    failed.push(format!("job {} of node {}: {e}", runner.home_pid, runner.home_node));
                }
            }
        }
        Ok(Response::Expelled { moved, failed })
    }

    /// Moves a guest home, or, if home cannot take it, to the best other node: where it went.
    fn send_away(self: &Arc<Self>, runner: &Arc<Runner>) -> Result<u32, MoveError> {
        let home = runner.home_node;
        match self.move_runner(runner, home) {
            Ok(_) => Ok(home),
            Err(e) if e.why == Refusal::Busy || e.why == Refusal::NotMigratable || runner.moving.load(Ordering::Relaxed) => Err(e),
            Err(at_home) => {
                let other = self.best_node(Some(self.me().0), 0);
                if other == self.me().0 || other == home {
                    return Err(at_home);
                }
                self.move_runner(runner, other).map(|_| other).map_err(|e| {
                    MoveError::new(e.why, format!("home could not take it ({at_home}), nor node {other} ({e})"))
                })
            }
        }
    }

    /// `mosctl pin|unpin PID` on the job's home node: the job's owner or root.
    pub(super) fn pin(&self, uid: u32, home_pid: i32, pinned: bool) -> Result<Response, MoveError> {
        let (record, home) = self.owned_job(uid, home_pid, "pin")?;
        match &*home.location.lock().expect("location") {
            Location::Here(runner) => {
                runner.pinned.store(pinned, Ordering::Relaxed);
                self.kept_update(runner, None, false);
            }
            Location::Away { link, .. } => link
                .lock()
                .expect("link")
                .send_json(protocol::PIN, &pinned)
                .map_err(|e| MoveError::new(Refusal::TargetDown, format!("node {} is unreachable ({e})", record.node.0)))?,
            Location::Moving => return Err(MoveError::new(Refusal::Busy, "it is moving; try again once the move is done")),
        }
        info!(home_pid, pinned, node = record.node.0, "job pinned");
        Ok(Response::Pinned { home_pid, pinned })
    }
}
