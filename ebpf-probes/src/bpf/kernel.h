/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * The few kernel types the probes read, declared by hand instead of a 3 MB vmlinux.h.
 *
 * Every record here is CO-RE relocatable (preserve_access_index): only the fields we name exist in our
 * copy, in any order, and libbpf-style loaders (aya) rewrite each access to the field's offset in the
 * running kernel's BTF, matching by type and field name. So the layouts below need not match any kernel;
 * the names and the kinds of the fields must. Pointers are read with BPF_CORE_READ only, which is what lets
 * the same source build as tp_btf (typed pointers) and raw_tp (untyped, probe-read) programs.
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

typedef struct {
	int counter;
} atomic_t;

/* Only `live` is read: the number of threads of the process not yet past do_exit(). */
struct signal_struct {
	atomic_t live;
};

struct task_struct {
	unsigned int __state;
	int pid;  /* the thread id */
	int tgid; /* the process id */
	unsigned long min_flt;
	unsigned long maj_flt;
	struct signal_struct *signal;
};

/* Kernels before 5.14 called `__state` `state` (a long); CO-RE picks whichever the kernel has. */
struct task_struct___pre_5_14 {
	long state;
};

/* x86-64: the syscall number stays in orig_ax after ax receives the return value. */
struct pt_regs {
	unsigned long orig_ax;
};

struct bvec_iter {
	unsigned int bi_size; /* bytes left to transfer; the whole bio when it is queued */
};

struct bio {
	struct bvec_iter bi_iter;
};

#pragma clang attribute pop

/* include/linux/sched.h; stable since 4.14. */
#define TASK_RUNNING 0x0000
#define TASK_DEAD 0x0080

#endif
