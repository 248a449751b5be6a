//! Whether a job can move, asked before CRIU is.
//!
//! CRIU refuses some jobs, and dumps others that would not work once moved. Its refusals come as lines in
//! a log, after the job has been frozen; migd wants to know before it picks a job, and the user wants to
//! know why a job stays. [`check`] reads `/proc` (and, for the peers of unix sockets, the kernel's
//! `sock_diag`) and returns every [`Reason`] a job can't move, typed and serializable so that it can travel
//! in an RPC error. Every false refusal pins a job to its node, so a reason is reported only for what CRIU
//! 4.1.1 on this kernel really can't dump (checked against its sources), or for what a move would silently
//! break:
//!
//! - **inet and packet sockets** ([`Reason::InetSocket`], [`Reason::PacketSocket`]): CRIU 4.1 reads
//!   `SO_PASSCRED` of every socket, which Linux 6.16 and later refuse on these families (`Can't get 1:16
//!   opt`; fixed in CRIU 4.2). Found by the socket's inode in the process's own `/proc/PID/net/*` tables
//!   (they show its network namespace), which also give the addresses; a socket in no table (an inet
//!   socket not bound yet, an unbound netlink socket) is named by its `system.sockprotoname` attribute.
//!   Sockets of families CRIU knows nothing of (vsock, alg, bluetooth...) are [`Reason::UnsupportedSocket`].
//! - **unix sockets connected outside the job** ([`Reason::UnixPeerOutside`]): CRIU refuses a connection
//!   whose other end it does not dump ("External socket is used"). Peers come from `sock_diag`, asked in
//!   the job's network namespace ([`UnixPeers`], faked in tests).
//! - **traced threads** ([`Reason::Traced`]): `TracerPid` of every thread; CRIU can't seize a traced task.
//! - **files CRIU can't dump** ([`Reason::UnsupportedFile`]): anonymous-inode files other than the ones
//!   CRIU knows (eventfd, epoll, inotify, fanotify, signalfd, timerfd, pidfd), so `io_uring`, perf events,
//!   userfaultfd, BPF objects (this CRIU is built without libbpf), and character devices other than
//!   memory devices (`/dev/null`...), terminals, `/dev/net/tun` and autofs, and block devices.
//! - **terminals** ([`Reason::Terminal`]): a pty slave whose master no job process holds (CRIU: "Found
//!   slave peer index N without correspond master peer"). The job's stdio are pipes, so this is a terminal
//!   the program opened itself.
//! - **mappings** ([`Reason::DeviceMapping`], [`Reason::UnsupportedMapping`]): CRIU maps back only
//!   regular files and `/dev/zero`; a device node, an anonymous-inode ring (`io_uring`, perf) or a
//!   `[uprobes]` area (CRIU 4.1 would restore the breakpoints without the probe) can't come back.
//! - **`SysV` shared memory** ([`Reason::SysvShmWithoutIpcNamespace`]): CRIU moves it only with the job's
//!   own IPC namespace ("doesn't live in IPC ns").
//! - **memory shared with a process outside the job** ([`Reason::SharedMemory`]): a `MAP_SHARED` mapping
//!   of memory (shared anonymous memory, `SysV`, memfd, tmpfs such as `/dev/shm`) that a process outside
//!   the job maps too, writable on one side at least, or of a file on disk that the job writes to. CRIU
//!   dumps it without complaint, and after the move the two sides would silently stop sharing. Found by
//!   comparing `(device, inode)`, for `SysV` memory `(IPC namespace, id)`, against the maps of every other
//!   process, read only when the job has shared mappings at all.
//! - **nested namespaces** ([`Reason::NestedNamespace`]): a job process in a pid, ipc, uts, user, cgroup
//!   or time namespace other than the job root's and ours ("Can't dump nested pid namespace").
//! - **large deleted files** ([`Reason::LargeDeletedFile`]): a file the job holds open or maps that has no
//!   name left has nothing to reopen at the destination, so CRIU copies it into the images, up to the ghost
//!   limit our dumps set ([`crate::criu::GHOST_LIMIT`]; "Can't dump ghost file ... increase limit"). A file
//!   whose name is gone but that is still linked elsewhere is no reason: the dump gives it a temporary name
//!   (`link_remap`).
//!
//! Not checked, on purpose: pipes and FIFOs whose other end is outside (CRIU dumps them; only the job's
//! stdio are such, and they are declared external); file locks (CRIU dumps them when asked,
//! `file_locks`); unix sockets whose outside peer is only queued, not yet accepted, and unix sockets made in another
//! network namespace than the one their process is in now (rare; CRIU says so clearly); mount points CRIU
//! can't handle (that depends on how the job's mount namespace is set up, which belongs to the code that
//! starts jobs).
//!
//! The socket reasons are about CRIU 4.1 on Linux 6.16 and later: with CRIU 4.2, listening inet sockets
//! dump, and [`Reason::InetSocket`] and [`Reason::PacketSocket`] must be narrowed.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `/proc` is: the real one, or a tree that tests build in a temporary directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcFs {
    /// The directory that stands for `/proc`.
    root: PathBuf,
}

impl ProcFs {
    /// The machine's `/proc`.
    pub fn real() -> Self {
        Self::at("/proc")
    }

    /// A `/proc` rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory that stands for `/proc`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn of(&self, pid: i32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// `/proc/self`: the checker's own process, to compare namespaces with.
    fn ours(&self) -> PathBuf {
        self.root.join("self")
    }
}

/// The check itself could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The job's root process does not exist: the job has ended, or the pid is wrong.
    #[error("job root pid {pid} does not exist (has the job ended?)")]
    RootGone {
        /// Host pid of the job's root.
        pid: i32,
    },
    /// A file of a job process exists but can't be read (typically: we lack the privilege).
    #[error("can't read {} of job process {pid}", path.display())]
    Read {
        /// Host pid of the job process.
        pid: i32,
        /// What we tried to read.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// Why a job can't move. Each carries the host pid of the job process concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// An IPv4 or IPv6 socket: CRIU 4.1 can't dump one on Linux 6.16 or later.
    InetSocket {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
        /// TCP, UDP...
        protocol: InetProtocol,
        /// Local address; `None` if it is not bound yet.
        local: Option<SocketAddr>,
        /// Remote address, if connected.
        remote: Option<SocketAddr>,
    },
    /// A packet (`AF_PACKET`) socket: same `SO_PASSCRED` failure as inet sockets.
    PacketSocket {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
    },
    /// A socket of a family CRIU does not dump at all.
    UnsupportedSocket {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
        /// The kernel's name for its protocol (`system.sockprotoname`), e.g. `AF_VSOCK`.
        protocol: String,
    },
    /// A unix socket connected to a socket no job process holds.
    UnixPeerOutside {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
        /// Stream, datagram or seqpacket.
        kind: UnixKind,
        /// The address the peer is bound to, if any (a path, or `@name` for an abstract one).
        peer: Option<String>,
    },
    /// A pty slave whose master is outside the job.
    Terminal {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
        /// The terminal, e.g. `/dev/pts/3`.
        path: String,
    },
    /// An open file of a kind CRIU can't dump.
    UnsupportedFile {
        /// Host pid.
        pid: i32,
        /// The descriptor holding it.
        fd: i32,
        /// What the descriptor points to, as `/proc/PID/fd` shows it.
        path: String,
        /// What kind of file it is.
        file: FileKind,
    },
    /// A thread is traced (by a debugger, strace...): CRIU can't seize it.
    Traced {
        /// Host pid of the process.
        pid: i32,
        /// The (first) traced thread.
        tid: i32,
        /// Host id of the tracing thread.
        tracer: i32,
    },
    /// A device node is mapped into memory: CRIU maps back only regular files and `/dev/zero`.
    DeviceMapping {
        /// Host pid.
        pid: i32,
        /// The device, e.g. `/dev/nvidia0`.
        path: String,
    },
    /// A mapping of something else CRIU can't map back: an anonymous-inode ring (`io_uring`, perf, BPF) or the
    /// `[uprobes]` area of a process with a uprobe attached.
    UnsupportedMapping {
        /// Host pid.
        pid: i32,
        /// As `/proc/PID/maps` names it.
        path: String,
    },
    /// `SysV` shared memory in a job that has no IPC namespace of its own: CRIU moves it only with one.
    SysvShmWithoutIpcNamespace {
        /// Host pid.
        pid: i32,
        /// The segment's id (its inode in `/proc/PID/maps`).
        shmid: u64,
        /// The segment's key, 0 if private or removed.
        key: u32,
    },
    /// Memory shared with a process outside the job: after a move they would silently stop sharing it.
    SharedMemory {
        /// Host pid of the job process.
        pid: i32,
        /// The shared object as `/proc/PID/maps` names it.
        path: String,
        /// Host pid of a process outside the job that maps it too.
        outsider: i32,
    },
    /// A job process in a namespace nested inside the job's: CRIU dumps only one of each kind but mount and
    /// network.
    NestedNamespace {
        /// Host pid.
        pid: i32,
        /// Which kind of namespace.
        namespace: Namespace,
    },
    /// A file with no name left, open or mapped, larger than CRIU copies into the images.
    LargeDeletedFile {
        /// Host pid.
        pid: i32,
        /// The name it had, as `/proc/PID` shows it (without ` (deleted)`).
        path: String,
        /// The disk space it takes, as CRIU counts it (allocated blocks).
        bytes: u64,
    },
}

impl Reason {
    /// Host pid of the job process the reason is about.
    pub fn pid(&self) -> i32 {
        match self {
            Self::InetSocket { pid, .. }
            | Self::PacketSocket { pid, .. }
            | Self::UnsupportedSocket { pid, .. }
            | Self::UnixPeerOutside { pid, .. }
            | Self::Terminal { pid, .. }
            | Self::UnsupportedFile { pid, .. }
            | Self::Traced { pid, .. }
            | Self::DeviceMapping { pid, .. }
            | Self::UnsupportedMapping { pid, .. }
            | Self::SysvShmWithoutIpcNamespace { pid, .. }
            | Self::SharedMemory { pid, .. }
            | Self::NestedNamespace { pid, .. }
            | Self::LargeDeletedFile { pid, .. } => *pid,
        }
    }
}

const NO_INET: &str = "CRIU 4.1 cannot dump inet sockets on Linux 6.16 and later";

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InetSocket { pid, fd, protocol, local, remote } => {
                write!(f, "pid {pid} holds a {protocol} socket ")?;
                match (local, remote) {
                    (Some(local), Some(remote)) => write!(f, "{local} -> {remote}")?,
                    (Some(local), None) if *protocol == InetProtocol::Tcp => write!(f, "listening on {local}")?,
                    (Some(local), None) => write!(f, "bound to {local}")?,
                    (None, _) => f.write_str("not bound yet")?,
                }
                write!(f, " (fd {fd}); {NO_INET}")
            }
            Self::PacketSocket { pid, fd } => write!(
                f,
                "pid {pid} holds a packet socket (fd {fd}); CRIU 4.1 cannot dump packet sockets on Linux 6.16 and later"
            ),
            Self::UnsupportedSocket { pid, fd, protocol } => {
                write!(f, "pid {pid} holds a socket of protocol {protocol} (fd {fd}), which CRIU cannot dump")
            }
            Self::UnixPeerOutside { pid, fd, kind, peer } => {
                write!(f, "pid {pid} holds a unix {kind} socket (fd {fd}) connected to ")?;
                match peer {
                    Some(peer) => write!(f, "{peer}, whose end is")?,
                    None => f.write_str("a socket")?,
                }
                f.write_str(" outside the job; CRIU cannot move one end of a connection")
            }
            Self::Terminal { pid, fd, path } => write!(
                f,
                "pid {pid} holds the terminal {path} (fd {fd}), whose master is outside the job; \
                 a terminal cannot move with the job"
            ),
            Self::UnsupportedFile { pid, fd, path, file } => {
                write!(f, "pid {pid} holds {file} (fd {fd}, {path}), which CRIU cannot dump")
            }
            Self::Traced { pid, tid, tracer } => {
                write!(f, "pid {pid} ")?;
                if tid != pid {
                    write!(f, "(thread {tid}) ")?;
                }
                write!(f, "is traced by {tracer} (a debugger or strace?); CRIU cannot seize a traced process")
            }
            Self::DeviceMapping { pid, path } => write!(
                f,
                "pid {pid} maps the device {path} into memory; CRIU can map back only regular files and /dev/zero"
            ),
            Self::UnsupportedMapping { pid, path } if path == "[uprobes]" => write!(
                f,
                "pid {pid} has a uprobe attached ([uprobes] mapping); CRIU 4.1 would restore its code without the probe"
            ),
            Self::UnsupportedMapping { pid, path } => {
                write!(f, "pid {pid} maps {path} into memory, which CRIU cannot map back")
            }
            Self::SysvShmWithoutIpcNamespace { pid, shmid, key } => write!(
                f,
                "pid {pid} attaches SysV shared memory (id {shmid}, key {key:#010x}) but the job has no IPC \
                 namespace of its own; CRIU moves SysV memory only with its IPC namespace"
            ),
            Self::SharedMemory { pid, path, outsider } => write!(
                f,
                "pid {pid} shares memory ({}) with pid {outsider}, which is outside the job; after a move they \
                 would silently stop sharing it",
                describe_shared(path)
            ),
            Self::NestedNamespace { pid, namespace } => write!(
                f,
                "pid {pid} is in a {namespace} namespace of its own inside the job; CRIU cannot dump nested \
                 {namespace} namespaces"
            ),
            Self::LargeDeletedFile { pid, path, bytes } => write!(
                f,
                "pid {pid} holds {path}, deleted, of {} MiB; a deleted file travels in the images, up to {} MiB",
                bytes.div_ceil(1 << 20),
                crate::criu::GHOST_LIMIT >> 20
            ),
        }
    }
}

