//! CRIU through its RPC: `criu swrk FD` speaks protobuf over a `SOCK_SEQPACKET` socket pair, as runc and
//! youki drive it. No CLI output is parsed. The message types are the ones `rust-criu` generates from CRIU's
//! `rpc.proto`; the request/response exchange is ours, because the options we rely on (`leave_stopped`,
//! `inherit_fd` with our own descriptors, the restored PID) are not all reachable through its `Criu` type.
//!
//! Every operation writes its own log at level 4 into the log directory; a successful operation removes its
//! log, a failed one keeps it and its path and error lines are part of the error.
//!
//! A restore forks the job's init as a child of ours (`rst_sibling`, so that the caller can wait for the
//! job). When the restore fails, CRIU kills that init but cannot reap it, not being its parent: each failed
//! restore would leave a zombie (named after the criu binary) behind, or, when criu itself had to be killed,
//! a half-restored tree. So a restore asks criu to say the init's PID as soon as it exists (`notify_scripts`:
//! criu sends `setup-namespaces` with it over the RPC socket and waits for our answer), and a failed restore
//! kills and reaps that init, and then any zombie child of ours that criu forked before it could say so.

use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use protobuf::{Enum as _, Message as _, MessageField};
use rust_criu::rust_criu_protobuf::rpc::{
    Criu_cg_mode, Criu_opts, Criu_req, Criu_req_type, Criu_resp, Inherit_fd,
};

pub mod image;

/// The most disk space a deleted file the job holds may take (`ghost_limit`, CRIU's default is 1 MiB): such
/// a file has no name to reopen at the destination, so CRIU copies its contents into the images, where they
/// travel like the job's memory. A job holding a larger one is refused before it is frozen
/// ([`crate::migratable::Reason::LargeDeletedFile`]). 256 MiB: more than a temporary file or an upgraded
/// program's old binary usually takes, still small beside the memory moves are made for.
pub const GHOST_LIMIT: u64 = 256 << 20;

/// Oldest CRIU accepted: 3.x fails on current kernels, and `leave_stopped` is needed.
pub const MIN_VERSION: Version = Version { major: 4, minor: 0, sublevel: 0 };
/// Where CRIU is looked for when nothing is configured: what `cargo xtask setup` installs when the system has
/// no working criu >= 4.
pub const DEFAULT_CRIU: &str = "/opt/rmosix/criu/bin/criu";

/// A CRIU version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// A CRIU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot start {path} swrk: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to {path} swrk: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} swrk sent an unreadable answer: {reason}")]
    Protocol { path: PathBuf, reason: String },
    #[error("CRIU {found} at {path} is too old: rmosix needs {MIN_VERSION} or newer (`cargo xtask setup` installs one)")]
    TooOld { path: PathBuf, found: Version },
    #[error("`criu check` fails for {path}: {}", log_lines.join("; "))]
    CheckFailed { path: PathBuf, log_lines: Vec<String> },
    #[error("CRIU {op} of pid {pid} failed{}: {}; log: {}", errno_text(*errno), error_lines.join("; "), log.display())]
    Failed {
        op: &'static str,
        pid: i32,
        errno: i32,
        log: PathBuf,
        error_lines: Vec<String>,
    },
    #[error("cannot prepare the CRIU log directory {path}: {source}")]
    LogDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the CRIU image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
}

fn errno_text(errno: i32) -> String {
    if errno == 0 { String::new() } else { format!(" ({})", nix::errno::Errno::from_raw(errno).desc()) }
}

/// How to run criu: where it is and where its logs go.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    log_dir: PathBuf,
    version: Version,
    /// How long one operation may take before criu is killed (see [`ANSWER_LIMIT`]).
    answer_limit: std::time::Duration,
}

/// Where a criu process must run (network namespace, cgroups), when the caller is elsewhere: a restore lands
/// the job in the namespace and cgroups of the criu that restores it.
#[derive(Debug, Default)]
pub struct Placement {
    /// A network namespace file (`/run/netns/NAME` or `/proc/PID/ns/net`) to enter.
    pub netns: Option<File>,
    /// `cgroup.procs` files (opened for writing) to join.
    pub cgroup_procs: Vec<File>,
}

