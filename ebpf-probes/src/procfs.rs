//! The fallback when the probes can't load: [`Counters`] of one process read from `/proc`.
//!
//! Cheaper to set up (nothing to load) but coarser, and costlier per reading (several files per thread).
//! Field by field, against the probes:
//!
//! - `cpu_ns`, `wait_ns`: sum of `/proc/PID/task/*/schedstat` (on-CPU time and run delay, kept by the
//!   scheduler's `sched_info`). Live threads only: the time of threads that exited is lost.
//! - `voluntary_switches`, `involuntary_switches`: sum of `/proc/PID/task/*/status`; live threads only too.
//! - `syscalls`: `syscr + syscw` of `/proc/PID/io`, so only read- and write-like calls, not all calls.
//! - `read_bytes`, `write_bytes`: `rchar`, `wchar`; these also count `sendfile`, `splice` and the like,
//!   which the probes leave out.
//! - `block_bytes`: `read_bytes + write_bytes` of `/proc/PID/io`. Reads are counted when they reach the
//!   storage layer, as by the probes; writes when the process dirties page cache, so buffered writes that
//!   kernel threads write back later count here and not in the probes.
//! - `minor_faults`, `major_faults`: `/proc/PID/stat`, for the whole process including exited threads.
//!
//! All of them count from the start of the process, not from a watch.

use std::fs;
use std::io;
use std::path::Path;

use crate::Counters;

/// What this process has used since it started, read from `/proc`. `pid` is a host process ID. Needs the
/// right to read `/proc/PID/io` (the same user, or `CAP_SYS_PTRACE`).
pub fn proc_counters(pid: u32) -> io::Result<Counters> {
    let dir = Path::new("/proc").join(pid.to_string());
    let (minor_faults, major_faults) =
        parse_stat_faults(&read(&dir.join("stat"))?).ok_or_else(|| malformed(&dir, "stat"))?;
    let io = parse_io(&read(&dir.join("io"))?).ok_or_else(|| malformed(&dir, "io"))?;
    let mut counters = Counters {
        syscalls: io.syscr + io.syscw,
        read_bytes: io.rchar,
        write_bytes: io.wchar,
        block_bytes: io.read_bytes + io.write_bytes,
        minor_faults,
        major_faults,
        ..Counters::default()
    };
    let tasks = dir.join("task");
    for entry in fs::read_dir(&tasks).map_err(|error| annotate(&tasks, &error))? {
        let task = entry.map_err(|error| annotate(&tasks, &error))?.path();
        // A thread that exits while we read is gone from the sums, as it would be a moment later.
        let (Some(schedstat), Some(status)) =
            (read_if_alive(&task.join("schedstat"))?, read_if_alive(&task.join("status"))?)
        else {
            continue;
        };
        let (cpu_ns, wait_ns) = parse_schedstat(&schedstat).ok_or_else(|| malformed(&task, "schedstat"))?;
        let (voluntary, involuntary) = parse_status_switches(&status).ok_or_else(|| malformed(&task, "status"))?;
        counters.cpu_ns += cpu_ns;
        counters.wait_ns += wait_ns;
        counters.voluntary_switches += voluntary;
        counters.involuntary_switches += involuntary;
    }
    Ok(counters)
}

/// Reads a `/proc` file; the error names it.
fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path).map_err(|error| annotate(path, &error))
}

/// Reads a thread's file, or `None` when the thread has exited meanwhile.
fn read_if_alive(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(error) => Err(annotate(path, &error)),
    }
}

fn annotate(path: &Path, error: &io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("cannot read {}: {error}", path.display()))
}

fn malformed(dir: &Path, file: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}/{file} is not in the expected format", dir.display()))
}

/// `/proc/PID/task/TID/schedstat`: `<on-CPU ns> <run delay ns> <timeslices>`.
fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
    Some((fields.next()?.ok()?, fields.next()?.ok()?))
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of a `status` file.
fn parse_status_switches(text: &str) -> Option<(u64, u64)> {
    let (mut voluntary, mut involuntary) = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key {
            "voluntary_ctxt_switches" => voluntary = value.trim().parse().ok(),
            "nonvoluntary_ctxt_switches" => involuntary = value.trim().parse().ok(),
            _ => {}
        }
    }
    Some((voluntary?, involuntary?))
}

