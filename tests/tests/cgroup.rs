//! The cgroup module on this machine's real hierarchies: job cgroups created under a test parent, joined,
//! measured, frozen, killed and removed. On a hybrid host the v1 side (which rmosix uses) and the unified
//! side are both exercised. Needs root; without it these tests fail and say so.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::unistd::Pid;
use rmosix_common::NodeId;
use rmosix_common::cgroup::{
    CONTROLLERS, Cgroup, CgroupError, CgroupPath, Hierarchy, JOB_PREFIX, JobCgroups, ProcessCgroups, REQUIRED,
    Version,
};
use rmosix_testcluster::{PATIENCE, wait_until};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests create real cgroups and need root: run `sudo cargo xtask test`"
    );
}

/// A test's parent cgroup, killed and removed with everything under it when dropped (also on failure).
struct Scratch(Cgroup);

impl Scratch {
    fn new(h: &Hierarchy, what: &str) -> Self {
        let name = format!("rmosix-cgtest-{what}-{}", std::process::id());
        let cgroup = h.cgroup(&CgroupPath::root().join(&name).unwrap(), CONTROLLERS).unwrap();
        // A leftover of a crashed run with the same pid.
        cgroup.kill().unwrap();
        cgroup.remove().unwrap();
        cgroup.create().unwrap();
        Self(cgroup)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.0.kill().and_then(|()| self.0.remove()) {
            eprintln!("cannot clean up test cgroup {}: {e}", self.0);
        }
    }
}

/// Starts `sh -c SCRIPT` inside `cgroup`: it joins between fork and exec, so what it allocates is charged
/// there, the way migd starts a job.
fn spawn_in(cgroup: &Cgroup, script: &str) -> Child {
    let files: Vec<File> = cgroup
        .procs_files()
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]).stdin(Stdio::null());
    // SAFETY: only write(2) on descriptors opened before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap())
}

/// The unified hierarchy's mount point, whatever the layout.
fn unified_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            after.starts_with("cgroup2 ").then(|| PathBuf::from(before.split(' ').nth(4).unwrap()))
        })
        .expect("no cgroup2 mounted")
}

/// A job's whole life on `h`: created under a parent with CPUs and a memory limit, joined by a busy
/// process, measured, left alone by the stale sweep while it runs, frozen, then killed and removed.
fn job_life(h: &Hierarchy, what: &str, has_memory: bool) {
    let parent = Scratch::new(h, what);
    let parent = &parent.0;
    if h.version() == Version::V1 || has_memory {
        parent.set_cpus("0").unwrap();
        parent.set_memory_limit(Some(512 << 20)).unwrap();
        assert_eq!(parent.cpus().unwrap(), "0");
        assert_eq!(parent.cpu_count().unwrap(), 1);
        assert_eq!(parent.memory_limit().unwrap(), Some(512 << 20));
    }
    let job = JobCgroups::create(parent, &JobCgroups::name(NodeId(1), 4242)).unwrap();
    assert!(job.cgroup().exists());
    if h.version() == Version::V1 {
        // The job's new cpuset took its parent's CPUs.
        assert_eq!(job.cgroup().cpus().unwrap(), "0");
    }

    let mut busy = spawn_in(job.cgroup(), "while :; do :; done");
    let pid = pid_of(&busy);
    wait_until("the job to use CPU time", PATIENCE, || job.cpu_time().unwrap() > Duration::from_millis(100));
    assert_eq!(job.procs().unwrap(), [pid]);
    assert!(job.cgroup().threads().unwrap().contains(&pid));
    // The parent's lists cover its children.
    assert_eq!(parent.procs().unwrap(), [pid]);
    // Where /proc says the process is: the job's cgroup, in every hierarchy used.
    let found = h.cgroup_of(&ProcessCgroups::read(pid).unwrap(), CONTROLLERS).unwrap();
    assert_eq!(&found, job.cgroup());
    if has_memory {
        assert!(job.memory_current().unwrap() > 0);
    } else {
        assert!(matches!(job.memory_current(), Err(CgroupError::NoController { .. })));
    }

    // A crash sweep removes the empty leftovers, not the running job.
    let stale = parent.child("job-2-77").unwrap();
    stale.create().unwrap();
    assert_eq!(JobCgroups::remove_stale(parent, JOB_PREFIX, Duration::ZERO).unwrap(), ["job-2-77"]);
    assert!(!stale.exists());
    assert!(job.cgroup().exists());

    // Frozen tasks die too (v1's freezer would otherwise keep them until thawed).
    freeze(job.cgroup());
    job.remove().unwrap();
    assert!(!job.cgroup().exists());
    let status = busy.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

fn freeze(cgroup: &Cgroup) {
    for dir in cgroup.dirs() {
        for (file, value) in [("freezer.state", "FROZEN"), ("cgroup.freeze", "1")] {
            if dir.join(file).exists() {
                std::fs::write(dir.join(file), value).unwrap();
            }
        }
    }
}

/// A daemon's cgroup emptied into a leaf, as migd does on v2 before it creates job cgroups beside it.
fn vacate(h: &Hierarchy, what: &str) {
    let svc = Scratch::new(h, what);
    let mut daemon = spawn_in(&svc.0, "sleep 1000");
    let pid = pid_of(&daemon);
    let leaf = svc.0.vacate("supervisor").unwrap();
    let now = h.cgroup_of(&ProcessCgroups::read(pid).unwrap(), CONTROLLERS).unwrap();
    assert_eq!(now, leaf);
    assert_eq!(now.path(), &svc.0.path().join("supervisor").unwrap());
    let job = JobCgroups::create(&svc.0, "job-1-1").unwrap();
    assert!(job.cgroup().exists());
    svc.0.kill().unwrap();
    assert_eq!(daemon.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn a_job_cgroup_lives_and_goes_in_the_hierarchy_rmosix_uses() {
    require_root();
    let h = Hierarchy::detect().unwrap();
    h.require(REQUIRED).unwrap();
    job_life(&h, "host", true);
}

#[test]
fn a_daemon_cgroup_is_vacated_into_a_leaf() {
    require_root();
    vacate(&Hierarchy::detect().unwrap(), "vacate");
}

#[test]
fn the_unified_hierarchy_works_beside_v1() {
    require_root();
    let mount = unified_mount();
    let h = Hierarchy::v2(&mount);
    let offered = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    eprintln!("cgroup2 at {} offers {:?}", mount.display(), offered.trim());
    let has_memory = offered.split_whitespace().any(|c| c == "memory");
    job_life(&h, "unified", has_memory);
    vacate(&h, "unified-vacate");
}

#[test]
fn missing_parents_are_created_and_children_removed_first() {
    require_root();
    let h = Hierarchy::detect().unwrap();
    let top = Scratch::new(&h, "deep");
    let deep = top.0.child("a").unwrap().child("b").unwrap();
    deep.create().unwrap();
    assert!(deep.dirs().iter().all(|d: &PathBuf| d.is_dir()));
    assert_eq!(top.0.children().unwrap(), ["a"]);
    top.0.remove().unwrap();
    assert!(!top.0.exists());
}
