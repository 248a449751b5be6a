//! The job: what migd starts, checkpoints and restores.
//!
//! A job is a process tree in its own PID namespace. Its PID 1 is `rmosix-init`, a small init that runs the
//! program, forwards signals to it, reaps orphans, and exits with the program's status. Because the whole
//! namespace is dumped, the restored tree gets a fresh namespace on the destination and keeps its inner PIDs,
//! so they never collide with the destination's processes.
//!
//! A job also has a mount namespace of its own, a copy of its node's taken at start, in which `/proc` is a proc
//! of the job's PID namespace. Two reasons. CRIU's parasite, which runs inside the job's init with the owner's
//! credentials, needs `/proc/self` to name the init itself (1); when it does not, it mounts a proc of its own,
//! which only root may do, so the jobs of ordinary users could not be dumped at all. And a program that reads
//! `/proc/<its getpid()>` must find itself, not a process of the host that happens to have that number. The
//! node's mounts in the job's namespace are slaves of the node's (mounts made on the node later still reach
//! the job) and are declared external to CRIU: nothing of them is dumped, and the destination's restore binds
//! its own mounts at the same paths. Mounts the job must not carry along (namespace handles, migd's image
//! store) are detached from the copy at start.
//!
//! The job's stdin, stdout and stderr are pipes whose other ends the supervisor (the caller) holds. At dump
//! they are declared external, and at restore new pipes take their place, so output keeps flowing after a
//! move. The inodes of the pipes a job holds are written beside its images, since the restore needs them.
//!
//! A fourth pipe carries the job's exit status: `rmosix-init` holds its write end as descriptor 3 and writes
//! the program's status into it before it exits. So the status reaches whoever holds the read end, not only
//! the job's parent: a supervisor that restarted and took up a job it did not start ([`Job::adopt`]) learns
//! how it ended too.
//!
//! A move changes nothing the job can see, its processes' states included: a process the job had stopped
//! (a child it sent SIGSTOP) stays stopped. CRIU records each process's state in the images; a dump or
//! restore that leaves the whole tree stopped (`leave_stopped`) stops everyone, so [`Frozen`] and
//! [`Job::resume`] continue only the processes the images say were running.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd as _, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::criu::{Criu, CriuError, DumpRequest, Owner, Placement, RestoreRequest, image};
use crate::images::ImageDir;
use crate::migratable;

/// Name of the file beside the images that records the job's pipe inodes.
pub const META_FILE: &str = "rmosix-job.meta";

/// The value of the SIGCONT that resumes a job's init after a dump or restore (sent with `sigqueue`):
/// `rmosix-init` does not pass it on to the job's processes, each of which is continued, or not, on its own.
pub const RESUME: usize = 0x524d_5852;

/// Whose job it is: the identity the program runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// `rmosix-init`.
    pub init: PathBuf,
    /// The program (looked up in `PATH` of `env` if it has no slash).
    pub program: OsString,
    /// Its arguments, without the program name.
    pub args: Vec<OsString>,
    /// The whole environment.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Identity to take; `None` keeps the caller's.
    pub credentials: Option<Credentials>,
    /// File mode creation mask.
    pub umask: u32,
    /// Resource limits to set, `(resource, soft, hard)` (`RLIMIT_*` numbers): the owner's, from `mosrun`.
    pub rlimits: Vec<(u32, u64, u64)>,
}

/// The supervisor's ends of a job's stdio.
#[derive(Debug)]
pub struct Stdio {
    /// Write end of the job's stdin.
    pub stdin: OwnedFd,
    /// Read end of the job's stdout.
    pub stdout: OwnedFd,
    /// Read end of the job's stderr.
    pub stderr: OwnedFd,
}

/// A running job.
#[derive(Debug)]
pub struct Job {
    pid: Pid,
    /// Inodes of the pipes the job holds as stdin, stdout, stderr, and its init's status pipe.
    pipes: [u64; 4],
    /// Read end of the status pipe: `rmosix-init` writes the program's status into it, 4 bytes, then exits.
    status: File,
    /// Whose it is: CRIU dumps the job of an ordinary user with that user's uid and gid (see [`Criu::dump`]).
    owner: Option<Owner>,
    /// PIDs, in the job's own PID namespace, of the processes that were stopped when the images it was
    /// restored from were made: [`Job::resume`] leaves them stopped. Empty for a job started here.
    stopped: HashSet<i32>,
}

