// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Per-process CPU, scheduling, syscall, I/O and page-fault counters for the processes of watched jobs.
 *
 * Built twice from this one source (see build.rs): as tp_btf programs (BTF-typed tracepoint arguments,
 * the default) and, with -DRAW_TP, as raw_tp programs for kernels that refuse tp_btf. Both see the same
 * tracepoint arguments; every pointer is read with BPF_CORE_READ, which is valid in both.
 *
 * Cost model: every program first looks the current task's (or the event's task's) tgid up in `watched`
 * and returns when it is absent, so an unwatched task pays one hash lookup per event. sys_exit checks the
 * return value before even that.
 *
 * Concurrency: `counters` is per-CPU, so its fields are incremented without atomics. A thread's state is
 * written only by events of that thread (switches, its syscalls, its exit) and by its wake-up, which
 * happens while it sleeps; no two writers race on one entry in practice.
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

#ifndef __TARGET_ARCH_x86
#error "probes.bpf.c knows only the x86-64 syscall numbers (and pt_regs->orig_ax)"
#endif

/* x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) whose positive return is a byte count. */
#define NR_read 0
#define NR_write 1
#define NR_pread64 17
#define NR_pwrite64 18
#define NR_readv 19
#define NR_writev 20
#define NR_sendto 44
#define NR_recvfrom 45
#define NR_sendmsg 46
#define NR_recvmsg 47
#define NR_preadv 295
#define NR_pwritev 296
#define NR_preadv2 327
#define NR_pwritev2 328

/* What bpf_map_update_elem() returns when a map is full. */
#define E2BIG 7

char LICENSE[] SEC("license") = "GPL";

/* tgid -> job; filled by user space with a job's processes, extended at fork, shrunk at exit. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCESSES);
	__type(key, u32);
	__type(value, u32);
} watched SEC(".maps");

/*
 * tgid -> counters, one copy per CPU. Not preallocated: a preallocated per-CPU map costs
 * MAX_PROCESSES * sizeof(struct counters) per possible CPU up front, 1.4 MiB per CPU, whether or not
 * anything is watched. Entries outlive their process, until user space stops watching the job, so the
 * work of a short-lived child stays in its job's sums.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_PROCESSES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, u32);
	__type(value, struct counters);
} counters SEC(".maps");

/* tid -> thread state, for threads of watched processes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_THREADS);
	__type(key, u32);
	__type(value, struct thread_state);
} threads SEC(".maps");

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

static __always_inline unsigned int task_state(struct task_struct *task)
{
	if (bpf_core_field_exists(task->__state))
		return BPF_CORE_READ(task, __state);
	return BPF_CORE_READ((struct task_struct___pre_5_14 *)task, state);
}

/* This CPU's counters of a watched process, created (zeroed, tagged with its job) when missing. */
static __always_inline struct counters *counters_of(u32 tgid, u32 job)
{
	struct counters *c = bpf_map_lookup_elem(&counters, &tgid);

	if (c)
		return c;
	struct counters fresh = { .job = job };
	if (bpf_map_update_elem(&counters, &tgid, &fresh, BPF_NOEXIST) == -E2BIG)
		overflow(OVERFLOW_PROCESSES);
	return bpf_map_lookup_elem(&counters, &tgid);
}

/* Starts a thread's state afresh: its fault counts so far are the baseline, not news. */
static __always_inline struct thread_state *thread_start(struct task_struct *task, u32 tid, u32 tgid, u64 flags)
{
	struct thread_state fresh = {
		.tgid = tgid,
		.min_flt = BPF_CORE_READ(task, min_flt),
		.maj_flt = BPF_CORE_READ(task, maj_flt),
	};
	if (bpf_map_update_elem(&threads, &tid, &fresh, flags) == -E2BIG)
		overflow(OVERFLOW_THREADS);
	return bpf_map_lookup_elem(&threads, &tid);
}

/* A watched thread's state, started at its first sighting (threads that existed before the watch). */
static __always_inline struct thread_state *thread_of(struct task_struct *task, u32 tid, u32 tgid)
{
	struct thread_state *ts = bpf_map_lookup_elem(&threads, &tid);

	return ts ? ts : thread_start(task, tid, tgid, BPF_NOEXIST);
}

