//! eBPF probes that measure, per process, what makes a job CPU-bound or I/O-bound, so migd can tell which
//! jobs gain from a move (those that wait for a CPU) and which would drag their I/O along.
//!
//! # What is counted, and where
//!
//! The probes are C (`src/bpf/probes.bpf.c`, CO-RE, built by `build.rs` with clang against libbpf's
//! headers) loaded with aya. For each watched process ([`Counters`]):
//!
//! - `cpu_ns`, time on a CPU: `sched_switch`, from a thread's switch in to its switch out.
//! - `wait_ns`, run delay (runnable, not running): from `sched_wakeup`/`sched_wakeup_new`, or from a
//!   switch out while still runnable, to the next switch in.
//! - `voluntary_switches`, `involuntary_switches`: `sched_switch`; involuntary when preempted or still
//!   `TASK_RUNNING`, as `/proc` counts them.
//! - `syscalls`: `raw_syscalls:sys_enter`.
//! - `read_bytes`, `write_bytes`: `raw_syscalls:sys_exit`, positive returns of `read`, `pread64`, `readv`,
//!   `preadv`, `preadv2`, `recvfrom`, `recvmsg` / `write`, `pwrite64`, `writev`, `pwritev`, `pwritev2`,
//!   `sendto`, `sendmsg` (x86-64 numbers; `io_uring`, `sendfile`, `splice`, `mmap`ed I/O and 32-bit
//!   syscalls are not seen).
//! - `block_bytes`: `block:block_bio_queue`, bios submitted in the process's own context: reads, and
//!   synchronous writes (`O_DSYNC`, `fsync`, `O_DIRECT`) with the journal writes they force. Page cache
//!   written back later by kernel threads is charged to no one.
//! - `minor_faults`, `major_faults`: at each switch out (and at exit), the growth of the thread's
//!   `min_flt`/`maj_flt` since it was last seen.
//!
//! Counting starts when a process is watched ([`Probes::watch`], with its job's key: the host PID of the
//! job's root) or forked by a watched one (`sched_process_fork`; threads join their process); it stops at
//! `sched_process_exit` of the last thread (`sched_process_exec` follows a thread that takes over its
//! leader's pid). The counts of a process that exited stay with its job
//! ([`Probes::job_counters`]) until [`Probes::unwatch_job`].
//!
//! Readings include the slice each thread is in now, on a CPU or waiting for one, so a spinner that never
//! switches shows its time. Faults are seen only at switches: those of a thread that existed before the
//! watch count from its first switch after it.
//!
//! # Cost
//!
//! The programs run on every scheduler switch, wake-up, fork, exit, system call and bio of the whole node.
//! For a task of no watched process each costs one hash lookup (`watched`, by tgid) and returns; a
//! syscall exit with a non-positive return not even that. Watched processes add a lookup or two and a few
//! additions, on per-CPU counters without atomics. Maps are bounded: [`MAX_PROCESSES`] processes and
//! [`MAX_THREADS`] threads over all jobs (about 3 MiB preallocated for `watched` and `threads`; the
//! per-CPU counters are allocated per process watched); beyond that, counting is dropped and shows in
//! [`Probes::usage`].
//!
//! # Kinds and the fallback
//!
//! One source is built twice: as `tp_btf` programs (typed tracepoint arguments, preferred) and as
//! `raw_tp` programs, which [`Probes::load`] uses when the kernel refuses `tp_btf`. Both need the kernel's
//! BTF (`/sys/kernel/btf/vmlinux`) to resolve the CO-RE field accesses, and root. When neither loads,
//! [`proc_counters`] reads comparable but coarser numbers from `/proc` (see [`procfs`]), one process at a
//! time, from the process's start.

mod counters;
mod probes;
pub mod procfs;

pub use counters::Counters;
pub use probes::{Kind, MAX_PROCESSES, MAX_THREADS, ProbeError, Probes, Usage};
pub use procfs::proc_counters;