/// A job that could not be started, dumped or restored.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot start job {program:?}: {what}: {source}")]
    Spawn {
        program: OsString,
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{program:?}: {what} contains a NUL byte")]
    Nul { program: OsString, what: &'static str },
    #[error("job {pid} cannot move: {}", reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NotMigratable { pid: i32, reasons: Vec<migratable::Reason> },
    #[error("cannot inspect job {pid}: {source}")]
    Inspect {
        pid: i32,
        #[source]
        source: migratable::InspectError,
    },
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error("job metadata {path}: {reason}")]
    Meta { path: PathBuf, reason: String },
    #[error("cannot {what} job {pid}: {source}")]
    Signal {
        what: &'static str,
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot create pipes: {0}")]
    Pipe(#[source] nix::Error),
}

/// Four pipes (stdio and status): the job's ends and ours.
struct Pipes {
    job: [OwnedFd; 4],
    ours: Stdio,
    status: File,
}

impl Pipes {
    fn inodes(&self) -> [u64; 4] {
        [inode(self.job[0].as_fd()), inode(self.job[1].as_fd()), inode(self.job[2].as_fd()), inode(self.job[3].as_fd())]
    }
}

fn pipes() -> Result<Pipes, JobError> {
    let flags = nix::fcntl::OFlag::O_CLOEXEC;
    let (in_r, in_w) = nix::unistd::pipe2(flags).map_err(JobError::Pipe)?;
    let (out_r, out_w) = nix::unistd::pipe2(flags).map_err(JobError::Pipe)?;
    let (err_r, err_w) = nix::unistd::pipe2(flags).map_err(JobError::Pipe)?;
    let (status_r, status_w) = nix::unistd::pipe2(flags).map_err(JobError::Pipe)?;
    Ok(Pipes {
        job: [in_r, out_w, err_w, status_w],
        ours: Stdio { stdin: in_w, stdout: out_r, stderr: err_r },
        status: File::from(status_r),
    })
}

fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd).map_or(0, |s| s.st_ino)
}

fn cstring(program: &OsStr, what: &'static str, s: &OsStr) -> Result<CString, JobError> {
    CString::new(s.as_bytes()).map_err(|_| JobError::Nul { program: program.to_owned(), what })
}

