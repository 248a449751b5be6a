//! `cargo xtask bench gossip`: infod's probabilistic dissemination at scale, beside an all-to-all exchange.
//!
//! MOSIX's claim for its information dissemination is that per-node traffic and memory stay constant
//! however large the cluster grows, while every node still knows recent news about *some* nodes, enough to
//! pick a good target for a job. dshd, the exchange this project replaces, sends every node's vector to
//! every other node. This benchmark puts numbers on both: it runs the real [`Engine`] of every node (the
//! code infod runs) over a simulated clock and network, so thousands of nodes fit on one machine and a run
//! is reproducible (fixed seeds), and it models the all-to-all exchange on the same tick schedule and loads.
//!
//! The simulation: every node ticks once per interval at its own random phase, with a load that drifts
//! slowly along its own sine curve; datagrams arrive after 0.1-2 ms or are lost (1 %). Each node has its
//! own monotonic clock origin and a wall clock a little off, as real nodes do, because the engine must not
//! need synchronised clocks. After a warm-up one node dies (stops ticking and receiving) and one node that
//! was silent since the start (in the map, never heard of) comes up idle. What is measured, after the
//! warm-up: traffic per node, age of the entries the windows hold, how far the new node spreads, how good
//! the best node of each window is, and how long the dead node lingers.

use std::cmp::{Ordering, Reverse};
use std::sync::Arc;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::f64::consts::TAU;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom as _;
use rand::{RngExt as _, SeedableRng as _};
use rmosix_common::NodeId;
use rmosix_common::config::InfodConfig;
use rmosix_common::key::ClusterKey;
use rmosix_common::load::LoadVector;
use rmosix_common::map::{ClusterMap, Node};
use rmosix_common::wire::{self, Gossip};
use rmosix_infod::engine::{Engine, EngineConfig};

/// Share of datagrams the simulated network loses.
const LOSS: f64 = 0.01;
/// One-way latency of the simulated network, in microseconds.
const LATENCY_US: Range<u64> = 100..2_000;
/// Simulated time before anything is measured: windows fill and ages settle within a few intervals.
const WARMUP_MS: u64 = 15_000;
/// When, after it came up, the share of windows holding the new node is measured.
const JOIN_PROBES_MS: [u64; 3] = [1_000, 5_000, 10_000];
/// Ages and best-node choices are sampled over every node once per second, at a random one of the
/// `POLL_EVERY_MS` rounds of that second, so samples do not always fall at the same point of each node's
/// interval.
const SAMPLE_EVERY_MS: u64 = 1_000;
/// Resolution of the dead node's exit from the windows.
const POLL_EVERY_MS: u64 = 100;
/// Resolution of the dead node's exit from the views; coarser, as `Engine::view` costs O(N) per observer.
const VIEW_POLL_EVERY_MS: u64 = 500;
/// Most observers whose `view()` is polled for the dead node.
const MAX_VIEW_OBSERVERS: usize = 200;
/// Observers whose `view()` is read at the end to see how much of the cluster it calls alive.
const ALIVE_OBSERVERS: usize = 50;
/// Origin of the simulated monotonic clocks: large, so ages computed by subtraction never saturate at 0.
const MONO_BASE_MS: u64 = 1 << 40;
/// Origin of the simulated wall clocks (milliseconds since the epoch, in 2027).
const WALL_BASE_MS: u64 = 1_800_000_000_000;
/// Largest offset of a node's wall clock from true time, in milliseconds; well within `max_clock_skew_ms`.
const WALL_SKEW_MS: u64 = 500;
/// CPUs of every simulated node.
const CPUS: u32 = 4;
/// Seed of every run, so runs are reproducible.
const SEED: u64 = 0x00c0_ffee_6055_1b00;
/// Title of this benchmark's section of BENCHMARKS.md.
const TITLE: &str = "gossip: infod's dissemination against all-to-all";

pub fn run(args: &crate::GossipBenchArgs) -> anyhow::Result<()> {
    let infod = InfodConfig::default();
    let config = EngineConfig::from(&infod);
    let last_probe_ms = WARMUP_MS + JOIN_PROBES_MS[JOIN_PROBES_MS.len() - 1];
    ensure!(
        args.seconds * 1000 > last_probe_ms,
        "--seconds {} is too short: the new node is watched until {} s",
        args.seconds,
        last_probe_ms / 1000
    );
    ensure!(!args.nodes.is_empty(), "--nodes is empty");
    for &n in &args.nodes {
        ensure!(
            (4..=65_536).contains(&n),
            "--nodes {n}: a run needs 4 to 65536 nodes (a dead one, a new one and others)"
        );
    }
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for &n in &args.nodes {
        let run_started = Instant::now();
        eprintln!("bench gossip: {n} nodes, {} simulated s ...", args.seconds);
        let mut outcome = Sim::new(n, args.seconds, config.clone(), infod.interval_ms).run()?;
        outcome.wall_s = run_started.elapsed().as_secs_f64();
        outcome.peak_mib = peak_resident_mib();
        eprintln!(
            "bench gossip: {n} nodes done in {:.1} s (median age {:.1} s, {:.2} msg/node/s)",
            outcome.wall_s,
            ms_to_s(outcome.age_ms.0),
            outcome.msgs_per_s
        );
        outcomes.push(outcome);
    }
    let report = Report { outcomes, seconds: args.seconds, config, interval_ms: infod.interval_ms };
    let body = report.markdown(started.elapsed().as_secs_f64())?;
    println!("## {TITLE}\n\n{body}");
    if !args.no_write {
        crate::benchmarks::update_section("gossip", TITLE, &body)?;
    }
    println!("{}", report.summary());
    Ok(())
}

