//! A job running on this node (started here or arrived), its owner and where it stands, and the checks
//! that a process about to run as a job is its owner's with nothing gained.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::signal::Signal;
use rmosix_checkpoint::criu::Owner;
use rmosix_checkpoint::job::Job;
use rmosix_checkpoint::migratable;
use rmosix_common::cgroup::JobCgroups;
use rmosix_common::control::{JobFacts, Response};
use tracing::{info, warn};

use crate::keeper::{Keeper, Kept};
use crate::protocol;
use crate::relay::{SharedPipe, Sink};
use super::guest::LinkSlot;
use super::home::HomeJob;
use super::{Daemon, FrameOut};

/// Where a running job reports its end.
pub(super) enum Report {
    /// To the deputy session on this node (the job is home).
    Home(Arc<HomeJob>),
    /// Over the job link to its home node.
    Link(Arc<LinkSlot>),
}

/// The stdin of a job running here, as the deputy's input is relayed into it.
pub(super) struct RunnerStdin(pub(super) Arc<Runner>);

impl Sink for RunnerStdin {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        SharedPipe(Arc::clone(&self.0.stdin)).put(data)
    }

    fn end(&mut self) -> std::io::Result<()> {
        self.0.close_stdin();
        Ok(())
    }
}

/// Which job a copy belongs to and whose it is: the key of its home record, and the identity every copy of
/// it runs with, no more and no less.
#[derive(Debug, Clone)]
pub(super) struct Whose {
    pub(super) home_node: u32,
    pub(super) home_pid: i32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) groups: Vec<u32>,
    pub(super) command: Vec<String>,
    pub(super) facts: JobFacts,
}

impl From<&crate::protocol::Offer> for Whose {
    fn from(offer: &crate::protocol::Offer) -> Self {
        Self {
            home_node: offer.home_node,
            home_pid: offer.home_pid,
            uid: offer.uid,
            gid: offer.gid,
            groups: offer.groups.clone(),
            command: offer.command.clone(),
            facts: offer.facts,
        }
    }
}

impl From<&Kept> for Whose {
    fn from(kept: &Kept) -> Self {
        Self {
            home_node: kept.home_node,
            home_pid: kept.home_pid,
            uid: kept.uid,
            gid: kept.gid,
            groups: kept.groups.clone(),
            command: kept.command.clone(),
            facts: kept.facts,
        }
    }
}

/// A job running on this node.
pub(super) struct Runner {
    pub(super) home_node: u32,
    pub(super) home_pid: i32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    /// The owner's supplementary groups when the job started: a restored job must have these and no more.
    pub(super) groups: Vec<u32>,
    pub(super) command: Vec<String>,
    pub(super) facts: JobFacts,
    pub(super) job: Arc<Job>,
    /// Write end of the job's stdin pipe, while open.
    pub(super) stdin: Arc<Mutex<Option<Arc<File>>>>,
    /// Set just before the copy here is killed because it runs elsewhere now.
    pub(super) moving: AtomicBool,
    /// Set when the job has ended here and its exit status is on its way home: the link's end is then the
    /// job's end, not something to repair.
    pub(super) exited: AtomicBool,
    /// The relays of the job's stdout and stderr.
    pub(super) outputs: Mutex<Vec<JoinHandle<u64>>>,
    pub(super) epoch: u32,
    /// The job's cgroup on this node, removed when the job ends here or leaves.
    pub(super) cgroup: Option<JobCgroups>,
    /// A guest's link home, while it has one.
    pub(super) link: Mutex<Option<Arc<LinkSlot>>>,
    /// A move of this copy is under way (`Daemon::move_runner` holds it).
    pub(super) in_move: AtomicBool,
    /// When this copy started running here (started, arrived or taken up).
    pub(super) arrived: Instant,
    /// Its owner pinned it here (`mosctl pin`): it moves only when someone asks.
    pub(super) pinned: AtomicBool,
    /// The keeper holding the job's pipes too, told when the job's stdin ends (its copy of the write end
    /// would keep the job from seeing the end).
    pub(super) keeper: Option<Keeper>,
}

