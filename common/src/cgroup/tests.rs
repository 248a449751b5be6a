//! Unit tests on fake v1- and v2-shaped trees in temporary directories: no root, no real cgroups. The
//! kernel's part (files appearing with a new cgroup, moves, kills) is played by the tests writing files;
//! the privileged tests in `tests/tests/cgroup.rs` run the same code on this machine's real hierarchy.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// This machine's mount table (hybrid: v1 controllers, an empty cgroup2 at `/sys/fs/cgroup/unified`).
const HYBRID: &str = "\
25 1 0:23 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
1207 30 0:4 net:[4026532251] /run/netns/rmx-local-1 rw shared:626 - nsfs nsfs rw
";

/// Debian 12: the unified hierarchy alone.
const UNIFIED: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
26 21 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

/// A systemd "hybrid" host whose v1 side carries only systemd's named hierarchy: nothing rmosix uses is on
/// v1, so the unified mount is used.
const SYSTEMD_HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
31 24 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 - cgroup cgroup rw,xattr,name=systemd
";

/// This machine's `/proc/self/cgroup`.
const SELF_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/8f8971bf4fc9ffc4b28c7246e811087c
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";

fn put(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn text(path: &Path) -> String {
    fs::read_to_string(path).unwrap()
}

/// A v1-shaped tree: cpuset (0-3, node 0), memory and cpuacct hierarchies under `root`.
fn v1_tree(root: &Path) -> Hierarchy {
    put(&root.join("cpuset/cpuset.cpus"), "0-3\n");
    put(&root.join("cpuset/cpuset.mems"), "0\n");
    put(&root.join("memory/memory.limit_in_bytes"), "9223372036854771712\n");
    put(&root.join("cpuacct/cpuacct.usage"), "0\n");
    Hierarchy::v1([
        (root.join("cpuset"), vec![Controller::Cpuset]),
        (root.join("memory"), vec![Controller::Memory]),
        (root.join("cpuacct"), vec![Controller::Cpuacct]),
    ])
}

/// A v2-shaped tree at `root`, offering cpuset, cpu, io, memory and pids, with cpu and memory already given
/// to the root's children (as systemd leaves it).
fn v2_tree(root: &Path) -> Hierarchy {
    put(&root.join("cgroup.controllers"), "cpuset cpu io memory pids\n");
    put(&root.join("cgroup.subtree_control"), "cpu memory\n");
    put(&root.join("cgroup.procs"), "1\n");
    Hierarchy::v2(root)
}

fn path(p: &str) -> CgroupPath {
    CgroupPath::new(p).unwrap()
}

#[test]
fn cgroup_paths_are_checked_and_normalized() {
    assert_eq!(path("/a/b/").as_str(), "/a/b");
    assert_eq!(path("/").as_str(), "/");
    assert!(path("/").is_root());
    assert_eq!(path("/a/b").parent(), Some(path("/a")));
    assert_eq!(path("/a").parent(), Some(CgroupPath::root()));
    assert_eq!(CgroupPath::root().parent(), None);
    assert_eq!(path("/rmosix-local/node1").name(), "node1");
    assert_eq!(CgroupPath::root().join("x").unwrap(), path("/x"));
    assert_eq!(path("/x").join("y").unwrap(), path("/x/y"));
    assert_eq!(path("/a/b/c").relative_to(&path("/a")), Some("b/c"));
    assert_eq!(path("/a").relative_to(&path("/a")), Some(""));
    assert_eq!(path("/ab").relative_to(&path("/a")), None);
    assert_eq!(path("/a").relative_to(&CgroupPath::root()), Some("a"));
    for bad in ["rmosix/node1", "", "/a//b", "/a/../b", "/a/./b", "/a\nb"] {
        assert!(CgroupPath::new(bad).is_err(), "{bad:?} accepted");
    }
    assert!(path("/a").join("b/c").is_err());
    assert!(path("/a").join("..").is_err());
    let err = CgroupPath::new("rmosix/node1").unwrap_err().to_string();
    assert!(err.contains("must start with `/`"), "{err}");
}

#[test]
fn cpu_lists() {
    assert_eq!(count_cpus("0-3,8,10-11\n"), Some(7));
    assert_eq!(count_cpus("1"), Some(1));
    assert_eq!(count_cpus(""), Some(0));
    assert_eq!(count_cpus("3-1"), None);
    assert_eq!(count_cpus("x"), None);
    assert_eq!(parse_cpus("0-2,5\n"), Some(vec![0, 1, 2, 5]));
    assert_eq!(parse_cpus("3-1"), None);
}

#[test]
fn a_hybrid_host_uses_its_v1_controllers() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hierarchy::from_mountinfo(HYBRID, tmp.path()).unwrap();
    assert_eq!(h.version(), Version::V1);
    assert_eq!(h.available().unwrap(), Controller::ALL);
    h.require(REQUIRED).unwrap();
    let c = h.cgroup(&path("/rmosix-local/node1"), CONTROLLERS).unwrap();
    let cg = tmp.path().join("sys/fs/cgroup");
    // cpuset first: its cgroup.procs lists the node's processes.
    assert_eq!(
        c.dirs(),
        ["cpuset", "memory", "cpuacct", "pids", "freezer"].map(|ctl| cg.join(ctl).join("rmosix-local/node1"))
    );
    assert_eq!(c.procs_dir(), cg.join("cpuset/rmosix-local/node1"));
    assert_eq!(c.procs_files()[1], cg.join("memory/rmosix-local/node1/cgroup.procs"));
    assert_eq!(c.controller_dir(Controller::Pids), Some(cg.join("pids/rmosix-local/node1")));
    assert_eq!(c.controller_dir(Controller::Cpu), None);
    assert_eq!(c.to_string(), "/rmosix-local/node1");
}

