//! `cargo xtask faults`: what a move survives. Each trial moves a job with known output on a fresh local
//! 3-node cluster, and at a phase of the move chosen at random one fault strikes; then the fault heals,
//! and the trial checks what a user would: the job ran to its end exactly once, its output at the deputy is
//! that of an unmoved run and its exit status 0, and nothing of it is left anywhere (no process, stopped or
//! not, no image directory, no job cgroup, no namespace).
//!
//! The faults: `kill -9` of the source's migd, of the destination's, or of the home node's when home is a
//! third node (healed by starting migd again: the job's processes outlive migd); the path between source
//! and destination cut by dropping its packets in one of the two nodes' namespaces (no FIN, no RST; see
//! `rmosix_testcluster::netfault`); the destination's image store full (its tmpfs shrunk to what it holds
//! and the rest filled); and CRIU's restore failing for real, because the destination node's memory
//! cgroup limit leaves room for the images but only half of the job. Each node gets a store of its own
//! for this (on the test cluster they otherwise share one), and the nodes' `silence_secs` is shortened so
//! that what the daemons give up on, they give up on within a trial.
//!
//! Phases are read from the migd logs of the three nodes: every step of a move logs `phase=...` inside a
//! `migration{migration_id=<home>.<pid>-<generation> role=...}` span. The harness starts the nodes' migd
//! with `RMOSIX_PHASE_DELAY=<phase>:<ms>`, which makes a migd pause as it enters that phase (and say so),
//! so a strike lands inside even a phase that lasts a millisecond; a migd that does not know the variable
//! is struck as soon as its log shows the phase. The phase a fault really hit is worked out afterwards from
//! the log's timestamps, and that is what the trial counts under, whatever was aimed at.
//!
//! Every choice comes from one seed (printed), each trial's from the seed and its number, so a failing
//! trial is replayed with `--seed S --trial N` (and the same `--fault`/`--phase`). A full run writes its
//! table into RELIABILITY.md under "Faults during a move"; the run exits non-zero when any trial lost or
//! doubled the job or left something behind, or the harness itself could not do what it set out to do.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, ValueEnum};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom as _;
use rand::{RngExt as _, SeedableRng as _};
use rmosix_common::cgroup::{Cgroup, Controller, JOB_PREFIX};
use rmosix_testcluster::user::{TestUser, test_user};
use rmosix_testcluster::{Cluster, Spec};

/// The trial clusters' name (one at a time, made afresh for every trial).
const CLUSTER: &str = "faults";
/// Home, source and destination: a third node is needed for a home that is neither.
const NODES: u32 = 3;
const PYTHON: &str = "/usr/bin/python3";
/// The job: fills `mib` MiB with a pattern that differs per MiB, then prints `lines` numbered lines, one
/// per `gap` seconds, each with the MD5 of a different MiB of it. Its output depends only on its arguments,
/// and a copy whose memory was damaged on the way prints something else.
const JOB: &str = r#"
import hashlib, sys, time
mib, lines, gap = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
blob = bytearray(mib << 20)
for k in range(mib):
    blob[k << 20:(k + 1) << 20] = hashlib.sha256(b"%d" % k).digest() * 32768
for i in range(lines):
    at = (i * 7919 % mib) << 20
    print(i, hashlib.md5(blob[at:at + (1 << 20)]).hexdigest(), flush=True)
    time.sleep(gap)
"#;
/// Lines the job prints, and the seconds between them: long enough to outlive a move and a fault.
const LINES: u32 = 80;
const GAP_SECS: f64 = 0.2;
/// migd's variable for pausing at the start of a phase, and how long the pause lasts.
const DELAY_ENV: &str = "RMOSIX_PHASE_DELAY";
const PAUSE_MS: u64 = 1500;
/// A strike triggered by a phase's log line without a pause comes up to this much later.
const PLAIN_OFFSET_MS: u64 = 300;
/// The file that fills a node's image store.
const FILLER: &str = "faults-filler";
/// The heading of this harness's section of RELIABILITY.md.
const HEADING: &str = "## Faults during a move";
/// How often the logs and the deputy's output are looked at while waiting to strike.
const POLL: Duration = Duration::from_millis(2);
/// How often the job's copies are counted.
const SAMPLE: Duration = Duration::from_millis(50);

/// Options of `cargo xtask faults`.
#[derive(Debug, Clone, Args)]
pub struct FaultsArgs {
    /// Trials to run, each on a fresh cluster (default: one of every fault at every phase it applies to,
    /// in random order, and at least 30).
    #[arg(long)]
    pub trials: Option<u32>,
    /// Seed of every random choice (default: from the clock); printed, so that a run can be replayed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only this fault.
    #[arg(long, value_enum)]
    pub fault: Option<Fault>,
    /// Only this phase.
    #[arg(long, value_enum)]
    pub phase: Option<Phase>,
    /// Run only trial N of the run (numbered from 1) to replay it: give the run's --seed, --fault and --phase.
    #[arg(long)]
    pub trial: Option<u32>,
    /// Resident memory of the job, MiB: the bigger, the longer its dump, transfer and restore.
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// How long a fault lasts before it heals, seconds.
    #[arg(long, default_value_t = 3)]
    pub fault_secs: u64,
    /// The nodes' `[migd] silence_secs` during the trials.
    #[arg(long, default_value_t = 10)]
    pub silence_secs: u32,
    /// Do not write RELIABILITY.md (it is written only by full runs: every fault and phase, 30 trials or more).
    #[arg(long)]
    pub no_write: bool,
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Fault {
    /// `kill -9` of the source node's migd; started again when the fault heals.
    KillSource,
    /// `kill -9` of the destination node's migd; started again when the fault heals.
    KillDestination,
    /// `kill -9` of the home node's migd, home being neither source nor destination.
    KillHome,
    /// The path between source and destination drops every packet (in one of their namespaces).
    CutLink,
    /// The destination's image store has no room left.
    StoreFull,
    /// CRIU's restore on the destination fails: its node's memory limit leaves room for half the job.
    RestoreFails,
}

impl Fault {
    const ALL: [Fault; 6] =
        [Fault::KillSource, Fault::KillDestination, Fault::KillHome, Fault::CutLink, Fault::StoreFull, Fault::RestoreFails];

    fn name(self) -> &'static str {
        match self {
            Fault::KillSource => "kill-source",
            Fault::KillDestination => "kill-destination",
            Fault::KillHome => "kill-home",
            Fault::CutLink => "cut-link",
            Fault::StoreFull => "store-full",
            Fault::RestoreFails => "restore-fails",
        }
    }

    /// The phases at which the fault can change anything: a store filled once the images are in, or a
    /// memory limit lowered once the job was restored (which would be an OOM of a running job, another
    /// fault), would test nothing.
    fn phases(self) -> &'static [Phase] {
        match self {
            Fault::StoreFull => &[Phase::Dump, Phase::Offer, Phase::Transfer],
            Fault::RestoreFails => &[Phase::Dump, Phase::Offer, Phase::Transfer, Phase::Commit, Phase::Restore],
            _ => &Phase::TARGETS,
        }
    }

    /// How the harness makes and heals it, for RELIABILITY.md.
    fn how(self) -> &'static str {
        match self {
            Fault::KillSource => "SIGKILL to the source node's migd; healed by starting it again",
            Fault::KillDestination => "SIGKILL to the destination node's migd; healed by starting it again",
            Fault::KillHome => "SIGKILL to the home node's migd (home is a third node); healed by starting it again",
            Fault::CutLink => {
                "every packet between source and destination dropped by nftables in one of the two nodes' network \
                 namespaces (no FIN, no RST; both still reach home); healed by removing the rules"
            }
            Fault::StoreFull => {
                "the destination's image store (a tmpfs of its own) shrunk to what it holds and the rest filled with a \
                 file; healed by removing the file and giving the tmpfs its size back"
            }
            Fault::RestoreFails => {
                "the destination node's memory cgroup limit set to its unreclaimable use plus room for the images plus \
                 half the job: the transfer fits, the restore runs out of memory and the kernel's OOM killer ends the \
                 process CRIU is restoring; healed by setting the limit back"
            }
        }
    }
}

