//! The cgroups of rmosix: simulated nodes of the local test cluster, and (in migd) one cgroup per job.
//!
//! Linux has two cgroup hierarchies and hosts run three layouts of them. Debian 12, Ubuntu 22.04+ and RHEL 9
//! run only the unified hierarchy (v2: one tree at `/sys/fs/cgroup`, every controller in it); older hosts
//! and some VMs run v1 (one tree per controller at `/sys/fs/cgroup/<controller>`), often beside an empty
//! cgroup2 at `/sys/fs/cgroup/unified` ("hybrid"). The files differ (`memory.limit_in_bytes` against
//! `memory.max`, `tasks` against `cgroup.threads`, ...), and so do the rules (v2 forbids processes in a cgroup
//! whose children get controllers; v1 cpusets start empty). Everything else in rmosix names a cgroup by its
//! path from the root of the hierarchy ([`CgroupPath`], `/rmosix-local/node1`) and works through this
//! module, which chooses the hierarchy once ([`Hierarchy::detect`]) and knows its files.
//!
//! One implementation per version sits behind the same [`Cgroup`] type: `v1` (a directory in each controller
//! hierarchy used) and `v2` (one directory). [`JobCgroups`] is the per-job API migd uses. Every operation
//! takes its paths from the [`Hierarchy`], so unit tests run on fake trees in temporary directories, and the
//! privileged tests (in `tests/tests/cgroup.rs`) on this machine's real hierarchy.

mod v1;
mod v2;

use std::collections::BTreeSet;
use std::fmt;
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::{NodeId, mountinfo};

/// Where the host's mounts are listed; [`Hierarchy::detect`] reads it.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How long [`Cgroup::kill`] waits for the processes it killed to leave, and [`Cgroup::remove`] retries an
/// `rmdir` that fails while the last tasks exit. Killed tasks normally leave in milliseconds; a task in
/// uninterruptible sleep (D state, e.g. on a slow file system) can take longer.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two polls while processes leave a cgroup.
const POLL: Duration = Duration::from_millis(20);

/// A cgroup operation that failed. Each variant names the file or cgroup and what was attempted.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file, `/proc/PID/cgroup` or the mount table could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A value could not be written to a cgroup file (a limit, a CPU list, a PID moved into `cgroup.procs`).
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be made.
    #[error("cannot create cgroup directory {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be removed (still busy after the wait, or refused).
    #[error("cannot remove cgroup directory {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A cgroup directory could not be listed for its child cgroups.
    #[error("cannot list the child cgroups of {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file did not hold what the kernel writes there.
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// Text given as a cgroup path (configuration, `/proc/PID/cgroup`, a child name) is not one.
    #[error("{path:?} is not a cgroup path: {reason}")]
    BadPath { path: String, reason: &'static str },
    /// The mount table lists no cgroup file system at all.
    #[error("no cgroup hierarchy (cgroup or cgroup2 file system) is mounted according to {mountinfo}")]
    NotMounted { mountinfo: PathBuf },
    /// The chosen hierarchy lacks controllers something needs.
    #[error("{version} at {root}: the {missing} controller(s) are not available ({detail})")]
    MissingControllers { version: Version, root: PathBuf, missing: String, detail: String },
    /// The cgroup does not exist (in the hierarchy of this directory).
    #[error("cannot {attempt} in cgroup {cgroup}: {dir} does not exist")]
    Missing { cgroup: String, dir: PathBuf, attempt: &'static str },
    /// An operation needs a controller the cgroup is not in (v1: not mounted; v2: not enabled for it).
    #[error("cannot {attempt} in cgroup {cgroup}: it has no {controller} controller")]
    NoController { cgroup: String, controller: Controller, attempt: &'static str },
    /// A cgroup lies outside the part of a hierarchy this mount shows (a container's bind mount).
    #[error("cgroup {path} is outside the part of the hierarchy mounted at {mount} (which shows {root})")]
    NotVisible { path: CgroupPath, mount: PathBuf, root: CgroupPath },
    /// A process's cgroup list has no entry for a hierarchy we use.
    #[error("{origin} names no cgroup in the {hierarchy} hierarchy")]
    NotMember { origin: PathBuf, hierarchy: String },
    /// v2's "no internal processes" rule: controllers can't be enabled for the children of a cgroup that
    /// holds processes itself.
    #[error(
        "cannot enable the {controller} controller for the children of {path}: it holds processes {pids:?}, \
         and a cgroup-v2 cgroup that gives controllers to its children may hold none \
         (move them into a leaf child first: Hierarchy::delegate_self / Cgroup::vacate)"
    )]
    InnerProcesses { path: PathBuf, controller: String, pids: Vec<i32> },
    /// Killing, removing or emptying the root cgroup would take the whole machine with it.
    #[error("refusing to {attempt} the root cgroup {path}")]
    Root { path: PathBuf, attempt: &'static str },
    /// A process of the cgroup could not be signalled.
    #[error("cannot kill process {pid} of cgroup {path}: {source}")]
    Kill {
        pid: i32,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Processes were still in the cgroup after SIGKILL and the wait.
    #[error("processes {pids:?} of cgroup {path} are still there {waited:?} after SIGKILL")]
    Survivors { path: PathBuf, pids: Vec<i32>, waited: Duration },
    /// Processes kept arriving while a cgroup was being emptied into a child.
    #[error("cannot empty cgroup {path} into {leaf}: processes {pids:?} keep arriving")]
    NotVacated { path: PathBuf, leaf: PathBuf, pids: Vec<i32> },
}

/// The two cgroup hierarchies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// One hierarchy per controller (alone, or "hybrid" beside an unused cgroup2).
    V1,
    /// The unified hierarchy.
    V2,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V1 => "cgroup v1",
            Self::V2 => "cgroup v2",
        })
    }
}

