//! The balance simulation: rmosix's load balancing at 64 to 10,000 nodes, beside no balancing, placement at
//! start only, and an omniscient central scheduler, on the same jobs.
//!
//! Every node runs the code the real daemons run for their decisions: infod's [`Engine`] spreads the loads
//! (over a simulated clock and network, as in `bench gossip`), and migd's decision,
//! [`rmosix_common::balance::balance`], is called with what that node's infod knows, mapped to
//! [`balance::Node`] and [`balance::Job`] as migd's balancer maps them. What the simulation adds is the
//! machine: CPUs shared between the jobs of a node, job arrivals, and moves that freeze a job.
//!
//! # The model
//!
//! - Nodes of one CPU, of speed 1.0 (or 1.0 and 2.0 alternately with `--mixed-speeds`), with memory enough
//!   that it never constrains (64 GiB each).
//! - Jobs are CPU-bound. They arrive as a Poisson process at random nodes (with mixed speeds, at a node with
//!   a chance proportional to its speed, so every node's own work would keep it equally busy) at a rate
//!   that makes the work `--utilisation` of the cluster's capacity. A job's length is the CPU time it
//!   needs at speed 1: exponential, or bounded Pareto of the same mean (heavy-tailed). Each job has a
//!   resident size drawn uniformly from 50 to 500 MiB.
//! - Processor sharing: the `q` jobs of a node each progress at [`balance::share`]`(speed, 1, q)` per
//!   second. Completions are computed exactly (an event at the moment the job with the least work left
//!   ends), not by time steps.
//! - A move freezes its job for [`Params::freeze`] of its resident size (500 MB/s and 300 ms): it makes no
//!   progress and is in neither node's run queue until it lands at its destination.
//! - infod, per node, at its own random phase: a run-queue sample every quarter interval, and every
//!   interval the mean of the four folded into [`Decay`] (rise 0.4, fall 0.85), which is the load the node
//!   advertises: its own [`Engine`] ticks with it and the datagram it sends reaches its peer after
//!   0.1-2 ms, or is lost (1 %). Every engine runs with infod's default settings (window of 20).
//! - migd, per node, at its own random phase, an interval after a decision that moved nothing, and as
//!   soon as the job it moved has landed: this node as its infod advertises it, the others that node's
//!   infod calls alive (what `Engine::view` gives, as migd asks for it), the jobs with their age, their
//!   time on this node, whether they came to it by a move and a demand of 1 CPU, and the moves this node
//!   made in the last 30 s; [`balance::usher`], then [`balance::balance`], with [`Params::default`].
//!   Nothing is ever short of memory, so only `balance` moves jobs.
//!
//! # The policies, on the same arrivals (same seed)
//!
//! 1. No balancing: a job runs where it arrives.
//! 2. Placement only (dshd's way): at arrival, the job starts on the node `Engine::best` of the node it
//!    arrived at names (as `mosrun -b` asks infod), and never moves.
//! 3. rmosix balancing: a job starts where it arrives; migd's balancer moves jobs.
//! 4. Placement and balancing: both of the above (`mosrun -b` under migd's balancer).
//! 5. Omniscient: a central scheduler that knows every node's exact number of jobs at every instant puts
//!    each job on the node where it gets the largest share (of equals, the lowest id), and whenever a job
//!    would get strictly more on another node than the jobs of the busiest node get there (for nodes of
//!    one speed: whenever one node has at least two jobs more than another), moves one (the one with the
//!    most work left) at once, without freezing it. It is an idealised reference, not a strict bound: it
//!    knows no job's length when placing and shares CPUs fairly, so a size-aware scheduler could do better.
//!
//! # What is measured
//!
//! The slowdown of a job is its response time (arrival to end) over its length (its CPU time at speed 1
//! alone). Every figure is taken over a measurement window after a warm-up, in the cluster's steady state:
//!
//! - the mean slowdown: the time the jobs spent in the cluster during the window (running, waiting for
//!   their share or moving), each second weighted by `1 / length`, over the work done in the window, each
//!   CPU-second at speed 1 weighted the same way. By H = λG (Little's law for a weighted count) the first
//!   is the arrival rate times the mean over jobs of response time / length, and the second the arrival
//!   rate (one per job): no job needs to end within the run, so a short window at 10,000 nodes is not
//!   biased against long jobs, and the jobs' worth of work done (rather than the jobs arriving) cancels
//!   the noise of how many jobs the window happens to hold (with the omniscient scheduler, every job alone,
//!   the ratio is exactly 1);
//! - migrations per job: the moves made in the window over the jobs' worth of work done in it (same law);
//! - the median and 99th percentile: of the slowdowns of the jobs that ended in the window (having arrived
//!   after the run started); with a short run this leaves out the longest jobs.
//!
//! So that the steady state comes within the warm-up, the cluster does not start empty: policies 2 to 5
//! start with the jobs a cluster where every job ran alone would hold (the arrivals of the past, each at
//! the node it arrived at, still running if its length exceeds its age), and no balancing starts in its own
//! steady state (each node an M/G/1 queue with processor sharing: a geometric number of jobs, each found
//! part-way through a length drawn in proportion to itself). infod's loads and windows start empty and
//! settle within seconds. Policies that queue jobs (rmosix balancing does, its moves crowding some nodes)
//! take minutes to reach their steady state from the light start, more than 10,000 nodes can be
//! simulated for: from 1,000 nodes on, the runs with infod start from the jobs (and infod's decayed loads)
//! a 500-node cluster held after 15 minutes under the same policy and workload, node `i` getting those of
//! node `i mod 500`.

use std::cmp::{Ordering, Reverse};
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::iter::Peekable;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};
use rmosix_common::NodeId;
use rmosix_common::balance::{self, Adjusted, Departure, Params};
use rmosix_common::config::{InfodConfig, LoadConfig};
use rmosix_common::load::{Decay, LoadVector};
use rmosix_common::map::{ClusterMap, Node as MapNode};
use rmosix_common::wire::Gossip;
use rmosix_infod::engine::{Engine, EngineConfig};

/// Seed of the default run.
const SEED: u64 = 0xba1a_2ce5_1d00_2026;
/// Share of datagrams the simulated network loses (as in `bench gossip`).
const LOSS: f64 = 0.01;
/// One-way latency of the simulated network, in microseconds.
const LATENCY_US: Range<u64> = 100..2_000;
/// Origin of the simulated monotonic clocks: large, so ages computed by subtraction never saturate at 0.
const MONO_BASE_MS: u64 = 1 << 40;
/// Origin of the simulated wall clocks (milliseconds since the epoch, in 2027).
const WALL_BASE_MS: u64 = 1_800_000_000_000;
/// Memory of every node: enough that it never constrains.
const NODE_MEM: u64 = 64 << 30;
/// Resident size of a job, MiB, drawn uniformly.
const RSS_MIB: Range<u64> = 50..501;
/// How long migd counts a move in the loads it compares (migd's `REMEMBER_FOR`).
const REMEMBER_FOR: Duration = Duration::from_secs(30);
/// Shape of the heavy-tailed lengths (bounded Pareto); about that of the process lifetimes Harchol-Balter
/// and Downey measured.
const TAIL_ALPHA: f64 = 1.1;
/// Longest job of the heavy-tailed workload, seconds at speed 1.
const TAIL_MAX_S: f64 = 3_600.0;
/// Clusters at least this large that run infod engines hold gigabytes (each engine remembers every node it
/// ever heard of): one such run at a time.
const HEAVY_NODES: usize = 5_000;
/// Work left below which a job has ended (rounding of event times to microseconds).
const DONE_EPS: f64 = 1e-6;
/// Size of the cluster whose state large clusters start from, and how long it runs first.
const WARM_START_NODES: usize = 500;
const WARM_START_S: f64 = 900.0;
/// Intervals between two prunings of what a node's infod heard of (only what is younger than
/// `down_after_ms` is used; the rest only takes memory).
const PRUNE_EVERY: u64 = 8;
/// Title of the section of BENCHMARKS.md.
pub const TITLE: &str = "balance sim: rmosix's balancing against placement only and an omniscient scheduler";

/// Options of the balance simulation.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Cluster sizes to simulate.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 1_000, 10_000])]
    pub nodes: Vec<usize>,
    /// Work arriving per second over the cluster's capacity.
    #[arg(long, default_value_t = 0.7)]
    pub utilisation: f64,
    /// Mean length of a job: seconds of CPU at speed 1.
    #[arg(long, default_value_t = 60.0)]
    pub mean_secs: f64,
    /// Nodes of speeds 1.0 and 2.0 alternately, instead of all 1.0.
    #[arg(long)]
    pub mixed_speeds: bool,
    /// Run placement + balancing (`mosrun -b` under migd's balancer) only on clusters smaller than this: at
    /// 10,000 nodes its two runs would add minutes.
    #[arg(long, default_value_t = HEAVY_NODES)]
    pub place_balance_below: usize,
    /// Multiplies the simulated time of every run (warm-up and window): 0.1 for a quick look.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seed of the arrivals, the lengths, the phases and the network.
    #[arg(long, default_value_t = SEED)]
    pub seed: u64,
    /// Simulations run at once (each is single-threaded).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            nodes: vec![64, 1_000, 10_000],
            utilisation: 0.7,
            mean_secs: 60.0,
            mixed_speeds: false,
            place_balance_below: HEAVY_NODES,
            time_scale: 1.0,
            seed: SEED,
            threads: 2,
        }
    }
}

/// What a run of the simulation found.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// A section body for BENCHMARKS.md: what was simulated, and a table per cluster size and workload.
    pub markdown: String,
    /// One line: the figures against the target, ending in `met` or `missed`.
    pub summary: String,
}

