//! Where a node's load and memory are read.
//!
//! A real host reads `/proc`; a simulated node of the local test cluster reads its own cgroup (its tasks and
//! CPUs, its memory limit and usage, through [`rmosix_common::cgroup`], on cgroup v1 or v2), so several nodes
//! on one machine each see their own load. Both sit behind [`ResourceView`], which is also what unit tests
//! fake.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rmosix_common::cgroup::{self, CgroupError, CgroupPath, Hierarchy};

/// Reading the node's resources failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
}

/// The node's resources.
pub trait ResourceView: Send {
    /// Tasks running or ready to run on the node right now, not counting infod itself.
    fn runnable(&mut self) -> Result<f64, ResourceError>;
    /// CPUs the node's jobs may use.
    fn cpus(&mut self) -> Result<u32, ResourceError>;
    /// `(free, total)` bytes of memory.
    fn memory(&mut self) -> Result<(u64, u64), ResourceError>;
}

fn read(path: &Path) -> Result<String, ResourceError> {
    std::fs::read_to_string(path).map_err(|source| ResourceError::Read { path: path.to_owned(), source })
}

fn parse_err(path: &Path, reason: impl Into<String>) -> ResourceError {
    ResourceError::Parse { path: path.to_owned(), reason: reason.into() }
}

/// The whole machine, from `/proc`.
#[derive(Debug, Default)]
pub struct Host;

impl ResourceView for Host {
    fn runnable(&mut self) -> Result<f64, ResourceError> {
        let path = Path::new("/proc/loadavg");
        let text = read(path)?;
        // "0.10 0.05 0.01 2/345 6789": the fourth field is runnable/total scheduling entities.
        let running = text
            .split_whitespace()
            .nth(3)
            .and_then(|f| f.split('/').next())
            .and_then(|r| r.parse::<u32>().ok())
            .ok_or_else(|| parse_err(path, "no runnable/total field"))?;
        // infod is running while it reads the file.
        Ok(f64::from(running.saturating_sub(1)))
    }

    fn cpus(&mut self) -> Result<u32, ResourceError> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).map_err(|e| {
            ResourceError::Read { path: "sched_getaffinity".into(), source: e.into() }
        })?;
        let n = (0..nix::sched::CpuSet::count()).filter(|&i| set.is_set(i).unwrap_or(false)).count();
        Ok(u32::try_from(n).unwrap_or(u32::MAX).max(1))
    }

    fn memory(&mut self) -> Result<(u64, u64), ResourceError> {
        meminfo()
    }
}

fn meminfo() -> Result<(u64, u64), ResourceError> {
    let path = Path::new("/proc/meminfo");
    let text = read(path)?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| parse_err(path, format!("no {name} line")))
    };
    let total = field("MemTotal:")?;
    let free = field("MemAvailable:")?;
    Ok((free.min(total), total))
}

/// One simulated node: its cgroup, in the cpuset and memory controllers (v1) or the unified hierarchy (v2).
#[derive(Debug)]
pub struct Cgroup {
    cgroup: cgroup::Cgroup,
}

impl Cgroup {
    /// The node whose cgroup this is.
    pub fn new(cgroup: cgroup::Cgroup) -> Self {
        Self { cgroup }
    }

    /// The node whose cgroup is `path` in this host's hierarchy (v1 or v2). It must exist with its CPUs
    /// and memory, so a wrong path stops infod at start rather than at every measurement.
    pub fn open(path: &CgroupPath) -> Result<Self, CgroupError> {
        let hierarchy = Hierarchy::detect()?;
        hierarchy.require(cgroup::REQUIRED)?;
        let cgroup = hierarchy.cgroup(path, cgroup::REQUIRED)?;
        cgroup.cpus()?;
        cgroup.memory_limit()?;
        Ok(Self { cgroup })
    }
}

/// State letter of a task from its `/proc/.../stat` line (the field after the parenthesised command name).
pub fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

impl ResourceView for Cgroup {
    fn runnable(&mut self) -> Result<f64, ResourceError> {
        // Every thread of the node, jobs in their own child cgroups included.
        let tasks = self.cgroup.threads()?;
        let own: HashSet<i32> = std::fs::read_dir("/proc/self/task")
            .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        let running = tasks
            .iter()
            .filter(|tid| !own.contains(&tid.as_raw()))
            .filter_map(|tid| std::fs::read_to_string(format!("/proc/{tid}/stat")).ok())
            .filter(|stat| stat_state(stat) == Some('R'))
            .count();
        Ok(f64::from(u32::try_from(running).unwrap_or(u32::MAX)))
    }

    fn cpus(&mut self) -> Result<u32, ResourceError> {
        let n = self.cgroup.cpu_count()?;
        if n == 0 {
            return Err(parse_err(&self.cgroup.procs_dir(), "the node's cgroup has no CPUs"));
        }
        Ok(n)
    }

    fn memory(&mut self) -> Result<(u64, u64), ResourceError> {
        let usage = self.cgroup.memory_current()?;
        // An unlimited cgroup: the host's memory is the real limit.
        let (host_free, host_total) = meminfo()?;
        let total = self.cgroup.memory_limit()?.unwrap_or(host_total).min(host_total);
        let free = total.saturating_sub(usage).min(host_free);
        Ok((free, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_states_survive_odd_command_names() {
        assert_eq!(stat_state("42 (a) b) R 1 2 3"), Some('R'));
        assert_eq!(stat_state("42 (sleep) S 1"), Some('S'));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn the_cgroup_view_reads_a_v2_node() {
        let tmp = tempfile::tempdir().unwrap();
        let node = tmp.path().join("rmosix-t/node1");
        std::fs::create_dir_all(&node).unwrap();
        for (file, text) in [
            ("cpuset.cpus.effective", "0-1\n"),
            ("memory.max", "1073741824\n"),
            ("memory.current", "268435456\n"),
            ("cgroup.threads", ""),
        ] {
            std::fs::write(node.join(file), text).unwrap();
        }
        let path = CgroupPath::new("/rmosix-t/node1").unwrap();
        let hierarchy = Hierarchy::v2(tmp.path());
        let mut view = Cgroup::new(hierarchy.cgroup(&path, cgroup::REQUIRED).unwrap());
        assert_eq!(view.cpus().unwrap(), 2);
        let (_, host_total) = meminfo().unwrap();
        let (free, total) = view.memory().unwrap();
        assert_eq!(total, host_total.min(1 << 30));
        assert!(free <= total - (256 << 20));
        assert!(view.runnable().unwrap().abs() < f64::EPSILON);
        // No limit: the host's memory is the node's.
        std::fs::write(node.join("memory.max"), "max\n").unwrap();
        assert_eq!(view.memory().unwrap().1, host_total);
    }

    #[test]
    fn the_host_view_reads_this_machine() {
        let mut host = Host;
        let (free, total) = host.memory().unwrap();
        assert!(total > 0 && free <= total);
        assert!(host.cpus().unwrap() >= 1);
        assert!(host.runnable().unwrap() >= 0.0);
    }
}
