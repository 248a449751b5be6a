//! A node that goes silent: every packet of its network namespace is dropped, so its peers hear nothing,
//! no FIN, no RST, as when its machine freezes or its cable is pulled. Only keepalives and bounded waits
//! can tell; a deputy whose job runs there must not wait for ever, nor a `migrate` of that job.

use std::io::Read as _;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rmosix_common::config::Config;
use rmosix_testcluster::user::{Lines, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

const PYTHON: &str = "/usr/bin/python3";

/// Prints a numbered line five times a second for ten minutes: far longer than the test.
const TICKS: &str = "
import time
for i in range(3000):
    print(i, flush=True)
    time.sleep(0.2)
";

fn cluster(name: &str) -> Cluster {
    Cluster::up(Spec::new(name, 3, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

/// What a child writes on its stderr, collected by a thread until it closes it.
fn stderr_of(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = err.read_to_string(&mut text);
        text
    })
}

/// Waits for `child` to end until `deadline`; kills it (and returns `None`) if it has not.
fn end_by(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What became of a TCP connection attempt from one node to another's migd.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Connected,
    /// The other end answered with a refusal (RST).
    Refused,
    /// Nothing came back: the attempt ran out of time, or the sender's own kernel gave up on finding the
    /// other node ("No route to host" when its ARP requests go unanswered).
    Unanswered,
}

/// Tries, from node `from`, a TCP connection to migd on node `to` for at most `limit`.
fn connects(c: &Cluster, from: u32, to: u32, limit: Duration) -> Attempt {
    let target = format!("exec 3<>/dev/tcp/{}/{}", c.addr(to), rmosix_testcluster::MIGD_PORT);
    let out = c
        .command(from, "timeout")
        .unwrap()
        .args([limit.as_secs().to_string().as_str(), "bash", "-c", &target])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Attempt::Connected,
        // timeout(1): the command did not finish in time.
        Some(124) => Attempt::Unanswered,
        _ if said.contains("No route to host") => Attempt::Unanswered,
        _ if said.contains("Connection refused") => Attempt::Refused,
        other => panic!("connecting from node {from} to node {to} ended with {other:?}: {said}"),
    }
}

#[test]
fn a_silent_node_drops_everything_without_a_word_and_heals() {
    let c = cluster("mute");
    // Long enough that a dropped SYN is not mistaken for a slow machine's answer.
    let silent = Duration::from_secs(3);
    assert_eq!(connects(&c, 1, 2, PATIENCE), Attempt::Connected, "node 1 reaches node 2 before any fault");
    c.isolate(2).unwrap();
    assert_eq!(connects(&c, 1, 2, silent), Attempt::Unanswered, "an isolated node neither accepts nor refuses");
    assert_eq!(connects(&c, 2, 3, silent), Attempt::Unanswered, "nor does it reach anyone");
    assert_eq!(connects(&c, 3, 1, PATIENCE), Attempt::Connected, "the others still reach each other");
    c.heal(2).unwrap();
    assert_eq!(connects(&c, 1, 2, PATIENCE), Attempt::Connected, "a healed node answers again");

    c.cut(2, 3).unwrap();
    assert_eq!(connects(&c, 3, 2, silent), Attempt::Unanswered, "the cut path carries nothing one way");
    assert_eq!(connects(&c, 2, 3, silent), Attempt::Unanswered, "nor the other");
    assert_eq!(connects(&c, 1, 2, PATIENCE), Attempt::Connected, "node 2 still reaches node 1");
    assert_eq!(connects(&c, 3, 1, PATIENCE), Attempt::Connected, "and node 3 does too");
    c.heal(2).unwrap();
    c.heal(2).unwrap();
    assert_eq!(connects(&c, 3, 2, PATIENCE), Attempt::Connected, "healing (twice, harmlessly) mends the path");
}

#[test]
fn a_deputy_whose_job_runs_on_a_silent_node_says_so_and_exits_255() {
    let c = cluster("silent");
    let u = test_user().unwrap();
    let silence = Duration::from_secs(u64::from(Config::load(Some(&c.config(1))).unwrap().0.migd.silence_secs));
    let mut deputy = c
        .command_as(1, &u, "mosrun")
        .unwrap()
        .args(["-N", "2", PYTHON, "-c", TICKS])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = deputy.id();
    let said = stderr_of(&mut deputy);
    let lines = Lines::of(&mut deputy);
    wait_until("the job to run on node 2 alone", PATIENCE, || {
        c.processes(2, "python3").len() == 1 && c.processes(1, "python3").is_empty()
    });
    lines.wait_for(lines.count() + 3);

    c.isolate(2).unwrap();
    let cut = Instant::now();
    let mut migrate = c
        .command_as(1, &u, "migrate")
        .unwrap()
        .args([pid.to_string().as_str(), "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let migrate_said = stderr_of(&mut migrate);
    // Keepalives notice the silence within `silence_secs`; twice that leaves room for a loaded machine and
    // still tells them from TCP's own timeouts (many minutes) or from waiting for ever.
    let deadline = cut + silence * 2;
    let deputy_status = end_by(&mut deputy, deadline);
    let deputy_took = cut.elapsed();
    let migrate_status = end_by(&mut migrate, deadline);
    let migrate_took = cut.elapsed();
    let (said, migrate_said) = (said.join().unwrap(), migrate_said.join().unwrap());
    eprintln!(
        "silence_secs {}: the deputy ended after {deputy_took:?} ({deputy_status:?}): {said:?}; migrate after \
         {migrate_took:?} ({migrate_status:?}): {migrate_said:?}",
        silence.as_secs()
    );

    let deputy_status =
        deputy_status.unwrap_or_else(|| panic!("the deputy still waited {:?} after node 2 went silent", silence * 2));
    assert_eq!(deputy_status.code(), Some(255), "a lost job's deputy exits 255; it said {said:?}");
    assert!(said.contains("node 2"), "the deputy names the silent node: {said:?}");
    let migrate_status = migrate_status
        .unwrap_or_else(|| panic!("migrate still waited {:?} after node 2 went silent", silence * 2));
    assert!(!migrate_status.success(), "a job on a silent node cannot be moved; migrate said {migrate_said:?}");
    assert!(migrate_said.starts_with("migrate: "), "migrate says why: {migrate_said:?}");

    // Back again, node 2 learns that its job was given up and does not run it on unseen.
    c.heal(2).unwrap();
    wait_until("the silent node's copy of the job to end", PATIENCE, || c.processes(2, "python3").is_empty());
}