impl Runner {
    pub(super) fn new(whose: Whose, job: Job, stdin: Option<OwnedFd>, epoch: u32, cgroup: Option<JobCgroups>) -> Self {
        let Whose { home_node, home_pid, uid, gid, groups, command, facts } = whose;
        Self {
            home_node,
            home_pid,
            uid,
            gid,
            groups,
            command,
            facts,
            job: Arc::new(job),
            stdin: Arc::new(Mutex::new(stdin.map(|fd| Arc::new(File::from(fd))))),
            moving: AtomicBool::new(false),
            exited: AtomicBool::new(false),
            outputs: Mutex::new(Vec::new()),
            epoch,
            cgroup,
            link: Mutex::new(None),
            in_move: AtomicBool::new(false),
            arrived: Instant::now(),
            pinned: AtomicBool::new(false),
            keeper: None,
        }
    }

    /// What travels with the job, as it stands now: pinned, it moves only when asked, wherever it goes.
    pub(super) fn facts(&self) -> JobFacts {
        JobFacts { manual: self.facts.manual || self.pinned.load(Ordering::Relaxed), ..self.facts }
    }

    /// Which job this copy is, and whose.
    pub(super) fn whose(&self) -> Whose {
        Whose {
            home_node: self.home_node,
            home_pid: self.home_pid,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            command: self.command.clone(),
            facts: self.facts(),
        }
    }

    /// The runner of a job whose pipes `keeper` holds too.
    pub(super) fn kept_by(mut self, keeper: Option<&Keeper>) -> Self {
        self.keeper = keeper.cloned();
        self
    }

    /// The end of the job's input: the job reads what is in its stdin pipe, then end of file.
    pub(super) fn close_stdin(&self) {
        let was_open = self.stdin.lock().expect("stdin").take().is_some();
        if was_open
            && let Some(keeper) = &self.keeper
            && let Err(error) = keeper.close_stdin(&self.kept(None, false).id())
        {
            warn!(home_pid = self.home_pid, %error, "the keeper keeps the job's stdin open");
        }
    }

    /// What the keeper is told of this job.
    pub(super) fn kept(&self, moving_to: Option<u32>, arriving: bool) -> Kept {
        Kept {
            home_node: self.home_node,
            home_pid: self.home_pid,
            epoch: self.epoch,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            command: self.command.clone(),
            pid: self.job.pid(),
            pipes: self.job.pipes(),
            stdin_open: self.stdin.lock().expect("stdin").is_some(),
            facts: self.facts(),
            moving_to,
            arriving,
        }
    }

    /// Kills a copy that must not run (it was never let run) and removes its cgroup.
    pub(super) fn kill_and_clean(&self) {
        self.moving.store(true, Ordering::Relaxed);
        let _ = self.job.signal(Signal::SIGKILL);
        let _ = self.job.wait();
        if let Some(cgroup) = &self.cgroup {
            let _ = cgroup.remove();
        }
        self.unkeep();
    }

    /// The keeper lets go of the job: it ended here, left, or was killed.
    pub(super) fn unkeep(&self) {
        if let Some(keeper) = &self.keeper
            && let Err(error) = keeper.forget(&self.kept(None, false).id())
        {
            warn!(home_pid = self.home_pid, %error, "cannot tell the keeper the job is gone");
        }
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").field("home_pid", &self.home_pid).field("pid", &self.job.pid()).finish_non_exhaustive()
    }
}

/// Every process of the restored job runs as its owner and gained nothing by moving: the owner's uid and
/// gid (real, effective, saved, filesystem) and, for an ordinary user, no capabilities at all. The job's init
/// runs as the owner too, so the whole tree is checked.
pub(super) fn check_owner(root: i32, owner: Owner, groups: &[u32]) -> Result<(), String> {
    let pids = migratable::job_processes(root).map_err(|e| e.to_string())?;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
        identity_of(&status, owner, groups).map_err(|what| format!("process {pid} of the restored job {what}"))?;
    }
    Ok(())
}