/// A step of a move, as migd names it in its log, plus the first output the job gives after the move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Phase {
    /// Before any step of the move (a strike that came too early).
    #[value(skip)]
    Before,
    Dump,
    Offer,
    Transfer,
    Commit,
    Restore,
    Resume,
    /// The move is over (a strike aimed at an earlier phase that came too late).
    #[value(skip)]
    Done,
    /// The first line of output the job gives at its destination.
    FirstOutput,
    /// The move failed and was being undone.
    #[value(skip)]
    Aborted,
}

impl Phase {
    /// The phases a fault can be aimed at.
    const TARGETS: [Phase; 7] =
        [Phase::Dump, Phase::Offer, Phase::Transfer, Phase::Commit, Phase::Restore, Phase::Resume, Phase::FirstOutput];

    fn name(self) -> &'static str {
        match self {
            Phase::Before => "before the move",
            Phase::Dump => "dump",
            Phase::Offer => "offer",
            Phase::Transfer => "transfer",
            Phase::Commit => "commit",
            Phase::Restore => "restore",
            Phase::Resume => "resume",
            Phase::Done => "done",
            Phase::FirstOutput => "first output",
            Phase::Aborted => "aborted",
        }
    }

    /// The phase a migd log calls `name`.
    fn from_log(name: &str) -> Option<Phase> {
        Some(match name {
            "dump" => Phase::Dump,
            "offer" => Phase::Offer,
            "transfer" => Phase::Transfer,
            "commit" => Phase::Commit,
            "restore" => Phase::Restore,
            "resume" => Phase::Resume,
            "done" => Phase::Done,
            "aborted" => Phase::Aborted,
            _ => return None,
        })
    }

    /// The name migd's log and `RMOSIX_PHASE_DELAY` use, for the phases migd logs.
    fn log_name(self) -> Option<&'static str> {
        match self {
            Phase::Before | Phase::FirstOutput => None,
            other => Some(other.name()),
        }
    }
}

/// Which node plays which part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    home: u32,
    source: u32,
    dest: u32,
}

/// One trial, decided before it starts.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Numbered from 1.
    number: u32,
    fault: Fault,
    phase: Phase,
    layout: Layout,
    /// For a cut link: the node whose namespace drops the packets.
    cut_in: u32,
    /// Where in the window after the trigger the strike lands, from 0 to 1.
    offset: f64,
}

/// The seed of trial `number` of a run seeded `seed`.
fn trial_seed(seed: u64, number: u32) -> u64 {
    seed ^ u64::from(number).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Every (fault, phase) the options allow.
fn cells(args: &FaultsArgs) -> Vec<(Fault, Phase)> {
    Fault::ALL
        .iter()
        .filter(|f| args.fault.is_none_or(|only| only == **f))
        .flat_map(|&f| f.phases().iter().filter(|p| args.phase.is_none_or(|only| only == **p)).map(move |&p| (f, p)))
        .collect()
}

/// The trials of a run: the allowed cells in an order shuffled by the seed, over and over; each trial's
/// layout and timing from its own seed, so that `--trial N` replays trial N alone.
fn plans(args: &FaultsArgs, seed: u64) -> anyhow::Result<Vec<Plan>> {
    let mut order = cells(args);
    ensure!(!order.is_empty(), "fault {:?} does not apply at phase {:?}", args.fault, args.phase);
    order.shuffle(&mut SmallRng::seed_from_u64(seed));
    let count = args.trials.unwrap_or_else(|| u32::try_from(order.len()).unwrap_or(u32::MAX).max(30));
    let numbers: Vec<u32> = match args.trial {
        Some(n) => {
            ensure!(n >= 1, "trials are numbered from 1");
            vec![n]
        }
        None => (1..=count).collect(),
    };
    Ok(numbers
        .into_iter()
        .map(|number| {
            let (fault, phase) = order[(number as usize - 1) % order.len()];
            let mut rng = SmallRng::seed_from_u64(trial_seed(seed, number));
            let mut nodes: Vec<u32> = (1..=NODES).collect();
            nodes.shuffle(&mut rng);
            let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
            // Home is the source, a third node, or the destination (the job comes home); for a kill of
            // home's migd, always a third node.
            let kind = if fault == Fault::KillHome { 1 } else { rng.random_range(0..3u8) };
            let layout = match kind {
                0 => Layout { home: a, source: a, dest: b },
                1 => Layout { home: a, source: b, dest: c },
                _ => Layout { home: a, source: b, dest: a },
            };
            let cut_in = if rng.random_bool(0.5) { layout.source } else { layout.dest };
            Plan { number, fault, phase, layout, cut_in, offset: rng.random_range(0.0..1.0) }
        })
        .collect())
}

/// Runs `cargo xtask faults`: setup, build, the trials.
pub fn run(args: &FaultsArgs) -> anyhow::Result<()> {
    crate::setup::run()?;
    crate::build()?;
    run_trials(args)
}

/// What every trial shares.
struct Run<'a> {
    args: &'a FaultsArgs,
    bins: PathBuf,
    user: TestUser,
    /// The job's output when it is not moved.
    reference: Vec<String>,
}

/// The trials, with binaries built; prints a line per trial and a table, and writes RELIABILITY.md after
/// a full run.
pub fn run_trials(args: &FaultsArgs) -> anyhow::Result<()> {
    ensure!(args.mem_mib >= 16, "--mem-mib must be at least 16");
    ensure!(args.silence_secs >= 2, "--silence-secs must be at least 2");
    let seed = args.seed.unwrap_or_else(clock_seed);
    let plans = plans(args, seed)?;
    let user = test_user().context("the trials run their jobs as the test user")?;
    // The binaries as they are now (hard links), whatever others build in this checkout during the run:
    // a job whose rmosix-init was replaced on disk could not be dumped any more.
    let bins = rmosix_testcluster::bin_dir_of_current_test();
    println!(
        "faults: seed {seed}, {} trial(s), job of {} MiB printing {LINES} lines, faults lasting {} s, silence {} s",
        plans.len(),
        args.mem_mib,
        args.fault_secs,
        args.silence_secs
    );
    let reference = reference_output(args, &bins, &user)?;
    let run = Run { args, bins, user, reference };
    let mut outcomes = Vec::new();
    for plan in &plans {
        let outcome = trial(&run, plan);
        println!("{}", outcome.line(seed));
        for detail in outcome.details() {
            println!("    {detail}");
        }
        outcomes.push(outcome);
    }
    let summary = Summary::of(&outcomes);
    println!("\n{}", summary.table());
    let full = args.trial.is_none()
        && args.fault.is_none()
        && args.phase.is_none()
        && outcomes.len() >= 30;
    if !args.no_write && full {
        write_reliability(&section(args, seed, &summary))?;
    } else if !args.no_write {
        println!("RELIABILITY.md not written: only a run of every fault and phase, of 30 trials or more, writes it");
    }
    println!("{}", summary.last_line(seed));
    // SAFETY: as where it was set; the trials are over.
    unsafe { std::env::remove_var(DELAY_ENV) };
    ensure!(summary.failed == 0, "{} of {} trials failed (seed {seed})", summary.failed, outcomes.len());
    Ok(())
}

fn clock_seed() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (now.as_secs() << 20) ^ u64::from(now.subsec_nanos()) ^ u64::from(std::process::id())
}

impl FaultsArgs {
    /// What `cargo xtask test` runs: `trials` trials with a fresh seed, without writing RELIABILITY.md.
    pub fn for_test(trials: u32) -> Self {
        Self {
            trials: Some(trials),
            seed: None,
            fault: None,
            phase: None,
            trial: None,
            mem_mib: 256,
            fault_secs: 3,
            silence_secs: 10,
            no_write: true,
        }
    }
}

// ---- the cluster of a trial ----------------------------------------------------------------------------

/// A trial's cluster with its faults undone and its stores unmounted when dropped (before the cluster
/// removes its state directory, which holds them).
struct Site {
    cluster: Cluster,
    mem_limit: u64,
}

