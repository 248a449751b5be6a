//! What the processes of a job use, CPU, run delay, context switches, I/O and page faults, so migd can
//! tell which jobs gain from a move (those that wait for a CPU) and which would drag their I/O along.
//!
//! # What is counted, and where
//!
//! The kernel already keeps every one of these totals per thread, in its `task_struct`. The crate adds
//! them up per process and per job ([`Counters`]): for threads that are alive, user space reads them from
//! `/proc/PID/task/TID/*` when asked ([`procfs`]); for threads that have exited, eBPF programs read them
//! from the `task_struct` as the thread exits, and keep the sums in maps.
//!
//! | [`Counters`] field | kernel total | live threads: `/proc/PID/task/TID/...` |
//! |---|---|---|
//! | `cpu_ns` | `se.sum_exec_runtime` | `schedstat`, first |
//! | `wait_ns` (run delay) | `sched_info.run_delay` | `schedstat`, second |
//! | `voluntary_switches`, `involuntary_switches` | `nvcsw`, `nivcsw` | `status` |
//! | `syscalls` | `ioac.syscr + ioac.syscw` | `io` |
//! | `read_bytes`, `write_bytes` | `ioac.rchar`, `ioac.wchar` | `io` |
//! | `block_bytes` | `ioac.read_bytes + write_bytes - cancelled_write_bytes` | `io` |
//! | `minor_faults`, `major_faults` | `min_flt`, `maj_flt` | `stat` |
//!
//! What each means:
//!
//! - `syscalls` counts read- and write-family system calls only (`read`, `readv`, `pread64`, `write`,
//!   `sendfile`, ... as the kernel's task I/O accounting counts them). A count of every system call would
//!   need the `raw_syscalls` tracepoints, which cost every process of the node, watched or not, about 80 ns
//!   per system call (measured, see *Cost*).
//! - `read_bytes` and `write_bytes` are the bytes through those calls, on files, pipes and sockets alike,
//!   and `sendfile`'s. The `send`/`recv` family (`sendto`, `recvfrom`, `sendmsg`, `recvmsg`) and `splice`
//!   are not in the kernel's accounting, so not here. Checked on 6.18: 100 `send`s and `recv`s of 1000
//!   bytes over a socketpair add nothing; the same with `write` and `read` add 100 calls and 100 000 bytes
//!   each way.
//! - `block_bytes` is storage I/O the process causes: bytes it made the block layer read (read-ahead
//!   included), and bytes of page cache it dirtied for storage (counted when dirtied, so buffered writes
//!   that a flusher thread writes back later are the writer's), less dirty bytes dropped before they were
//!   written (a truncation). `O_DIRECT` writes count when issued. tmpfs and other memory-only file systems
//!   count nothing.
//!
//! # Which processes, from when
//!
//! A job is a set of processes with a key, its root's host PID. [`Probes::watch`] adds processes to a job;
//! from then on every process they fork joins it too (`sched_process_fork`); threads count with their
//! process. A watched process counts from its watch (what it had used by then is subtracted from every
//! reading), a forked one from its fork. When a thread exits (`sched_process_exit`), the programs add its
//! totals to its process's exits, and the exit that finds the process's last thread gone marks the process
//! ended; a second or so later, user space moves its exits to its job's sums and takes it out of the maps.
//! So a job's counters keep what its short-lived processes and threads used after they have gone, until
//! [`Probes::unwatch_job`]. How a reading joins the two halves without counting a thread twice is in
//! [`Probes`]' module (`src/probes.rs`): in short, the exits are read first, then `/proc`, skipping threads
//! that have begun to exit.
//!
//! Precision:
//!
//! - `/proc` shows a running thread's CPU time as of its last tick or context switch (4 ms apart at
//!   250 Hz), so a spinner's reading lags the kernel's CPU clock by up to a tick.
//! - The totals of an exiting thread are taken at `sched_process_exit`, which on 6.18 comes before the
//!   thread tears down its memory and closes its files. The CPU and wait time it spends on that (about
//!   0.1 ms per process: 8 % of the CPU time of a job of 400 `head | cat` processes, measured) are added
//!   when it is freed (`sched_process_free`), an RCU grace period after it was reaped: then within 0.3 %
//!   of the kernel's figure, measured. I/O or faults after the exit tracepoint (a close that flushes) are
//!   not counted. On this kernel `sched_process_free` was seen not to reach the program for a few frees
//!   in a thousand while other programs attached to it and detached; such a thread's last moments are
//!   lost, nothing else (exits were never missed, in thousands).
//! - A reading can come out lower than the one before, for that reading only, when a thread is between
//!   the start of its exit and `sched_process_exit` (microseconds), or released while the reading runs.
//!   [`Counters::since`] saturates at zero. Nothing is ever counted twice.
//!
//! # Cost
//!
//! The programs run on forks, exits and frees of tasks only: rare events, each costing the kernel tens of
//! microseconds, to which a task of no watched process adds one hash lookup (in `watched` by tgid, or for
//! a free, in `dying` by task), and a watched one a few map updates. Nothing runs on a system call, a context switch
//! or a wake-up. Readings are paid by their reader, not by the processes: four small `/proc` files per live
//! thread of the job, about 20 µs per thread (measured, 100 threads, release build, busy 2-CPU VM), and a
//! few map reads.
//!
//! The probes this replaces counted on the `raw_syscalls` `sys_enter`/`sys_exit` tracepoints and on
//! `sched_switch`/`sched_wakeup`. Attached, those tax every task of the node, watched or not: the syscall
//! tracepoints set every task on the slow system-call path and run a program on every system call, the
//! scheduler ones on every switch and wake-up. Measured on this machine's kind (`cargo xtask bench
//! probes`, CPU time per operation, no probes / loaded but not watched / watched job): `getppid` 102 ns /
//! 186 ns (+82 %) / 232 ns; a 1-byte `read` 146 / 221 ns (+52 %); a pipe ping-pong round trip between two
//! processes on one CPU 2795 / 3879 ns (+39 %); a CPU loop +0-2 % (noise). The targets are under 0.5 % for
//! processes outside jobs and under 2 % inside. The same benchmark with these probes (11 rounds, 1 s
//! samples, no other tracing program loaded, 2026-12-01): `getppid` 102.8 / 102.5 / 102.4 ns, a 1-byte
//! `read` 145.8 / 146.1 / 145.8 ns, the ping-pong 2804 / 2790 / 2815 ns, the CPU loop within 0.2 %: every
//! workload within +0.25 % of no probes, in jobs and out, against a noise floor of ±2.1 % (two runs with no
//! probes). Another run read up to +0.66 % outside jobs, with the same noise floor, for workloads that run
//! none of the programs while they are timed.
//!
//! Maps are bounded: [`MAX_PROCESSES`] processes, alive or ended and not yet collected; a fork beyond that
//! goes uncounted and shows in [`Probes::usage`]. Ended processes are collected by readings: read at least
//! every few seconds.
//!
//! # Kinds and the fallback
//!
//! One source is built twice: as `tp_btf` programs (typed tracepoint arguments, preferred) and as
//! `raw_tp` programs, which [`Probes::load`] uses when the kernel refuses `tp_btf`. Both need the kernel's
//! BTF (`/sys/kernel/btf/vmlinux`) to resolve the CO-RE field accesses, and root. When neither loads,
//! [`proc_counters`] reads the same totals from `/proc` (see [`procfs`]), one process at a time, from the
//! process's start; with no programs to catch them, the CPU time, run delay and context switches of its
//! exited threads, and everything of its children, are lost.

mod counters;
mod probes;
pub mod procfs;
mod totals;

pub use counters::Counters;
pub use probes::{Kind, MAX_PROCESSES, ProbeError, Probes, Usage};
pub use procfs::proc_counters;