/// The owner of a job that is not root's: CRIU dumps such a job with the owner's uid and gid.
///
/// Reading another process's resource limits (`prlimit`) needs `CAP_SYS_RESOURCE` unless the reader's real
/// uid and gid are the target's, and root may lack that capability (in containers and on some VMs, such as
/// ours). So criu dumps an ordinary user's job as that user, keeping root's other capabilities as ambient
/// ones and saying so with CRIU's `unprivileged` option, which is CRIU's own mode for a criu that is not
/// uid 0. The owner can neither trace it (its capabilities are not theirs) nor read its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What a dump needs.
#[derive(Debug)]
pub struct DumpRequest<'a> {
    /// Host PID of the root of the tree (the job's init).
    pub pid: i32,
    /// Open image directory.
    pub images_dir: BorrowedFd<'a>,
    /// Resources outside the tree that CRIU must record as external, e.g. `pipe:[1234]`.
    pub external: Vec<String>,
    /// Mount points of the job's mount namespace to leave out of the images.
    pub skip_mounts: Vec<std::path::PathBuf>,
    /// Leave the tree frozen after the dump instead of killing it.
    pub leave_stopped: bool,
    /// Where criu runs: it must share the job's network namespace, or it would try to dump (and lock) that
    /// namespace too.
    pub placement: &'a Placement,
    /// Whose job it is, when not root's: criu then runs as the owner (see [`Owner`]).
    pub owner: Option<Owner>,
}

/// What a restore needs.
#[derive(Debug)]
pub struct RestoreRequest<'a> {
    /// Open image directory.
    pub images_dir: BorrowedFd<'a>,
    /// Descriptors of ours that stand in for external resources, e.g. (`pipe:[1234]`, fd of a new pipe).
    pub inherit: Vec<(String, BorrowedFd<'a>)>,
    /// Where criu (and so the restored tree) runs.
    pub placement: Placement,
    /// Leave the restored tree stopped (SIGSTOP) until the caller resumes it.
    pub leave_stopped: bool,
}

/// How long one CRIU operation may take: far more than dumping or restoring many gigabytes takes.
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_mins(5);

static OPERATION: AtomicU64 = AtomicU64::new(0);

impl Criu {
    /// The criu at `path`, logging into `log_dir` (created 0700 if missing). Checks the version.
    pub fn new(path: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> Result<Self, CriuError> {
        let path = path.into();
        let log_dir = log_dir.into();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&log_dir)
            .map_err(|source| CriuError::LogDir { path: log_dir.clone(), source })?;
        let mut criu = Self {
            path,
            log_dir,
            version: Version { major: 0, minor: 0, sublevel: 0 },
            answer_limit: ANSWER_LIMIT,
        };
        criu.version = criu.query_version()?;
        if criu.version < MIN_VERSION {
            return Err(CriuError::TooOld { path: criu.path, found: criu.version });
        }
        Ok(criu)
    }

    /// Sets how long one operation may take before criu is killed and the operation fails.
    #[must_use]
    pub fn with_answer_limit(mut self, limit: std::time::Duration) -> Self {
        self.answer_limit = limit;
        self
    }