/// A controller rmosix uses, by what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Controller {
    /// Which CPUs (and memory nodes) a node or job may run on: the test cluster shares the cores out this way.
    Cpuset,
    /// Memory limit and usage: what a node advertises, and what a job holds.
    Memory,
    /// CPU time used (v1 `cpuacct.usage`); on v2 the `cpu` controller, whose `cpu.stat` carries it.
    Cpuacct,
    /// CPU weight and bandwidth (v1 `cpu`, v2 `cpu`).
    Cpu,
    /// A bound on the tasks of a job, so a fork bomb stays inside its job.
    Pids,
    /// Freezing a job as a whole (v1 `freezer`; on v2 every cgroup has `cgroup.freeze`).
    Freezer,
}

/// The controllers rmosix puts its cgroups in: a node of the test cluster and every job under it. On v1,
/// those that are mounted; on v2, those the parent offers (`cpuacct` means v2's `cpu`, and `freezer` is
/// built into every v2 cgroup).
pub const CONTROLLERS: &[Controller] =
    &[Controller::Cpuset, Controller::Memory, Controller::Cpuacct, Controller::Pids, Controller::Freezer];

/// The controllers without which a node can't be simulated: its CPUs and its memory.
pub const REQUIRED: &[Controller] = &[Controller::Cpuset, Controller::Memory];

impl Controller {
    /// Every controller, in the order [`CONTROLLERS`] prefers.
    pub const ALL: [Self; 6] = [Self::Cpuset, Self::Memory, Self::Cpuacct, Self::Cpu, Self::Pids, Self::Freezer];

    /// Its name in cgroup v1 (mount options, `/proc/PID/cgroup`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cpuset => "cpuset",
            Self::Memory => "memory",
            Self::Cpuacct => "cpuacct",
            Self::Cpu => "cpu",
            Self::Pids => "pids",
            Self::Freezer => "freezer",
        }
    }

    /// Its name in cgroup v2's `cgroup.controllers`, or `None` when v2 has it in every cgroup (freezing).
    pub const fn v2_name(self) -> Option<&'static str> {
        match self {
            Self::Cpuset => Some("cpuset"),
            Self::Memory => Some("memory"),
            Self::Cpuacct | Self::Cpu => Some("cpu"),
            Self::Pids => Some("pids"),
            Self::Freezer => None,
        }
    }

    fn from_v1_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A cgroup's name: its path from the root of the hierarchy, such as `/rmosix-local/node1`. The same
/// name means the same cgroup on v1 (in each controller hierarchy) and v2, so configuration and callers
/// never hold `/sys/fs/cgroup/...` directories. Always absolute, normalized (no `.`, `..`, empty or trailing
/// components), and free of newlines, so it can be written into and read back from kernel files.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct CgroupPath(String);

impl CgroupPath {
    /// The root of the hierarchy.
    pub fn root() -> Self {
        Self("/".to_owned())
    }

    /// Parses and checks `path`; a trailing `/` is dropped.
    pub fn new(path: &str) -> Result<Self, CgroupError> {
        let bad = |reason| CgroupError::BadPath { path: path.to_owned(), reason };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(bad("it must start with `/`: it is a path from the root of the cgroup hierarchy"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Ok(Self::root());
        }
        for name in rest.split('/') {
            check_name(name).map_err(bad)?;
        }
        Ok(Self(format!("/{rest}")))
    }

    /// The child cgroup `name` of this one; `name` is one path component.
    pub fn join(&self, name: &str) -> Result<Self, CgroupError> {
        check_name(name).map_err(|reason| CgroupError::BadPath { path: name.to_owned(), reason })?;
        Ok(Self(if self.is_root() { format!("/{name}") } else { format!("{}/{name}", self.0) }))
    }

    /// The parent cgroup, `None` for the root.
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        let (parent, _) = self.0.rsplit_once('/').expect("absolute");
        Some(if parent.is_empty() { Self::root() } else { Self(parent.to_owned()) })
    }

    /// The last component (`node1` of `/rmosix-local/node1`); empty for the root.
    pub fn name(&self) -> &str {
        self.0.rsplit_once('/').map_or("", |(_, name)| name)
    }

