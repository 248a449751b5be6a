//! Where a job runs best: the decisions of MOSIX-style load balancing and memory ushering, as pure
//! functions of what a node knows (its own load, the loads infod has heard of, its jobs, the moves it made
//! lately). migd runs them on every node every [`Params::interval`]; the balance simulation runs the same
//! code over a simulated cluster.
//!
//! # The model
//!
//! A node of `cpus` CPUs of relative speed `speed` with `q` runnable processes gives each of them
//! `speed * min(1, cpus / q)` reference CPUs ([`share`]). A job that would use `d` CPUs progresses at `d`
//! times its node's share. Moving it from here (where it is counted in the load) to node n gives it n's
//! share with the job added. The move is worth it when:
//!
//! - the share there beats the share here by more than the margin ([`Params::margin`]): hysteresis, so two
//!   nodes of nearly equal load do not trade jobs, and a job alone on a node never leaves it for an equal
//!   one;
//! - what the job gains over its expected remaining run outweighs what it loses while frozen. A job's
//!   remaining run is expected to be as long as it has run so far (the heavy tail of process lifetimes that
//!   Harchol-Balter and Downey measured, and MOSIX used): young jobs stay until they have shown they are
//!   long. The freeze is the job's resident memory over the measured transfer rate, plus a fixed part.
//! - the job is CPU-bound, may move automatically, has stayed at least [`Params::min_residence`] on this
//!   node if it came here by a move (no ping-pong; a job that started here is held back by the gain test
//!   alone), and the node has room for it in memory without falling below its ushering threshold.
//!
//! infod's loads are decayed: one rises by `1 - rise` of a change per interval, falls by `1 - fall`. So a
//! node discounts what its recent moves have not yet shown: a job that left here `a` intervals ago still
//! counts `fall^a` in this node's load, and one that went to node n is still missing `rise^a` from n's
//! ([`Adjusted`]). With that and one move at a time, a node does not send a second job after the first
//! before the first one's arrival shows.
//!
//! # Memory ushering
//!
//! A node whose free memory falls below [`Params::usher_below`] of its memory moves its largest migratable
//! job (of any class: a sleeping job's memory is as much in the way) to the node with the most room that
//! can take it, before the kernel swaps or kills. When nothing can go, it says why.

use std::collections::BTreeMap;
use std::time::Duration;

/// A node as the balancer sees it: infod's figures for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Node {
    pub id: u32,
    pub cpus: u32,
    pub speed: f64,
    /// Decayed run-queue length.
    pub load: f64,
    pub mem_free: u64,
    pub mem_total: u64,
    /// Takes jobs from other nodes (alive, not blocking guests). Ignored for this node itself.
    pub accepts: bool,
}

impl Node {
    /// What each runnable process gets here with `queue` of them: reference CPUs.
    pub fn share(&self, queue: f64) -> f64 {
        share(self.speed, self.cpus, queue)
    }

    /// Free memory below which this node ushers jobs away.
    pub fn usher_threshold(&self, params: &Params) -> u64 {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss, reason = "a fraction of memory")]
        let bytes = (self.mem_total as f64 * params.usher_below.clamp(0.0, 1.0)) as u64;
        bytes
    }
}

/// Reference CPUs each of `queue` runnable processes gets on `cpus` CPUs of speed `speed`.
pub fn share(speed: f64, cpus: u32, queue: f64) -> f64 {
    let queue = if queue.is_finite() { queue.max(1.0) } else { 1.0 };
    speed.max(0.0) * (f64::from(cpus.max(1)) / queue).min(1.0)
}

/// A job running on this node, as the balancer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Whose it is: the caller's key for it (migd: home node and PID).
    pub key: (u32, i32),
    /// CPUs it would use if it had them (time running and waiting to run, per second).
    pub demand: f64,
    /// CPU-bound (the only kind the load balancer moves).
    pub cpu_bound: bool,
    /// CRIU can move it, and nobody has said it must stay (`mosrun -h`, `-L`, `mosctl pin`): the balancer
    /// and the usher may move it.
    pub movable: bool,
    /// Resident memory, bytes.
    pub rss: u64,
    /// How long it has run in all.
    pub age: Duration,
    /// How long it has been on this node.
    pub residence: Duration,
    /// It came to this node by a move (rather than starting here).
    pub moved: bool,
}