    /// The version found at start.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The criu binary.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn query_version(&self) -> Result<Version, CriuError> {
        let mut req = Criu_req::new();
        req.set_type(Criu_req_type::VERSION);
        let resp = self.call(&req, &[], &Placement::default())?;
        let v = resp.version.as_ref().ok_or_else(|| self.protocol("no version in the answer"))?;
        let num = |n: i32| u32::try_from(n).unwrap_or(0);
        Ok(Version { major: num(v.major_number()), minor: num(v.minor_number()), sublevel: num(v.sublevel()) })
    }

    /// `criu check`: the kernel has what checkpoint/restore needs.
    pub fn check(&self) -> Result<(), CriuError> {
        let (log_name, log) = self.log_path("check", 0);
        let work = File::open(&self.log_dir).map_err(|source| CriuError::LogDir { path: self.log_dir.clone(), source })?;
        let mut opts = Criu_opts::new();
        opts.set_images_dir_fd(work.as_raw_fd());
        opts.set_work_dir_fd(work.as_raw_fd());
        opts.set_log_file(log_name);
        opts.set_log_level(4);
        let mut req = Criu_req::new();
        req.set_type(Criu_req_type::CHECK);
        req.opts = MessageField::some(opts);
        let resp = self.call(&req, &[work.as_raw_fd()], &Placement::default())?;
        if resp.success() {
            let _ = std::fs::remove_file(&log);
            Ok(())
        } else {
            Err(CriuError::CheckFailed { path: self.path.clone(), log_lines: error_lines(&log) })
        }
    }

    /// Dumps the tree rooted at `req.pid` into `req.images_dir`.
    pub fn dump(&self, req: &DumpRequest<'_>) -> Result<(), CriuError> {
        let (log_name, log) = self.log_path("dump", req.pid);
        let work = File::open(&self.log_dir).map_err(|source| CriuError::LogDir { path: self.log_dir.clone(), source })?;
        let mut opts = Criu_opts::new();
        opts.set_pid(req.pid);
        opts.set_images_dir_fd(req.images_dir.as_raw_fd());
        opts.set_work_dir_fd(work.as_raw_fd());
        opts.set_log_file(log_name);
        opts.set_log_level(4);
        opts.set_leave_running(false);
        opts.set_leave_stopped(req.leave_stopped);
        opts.set_file_locks(true);
        // A file the job holds whose name is gone moves too: one that has no name left is copied into the
        // images (a ghost file, up to GHOST_LIMIT); one still linked under another name gets a temporary
        // name beside its old one (`link_remap.N`), which the restore opens and removes, and which
        // `Frozen::abort` removes when the job stays.
        opts.set_link_remap(true);
        opts.set_ghost_limit(u32::try_from(GHOST_LIMIT).unwrap_or(u32::MAX));
        // The job lands in the cgroups of the node that restores it, not of the node it came from.
        opts.set_manage_cgroups_mode(Criu_cg_mode::IGNORE);
        opts.external.clone_from(&req.external);
        opts.skip_mnt = req.skip_mounts.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        external_mounts(&mut opts);
        let owner = req.owner.filter(|o| o.uid != 0);
        if owner.is_some() {
            opts.set_unprivileged(true);
        }
        let mut msg = Criu_req::new();
        msg.set_type(Criu_req_type::DUMP);
        msg.opts = MessageField::some(opts);
        let keep = [req.images_dir.as_raw_fd(), work.as_raw_fd()];
        let resp = self.call_as(&msg, &keep, req.placement, owner)?;
        Self::finish("dump", req.pid, &resp, &log).map(|_| ())
    }

    /// Restores the image set as a child of this process and returns its host PID.
    pub fn restore(&self, req: &RestoreRequest<'_>) -> Result<i32, CriuError> {
        let (log_name, log) = self.log_path("restore", 0);
        let work = File::open(&self.log_dir).map_err(|source| CriuError::LogDir { path: self.log_dir.clone(), source })?;
        let mut opts = Criu_opts::new();
        opts.set_images_dir_fd(req.images_dir.as_raw_fd());
        opts.set_work_dir_fd(work.as_raw_fd());
        opts.set_log_file(log_name);
        opts.set_log_level(4);
        opts.set_rst_sibling(true);
        opts.set_leave_stopped(req.leave_stopped);
        opts.set_file_locks(true);
        opts.set_manage_cgroups_mode(Criu_cg_mode::IGNORE);
        external_mounts(&mut opts);
        // The job's mount namespace is rebuilt from the restoring node's own tree.
        opts.set_root("/".to_owned());
        // criu names the restored init as soon as it exists (see the module doc).
        opts.set_notify_scripts(true);
        let mut keep = vec![req.images_dir.as_raw_fd(), work.as_raw_fd()];
        for (key, fd) in &req.inherit {
            let mut i = Inherit_fd::new();
            i.set_key(key.clone());
            i.set_fd(fd.as_raw_fd());
            opts.inherit_fd.push(i);
            keep.push(fd.as_raw_fd());
        }
        let mut msg = Criu_req::new();
        msg.set_type(Criu_req_type::RESTORE);
        msg.opts = MessageField::some(opts);
        let resp = self.call(&msg, &keep, &req.placement)?;
        let resp = Self::finish("restore", 0, &resp, &log)?;
        let pid = resp.restore.as_ref().map(rust_criu::rust_criu_protobuf::rpc::Criu_restore_resp::pid).filter(|&p| p > 0);
        pid.ok_or_else(|| self.protocol("restore succeeded but named no pid"))
    }

    fn finish(op: &'static str, pid: i32, resp: &Criu_resp, log: &Path) -> Result<Criu_resp, CriuError> {
        if resp.success() {
            let _ = std::fs::remove_file(log);
            return Ok(resp.clone());
        }
        let mut lines = error_lines(log);
        if resp.has_cr_errmsg() && !resp.cr_errmsg().is_empty() && !resp.cr_errmsg().contains("RLIMIT_NOFILE") {
            lines.insert(0, resp.cr_errmsg().trim().to_owned());
        }
        Err(CriuError::Failed { op, pid, errno: resp.cr_errno(), log: log.to_owned(), error_lines: lines })
    }

    fn log_path(&self, op: &str, pid: i32) -> (String, PathBuf) {
        let n = OPERATION.fetch_add(1, Ordering::Relaxed);
        let name = format!("{op}-{pid}-{}-{n}.log", std::process::id());
        let path = self.log_dir.join(&name);
        (name, path)
    }

    fn protocol(&self, reason: &str) -> CriuError {
        CriuError::Protocol { path: self.path.clone(), reason: reason.to_owned() }
    }

    fn io(&self, source: std::io::Error) -> CriuError {
        CriuError::Io { path: self.path.clone(), source }
    }

    /// Runs one request through a fresh `criu swrk`; `keep` are descriptors (of ours, close-on-exec) the
    /// criu process must inherit under the same numbers.
    fn call(&self, req: &Criu_req, keep: &[RawFd], placement: &Placement) -> Result<Criu_resp, CriuError> {
        self.call_as(req, keep, placement, None)
    }

    /// [`Criu::call`], with criu running as `owner` (with this process's capabilities) when given.
    fn call_as(
        &self,
        req: &Criu_req,
        keep: &[RawFd],
        placement: &Placement,
        owner: Option<Owner>,
    ) -> Result<Criu_resp, CriuError> {
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
                .map_err(|e| self.io(e.into()))?;
        let mut inherit: Vec<RawFd> = keep.to_vec();
        inherit.push(theirs.as_raw_fd());
        let netns = placement.netns.as_ref().map(AsRawFd::as_raw_fd);
        let cgroups: Vec<RawFd> = placement.cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();
        let mut cmd = Command::new(&self.path);
        cmd.arg("swrk").arg(theirs.as_raw_fd().to_string()).stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, setns, write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(ns) = netns
                    && libc::setns(ns, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for &procs in &cgroups {
                    if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(owner) = owner {
                    become_keeping_capabilities(owner)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| CriuError::Spawn { path: self.path.clone(), source })?;
        drop(theirs);
        let mut restored = None;
        let result = self.converse(&ours, req, &mut restored);
        let failed_restore = req.type_() == Criu_req_type::RESTORE && !matches!(&result, Ok(resp) if resp.success());
        // The name criu's forks carry, read while it still runs (it waits for the next request).
        let criu_comm = failed_restore.then(|| comm_of(child.id())).flatten();
        drop(ours);
        if result.is_err() {
            let _ = child.kill();
        }
        // Reaped on every path: criu exits when its socket closes, or was killed above.
        let _ = child.wait();
        if failed_restore {
            reap_failed_restore(restored, criu_comm.as_deref());
        }
        result
    }

    /// Sends `req` and reads criu's answer, answering the notifications it sends before it (and noting, in
    /// `restored`, the PID a restore's notifications name), all within the answer limit.
    fn converse(&self, socket: &OwnedFd, req: &Criu_req, restored: &mut Option<i32>) -> Result<Criu_resp, CriuError> {
        let deadline = std::time::Instant::now() + self.answer_limit;
        send(socket, &req.write_to_bytes().map_err(|e| self.protocol(&e.to_string()))?).map_err(|e| self.io(e))?;
        loop {
            // A criu that never answers (stopped by the job's owner, whose uid it runs with, or hung) must not
            // hold a frozen job and a migd thread for ever: past the limit it is killed and the step fails.
            let answer = receive(socket, deadline).map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    self.io(std::io::Error::new(
                        e.kind(),
                        format!("criu did not answer within {} s; it was killed", self.answer_limit.as_secs()),
                    ))
                } else {
                    self.io(e)
                }
            })?;
            let resp = Criu_resp::parse_from_bytes(&answer).map_err(|e| self.protocol(&e.to_string()))?;
            if resp.type_() != Criu_req_type::NOTIFY {
                if resp.type_() != req.type_() {
                    return Err(self.protocol(&format!(
                        "answer of type {} to a request of type {}",
                        resp.type_().value(),
                        req.type_().value()
                    )));
                }
                return Ok(resp);
            }
            if let Some(pid) = resp.notify.as_ref().filter(|n| n.has_pid()).map(rust_criu::rust_criu_protobuf::rpc::Criu_notify::pid).filter(|&p| p > 0) {
                *restored = Some(pid);
            }
            let mut ack = Criu_req::new();
            ack.set_type(Criu_req_type::NOTIFY);
            ack.set_notify_success(true);
            send(socket, &ack.write_to_bytes().map_err(|e| self.protocol(&e.to_string()))?).map_err(|e| self.io(e))?;
        }
    }
}

