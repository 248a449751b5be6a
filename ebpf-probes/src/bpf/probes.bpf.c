// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Which processes belong to which watched job, and what their threads used when they exited.
 *
 * The kernel already counts, per thread, everything the probes report (task_struct: se.sum_exec_runtime,
 * sched_info.run_delay, nvcsw, nivcsw, min_flt, maj_flt, ioac). User space reads the threads that are
 * alive from /proc; what these programs add is what /proc can't give: the threads that are gone, and the
 * processes a job forks. So they run on rare events only:
 *
 * - sched_process_fork: a process forked by a watched one joins its job (`watched`).
 * - sched_process_exit: a watched thread's totals, read as it exits, are added to its process's
 *   `process_exits`. From here on user space no longer counts it (it skips threads with PF_EXITING, which
 *   do_exit() sets before this tracepoint; see src/probes.rs). The exit that finds the process's
 *   signal->live at 0 marks it ended; user space collects its exits and removes it a little later (a
 *   thread that counted itself out of signal->live first may reach this tracepoint last).
 * - sched_process_free: a thread that exited is freed, an RCU grace period after it was reaped, with its
 *   final times: the CPU and wait time it gained after sched_process_exit (tearing down its memory,
 *   closing its files, its last slice: about 0.1 ms per process, 8 % of the CPU time of a job of
 *   short-lived processes, measured) are added to its process's exits. Only that: this tracepoint has been
 *   seen not to reach the program for a fraction of a percent of frees while other programs were attached
 *   to it and detached, so nothing else depends on it.
 *
 * No program runs on a system call, a context switch or a wake-up: those run millions of times a second
 * on a busy node, for every task on it, watched or not (the syscall tracepoints alone cost every process
 * of the node about 80 ns per system call, measured; see src/lib.rs).
 *
 * Built twice from this one source (see build.rs): as tp_btf programs (BTF-typed tracepoint arguments,
 * the default) and, with -DRAW_TP, as raw_tp programs for kernels that refuse tp_btf. Both see the same
 * tracepoint arguments; every pointer is read with BPF_CORE_READ, which is valid in both.
 *
 * Cost model: every program first looks the event's task up (by tgid in `watched`, or for a free, by task
 * in `dying`) and returns when it is absent, so an unwatched task pays one hash lookup per fork, exit and
 * free.
 *
 * Concurrency: sums are added with atomic adds (exits are rare, contention negligible), and no program
 * deletes from a map that another writes to: entries of ended processes are removed by user space.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "probes.h"

#ifdef RAW_TP
#define PROBE(tracepoint) SEC("raw_tp/" #tracepoint)
#else
#define PROBE(tracepoint) SEC("tp_btf/" #tracepoint)
#endif

/* What bpf_map_update_elem() returns when a map is full. */
#define E2BIG 7

char LICENSE[] SEC("license") = "GPL";

/* tgid -> its job; filled by user space with a job's processes, extended at fork, emptied by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCESSES);
	__type(key, u32);
	__type(value, struct watched);
} watched SEC(".maps");

/*
 * tgid -> the summed totals of the process's exited threads, until user space collects them. Not
 * preallocated: most watched processes never have an entry (no thread of theirs has exited yet).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCESSES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, u32);
	__type(value, struct process_exits);
} process_exits SEC(".maps");

/*
 * Task (its address) -> a watched thread between its exit and its free. Least recently used entries make
 * room: those of frees the program never saw.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_DYING);
	__type(key, u64);
	__type(value, struct dying);
} dying SEC(".maps");

/* Events dropped because a map was full, indexed by OVERFLOW_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OVERFLOW_SLOTS);
	__type(key, u32);
	__type(value, u64);
} overflows SEC(".maps");

static __always_inline void overflow(u32 slot)
{
	u64 *count = bpf_map_lookup_elem(&overflows, &slot);

	if (count)
		*count += 1;
}

/*
 * A thread's totals, as /proc/PID/task/TID/{schedstat,status,stat,io} show them. A kernel built without
 * CONFIG_SCHED_INFO, CONFIG_TASK_XACCT or CONFIG_TASK_IO_ACCOUNTING lacks some fields: they read 0.
 */
static __always_inline void read_totals(struct task_struct *task, struct totals *t)
{
	t->cpu_ns = BPF_CORE_READ(task, se.sum_exec_runtime);
	if (bpf_core_field_exists(task->sched_info))
		t->wait_ns = BPF_CORE_READ(task, sched_info.run_delay);
	t->nvcsw = BPF_CORE_READ(task, nvcsw);
	t->nivcsw = BPF_CORE_READ(task, nivcsw);
	t->min_flt = BPF_CORE_READ(task, min_flt);
	t->maj_flt = BPF_CORE_READ(task, maj_flt);
	if (bpf_core_field_exists(task->ioac.rchar)) {
		t->rchar = BPF_CORE_READ(task, ioac.rchar);
		t->wchar = BPF_CORE_READ(task, ioac.wchar);
		t->syscr = BPF_CORE_READ(task, ioac.syscr);
		t->syscw = BPF_CORE_READ(task, ioac.syscw);
	}
	if (bpf_core_field_exists(task->ioac.read_bytes)) {
		t->read_bytes = BPF_CORE_READ(task, ioac.read_bytes);
		t->write_bytes = BPF_CORE_READ(task, ioac.write_bytes);
		t->cancelled_write_bytes = BPF_CORE_READ(task, ioac.cancelled_write_bytes);
	}
}