/// A node's load over time: a slow sine around its own base, so loads differ between nodes and drift, and
/// information a few seconds old is a little wrong, as in a real cluster.
#[derive(Debug, Clone, Copy)]
struct LoadCurve {
    base: f64,
    amplitude: f64,
    period_ms: f64,
    phase: f64,
}

impl LoadCurve {
    /// A node with nothing to do: the one every window should want once it hears of it.
    fn idle() -> Self {
        Self { base: 0.0, amplitude: 0.0, period_ms: 1.0, phase: 0.0 }
    }

    /// A busy node; the swing never takes the load below 0, so no two nodes tie for long.
    fn random(rng: &mut SmallRng) -> Self {
        let base = rng.random_range(0.0..4.0);
        Self {
            base,
            amplitude: rng.random_range(0.0..1.0_f64.min(base)),
            period_ms: rng.random_range(60_000.0..600_000.0),
            phase: rng.random_range(0.0..TAU),
        }
    }

    fn at(&self, t_us: u64) -> f64 {
        let ms = as_f64(t_us) / 1000.0;
        (self.base + self.amplitude * (TAU * ms / self.period_ms + self.phase).sin()).max(0.0)
    }
}

/// Whether a simulated node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// In the map but not started yet: the node that comes up after the warm-up.
    Silent,
    Up,
    /// Stopped after the warm-up: neither ticks nor receives.
    Dead,
}

/// One simulated node: its engine and what the simulation knows about it that the engine does not.
#[derive(Debug)]
struct SimNode {
    /// The real dissemination logic; `None` while silent or dead.
    engine: Option<Engine>,
    status: Status,
    load: LoadCurve,
    /// Where this node's monotonic clock reads 0, relative to simulated time.
    mono_origin_ms: u64,
    /// This node's wall clock at simulated time 0.
    wall_origin_ms: u64,
    incarnation: u64,
    seq: u64,
    /// Simulated time of the last tick, for the all-to-all model (its vector was sent to everyone then).
    last_tick_us: u64,
    /// Placement cost of the vector sent at the last tick (what every node holds in the all-to-all model).
    last_cost: f64,
    /// Datagrams received in the current simulated second, to find the busiest node-second.
    received_this_second: u32,
}

impl SimNode {
    fn now_ms(&self, t_us: u64) -> u64 {
        self.mono_origin_ms + t_us / 1000
    }

    fn wall_ms(&self, t_us: u64) -> u64 {
        self.wall_origin_ms + t_us / 1000
    }

    fn vector(&self, id: u32, t_us: u64) -> LoadVector {
        LoadVector {
            node: id,
            cpus: CPUS,
            speed: 1.0,
            load: self.load.at(t_us),
            mem_free: 8 << 30,
            mem_total: 16 << 30,
            guests: 0,
            flags: 0,
            incarnation: self.incarnation,
            seq: self.seq,
        }
    }

    fn true_cost(&self, id: u32, t_us: u64) -> f64 {
        self.vector(id, t_us).placement_cost()
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
    /// Node (index) measures and sends.
    Tick(usize),
    /// A datagram arrives.
    Deliver { from: usize, to: usize, msg: Gossip },
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

/// Counts of integer values from 0 to a bound (values above it land in the last bin): exact quantiles of
/// millions of ages without keeping them.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    fn new(bound: u64) -> Self {
        Self { counts: vec![0; to_usize(bound) + 1], total: 0 }
    }

    fn add(&mut self, value: u64) {
        let last = self.counts.len() - 1;
        self.counts[to_usize(value).min(last)] += 1;
        self.total += 1;
    }

    /// Nearest-rank quantile `q` (0 < q ≤ 1), `None` when empty.
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = nearest_rank(self.total, q) + 1;
        let mut seen = 0;
        self.counts
            .iter()
            .position(|&c| {
                seen += c;
                seen >= rank
            })
            .map(|i| i as u64)
    }
}

/// Index (0-based) of the nearest-rank `q` quantile among `n` sorted values.
fn nearest_rank(n: u64, q: f64) -> u64 {
    let rank = (q * as_f64(n)).ceil();
    to_u64(rank).clamp(1, n.max(1)) - 1
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[to_usize(nearest_rank(sorted.len() as u64, q))])
}

/// The dead node's exit, as observed.
#[derive(Debug, Default)]
struct DeathWatch {
    /// Windows holding the dead node when it died.
    holders: usize,
    /// Time after the death when at most 1 % of that many windows held it.
    left_ms: Option<u64>,
    /// Time after the death when at most 1 % of that many windows still offered it to `best` (age below
    /// `down_after_ms`).
    unchoosable_ms: Option<u64>,
    /// Observers (holders at death) whose `view()` is polled, with when each first showed it down.
    views: Vec<(usize, Option<u64>)>,
}

