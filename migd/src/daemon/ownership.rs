//! Who owns a job at every instant: the home record is where a move commits.
//!
//! A job exists in one of three forms: a running (or stopped) copy on some node, and images in a node's
//! store. During a move it may exist in several forms at once (the source's frozen copy, the source's
//! images, the destination's images, the destination's stopped restored copy), so "which one is the job"
//! must be decided in one place that every node can ask. That place is the job's **home record**
//! (`JobRecord`, written to disk before any answer): its `node` and its generation (`migrations`, the
//! *epoch*, one more per move) name the one node that may run the job. A node may let a copy of the job run
//! only while the record names it at that copy's generation and home has taken its link (`ATTACHED`;
//! `node_pid` is then set in the record); a node whose link home is refused kills its copy.
//!
//! A move from source S at generation E to destination D:
//!
//! | step | S holds | D holds | record says | if it breaks here |
//! |---|---|---|---|---|
//! | dump, offer, transfer | frozen copy, images | (images) | S @ E, attached | S resumes its copy; D drops its images |
//! | commit: S asks home to change S@E to D@E+1 | frozen copy, images | images | D @ E+1 | S asks again until home answers (the change is idempotent); D asks home whether it happened |
//! | S kills its copy, sends `COMMITTED` | images | images | D @ E+1 | D, not hearing `COMMITTED`, asks home: D@E+1 means go |
//! | D restores stopped, links home, home takes the link, D resumes | images | running copy | D @ E+1, attached | restore or link failed: D says `FAILED` (or falls silent) and S has home change D@E+1 to S@E+2, then restores its images; home refuses D's link from then on |
//! | D says `RESTORED`; S drops its images | | running copy | D @ E+1, attached | S, not hearing it, asks home: attached means done |
//!
//! So a copy runs only with home's word, and home gives its word for one node and generation at a time:
//! never two copies running. The images are kept at the source until home says the destination's copy
//! runs, so a failed restore has a way back: never none. Every wait is bounded by the silence limit
//! (`[migd] silence_secs`): a node that cannot reach home for that long gives up its copy, as home by
//! then has declared the job lost to its deputy.
//!
//! What the job shares with the world (file locks, FIFOs, their data) is let go by the source (its copy is
//! killed) before the destination restores it, so the restore finds them as the job left them.
//!
//! A migd that dies (`kill -9`) takes no job with it: each job's pipes are held by the node's keeper too
//! (`crate::keeper`), which knows where the job stood in a move (frozen for a move to N, or restored and not
//! yet let run). The migd that starts next takes every job up (`adoption`) before it listens: a copy caught
//! in a move asks home as above, and resumes only if the record names this node and that generation (the
//! move did not happen, or it was the arriving copy and home takes its link), and is killed otherwise; the
//! images of the move are dropped, so a destination that fails after such a restart has no way back and
//! the job is declared lost. A guest links home again (with a new output stream, so home does not take its
//! output for frames already written); a job of this node waits for its deputy to come back.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rmosix_common::NodeId;
use tracing::{info, warn};

use super::Daemon;
use crate::channel::blocking::Channel;
use crate::protocol::{self, Ask, Change, RecordState};
use crate::records::JobState;

/// How a node that holds a form of a job learns where the job is.
#[derive(Debug, thiserror::Error)]
pub(super) enum AskError {
    #[error("home node {home} is not in the cluster map")]
    NotInMap { home: u32 },
    #[error("cannot reach home node {home}: {reason}")]
    Unreachable { home: u32, reason: String },
}

impl Daemon {
    /// Home side: answers `ask` from node `requester` about a job homed here, making the change it asks for
    /// if the record is where the change starts. The record is written (and synced) before the answer.
    pub(super) fn record_state(&self, ask: &Ask, requester: u32) -> RecordState {
        let decide = self.ownership.lock().expect("ownership lock");
        let Some(record) = self.records.get(ask.home_pid).filter(|r| !r.state.has_ended()) else {
            return RecordState { ended: true, node: 0, epoch: 0, attached: false, changed: false };
        };
        let mut state = RecordState {
            ended: false,
            node: record.node.0,
            epoch: record.migrations,
            attached: record.node_pid != 0,
            changed: false,
        };
        if let Some(reason) = &ask.lost {
            if requester == state.node {
                drop(decide);
                self.declare_lost(ask.home_pid, reason);
                state.ended = true;
            }
            return state;
        }
        let Some(change) = ask.change else { return state };
        let to_epoch = change.from_epoch + 1;
        if state.node == change.to_node && state.epoch == to_epoch {
            state.changed = true;
            return state;
        }
        // Only the node that holds the job, or the one taking it back, may move the record; and a copy that
        // runs (its node linked home) is taken from nobody but that node itself.
        let by_holder = requester == change.from_node;
        let may = by_holder || (requester == change.to_node && !state.attached);
        if state.node != change.from_node || state.epoch != change.from_epoch || !may {
            return state;
        }
        let written = self.records.update(ask.home_pid, |r| {
            r.node = NodeId(change.to_node);
            r.node_pid = 0;
            r.migrations = to_epoch;
            r.state = JobState::Running;
        });
        if let Err(error) = written {
            warn!(home_pid = ask.home_pid, %error, "cannot record the move; it does not happen");
            return state;
        }
        info!(home_pid = ask.home_pid, from = change.from_node, to = change.to_node, epoch = to_epoch, "move recorded");
        let home = self.homes.lock().expect("homes lock").get(&ask.home_pid).cloned();
        if let Some(home) = home
            && !by_holder
        {
            // Taken back from a node that never ran it: its generation is over, and the move failed.
            home.end_epoch(to_epoch);
            let why = format!("it could not start on node {}; it runs on at node {}", change.from_node, change.to_node);
            *home.taken_back.lock().expect("taken back") = Some(why);
        }
        state.node = change.to_node;
        state.epoch = to_epoch;
        state.attached = false;
        state.changed = true;
        state
    }