/// Runs every cluster size, workload and policy, and reports.
pub fn run(args: &SimArgs) -> anyhow::Result<SimReport> {
    ensure!(!args.nodes.is_empty(), "--nodes is empty");
    for &n in &args.nodes {
        ensure!((2..=65_536).contains(&n), "--nodes {n}: a cluster has 2 to 65536 nodes");
    }
    ensure!(
        args.utilisation > 0.0 && args.utilisation < 1.0,
        "--utilisation {}: must be above 0 and below 1",
        args.utilisation
    );
    ensure!(args.mean_secs >= 1.0, "--mean-secs {}: must be at least 1", args.mean_secs);
    ensure!(args.time_scale > 0.0 && args.time_scale.is_finite(), "--time-scale must be positive");
    let started = Instant::now();
    let workloads =
        [Lengths::exponential(args.mean_secs), Lengths::bounded_pareto(TAIL_ALPHA, TAIL_MAX_S, args.mean_secs)];
    let mut tasks = Vec::new();
    for &n in &args.nodes {
        let plan = Plan::for_nodes(n, args.time_scale);
        for (w, &lengths) in workloads.iter().enumerate() {
            for policy in Policy::ALL {
                if policy == Policy::PlaceBalance && n >= args.place_balance_below {
                    continue;
                }
                let spec = Spec {
                    nodes: n,
                    mixed_speeds: args.mixed_speeds,
                    utilisation: args.utilisation,
                    lengths,
                    policy,
                    plan,
                    seed: args.seed,
                    workload: w,
                };
                tasks.push(spec);
            }
        }
    }
    let outcomes = run_all(&tasks, args.threads.max(1))?;
    let report = Report { args: args.clone(), workloads, tasks, outcomes, total_s: started.elapsed().as_secs_f64() };
    Ok(SimReport { markdown: report.markdown(), summary: report.summary() })
}

/// Runs `tasks` on `threads` threads, the heavy ones one at a time; outcomes in the order of `tasks`.
fn run_all(tasks: &[Spec], threads: usize) -> anyhow::Result<Vec<Outcome>> {
    struct Pool {
        /// Indices of the tasks not started, the heavy ones first.
        pending: Vec<usize>,
        heavy_busy: bool,
    }
    let mut pending: Vec<usize> = (0..tasks.len()).collect();
    // Heavy runs first (they make the critical path), then the larger clusters.
    pending.sort_by_key(|&i| (Reverse(tasks[i].heavy()), Reverse(tasks[i].nodes), i));
    let pool = Mutex::new(Pool { pending, heavy_busy: false });
    let wake = Condvar::new();
    let results: Mutex<Vec<Option<anyhow::Result<Outcome>>>> = Mutex::new((0..tasks.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.min(tasks.len()) {
            s.spawn(|| {
                loop {
                    let index = {
                        let mut p = pool.lock().expect("pool");
                        loop {
                            if p.pending.is_empty() {
                                return;
                            }
                            let heavy_busy = p.heavy_busy;
                            if let Some(pos) = p.pending.iter().position(|&i| !(tasks[i].heavy() && heavy_busy)) {
                                let index = p.pending.remove(pos);
                                p.heavy_busy |= tasks[index].heavy();
                                break index;
                            }
                            p = wake.wait(p).expect("pool");
                        }
                    };
                    let spec = &tasks[index];
                    let started = Instant::now();
                    let mut outcome = Sim::new(spec).and_then(Sim::run);
                    if let Ok(o) = &mut outcome {
                        // With the smaller cluster's run, for a warm start.
                        o.wall_s = started.elapsed().as_secs_f64();
                    }
                    if let Ok(o) = &outcome {
                        eprintln!(
                            "balance sim: {} nodes, {}, {}: mean slowdown {:.3}, p99 {:.2}, {:.3} moves/job ({:.0} s)",
                            spec.nodes,
                            spec.lengths.name(),
                            spec.policy.name(),
                            o.mean,
                            o.p99,
                            o.moves_per_job,
                            o.wall_s
                        );
                    }
                    {
                        let mut p = pool.lock().expect("pool");
                        if spec.heavy() {
                            p.heavy_busy = false;
                        }
                        wake.notify_all();
                    }
                    results.lock().expect("results")[index] = Some(outcome);
                }
            });
        }
    });
    results.into_inner().expect("results").into_iter().map(|r| r.expect("every task ran")).collect()
}

/// How a job chooses where to run, and who moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Stay,
    Place,
    Balance,
    PlaceBalance,
    Omniscient,
}

impl Policy {
    const ALL: [Policy; 5] = [Policy::Stay, Policy::Place, Policy::Balance, Policy::PlaceBalance, Policy::Omniscient];

    fn name(self) -> &'static str {
        match self {
            Policy::Stay => "no balancing",
            Policy::Place => "placement only",
            Policy::Balance => "rmosix balancing",
            Policy::PlaceBalance => "placement + balancing",
            Policy::Omniscient => "omniscient",
        }
    }

    /// Runs infod engines (the information of placement and balancing).
    fn infod(self) -> bool {
        matches!(self, Policy::Place | Policy::Balance | Policy::PlaceBalance)
    }

    fn places(self) -> bool {
        matches!(self, Policy::Place | Policy::PlaceBalance)
    }

    fn balances(self) -> bool {
        matches!(self, Policy::Balance | Policy::PlaceBalance)
    }
}

/// Job lengths: CPU seconds at speed 1.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Lengths {
    Exponential { mean: f64 },
    /// Density proportional to `x^-(alpha+1)` on `[lo, hi]`.
    BoundedPareto { alpha: f64, lo: f64, hi: f64 },
}

impl Lengths {
    fn exponential(mean: f64) -> Self {
        Lengths::Exponential { mean }
    }

    /// The bounded Pareto of shape `alpha` up to `hi` whose mean is `mean` (its lower bound found by
    /// bisection; the mean grows with it).
    fn bounded_pareto(alpha: f64, hi: f64, mean: f64) -> Self {
        let (mut a, mut b) = (1e-9, mean);
        for _ in 0..200 {
            let mid = 0.5 * (a + b);
            if (Lengths::BoundedPareto { alpha, lo: mid, hi }).mean() < mean {
                a = mid;
            } else {
                b = mid;
            }
        }
        Lengths::BoundedPareto { alpha, lo: 0.5 * (a + b), hi }
    }

    fn mean(&self) -> f64 {
        match *self {
            Lengths::Exponential { mean } => mean,
            Lengths::BoundedPareto { alpha, lo, hi } => {
                let tail = 1.0 - (lo / hi).powf(alpha);
                if (alpha - 1.0).abs() < 1e-12 {
                    lo * (hi / lo).ln() / tail
                } else {
                    alpha * lo.powf(alpha) * (lo.powf(1.0 - alpha) - hi.powf(1.0 - alpha)) / ((alpha - 1.0) * tail)
                }
            }
        }
    }

    fn sample(&self, rng: &mut SmallRng) -> f64 {
        let u: f64 = rng.random();
        match *self {
            Lengths::Exponential { mean } => -mean * (1.0 - u).ln(),
            Lengths::BoundedPareto { alpha, lo, hi } => {
                lo / (1.0 - u * (1.0 - (lo / hi).powf(alpha))).powf(1.0 / alpha)
            }
        }
    }

    /// A job found running by a look at a random moment at a server working through these lengths: its
    /// length, drawn in proportion to itself, and the work it has left, a uniform share of it (the
    /// equilibrium residual).
    fn found_running(&self, rng: &mut SmallRng) -> (f64, f64) {
        let (u, v): (f64, f64) = (rng.random(), rng.random());
        let length = match *self {
            // The length-biased exponential is the sum of two.
            Lengths::Exponential { mean } => {
                let w: f64 = rng.random();
                -mean * ((1.0 - u).ln() + (1.0 - w).ln())
            }
            // Density proportional to x^-alpha on [lo, hi].
            Lengths::BoundedPareto { alpha, lo, hi } => {
                if (alpha - 1.0).abs() < 1e-12 {
                    lo * (hi / lo).powf(u)
                } else {
                    let e = 1.0 - alpha;
                    (lo.powf(e) + u * (hi.powf(e) - lo.powf(e))).powf(1.0 / e)
                }
            }
        };
        (length, (v * length).max(DONE_EPS))
    }

    /// The longest a job can be, or a length so rare (e^-30) that no run meets it.
    fn horizon(&self) -> f64 {
        match *self {
            Lengths::Exponential { mean } => 30.0 * mean,
            Lengths::BoundedPareto { hi, .. } => hi,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Lengths::Exponential { .. } => "exponential",
            Lengths::BoundedPareto { .. } => "heavy-tailed",
        }
    }

    fn describe(&self) -> String {
        match *self {
            Lengths::Exponential { mean } => format!("exponential, mean {mean:.0} s"),
            Lengths::BoundedPareto { alpha, lo, hi } => {
                format!("bounded Pareto, shape {alpha}, {lo:.1} s to {hi:.0} s, mean {:.0} s", self.mean())
            }
        }
    }
}

/// Simulated time of a run: the warm-up, then the measurement window; and for runs with infod, where they
/// start.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Plan {
    warmup_s: f64,
    window_s: f64,
    warm_start: Option<WarmStart>,
}

/// A start from the jobs a cluster of `nodes` held after `secs` under the same policy and workload, copied
/// node for node over the larger cluster: the steady state of a policy that queues jobs can take many
/// minutes to come from the light start, more than a large cluster can afford to simulate.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WarmStart {
    nodes: usize,
    secs: f64,
}

/// How a run starts.
#[derive(Debug)]
enum Start {
    /// Nothing running (tests).
    #[cfg_attr(not(test), expect(dead_code, reason = "only the tests start from an empty cluster"))]
    Empty,
    /// With the jobs of the past, or for no balancing its steady state (see the module's documentation).
    Past,
    /// With the jobs of each node of a smaller cluster, and its load.
    Tiled(Vec<NodeState>),
}

/// What a node held at the end of a run.
#[derive(Debug, Clone)]
struct NodeState {
    /// Length, work left, age, resident size.
    jobs: Vec<(f64, f64, f64, u64)>,
    decay: Decay,
    load: f64,
}