/* Adds the faults the thread took since it was last seen. */
static __always_inline void account_faults(struct task_struct *task, struct thread_state *ts, struct counters *c)
{
	u64 min_flt = BPF_CORE_READ(task, min_flt);
	u64 maj_flt = BPF_CORE_READ(task, maj_flt);

	if (min_flt > ts->min_flt)
		c->minor_faults += min_flt - ts->min_flt;
	if (maj_flt > ts->maj_flt)
		c->major_faults += maj_flt - ts->maj_flt;
	ts->min_flt = min_flt;
	ts->maj_flt = maj_flt;
}

static __always_inline void switch_out(struct task_struct *prev, bool preempt, u64 now)
{
	u32 tgid = BPF_CORE_READ(prev, tgid);
	u32 *job = bpf_map_lookup_elem(&watched, &tgid);

	if (!job)
		return;
	u32 tid = BPF_CORE_READ(prev, pid);
	unsigned int state = task_state(prev);
	if (state & TASK_DEAD) {
		/* Its last switch: sched_process_exit has accounted for it already. */
		bpf_map_delete_elem(&threads, &tid);
		return;
	}
	struct thread_state *ts = thread_of(prev, tid, tgid);
	if (!ts)
		return;
	struct counters *c = counters_of(tgid, *job);
	if (!c)
		return;
	if (ts->oncpu_since) {
		c->cpu_ns += now - ts->oncpu_since;
		ts->oncpu_since = 0;
	}
	/* Still runnable (preempted, or yielded): it starts waiting for a CPU now. As /proc counts it. */
	if (preempt || state == TASK_RUNNING) {
		c->involuntary_switches += 1;
		ts->queued_since = now;
	} else {
		c->voluntary_switches += 1;
		ts->queued_since = 0;
	}
	account_faults(prev, ts, c);
}

static __always_inline void switch_in(struct task_struct *next, u64 now)
{
	u32 tgid = BPF_CORE_READ(next, tgid);
	u32 *job = bpf_map_lookup_elem(&watched, &tgid);

	if (!job)
		return;
	struct thread_state *ts = thread_of(next, BPF_CORE_READ(next, pid), tgid);
	if (!ts)
		return;
	if (ts->queued_since) {
		struct counters *c = counters_of(tgid, *job);
		if (c)
			c->wait_ns += now - ts->queued_since;
		ts->queued_since = 0;
	}
	ts->oncpu_since = now;
}

PROBE(sched_switch)
int BPF_PROG(sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	u64 now = bpf_ktime_get_ns();

	switch_out(prev, preempt, now);
	switch_in(next, now);
	return 0;
}

/* A sleeping thread becomes runnable: its run delay starts. */
static __always_inline void woken(struct task_struct *task)
{
	u32 tgid = BPF_CORE_READ(task, tgid);

	if (!bpf_map_lookup_elem(&watched, &tgid))
		return;
	struct thread_state *ts = thread_of(task, BPF_CORE_READ(task, pid), tgid);
	/* A wake-up can race with the thread's own way to sleep while it is still on its CPU. */
	if (ts && !ts->oncpu_since)
		ts->queued_since = bpf_ktime_get_ns();
}

PROBE(sched_wakeup)
int BPF_PROG(sched_wakeup, struct task_struct *task)
{
	woken(task);
	return 0;
}

PROBE(sched_wakeup_new)
int BPF_PROG(sched_wakeup_new, struct task_struct *task)
{
	woken(task);
	return 0;
}

/* New threads share the parent's tgid, hence its entry; a new process joins the parent's job. */
PROBE(sched_process_fork)
int BPF_PROG(sched_process_fork, struct task_struct *parent, struct task_struct *child)
{
	u32 parent_tgid = BPF_CORE_READ(parent, tgid);
	u32 *parent_job = bpf_map_lookup_elem(&watched, &parent_tgid);

	if (!parent_job)
		return 0;
	u32 job = *parent_job;
	u32 tgid = BPF_CORE_READ(child, tgid);
	if (tgid != parent_tgid) {
		if (bpf_map_update_elem(&watched, &tgid, &job, BPF_ANY)) {
			overflow(OVERFLOW_PROCESSES);
			return 0;
		}
		/* A reused tgid starts from zero, not from the counters of the dead process that had it. */
		bpf_map_delete_elem(&counters, &tgid);
		counters_of(tgid, job);
	}
	/* copy_process() zeroed the child's fault counts; a stale entry of a reused tid is replaced. */
	thread_start(child, BPF_CORE_READ(child, pid), tgid, BPF_ANY);
	return 0;
}

