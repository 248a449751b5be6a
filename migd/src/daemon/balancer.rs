//! The balancer: every `[balance] interval_ms`, this node looks at its jobs and at what infod knows of the
//! others, and moves at most one job, by [`rmosix_common::balance`]'s decisions: off this node when it is
//! short of memory (ushering), else to a node where it would get enough more of a CPU to be worth its
//! freeze. Decentralised as in MOSIX: each node decides for the jobs running on it, from its own view.
//!
//! One move at a time: the balancer waits for its move to end before it decides again, and counts its
//! recent moves in the loads it compares until infod's decayed loads show them. A node that refused a job
//! or failed to take it is left alone for a while. Every decision that moves a job is logged with its
//! numbers; a node stuck short of memory says so in the log (once per change) and in `mosctl jobs`'
//! status line.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rmosix_common::balance::{self, Adjusted, Departure, Move, Node, Params, Stay};
use rmosix_common::control::{Class, Refusal};
use rmosix_common::query;
use tracing::{debug, info, warn};

use super::runner::Runner;
use super::{Daemon, MoveError};

/// How long a node that refused or failed a move is not chosen by the balancer.
const AVOID_FOR: Duration = Duration::from_secs(30);
/// How long a move counts in the loads compared (by then infod's decayed loads show it).
const REMEMBER_FOR: Duration = Duration::from_secs(30);

/// What the balancer of this node remembers between decisions.
#[derive(Debug, Default)]
pub(super) struct BalancerState {
    /// Moves made lately from this node: destination, when, the job's demand.
    departures: Mutex<Vec<(u32, Instant, f64)>>,
    /// Nodes that refused or failed a move lately, and when.
    avoid: Mutex<HashMap<u32, Instant>>,
    /// Image bytes per second the moves from here carried, decayed; 0 before the first.
    transfer_bps: Mutex<f64>,
    /// The last reason nothing moved, as logged (a change is logged, a repeat is not).
    last_stay: Mutex<String>,
    /// Memory is short here and no job can go: why (for `mosctl status`).
    stuck: Mutex<Option<String>>,
    /// Moves started by the balancer, by the usher, and those that failed.
    pub(super) balanced: AtomicU64,
    pub(super) ushered: AtomicU64,
    pub(super) failed: AtomicU64,
}

impl Daemon {
    /// Runs the balancer for ever, on a thread of its own.
    pub(super) fn start_balancing(self: &Arc<Self>) {
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("balance".into()).spawn(move || {
            loop {
                // Right after a move, decide again at once: the move is counted in the loads compared.
                let moved = daemon.settings.config.balance.auto && daemon.balance_once();
                if !moved {
                    std::thread::sleep(daemon.balance_params().interval);
                }
            }
        });
        if let Err(error) = spawned {
            warn!(%error, "cannot start the balancer; jobs move only when asked");
        }
    }

    /// The balancer's parameters, from the configuration and what the moves measured.
    fn balance_params(&self) -> Params {
        let config = &self.settings.config;
        let measured = *self.balancer.transfer_bps.lock().expect("transfer rate");
        let defaults = Params::default();
        Params {
            interval: Duration::from_millis(config.balance.interval_ms.max(100)),
            margin: config.balance.margin.max(0.0),
            min_residence: Duration::from_secs(config.balance.min_residence_secs),
            transfer_bps: if measured > 0.0 { measured } else { defaults.transfer_bps },
            rise: config.load.rise,
            fall: config.load.fall,
            usher_below: config.balance.usher_below,
            ..defaults
        }
    }

    /// This node and the live others as infod sees them; `None` when infod cannot say.
    fn balance_nodes(&self) -> Option<(Node, Vec<Node>)> {
        let socket = std::env::var_os(query::SOCKET_ENV).map_or_else(|| self.settings.config.infod.socket.clone(), PathBuf::from);
        let Ok(query::Response::View(view)) = query::ask(&socket, &query::Request::View) else { return None };
        let avoid = self.balancer.avoid.lock().expect("avoid").clone();
        let node = |v: &query::NodeView| -> Option<Node> {
            Some(Node {
                id: v.id,
                cpus: v.cpus?,
                speed: v.speed?,
                load: v.load?,
                mem_free: v.mem_free?,
                mem_total: v.mem_total?,
                accepts: v.alive
                    && v.blocks_guests == Some(false)
                    && avoid.get(&v.id).is_none_or(|since| since.elapsed() >= AVOID_FOR),
            })
        };
        let me = view.nodes.iter().find(|v| v.id == self.me().0).and_then(node)?;
        let others = view.nodes.iter().filter(|v| v.id != me.id && v.alive).filter_map(node).collect();
        Some((me, others))
    }

