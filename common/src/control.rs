//! The local control protocol between migd and the tools on the same node (`mosrun`, `migrate`).
//!
//! A Unix stream socket; every message is a frame `u32 length (little-endian) | JSON`. `mosrun` passes its
//! own stdin, stdout and stderr along with its `Run` request (`SCM_RIGHTS`), so the job's output lands in
//! whatever the deputy's output is (a terminal, a file, a pipe) in order and complete, and its input comes
//! from the deputy's. migd learns who is asking from the socket's peer credentials, never from the message:
//! the deputy's PID is the job's home PID, and its uid and gid are the job's owner.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable naming migd's control socket; overrides the configuration (the test cluster sets it).
pub const SOCKET_ENV: &str = "RMOSIX_MIGD_SOCKET";
/// The signals a deputy forwards to its job, and the job's init to its program: what a user or a shell sends
/// to a running program.
pub const FORWARDED_SIGNALS: [nix::sys::signal::Signal; 10] = {
    use nix::sys::signal::Signal;
    [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTSTP,
        Signal::SIGCONT,
        Signal::SIGWINCH,
        Signal::SIGALRM,
    ]
};

/// Largest frame accepted (an environment can be large, but not this large).
pub const MAX_FRAME: usize = 4 << 20;

/// Where a new job should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Where {
    /// On the home node.
    Home,
    /// On the best node infod knows of.
    Best,
    /// On this node.
    Node(u32),
}

/// Where `migrate` should move a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Home,
    Balance,
    Node(u32),
}

/// What a job is expected to do, as the user hints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hint {
    CpuBound,
    IoBound,
}

/// What kind of job a job is, as the migd of the node it runs on sees it (see `rmosix_migd::observe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Wants a CPU: worth moving to a node with one to spare.
    Cpu,
    /// Waits for its I/O: gains nothing from another CPU.
    Io,
    /// Uses next to nothing.
    Sleeping,
    /// Cannot move (the job view says why).
    Unmigratable,
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::Cpu => "cpu",
            Class::Io => "io",
            Class::Sleeping => "sleeping",
            Class::Unmigratable => "unmigratable",
        })
    }
}

/// The moves a node's balancer made by itself (`mosctl policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoMoves {
    pub balanced: u64,
    pub ushered: u64,
    pub failed: u64,
}

/// What travels with every copy of a job besides its identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFacts {
    /// The owner's hint (`mosrun -c`, `-i`), which fixes the job's class.
    pub hint: Option<Hint>,
    /// When the job started, seconds since the Unix epoch.
    pub started: u64,
    /// Moves completed so far.
    pub migrations: u32,
    /// Never leaves its home node (`mosrun -h`).
    #[serde(default)]
    pub stay_home: bool,
    /// Moves only when someone asks (`mosrun -L`, `mosctl pin`): never by the balancer or the usher.
    #[serde(default)]
    pub manual: bool,
}

/// One job as the node it runs on sees it (`mosctl jobs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub home_node: u32,
    pub home_pid: i32,
    /// Where it runs, and its host PID there (its `rmosix-init`).
    pub node: u32,
    pub pid: i32,
    pub uid: u32,
    pub command: Vec<String>,
    /// `running`, `stopped` (by a signal) or `moving`.
    pub state: String,
    pub class: Class,
    /// Why it cannot move, when it cannot.
    pub reason: Option<String>,
    /// Percent of one CPU, decayed over seconds.
    pub cpu: f64,
    /// Resident memory, bytes.
    pub rss: u64,
    pub read_bps: u64,
    pub write_bps: u64,
    pub migrations: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
}

/// What one node said of its jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeJobs {
    pub node: u32,
    /// Where its counters come from: `bpf (tp_btf)`, `bpf (raw_tp)` or `proc (why)`.
    pub source: String,
    pub jobs: Vec<JobView>,
}

/// How a job may move.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Never leaves the home node (`mosrun -h`).
    pub stay_home: bool,
    /// Moves only when asked to (`mosrun -L`).
    pub no_auto_migrate: bool,
    /// CPU- or I/O-bound (`-c`, `-i`).
    pub hint: Option<Hint>,
    /// Memory the job will need, MiB (`-m`).
    pub mem_mb: Option<u64>,
}

/// What `mosrun` asks migd to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The program, as bytes (file names need not be UTF-8).
    pub program: Vec<u8>,
    /// Its arguments, without the program name.
    pub args: Vec<Vec<u8>>,
    /// The whole environment, `NAME=value`.
    pub env: Vec<Vec<u8>>,
    /// Working directory.
    pub cwd: PathBuf,
    /// File mode creation mask.
    pub umask: u32,
    /// Where to start.
    pub place: Where,
    /// How it may move.
    pub options: RunOptions,
    /// The deputy's resource limits (`ulimit`), which the job keeps wherever it runs.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
}

