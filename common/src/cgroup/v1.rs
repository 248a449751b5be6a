//! cgroup v1: one hierarchy per controller (or per co-mounted group such as `cpu,cpuacct`), each its own
//! tree of directories. A cgroup is a directory at the same (or, for a process, its own) path in each
//! hierarchy it uses; a process joins it by writing its PID into every one of their `cgroup.procs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    Backend, Cgroup as Handle, CgroupError, CgroupPath, Controller, Version, controller_file, read,
    read_or_empty, read_u64, subtree, write,
};

/// v1's "no limit": the largest page counter times the page size (9223372036854771712 with 4 KiB pages).
/// Anything from 2^62 bytes up is read as unlimited, whatever the page size.
const UNLIMITED_FROM: u64 = 1 << 62;

/// One mounted v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// The controllers it carries (only those rmosix knows).
    pub(super) controllers: Vec<Controller>,
    /// Where it is mounted (`/sys/fs/cgroup/cpuset`).
    pub(super) dir: PathBuf,
    /// The cgroup the mount shows at `dir` (`/` unless a container bind-mounted a subtree).
    pub(super) root: CgroupPath,
}

impl Mount {
    /// Its controllers as `/proc/PID/cgroup` writes them (`cpu,cpuacct`), for messages.
    pub(super) fn name(&self) -> String {
        self.controllers.iter().map(|c| c.name()).collect::<Vec<_>>().join(",")
    }

    fn dir_of(&self, path: &CgroupPath) -> Result<PathBuf, CgroupError> {
        let rel = path.relative_to(&self.root).ok_or_else(|| CgroupError::NotVisible {
            path: path.clone(),
            mount: self.dir.clone(),
            root: self.root.clone(),
        })?;
        Ok(if rel.is_empty() { self.dir.clone() } else { self.dir.join(rel) })
    }
}

/// The cgroup's place in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    controllers: Vec<Controller>,
    /// The hierarchy's mount directory: where walking down to create the cgroup starts.
    mount: PathBuf,
    path: CgroupPath,
    dir: PathBuf,
}

/// A v1 cgroup: its place in each hierarchy used, in the order of the controllers asked for (cpuset first
/// for [`super::CONTROLLERS`], so its directory is the one listing the node's processes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cgroup {
    places: Vec<Place>,
}

impl Cgroup {
    /// The cgroup in the hierarchies carrying `controllers` (those not mounted are skipped), at the path
    /// `path_in` gives for each hierarchy.
    pub(super) fn new(
        mounts: &[Mount],
        controllers: &[Controller],
        mut path_in: impl FnMut(&Mount) -> Result<CgroupPath, CgroupError>,
    ) -> Result<Self, CgroupError> {
        let mut places: Vec<Place> = Vec::new();
        for c in controllers {
            let Some(mount) = mounts.iter().find(|m| m.controllers.contains(c)) else { continue };
            if places.iter().any(|p| p.mount == mount.dir) {
                continue;
            }
            let path = path_in(mount)?;
            places.push(Place {
                controllers: mount.controllers.clone(),
                mount: mount.dir.clone(),
                dir: mount.dir_of(&path)?,
                path,
            });
        }
        if places.is_empty() {
            return Err(CgroupError::MissingControllers {
                version: Version::V1,
                root: mounts.first().map_or_else(|| PathBuf::from("/sys/fs/cgroup"), |m| m.dir.clone()),
                missing: controllers.iter().map(|c| c.name()).collect::<Vec<_>>().join(", "),
                detail: "none of them is mounted".to_owned(),
            });
        }
        Ok(Self { places })
    }

    /// Its place in the hierarchy of `controller`.
    fn place_of(&self, controller: Controller) -> Option<&Place> {
        self.places.iter().find(|p| p.controllers.contains(&controller))
    }

    /// Its directory in the hierarchy of `controller`, or why there is none.
    fn dir_for(&self, controller: Controller, attempt: &'static str) -> Result<&Path, CgroupError> {
        self.place_of(controller)
            .map(|p| p.dir.as_path())
            .ok_or_else(|| CgroupError::NoController { cgroup: self.to_string(), controller, attempt })
    }

    /// Its file `file` of `controller`, or why there is none.
    fn file(&self, controller: Controller, file: &str, attempt: &'static str) -> Result<PathBuf, CgroupError> {
        controller_file(self, self.dir_for(controller, attempt)?, file, Some(controller), attempt)
    }
}