    /// Whether this is the root of the hierarchy.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path below `ancestor` without a leading `/` (empty when equal), or `None` when this cgroup is not
    /// `ancestor` or below it. Maps a cgroup into a mount that shows only part of the hierarchy.
    pub fn relative_to(&self, ancestor: &Self) -> Option<&str> {
        if ancestor.is_root() {
            return Some(&self.0[1..]);
        }
        match self.0.strip_prefix(&ancestor.0)? {
            "" => Some(""),
            rest => rest.strip_prefix('/'),
        }
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("it has an empty component")
    } else if name == "." || name == ".." {
        Err("`.` and `..` are not allowed")
    } else if name.contains('/') {
        Err("a cgroup name can't contain `/`")
    } else if name.contains(['\n', '\0']) {
        Err("it contains a newline or NUL")
    } else {
        Ok(())
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for CgroupPath {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for CgroupPath {
    type Error = CgroupError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

/// The cgroups of one process, as `/proc/PID/cgroup` lists them: a path per v1 hierarchy (by its
/// controllers) and the path in the unified hierarchy. On v1 they differ per controller (a systemd host puts
/// a service in `memory:/system.slice/x.service` but `cpuset:/`), which is why a process's [`Cgroup`] is
/// built from all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessCgroups {
    origin: PathBuf,
    /// `(controllers, path)` per v1 hierarchy (named hierarchies such as `name=systemd` included).
    v1: Vec<(Vec<String>, CgroupPath)>,
    /// The `0::PATH` line.
    unified: Option<CgroupPath>,
}

impl ProcessCgroups {
    /// The cgroups of process `pid`.
    pub fn read(pid: Pid) -> Result<Self, CgroupError> {
        Self::read_file(&PathBuf::from(format!("/proc/{pid}/cgroup")))
    }

    /// The cgroups of the calling process.
    pub fn of_self() -> Result<Self, CgroupError> {
        Self::read_file(Path::new("/proc/self/cgroup"))
    }

    fn read_file(path: &Path) -> Result<Self, CgroupError> {
        Self::parse(&read(path)?, path)
    }

    /// Parses the text of a `/proc/PID/cgroup` file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, CgroupError> {
        let bad = |reason: String| CgroupError::Parse { path: origin.to_owned(), reason };
        let mut v1 = Vec::new();
        let mut unified = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad(format!("{line:?} is not ID:CONTROLLERS:PATH")));
            };
            id.parse::<u32>().map_err(|_| bad(format!("{line:?}: bad hierarchy id")))?;
            // A cgroup removed while the process is still in it (possible on v1) reads as "PATH (deleted)".
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            let path = CgroupPath::new(path).map_err(|e| bad(format!("{line:?}: {e}")))?;
            if id == "0" && controllers.is_empty() {
                unified = Some(path);
            } else {
                v1.push((controllers.split(',').map(str::to_owned).collect(), path));
            }
        }
        Ok(Self { origin: origin.to_owned(), v1, unified })
    }

    /// The process's cgroup in the v1 hierarchy that carries `controller`.
    pub fn v1(&self, controller: Controller) -> Option<&CgroupPath> {
        self.v1.iter().find(|(names, _)| names.iter().any(|n| n == controller.name())).map(|(_, path)| path)
    }

    /// The process's cgroup in the unified (v2) hierarchy.
    pub fn unified(&self) -> Option<&CgroupPath> {
        self.unified.as_ref()
    }
}

/// The host's cgroup hierarchy: its version and where it is mounted. Chosen once; every [`Cgroup`] made
/// from it carries its directories, so the rest of rmosix never looks at mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy(Layout);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    V1(Vec<v1::Mount>),
    V2(v2::Mount),
}

fn parse_mountinfo(text: &str, origin: &Path) -> Result<Vec<mountinfo::Mount>, CgroupError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            mountinfo::parse_line(line)
                .ok_or_else(|| CgroupError::Parse { path: origin.to_owned(), reason: format!("bad mount line {line:?}") })
        })
        .collect()
}

impl Hierarchy {
    /// This host's hierarchy, from [`MOUNTINFO`].
    pub fn detect() -> Result<Self, CgroupError> {
        let path = Path::new(MOUNTINFO);
        Self::from_mountinfo(&read(path)?, Path::new("/")).map_err(|e| match e {
            CgroupError::NotMounted { .. } => CgroupError::NotMounted { mountinfo: path.to_owned() },
            e => e,
        })
    }

