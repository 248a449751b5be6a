//! [`Totals`]: what the kernel keeps per thread in its `task_struct`, the raw material of [`Counters`].
//!
//! The same numbers come from two places: `/proc/PID/task/TID/*` for a thread that is alive
//! ([`procfs`](crate::procfs)), and the probes' maps for the threads that have exited (`struct totals` of
//! `bpf/probes.h`, which this type mirrors). They are summed as they are and turned into [`Counters`] last,
//! because `block_bytes` is a difference of sums.

use std::ops::{Add, AddAssign};

use crate::Counters;

/// One thread's totals since it started, or a sum of them. `struct totals` of `bpf/probes.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// `se.sum_exec_runtime`: time on a CPU, ns.
    pub(crate) cpu_ns: u64,
    /// `sched_info.run_delay`: time runnable but waiting for a CPU, ns.
    pub(crate) wait_ns: u64,
    /// Voluntary context switches.
    pub(crate) nvcsw: u64,
    /// Involuntary context switches.
    pub(crate) nivcsw: u64,
    /// Minor page faults.
    pub(crate) min_flt: u64,
    /// Major page faults.
    pub(crate) maj_flt: u64,
    /// `ioac.rchar`: bytes returned by read-family system calls.
    pub(crate) rchar: u64,
    /// `ioac.wchar`: bytes passed to write-family system calls.
    pub(crate) wchar: u64,
    /// `ioac.syscr`: read-family system calls.
    pub(crate) syscr: u64,
    /// `ioac.syscw`: write-family system calls.
    pub(crate) syscw: u64,
    /// `ioac.read_bytes`: bytes this thread made the storage layer fetch.
    pub(crate) read_bytes: u64,
    /// `ioac.write_bytes`: bytes of page cache this thread dirtied (or wrote directly) for storage.
    pub(crate) write_bytes: u64,
    /// `ioac.cancelled_write_bytes`: dirty page cache this thread dropped before it was written
    /// (truncation), possibly dirtied by another.
    pub(crate) cancelled_write_bytes: u64,
}

// SAFETY: `repr(C)`, `u64`s only, no padding: every bit pattern is a valid value.
unsafe impl aya::Pod for Totals {}

impl Totals {
    /// Field by field, saturating at zero.
    #[must_use]
    pub(crate) fn saturating_sub(&self, other: &Totals) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns.saturating_sub(other.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(other.wait_ns),
            nvcsw: self.nvcsw.saturating_sub(other.nvcsw),
            nivcsw: self.nivcsw.saturating_sub(other.nivcsw),
            min_flt: self.min_flt.saturating_sub(other.min_flt),
            maj_flt: self.maj_flt.saturating_sub(other.maj_flt),
            rchar: self.rchar.saturating_sub(other.rchar),
            wchar: self.wchar.saturating_sub(other.wchar),
            syscr: self.syscr.saturating_sub(other.syscr),
            syscw: self.syscw.saturating_sub(other.syscw),
            read_bytes: self.read_bytes.saturating_sub(other.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(other.write_bytes),
            cancelled_write_bytes: self.cancelled_write_bytes.saturating_sub(other.cancelled_write_bytes),
        }
    }

    /// What these totals say, as [`Counters`] (the mapping is in the crate docs).
    pub(crate) fn counters(&self) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns,
            wait_ns: self.wait_ns,
            voluntary_switches: self.nvcsw,
            involuntary_switches: self.nivcsw,
            syscalls: self.syscr.saturating_add(self.syscw),
            read_bytes: self.rchar,
            write_bytes: self.wchar,
            block_bytes: self.read_bytes.saturating_add(self.write_bytes).saturating_sub(self.cancelled_write_bytes),
            minor_faults: self.min_flt,
            major_faults: self.maj_flt,
        }
    }
}

impl Add for Totals {
    type Output = Totals;

    /// Field by field, saturating (never reached: 2^64 ns is 584 years).
    fn add(self, other: Totals) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns.saturating_add(other.cpu_ns),
            wait_ns: self.wait_ns.saturating_add(other.wait_ns),
            nvcsw: self.nvcsw.saturating_add(other.nvcsw),
            nivcsw: self.nivcsw.saturating_add(other.nivcsw),
            min_flt: self.min_flt.saturating_add(other.min_flt),
            maj_flt: self.maj_flt.saturating_add(other.maj_flt),
            rchar: self.rchar.saturating_add(other.rchar),
            wchar: self.wchar.saturating_add(other.wchar),
            syscr: self.syscr.saturating_add(other.syscr),
            syscw: self.syscw.saturating_add(other.syscw),
            read_bytes: self.read_bytes.saturating_add(other.read_bytes),
            write_bytes: self.write_bytes.saturating_add(other.write_bytes),
            cancelled_write_bytes: self.cancelled_write_bytes.saturating_add(other.cancelled_write_bytes),
        }
    }
}

impl AddAssign for Totals {
    fn add_assign(&mut self, other: Totals) {
        *self = *self + other;
    }
}

impl std::iter::Sum for Totals {
    fn sum<I: Iterator<Item = Totals>>(iter: I) -> Totals {
        iter.fold(Totals::default(), Add::add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> Totals {
        Totals {
            cpu_ns: n,
            wait_ns: 2 * n,
            nvcsw: 3 * n,
            nivcsw: 4 * n,
            min_flt: 5 * n,
            maj_flt: 6 * n,
            rchar: 7 * n,
            wchar: 8 * n,
            syscr: 9 * n,
            syscw: 10 * n,
            read_bytes: 11 * n,
            write_bytes: 12 * n,
            cancelled_write_bytes: 13 * n,
        }
    }

    #[test]
    fn the_layout_matches_probes_h() {
        // struct totals: thirteen u64.
        assert_eq!(size_of::<Totals>(), 13 * 8);
    }

    #[test]
    fn adds_and_subtracts_field_by_field() {
        assert_eq!(sample(1) + sample(2), sample(3));
        assert_eq!([sample(1), sample(4)].into_iter().sum::<Totals>(), sample(5));
        assert_eq!(sample(5).saturating_sub(&sample(2)), sample(3));
        assert_eq!(sample(2).saturating_sub(&sample(5)), Totals::default());
    }

    #[test]
    fn counters_say_what_the_kernel_counted() {
        let c = sample(1).counters();
        assert_eq!((c.cpu_ns, c.wait_ns, c.voluntary_switches, c.involuntary_switches), (1, 2, 3, 4));
        assert_eq!((c.minor_faults, c.major_faults), (5, 6));
        assert_eq!((c.read_bytes, c.write_bytes, c.syscalls), (7, 8, 19));
        // Storage: read 11 + dirtied 12 - cancelled 13.
        assert_eq!(c.block_bytes, 10);
        let cancelled_more = Totals { write_bytes: 1, cancelled_write_bytes: 5, ..Totals::default() };
        assert_eq!(cancelled_more.counters().block_bytes, 0, "saturates: cancelled by this thread, dirtied by another");
    }
}
