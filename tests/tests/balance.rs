//! Jobs spread by themselves: on a cluster whose migds balance (`[balance] auto`), CPU-bound jobs started
//! by an ordinary user on one node move to an idle one without anyone typing `migrate`, and come out whole;
//! an I/O-bound job, a job started with `mosrun -h` or `-L`, and any job when the other node blocks guests
//! stay where they are; `migrate PID balance` on a balanced cluster leaves the job where it runs; a node
//! running short of memory sends a job away before the kernel kills one.

use std::process::{Child, Command, Stdio};

use rmosix_testcluster::user::{Lines, TestUser, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};
use serde_json::Value;

/// A 2-node cluster (one CPU each on a 2-CPU machine) whose migds balance.
fn cluster(name: &str) -> Cluster {
    let spec = Spec { balance: true, ..Spec::new(name, 2, bin_dir_of_current_test()) };
    Cluster::up(spec).unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

/// `rmx-job`, where the test user can reach it.
fn job() -> std::path::PathBuf {
    rmosix_testcluster::user::reachable_tools(&bin_dir_of_current_test()).unwrap().join("rmx-job")
}

/// What `rmx-job ARGS` prints when it runs unmoved.
fn reference(args: &[&str]) -> String {
    let out = Command::new(job()).args(args).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// `mosrun [options] rmx-job ARGS` on node 1 as the test user; its output collected.
fn start(c: &Cluster, u: &TestUser, options: &[&str], args: &[&str]) -> (Child, Lines) {
    let mut child = c
        .command_as(1, u, "mosrun")
        .unwrap()
        .args(options)
        .arg(job())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Lines::of(&mut child);
    (child, lines)
}

/// `mosctl jobs --json` on node 1, as the test user.
fn jobs(c: &Cluster, u: &TestUser) -> Value {
    let out = c.command_as(1, u, "mosctl").unwrap().args(["jobs", "--json"]).output().unwrap();
    assert!(out.status.success(), "mosctl jobs: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The job with home PID `pid` in a `mosctl jobs --json` answer.
fn view_of(all: &Value, pid: u32) -> Option<Value> {
    all["jobs"].as_array()?.iter().find(|j| j["home_pid"] == pid).cloned()
}

/// The home record of job `pid` (node 1 is home): where it runs and how often it moved.
fn record(c: &Cluster, pid: u32) -> Value {
    let path = c.node_dir(1).join("records").join(format!("{pid}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<Value>(&text).unwrap()["record"].clone()
}

/// `mosctl ARGS` on node `node` as root; what it printed.
fn mosctl(c: &Cluster, node: u32, args: &[&str]) -> String {
    let out = c.command(node, "mosctl").unwrap().args(args).output().unwrap();
    assert!(out.status.success(), "mosctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Waits for every job, and checks that each exited 0 with the output of an unmoved run.
fn all_whole(children: Vec<(Child, Lines)>, args: &[&str]) {
    let expected = reference(args);
    for (mut child, lines) in children {
        assert!(child.wait().unwrap().success());
        assert_eq!(lines.finish(), expected);
    }
}

const SPIN: [&str; 3] = ["spin", "800", "2000000"];

#[test]
fn cpu_bound_jobs_spread_to_an_idle_node_by_themselves_and_an_io_bound_one_stays() {
    let c = cluster("balance");
    let u = test_user().unwrap();
    let dir = u.home.join("rmosix-test-balance");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(u.uid)), Some(nix::unistd::Gid::from_raw(u.gid))).unwrap();
    // Synchronous writes, as a database or a logger does: I/O-bound, never worth moving.
    let io_script = format!(
        "for i in $(seq 400); do dd if=/dev/zero of={}/sync bs=4k count=64 oflag=dsync 2>/dev/null; echo $i; done",
        dir.display()
    );
    let mut io = c
        .command_as(1, &u, "mosrun")
        .unwrap()
        .args(["sh", "-c", &io_script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let io_pid = io.id();
    let io_lines = Lines::of(&mut io);
    let spinners: Vec<(Child, Lines)> = (0..4).map(|_| start(&c, &u, &[], &SPIN)).collect();
    let pids: Vec<u32> = spinners.iter().map(|(child, _)| child.id()).collect();

    // Nobody types migrate: two of the four go to node 2.
    wait_until("two of the four CPU-bound jobs on node 2", PATIENCE, || {
        let view = jobs(&c, &u);
        pids.iter().filter(|&&p| view_of(&view, p).is_some_and(|j| j["node"] == 2)).count() == 2
    });
    let view = jobs(&c, &u);
    let io_view = view_of(&view, io_pid).expect("the I/O-bound job is listed");
    assert_eq!(io_view["node"], 1, "{io_view}");
    assert_eq!(io_view["class"], "io", "{io_view}");

    all_whole(spinners, &SPIN);
    for &pid in &pids {
        let r = record(&c, pid);
        assert!(r["migrations"].as_u64().unwrap() <= 2, "a job moved back and forth: {r}");
    }
    assert!(io.wait().unwrap().success());
    let expected = (1..=400).map(|i: u32| i.to_string()).collect::<Vec<_>>().join("\n") + "\n";
    assert_eq!(io_lines.finish(), expected);
    assert_eq!(record(&c, io_pid)["migrations"], 0, "the I/O-bound job moved");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jobs_that_must_stay_and_a_node_that_blocks_guests_keep_every_job_home() {
    let c = cluster("balstay");
    let u = test_user().unwrap();
    // -h (stay home) and -L (manual moves only): never moved by the balancer.
    let pinned: Vec<(Child, Lines)> =
        [["-h"], ["-L"], ["-h"], ["-L"]].iter().map(|o| start(&c, &u, o, &SPIN)).collect();
    let pids: Vec<u32> = pinned.iter().map(|(child, _)| child.id()).collect();
    // Long enough for the balancer to have moved them had it been allowed to: every job classed CPU-bound
    // and settled, node 2 idle and known.
    wait_until("the four jobs classed CPU-bound", PATIENCE, || {
        let view = jobs(&c, &u);
        pids.iter().all(|&p| view_of(&view, p).is_some_and(|j| j["class"] == "cpu"))
    });
    let settled = std::time::Instant::now();
    wait_until("the balancer's residence time and a few of its rounds", PATIENCE, || {
        settled.elapsed() >= std::time::Duration::from_secs(6)
    });
    // `migrate balance` is the owner asking: a -L job may go, a -h job may not.
    let out = c.command_as(1, &u, "migrate").unwrap().args([pids[0].to_string().as_str(), "balance"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stay on its home node"), "{out:?}");
    for &pid in &pids {
        assert_eq!(record(&c, pid)["migrations"], 0, "job {pid} moved by itself: {}", record(&c, pid));
    }

    // Node 2 blocks guests: nothing goes there, though node 1 has four jobs on one CPU. Its policy is
    // root's to set, and outlives its daemons.
    let refused = c.command_as(2, &u, "mosctl").unwrap().arg("block").output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("only root may change node 2's policy"), "{refused:?}");
    assert_eq!(mosctl(&c, 2, &["block"]), "node 2: block\n");
    for daemon in ["infod", "migd"] {
        c.kill_daemon(2, daemon).unwrap();
    }
    c.start_infod(2).unwrap();
    c.start_migd(2).unwrap();
    assert_eq!(mosctl(&c, 2, &["policy"]).lines().next(), Some("node 2: block"));
    let free: Vec<(Child, Lines)> = (0..2).map(|_| start(&c, &u, &[], &SPIN)).collect();
    let free_pids: Vec<u32> = free.iter().map(|(child, _)| child.id()).collect();
    wait_until("node 1 to see node 2 block guests", PATIENCE, || {
        let out = c.command(1, "mosctl").unwrap().args(["status", "--json"]).output().unwrap();
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["id"] == 2 && n["blocks_guests"] == true))
    });
    wait_until("the two free jobs classed CPU-bound", PATIENCE, || {
        let view = jobs(&c, &u);
        free_pids.iter().all(|&p| view_of(&view, p).is_some_and(|j| j["class"] == "cpu"))
    });
    let settled = std::time::Instant::now();
    wait_until("a few more rounds of the balancer", PATIENCE, || settled.elapsed() >= std::time::Duration::from_secs(6));
    for &pid in &free_pids {
        assert_eq!(record(&c, pid)["migrations"], 0, "job {pid} moved to a node that blocks guests");
    }
    let mut all = pinned;
    all.extend(free);
    all_whole(all, &SPIN);
}

#[test]
fn migrate_balance_leaves_a_job_alone_on_a_balanced_cluster_and_moves_one_from_a_crowded_node() {
    let c = cluster("balmig");
    let u = test_user().unwrap();
    // -L keeps the balancer off them; migrate still moves them.
    let (first, first_lines) = start(&c, &u, &["-L"], &SPIN);
    let pid = first.id();
    let stays = || {
        let out = c.command_as(1, &u, "migrate").unwrap().args([pid.to_string().as_str(), "balance"]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until("the job classed CPU-bound", PATIENCE, || view_of(&jobs(&c, &u), pid).is_some_and(|j| j["class"] == "cpu"));
    // Alone on node 1, with node 2 idle: as well off here as there.
    let said = stays();
    assert!(said.starts_with(&format!("{pid} stays on node 1: it runs best where it is")), "{said}");
    assert_eq!(record(&c, pid)["migrations"], 0);

    // With two more on node 1, node 2 is better.
    let others: Vec<(Child, Lines)> = (0..2).map(|_| start(&c, &u, &["-L"], &SPIN)).collect();
    wait_until("node 1 loaded by three jobs", PATIENCE, || {
        let out = c.command(1, "mosctl").unwrap().args(["status", "--json"]).output().unwrap();
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["id"] == 1 && n["load"].as_f64().unwrap_or(0.0) > 2.5))
    });
    let said = stays();
    assert!(said.starts_with(&format!("moved {pid} from node 1 to node 2 in ")), "{said}");
    let mut all = vec![(first, first_lines)];
    all.extend(others);
    all_whole(all, &SPIN);
}

#[test]
fn a_pinned_job_stays_until_unpinned_and_expel_sends_guests_home() {
    let c = cluster("balpin");
    let u = test_user().unwrap();
    // Pinned by their owner at once: two jobs on node 1's one CPU, node 2 idle, and neither moves.
    let jobs_: Vec<(Child, Lines)> = (0..2).map(|_| start(&c, &u, &[], &SPIN)).collect();
    let pids: Vec<u32> = jobs_.iter().map(|(child, _)| child.id()).collect();
    for ((_, lines), &pid) in jobs_.iter().zip(&pids) {
        lines.wait_for(1);
        let out = c.command_as(1, &u, "mosctl").unwrap().args(["pin", &pid.to_string()]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{pid} is pinned: it moves only when asked\n"));
    }
    wait_until("both jobs classed CPU-bound", PATIENCE, || {
        let view = jobs(&c, &u);
        pids.iter().all(|&p| view_of(&view, p).is_some_and(|j| j["class"] == "cpu"))
    });
    let settled = std::time::Instant::now();
    wait_until("the balancer's residence time and a few of its rounds", PATIENCE, || {
        settled.elapsed() >= std::time::Duration::from_secs(6)
    });
    for &pid in &pids {
        assert_eq!(record(&c, pid)["migrations"], 0, "pinned job {pid} moved");
    }
    // Unpinned, one of them goes to node 2 by itself.
    let out = c.command_as(1, &u, "mosctl").unwrap().args(["unpin", &pids[0].to_string()]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the unpinned job running on node 2", PATIENCE, || {
        let r = record(&c, pids[0]);
        r["node"] == 2 && r["node_pid"] != 0
    });
    assert_eq!(record(&c, pids[1])["node"], 1);

    // expel on node 2: its guest goes home, and node 2 takes no more.
    let said = mosctl(&c, 2, &["expel"]);
    assert_eq!(said, "1 guest(s) sent away; this node now blocks guests\n");
    assert_eq!(record(&c, pids[0])["node"], 1);
    assert_eq!(record(&c, pids[0])["migrations"], 2);
    assert_eq!(mosctl(&c, 2, &["policy"]).lines().next(), Some("node 2: block"));
    // Node 1's balancer says what it did: the one move it made.
    let said = mosctl(&c, 1, &["policy"]);
    assert!(said.contains("node 1: moved 1 job(s) to balance the load and 0 to free memory by itself; 0 move(s) failed"), "{said}");
    all_whole(jobs_, &SPIN);
}

/// A python job that grows by 4 MiB every second to `steps` * 4 MiB, holds it a few seconds, and
/// prints as it goes: mostly asleep, so only its memory can move it.
const GROWER: &str = "import sys, time\nheld = []\nfor i in range(int(sys.argv[1])):\n    held.append(bytes([i % 251 + 1]) * (4 << 20))\n    print(i, flush=True)\n    time.sleep(1)\ntime.sleep(3)\nprint('held', sum(len(h) for h in held), flush=True)\n";

#[test]
fn a_node_short_of_memory_sends_a_job_away_before_any_is_killed() {
    // Three jobs that each grow to 240 MiB on node 1 of 640 MiB (and no swap): without ushering the kernel
    // kills one.
    let spec = Spec { balance: true, mem_limit: 640 << 20, ..Spec::new("balmem", 2, bin_dir_of_current_test()) };
    let c = Cluster::up(spec).unwrap();
    // Usher early enough that a job's images (on a tmpfs, in the node's memory) fit while it is dumped.
    for node in 1..=2 {
        let config = c.config(node);
        let text = std::fs::read_to_string(&config).unwrap().replace("[balance]\n", "[balance]\nusher_below = 0.35\n");
        std::fs::write(&config, text).unwrap();
        c.kill_daemon(node, "migd").unwrap();
        c.start_migd(node).unwrap();
    }
    let u = test_user().unwrap();
    let steps = 60;
    let growers: Vec<(Child, Lines)> = (0..3)
        .map(|_| {
            let mut child = c
                .command_as(1, &u, "mosrun")
                .unwrap()
                .args(["/usr/bin/python3", "-c", GROWER, &steps.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = Lines::of(&mut child);
            (child, lines)
        })
        .collect();
    let pids: Vec<u32> = growers.iter().map(|(child, _)| child.id()).collect();
    let expected = (0..steps).map(|i: u32| i.to_string()).collect::<Vec<_>>().join("\n") + &format!("\nheld {}\n", steps * (4 << 20));
    for (mut child, lines) in growers {
        let status = child.wait().unwrap();
        assert!(status.success(), "a job did not survive: {status:?}");
        assert_eq!(lines.finish(), expected);
    }
    let moved: Vec<Value> = pids.iter().map(|&p| record(&c, p)).filter(|r| r["migrations"].as_u64() > Some(0)).collect();
    assert!(!moved.is_empty(), "no job left node 1: {:?}", pids.iter().map(|&p| record(&c, p)).collect::<Vec<_>>());
}