/// How the balancer weighs things.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Time between two decisions, and the interval of infod's decay.
    pub interval: Duration,
    /// The share there must beat the share here by this fraction.
    pub margin: f64,
    /// A job that came to a node by a move stays at least this long there before the balancer moves it again.
    pub min_residence: Duration,
    /// Image bytes a move carries per second (measured by the last moves).
    pub transfer_bps: f64,
    /// The part of a freeze that does not depend on the job's size.
    pub freeze_overhead: Duration,
    /// infod's decay of the load: weight of the old value per interval when it rises, and when it falls.
    pub rise: f64,
    pub fall: f64,
    /// Free memory, as a fraction of a node's memory, below which the node ushers jobs away; nobody
    /// moves a job to a node it would bring below it.
    pub usher_below: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            margin: 0.3,
            min_residence: Duration::from_secs(3),
            transfer_bps: 500e6,
            freeze_overhead: Duration::from_millis(300),
            rise: 0.4,
            fall: 0.85,
            usher_below: 0.1,
        }
    }
}

impl Params {
    /// How long a job of `rss` resident bytes is expected to be frozen by a move.
    pub fn freeze(&self, rss: u64) -> Duration {
        #[expect(clippy::cast_precision_loss, reason = "bytes as a rate's numerator")]
        let transfer = rss as f64 / self.transfer_bps.max(1.0);
        self.freeze_overhead + Duration::from_secs_f64(transfer.min(1e6))
    }
}

/// A move this node made lately: where to, and how long ago.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Departure {
    pub to: u32,
    pub ago: Duration,
    /// CPUs the job used.
    pub demand: f64,
}

/// Loads with this node's recent moves counted as done: this node's, and every other's by id.
#[derive(Debug, Clone, PartialEq)]
pub struct Adjusted {
    pub here: f64,
    pub there: BTreeMap<u32, f64>,
}

impl Adjusted {
    /// `me`'s and `others`' loads, less what the moves in `departures` have not yet taken from this node's
    /// decayed load, plus what they have not yet added to their destinations'.
    pub fn new(me: &Node, others: &[Node], departures: &[Departure], params: &Params) -> Self {
        let intervals = |ago: Duration| ago.as_secs_f64() / params.interval.as_secs_f64().max(1e-3);
        let mut here = me.load;
        let mut there: BTreeMap<u32, f64> = others.iter().map(|n| (n.id, n.load)).collect();
        for d in departures {
            let a = intervals(d.ago);
            here -= d.demand.min(1.0) * params.fall.powf(a);
            if let Some(load) = there.get_mut(&d.to) {
                *load += d.demand.min(1.0) * params.rise.powf(a);
            }
        }
        Self { here: here.max(0.0), there }
    }
}

/// A move the balancer or the usher wants, with its numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub key: (u32, i32),
    pub to: u32,
    /// Why: balancing the load or ushering memory.
    pub why: Why,
    /// Loads (adjusted) here and there before the move.
    pub load_here: f64,
    pub load_there: f64,
    /// Reference CPUs the job gets here, and would get there.
    pub share_here: f64,
    pub share_there: f64,
    /// Reference CPU-seconds it is expected to gain over its remaining run, and to lose while frozen.
    pub gain: f64,
    pub cost: f64,
}

/// What moves a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Load,
    Memory,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Load => "load",
            Why::Memory => "memory",
        })
    }
}

/// Why a job, or every job, stays.
#[derive(Debug, Clone, PartialEq)]
pub enum Stay {
    /// No job here the balancer may move (none CPU-bound, movable and settled).
    NothingToMove,
    /// No node would give any job enough more than here.
    Balanced { load_here: f64, best_share_here: f64, best_share_there: f64 },
    /// Worth moving by load, but not yet worth its freeze.
    NotWorthIt { key: (u32, i32), gain: f64, cost: f64 },
    /// Memory is short here and no job can go: why.
    MemoryStuck(String),
    /// The node's policy keeps its jobs: which.
    Policy(String),
}

