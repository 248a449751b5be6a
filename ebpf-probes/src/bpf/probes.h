/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the probes share with user space: map sizes and the layout of map values. `src/probes.rs` mirrors
 * these structs (#[repr(C)]); aya refuses a map whose value size differs from the Rust type's, so a field
 * added here and not there fails at load, not silently.
 */
#ifndef RMOSIX_PROBES_H
#define RMOSIX_PROBES_H

#include "kernel.h"

/* Processes (thread groups) watched at once, over all jobs: bounds `watched` and `counters`. */
#define MAX_PROCESSES 16384
/* Threads of watched processes tracked at once: bounds `threads`. */
#define MAX_THREADS 16384

/* Per-process counters; one copy per CPU, summed by user space. */
struct counters {
	u32 job;     /* the job the process belongs to (its root's host PID); 0 in the copies of other CPUs */
	u32 _pad;
	u64 cpu_ns;  /* on-CPU time */
	u64 wait_ns; /* runnable but waiting for a CPU (run delay) */
	u64 voluntary_switches;
	u64 involuntary_switches;
	u64 syscalls;
	u64 read_bytes;  /* returned by read-like syscalls */
	u64 write_bytes; /* returned by write-like syscalls */
	u64 block_bytes; /* block I/O submitted by the process's own threads */
	u64 minor_faults;
	u64 major_faults;
};

/* Per-thread state, keyed by tid; lives from the thread's first sighting to its exit. */
struct thread_state {
	u32 tgid; /* lets user space drop a job's threads when it stops watching it */
	u32 _pad;
	u64 oncpu_since;  /* ktime of the switch in; 0 while off CPU */
	u64 queued_since; /* ktime it became runnable; 0 unless runnable and waiting */
	u64 min_flt;      /* task->min_flt when last seen */
	u64 maj_flt;      /* task->maj_flt when last seen */
};

/* Indexes of the `overflows` array: events dropped because a map was full. */
#define OVERFLOW_PROCESSES 0
#define OVERFLOW_THREADS 1
#define OVERFLOW_SLOTS 2

#endif