#[test]
fn co_mounted_controllers_share_one_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let mountinfo = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:32 / /mnt/memory-again rw - cgroup cgroup rw,memory
";
    let h = Hierarchy::from_mountinfo(mountinfo, tmp.path()).unwrap();
    let c = h.cgroup(&path("/j"), &[Controller::Cpuacct, Controller::Cpu, Controller::Memory]).unwrap();
    let cg = tmp.path().join("sys/fs/cgroup");
    assert_eq!(c.dirs(), [cg.join("cpu,cpuacct/j"), cg.join("memory/j")]);
    // No pids or freezer hierarchy: those are skipped, not errors.
    assert_eq!(h.cgroup(&path("/j"), CONTROLLERS).unwrap().dirs().len(), 3);
}

#[test]
fn a_unified_host_uses_v2_and_says_which_controllers_it_lacks() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hierarchy::from_mountinfo(UNIFIED, tmp.path()).unwrap();
    assert_eq!(h.version(), Version::V2);
    let root = tmp.path().join("sys/fs/cgroup");
    put(&root.join("cgroup.controllers"), "cpu io memory pids\n");
    let err = h.require(REQUIRED).unwrap_err().to_string();
    let expected = format!("cgroup v2 at {}: the cpuset controller(s) are not available", root.display());
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("offers only \"cpu io memory pids\""), "{err}");
    put(&root.join("cgroup.controllers"), "cpuset cpu io memory pids\n");
    h.require(REQUIRED).unwrap();
    let c = h.cgroup(&path("/rmosix-local/node1"), CONTROLLERS).unwrap();
    assert_eq!(c.dirs(), [root.join("rmosix-local/node1")]);
    assert_eq!(c.procs_files(), [root.join("rmosix-local/node1/cgroup.procs")]);
    assert_eq!(c.controller_dir(Controller::Memory), Some(root.join("rmosix-local/node1")));
}

#[test]
fn a_v1_side_without_our_controllers_leaves_the_unified_mount() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hierarchy::from_mountinfo(SYSTEMD_HYBRID, tmp.path()).unwrap();
    assert_eq!(h.version(), Version::V2);
    assert_eq!(h.cgroup(&path("/x"), CONTROLLERS).unwrap().dirs(), [tmp.path().join("sys/fs/cgroup/unified/x")]);
}

#[test]
fn no_cgroup_mount_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Hierarchy::from_mountinfo("25 1 0:23 / /proc rw - proc proc rw\n", tmp.path()).unwrap_err();
    assert!(matches!(err, CgroupError::NotMounted { .. }), "{err}");
    assert!(Hierarchy::from_mountinfo("garbage\n", tmp.path()).is_err());
}

