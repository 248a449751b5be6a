//! cgroup v2: one tree for every controller. A cgroup is one directory; it has a controller's files only
//! when its parent lists that controller in `cgroup.subtree_control`, and (except the root) a cgroup that
//! lists controllers there may hold no processes itself.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Backend, Cgroup as Handle, CgroupError, CgroupPath, Controller, Version, append, controller_file, read,
    read_ids, read_or_empty, read_u64, subtree, write,
};

/// The unified hierarchy's mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// Where it is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
    pub(super) dir: PathBuf,
    /// The cgroup the mount shows at `dir` (`/` unless a container bind-mounted a subtree).
    pub(super) root: CgroupPath,
}

impl Mount {
    /// The controllers the hierarchy offers (its root's `cgroup.controllers`).
    pub(super) fn controllers(&self) -> Result<Vec<String>, CgroupError> {
        Ok(read(&self.dir.join("cgroup.controllers"))?.split_whitespace().map(str::to_owned).collect())
    }
}

/// A v2 cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cgroup {
    mount: Mount,
    path: CgroupPath,
    dir: PathBuf,
    /// v2 names of the controllers its parent is to give it (`cpu`, `cpuset`, ...), where offered.
    controllers: Vec<&'static str>,
}

impl Cgroup {
    pub(super) fn new(mount: &Mount, path: CgroupPath, controllers: &[Controller]) -> Result<Self, CgroupError> {
        let rel = path.relative_to(&mount.root).ok_or_else(|| CgroupError::NotVisible {
            path: path.clone(),
            mount: mount.dir.clone(),
            root: mount.root.clone(),
        })?;
        let dir = if rel.is_empty() { mount.dir.clone() } else { mount.dir.join(rel) };
        let mut names: Vec<&'static str> = Vec::new();
        for name in controllers.iter().filter_map(|c| c.v2_name()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Ok(Self { mount: mount.clone(), path, dir, controllers: names })
    }

    /// Its file `file`, which exists only with `controller` (`None`: in every cgroup), or why there is none.
    fn file(&self, controller: Option<Controller>, file: &str, attempt: &'static str) -> Result<PathBuf, CgroupError> {
        controller_file(self, &self.dir, file, controller, attempt)
    }

    /// Gives the children of `dir` the controllers this cgroup needs that `dir` has and does not pass on yet.
    fn enable_below(&self, dir: &Path) -> Result<(), CgroupError> {
        let offered = read_or_empty(&dir.join("cgroup.controllers"))?;
        let control = dir.join("cgroup.subtree_control");
        let enabled = read_or_empty(&control)?;
        let missing: Vec<&str> = self
            .controllers
            .iter()
            .copied()
            .filter(|c| offered.split_whitespace().any(|o| o == *c))
            .filter(|c| !enabled.split_whitespace().any(|e| e.trim_start_matches('+') == *c))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // The root cgroup of the hierarchy is exempt from the no-internal-process rule; a mount of a
        // subtree does not show the real root.
        let is_root = dir == self.mount.dir && self.mount.root.is_root();
        let pids = if is_root { Vec::new() } else { read_ids(&dir.join("cgroup.procs"))? };
        for controller in missing {
            if !pids.is_empty() {
                return Err(CgroupError::InnerProcesses {
                    path: dir.to_owned(),
                    controller: controller.to_owned(),
                    pids: pids.iter().map(|p| p.as_raw()).collect(),
                });
            }
            // One controller per write, so a refusal names the controller refused.
            append(&control, &format!("+{controller}\n")).map_err(|e| match e {
                CgroupError::Write { source, .. } if source.raw_os_error() == Some(super::EBUSY) => {
                    CgroupError::InnerProcesses {
                        path: dir.to_owned(),
                        controller: controller.to_owned(),
                        pids: Vec::new(),
                    }
                }
                e => e,
            })?;
        }
        Ok(())
    }
}

impl fmt::Display for Cgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path)
    }
}

impl Backend for Cgroup {
    fn version(&self) -> Version {
        Version::V2
    }

    fn path(&self) -> &CgroupPath {
        &self.path
    }

    fn dirs(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    fn controller_dir(&self, _: Controller) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn child(&self, name: &str) -> Result<Handle, CgroupError> {
        Ok(Handle::v2(Self {
            mount: self.mount.clone(),
            path: self.path.join(name)?,
            dir: self.dir.join(name),
            controllers: self.controllers.clone(),
        }))
    }

    fn create(&self) -> Result<(), CgroupError> {
        let rel = self.dir.strip_prefix(&self.mount.dir).expect("a cgroup's directory is under its mount");
        let mut dir = self.mount.dir.clone();
        for component in rel.components() {
            self.enable_below(&dir)?;
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        Ok(())
    }

    fn set_cpus(&self, list: &str) -> Result<(), CgroupError> {
        write(&self.file(Some(Controller::Cpuset), "cpuset.cpus", "set the CPUs")?, list)
    }

    fn set_memory_limit(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        let value = bytes.map_or_else(|| "max".to_owned(), |b| b.to_string());
        write(&self.file(Some(Controller::Memory), "memory.max", "set the memory limit")?, &value)
    }

    fn cpus(&self) -> Result<String, CgroupError> {
        // `cpuset.cpus` may be empty (take the parent's); the effective list is always filled in.
        let path = self.file(Some(Controller::Cpuset), "cpuset.cpus.effective", "read the CPUs")?;
        Ok(read(&path)?.trim().to_owned())
    }

    fn memory_current(&self) -> Result<u64, CgroupError> {
        read_u64(&self.file(Some(Controller::Memory), "memory.current", "read the memory usage")?)
    }

    fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let path = self.file(Some(Controller::Memory), "memory.max", "read the memory limit")?;
        let text = read(&path)?;
        match text.trim() {
            "max" => Ok(None),
            n => n.parse().map(Some).map_err(|e| CgroupError::Parse { path, reason: format!("{text:?}: {e}") }),
        }
    }

    fn cpu_time(&self) -> Result<Duration, CgroupError> {
        // Every v2 cgroup has cpu.stat's usage lines, with or without the cpu controller.
        let path = self.file(None, "cpu.stat", "read the CPU time")?;
        let text = read(&path)?;
        let usec = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| CgroupError::Parse { path: path.clone(), reason: "no usage_usec line".to_owned() })?;
        Ok(Duration::from_micros(usec))
    }

    fn threads_file(&self) -> &'static str {
        "cgroup.threads"
    }

    fn create_leaf(&self, leaf: &Handle) -> Result<(), CgroupError> {
        for dir in leaf.dirs() {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        Ok(())
    }

    fn kill_at_once(&self) -> Result<bool, CgroupError> {
        let kill = self.dir.join("cgroup.kill");
        if !kill.exists() {
            return Ok(false);
        }
        write(&kill, "1")?;
        Ok(true)
    }

    fn thaw(&self) {
        // Only needed without cgroup.kill (which kills frozen tasks too); best effort.
        for d in subtree(&self.dir).unwrap_or_default() {
            let freeze = d.join("cgroup.freeze");
            if read_or_empty(&freeze).is_ok_and(|s| s.trim() == "1") {
                let _ = write(&freeze, "0");
            }
        }
    }
}