/// Names a shared mapping as a user would: `/proc/PID/maps` shows shared anonymous memory as a deleted
/// `/dev/zero`, `SysV` memory as `/SYSV<key>`, a memfd as `/memfd:<name>`.
fn describe_shared(path: &str) -> String {
    let live = path.strip_suffix(" (deleted)").unwrap_or(path);
    if live == "/dev/zero" {
        "shared anonymous memory".to_owned()
    } else if let Some(key) = live.strip_prefix("/SYSV") {
        format!("SysV segment with key 0x{key}")
    } else if let Some(name) = live.strip_prefix("/memfd:") {
        format!("memfd {name}")
    } else {
        path.to_owned()
    }
}

/// The protocol of an inet socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InetProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// UDP-Lite.
    UdpLite,
    /// A raw IP socket.
    Raw,
    /// An ICMP "ping" socket.
    Icmp,
    /// Another protocol (MPTCP, SCTP...), by the kernel's name for it.
    Other(String),
}

impl fmt::Display for InetProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::UdpLite => "UDP-Lite",
            Self::Raw => "raw IP",
            Self::Icmp => "ICMP (ping)",
            Self::Other(name) => name,
        })
    }
}

/// The type of a unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnixKind {
    /// `SOCK_STREAM`.
    Stream,
    /// `SOCK_DGRAM`.
    Datagram,
    /// `SOCK_SEQPACKET`.
    Seqpacket,
}

impl fmt::Display for UnixKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stream => "stream",
            Self::Datagram => "datagram",
            Self::Seqpacket => "seqpacket",
        })
    }
}

/// A kind of open file CRIU can't dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileKind {
    /// An `io_uring` instance (`anon_inode:[io_uring]`).
    IoUring,
    /// A perf event (`anon_inode:[perf_event]`).
    PerfEvent,
    /// A userfaultfd (`anon_inode:[userfaultfd]`).
    Userfaultfd,
    /// A BPF map, program, link or BTF object (`anon_inode:bpf-map`...); this CRIU is built without libbpf.
    Bpf {
        /// Which, as the kernel names it.
        what: String,
    },
    /// Another anonymous-inode file (KVM, landlock, `fsopen`...).
    AnonInode {
        /// As the kernel names it, e.g. `kvm-vm`.
        what: String,
    },
    /// A character device CRIU has no driver for.
    CharDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IoUring => f.write_str("an io_uring instance"),
            Self::PerfEvent => f.write_str("a perf event"),
            Self::Userfaultfd => f.write_str("a userfaultfd"),
            Self::Bpf { what } => write!(f, "a BPF object ({what})"),
            Self::AnonInode { what } => write!(f, "an anonymous-inode file ({what})"),
            Self::CharDevice { major, minor } => write!(f, "the character device {major}:{minor}"),
            Self::BlockDevice { major, minor } => write!(f, "the block device {major}:{minor}"),
        }
    }
}

/// A kind of namespace CRIU dumps only once per job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Namespace {
    /// PID namespace.
    Pid,
    /// IPC namespace.
    Ipc,
    /// UTS (host name) namespace.
    Uts,
    /// User namespace.
    User,
    /// Cgroup namespace.
    Cgroup,
    /// Time namespace.
    Time,
}

impl Namespace {
    /// The kinds CRIU can't nest, with their names in `/proc/PID/ns`; mount and network namespaces may nest.
    const NESTABLE_NOT: [(Self, &'static str); 6] = [
        (Self::Pid, "pid"),
        (Self::Ipc, "ipc"),
        (Self::Uts, "uts"),
        (Self::User, "user"),
        (Self::Cgroup, "cgroup"),
        (Self::Time, "time"),
    ];
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pid => "pid",
            Self::Ipc => "ipc",
            Self::Uts => "uts",
            Self::User => "user",
            Self::Cgroup => "cgroup",
            Self::Time => "time",
        })
    }
}

/// The peers of unix sockets, which `/proc` does not show: the kernel's `sock_diag` ([`SockDiag`]), or a
/// table in tests.
pub trait UnixPeers {
    /// For every connected unix socket in the network namespace of process `pid`, by inode, the inode of
    /// its peer.
    fn unix_peers(&self, pid: i32) -> io::Result<HashMap<u64, u64>>;
}

/// Asks the kernel (`NETLINK_SOCK_DIAG`, `UDIAG_SHOW_PEER`) for the peers of unix sockets. Needs
/// `CAP_SYS_ADMIN` for a job in another network namespace than ours.
#[derive(Debug, Clone, Copy, Default)]
pub struct SockDiag;

impl UnixPeers for SockDiag {
    fn unix_peers(&self, pid: i32) -> io::Result<HashMap<u64, u64>> {
        let theirs = File::open(format!("/proc/{pid}/ns/net"))?;
        let theirs_meta = theirs.metadata()?;
        let ours = fs::metadata("/proc/thread-self/ns/net")?;
        if (theirs_meta.dev(), theirs_meta.ino()) == (ours.dev(), ours.ino()) {
            return unix_diag_dump();
        }
        // A netlink socket answers for the network namespace it was made in. setns moves only the calling
        // thread, so a thread of its own enters the job's namespace, asks, and ends.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&theirs, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    unix_diag_dump()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the sock_diag thread panicked")))
        })
    }
}

// From <linux/netlink.h>, <linux/sock_diag.h> and <linux/unix_diag.h>.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSG_HDRLEN: usize = 16;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UDIAG_PEER: u16 = 2;
/// `struct unix_diag_msg`: family, type, state, pad, inode, cookie.
const UNIX_DIAG_MSG_LEN: usize = 16;

/// Lists the peers of every unix socket in the calling thread's network namespace.
fn unix_diag_dump() -> io::Result<HashMap<u64, u64>> {
    // SAFETY: a plain system call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just made for us and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut request = Vec::with_capacity(NLMSG_HDRLEN + 24);
    request.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    request.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // seq
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // struct unix_diag_req
    request.extend_from_slice(&[u8::try_from(libc::AF_UNIX).unwrap_or(1), 0, 0, 0]);
    request.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    request.extend_from_slice(&0u32.to_ne_bytes()); // every inode
    request.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    request.extend_from_slice(&u32::MAX.to_ne_bytes()); // no cookie
    request.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: the buffer is valid for its length.
    let sent = unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }

    let mut peers = HashMap::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for its length, and the kernel writes no more.
        let received = unsafe { libc::recv(sock.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        let received = usize::try_from(received).map_err(|_| io::Error::last_os_error())?;
        if received == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "sock_diag closed before NLMSG_DONE"));
        }
        if parse_unix_diag(&buffer[..received], &mut peers)? {
            return Ok(peers);
        }
    }
}

