//! The messages migds exchange over an authenticated [`crate::channel`].
//!
//! Four kinds of connection, told apart by their first frame:
//!
//! A **migration** (`OFFER`): the node the job runs on (the source) offers it to the destination, which
//! accepts or refuses; the source sends the images (`IMAGES`, then the raw image stream); the destination
//! keeps them and answers `RECEIVED`; the source has the move recorded at the job's home (a record
//! question, below), kills its frozen copy and sends `COMMITTED`; the destination restores the job stopped,
//! links it home, lets it run and answers `RESTORED` (or `FAILED`, and the source restores its own images).
//! Either end sends `KEEPALIVE` while it works on a long step, so silence means the other end is gone.
//!
//! A **record question** (`RECORD_ASK`): any node involved in a move asks the job's home node where the job
//! is (node and generation), or asks it to change that record from one place to another. The home record is
//! where a move commits; see `daemon::ownership`.
//!
//! A **jobs question** (`JOBS_ASK`): what runs on the node asked (`mosctl jobs`); the answer is `JOBS`.
//!
//! A **job link** (`ATTACH`): the node a job runs on, when that is not its home, connects to the home node;
//! home answers `ATTACHED` only if its record names that node and generation, else `REFUSED`. The job's
//! output and exit status flow home, its input, signals and move orders flow out; both ends send
//! `KEEPALIVE` so that a node that goes silent is noticed.

use serde::{Deserialize, Serialize};

/// Offer of a job (source to destination).
pub const OFFER: u8 = 1;
/// Verdict on an offer (destination to source): [`Verdict`].
pub const VERDICT: u8 = 2;
/// The image stream follows (source to destination).
pub const IMAGES: u8 = 3;
/// The job runs at the destination, linked home (destination to source): [`Verdict`]; the source may drop
/// its images.
pub const RESTORED: u8 = 4;
/// Home recorded the move and the source's copy is gone: restore and run (source to destination): [`Go`].
pub const COMMITTED: u8 = 5;
/// The images arrived whole (destination to source): [`Verdict`].
pub const RECEIVED: u8 = 6;
/// The restore failed; the source takes the job back from its images (destination to source): [`Verdict`].
pub const FAILED: u8 = 7;
/// Nothing to say, but still here (either way, on every kind of connection).
pub const KEEPALIVE: u8 = 8;

/// A record question, the first frame of its connection: [`Ask`].
pub const RECORD_ASK: u8 = 30;
/// Home's answer: [`RecordState`].
pub const RECORD_STATE: u8 = 31;

/// What jobs run on the node asked, the first frame of its connection (no payload).
pub const JOBS_ASK: u8 = 32;
/// The answer: `rmosix_common::control::NodeJobs`.
pub const JOBS: u8 = 33;

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
/// Move the job (from home): JSON destination node, or [`BALANCE`].
pub const MIGRATE: u8 = 17;
/// The destination of a `MIGRATE` that leaves the choice to the node the job runs on (`migrate PID
/// balance`): where it would run best, if anywhere better than there. No node has this id.
pub const BALANCE: u32 = 0;
/// The job moved; this link ends (to home): [`Moved`].
pub const MOVED: u8 = 18;
/// A move failed; the job runs on (to home): JSON reason.
pub const MOVE_FAILED: u8 = 19;
/// Kill the job (from home): its deputy is gone.
pub const KILL: u8 = 20;
/// Home takes the link (from home): the job may run.
pub const ATTACHED: u8 = 22;
/// Home refuses the link (from home): its record names another node or generation; JSON reason.
pub const REFUSED: u8 = 23;
/// Pin the job where it runs, or unpin it (from home, `mosctl pin`/`unpin`): JSON bool.
pub const PIN: u8 = 24;
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
    /// Its hint, start time and moves so far, this one included.
    #[serde(default)]
    pub facts: rmosix_common::control::JobFacts,
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attach {
    pub home_pid: i32,
    /// Host PID of the job's init on the attaching node.
    pub pid: i32,
    /// Generation of the link: home takes the output of link N+1 only after link N has ended.
    pub epoch: u32,
    /// On the first link of a generation that arrived by a move: seconds the job was stopped by it.
    #[serde(default)]
    pub frozen: Option<f64>,
    /// Which numbering of output frames the link continues: a node links again with the same stream after
    /// home restarted (home skips frames it already wrote), and with a new one after its own migd restarted
    /// (whose numbering starts again).
    #[serde(default)]
    pub stream: u64,
}

/// Go ahead (source to destination, with `COMMITTED`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Go {
    /// Seconds since the source froze the job, so the destination can tell home the whole freeze.
    pub frozen_so_far: f64,
}

/// A change of a job's home record: from where it is to where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Where the record must say the job is now, for the change to be made.
    pub from_node: u32,
    pub from_epoch: u32,
    /// Where it goes: always the next generation.
    pub to_node: u32,
}

/// A record question to the job's home node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    pub home_pid: i32,
    /// `None`: only tell where the job is.
    pub change: Option<Change>,
    /// From the node the record names: the job cannot be run anywhere any more (both its restores failed);
    /// home tells its deputy.
    #[serde(default)]
    pub lost: Option<String>,
}

/// Where the home record says a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordState {
    /// The job has ended (or home has no such job): nobody may run it.
    pub ended: bool,
    pub node: u32,
    pub epoch: u32,
    /// The job's node at that generation has linked home and runs it.
    pub attached: bool,
    /// The change asked for was made (or had been made already).
    pub changed: bool,
}

/// The end of a job link by migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    pub to: u32,
    pub seconds: f64,
    /// Seconds the job was stopped: from the start of the dump until the destination could run it.
    pub frozen: f64,
}
