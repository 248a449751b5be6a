/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The few kernel types the probes read, declared by hand instead of a 3 MB vmlinux.h.
 *
 * Every record here is CO-RE relocatable (preserve_access_index): only the fields we name exist in our
 * copy, in any order, and libbpf-style loaders (aya) rewrite each access to the field's offset in the
 * running kernel's BTF, matching by type and field name. So the layouts below need not match any kernel;
 * the names and the kinds of the fields must (checked against 6.18's BTF: `bpftool btf dump file
 * /sys/kernel/btf/vmlinux format c`). Pointers are read with BPF_CORE_READ only, which is what lets the
 * same source build as tp_btf (typed pointers) and raw_tp (untyped, probe-read) programs.
 */
#ifndef RMOSIX_KERNEL_H
#define RMOSIX_KERNEL_H

#include <linux/types.h>
#include <stdbool.h>

typedef __u8 u8;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

/* The CFS entity of a task: its total time on a CPU, updated at each switch, tick and exit. */
struct sched_entity {
	u64 sum_exec_runtime;
};

/* CONFIG_SCHED_INFO: time spent runnable but waiting for a CPU (what /proc/PID/schedstat shows second). */
struct sched_info {
	unsigned long long run_delay;
};

/*
 * CONFIG_TASK_XACCT (the first four) and CONFIG_TASK_IO_ACCOUNTING (the last three): a thread's I/O, as
 * /proc/PID/task/TID/io shows it.
 */
struct task_io_accounting {
	u64 rchar;
	u64 wchar;
	u64 syscr;
	u64 syscw;
	u64 read_bytes;
	u64 write_bytes;
	u64 cancelled_write_bytes;
};

typedef struct {
	int counter;
} atomic_t;

/* The process's shared state; only `live` is read: its threads not yet past the start of do_exit(). */
struct signal_struct {
	atomic_t live;
};

struct task_struct {
	int pid;  /* the thread id */
	int tgid; /* the process id */
	u64 start_boottime;
	struct signal_struct *signal;
	unsigned long nvcsw;
	unsigned long nivcsw;
	unsigned long min_flt;
	unsigned long maj_flt;
	struct sched_entity se;
	struct sched_info sched_info;
	struct task_io_accounting ioac;
};

#pragma clang attribute pop

#endif