impl Site {
    /// A fresh cluster whose migds pause at `pause` (if any), each with an image store of its own and the
    /// given silence limit.
    fn up(run: &Run, pause: Option<Phase>) -> anyhow::Result<Self> {
        let delay = pause.and_then(Phase::log_name).map(|name| format!("{name}:{PAUSE_MS}"));
        // SAFETY: the harness's other threads (readers of the previous trial's pipes, finished or blocked
        // in read) never touch the environment; migd reads it at start, which is why it is set here.
        unsafe {
            match &delay {
                Some(value) => std::env::set_var(DELAY_ENV, value),
                None => std::env::remove_var(DELAY_ENV),
            }
        }
        unmount_stores(CLUSTER)?;
        let spec = Spec::new(CLUSTER, NODES, run.bins.clone());
        let mem_limit = spec.mem_limit;
        let cluster = Cluster::up(spec)?;
        let site = Self { cluster, mem_limit };
        for i in site.cluster.node_ids() {
            let path = site.cluster.config(i);
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let store = format!("\"{}\"", site.store(i).display());
            let text = set_key(&text, "checkpoint", "image_store", &store);
            let text = set_key(&text, "migd", "silence_secs", &run.args.silence_secs.to_string());
            std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            rmosix_common::config::Config::load(Some(&path)).with_context(|| format!("{} is not valid", path.display()))?;
            site.cluster.kill_daemon(i, "migd")?;
            site.cluster.start_migd(i)?;
        }
        Ok(site)
    }

    fn store(&self, i: u32) -> PathBuf {
        self.cluster.node_dir(i).join("images")
    }

    fn log(&self, i: u32) -> PathBuf {
        self.cluster.node_dir(i).join("migd.log")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.cluster.heal_all();
        for i in self.cluster.node_ids() {
            let _ = self.cluster.cgroup(i).set_memory_limit(Some(self.mem_limit));
        }
        if let Err(e) = unmount_stores(CLUSTER) {
            eprintln!("faults: {e:#}");
        }
    }
}

/// Unmounts the image stores of cluster `name`'s nodes (left by this run or a crashed one).
fn unmount_stores(name: &str) -> anyhow::Result<()> {
    let under = Path::new(rmosix_testcluster::STATE_ROOT).join(name);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    for mount in rmosix_common::mountinfo::parse(&mounts) {
        let point = Path::new(&mount.point);
        if point.starts_with(&under) {
            nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("cannot unmount {}", point.display()))?;
        }
    }
    Ok(())
}

/// `text` (a TOML configuration) with `key = value` in `[section]`, replacing the key if it is there and
/// adding the section if it is not.
fn set_key(text: &str, section: &str, key: &str, value: &str) -> String {
    let header = format!("[{section}]");
    let mut out = String::new();
    let mut inside = false;
    let mut found = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            inside = trimmed == header;
        }
        if inside && trimmed.split('=').next().is_some_and(|k| k.trim() == key) && trimmed.contains('=') {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if trimmed == header {
            found = true;
            let _ = writeln!(out, "{key} = {value}");
        }
    }
    if !found {
        let _ = write!(out, "\n{header}\n{key} = {value}\n");
    }
    out
}

// ---- processes of a trial ----------------------------------------------------------------------------

/// A tool run by the harness (`mosrun`, `migrate`) with its output collected as it comes, and killed if it
/// is still running when dropped.
struct Tool {
    child: Child,
    /// Each line of stdout with when it arrived.
    lines: Arc<Mutex<Vec<(SystemTime, String)>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<std::process::ExitStatus>,
}

impl Tool {
    fn spawn(mut cmd: std::process::Command, what: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let sink = Arc::clone(&lines);
        let stdout_reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push((SystemTime::now(), line));
            }
        });
        let sink = Arc::clone(&stderr);
        let stderr_reader = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(err);
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut chunk) {
                sink.lock().expect("stderr").push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        Ok(Self { child, lines, stderr, readers: vec![stdout_reader, stderr_reader], status: None })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has ended (and then its status is known).
    fn ended(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_some()
    }

    fn kill(&mut self) {
        if !self.ended() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    fn output(&self) -> Vec<String> {
        self.lines.lock().expect("lines").iter().map(|(_, l)| l.clone()).collect()
    }

    fn arrivals(&self) -> Vec<SystemTime> {
        self.lines.lock().expect("lines").iter().map(|(t, _)| *t).collect()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").trim().to_owned()
    }

    /// Waits until whatever holds its output's pipes (the tool and migd) has closed them, for up to
    /// `limit`: what the tool printed last may still be on its way when it has exited.
    fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(SAMPLE);
        }
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The job's arguments after `mosrun` options.
fn job_args(mem_mib: u64) -> Vec<String> {
    [PYTHON, "-c", JOB].into_iter().map(str::to_owned).chain([mem_mib.to_string(), LINES.to_string(), GAP_SECS.to_string()]).collect()
}

/// The job's output when it stays where it started, on a cluster of its own.
fn reference_output(args: &FaultsArgs, bins: &Path, user: &TestUser) -> anyhow::Result<Vec<String>> {
    unmount_stores(CLUSTER)?;
    let cluster = Cluster::up(Spec::new(CLUSTER, 1, bins.to_owned()))?;
    let out = cluster
        .command_as(1, user, "mosrun")?
        .arg("-h")
        .args(job_args(args.mem_mib))
        .stdin(Stdio::null())
        .output()
        .context("cannot run the unmoved job")?;
    ensure!(
        out.status.success(),
        "the unmoved job failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    ensure!(lines.len() == LINES as usize, "the unmoved job printed {} lines, not {LINES}", lines.len());
    Ok(lines)
}

// ---- migd logs -------------------------------------------------------------------------------------------

/// One line of a migd log that concerns the trial's job.
#[derive(Debug, Clone)]
struct LogLine {
    node: u32,
    time: SystemTime,
    phase: Option<Phase>,
    /// A pause at the start of the phase (`RMOSIX_PHASE_DELAY`).
    pausing: bool,
    warning: bool,
    text: String,
}

/// A migd log read line by line as it grows.
struct LogTail {
    node: u32,
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogTail {
    /// The complete lines written since the last call.
    fn new_lines(&mut self) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return Vec::new() };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else { return Vec::new() };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.lines().map(str::to_owned).collect()
    }
}

/// `text` without terminal colour sequences (migd's log is written with them).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `name=` in a log line (a field of the event or of its span), unquoted.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    let mut from = 0;
    while let Some(at) = line[from..].find(&key) {
        let start = from + at;
        let boundary = start == 0 || line[..start].ends_with([' ', '{', ',']);
        if boundary {
            let value = &line[start + key.len()..];
            let end = value.find([' ', '}', ',']).unwrap_or(value.len());
            return Some(value[..end].trim_matches('"'));
        }
        from = start + key.len();
    }
    None
}

/// A UTC timestamp as tracing writes it (`2026-12-01T02:08:44.478792Z`).
fn parse_utc(stamp: &str) -> Option<SystemTime> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(str::parse::<i64>);
    let (year, month, day) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.splitn(3, ':').map(str::parse::<u64>);
    let (hours, minutes, seconds) = (parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?);
    let digits: String = frac.chars().take(9).collect();
    let nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - u32::try_from(digits.len()).ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = u64::try_from(era * 146_097 + day_of_era - 719_468).ok()?;
    let secs = days * 86_400 + hours * 3600 + minutes * 60 + seconds;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

/// The generation a move's `migration_id` names, if it is a move of the job whose deputy is `home_pid` on
/// node `home`.
fn generation(text: &str, home: u32, home_pid: u32) -> Option<u32> {
    field(text, "migration_id")?.strip_prefix(&format!("{home}.{home_pid}-"))?.parse().ok()
}

/// The log line, if it concerns the job whose deputy is `home_pid` on node `home`: a move to generation
/// `first` or later, or the job named by its home PID.
fn parse_log_line(node: u32, raw: &str, home: u32, home_pid: u32, first: u32) -> Option<LogLine> {
    let text = strip_ansi(raw);
    let ours = match generation(&text, home, home_pid) {
        Some(g) => g >= first,
        None => field(&text, "migration_id").is_none() && field(&text, "home_pid").is_some_and(|p| p == home_pid.to_string()),
    };
    if !ours {
        return None;
    }
    let time = parse_utc(text.split_whitespace().next()?)?;
    Some(LogLine {
        node,
        time,
        phase: field(&text, "phase").and_then(Phase::from_log),
        pausing: text.contains(DELAY_ENV),
        warning: text.split_whitespace().nth(1).is_some_and(|level| level == "WARN" || level == "ERROR"),
        text,
    })
}

// ---- watching a trial ----------------------------------------------------------------------------------

/// Everything seen of the job while a trial runs: its log lines and its copies.
struct Watch {
    logs: Vec<LogTail>,
    home: u32,
    home_pid: u32,
    /// The generation the move watched brings the job to: earlier moves are not this trial's.
    first: u32,
    lines: Vec<LogLine>,
    last_sample: Option<Instant>,
    /// Copies found running at the last sample, when there was more than one.
    suspects: Vec<(u32, i32)>,
    doubled: Option<String>,
}