    /// The jobs running here as the balancer sees them, with their runners.
    fn balance_jobs(&self) -> Vec<(Arc<Runner>, balance::Job)> {
        let runners: Vec<Arc<Runner>> = self.runners.lock().expect("runners").values().cloned().collect();
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        runners
            .into_iter()
            .filter(|r| {
                !r.in_move.load(Ordering::Relaxed) && !r.moving.load(Ordering::Relaxed) && !r.exited.load(Ordering::Relaxed)
            })
            .filter_map(|r| {
                let seen = self.observer.seen(r.job.pid())?;
                let job = balance::Job {
                    key: (r.home_node, r.home_pid),
                    demand: seen.fast.rates.demand(),
                    cpu_bound: seen.class == Class::Cpu,
                    movable: seen.reason.is_none() && !seen.stopped && !r.facts.stay_home && !r.facts().manual,
                    rss: seen.rss,
                    age: now.saturating_sub(Duration::from_secs(r.facts.started)),
                    residence: r.arrived.elapsed(),
                    moved: r.facts.migrations > 0,
                };
                Some((r, job))
            })
            .collect()
    }

    /// This node's recent moves, and their effect on the loads compared.
    fn adjusted(&self, me: &Node, others: &[Node], params: &Params) -> Adjusted {
        let mut departures = self.balancer.departures.lock().expect("departures");
        departures.retain(|(_, at, _)| at.elapsed() < REMEMBER_FOR);
        let recent: Vec<Departure> =
            departures.iter().map(|&(to, at, demand)| Departure { to, ago: at.elapsed(), demand }).collect();
        Adjusted::new(me, others, &recent, params)
    }