impl Job {
    /// Starts a job: `rmosix-init` as PID 1 of a new PID namespace, running the program with the given
    /// identity, environment, directory and umask, its stdio connected to new pipes whose other ends are
    /// returned. The job is a child of the caller.
    pub fn spawn(spec: &JobSpec, placement: &Placement) -> Result<(Self, Stdio), JobError> {
        let program = spec.program.clone();
        let c = |what, s: &OsStr| cstring(&program, what, s);
        let init = c("init path", spec.init.as_os_str())?;
        let mut argv = vec![init.clone(), c("program", &spec.program)?];
        for a in &spec.args {
            argv.push(c("argument", a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in &spec.env {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            envp.push(c("environment", &kv)?);
        }
        let cwd = c("working directory", spec.cwd.as_os_str())?;
        let argv_ptrs: Vec<*const libc::c_char> =
            argv.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp_ptrs: Vec<*const libc::c_char> =
            envp.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        // Opened in the child, inside the job's mount namespace and still as root: the exec'd file must lie
        // on a mount of the job's namespace for CRIU to find it, and the owner needs to be able to run
        // rmosix-init, not to reach the directory it is installed in.
        let init_path = c("init path", spec.init.as_os_str())?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let hidden =
            mounts_to_hide(&mountinfo).iter().map(|p| c("mount point", p.as_os_str())).collect::<Result<Vec<_>, _>>()?;
        let rlimits = spec.rlimits.clone();
        let pipes = pipes()?;
        let job_fds: [RawFd; 4] =
            [pipes.job[0].as_raw_fd(), pipes.job[1].as_raw_fd(), pipes.job[2].as_raw_fd(), pipes.job[3].as_raw_fd()];
        let netns = placement.netns.as_ref().map(AsRawFd::as_raw_fd);
        let cgroups: Vec<RawFd> = placement.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
        let creds = spec.credentials.clone();
        let groups: Vec<libc::gid_t> = creds.as_ref().map(|c| c.groups.clone()).unwrap_or_default();
        let umask = spec.umask;

        // Runs in the child, PID 1 of the new namespace, until exec: async-signal-safe calls only.
        let child = move || -> isize {
            // SAFETY: raw system calls on descriptors and buffers prepared before the clone.
            unsafe {
                if let Some(ns) = netns
                    && libc::setns(ns, libc::CLONE_NEWNET) != 0
                {
                    return say(120, b"rmosix: cannot enter the node's network namespace\n");
                }
                for &procs in &cgroups {
                    if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                        return say(121, b"rmosix: cannot put the job in its cgroup\n");
                    }
                }
                for (target, &fd) in job_fds.iter().enumerate() {
                    #[expect(clippy::cast_possible_wrap, clippy::cast_possible_truncation, reason = "0..4")]
                    if libc::dup2(fd, target as i32) < 0 {
                        return say(122, b"rmosix: cannot connect the job's stdio\n");
                    }
                }
                // Nothing of the supervisor's leaks into the job (stdio and init's status pipe, 3, are its
                // own): a descriptor opened outside the job's mount namespace could not even be dumped.
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
                if own_mounts(&hidden).is_err() {
                    return say(119, b"rmosix: cannot give the job a mount namespace with a /proc of its own\n");
                }
                let init_fd = libc::open(init_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if init_fd < 0 {
                    return say(118, b"rmosix: cannot open rmosix-init\n");
                }
                for &(resource, soft, hard) in &rlimits {
                    set_rlimit(resource, soft, hard);
                }
                if libc::setsid() < 0 {
                    return say(123, b"rmosix: cannot start a session for the job\n");
                }
                // Raw system calls, not libc's wrappers: glibc's setgroups/setgid/setuid make every thread
                // it knows of change too, and this child of a bare clone has none of the supervisor's
                // threads; it waits forever for one that was being created at the clone (seen under load).
                if let Some(c) = &creds
                    && (libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0
                        || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
                        || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0)
                {
                    return say(124, b"rmosix: cannot take the owner's identity\n");
                }
                libc::umask(umask);
                if libc::chdir(cwd.as_ptr()) != 0 {
                    return say(125, b"rmosix: cannot enter the working directory (can its owner reach it?)\n");
                }
                libc::fexecve(init_fd, argv_ptrs.as_ptr(), envp_ptrs.as_ptr());
                say(126, b"rmosix: cannot run rmosix-init\n")
            }
        };
        let mut stack = vec![0u8; 256 * 1024];
        // SAFETY: the child only runs the closure above (async-signal-safe) and then execs or exits.
        let pid = unsafe {
            nix::sched::clone(
                Box::new(child),
                &mut stack,
                nix::sched::CloneFlags::CLONE_NEWPID | nix::sched::CloneFlags::CLONE_NEWNS,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(|source| JobError::Spawn { program: spec.program.clone(), what: "clone", source })?;
        let inodes = pipes.inodes();
        drop(pipes.job);
        let owner = spec.credentials.as_ref().map(|c| Owner { uid: c.uid, gid: c.gid });
        Ok((Self { pid, pipes: inodes, status: pipes.status, owner, stopped: HashSet::new() }, pipes.ours))
    }

    /// Takes up a job this process did not start (a supervisor that restarted): its init's PID, the
    /// inodes of its pipes as [`Job::pipes`] gave them, whose it is, and the read end of its status pipe.
    pub fn adopt(pid: i32, pipes: [u64; 4], owner: Option<Owner>, status: OwnedFd) -> Self {
        Self { pid: Pid::from_raw(pid), pipes, status: File::from(status), owner, stopped: HashSet::new() }
    }

    /// Inodes of the pipes the job holds (stdin, stdout, stderr, status), for [`Job::adopt`].
    pub fn pipes(&self) -> [u64; 4] {
        self.pipes
    }

    /// The read end of the job's status pipe, for a keeper that outlives this process.
    pub fn status_fd(&self) -> BorrowedFd<'_> {
        self.status.as_fd()
    }

    /// Whose the job is, when it is not the caller's own.
    pub fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// Host PID of the job's init.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Sends a signal to the job's init, which forwards it to the program.
    pub fn signal(&self, signal: Signal) -> Result<(), JobError> {
        nix::sys::signal::kill(self.pid, signal).map_err(|source| JobError::Signal {
            what: "signal",
            pid: self.pid(),
            source,
        })
    }

    /// Whether the job's init is still there (not yet reaped), without touching it.
    pub fn alive(&self) -> bool {
        nix::sys::signal::kill(self.pid, None).is_ok()
    }

    /// Waits for the job to end; returns its exit code (128+N when the program died of signal N). The code
    /// comes from the status pipe, so a job this process did not start can be waited for too; a job whose
    /// init was killed before it could say (SIGKILL) ended with 137 (or what `waitpid` says, if it is ours).
    pub fn wait(&self) -> Result<i32, JobError> {
        use std::io::Read as _;
        let mut code = [0u8; 4];
        let said = (&self.status).read_exact(&mut code).ok().map(|()| i32::from_le_bytes(code));
        let reaped = loop {
            match nix::sys::wait::waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => break Some(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => break Some(128 + sig as i32),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                // Not our child (adopted), or reaped already (a killed frozen copy).
                Err(nix::errno::Errno::ECHILD) => break None,
                Err(source) => return Err(JobError::Signal { what: "wait for", pid: self.pid(), source }),
            }
        };
        Ok(said.or(reaped).unwrap_or(128 + Signal::SIGKILL as i32))
    }

    /// Checks that the job can move, then dumps it into `images` and leaves it frozen. Nothing is lost if a
    /// later step fails: [`Frozen::abort`] resumes the job where it was; [`Frozen::commit`] ends it once the
    /// job runs elsewhere. `placement` puts criu in the job's network namespace when the caller is not.
    pub fn dump(&self, criu: &Criu, images: &ImageDir, placement: &Placement) -> Result<Frozen, JobError> {
        let reasons = migratable::check(self.pid())
            .map_err(|source| JobError::Inspect { pid: self.pid(), source })?;
        if !reasons.is_empty() {
            return Err(JobError::NotMigratable { pid: self.pid(), reasons });
        }
        let meta = images.path().join(META_FILE);
        let text = format!("pipes {} {} {} {}\n", self.pipes[0], self.pipes[1], self.pipes[2], self.pipes[3]);
        std::fs::write(&meta, text).map_err(|e| JobError::Meta { path: meta.clone(), reason: e.to_string() })?;
        let dir = images.open_dir().map_err(|e| JobError::Meta { path: images.path().to_owned(), reason: e.to_string() })?;
        let request = DumpRequest {
            pid: self.pid(),
            images_dir: dir.as_fd(),
            external: self.pipes.iter().map(|ino| format!("pipe:[{ino}]")).collect(),
            skip_mounts: std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid()))
                .map(|m| mounts_to_hide(&m))
                .unwrap_or_default(),
            leave_stopped: true,
            placement,
            owner: self.owner,
        };
        // What was stopped before the dump stays stopped, whatever happens.
        let stopped_before = stopped_processes(self.pid);
        let frozen = criu.dump(&request).and_then(|()| {
            let stopped = image::stopped_tasks(images.path())?;
            let link_remaps = image::link_remaps(images.path())?;
            Ok(Frozen { pid: self.pid, done: false, stopped: host_pids(self.pid, &stopped), link_remaps })
        });
        frozen.map_err(|e| {
            // A failed dump may leave the tree stopped: it must keep running where it was. (CRIU removes the
            // link remaps of a dump that fails.)
            resume_tree(self.pid, &stopped_before);
            e.into()
        })
    }

    /// Restores the job whose images are in `images`, as a child of the caller, placed as `placement` says
    /// (the caller's network namespace and cgroups when empty), with new stdio pipes. `owner` is whose the
    /// job is (`None`: the caller's), for its next dump.
    pub fn restore(
        criu: &Criu,
        images: &ImageDir,
        placement: Placement,
        owner: Option<Owner>,
    ) -> Result<(Self, Stdio), JobError> {
        Self::restore_with(criu, images, placement, owner, false)
    }

    /// Like [`Job::restore`], but the restored job stays stopped until [`Job::resume`]: a destination that
    /// must check the job before it runs, or wait until the source has let its copy go.
    pub fn restore_stopped(
        criu: &Criu,
        images: &ImageDir,
        placement: Placement,
        owner: Option<Owner>,
    ) -> Result<(Self, Stdio), JobError> {
        Self::restore_with(criu, images, placement, owner, true)
    }

    /// Resumes a job restored stopped: every process but those that were stopped when its images were made,
    /// which stay stopped until the job (or its owner) continues them.
    pub fn resume(&self) {
        resume_tree(self.pid, &host_pids(self.pid, &self.stopped));
    }

    fn restore_with(
        criu: &Criu,
        images: &ImageDir,
        placement: Placement,
        owner: Option<Owner>,
        leave_stopped: bool,
    ) -> Result<(Self, Stdio), JobError> {
        let meta = images.path().join(META_FILE);
        let bad = |reason: String| JobError::Meta { path: meta.clone(), reason };
        let text = std::fs::read_to_string(&meta).map_err(|e| bad(e.to_string()))?;
        let old: Vec<u64> = text
            .strip_prefix("pipes ")
            .map(|rest| rest.split_whitespace().filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        if old.len() != 4 {
            return Err(bad(format!("expected `pipes IN OUT ERR STATUS`, found {text:?}")));
        }
        let pipes = pipes()?;
        let dir = images.open_dir().map_err(|e| bad(e.to_string()))?;
        let request = RestoreRequest {
            images_dir: dir.as_fd(),
            inherit: old.iter().zip(&pipes.job).map(|(ino, fd)| (format!("pipe:[{ino}]"), fd.as_fd())).collect(),
            placement,
            leave_stopped,
        };
        let pid = Pid::from_raw(criu.restore(&request)?);
        let stopped = match image::stopped_tasks(images.path()) {
            Ok(stopped) => stopped,
            Err(e) => {
                // CRIU read these images; if we cannot, the job must not run half right.
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
                return Err(e.into());
            }
        };
        let inodes = pipes.inodes();
        drop(pipes.job);
        Ok((Self { pid, pipes: inodes, status: pipes.status, owner, stopped }, pipes.ours))
    }
}

/// A dumped job, stopped where it was, waiting for the caller's decision.
#[derive(Debug)]
pub struct Frozen {
    pid: Pid,
    done: bool,
    /// Host PIDs of the job's processes that were stopped before the dump: resuming leaves them stopped.
    stopped: HashSet<i32>,
    /// The temporary names the dump gave to files the job holds whose own names are gone (in the job's mount
    /// namespace): the restore removes them, and so must a job that stays.
    link_remaps: Vec<PathBuf>,
}

impl Frozen {
    /// The job runs elsewhere now, or is about to: end this copy (the whole PID namespace goes with its
    /// init) and reap it, so that what it holds (file locks, FIFOs and their data) is free for the restore.
    /// The images stay valid: the temporary names of files whose names were gone are kept for the restore.
    pub fn commit(mut self) -> Result<(), JobError> {
        self.done = true;
        nix::sys::signal::kill(self.pid, Signal::SIGKILL)
            .map_err(|source| JobError::Signal { what: "kill", pid: self.pid.as_raw(), source })?;
        let _ = nix::sys::wait::waitpid(self.pid, None);
        Ok(())
    }

    /// The move failed: resume the job where it was, as it was.
    pub fn abort(mut self) {
        self.resume();
    }

    fn resume(&mut self) {
        self.done = true;
        // Through the job's own root, while its mount namespace is still there.
        for name in &self.link_remaps {
            let path = Path::new("/proc").join(self.pid.to_string()).join("root").join(name.strip_prefix("/").unwrap_or(name));
            let _ = std::fs::remove_file(path);
        }
        resume_tree(self.pid, &self.stopped);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Neither committed nor aborted (an early return, a panic): never leave a job stopped for good.
        if !self.done {
            self.resume();
        }
    }
}

/// In a new job's child that cannot go on: says why on its stderr (the deputy's, once connected) and gives
/// the exit code. Async-signal-safe.
fn say(code: isize, why: &[u8]) -> isize {
    // SAFETY: write(2) of a static buffer.
    unsafe { libc::write(2, why.as_ptr().cast(), why.len()) };
    code
}

/// In a new job's child, still root, in its new mount namespace: keeps the node's mounts as slaves, detaches
/// `hidden` and the node's `/proc` (with whatever is mounted under it), and mounts a proc of the job's PID
/// namespace there. Async-signal-safe: runs between clone and exec.
unsafe fn own_mounts(hidden: &[CString]) -> Result<(), ()> {
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        if libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_SLAVE, std::ptr::null())
            != 0
        {
            return Err(());
        }
        for path in hidden {
            // A hidden mount under another hidden one is gone with it already.
            libc::umount2(path.as_ptr(), libc::MNT_DETACH);
        }
        libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH);
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()) != 0 {
            return Err(());
        }
    }
    Ok(())
}

