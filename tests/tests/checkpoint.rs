//! Checkpoint and restore of whole jobs with real CRIU, as root: the job's output after a move is exactly
//! what an unmoved run prints, in the same and in another network namespace, for single- and multi-threaded
//! programs, open files, and forked children; a job CRIU can't move is refused with a reason and keeps
//! running; a restore that fails leaves the original to resume, and no zombie.
//!
//! A move changes nothing the job can see, as the job itself checks (real programs, python3, in
//! `programs/`): a child it stopped is still stopped, after a move and after one given up; files whose
//! names are gone read back, and the temporary names the dump gave them are gone; its flock and POSIX locks
//! are still its own; a full FIFO holds its data once. These move jobs the way migd does: the frozen copy
//! ends before the restore.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use rmosix_checkpoint::criu::{Criu, DEFAULT_CRIU, Placement};
use rmosix_checkpoint::images::ImageDir;
use rmosix_checkpoint::job::{Job, JobError, JobSpec, Stdio, placement};
use rmosix_checkpoint::migratable::Reason;
use rmosix_checkpoint::transfer;
use rmosix_common::cgroup::{CONTROLLERS, Hierarchy, ProcessCgroups};
use rmosix_testcluster::{Cluster, Spec, bin_dir_of_current_test};

const IMAGES: &str = "/dev/shm/rmosix-test";

fn criu() -> Criu {
    let path = std::env::var_os("RMOSIX_CRIU").map_or_else(|| PathBuf::from(DEFAULT_CRIU), PathBuf::from);
    assert!(path.exists(), "no CRIU at {}: run `cargo xtask setup`", path.display());
    let criu = Criu::new(path, "/dev/shm/rmosix-test-logs").unwrap_or_else(|e| panic!("{e}"));
    criu.check().unwrap_or_else(|e| panic!("{e}"));
    criu
}

fn job_program() -> OsString {
    env!("CARGO_BIN_EXE_rmx-job").into()
}

fn spec(args: &[&str]) -> JobSpec {
    JobSpec {
        init: bin_dir_of_current_test().join("rmosix-init"),
        program: job_program(),
        args: args.iter().map(OsString::from).collect(),
        env: std::env::vars_os().collect(),
        cwd: std::env::current_dir().unwrap(),
        credentials: None,
        umask: 0o022,
        rlimits: Vec::new(),
    }
}

/// What an unmoved run prints.
fn reference(args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(job_program()).args(args).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// Reads a pipe's lines on a thread, sending each as it arrives; ends at EOF.
fn reader(fd: OwnedFd) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(File::from(fd)).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    rx
}

fn take(rx: &mpsc::Receiver<String>, n: usize, into: &mut Vec<String>) {
    for _ in 0..n {
        into.push(rx.recv_timeout(Duration::from_mins(1)).expect("job output stalled"));
    }
}

fn drain(rx: &mpsc::Receiver<String>, into: &mut Vec<String>) {
    while let Ok(line) = rx.recv_timeout(Duration::from_mins(2)) {
        into.push(line);
    }
}

/// Moves a running job: dump (frozen), restore where `to` says, commit. Returns the new job and its stdio.
fn move_job(criu: &Criu, job: &Job, from: &Placement, to: Placement) -> (Job, Stdio) {
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(criu, &images, from).unwrap_or_else(|e| panic!("{e}"));
    let (restored, stdio) = Job::restore(criu, &images, to, None).unwrap_or_else(|e| panic!("{e}"));
    frozen.commit().unwrap();
    (restored, stdio)
}

/// Runs `args` as a job, moves it once after `before` lines, and checks the whole output and exit status.
fn moved_run_matches(args: &[&str], before: usize, to: impl FnOnce() -> Placement) {
    let criu = criu();
    let expected = reference(args);
    let (job, stdio) = Job::spawn(&spec(args), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, before, &mut seen);
    let (restored, new_stdio) = move_job(&criu, &job, &Placement::default(), to());
    // The old pipe ends when the old copy is gone; whatever it had buffered comes first.
    drain(&rx, &mut seen);
    assert_eq!(job.wait().ok(), Some(137), "the old copy was killed (SIGKILL) and reaped by commit");
    let rx = reader(new_stdio.stdout);
    drain(&rx, &mut seen);
    assert_eq!(restored.wait().unwrap(), 0);
    assert_eq!(seen, expected);
}

