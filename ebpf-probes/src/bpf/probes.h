/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the probes share with user space: map sizes, the layout of map values, and array indexes.
 * `src/probes.rs` and `src/totals.rs` mirror these structs (#[repr(C)]); aya refuses a map whose value
 * size differs from the Rust type's, so a field added here and not there fails at load, not silently.
 */
#ifndef RMOSIX_PROBES_H
#define RMOSIX_PROBES_H

#include "kernel.h"

/*
 * Processes (thread groups) watched at once, over all jobs, alive or ended and not yet collected by user
 * space: bounds `watched` and `process_exits`.
 */
#define MAX_PROCESSES 16384
/* Threads between their exit and their free at once (an RCU grace period, milliseconds): bounds `dying`. */
#define MAX_DYING 4096

/*
 * What the kernel keeps per thread in its task_struct, and what a thread has used when it exits. The same
 * numbers user space reads from /proc for the threads that are still alive.
 */
struct totals {
	u64 cpu_ns;  /* se.sum_exec_runtime */
	u64 wait_ns; /* sched_info.run_delay */
	u64 nvcsw;
	u64 nivcsw;
	u64 min_flt;
	u64 maj_flt;
	u64 rchar; /* ioac: bytes through read-family system calls */
	u64 wchar;
	u64 syscr; /* ioac: read-family system calls */
	u64 syscw;
	u64 read_bytes; /* ioac: bytes read from storage */
	u64 write_bytes;
	u64 cancelled_write_bytes;
};

/* A watched process: its job, and once its last thread has begun to exit, that it has ended. */
struct watched {
	u32 job;
	u32 ended;   /* set by the exit that finds signal->live at 0; user space then collects the process */
	u64 signal;  /* its signal_struct, set with `ended`: late threads of the process still count, not
	                threads of another process that reuses the pid */
};

/* The threads of one watched process that have exited: their totals, summed. */
struct process_exits {
	u32 job; /* the process's job when the entry was made */
	u32 _pad;
	struct totals totals;
};

/* A watched thread between its exit and its free. */
struct dying {
	u32 job;
	u32 tgid;
	u32 pid;
	u32 _pad;
	u64 start_boottime; /* with pid, tells the task from a later one at the same address */
	u64 cpu_ns;         /* its times when it exited */
	u64 wait_ns;
};

/* Indexes of the `overflows` array: events dropped because a map was full. */
#define OVERFLOW_PROCESSES 0 /* a forked process not followed: `watched` full */
#define OVERFLOW_EXITS 1     /* a thread's exit not counted: `process_exits` full */
#define OVERFLOW_SLOTS 2

#endif