impl Plan {
    /// About 10,000 arrivals in the window at 64 nodes, 7,000 at 1,000 and 10,000 nodes, within minutes of
    /// host time: infod's engines cost 30-45 µs per node and simulated second at 10,000 nodes. From the light
    /// start, rmosix balancing takes minutes to reach its steady state at 1,000 nodes (its moves crowd some
    /// nodes); a 500-node cluster's state after 15 minutes is that steady state to within the noise, so runs
    /// with infod on 1,000 nodes and more start from it, and their warm-up lets infod settle and the copy
    /// adjust to the larger cluster.
    fn for_nodes(n: usize, scale: f64) -> Self {
        let (warmup_s, window_s, warm) = match n {
            0..200 => (1_200.0, 15_000.0, false),
            200..1_000 => (1_200.0, 900.0, false),
            1_000..3_000 => (300.0, 600.0, true),
            _ => (120.0, 60.0, true),
        };
        Self {
            warmup_s: warmup_s * scale,
            window_s: window_s * scale,
            warm_start: warm.then_some(WarmStart { nodes: WARM_START_NODES, secs: WARM_START_S * scale }),
        }
    }
}

/// One run: a cluster, a workload, a policy.
#[derive(Debug, Clone, Copy)]
struct Spec {
    nodes: usize,
    mixed_speeds: bool,
    utilisation: f64,
    lengths: Lengths,
    policy: Policy,
    plan: Plan,
    seed: u64,
    /// Index of the workload, for its seed.
    workload: usize,
}

impl Spec {
    fn heavy(&self) -> bool {
        self.policy.infod() && self.nodes >= HEAVY_NODES
    }

    fn speed(&self, index: usize) -> f64 {
        if self.mixed_speeds && index % 2 == 1 { 2.0 } else { 1.0 }
    }

    /// Jobs per second.
    fn rate(&self) -> f64 {
        let capacity: f64 = (0..self.nodes).map(|i| self.speed(i)).sum();
        self.utilisation * capacity / self.lengths.mean()
    }

    /// The seed of what every policy shares: arrivals, lengths, sizes, phases.
    fn shared_seed(&self) -> u64 {
        mix(self.seed, &[self.nodes as u64, self.workload as u64])
    }
}

/// A job as it arrives.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Arrival {
    /// Seconds from the start of the run (negative for the jobs of the past).
    at_s: f64,
    origin: usize,
    size: f64,
    rss: u64,
}

/// The arrivals of a run: a Poisson process from `-horizon` on, the same for every policy.
#[derive(Debug)]
struct Arrivals {
    rng: SmallRng,
    t: f64,
    rate: f64,
    lengths: Lengths,
    speeds: Vec<f64>,
    max_speed: f64,
}

impl Arrivals {
    fn new(spec: &Spec) -> Self {
        let speeds: Vec<f64> = (0..spec.nodes).map(|i| spec.speed(i)).collect();
        let max_speed = speeds.iter().copied().fold(0.0, f64::max);
        Self {
            rng: SmallRng::seed_from_u64(mix(spec.shared_seed(), &[1])),
            t: -spec.lengths.horizon(),
            rate: spec.rate(),
            lengths: spec.lengths,
            speeds,
            max_speed,
        }
    }
}

impl Iterator for Arrivals {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        let u: f64 = self.rng.random();
        self.t += -(1.0 - u).ln() / self.rate;
        // A node with a chance proportional to its speed.
        let origin = loop {
            let i = self.rng.random_range(0..self.speeds.len());
            if self.speeds[i] >= self.max_speed || self.rng.random_bool(self.speeds[i] / self.max_speed) {
                break i;
            }
        };
        let size = self.lengths.sample(&mut self.rng);
        let rss = self.rng.random_range(RSS_MIB) << 20;
        Some(Arrival { at_s: self.t, origin, size, rss })
    }
}

/// A job in the simulation.
#[derive(Debug, Clone)]
struct Job {
    /// Length: CPU seconds at speed 1.
    size: f64,
    /// CPU seconds at speed 1 still to run.
    left: f64,
    /// When it started (seconds from the start of the run; negative for jobs of the past).
    start_s: f64,
    /// When it came to the node it is on, or is moving to.
    here_since_us: u64,
    origin: usize,
    rss: u64,
    moves: u32,
    /// When it ended.
    done_us: Option<u64>,
}

/// What infod of one node has heard of another: the newest vector, and when it was measured by this node's
/// clock. It mirrors the part of the engine's own memory that `Engine::view` answers from, kept only while
/// it is younger than `down_after_ms` (the view calls older ones not alive); the tests check it against
/// `view` itself.
#[derive(Debug, Clone, Copy)]
struct Heard {
    version: (u64, u64),
    origin_ms: u64,
    load: f64,
    speed: f64,
    cpus: u32,
    mem_free: u64,
    mem_total: u64,
    blocks_guests: bool,
}

impl Heard {
    fn of(vector: &LoadVector, origin_ms: u64) -> Self {
        Self {
            version: vector.version(),
            origin_ms,
            load: vector.load,
            speed: vector.speed,
            cpus: vector.cpus,
            mem_free: vector.mem_free,
            mem_total: vector.mem_total,
            blocks_guests: vector.blocks_guests(),
        }
    }
}

/// A hasher for node ids: ids are small and distinct, a multiplication spreads them.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// One simulated node.
#[derive(Debug)]
struct SimNode {
    speed: f64,
    /// Jobs running here (not those moving here).
    jobs: Vec<usize>,
    /// Time up to which the jobs' progress is counted.
    clock_us: u64,
    /// Bumped at every change of `jobs`: a completion event of another version is stale.
    version: u64,
    /// infod: run-queue samples of this interval, their sum and count.
    samples: (f64, u32),
    decay: Decay,
    /// The load this node's infod last advertised, and its vector's number (0 before the first).
    load: f64,
    seq: u64,
    engine: Option<Engine>,
    heard: IdMap<Heard>,
    /// migd: moves made lately (destination index, when the job landed).
    departures: Vec<(usize, u64)>,
    mem_used: u64,
}

impl SimNode {
    fn new(speed: f64, decay: Decay, engine: Option<Engine>) -> Self {
        Self {
            speed,
            jobs: Vec::new(),
            clock_us: 0,
            version: 0,
            samples: (0.0, 0),
            decay,
            load: 0.0,
            seq: 0,
            engine,
            heard: IdMap::default(),
            departures: Vec::new(),
            mem_used: 0,
        }
    }

    fn vector(&self, index: usize) -> LoadVector {
        LoadVector {
            node: id(index),
            cpus: 1,
            speed: self.speed,
            load: self.load,
            mem_free: NODE_MEM.saturating_sub(self.mem_used),
            mem_total: NODE_MEM,
            guests: 0,
            flags: 0,
            incarnation: 1,
            seq: self.seq,
        }
    }
}

/// Something that happens at a simulated time.
#[derive(Debug)]
struct Event {
    at_us: u64,
    /// Insertion number: orders simultaneous events, so a run is reproducible.
    order: u64,
    what: What,
}

#[derive(Debug)]
enum What {
    /// The job with the least work left on a node ends, if the node's jobs are still those of `version`.
    Complete { node: usize, version: u64 },
    /// infod of a node samples its run queue (every fourth sample, it advertises).
    Sample(usize),
    /// A datagram arrives.
    Deliver { from: usize, to: usize, msg: Box<Gossip> },
    /// migd of a node decides.
    Decide(usize),
    /// A moving job lands.
    Land { job: usize, from: usize, to: usize },
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.order) == (other.at_us, other.order)
    }
}

impl Eq for Event {}

impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at_us, self.order).cmp(&(other.at_us, other.order))
    }
}

/// The omniscient scheduler's exact picture: per node, the share a newcomer would get, and the share each
/// of its jobs gets (nodes with jobs only).
#[derive(Debug, Default)]
struct Omniscient {
    /// (share a newcomer gets, lowest id first among equals when taking the largest).
    takers: BTreeSet<(u64, Reverse<usize>)>,
    /// (share each job gets, lowest id first among equals when taking the smallest).
    givers: BTreeSet<(u64, usize)>,
    keys: Vec<(u64, Option<u64>)>,
}

/// A positive share as an orderable key (the bits of a positive float order as the float does).
fn share_key(share: f64) -> u64 {
    share.max(0.0).to_bits()
}

impl Omniscient {
    fn new(nodes: &[SimNode]) -> Self {
        let mut o = Self { keys: vec![(0, None); nodes.len()], ..Self::default() };
        for (i, node) in nodes.iter().enumerate() {
            o.keys[i] = Self::keys_of(node);
            o.insert(i);
        }
        o
    }

    fn keys_of(node: &SimNode) -> (u64, Option<u64>) {
        let q = node.jobs.len();
        let taker = share_key(balance::share(node.speed, 1, as_f64(q as u64 + 1)));
        let giver = (q > 0).then(|| share_key(balance::share(node.speed, 1, as_f64(q as u64))));
        (taker, giver)
    }

    fn insert(&mut self, i: usize) {
        let (taker, giver) = self.keys[i];
        self.takers.insert((taker, Reverse(i)));
        if let Some(g) = giver {
            self.givers.insert((g, i));
        }
    }

    fn update(&mut self, i: usize, node: &SimNode) {
        let (taker, giver) = self.keys[i];
        self.takers.remove(&(taker, Reverse(i)));
        if let Some(g) = giver {
            self.givers.remove(&(g, i));
        }
        self.keys[i] = Self::keys_of(node);
        self.insert(i);
    }

    /// The node where a newcomer gets the largest share.
    fn best(&self) -> usize {
        self.takers.last().expect("nodes").1.0
    }

    /// A move that gives a job strictly more than it gets now: (from, to).
    fn worth_moving(&self) -> Option<(usize, usize)> {
        let &(taker, Reverse(to)) = self.takers.last()?;
        let &(giver, from) = self.givers.first()?;
        (to != from && f64::from_bits(taker) > f64::from_bits(giver) * (1.0 + 1e-12)).then_some((from, to))
    }
}