/// Parses one datagram of a unix `sock_diag` dump into `peers`; true once the dump is done.
fn parse_unix_diag(mut data: &[u8], peers: &mut HashMap<u64, u64>) -> io::Result<bool> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag message");
    while data.len() >= NLMSG_HDRLEN {
        let len = usize::try_from(u32_at(data, 0).ok_or_else(malformed)?).map_err(|_| malformed())?;
        let kind = u16_at(data, 4).ok_or_else(malformed)?;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(malformed());
        }
        let payload = &data[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno =
                    i32::from_ne_bytes(payload.get(..4).ok_or_else(malformed)?.try_into().map_err(|_| malformed())?);
                return Err(io::Error::from_raw_os_error(errno.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY if payload.len() >= UNIX_DIAG_MSG_LEN => {
                let inode = u32_at(payload, 4).ok_or_else(malformed)?;
                let mut attributes = &payload[UNIX_DIAG_MSG_LEN..];
                while attributes.len() >= 4 {
                    let attr_len = usize::from(u16_at(attributes, 0).ok_or_else(malformed)?);
                    let attr_kind = u16_at(attributes, 2).ok_or_else(malformed)?;
                    if attr_len < 4 || attr_len > attributes.len() {
                        break;
                    }
                    if attr_kind == UDIAG_PEER
                        && let Some(peer) = u32_at(attributes, 4).filter(|_| attr_len >= 8)
                        && peer != 0
                    {
                        peers.insert(u64::from(inode), u64::from(peer));
                    }
                    attributes = attributes.get(align4(attr_len)..).unwrap_or_default();
                }
            }
            _ => {}
        }
        data = data.get(align4(len)..).unwrap_or_default();
    }
    Ok(false)
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(data.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(data.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

/// Lists the processes of the job whose root (its init) is host pid `root`: the root first, then its
/// descendants, found through `/proc/PID/task/TID/children` of every thread. Threads are not listed.
/// Processes that exit during the walk are tolerated; as their children move to the job's init, the walk
/// starts over (at most twice) when one does.
pub fn job_processes(root: i32) -> Result<Vec<i32>, InspectError> {
    job_processes_in(&ProcFs::real(), root)
}

/// [`job_processes`], with `/proc` at `proc`.
pub fn job_processes_in(proc: &ProcFs, root: i32) -> Result<Vec<i32>, InspectError> {
    let mut last = Vec::new();
    for _ in 0..3 {
        let (job, vanished) = walk(proc, root)?;
        if !vanished {
            return Ok(job);
        }
        last = job;
    }
    Ok(last)
}

/// One walk of the job's tree; true if a process vanished during it.
fn walk(proc: &ProcFs, root: i32) -> Result<(Vec<i32>, bool), InspectError> {
    let mut job = vec![root];
    let mut seen = HashSet::from([root]);
    let mut vanished = false;
    let mut next = 0;
    while let Some(&pid) = job.get(next) {
        next += 1;
        match children_of(proc, pid)? {
            Some(children) => job.extend(children.into_iter().filter(|child| seen.insert(*child))),
            None if pid == root => return Err(InspectError::RootGone { pid: root }),
            None => vanished = true,
        }
    }
    Ok((job, vanished))
}

/// The children of every thread of `pid`; `None` if it is gone.
fn children_of(proc: &ProcFs, pid: i32) -> Result<Option<Vec<i32>>, InspectError> {
    let Some(threads) = list_dir(pid, &proc.of(pid).join("task"))? else {
        return Ok(None);
    };
    let mut children = Vec::new();
    for tid in threads {
        if let Some(text) = read_text(pid, &proc.of(pid).join("task").join(&tid).join("children"))? {
            children.extend(text.split_ascii_whitespace().filter_map(|child| child.parse::<i32>().ok()));
        }
    }
    Ok(Some(children))
}

/// Checks whether the job whose root is host pid `root` can move, with the real `/proc` and `sock_diag`.
/// Returns every reason it can't; none means CRIU should be able to move it.
pub fn check(root: i32) -> Result<Vec<Reason>, InspectError> {
    check_with(&ProcFs::real(), &SockDiag, root)
}

/// [`check`], with `/proc` at `proc` and unix socket peers from `peers`.
pub fn check_with(proc: &ProcFs, peers: &dyn UnixPeers, root: i32) -> Result<Vec<Reason>, InspectError> {
    let mut job = Vec::new();
    for pid in job_processes_in(proc, root)? {
        match read_process(proc, pid)? {
            Some(process) => job.push(process),
            None if pid == root => return Err(InspectError::RootGone { pid: root }),
            None => {}
        }
    }
    let ours = read_namespaces(&proc.ours());
    let mut reasons = Vec::new();
    traced(&job, &mut reasons);
    nested_namespaces(&job, &ours, &mut reasons);
    files(&job, &mut reasons);
    sockets(proc, peers, &job, &mut reasons)?;
    mappings(proc, &job, &ours, &mut reasons);
    shared_memory(proc, &job, &mut reasons);
    large_deleted_files(proc, &job, crate::criu::GHOST_LIMIT, &mut reasons);
    tracing::debug!(pid = root, processes = job.len(), reasons = reasons.len(), "migratability checked");
    Ok(reasons)
}

/// What the check needs to know of one job process.
#[derive(Debug)]
struct Process {
    pid: i32,
    /// `(thread, tracer)` for each traced thread.
    traced: Vec<(i32, i32)>,
    fds: Vec<OpenFd>,
    maps: Vec<Mapping>,
    /// Namespace links (`uts:[4026531838]`) by name (`uts`).
    namespaces: HashMap<String, String>,
}

#[derive(Debug)]
struct OpenFd {
    fd: i32,
    /// The target of `/proc/PID/fd/N`.
    link: String,
    class: FdClass,
}

/// What matters of an open file.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FdClass {
    /// Nothing CRIU can't handle.
    Fine,
    Socket(u64),
    /// A pty master, with its index if `fdinfo` told it.
    PtyMaster(Option<u32>),
    /// A pty slave (`/dev/pts/N`), with its index.
    PtySlave(u32),
    Unsupported(FileKind),
}

/// Reads one job process; `None` if it is gone.
fn read_process(proc: &ProcFs, pid: i32) -> Result<Option<Process>, InspectError> {
    let dir = proc.of(pid);
    // A zombie has no files nor memory left (CRIU dumps it as such), and its fd directory can't be read
    // without privilege.
    if let Some(stat) = read_text(pid, &dir.join("stat"))?
        && matches!(state_of(&stat), Some('Z' | 'X'))
    {
        let namespaces = read_namespaces(&dir);
        return Ok(Some(Process { pid, traced: Vec::new(), fds: Vec::new(), maps: Vec::new(), namespaces }));
    }
    let Some(threads) = list_dir(pid, &dir.join("task"))? else {
        return Ok(None);
    };
    let mut threads: Vec<i32> = threads.iter().filter_map(|tid| tid.parse().ok()).collect();
    threads.sort_unstable();
    let mut traced = Vec::new();
    for tid_number in threads {
        let tid = tid_number.to_string();
        if let Some(status) = read_text(pid, &dir.join("task").join(&tid).join("status"))?
            && let Some(tracer) = tracer_of(&status)
        {
            traced.push((tid_number, tracer));
        }
    }

    let Some(fd_names) = list_dir(pid, &dir.join("fd"))? else {
        return Ok(None);
    };
    let mut fd_numbers: Vec<i32> = fd_names.iter().filter_map(|name| name.parse().ok()).collect();
    fd_numbers.sort_unstable();
    let mut fds = Vec::new();
    for fd in fd_numbers {
        let name = fd.to_string();
        let path = dir.join("fd").join(&name);
        // An fd closed meanwhile is simply not there any more.
        let Some(link) = read_link(pid, &path)? else { continue };
        let device =
            if link.starts_with('/') { fs::metadata(&path).ok().and_then(|meta| device_of(&meta)) } else { None };
        let mut class = classify_fd(&link, device);
        if class == FdClass::PtyMaster(None)
            && let Some(fdinfo) = read_text(pid, &dir.join("fdinfo").join(&name))?
        {
            class = FdClass::PtyMaster(tty_index(&fdinfo));
        }
        fds.push(OpenFd { fd, link, class });
    }

    let Some(maps) = read_text(pid, &dir.join("maps"))? else {
        return Ok(None);
    };
    let maps = maps.lines().filter_map(parse_maps_line).collect();
    Ok(Some(Process { pid, traced, fds, maps, namespaces: read_namespaces(&dir) }))
}

/// Namespace links of the process at `dir` (`/proc/PID`), best effort: a namespace we can't read is simply
/// not compared.
fn read_namespaces(dir: &Path) -> HashMap<String, String> {
    ["pid", "ipc", "uts", "user", "cgroup", "time", "time_for_children", "net"]
        .into_iter()
        .filter_map(|name| {
            let link = fs::read_link(dir.join("ns").join(name)).ok()?;
            Some((name.to_owned(), link.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Whether an error reading under `/proc/PID` means that the process, thread or fd is gone.
fn gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

fn read_error(pid: i32, path: &Path, source: io::Error) -> InspectError {
    InspectError::Read { pid, path: path.to_owned(), source }
}

/// Reads a file of job process `pid`; `None` if gone. Not UTF-8 (a path in `maps`) is replaced, not refused.
fn read_text(pid: i32, path: &Path) -> Result<Option<String>, InspectError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(error) if gone(&error) => Ok(None),
        Err(error) => Err(read_error(pid, path, error)),
    }
}

fn read_link(pid: i32, path: &Path) -> Result<Option<String>, InspectError> {
    match fs::read_link(path) {
        Ok(target) => Ok(Some(target.to_string_lossy().into_owned())),
        Err(error) if gone(&error) => Ok(None),
        Err(error) => Err(read_error(pid, path, error)),
    }
}

fn list_dir(pid: i32, path: &Path) -> Result<Option<Vec<String>>, InspectError> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(error) if gone(&error) => return Ok(None),
        Err(error) => return Err(read_error(pid, path, error)),
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
            Err(error) if gone(&error) => return Ok(None),
            Err(error) => return Err(read_error(pid, path, error)),
        }
    }
    Ok(Some(names))
}

/// The state letter of a `stat` file (`42 (name) S ...`; the name may hold anything, the state follows the
/// last parenthesis).
fn state_of(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The `TracerPid` of a `status` file, if not 0.
fn tracer_of(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("TracerPid:"))
        .and_then(|value| value.trim().parse().ok())
        .filter(|&tracer| tracer != 0)
}

/// The `tty-index` of a pty master's `fdinfo`.
fn tty_index(fdinfo: &str) -> Option<u32> {
    fdinfo.lines().find_map(|line| line.strip_prefix("tty-index:")).and_then(|value| value.trim().parse().ok())
}

/// A device node: character or block, major, minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Device {
    block: bool,
    major: u32,
    minor: u32,
}

fn device_of(meta: &fs::Metadata) -> Option<Device> {
    let kind = meta.file_type();
    (kind.is_char_device() || kind.is_block_device()).then(|| Device {
        block: kind.is_block_device(),
        major: libc::major(meta.rdev()),
        minor: libc::minor(meta.rdev()),
    })
}

/// Classifies an open file by its `/proc/PID/fd/N` link and, for device nodes, major and minor, the way
/// CRIU 4.1.1's `dump_one_file` does.
fn classify_fd(link: &str, device: Option<Device>) -> FdClass {
    if let Some(inode) = link.strip_prefix("socket:[").and_then(|rest| rest.strip_suffix(']')) {
        return inode.parse().map_or(FdClass::Fine, FdClass::Socket);
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return match kind {
            // The anonymous-inode files CRIU dumps.
            "[eventfd]" | "[eventpoll]" | "inotify" | "[fanotify]" | "[signalfd]" | "[timerfd]" | "[pidfd]" => {
                FdClass::Fine
            }
            "[io_uring]" => FdClass::Unsupported(FileKind::IoUring),
            "[perf_event]" => FdClass::Unsupported(FileKind::PerfEvent),
            "[userfaultfd]" => FdClass::Unsupported(FileKind::Userfaultfd),
            bpf if bpf.starts_with("bpf") || bpf == "btf" => {
                FdClass::Unsupported(FileKind::Bpf { what: bpf.to_owned() })
            }
            other => FdClass::Unsupported(FileKind::AnonInode { what: other.to_owned() }),
        };
    }
    match device {
        Some(Device { block: true, major, minor }) => FdClass::Unsupported(FileKind::BlockDevice { major, minor }),
        Some(Device { block: false, major, minor }) => classify_char_device(major, minor),
        None => FdClass::Fine,
    }
}

// From <linux/major.h> and <linux/miscdevice.h>, and CRIU's tty.h.
const MEM_MAJOR: u32 = 1;
const TTY_MAJOR: u32 = 4;
const TTYAUX_MAJOR: u32 = 5;
const MISC_MAJOR: u32 = 10;
const TUN_MINOR: u32 = 200;
const AUTOFS_MINOR: u32 = 235;
const UNIX98_PTY_MASTER_MAJOR: u32 = 128;
const UNIX98_PTY_MAJOR_COUNT: u32 = 8;
const UNIX98_PTY_SLAVE_MAJOR: u32 = 136;
const USB_SERIAL_MAJOR: u32 = 188;
const LOW_DENSE_SERIAL_MAJOR: u32 = 204;

/// CRIU's `dump_chrdev` and `get_tty_driver`: memory devices, `/dev/net/tun`, autofs and the terminals it
/// has a driver for are dumped, every other character device is refused.
fn classify_char_device(major: u32, minor: u32) -> FdClass {
    match (major, minor) {
        (MEM_MAJOR, _) | (MISC_MAJOR, TUN_MINOR | AUTOFS_MINOR) => FdClass::Fine,
        (TTYAUX_MAJOR, 2) => FdClass::PtyMaster(None),
        (major, _) if (UNIX98_PTY_MASTER_MAJOR..UNIX98_PTY_MASTER_MAJOR + UNIX98_PTY_MAJOR_COUNT).contains(&major) => {
            FdClass::PtyMaster(None)
        }
        (UNIX98_PTY_SLAVE_MAJOR, index) => FdClass::PtySlave(index),
        // /dev/tty, /dev/console, virtual consoles, serial ports.
        (TTYAUX_MAJOR, 0 | 1) | (TTY_MAJOR, 1..=63) | (USB_SERIAL_MAJOR | LOW_DENSE_SERIAL_MAJOR, _) => FdClass::Fine,
        (major, minor) => FdClass::Unsupported(FileKind::CharDevice { major, minor }),
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    writable: bool,
    shared: bool,
    /// Device (major, minor) and inode of the mapped object; inode 0 for anonymous memory. For `SysV`
    /// memory the "inode" is the segment's id, 0 for the first segment of an IPC namespace.
    dev: (u32, u32),
    inode: u64,
    path: String,
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let ([range, perms, _offset, dev, inode], path) = fields::<5>(line)?;
    let (start, end) = range.split_once('-')?;
    let perms = perms.as_bytes();
    let (major, minor) = dev.split_once(':')?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        writable: *perms.get(1)? == b'w',
        shared: *perms.get(3)? == b's',
        dev: (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?),
        inode: inode.parse().ok()?,
        path: path.to_owned(),
    })
}

/// Splits the first `N` whitespace-separated fields off `line`, and returns them with the rest: a path,
/// which may hold spaces.
fn fields<const N: usize>(line: &str) -> Option<([&str; N], &str)> {
    let mut rest = line;
    let mut out = [""; N];
    for slot in &mut out {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        let (field, tail) = rest.split_at(end);
        *slot = field;
        rest = tail;
    }
    Some((out, rest.trim_start()))
}

fn traced(job: &[Process], reasons: &mut Vec<Reason>) {
    for process in job {
        // A debugger attaches every thread: one reason per tracer is enough.
        let mut tracers = HashSet::new();
        for &(tid, tracer) in &process.traced {
            if tracers.insert(tracer) {
                reasons.push(Reason::Traced { pid: process.pid, tid, tracer });
            }
        }
    }
}

/// CRIU dumps the namespaces of the job's root, and accepts a task in its own namespaces; any other pid,
/// ipc, uts, user, cgroup or time namespace is nested ("Can't dump nested ... namespace"). It also refuses
/// a task whose children would get another time namespace than its own.
fn nested_namespaces(job: &[Process], ours: &HashMap<String, String>, reasons: &mut Vec<Reason>) {
    let Some(root) = job.first() else { return };
    for process in job {
        for (namespace, name) in Namespace::NESTABLE_NOT {
            let Some(mine) = process.namespaces.get(name) else { continue };
            let nested = root.namespaces.get(name) != Some(mine) && ours.get(name) != Some(mine);
            let time_for_children = namespace == Namespace::Time
                && process.namespaces.get("time_for_children").is_some_and(|children| children != mine);
            if nested || time_for_children {
                reasons.push(Reason::NestedNamespace { pid: process.pid, namespace });
            }
        }
    }
}

fn files(job: &[Process], reasons: &mut Vec<Reason>) {
    let masters: Vec<Option<u32>> = job
        .iter()
        .flat_map(|process| &process.fds)
        .filter_map(|fd| match fd.class {
            FdClass::PtyMaster(index) => Some(index),
            _ => None,
        })
        .collect();
    // A master whose index we could not read might be any slave's: then don't refuse slaves.
    let any_unknown_master = masters.contains(&None);
    for process in job {
        for fd in &process.fds {
            match &fd.class {
                FdClass::Unsupported(file) => reasons.push(Reason::UnsupportedFile {
                    pid: process.pid,
                    fd: fd.fd,
                    path: fd.link.clone(),
                    file: file.clone(),
                }),
                FdClass::PtySlave(index) if !any_unknown_master && !masters.contains(&Some(*index)) => {
                    reasons.push(Reason::Terminal { pid: process.pid, fd: fd.fd, path: fd.link.clone() });
                }
                _ => {}
            }
        }
    }
}