    /// One decision: usher if memory is short, else balance; at most one move, made before returning.
    /// Whether a job moved.
    fn balance_once(self: &Arc<Self>) -> bool {
        let policy = self.policy();
        if policy.stay {
            self.stayed(&Stay::Policy("this node's policy is stay (mosctl stay)".into()));
            return false;
        }
        let Some((me, others)) = self.balance_nodes() else {
            debug!("infod cannot say what the cluster looks like; nothing moves");
            return false;
        };
        let params = self.balance_params();
        let mut jobs = self.balance_jobs();
        if policy.lstay {
            // The jobs started here stay while they run here; guests may go.
            for (runner, job) in &mut jobs {
                job.movable &= runner.home_node != me.id;
            }
        }
        let plain: Vec<balance::Job> = jobs.iter().map(|(_, j)| j.clone()).collect();
        let adjusted = self.adjusted(&me, &others, &params);
        let decision = match balance::usher(&me, &others, &plain, &adjusted, &params) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => balance::balance(&me, &others, &plain, &adjusted, &params),
            Err(stuck) => Err(stuck),
        };
        match decision {
            Ok(m) => jobs.iter().find(|(_, j)| j.key == m.key).is_some_and(|(runner, job)| self.balancer_move(runner, job, &m)),
            Err(stay) => {
                self.stayed(&stay);
                false
            }
        }
    }

    /// Logs why nothing moved: a node short of memory that cannot send anything away as a warning, the rest
    /// quietly; each reason once until it changes.
    fn stayed(&self, stay: &Stay) {
        let text = stay.to_string();
        *self.balancer.stuck.lock().expect("stuck") = matches!(stay, Stay::MemoryStuck(_)).then(|| text.clone());
        let mut last = self.balancer.last_stay.lock().expect("last stay");
        if *last == text {
            return;
        }
        if matches!(stay, Stay::MemoryStuck(_)) {
            warn!(why = %text, "memory is short here and no job can go");
        } else {
            debug!(why = %text, "nothing to move");
        }
        text.clone_into(&mut last);
    }

    /// Makes the move `m` of `job`, running as `runner`, and learns from it; whether the job moved.
    fn balancer_move(self: &Arc<Self>, runner: &Arc<Runner>, job: &balance::Job, m: &Move) -> bool {
        info!(
            home_node = m.key.0,
            home_pid = m.key.1,
            to = m.to,
            why = %m.why,
            load_here = format!("{:.2}", m.load_here),
            load_there = format!("{:.2}", m.load_there),
            share_here = format!("{:.2}", m.share_here),
            share_there = format!("{:.2}", m.share_there),
            gain = format!("{:.2}", m.gain),
            cost = format!("{:.2}", m.cost),
            rss_mib = job.rss >> 20,
            "the balancer moves a job"
        );
        match m.why {
            balance::Why::Load => self.balancer.balanced.fetch_add(1, Ordering::Relaxed),
            balance::Why::Memory => self.balancer.ushered.fetch_add(1, Ordering::Relaxed),
        };
        self.balancer.last_stay.lock().expect("last stay").clear();
        *self.balancer.stuck.lock().expect("stuck") = None;
        let started = Instant::now();
        match self.move_runner(runner, m.to) {
            Ok(_) => {
                self.balancer.departures.lock().expect("departures").push((m.to, Instant::now(), job.demand));
                // Small jobs say more about the fixed part of a move than about the rate.
                if job.rss >= 64 << 20 {
                    let params = self.balance_params();
                    let moving = started.elapsed().saturating_sub(params.freeze_overhead).as_secs_f64().max(1e-3);
                    #[expect(clippy::cast_precision_loss, reason = "bytes as a rate's numerator")]
                    let bps = job.rss as f64 / moving;
                    let mut rate = self.balancer.transfer_bps.lock().expect("transfer rate");
                    *rate = if *rate > 0.0 { 0.5 * *rate + 0.5 * bps } else { bps };
                }
                true
            }
            Err(e) => {
                self.balancer.failed.fetch_add(1, Ordering::Relaxed);
                warn!(home_pid = m.key.1, to = m.to, error = %e, "the balancer's move failed; node {} is left alone for a while", m.to);
                self.balancer.avoid.lock().expect("avoid").insert(m.to, Instant::now());
                false
            }
        }
    }

    /// The moves the balancer made since migd started.
    pub(super) fn auto_moves(&self) -> rmosix_common::control::AutoMoves {
        rmosix_common::control::AutoMoves {
            balanced: self.balancer.balanced.load(Ordering::Relaxed),
            ushered: self.balancer.ushered.load(Ordering::Relaxed),
            failed: self.balancer.failed.load(Ordering::Relaxed),
        }
    }

    /// Why this node, short of memory, sends nothing away, while that lasts.
    pub(super) fn stuck(&self) -> Option<String> {
        self.balancer.stuck.lock().expect("stuck").clone()
    }

    /// `migrate PID balance` for the job running here as `runner`: moves it to where it would run best, if
    /// that beats here by the margin; otherwise says why it stays (`Refusal::Balanced`). The owner asked,
    /// so a pinned or young job may go, unlike with the balancer.
    pub(super) fn rebalance(self: &Arc<Self>, runner: &Arc<Runner>) -> Result<Duration, MoveError> {
        let (me, others) = self
            .balance_nodes()
            .ok_or_else(|| MoveError::new(Refusal::Failed, "infod cannot say what the cluster looks like; try again"))?;
        let params = Params { min_residence: Duration::ZERO, ..self.balance_params() };
        let job = self
            .balance_jobs()
            .into_iter()
            .find(|(r, _)| Arc::ptr_eq(r, runner))
            .map(|(_, j)| balance::Job { movable: true, cpu_bound: true, age: j.age.max(Duration::from_mins(1)), ..j })
            .ok_or_else(|| MoveError::new(Refusal::Busy, "it is moving or ending; try again"))?;
        let adjusted = self.adjusted(&me, &others, &params);
        match balance::best_for(&job, &me, &others, &adjusted, &params) {
            Ok(m) => {
                info!(home_pid = m.key.1, to = m.to, share_here = m.share_here, share_there = m.share_there, "migrate balance moves a job");
                self.move_runner(runner, m.to)
            }
            Err(stay) => Err(MoveError::new(Refusal::Balanced, format!("it runs best where it is, on node {}: {stay}", me.id))),
        }
    }
}