#[test]
fn a_cpu_bound_job_restored_in_the_same_namespace_prints_what_an_unmoved_run_prints() {
    moved_run_matches(&["spin", "300", "300000"], 20, Placement::default);
}

#[test]
fn a_multi_threaded_job_survives_a_move() {
    moved_run_matches(&["threads", "5", "200", "200000"], 15, Placement::default);
}

#[test]
fn a_job_that_forked_a_child_survives_a_move() {
    moved_run_matches(&["fork", "300", "300000"], 20, Placement::default);
}

#[test]
fn open_files_keep_their_offsets_and_contents() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let data: Vec<u8> = (0..10_000u32).map(|i| u8::try_from(i * 31 % 251).unwrap()).collect();
    std::fs::write(&input, &data).unwrap();
    let (plain_out, moved_out) = (dir.path().join("plain"), dir.path().join("moved"));
    let (i, p, m) = (input.to_str().unwrap(), plain_out.to_str().unwrap(), moved_out.to_str().unwrap());
    let expected = reference(&["files", i, p, "300", "300000"]);

    let criu = criu();
    let (job, stdio) = Job::spawn(&spec(&["files", i, m, "300", "300000"]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 25, &mut seen);
    let (restored, new_stdio) = move_job(&criu, &job, &Placement::default(), Placement::default());
    drain(&rx, &mut seen);
    drain(&reader(new_stdio.stdout), &mut seen);
    assert_eq!(restored.wait().unwrap(), 0);
    assert_eq!(seen, expected);
    assert_eq!(std::fs::read(&moved_out).unwrap(), std::fs::read(&plain_out).unwrap());
}

