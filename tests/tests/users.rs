//! Jobs of an ordinary user, moved between the nodes of a real cluster: real CRIU, real namespaces, real
//! programs (python3, sort, gzip, sh). The user is [`rmosix_testcluster::user::test_user`], an account with a
//! home directory and a supplementary group. What is checked is what the user would check: the output and the
//! files are those of an unmoved run, the exit status arrives, and the job is still theirs, with nothing
//! gained (uid, gid, groups, no capabilities), its limits and umask.

use std::process::{Child, Output, Stdio};
use std::time::Duration;

use rmosix_common::cgroup::{Cgroup, Controller, Hierarchy, ProcessCgroups};
use rmosix_common::control::{Refusal, Request, Response, Target};
use rmosix_testcluster::user::{Lines, TestUser, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, wait_until};

const PYTHON: &str = "/usr/bin/python3";

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn user() -> TestUser {
    test_user().unwrap_or_else(|e| panic!("cannot create the test user: {e}"))
}

/// `mosrun ARGS...` on node 1 as the test user, stdin and stdout piped. Jobs that must not end before
/// the test has moved them wait for their stdin to end before their last lines: waiting for the deputy
/// (`Child::wait`) closes it, and an unmoved run's stdin (`/dev/null`) ends at once.
fn mosrun(c: &Cluster, u: &TestUser, args: &[&str]) -> Child {
    c.command_as(1, u, "mosrun").unwrap().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap()
}