/// What one run accumulates.
#[derive(Debug)]
struct Measures {
    /// True from the end of the warm-up.
    on: bool,
    /// Round of the current second at which ages and choices are sampled.
    sample_at_ms: u64,
    sent: u64,
    bytes: u64,
    entries: u64,
    lost: u64,
    /// Datagrams to the silent or dead node.
    to_down: u64,
    /// Datagrams the engines refused, by reason: there should be none.
    refused: BTreeMap<String, u64>,
    busiest_second: u32,
    ages: Histogram,
    window_len_sum: u64,
    window_samples: u64,
    ranks: Vec<f64>,
    dead_picks: u64,
    a2a_ages: Histogram,
    a2a_ranks: Vec<f64>,
    /// Windows holding the new node, and other live nodes, at each of `JOIN_PROBES_MS`.
    join: Vec<(usize, usize)>,
    death: DeathWatch,
    /// Mean share of the map an observer's `view()` calls alive, at the end.
    alive_share: f64,
}

impl Measures {
    fn new(max_age_ms: u64) -> Self {
        Self {
            on: false,
            sample_at_ms: 0,
            sent: 0,
            bytes: 0,
            entries: 0,
            lost: 0,
            to_down: 0,
            refused: BTreeMap::new(),
            busiest_second: 0,
            ages: Histogram::new(max_age_ms),
            window_len_sum: 0,
            window_samples: 0,
            ranks: Vec::new(),
            dead_picks: 0,
            a2a_ages: Histogram::new(max_age_ms),
            a2a_ranks: Vec::new(),
            join: Vec::new(),
            death: DeathWatch::default(),
            alive_share: 0.0,
        }
    }
}

/// Figures of one run, ready to print.
#[derive(Debug)]
struct Outcome {
    nodes: usize,
    /// Seconds this run took on the host, engines' construction and teardown included.
    wall_s: f64,
    /// Peak resident memory of the process after this run (MiB), if known.
    peak_mib: Option<u64>,
    msgs_per_s: f64,
    bytes_per_s: f64,
    mean_datagram: f64,
    mean_entries: f64,
    busiest_second: u32,
    lost: u64,
    to_down: u64,
    refused: BTreeMap<String, u64>,
    window_fill: f64,
    /// (median, p99) in milliseconds.
    age_ms: (u64, u64),
    join: Vec<(usize, usize)>,
    /// (median, p99) as a share of the cluster, 0 = least loaded.
    rank: (f64, f64),
    dead_pick_share: f64,
    death: DeathWatch,
    alive_share: f64,
    a2a_datagram: usize,
    a2a_age_ms: (u64, u64),
    a2a_rank: (f64, f64),
    /// Time after the death until every node that received its last vector sees it down.
    a2a_down_ms: u64,
}

/// One simulated cluster.
#[derive(Debug)]
struct Sim {
    seconds: u64,
    config: EngineConfig,
    interval_ms: u64,
    map: Arc<ClusterMap>,
    nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<Event>>,
    order: u64,
    /// Drives the network and the samples; the engines have their own seeds.
    rng: SmallRng,
    key: ClusterKey,
    /// Datagram bytes by number of entries carried: the encoding is a fixed size per entry count, so each
    /// size is encoded once (HMAC-SHA256 of every datagram would dominate a debug build's run time).
    sizes: HashMap<usize, usize>,
    dead: usize,
    joiner: usize,
    m: Measures,
}

fn addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0001 + u32::try_from(index).expect("at most 65536 nodes"))
}

fn id(index: usize) -> u32 {
    u32::try_from(index).expect("at most 65536 nodes") + 1
}

impl Sim {
    fn new(n: usize, seconds: u64, config: EngineConfig, interval_ms: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(SEED ^ n as u64);
        let map = Arc::new(ClusterMap::from_nodes((0..n).map(|i| Node {
            id: NodeId(id(i)),
            addr: addr(i),
            speed: 1.0,
            mem_weight: 1.0,
            line: 1,
        })));
        let joiner = n - 1;
        let dead = rng.random_range(0..joiner);
        let mut sim = Self {
            seconds,
            interval_ms,
            map,
            nodes: Vec::with_capacity(n),
            queue: BinaryHeap::with_capacity(2 * n),
            order: 0,
            key: ClusterKey::from_bytes(b"bench gossip: a simulated cluster key"),
            sizes: HashMap::new(),
            dead,
            joiner,
            m: Measures::new(config.max_age_ms),
            config,
            rng,
        };
        for i in 0..n {
            let wall_origin_ms = WALL_BASE_MS - WALL_SKEW_MS + sim.rng.random_range(0..2 * WALL_SKEW_MS);
            let node = SimNode {
                engine: None,
                status: Status::Silent,
                load: if i == joiner { LoadCurve::idle() } else { LoadCurve::random(&mut sim.rng) },
                mono_origin_ms: MONO_BASE_MS + sim.rng.random_range(0..1_000_000_000),
                wall_origin_ms,
                incarnation: wall_origin_ms * 1_000_000,
                seq: 0,
                last_tick_us: 0,
                last_cost: 0.0,
                received_this_second: 0,
            };
            sim.nodes.push(node);
            if i != joiner {
                let phase_us = sim.rng.random_range(0..interval_ms * 1000);
                sim.start(i, phase_us);
            }
        }
        sim
    }

    /// Brings node `i` up with a fresh engine, its first tick at `at_us`.
    fn start(&mut self, i: usize, at_us: u64) {
        let seed = self.rng.random();
        let node = &mut self.nodes[i];
        node.incarnation += at_us * 1000;
        node.engine =
            Some(Engine::new(NodeId(id(i)), Arc::clone(&self.map), self.config.clone(), node.incarnation, seed));
        node.status = Status::Up;
        self.push(at_us, What::Tick(i));
    }

    fn push(&mut self, at_us: u64, what: What) {
        self.order += 1;
        self.queue.push(Reverse(Event { at_us, order: self.order, what }));
    }