/// Figures of one run, over its measurement window.
#[derive(Debug, Clone)]
struct Outcome {
    /// Jobs arriving in the window.
    arrivals: u64,
    /// Mean slowdown (from time averages, see the module's documentation).
    mean: f64,
    /// Of the jobs that ended in the window: how many, their median and 99th percentile slowdown.
    #[cfg_attr(not(test), expect(dead_code, reason = "the tests check the per-job mean with it"))]
    ended: usize,
    median: f64,
    p99: f64,
    moves_per_job: f64,
    /// Share of the arriving jobs started elsewhere than where they arrived.
    placed_away: f64,
    /// Share of the balancer's moves that landed on a node with a job running, if it moved any.
    landed_on_busy: Option<f64>,
    /// Host seconds.
    wall_s: f64,
    /// Peak resident memory of the process after the run (MiB), if known.
    peak_mib: Option<u64>,
    /// Datagrams the engines refused (there should be none).
    refused: u64,
}

/// One simulated cluster under one policy.
struct Sim {
    spec: Spec,
    params: Params,
    engine_config: EngineConfig,
    nodes: Vec<SimNode>,
    jobs: Vec<Job>,
    queue: BinaryHeap<Reverse<Event>>,
    order: u64,
    arrivals: Peekable<Box<dyn Iterator<Item = Arrival> + Send>>,
    /// The network's losses and delays.
    rng: SmallRng,
    max_speed: f64,
    omniscient: Option<Omniscient>,
    /// The measurement window, in microseconds.
    window_us: Range<u64>,
    /// The run stops here (the end of the window, but for tests).
    end_us: u64,
    now_us: u64,
    refused: u64,
    /// Sum of 1 / length over the jobs in the cluster (running or moving), and its integral over the window.
    inverse_sum: f64,
    inverse_integral: f64,
    /// Integral over the window of the sum over running jobs of their progress (work per second) / length:
    /// the jobs' worth of work done in the window.
    progress_integral: f64,
    /// Time up to which the integral is counted.
    integrated_us: u64,
    /// In the window: jobs arriving, of them started elsewhere; moves; the balancer's moves landing, of them
    /// on a node that had a job.
    arrivals_in_window: u64,
    placed_away: u64,
    moves: u64,
    landed: u64,
    landed_on_busy: u64,
    /// Slowdowns of the jobs that ended in the window, having arrived after the start.
    ended: Vec<f64>,
    /// What a datagram being delivered tells (kept to spare an allocation per datagram).
    news: Vec<(u32, Heard)>,
    /// Checks, at every decision, the mirrored view against `Engine::view` and the shortcut against a call of
    /// `balance` (tests).
    check: bool,
    /// Every decision's inputs and outcome, for tests: (node index, others seen, moved).
    decisions: Option<Vec<(usize, usize, bool)>>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").field("spec", &self.spec).field("now_us", &self.now_us).finish_non_exhaustive()
    }
}

fn id(index: usize) -> u32 {
    u32::try_from(index).expect("at most 65536 nodes") + 1
}

fn index(id: u32) -> usize {
    id as usize - 1
}

fn addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001 + u32::try_from(index).expect("at most 65536 nodes"))
}

/// Combines a seed with run parameters (`SplitMix64` steps), so each stream has its own.
fn mix(seed: u64, parts: &[u64]) -> u64 {
    let mut x = seed;
    for &p in parts {
        x ^= p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(x << 6).wrapping_add(x >> 2);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
    }
    x
}

fn secs(us: u64) -> f64 {
    as_f64(us) / 1e6
}

fn micros(s: f64) -> u64 {
    to_u64((s * 1e6).ceil().max(0.0))
}

impl Sim {
    /// The cluster of `spec` at time 0, with the jobs of the past in place, or those of a smaller cluster.
    fn new(spec: &Spec) -> anyhow::Result<Self> {
        let arrivals: Box<dyn Iterator<Item = Arrival> + Send> = Box::new(Arrivals::new(spec));
        let start = match spec.plan.warm_start {
            Some(w) if spec.policy.infod() => {
                let plan = Plan { warmup_s: 0.0, window_s: w.secs, warm_start: None };
                let mut smaller = Sim::new(&Spec { nodes: w.nodes, plan, ..*spec })?;
                smaller.run_loop()?;
                Start::Tiled(smaller.state())
            }
            _ => Start::Past,
        };
        Self::with_arrivals(spec, arrivals, start)
    }

    /// What every node holds now (a job moving counts on its destination).
    fn state(&self) -> Vec<NodeState> {
        let now = secs(self.now_us);
        let job = |j: usize| {
            let job = &self.jobs[j];
            (job.size, job.left, now - job.start_s, job.rss)
        };
        let mut state: Vec<NodeState> = self
            .nodes
            .iter()
            .map(|n| NodeState { jobs: n.jobs.iter().map(|&j| job(j)).collect(), decay: n.decay.clone(), load: n.load })
            .collect();
        for e in &self.queue {
            if let What::Land { job: j, to, .. } = e.0.what {
                state[to].jobs.push(job(j));
            }
        }
        state
    }

    /// The cluster of `spec` fed `arrivals` from time 0 (those before are the past), started as `start`
    /// says.
    fn with_arrivals(
        spec: &Spec,
        arrivals: Box<dyn Iterator<Item = Arrival> + Send>,
        start: Start,
    ) -> anyhow::Result<Self> {
        let n = spec.nodes;
        let infod = InfodConfig::default();
        let params = Params::default();
        let load = LoadConfig::default();
        ensure!(
            params.interval == Duration::from_millis(infod.interval_ms)
                && (params.rise, params.fall) == (load.rise, load.fall),
            "migd's balance parameters and infod's defaults disagree"
        );
        let engine_config = EngineConfig::from(&infod);
        let mut shared = SmallRng::seed_from_u64(mix(spec.shared_seed(), &[2]));
        let map = Arc::new(ClusterMap::from_nodes((0..n).map(|i| MapNode {
            id: NodeId(id(i)),
            addr: addr(i),
            speed: spec.speed(i),
            mem_weight: 1.0,
            line: 1,
        })));
        let mut nodes = Vec::with_capacity(n);
        // Each node's infod samples at its own phase, and its migd decides at its own.
        let mut phases = Vec::with_capacity(n);
        for i in 0..n {
            let engine_seed: u64 = shared.random();
            phases.push((shared.random_range(0..250_000), shared.random_range(0..1_000_000)));
            let engine = spec
                .policy
                .infod()
                .then(|| Engine::new(NodeId(id(i)), Arc::clone(&map), engine_config.clone(), 1, engine_seed));
            nodes.push(SimNode::new(spec.speed(i), Decay::new(&load), engine));
        }
        let max_speed = nodes.iter().map(|n| n.speed).fold(0.0, f64::max);
        let window_us = micros(spec.plan.warmup_s)..micros(spec.plan.warmup_s + spec.plan.window_s);
        let end_us = window_us.end;
        let mut sim = Self {
            spec: *spec,
            params,
            engine_config,
            nodes,
            jobs: Vec::new(),
            queue: BinaryHeap::new(),
            order: 0,
            arrivals: arrivals.peekable(),
            rng: SmallRng::seed_from_u64(mix(spec.shared_seed(), &[3, spec.policy as u64])),
            max_speed,
            omniscient: None,
            window_us,
            end_us,
            now_us: 0,
            refused: 0,
            inverse_sum: 0.0,
            inverse_integral: 0.0,
            progress_integral: 0.0,
            integrated_us: 0,
            arrivals_in_window: 0,
            placed_away: 0,
            moves: 0,
            landed: 0,
            landed_on_busy: 0,
            ended: Vec::new(),
            news: Vec::new(),
            check: false,
            decisions: None,
        };
        sim.start(start, &mut shared);
        for (i, &(sample_phase, decide_phase)) in phases.iter().enumerate() {
            sim.reschedule(i);
            if spec.policy.infod() {
                sim.push(sample_phase, What::Sample(i));
            }
            if spec.policy.balances() {
                sim.push(decide_phase, What::Decide(i));
            }
        }
        if spec.policy == Policy::Omniscient {
            sim.omniscient = Some(Omniscient::new(&sim.nodes));
            sim.omniscient_rebalance();
        }
        Ok(sim)
    }

    /// Puts the jobs running at time 0 in place, as `start` says, past the arrivals before time 0.
    fn start(&mut self, start: Start, rng: &mut SmallRng) {
        let mut past_jobs = Vec::new();
        while let Some(a) = self.arrivals.next_if(|a| a.at_s < 0.0) {
            past_jobs.push(a);
        }
        match start {
            Start::Empty => {}
            Start::Past if self.spec.policy == Policy::Stay => self.steady_state_queues(rng),
            Start::Past => {
                // As a cluster where every job ran alone at speed 1 would hold them, where they arrived.
                for a in past_jobs.into_iter().filter(|a| a.at_s + a.size > 0.0) {
                    let left = a.at_s + a.size;
                    self.add_job(a, left, a.origin, 0);
                }
            }
            Start::Tiled(state) => {
                for i in 0..self.nodes.len() {
                    let s = &state[i % state.len()];
                    for &(size, left, age, rss) in &s.jobs {
                        self.add_job(Arrival { at_s: -age, origin: i, size, rss }, left, i, 0);
                    }
                    self.nodes[i].decay = s.decay.clone();
                    self.nodes[i].load = s.load;
                }
            }
        }
    }

    /// Every node in the steady state of an M/G/1 queue with processor sharing at the utilisation: a
    /// geometric number of jobs, each with the equilibrium residual of a length.
    fn steady_state_queues(&mut self, rng: &mut SmallRng) {
        let rho = self.spec.utilisation;
        for i in 0..self.nodes.len() {
            let u: f64 = rng.random();
            let q = to_u64(((1.0 - u).ln() / rho.ln()).floor());
            for _ in 0..q {
                let (size, left) = self.spec.lengths.found_running(rng);
                let rss = rng.random_range(RSS_MIB) << 20;
                // It has run (size - left) at some share or other: its start matters to nothing measured.
                self.add_job(Arrival { at_s: left - size, origin: i, size, rss }, left, i, 0);
            }
        }
    }

