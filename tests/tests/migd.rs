//! mosrun and migd on a real cluster node: the job runs under its deputy's identity, its output arrives
//! complete and in order wherever the deputy's output goes, its input comes from the deputy, signals reach
//! it, the deputy exits with its status, and a dead deputy takes its job with it.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::{Command, Output, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rmosix_common::control::{Refusal, Request, Response, Target};
use rmosix_testcluster::user::Lines;
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, threads_of, wait_until};

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

/// `rmx-job`, from this test process's snapshot of the build.
fn job() -> std::path::PathBuf {
    bin_dir_of_current_test().join("rmx-job")
}

fn reference(args: &[&str]) -> String {
    let out = Command::new(job()).args(args).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A command run on node 1 as nobody (uid and gid 65534), after entering the node (which needs root), from
/// a copy of our tools nobody can reach.
fn as_nobody(c: &Cluster, program: &str) -> Command {
    let tools = rmosix_testcluster::user::reachable_tools(&bin_dir_of_current_test()).unwrap();
    let mut cmd = c.command(1, "setpriv").unwrap();
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(tools.join(program));
    cmd
}

fn mosrun(c: &Cluster, node: u32) -> Command {
    c.command(node, "mosrun").unwrap()
}

/// Processes of the node running `comm`.
fn running(c: &Cluster, node: u32, comm: &str) -> Vec<i32> {
    c.processes(node, comm)
}

fn pid_of(child: &std::process::Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap())
}

/// The record node 1 keeps of the job with home PID `pid`.
fn record(c: &Cluster, pid: u32) -> serde_json::Value {
    let path = c.node_dir(1).join("records").join(format!("{pid}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["record"].clone()
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

/// A refused move left job `pid` as it was: running on node `node` (1 or 2) of `c`, one copy, its
/// record unchanged, its output still flowing.
fn still_runs_where_it_was(c: &Cluster, pid: u32, node: u32, lines: &Lines) {
    assert_eq!(running(c, node, "rmx-job").len(), 1, "the job still runs on node {node}");
    for other in c.node_ids().filter(|&n| n != node) {
        assert!(running(c, other, "rmx-job").is_empty(), "no copy of the job on node {other}");
    }
    let record = record(c, pid);
    assert_eq!((&record["node"], &record["migrations"], &record["state"]["kind"]), (&node.into(), &0.into(), &"running".into()), "{record}");
    lines.wait_for(lines.count() + 3);
}

#[test]
fn a_job_prints_everything_and_its_status_comes_home() {
    let c = cluster("mrun", 1);
    let args = ["spin", "200", "100000"];
    let out = mosrun(&c, 1).arg(job()).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), reference(&args));

    let out = mosrun(&c, 1).args(["sh", "-c", "echo to-stderr >&2; exit 7"]).output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to-stderr\n");

    // A large output is not truncated, whatever the deputy's stdout is: here a file.
    let file = tempfile::NamedTempFile::new().unwrap();
    let args = ["spin", "20000", "10"];
    let status = mosrun(&c, 1).arg(job()).args(args).stdout(file.reopen().unwrap()).status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), reference(&args));

    // A program that does not exist: the job's status says so, as a shell would.
    let out = mosrun(&c, 1).arg("/nonexistent/program").output().unwrap();
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn the_job_reads_the_deputys_stdin() {
    let c = cluster("mstdin", 1);
    let mut child = mosrun(&c, 1).arg(job()).arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input: String = (0..5000).fold(String::new(), |mut s, i| {
        use std::fmt::Write as _;
        let _ = writeln!(s, "line {i}");
        s
    });
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let expected = Command::new(job()).arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut e_in = expected.stdin.as_ref().unwrap();
    e_in.write_all(input.as_bytes()).unwrap();
    let expected = {
        let mut e = expected;
        drop(e.stdin.take());
        e.wait_with_output().unwrap()
    };
    assert_eq!(out.stdout, expected.stdout);
}