impl Watch {
    /// Watches the next move of the job from now on.
    fn new(site: &Site, home: u32, home_pid: u32) -> Self {
        let mut logs: Vec<LogTail> = site.cluster.node_ids().map(|i| LogTail { node: i, path: site.log(i), offset: 0, partial: String::new() }).collect();
        // The moves so far (the one that started the job on its source, if any) are all logged by now: it
        // runs there.
        let mut first = 1;
        for log in &mut logs {
            for raw in log.new_lines() {
                if let Some(g) = generation(&strip_ansi(&raw), home, home_pid) {
                    first = first.max(g + 1);
                }
            }
        }
        Self { logs, home, home_pid, first, lines: Vec::new(), last_sample: None, suspects: Vec::new(), doubled: None }
    }

    /// Reads what the logs say now, and counts the job's copies if it is time to.
    fn poll(&mut self, site: &Site) {
        for log in &mut self.logs {
            for raw in log.new_lines() {
                if let Some(line) = parse_log_line(log.node, &raw, self.home, self.home_pid, self.first) {
                    self.lines.push(line);
                }
            }
        }
        if self.last_sample.is_none_or(|t| t.elapsed() >= SAMPLE) {
            self.last_sample = Some(Instant::now());
            self.count_copies(site);
        }
    }

    /// Two copies running at once, seen at two samples in a row (so a process CRIU is still restoring, which
    /// has the job's name for a moment before it stops, does not count), is a doubled job.
    fn count_copies(&mut self, site: &Site) {
        let running: Vec<(u32, i32)> = copies(&site.cluster).into_iter().filter(|c| c.2 != 'T' && c.2 != 't').map(|c| (c.0, c.1)).collect();
        if running.len() > 1 {
            if self.doubled.is_none() && running.iter().filter(|c| self.suspects.contains(c)).count() > 1 {
                let list: Vec<String> = running.iter().map(|(n, p)| format!("pid {p} on node {n}")).collect();
                self.doubled = Some(format!("{} copies ran at once: {}", running.len(), list.join(", ")));
            }
            self.suspects = running;
        } else {
            self.suspects.clear();
        }
    }

    /// When the first line of phase `phase` was logged, and whether it was a pause.
    fn seen(&self, phase: Phase) -> Option<(SystemTime, bool)> {
        self.lines.iter().find(|l| l.phase == Some(phase)).map(|l| (l.time, l.pausing))
    }

    /// The phase the move was in at `when`: the last phase logged before it, or the job's first output
    /// after the move, whichever came last.
    fn phase_at(&self, when: SystemTime, output: &[SystemTime]) -> Phase {
        let mut marks: Vec<(SystemTime, Phase)> = self.lines.iter().filter_map(|l| Some((l.time, l.phase?))).collect();
        if let Some(first) = first_output_after_move(&self.lines, output) {
            marks.push((first, Phase::FirstOutput));
        }
        marks.sort_by_key(|m| m.0);
        marks.into_iter().rfind(|m| m.0 <= when).map_or(Phase::Before, |m| m.1)
    }
}

/// When the job's first output line after the move arrived: the first after the first `done` logged.
fn first_output_after_move(lines: &[LogLine], output: &[SystemTime]) -> Option<SystemTime> {
    let done = lines.iter().filter(|l| l.phase == Some(Phase::Done)).map(|l| l.time).min()?;
    output.iter().copied().find(|t| *t > done)
}

/// The job's copies on every node: node, pid, state.
fn copies(cluster: &Cluster) -> Vec<(u32, i32, char)> {
    cluster
        .node_ids()
        .flat_map(|i| cluster.processes(i, "python3").into_iter().map(move |p| (i, p)))
        .filter_map(|(i, p)| Some((i, p, process_state(p)?)))
        .collect()
}

/// The state letter of a process (`R`, `S`, `T`, ...).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

// ---- faults --------------------------------------------------------------------------------------------

/// What a strike needs to know that is measured before the move.
#[derive(Debug, Clone, Copy)]
struct Before {
    /// The destination's memory use that cannot be reclaimed, bytes.
    dest_base: u64,
    /// The job's resident memory, bytes.
    job_rss: u64,
}

/// Makes the fault happen.
fn strike(site: &Site, plan: &Plan, before: Before) -> anyhow::Result<String> {
    let Layout { home, source, dest } = plan.layout;
    let c = &site.cluster;
    Ok(match plan.fault {
        Fault::KillSource => {
            c.kill_daemon(source, "migd")?;
            format!("killed migd of node {source}")
        }
        Fault::KillDestination => {
            c.kill_daemon(dest, "migd")?;
            format!("killed migd of node {dest}")
        }
        Fault::KillHome => {
            c.kill_daemon(home, "migd")?;
            format!("killed migd of node {home}")
        }
        Fault::CutLink => {
            let other = if plan.cut_in == source { dest } else { source };
            c.cut(plan.cut_in, other)?;
            format!("cut the path {source}-{dest} in node {}'s namespace", plan.cut_in)
        }
        Fault::StoreFull => {
            let free = fill_store(&site.store(dest))?;
            format!("filled node {dest}'s image store ({free} bytes were free)")
        }
        Fault::RestoreFails => {
            let limit = starve(&c.cgroup(dest), before)?;
            format!("node {dest}'s memory limit down to {} MiB", limit >> 20)
        }
    })
}

/// Undoes the fault.
fn heal(site: &Site, plan: &Plan) -> anyhow::Result<()> {
    let Layout { home, source, dest } = plan.layout;
    let c = &site.cluster;
    match plan.fault {
        Fault::KillSource => c.start_migd(source),
        Fault::KillDestination => c.start_migd(dest),
        Fault::KillHome => c.start_migd(home),
        Fault::CutLink => c.heal(plan.cut_in),
        Fault::StoreFull => free_store(&site.store(dest)),
        Fault::RestoreFails => Ok(c.cgroup(dest).set_memory_limit(Some(site.mem_limit))?),
    }
}

/// Remounts the tmpfs at `store` with `size` (bytes, or a tmpfs size such as `50%`), keeping its flags.
fn resize_store(store: &Path, size: &str) -> nix::Result<()> {
    use nix::mount::MsFlags;
    nix::mount::mount(
        None::<&str>,
        store,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("size={size}").as_str()),
    )
}

/// Leaves the image store at `store` without room: shrinks its tmpfs to a little more than it holds, then
/// fills the rest. Returns how many bytes were free before the filling.
fn fill_store(store: &Path) -> anyhow::Result<u64> {
    let mut shrunk = false;
    // A store that is being written to grows between the look and the remount: try again.
    for _ in 0..50 {
        let stat = nix::sys::statvfs::statvfs(store).with_context(|| format!("cannot statvfs {}", store.display()))?;
        let used = (stat.blocks() - stat.blocks_free()) * stat.fragment_size();
        if resize_store(store, &(used + (4 << 20)).to_string()).is_ok() {
            shrunk = true;
            break;
        }
    }
    ensure!(shrunk, "cannot shrink the image store {}", store.display());
    let stat = nix::sys::statvfs::statvfs(store)?;
    let free = stat.blocks_available() * stat.fragment_size();
    let mut filler = std::fs::File::create(store.join(FILLER)).with_context(|| format!("cannot fill {}", store.display()))?;
    let chunk = vec![0x5au8; 1 << 20];
    loop {
        match filler.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(free),
            Err(e) => return Err(e).with_context(|| format!("cannot fill {}", store.display())),
        }
    }
}

/// Gives the image store at `store` its room back.
fn free_store(store: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(store.join(FILLER)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot empty {}", store.display())),
    }
    resize_store(store, "50%").with_context(|| format!("cannot give {} its size back", store.display()))
}

/// A node's memory use that the kernel cannot reclaim: all of it but the file cache.
fn unreclaimable(cgroup: &Cgroup) -> anyhow::Result<u64> {
    let usage = cgroup.memory_current()?;
    let dir = cgroup.controller_dir(Controller::Memory).unwrap_or_else(|| cgroup.procs_dir());
    let stat = std::fs::read_to_string(dir.join("memory.stat")).with_context(|| format!("cannot read memory.stat of {cgroup}"))?;
    let get = |key: &str| stat.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok());
    let file = get("total_active_file").or_else(|| get("active_file")).unwrap_or(0)
        + get("total_inactive_file").or_else(|| get("inactive_file")).unwrap_or(0);
    Ok(usage.saturating_sub(file))
}

