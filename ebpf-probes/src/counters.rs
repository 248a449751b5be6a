//! [`Counters`]: what the probes, or the `/proc` fallback, measured about a process or a job.

use std::iter::Sum;
use std::ops::{Add, AddAssign};

/// Cumulative resource use of a process, or the sum over a job's processes.
///
/// From the probes ([`Probes`](crate::Probes)) the counts start when the process was watched (or forked
/// from a watched one); from [`proc_counters`](crate::proc_counters) they start at the process's start.
/// Either way they grow, but for a reading taken while a thread exits, which may come out a little low:
/// compare two readings with [`Counters::since`] to get what happened in between. Every field is a total
/// the kernel keeps per thread; the crate docs say which.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Time on a CPU, in nanoseconds.
    pub cpu_ns: u64,
    /// Time runnable but waiting for a CPU (run delay), in nanoseconds: how much the node's CPUs are
    /// contended for this process, the cue for moving a CPU-bound job away.
    pub wait_ns: u64,
    /// Switches away from the CPU to sleep or block: waiting for I/O, a lock, a timer, input.
    pub voluntary_switches: u64,
    /// Switches away while still runnable: preemption (and yields).
    pub involuntary_switches: u64,
    /// Read- and write-family system calls (`read`, `readv`, `pread64`, `write`, `sendfile`, ...; not the
    /// `send`/`recv` family): the kernel's `syscr + syscw`. Not every system call.
    pub syscalls: u64,
    /// Bytes returned by read-family system calls (files, pipes, sockets alike; not `recv` and its kin).
    pub read_bytes: u64,
    /// Bytes accepted by write-family system calls (files, pipes, sockets alike; not `send` and its kin).
    pub write_bytes: u64,
    /// Bytes of storage I/O the process caused: read from the block layer, plus page cache dirtied for
    /// storage (less what was dropped unwritten). The part of its I/O that reaches a disk, which a move
    /// can't take along.
    pub block_bytes: u64,
    /// Page faults served without I/O.
    pub minor_faults: u64,
    /// Page faults that needed I/O.
    pub major_faults: u64,
}

impl Counters {
    /// What happened between `earlier` and `self`, two readings of the same process or job. Saturates at
    /// zero: a reading taken while a thread exits can come out a little lower than the one before.
    #[must_use]
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            voluntary_switches: self.voluntary_switches.saturating_sub(earlier.voluntary_switches),
            involuntary_switches: self.involuntary_switches.saturating_sub(earlier.involuntary_switches),
            syscalls: self.syscalls.saturating_sub(earlier.syscalls),
            read_bytes: self.read_bytes.saturating_sub(earlier.read_bytes),
            write_bytes: self.write_bytes.saturating_sub(earlier.write_bytes),
            block_bytes: self.block_bytes.saturating_sub(earlier.block_bytes),
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            major_faults: self.major_faults.saturating_sub(earlier.major_faults),
        }
    }
}

impl Add for Counters {
    type Output = Counters;

    /// Field by field; wraps never in practice (2^64 ns is 584 years), saturates if it did.
    fn add(self, other: Counters) -> Counters {
        Counters {
            cpu_ns: self.cpu_ns.saturating_add(other.cpu_ns),
            wait_ns: self.wait_ns.saturating_add(other.wait_ns),
            voluntary_switches: self.voluntary_switches.saturating_add(other.voluntary_switches),
            involuntary_switches: self.involuntary_switches.saturating_add(other.involuntary_switches),
            syscalls: self.syscalls.saturating_add(other.syscalls),
            read_bytes: self.read_bytes.saturating_add(other.read_bytes),
            write_bytes: self.write_bytes.saturating_add(other.write_bytes),
            block_bytes: self.block_bytes.saturating_add(other.block_bytes),
            minor_faults: self.minor_faults.saturating_add(other.minor_faults),
            major_faults: self.major_faults.saturating_add(other.major_faults),
        }
    }
}

impl AddAssign for Counters {
    fn add_assign(&mut self, other: Counters) {
        *self = *self + other;
    }
}

impl Sum for Counters {
    fn sum<I: Iterator<Item = Counters>>(iter: I) -> Counters {
        iter.fold(Counters::default(), Add::add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64) -> Counters {
        Counters {
            cpu_ns: n,
            wait_ns: 2 * n,
            voluntary_switches: 3 * n,
            involuntary_switches: 4 * n,
            syscalls: 5 * n,
            read_bytes: 6 * n,
            write_bytes: 7 * n,
            block_bytes: 8 * n,
            minor_faults: 9 * n,
            major_faults: 10 * n,
        }
    }

    #[test]
    fn adds_and_sums_field_by_field() {
        assert_eq!(sample(1) + sample(2), sample(3));
        let mut c = sample(1);
        c += sample(4);
        assert_eq!(c, sample(5));
        assert_eq!([sample(1), sample(2), sample(3)].into_iter().sum::<Counters>(), sample(6));
        assert_eq!(std::iter::empty::<Counters>().sum::<Counters>(), Counters::default());
    }

    #[test]
    fn since_subtracts_and_saturates() {
        assert_eq!(sample(5).since(&sample(2)), sample(3));
        assert_eq!(sample(2).since(&sample(5)), Counters::default());
    }
}