/// Files the job holds open or maps that have no name left and take more than `limit` bytes of disk (what
/// CRIU compares with its ghost limit), each once. Memory that only looks like a deleted file (memfd, `SysV`,
/// shared anonymous memory) is CRIU's shared memory, not a file, and a file still linked elsewhere is
/// remapped, not copied.
fn large_deleted_files(proc: &ProcFs, job: &[Process], limit: u64, reasons: &mut Vec<Reason>) {
    let deleted = |path: &str| {
        path.starts_with('/')
            && path.ends_with(" (deleted)")
            && !["/memfd:", "/SYSV", "/dev/zero "].iter().any(|memory| path.starts_with(memory))
    };
    let mut seen = HashSet::new();
    for process in job {
        let dir = proc.of(process.pid);
        let open = process.fds.iter().filter(|fd| deleted(&fd.link)).map(|fd| (&fd.link, dir.join("fd").join(fd.fd.to_string())));
        let mapped = process.maps.iter().filter(|m| deleted(&m.path)).map(|m| {
            (&m.path, dir.join("map_files").join(format!("{:x}-{:x}", m.start, m.end)))
        });
        for (name, object) in open.chain(mapped) {
            let Ok(meta) = fs::metadata(&object) else { continue };
            let bytes = meta.blocks() * 512;
            if meta.is_file() && meta.nlink() == 0 && bytes > limit && seen.insert((meta.dev(), meta.ino())) {
                let path = name.strip_suffix(" (deleted)").unwrap_or(name).to_owned();
                reasons.push(Reason::LargeDeletedFile { pid: process.pid, path, bytes });
            }
        }
    }
}

/// The sockets of one network namespace, from its `/proc/PID/net` tables.
#[derive(Debug, Default)]
struct NetTables {
    inet: HashMap<u64, InetEntry>,
    packet: HashSet<u64>,
    netlink: HashSet<u64>,
    unix: HashMap<u64, UnixEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct InetEntry {
    protocol: InetProtocol,
    local: SocketAddr,
    remote: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UnixEntry {
    kind: UnixKind,
    /// Bound address, if any.
    path: Option<String>,
}

const INET_TABLES: [(&str, InetProtocol); 10] = [
    ("tcp", InetProtocol::Tcp),
    ("tcp6", InetProtocol::Tcp),
    ("udp", InetProtocol::Udp),
    ("udp6", InetProtocol::Udp),
    ("udplite", InetProtocol::UdpLite),
    ("udplite6", InetProtocol::UdpLite),
    ("raw", InetProtocol::Raw),
    ("raw6", InetProtocol::Raw),
    ("icmp", InetProtocol::Icmp),
    ("icmp6", InetProtocol::Icmp),
];

/// Reads the socket tables of a network namespace through the first of `members` still there; `None` if
/// all are gone. A missing table (no IPv6, say) is an empty one.
fn read_net_tables(proc: &ProcFs, members: &[&Process]) -> Result<Option<NetTables>, InspectError> {
    for process in members {
        let net = proc.of(process.pid).join("net");
        let Some(unix) = read_text(process.pid, &net.join("unix"))? else { continue };
        let mut tables = NetTables { unix: parse_unix_table(&unix), ..NetTables::default() };
        for (file, protocol) in INET_TABLES {
            if let Some(text) = read_text(process.pid, &net.join(file))? {
                tables.inet.extend(parse_inet_table(&text, &protocol));
            }
        }
        if let Some(text) = read_text(process.pid, &net.join("packet"))? {
            tables.packet = parse_inode_column(&text);
        }
        if let Some(text) = read_text(process.pid, &net.join("netlink"))? {
            tables.netlink = parse_inode_column(&text);
        }
        return Ok(Some(tables));
    }
    Ok(None)
}

fn sockets(
    proc: &ProcFs,
    peers: &dyn UnixPeers,
    job: &[Process],
    reasons: &mut Vec<Reason>,
) -> Result<(), InspectError> {
    let socket_of = |fd: &OpenFd| match fd.class {
        FdClass::Socket(inode) => Some(inode),
        _ => None,
    };
    let held: HashSet<u64> = job.iter().flat_map(|process| &process.fds).filter_map(socket_of).collect();
    if held.is_empty() {
        return Ok(());
    }
    // Tables are per network namespace: read each namespace's once.
    let mut by_netns: Vec<(String, Vec<&Process>)> = Vec::new();
    for process in job.iter().filter(|process| process.fds.iter().any(|fd| socket_of(fd).is_some())) {
        let netns = process.namespaces.get("net").cloned().unwrap_or_else(|| format!("of pid {}", process.pid));
        match by_netns.iter_mut().find(|(key, _)| *key == netns) {
            Some((_, members)) => members.push(process),
            None => by_netns.push((netns, vec![process])),
        }
    }
    // A socket inherited by many processes (workers sharing a listener) is told once, for the first.
    let mut told = HashSet::new();
    for (_, members) in by_netns {
        let Some(tables) = read_net_tables(proc, &members)? else { continue };
        let mut unix_peers: Option<HashMap<u64, u64>> = None;
        for process in members {
            for fd in &process.fds {
                let Some(inode) = socket_of(fd).filter(|inode| told.insert(*inode)) else { continue };
                let (pid, fd) = (process.pid, fd.fd);
                if let Some(inet) = tables.inet.get(&inode) {
                    let InetEntry { protocol, local, remote } = inet.clone();
                    reasons.push(Reason::InetSocket { pid, fd, protocol, local: Some(local), remote });
                } else if tables.packet.contains(&inode) {
                    reasons.push(Reason::PacketSocket { pid, fd });
                } else if tables.netlink.contains(&inode) {
                    // CRIU dumps netlink sockets.
                } else if let Some(unix) = tables.unix.get(&inode) {
                    let unix_peers = unix_peers.get_or_insert_with(|| {
                        peers.unix_peers(pid).unwrap_or_else(|error| {
                            tracing::warn!(pid, %error, "can't list unix socket peers; connections out of the job go unchecked");
                            HashMap::new()
                        })
                    });
                    if let Some(peer) = unix_peers.get(&inode)
                        && !held.contains(peer)
                    {
                        let peer = tables.unix.get(peer).and_then(|entry| entry.path.clone());
                        reasons.push(Reason::UnixPeerOutside { pid, fd, kind: unix.kind, peer });
                    }
                } else {
                    // In no table: an inet or netlink socket not bound yet, or a family without a table.
                    let path = proc.of(pid).join("fd").join(fd.to_string());
                    match socket_protocol(&path) {
                        Ok(protocol) => reasons.extend(unlisted_socket(pid, fd, &protocol)),
                        Err(error) => tracing::debug!(pid, fd, %error, "can't name the protocol of an unlisted socket"),
                    }
                }
            }
        }
    }
    Ok(())
}

/// The reason, if any, for a socket in no table, by the kernel's name for its protocol.
fn unlisted_socket(pid: i32, fd: i32, protocol: &str) -> Option<Reason> {
    let inet = |protocol| Some(Reason::InetSocket { pid, fd, protocol, local: None, remote: None });
    match protocol {
        "UNIX" | "UNIX-STREAM" | "UNIX-DGRAM" | "NETLINK" => None,
        "TCP" | "TCPv6" => inet(InetProtocol::Tcp),
        "UDP" | "UDPv6" => inet(InetProtocol::Udp),
        "UDP-Lite" | "UDPLITEv6" => inet(InetProtocol::UdpLite),
        "RAW" | "RAWv6" => inet(InetProtocol::Raw),
        "PING" | "PINGv6" => inet(InetProtocol::Icmp),
        "MPTCP" | "MPTCPv6" | "SCTP" | "SCTPv6" | "DCCP" | "DCCPv6" | "L2TP/IP" | "L2TP/IPv6" => {
            inet(InetProtocol::Other(protocol.to_owned()))
        }
        "PACKET" => Some(Reason::PacketSocket { pid, fd }),
        other => Some(Reason::UnsupportedSocket { pid, fd, protocol: other.to_owned() }),
    }
}

/// The kernel's name for a socket's protocol (`system.sockprotoname`: "TCP", "UNIX-STREAM"...), read
/// through `/proc/PID/fd/N` without touching the socket.
fn socket_protocol(path: &Path) -> io::Result<String> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut name = [0u8; 64];
    // SAFETY: both strings are NUL-terminated, and the kernel writes at most `name.len()` bytes to `name`.
    let len = unsafe {
        libc::getxattr(path.as_ptr(), c"system.sockprotoname".as_ptr(), name.as_mut_ptr().cast(), name.len())
    };
    let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
    let name = name.get(..len).unwrap_or_default();
    let name = name.split(|&byte| byte == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// Parses `/proc/net/{tcp,udp,raw,icmp}[6]`: `sl local remote st queues tr retrnsmt uid timeout inode ...`.
fn parse_inet_table(text: &str, protocol: &InetProtocol) -> Vec<(u64, InetEntry)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let local = parse_hex_address(fields.nth(1)?)?;
            let remote = parse_hex_address(fields.next()?)?;
            let inode: u64 = fields.nth(6)?.parse().ok()?;
            // Inode 0: a socket no file holds any more (TIME_WAIT...).
            (inode != 0).then(|| {
                let remote = (!remote.ip().is_unspecified() || remote.port() != 0).then_some(remote);
                (inode, InetEntry { protocol: protocol.clone(), local, remote })
            })
        })
        .collect()
}