#[test]
fn mounts_of_a_subtree_and_escaped_names_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    // A container sees only /docker/abc of the memory hierarchy, at a mount point with a space in it.
    let mountinfo = "\
35 31 0:32 /docker/abc /sys/fs/my\\040cgroup/memory rw - cgroup cgroup rw,memory
";
    let h = Hierarchy::from_mountinfo(mountinfo, tmp.path()).unwrap();
    let c = h.cgroup(&path("/docker/abc/job"), &[Controller::Memory]).unwrap();
    assert_eq!(c.dirs(), [tmp.path().join("sys/fs/my cgroup/memory/job")]);
    let err = h.cgroup(&path("/elsewhere"), &[Controller::Memory]).unwrap_err();
    assert!(matches!(err, CgroupError::NotVisible { .. }), "{err}");
}

#[test]
fn a_process_cgroups_are_read_per_controller() {
    let p = ProcessCgroups::parse(SELF_CGROUP, Path::new("/proc/self/cgroup")).unwrap();
    assert_eq!(p.v1(Controller::Memory), Some(&path("/process_api/8f8971bf4fc9ffc4b28c7246e811087c")));
    assert_eq!(p.v1(Controller::Cpuset), Some(&CgroupPath::root()));
    assert_eq!(p.unified(), Some(&CgroupPath::root()));

    let systemd = "1:cpu,cpuacct:/system.slice/migd.service\n2:memory:/system.slice/migd.service\n3:cpuset:/\n";
    let p = ProcessCgroups::parse(systemd, Path::new("/proc/42/cgroup")).unwrap();
    assert_eq!(p.v1(Controller::Cpuacct), Some(&path("/system.slice/migd.service")));
    assert_eq!(p.unified(), None);

    let tmp = tempfile::tempdir().unwrap();
    let h = Hierarchy::from_mountinfo(HYBRID, tmp.path()).unwrap();
    let c = h.cgroup_of(&p, &[Controller::Cpuset, Controller::Memory]).unwrap();
    let cg = tmp.path().join("sys/fs/cgroup");
    assert_eq!(c.dirs(), [cg.join("cpuset"), cg.join("memory/system.slice/migd.service")]);
    assert_eq!(c.to_string(), "cpuset:/ memory:/system.slice/migd.service");
    let job = c.child("job-1-7").unwrap();
    assert_eq!(job.to_string(), "cpuset:/job-1-7 memory:/system.slice/migd.service/job-1-7");
    // The pids hierarchy is mounted but the process's list has no line for it.
    let err = h.cgroup_of(&p, &[Controller::Pids]).unwrap_err().to_string();
    assert_eq!(err, "/proc/42/cgroup names no cgroup in the pids hierarchy");

    let v2 = Hierarchy::from_mountinfo(UNIFIED, tmp.path()).unwrap();
    let p = ProcessCgroups::parse("0::/system.slice/migd.service\n", Path::new("x")).unwrap();
    assert_eq!(v2.cgroup_of(&p, CONTROLLERS).unwrap().path(), &path("/system.slice/migd.service"));

    let deleted = ProcessCgroups::parse("0::/gone (deleted)\n", Path::new("x")).unwrap();
    assert_eq!(deleted.unified(), Some(&path("/gone")));
    let err = ProcessCgroups::parse("no colons here\n", Path::new("/proc/9/cgroup")).unwrap_err().to_string();
    assert!(err.starts_with("cannot parse /proc/9/cgroup:"), "{err}");
}

#[test]
fn v1_create_copies_the_cpuset_of_each_new_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let h = v1_tree(tmp.path());
    let node = h.cgroup(&path("/rmosix-x/node1"), CONTROLLERS).unwrap();
    assert!(!node.exists());
    node.create().unwrap();
    assert!(node.exists());
    for dir in ["cpuset/rmosix-x", "cpuset/rmosix-x/node1"] {
        assert_eq!(text(&tmp.path().join(dir).join("cpuset.cpus")), "0-3");
        assert_eq!(text(&tmp.path().join(dir).join("cpuset.mems")), "0");
    }
    assert!(tmp.path().join("memory/rmosix-x/node1").is_dir());
    assert!(tmp.path().join("cpuacct/rmosix-x/node1").is_dir());

    // A cpuset already set is kept when created again.
    node.set_cpus("2").unwrap();
    node.create().unwrap();
    assert_eq!(node.cpus().unwrap(), "2");
    assert_eq!(node.cpu_count().unwrap(), 1);
    // The effective list wins when the kernel has one.
    put(&tmp.path().join("cpuset/rmosix-x/node1/cpuset.effective_cpus"), "2-3\n");
    assert_eq!(node.cpu_count().unwrap(), 2);

    // The kernel makes memory.limit_in_bytes with the directory; here the test does.
    let limit = tmp.path().join("memory/rmosix-x/node1/memory.limit_in_bytes");
    put(&limit, "9223372036854771712\n");
    assert_eq!(node.memory_limit().unwrap(), None);
    node.set_memory_limit(Some(4 << 30)).unwrap();
    assert_eq!(text(&limit), "4294967296");
    assert_eq!(node.memory_limit().unwrap(), Some(4 << 30));
    node.set_memory_limit(None).unwrap();
    assert_eq!(text(&limit), "-1");
}