    fn run(mut self) -> anyhow::Result<Outcome> {
        let end_ms = self.seconds * 1000;
        let mut probe_ms = 0;
        loop {
            let next_event_us = self.queue.peek().map_or(u64::MAX, |e| e.0.at_us);
            if probe_ms * 1000 <= next_event_us {
                if probe_ms >= end_ms {
                    break;
                }
                self.probe(probe_ms);
                probe_ms += POLL_EVERY_MS;
                continue;
            }
            let Reverse(event) = self.queue.pop().expect("peeked");
            match event.what {
                What::Tick(i) => self.tick(i, event.at_us)?,
                What::Deliver { from, to, msg } => self.deliver(from, to, msg, event.at_us),
            }
        }
        self.measure_alive_share(end_ms * 1000);
        self.outcome()
    }

    fn tick(&mut self, i: usize, at_us: u64) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if node.status != Status::Up {
            return Ok(());
        }
        node.seq += 1;
        let vector = node.vector(id(i), at_us);
        node.last_tick_us = at_us;
        node.last_cost = vector.placement_cost();
        let (now, wall) = (node.now_ms(at_us), node.wall_ms(at_us));
        let engine = node.engine.as_mut().expect("an up node runs an engine");
        let sent = engine.tick(now, wall, vector);
        if sent.is_some() {
            engine.note_sent(true);
        }
        self.push(at_us + self.interval_ms * 1000, What::Tick(i));
        let Some((to, msg)) = sent else { return Ok(()) };
        if self.m.on {
            self.m.sent += 1;
            self.m.bytes += self.datagram_len(&msg)? as u64;
            self.m.entries += msg.entries.len() as u64;
        }
        if self.rng.random_bool(LOSS) {
            if self.m.on {
                self.m.lost += 1;
            }
        } else {
            let at = at_us + self.rng.random_range(LATENCY_US);
            self.push(at, What::Deliver { from: i, to: to.0 as usize - 1, msg });
        }
        Ok(())
    }

    /// Bytes of `msg` on the wire, from the real encoder.
    fn datagram_len(&mut self, msg: &Gossip) -> anyhow::Result<usize> {
        let check = self.m.sent.is_multiple_of(4096);
        if let Some(&len) = self.sizes.get(&msg.entries.len())
            && !check
        {
            return Ok(len);
        }
        let len = wire::encode(&self.key, msg).context("encoding a simulated datagram")?.len();
        if let Some(&cached) = self.sizes.get(&msg.entries.len()) {
            ensure!(cached == len, "datagrams of {} entries vary in size", msg.entries.len());
        }
        self.sizes.insert(msg.entries.len(), len);
        Ok(len)
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Gossip, at_us: u64) {
        let node = &mut self.nodes[to];
        if node.status != Status::Up {
            if self.m.on {
                self.m.to_down += 1;
            }
            return;
        }
        let (now, wall) = (node.now_ms(at_us), node.wall_ms(at_us));
        let engine = node.engine.as_mut().expect("an up node runs an engine");
        node.received_this_second += 1;
        if let Err(drop) = engine.receive(now, wall, Some(addr(from)), Ok(msg)) {
            *self.m.refused.entry(format!("{drop:?}")).or_default() += 1;
        }
    }

    /// Everything that happens at round `round_ms`, before the events of that instant.
    fn probe(&mut self, round_ms: u64) {
        let t_us = round_ms * 1000;
        if round_ms.is_multiple_of(1000) {
            for node in &mut self.nodes {
                if self.m.on {
                    self.m.busiest_second = self.m.busiest_second.max(node.received_this_second);
                }
                node.received_this_second = 0;
            }
        }
        if round_ms == WARMUP_MS {
            self.m.on = true;
            self.kill(t_us);
            let at = t_us + self.rng.random_range(0..1000);
            self.start(self.joiner, at);
        }
        if !self.m.on {
            return;
        }
        if round_ms.is_multiple_of(SAMPLE_EVERY_MS) {
            self.m.sample_at_ms =
                round_ms + POLL_EVERY_MS * self.rng.random_range(0..SAMPLE_EVERY_MS / POLL_EVERY_MS);
        }
        if round_ms == self.m.sample_at_ms {
            self.sample(t_us);
        }
        if JOIN_PROBES_MS.iter().any(|&d| round_ms == WARMUP_MS + d) {
            let held = self.holders(self.joiner, t_us, self.config.max_age_ms);
            let others = self.live().count() - 1;
            self.m.join.push((held, others));
        }
        if round_ms > WARMUP_MS {
            self.watch_dead(round_ms - WARMUP_MS, t_us);
        }
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].status == Status::Up)
    }

    /// Live nodes whose window holds `subject` younger than `max_age_ms` (their engine would send or use it).
    fn holders(&self, subject: usize, t_us: u64, max_age_ms: u64) -> usize {
        self.live().filter(|&o| self.holds(o, subject, t_us, max_age_ms)).count()
    }

    fn holds(&self, observer: usize, subject: usize, t_us: u64, max_age_ms: u64) -> bool {
        let node = &self.nodes[observer];
        let engine = node.engine.as_ref().expect("an up node runs an engine");
        engine.window().get(id(subject)).is_some_and(|e| e.age_ms(node.now_ms(t_us)) < max_age_ms)
    }

    /// Stops the node chosen to die and notes who knew of it.
    fn kill(&mut self, t_us: u64) {
        let dead = self.dead;
        let mut holders: Vec<usize> =
            self.live().filter(|&o| o != dead && self.holds(o, dead, t_us, self.config.max_age_ms)).collect();
        self.m.death.holders = holders.len();
        holders.shuffle(&mut self.rng);
        holders.truncate(MAX_VIEW_OBSERVERS);
        self.m.death.views = holders.into_iter().map(|o| (o, None)).collect();
        let node = &mut self.nodes[dead];
        node.status = Status::Dead;
        node.engine = None;
    }

    fn watch_dead(&mut self, since_ms: u64, t_us: u64) {
        let dead = self.dead;
        let holders = self.m.death.holders;
        if self.m.death.left_ms.is_none() && self.holders(dead, t_us, self.config.max_age_ms) * 100 <= holders
        {
            self.m.death.left_ms = Some(since_ms);
        }
        if self.m.death.unchoosable_ms.is_none()
            && self.holders(dead, t_us, self.config.down_after_ms) * 100 <= holders
        {
            self.m.death.unchoosable_ms = Some(since_ms);
        }
        if since_ms.is_multiple_of(VIEW_POLL_EVERY_MS) {
            let mut views = std::mem::take(&mut self.m.death.views);
            for (observer, down) in views.iter_mut().filter(|(_, down)| down.is_none()) {
                let node = &self.nodes[*observer];
                let engine = node.engine.as_ref().expect("observers stay up");
                let view = engine.view(node.now_ms(t_us));
                if view.nodes.iter().any(|v| v.id == id(dead) && !v.alive) {
                    *down = Some(since_ms);
                }
            }
            self.m.death.views = views;
        }
    }

    /// Ages of every window entry, each window's best node, and the all-to-all model's, at `t_us`.
    fn sample(&mut self, t_us: u64) {
        let live: Vec<usize> = self.live().collect();
        let mut costs: Vec<f64> = live.iter().map(|&j| self.nodes[j].true_cost(id(j), t_us)).collect();
        costs.sort_unstable_by(f64::total_cmp);
        let rank =
            |cost: f64| as_f64(costs.partition_point(|&c| c < cost) as u64) / as_f64(costs.len() as u64 - 1);
        for &o in &live {
            let node = &self.nodes[o];
            let engine = node.engine.as_ref().expect("an up node runs an engine");
            let now = node.now_ms(t_us);
            let mut held = 0;
            for e in engine.window().iter() {
                let age = e.age_ms(now);
                if age < self.config.max_age_ms {
                    self.m.ages.add(age);
                    held += 1;
                }
            }
            self.m.window_len_sum += held;
            self.m.window_samples += 1;
            if node.seq == 0 {
                continue; // has not measured itself yet: its engine has no own vector to compare with
            }
            let chosen = self.best_of_window(o, now) as usize - 1;
            let chosen_node = &self.nodes[chosen];
            if chosen_node.status == Status::Up {
                self.m.ranks.push(rank(chosen_node.true_cost(id(chosen), t_us)));
            } else {
                self.m.dead_picks += 1;
                self.m.ranks.push(1.0);
            }
        }
        // All-to-all: every node holds every other node's last sent vector, whose age is the time since
        // that node's last tick plus one interval per datagram lost in a row. A node that has not sent yet
        // (the new one, in its first millisecond) is not known.
        let live: Vec<usize> = live.into_iter().filter(|&j| self.nodes[j].seq > 0).collect();
        for &j in &live {
            let mut age = (t_us - self.nodes[j].last_tick_us) / 1000;
            while self.rng.random_bool(LOSS) {
                age += self.interval_ms;
            }
            self.m.a2a_ages.add(age);
        }
        // The dead node stays a candidate until it is down, as it does in the windows.
        let dead = &self.nodes[self.dead];
        let dead_known =
            dead.status == Status::Dead && (t_us - dead.last_tick_us) / 1000 < self.config.down_after_ms;
        let chosen = live
            .iter()
            .copied()
            .chain(dead_known.then_some(self.dead))
            .min_by(|&a, &b| self.nodes[a].last_cost.total_cmp(&self.nodes[b].last_cost).then(a.cmp(&b)))
            .expect("live nodes");
        let chosen_node = &self.nodes[chosen];
        let a2a_rank = if chosen_node.status == Status::Up {
            rank(chosen_node.true_cost(id(chosen), t_us))
        } else {
            1.0
        };
        self.m.a2a_ranks.push(a2a_rank);
    }

    /// The node `Engine::best` would choose for a job needing no memory, without counting a job there.
    fn best_of_window(&self, observer: usize, now_ms: u64) -> u32 {
        let node = &self.nodes[observer];
        node.engine.as_ref().expect("an up node runs an engine").peek_best(now_ms, 0).0
    }

    fn measure_alive_share(&mut self, t_us: u64) {
        let mut observers: Vec<usize> = self.live().collect();
        observers.shuffle(&mut self.rng);
        observers.truncate(ALIVE_OBSERVERS);
        let mut sum = 0.0;
        for &o in &observers {
            let node = &self.nodes[o];
            let view = node.engine.as_ref().expect("live").view(node.now_ms(t_us));
            let alive = view.nodes.iter().filter(|v| v.alive).count();
            sum += as_f64(alive as u64) / as_f64(view.nodes.len() as u64);
        }
        self.m.alive_share = sum / as_f64(observers.len() as u64);
    }

    fn outcome(self) -> anyhow::Result<Outcome> {
        let m = self.m;
        let n = self.nodes.len();
        // One node is dead and one has come up from the warm-up on: n - 1 nodes ran the whole measurement.
        let node_seconds = as_f64((n as u64 - 1) * (self.seconds * 1000 - WARMUP_MS)) / 1000.0;
        let mut ranks = m.ranks;
        ranks.sort_unstable_by(f64::total_cmp);
        let mut a2a_ranks = m.a2a_ranks;
        a2a_ranks.sort_unstable_by(f64::total_cmp);
        let q = |h: &Histogram| (h.quantile(0.5).unwrap_or(0), h.quantile(0.99).unwrap_or(0));
        let qf = |v: &[f64]| (quantile(v, 0.5).unwrap_or(0.0), quantile(v, 0.99).unwrap_or(0.0));
        let dead = &self.nodes[self.dead];
        let a2a_down_ms = (dead.last_tick_us / 1000 + self.config.down_after_ms).saturating_sub(WARMUP_MS);
        let own_only = Gossip {
            sender: 1,
            incarnation: dead.incarnation,
            counter: 1,
            sent_at_ms: WALL_BASE_MS,
            own: dead.vector(1, 0),
            entries: Vec::new(),
        };
        let a2a_datagram =
            wire::encode(&self.key, &own_only).context("encoding a one-vector datagram")?.len();
        Ok(Outcome {
            nodes: n,
            wall_s: 0.0,
            peak_mib: None,
            msgs_per_s: as_f64(m.sent) / node_seconds,
            bytes_per_s: as_f64(m.bytes) / node_seconds,
            mean_datagram: as_f64(m.bytes) / as_f64(m.sent.max(1)),
            mean_entries: as_f64(m.entries) / as_f64(m.sent.max(1)),
            busiest_second: m.busiest_second,
            lost: m.lost,
            to_down: m.to_down,
            refused: m.refused,
            window_fill: as_f64(m.window_len_sum) / as_f64(m.window_samples.max(1)),
            age_ms: q(&m.ages),
            join: m.join,
            rank: qf(&ranks),
            dead_pick_share: as_f64(m.dead_picks) / as_f64(ranks.len().max(1) as u64),
            death: m.death,
            alive_share: m.alive_share,
            a2a_datagram,
            a2a_age_ms: q(&m.a2a_ages),
            a2a_rank: qf(&a2a_ranks),
            a2a_down_ms,
        })
    }
}