/// Parses `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints each 32-bit word of
/// the address as it is in memory, and the port in host order.
fn parse_hex_address(field: &str) -> Option<SocketAddr> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let digits = address.get(i * 8..(i + 1) * 8)?;
        Some(u32::from_str_radix(digits, 16).ok()?.to_ne_bytes())
    };
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode Path`.
fn parse_unix_table(text: &str) -> HashMap<u64, UnixEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let ([_, _, _, _, kind, _, inode], path) = fields::<7>(line)?;
            let kind = match u16::from_str_radix(kind, 16).ok()? {
                2 => UnixKind::Datagram,
                5 => UnixKind::Seqpacket,
                _ => UnixKind::Stream,
            };
            let path = (!path.is_empty()).then(|| path.to_owned());
            Some((inode.parse().ok()?, UnixEntry { kind, path }))
        })
        .collect()
}

/// The `Inode` column of a table whose header names its columns (`/proc/net/packet`, `/proc/net/netlink`).
fn parse_inode_column(text: &str) -> HashSet<u64> {
    let mut lines = text.lines();
    let Some(column) = lines.next().and_then(|header| header.split_ascii_whitespace().position(|name| name == "Inode"))
    else {
        return HashSet::new();
    };
    lines.filter_map(|line| line.split_ascii_whitespace().nth(column)?.parse().ok()).collect()
}

fn mappings(proc: &ProcFs, job: &[Process], ours: &HashMap<String, String>, reasons: &mut Vec<Reason>) {
    // CRIU dumps the job's IPC namespace, with its SysV memory, only if it is not ours.
    let shared_ipc =
        job.first().and_then(|root| root.namespaces.get("ipc")).is_some_and(|ipc| ours.get("ipc") == Some(ipc));
    for process in job {
        let mut reported = HashSet::new();
        for mapping in &process.maps {
            let path = mapping.path.as_str();
            let reason = if path.starts_with("anon_inode:") || path == "[uprobes]" {
                Reason::UnsupportedMapping { pid: process.pid, path: path.to_owned() }
            } else if might_be_device(path) && is_device(proc, process.pid, mapping) {
                Reason::DeviceMapping { pid: process.pid, path: path.to_owned() }
            } else if let Some(key) = sysv_key(path)
                && shared_ipc
            {
                Reason::SysvShmWithoutIpcNamespace { pid: process.pid, shmid: mapping.inode, key }
            } else {
                continue;
            };
            // An object is often mapped in several areas; private SysV segments all have key 0.
            if reported.insert((path, mapping.inode)) {
                reasons.push(reason);
            }
        }
    }
}

/// Whether a mapped path is under `/dev` and not one of the file systems there that hold regular files.
fn might_be_device(path: &str) -> bool {
    path.starts_with("/dev/")
        && path != "/dev/zero"
        && !path.ends_with(" (deleted)")
        && !["/dev/shm/", "/dev/hugepages/", "/dev/mqueue/"].iter().any(|dir| path.starts_with(dir))
}

/// Whether a mapping under `/dev` is of a device node: asked of the mapped object itself
/// (`map_files`, needs privilege), else of the path in the process's root; a node under `/dev` otherwise.
fn is_device(proc: &ProcFs, pid: i32, mapping: &Mapping) -> bool {
    let dir = proc.of(pid);
    let candidates = [
        dir.join("map_files").join(format!("{:x}-{:x}", mapping.start, mapping.end)),
        dir.join("root").join(mapping.path.trim_start_matches('/')),
    ];
    candidates.iter().find_map(|path| fs::metadata(path).ok()).is_none_or(|meta| device_of(&meta).is_some())
}

/// Whether a shared mapping is of memory (shared anonymous memory, `SysV`, a memfd, a file in tmpfs or
/// hugetlbfs) rather than of a file on disk: by its name, else by the file system of the mapped object
/// (through `map_files`, which needs privilege, or the path in the process's root).
fn is_memory(proc: &ProcFs, pid: i32, mapping: &Mapping) -> bool {
    use nix::sys::statfs::{HUGETLBFS_MAGIC, TMPFS_MAGIC, statfs};
    let path = mapping.path.as_str();
    if path == "/dev/zero (deleted)"
        || ["/SYSV", "/memfd:", "/dev/shm/", "/dev/hugepages/"].iter().any(|p| path.starts_with(p))
    {
        return true;
    }
    let dir = proc.of(pid);
    let candidates = [
        dir.join("map_files").join(format!("{:x}-{:x}", mapping.start, mapping.end)),
        dir.join("root").join(path.trim_start_matches('/')),
    ];
    candidates
        .iter()
        .find_map(|path| statfs(path).ok())
        .is_some_and(|fs| [TMPFS_MAGIC, HUGETLBFS_MAGIC].contains(&fs.filesystem_type()))
}

/// The key of a `SysV` shared memory mapping (`/SYSV0000162e (deleted)`).
fn sysv_key(path: &str) -> Option<u32> {
    let key = path.strip_prefix("/SYSV")?;
    u32::from_str_radix(key.get(..8)?, 16).ok()
}

/// What a shared mapping maps, as `/proc/PID/maps` tells it: the same key in two processes is the same
/// object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum MappedObject {
    /// A file, memfd or shared anonymous memory, by device and inode.
    File { dev: (u32, u32), inode: u64 },
    /// A `SysV` segment, whose "inode" in `maps` is its id. An id is no inode: ids are numbered apart from
    /// the inodes of the kernel's shmem mount the segment lives on, where memfds and shared anonymous
    /// memory live too, so one of those may show the same device and inode; the first id of an IPC
    /// namespace is 0, the inode of no object at all; and an id is unique only within its IPC namespace,
    /// here the namespace link, `None` if it can't be read. Reading it needs the same access as reading
    /// `maps`, so it is unreadable only on a kernel without IPC namespaces (`None` on both sides alike) or
    /// for a process that has just ended (and shares nothing any more).
    Sysv { ipc: Option<String>, id: u64 },
}

impl MappedObject {
    /// What a mapping maps, if it is shared and maps an object; `ipc` is asked only of `SysV` memory.
    fn of(mapping: &Mapping, ipc: impl FnOnce() -> Option<String>) -> Option<Self> {
        if !mapping.shared {
            None
        } else if sysv_key(&mapping.path).is_some() {
            Some(Self::Sysv { ipc: ipc(), id: mapping.inode })
        } else {
            // Inode 0: memory of no object, which no other process can map.
            (mapping.inode != 0).then_some(Self::File { dev: mapping.dev, inode: mapping.inode })
        }
    }
}

/// The IPC namespace link of process `pid`, `None` if it can't be read.
fn ipc_namespace(proc: &ProcFs, pid: i32) -> Option<String> {
    fs::read_link(proc.of(pid).join("ns/ipc")).ok().map(|link| link.to_string_lossy().into_owned())
}

/// A shared mapping of the job, looked for in other processes.
#[derive(Debug)]
struct SharedObject<'a> {
    pid: i32,
    path: &'a str,
    /// Whether a job process may write to it.
    writable: bool,
    /// Memory (see [`is_memory`]) rather than a file on disk.
    memory: bool,
    reported: bool,
}

/// Looks for every shared mapping of the job in the maps of every other process. Memory counts if either
/// side may write to it. A file on disk counts only if the job writes to it: a mapping the job only
/// reads is the same as reading the file, which after a move reads the destination's copy, and clients of
/// `sssd` or `nscd` map those daemons' caches so; refusing them would pin every job that looked up a user.
fn shared_memory(proc: &ProcFs, job: &[Process], reasons: &mut Vec<Reason>) {
    let mut wanted: HashMap<MappedObject, SharedObject<'_>> = HashMap::new();
    for process in job {
        for mapping in &process.maps {
            let Some(object) = MappedObject::of(mapping, || process.namespaces.get("ipc").cloned()) else {
                continue;
            };
            wanted.entry(object).and_modify(|object| object.writable |= mapping.writable).or_insert_with(|| {
                SharedObject {
                    pid: process.pid,
                    path: &mapping.path,
                    writable: mapping.writable,
                    memory: is_memory(proc, process.pid, mapping),
                    reported: false,
                }
            });
        }
    }
    if wanted.is_empty() {
        return;
    }
    // An outsider's IPC namespace is read only if it may matter.
    let wants_sysv = wanted.keys().any(|object| matches!(object, MappedObject::Sysv { .. }));
    let members: HashSet<i32> = job.iter().map(|process| process.pid).collect();
    let entries = match fs::read_dir(proc.root()) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "can't list processes; memory shared out of the job goes unchecked");
            return;
        }
    };
    let mut left = wanted.len();
    for entry in entries.flatten() {
        let Some(other) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else { continue };
        if members.contains(&other) {
            continue;
        }
        // A process we can't read, or that just ended, shares nothing we can know of.
        let Ok(maps) = fs::read(proc.of(other).join("maps")) else { continue };
        let mut other_ipc: Option<Option<String>> = None;
        for mapping in String::from_utf8_lossy(&maps).lines().filter_map(parse_maps_line) {
            if !wants_sysv && sysv_key(&mapping.path).is_some() {
                continue;
            }
            let ipc = || other_ipc.get_or_insert_with(|| ipc_namespace(proc, other)).clone();
            let Some(object) = MappedObject::of(&mapping, ipc).and_then(|key| wanted.get_mut(&key)) else {
                continue;
            };
            if object.reported || !(object.writable || object.memory && mapping.writable) {
                continue;
            }
            object.reported = true;
            left -= 1;
            reasons.push(Reason::SharedMemory { pid: object.pid, path: object.path.to_owned(), outsider: other });
        }
        if left == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Namespace links every fake process and the fake checker share unless a test says otherwise.
    const NAMESPACES: [(&str, &str); 8] = [
        ("pid", "pid:[4026531836]"),
        ("ipc", "ipc:[4026531839]"),
        ("uts", "uts:[4026531838]"),
        ("user", "user:[4026531837]"),
        ("cgroup", "cgroup:[4026531835]"),
        ("time", "time:[4026531834]"),
        ("time_for_children", "time:[4026531834]"),
        ("net", "net:[4026531840]"),
    ];

    /// A `/proc` tree in a temporary directory.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let fake = Self { dir: tempfile::tempdir().unwrap() };
            for (name, target) in NAMESPACES {
                fake.link(&format!("self/ns/{name}"), target);
            }
            fake
        }

        fn proc(&self) -> ProcFs {
            ProcFs::at(self.dir.path())
        }

        fn write(&self, rel: &str, text: &str) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }

        fn link(&self, rel: &str, target: &str) {
            let path = self.dir.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let _ = fs::remove_file(&path);
            symlink(target, path).unwrap();
        }

        /// A single-threaded process with these children, no fds, no maps, our namespaces.
        fn process(&self, pid: i32, children: &[i32]) -> &Self {
            let children: Vec<String> = children.iter().map(ToString::to_string).collect();
            self.write(&format!("{pid}/task/{pid}/children"), &children.join(" "));
            self.write(&format!("{pid}/task/{pid}/status"), "Name:\tx\nTracerPid:\t0\n");
            fs::create_dir_all(self.dir.path().join(format!("{pid}/fd"))).unwrap();
            self.write(&format!("{pid}/maps"), "");
            self.write(&format!("{pid}/net/unix"), "Num       RefCount Protocol Flags    Type St Inode Path\n");
            for (name, target) in NAMESPACES {
                self.link(&format!("{pid}/ns/{name}"), target);
            }
            self
        }

        fn fd(&self, pid: i32, fd: i32, target: &str) -> &Self {
            self.link(&format!("{pid}/fd/{fd}"), target);
            self
        }
    }

    /// Unix socket peers from a table.
    struct Peers(HashMap<u64, u64>);

    impl UnixPeers for Peers {
        fn unix_peers(&self, _pid: i32) -> io::Result<HashMap<u64, u64>> {
            Ok(self.0.clone())
        }
    }

    fn no_peers() -> Peers {
        Peers(HashMap::new())
    }

    fn check_fake(fake: &FakeProc, root: i32) -> Vec<Reason> {
        check_with(&fake.proc(), &no_peers(), root).unwrap()
    }

    #[test]
    fn walks_children_of_every_thread_and_tolerates_vanished_processes() {
        let fake = FakeProc::new();
        fake.process(10, &[11, 12]).process(11, &[13]).process(13, &[]);
        // A second thread of 10 has a child too; 12 is listed but already gone.
        fake.write("10/task/15/children", "14 ");
        fake.process(14, &[]);
        let mut job = job_processes_in(&fake.proc(), 10).unwrap();
        assert_eq!(job[0], 10);
        job.sort_unstable();
        assert_eq!(job, [10, 11, 12, 13, 14]);
        assert_eq!(check_fake(&fake, 10), []);
    }

    #[test]
    fn a_missing_root_is_an_error_not_a_reason() {
        let fake = FakeProc::new();
        assert!(matches!(job_processes_in(&fake.proc(), 42), Err(InspectError::RootGone { pid: 42 })));
        assert!(matches!(check_with(&fake.proc(), &no_peers(), 42), Err(InspectError::RootGone { pid: 42 })));
    }

    #[test]
    fn loops_in_odd_children_files_end() {
        let fake = FakeProc::new();
        fake.process(10, &[11, 10]).process(11, &[10]);
        assert_eq!(job_processes_in(&fake.proc(), 10).unwrap(), [10, 11]);
    }

    #[test]
    fn traced_threads_once_per_tracer() {
        let fake = FakeProc::new();
        fake.process(10, &[]);
        fake.write("10/task/16/status", "Name:\tx\nTracerPid:\t99\n");
        fake.write("10/task/17/status", "Name:\tx\nTracerPid:\t99\n");
        let reasons = check_fake(&fake, 10);
        assert_eq!(reasons.len(), 1);
        assert!(matches!(reasons[0], Reason::Traced { pid: 10, tracer: 99, tid: 16 | 17 }));
        assert!(reasons[0].to_string().starts_with("pid 10 (thread 1"), "{}", reasons[0]);
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 501 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1388 0200000A:0016 01 00000000:00000000 00:00000000 00000000     0        0 502 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:9C40 0100007F:1388 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 503 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn inet_sockets_with_addresses() {
        let fake = FakeProc::new();
        fake.process(10, &[]).fd(10, 3, "socket:[501]").fd(10, 4, "socket:[502]").fd(10, 5, "socket:[503]");
        fake.write("10/net/tcp", TCP);
        fake.write("10/net/tcp6", TCP6);
        let reasons = check_fake(&fake, 10);
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            reasons,
            [
                Reason::InetSocket { pid: 10, fd: 3, protocol: InetProtocol::Tcp, local: Some(local), remote: None },
                Reason::InetSocket {
                    pid: 10,
                    fd: 4,
                    protocol: InetProtocol::Tcp,
                    local: Some(local),
                    remote: Some("10.0.0.2:22".parse().unwrap()),
                },
                Reason::InetSocket {
                    pid: 10,
                    fd: 5,
                    protocol: InetProtocol::Tcp,
                    local: Some("[::1]:80".parse().unwrap()),
                    remote: None,
                },
            ]
        );
        assert_eq!(
            reasons[1].to_string(),
            "pid 10 holds a TCP socket 127.0.0.1:5000 -> 10.0.0.2:22 (fd 4); \
             CRIU 4.1 cannot dump inet sockets on Linux 6.16 and later"
        );
        assert!(reasons[0].to_string().contains("listening on 127.0.0.1:5000"));
    }

    #[test]
    fn sockets_of_each_network_namespace_come_from_its_own_tables() {
        let fake = FakeProc::new();
        fake.process(10, &[11]).process(11, &[]).fd(11, 3, "socket:[502]");
        fake.link("11/ns/net", "net:[7]");
        // 10's namespace lists the socket; 11's, where it is, does not: it is a unix socket there.
        fake.write("10/net/tcp", TCP);
        fake.write(
            "11/net/unix",
            "Num       RefCount Protocol Flags    Type St Inode Path\n\
             0000000000000000: 00000002 00000000 00000000 0001 03   502\n",
        );
        assert_eq!(check_fake(&fake, 10), []);
    }

    const UNIX: &str = "Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000003 00000000 00000000 0001 03 600
0000000000000000: 00000003 00000000 00000000 0001 03 601
0000000000000000: 00000002 00000000 00000000 0002 03 602
0000000000000000: 00000002 00000000 00010000 0001 01 900 /run/some daemon.sock
0000000000000000: 00000002 00000000 00000000 0002 01 901 /dev/log
";

    #[test]
    fn unix_sockets_connected_out_of_the_job() {
        let fake = FakeProc::new();
        fake.process(10, &[11]).process(11, &[]);
        fake.fd(10, 3, "socket:[600]").fd(11, 3, "socket:[601]").fd(11, 4, "socket:[602]");
        fake.write("10/net/unix", UNIX);
        fake.write("11/net/unix", UNIX);
        // 600 and 601 are a pair within the job; 602 is connected to /dev/log's socket 901.
        let peers = Peers(HashMap::from([(600, 601), (601, 600), (602, 901)]));
        let reasons = check_with(&fake.proc(), &peers, 10).unwrap();
        assert_eq!(
            reasons,
            [Reason::UnixPeerOutside { pid: 11, fd: 4, kind: UnixKind::Datagram, peer: Some("/dev/log".to_owned()) }]
        );
        assert!(reasons[0].to_string().contains("datagram socket (fd 4) connected to /dev/log"));
    }

    #[test]
    fn an_inherited_socket_is_told_once() {
        let fake = FakeProc::new();
        fake.process(10, &[11]).process(11, &[]).fd(10, 3, "socket:[501]").fd(11, 3, "socket:[501]");
        fake.write("10/net/tcp", TCP);
        fake.write("11/net/tcp", TCP);
        assert_eq!(check_fake(&fake, 10).len(), 1);
    }

    #[test]
    fn packet_and_netlink_sockets_by_their_tables() {
        let fake = FakeProc::new();
        fake.process(10, &[]).fd(10, 3, "socket:[700]").fd(10, 4, "socket:[701]");
        fake.write(
            "10/net/packet",
            "sk               RefCnt Type Proto  Iface R Rmem   User   Inode\n\
             ffff8f0d4e4f0000 3      3    0003   0     1 0      0      700\n",
        );
        fake.write(
            "10/net/netlink",
            "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n\
             ffff8f0d4e4f0800 0   1234       00000000 0        0        0     2        0        701\n",
        );
        assert_eq!(check_fake(&fake, 10), [Reason::PacketSocket { pid: 10, fd: 3 }]);
    }

    #[test]
    fn unlisted_sockets_by_protocol_name() {
        assert_eq!(unlisted_socket(1, 3, "NETLINK"), None);
        assert_eq!(unlisted_socket(1, 3, "UNIX-STREAM"), None);
        assert_eq!(
            unlisted_socket(1, 3, "TCPv6"),
            Some(Reason::InetSocket { pid: 1, fd: 3, protocol: InetProtocol::Tcp, local: None, remote: None })
        );
        assert_eq!(unlisted_socket(1, 3, "PACKET"), Some(Reason::PacketSocket { pid: 1, fd: 3 }));
        assert_eq!(
            unlisted_socket(1, 3, "AF_VSOCK"),
            Some(Reason::UnsupportedSocket { pid: 1, fd: 3, protocol: "AF_VSOCK".to_owned() })
        );
    }

    #[test]
    fn anonymous_inode_files() {
        let fake = FakeProc::new();
        fake.process(10, &[]);
        for (fd, target) in
            ["pipe:[5]", "anon_inode:[eventfd]", "anon_inode:[pidfd]", "anon_inode:inotify", "anon_inode:[eventpoll]"]
                .iter()
                .enumerate()
        {
            fake.fd(10, i32::try_from(fd).unwrap(), target);
        }
        fake.fd(10, 10, "anon_inode:[io_uring]").fd(10, 11, "anon_inode:bpf-map").fd(10, 12, "anon_inode:kvm-vm");
        let reasons = check_fake(&fake, 10);
        let files: Vec<_> = reasons
            .iter()
            .map(|reason| match reason {
                Reason::UnsupportedFile { fd, file, .. } => (*fd, file.clone()),
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(
            files,
            [
                (10, FileKind::IoUring),
                (11, FileKind::Bpf { what: "bpf-map".to_owned() }),
                (12, FileKind::AnonInode { what: "kvm-vm".to_owned() }),
            ]
        );
        assert_eq!(
            reasons[0].to_string(),
            "pid 10 holds an io_uring instance (fd 10, anon_inode:[io_uring]), which CRIU cannot dump"
        );
    }

    #[test]
    fn device_files_as_criu_sees_them() {
        let char_device = |major, minor| Some(Device { block: false, major, minor });
        assert_eq!(classify_fd("/dev/null", char_device(1, 3)), FdClass::Fine);
        assert_eq!(classify_fd("/dev/net/tun", char_device(10, 200)), FdClass::Fine);
        assert_eq!(classify_fd("/dev/ptmx", char_device(5, 2)), FdClass::PtyMaster(None));
        assert_eq!(classify_fd("/dev/pts/3", char_device(136, 3)), FdClass::PtySlave(3));
        assert_eq!(classify_fd("/dev/tty1", char_device(4, 1)), FdClass::Fine);
        assert_eq!(
            classify_fd("/dev/fuse", char_device(10, 229)),
            FdClass::Unsupported(FileKind::CharDevice { major: 10, minor: 229 })
        );
        assert_eq!(
            classify_fd("/dev/sda", Some(Device { block: true, major: 8, minor: 0 })),
            FdClass::Unsupported(FileKind::BlockDevice { major: 8, minor: 0 })
        );
        assert_eq!(classify_fd("/home/x/data", None), FdClass::Fine);
        assert_eq!(classify_fd("socket:[12]", None), FdClass::Socket(12));
        assert_eq!(classify_fd("socket:[junk]", None), FdClass::Fine);
    }

    #[test]
    fn fd_of_a_real_device_node() {
        // Fake links to real nodes: stat follows them.
        let fake = FakeProc::new();
        fake.process(10, &[]).fd(10, 0, "/dev/null").fd(10, 1, "/dev/zero");
        assert_eq!(check_fake(&fake, 10), []);
    }

    fn pty_process(pid: i32, fd: i32, class: FdClass) -> Process {
        Process {
            pid,
            traced: Vec::new(),
            fds: vec![OpenFd { fd, link: format!("/dev/pts/{fd}"), class }],
            maps: Vec::new(),
            namespaces: HashMap::new(),
        }
    }

    #[test]
    fn a_pty_slave_needs_its_master_in_the_job() {
        let slave = pty_process(10, 3, FdClass::PtySlave(3));
        let mut reasons = Vec::new();
        files(std::slice::from_ref(&slave), &mut reasons);
        assert_eq!(reasons, [Reason::Terminal { pid: 10, fd: 3, path: "/dev/pts/3".to_owned() }]);

        let master = pty_process(11, 4, FdClass::PtyMaster(Some(3)));
        reasons.clear();
        files(&[slave, master], &mut reasons);
        assert_eq!(reasons, []);
    }

    #[test]
    fn tty_index_of_a_master() {
        assert_eq!(tty_index("pos:\t0\nflags:\t02\nmnt_id:\t25\nino:\t2\ntty-index:\t7\n"), Some(7));
        assert_eq!(tty_index("pos:\t0\n"), None);
    }

    #[test]
    fn mappings_criu_cannot_map_back() {
        let fake = FakeProc::new();
        fake.process(10, &[]);
        fake.write(
            "10/maps",
            "55d0c0a00000-55d0c0a28000 r--p 00000000 fd:01 1311 /usr/bin/prog with space\n\
             7f0000000000-7f0000100000 rw-s 00000000 00:05 88 /dev/nvidia0\n\
             7f0000100000-7f0000200000 rw-s 00100000 00:05 88 /dev/nvidia0\n\
             7f0000200000-7f0000300000 rw-s 00000000 00:1a 77 /dev/shm/ring\n\
             7f0000300000-7f0000400000 rw-s 00000000 00:01 1025 /dev/zero (deleted)\n\
             7f0000400000-7f0000500000 rw-s 00000000 00:0f 3071 anon_inode:[io_uring]\n\
             7ffff7ff0000-7ffff7ff1000 --xp 00000000 00:00 0 [uprobes]\n\
             7ffff7ffd000-7ffff7fff000 r-xp 00000000 00:00 0 [vdso]\n",
        );
        assert_eq!(
            check_fake(&fake, 10),
            [
                Reason::DeviceMapping { pid: 10, path: "/dev/nvidia0".to_owned() },
                Reason::UnsupportedMapping { pid: 10, path: "anon_inode:[io_uring]".to_owned() },
                Reason::UnsupportedMapping { pid: 10, path: "[uprobes]".to_owned() },
            ]
        );
    }

    const SYSV_MAP: &str = "7f0000000000-7f0000010000 rw-s 00000000 00:01 32769 /SYSV0000162e (deleted)\n";

    #[test]
    fn sysv_memory_needs_an_ipc_namespace_of_the_job() {
        let fake = FakeProc::new();
        fake.process(10, &[]);
        fake.write("10/maps", SYSV_MAP);
        assert_eq!(check_fake(&fake, 10), [Reason::SysvShmWithoutIpcNamespace { pid: 10, shmid: 32769, key: 0x162e }]);
        fake.link("10/ns/ipc", "ipc:[99]");
        assert_eq!(check_fake(&fake, 10), []);
    }

    #[test]
    fn memory_shared_with_a_process_outside() {
        let fake = FakeProc::new();
        fake.process(10, &[11]).process(11, &[]).process(500, &[]).process(501, &[]);
        fake.write(
            "11/maps",
            "7f0000000000-7f0000001000 r--s 00000000 00:1a 77 /dev/shm/ring\n\
             7f0000001000-7f0000002000 r--s 00000000 00:1a 78 /dev/shm/read-only\n\
             7f0000002000-7f0000003000 rw-s 00000000 00:1a 79 /dev/shm/only-ours\n",
        );
        // 10 maps `ring` too: sharing inside the job is fine.
        fake.write("10/maps", "7f0000000000-7f0000001000 r--s 00000000 00:1a 77 /dev/shm/ring\n");
        fake.write(
            "500/maps",
            "7f0000000000-7f0000001000 rw-s 00000000 00:1a 77 /dev/shm/ring\n\
             7f0000001000-7f0000002000 r--s 00000000 00:1a 78 /dev/shm/read-only\n\
             7f0000002000-7f0000003000 rw-p 00000000 00:1a 79 /dev/shm/only-ours\n",
        );
        let reasons = check_fake(&fake, 10);
        assert_eq!(reasons, [Reason::SharedMemory { pid: 10, path: "/dev/shm/ring".to_owned(), outsider: 500 }]);
        assert!(reasons[0].to_string().contains("(/dev/shm/ring) with pid 500, which is outside the job"));
    }

    #[test]
    fn a_file_on_disk_counts_only_if_the_job_writes_to_it() {
        let fake = FakeProc::new();
        fake.process(10, &[]).process(500, &[]);
        // The job reads an sssd cache that the daemon writes; it writes a file that a monitor reads.
        fake.write(
            "10/maps",
            "7f0000000000-7f0000001000 r--s 00000000 fd:01 4001 /var/lib/sss/mc/passwd\n\
             7f0000001000-7f0000002000 rw-s 00000000 fd:01 4002 /srv/job/metrics.db\n",
        );
        fake.write(
            "500/maps",
            "7f0000000000-7f0000001000 rw-s 00000000 fd:01 4001 /var/lib/sss/mc/passwd\n\
             7f0000001000-7f0000002000 r--s 00000000 fd:01 4002 /srv/job/metrics.db\n",
        );
        assert_eq!(
            check_fake(&fake, 10),
            [Reason::SharedMemory { pid: 10, path: "/srv/job/metrics.db".to_owned(), outsider: 500 }]
        );
    }

    #[test]
    fn sysv_ids_are_compared_within_an_ipc_namespace() {
        let fake = FakeProc::new();
        fake.process(10, &[]).process(500, &[]);
        fake.link("10/ns/ipc", "ipc:[99]");
        fake.write("10/maps", SYSV_MAP);
        // Same id, another IPC namespace: another segment.
        fake.write("500/maps", SYSV_MAP);
        assert_eq!(check_fake(&fake, 10), []);
        fake.link("500/ns/ipc", "ipc:[99]");
        assert_eq!(
            check_fake(&fake, 10),
            [Reason::SharedMemory { pid: 10, path: "/SYSV0000162e (deleted)".to_owned(), outsider: 500 }]
        );
    }

    #[test]
    fn sysv_ids_are_not_inodes() {
        let fake = FakeProc::new();
        fake.process(10, &[]).process(500, &[]);
        fake.link("10/ns/ipc", "ipc:[99]");
        fake.link("500/ns/ipc", "ipc:[99]");
        // As Linux shows them (seen on 6.18): the first segment of an IPC namespace has id 0, and a memfd
        // on the shmem mount the segments live on has an inode equal to the id of another segment.
        fake.write(
            "10/maps",
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV726d0001 (deleted)\n\
             7f0000001000-7f0000002000 rw-s 00000000 00:01 342 /SYSV726d0002 (deleted)\n\
             7f0000002000-7f0000003000 rw-s 00000000 00:01 342 /memfd:ring (deleted)\n",
        );
        // 500 maps the first segment and the memfd, not the second segment.
        fake.write(
            "500/maps",
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV726d0001 (deleted)\n\
             7f0000002000-7f0000003000 rw-s 00000000 00:01 342 /memfd:ring (deleted)\n",
        );
        assert_eq!(
            check_fake(&fake, 10),
            [
                Reason::SharedMemory { pid: 10, path: "/SYSV726d0001 (deleted)".to_owned(), outsider: 500 },
                Reason::SharedMemory { pid: 10, path: "/memfd:ring (deleted)".to_owned(), outsider: 500 },
            ]
        );
    }

    #[test]
    fn nested_namespaces() {
        let fake = FakeProc::new();
        fake.process(10, &[11, 12, 13]).process(11, &[]).process(12, &[]).process(13, &[]);
        // The root's own pid namespace is the job's; a child in a network namespace of its own is fine.
        fake.link("10/ns/pid", "pid:[50]");
        fake.link("11/ns/pid", "pid:[50]");
        fake.link("11/ns/net", "net:[51]");
        fake.link("12/ns/pid", "pid:[52]");
        fake.link("12/ns/uts", "uts:[53]");
        fake.link("13/ns/pid", "pid:[50]");
        fake.link("13/ns/time_for_children", "time:[54]");
        let reasons = check_fake(&fake, 10);
        assert_eq!(
            reasons,
            [
                Reason::NestedNamespace { pid: 12, namespace: Namespace::Pid },
                Reason::NestedNamespace { pid: 12, namespace: Namespace::Uts },
                Reason::NestedNamespace { pid: 13, namespace: Namespace::Time },
            ]
        );
        assert_eq!(
            reasons[1].to_string(),
            "pid 12 is in a uts namespace of its own inside the job; CRIU cannot dump nested uts namespaces"
        );
    }

    #[test]
    fn an_unreadable_job_file_is_an_error() {
        let fake = FakeProc::new();
        fake.process(10, &[]);
        // A directory where the file should be: unreadable as a file even for root (EISDIR).
        let maps = fake.dir.path().join("10/maps");
        fs::remove_file(&maps).unwrap();
        fs::create_dir(&maps).unwrap();
        let error = check_fake_error(&fake, 10);
        assert!(matches!(error, InspectError::Read { pid: 10, .. }), "{error}");
    }

    fn check_fake_error(fake: &FakeProc, root: i32) -> InspectError {
        check_with(&fake.proc(), &no_peers(), root).unwrap_err()
    }

    #[test]
    fn hex_addresses() {
        assert_eq!(parse_hex_address("0100007F:1F90"), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(parse_hex_address("00000000:0000"), Some("0.0.0.0:0".parse().unwrap()));
        assert_eq!(
            parse_hex_address("B80D0120000000000000000001000000:0016"),
            Some("[2001:db8::1]:22".parse().unwrap())
        );
        assert_eq!(
            parse_hex_address("0000000000000000FFFF00000100007F:0050"),
            Some("[::ffff:127.0.0.1]:80".parse().unwrap())
        );
        for junk in ["", ":", "0100007F", "0100007F:", "XYZ0007F:0016", "0100007F:10000", "ééééé:0016"] {
            assert_eq!(parse_hex_address(junk), None, "{junk}");
        }
    }

    #[test]
    fn odd_proc_content_is_skipped_not_fatal() {
        assert_eq!(parse_maps_line(""), None);
        assert_eq!(parse_maps_line("7f00-7f01 r"), None);
        assert_eq!(parse_maps_line("zz-7f01 rw-s 0 00:01 5 /x"), None);
        let mapping = parse_maps_line("7f00-7f01 rw-s 00000000 00:01 5").unwrap();
        assert_eq!((mapping.path.as_str(), mapping.shared, mapping.writable, mapping.dev), ("", true, true, (0, 1)));
        assert!(parse_inet_table("header\n garbage\n0: 1 2 3\n", &InetProtocol::Udp).is_empty());
        assert!(parse_unix_table("header\nnonsense\n").is_empty());
        assert!(parse_inode_column("no header").is_empty());
        assert_eq!(tracer_of("TracerPid:\tjunk\n"), None);
        assert_eq!(state_of("42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(state_of("42 (a"), None);
        assert_eq!(sysv_key("/SYSV12"), None);
        let mut peers = HashMap::new();
        assert!(parse_unix_diag(&[0xff; 40], &mut peers).is_err());
        assert!(!parse_unix_diag(&[1, 2, 3], &mut peers).unwrap());
    }

    #[test]
    fn unix_diag_messages() {
        let mut message = Vec::new();
        let mut push = |kind: u16, payload: &[u8]| {
            message.extend_from_slice(&u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap().to_ne_bytes());
            message.extend_from_slice(&kind.to_ne_bytes());
            message.extend_from_slice(&[0; 10]);
            message.extend_from_slice(payload);
        };
        let mut diag = vec![1, 1, 1, 0];
        diag.extend_from_slice(&600u32.to_ne_bytes());
        diag.extend_from_slice(&[0; 8]);
        diag.extend_from_slice(&8u16.to_ne_bytes());
        diag.extend_from_slice(&UDIAG_PEER.to_ne_bytes());
        diag.extend_from_slice(&601u32.to_ne_bytes());
        push(SOCK_DIAG_BY_FAMILY, &diag);
        push(NLMSG_DONE, &[0; 4]);
        let mut peers = HashMap::new();
        assert!(parse_unix_diag(&message, &mut peers).unwrap());
        assert_eq!(peers, HashMap::from([(600, 601)]));
    }

    #[test]
    fn shared_objects_named_for_users() {
        assert_eq!(describe_shared("/dev/zero (deleted)"), "shared anonymous memory");
        assert_eq!(describe_shared("/SYSV0000162e (deleted)"), "SysV segment with key 0x0000162e");
        assert_eq!(describe_shared("/memfd:ring (deleted)"), "memfd ring");
        assert_eq!(describe_shared("/srv/db.lmdb"), "/srv/db.lmdb");
    }

    #[test]
    fn deleted_files_larger_than_the_ghost_limit_once_each() {
        use std::io::Write as _;
        let scratch = tempfile::tempdir().unwrap();
        // Files this test holds, reached through its own /proc/self/fd: the fake's links end in names that
        // say " (deleted)", as the kernel's do.
        let held = |name: &str, bytes: usize, keep_linked: bool| {
            let path = scratch.path().join(name);
            let mut file = File::create(&path).unwrap();
            file.write_all(&vec![7u8; bytes]).unwrap();
            file.sync_all().unwrap();
            if keep_linked {
                fs::hard_link(&path, scratch.path().join(format!("{name}-elsewhere"))).unwrap();
            }
            fs::remove_file(&path).unwrap();
            let shown = scratch.path().join(format!("{name} (deleted)"));
            symlink(format!("/proc/self/fd/{}", file.as_raw_fd()), &shown).unwrap();
            (file, shown.to_str().unwrap().to_owned())
        };
        let (big_file, big) = held("big", 256 << 10, false);
        let (_small, small) = held("small", 1000, false);
        let (_linked, linked) = held("linked", 256 << 10, true);
        let fake = FakeProc::new();
        fake.process(10, &[]).fd(10, 3, &big).fd(10, 4, &big).fd(10, 5, &small).fd(10, 6, &linked);
        fake.fd(10, 7, "/memfd:ring (deleted)");
        // Mapped too, privately: still one file.
        fake.write("10/maps", &format!("7f0000000000-7f0000001000 r--p 00000000 08:01 42 {big}\n"));
        fake.link("10/map_files/7f0000000000-7f0000001000", &format!("/proc/self/fd/{}", big_file.as_raw_fd()));
        let job = [read_process(&fake.proc(), 10).unwrap().unwrap()];
        let mut reasons = Vec::new();
        large_deleted_files(&fake.proc(), &job, 128 << 10, &mut reasons);
        let [Reason::LargeDeletedFile { pid: 10, path, bytes }] = &reasons[..] else { panic!("{reasons:?}") };
        assert_eq!(path, &scratch.path().join("big").display().to_string());
        assert!(*bytes >= 256 << 10, "{bytes}");
        let text = reasons[0].to_string();
        assert!(text.starts_with(&format!("pid 10 holds {path}, deleted, of 1 MiB;")), "{text}");
        // Under the limit, nothing: CRIU copies it.
        let mut reasons = Vec::new();
        large_deleted_files(&fake.proc(), &job, 1 << 20, &mut reasons);
        assert_eq!(reasons, []);
    }

    // Against the real /proc, with real child processes.

    mod real {
        use super::*;
        use std::net::{TcpListener, TcpStream, UdpSocket};
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        /// A child process, killed with its descendants (deepest first, so that the child reaps them)
        /// when dropped.
        struct Job(Child);

        impl Job {
            fn spawn(command: &mut Command) -> Self {
                Self(command.spawn().unwrap())
            }

            fn sleep() -> Command {
                let mut command = Command::new("sleep");
                command.arg("60").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
                command
            }

            fn pid(&self) -> i32 {
                i32::try_from(self.0.id()).unwrap()
            }

            /// Waits until the job has `count` processes.
            fn wait_for(&self, count: usize) -> Vec<i32> {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let job = job_processes(self.pid()).unwrap();
                    if job.len() >= count || Instant::now() > deadline {
                        return job;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }

        impl Drop for Job {
            fn drop(&mut self) {
                let job = job_processes(self.pid()).unwrap_or_default();
                for &pid in job.iter().skip(1).rev() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
                }
                // A shell waiting for the killed ones ends by itself once it has reaped them.
                let deadline = Instant::now() + Duration::from_secs(2);
                while job.len() > 1 && matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        #[test]
        fn lists_a_real_tree() {
            let job = Job::spawn(
                Command::new("sh")
                    .args(["-c", "sleep 60 & sleep 60 & wait"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null()),
            );
            let pids = job.wait_for(3);
            assert_eq!(pids.len(), 3, "{pids:?}");
            assert_eq!(pids[0], job.pid());
        }

        #[test]
        fn a_plain_process_can_move() {
            let job = Job::spawn(&mut Job::sleep());
            assert_eq!(check(job.pid()).unwrap(), []);
        }

        #[test]
        fn zombies_in_the_job() {
            // The exec'd shell never reaps its first child.
            let job = Job::spawn(
                Command::new("sh").args(["-c", "sleep 0 & exec sleep 60"]).stdin(Stdio::null()).stdout(Stdio::null()),
            );
            let pids = job.wait_for(2);
            let zombie = pids.get(1).copied().expect("the zombie child");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !fs::read_to_string(format!("/proc/{zombie}/stat")).is_ok_and(|stat| stat.contains(") Z ")) {
                assert!(Instant::now() < deadline, "{zombie} never became a zombie");
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(check(job.pid()).unwrap(), []);
        }

        #[test]
        fn a_gone_root() {
            let mut child = Job::sleep().spawn().unwrap();
            let pid = i32::try_from(child.id()).unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(matches!(check(pid), Err(InspectError::RootGone { .. })));
        }

        #[test]
        fn inet_sockets() {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let listening = listener.local_addr().unwrap();
            let stream = TcpStream::connect(listening).unwrap();
            let (local, remote) = (stream.local_addr().unwrap(), stream.peer_addr().unwrap());
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            let bound = udp.local_addr().unwrap();
            let job = Job::spawn(
                Job::sleep().stdin(OwnedFd::from(listener)).stdout(OwnedFd::from(stream)).stderr(OwnedFd::from(udp)),
            );
            let pid = job.pid();
            let reasons = check(pid).unwrap();
            assert_eq!(
                reasons,
                [
                    Reason::InetSocket {
                        pid,
                        fd: 0,
                        protocol: InetProtocol::Tcp,
                        local: Some(listening),
                        remote: None
                    },
                    Reason::InetSocket {
                        pid,
                        fd: 1,
                        protocol: InetProtocol::Tcp,
                        local: Some(local),
                        remote: Some(remote)
                    },
                    Reason::InetSocket { pid, fd: 2, protocol: InetProtocol::Udp, local: Some(bound), remote: None },
                ]
            );
        }

        #[test]
        fn an_unbound_inet_socket() {
            // SAFETY: a plain system call; the result is checked.
            let raw = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            assert!(raw >= 0, "{}", io::Error::last_os_error());
            // SAFETY: just made, owned by nothing else.
            let socket = unsafe { OwnedFd::from_raw_fd(raw) };
            let job = Job::spawn(Job::sleep().stdin(socket));
            let pid = job.pid();
            assert_eq!(
                check(pid).unwrap(),
                [Reason::InetSocket { pid, fd: 0, protocol: InetProtocol::Tcp, local: None, remote: None }]
            );
        }

        #[test]
        fn unix_socket_pairs() {
            let (inside, outside) = UnixStream::pair().unwrap();
            let job = Job::spawn(Job::sleep().stdin(OwnedFd::from(inside)));
            let pid = job.pid();
            assert_eq!(
                check(pid).unwrap(),
                [Reason::UnixPeerOutside { pid, fd: 0, kind: UnixKind::Stream, peer: None }]
            );
            drop(outside);

            let (one, other) = UnixStream::pair().unwrap();
            let job = Job::spawn(Job::sleep().stdin(OwnedFd::from(one)).stdout(OwnedFd::from(other)));
            assert_eq!(check(job.pid()).unwrap(), []);
        }

        #[test]
        fn a_traced_process() {
            let job = Job::spawn(&mut Job::sleep());
            // SAFETY: PTRACE_SEIZE on our own child, with no pointers.
            let seized = unsafe {
                libc::ptrace(
                    libc::PTRACE_SEIZE,
                    job.pid(),
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            assert_eq!(seized, 0, "PTRACE_SEIZE: {}", io::Error::last_os_error());
            let pid = job.pid();
            // The tracer is this thread: TracerPid names a thread.
            let tracer = nix::unistd::gettid().as_raw();
            assert_eq!(check(pid).unwrap(), [Reason::Traced { pid, tid: pid, tracer }]);
        }

        /// Opens a pty pair: master and slave.
        fn pty() -> (OwnedFd, File) {
            // SAFETY: plain calls on a descriptor we own; results are checked.
            let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
            assert!(master >= 0, "{}", io::Error::last_os_error());
            // SAFETY: just made, owned by nothing else.
            let master = unsafe { OwnedFd::from_raw_fd(master) };
            // SAFETY: as above.
            assert_eq!(unsafe { libc::grantpt(master.as_raw_fd()) }, 0);
            // SAFETY: as above.
            assert_eq!(unsafe { libc::unlockpt(master.as_raw_fd()) }, 0);
            let mut name = [0u8; 64];
            // SAFETY: the buffer is valid for its length.
            assert_eq!(unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) }, 0);
            let name = std::ffi::CStr::from_bytes_until_nul(&name).unwrap().to_str().unwrap().to_owned();
            let slave = fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&name).unwrap();
            (master, slave)
        }

        use std::os::unix::fs::OpenOptionsExt;

        #[test]
        fn a_terminal_without_its_master() {
            let (master, slave) = pty();
            let job = Job::spawn(Job::sleep().stdin(slave));
            let pid = job.pid();
            let reasons = check(pid).unwrap();
            assert!(
                matches!(&reasons[..], [Reason::Terminal { fd: 0, path, .. }] if path.starts_with("/dev/pts/")),
                "{reasons:?}"
            );
            drop(master);

            let (master, slave) = pty();
            let job = Job::spawn(Job::sleep().stdin(slave).stdout(master));
            assert_eq!(check(job.pid()).unwrap(), []);
        }

        #[test]
        fn io_uring_but_not_eventfd() {
            let mut params = [0u32; 30]; // struct io_uring_params: 120 bytes
            // SAFETY: the kernel writes at most sizeof(struct io_uring_params) into `params`.
            let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            assert!(
                ring >= 0,
                "io_uring_setup failed ({}): this test needs io_uring (sysctl kernel.io_uring_disabled=0)",
                io::Error::last_os_error()
            );
            // SAFETY: just made, owned by nothing else.
            let ring = unsafe { OwnedFd::from_raw_fd(i32::try_from(ring).unwrap()) };
            // SAFETY: a plain system call; the result is checked.
            let event = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(event >= 0);
            // SAFETY: just made, owned by nothing else.
            let event = unsafe { OwnedFd::from_raw_fd(event) };
            let job = Job::spawn(Job::sleep().stdin(ring).stdout(event));
            let pid = job.pid();
            assert_eq!(
                check(pid).unwrap(),
                [Reason::UnsupportedFile {
                    pid,
                    fd: 0,
                    path: "anon_inode:[io_uring]".to_owned(),
                    file: FileKind::IoUring
                }]
            );
        }

        /// A forked copy of this process, which keeps its shared mappings and waits to be killed.
        struct Forked(i32);

        impl Forked {
            fn new() -> Self {
                // SAFETY: the child only calls pause(), which is async-signal-safe, until it is killed.
                match unsafe { libc::fork() } {
                    0 => loop {
                        // SAFETY: as above.
                        unsafe { libc::pause() };
                    },
                    pid => {
                        assert!(pid > 0, "fork: {}", io::Error::last_os_error());
                        Self(pid)
                    }
                }
            }
        }

        impl Drop for Forked {
            fn drop(&mut self) {
                let pid = nix::unistd::Pid::from_raw(self.0);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
            }
        }

        #[test]
        fn memory_shared_with_its_parent() {
            const SIZE: usize = 4096;
            // SAFETY: plain system calls; results are checked, and the areas are unmapped at the end.
            unsafe {
                let anonymous = libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(anonymous, libc::MAP_FAILED);
                let memfd = libc::memfd_create(c"rmosix-test".as_ptr(), libc::MFD_CLOEXEC);
                assert!(memfd >= 0);
                let memfd = OwnedFd::from_raw_fd(memfd);
                assert_eq!(libc::ftruncate(memfd.as_fd().as_raw_fd(), 4096), 0);
                let memfd_area = libc::mmap(
                    std::ptr::null_mut(),
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    memfd.as_raw_fd(),
                    0,
                );
                assert_ne!(memfd_area, libc::MAP_FAILED);
                let shmid = libc::shmget(libc::IPC_PRIVATE, SIZE, libc::IPC_CREAT | 0o600);
                assert!(shmid >= 0, "shmget: {}", io::Error::last_os_error());
                let sysv = libc::shmat(shmid, std::ptr::null(), 0);
                // Removed now, freed when the last process detaches.
                libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut());
                assert_ne!(sysv as isize, -1);

                let child = Forked::new();
                let pid = child.0;
                let reasons = check(pid).unwrap();
                // The outsider found first is this process, or a child that another test is spawning and
                // that shares this process's memory until it execs.
                let shared_with_us = |path: &str| {
                    reasons.iter().any(|reason| {
                        matches!(reason, Reason::SharedMemory { pid: p, path: shared, outsider }
                            if *p == pid && shared.starts_with(path) && *outsider != pid)
                    })
                };
                assert!(shared_with_us("/dev/zero"), "{reasons:#?}");
                assert!(shared_with_us("/memfd:rmosix-test"), "{reasons:#?}");
                assert!(shared_with_us("/SYSV"), "{reasons:#?}");
                assert!(
                    reasons.iter().any(|reason| matches!(reason,
                        Reason::SysvShmWithoutIpcNamespace { pid: p, shmid: id, .. } if *p == pid && *id == u64::try_from(shmid).unwrap())),
                    "{reasons:#?}"
                );
                drop(child);
                libc::shmdt(sysv);
                libc::munmap(memfd_area, SIZE);
                libc::munmap(anonymous, SIZE);
            }
        }

        /// The two ways a `SysV` segment's inode in `maps`, its id, misleads: the first segment of an IPC
        /// namespace has id 0, which is also the inode of anonymous memory, and ids are numbered apart from
        /// the inodes of the kernel's shmem mount the segments live on, which memfds and shared anonymous
        /// memory live on too. A fresh IPC namespace gives the first; `kernel.shm_next_id` (there for CRIU),
        /// set in that namespace and so for no one else, gives a second segment the id of a memfd's inode.
        #[test]
        fn sysv_ids_that_look_like_other_memory() {
            assert!(
                nix::unistd::geteuid().is_root(),
                "unshare --ipc and shm_next_id need root (run the tests as root)"
            );
            let script = "import ctypes, mmap, os, signal\n\
                libc = ctypes.CDLL(None, use_errno=True)\n\
                libc.shmat.restype = ctypes.c_void_p\n\
                def segment(key):\n    \
                    shmid = libc.shmget(key, 4096, 0o1600)\n    \
                    assert shmid >= 0, os.strerror(ctypes.get_errno())\n    \
                    assert libc.shmat(shmid, None, 0) != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())\n    \
                    libc.shmctl(shmid, 0, None)\n    \
                    return shmid\n\
                first = segment(0x726d0001)\n\
                memfd = os.memfd_create('rmosix-test')\n\
                os.ftruncate(memfd, 4096)\n\
                area = mmap.mmap(memfd, 4096)\n\
                inode = os.fstat(memfd).st_ino\n\
                with open('/proc/sys/kernel/shm_next_id', 'w') as f: f.write(str(inode))\n\
                second = segment(0x726d0002)\n\
                child = os.fork()\n\
                if child == 0:\n    \
                    while True: signal.pause()\n\
                print(first, second, inode, child, flush=True)\n\
                os.waitpid(child, 0)\n";
            let mut job = Job::spawn(
                Command::new("unshare")
                    .args(["--ipc", "python3", "-c", script])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped()),
            );
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(job.0.stdout.take().unwrap()), &mut line).unwrap();
            let numbers: Vec<i64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
            let &[first, second, inode, child] = &numbers[..] else { panic!("python3 said {line:?}") };
            assert_eq!((first, second), (0, inode), "the segments did not get the ids asked for");
            let (child, parent) = (i32::try_from(child).unwrap(), job.pid());
            let reasons = check(child).unwrap();
            let expected = ["/SYSV726d0001 (deleted)", "/SYSV726d0002 (deleted)", "/memfd:rmosix-test (deleted)"]
                .map(|path| Reason::SharedMemory { pid: child, path: path.to_owned(), outsider: parent });
            assert!(
                reasons.len() == expected.len() && expected.iter().all(|reason| reasons.contains(reason)),
                "{reasons:#?}"
            );
        }

        #[test]
        fn a_nested_uts_namespace() {
            assert!(nix::unistd::geteuid().is_root(), "unshare --uts needs root (run the tests as root)");
            let job = Job::spawn(
                Command::new("sh")
                    .args(["-c", "unshare --uts sleep 60 & wait"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null()),
            );
            // Wait until unshare has become sleep.
            let deadline = Instant::now() + Duration::from_secs(10);
            let nested = loop {
                let pids = job.wait_for(2);
                if let Some(&nested) = pids.get(1)
                    && fs::read_to_string(format!("/proc/{nested}/comm")).is_ok_and(|comm| comm.trim() == "sleep")
                {
                    break nested;
                }
                assert!(Instant::now() < deadline, "the nested process never started: {pids:?}");
                std::thread::sleep(Duration::from_millis(10));
            };
            assert_eq!(check(job.pid()).unwrap(), [Reason::NestedNamespace { pid: nested, namespace: Namespace::Uts }]);
        }

        #[test]
        fn a_job_in_another_network_namespace() {
            assert!(nix::unistd::geteuid().is_root(), "unshare --net needs root (run the tests as root)");
            let script = "import os, socket, sys, time\n\
                a, b = socket.socketpair()\n\
                l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n\
                print(os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino, l.fileno(), l.getsockname()[1], flush=True)\n\
                time.sleep(60)\n";
            let mut job = Job::spawn(
                Command::new("unshare")
                    .args(["--net", "python3", "-c", script])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped()),
            );
            let mut line = String::new();
            io::BufRead::read_line(&mut io::BufReader::new(job.0.stdout.take().unwrap()), &mut line).unwrap();
            let numbers: Vec<u64> = line.split_whitespace().map(|n| n.parse().unwrap()).collect();
            let &[a, b, listener_fd, port] = &numbers[..] else { panic!("python3 said {line:?}") };
            let pid = job.pid();
            assert_ne!(
                fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
                fs::read_link("/proc/self/ns/net").unwrap()
            );
            let peers = SockDiag.unix_peers(pid).unwrap();
            assert_eq!((peers.get(&a), peers.get(&b)), (Some(&b), Some(&a)));
            assert_eq!(
                check(pid).unwrap(),
                [Reason::InetSocket {
                    pid,
                    fd: i32::try_from(listener_fd).unwrap(),
                    protocol: InetProtocol::Tcp,
                    local: Some(SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()))),
                    remote: None,
                }]
            );
        }

        #[test]
        fn sock_diag_sees_a_pair() {
            let (one, other) = UnixStream::pair().unwrap();
            let inode =
                |stream: &UnixStream| fs::metadata(format!("/proc/self/fd/{}", stream.as_raw_fd())).unwrap().ino();
            let us = i32::try_from(std::process::id()).unwrap();
            let peers = SockDiag.unix_peers(us).unwrap();
            assert_eq!(peers.get(&inode(&one)), Some(&inode(&other)));
        }
    }
}