    /// The hierarchy a mount table describes, its mount points taken under `root` (`/` for the host, a
    /// temporary directory for a test). v1 wins when a v1 hierarchy carries the cpuset or memory
    /// controller, as on hybrid hosts whose cgroup2 at `/sys/fs/cgroup/unified` has none of them; otherwise
    /// the cgroup2 mount at `/sys/fs/cgroup` (or the first cgroup2 mount) is used.
    pub fn from_mountinfo(text: &str, root: &Path) -> Result<Self, CgroupError> {
        let origin = Path::new("mountinfo");
        let under_root = |point: &str| root.join(point.trim_start_matches('/'));
        let mut v1 = Vec::<v1::Mount>::new();
        let mut v2 = Vec::new();
        for m in parse_mountinfo(text, origin)? {
            // Only a cgroup mount's root is a cgroup path (an nsfs mount's is `net:[4026532251]`).
            let mount_root = || {
                CgroupPath::new(&m.root)
                    .map_err(|e| CgroupError::Parse { path: origin.to_owned(), reason: e.to_string() })
            };
            match m.fstype.as_str() {
                "cgroup" => {
                    let controllers: Vec<Controller> =
                        m.super_options.split(',').filter_map(Controller::from_v1_name).collect();
                    // A hierarchy mounted twice (bind mounts) is used through its first mount.
                    let known = controllers.iter().any(|c| v1.iter().any(|mount| mount.controllers.contains(c)));
                    if !controllers.is_empty() && !known {
                        v1.push(v1::Mount { controllers, dir: under_root(&m.point), root: mount_root()? });
                    }
                }
                "cgroup2" => v2.push((m.point.clone(), v2::Mount { dir: under_root(&m.point), root: mount_root()? })),
                _ => {}
            }
        }
        let v1_has = |c| v1.iter().any(|m| m.controllers.contains(&c));
        if v1_has(Controller::Cpuset) || v1_has(Controller::Memory) {
            return Ok(Self(Layout::V1(v1)));
        }
        let preferred = v2.iter().position(|(point, _)| point == "/sys/fs/cgroup").unwrap_or(0);
        if v2.is_empty() {
            if v1.is_empty() {
                return Err(CgroupError::NotMounted { mountinfo: origin.to_owned() });
            }
            return Ok(Self(Layout::V1(v1)));
        }
        Ok(Self(Layout::V2(v2.swap_remove(preferred).1)))
    }

    /// A v1 hierarchy whose controllers are mounted at the given directories, each showing the whole tree:
    /// for tests on fake trees, and for hosts whose mounts are known.
    pub fn v1(mounts: impl IntoIterator<Item = (PathBuf, Vec<Controller>)>) -> Self {
        Self(Layout::V1(
            mounts
                .into_iter()
                .map(|(dir, controllers)| v1::Mount { controllers, dir, root: CgroupPath::root() })
                .collect(),
        ))
    }

    /// The unified hierarchy mounted at `dir`, showing the whole tree: for tests, and to use a hybrid
    /// host's `/sys/fs/cgroup/unified`.
    pub fn v2(dir: impl Into<PathBuf>) -> Self {
        Self(Layout::V2(v2::Mount { dir: dir.into(), root: CgroupPath::root() }))
    }

    /// Which hierarchy this is.
    pub fn version(&self) -> Version {
        match self.0 {
            Layout::V1(_) => Version::V1,
            Layout::V2(_) => Version::V2,
        }
    }

    /// The directory of its root (v1: of the first hierarchy mounted), for messages.
    pub fn root_dir(&self) -> &Path {
        match &self.0 {
            Layout::V1(mounts) => {
                mounts.first().map_or(Path::new("/sys/fs/cgroup"), |m| m.dir.parent().unwrap_or(&m.dir))
            }
            Layout::V2(mount) => &mount.dir,
        }
    }

    /// The controllers it offers: v1, those mounted; v2, those in the root's `cgroup.controllers` (plus
    /// the freezer every v2 cgroup has).
    pub fn available(&self) -> Result<Vec<Controller>, CgroupError> {
        match &self.0 {
            Layout::V1(mounts) => {
                Ok(Controller::ALL.into_iter().filter(|c| mounts.iter().any(|m| m.controllers.contains(c))).collect())
            }
            Layout::V2(mount) => {
                let offered = mount.controllers()?;
                Ok(Controller::ALL
                    .into_iter()
                    .filter(|c| c.v2_name().is_none_or(|name| offered.iter().any(|o| o == name)))
                    .collect())
            }
        }
    }