    fn add_job(&mut self, a: Arrival, left: f64, on: usize, at_us: u64) -> usize {
        let j = self.jobs.len();
        self.jobs.push(Job {
            size: a.size,
            left,
            start_s: a.at_s,
            here_since_us: at_us,
            origin: a.origin,
            rss: a.rss,
            moves: 0,
            done_us: None,
        });
        self.inverse_sum += 1.0 / a.size;
        self.nodes[on].jobs.push(j);
        self.nodes[on].mem_used += a.rss;
        j
    }

    fn push(&mut self, at_us: u64, what: What) {
        self.order += 1;
        self.queue.push(Reverse(Event { at_us, order: self.order, what }));
    }

    /// Counts the progress of node `i`'s jobs up to `t_us`, and in the window, the share of their length it
    /// makes.
    fn advance(&mut self, i: usize, t_us: u64) {
        let node = &mut self.nodes[i];
        if t_us <= node.clock_us {
            return;
        }
        if !node.jobs.is_empty() {
            let rate = balance::share(node.speed, 1, as_f64(node.jobs.len() as u64));
            let work = rate * secs(t_us - node.clock_us);
            let mut inverse = 0.0;
            for &j in &node.jobs {
                self.jobs[j].left -= work;
                inverse += 1.0 / self.jobs[j].size;
            }
            let (w0, w1) = (self.window_us.start, self.window_us.end);
            let in_window = t_us.min(w1).saturating_sub(node.clock_us.max(w0));
            self.progress_integral += rate * secs(in_window) * inverse;
        }
        node.clock_us = t_us;
    }

    /// Schedules the next completion on node `i` (its jobs changed).
    fn reschedule(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.version += 1;
        let Some(least) = node.jobs.iter().map(|&j| self.jobs[j].left).min_by(f64::total_cmp) else { return };
        let rate = balance::share(node.speed, 1, as_f64(node.jobs.len() as u64));
        let at = node.clock_us + micros(least.max(0.0) / rate);
        let version = node.version;
        self.push(at, What::Complete { node: i, version });
    }

    /// Takes job `j` off node `i` at `now_us`.
    fn take_off(&mut self, i: usize, j: usize) {
        self.advance(i, self.now_us);
        let node = &mut self.nodes[i];
        let pos = node.jobs.iter().position(|&k| k == j).expect("the job is on the node");
        node.jobs.swap_remove(pos);
        node.mem_used -= self.jobs[j].rss;
        self.reschedule(i);
    }

    /// Puts job `j` on node `i` at `now_us`.
    fn put_on(&mut self, i: usize, j: usize) {
        self.advance(i, self.now_us);
        self.nodes[i].jobs.push(j);
        self.nodes[i].mem_used += self.jobs[j].rss;
        self.jobs[j].here_since_us = self.now_us;
        self.reschedule(i);
    }

    fn run(mut self) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        self.run_loop()?;
        Ok(self.outcome(started))
    }

    /// Runs events until the end of the run.
    fn run_loop(&mut self) -> anyhow::Result<()> {
        loop {
            let next_arrival = self.arrivals.peek().map_or(u64::MAX, |a| micros(a.at_s));
            let next_event = self.queue.peek().map_or(u64::MAX, |e| e.0.at_us);
            let t = next_arrival.min(next_event);
            if t >= self.end_us {
                self.integrate(self.end_us);
                for i in 0..self.nodes.len() {
                    self.advance(i, self.end_us);
                }
                break;
            }
            self.integrate(t);
            self.now_us = t;
            if next_arrival <= next_event {
                let a = self.arrivals.next().expect("peeked");
                self.arrive(a);
                continue;
            }
            let Reverse(event) = self.queue.pop().expect("peeked");
            match event.what {
                What::Complete { node, version } => self.complete(node, version),
                What::Sample(i) => self.sample(i),
                What::Deliver { from, to, msg } => self.deliver(from, to, *msg),
                What::Decide(i) => self.decide(i)?,
                What::Land { job, from, to } => self.land(job, from, to),
            }
        }
        Ok(())
    }

    /// Counts the jobs in the system from the last event to `t_us` in the window's time averages.
    fn integrate(&mut self, t_us: u64) {
        let (w0, w1) = (self.window_us.start, self.window_us.end);
        let from = self.integrated_us.clamp(w0, w1);
        let to = t_us.clamp(w0, w1);
        self.inverse_integral += self.inverse_sum * secs(to.saturating_sub(from));
        self.integrated_us = t_us;
    }

    fn in_window(&self) -> bool {
        self.window_us.contains(&self.now_us)
    }

    fn arrive(&mut self, a: Arrival) {
        let mut on = a.origin;
        if self.spec.policy.places() {
            let node = &mut self.nodes[a.origin];
            let engine = node.engine.as_mut().expect("placement runs infod");
            on = index(engine.best(MONO_BASE_MS + self.now_us / 1000, a.rss).0);
        }
        if let Some(o) = &self.omniscient {
            on = o.best();
        }
        self.advance(on, self.now_us);
        self.add_job(a, a.size, on, self.now_us);
        if self.in_window() {
            self.arrivals_in_window += 1;
            self.placed_away += u64::from(on != a.origin);
        }
        self.reschedule(on);
        self.omniscient_changed(on);
    }

    fn complete(&mut self, i: usize, version: u64) {
        if self.nodes[i].version != version {
            return;
        }
        self.advance(i, self.now_us);
        let now = self.now_us;
        let node = &mut self.nodes[i];
        let mut k = 0;
        while k < node.jobs.len() {
            let j = node.jobs[k];
            let job = &mut self.jobs[j];
            if job.left <= DONE_EPS * job.size.max(1.0) {
                job.done_us = Some(now);
                self.inverse_sum -= 1.0 / job.size;
                if self.window_us.contains(&now) && job.start_s >= 0.0 {
                    self.ended.push((secs(now) - job.start_s) / job.size);
                }
                node.mem_used -= job.rss;
                node.jobs.swap_remove(k);
            } else {
                k += 1;
            }
        }
        self.reschedule(i);
        self.omniscient_changed(i);
    }

    /// The omniscient scheduler sees node `i`'s change and moves what is worth moving.
    fn omniscient_changed(&mut self, i: usize) {
        let Some(o) = &mut self.omniscient else { return };
        o.update(i, &self.nodes[i]);
        self.omniscient_rebalance();
    }

    fn omniscient_rebalance(&mut self) {
        loop {
            let Some((from, to)) = self.omniscient.as_ref().and_then(Omniscient::worth_moving) else { return };
            self.advance(from, self.now_us);
            let j = *self.nodes[from]
                .jobs
                .iter()
                .max_by(|&&a, &&b| self.jobs[a].left.total_cmp(&self.jobs[b].left).then(b.cmp(&a)))
                .expect("a giver has jobs");
            self.take_off(from, j);
            self.put_on(to, j);
            self.jobs[j].moves += 1;
            if self.in_window() {
                self.moves += 1;
            }
            let o = self.omniscient.as_mut().expect("omniscient");
            o.update(from, &self.nodes[from]);
            o.update(to, &self.nodes[to]);
        }
    }

    /// infod of node `i` samples its run queue; every fourth sample it folds their mean into its load and
    /// sends its datagram of the interval.
    fn sample(&mut self, i: usize) {
        let interval_us = u64::try_from(self.params.interval.as_micros()).expect("a short interval");
        let node = &mut self.nodes[i];
        node.samples.0 += as_f64(node.jobs.len() as u64);
        node.samples.1 += 1;
        self.push(self.now_us + interval_us / 4, What::Sample(i));
        let node = &mut self.nodes[i];
        if node.samples.1 < 4 {
            return;
        }
        node.load = node.decay.update(node.samples.0 / f64::from(node.samples.1));
        node.samples = (0.0, 0);
        node.seq += 1;
        let vector = node.vector(i);
        let now_ms = MONO_BASE_MS + self.now_us / 1000;
        if node.seq.is_multiple_of(PRUNE_EVERY) {
            let down_after = self.engine_config.down_after_ms;
            node.heard.retain(|_, h| now_ms.saturating_sub(h.origin_ms) < down_after);
        }
        let engine = node.engine.as_mut().expect("infod runs");
        let sent = engine.tick(now_ms, WALL_BASE_MS + self.now_us / 1000, vector);
        let Some((to, msg)) = sent else { return };
        engine.note_sent(true);
        if !self.rng.random_bool(LOSS) {
            let at = self.now_us + self.rng.random_range(LATENCY_US);
            self.push(at, What::Deliver { from: i, to: index(to.0), msg: Box::new(msg) });
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Gossip) {
        let now_ms = MONO_BASE_MS + self.now_us / 1000;
        let me = id(to);
        // What the engine will learn from it, as its `learn` does: the sender's own vector, fresh, and the
        // entries about nodes other than this one, with their ages.
        let mut news = std::mem::take(&mut self.news);
        news.clear();
        news.push((msg.own.node, Heard::of(&msg.own, now_ms)));
        for e in &msg.entries {
            if e.vector.node != me && (1..=self.nodes.len()).contains(&(e.vector.node as usize)) {
                news.push((e.vector.node, Heard::of(&e.vector, now_ms.saturating_sub(u64::from(e.age_ms)))));
            }
        }
        let node = &mut self.nodes[to];
        let engine = node.engine.as_mut().expect("infod runs");
        if engine.receive(now_ms, WALL_BASE_MS + self.now_us / 1000, Some(addr(from)), Ok(msg)).is_err() {
            self.refused += 1;
            self.news = news;
            return;
        }
        for &(n, h) in &news {
            match node.heard.entry(n) {
                MapEntry::Occupied(mut held) => {
                    let old = held.get();
                    if h.version > old.version || (h.version == old.version && h.origin_ms > old.origin_ms) {
                        held.insert(h);
                    }
                }
                MapEntry::Vacant(v) => {
                    v.insert(h);
                }
            }
        }
        self.news = news;
    }

    /// migd of node `i` decides, as `balance_once` does; if it moves a job, it decides again as soon as the
    /// job has landed, else an interval later.
    fn decide(&mut self, i: usize) -> anyhow::Result<()> {
        let now = self.now_us;
        let interval_us = u64::try_from(self.params.interval.as_micros()).expect("a short interval");
        let params = self.params;
        let node = &mut self.nodes[i];
        if node.seq == 0 {
            // infod has not measured this node yet: migd learns nothing from it.
            self.push(now + interval_us, What::Decide(i));
            return Ok(());
        }
        let remember = u64::try_from(REMEMBER_FOR.as_micros()).expect("short");
        node.departures.retain(|&(_, at)| now - at < remember);
        let departures: Vec<Departure> = node
            .departures
            .iter()
            .map(|&(to, at)| Departure { to: id(to), ago: Duration::from_micros(now - at), demand: 1.0 })
            .collect();
        let v = node.vector(i);
        let me = balance::Node {
            id: v.node,
            cpus: v.cpus,
            speed: v.speed,
            load: v.load,
            mem_free: v.mem_free,
            mem_total: v.mem_total,
            accepts: !v.blocks_guests(),
        };
        let jobs: Vec<balance::Job> = node
            .jobs
            .iter()
            .map(|&j| {
                let job = &self.jobs[j];
                balance::Job {
                    key: (id(job.origin), i32::try_from(j).expect("fewer than 2^31 jobs")),
                    demand: 1.0,
                    cpu_bound: true,
                    movable: true,
                    rss: job.rss,
                    age: Duration::from_secs_f64((secs(now) - job.start_s).max(0.0)),
                    residence: Duration::from_micros(now - job.here_since_us),
                    // migd: the job has migrated (placement starts a job where it runs).
                    moved: job.moves > 0,
                }
            })
            .collect();
        // `balance` moves nothing when every job came here by a move too lately, or when no node, even idle
        // and of the fastest speed, would beat the share here by the margin; it would only find it out after
        // the list of nodes is built, which costs the most here.
        let settled = jobs.iter().any(|j| !j.moved || j.residence >= params.min_residence);
        let here = Adjusted::new(&me, &[], &departures, &params).here;
        let hopeless = self.max_speed < me.share(here.max(1.0)) * (1.0 + params.margin);
        if (!settled || hopeless) && !self.check {
            self.push(now + interval_us, What::Decide(i));
            return Ok(());
        }
        let now_ms = MONO_BASE_MS + now / 1000;
        let down_after = self.engine_config.down_after_ms;
        let mut others: Vec<balance::Node> = node
            .heard
            .iter()
            .filter(|(_, h)| now_ms.saturating_sub(h.origin_ms) < down_after)
            .map(|(&n, h)| balance::Node {
                id: n,
                cpus: h.cpus,
                speed: h.speed,
                load: h.load,
                mem_free: h.mem_free,
                mem_total: h.mem_total,
                accepts: !h.blocks_guests,
            })
            .collect();
        others.sort_unstable_by_key(|n| n.id);
        if self.check {
            self.check_view(i, now_ms, &me, &others)?;
        }
        let adjusted = Adjusted::new(&me, &others, &departures, &params);
        let decision = match balance::usher(&me, &others, &jobs, &adjusted, &params) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => balance::balance(&me, &others, &jobs, &adjusted, &params),
            Err(stuck) => Err(stuck),
        };
        if self.check {
            ensure!(
                (settled && !hopeless) || decision.is_err(),
                "node {}: the shortcut would have skipped a move: {decision:?}",
                id(i)
            );
        }
        if let Some(d) = &mut self.decisions {
            d.push((i, others.len(), decision.is_ok()));
        }
        let Ok(m) = decision else {
            self.push(now + interval_us, What::Decide(i));
            return Ok(());
        };
        let j = usize::try_from(m.key.1).expect("a job index");
        let to = index(m.to);
        ensure!(to != i && to < self.nodes.len(), "node {} moves job {j} to node {}", id(i), m.to);
        self.take_off(i, j);
        self.jobs[j].moves += 1;
        if self.in_window() {
            self.moves += 1;
        }
        let land = now + micros(params.freeze(self.jobs[j].rss).as_secs_f64());
        self.push(land, What::Land { job: j, from: i, to });
        Ok(())
    }

    /// The others this node's infod calls alive must be what `Engine::view` says, load for load.
    fn check_view(&self, i: usize, now_ms: u64, me: &balance::Node, others: &[balance::Node]) -> anyhow::Result<()> {
        let engine = self.nodes[i].engine.as_ref().expect("balancing runs infod");
        let view = engine.view(now_ms);
        let mine = view.nodes.iter().find(|v| v.id == me.id).context("the view holds this node")?;
        ensure!(mine.load == Some(me.load), "node {}: own load {:?} in the view, {} here", me.id, mine.load, me.load);
        let seen: Vec<(u32, f64)> =
            view.nodes.iter().filter(|v| v.id != me.id && v.alive).map(|v| (v.id, v.load.unwrap_or(-1.0))).collect();
        let mirrored: Vec<(u32, f64)> = others.iter().map(|n| (n.id, n.load)).collect();
        ensure!(seen == mirrored, "node {}: the view has {seen:?}, the mirror {mirrored:?}", me.id);
        Ok(())
    }

    fn land(&mut self, j: usize, from: usize, to: usize) {
        if self.in_window() {
            self.landed += 1;
            self.landed_on_busy += u64::from(!self.nodes[to].jobs.is_empty());
        }
        self.put_on(to, j);
        self.nodes[from].departures.push((to, self.now_us));
        // migd decides again at once after a move, the move counted in the loads it compares.
        self.push(self.now_us, What::Decide(from));
    }

    fn outcome(&self, started: Instant) -> Outcome {
        let mut ended = self.ended.clone();
        ended.sort_unstable_by(f64::total_cmp);
        let arrivals = as_f64(self.arrivals_in_window).max(1.0);
        let done = self.progress_integral.max(f64::MIN_POSITIVE);
        Outcome {
            arrivals: self.arrivals_in_window,
            mean: self.inverse_integral / done,
            ended: ended.len(),
            median: quantile(&ended, 0.5).unwrap_or(0.0),
            p99: quantile(&ended, 0.99).unwrap_or(0.0),
            moves_per_job: as_f64(self.moves) / done,
            placed_away: as_f64(self.placed_away) / arrivals,
            landed_on_busy: (self.landed > 0).then(|| as_f64(self.landed_on_busy) / as_f64(self.landed)),
            wall_s: started.elapsed().as_secs_f64(),
            peak_mib: peak_resident_mib(),
            refused: self.refused,
        }
    }
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = to_u64((q * as_f64(sorted.len() as u64)).ceil()).clamp(1, sorted.len() as u64) - 1;
    Some(sorted[usize::try_from(rank).expect("an index")])
}

