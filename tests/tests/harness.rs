//! The local test cluster itself: it starts after a crashed run, runs commands on its nodes with their
//! exit status, and leaves nothing behind.

use std::path::Path;
use std::process::Stdio;

use rmosix_common::cgroup::{CONTROLLERS, CgroupPath, Hierarchy, ProcessCgroups};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

fn leftovers(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let ns = e.file_name().to_string_lossy().into_owned();
        if ns.starts_with(&format!("rmx-{name}-")) {
            found.push(format!("netns {ns}"));
        }
    }
    for path in [format!("/sys/class/net/rmx-{name}"), format!("/run/rmosix-cluster/{name}")] {
        if Path::new(&path).exists() {
            found.push(path);
        }
    }
    // The cluster's cgroup, in every hierarchy it uses.
    let cgroup = CgroupPath::new(&format!("/rmosix-{name}")).unwrap();
    for dir in Hierarchy::detect().unwrap().cgroup(&cgroup, CONTROLLERS).unwrap().dirs() {
        if dir.exists() {
            found.push(dir.display().to_string());
        }
    }
    found
}

#[test]
fn up_after_a_crash_works_and_down_leaves_nothing() {
    let name = "stale";
    let first = Cluster::up(Spec::new(name, 2, bin_dir_of_current_test())).unwrap();
    // A background job on node 2, as a crashed test would leave running.
    let mut job = first.command(2, "sleep").unwrap().arg("1000").stdin(Stdio::null()).spawn().unwrap();
    // The "crash": the cluster is never taken down and its state directory is lost.
    first.crash();
    std::fs::remove_dir_all(Path::new("/run/rmosix-cluster").join(name)).unwrap();

    let second = Cluster::up(Spec::new(name, 3, bin_dir_of_current_test())).unwrap();
    // Killed: the clean-up waits until the old cluster's cgroups are empty, which a dying process leaves
    // a moment before it is a zombie to reap (here, or by the clean-up, which reaps what it kills when it
    // can).
    wait_until("the old cluster's job to be killed", PATIENCE, || match job.try_wait() {
        Ok(status) => status.is_some(),
        Err(e) => e.raw_os_error() == Some(libc::ECHILD),
    });
    second.wait_for(PATIENCE, "all up", |_, v| v.nodes.len() == 3 && v.nodes.iter().all(|n| n.alive)).unwrap();
    drop(second);
    assert_eq!(leftovers(name), Vec::<String>::new());
}

#[test]
fn commands_run_inside_their_node_and_pass_the_exit_status() {
    let c = Cluster::up(Spec::new("exec", 2, bin_dir_of_current_test())).unwrap();
    let out = c
        .command(2, "sh")
        .unwrap()
        .args(["-c", "ip -4 -o addr show eth0; echo ---; cat /proc/self/cgroup; echo ---; echo $RMOSIX_NODE; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("inet 10.213.0.2/24"), "{text}");
    assert!(text.trim_end().ends_with('2'), "{text}");
    // It ran in node 2's cgroup, in every hierarchy the node uses (v1) or the unified one (v2).
    let own = text.split("---\n").nth(1).unwrap();
    let own = ProcessCgroups::parse(own, Path::new("/proc/self/cgroup of the command")).unwrap();
    let hierarchy = Hierarchy::detect().unwrap();
    assert_eq!(hierarchy.cgroup_of(&own, CONTROLLERS).unwrap(), c.cgroup(2), "{text}");
    assert_eq!(c.cgroup_path(2).as_str(), "/rmosix-exec/node2");
}