/// The fields of `/proc/PID/io` we use.
#[derive(Debug, Default, PartialEq, Eq)]
struct IoStats {
    /// Bytes returned by read-like calls.
    rchar: u64,
    /// Bytes passed to write-like calls.
    wchar: u64,
    /// Read-like calls.
    syscr: u64,
    /// Write-like calls.
    syscw: u64,
    /// Bytes fetched from the storage layer.
    read_bytes: u64,
    /// Bytes of page cache dirtied (or written directly) for storage.
    write_bytes: u64,
}

/// `/proc/PID/io`: `key: value` lines; all six keys must be there.
fn parse_io(text: &str) -> Option<IoStats> {
    let mut fields: [Option<u64>; 6] = [None; 6];
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let slot = match key {
            "rchar" => 0,
            "wchar" => 1,
            "syscr" => 2,
            "syscw" => 3,
            "read_bytes" => 4,
            "write_bytes" => 5,
            _ => continue,
        };
        fields[slot] = Some(value.trim().parse().ok()?);
    }
    Some(IoStats {
        rchar: fields[0]?,
        wchar: fields[1]?,
        syscr: fields[2]?,
        syscw: fields[3]?,
        read_bytes: fields[4]?,
        write_bytes: fields[5]?,
    })
}

/// `minflt` and `majflt` (fields 10 and 12) of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted after the last `)`.
fn parse_stat_faults(text: &str) -> Option<(u64, u64)> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest: " state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt ..."
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(10).collect();
    Some((fields.get(7)?.parse().ok()?, fields.get(9)?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat("199101680 15856802 362\n"), Some((199_101_680, 15_856_802)));
        assert_eq!(parse_schedstat("12\n"), None);
        assert_eq!(parse_schedstat("x 1 2\n"), None);
    }

    #[test]
    fn parses_context_switches_of_status() {
        let status = "Name:\tsh\nState:\tR (running)\nTgid:\t42\nvoluntary_ctxt_switches:\t332\n\
                      nonvoluntary_ctxt_switches:\t30\n";
        assert_eq!(parse_status_switches(status), Some((332, 30)));
        assert_eq!(parse_status_switches("Name:\tsh\nvoluntary_ctxt_switches:\t1\n"), None);
    }

    #[test]
    fn parses_io() {
        let io = "rchar: 6976\nwchar: 12\nsyscr: 10\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: 8192\n\
                  cancelled_write_bytes: 0\n";
        assert_eq!(
            parse_io(io),
            Some(IoStats { rchar: 6976, wchar: 12, syscr: 10, syscw: 2, read_bytes: 4096, write_bytes: 8192 })
        );
        assert_eq!(parse_io("rchar: 1\nwchar: 2\n"), None);
        assert_eq!(parse_io("rchar: x\nwchar: 2\nsyscr: 1\nsyscw: 1\nread_bytes: 0\nwrite_bytes: 0\n"), None);
    }

    #[test]
    fn parses_faults_of_stat_whatever_the_command_name() {
        let stat = "20385 (cat) R 20372 20372 13519 0 -1 4194304 101 0 7 0 0 0 0 0 20 0 1 0 233376 3133440 411";
        assert_eq!(parse_stat_faults(stat), Some((101, 7)));
        let odd = "7 (a) b (c)) S 1 7 7 0 -1 4194560 55 3 2 1 0 0 0 0 20 0 1 0 10 100 10";
        assert_eq!(parse_stat_faults(odd), Some((55, 2)));
        assert_eq!(parse_stat_faults("7 (truncated) S 1 7"), None);
        assert_eq!(parse_stat_faults("no parenthesis at all"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = proc_counters(std::process::id()).expect("our own /proc files are readable");
        assert!(me.cpu_ns > 0, "{me:?}");
        assert!(me.minor_faults > 0, "{me:?}");
        assert!(me.syscalls > 0 && me.read_bytes > 0, "{me:?}");
        let missing = proc_counters(u32::MAX).expect_err("no process has pid 2^32-1");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