    /// Asks the home node of a job (this node or another) `ask` once.
    pub(super) fn ask_home_once(&self, home: u32, ask: &Ask) -> Result<RecordState, AskError> {
        if home == self.me().0 {
            return Ok(self.record_state(ask, home));
        }
        let node = self.settings.map.get(NodeId(home)).ok_or(AskError::NotInMap { home })?;
        let unreachable = |reason: String| AskError::Unreachable { home, reason };
        let addr = SocketAddr::from((node.addr, self.settings.config.migd.port));
        let stream = TcpStream::connect_timeout(&addr, self.patience().min(Duration::from_secs(5)))
            .map_err(|e| unreachable(e.to_string()))?;
        self.bound_io(&stream);
        let mut link = Channel::client_tcp(stream, &self.settings.key, self.me().0).map_err(|e| unreachable(e.to_string()))?;
        link.send_json(protocol::RECORD_ASK, ask).map_err(|e| unreachable(e.to_string()))?;
        match link.recv_json::<RecordState>() {
            Ok((protocol::RECORD_STATE, state)) => Ok(state),
            Ok((kind, _)) => Err(unreachable(format!("answered with message {kind}"))),
            Err(e) => Err(unreachable(e.to_string())),
        }
    }

    /// Asks home `ask` until it answers or `limit` has passed, calling `meanwhile` between tries (to keep
    /// another link alive). The question must be safe to ask twice: a change is.
    pub(super) fn ask_home(
        &self,
        home: u32,
        ask: &Ask,
        limit: Duration,
        mut meanwhile: impl FnMut(),
    ) -> Result<RecordState, AskError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.ask_home_once(home, ask) {
                Ok(state) => return Ok(state),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    warn!(home_pid = ask.home_pid, error = %e, "home did not answer; asking again");
                    meanwhile();
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }

    /// Home side of a job link or of a job arriving at home: takes generation `epoch` of the job on `node`
    /// (whose init is `pid` there) as where the job runs, if the record says so. After this the job may
    /// run there, and its record can no longer be taken from that node by anyone else.
    pub(super) fn bind(&self, home_pid: i32, node: u32, epoch: u32, pid: i32) -> Result<(), String> {
        let decide = self.ownership.lock().expect("ownership lock");
        let record = self
            .records
            .get(home_pid)
            .filter(|r| !r.state.has_ended())
            .ok_or_else(|| format!("job {home_pid} has ended or is not known here"))?;
        if record.node.0 != node || record.migrations != epoch {
            return Err(format!(
                "job {home_pid} is recorded at node {} generation {}, not at node {node} generation {epoch}",
                record.node, record.migrations
            ));
        }
        self.records
            .update(home_pid, |r| {
                r.node_pid = pid;
                r.state = JobState::Running;
            })
            .map_err(|e| e.to_string())?;
        if let Some(home) = self.homes.lock().expect("homes lock").get(&home_pid) {
            home.links.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        drop(decide);
        Ok(())
    }

    /// The job cannot run anywhere any more: its deputy is told, or its record says so for a deputy that
    /// comes back.
    pub(super) fn declare_lost(&self, home_pid: i32, reason: &str) {
        let home = self.homes.lock().expect("homes lock").get(&home_pid).cloned();
        match home {
            Some(home) => self.finish_home(&home, rmosix_common::control::Response::Lost { reason: reason.to_owned() }),
            None => {
                let _ = self.records.update(home_pid, |r| r.state = JobState::Lost { reason: reason.to_owned() });
            }
        }
    }

    /// Asks for `change` of job `home_pid` homed at `home` for up to the silence limit.
    pub(super) fn commit(&self, home: u32, home_pid: i32, change: Change, meanwhile: impl FnMut()) -> Result<RecordState, AskError> {
        self.ask_home(home, &Ask { home_pid, change: Some(change), lost: None }, self.silence(), meanwhile)
    }
}