/* sum += t, field by field, atomically: other exits of the process, and user space, meanwhile. */
static __always_inline void add_totals(struct totals *sum, const struct totals *t)
{
	__sync_fetch_and_add(&sum->cpu_ns, t->cpu_ns);
	__sync_fetch_and_add(&sum->wait_ns, t->wait_ns);
	__sync_fetch_and_add(&sum->nvcsw, t->nvcsw);
	__sync_fetch_and_add(&sum->nivcsw, t->nivcsw);
	__sync_fetch_and_add(&sum->min_flt, t->min_flt);
	__sync_fetch_and_add(&sum->maj_flt, t->maj_flt);
	__sync_fetch_and_add(&sum->rchar, t->rchar);
	__sync_fetch_and_add(&sum->wchar, t->wchar);
	__sync_fetch_and_add(&sum->syscr, t->syscr);
	__sync_fetch_and_add(&sum->syscw, t->syscw);
	__sync_fetch_and_add(&sum->read_bytes, t->read_bytes);
	__sync_fetch_and_add(&sum->write_bytes, t->write_bytes);
	__sync_fetch_and_add(&sum->cancelled_write_bytes, t->cancelled_write_bytes);
}

/* A new process joins its parent's job; new threads belong to their process already. */
PROBE(sched_process_fork)
int BPF_PROG(sched_process_fork, struct task_struct *parent, struct task_struct *child)
{
	u32 parent_tgid = BPF_CORE_READ(parent, tgid);
	struct watched *parent_entry = bpf_map_lookup_elem(&watched, &parent_tgid);

	if (!parent_entry || parent_entry->ended)
		return 0;
	u32 tgid = BPF_CORE_READ(child, tgid);
	if (tgid == parent_tgid)
		return 0;
	struct watched entry = { .job = parent_entry->job };
	if (bpf_map_update_elem(&watched, &tgid, &entry, BPF_ANY))
		overflow(OVERFLOW_PROCESSES);
	return 0;
}

/*
 * Runs in the exiting thread, after exit_signals() set PF_EXITING and after it counted itself out of
 * signal->live, before exit_mm(): its totals are added to its process's exits.
 */
PROBE(sched_process_exit)
int BPF_PROG(sched_process_exit, struct task_struct *task)
{
	u32 tgid = BPF_CORE_READ(task, tgid);
	struct watched *entry = bpf_map_lookup_elem(&watched, &tgid);

	if (!entry)
		return 0;
	u64 signal = (u64)BPF_CORE_READ(task, signal);
	/* An ended process's pid taken by another process, not yet collected: not ours. */
	if (entry->ended && entry->signal != signal)
		return 0;
	u32 job = entry->job;
	struct process_exits *exits = bpf_map_lookup_elem(&process_exits, &tgid);
	if (!exits) {
		struct process_exits fresh = { .job = job };
		if (bpf_map_update_elem(&process_exits, &tgid, &fresh, BPF_NOEXIST) == -E2BIG)
			overflow(OVERFLOW_EXITS);
		exits = bpf_map_lookup_elem(&process_exits, &tgid);
		if (!exits)
			return 0;
	}
	struct totals t = {};
	read_totals(task, &t);
	add_totals(&exits->totals, &t);
	/* The last thread to start exiting, or one behind it: the process has ended. */
	if (BPF_CORE_READ(task, signal, live.counter) == 0 && !entry->ended) {
		entry->signal = signal;
		__sync_fetch_and_add(&entry->ended, 1);
	}
	u64 key = (u64)task;
	struct dying d = {
		.job = job,
		.tgid = tgid,
		.pid = BPF_CORE_READ(task, pid),
		.start_boottime = BPF_CORE_READ(task, start_boottime),
		.cpu_ns = t.cpu_ns,
		.wait_ns = t.wait_ns,
	};
	/* Without room, the least recently used entry goes; at worst a thread's last 0.1 ms go uncounted. */
	bpf_map_update_elem(&dying, &key, &d, BPF_ANY);
	return 0;
}

/* A watched thread is freed: what it used after sched_process_exit goes to its process's exits. */
PROBE(sched_process_free)
int BPF_PROG(sched_process_free, struct task_struct *task)
{
	u64 key = (u64)task;
	struct dying *d = bpf_map_lookup_elem(&dying, &key);

	if (!d)
		return 0;
	/* The entry of an earlier task at this address, whose free was not seen, is not this task's. */
	if (d->pid != (u32)BPF_CORE_READ(task, pid) || d->start_boottime != BPF_CORE_READ(task, start_boottime))
		goto done;
	struct process_exits *exits = bpf_map_lookup_elem(&process_exits, &d->tgid);
	if (!exits || exits->job != d->job)
		goto done;
	u64 cpu_ns = BPF_CORE_READ(task, se.sum_exec_runtime);
	if (cpu_ns > d->cpu_ns)
		__sync_fetch_and_add(&exits->totals.cpu_ns, cpu_ns - d->cpu_ns);
	if (bpf_core_field_exists(task->sched_info)) {
		u64 wait_ns = BPF_CORE_READ(task, sched_info.run_delay);
		if (wait_ns > d->wait_ns)
			__sync_fetch_and_add(&exits->totals.wait_ns, wait_ns - d->wait_ns);
	}
done:
	bpf_map_delete_elem(&dying, &key);
	return 0;
}