/// Sets the memory limit of the destination node to what it needs plus the images plus half the job; when
/// the restore has already gone further than that, just above what it uses now (the kernel refuses a limit
/// below the use). Returns the limit.
fn starve(cgroup: &Cgroup, before: Before) -> anyhow::Result<u64> {
    let planned = before.dest_base + before.job_rss + (16 << 20) + before.job_rss / 2;
    if cgroup.set_memory_limit(Some(planned)).is_ok() {
        return Ok(planned);
    }
    let now = cgroup.memory_current()? + (8 << 20);
    cgroup.set_memory_limit(Some(now)).with_context(|| format!("cannot lower the memory limit of {cgroup}"))?;
    Ok(now)
}

/// The resident memory of a process, bytes.
fn rss(pid: i32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))?;
    Ok(kb << 10)
}

// ---- a trial -------------------------------------------------------------------------------------------

/// What the output at the deputy was, against the unmoved run's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Output {
    Identical,
    /// The first `n` lines, then nothing.
    Cut(usize),
    /// Lines in order but with gaps: how many are missing, and the first missing one (0-based).
    Gaps { missing: usize, first: usize },
    /// A line came twice (two copies, or one replayed).
    Repeated(String),
    /// Differs first at this line (0-based): what came, what was expected.
    Differs { at: usize, got: String, expected: String },
}

fn compare(output: &[String], reference: &[String]) -> Output {
    if output == reference {
        return Output::Identical;
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = output.iter().find(|l| !seen.insert(*l)) {
        return Output::Repeated(twice.clone());
    }
    if output.len() < reference.len() && reference.starts_with(output) {
        return Output::Cut(output.len());
    }
    // The unmoved run's lines, some left out?
    let mut next = reference.iter().enumerate();
    let mut missing = Vec::new();
    let in_order = output.iter().all(|line| {
        for (i, expected) in next.by_ref() {
            if expected == line {
                return true;
            }
            missing.push(i);
        }
        false
    });
    if in_order {
        missing.extend(next.map(|(i, _)| i));
        return Output::Gaps { missing: missing.len(), first: missing[0] };
    }
    let at = output.iter().zip(reference).position(|(a, b)| a != b).unwrap_or(output.len().min(reference.len()));
    let line = |lines: &[String]| lines.get(at).cloned().unwrap_or_else(|| "(nothing)".into());
    Output::Differs { at, got: line(output), expected: line(reference) }
}

/// What happened in one trial.
#[derive(Debug)]
struct Outcome {
    plan: Plan,
    /// The phase the strike really came in, if it came.
    hit: Option<Phase>,
    /// What the strike did, or why the harness could not do what the trial needs.
    struck: Result<String, String>,
    /// The deputy's exit code (`None`: killed by a signal, or by the harness after waiting in vain).
    exit: Option<i32>,
    deputy_said: String,
    hung: bool,
    /// How long the deputy was waited for after the heal, seconds.
    waited: u64,
    migrate_said: String,
    output: Option<Output>,
    doubled: Option<String>,
    left: Vec<String>,
    /// Log lines of migd that said something went wrong, for a failing trial.
    warnings: Vec<String>,
    /// Whether the fault did what it is meant to, for the faults whose effect is not sure.
    effect: Option<bool>,
    seconds: f64,
}

impl Outcome {
    fn new(plan: &Plan) -> Self {
        Self {
            plan: *plan,
            hit: None,
            struck: Err("the trial did not get as far as the strike".into()),
            exit: None,
            deputy_said: String::new(),
            hung: false,
            waited: 0,
            migrate_said: String::new(),
            output: None,
            doubled: None,
            left: Vec::new(),
            warnings: Vec::new(),
            effect: None,
            seconds: 0.0,
        }
    }

    /// The trial happened as planned: the fault struck, and everything after could be checked.
    fn valid(&self) -> bool {
        self.struck.is_ok() && self.output.is_some()
    }

    /// The job ran to its end, and never as two copies at once.
    fn exactly_one(&self) -> bool {
        self.valid() && self.doubled.is_none() && self.exit == Some(0) && !matches!(self.output, Some(Output::Repeated(_)))
    }

    fn identical(&self) -> bool {
        self.valid() && self.exit == Some(0) && self.output == Some(Output::Identical)
    }

    fn clean(&self) -> bool {
        self.valid() && self.left.is_empty()
    }

    fn ok(&self) -> bool {
        self.exactly_one() && self.identical() && self.clean()
    }

    /// Why the trial failed, in words.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = &self.struck {
            out.push(format!("harness: {e}"));
            return out;
        }
        if let Some(d) = &self.doubled {
            out.push(format!("doubled: {d}"));
        }
        if self.hung {
            out.push(format!("hung: the deputy had not ended {} s after the fault healed, and was killed", self.waited));
        } else if self.exit != Some(0) {
            out.push(format!("lost: the deputy exited {:?}: {:?}", self.exit, self.deputy_said));
        }
        match &self.output {
            Some(Output::Identical) | None => {}
            Some(Output::Cut(n)) => out.push(format!("output: only the first {n} of {LINES} lines")),
            Some(Output::Repeated(l)) => out.push(format!("output: line {l:?} came twice")),
            Some(Output::Gaps { missing, first }) => {
                out.push(format!("output: {missing} of {LINES} lines missing, the first of them line {}", first + 1));
            }
            Some(Output::Differs { at, got, expected }) => {
                out.push(format!("output: line {} is {got:?}, not {expected:?} as in an unmoved run", at + 1));
            }
        }
        if !self.left.is_empty() {
            out.push(format!("left behind: {}", self.left.join("; ")));
        }
        out
    }

    fn line(&self, seed: u64) -> String {
        let p = &self.plan;
        let Layout { home, source, dest } = p.layout;
        let hit = self.hit.map_or_else(|| "-".to_owned(), |h| h.name().to_owned());
        let mut verdict = if self.ok() { "ok".to_owned() } else { format!("FAILED ({})", self.problems().join("; ")) };
        match (self.plan.fault, self.effect) {
            (Fault::StoreFull, Some(true)) => verdict.push_str(" [the transfer failed, as meant]"),
            (Fault::StoreFull, Some(false)) => verdict.push_str(" [no failed transfer logged]"),
            (_, Some(true)) => verdict.push_str(" [the restore failed, as meant]"),
            (_, Some(false)) => verdict.push_str(" [no failed restore logged]"),
            (_, None) => {}
        }
        format!(
            "trial {} (seed {seed}): {} aimed at {}, hit {hit}; home {home}, job {source} -> {dest}; {:.0} s: {verdict}",
            p.number,
            p.fault.name(),
            p.phase.name(),
            self.seconds
        )
    }

    /// More about a trial that failed: what the strike did, what migrate said, migd's warnings.
    fn details(&self) -> Vec<String> {
        if self.ok() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Ok(what) = &self.struck {
            out.push(format!("strike: {what}"));
        }
        if !self.migrate_said.is_empty() {
            out.push(format!("migrate: {}", self.migrate_said));
        }
        out.extend(self.warnings.iter().take(12).map(|w| format!("log: {w}")));
        out
    }
}

/// Runs one trial; whatever goes wrong ends up in the outcome.
fn trial(run: &Run, plan: &Plan) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome::new(plan);
    let pause = (plan.phase != Phase::FirstOutput).then_some(plan.phase);
    match Site::up(run, pause) {
        Ok(site) => {
            if let Err(e) = trial_on(run, plan, &site, &mut outcome) {
                outcome.struck = Err(format!("{e:#}"));
            }
            drop(site);
        }
        Err(e) => outcome.struck = Err(format!("cannot set up the cluster: {e:#}")),
    }
    reap_daemons();
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome
}