/// Every run's figures, and how they were obtained.
#[derive(Debug)]
struct Report {
    outcomes: Vec<Outcome>,
    seconds: u64,
    config: EngineConfig,
    interval_ms: u64,
}

impl Report {
    fn markdown(&self, total_s: f64) -> anyhow::Result<String> {
        let mut s = String::new();
        let c = &self.config;
        writeln!(
            s,
            "Reproduce: `cargo xtask bench gossip --nodes {} --seconds {}` (add `--no-write` to leave this \
             file alone). Run {} on {}, {} build of xtask; {:.0} s in all.\n",
            self.outcomes.iter().map(|o| o.nodes.to_string()).collect::<Vec<_>>().join(","),
            self.seconds,
            crate::benchmarks::machine(),
            cpu_model(),
            if cfg!(debug_assertions) { "debug" } else { "release" },
            total_s
        )?;
        writeln!(
            s,
            "The real `rmosix_infod::engine::Engine` of every node over a simulated clock and network: one \
             tick per {} ms per node at its own phase, latency 0.1-2 ms, {:.0} % datagrams lost, node clocks \
             with different origins and wall clocks up to ±{} ms off. Default settings: window {}, {} entries \
             per datagram, entries leave at {} s, a node is down after {} s. Loads drift slowly (sine of \
             period 1-10 min around a base of 0-4 on {} CPUs). {} simulated s per cluster size; measurements \
             start after a {} s warm-up, when one node dies and one idle node, silent until then, comes up. \
             Datagram sizes come from `rmosix_common::wire::encode` (UDP payload; IP and UDP headers add 28 \
             bytes).\n",
            self.interval_ms,
            LOSS * 100.0,
            WALL_SKEW_MS,
            c.window,
            c.gossip_entries,
            c.max_age_ms / 1000,
            c.down_after_ms / 1000,
            CPUS,
            self.seconds,
            WARMUP_MS / 1000
        )?;
        writeln!(
            s,
            "All-to-all (dshd's way) is a model on the same tick schedule and loads, not a simulation of \
             its N² datagrams: each node sends its vector alone to every other node every interval, so every \
             node holds every vector as of its sender's last tick, one interval older per datagram lost in a \
             row; a new node is known by all who received its first datagram; a dead node is down \
             `down_after` after its last vector.\n"
        )?;
        self.traffic(&mut s)?;
        self.ages(&mut s)?;
        self.join(&mut s)?;
        self.ranks(&mut s)?;
        self.death(&mut s)?;
        self.anomalies(&mut s)?;
        write!(s, "Summary: `{}`", self.summary())?;
        Ok(s)
    }