    /// Fails, naming what is missing and where it was looked for, unless every controller of `needed` is
    /// available.
    pub fn require(&self, needed: &[Controller]) -> Result<(), CgroupError> {
        let available = self.available()?;
        let missing: Vec<&str> = needed.iter().filter(|c| !available.contains(c)).map(|c| c.name()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let detail = match &self.0 {
            Layout::V1(mounts) => format!(
                "no cgroup-v1 hierarchy in {MOUNTINFO} carries them; mounted: {}",
                mounts
                    .iter()
                    .map(|m| m.dir.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Layout::V2(mount) => format!(
                "{} offers only {:?}",
                mount.dir.join("cgroup.controllers").display(),
                mount.controllers()?.join(" ")
            ),
        };
        Err(CgroupError::MissingControllers {
            version: self.version(),
            root: self.root_dir().to_owned(),
            missing: missing.join(", "),
            detail,
        })
    }

    /// The cgroup `path` in the hierarchies of `controllers` (v1: one directory per hierarchy mounted that
    /// carries any of them; v2: one directory, and the controllers it gets from its parent when created).
    /// Nothing is created or checked on disk.
    pub fn cgroup(&self, path: &CgroupPath, controllers: &[Controller]) -> Result<Cgroup, CgroupError> {
        match &self.0 {
            Layout::V1(mounts) => v1::Cgroup::new(mounts, controllers, |_| Ok(path.clone())).map(Cgroup::v1),
            Layout::V2(mount) => Ok(Cgroup::v2(v2::Cgroup::new(mount, path.clone(), controllers)?)),
        }
    }

    /// The cgroup a process is in, for `controllers`: on v1 its own path in each hierarchy.
    pub fn cgroup_of(&self, process: &ProcessCgroups, controllers: &[Controller]) -> Result<Cgroup, CgroupError> {
        let not_member = |hierarchy: String| CgroupError::NotMember { origin: process.origin.clone(), hierarchy };
        match &self.0 {
            Layout::V1(mounts) => v1::Cgroup::new(mounts, controllers, |mount| {
                mount
                    .controllers
                    .iter()
                    .find_map(|&c| process.v1(c))
                    .cloned()
                    .ok_or_else(|| not_member(mount.name()))
            })
            .map(Cgroup::v1),
            Layout::V2(mount) => {
                let path = process.unified().ok_or_else(|| not_member("unified".to_owned()))?;
                Ok(Cgroup::v2(v2::Cgroup::new(mount, path.clone(), controllers)?))
            }
        }
    }

    /// The calling process's own cgroup, made ready to be the parent of job cgroups, the way systemd-style
    /// services do it: on v2 a cgroup whose children get controllers may hold no processes, so every
    /// process in it (the daemon and whatever it started) first moves into its child `leaf` (say
    /// `supervisor`); on v1, and in the root cgroup (exempt from the rule), nothing moves. migd calls this
    /// once at start, then creates [`JobCgroups`] under the returned cgroup. Under systemd on v2 the
    /// service needs `Delegate=yes`, so systemd leaves the subtree to it.
    pub fn delegate_self(&self, controllers: &[Controller], leaf: &str) -> Result<Cgroup, CgroupError> {
        let own = self.cgroup_of(&ProcessCgroups::of_self()?, controllers)?;
        if self.version() == Version::V2 && !own.path().is_root() {
            own.vacate(leaf)?;
        }
        Ok(own)
    }
}

/// One cgroup as rmosix uses it: on v2 one directory; on v1 a directory in each controller hierarchy it
/// uses (possibly at different paths, for a process's cgroup). Made by [`Hierarchy::cgroup`],
/// [`Hierarchy::cgroup_of`] or [`Cgroup::child`]; nothing exists on disk until [`Cgroup::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup(Imp);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Imp {
    V1(v1::Cgroup),
    V2(v2::Cgroup),
}

/// What each version implements; [`Cgroup`] forwards to it.
trait Backend: fmt::Display {
    fn version(&self) -> Version;
    fn path(&self) -> &CgroupPath;
    fn dirs(&self) -> Vec<PathBuf>;
    fn controller_dir(&self, controller: Controller) -> Option<PathBuf>;
    fn child(&self, name: &str) -> Result<Cgroup, CgroupError>;
    fn create(&self) -> Result<(), CgroupError>;
    fn set_cpus(&self, list: &str) -> Result<(), CgroupError>;
    fn set_memory_limit(&self, bytes: Option<u64>) -> Result<(), CgroupError>;
    fn cpus(&self) -> Result<String, CgroupError>;
    fn memory_current(&self) -> Result<u64, CgroupError>;
    fn memory_limit(&self) -> Result<Option<u64>, CgroupError>;
    fn cpu_time(&self) -> Result<Duration, CgroupError>;
    /// The file listing threads in each directory (`tasks`, `cgroup.threads`).
    fn threads_file(&self) -> &'static str;
    /// Makes `leaf` exist without giving it controllers (v2: that would need this cgroup empty first).
    fn create_leaf(&self, leaf: &Cgroup) -> Result<(), CgroupError>;
    /// Kills every process of the subtree once (v2: `cgroup.kill`); `false` when the version can't.
    fn kill_at_once(&self) -> Result<bool, CgroupError>;
    /// Lets frozen tasks run so they can die.
    fn thaw(&self);
}

impl Cgroup {
    fn v1(c: v1::Cgroup) -> Self {
        Self(Imp::V1(c))
    }

    fn v2(c: v2::Cgroup) -> Self {
        Self(Imp::V2(c))
    }

    fn backend(&self) -> &dyn Backend {
        match &self.0 {
            Imp::V1(c) => c,
            Imp::V2(c) => c,
        }
    }

    /// Its hierarchy's version.
    pub fn version(&self) -> Version {
        self.backend().version()
    }

    /// Its path from the root of the hierarchy (on v1, in its first hierarchy: for a process's cgroup the
    /// others may differ, which `Display` shows).
    pub fn path(&self) -> &CgroupPath {
        self.backend().path()
    }

    /// Its directories: one on v2, one per hierarchy on v1. What a process joins through
    /// `<dir>/cgroup.procs`.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.backend().dirs()
    }

    /// The directory holding its files of `controller` (v1: in that controller's hierarchy; v2: its one
    /// directory), for a caller reading a file this module does not know (`memory.stat`, ...). `None` on v1
    /// when the controller is not among its hierarchies.
    pub fn controller_dir(&self, controller: Controller) -> Option<PathBuf> {
        self.backend().controller_dir(controller)
    }

    /// The directory whose `cgroup.procs` lists the processes placed directly in it (v1: its cpuset
    /// directory when it has one). Processes of child cgroups are not listed there: [`Cgroup::procs`]
    /// gathers the whole subtree.
    pub fn procs_dir(&self) -> PathBuf {
        self.dirs().swap_remove(0)
    }

    /// The `cgroup.procs` files a process is written into to join this cgroup: one per hierarchy on v1, one
    /// on v2. Writing `0` moves the writer itself (how a child joins between fork and exec).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs().into_iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The child cgroup `name`, in the same hierarchies (not created).
    pub fn child(&self, name: &str) -> Result<Self, CgroupError> {
        self.backend().child(name)
    }

    /// Whether it exists (in any of its hierarchies).
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.is_dir())
    }

    /// Creates it and its missing ancestors; an existing cgroup is kept. v1: in each hierarchy, with the
    /// cpuset's `cpuset.cpus` and `cpuset.mems` copied from the parent where empty (a v1 cpuset starts empty
    /// and takes no tasks until both are set). v2: the controllers it needs are enabled in each ancestor's
    /// `cgroup.subtree_control`, which the kernel refuses while that ancestor (other than the root) holds
    /// processes ([`CgroupError::InnerProcesses`]).
    pub fn create(&self) -> Result<(), CgroupError> {
        self.backend().create()
    }

    /// Restricts it to the CPUs of `list` (`0-3,8`): v1 and v2 `cpuset.cpus`.
    pub fn set_cpus(&self, list: &str) -> Result<(), CgroupError> {
        self.backend().set_cpus(list)
    }

    /// Limits its memory to `bytes`, or lifts the limit (`None`): v1 `memory.limit_in_bytes`, v2 `memory.max`.
    pub fn set_memory_limit(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        self.backend().set_memory_limit(bytes)
    }

    /// The CPUs its tasks may run on, as a list such as `0-3,8` (the effective list: what the parent
    /// allows, and on v2 the parent's when none is set).
    pub fn cpus(&self) -> Result<String, CgroupError> {
        self.backend().cpus()
    }

    /// How many CPUs its tasks may run on.
    pub fn cpu_count(&self) -> Result<u32, CgroupError> {
        let list = self.cpus()?;
        count_cpus(&list).ok_or_else(|| CgroupError::Parse {
            path: self.procs_dir().join("cpuset.cpus"),
            reason: format!("bad CPU list {list:?}"),
        })
    }

    /// Memory its tasks use now, bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        self.backend().memory_current()
    }

    /// Its memory limit in bytes, `None` when unlimited (v1's huge default, v2's `max`).
    pub fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        self.backend().memory_limit()
    }

    /// CPU time its tasks (and their descendants) have used: v1 `cpuacct.usage` (needs the cpuacct
    /// hierarchy), v2 `cpu.stat`'s `usage_usec` (in every v2 cgroup).
    pub fn cpu_time(&self) -> Result<Duration, CgroupError> {
        self.backend().cpu_time()
    }

    /// Every process in it and its child cgroups (on v1, in any of its hierarchies).
    pub fn procs(&self) -> Result<Vec<Pid>, CgroupError> {
        ids(&self.dirs(), "cgroup.procs")
    }

    /// Every thread in it and its child cgroups: v1 `tasks`, v2 `cgroup.threads`. What a node's load counts.
    pub fn threads(&self) -> Result<Vec<Pid>, CgroupError> {
        ids(&self.dirs(), self.backend().threads_file())
    }

    /// Names of its child cgroups (on v1, in any of its hierarchies).
    pub fn children(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = BTreeSet::new();
        for dir in self.dirs() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::List { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| CgroupError::List { path: dir.clone(), source })?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Moves every process of this cgroup into its child `leaf` (created when missing, with no controllers
    /// of its own) and returns the child. v2 needs this before the cgroup can give controllers to children
    /// (see [`Hierarchy::delegate_self`]).
    pub fn vacate(&self, leaf: &str) -> Result<Self, CgroupError> {
        if self.path().is_root() {
            return Err(CgroupError::Root { path: self.procs_dir(), attempt: "empty" });
        }
        let child = self.child(leaf)?;
        self.backend().create_leaf(&child)?;
        // New processes may be forked while we move: a few rounds until none is left.
        let mut moved = Vec::new();
        for _ in 0..50 {
            moved.clear();
            for (from, to) in self.dirs().iter().zip(child.dirs()) {
                let procs = from.join("cgroup.procs");
                let pids = read_ids(&procs)?;
                let to = to.join("cgroup.procs");
                for pid in pids {
                    match write(&to, &pid.to_string()) {
                        Ok(()) => moved.push(pid.as_raw()),
                        // Gone meanwhile.
                        Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(ESRCH) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if moved.is_empty() {
                return Ok(child);
            }
        }
        Err(CgroupError::NotVacated { path: self.procs_dir(), leaf: child.procs_dir(), pids: moved })
    }

    /// Kills every process in it and its child cgroups and waits until they are gone: v2's `cgroup.kill`
    /// when the kernel has it (5.14+: no fork escapes it), else SIGKILL to each listed process, again until
    /// none is left; frozen tasks are thawed so they can die. Killed children of the caller become zombies
    /// that are no longer listed; reaping them is left to the caller, whose exit statuses they are.
    pub fn kill(&self) -> Result<(), CgroupError> {
        if self.path().is_root() {
            return Err(CgroupError::Root { path: self.procs_dir(), attempt: "kill" });
        }
        if !self.exists() {
            return Ok(());
        }
        self.backend().kill_at_once()?;
        let start = Instant::now();
        loop {
            let pids = self.procs()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > SETTLE_TIMEOUT {
                return Err(CgroupError::Survivors {
                    path: self.procs_dir(),
                    pids: pids.iter().map(|p| p.as_raw()).collect(),
                    waited: start.elapsed(),
                });
            }
            for pid in pids {
                match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                    Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                    Err(source) => return Err(CgroupError::Kill { pid: pid.as_raw(), path: self.procs_dir(), source }),
                }
            }
            self.backend().thaw();
            std::thread::sleep(POLL);
        }
    }

    /// Removes it and its child cgroups (children first), in every hierarchy, retrying while the last
    /// tasks exit; a cgroup already gone is fine. Processes still inside make it fail after the wait:
    /// [`Cgroup::kill`] first.
    pub fn remove(&self) -> Result<(), CgroupError> {
        if self.path().is_root() {
            return Err(CgroupError::Root { path: self.procs_dir(), attempt: "remove" });
        }
        for dir in self.dirs() {
            remove_tree(&dir)?;
        }
        Ok(())
    }
}

impl fmt::Display for Cgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.backend().fmt(f)
    }
}

/// The prefix of every job cgroup's name, so [`JobCgroups::remove_stale`] finds leftovers.
pub const JOB_PREFIX: &str = "job-";

/// The cgroup of one job on the node where it runs, under migd's own cgroup: what migd places a started or
/// restored job in, measures it by (CPU time, memory), and kills and removes when the job leaves or ends.
/// On v1 it spans every controller of [`CONTROLLERS`] that is mounted; on v2 it is one directory with the
/// parent's cpu, cpuset, memory and pids controllers. Dropping it leaves the cgroup alone: migd decides
/// when a job is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCgroups {
    cgroup: Cgroup,
}