/// Sets a resource limit in a new job's child (async-signal-safe). A hard limit above what this process may
/// grant (no `CAP_SYS_RESOURCE`) is lowered to the current one rather than leaving the limit unset.
unsafe fn set_rlimit(resource: u32, soft: u64, hard: u64) {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let wanted = libc::rlimit { rlim_cur: soft, rlim_max: hard };
        if libc::setrlimit(resource, &raw const wanted) == 0 {
            return;
        }
        let mut now = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(resource, &raw mut now) == 0 {
            let max = hard.min(now.rlim_max);
            let clamped = libc::rlimit { rlim_cur: soft.min(max), rlim_max: max };
            libc::setrlimit(resource, &raw const clamped);
        }
    }
}

/// The mount points a job should not carry in its mount namespace: namespace handles (`nsfs` mounts, and
/// `/run/netns`, where `ip netns` keeps them in a shared mount of its own), which would keep those
/// namespaces alive and cannot be restored elsewhere, and image stores (`rmosix-images` tmpfs mounts), from
/// `mountinfo` text. At start they are detached from the job's copy of the node's mounts; at dump, the ones
/// that propagated into it since (its mounts are slaves of the node's) are left out of the images.
pub fn mounts_to_hide(mountinfo: &str) -> Vec<PathBuf> {
    let mut hide: Vec<PathBuf> = rmosix_common::mountinfo::parse(mountinfo)
        .into_iter()
        .filter(|m| {
            let handles = m.fstype == "nsfs" || m.point == "/run/netns" || m.point == "/var/run/netns";
            handles || crate::images::is_store(m)
        })
        .map(|m| PathBuf::from(m.point))
        .collect();
    // Deepest first, so that each is still reachable when its turn comes.
    hide.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    hide.dedup();
    hide
}