    fn traffic(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### Traffic per node\n")?;
        writeln!(
            s,
            "Datagrams sent per node per second; bytes sent per node per second; mean datagram size and \
             entries carried; the most datagrams one node received in one second.\n"
        )?;
        writeln!(
            s,
            "| nodes | gossip msg/node/s | gossip bytes/node/s | datagram (entries) | busiest node-second \
             | all-to-all msg/node/s | all-to-all bytes/node/s |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|")?;
        for o in &self.outcomes {
            let a2a_msgs = o.nodes - 1;
            writeln!(
                s,
                "| {} | {:.2} | {}/s | {} B ({:.1}) | {} | {} | {}/s |",
                o.nodes,
                o.msgs_per_s,
                bytes(o.bytes_per_s),
                o.mean_datagram.round(),
                o.mean_entries,
                o.busiest_second,
                a2a_msgs,
                bytes(as_f64((a2a_msgs * o.a2a_datagram) as u64))
            )?;
        }
        writeln!(s)
    }

    fn ages(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### Age of the information held\n")?;
        writeln!(
            s,
            "Gossip: the age of every entry of every window, sampled each second. All-to-all: the age of \
             every vector a node holds (one per node).\n"
        )?;
        writeln!(
            s,
            "| nodes | entries per window | gossip median | gossip p99 | all-to-all median | all-to-all p99 |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|")?;
        for o in &self.outcomes {
            writeln!(
                s,
                "| {} | {:.1} | {:.2} s | {:.2} s | {:.2} s | {:.2} s |",
                o.nodes,
                o.window_fill,
                ms_to_s(o.age_ms.0),
                ms_to_s(o.age_ms.1),
                ms_to_s(o.a2a_age_ms.0),
                ms_to_s(o.a2a_age_ms.1)
            )?;
        }
        writeln!(
            s,
            "\nWhere the window is larger than the cluster, every window also holds the dead node until its \
             entry is {} s old, which makes the p99.\n",
            self.config.max_age_ms / 1000
        )
    }