/// One resource limit of the deputy, as `getrlimit` gives it (`u64::MAX`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// The `RLIMIT_*` number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Every resource limit of the calling process.
pub fn rlimits_of_self() -> Vec<Rlimit> {
    // RLIMIT_RTTIME is the last limit Linux has.
    (0..=libc::RLIMIT_RTTIME)
        .filter_map(|resource| {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit into a local struct.
            let ok = unsafe { libc::getrlimit(resource, &raw mut limit) } == 0;
            ok.then_some(Rlimit { resource, soft: limit.rlim_cur, hard: limit.rlim_max })
        })
        .collect()
}

/// A request to migd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start a job; the deputy's stdin, stdout and stderr come with this message.
    Run(Run),
    /// During a `Run` session: forward a signal to the job.
    Signal { signo: i32 },
    /// Move a job (by home PID).
    Migrate { home_pid: i32, target: Target },
    /// A deputy whose migd restarted takes up its job again; its stdin, stdout and stderr come along again.
    Reattach,
    /// How many guest jobs (homed elsewhere) run on this node: infod advertises it.
    Guests,
    /// Every job of the cluster, asked of every live node's migd.
    Jobs,
    /// This node's policy, changed first if `change` is given (root only).
    Policy { change: Option<crate::policy::Change> },
    /// Block guests, and send every guest this node has home, or elsewhere if home cannot take it (root
    /// only).
    Expel,
    /// Pin a job where it runs (it moves only when someone asks), or unpin it (its owner or root).
    Pin { home_pid: i32, pinned: bool },
}

/// Why migd refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    NoSuchJob,
    NotYours,
    NotMigratable,
    TargetBlocksGuests,
    /// The destination does not take root's jobs from other nodes.
    TargetRefusesRoot,
    TargetDown,
    NoSuchNode,
    StaysHome,
    Busy,
    /// `migrate PID balance`: no node would run it better than where it runs.
    Balanced,
    BadRequest,
    /// Only root may do this (a node's policy).
    NotRoot,
    Failed,
}

/// migd's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// The job runs; `home_pid` is the deputy's PID.
    Started { home_pid: i32, node: u32 },
    /// The job ended with this status (128+N: died of signal N).
    Exited { code: i32 },
    /// The job was lost (its node went down).
    Lost { reason: String },
    /// A migration finished.
    Moved { home_pid: i32, from: u32, to: u32, seconds: f64, frozen: f64 },
    /// `migrate PID balance` left the job where it runs, and why.
    Stayed { home_pid: i32, node: u32, why: String },
    /// The node's policy, as it is now, and what keeps its balancer from acting when that is worth
    /// saying (memory short and no job can go).
    Policy {
        node: u32,
        policy: crate::policy::NodePolicy,
        #[serde(default)]
        stuck: Option<String>,
        /// Moves this node's migd made by itself since it started: to balance the load, to free memory,
        /// and those that failed.
        #[serde(default)]
        moves: AutoMoves,
    },
    /// What `expel` did: the guests sent away, and those that could not go (each with why).
    Expelled { moved: u32, failed: Vec<String> },
    /// A job is pinned (or not) where it runs.
    Pinned { home_pid: i32, pinned: bool },
    /// A request was refused.
    Refused { why: Refusal, message: String },
    /// The number of guest jobs running here.
    Guests { count: u32 },
    /// Every job of the cluster, by the node it runs on; `unreachable` names the nodes that are up but did
    /// not answer in time, and why.
    Jobs { nodes: Vec<NodeJobs>, unreachable: Vec<(u32, String)> },
}

/// Asks the migd at `socket` how many guest jobs run on its node, giving it `timeout` to take the connection,
/// the question and to answer: infod asks every interval, and a migd that is stuck must not hold it up. A
/// migd that is not there is `Io` with `NotFound` or `ConnectionRefused`; one that does not take the
/// connection at once (its backlog is full) is `Io` with `WouldBlock`; one that does not answer in time is
/// `Io` with `WouldBlock` or `TimedOut`.
pub fn ask_guests(socket: &std::path::Path, timeout: std::time::Duration) -> Result<u32, ControlError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
    let deadline = std::time::Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(std::time::Instant::now()).max(std::time::Duration::from_millis(1));
    // A blocking connect waits for room in a full backlog for as long as it takes; a non-blocking one says
    // at once that there is none.
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(std::io::Error::from)?;
    let addr = UnixAddr::new(socket).map_err(std::io::Error::from)?;
    nix::sys::socket::connect(fd.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    let mut stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(left()))?;
    send(&mut stream, &Request::Guests)?;
    stream.set_read_timeout(Some(left()))?;
    match recv::<Response>(&mut stream)? {
        Response::Guests { count } => Ok(count),
        other => Err(ControlError::Unexpected { asked: "guests", answer: format!("{other:?}") }),
    }
}

