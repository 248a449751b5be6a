//! What kind of job each job is, as the ordinary user sees it with `mosctl jobs` from any node: real
//! programs (sh, dd, sleep, python3) run with mosrun on node 1 of a real cluster, watched by the eBPF
//! probes loaded for real by every node's migd, or by `/proc` where a node's configuration turns them off.
//! A CPU spinner is `cpu`, synchronous writes are `io`, a sleeper is `sleeping`, a job holding a TCP socket
//! is `unmigratable` with the reason, a job that starts to compute changes class, a hint fixes the class,
//! and a job that moved is seen where it runs now, with its move counted.

use std::io::Write as _;
use std::process::{Child, Stdio};

use rmosix_testcluster::user::{TestUser, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

/// `mosrun ARGS...` on node 1 as the test user, with stdin piped.
fn mosrun(c: &Cluster, u: &TestUser, args: &[&str]) -> Child {
    c.command_as(1, u, "mosrun").unwrap().args(args).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap()
}

/// `mosctl jobs --json` on node `node`, as the test user.
fn jobs(c: &Cluster, u: &TestUser, node: u32) -> Value {
    let out = c.command_as(node, u, "mosctl").unwrap().args(["jobs", "--json"]).output().unwrap();
    assert!(out.status.success(), "mosctl jobs: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The job with home PID `pid` in a `mosctl jobs --json` answer.
fn job(all: &Value, pid: u32) -> Option<&Value> {
    all["jobs"].as_array()?.iter().find(|j| j["home_pid"] == pid)
}

/// Waits until every job of `expected` (deputy, class) has that class in node `node`'s view, and returns
/// that view.
fn wait_for_classes(c: &Cluster, u: &TestUser, node: u32, expected: &[(&Child, &str)]) -> Value {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let view = jobs(c, u, node);
        if expected.iter().all(|(child, class)| job(&view, child.id()).is_some_and(|j| j["class"] == *class)) {
            return view;
        }
        let wanted: Vec<(u32, &str)> = expected.iter().map(|(child, class)| (child.id(), *class)).collect();
        assert!(std::time::Instant::now() < deadline, "jobs not classed as {wanted:?} from node {node}: {view:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn stop(mut children: Vec<Child>) {
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn every_job_is_classed_by_what_it_does_and_seen_from_every_node() {
    let c = Cluster::up(Spec::new("classes", 2, bin_dir_of_current_test())).unwrap();
    let u = test_user().unwrap();
    let dsync = u.home.join("rmosix-dsync-test");
    let dd = format!(
        "while :; do dd if=/dev/zero of={} bs=4k count=64 oflag=dsync 2>/dev/null; done",
        dsync.display()
    );
    let spinner = mosrun(&c, &u, &["sh", "-c", "while :; do :; done"]);
    let syncer = mosrun(&c, &u, &["sh", "-c", &dd]);
    let sleeper = mosrun(&c, &u, &["sleep", "1000"]);
    let tcp = "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\ntime.sleep(1000)";
    let listener = mosrun(&c, &u, &[PYTHON, "-c", tcp]);
    // Sleeps on its stdin, then computes.
    let mut changer = mosrun(&c, &u, &[PYTHON, "-c", "import sys\nsys.stdin.readline()\nwhile True: pass"]);
    // A spinner its owner says is I/O-bound.
    let hinted = mosrun(&c, &u, &["-i", "sh", "-c", "while :; do :; done"]);

    let view = wait_for_classes(
        &c,
        &u,
        2,
        &[
            (&spinner, "cpu"),
            (&syncer, "io"),
            (&sleeper, "sleeping"),
            (&listener, "unmigratable"),
            (&changer, "sleeping"),
            (&hinted, "io"),
        ],
    );
    for (node, source) in view["sources"].as_array().unwrap().iter().map(|s| (&s["node"], &s["source"])) {
        assert!(source.as_str().unwrap().starts_with("bpf ("), "node {node} watches jobs with {source}");
    }
    assert_eq!(view["sources"].as_array().unwrap().len(), 2, "both nodes answered: {view}");
    assert_eq!(view["unreachable"], serde_json::json!([]));
    let spinning = job(&view, spinner.id()).unwrap();
    assert_eq!(spinning["node"], 1);
    assert_eq!(spinning["home_node"], 1);
    assert_eq!(spinning["owner"], u.name.as_str());
    assert_eq!(spinning["state"], "running");
    assert_eq!(spinning["command"], "sh -c while :; do :; done");
    assert!(spinning["cpu"].as_f64().unwrap() > 10.0, "{spinning}");
    let reason = job(&view, listener.id()).unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("holds a TCP socket listening on 127.0.0.1:"), "{reason}");
    let syncing = job(&view, syncer.id()).unwrap();
    assert!(syncing["write_bps"].as_u64().unwrap() > 0, "{syncing}");

    // It starts to compute: it is CPU-bound now.
    changer.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    wait_for_classes(&c, &u, 1, &[(&changer, "cpu")]);

    // Moved, it is seen on node 2, by node 1 too, still CPU-bound, with one move.
    let out = c.command_as(1, &u, "migrate").unwrap().args([spinner.id().to_string().as_str(), "2"]).output().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    wait_until("the moved spinner seen on node 2, CPU-bound", PATIENCE, || {
        let view = jobs(&c, &u, 1);
        job(&view, spinner.id()).is_some_and(|j| j["node"] == 2 && j["migrations"] == 1 && j["class"] == "cpu")
    });
    // The table, filtered by node.
    let out = c.command_as(1, &u, "mosctl").unwrap().args(["jobs", "--node", "2"]).output().unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.lines().nth(1).unwrap().contains(&spinner.id().to_string()), "{table}");

    stop(vec![spinner, syncer, sleeper, listener, changer, hinted]);
    let _ = std::fs::remove_file(&dsync);
}

#[test]
fn without_probes_a_node_classes_its_jobs_from_proc_and_says_so() {
    let c = Cluster::up(Spec::new("procjobs", 1, bin_dir_of_current_test())).unwrap();
    let config = c.config(1);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("[migd]\n", "[migd]\nprobes = false\n", 1)).unwrap();
    c.kill_daemon(1, "migd").unwrap();
    c.start_migd(1).unwrap();
    let u = test_user().unwrap();
    let spinner = mosrun(&c, &u, &["sh", "-c", "while :; do :; done"]);
    let sleeper = mosrun(&c, &u, &["sleep", "1000"]);
    let view = wait_for_classes(&c, &u, 1, &[(&spinner, "cpu"), (&sleeper, "sleeping")]);
    assert_eq!(view["sources"][0]["source"], "proc (migd.probes = false)");
    stop(vec![spinner, sleeper]);
}