/// Reaps the daemons of the trial's cluster, which are this process's children (the cluster starts them)
/// and were killed when it went. Called between trials, when no other child of this process is left to
/// wait for.
fn reap_daemons() {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    while let Ok(status) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// The trial on its cluster: start the job, move it, strike, heal, check.
fn trial_on(run: &Run, plan: &Plan, site: &Site, outcome: &mut Outcome) -> anyhow::Result<()> {
    let Layout { home, source, dest } = plan.layout;
    let c = &site.cluster;
    let mut deputy = Tool::spawn(
        {
            let mut cmd = c.command_as(home, &run.user, "mosrun")?;
            cmd.args(["-L", "-N", &source.to_string()]).args(job_args(run.args.mem_mib));
            cmd
        },
        "the job's deputy",
    )?;
    let job = wait_for_job(site, &mut deputy, source)?;
    let before = Before { dest_base: unreclaimable(&c.cgroup(dest))?, job_rss: rss(job)? };
    let mut watch = Watch::new(site, home, deputy.pid());
    let mut migrate = Tool::spawn(
        {
            let mut cmd = c.command_as(home, &run.user, "migrate")?;
            cmd.args([deputy.pid().to_string(), dest.to_string()]);
            cmd
        },
        "migrate",
    )?;
    let struck_at = wait_to_strike(site, plan, &mut watch, &deputy, &mut migrate);
    outcome.struck = Ok(strike(site, plan, before)?);
    let shortest = Instant::now() + Duration::from_secs(run.args.fault_secs);
    let longest = Instant::now() + Duration::from_mins(2);
    loop {
        watch.poll(site);
        let now = Instant::now();
        if now >= longest || (now >= shortest && had_its_chance(plan, &watch, struck_at, migrate.ended())) {
            break;
        }
        std::thread::sleep(SAMPLE);
    }
    heal(site, plan).context("cannot heal the fault")?;
    let end = finish(run, site, &mut watch, &mut deputy, &mut migrate, outcome);
    outcome.hit = Some(watch.phase_at(struck_at, &deputy.arrivals()));
    outcome.doubled.clone_from(&watch.doubled);
    outcome.warnings =
        watch.lines.iter().filter(|l| l.warning && !l.pausing).map(|l| format!("node {}: {}", l.node, tail_of(&l.text))).collect();
    outcome.effect = effect(plan, &watch.lines);
    end
}

/// Whether the fault has had its chance to do harm: a full store or a starved node must last until the
/// destination's transfer or restore has been tried (or the move has ended), however early it struck; a
/// kill or a cut does its harm at once.
fn had_its_chance(plan: &Plan, watch: &Watch, struck_at: SystemTime, move_ended: bool) -> bool {
    let later: &[Phase] = match plan.fault {
        Fault::StoreFull => &[Phase::Commit, Phase::Restore, Phase::Resume, Phase::Done, Phase::Aborted],
        Fault::RestoreFails => &[Phase::Resume, Phase::Done, Phase::Aborted],
        _ => return true,
    };
    move_ended
        || effect(plan, &watch.lines) == Some(true)
        || watch.lines.iter().any(|l| l.time > struck_at && l.phase.is_some_and(|p| later.contains(&p)))
}

/// Whether a full store or a starved node did what it is meant to, make the destination's transfer or
/// restore fail, as far as the destination's log tells; `None` for the other faults.
fn effect(plan: &Plan, lines: &[LogLine]) -> Option<bool> {
    let what = match plan.fault {
        Fault::StoreFull => "image transfer failed",
        Fault::RestoreFails => "restore failed",
        _ => return None,
    };
    Some(lines.iter().any(|l| l.node == plan.layout.dest && l.warning && l.text.contains(what)))
}

/// A log line without its timestamp and level.
fn tail_of(text: &str) -> &str {
    let mut rest = text.trim_start();
    for _ in 0..2 {
        rest = rest.split_once(char::is_whitespace).map_or("", |(_, r)| r).trim_start();
    }
    rest
}

/// Waits until the job runs on `source` alone with its memory filled (it has printed a line), and returns
/// its pid there.
fn wait_for_job(site: &Site, deputy: &mut Tool, source: u32) -> anyhow::Result<i32> {
    let deadline = Instant::now() + Duration::from_mins(2);
    loop {
        let copies = copies(&site.cluster);
        if let [(node, pid, state)] = copies[..]
            && node == source
            && state != 'T'
            && !deputy.output().is_empty()
        {
            return Ok(pid);
        }
        if deputy.ended() {
            bail!("the job ended before it could be moved: {:?}; {}", deputy.status, deputy.stderr());
        }
        ensure!(Instant::now() < deadline, "the job did not run on node {source} alone within 2 minutes (copies: {copies:?})");
        std::thread::sleep(SAMPLE);
    }
}

/// Watches the move until it is time to strike, and returns that time: inside the planned phase (a
/// random moment of its pause, or just after its log line), or at the job's first output after the move;
/// at once if the move ended without the phase coming.
fn wait_to_strike(site: &Site, plan: &Plan, watch: &mut Watch, deputy: &Tool, migrate: &mut Tool) -> SystemTime {
    let deadline = Instant::now() + Duration::from_mins(3);
    let mut due: Option<Instant> = None;
    loop {
        watch.poll(site);
        if due.is_none() {
            due = match plan.phase {
                Phase::FirstOutput => first_output_after_move(&watch.lines, &deputy.arrivals()).map(|_| Instant::now()),
                phase => watch.seen(phase).map(|(_, pausing)| {
                    let window = Duration::from_millis(if pausing { PAUSE_MS + 500 } else { PLAIN_OFFSET_MS });
                    Instant::now() + window.mul_f64(plan.offset)
                }),
            };
        }
        let ended = migrate.ended();
        // After a move that failed there is no output after it to wait for.
        let moved = migrate.status.is_some_and(|s| s.success());
        let waiting_for_output = plan.phase == Phase::FirstOutput && moved;
        if due.is_some_and(|at| Instant::now() >= at)
            || (due.is_none() && ended && !waiting_for_output)
            || Instant::now() > deadline
        {
            return SystemTime::now();
        }
        std::thread::sleep(POLL);
    }
}

/// After the heal: waits for the deputy (for the job's remaining time plus four silence limits), then
/// for migrate, then for what the job left to go; records it all in `outcome`.
fn finish(run: &Run, site: &Site, watch: &mut Watch, deputy: &mut Tool, migrate: &mut Tool, outcome: &mut Outcome) -> anyhow::Result<()> {
    let silence = Duration::from_secs(u64::from(run.args.silence_secs));
    let job_time = Duration::from_secs_f64(f64::from(LINES) * GAP_SECS);
    let patience = job_time + silence * 4;
    outcome.waited = patience.as_secs();
    let deadline = Instant::now() + patience;
    while !deputy.ended() {
        if Instant::now() > deadline {
            outcome.hung = true;
            deputy.kill();
            break;
        }
        watch.poll(site);
        std::thread::sleep(SAMPLE);
    }
    let deadline = Instant::now() + silence * 2;
    while !migrate.ended() && Instant::now() < deadline {
        watch.poll(site);
        std::thread::sleep(SAMPLE);
    }
    if migrate.ended() {
        let said = [migrate.output().join(" "), migrate.stderr()].join(" ");
        outcome.migrate_said = format!("{} ({})", said.trim(), migrate.status.map_or_else(String::new, |s| s.to_string()));
    } else {
        migrate.kill();
        outcome.migrate_said = format!("no answer {} s after the job ended", silence.as_secs() * 2);
    }
    deputy.drain(Duration::from_secs(10));
    outcome.exit = deputy.status.and_then(|s| s.code());
    outcome.deputy_said = deputy.stderr();
    outcome.output = Some(compare(&deputy.output(), &run.reference));
    // What a node gives up on, it gives up on within two silence limits.
    let deadline = Instant::now() + silence * 2 + Duration::from_secs(5);
    loop {
        watch.poll(site);
        outcome.left = leftovers(site);
        if outcome.left.is_empty() || Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Everything of the job still on the cluster: processes (stopped or not, in namespaces of their own),
/// image directories, job cgroups, network namespaces beyond the nodes'.
fn leftovers(site: &Site) -> Vec<String> {
    let c = &site.cluster;
    let own_pid_ns = std::fs::read_link("/proc/self/ns/pid").ok();
    let mut found = Vec::new();
    for i in c.node_ids() {
        let daemons: Vec<i32> = ["migd", "infod"].iter().filter_map(|d| c.daemon_pid(i, d).ok()).collect();
        for pid in c.procs(i).unwrap_or_default().into_iter().filter(|p| !daemons.contains(p)) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "rmosix-keeper" {
                // The node's keeper is a daemon too (it exits when it has held nothing for a while); what
                // it must not hold is a job that has gone.
                let socket = c.migd_socket(i).with_file_name("keeper.sock");
                let listed = std::process::Command::new(c.bin_dir().join("rmosix-keeper"))
                    .arg("--list")
                    .arg(&socket)
                    .output();
                match listed {
                    Ok(out) if out.status.success() => found.extend(
                        String::from_utf8_lossy(&out.stdout)
                            .lines()
                            .map(|held| format!("node {i}'s keeper still holds job {held}")),
                    ),
                    Ok(out) => found.push(format!(
                        "node {i}'s keeper, process {pid}, does not answer: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => found.push(format!("cannot run rmosix-keeper --list: {e}")),
                }
                continue;
            }
            let Some(state) = process_state(pid) else { continue };
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
            let alone = if ns.is_some() && ns != own_pid_ns { ", in a PID namespace of its own" } else { "" };
            let stopped = if state == 'T' || state == 't' { "stopped " } else { "" };
            found.push(format!("{stopped}process {pid} ({}, state {state}{alone}) on node {i}", comm.trim()));
        }
        for entry in std::fs::read_dir(site.store(i)).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("images-") {
                found.push(format!("image directory {name} in node {i}'s store"));
            }
        }
        let mut names = Vec::new();
        for dir in c.cgroup(i).dirs() {
            job_cgroups(&dir, &mut names);
        }
        names.sort();
        names.dedup();
        found.extend(names.into_iter().map(|n| format!("job cgroup {n} on node {i}")));
    }
    let nodes: Vec<String> = c.node_ids().map(|i| c.netns(i)).collect();
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("rmx-{CLUSTER}-")) && !nodes.contains(&name) {
            found.push(format!("network namespace {name}"));
        }
    }
    found
}

/// The names of the job cgroups at or below `dir` (one per job, in every hierarchy it spans).
fn job_cgroups(dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(JOB_PREFIX) {
                found.push(name);
            }
            job_cgroups(&entry.path(), found);
        }
    }
}