impl std::fmt::Display for Stay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stay::NothingToMove => f.write_str("no job here may move (none CPU-bound, movable and settled)"),
            Stay::Balanced { load_here, best_share_here, best_share_there } => write!(
                f,
                "balanced: load {load_here:.2} here; a job gets {best_share_here:.2} CPU here and at best {best_share_there:.2} elsewhere"
            ),
            Stay::NotWorthIt { key, gain, cost } => {
                write!(f, "job {}.{} would gain {gain:.2} CPU-s and lose {cost:.2} while frozen: not yet", key.0, key.1)
            }
            Stay::MemoryStuck(why) => write!(f, "memory is short and no job can go: {why}"),
            Stay::Policy(why) => f.write_str(why),
        }
    }
}

/// Whether node `n` can take a job of `rss` bytes without falling below its ushering threshold.
fn has_room(n: &Node, rss: u64, params: &Params) -> bool {
    n.mem_free.saturating_sub(rss) > n.usher_threshold(params)
}

/// The best move for `job` by load, if any: the node where it would get the largest share, if that beats
/// here by the margin and the gain outweighs the freeze.
pub fn best_for(job: &Job, me: &Node, others: &[Node], adjusted: &Adjusted, params: &Params) -> Result<Move, Stay> {
    let demand = job.demand.clamp(0.0, f64::from(me.cpus.max(1)));
    let here = me.share(adjusted.here.max(demand));
    // The node that would give it the most; of equals, the lowest id.
    let best = others
        .iter()
        .filter(|n| n.accepts && n.id != me.id && has_room(n, job.rss, params))
        .map(|n| {
            let load = adjusted.there.get(&n.id).copied().unwrap_or(n.load);
            (n.share(load + demand), n, load)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.id.cmp(&a.1.id)));
    let Some((share_there, node, load_there)) = best else {
        return Err(Stay::Balanced { load_here: adjusted.here, best_share_here: here, best_share_there: 0.0 });
    };
    if share_there < here * (1.0 + params.margin) {
        return Err(Stay::Balanced { load_here: adjusted.here, best_share_here: here, best_share_there: share_there });
    }
    let progress = demand.clamp(0.05, 1.0);
    let gain = progress * (share_there - here) * job.age.as_secs_f64();
    let cost = progress * here * params.freeze(job.rss).as_secs_f64();
    let wanted = Move {
        key: job.key,
        to: node.id,
        why: Why::Load,
        load_here: adjusted.here,
        load_there,
        share_here: here,
        share_there,
        gain,
        cost,
    };
    if gain <= cost {
        return Err(Stay::NotWorthIt { key: job.key, gain, cost });
    }
    Ok(wanted)
}

/// This interval's move by load, if any: of the jobs the balancer may move, the one whose gain most
/// outweighs its cost.
pub fn balance(me: &Node, others: &[Node], jobs: &[Job], adjusted: &Adjusted, params: &Params) -> Result<Move, Stay> {
    let candidates: Vec<&Job> =
        jobs.iter().filter(|j| j.cpu_bound && j.movable && (!j.moved || j.residence >= params.min_residence)).collect();
    if candidates.is_empty() {
        return Err(Stay::NothingToMove);
    }
    let mut best: Option<Move> = None;
    let mut why_not: Option<Stay> = None;
    for job in candidates {
        match best_for(job, me, others, adjusted, params) {
            Ok(m) => {
                if best.as_ref().is_none_or(|b| m.gain - m.cost > b.gain - b.cost) {
                    best = Some(m);
                }
            }
            Err(stay) => {
                // Keep the most telling reason: "not worth it yet" over "balanced".
                if why_not.is_none() || matches!(stay, Stay::NotWorthIt { .. }) {
                    why_not = Some(stay);
                }
            }
        }
    }
    best.ok_or_else(|| why_not.unwrap_or(Stay::NothingToMove))
}