/// Every run's figures and how they were obtained.
struct Report {
    args: SimArgs,
    workloads: [Lengths; 2],
    tasks: Vec<Spec>,
    outcomes: Vec<Outcome>,
    total_s: f64,
}

impl Report {
    fn outcome(&self, nodes: usize, lengths: Lengths, policy: Policy) -> Option<&Outcome> {
        self.tasks
            .iter()
            .position(|t| t.nodes == nodes && t.lengths == lengths && t.policy == policy)
            .map(|i| &self.outcomes[i])
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        self.write_markdown(&mut s).expect("writing to a String");
        s
    }

    /// What was simulated and how it was measured.
    fn write_intro(&self, s: &mut String) -> std::fmt::Result {
        let a = &self.args;
        let params = Params::default();
        let nodes: Vec<String> = a.nodes.iter().map(ToString::to_string).collect();
        let scale = if (a.time_scale - 1.0).abs() > f64::EPSILON {
            format!(" --time-scale {}", a.time_scale)
        } else {
            String::new()
        };
        writeln!(
            s,
            "Options: `--nodes {} --utilisation {} --mean-secs {}{}{scale} --seed {:#x}`. A simulation: the figures \
             depend on nothing but these options (the seed drives the arrivals, lengths, sizes, phases and the \
             network; every policy gets the same arrivals). {} simulations took {:.0} s on {} ({} at a time, {} \
             build{}).\n",
            nodes.join(","),
            a.utilisation,
            a.mean_secs,
            if a.mixed_speeds { " --mixed-speeds" } else { "" },
            a.seed,
            self.tasks.len(),
            self.total_s,
            crate::benchmarks::machine(),
            a.threads,
            if cfg!(debug_assertions) { "debug" } else { "release" },
            self.outcomes
                .iter()
                .filter_map(|o| o.peak_mib)
                .max()
                .map_or_else(String::new, |m| format!("; peak resident memory {m} MiB")),
        )?;
        writeln!(
            s,
            "Every node runs infod's `Engine` (default settings: window of 20, a datagram per second to a random \
             peer, 0.1-2 ms latency, 1 % lost) fed its decayed run-queue length (4 samples per interval, rise {}, \
             fall {}), and migd's decision, `balance::usher` then `balance::balance` with `Params::default()` \
             (margin {}, {} s of residence after a move, freeze of 300 ms + the resident size at 500 MB/s, moves \
             counted for 30 s), once per second at its own phase and right after each move it made lands, from the \
             nodes its infod calls alive. Nodes have 1 CPU{} and memory to spare; jobs are CPU-bound, of 50-500 \
             MiB, share their node's CPU equally, make no progress while moving, and arrive as a Poisson process at \
             random nodes for {:.0} % of the cluster's capacity. Lengths: {}; or {}.\n",
            params.rise,
            params.fall,
            params.margin,
            params.min_residence.as_secs(),
            if a.mixed_speeds { " of speed 1.0 or 2.0 alternately" } else { " of speed 1.0" },
            a.utilisation * 100.0,
            self.workloads[0].describe(),
            self.workloads[1].describe(),
        )?;
        writeln!(
            s,
            "Policies: **no balancing** (a job runs where it arrives); **placement only** (dshd's way: it starts on \
             the node `Engine::best` of its arrival node names, as with `mosrun -b`, and never moves); **rmosix \
             balancing** (it starts where it arrives, migd's balancer moves it); **placement + balancing** (both; \
             run below {} nodes); **omniscient** (a central scheduler that knows every node's exact number of jobs: \
             a job starts where it gets the largest share, and whenever a job would get more elsewhere than the \
             jobs of the most loaded node get, one moves at once, without a freeze; an idealised reference, not a \
             strict bound).\n",
            a.place_balance_below,
        )?;
        writeln!(
            s,
            "Slowdown = response time / length at speed 1 alone. Figures are over a window after a warm-up, in \
             steady state. The mean slowdown is the time the jobs spent in the cluster during the window, each \
             second weighted by 1 / length, over the work done in it weighted the same way: by H = λG, the mean \
             over jobs of response time / length, without waiting for the long ones to end (exactly 1 when every \
             job runs alone). Moves per job: the moves made in the window over the jobs' worth of work done in it. \
             Median and p99: of the jobs that ended in the window (at 10,000 nodes, whose runs are 3 minutes \
             long, this leaves out the longest jobs and understates the p99 of no balancing). So that the warm-up \
             reaches the steady state, the cluster starts with the jobs of a past where every job ran alone where \
             it arrived (no balancing: in the steady state of a processor-sharing queue per node); runs with infod \
             on {} nodes or more start instead with the jobs and loads a {}-node cluster held after {:.0} s under \
             the same policy and workload, copied node for node (rmosix balancing takes minutes to reach its \
             steady state from the light start at 1,000 nodes). Last column: the share of the balancer's moves \
             that landed on a node already running a job.\n",
            1_000,
            WARM_START_NODES,
            WARM_START_S * a.time_scale,
        )?;
        Ok(())
    }