/// Sends SIGCONT to every process of the tree rooted at `root` but those in `stopped` (host PIDs). The
/// root, the job's init, gets it as [`RESUME`], or it would continue every process of the job itself.
fn resume_tree(root: Pid, stopped: &HashSet<i32>) {
    for pid in migratable::job_processes(root.as_raw()).unwrap_or_else(|_| vec![root.as_raw()]) {
        if stopped.contains(&pid) {
            continue;
        }
        if pid == root.as_raw() {
            let value = libc::sigval { sival_ptr: RESUME as *mut libc::c_void };
            // SAFETY: sigqueue(3) with a plain value.
            unsafe { libc::sigqueue(pid, libc::SIGCONT, value) };
        } else {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

/// Host PIDs of the processes of the tree rooted at `root` that are stopped now (state `T`).
fn stopped_processes(root: Pid) -> HashSet<i32> {
    let processes = migratable::job_processes(root.as_raw()).unwrap_or_default();
    processes
        .into_iter()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .collect()
}

/// Host PIDs of the processes of the job rooted at `root` whose PIDs in the job's namespace are `inner`.
fn host_pids(root: Pid, inner: &HashSet<i32>) -> HashSet<i32> {
    if inner.is_empty() {
        return HashSet::new();
    }
    let processes = migratable::job_processes(root.as_raw()).unwrap_or_default();
    processes
        .into_iter()
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            // `NSpid:` lists the PID in each namespace from ours down; the last is the job's.
            let own = status.lines().find_map(|l| l.strip_prefix("NSpid:")).and_then(|l| l.split_whitespace().last()?.parse().ok());
            own.is_some_and(|own| inner.contains(&own))
        })
        .collect()
}

/// Opens the placement of a node: its network namespace file and its cgroups' `cgroup.procs`.
pub fn placement(netns: Option<&Path>, cgroups: &[PathBuf]) -> std::io::Result<Placement> {
    let netns = netns.map(File::open).transpose()?;
    let cgroup_procs = cgroups
        .iter()
        .map(|dir| std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")))
        .collect::<std::io::Result<Vec<File>>>()?;
    Ok(Placement { netns, cgroup_procs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_handles_and_image_stores_are_hidden_deepest_first() {
        let mountinfo = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:4 net:[4026532290] /run/netns/a\\040b rw shared:5 - nsfs nsfs rw
41 27 0:50 / /run/rmosix/images rw - tmpfs rmosix-images rw,mode=700,huge=within_size
42 41 0:51 / /run/rmosix/images/node2 rw - tmpfs rmosix-images rw
39 27 0:24 /netns /run/netns rw shared:4 - tmpfs tmpfs rw
43 27 0:52 / /dev/shm rw - tmpfs tmpfs rw
";
        assert_eq!(
            mounts_to_hide(mountinfo),
            [
                PathBuf::from("/run/rmosix/images/node2"),
                PathBuf::from("/run/netns/a b"),
                PathBuf::from("/run/rmosix/images"),
                PathBuf::from("/run/netns"),
            ]
        );
        assert!(mounts_to_hide("garbage\n\n - \n").is_empty());
    }
}