/// The name (`comm`) of process `pid`, if it is there.
fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_owned())
}

/// After a failed restore (criu has exited): kills and reaps the init criu restored, if it named it, and
/// reaps the zombies it left before it could: children of ours, in a PID namespace below ours, named like
/// criu (`criu_comm`; a restored init that got as far as taking its own name had been named to us). Another
/// failed restore's zombie reaped here is no loss: no one else waits for it.
fn reap_failed_restore(restored: Option<i32>, criu_comm: Option<&str>) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    if let Some(pid) = restored {
        let pid = nix::unistd::Pid::from_raw(pid);
        // SIGKILL to a namespace's init ends the whole namespace.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        while let Err(nix::errno::Errno::EINTR) = waitpid(pid, None) {}
    }
    let Some(criu_comm) = criu_comm else { return };
    let me = std::process::id().to_string();
    let depth = |status: &str| status.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|l| l.split_whitespace().count());
    let Some(our_depth) = std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(depth) else { return };
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let zombie_of_criu = field("PPid:") == Some(me.as_str())
            && field("State:").is_some_and(|s| s.starts_with('Z'))
            && field("Name:") == Some(criu_comm)
            && depth(&status).is_some_and(|d| d > our_depth);
        if zombie_of_criu {
            let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// The job's mount namespace is a copy of its node's (see [`crate::job`]): every mount in it that is a mount
/// of criu's own namespace is external, dumped as a reference and bound from the same path at restore; the
/// job's mounts are slaves of the node's, which CRIU accepts only when told (`ext_masters`).
fn external_mounts(opts: &mut Criu_opts) {
    opts.set_auto_ext_mnt(true);
    opts.set_ext_masters(true);
}

/// In a child about to exec criu: takes `owner`'s uid and gid (and no supplementary groups) and keeps every
/// capability this process has, as ambient capabilities that survive the exec of a program without file
/// capabilities. Only async-signal-safe system calls.
fn become_keeping_capabilities(owner: Owner) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let fail = || Err(std::io::Error::last_os_error());
    // SAFETY: system calls on local structures.
    unsafe {
        // Keep the permitted set across the change of uid.
        if libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0 {
            return fail();
        }
        let gid = owner.gid;
        if libc::setgroups(1, &raw const gid) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(owner.uid, owner.uid, owner.uid) != 0
        {
            return fail();
        }
        let mut header = Header { version: VERSION_3, pid: 0 };
        let mut data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
        if libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) != 0 {
            return fail();
        }
        for d in &mut data {
            d.effective = d.permitted;
            d.inheritable = d.permitted;
        }
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0 {
            return fail();
        }
        for cap in 0..64u32 {
            let (word, bit) = ((cap / 32) as usize, cap % 32);
            if data[word].permitted & (1 << bit) != 0 {
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, libc::c_ulong::from(cap), 0, 0);
            }
        }
    }
    Ok(())
}