/// Checks one `/proc/PID/status` against `owner` and its supplementary `groups` (see [`check_owner`]).
pub(super) fn identity_of(status: &str, owner: Owner, groups: &[u32]) -> Result<(), String> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let ids = |name: &str| -> Vec<u32> {
        field(name).map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect()).unwrap_or_default()
    };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    if uids.len() != 4 || uids.iter().any(|&u| u != owner.uid) {
        return Err(format!("runs as uids {uids:?}, not as its owner {}", owner.uid));
    }
    if gids.len() != 4 || gids.iter().any(|&g| g != owner.gid) {
        return Err(format!("runs with gids {gids:?}, not with its owner's group {}", owner.gid));
    }
    let mut has = ids("Groups:");
    let mut wanted = groups.to_vec();
    has.sort_unstable();
    wanted.sort_unstable();
    has.dedup();
    wanted.dedup();
    if has != wanted {
        return Err(format!("has supplementary groups {has:?}, not its owner's {wanted:?}"));
    }
    if owner.uid != 0 {
        for set in ["CapPrm:", "CapEff:", "CapAmb:"] {
            let caps = field(set).and_then(|v| u64::from_str_radix(v, 16).ok());
            if caps != Some(0) {
                return Err(format!("has capabilities ({set} {})", field(set).unwrap_or("?")));
            }
        }
    }
    Ok(())
}

impl Daemon {
    /// Waits for a job running here to end and reports its status, unless it ended because it moved.
    pub(super) fn wait_runner(&self, runner: &Runner, report: &Report) {
        let code = runner.job.wait().unwrap_or(255);
        runner.unkeep();
        // Ended here or left: either way nothing of it stays on this node.
        if let Some(cgroup) = &runner.cgroup {
            if let Ok(cpu) = cgroup.cpu_time() {
                info!(home_pid = runner.home_pid, cpu_seconds = cpu.as_secs_f64(), "job's CPU time on this node");
            }
            if let Err(error) = cgroup.remove() {
                warn!(home_pid = runner.home_pid, %error, "cannot remove the job's cgroup");
            }
        }
        if runner.moving.load(Ordering::Relaxed) {
            return;
        }
        for relay in runner.outputs.lock().expect("outputs").drain(..) {
            let _ = relay.join();
        }
        self.runners.lock().expect("runners").remove(&(runner.home_node, runner.home_pid));
        match report {
            Report::Home(home) => self.finish_home(home, Response::Exited { code }),
            Report::Link(link) => {
                runner.exited.store(true, Ordering::Relaxed);
                let _ = link.send_frame(protocol::EXIT, &serde_json::to_vec(&code).expect("json"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(uids: &str, gids: &str, groups: &str, caps: &str) -> String {
        format!(
            "Name:\tpython3\nUid:\t{uids}\nGid:\t{gids}\nGroups:\t{groups}\nCapInh:\t0000000000000000\n\
             CapPrm:\t{caps}\nCapEff:\t{caps}\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"
        )
    }

    #[test]
    fn a_restored_job_must_be_its_owner_with_nothing_gained() {
        let owner = Owner { uid: 1001, gid: 1001 };
        let none = "0000000000000000";
        assert_eq!(identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "27 1001 ", none), owner, &[1001, 27]), Ok(()));
        let setuid_root = identity_of(&status("1001\t0\t1001\t1001", "1001\t1001\t1001\t1001", "", none), owner, &[]);
        assert!(setuid_root.unwrap_err().contains("uids [1001, 0, 1001, 1001]"));
        let other_group = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t0\t1001", "", none), owner, &[]);
        assert!(other_group.unwrap_err().contains("gids"));
        let more_groups = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "0 27", none), owner, &[27]);
        assert!(more_groups.unwrap_err().contains("supplementary groups [0, 27]"));
        let caps = identity_of(&status("1001\t1001\t1001\t1001", "1001\t1001\t1001\t1001", "", "0000000000200000"), owner, &[]);
        assert!(caps.unwrap_err().contains("capabilities"));
        // Root's job keeps root's capabilities.
        let root = Owner { uid: 0, gid: 0 };
        assert_eq!(identity_of(&status("0\t0\t0\t0", "0\t0\t0\t0", "", "000001ffffffffff"), root, &[]), Ok(()));
        assert!(identity_of("garbage", owner, &[]).is_err());
    }
}