/// `migrate PID TARGET` on node 1 as the test user; the line it prints.
fn migrate(c: &Cluster, u: &TestUser, pid: u32, target: &str) -> String {
    let out = c.command_as(1, u, "migrate").unwrap().args([pid.to_string().as_str(), target]).output().unwrap();
    assert!(out.status.success(), "migrate {pid} {target}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The whole output and exit code of an unmoved run of the same command, as the same user, on node 1.
fn unmoved(c: &Cluster, u: &TestUser, args: &[&str]) -> (String, Option<i32>) {
    let out = c.command_as(1, u, "mosrun").unwrap().args(args).output().unwrap();
    (String::from_utf8(out.stdout).unwrap(), out.status.code())
}

/// Processes of node `i` running `comm`.
fn on_node(c: &Cluster, i: u32, comm: &str) -> Vec<i32> {
    c.processes(i, comm)
}

/// What a refused `migrate` says: it exits 1, prints nothing on stdout, and one line on stderr.
fn refused(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "migrate was not refused: {out:?}");
    assert!(out.stdout.is_empty(), "a refused migrate printed {:?}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "{err}");
    err.trim_end().to_owned()
}

/// The kind and words of migd's refusal to move job `pid` to `target`, asked as `user` (root if `None`).
fn refusal(c: &Cluster, user: Option<(u32, u32)>, pid: u32, target: Target) -> (Refusal, String) {
    let request = Request::Migrate { home_pid: i32::try_from(pid).unwrap(), target };
    match c.ask_migd(1, user, &request).unwrap() {
        Response::Refused { why, message } => (why, message),
        other => panic!("migd did not refuse {request:?}: {other:?}"),
    }
}

/// The record node 1 keeps of the job with home PID `pid`.
fn record(c: &Cluster, pid: u32) -> serde_json::Value {
    let path = c.node_dir(1).join("records").join(format!("{pid}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["record"].clone()
}

/// A refused move left job `pid`, whose program is `comm`, as it was: one copy, at home on node 1 (of
/// two), its record unchanged, its output still flowing.
fn still_at_home(c: &Cluster, pid: u32, comm: &str, lines: &Lines) {
    assert_eq!(on_node(c, 1, comm).len(), 1, "the job still runs at home");
    assert!(on_node(c, 2, comm).is_empty(), "no copy of the job on node 2");
    let record = record(c, pid);
    assert_eq!((&record["node"], &record["migrations"], &record["state"]["kind"]), (&1.into(), &0.into(), &"running".into()), "{record}");
    lines.wait_for(lines.count() + 2);
}

/// The memory cgroup of process `pid` (on cgroup v1 or v2).
fn job_cgroup(pid: i32) -> Cgroup {
    let hierarchy = Hierarchy::detect().unwrap();
    let process = ProcessCgroups::read(nix::unistd::Pid::from_raw(pid)).unwrap();
    hierarchy.cgroup_of(&process, &[Controller::Memory, Controller::Cpuacct]).unwrap()
}

/// The identity lines of `/proc/PID/status`: uids, gids, groups and capability sets.
fn identity(pid: i32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let keep = ["Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"];
    status.lines().filter(|l| keep.iter().any(|k| l.starts_with(k))).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

/// Counts primes, printing progress; exits 3. Also prints what the job sees as its own pid, twice: from
/// `getpid()` and from its `/proc`, which must agree (2, the program under rmosix-init) wherever it runs.
/// Its last 50 lines wait for the end of its stdin.
const PRIMES: &str = r#"
import os, sys
n, found = 2, 0
for line in range(300):
    if line == 250:
        sys.stdin.read()
    limit = n + 3000
    while n < limit:
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            found += 1
        n += 1
    me = open("/proc/self/stat").read().split()[0]
    print(line, found, os.getpid(), me, flush=True)
sys.exit(3)
"#;

#[test]
fn a_users_python_job_moves_to_node_2_and_home_and_stays_theirs() {
    let c = cluster("upy", 2);
    let u = user();
    let args = [PYTHON, "-c", PRIMES];
    let (reference, code) = unmoved(&c, &u, &args);
    assert_eq!(code, Some(3));
    assert_eq!(reference.lines().count(), 300);
    assert!(reference.lines().all(|l| l.ends_with(" 2 2")), "the job sees itself as pid 2 in its own /proc");

    let mut child = mosrun(&c, &u, &args);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(30);
    let [before] = on_node(&c, 1, "python3")[..] else { panic!("one python3 on node 1") };
    let identity_before = identity(before);
    // The job has a cgroup of its own on the node where it runs, named after its home node, home PID and
    // generation (one per move).
    let cgroup_before = job_cgroup(before);
    assert!(cgroup_before.path().as_str().ends_with(&format!("/job-1-{pid}-0")), "{cgroup_before}");
    assert!(identity_before.contains(&format!("Uid: {0} {0} {0} {0}", u.uid)), "{identity_before:?}");

    let said = migrate(&c, &u, pid, "2");
    assert!(said.starts_with(&format!("moved {pid} from node 1 to node 2 in ")), "{said}");
    assert!(on_node(&c, 1, "python3").is_empty(), "no copy left on node 1");
    let [after] = on_node(&c, 2, "python3")[..] else { panic!("one python3 on node 2") };
    let cgroup_after = job_cgroup(after);
    assert!(cgroup_after.path().as_str().ends_with(&format!("/job-1-{pid}-1")), "{cgroup_after}");
    assert!(cgroup_after.procs().unwrap().contains(&nix::unistd::Pid::from_raw(after)));
    // What the job costs on the node, without walking /proc: its CPU time and memory there.
    wait_until(&format!("CPU time of the job in {cgroup_after}"), PATIENCE, || {
        cgroup_after.cpu_time().unwrap() > Duration::from_millis(10)
    });
    assert!(cgroup_after.memory_current().unwrap() > 1 << 20, "{cgroup_after}");
    wait_until(&format!("{cgroup_before}, the cgroup of the copy that left, to go"), PATIENCE, || !cgroup_before.exists());
    // Nothing gained by moving: same uids, gids, groups, and capability sets (none but the bounding set).
    assert_eq!(identity(after), identity_before);
    let groups = identity(after).into_iter().find(|l| l.starts_with("Groups:")).unwrap();
    for g in &u.groups {
        assert!(groups.split_whitespace().any(|x| x == g.to_string()), "group {g} kept: {groups}");
    }

    let n = lines.count();
    lines.wait_for(n + 30);
    let said = migrate(&c, &u, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 1 in ")), "{said}");
    assert!(on_node(&c, 2, "python3").is_empty(), "no copy left on node 2");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(3), "the job's exit status reaches its deputy");
    assert_eq!(lines.finish(), reference, "output identical to an unmoved run");
}

/// Writes 400 numbered lines into the file named by its argument, slowly, with a flush (and fsync) per line,
/// and says how far it got on stdout. The last 100 wait for the end of its stdin.
const WRITER: &str = r#"
import os, sys, time
with open(sys.argv[1], "w") as f:
    for i in range(400):
        if i == 300:
            sys.stdin.read()
        f.write(f"{i} {i * i % 977} {'x' * (i % 50)}\n")
        f.flush()
        os.fsync(f.fileno())
        if i % 10 == 0:
            print(i, flush=True)
        time.sleep(0.01)
print("done", flush=True)
"#;

#[test]
fn a_file_in_the_users_home_written_across_a_move_is_whole() {
    let c = cluster("ufile", 2);
    let u = user();
    let reference_file = u.home.join("rmosix-unmoved.txt");
    let moved_file = u.home.join("rmosix-moved.txt");
    let (out, code) = unmoved(&c, &u, &[PYTHON, "-c", WRITER, reference_file.to_str().unwrap()]);
    assert_eq!((out.lines().last(), code), (Some("done"), Some(0)));

    let mut child = mosrun(&c, &u, &[PYTHON, "-c", WRITER, moved_file.to_str().unwrap()]);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(8);
    let said = migrate(&c, &u, pid, "2");
    assert!(said.contains("from node 1 to node 2"), "{said}");
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), out);
    let written = std::fs::read(&moved_file).unwrap();
    assert_eq!(written, std::fs::read(&reference_file).unwrap(), "the file is what an unmoved run writes");
    let meta = std::fs::metadata(&moved_file).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), u.uid, "the file belongs to the user");
    let _ = std::fs::remove_file(reference_file);
    let _ = std::fs::remove_file(moved_file);
}

/// A shell pipeline of real programs: numbers made slowly by a shell loop, sorted, compressed and
/// decompressed, summed up at the end. Halfway, the loop waits for the end of its stdin.
const PIPELINE: &str = "i=0; while [ $i -lt 300 ]; do [ $i -eq 150 ] && cat >/dev/null; echo $(( (i * 7919) % 1009 )); \
                        i=$((i + 1)); sleep 0.01; done | sort -n | gzip -1 | gzip -dc | uniq -c | sort -rn | head -20; echo end";

#[test]
fn a_shell_pipeline_with_sort_and_gzip_moves_mid_run() {
    let c = cluster("upipe", 2);
    let u = user();
    let args = ["/bin/sh", "-c", PIPELINE];
    let (reference, code) = unmoved(&c, &u, &args);
    assert_eq!(code, Some(0));
    assert!(reference.ends_with("end\n") && reference.lines().count() == 21, "{reference}");

    let mut child = mosrun(&c, &u, &args);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    // Nothing is printed before the loop ends, and it cannot end before its stdin does: move it once every
    // program of the pipeline runs.
    let stages = [("sort", 2), ("gzip", 2), ("uniq", 1), ("head", 1)];
    wait_until("every program of the pipeline to run on node 1", PATIENCE, || {
        stages.iter().all(|&(comm, n)| on_node(&c, 1, comm).len() == n)
    });
    assert_eq!(lines.count(), 0);
    let said = migrate(&c, &u, pid, "2");
    assert!(said.contains("from node 1 to node 2"), "{said}");
    for (comm, n) in stages {
        assert_eq!(on_node(&c, 2, comm).len(), n, "{comm} runs on node 2");
        assert!(on_node(&c, 1, comm).is_empty(), "no {comm} left on node 1");
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference);
}

/// Prints, every 50 ms, the job's open-files limit, its umask, the mode of a file it creates, a variable
/// of its environment and its working directory. The last 20 lines wait for the end of its stdin.
const LIMITS: &str = r#"
import os, resource, sys, time
for i in range(120):
    if i == 100:
        sys.stdin.read()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    mask = os.umask(0); os.umask(mask)
    path = f"rmosix-umask-{os.getppid()}-{i}"
    with open(path, "w"):
        pass
    mode = os.stat(path).st_mode & 0o777
    os.remove(path)
    print(i, soft, hard, oct(mask), oct(mode), os.environ.get("RMOSIX_TEST_VAR"), os.getcwd(), flush=True)
    time.sleep(0.05)
"#;

#[test]
fn the_users_limits_umask_environment_and_directory_hold_after_a_move() {
    let c = cluster("ulimit", 2);
    let u = user();
    let mosrun = rmosix_testcluster::user::reachable_tools(&bin_dir_of_current_test()).unwrap().join("mosrun");
    let script = format!("umask 077; ulimit -n 256; exec {} {PYTHON} -c '{LIMITS}'", mosrun.display());
    let mut child = c
        .command_as(1, &u, "/bin/sh")
        .unwrap()
        .args(["-c", &script])
        .env("RMOSIX_TEST_VAR", "kept across moves")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The deputy is the shell's exec'd mosrun: same pid.
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(10);
    let said = migrate(&c, &u, pid, "2");
    assert!(said.contains("from node 1 to node 2"), "{said}");
    let n = lines.count();
    lines.wait_for(n + 10);
    let said = migrate(&c, &u, pid, "home");
    assert!(said.contains("from node 2 to node 1"), "{said}");
    assert!(child.wait().unwrap().success());
    let text = lines.finish();
    assert_eq!(text.lines().count(), 120);
    let home = u.home.display().to_string();
    for (i, line) in text.lines().enumerate() {
        assert_eq!(line, format!("{i} 256 256 0o77 0o600 kept across moves {home}"), "line {i} of\n{text}");
    }
}

#[test]
fn only_the_owner_and_root_move_a_users_job() {
    let c = cluster("uowner", 2);
    let u = user();
    let script = "import sys, time\nfor i in range(400):\n    if i == 300:\n        sys.stdin.read()\n    print(i, flush=True); time.sleep(0.05)";
    let mut child = mosrun(&c, &u, &[PYTHON, "-c", script]);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(2);
    // Another user (nobody) is refused, in words, and nothing happens to the job.
    let tools = rmosix_testcluster::user::reachable_tools(&bin_dir_of_current_test()).unwrap();
    let mut nobody = c.command(1, "setpriv").unwrap();
    nobody.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(tools.join("migrate")).args([pid.to_string().as_str(), "2"]);
    let why = format!("it is not your job (it belongs to {}); only its owner or root may move it", u.name);
    assert_eq!(refused(&nobody.current_dir("/").output().unwrap()), format!("migrate: cannot move {pid}: {why}"));
    assert_eq!(refusal(&c, Some((65534, 65534)), pid, Target::Node(2)), (Refusal::NotYours, why));
    still_at_home(&c, pid, "python3", &lines);
    // Root may move anyone's job; it stays the user's.
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let [moved] = on_node(&c, 2, "python3")[..] else { panic!("one python3 on node 2") };
    assert!(identity(moved).contains(&format!("Uid: {0} {0} {0} {0}", u.uid)));
    // Alone on an idle cluster it runs as well where it is as anywhere: balance leaves it there. Its owner
    // brings it home.
    let said = migrate(&c, &u, pid, "balance");
    assert!(said.starts_with(&format!("{pid} stays on node 2: it runs best where it is")), "{said}");
    let said = migrate(&c, &u, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 1 in ")), "{said}");
    assert_eq!(on_node(&c, 1, "python3").len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_job_that_cannot_start_says_why_and_exits_125() {
    let c = cluster("unostart", 1);
    let u = user();
    // The deputy sits in a directory its owner may not enter (root's home, 0700): so may not the job.
    let out = c.command_as(1, &u, "mosrun").unwrap().args(["/bin/pwd"]).current_dir("/root").output().unwrap();
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err, "rmosix: cannot enter the working directory (can its owner reach it?)\n");
    assert!(out.stdout.is_empty());
}

/// Whether node `i`'s network holds a TCP connection to node `peer`'s migd that is not closed on node `i`'s
/// side yet (established, or closed by `peer` only).
fn connected_to_migd(c: &Cluster, i: u32, peer: u32) -> bool {
    let migd = c.daemon_pid(i, "migd").unwrap();
    // /proc/PID/net/tcp is the table of PID's network namespace; addresses are in hex, as the kernel holds them.
    let remote = format!("{:08X}:{:04X}", u32::from_le_bytes(c.addr(peer).octets()), rmosix_testcluster::MIGD_PORT);
    let table = std::fs::read_to_string(format!("/proc/{migd}/net/tcp")).unwrap();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // 01: established; 08: close-wait.
        fields.get(2) == Some(&remote.as_str()) && matches!(fields.get(3), Some(&"01" | &"08"))
    })
}

#[test]
fn an_ordinary_user_reaches_infod_and_starts_a_job_on_another_node() {
    let c = cluster("ureach", 2);
    let u = user();
    c.wait_for_nodes(&[1], PATIENCE, "node 1 knows node 2", |_, v| v.nodes.iter().any(|n| n.id == 2 && n.alive)).unwrap();
    let status = c.command_as(1, &u, "mosctl").unwrap().arg("status").output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(String::from_utf8_lossy(&status.stdout).contains("10.213.0.2"));
    // `mosrun -N 2`: started at home, moved at once, its output and status come home. The job waits
    // (a minute at most) until it sees node 2's address, read from a file: a program holding a socket then
    // could not move.
    let script = "i=0; until grep -q -- '-- 10.213.0.2$' /proc/net/fib_trie; do i=$((i + 1)); [ $i -ge 1200 ] && break; \
                  sleep 0.05; done; id -u; ip -4 -o addr show; exit 4";
    let out = c.command_as(1, &u, "mosrun").unwrap().args(["-N", "2", "/bin/sh", "-c", script]).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with(&format!("{}\n", u.uid)), "{said}");
    assert!(said.contains("inet 10.213.0.2/") && !said.contains("inet 10.213.0.1/"), "it ran on node 2: {said}");
}