// ---- the report ----------------------------------------------------------------------------------------

/// Counts of one (fault, phase hit) cell.
#[derive(Debug, Default, Clone, Copy)]
struct Row {
    trials: u32,
    exactly_one: u32,
    identical: u32,
    clean: u32,
}

#[derive(Debug, Default)]
struct Summary {
    total: usize,
    rows: BTreeMap<(Fault, Phase), Row>,
    failed: usize,
    /// Trials the harness could not carry out.
    invalid: usize,
    /// Trials whose strike came in another phase than the one aimed at.
    missed: Vec<(Fault, Phase, Phase)>,
    failures: Vec<String>,
}

impl Summary {
    fn of(outcomes: &[Outcome]) -> Self {
        let mut s = Self { total: outcomes.len(), ..Self::default() };
        for o in outcomes {
            if !o.ok() {
                s.failed += 1;
                let Layout { home, source, dest } = o.plan.layout;
                s.failures.push(format!(
                    "trial {}: {} aimed at {}, hit {}, home {home}, job {source} -> {dest}: {}",
                    o.plan.number,
                    o.plan.fault.name(),
                    o.plan.phase.name(),
                    o.hit.map_or("-", Phase::name),
                    o.problems().join("; ")
                ));
            }
            let (true, Some(hit)) = (o.valid(), o.hit) else {
                s.invalid += 1;
                continue;
            };
            if hit != o.plan.phase {
                s.missed.push((o.plan.fault, o.plan.phase, hit));
            }
            let row = s.rows.entry((o.plan.fault, hit)).or_default();
            row.trials += 1;
            row.exactly_one += u32::from(o.exactly_one());
            row.identical += u32::from(o.identical());
            row.clean += u32::from(o.clean());
        }
        s
    }

    fn table(&self) -> String {
        let mut t = String::from(
            "| fault | phase hit | trials | exactly one copy | output identical | nothing left |\n|---|---|---|---|---|---|\n",
        );
        for ((fault, phase), r) in &self.rows {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} |",
                fault.name(),
                phase.name(),
                r.trials,
                r.exactly_one,
                r.identical,
                r.clean
            );
        }
        t
    }

    fn last_line(&self, seed: u64) -> String {
        format!(
            "faults: {} trials, {} ok, {} failed ({} the harness could not carry out); seed {seed}",
            self.total,
            self.total - self.failed,
            self.failed,
            self.invalid
        )
    }
}

/// The RELIABILITY.md section of a full run.
fn section(args: &FaultsArgs, seed: u64, summary: &Summary) -> String {
    let mut s = format!("{HEADING}\n\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask faults` ({}; {}; seed {seed}, replay one trial with `cargo xtask faults --seed {seed} \
         --trial N`). Each trial moves a job of the test user (python3 with {} MiB resident, printing {LINES} numbered \
         lines at {GAP_SECS} s intervals, each with a hash of a different MiB of its memory) between two nodes of a fresh \
         3-node local cluster with `migrate`, strikes with one fault at a phase of the move chosen at random, heals it \
         after {} s (a full store or a starved node once the destination has tried its transfer or restore), and \
         checks: exactly one copy ran and the job finished (never two copies running at once, looked for in the \
         nodes' cgroups every {} ms; the deputy exited 0); its output at the deputy is identical to an unmoved run's; \
         nothing is left once the deputy has ended and two silence limits have passed (no process of the job, stopped \
         or not, no `images-*` directory in any node's store, no job cgroup, no namespace). The nodes' `silence_secs` is {}. The phase counted is the one the strike came in, from \
         the migd logs' timestamps; migd pauses {PAUSE_MS} ms at the start of the phase aimed at (`RMOSIX_PHASE_DELAY`) \
         so that the strike lands in it.\n",
        crate::benchmarks::machine(),
        commit(),
        args.mem_mib,
        args.fault_secs,
        SAMPLE.as_millis(),
        args.silence_secs,
    );
    s.push_str("The faults:\n\n");
    for f in Fault::ALL {
        let phases: Vec<&str> = f.phases().iter().map(|p| p.name()).collect();
        let _ = writeln!(s, "- `{}`: {} (aimed at: {}).", f.name(), f.how(), phases.join(", "));
    }
    let _ = write!(s, "\n{}\n", summary.table());
    let _ = writeln!(s, "{}\n", summary.last_line(seed));
    if !summary.missed.is_empty() {
        s.push_str("Strikes that came in another phase than the one aimed at (aimed -> hit):\n\n");
        for (fault, aimed, hit) in &summary.missed {
            let _ = writeln!(s, "- {}: {} -> {}", fault.name(), aimed.name(), hit.name());
        }
        s.push('\n');
    }
    if !summary.failures.is_empty() {
        s.push_str("Failed trials:\n\n");
        for f in &summary.failures {
            let _ = writeln!(s, "- {f}");
        }
        s.push('\n');
    }
    s
}

/// The commit the binaries were built from, and whether the tree had changes.
fn commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(crate::root())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = run(&["rev-parse", "--short", "HEAD"]);
    let dirty = !run(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!("commit {head}{}", if dirty { " with uncommitted changes" } else { "" })
}

const HEADER: &str = "# Reliability\n\nHow rmosix behaves when things go wrong. Each section says how it was measured.\n";

/// Replaces this harness's section of RELIABILITY.md (or adds it), leaving the others alone.
fn write_reliability(section: &str) -> anyhow::Result<()> {
    let path = crate::root().join("RELIABILITY.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| HEADER.to_owned());
    std::fs::write(&path, replace_section(&old, section)).with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote the section \"{}\" of {}", &HEADING[3..], path.display());
    Ok(())
}