impl JobCgroups {
    /// The cgroup name of a job, from what identifies it across the cluster: `job-<home node>-<home pid>`.
    pub fn name(home_node: NodeId, home_pid: u32) -> String {
        format!("{JOB_PREFIX}{home_node}-{home_pid}")
    }

    /// Creates (or reuses, after a restart) the job cgroup `name` under `parent`, migd's own cgroup as
    /// [`Hierarchy::delegate_self`] returns it.
    pub fn create(parent: &Cgroup, name: &str) -> Result<Self, CgroupError> {
        let cgroup = parent.child(name)?;
        cgroup.create()?;
        Ok(Self { cgroup })
    }

    /// The job cgroup `name` under `parent`, as it is on disk (a restarted migd finding its jobs).
    pub fn open(parent: &Cgroup, name: &str) -> Result<Self, CgroupError> {
        Ok(Self { cgroup: parent.child(name)? })
    }

    /// The cgroup itself, for anything not covered here.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The `cgroup.procs` files the job's first process (or the restoring criu) writes itself into: see
    /// [`Cgroup::procs_files`]; `checkpoint::job::Placement` opens them.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.cgroup.procs_files()
    }

    /// CPU time the job has used on this node.
    pub fn cpu_time(&self) -> Result<Duration, CgroupError> {
        self.cgroup.cpu_time()
    }

    /// Memory the job holds on this node, bytes.
    pub fn memory_current(&self) -> Result<u64, CgroupError> {
        self.cgroup.memory_current()
    }

    /// Every process of the job on this node.
    pub fn procs(&self) -> Result<Vec<Pid>, CgroupError> {
        self.cgroup.procs()
    }

    /// Kills whatever is left of the job here (the frozen copy of a job that moved away, the rest of one
    /// that ended) and removes its cgroup.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.cgroup.kill()?;
        self.cgroup.remove()
    }

    /// After a crash: removes the child cgroups of `parent` named `prefix...` (normally [`JOB_PREFIX`])
    /// that hold no process and are at least `min_age` old, and returns their names. Cgroups with
    /// processes are jobs still running and are left for the caller to adopt or kill; young empty ones may
    /// be another daemon's, just made (several migds share a parent on one machine on cgroup v1).
    pub fn remove_stale(parent: &Cgroup, prefix: &str, min_age: Duration) -> Result<Vec<String>, CgroupError> {
        let old_enough = |child: &Cgroup| {
            child.dirs().first().and_then(|d| std::fs::metadata(d).ok()).and_then(|m| m.modified().ok())
                .is_some_and(|t| t.elapsed().is_ok_and(|age| age >= min_age))
        };
        let mut removed = Vec::new();
        for name in parent.children()?.into_iter().filter(|n| n.starts_with(prefix)) {
            let child = parent.child(&name)?;
            if child.procs()?.is_empty() && old_enough(&child) {
                child.remove()?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

/// Counts the CPUs in a list such as `0-3,8,10-11`; `None` when it is not one. An empty list has 0.
pub fn count_cpus(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += if let Some((a, b)) = part.split_once('-') {
            let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
            b.checked_sub(a)? + 1
        } else {
            part.parse::<u32>().ok()?;
            1
        };
    }
    Some(n)
}

/// The CPUs of a list such as `0-3,8`, in order; `None` when it is not one.
pub fn parse_cpus(list: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_owned(), source })
}

