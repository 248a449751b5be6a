//! Killing migd never kills a job: the keeper holds every job's pipes, and a restarted migd takes the jobs
//! up again (a job at home gets its deputy back, a guest links home again). Run as the ordinary test user,
//! with python3; what is checked is the job's whole output and its exit status.

use std::process::Stdio;

use rmosix_testcluster::user::{Lines, TestUser, test_user};
use rmosix_testcluster::{Cluster, Spec, bin_dir_of_current_test};

/// 300 numbered lines, slowly; the last 100 wait for the end of stdin.
const COUNTER: &str = r"
import sys, time
for line in range(300):
    if line == 200:
        sys.stdin.read()
    print(line, line * line % 1009, flush=True)
    time.sleep(0.01)
sys.exit(4)
";

fn start(c: &Cluster, u: &TestUser) -> (std::process::Child, Lines) {
    let mut child = c
        .command_as(1, u, "mosrun")
        .unwrap()
        .args(["/usr/bin/python3", "-c", COUNTER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(20);
    (child, lines)
}

fn expected() -> String {
    (0..300).fold(String::new(), |text, i| text + &format!("{i} {}\n", i * i % 1009))
}

fn finish(mut child: std::process::Child, lines: &Lines) {
    drop(child.stdin.take());
    assert_eq!(child.wait().unwrap().code(), Some(4), "the job's status reaches its deputy");
    assert_eq!(lines.finish(), expected(), "output whole: nothing lost, nothing twice");
}

/// Kills node `node`'s migd under its one python3 job and starts it again: the same process runs throughout.
fn kill_and_restart_migd(c: &Cluster, node: u32) {
    let [before] = c.processes(node, "python3")[..] else { panic!("one python3 on node {node}") };
    c.kill_daemon(node, "migd").unwrap();
    assert!(c.processes(node, "python3").contains(&before), "the job outlives migd");
    c.start_migd(node).unwrap();
    assert_eq!(c.processes(node, "python3"), vec![before], "the same process, taken up again");
}

#[test]
fn a_job_at_home_outlives_its_migd_killed_and_restarted() {
    let c = Cluster::up(Spec::new("surhome", 2, bin_dir_of_current_test())).unwrap();
    let u = test_user().unwrap();
    let (child, lines) = start(&c, &u);
    kill_and_restart_migd(&c, 1);
    // Its stdin too: the end of the deputy's input lets it finish.
    finish(child, &lines);
}

#[test]
fn a_guest_job_outlives_its_nodes_migd_killed_and_restarted() {
    let c = Cluster::up(Spec::new("surguest", 2, bin_dir_of_current_test())).unwrap();
    let u = test_user().unwrap();
    let (child, lines) = start(&c, &u);
    let out = c.command_as(1, &u, "migrate").unwrap().args([child.id().to_string().as_str(), "2"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    kill_and_restart_migd(&c, 2);
    finish(child, &lines);
}