/// This interval's move for memory, if this node is short of it: its largest movable job, to the node
/// with the most room that can take it and stay above its own threshold. `Ok(None)` when memory is not
/// short.
pub fn usher(me: &Node, others: &[Node], jobs: &[Job], adjusted: &Adjusted, params: &Params) -> Result<Option<Move>, Stay> {
    if me.mem_free >= me.usher_threshold(params) {
        return Ok(None);
    }
    let mut movable: Vec<&Job> = jobs.iter().filter(|j| j.movable).collect();
    if movable.is_empty() {
        return Err(Stay::MemoryStuck("no job here may move".into()));
    }
    movable.sort_by(|a, b| b.rss.cmp(&a.rss).then(a.key.cmp(&b.key)));
    for job in &movable {
        let target = others
            .iter()
            .filter(|n| n.accepts && n.id != me.id && has_room(n, job.rss, params))
            .max_by(|a, b| a.mem_free.cmp(&b.mem_free).then(b.id.cmp(&a.id)));
        if let Some(n) = target {
            let load_there = adjusted.there.get(&n.id).copied().unwrap_or(n.load);
            let demand = job.demand.max(0.0);
            return Ok(Some(Move {
                key: job.key,
                to: n.id,
                why: Why::Memory,
                load_here: adjusted.here,
                load_there,
                share_here: me.share(adjusted.here.max(demand)),
                share_there: n.share(load_there + demand),
                gain: 0.0,
                cost: params.freeze(job.rss).as_secs_f64(),
            }));
        }
    }
    let largest = movable[0].rss >> 20;
    Err(Stay::MemoryStuck(format!("no node that takes guests has room for any of them (the largest holds {largest} MiB)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(id: u32, load: f64) -> Node {
        Node { id, cpus: 1, speed: 1.0, load, mem_free: 4 * GIB, mem_total: 8 * GIB, accepts: true }
    }

    fn spinner(pid: i32) -> Job {
        Job {
            key: (1, pid),
            demand: 1.0,
            cpu_bound: true,
            movable: true,
            rss: 4 << 20,
            age: Duration::from_secs(5),
            residence: Duration::from_secs(5),
            moved: false,
        }
    }

    fn decide(me: &Node, others: &[Node], jobs: &[Job], departures: &[Departure]) -> Result<Move, Stay> {
        let params = Params::default();
        balance(me, others, jobs, &Adjusted::new(me, others, departures, &params), &params)
    }

    #[test]
    fn four_spinners_on_one_core_send_two_to_an_idle_node_and_no_more() {
        let jobs: Vec<Job> = (1..=4).map(spinner).collect();
        let m = decide(&node(1, 4.0), &[node(2, 0.0)], &jobs, &[]).unwrap();
        assert_eq!(m.to, 2);
        assert!((m.share_here - 0.25).abs() < 1e-9 && (m.share_there - 1.0).abs() < 1e-9, "{m:?}");
        // Right after the first move infod still shows the old loads; the move is counted anyway.
        let first = Departure { to: 2, ago: Duration::ZERO, demand: 1.0 };
        let m = decide(&node(1, 4.0), &[node(2, 0.0)], &jobs[1..], &[first]).unwrap();
        assert_eq!(m.to, 2);
        let second = Departure { to: 2, ago: Duration::ZERO, demand: 1.0 };
        let stay = decide(&node(1, 4.0), &[node(2, 0.0)], &jobs[2..], &[first, second]).unwrap_err();
        assert!(matches!(stay, Stay::Balanced { .. }), "{stay:?}");
        // Once the loads show it: 2 and 2, nothing moves either way.
        assert!(decide(&node(1, 2.0), &[node(2, 2.0)], &jobs[2..], &[]).is_err());
    }

    #[test]
    fn a_job_alone_on_its_node_stays_and_a_balanced_cluster_is_left_alone() {
        assert!(matches!(decide(&node(1, 1.0), &[node(2, 0.0)], &[spinner(1)], &[]), Err(Stay::Balanced { .. })));
        let jobs: Vec<Job> = (1..=3).map(spinner).collect();
        assert!(decide(&node(1, 3.0), &[node(2, 2.0), node(3, 2.1)], &jobs, &[]).is_err());
    }

    #[test]
    fn a_faster_node_attracts_a_job_and_a_slower_one_does_not() {
        let fast = Node { speed: 2.0, ..node(2, 0.0) };
        let m = decide(&node(1, 1.0), &[fast], &[spinner(1)], &[]).unwrap();
        assert!((m.share_here - 1.0).abs() < 1e-9 && (m.share_there - 2.0).abs() < 1e-9, "{m:?}");
        // Busy with one job already, the fast node gives a newcomer what the job has here alone.
        let busy_fast = Node { speed: 2.0, ..node(2, 1.0) };
        assert!(decide(&node(1, 1.0), &[busy_fast], &[spinner(1)], &[]).is_err());
        let slow = Node { speed: 0.5, ..node(2, 0.0) };
        assert!(decide(&node(1, 2.0), &[slow], &[spinner(1), spinner(2)], &[]).is_err());
    }

    #[test]
    fn only_settled_movable_cpu_bound_jobs_move_and_only_to_nodes_that_take_them() {
        let me = node(1, 4.0);
        let idle = [node(2, 0.0)];
        let fresh = Job { residence: Duration::from_secs(1), moved: true, ..spinner(1) };
        let pinned = Job { movable: false, ..spinner(2) };
        let io = Job { cpu_bound: false, ..spinner(3) };
        assert_eq!(decide(&me, &idle, &[fresh, pinned, io], &[]), Err(Stay::NothingToMove));
        let blocking = [Node { accepts: false, ..node(2, 0.0) }];
        assert!(decide(&me, &blocking, &[spinner(4)], &[]).is_err());
        let full = [Node { mem_free: 900 << 20, ..node(2, 0.0) }];
        let big = Job { rss: 200 << 20, ..spinner(5) };
        assert!(decide(&me, &full, &[big], &[]).is_err(), "it would bring node 2 below its threshold");
    }

    #[test]
    fn a_young_or_huge_job_is_not_worth_its_freeze() {
        let me = node(1, 2.0);
        let young = Job { age: Duration::from_millis(100), residence: Duration::from_secs(3), ..spinner(1) };
        assert!(matches!(decide(&me, &[node(2, 0.0)], &[young], &[]), Err(Stay::NotWorthIt { .. })));
        let huge = Job { rss: 3 * GIB, age: Duration::from_secs(4), ..spinner(2) };
        assert!(matches!(decide(&me, &[node(2, 0.0)], std::slice::from_ref(&huge), &[]), Err(Stay::NotWorthIt { .. })));
        let old = Job { age: Duration::from_mins(2), ..huge };
        assert!(decide(&me, &[node(2, 0.0)], &[old], &[]).is_ok());
    }

    #[test]
    fn recent_departures_fade_as_infod_catches_up() {
        let params = Params::default();
        let d = [Departure { to: 2, ago: Duration::from_secs(2), demand: 1.0 }];
        let a = Adjusted::new(&node(1, 3.0), &[node(2, 0.6)], &d, &params);
        assert!((a.here - (3.0 - 0.85f64.powi(2))).abs() < 1e-9, "{a:?}");
        assert!((a.there[&2] - (0.6 + 0.4f64.powi(2))).abs() < 1e-9, "{a:?}");
    }

    #[test]
    fn short_memory_sends_the_largest_movable_job_to_the_roomiest_node() {
        let params = Params::default();
        let me = Node { mem_free: 500 << 20, ..node(1, 1.0) };
        let others = [Node { mem_free: 2 * GIB, ..node(2, 0.0) }, Node { mem_free: 3 * GIB, ..node(3, 3.0) }];
        let small = Job { rss: 100 << 20, cpu_bound: false, ..spinner(1) };
        let large = Job { rss: 1500 << 20, cpu_bound: false, ..spinner(2) };
        let pinned = Job { rss: 3 * GIB, movable: false, ..spinner(3) };
        let adjusted = Adjusted::new(&me, &others, &[], &params);
        let m = usher(&me, &others, &[small, large.clone(), pinned], &adjusted, &params).unwrap().unwrap();
        assert_eq!((m.key, m.to, m.why), ((1, 2), 3, Why::Memory));
        let roomy = Node { mem_free: 6 * GIB, ..me };
        assert_eq!(usher(&roomy, &others, std::slice::from_ref(&large), &adjusted, &params), Ok(None));
        let tight = [Node { mem_free: GIB, ..node(2, 0.0) }];
        let stuck = usher(&me, &tight, &[large], &adjusted, &params).unwrap_err();
        assert!(matches!(stuck, Stay::MemoryStuck(_)), "{stuck:?}");
        assert!(stuck.to_string().contains("1500 MiB"), "{stuck}");
    }
}
