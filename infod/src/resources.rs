//! Where a node's load and memory are read.
//!
//! A real host reads `/proc`; a simulated node of the local test cluster reads its own cgroups (its cpuset's
//! tasks and CPUs, its memory cgroup's limit and usage), so several nodes on one machine each see their own
//! load. Both sit behind [`ResourceView`], which is also what unit tests fake.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// One simulated node: a cgroup-v1 cpuset directory and a memory directory.
#[derive(Debug)]
pub struct Cgroup {
    cpuset: PathBuf,
    memory: PathBuf,
}

impl Cgroup {
    /// The node whose cgroups are these directories.
    pub fn new(cpuset: PathBuf, memory: PathBuf) -> Self {
        Self { cpuset, memory }
    }
}

/// Counts the CPUs in a cpuset list such as `0-3,8,10-11`.
pub fn count_cpu_list(list: &str) -> Option<u32> {
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

/// State letter of a task from its `/proc/.../stat` line (the field after the parenthesised command name).
pub fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

impl ResourceView for Cgroup {
    fn runnable(&mut self) -> Result<f64, ResourceError> {
        let tasks_path = self.cpuset.join("tasks");
        let tasks = read(&tasks_path)?;
        let own: HashSet<String> = std::fs::read_dir("/proc/self/task")
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        let running = tasks
            .lines()
            .filter(|tid| !own.contains(*tid))
            .filter_map(|tid| std::fs::read_to_string(format!("/proc/{tid}/stat")).ok())
            .filter(|stat| stat_state(stat) == Some('R'))
            .count();
        Ok(f64::from(u32::try_from(running).unwrap_or(u32::MAX)))
    }

    fn cpus(&mut self) -> Result<u32, ResourceError> {
        let path = self.cpuset.join("cpuset.cpus");
        let text = read(&path)?;
        count_cpu_list(&text).filter(|&n| n > 0).ok_or_else(|| parse_err(&path, "bad CPU list"))
    }

    fn memory(&mut self) -> Result<(u64, u64), ResourceError> {
        let number = |name: &str| {
            let path = self.memory.join(name);
            let text = read(&path)?;
            text.trim().parse::<u64>().map_err(|e| parse_err(&path, e.to_string()))
        };
        let limit = number("memory.limit_in_bytes")?;
        let usage = number("memory.usage_in_bytes")?;
        // An unlimited cgroup reports a huge limit: the host's memory is the real one.
        let (host_free, host_total) = meminfo()?;
        let total = limit.min(host_total);
        let free = total.saturating_sub(usage).min(host_free);
        Ok((free, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_cpu_list("1"), Some(1));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn stat_states_survive_odd_command_names() {
        assert_eq!(stat_state("42 (a) b) R 1 2 3"), Some('R'));
        assert_eq!(stat_state("42 (sleep) S 1"), Some('S'));
        assert_eq!(stat_state("garbage"), None);
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