#[test]
fn sigint_to_the_deputy_stops_the_job_and_the_deputy_exits_130() {
    let c = cluster("msig", 1);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "1000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(1);
    assert!(lines.lines()[0].starts_with("step 0 "), "{:?}", lines.lines());
    kill(pid_of(&child), Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(running(&c, 1, "rmx-job").is_empty());
}

#[test]
fn killing_the_deputy_kills_the_job() {
    let c = cluster("mkill", 1);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "1000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(1);
    assert_eq!(running(&c, 1, "rmx-job").len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the job to end with its deputy", PATIENCE, || running(&c, 1, "rmx-job").is_empty());
}

#[test]
fn a_job_runs_as_its_owner_and_others_cannot_move_it() {
    let c = cluster("muser", 1);
    // As nobody (65534): the job's identity is the deputy's.
    let out = as_nobody(&c, "mosrun").args(["sh", "-c", "id -u; id -g"]).current_dir("/").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n65534\n");

    // Root's job can't be moved by nobody: refused in words, and nothing happens to it.
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "1000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(1);
    let pid = child.id();
    let why = "it is not your job (it belongs to root); only its owner or root may move it";
    let out = as_nobody(&c, "migrate").args([pid.to_string().as_str(), "home"]).current_dir("/").output().unwrap();
    assert_eq!(refused(&out), format!("migrate: cannot move {pid}: {why}"));
    assert_eq!(refusal(&c, Some((65534, 65534)), pid, Target::Home), (Refusal::NotYours, why.to_owned()));
    still_runs_where_it_was(&c, pid, 1, &lines);

    // A job that does not exist.
    let why = "no job of this node has home PID 999999 (give the PID of the job's mosrun, on the node where mosrun runs)";
    let none = c.command(1, "migrate").unwrap().args(["999999", "home"]).output().unwrap();
    assert_eq!(refused(&none), format!("migrate: cannot move 999999: {why}"));
    assert_eq!(refusal(&c, None, 999_999, Target::Home), (Refusal::NoSuchJob, why.to_owned()));
    child.kill().unwrap();
    child.wait().unwrap();
}

fn migrate(c: &Cluster, pid: u32, target: &str) -> String {
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), target]).output().unwrap();
    assert!(out.status.success(), "migrate {pid} {target}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_job_moves_to_node_2_then_3_then_home_and_its_output_is_whole() {
    let c = cluster("mmove", 3);
    let args = ["spin", "500", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(20);
    let said = migrate(&c, pid, "2");
    assert!(said.starts_with(&format!("moved {pid} from node 1 to node 2 in ")), "{said}");
    assert_eq!(running(&c, 1, "rmx-job").len(), 0, "no copy left at home");
    assert_eq!(running(&c, 2, "rmx-job").len(), 1, "one copy on node 2");
    // Node 2 advertises its guest, and node 1 hears of it.
    c.wait_for_nodes(&[1], PATIENCE, "node 1 sees a guest on node 2", |_, v| {
        v.nodes.iter().any(|n| n.id == 2 && n.guests == Some(1))
    })
    .unwrap();
    lines.wait_for(lines.count() + 20);
    let said = migrate(&c, pid, "3");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 3 in ")), "{said}");
    assert_eq!(running(&c, 2, "rmx-job").len(), 0);
    assert_eq!(running(&c, 3, "rmx-job").len(), 1);
    lines.wait_for(lines.count() + 20);
    let said = migrate(&c, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 3 to node 1 in ")), "{said}");
    assert_eq!(running(&c, 3, "rmx-job").len(), 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines.finish(), reference(&args));
}

#[test]
fn a_multi_threaded_job_moves_with_all_its_threads() {
    let c = cluster("mthread", 2);
    let args = ["threads", "5", "400", "200000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(15);
    let [before] = running(&c, 1, "rmx-job")[..] else { panic!("one rmx-job on node 1") };
    // Read right before the move; the workers live from the first line to the last, so this is what the
    // dump sees.
    assert_eq!(threads_of(before).unwrap(), 6, "5 workers and the main thread at dump time");
    let said = migrate(&c, pid, "2");
    assert!(said.starts_with(&format!("moved {pid} from node 1 to node 2 in ")), "{said}");
    let [after] = running(&c, 2, "rmx-job")[..] else { panic!("one rmx-job on node 2") };
    assert_eq!(threads_of(after).unwrap(), 6, "every thread restored on node 2");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(lines.finish(), reference(&args));
}

#[test]
fn a_moved_job_keeps_writing_to_the_deputys_file_and_reading_its_stdin() {
    let c = cluster("mio", 2);
    // stdout redirected to a file at home.
    let file = tempfile::NamedTempFile::new().unwrap();
    let args = ["spin", "300", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(file.reopen().unwrap()).spawn().unwrap();
    wait_until("20 lines in the deputy's file", PATIENCE, || {
        std::fs::read_to_string(file.path()).unwrap().lines().count() >= 20
    });
    migrate(&c, child.id(), "2");
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), reference(&args));

    // stdin read after the move.
    let mut child = mosrun(&c, 1).arg(job()).arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = Lines::of(&mut child);
    stdin.write_all(b"before the move\n").unwrap();
    lines.wait_for(1);
    migrate(&c, child.id(), "2");
    for i in 0..1000 {
        writeln!(stdin, "after the move {i}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    lines.finish();
    let got = lines.lines();
    assert_eq!(got.len(), 1002, "{:?}", &got[got.len().saturating_sub(3)..]);
    assert_eq!(got[0], "echo before the move");
    assert_eq!(got[1000], "echo after the move 999");
    assert!(got[1001].starts_with("done "));
}

#[test]
fn signals_reach_a_job_on_another_node_and_a_dead_deputy_takes_it_along() {
    let c = cluster("msig2", 2);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "2000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(3);
    migrate(&c, child.id(), "2");
    assert_eq!(running(&c, 2, "rmx-job").len(), 1);
    kill(pid_of(&child), Signal::SIGINT).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(running(&c, 2, "rmx-job").is_empty());

    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "2000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(3);
    migrate(&c, child.id(), "2");
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the job on node 2 to end with its deputy", PATIENCE, || running(&c, 2, "rmx-job").is_empty());
}

#[test]
fn an_ordinary_shell_pipeline_moves_and_finishes() {
    let c = cluster("mshell", 2);
    // At line 100 the loop waits for its stdin to end (at once when run alone; here when the test waits for
    // the deputy, which closes its stdin), so it cannot finish before it is moved.
    let script = "i=0; while [ $i -lt 150 ]; do [ $i -eq 100 ] && cat >/dev/null; echo line $i; i=$((i+1)); sleep 0.02; done | cat -n";
    let mut child = mosrun(&c, 1).args(["sh", "-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let lines = Lines::of(&mut child);
    lines.wait_for(30);
    migrate(&c, child.id(), "2");
    assert!(child.wait().unwrap().success());
    let expected: Vec<String> = (0..150).map(|i| format!("{:>6}\tline {i}", i + 1)).collect();
    lines.finish();
    assert_eq!(lines.lines(), expected);
}

#[test]
fn a_forged_migration_connection_is_refused() {
    use rmosix_common::key::ClusterKey;
    let c = cluster("mforge", 2);
    let wrong = ClusterKey::from_bytes(b"this is not the cluster key at all");
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(c.netns(2))).unwrap();
    let err = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let stream = std::net::TcpStream::connect(("10.213.0.1", rmosix_testcluster::MIGD_PORT)).unwrap();
        rmosix_migd::channel::blocking::Channel::client_tcp(stream, &wrong, 2).unwrap_err()
    })
    .join()
    .unwrap();
    assert!(err.to_string().contains("cluster key"), "{err}");
    let log = c.node_dir(1).join("migd.log");
    wait_until("node 1's migd to log the failed authentication", PATIENCE, || {
        std::fs::read_to_string(&log).unwrap().contains("peer failed authentication; dropped")
    });
    // Nothing came of it: node 1's migd still answers, and runs no guest.
    assert_eq!(c.ask_migd(1, None, &Request::Guests).unwrap(), Response::Guests { count: 0 });
}

#[test]
fn home_records_survive_a_migd_restart_while_the_job_runs_away() {
    let c = cluster("mrestart", 2);
    let args = ["spin", "600", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(10);
    migrate(&c, pid, "2");

    c.kill_daemon(1, "migd").unwrap();
    let record = record(&c, pid);
    assert_eq!(record["node"], 2, "{record}");
    assert_eq!(record["migrations"], 1, "{record}");
    let n = lines.count();
    c.start_migd(1).unwrap();
    // The deputy and node 2 find the new migd; the output flows again, and the job still moves.
    lines.wait_for(n + 20);
    let said = migrate(&c, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 1 in ")), "{said}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(lines.finish(), reference(&args));
}

#[test]
fn mosrun_starts_a_job_on_the_node_asked_and_the_deputy_says_when_that_node_dies() {
    let c = cluster("mstart", 2);
    let args = ["spin", "100000", "2000000"];
    let mut child = mosrun(&c, 1).args(["-N", "2"]).arg(job()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(5);
    // The move is over once home has taken node 2's link (the record names node 2 and the job's PID there);
    // before that, a node 2 that dies leaves the job to be restored at node 1 from the images kept there.
    wait_until("the job to run on node 2, linked home", PATIENCE, || {
        let record = record(&c, pid);
        record["node"] == 2 && record["node_pid"] != 0
    });
    assert_eq!(running(&c, 2, "rmx-job").len(), 1);
    assert!(running(&c, 1, "rmx-job").is_empty());
    // Node 2 dies: its migd and everything it ran.
    c.kill_daemon(2, "migd").unwrap();
    for pid in running(&c, 2, "rmx-job").into_iter().chain(running(&c, 2, "rmosix-init")) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the job was lost: node 2"), "{err}");
}

fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap()
}

/// How many bytes wait unread in the pipe that is process `pid`'s stdin.
fn unread_stdin(pid: i32) -> usize {
    let pipe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/{pid}/fd/0"))
        .unwrap();
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    assert_eq!(rc, 0, "FIONREAD on the stdin of {pid}: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap()
}

#[test]
fn ctrl_z_stops_a_job_away_and_its_deputy_and_fg_resumes_both() {
    let c = cluster("mtstp", 2);
    let mut child = mosrun(&c, 1).arg(job()).arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = Lines::of(&mut child);
    writeln!(stdin, "before the move").unwrap();
    lines.wait_for(1);
    migrate(&c, child.id(), "2");
    let deputy = pid_of(&child);
    let [remote] = running(&c, 2, "rmx-job")[..] else { panic!("one rmx-job on node 2") };
    kill(deputy, Signal::SIGTSTP).unwrap();
    wait_until("the job on node 2 and its deputy to stop", PATIENCE, || {
        state(remote) == 'T' && state(deputy.as_raw()) == 'T'
    });
    // Stopped: a line sent now reaches the job's stdin on node 2 and stays there unread, and nothing is
    // echoed.
    let line = "while stopped\n";
    stdin.write_all(line.as_bytes()).unwrap();
    wait_until("the line to reach the stopped job's stdin", PATIENCE, || unread_stdin(remote) == line.len());
    assert_eq!((state(remote), state(deputy.as_raw())), ('T', 'T'));
    assert_eq!(lines.lines(), ["echo before the move"], "no output while stopped");
    // fg: both run again, and the job reads what waited.
    kill(deputy, Signal::SIGCONT).unwrap();
    lines.wait_for(2);
    assert_eq!(lines.lines()[1], "echo while stopped");
    wait_until("the deputy to run again", PATIENCE, || state(deputy.as_raw()) != 'T');
    kill(deputy, Signal::SIGINT).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
}

#[test]
fn a_node_that_blocks_guests_refuses_a_job_which_runs_on_at_home() {
    let c = cluster("mblock", 2);
    let config = c.config(2);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace("[policy]\n", "[policy]\nblock_guests = true\n");
    std::fs::write(&config, text).unwrap();
    c.kill_daemon(2, "migd").unwrap();
    c.start_migd(2).unwrap();

    let args = ["spin", "300", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(10);
    let why = "node 2 blocks guests (mosctl block, or block_guests in its configuration); choose another node";
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    assert_eq!(refused(&out), format!("migrate: cannot move {pid}: {why}"));
    assert_eq!(refusal(&c, None, pid, Target::Node(2)), (Refusal::TargetBlocksGuests, why.to_owned()));
    // The job ran on at home, whole.
    still_runs_where_it_was(&c, pid, 1, &lines);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference(&args));
}

#[test]
fn a_job_holding_a_tcp_socket_is_refused_with_the_reason_and_runs_on() {
    let c = cluster("mtcp", 2);
    let args = ["tcp", "300", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(5);
    let [job_pid] = running(&c, 1, "rmx-job")[..] else { panic!("one rmx-job on node 1") };
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    let err = refused(&out);
    let (why, message) = refusal(&c, None, pid, Target::Node(2));
    assert_eq!(why, Refusal::NotMigratable);
    assert_eq!(err, format!("migrate: cannot move {pid}: {message}"));
    let (start, end) = (
        format!("it cannot move: pid {job_pid} holds a TCP socket listening on 127.0.0.1:"),
        "; CRIU 4.1 cannot dump inet sockets on Linux 6.16 and later",
    );
    assert!(message.starts_with(&start) && message.ends_with(end), "{message}");
    still_runs_where_it_was(&c, pid, 1, &lines);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference(&args));
}

#[test]
fn a_job_started_to_stay_home_stays_home_after_migd_restarts_and_cannot_start_elsewhere() {
    let c = cluster("mstay", 2);
    let contradiction = mosrun(&c, 1).args(["-h", "-N", "2"]).arg(job()).args(["spin", "5", "1"]).output().unwrap();
    assert_eq!(contradiction.status.code(), Some(125), "{contradiction:?}");
    let err = String::from_utf8_lossy(&contradiction.stderr);
    assert!(err.contains("-h keeps the job on its home node, node 1, and -N 2 asks for another"), "{err}");

    let args = ["spin", "400", "2000000"];
    let mut child = mosrun(&c, 1).arg("-h").arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = Lines::of(&mut child);
    lines.wait_for(5);
    let stays = format!("migrate: cannot move {pid}: it was started to stay on its home node (mosrun -h)");
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    assert_eq!(refused(&out), stays);
    // migd restarts; the deputy takes the job up again, and it still stays home.
    c.kill_daemon(1, "migd").unwrap();
    let n = lines.count();
    c.start_migd(1).unwrap();
    lines.wait_for(n + 10);
    let out = c.command(1, "migrate").unwrap().args([pid.to_string().as_str(), "2"]).output().unwrap();
    assert_eq!(refused(&out), stays);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference(&args));
}