    /// The tables of `n` nodes.
    fn write_size(&self, s: &mut String, n: usize) -> std::fmt::Result {
        let a = &self.args;
        let plan = Plan::for_nodes(n, a.time_scale);
        let of_size = || self.tasks.iter().zip(&self.outcomes).filter(move |(t, _)| t.nodes == n);
        let rate = of_size().next().map_or(0.0, |(t, _)| t.rate());
        let host: f64 = of_size().map(|(_, o)| o.wall_s).sum();
        let slowest = of_size().map(|(_, o)| o.wall_s).fold(0.0, f64::max);
        writeln!(
            s,
            "### {n} nodes\n\n{rate:.2} jobs/s; warm-up {:.0} s, window {:.0} s. Host time of the {} runs: \
             {host:.0} s in all, the longest {slowest:.0} s.\n",
            plan.warmup_s,
            plan.window_s,
            of_size().count(),
        )?;
        for &lengths in &self.workloads {
            let Some(omni) = self.outcome(n, lengths, Policy::Omniscient).map(|o| o.mean) else { continue };
            let arrivals = self.outcome(n, lengths, Policy::Omniscient).map_or(0, |o| o.arrivals);
            writeln!(s, "{} lengths, {arrivals} jobs arriving in the window:\n", capitalised(lengths.name()))?;
            writeln!(
                s,
                "| policy | mean slowdown | vs omniscient | median | p99 | moves per job | started elsewhere | \
                 moves onto a busy node |"
            )?;
            writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
            for p in Policy::ALL {
                let Some(o) = self.outcome(n, lengths, p) else { continue };
                writeln!(
                    s,
                    "| {} | {:.3} | {:+.1} % | {:.2} | {:.2} | {:.3} | {} | {} |",
                    p.name(),
                    o.mean,
                    (o.mean / omni - 1.0) * 100.0,
                    o.median,
                    o.p99,
                    o.moves_per_job,
                    percent(o.placed_away),
                    o.landed_on_busy.map_or_else(|| "-".to_owned(), percent),
                )?;
            }
            writeln!(s)?;
        }
        Ok(())
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        self.write_intro(s)?;
        for &n in &self.args.nodes {
            self.write_size(s, n)?;
        }
        let refused: u64 = self.outcomes.iter().map(|o| o.refused).sum();
        if refused > 0 {
            writeln!(s, "Datagrams refused by the engines: {refused} (there should be none).\n")?;
        }
        write!(s, "Summary: `{}`", self.summary())
    }

    /// rmosix balancing against the omniscient scheduler at every size and workload, and the verdict on the
    /// worst of them.
    fn summary(&self) -> String {
        let mut gaps = Vec::new();
        let (mut worst, mut most_moves): (Option<f64>, f64) = (None, 0.0);
        for &n in &self.args.nodes {
            let mut size = Vec::new();
            for &lengths in &self.workloads {
                let (Some(b), Some(omni)) =
                    (self.outcome(n, lengths, Policy::Balance), self.outcome(n, lengths, Policy::Omniscient))
                else {
                    continue;
                };
                let gap = b.mean / omni.mean - 1.0;
                worst = Some(worst.map_or(gap, |w: f64| w.max(gap)));
                most_moves = most_moves.max(b.moves_per_job);
                size.push(format!("{:+.1} %", gap * 100.0));
            }
            gaps.push(format!("{n} nodes {}", size.join(" / ")));
        }
        let met = worst.is_some_and(|w| w <= 0.10) && most_moves < 1.0;
        format!(
            "balance sim: rmosix balancing's mean slowdown over the omniscient scheduler's (exponential / \
             heavy-tailed lengths): {}; up to {most_moves:.2} migrations per job (target within 10 % of omniscient \
             mean slowdown, < 1 migration per job): {}",
            gaps.join(", "),
            crate::benchmarks::verdict(met),
        )
    }
}

fn capitalised(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |c| c.to_uppercase().chain(chars).collect())
}

fn percent(share: f64) -> String {
    if share == 0.0 { "0".to_owned() } else { format!("{:.1} %", share * 100.0) }
}

#[expect(clippy::cast_precision_loss, reason = "counts and times here are far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "callers pass non-negative whole numbers within range; `as` saturates anyway"
)]
fn to_u64(x: f64) -> u64 {
    x as u64
}