/*
 * Runs in the exiting thread, on its CPU: its last slice and faults are added, its state dropped. The
 * process leaves `watched` with its last thread (signal->live reached 0, the tracepoint's group_dead),
 * which is also right when the leader exits before its other threads; its counters stay, for its job.
 */
PROBE(sched_process_exit)
int BPF_PROG(sched_process_exit, struct task_struct *task)
{
	u32 tgid = BPF_CORE_READ(task, tgid);
	u32 *job = bpf_map_lookup_elem(&watched, &tgid);

	if (!job)
		return 0;
	u32 tid = BPF_CORE_READ(task, pid);
	struct thread_state *ts = bpf_map_lookup_elem(&threads, &tid);
	if (ts) {
		struct counters *c = counters_of(tgid, *job);
		if (c) {
			if (ts->oncpu_since)
				c->cpu_ns += bpf_ktime_get_ns() - ts->oncpu_since;
			account_faults(task, ts, c);
		}
		bpf_map_delete_elem(&threads, &tid);
	}
	if (BPF_CORE_READ(task, signal, live.counter) == 0)
		bpf_map_delete_elem(&watched, &tgid);
	return 0;
}

/*
 * A thread other than the leader that calls execve() takes over the leader's pid (de_thread()): its state
 * moves to its new tid, or the old entry would stay behind with a switch-in time that never ends. If the
 * thread switched under its new tid between de_thread() and here, that newer state stays.
 */
PROBE(sched_process_exec)
int BPF_PROG(sched_process_exec, struct task_struct *task, int old_pid)
{
	u32 tgid = BPF_CORE_READ(task, tgid);

	if (!bpf_map_lookup_elem(&watched, &tgid))
		return 0;
	u32 old_tid = old_pid;
	u32 tid = BPF_CORE_READ(task, pid);
	if (tid == old_tid)
		return 0;
	struct thread_state *ts = bpf_map_lookup_elem(&threads, &old_tid);
	if (ts) {
		struct thread_state moved = *ts;
		bpf_map_update_elem(&threads, &tid, &moved, BPF_NOEXIST);
		bpf_map_delete_elem(&threads, &old_tid);
	}
	return 0;
}

/* This CPU's counters of the current process, or NULL when it is not watched. */
static __always_inline struct counters *current_counters(void)
{
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	u32 *job = bpf_map_lookup_elem(&watched, &tgid);

	return job ? counters_of(tgid, *job) : NULL;
}

PROBE(sys_enter)
int BPF_PROG(sys_enter, struct pt_regs *regs, long id)
{
	struct counters *c = current_counters();

	if (c)
		c->syscalls += 1;
	return 0;
}

PROBE(sys_exit)
int BPF_PROG(sys_exit, struct pt_regs *regs, long ret)
{
	if (ret <= 0)
		return 0;
	struct counters *c = current_counters();
	if (!c)
		return 0;
	switch (BPF_CORE_READ(regs, orig_ax)) {
	case NR_read:
	case NR_pread64:
	case NR_readv:
	case NR_preadv:
	case NR_preadv2:
	case NR_recvfrom:
	case NR_recvmsg:
		c->read_bytes += ret;
		break;
	case NR_write:
	case NR_pwrite64:
	case NR_writev:
	case NR_pwritev:
	case NR_pwritev2:
	case NR_sendto:
	case NR_sendmsg:
		c->write_bytes += ret;
		break;
	}
	return 0;
}

/* Fires in the submitter's context: reads it waits for, and writes it makes synchronously (O_DSYNC,
 * fsync, O_DIRECT). Background writeback of its dirty pages is submitted by kernel threads, not counted. */
PROBE(block_bio_queue)
int BPF_PROG(block_bio_queue, struct bio *bio)
{
	struct counters *c = current_counters();

	if (c)
		c->block_bytes += BPF_CORE_READ(bio, bi_iter.bi_size);
	return 0;
}
