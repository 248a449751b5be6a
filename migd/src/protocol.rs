//! The messages migds exchange over an authenticated [`crate::channel`].
//!
//! Two kinds of connection, told apart by their first frame:
//!
//! A **migration** (`OFFER`): the node the job runs on (the source) offers it to the destination, which
//! accepts or refuses; the source sends the images (`IMAGES`, then the raw image stream, authenticated by
//! the connection's bulk key); the destination restores them stopped and answers `RUNNING`; the source kills
//! its frozen copy and answers `COMMITTED`; only then does the destination let the job run. Until `RUNNING`,
//! any failure leaves the job running at the source; after it, the source's copy is gone and the
//! destination's runs. Never two copies running, never none.
//!
//! A **job link** (`ATTACH`): the node a job runs on, when that is not its home, connects to the home node;
//! the job's output and exit status flow home, its input, signals and move orders flow out.

use serde::{Deserialize, Serialize};

/// Offer of a job (source to destination).
pub const OFFER: u8 = 1;
/// Verdict on an offer (destination to source): [`Verdict`].
pub const VERDICT: u8 = 2;
/// The image stream follows (source to destination).
pub const IMAGES: u8 = 3;
/// The job is restored and stopped (destination to source): [`Verdict`].
pub const RUNNING: u8 = 4;
/// The source's copy is gone: run (source to destination).
pub const COMMITTED: u8 = 5;

/// A job link: the first frame, from the node running the job to its home: [`Attach`].
pub const ATTACH: u8 = 10;
/// Job output (to home).
pub const STDOUT: u8 = 11;
/// Job error output (to home).
pub const STDERR: u8 = 12;
/// Job input (from home).
pub const STDIN: u8 = 13;
/// End of the job's input (from home).
pub const STDIN_EOF: u8 = 14;
/// A signal for the job (from home): JSON signal number.
pub const SIGNAL: u8 = 15;
/// The job ended (to home): JSON exit code.
pub const EXIT: u8 = 16;
/// Move the job (from home): JSON destination node.
pub const MIGRATE: u8 = 17;
/// The job moved; this link ends (to home): [`Moved`].
pub const MOVED: u8 = 18;
/// A move failed; the job runs on (to home): JSON reason.
pub const MOVE_FAILED: u8 = 19;
/// Kill the job (from home): its deputy is gone.
pub const KILL: u8 = 20;
/// Output up to this sequence number is written out at home (from home): u64 little-endian. Output frames
/// (`STDOUT`, `STDERR`) start with their own sequence number, so a node that links again after losing its
/// link sends what was not acknowledged, and home skips what it already wrote.
pub const ACK: u8 = 21;

/// What the source says about the job it offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The job's home node and home PID: its identity in the cluster.
    pub home_node: u32,
    pub home_pid: i32,
    /// Its owner: the restored job must run as this user and no other.
    pub uid: u32,
    pub gid: u32,
    /// The owner's supplementary groups, which the restored job must have, no more and no fewer.
    pub groups: Vec<u32>,
    /// For logs and records.
    pub command: Vec<String>,
    /// Bytes of images that will follow.
    pub image_bytes: u64,
    /// The job link generation this move starts (one more per move).
    pub epoch: u32,
}

/// An answer: yes, or no and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub ok: bool,
    /// On refusal: a `Refusal` name and the reason.
    pub refusal: Option<rmosix_common::control::Refusal>,
    pub message: String,
    /// With `RUNNING`: the job's host PID on the destination.
    pub pid: i32,
}

impl Verdict {
    /// Yes.
    pub fn yes(pid: i32) -> Self {
        Self { ok: true, refusal: None, message: String::new(), pid }
    }

    /// No, because.
    pub fn no(refusal: rmosix_common::control::Refusal, message: impl Into<String>) -> Self {
        Self { ok: false, refusal: Some(refusal), message: message.into(), pid: 0 }
    }
}

/// The first frame of a job link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub home_pid: i32,
    /// Host PID of the job's init on the attaching node.
    pub pid: i32,
    /// Generation of the link: home takes the output of link N+1 only after link N has ended.
    pub epoch: u32,
}

/// The end of a job link by migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    pub to: u32,
    pub seconds: f64,
    /// Seconds the job was stopped: from the start of the dump until the destination could run it.
    pub frozen: f64,
}