#[test]
fn v1_reads_usage_and_cpu_time() {
    let tmp = tempfile::tempdir().unwrap();
    let h = v1_tree(tmp.path());
    let c = h.cgroup(&path("/n"), CONTROLLERS).unwrap();
    c.create().unwrap();
    put(&tmp.path().join("memory/n/memory.usage_in_bytes"), "123456\n");
    put(&tmp.path().join("cpuacct/n/cpuacct.usage"), "2500000000\n");
    assert_eq!(c.memory_current().unwrap(), 123_456);
    assert_eq!(c.cpu_time().unwrap(), Duration::from_millis(2500));
    // Threads of v1 are in `tasks`, of the cgroup and its children; processes in any hierarchy count.
    put(&tmp.path().join("cpuset/n/tasks"), "10\n11\n");
    put(&tmp.path().join("cpuset/n/job/tasks"), "20\n");
    put(&tmp.path().join("cpuset/n/cgroup.procs"), "10\n");
    put(&tmp.path().join("memory/n/cgroup.procs"), "10\n30\n");
    let raw = |pids: Vec<Pid>| pids.into_iter().map(Pid::as_raw).collect::<Vec<_>>();
    assert_eq!(raw(c.threads().unwrap()), [10, 11, 20]);
    assert_eq!(raw(c.procs().unwrap()), [10, 30]);
    assert_eq!(c.children().unwrap(), ["job"]);

    // Without a cpuacct hierarchy there is no CPU time, and the error says so.
    let no_acct = h.cgroup(&path("/n"), REQUIRED).unwrap();
    let err = no_acct.cpu_time().unwrap_err().to_string();
    assert_eq!(err, "cannot read the CPU time in cgroup /n: it has no cpuacct controller");
}

#[test]
fn v2_create_enables_the_controllers_in_each_parent() {
    let tmp = tempfile::tempdir().unwrap();
    let h = v2_tree(tmp.path());
    let c = h.cgroup(&path("/rmosix-x"), CONTROLLERS).unwrap();
    c.create().unwrap();
    // The root holds processes but is exempt; cpu and memory were on already, io is not wanted.
    assert_eq!(text(&tmp.path().join("cgroup.subtree_control")), "cpu memory\n+cpuset\n+pids\n");
    assert!(tmp.path().join("rmosix-x").is_dir());

    // A parent holding processes can't pass controllers on: the error names it and them.
    let svc = tmp.path().join("svc");
    put(&svc.join("cgroup.controllers"), "cpuset cpu memory pids\n");
    put(&svc.join("cgroup.procs"), "4242\n");
    let parent = h.cgroup(&path("/svc"), CONTROLLERS).unwrap();
    let err = JobCgroups::create(&parent, "job-1-5").unwrap_err();
    assert!(matches!(&err, CgroupError::InnerProcesses { path, pids, .. } if *path == svc && *pids == [4242]), "{err}");
    assert!(!svc.join("job-1-5").exists());

    // Once the daemon moved to a leaf, it works.
    put(&svc.join("cgroup.procs"), "");
    let job = JobCgroups::create(&parent, "job-1-5").unwrap();
    assert_eq!(text(&svc.join("cgroup.subtree_control")), "+cpuset\n+memory\n+cpu\n+pids\n");
    assert_eq!(job.procs_files(), [svc.join("job-1-5/cgroup.procs")]);
}