/// Reads a file that a fake tree (or a cgroup being removed) may lack: missing reads as empty.
fn read_or_empty(path: &Path) -> Result<String, CgroupError> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(String::new()),
        other => other.map_err(|source| CgroupError::Read { path: path.to_owned(), source }),
    }
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.trim().parse().map_err(|e| CgroupError::Parse { path: path.to_owned(), reason: format!("{text:?}: {e}") })
}

/// One write of `value`, as the kernel wants cgroup files written.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// Appends `value` (for `cgroup.subtree_control`, where each write is one change and the kernel ignores the
/// offset; on a fake tree the writes pile up for the test to see).
fn append(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write { path: path.to_owned(), value: value.to_owned(), source };
    let mut file = std::fs::OpenOptions::new().append(true).create(true).open(path).map_err(err)?;
    file.write_all(value.as_bytes()).map_err(err)
}

/// The file `file` of the cgroup directory `dir`, for `attempt`. A missing directory means the cgroup does
/// not exist; a missing file, that it lacks `controller` (`None`: a file every cgroup has). Either is said
/// so, rather than "no such file".
fn controller_file(
    cgroup: &dyn Backend,
    dir: &Path,
    file: &str,
    controller: Option<Controller>,
    attempt: &'static str,
) -> Result<PathBuf, CgroupError> {
    if !dir.is_dir() {
        return Err(CgroupError::Missing { cgroup: cgroup.to_string(), dir: dir.to_owned(), attempt });
    }
    let path = dir.join(file);
    match controller {
        Some(controller) if !path.exists() => {
            Err(CgroupError::NoController { cgroup: cgroup.to_string(), controller, attempt })
        }
        _ => Ok(path),
    }
}

