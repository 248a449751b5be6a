//! mosrun and migd on a real cluster node: the job runs under its deputy's identity, its output arrives
//! complete and in order wherever the deputy's output goes, its input comes from the deputy, signals reach
//! it, the deputy exits with its status, and a dead deputy takes its job with it.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rmosix_testcluster::{Cluster, Spec, bin_dir_of_current_test};

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn job() -> String {
    env!("CARGO_BIN_EXE_rmx-job").to_owned()
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
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(line.starts_with("step 0 "), "{line}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(running(&c, 1, "rmx-job").is_empty());
}

#[test]
fn killing_the_deputy_kills_the_job() {
    let c = cluster("mkill", 1);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "1000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(running(&c, 1, "rmx-job").len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running(&c, 1, "rmx-job").is_empty() {
        assert!(Instant::now() < deadline, "the job outlived its deputy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_job_runs_as_its_owner_and_others_cannot_move_it() {
    let c = cluster("muser", 1);
    // As nobody (65534): the job's identity is the deputy's.
    let out = as_nobody(&c, "mosrun").args(["sh", "-c", "id -u; id -g"]).current_dir("/").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n65534\n");

    // Root's job can't be moved by nobody.
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "1000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let pid = child.id().to_string();
    let refused = as_nobody(&c, "migrate").args([pid.as_str(), "home"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains(&format!("cannot move {pid}: it is not your job (it belongs to root)")), "{err}");
    let none = c.command(1, "migrate").unwrap().args(["999999", "home"]).output().unwrap();
    assert!(String::from_utf8_lossy(&none.stderr).contains("no job of this node has home PID"));
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Reads a child's stdout lines on a thread; returns the shared list.
fn collect(child: &mut std::process::Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let sink = std::sync::Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out) {
            sink.lock().unwrap().push(line.unwrap());
        }
    });
    lines
}

fn wait_lines(lines: &std::sync::Mutex<Vec<String>>, n: usize) {
    let deadline = Instant::now() + Duration::from_mins(1);
    while lines.lock().unwrap().len() < n {
        assert!(Instant::now() < deadline, "the job stopped printing at {} lines", lines.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let lines = collect(&mut child);
    wait_lines(&lines, 20);
    let said = migrate(&c, pid, "2");
    assert!(said.starts_with(&format!("moved {pid} from node 1 to node 2 in ")), "{said}");
    assert_eq!(running(&c, 1, "rmx-job").len(), 0, "no copy left at home");
    assert_eq!(running(&c, 2, "rmx-job").len(), 1, "one copy on node 2");
    // Node 2 advertises its guest, and node 1 hears of it.
    c.wait_for_nodes(&[1], Duration::from_secs(15), "node 1 sees a guest on node 2", |_, v| {
        v.nodes.iter().any(|n| n.id == 2 && n.guests == Some(1))
    })
    .unwrap();
    let n = lines.lock().unwrap().len();
    wait_lines(&lines, n + 20);
    let said = migrate(&c, pid, "3");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 3 in ")), "{said}");
    assert_eq!(running(&c, 2, "rmx-job").len(), 0);
    assert_eq!(running(&c, 3, "rmx-job").len(), 1);
    let n = lines.lock().unwrap().len();
    wait_lines(&lines, n + 20);
    let said = migrate(&c, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 3 to node 1 in ")), "{said}");
    assert_eq!(running(&c, 3, "rmx-job").len(), 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines.lock().unwrap().join("\n") + "\n", reference(&args));
}

#[test]
fn a_moved_job_keeps_writing_to_the_deputys_file_and_reading_its_stdin() {
    let c = cluster("mio", 2);
    // stdout redirected to a file at home.
    let file = tempfile::NamedTempFile::new().unwrap();
    let args = ["spin", "300", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(file.reopen().unwrap()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(file.path()).unwrap().lines().count() < 20 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    migrate(&c, child.id(), "2");
    assert!(child.wait().unwrap().success());
    assert_eq!(std::fs::read_to_string(file.path()).unwrap(), reference(&args));

    // stdin read after the move.
    let mut child = mosrun(&c, 1).arg(job()).arg("echo").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let lines = collect(&mut child);
    stdin.write_all(b"before the move\n").unwrap();
    wait_lines(&lines, 1);
    migrate(&c, child.id(), "2");
    for i in 0..1000 {
        writeln!(stdin, "after the move {i}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    let got = lines.lock().unwrap().clone();
    assert_eq!(got.len(), 1002, "{:?}", &got[got.len().saturating_sub(3)..]);
    assert_eq!(got[0], "echo before the move");
    assert_eq!(got[1000], "echo after the move 999");
    assert!(got[1001].starts_with("done "));
}

#[test]
fn signals_reach_a_job_on_another_node_and_a_dead_deputy_takes_it_along() {
    let c = cluster("msig2", 2);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "2000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 3);
    migrate(&c, child.id(), "2");
    assert_eq!(running(&c, 2, "rmx-job").len(), 1);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    assert!(running(&c, 2, "rmx-job").is_empty());

    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "2000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 3);
    migrate(&c, child.id(), "2");
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running(&c, 2, "rmx-job").is_empty() {
        assert!(Instant::now() < deadline, "the remote job outlived its deputy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_ordinary_shell_pipeline_moves_and_finishes() {
    let c = cluster("mshell", 2);
    let script = "i=0; while [ $i -lt 150 ]; do echo line $i; i=$((i+1)); sleep 0.02; done | cat -n";
    let mut child = mosrun(&c, 1).args(["sh", "-c", script]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 30);
    migrate(&c, child.id(), "2");
    assert!(child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    let expected: Vec<String> = (0..150).map(|i| format!("{:>6}\tline {i}", i + 1)).collect();
    assert_eq!(*lines.lock().unwrap(), expected);
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
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(c.node_dir(1).join("migd.log")).unwrap();
    assert!(log.contains("peer failed authentication; dropped"), "{log}");
}

#[test]
fn home_records_survive_a_migd_restart_while_the_job_runs_away() {
    let c = cluster("mrestart", 2);
    let args = ["spin", "600", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let lines = collect(&mut child);
    wait_lines(&lines, 10);
    migrate(&c, pid, "2");

    c.kill_daemon(1, "migd").unwrap();
    let record = std::fs::read_to_string(c.node_dir(1).join("records").join(format!("{pid}.json"))).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["record"]["node"], 2, "{record}");
    assert_eq!(record["record"]["migrations"], 1, "{record}");
    let n = lines.lock().unwrap().len();
    c.start_migd(1).unwrap();
    // The deputy and node 2 find the new migd; the output flows again, and the job still moves.
    wait_lines(&lines, n + 20);
    let said = migrate(&c, pid, "home");
    assert!(said.starts_with(&format!("moved {pid} from node 2 to node 1 in ")), "{said}");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines.lock().unwrap().join("\n") + "\n", reference(&args));
}

#[test]
fn mosrun_starts_a_job_on_the_node_asked_and_the_deputy_says_when_that_node_dies() {
    let c = cluster("mstart", 2);
    let args = ["spin", "100000", "2000000"];
    let mut child = mosrun(&c, 1).args(["-N", "2"]).arg(job()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 5);
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&c, 2, "rmx-job").len() != 1 {
        assert!(Instant::now() < deadline, "the job never reached node 2");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(running(&c, 1, "rmx-job").is_empty());
    // Node 2 dies: its migd and everything it ran.
    c.kill_daemon(2, "migd").unwrap();
    for pid in running(&c, 2, "rmx-job").into_iter().chain(running(&c, 2, "rmosix-init")) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
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

#[test]
fn ctrl_z_stops_a_job_away_and_its_deputy_and_fg_resumes_both() {
    let c = cluster("mtstp", 2);
    let mut child = mosrun(&c, 1).arg(job()).args(["spin", "100000", "2000000"]).stdout(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 3);
    migrate(&c, child.id(), "2");
    let deputy = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let remote = running(&c, 2, "rmx-job")[0];
    nix::sys::signal::kill(deputy, nix::sys::signal::Signal::SIGTSTP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while state(remote) != 'T' || state(deputy.as_raw()) != 'T' {
        assert!(Instant::now() < deadline, "job {} deputy {}", state(remote), state(deputy.as_raw()));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Stopped: no output.
    std::thread::sleep(Duration::from_millis(300));
    let n = lines.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines.lock().unwrap().len(), n);
    nix::sys::signal::kill(deputy, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_lines(&lines, n + 5);
    nix::sys::signal::kill(deputy, nix::sys::signal::Signal::SIGINT).unwrap();
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
    let lines = collect(&mut child);
    wait_lines(&lines, 10);
    let out = c.command(1, "migrate").unwrap().args([child.id().to_string().as_str(), "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 2 blocks guests"), "{err}");
    // The job ran on at home, whole.
    assert_eq!(running(&c, 1, "rmx-job").len(), 1);
    assert!(child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines.lock().unwrap().join("\n") + "\n", reference(&args));
}

#[test]
fn a_job_holding_a_tcp_socket_is_refused_with_the_reason_and_runs_on() {
    let c = cluster("mtcp", 2);
    let args = ["tcp", "300", "2000000"];
    let mut child = mosrun(&c, 1).arg(job()).args(args).stdout(Stdio::piped()).spawn().unwrap();
    let lines = collect(&mut child);
    wait_lines(&lines, 5);
    let out = c.command(1, "migrate").unwrap().args([child.id().to_string().as_str(), "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("it cannot move: ") && err.contains("TCP socket") && err.contains("127.0.0.1:"), "{err}");
    assert!(child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lines.lock().unwrap().join("\n") + "\n", reference(&args));
}
