//! migd under load and under hostile local input, on a real cluster: a burst of jobs from one user all
//! finish right and migd gives back what it took for them (threads, descriptors, memory); a user who opens
//! hundreds of control connections and sends nothing holds only a bounded part of migd, for seconds, and
//! another user's jobs run meanwhile.
//!
//! The numbers these tests print (`--nocapture`) are the ones recorded in RELIABILITY.md, "Under load".

use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rmosix_common::control::{self, Refusal, Request, Response};
use rmosix_testcluster::user::{TestUser, test_user};
use rmosix_testcluster::{Cluster, PATIENCE, Spec, bin_dir_of_current_test, threads_of, wait_until};

/// Jobs started at once in the burst.
const JOBS: u32 = 200;
/// Idle control connections the hostile user opens.
const IDLE: usize = 500;
/// migd's `requests_per_user` in the test cluster: the default.
const PER_USER: usize = 32;

fn cluster(name: &str, nodes: u32) -> Cluster {
    Cluster::up(Spec::new(name, nodes, bin_dir_of_current_test()))
        .unwrap_or_else(|e| panic!("cannot start test cluster {name}: {e:#}"))
}

fn user() -> TestUser {
    test_user().unwrap_or_else(|e| panic!("cannot create the test user: {e}"))
}

/// What a process holds: threads, open descriptors, resident memory (KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Usage {
    threads: usize,
    fds: usize,
    rss_kib: u64,
}

impl Usage {
    fn of(pid: i32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("migd {pid}: {e}"));
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        Self { threads: threads_of(pid).unwrap(), fds, rss_kib }
    }

    fn max(self, other: Self) -> Self {
        Self {
            threads: self.threads.max(other.threads),
            fds: self.fds.max(other.fds),
            rss_kib: self.rss_kib.max(other.rss_kib),
        }
    }

    /// Within `slack` of `base`: what a process holds when it is idle again.
    fn back_to(self, base: Self, slack: Self) -> bool {
        self.threads <= base.threads + slack.threads
            && self.fds <= base.fds + slack.fds
            && self.rss_kib <= base.rss_kib + slack.rss_kib
    }
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} threads, {} fds, {} MiB resident", self.threads, self.fds, self.rss_kib.div_ceil(1024))
    }
}

/// Samples `pid` until stopped and returns the most it held.
struct Peak {
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<Usage>,
}

impl Peak {
    fn watch(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&stop);
        let sampler = std::thread::spawn(move || {
            let mut peak = Usage::of(pid);
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(Usage::of(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        Self { stop, sampler }
    }

    fn end(self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap()
    }
}

/// The program of job `n`: a real shell, a little work, two lines and a status of its own.
const JOB: &str = r#"echo "start $1"; i=0; while [ "$i" -lt 2000 ]; do i=$((i + 1)); done; echo "end $1 $i"; exit $(($1 % 7))"#;

fn start(c: &Cluster, u: &TestUser, n: u32) -> Child {
    c.command_as(1, u, "mosrun")
        .unwrap()
        .args(["sh", "-c", JOB, "job", &n.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Job `n` printed its two lines and ended with its own status.
fn finished_right(n: u32, child: Child) {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("start {n}\nend {n} 2000\n"), "job {n}: {stderr}");
    assert_eq!(out.status.code(), Some(i32::try_from(n % 7).unwrap()), "job {n}: {stderr}");
}

/// Starts `count` jobs at once, numbered from `first`, and checks each.
fn burst(c: &Cluster, u: &TestUser, first: u32, count: u32) {
    let children: Vec<(u32, Child)> = (first..first + count).map(|n| (n, start(c, u, n))).collect();
    for (n, child) in children {
        finished_right(n, child);
    }
}

#[test]
fn two_hundred_jobs_at_once_finish_right_and_migd_gives_back_what_it_took() {
    let c = cluster("load", 3);
    let u = user();
    let migd = c.daemon_pid(1, "migd").unwrap();
    // A first, smaller burst: what migd keeps once it has served any jobs at all (the allocator's arenas,
    // the thread stacks it caches) is part of its base, not a leak.
    burst(&c, &u, 0, 20);
    let slack = Usage { threads: 2, fds: 2, rss_kib: 16 << 10 };
    let mut base = Usage::of(migd);
    wait_until("migd idle after the first burst", PATIENCE, || {
        let now = Usage::of(migd);
        let settled = now == base;
        base = now;
        settled
    });
    eprintln!("migd on node 1 before {JOBS} jobs: {base}");

    let peak = Peak::watch(migd);
    burst(&c, &u, 1000, JOBS);
    let peak = peak.end();
    eprintln!("migd on node 1 at the peak of {JOBS} jobs: {peak}");
    assert!(peak.threads > base.threads, "the jobs were served by migd ({peak} against {base})");

    let mut after = Usage::default();
    wait_until(&format!("migd back to its base ({base}, give or take {slack})"), PATIENCE, || {
        after = Usage::of(migd);
        after.back_to(base, slack)
    });
    eprintln!("migd on node 1 after {JOBS} jobs: {after}");
    // What stays after one burst is what the allocator keeps for the next, not a leak: a second burst
    // leaves migd where the first did. The allocator keeps what the busiest moment took, so a second burst
    // that ran more jobs at the same moment than the first (the machine's other load decides) may leave
    // as much more as its peak took more.
    let peak_again = Peak::watch(migd);
    burst(&c, &u, 2000, JOBS);
    let peak_again = peak_again.end();
    let higher_peak = peak_again.rss_kib.saturating_sub(peak.rss_kib);
    eprintln!("migd on node 1 at the peak of {JOBS} more jobs: {peak_again}");
    let mut again = Usage::default();
    wait_until(&format!("migd back where the first burst left it ({after})"), PATIENCE, || {
        again = Usage::of(migd);
        again.back_to(Usage { rss_kib: after.rss_kib, ..base }, Usage { rss_kib: (4 << 10) + higher_peak, ..slack })
    });
    eprintln!("migd on node 1 after {JOBS} more jobs: {again}");
    // And every job's record says it ended, with its status.
    wait_until("every record of node 1 says its job exited", PATIENCE, || {
        let records = std::fs::read_dir(c.node_dir(1).join("records")).unwrap();
        let states: Vec<serde_json::Value> = records
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .map(|e| serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(e.path()).unwrap()).unwrap())
            .map(|r| r["record"]["state"].clone())
            .collect();
        states.len() == 20 + 2 * JOBS as usize && states.iter().all(|s| s["kind"] == "exited")
    });
}

/// Connects to migd's control socket `count` times as uid/gid `id`, from a thread that takes that identity
/// for itself only (the credentials migd reads are those of the connecting thread).
fn connect_as(socket: &std::path::Path, id: u32, count: usize) -> Vec<UnixStream> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        let id = libc::c_long::from(id);
        // SAFETY: system calls that change only this thread's credentials; the thread ends after connecting.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
        }
        (0..count).map(|_| UnixStream::connect(&socket).unwrap()).collect()
    })
    .join()
    .unwrap()
}