/// `doc` with the part from [`HEADING`] to the next `## ` heading replaced by `section`, or with
/// `section` appended when it has none.
fn replace_section(doc: &str, section: &str) -> String {
    let section = section.trim_end();
    let start = doc.match_indices(HEADING).map(|(i, _)| i).find(|&i| {
        (i == 0 || doc[..i].ends_with('\n')) && doc[i + HEADING.len()..].starts_with(['\n', '\r'])
    });
    match start {
        Some(a) => {
            let after = a + HEADING.len();
            let end = doc[after..].find("\n## ").map_or(doc.len(), |b| after + b + 1);
            let rest = &doc[end..];
            if rest.is_empty() { format!("{}{section}\n", &doc[..a]) } else { format!("{}{section}\n\n{rest}", &doc[..a]) }
        }
        None => format!("{}\n\n{section}\n", doc.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> FaultsArgs {
        FaultsArgs { trials: None, ..FaultsArgs::for_test(1) }
    }

    #[test]
    fn a_full_run_tries_every_fault_at_every_phase_it_applies_to() {
        let plans = plans(&args(), 7).unwrap();
        let cells = cells(&args());
        assert!(plans.len() >= 30 && plans.len() >= cells.len(), "{}", plans.len());
        for cell in &cells {
            assert!(plans.iter().any(|p| (p.fault, p.phase) == *cell), "{cell:?} never tried");
        }
        for p in &plans {
            let Layout { home, source, dest } = p.layout;
            assert_ne!(source, dest, "{p:?}");
            assert!(p.cut_in == source || p.cut_in == dest, "{p:?}");
            if p.fault == Fault::KillHome {
                assert!(home != source && home != dest, "home must be a third node: {p:?}");
            }
        }
        assert!(plans.iter().any(|p| p.layout.home == p.layout.dest), "some jobs come home");
        assert!(plans.iter().any(|p| p.layout.home == p.layout.source), "some jobs leave home");
    }

    #[test]
    fn a_trial_is_replayed_from_the_seed_and_its_number() {
        let all = plans(&args(), 99).unwrap();
        let one = plans(&FaultsArgs { trial: Some(17), ..args() }, 99).unwrap();
        let (a, b) = (&all[16], &one[0]);
        assert_eq!((a.number, a.fault, a.phase, a.layout, a.cut_in), (b.number, b.fault, b.phase, b.layout, b.cut_in));
        assert!((a.offset - b.offset).abs() < f64::EPSILON);
        let other = plans(&args(), 100).unwrap();
        assert!(all.iter().zip(&other).any(|(a, b)| (a.fault, a.phase) != (b.fault, b.phase)), "another seed, other trials");
    }

    #[test]
    fn filters_keep_only_what_applies() {
        let only = FaultsArgs { fault: Some(Fault::StoreFull), ..args() };
        assert!(cells(&only).iter().all(|(f, p)| *f == Fault::StoreFull && *p != Phase::Restore));
        let nothing = FaultsArgs { fault: Some(Fault::StoreFull), phase: Some(Phase::FirstOutput), ..args() };
        assert!(plans(&nothing, 1).is_err());
    }

    #[test]
    fn log_lines_of_the_job_give_phase_time_and_pauses() {
        let raw = "\u{1b}[2m2026-12-01T02:08:44.477426Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \u{1b}[1mmigration\u{1b}[0m\u{1b}[1m{\u{1b}[0m\
                   \u{1b}[3mmigration_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m1.30965-1 \u{1b}[3mrole\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"source\" \
                   \u{1b}[3mto\u{1b}[0m\u{1b}[2m=\u{1b}[0m2\u{1b}[1m}\u{1b}[0m\u{1b}[2m:\u{1b}[0m rmosix_migd::daemon: dumped \
                   \u{1b}[3mphase\u{1b}[0m\u{1b}[2m=\u{1b}[0moffer \u{1b}[3mimage_bytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m273110525";
        let line = parse_log_line(1, raw, 1, 30965, 1).unwrap();
        assert_eq!(line.phase, Some(Phase::Offer));
        assert!(!line.pausing && !line.warning);
        assert_eq!(line.time, UNIX_EPOCH + Duration::from_micros(1_796_090_924_477_426));
        assert!(parse_log_line(1, raw, 1, 3096, 1).is_none(), "another job's");
        assert!(parse_log_line(1, raw, 2, 30965, 1).is_none(), "another home's");
        assert!(parse_log_line(1, raw, 1, 30965, 2).is_none(), "an earlier move's");
        let pause = "2026-12-01T02:08:44.000001Z  WARN migration{migration_id=3.77-2 role=\"destination\" from=1}: \
                     rmosix_migd::daemon: pausing at this phase (RMOSIX_PHASE_DELAY) phase=restore pause_ms=1500";
        let line = parse_log_line(2, pause, 3, 77, 2).unwrap();
        assert_eq!((line.phase, line.pausing, line.warning), (Some(Phase::Restore), true, true));
        let guest = "2026-12-01T02:08:47.407469Z  INFO rmosix_migd::daemon: guest job running home_pid=77 home=3 pid=31329";
        assert_eq!(parse_log_line(2, guest, 3, 77, 1).unwrap().phase, None);
        assert!(parse_log_line(2, guest, 3, 7, 1).is_none());
    }

    #[test]
    fn utc_stamps_are_read_to_the_microsecond() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert_eq!(parse_utc("2000-03-01T00:00:01.5Z"), Some(UNIX_EPOCH + Duration::from_millis(951_868_801_500)));
        assert_eq!(parse_utc("2024-02-29T23:59:59.000001Z"), Some(UNIX_EPOCH + Duration::from_micros(1_709_251_199_000_001)));
        assert_eq!(parse_utc("yesterday"), None);
    }

    #[test]
    fn the_phase_at_a_moment_is_the_last_one_logged_before_it() {
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let line = |s, phase| LogLine { node: 1, time: at(s), phase: Some(phase), pausing: false, warning: false, text: String::new() };
        let watch = Watch {
            logs: Vec::new(),
            home: 1,
            home_pid: 5,
            first: 1,
            lines: vec![line(10, Phase::Dump), line(12, Phase::Transfer), line(11, Phase::Offer), line(20, Phase::Done)],
            last_sample: None,
            suspects: Vec::new(),
            doubled: None,
        };
        let output = [at(9), at(19), at(21), at(22)];
        assert_eq!(watch.phase_at(at(5), &output), Phase::Before);
        assert_eq!(watch.phase_at(at(11), &output), Phase::Offer);
        assert_eq!(watch.phase_at(at(15), &output), Phase::Transfer);
        assert_eq!(watch.phase_at(at(20), &output), Phase::Done);
        assert_eq!(watch.phase_at(at(30), &output), Phase::FirstOutput);
    }

    #[test]
    fn output_is_judged_against_the_unmoved_run() {
        let reference: Vec<String> = ["0 a", "1 b", "2 c"].map(String::from).to_vec();
        assert_eq!(compare(&reference, &reference), Output::Identical);
        assert_eq!(compare(&reference[..2], &reference), Output::Cut(2));
        let twice: Vec<String> = ["0 a", "1 b", "1 b", "2 c"].map(String::from).to_vec();
        assert_eq!(compare(&twice, &reference), Output::Repeated("1 b".into()));
        let gaps: Vec<String> = ["0 a", "2 c"].map(String::from).to_vec();
        assert_eq!(compare(&gaps, &reference), Output::Gaps { missing: 1, first: 1 });
        let wrong: Vec<String> = ["0 a", "1 x", "2 c"].map(String::from).to_vec();
        assert_eq!(compare(&wrong, &reference), Output::Differs { at: 1, got: "1 x".into(), expected: "1 b".into() });
        assert_eq!(
            compare(&reference[1..], &reference[..2]),
            Output::Differs { at: 0, got: "1 b".into(), expected: "0 a".into() }
        );
    }

    #[test]
    fn configuration_keys_are_set_in_their_section() {
        let text = "node = 1\n\n[migd]\nport = 5402\nsilence_secs = 30\n\n[checkpoint]\nimage_store = \"/run/rmosix/images\"\n";
        let text = set_key(text, "migd", "silence_secs", "10");
        let text = set_key(&text, "checkpoint", "image_store", "\"/x/images\"");
        let text = set_key(&text, "policy", "block_guests", "false");
        assert_eq!(
            text,
            "node = 1\n\n[migd]\nsilence_secs = 10\nport = 5402\n\n[checkpoint]\nimage_store = \"/x/images\"\n\n\
             [policy]\nblock_guests = false\n"
        );
    }

    #[test]
    fn the_section_is_replaced_in_place_and_the_others_kept() {
        let first = replace_section(HEADER, "## Faults during a move\n\nfirst\n");
        assert!(first.starts_with(HEADER) && first.ends_with("## Faults during a move\n\nfirst\n"), "{first}");
        let doc = format!("{first}\n## Node deaths\n\ntheirs\n");
        let doc = replace_section(&doc, "## Faults during a move\n\nsecond\n");
        assert!(doc.contains("## Faults during a move\n\nsecond\n\n## Node deaths\n\ntheirs\n"), "{doc}");
        assert!(!doc.contains("first"));
        let doc = replace_section("# R\n\n## Faults during a moves\n", "## Faults during a move\n\nx\n");
        assert!(doc.contains("## Faults during a moves\n") && doc.ends_with("## Faults during a move\n\nx\n"), "{doc}");
    }
}
