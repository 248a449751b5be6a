//! Moves that fail after they were committed at home: the destination cannot restore the job (here, for
//! real: its node's memory limit is below the job's size, so the restore is killed). The source has ended
//! its copy by then, so the job comes back from the images the source kept, as the next generation, with
//! nothing of its output lost or repeated. Run as the ordinary test user, with python3.

use std::process::{Child, Stdio};

use rmosix_testcluster::user::{Lines, TestUser, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

const PYTHON: &str = "/usr/bin/python3";

/// Holds 160 MiB (touched, so it is dumped and must be restored) and prints 200 numbered lines slowly; the
/// last 50 wait for the end of its stdin.
const HOLDER: &str = r"
import sys, time
block = bytearray(160 << 20)
for i in range(0, len(block), 4096):
    block[i] = i % 251
for line in range(200):
    if line == 150:
        sys.stdin.read()
    print(line, sum(block[j] for j in range(0, 1 << 20, 4096 * 64)) + line, flush=True)
    time.sleep(0.02)
";

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn user() -> TestUser {
    test_user().unwrap_or_else(|e| panic!("cannot create the test user: {e}"))
}

fn mosrun(c: &Cluster, u: &TestUser, extra: &[&str]) -> Child {
    c.command_as(1, u, "mosrun")
        .unwrap()
        .args(extra)
        .args([PYTHON, "-c", HOLDER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The record node 1 keeps of the job with home PID `pid`.
fn record(c: &Cluster, pid: u32) -> serde_json::Value {
    let path = c.node_dir(1).join("records").join(format!("{pid}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["record"].clone()
}

/// Image sets of this cluster's migds in the store (named after the migd that made them; other clusters
/// may share the store).
fn image_sets(c: &Cluster) -> Vec<String> {
    let prefixes: Vec<String> =
        c.node_ids().filter_map(|i| c.daemon_pid(i, "migd").ok()).map(|pid| format!("images-{pid}-")).collect();
    std::fs::read_dir(rmosix_testcluster::IMAGE_STORE)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}

/// `migrate PID TARGET` on node 1 as the test user: its exit code and what it said on stderr.
fn migrate(c: &Cluster, u: &TestUser, pid: u32, target: &str) -> (Option<i32>, String, String) {
    let out = c.command_as(1, u, "migrate").unwrap().args([pid.to_string().as_str(), target]).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The reference: the same program, unmoved.
fn unmoved(c: &Cluster, u: &TestUser) -> String {
    let out = c.command_as(1, u, "mosrun").unwrap().args([PYTHON, "-c", HOLDER]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until node `i`'s migd pauses at the restore of an arriving job, then sets node `i`'s memory
/// limit just above what it uses (the images it received among it), so the restore cannot get the job's
/// memory and is killed: a real restore failure, after the move was committed at home.
fn starve_restore(c: &Cluster, i: u32) {
    let log = c.node_dir(i).join("migd.log");
    let pauses = || std::fs::read_to_string(&log).unwrap_or_default().matches("pausing at this phase").count();
    let before = pauses();
    wait_until(&format!("node {i} to pause before the restore"), PATIENCE, || pauses() > before);
    let node = c.cgroup(i);
    let used = node.memory_current().unwrap();
    node.set_memory_limit(Some(used + (24 << 20))).unwrap();
}

/// Moves the job (running on `from`) to node `to`, whose restore is starved, and checks the move is
/// refused in words and the job runs on at `from` as generation `epoch` + 2, with no image set left.
fn failed_move(c: &Cluster, u: &TestUser, pid: u32, from: u32, to: u32, epoch: u64) {
    let migrate = std::thread::scope(|s| {
        let asked = s.spawn(|| migrate(c, u, pid, &to.to_string()));
        starve_restore(c, to);
        asked.join().unwrap()
    });
    c.cgroup(to).set_memory_limit(Some(4 << 30)).unwrap();
    let (code, out, err) = migrate;
    assert_eq!(code, Some(1), "the move must fail: {out}{err}");
    assert!(err.contains(&format!("could not start on node {to}")) && err.contains("runs on"), "{err}");
    let [_] = c.processes(from, "python3")[..] else { panic!("one copy runs on node {from} again") };
    assert!(c.processes(to, "python3").is_empty(), "no copy on node {to}");
    let record = record(c, pid);
    assert_eq!((&record["node"], &record["migrations"]), (&from.into(), &(epoch + 2).into()), "{record}");
    assert_ne!(record["node_pid"], serde_json::Value::from(0), "the copy taken back is linked to its deputy: {record}");
    wait_until("no image set left in the store", PATIENCE, || image_sets(c).is_empty());
}

#[test]
fn a_restore_that_fails_after_the_commit_gives_the_job_back_to_the_source() {
    // Every move of this test's cluster pauses 3 s before its restore, for `starve_restore`. Set before
    // anything else runs in this test binary (its only test), so no other thread reads the environment.
    // SAFETY: no other thread exists yet that could read or write the environment.
    unsafe { std::env::set_var("RMOSIX_PHASE_DELAY", "restore:3000") };
    let c = cluster("mvback", 3);
    let u = user();
    let reference = unmoved(&c, &u);
    assert_eq!(reference.lines().count(), 200);

    let mut child = mosrun(&c, &u, &[]);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(10);
    // From home (node 1), which records the move itself: back at home.
    failed_move(&c, &u, pid, 1, 2, 0);
    lines.wait_for(lines.count() + 5);
    // To node 2, then from there (a guest; the move is recorded at home over the network) to node 3: back
    // at node 2.
    let (code, out, err) = migrate(&c, &u, pid, "2");
    assert_eq!(code, Some(0), "{out}{err}");
    failed_move(&c, &u, pid, 2, 3, 3);
    lines.wait_for(lines.count() + 5);
    // And it still moves: home.
    let (code, out, err) = migrate(&c, &u, pid, "home");
    assert_eq!(code, Some(0), "{out}{err}");
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines.finish(), reference, "output identical to an unmoved run: nothing lost, nothing twice");
}