#[test]
fn five_hundred_idle_connections_of_one_user_hold_little_of_migd_for_seconds_and_others_run_jobs() {
    const NOBODY: u32 = 65534;
    let c = cluster("idle", 1);
    let u = user();
    let migd = c.daemon_pid(1, "migd").unwrap();
    let base = Usage::of(migd);
    eprintln!("migd before {IDLE} idle connections: {base}");

    let mut idle = connect_as(&c.migd_socket(1), NOBODY, IDLE);
    // migd gives threads to the user's first connections only; the rest wait without one or are turned away.
    let held = Usage::of(migd);
    eprintln!("migd holding {IDLE} idle connections of uid {NOBODY}: {held}");
    assert!(held.threads <= base.threads + PER_USER + 4, "{held} against {base}");

    // Another user's jobs run, and root's own tools are answered.
    let started = Peak::watch(migd);
    burst(&c, &u, 0, 5);
    match c.ask_migd(1, None, &Request::Guests).unwrap() {
        Response::Guests { count } => assert_eq!(count, 0),
        other => panic!("root's question was not answered: {other:?}"),
    }
    let during = started.end();
    eprintln!("migd at the peak while another user ran 5 jobs: {during}");

    // Every idle connection is closed within seconds, each with a reason in words: busy for those turned
    // away, no request for those served.
    let (mut busy, mut no_request) = (0, 0);
    for conn in &mut idle {
        conn.set_read_timeout(Some(PATIENCE)).unwrap();
        match control::recv::<Response>(conn).unwrap() {
            Response::Refused { why: Refusal::Busy, message } => {
                assert!(message.contains(&format!("uid {NOBODY}")) && message.contains("requests_per_user"), "{message}");
                busy += 1;
            }
            Response::Refused { why: Refusal::BadRequest, message } => {
                assert!(message.contains("no request from uid 65534 within 5 s"), "{message}");
                no_request += 1;
            }
            other => panic!("an idle connection got {other:?}"),
        }
        assert!(matches!(control::recv::<Response>(conn), Err(control::ControlError::Closed)));
    }
    eprintln!("{IDLE} idle connections: {busy} refused as busy, {no_request} closed for sending no request");
    assert!(busy > 0 && no_request >= PER_USER, "{busy} busy, {no_request} without request");
    drop(idle);

    // migd is still up, serves the same user again, and is back to its base.
    assert_eq!(c.daemon_pid(1, "migd").unwrap(), migd);
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(migd), None).is_ok(), "migd is alive");
    burst(&c, &u, 5, 1);
    let slack = Usage { threads: 2, fds: 2, rss_kib: 16 << 10 };
    let mut after = Usage::default();
    wait_until(&format!("migd back to its base ({base}, give or take {slack})"), PATIENCE, || {
        after = Usage::of(migd);
        after.back_to(base, slack)
    });
    eprintln!("migd after the idle connections ended: {after}");
}
