//! What a job shares with the node it runs on, moved between the nodes of a real cluster as an ordinary user
//! (python3 programs in `programs/`): files it holds locks on, a FIFO with unread data, a child it stopped,
//! files whose names are gone. A move changes nothing the job can see: the program itself checks, before and
//! after each move, and prints what an unmoved run prints. Where someone else could see a difference (a
//! lock another process could take), the test checks from outside too.

use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};

use rmosix_testcluster::user::{Lines, TestUser, test_user};
use rmosix_testcluster::{Cluster, Spec, bin_dir_of_current_test};

const PYTHON: &str = "/usr/bin/python3";
const LOCKS: &str = include_str!("programs/locks.py");
const FIFO: &str = include_str!("programs/fifo.py");
const STOPPED_CHILD: &str = include_str!("programs/stopped_child.py");
const UNLINKED: &str = include_str!("programs/unlinked.py");

fn cluster(name: &str) -> Cluster {
    Cluster::up(Spec::new(name, 2, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn user() -> TestUser {
    test_user().unwrap_or_else(|e| panic!("cannot create the test user: {e}"))
}

/// A new, empty directory `name` in the user's home, theirs.
fn scratch(u: &TestUser, name: &str) -> PathBuf {
    let dir = u.home.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid)).unwrap();
    dir
}

/// `mosrun python3 -c SCRIPT ARGS...` on node 1 as the user, stdin and stdout piped.
fn mosrun(c: &Cluster, u: &TestUser, script: &str, args: &[&str]) -> (Child, ChildStdin, Lines) {
    let mut child = c
        .command_as(1, u, "mosrun")
        .unwrap()
        .args([PYTHON, "-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let lines = Lines::of(&mut child);
    (child, stdin, lines)
}

/// What an unmoved run of the same program prints, given `input` lines on its stdin; it must exit 0.
fn unmoved(c: &Cluster, u: &TestUser, script: &str, args: &[&str], input: usize) -> String {
    let (mut child, mut stdin, lines) = mosrun(c, u, script, args);
    for i in 0..input {
        writeln!(stdin, "line {i}").unwrap();
    }
    drop(stdin);
    assert!(child.wait().unwrap().success());
    lines.finish()
}

/// `migrate PID TARGET` on node 1 as the user; checks that it says the job went from `from` to `to`.
fn migrate(c: &Cluster, u: &TestUser, pid: u32, target: &str, from: u32, to: u32) {
    let out = c.command_as(1, u, "migrate").unwrap().args([pid.to_string().as_str(), target]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate {pid} {target}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(said.starts_with(&format!("moved {pid} from node {from} to node {to} in ")), "{said}");
}

/// Has the job print one more report (a line on its stdin) and waits for its `lines` lines of it.
fn ask(stdin: &mut ChildStdin, output: &Lines, lines: usize) {
    let before = output.count();
    writeln!(stdin, "again").unwrap();
    output.wait_for(before + lines);
}

/// Whether a process other than the job is refused each lock of `locks.py` in `dir` (the flock, the POSIX
/// lock) when it asks without waiting.
fn refused_locks(dir: &Path) -> (bool, bool) {
    let flock = std::fs::File::options().write(true).open(dir.join("flock")).unwrap();
    // SAFETY: flock and lockf on descriptors we own; closing them drops a lock taken by mistake.
    let flock_refused = unsafe { libc::flock(flock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    let lockf = std::fs::File::options().write(true).open(dir.join("lockf")).unwrap();
    // SAFETY: as above.
    let lockf_refused = unsafe { libc::lockf(lockf.as_raw_fd(), libc::F_TLOCK, 0) } != 0;
    (flock_refused, lockf_refused)
}

#[test]
fn a_job_holds_its_flock_and_posix_lock_through_moves() {
    let c = cluster("slock");
    let u = user();
    let plain = scratch(&u, "rmosix-locks-unmoved");
    let reference = unmoved(&c, &u, LOCKS, &[plain.to_str().unwrap()], 2);
    assert_eq!(reference, "flock held lockf held\n".repeat(3));

    let dir = scratch(&u, "rmosix-locks");
    let (mut child, mut stdin, lines) = mosrun(&c, &u, LOCKS, &[dir.to_str().unwrap()]);
    let pid = child.id();
    lines.wait_for(1);
    assert_eq!(refused_locks(&dir), (true, true), "the job holds both locks");
    migrate(&c, &u, pid, "2", 1, 2);
    assert_eq!(refused_locks(&dir), (true, true), "the job holds both locks on node 2");
    ask(&mut stdin, &lines, 1);
    migrate(&c, &u, pid, "home", 2, 1);
    assert_eq!(refused_locks(&dir), (true, true), "the job holds both locks at home again");
    ask(&mut stdin, &lines, 1);
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference, "the job found its locks held throughout");
    assert_eq!(refused_locks(&dir), (false, false), "the locks ended with the job");
    let _ = std::fs::remove_dir_all(plain);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_full_fifo_holds_its_data_once_through_moves() {
    let c = cluster("sfifo");
    let u = user();
    let plain = scratch(&u, "rmosix-fifo-unmoved");
    let reference = unmoved(&c, &u, FIFO, &[plain.join("fifo").to_str().unwrap()], 2);
    let first = reference.lines().next().unwrap();
    let written: usize = first.strip_prefix("wrote ").unwrap().parse().unwrap();
    assert!(written >= 4096, "{reference}");
    let again = format!("read {written} the pattern then wrote {written}\n");
    assert_eq!(reference, format!("{first}\n{again}{again}"));

    let dir = scratch(&u, "rmosix-fifo");
    let (mut child, mut stdin, lines) = mosrun(&c, &u, FIFO, &[dir.join("fifo").to_str().unwrap()]);
    let pid = child.id();
    lines.wait_for(1);
    migrate(&c, &u, pid, "2", 1, 2);
    ask(&mut stdin, &lines, 1);
    migrate(&c, &u, pid, "home", 2, 1);
    ask(&mut stdin, &lines, 1);
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference, "the FIFO held what the job wrote, once, after each move");
    let _ = std::fs::remove_dir_all(plain);
    let _ = std::fs::remove_dir_all(dir);
}

/// The state letter of process `pid` (`T`: stopped).
fn state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap()
}

#[test]
fn a_child_the_job_stopped_is_still_stopped_after_moves() {
    let c = cluster("sstop");
    let u = user();
    let reference = unmoved(&c, &u, STOPPED_CHILD, &[], 2);
    assert_eq!(reference, "child T\nchild T\nchild T\nchild exited 7\n");

    let (mut child, mut stdin, lines) = mosrun(&c, &u, STOPPED_CHILD, &[]);
    let pid = child.id();
    lines.wait_for(1);
    migrate(&c, &u, pid, "2", 1, 2);
    // Seen from node 2: the program runs, its child does not.
    let mut states: Vec<char> = c.processes(2, "python3").into_iter().map(state).collect();
    states.sort_unstable();
    assert!(states.len() == 2 && states[1] == 'T' && states[0] != 'T', "{states:?}");
    ask(&mut stdin, &lines, 1);
    migrate(&c, &u, pid, "home", 2, 1);
    ask(&mut stdin, &lines, 1);
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference, "the job saw its child stopped until it continued it");
}

#[test]
fn files_whose_names_are_gone_read_back_after_moves() {
    let c = cluster("sunlink");
    let u = user();
    let plain = scratch(&u, "rmosix-unlinked-unmoved");
    let reference = unmoved(&c, &u, UNLINKED, &[plain.to_str().unwrap()], 2);
    let report = format!("{}\n{}\n{}\nthe new b ['b', 'c2']\n", "alpha ".repeat(10), "beta ".repeat(10), "gamma ".repeat(10));
    assert_eq!(reference, report.repeat(3));

    let dir = scratch(&u, "rmosix-unlinked");
    let (mut child, mut stdin, lines) = mosrun(&c, &u, UNLINKED, &[dir.to_str().unwrap()]);
    let pid = child.id();
    lines.wait_for(4);
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    migrate(&c, &u, pid, "2", 1, 2);
    assert_eq!(listing(), ["b", "c2"], "no temporary name left behind");
    ask(&mut stdin, &lines, 4);
    migrate(&c, &u, pid, "home", 2, 1);
    assert_eq!(listing(), ["b", "c2"], "no temporary name left behind");
    ask(&mut stdin, &lines, 4);
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.finish(), reference, "the job read its files back whole");
    let _ = std::fs::remove_dir_all(plain);
    let _ = std::fs::remove_dir_all(dir);
}