#[test]
fn v2_reads_usage_limits_max_and_cpu_time() {
    let tmp = tempfile::tempdir().unwrap();
    let h = v2_tree(tmp.path());
    let c = h.cgroup(&path("/n"), CONTROLLERS).unwrap();
    c.create().unwrap();
    let dir = tmp.path().join("n");
    // Files the kernel makes for a cgroup with these controllers.
    put(&dir.join("memory.current"), "8192\n");
    put(&dir.join("memory.max"), "max\n");
    put(&dir.join("cpuset.cpus"), "");
    put(&dir.join("cpuset.cpus.effective"), "0-1\n");
    put(&dir.join("cpu.stat"), "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n");
    assert_eq!(c.memory_current().unwrap(), 8192);
    assert_eq!(c.memory_limit().unwrap(), None);
    c.set_memory_limit(Some(1 << 30)).unwrap();
    assert_eq!(text(&dir.join("memory.max")), "1073741824");
    assert_eq!(c.memory_limit().unwrap(), Some(1 << 30));
    c.set_memory_limit(None).unwrap();
    assert_eq!(text(&dir.join("memory.max")), "max");
    assert_eq!(c.cpus().unwrap(), "0-1");
    assert_eq!(c.cpu_count().unwrap(), 2);
    c.set_cpus("1").unwrap();
    assert_eq!(text(&dir.join("cpuset.cpus")), "1");
    assert_eq!(c.cpu_time().unwrap(), Duration::from_millis(1500));
    put(&dir.join("cgroup.threads"), "7\n8\n");
    put(&dir.join("job/cgroup.threads"), "9\n");
    assert_eq!(c.threads().unwrap().into_iter().map(Pid::as_raw).collect::<Vec<_>>(), [7, 8, 9]);

    // A cgroup whose parent did not give it memory has no memory files.
    let bare = h.cgroup(&path("/bare"), CONTROLLERS).unwrap();
    bare.create().unwrap();
    let err = bare.memory_current().unwrap_err().to_string();
    assert_eq!(err, "cannot read the memory usage in cgroup /bare: it has no memory controller");
    assert!(matches!(bare.set_cpus("0"), Err(CgroupError::NoController { controller: Controller::Cpuset, .. })));

    // A cgroup that does not exist says so, not that a file is missing.
    let err = h.cgroup(&path("/nowhere"), CONTROLLERS).unwrap().cpus().unwrap_err().to_string();
    let nowhere = tmp.path().join("nowhere");
    assert_eq!(err, format!("cannot read the CPUs in cgroup /nowhere: {} does not exist", nowhere.display()));
}

#[test]
fn stale_job_cgroups_are_removed_unless_they_hold_processes() {
    for v2 in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let h = if v2 { v2_tree(tmp.path()) } else { v1_tree(tmp.path()) };
        let parent = h.cgroup(&path("/migd"), CONTROLLERS).unwrap();
        parent.create().unwrap();
        // Empty directories stand for empty cgroups (a real one's files go with its rmdir).
        for name in ["job-1-10", "job-2-20", "supervisor"] {
            for dir in parent.child(name).unwrap().dirs() {
                fs::create_dir_all(dir.join(if name == "job-2-20" { "inner" } else { "" })).unwrap();
            }
        }
        let busy = parent.child("job-3-30").unwrap();
        busy.create().unwrap();
        put(&busy.procs_files()[0], "99\n");
        let removed = JobCgroups::remove_stale(&parent, JOB_PREFIX, Duration::ZERO).unwrap();
        assert_eq!(removed, ["job-1-10", "job-2-20"], "v2: {v2}");
        assert_eq!(parent.children().unwrap(), ["job-3-30", "supervisor"], "v2: {v2}");
    }
}

#[test]
fn the_root_cgroup_is_never_killed_or_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = v2_tree(tmp.path()).cgroup(&CgroupPath::root(), CONTROLLERS).unwrap();
    assert!(matches!(root.kill(), Err(CgroupError::Root { .. })));
    assert!(matches!(root.remove(), Err(CgroupError::Root { .. })));
    assert!(matches!(root.vacate("supervisor"), Err(CgroupError::Root { .. })));
    assert!(tmp.path().join("cgroup.procs").exists());
}

#[test]
fn job_names_carry_home_node_and_pid() {
    assert_eq!(JobCgroups::name(NodeId(3), 1234), "job-3-1234");
    assert!(JobCgroups::name(NodeId(3), 1234).starts_with(JOB_PREFIX));
}

#[test]
fn this_host_is_detected() {
    // Whatever this machine runs, detection must succeed and describe a usable layout.
    let h = Hierarchy::detect().unwrap();
    let own = h.cgroup_of(&ProcessCgroups::of_self().unwrap(), CONTROLLERS).unwrap();
    assert!(own.dirs().iter().all(|d| d.is_dir()), "{own}: {:?}", own.dirs());
    let _: Vec<PathBuf> = own.procs_files();
}