/// Sends one message on a SEQPACKET socket.
fn send(socket: &OwnedFd, message: &[u8]) -> std::io::Result<()> {
    let sent = nix::sys::socket::send(socket.as_raw_fd(), message, nix::sys::socket::MsgFlags::empty())?;
    if sent != message.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "short write to criu"));
    }
    Ok(())
}

/// Reads one message on a SEQPACKET socket, waiting until `deadline` at most.
fn receive(socket: &OwnedFd, deadline: std::time::Instant) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "criu did not answer in time"));
        }
        // At least a millisecond: a zero timeout would mean none at all.
        let left = left.max(std::time::Duration::from_millis(1));
        let timeout = nix::sys::time::TimeVal::new(
            i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            i64::from(left.subsec_micros()),
        );
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)?;
        match nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::empty()) {
            Ok(0) => {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "criu closed the connection"));
            }
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The lines of a CRIU log that say what went wrong.
pub fn error_lines(log: &Path) -> Vec<String> {
    let Ok(file) = File::open(log) else { return vec![format!("(no log at {})", log.display())] };
    let mut lines: Vec<String> = BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| l.trim().to_owned())
        .collect();
    // The first errors are the cause; later ones are usually consequences.
    lines.truncate(8);
    lines
}

use std::os::unix::fs::DirBuilderExt as _;