    fn join(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### A new idle node entering the windows\n")?;
        writeln!(
            s,
            "Share (and number) of the other nodes whose window holds the new node 1, 5 and 10 s after it \
             came up; beside it, the share of windows holding an average node in steady state (entries per \
             window / other nodes), the most gossip can reach once the news has settled.\n"
        )?;
        writeln!(
            s,
            "| nodes | gossip 1 s | gossip 5 s | gossip 10 s | steady-state share | all-to-all 1 s | 5 s | 10 s |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for o in &self.outcomes {
            write!(s, "| {} |", o.nodes)?;
            for &(held, others) in &o.join {
                write!(s, " {} ({held}) |", percent(as_f64(held as u64) / as_f64(others as u64)))?;
            }
            let steady = (o.window_fill / as_f64(o.nodes as u64 - 2)).min(1.0);
            write!(s, " {} |", percent(steady))?;
            for probe in JOIN_PROBES_MS {
                // The new node's first datagram goes out as it comes up, one more each interval.
                let rounds = probe / self.interval_ms;
                let missed = LOSS.powi(i32::try_from(rounds).unwrap_or(i32::MAX));
                write!(s, " {} |", percent(1.0 - missed))?;
            }
            writeln!(s)?;
        }
        writeln!(s)
    }

    fn ranks(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### How good the best node of each window is\n")?;
        writeln!(
            s,
            "Each second, each node's choice for a new job (what `Engine::best` would answer, from its own \
             vector and its window) is ranked by its true current load among all live nodes: 0 % is the \
             least loaded node of the cluster, 100 % the most loaded (a dead node counts as 100 %). \
             All-to-all: the node with the lowest load as last sent.\n"
        )?;
        writeln!(
            s,
            "| nodes | gossip median | gossip p99 | choices of the dead node | all-to-all median | all-to-all p99 |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|")?;
        for o in &self.outcomes {
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                o.nodes,
                percent(o.rank.0),
                percent(o.rank.1),
                percent(o.dead_pick_share),
                percent(o.a2a_rank.0),
                percent(o.a2a_rank.1)
            )?;
        }
        writeln!(s)
    }

    fn death(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### A dead node leaving the windows\n")?;
        writeln!(
            s,
            "Windows holding the node when it died; time until 99 % of that many windows no longer hold it \
             (entries leave at {} s of age), and no longer offer it to `best` (only entries younger than {} s \
             are candidates); time until 99 % of the nodes that held it show it down in `view()` (polled \
             every {} ms on up to {MAX_VIEW_OBSERVERS} of them); all-to-all: time until every node that got \
             its last vector sees it down. Last column: the share of the cluster an average node's `view()` \
             calls alive at the end (mean over {ALIVE_OBSERVERS} nodes).\n",
            self.config.max_age_ms / 1000,
            self.config.down_after_ms / 1000,
            VIEW_POLL_EVERY_MS
        )?;
        writeln!(
            s,
            "| nodes | windows holding it | left 99 % of them | out of 99 % of choices | 99 % of views: down \
             | all-to-all: down | alive in a view |"
        )?;
        writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|")?;
        let end_ms = self.seconds * 1000 - WARMUP_MS;
        for o in &self.outcomes {
            let d = &o.death;
            let mut views: Vec<u64> = d.views.iter().map(|(_, t)| t.unwrap_or(u64::MAX)).collect();
            views.sort_unstable();
            let views_99 = quantile_u64(&views, 0.99).filter(|&t| t != u64::MAX);
            writeln!(
                s,
                "| {} | {} | {} | {} | {} ({} nodes) | {:.1} s | {} |",
                o.nodes,
                d.holders,
                after(d.left_ms, end_ms),
                after(d.unchoosable_ms, end_ms),
                after(views_99, end_ms),
                d.views.len(),
                ms_to_s(o.a2a_down_ms),
                percent(o.alive_share)
            )?;
        }
        writeln!(s)
    }

    fn anomalies(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "### Datagrams not taken in\n")?;
        writeln!(s, "| nodes | lost by the network | to the silent or dead node | refused by the engine |")?;
        writeln!(s, "|---:|---:|---:|---|")?;
        for o in &self.outcomes {
            let refused = if o.refused.is_empty() {
                "none".to_owned()
            } else {
                o.refused.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
            };
            writeln!(s, "| {} | {} | {} | {refused} |", o.nodes, o.lost, o.to_down)?;
        }
        writeln!(s)?;
        let runs: Vec<String> = self
            .outcomes
            .iter()
            .map(|o| {
                let peak = o.peak_mib.map_or_else(String::new, |m| format!(", peak {m} MiB resident"));
                format!("{} nodes {:.0} s{peak}", o.nodes, o.wall_s)
            })
            .collect();
        writeln!(
            s,
            "Host time per run: {}. The simulation's memory grows as N²: the engines share one cluster map, \
             but each keeps its own shuffled list of peers.\n",
            runs.join("; ")
        )
    }

    /// The one-line headline: the largest cluster's traffic and ages against all-to-all.
    fn summary(&self) -> String {
        let Some(o) = self.outcomes.iter().max_by_key(|o| o.nodes) else {
            return "gossip: no run (target 1 msg/node/s at every N, median info age < 5 s): missed".to_owned();
        };
        let (lo, hi) = self
            .outcomes
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), o| (lo.min(o.msgs_per_s), hi.max(o.msgs_per_s)));
        let a2a_msgs = o.nodes - 1;
        let smallest = self.outcomes.iter().map(|o| o.nodes).min().unwrap_or(o.nodes);
        format!(
            "gossip: {} nodes: {:.2} msg/node/s, {}/node/s (all-to-all: {a2a_msgs} msg/node/s, {}/node/s); \
             {lo:.2}-{hi:.2} msg/node/s over {smallest}-{} nodes; median info age {:.1} s; median best-node \
             rank {} (target 1 msg/node/s at every N, median info age < 5 s): {}",
            o.nodes,
            o.msgs_per_s,
            bytes(o.bytes_per_s),
            bytes(as_f64((a2a_msgs * o.a2a_datagram) as u64)),
            o.nodes,
            ms_to_s(o.age_ms.0),
            percent(o.rank.0),
            crate::benchmarks::verdict(lo >= 0.95 && hi <= 1.05 && ms_to_s(o.age_ms.0) < 5.0),
        )
    }
}

