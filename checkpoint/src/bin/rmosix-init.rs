//! `rmosix-init PROGRAM [ARGS...]`: PID 1 of a job's PID namespace.
//!
//! The kernel gives a namespace's init no default signal actions, and makes it the parent of every orphan
//! in the namespace. So the program does not run as PID 1 itself: this init runs it as PID 2, forwards to it
//! every signal a user or the deputy may send (INT, TERM, HUP, QUIT, USR1, USR2, WINCH, ALRM; TSTP and CONT
//! as stop and continue of every process of the job),
//! reaps every child, and when the program ends, exits with its status (128+N if it died of signal N),
//! which takes the rest of the namespace down with it.
//!
//! Its descriptor 3, when open, is the job's status pipe: it writes the program's status there (4 bytes,
//! little-endian) before it exits, so the status reaches the job's supervisor even when that is not its
//! parent (a supervisor that restarted). The program does not inherit it.
//!
//! It is deliberately tiny and stateless between signals, since CRIU freezes and restores it with the job.
//!
//! One SIGCONT is not forwarded: migd's, when it resumes a job after a dump or restore that left every
//! process stopped (`Job::resume`, `Frozen::abort`). migd continues each process that was running before
//! itself, and sends this init its SIGCONT with `sigqueue` and [`RESUME`] as the value: forwarding that one
//! would continue a process the job had stopped.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt as _;
use std::process::ExitCode;

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction, sigprocmask, SigmaskHow};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, execvp, fork};

use rmosix_checkpoint::job::RESUME;
use rmosix_common::control::FORWARDED_SIGNALS as FORWARDED;

/// The job's status pipe, set up by the supervisor.
const STATUS_FD: i32 = 3;

extern "C" fn noop(_: libc::c_int) {}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: rmosix-init PROGRAM [ARGS...]");
        return ExitCode::from(2);
    }
    let Ok(c_args) = args.iter().map(|a| CString::new(a.as_bytes())).collect::<Result<Vec<CString>, _>>() else {
        eprintln!("rmosix-init: an argument contains a NUL byte");
        return ExitCode::from(2);
    };

    // A namespace init only receives signals it has a handler for: install one (it never runs, the
    // signals stay blocked and are taken with sigwait), so signals from outside the namespace arrive.
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    let action = SigAction::new(SigHandler::Handler(noop), SaFlags::SA_RESTART, SigSet::empty());
    for sig in FORWARDED {
        // SAFETY: installing a handler that does nothing.
        let _ = unsafe { sigaction(sig, &action) };
        waited.add(sig);
    }
    // SAFETY: as above; SIGCHLD needs a handler so that it is not discarded while blocked.
    let _ = unsafe { sigaction(Signal::SIGCHLD, &action) };
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None) {
        eprintln!("rmosix-init: cannot block signals: {e}");
        return ExitCode::from(125);
    }

    // The status pipe stays ours: the program must not hold it (nor keep it open after we are gone).
    // SAFETY: fcntl(2) on a descriptor number; fails harmlessly when it is not open.
    let status = unsafe { libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;

    // SAFETY: single-threaded; the child only resets its signal state and execs.
    let program = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            for sig in FORWARDED.iter().chain(std::iter::once(&Signal::SIGCHLD)) {
                // SAFETY: restoring default dispositions before exec.
                let _ = unsafe { sigaction(*sig, &default) };
            }
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
            let err = execvp(&c_args[0], &c_args).unwrap_err();
            eprintln!("rmosix-init: cannot run {}: {err}", args[0].to_string_lossy());
            // 127: command not found or not executable, as shells say.
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            eprintln!("rmosix-init: cannot fork: {e}");
            return ExitCode::from(125);
        }
    };

    loop {
        // SAFETY: sigwaitinfo fills the zeroed siginfo it is given.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let number = unsafe { libc::sigwaitinfo(waited.as_ref(), &raw mut info) };
        let Ok(sig) = Signal::try_from(number) else { continue };
        match sig {
            Signal::SIGCHLD => {}
            // SAFETY: a SIGCONT queued with sigqueue carries a value.
            Signal::SIGCONT if info.si_code == libc::SI_QUEUE && unsafe { info.si_value() }.sival_ptr as usize == RESUME => {
                continue;
            }
            // The job's process group has no parent in its session (it is orphaned), so the kernel would
            // discard a SIGTSTP: stop and continue every process of the namespace instead (-1: all but us).
            Signal::SIGTSTP => {
                let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGSTOP);
                continue;
            }
            Signal::SIGCONT => {
                let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGCONT);
                continue;
            }
            _ => {
                let _ = nix::sys::signal::kill(program, sig);
                continue;
            }
        }
        if let Some(code) = reap(program) {
            if status {
                // SAFETY: write(2) of a local buffer to our own descriptor.
                let _ = unsafe { libc::write(STATUS_FD, i32::from(code).to_le_bytes().as_ptr().cast(), 4) };
            }
            return ExitCode::from(code);
        }
    }
}

/// Reaps every child that has ended; returns the exit code once the program itself has ended.
fn reap(program: Pid) -> Option<u8> {
    let mut result = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == program => {
                result = Some(u8::try_from(code).unwrap_or(255));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                result = Some(u8::try_from(128 + sig as i32).unwrap_or(255));
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return result,
            Ok(_) => {}
        }
    }
}