/// PIDs (or TIDs) in a `cgroup.procs`-like file; a missing file (a cgroup gone meanwhile) has none.
fn read_ids(path: &Path) -> Result<Vec<Pid>, CgroupError> {
    read_or_empty(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim().parse().map(Pid::from_raw).map_err(|_| CgroupError::Parse {
                path: path.to_owned(),
                reason: format!("{l:?} is not a process id"),
            })
        })
        .collect()
}

/// `dir` and every cgroup directory below it; nothing when `dir` is gone.
fn subtree(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(source) => return Err(CgroupError::List { path: d, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| CgroupError::List { path: d.clone(), source })?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// The ids in `file` of every directory of the subtrees of `dirs`, without repeats.
fn ids(dirs: &[PathBuf], file: &str) -> Result<Vec<Pid>, CgroupError> {
    let mut all = BTreeSet::new();
    for dir in dirs {
        for d in subtree(dir)? {
            all.extend(read_ids(&d.join(file))?.into_iter().map(Pid::as_raw));
        }
    }
    Ok(all.into_iter().map(Pid::from_raw).collect())
}

/// Removes a cgroup directory and its child cgroups, deepest first; `rmdir` is retried while it is busy
/// (tasks that were killed still exiting).
fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let mut dirs = subtree(dir)?;
    // Children come after their parent in a depth-first listing; deepest paths first removes them first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let start = Instant::now();
        loop {
            match std::fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(EBUSY) && start.elapsed() < SETTLE_TIMEOUT => {
                    std::thread::sleep(POLL);
                }
                Err(source) => return Err(CgroupError::Remove { path: d, source }),
            }
        }
    }
    Ok(())
}

/// The errno of a busy cgroup: processes inside (rmdir), or v2's no-internal-process rule.
const EBUSY: i32 = nix::errno::Errno::EBUSY as i32;
/// The errno of a process that is gone.
const ESRCH: i32 = nix::errno::Errno::ESRCH as i32;

#[cfg(test)]
mod tests;