#[test]
fn a_job_moves_between_network_namespaces_through_a_tcp_stream_and_back() {
    let cluster = Cluster::up(Spec::new("ckpt", 2, bin_dir_of_current_test())).unwrap();
    let node = |i: u32| {
        placement(Some(&Path::new("/run/netns").join(cluster.netns(i))), &cluster.cgroup_dirs(i)).unwrap()
    };
    let criu = criu();
    let args = ["spin", "400", "300000"];
    let expected = reference(&args);
    let (job, stdio) = Job::spawn(&spec(&args), &node(1)).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 20, &mut seen);

    // Node 1 dumps and streams the images over TCP to node 2, which unpacks and restores them.
    let source_images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(&criu, &source_images, &node(1)).unwrap();
    let listener = in_netns(&cluster.netns(2), || std::net::TcpListener::bind("10.213.0.2:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let src = source_images.path().to_owned();
    // In migd the two sides derive this key from their authenticated handshake.
    let key: transfer::StreamKey = rand::random();
    let sender = std::thread::spawn({
        let ns = cluster.netns(1);
        move || {
            in_netns(&ns, || {
                let mut stream = std::net::TcpStream::connect(("10.213.0.2", port)).unwrap();
                transfer::pack(&src, &mut stream, &key).unwrap();
                stream.flush().unwrap();
            });
        }
    });
    let (mut conn, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "10.213.0.1");
    let dest_images = ImageDir::create(Path::new(IMAGES)).unwrap();
    transfer::unpack(&mut conn, dest_images.path(), &key).unwrap();
    sender.join().unwrap();
    let (on_node2, stdio2) = Job::restore(&criu, &dest_images, node(2), None).unwrap();
    frozen.commit().unwrap();
    drop((source_images, dest_images));
    drain(&rx, &mut seen);

    // It runs in node 2's namespace and cgroups now.
    let cgroups = ProcessCgroups::read(nix::unistd::Pid::from_raw(on_node2.pid())).unwrap();
    let cgroup = Hierarchy::detect().unwrap().cgroup_of(&cgroups, CONTROLLERS).unwrap();
    assert_eq!(cgroup, cluster.cgroup(2));
    let ns = std::fs::read_link(format!("/proc/{}/ns/net", on_node2.pid())).unwrap();
    let node2_ns = in_netns(&cluster.netns(2), || std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(ns, node2_ns);

    // And back home, after some more output.
    let rx2 = reader(stdio2.stdout);
    take(&rx2, 20, &mut seen);
    let (home, stdio3) = move_job(&criu, &on_node2, &node(2), node(1));
    drain(&rx2, &mut seen);
    drain(&reader(stdio3.stdout), &mut seen);
    assert_eq!(home.wait().unwrap(), 0);
    assert_eq!(seen, expected);
}

fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let ns = File::open(Path::new("/run/netns").join(netns)).unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn a_job_holding_a_tcp_socket_is_refused_with_the_reason_and_keeps_running() {
    let criu = criu();
    let args = ["tcp", "200", "300000"];
    let expected = reference(&args);
    let (job, stdio) = Job::spawn(&spec(&args), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 5, &mut seen);
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    match job.dump(&criu, &images, &Placement::default()) {
        Err(JobError::NotMigratable { reasons, .. }) => {
            assert!(reasons.iter().any(|r| matches!(r, Reason::InetSocket { .. })), "{reasons:?}");
            let text = JobError::NotMigratable { pid: job.pid(), reasons }.to_string();
            assert!(text.contains("TCP") && text.contains("127.0.0.1"), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drain(&rx, &mut seen);
    assert_eq!(job.wait().unwrap(), 0);
    assert_eq!(seen, expected);
}

#[test]
fn a_failed_restore_leaves_the_original_to_resume() {
    let criu = criu();
    let args = ["spin", "300", "300000"];
    let expected = reference(&args);
    let (job, stdio) = Job::spawn(&spec(&args), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 10, &mut seen);
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(&criu, &images, &Placement::default()).unwrap();
    // Lines written before the freeze may still be in the pipe; after them, nothing while frozen.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        seen.push(line);
    }
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "a frozen job printed");
    // Corrupt the core image of every task.
    for entry in std::fs::read_dir(images.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("core-") {
            std::fs::write(&path, b"garbage").unwrap();
        }
    }
    let err = Job::restore(&criu, &images, Placement::default(), None).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("CRIU restore") && text.contains("log: /dev/shm/rmosix-test-logs/"), "{text}");
    frozen.abort();
    drain(&rx, &mut seen);
    assert_eq!(job.wait().unwrap(), 0);
    assert_eq!(seen, expected);
}

/// criu dumps an ordinary user's job as that user, so the user can stop it (`kill -STOP`): the dump must
/// then fail within its limit, and the job run on where it was, its output whole. The criu here is the
/// real one behind a wrapper that, once armed, stops itself as the user before it answers, so the stop
/// always comes before the dump could end.
#[test]
fn a_criu_stopped_by_the_jobs_owner_fails_the_dump_and_the_job_runs_on() {
    let user = rmosix_testcluster::user::test_user().unwrap();
    let dir = PathBuf::from(format!("/dev/shm/rmosix-test-stopped-criu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (wrapper, armed) = (dir.join("criu"), dir.join("armed"));
    let real = criu();
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = swrk ] && [ -e {armed} ] && [ \"$(id -u)\" = {uid} ]; then kill -STOP $$; fi\n\
             exec {real} \"$@\"\n",
            armed = armed.display(),
            uid = user.uid,
            real = real.path().display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let criu = Criu::new(&wrapper, "/dev/shm/rmosix-test-logs").unwrap().with_answer_limit(Duration::from_secs(3));
    let script = "i=0; while [ $i -lt 150 ]; do echo $i; i=$((i + 1)); sleep 0.02; done";
    let mut spec = spec(&[]);
    spec.program = "/bin/sh".into();
    spec.args = vec!["-c".into(), script.into()];
    spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    spec.cwd = "/".into();
    spec.credentials =
        Some(rmosix_checkpoint::job::Credentials { uid: user.uid, gid: user.gid, groups: user.groups.clone() });
    let (job, stdio) = Job::spawn(&spec, &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 10, &mut seen);
    File::create(&armed).unwrap();
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let error = job.dump(&criu, &images, &Placement::default()).map(|_| ()).unwrap_err();
    assert!(error.to_string().contains("did not answer within 3 s"), "{error}");
    drain(&rx, &mut seen);
    let expected: Vec<String> = (0..150).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected, "the job ran on, its output whole");
    assert_eq!(job.wait().unwrap(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A job running `python3 -c SCRIPT ARGS...`.
fn python(script: &str, args: &[&str]) -> JobSpec {
    let mut spec = spec(&[]);
    spec.program = "/usr/bin/python3".into();
    spec.args = ["-c", script].iter().chain(args).map(OsString::from).collect();
    spec
}

/// Moves a job the way migd does: dump, end the frozen copy (so that whatever it holds is free), restore
/// stopped, resume.
fn move_letting_go_first(criu: &Criu, job: &Job) -> (Job, Stdio) {
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(criu, &images, &Placement::default()).unwrap_or_else(|e| panic!("{e}"));
    frozen.commit().unwrap();
    let (restored, stdio) =
        Job::restore_stopped(criu, &images, Placement::default(), None).unwrap_or_else(|e| panic!("{e}"));
    restored.resume();
    (restored, stdio)
}

/// A dump that is given up: the job resumes where it was.
fn failed_move(criu: &Criu, job: &Job) {
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    job.dump(criu, &images, &Placement::default()).unwrap_or_else(|e| panic!("{e}")).abort();
}

/// The job's stdin, one line at a time.
fn say(stdin: &mut File, line: &str) {
    writeln!(stdin, "{line}").unwrap();
}

const STOPPED_CHILD: &str = include_str!("programs/stopped_child.py");

#[test]
fn a_child_the_job_stopped_stays_stopped_after_a_failed_move_and_after_a_move() {
    let criu = criu();
    let (job, stdio) = Job::spawn(&python(STOPPED_CHILD, &[]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    let mut seen = Vec::new();
    take(&rx, 1, &mut seen);
    failed_move(&criu, &job);
    say(&mut input, "after a failed move");
    take(&rx, 1, &mut seen);
    let (moved, stdio) = move_letting_go_first(&criu, &job);
    drain(&rx, &mut seen);
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    say(&mut input, "after a move");
    take(&rx, 1, &mut seen);
    drop(input);
    drain(&rx, &mut seen);
    assert_eq!(moved.wait().unwrap(), 0);
    assert_eq!(seen, ["child T", "child T", "child T", "child exited 7"], "the job sees its child stopped throughout");
}

/// Zombies among this process's children, in a PID namespace below ours (what a failed restore of a job
/// leaves), but exited job inits (`rmosix-init`) that other tests have yet to reap.
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let depth = |status: &str| status.lines().find_map(|l| l.strip_prefix("NSpid:")).map_or(0, |l| l.split_whitespace().count());
    let ours = depth(&std::fs::read_to_string("/proc/self/status").unwrap());
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map_or("", str::trim);
        if field("PPid:") == me && field("State:").starts_with('Z') && depth(&status) > ours && field("Name:") != "rmosix-init" {
            zombies.push(format!("{} ({})", entry.file_name().to_string_lossy(), field("Name:")));
        }
    }
    zombies
}

#[test]
fn a_restore_that_fails_after_forking_the_job_leaves_no_zombie_and_the_original_resumes() {
    let criu = criu();
    let args = ["spin", "200", "300000"];
    let expected = reference(&args);
    let (job, stdio) = Job::spawn(&spec(&args), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 5, &mut seen);
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(&criu, &images, &Placement::default()).unwrap();
    // Cut every process's fs image in half: CRIU finds out in the restored processes, after forking them.
    let mut cut = 0;
    for entry in std::fs::read_dir(images.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("fs-") {
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(file.metadata().unwrap().len() / 2).unwrap();
            cut += 1;
        }
    }
    assert_eq!(cut, 2, "an fs image for rmosix-init and one for the program");
    let error = Job::restore(&criu, &images, Placement::default(), None).unwrap_err().to_string();
    assert!(error.contains("CRIU restore") && error.contains("fs-"), "{error}");
    assert_eq!(zombie_children(), Vec::<String>::new(), "the failed restore's processes are reaped");
    frozen.abort();
    drain(&rx, &mut seen);
    assert_eq!(job.wait().unwrap(), 0);
    assert_eq!(seen, expected);
}

const UNLINKED: &str = include_str!("programs/unlinked.py");

#[test]
fn files_whose_names_are_gone_move_and_read_back_and_leave_no_temporary_names() {
    let criu = criu();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (job, stdio) = Job::spawn(&python(UNLINKED, &[dir.path().to_str().unwrap()]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    let mut seen = Vec::new();
    take(&rx, 4, &mut seen);
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    // The dump names `c` again (link_remap.N) for the restore; a move given up removes that name.
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    let frozen = job.dump(&criu, &images, &Placement::default()).unwrap_or_else(|e| panic!("{e}"));
    let during = listing();
    assert!(during.len() == 3 && during[2].starts_with("link_remap."), "{during:?}");
    frozen.abort();
    drop(images);
    assert_eq!(listing(), ["b", "c2"]);
    say(&mut input, "after a failed move");
    take(&rx, 4, &mut seen);
    let (moved, stdio) = move_letting_go_first(&criu, &job);
    assert_eq!(listing(), ["b", "c2"], "the restore removed the temporary name");
    drain(&rx, &mut seen);
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    say(&mut input, "after a move");
    drop(input);
    drain(&rx, &mut seen);
    assert_eq!(moved.wait().unwrap(), 0);
    let report = ["alpha ".repeat(10), "beta ".repeat(10), "gamma ".repeat(10), "the new b ['b', 'c2']".to_owned()];
    assert_eq!(seen, [report.clone(), report.clone(), report].concat());
}

const LOCKS: &str = include_str!("programs/locks.py");

/// Whether a process other than the job is refused each lock of `locks.py` in `dir` when it asks without
/// waiting.
fn locks_taken_by_someone_else(dir: &Path) -> (bool, bool) {
    use std::os::fd::AsRawFd as _;
    let flock = File::options().write(true).open(dir.join("flock")).unwrap();
    // SAFETY: flock and lockf on descriptors we own.
    let flock_refused = unsafe { libc::flock(flock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    let lockf = File::options().write(true).open(dir.join("lockf")).unwrap();
    // SAFETY: as above; closing `lockf` drops a lock taken by mistake.
    let lockf_refused = unsafe { libc::lockf(lockf.as_raw_fd(), libc::F_TLOCK, 0) } != 0;
    (flock_refused, lockf_refused)
}

#[test]
fn a_job_holding_an_flock_and_a_posix_lock_still_holds_both_after_a_move() {
    let criu = criu();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (job, stdio) = Job::spawn(&python(LOCKS, &[dir.path().to_str().unwrap()]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 1, &mut seen);
    assert_eq!(locks_taken_by_someone_else(dir.path()), (true, true));
    let (moved, stdio) = move_letting_go_first(&criu, &job);
    drain(&rx, &mut seen);
    assert_eq!(locks_taken_by_someone_else(dir.path()), (true, true), "the moved job holds both locks");
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    say(&mut input, "after a move");
    drop(input);
    drain(&rx, &mut seen);
    assert_eq!(moved.wait().unwrap(), 0);
    assert_eq!(seen, ["flock held lockf held", "flock held lockf held"], "the job finds its locks held");
    assert_eq!(locks_taken_by_someone_else(dir.path()), (false, false), "and they went with it");
}

const FIFO: &str = include_str!("programs/fifo.py");

#[test]
fn a_full_fifo_holds_its_data_once_after_a_move() {
    let criu = criu();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let fifo = dir.path().join("fifo");
    let (job, stdio) = Job::spawn(&python(FIFO, &[fifo.to_str().unwrap()]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut seen = Vec::new();
    take(&rx, 1, &mut seen);
    let (moved, stdio) = move_letting_go_first(&criu, &job);
    drain(&rx, &mut seen);
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    say(&mut input, "read it all");
    drop(input);
    drain(&rx, &mut seen);
    assert_eq!(moved.wait().unwrap(), 0);
    let written: usize = seen[0].strip_prefix("wrote ").unwrap().parse().unwrap();
    assert!(written >= 4096, "{seen:?}");
    assert_eq!(seen[1..], [format!("read {written} the pattern then wrote {written}")], "once, whole");
}

const LARGE_DELETED: &str = include_str!("programs/large_deleted.py");

#[test]
fn a_job_holding_a_deleted_file_over_the_ghost_limit_is_refused_with_the_reason_and_runs_on() {
    let criu = criu();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("scratch");
    let (job, stdio) = Job::spawn(&python(LARGE_DELETED, &[file.to_str().unwrap()]), &Placement::default()).unwrap();
    let rx = reader(stdio.stdout);
    let mut input = File::from(stdio.stdin);
    let mut seen = Vec::new();
    take(&rx, 1, &mut seen);
    let images = ImageDir::create(Path::new(IMAGES)).unwrap();
    match job.dump(&criu, &images, &Placement::default()) {
        Err(JobError::NotMigratable { reasons, .. }) => {
            let [Reason::LargeDeletedFile { path, bytes, .. }] = &reasons[..] else { panic!("{reasons:?}") };
            assert_eq!((path.as_str(), *bytes >= 257 << 20), (file.to_str().unwrap(), true), "{reasons:?}");
            let text = reasons[0].to_string();
            let said = format!("{}, deleted, of {} MiB; a deleted file travels in the images, up to 256 MiB", file.display(), bytes.div_ceil(1 << 20));
            assert!(text.ends_with(&said), "{text}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    say(&mut input, "are you there?");
    drop(input);
    drain(&rx, &mut seen);
    assert_eq!(job.wait().unwrap(), 0);
    assert_eq!(seen, ["holding it", "still here"]);
}