/// The process's peak resident memory so far (`VmHWM`), in MiB.
fn peak_resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: usize, policy: Policy, plan: Plan) -> Spec {
        Spec {
            nodes,
            mixed_speeds: false,
            utilisation: 0.7,
            lengths: Lengths::exponential(60.0),
            policy,
            plan,
            seed: 7,
            workload: 0,
        }
    }

    fn job(at_s: f64, origin: usize, size: f64) -> Arrival {
        Arrival { at_s, origin, size, rss: 100 << 20 }
    }

    /// Runs `policy` on `nodes` nodes fed exactly `jobs`, with nothing running at the start, a window of
    /// 2000 s and every check on; returns the figures and the jobs.
    fn run_jobs(nodes: usize, policy: Policy, jobs: Vec<Arrival>) -> (Outcome, Vec<Job>) {
        let plan = Plan { warmup_s: 0.0, window_s: 2_000.0, warm_start: None };
        let mut sim = Sim::with_arrivals(&spec(nodes, policy, plan), Box::new(jobs.into_iter()), Start::Empty).unwrap();
        sim.check = true;
        let started = Instant::now();
        sim.run_loop().unwrap();
        (sim.outcome(started), sim.jobs.clone())
    }

    #[test]
    fn a_lone_job_ends_after_its_length() {
        let (o, jobs) = run_jobs(2, Policy::Stay, vec![job(1.0, 0, 10.0)]);
        assert_eq!((o.arrivals, o.ended), (1, 1));
        assert!((o.mean - 1.0).abs() < 1e-5 && (o.p99 - 1.0).abs() < 1e-5, "{o:?}");
        assert_eq!(jobs[0].done_us, Some(11_000_000));
    }

    #[test]
    fn jobs_on_one_cpu_share_it_equally() {
        let (o, jobs) = run_jobs(1, Policy::Stay, vec![job(0.5, 0, 5.0), job(0.5, 0, 10.0)]);
        // Both at half speed until the short one ends at 10.5 s, then the long one alone: 15.5 s.
        assert_eq!(jobs[0].done_us, Some(10_500_000));
        assert_eq!(jobs[1].done_us, Some(15_500_000));
        // Slowdowns 2 and 1.5.
        assert!((o.mean - 1.75).abs() < 1e-5, "{o:?}");
        let plan = Plan { warmup_s: 0.0, window_s: 1.0, warm_start: None };
        let fast = Spec { mixed_speeds: true, ..spec(2, Policy::Stay, plan) };
        assert!((fast.speed(1) - 2.0).abs() < f64::EPSILON);
        // On a node of speed 2, a 10 s job alone takes 5 s.
        let mut sim = Sim::with_arrivals(&fast, Box::new(std::iter::once(job(0.0, 1, 10.0))), Start::Empty).unwrap();
        sim.end_us = 100_000_000;
        sim.run_loop().unwrap();
        assert_eq!(sim.jobs[0].done_us, Some(5_000_000));
    }

    #[test]
    fn an_idle_cluster_without_balancing_has_slowdown_one() {
        let jobs: Vec<Arrival> =
            (0..50u32).map(|k| job(f64::from(k) * 30.0 + 0.25, (k as usize * 7) % 5, 20.0)).collect();
        let (o, _) = run_jobs(5, Policy::Stay, jobs);
        assert_eq!((o.arrivals, o.ended), (50, 50));
        assert!((o.mean - 1.0).abs() < 1e-5 && (o.p99 - 1.0).abs() < 1e-5, "{o:?}");
        assert!(o.moves_per_job.abs() < f64::EPSILON && o.placed_away.abs() < f64::EPSILON);
    }

    #[test]
    fn the_omniscient_scheduler_spreads_jobs_at_once_and_evens_queues() {
        let (o, _) = run_jobs(3, Policy::Omniscient, vec![job(1.0, 0, 10.0), job(1.0, 0, 10.0), job(1.0, 0, 10.0)]);
        assert!((o.mean - 1.0).abs() < 1e-5, "{o:?}");
        assert!((o.placed_away - 2.0 / 3.0).abs() < 1e-9, "{o:?}");
        // Five jobs on two nodes, two of them short: when a short one ends, a long one moves over.
        let jobs = vec![job(0.0, 0, 2.0), job(0.0, 0, 2.0), job(0.0, 1, 100.0), job(0.0, 1, 100.0), job(0.0, 0, 100.0)];
        let (o, jobs) = run_jobs(2, Policy::Omniscient, jobs);
        assert!(o.moves_per_job > 0.0, "{o:?}");
        // 304 CPU-seconds on two CPUs kept busy until the last two jobs run alone, a third of a second apart.
        assert!(jobs.iter().all(|j| j.done_us.unwrap() <= 152_333_334), "{jobs:?}");
    }

    #[test]
    fn the_balancer_sends_one_of_two_jobs_to_the_idle_node() {
        let (o, jobs) = run_jobs(2, Policy::Balance, vec![job(0.0, 0, 100.0), job(0.0, 0, 100.0)]);
        assert_eq!(jobs.iter().map(|j| j.moves).sum::<u32>(), 1, "{jobs:?}");
        assert_eq!(o.landed_on_busy, Some(0.0));
        // Moved once infod shows the load and the job has run longer than its freeze (0.3 s + 100 MiB at
        // 500 MB/s), then alone.
        let freeze = Params::default().freeze(100 << 20).as_secs_f64();
        let moved = jobs.iter().find(|j| j.moves == 1).unwrap();
        let stayed = jobs.iter().find(|j| j.moves == 0).unwrap();
        let shared_s = secs(moved.here_since_us) - freeze;
        assert!((freeze..5.0).contains(&shared_s), "left after {shared_s} s");
        let moved_end = secs(moved.done_us.unwrap());
        let stayed_end = secs(stayed.done_us.unwrap());
        assert!((moved_end - (100.0 + shared_s / 2.0 + freeze)).abs() < 1e-3, "{moved_end}");
        assert!((stayed_end - (100.0 + shared_s / 2.0)).abs() < 1e-3, "{stayed_end}");
        assert!(o.mean < 1.1, "{o:?}");
    }

    #[test]
    fn the_view_migd_is_given_is_the_engine_s_and_the_shortcut_skips_no_move() {
        // A busy small cluster with placement and balancing: every decision checks that the others are
        // exactly those `Engine::view` calls alive, with their loads, and that a skipped call would not
        // have moved anything.
        let mut s = spec(16, Policy::PlaceBalance, Plan { warmup_s: 30.0, window_s: 120.0, warm_start: None });
        s.utilisation = 0.9;
        s.mixed_speeds = true;
        let mut sim = Sim::new(&s).unwrap();
        sim.check = true;
        sim.decisions = Some(Vec::new());
        let started = Instant::now();
        sim.run_loop().unwrap();
        let o = sim.outcome(started);
        let decisions = sim.decisions.as_ref().unwrap();
        assert!(decisions.len() > 16 * 100, "{}", decisions.len());
        assert!(decisions.iter().filter(|d| d.2).count() > 10, "some moves");
        assert!(decisions.iter().skip(16 * 20).all(|d| d.1 >= 10), "after a while most nodes are known");
        assert_eq!(o.refused, 0);
    }

    #[test]
    fn the_time_average_is_the_mean_over_jobs() {
        // No balancing from its steady state: the time-average estimate over the window against the mean
        // slowdown of the jobs that arrived in it, followed to their end.
        let plan = Plan { warmup_s: 0.0, window_s: 4_000.0, warm_start: None };
        let mut sim = Sim::new(&spec(32, Policy::Stay, plan)).unwrap();
        sim.end_us = 60_000_000_000;
        let started = Instant::now();
        sim.run_loop().unwrap();
        let o = sim.outcome(started);
        let window = sim.window_us.clone();
        let per_job: Vec<f64> = sim
            .jobs
            .iter()
            .filter(|j| j.start_s >= 0.0 && window.contains(&micros(j.start_s)))
            .map(|j| (secs(j.done_us.unwrap()) - j.start_s) / j.size)
            .collect();
        assert_eq!(per_job.len() as u64, o.arrivals);
        let mean = per_job.iter().sum::<f64>() / as_f64(o.arrivals);
        // M/M/1 with processor sharing: 1 / (1 - 0.7).
        assert!((o.mean / mean - 1.0).abs() < 0.05, "time average {} against {mean}", o.mean);
        assert!((mean - 1.0 / 0.3).abs() < 0.4, "{mean}");
    }

    #[test]
    fn a_warm_start_copies_the_smaller_cluster_node_for_node() {
        let plan = Plan { warmup_s: 0.0, window_s: 60.0, warm_start: None };
        let mut sim = Sim::new(&spec(4, Policy::Balance, plan)).unwrap();
        sim.run_loop().unwrap();
        let state = sim.state();
        let held: usize = state.iter().map(|n| n.jobs.len()).sum();
        assert!(held > 0 && state.iter().any(|n| n.load > 0.0), "{state:?}");
        let plan = Plan { warmup_s: 0.0, window_s: 10.0, warm_start: None };
        let start = Start::Tiled(state.clone());
        let large = Sim::with_arrivals(&spec(10, Policy::Balance, plan), Box::new(std::iter::empty()), start).unwrap();
        for (i, node) in large.nodes.iter().enumerate() {
            let copied = &state[i % 4];
            let sizes: Vec<f64> = node.jobs.iter().map(|&j| large.jobs[j].size).collect();
            assert_eq!(sizes, copied.jobs.iter().map(|j| j.0).collect::<Vec<_>>());
            assert!(node.jobs.iter().all(|&j| large.jobs[j].start_s < 0.0 && large.jobs[j].here_since_us == 0));
            assert!((node.load - copied.load).abs() < f64::EPSILON);
        }
    }

    #[test]
    fn runs_are_deterministic_and_policies_share_the_arrivals() {
        let p = Plan { warmup_s: 20.0, window_s: 60.0, warm_start: None };
        let a = Sim::new(&spec(32, Policy::Balance, p)).unwrap().run().unwrap();
        let b = Sim::new(&spec(32, Policy::Balance, p)).unwrap().run().unwrap();
        assert_eq!((a.arrivals, a.mean.to_bits(), a.p99.to_bits()), (b.arrivals, b.mean.to_bits(), b.p99.to_bits()));
        let c = Sim::new(&spec(32, Policy::Omniscient, p)).unwrap().run().unwrap();
        assert_eq!(a.arrivals, c.arrivals, "the same jobs arrive");
        assert!(c.mean <= a.mean, "{c:?} {a:?}");
    }

    #[test]
    fn lengths_have_their_mean() {
        let tail = Lengths::bounded_pareto(TAIL_ALPHA, TAIL_MAX_S, 60.0);
        assert!((tail.mean() - 60.0).abs() < 1e-6, "{tail:?}");
        let Lengths::BoundedPareto { lo, .. } = tail else { panic!("{tail:?}") };
        assert!((12.0..13.0).contains(&lo), "{lo}");
        let mut rng = SmallRng::seed_from_u64(3);
        let n = 1_000_000;
        for lengths in [Lengths::exponential(60.0), tail] {
            let samples: Vec<f64> = (0..n).map(|_| lengths.sample(&mut rng)).collect();
            let mean = samples.iter().sum::<f64>() / f64::from(n);
            assert!((mean - 60.0).abs() < 2.0, "{lengths:?}: {mean}");
            // Found running: the mean length is E[S^2] / E[S], the mean work left half of it.
            let second = samples.iter().map(|x| x * x).sum::<f64>() / f64::from(n);
            let found: Vec<(f64, f64)> = (0..n).map(|_| lengths.found_running(&mut rng)).collect();
            let length = found.iter().map(|f| f.0).sum::<f64>() / f64::from(n);
            let left = found.iter().map(|f| f.1).sum::<f64>() / f64::from(n);
            assert!((length / (second / 60.0) - 1.0).abs() < 0.05, "{lengths:?}: {length} vs {}", second / 60.0);
            assert!((left / (length / 2.0) - 1.0).abs() < 0.05, "{lengths:?}: {left}");
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_summary_says_met_only_within_both_targets() {
        let outcome = |mean: f64, moves_per_job: f64| Outcome {
            arrivals: 100,
            mean,
            ended: 100,
            median: 1.0,
            p99: 2.0,
            moves_per_job,
            placed_away: 0.0,
            landed_on_busy: None,
            wall_s: 0.0,
            peak_mib: None,
            refused: 0,
        };
        let args = SimArgs { nodes: vec![64], ..SimArgs::default() };
        let workloads = [Lengths::exponential(60.0), Lengths::bounded_pareto(TAIL_ALPHA, TAIL_MAX_S, 60.0)];
        let plan = Plan::for_nodes(64, 1.0);
        let mut tasks = Vec::new();
        for (w, &lengths) in workloads.iter().enumerate() {
            for policy in [Policy::Balance, Policy::Omniscient] {
                tasks.push(Spec { lengths, workload: w, ..spec(64, policy, plan) });
            }
        }
        let report = |b: f64, moves: f64| Report {
            args: args.clone(),
            workloads,
            tasks: tasks.clone(),
            outcomes: vec![outcome(b, moves), outcome(1.0, 0.0), outcome(1.05, 0.5), outcome(1.0, 0.0)],
            total_s: 1.0,
        };
        let line = report(1.08, 0.9).summary();
        assert!(line.ends_with(": met") && line.contains("64 nodes +8.0 % / +5.0 %"), "{line}");
        assert!(report(1.12, 0.9).summary().ends_with(": missed"));
        assert!(report(1.08, 1.2).summary().ends_with(": missed"));
        assert!(report(1.08, 0.9).markdown().contains("| rmosix balancing | 1.080 | +8.0 % |"));
    }
}