fn quantile_u64(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[to_usize(nearest_rank(sorted.len() as u64, q))])
}

/// "4.2 s", or "> 45 s" when it did not happen before the end of the run.
fn after(ms: Option<u64>, end_ms: u64) -> String {
    match ms {
        Some(ms) => format!("{:.1} s", ms_to_s(ms)),
        None => format!("> {:.0} s", ms_to_s(end_ms)),
    }
}

fn percent(share: f64) -> String {
    if share > 0.0 && share < 0.001 {
        format!("{:.2} %", share * 100.0)
    } else {
        format!("{:.1} %", share * 100.0)
    }
}

/// Decimal units, as network rates are usually given.
fn bytes(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2} kB", n / 1e3)
    } else {
        format!("{n:.0} B")
    }
}

fn ms_to_s(ms: u64) -> f64 {
    as_f64(ms) / 1000.0
}

#[expect(clippy::cast_precision_loss, reason = "counts and times here are far below 2^52")]
fn as_f64(n: u64) -> f64 {
    n as f64
}

#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "callers pass small non-negative whole numbers; `as` saturates anyway"
)]
fn to_u64(x: f64) -> u64 {
    x as u64
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a 64-bit host")
}

/// The process's peak resident memory so far (`VmHWM`), in MiB.
fn peak_resident_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile_u64(&[1, 2, 3], 0.5), Some(2));
    }

    #[test]
    fn histogram_quantiles_match_sorted_values() {
        let mut h = Histogram::new(1000);
        let values: Vec<u64> = (0..500).map(|i| (i * 37) % 1000).collect();
        for &v in &values {
            h.add(v);
        }
        let mut sorted: Vec<f64> = values.iter().map(|&v| as_f64(v)).collect();
        sorted.sort_unstable_by(f64::total_cmp);
        for q in [0.01, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(h.quantile(q).map(as_f64), quantile(&sorted, q), "q = {q}");
        }
        assert_eq!(Histogram::new(10).quantile(0.5), None);
        let mut h = Histogram::new(10);
        h.add(99);
        assert_eq!(h.quantile(0.5), Some(10), "values past the bound land in the last bin");
    }

    #[test]
    fn units_read_well() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1_650.0), "1.65 kB");
        assert_eq!(bytes(1_500_000.0), "1.50 MB");
        assert_eq!(percent(0.5), "50.0 %");
        assert_eq!(percent(0.0002), "0.02 %");
        assert_eq!(after(None, 45_000), "> 45 s");
        assert_eq!(after(Some(9_500), 45_000), "9.5 s");
    }

    #[test]
    fn a_small_cluster_spreads_news_to_everyone() {
        let config = EngineConfig::from(&InfodConfig::default());
        let outcome = Sim::new(8, 30, config, 1000).run().unwrap();
        assert!((outcome.msgs_per_s - 1.0).abs() < 0.05, "{}", outcome.msgs_per_s);
        assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
        let (held, others) = outcome.join[2];
        assert_eq!(held, others, "after 10 s every window of a small cluster holds the new node");
        assert!(outcome.age_ms.0 < 10_000);
    }
}