impl fmt::Display for Cgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = &self.places[0].path;
        if self.places.iter().all(|p| &p.path == first) {
            return write!(f, "{first}");
        }
        for (i, p) in self.places.iter().enumerate() {
            let names: Vec<&str> = p.controllers.iter().map(|c| c.name()).collect();
            write!(f, "{}{}:{}", if i == 0 { "" } else { " " }, names.join(","), p.path)?;
        }
        Ok(())
    }
}

impl Backend for Cgroup {
    fn version(&self) -> Version {
        Version::V1
    }

    fn path(&self) -> &CgroupPath {
        &self.places[0].path
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.places.iter().map(|p| p.dir.clone()).collect()
    }

    fn controller_dir(&self, controller: Controller) -> Option<PathBuf> {
        self.place_of(controller).map(|p| p.dir.clone())
    }

    fn child(&self, name: &str) -> Result<Handle, CgroupError> {
        let places = self
            .places
            .iter()
            .map(|p| {
                Ok(Place {
                    controllers: p.controllers.clone(),
                    mount: p.mount.clone(),
                    path: p.path.join(name)?,
                    dir: p.dir.join(name),
                })
            })
            .collect::<Result<_, CgroupError>>()?;
        Ok(Handle::v1(Self { places }))
    }

    fn create(&self) -> Result<(), CgroupError> {
        for place in &self.places {
            let rel = place.dir.strip_prefix(&place.mount).expect("a cgroup's directory is under its mount");
            let mut dir = place.mount.clone();
            for component in rel.components() {
                let parent = dir.clone();
                dir.push(component);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError::Create { path: dir, source }),
                }
                if place.controllers.contains(&Controller::Cpuset) {
                    // A new v1 cpuset has no CPUs and no memory nodes, and refuses tasks until it has both.
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        if read_or_empty(&dir.join(file))?.trim().is_empty() {
                            let inherited = read_or_empty(&parent.join(file))?;
                            write(&dir.join(file), inherited.trim())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn set_cpus(&self, list: &str) -> Result<(), CgroupError> {
        write(&self.file(Controller::Cpuset, "cpuset.cpus", "set the CPUs")?, list)
    }

    fn set_memory_limit(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        let value = bytes.map_or_else(|| "-1".to_owned(), |b| b.to_string());
        write(&self.file(Controller::Memory, "memory.limit_in_bytes", "set the memory limit")?, &value)
    }

    fn cpus(&self) -> Result<String, CgroupError> {
        // The effective list is what the parent lets it have; kernels before 4.7 only have the set one.
        let effective = self.file(Controller::Cpuset, "cpuset.effective_cpus", "read the CPUs");
        let path = match effective {
            Err(CgroupError::NoController { .. }) => self.file(Controller::Cpuset, "cpuset.cpus", "read the CPUs"),
            other => other,
        }?;
        Ok(read(&path)?.trim().to_owned())
    }

    fn memory_current(&self) -> Result<u64, CgroupError> {
        read_u64(&self.file(Controller::Memory, "memory.usage_in_bytes", "read the memory usage")?)
    }

    fn memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let limit = read_u64(&self.file(Controller::Memory, "memory.limit_in_bytes", "read the memory limit")?)?;
        Ok((limit < UNLIMITED_FROM).then_some(limit))
    }

    fn cpu_time(&self) -> Result<Duration, CgroupError> {
        Ok(Duration::from_nanos(read_u64(&self.file(Controller::Cpuacct, "cpuacct.usage", "read the CPU time")?)?))
    }

    fn threads_file(&self) -> &'static str {
        "tasks"
    }

    fn create_leaf(&self, leaf: &Handle) -> Result<(), CgroupError> {
        leaf.create()
    }

    fn kill_at_once(&self) -> Result<bool, CgroupError> {
        Ok(false)
    }

    fn thaw(&self) {
        // A task frozen by the v1 freezer does not die of SIGKILL until thawed; each cgroup below may have
        // been frozen on its own. Best effort: a failure shows as survivors.
        if let Ok(dir) = self.dir_for(Controller::Freezer, "thaw") {
            for d in subtree(dir).unwrap_or_default() {
                let state = d.join("freezer.state");
                if read_or_empty(&state).is_ok_and(|s| !s.trim().is_empty() && s.trim() != "THAWED") {
                    let _ = write(&state, "THAWED");
                }
            }
        }
    }
}