/// A broken control connection.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {0} bytes is larger than {MAX_FRAME}")]
    TooLarge(usize),
    #[error("control message not understood: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the other side closed the connection")]
    Closed,
    #[error("migd answered {answer} when asked for {asked}")]
    Unexpected { asked: &'static str, answer: String },
}

fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("control messages serialize");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Sends one message.
pub fn send<T: Serialize>(stream: &mut UnixStream, msg: &T) -> Result<(), ControlError> {
    stream.write_all(&frame(msg))?;
    Ok(())
}

/// Sends one message with descriptors attached (`SCM_RIGHTS`).
pub fn send_with_fds<T: Serialize>(stream: &UnixStream, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<(), ControlError> {
    let bytes = frame(msg);
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let iov = [std::io::IoSlice::new(&bytes)];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&raw)];
    let sent = nix::sys::socket::sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
        .map_err(std::io::Error::from)?;
    if sent < bytes.len() {
        (&*stream).write_all(&bytes[sent..])?;
    }
    Ok(())
}

/// Receives one message; `Err(Closed)` on a clean end of stream.
pub fn recv<T: for<'de> Deserialize<'de>>(stream: &mut UnixStream) -> Result<T, ControlError> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ControlError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Receives one message and the descriptors that came with it.
pub fn recv_with_fds<T: for<'de> Deserialize<'de>>(
    stream: &mut UnixStream,
) -> Result<(T, Vec<OwnedFd>), ControlError> {
    let mut head = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let (got, fds) = {
        let mut iov = [std::io::IoSliceMut::new(&mut head)];
        let msg = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Err(ControlError::Closed);
    }
    let mut data = head[..got].to_vec();
    while data.len() < 4 {
        let mut more = [0u8; 4];
        let n = stream.read(&mut more[..4 - data.len()])?;
        if n == 0 {
            return Err(ControlError::Closed);
        }
        data.extend_from_slice(&more[..n]);
    }
    let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    if data.len() < 4 + len {
        let have = data.len();
        data.resize(4 + len, 0);
        stream.read_exact(&mut data[have..])?;
    }
    // Anything after this frame belongs to the next message: this protocol never sends one unasked.
    let msg = serde_json::from_slice(&data[4..4 + len])?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        let req = Request::Signal { signo: 2 };
        send_with_fds(&a, &req, &[std::os::fd::AsFd::as_fd(&file)]).unwrap();
        let (got, fds): (Request, _) = recv_with_fds(&mut b).unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
        send(&mut b, &Response::Exited { code: 3 }).unwrap();
        assert_eq!(recv::<Response>(&mut a).unwrap(), Response::Exited { code: 3 });
        drop(b);
        assert!(matches!(recv::<Response>(&mut a), Err(ControlError::Closed)));
    }

    /// Runs `ask_guests` on a thread and returns what it said; a hang fails the test instead of stalling it.
    fn ask(socket: &std::path::Path, timeout: std::time::Duration) -> Result<u32, ControlError> {
        let socket = socket.to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(ask_guests(&socket, timeout)));
        rx.recv_timeout(std::time::Duration::from_mins(1)).expect("ask_guests returned")
    }

    fn kind(result: Result<u32, ControlError>) -> std::io::ErrorKind {
        match result {
            Err(ControlError::Io(e)) => e.kind(),
            other => panic!("not an I/O error: {other:?}"),
        }
    }

    #[test]
    fn a_guest_count_comes_from_a_migd_that_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            assert_eq!(recv::<Request>(&mut conn).unwrap(), Request::Guests);
            send(&mut conn, &Response::Guests { count: 7 }).unwrap();
        });
        assert_eq!(ask(&path, std::time::Duration::from_mins(1)).unwrap(), 7);
    }

    #[test]
    fn asking_a_missing_silent_or_stuck_migd_for_guests_ends_in_time() {
        use std::io::ErrorKind;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("migd.sock");
        let short = std::time::Duration::from_millis(50);
        assert_eq!(kind(ask(&path, short)), ErrorKind::NotFound);

        // A migd that takes the connection and never answers.
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(conn, _)| (listener, conn)));
        assert!(matches!(kind(ask(&path, short)), ErrorKind::WouldBlock | ErrorKind::TimedOut));
        let (listener, _conn) = held.join().unwrap().unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();

        // A migd that takes no connection at all, with its backlog full: even with an hour to wait, the
        // question is not even put.
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::UnixAddr::new(&path).unwrap()).unwrap();
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            let client = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match nix::sys::socket::connect(client.as_raw_fd(), &nix::sys::socket::UnixAddr::new(&path).unwrap()) {
                Ok(()) => queued.push(client),
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("connect: {e}"),
            }
            assert!(queued.len() < 64, "the backlog never filled");
        }
        assert_eq!(kind(ask(&path, std::time::Duration::from_hours(1))), ErrorKind::WouldBlock);
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(matches!(recv::<Request>(&mut b), Err(ControlError::TooLarge(_))));
    }
}
