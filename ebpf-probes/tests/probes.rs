//! The probes on this machine's kernel: loaded for real, watching real processes. Needs root; without it
//! these tests fail and say so.
//!
//! Each test loads its own probes (own maps), so they run in parallel. Every watched program waits on its
//! stdin before doing anything, so the watch is in place before it runs (and forks): no sleeps stand in
//! for synchronisation; the one `sleep` is the interval a spinner is measured over.

use std::io::Write as _;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use rmosix_ebpf_probes::{Counters, Kind, Probes, proc_counters};

/// How long a condition may take before a test gives up; generous, the machine may be busy.
const PATIENCE: Duration = Duration::from_mins(1);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests load eBPF programs and need root: run `sudo cargo test -p rmosix-ebpf-probes`"
    );
}

/// `sh -c 'read _; <script>'`: a program that starts when released, killed when dropped.
/// [`Gated::spawn`] returns once the shell is blocked on its gate, so a watch misses nothing of the
/// script and sees nothing of the shell's start.
struct Gated {
    child: Child,
    gate: Option<ChildStdin>,
}

impl Gated {
    fn spawn(script: &str) -> Gated {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh starts");
        let gate = child.stdin.take();
        let gated = Gated { child, gate };
        let syscall = format!("/proc/{}/syscall", gated.pid());
        // Blocked in read(0, ...): the syscall number and the first argument.
        wait_until("the shell to block reading its gate", || {
            std::fs::read_to_string(&syscall).is_ok_and(|s| s.starts_with("0 0x0 "))
        });
        gated
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn release(&mut self) {
        let mut gate = self.gate.take().expect("released once");
        gate.write_all(b"go\n").expect("the gated shell reads its stdin");
    }

    /// Waits for a released program to finish; it must succeed.
    fn finish(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                assert!(status.success(), "the watched program failed: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the watched program did not finish in {PATIENCE:?}");
            sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `condition` until it holds, or fails the test naming `what`.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting for {what}");
        sleep(Duration::from_millis(10));
    }
}

/// Nanoseconds as milliseconds, for messages.
fn ms(ns: u64) -> f64 {
    Duration::from_nanos(ns).as_secs_f64() * 1e3
}

#[test]
fn a_spinner_is_measured_and_an_unwatched_one_is_not() {
    require_root();
    let probes = Probes::load().expect("the probes load");
    assert_eq!(probes.kind(), Kind::TpBtf, "tp_btf programs load on this machine's kernel (ENVIRONMENT.md)");
    let mut watched = Gated::spawn("while :; do :; done");
    let mut unwatched = Gated::spawn("while :; do :; done");
    let job = watched.pid();
    probes.watch(job, &[job]).unwrap();

    // The kernel's own account of the spinner's CPU time (schedstat), to compare with.
    let kernel_before = proc_counters(job).unwrap().cpu_ns;
    let start = Instant::now();
    watched.release();
    unwatched.release();
    sleep(Duration::from_secs(1));
    let all = probes.counters().unwrap();
    let elapsed = u64::try_from(start.elapsed().as_nanos()).unwrap();
    let kernel = proc_counters(job).unwrap().cpu_ns - kernel_before;

    let spinner = all.get(&job).copied().expect("the watched spinner has counters");
    eprintln!(
        "spinner over {:.0} ms: {:.0} ms on CPU (kernel: {:.0} ms), {:.0} ms waiting; {spinner:?}",
        ms(elapsed),
        ms(spinner.cpu_ns),
        ms(kernel),
        ms(spinner.wait_ns)
    );
    assert!(!all.contains_key(&unwatched.pid()), "an unwatched process has no entry: {all:?}");
    assert_eq!(all.len(), 1, "{all:?}");
    // How much CPU the spinner gets depends on the machine's load; what it gets, the probes must see. It
    // is runnable throughout, so on a CPU or waiting for one the whole time.
    assert!(spinner.cpu_ns > 0);
    assert!(spinner.cpu_ns <= kernel + 5_000_000, "more CPU time than the kernel says");
    assert!(spinner.cpu_ns * 10 >= kernel * 8, "much less CPU time than the kernel says");
    let runnable = spinner.cpu_ns + spinner.wait_ns;
    assert!(runnable <= elapsed + 5_000_000, "runnable for longer than it was measured");
    assert!(runnable * 10 >= elapsed * 8, "runnable for much less than the measured interval");
    assert!(spinner.syscalls < 20, "a spinner makes (next to) no system calls: {}", spinner.syscalls);

    let job_sum = probes.job_counters(job).unwrap();
    assert!(job_sum.cpu_ns >= spinner.cpu_ns, "the job's CPU time only grows: {job_sum:?}");
    assert_eq!(probes.jobs().unwrap().keys().copied().collect::<Vec<_>>(), vec![job]);
    let usage = probes.usage().unwrap();
    assert_eq!((usage.processes, usage.threads), (1, 1), "{usage:?}");

    probes.unwatch_job(job).unwrap();
    assert!(probes.counters().unwrap().is_empty());
    assert_eq!(probes.job_counters(job).unwrap(), Counters::default());
    assert!(probes.jobs().unwrap().is_empty());
    let usage = probes.usage().unwrap();
    assert_eq!((usage.processes, usage.threads, usage.dropped_processes, usage.dropped_threads), (0, 0, 0, 0));
}

#[test]
fn synchronous_writes_count_as_written_bytes_and_block_io() {
    const BLOCKS: u64 = 256;
    require_root();
    let probes = Probes::load().expect("the probes load");
    // On the disk, not a tmpfs: the writes must reach a block device.
    let dir = tempfile::Builder::new().prefix("rmosix-ebpf-test-").tempdir_in("/var/tmp").unwrap();
    let mut dd = Gated::spawn(&format!(
        "exec dd if=/dev/zero of={}/out bs=4k count={BLOCKS} oflag=dsync status=none",
        dir.path().display()
    ));
    let job = dd.pid();
    probes.watch(job, &[job]).unwrap();
    dd.release();
    dd.finish();

    let c = probes.job_counters(job).unwrap();
    eprintln!("dd of {BLOCKS} synchronous 4 KiB blocks: {c:?}");
    assert!(c.write_bytes >= BLOCKS * 4096, "{c:?}");
    assert!(c.read_bytes >= BLOCKS * 4096, "dd reads /dev/zero: {c:?}");
    assert!(c.block_bytes >= BLOCKS * 4096, "each O_DSYNC write submits its block from dd: {c:?}");
    assert!(c.voluntary_switches > 0, "dd sleeps waiting for the disk: {c:?}");
    assert!(c.syscalls >= 2 * BLOCKS, "a read and a write per block: {c:?}");
    assert!(c.minor_faults > 0, "exec faults pages in: {c:?}");
    // Exited: gone from the live processes and from the kernel maps, but kept in its job.
    assert!(!probes.counters().unwrap().contains_key(&job));
    assert_eq!(probes.job_counters(job).unwrap(), c);
    let usage = probes.usage().unwrap();
    assert_eq!((usage.processes, usage.threads), (0, 0), "exit cleans up: {usage:?}");
}

#[test]
fn processes_forked_after_the_watch_are_counted() {
    const BYTES: u64 = 10_000_000;
    require_root();
    let probes = Probes::load().expect("the probes load");
    let mut pipeline = Gated::spawn(&format!("cat /dev/zero | head -c {BYTES} > /dev/null"));
    let job = pipeline.pid();
    probes.watch(job, &[job]).unwrap();
    pipeline.release();
    pipeline.finish();

    let c = probes.job_counters(job).unwrap();
    eprintln!("cat | head of {BYTES} bytes: {c:?}");
    // cat reads at least what head took from the pipe, and head reads it: neither is the watched shell.
    assert!(c.read_bytes >= 2 * BYTES, "the reads of the forked cat and head are counted: {c:?}");
    assert!(c.write_bytes >= 2 * BYTES, "cat writes the pipe, head /dev/null: {c:?}");
    assert!(c.cpu_ns > 0, "{c:?}");
    let usage = probes.usage().unwrap();
    assert_eq!((usage.processes, usage.threads), (0, 0), "every process of the job exited: {usage:?}");
}

/// Three threads spin for 0.1 s of CPU each, then a fourth, not the leader, execs `true`: it takes over
/// the leader's pid, and its state must follow it.
const THREADS_THEN_EXEC: &str = r#"
import os, threading, time
def spin():
    end = time.thread_time() + 0.1
    while time.thread_time() < end:
        pass
spinners = [threading.Thread(target=spin) for _ in range(3)]
for t in spinners: t.start()
for t in spinners: t.join()
t = threading.Thread(target=lambda: os.execv("/bin/true", ["true"]))
t.start()
t.join()
"#;

#[test]
fn threads_count_for_their_process_and_leave_no_state_behind() {
    require_root();
    let probes = Probes::load().expect("the probes load");
    let mut program = Gated::spawn(&format!("exec python3 -c '{THREADS_THEN_EXEC}'"));
    let job = program.pid();
    probes.watch(job, &[job]).unwrap();
    program.release();
    program.finish();

    let c = probes.job_counters(job).unwrap();
    eprintln!("python threads, then exec from a thread: {c:?}");
    // 0.3 s of CPU by the kernel's clock; allow for the two clocks' differences.
    assert!(c.cpu_ns >= 270_000_000, "three threads spun 0.1 s of CPU each: {c:?}");
    assert!(c.minor_faults > 0, "{c:?}");
    let usage = probes.usage().unwrap();
    assert_eq!((usage.processes, usage.threads), (0, 0), "no thread state outlives its thread: {usage:?}");
}

#[test]
fn raw_tp_probes_load_and_count() {
    require_root();
    let probes = Probes::load_kind(Kind::RawTp).expect("the raw_tp probes load");
    assert_eq!(probes.kind(), Kind::RawTp);
    let mut program = Gated::spawn("head -c 1000000 /dev/zero > /dev/null; while :; do :; done");
    let job = program.pid();
    probes.watch(job, &[job]).unwrap();
    program.release();
    let mut last = Counters::default();
    wait_until("the raw_tp probes to count the child's reads and the spinner's CPU time", || {
        last = probes.job_counters(job).unwrap();
        last.read_bytes >= 1_000_000 && last.cpu_ns > 10_000_000
    });
    eprintln!("raw_tp: {last:?}");
    assert!(last.write_bytes >= 1_000_000, "{last:?}");
    assert!(last.syscalls > 0, "{last:?}");
}

#[test]
fn the_proc_fallback_measures_a_spinner() {
    require_root();
    let mut spinner = Gated::spawn("while :; do :; done");
    let pid = spinner.pid();
    spinner.release();
    let mut last = Counters::default();
    wait_until("/proc to show 50 ms of the spinner's CPU time", || {
        last = proc_counters(pid).unwrap();
        last.cpu_ns > 50_000_000
    });
    eprintln!("/proc: {last:?}");
    assert!(last.minor_faults > 0, "{last:?}");
    assert!(last.syscalls > 0 && last.read_bytes > 0, "the shell read its gate: {last:?}");
    assert!(last.voluntary_switches > 0, "the shell slept on its gate: {last:?}");
    assert!(last.involuntary_switches + last.wait_ns > 0, "a spinner is preempted, or waits: {last:?}");
}