#[test]
fn a_job_that_ended_away_from_home_is_not_linked_home_again() {
    let c = cluster("uend", 2);
    let u = user();
    let script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; [ $i -eq 2 ] && cat >/dev/null; sleep 0.1; done";
    let mut child = mosrun(&c, &u, &["/bin/sh", "-c", script]);
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(2);
    let said = migrate(&c, &u, pid, "2");
    assert!(said.contains("from node 1 to node 2"), "{said}");
    assert!(connected_to_migd(&c, 2, 1), "the job on node 2 is linked home");
    assert!(child.wait().unwrap().success());
    // The link home ends with the job: node 2 closes it, and has nothing to repair (it would say so before
    // it tried again, and keep the broken link open meanwhile).
    let log_path = c.node_dir(2).join("migd.log");
    let log = || std::fs::read_to_string(&log_path).unwrap();
    wait_until("node 2 to close the ended job's link home", PATIENCE, || {
        !connected_to_migd(&c, 2, 1) || log().contains("linking again")
    });
    let log = log();
    assert!(log.contains("guest job running"), "the job ran on node 2");
    assert!(!log.contains("linking again"), "node 2 tried to link an ended job home:\n{log}");
    assert_eq!(lines.finish(), "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n");
}

#[test]
fn a_node_takes_root_jobs_from_others_only_when_its_policy_says_so() {
    let c = cluster("uroot", 2);
    // Node 2 with the default policy: no root jobs from other nodes.
    let config = c.config(2);
    let text = std::fs::read_to_string(&config).unwrap().replace("allow_root_guests = true", "allow_root_guests = false");
    std::fs::write(&config, text).unwrap();
    c.kill_daemon(2, "migd").unwrap();
    c.start_migd(2).unwrap();

    let script = "import sys, time\nfor i in range(100):\n    if i == 50:\n        sys.stdin.read()\n    print(i, flush=True); time.sleep(0.03)";
    let mut root_job =
        c.command(1, "mosrun").unwrap().args([PYTHON, "-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let root_pid = root_job.id();
    let root_lines = Lines::of(&mut root_job);
    root_lines.wait_for(3);
    let out = c.command(1, "migrate").unwrap().args([root_pid.to_string().as_str(), "2"]).output().unwrap();
    let why = "node 2 does not take root's jobs from other nodes (its policy allow_root_guests is off); run the job as an ordinary user";
    assert_eq!(refused(&out), format!("migrate: cannot move {root_pid}: {why}"));
    assert_eq!(refusal(&c, None, root_pid, Target::Node(2)), (Refusal::TargetRefusesRoot, why.to_owned()));
    still_at_home(&c, root_pid, "python3", &root_lines);
    // An ordinary user's job is welcome there meanwhile.
    let u = user();
    let mut user_job = mosrun(&c, &u, &[PYTHON, "-c", script]);
    let user_pid = user_job.id();
    let user_lines = Lines::of(&mut user_job);
    user_lines.wait_for(3);
    assert!(migrate(&c, &u, user_pid, "2").contains("from node 1 to node 2"));
    assert!(root_job.wait().unwrap().success());
    assert!(user_job.wait().unwrap().success());
    let whole = (0..100).map(|i: u32| i.to_string() + "\n").collect::<String>();
    assert_eq!(root_lines.finish(), whole, "root's job ran on at home, whole");
    assert_eq!(user_lines.finish(), whole);
}
