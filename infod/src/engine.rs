//! The dissemination logic of infod, free of sockets and clocks.
//!
//! The daemon feeds it time, its own measurements and the datagrams it receives; the engine decides where to
//! send, what to send, what to believe and what the cluster looks like. The same code runs in the daemon and
//! in `cargo xtask bench gossip`, which drives thousands of engines over a simulated network and clock.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use rand::SeedableRng as _;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom as _;
use rmosix_common::NodeId;
use rmosix_common::config::InfodConfig;
use rmosix_common::load::LoadVector;
use rmosix_common::map::ClusterMap;
use rmosix_common::query::{ClusterView, Counters, NodeView};
use rmosix_common::wire::{DecodeError, Gossip};

use crate::window::{Offer, Window};

/// Timing and size settings of the engine (the relevant part of `[infod]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub window: usize,
    pub gossip_entries: usize,
    pub max_age_ms: u64,
    pub down_after_ms: u64,
    pub max_clock_skew_ms: u64,
}

impl From<&InfodConfig> for EngineConfig {
    fn from(c: &InfodConfig) -> Self {
        Self {
            window: c.window,
            gossip_entries: c.gossip_entries,
            max_age_ms: c.max_age_ms,
            down_after_ms: c.down_after_ms,
            max_clock_skew_ms: c.max_clock_skew_ms,
        }
    }
}

/// Last thing known about a node, kept for every node of the map (not only the window), so `mosctl status`
/// can show every node and when it was last heard of.
#[derive(Debug, Clone)]
struct Known {
    vector: LoadVector,
    origin_ms: u64,
}

/// Why a datagram was dropped (the key of the drop counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Failed decoding or authentication.
    Decode(&'static str),
    /// Sender id not in the map, or the datagram came from another address than the sender's.
    UnknownSender,
    /// Sender id is this node.
    FromSelf,
    /// Same or older counter than a datagram already accepted from that sender.
    Replay,
    /// Sent too long ago (or in the future) by the sender's clock.
    Stale,
}

impl Drop {
    fn reason(self) -> &'static str {
        match self {
            Self::Decode(r) => r,
            Self::UnknownSender => "unknown_sender",
            Self::FromSelf => "from_self",
            Self::Replay => "replay",
            Self::Stale => "stale",
        }
    }
}

/// One node's dissemination state.
#[derive(Debug)]
pub struct Engine {
    me: NodeId,
    /// Shared, since a simulation runs thousands of engines over one map.
    map: Arc<ClusterMap>,
    /// The other nodes of the map in a random order, walked one per interval and reshuffled at the end:
    /// every peer is still a random choice, but none waits more than two rounds to hear from this node
    /// (with independent draws, a small cluster often leaves one node out for several intervals).
    peers: Vec<NodeId>,
    next_peer: usize,
    config: EngineConfig,
    incarnation: u64,
    counter: u64,
    own: Option<LoadVector>,
    window: Window,
    known: HashMap<u32, Known>,
    /// Newest `(incarnation, counter)` accepted per sender: anything not above it is a replay.
    last_counter: HashMap<u32, (u64, u64)>,
    /// Load added locally to nodes just chosen by `best`, until their next vector arrives (dshd's trick to
    /// spread back-to-back placements): node -> (extra load, version of the vector it was added to).
    bumps: HashMap<u32, (f64, (u64, u64))>,
    counters: Counters,
    rng: SmallRng,
}

impl Engine {
    /// An engine for node `me` of `map`. `incarnation` must grow between runs of the same node (its start
    /// time in nanoseconds does); `seed` drives the choice of peers.
    pub fn new(me: NodeId, map: Arc<ClusterMap>, config: EngineConfig, incarnation: u64, seed: u64) -> Self {
        let peers = map.nodes().map(|n| n.id).filter(|&id| id != me).collect();
        Self {
            me,
            peers,
            next_peer: usize::MAX,
            window: Window::new(config.window, config.max_age_ms),
            config,
            map,
            incarnation,
            counter: 0,
            own: None,
            known: HashMap::new(),
            last_counter: HashMap::new(),
            bumps: HashMap::new(),
            counters: Counters::default(),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// This node's id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// This run's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The cluster map in force.
    pub fn map(&self) -> &ClusterMap {
        &self.map
    }

    /// Replaces the map (SIGHUP). Information about nodes no longer in the map is forgotten.
    pub fn set_map(&mut self, map: Arc<ClusterMap>) {
        self.peers = map.nodes().map(|n| n.id).filter(|&id| id != self.me).collect();
        self.next_peer = usize::MAX;
        self.known.retain(|id, _| map.get(NodeId(*id)).is_some());
        self.last_counter.retain(|id, _| map.get(NodeId(*id)).is_some());
        let mut window = Window::new(self.config.window, self.config.max_age_ms);
        for e in self.window.iter().filter(|e| map.get(NodeId(e.vector.node)).is_some()) {
            window.offer(e.origin_ms, 0, e.vector.clone());
        }
        self.window = window;
        self.map = map;
    }

    /// Records this node's newest measurement and returns the datagram to send this interval and its
    /// destination, or `None` when the node has no peer. `now_ms` is local monotonic time, `wall_ms` the wall
    /// clock (milliseconds since the epoch) stamped on the message.
    pub fn tick(&mut self, now_ms: u64, wall_ms: u64, own: LoadVector) -> Option<(NodeId, Gossip)> {
        self.window.expire(now_ms);
        self.own = Some(own.clone());
        if self.peers.is_empty() {
            return None;
        }
        if self.next_peer >= self.peers.len() {
            self.peers.shuffle(&mut self.rng);
            self.next_peer = 0;
        }
        let to = self.peers[self.next_peer];
        self.next_peer += 1;
        self.counter += 1;
        let msg = Gossip {
            sender: self.me.0,
            incarnation: self.incarnation,
            counter: self.counter,
            sent_at_ms: wall_ms,
            own,
            // News older than the down timeout would not make its node look alive anywhere: keep it home.
            entries: self.window.freshest(now_ms, self.config.gossip_entries, self.config.down_after_ms),
        };
        Some((to, msg))
    }

    /// Counts a datagram sent (or not, on error) by the caller.
    pub fn note_sent(&mut self, ok: bool) {
        if ok {
            self.counters.sent += 1;
        } else {
            self.counters.send_errors += 1;
        }
    }

    /// Takes in one received datagram (already decoded or refused by the decoder). `from` is the source
    /// address when known; it must be the sender's map address.
    pub fn receive(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        from: Option<Ipv4Addr>,
        msg: Result<Gossip, DecodeError>,
    ) -> Result<(), Drop> {
        self.counters.received += 1;
        let result = self.accept(now_ms, wall_ms, from, msg);
        match result {
            Ok(()) => self.counters.accepted += 1,
            Err(drop) => *self.counters.dropped.entry(drop.reason().to_owned()).or_default() += 1,
        }
        result
    }

    fn accept(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        from: Option<Ipv4Addr>,
        msg: Result<Gossip, DecodeError>,
    ) -> Result<(), Drop> {
        let msg = msg.map_err(|e| Drop::Decode(e.reason()))?;
        if msg.sender == self.me.0 {
            return Err(Drop::FromSelf);
        }
        let sender = self.map.get(NodeId(msg.sender)).ok_or(Drop::UnknownSender)?;
        if from.is_some_and(|addr| addr != sender.addr) {
            return Err(Drop::UnknownSender);
        }
        if wall_ms.abs_diff(msg.sent_at_ms) > self.config.max_clock_skew_ms {
            return Err(Drop::Stale);
        }
        let stamp = (msg.incarnation, msg.counter);
        if self.last_counter.get(&msg.sender).is_some_and(|&last| stamp <= last) {
            return Err(Drop::Replay);
        }
        self.last_counter.insert(msg.sender, stamp);
        self.window.expire(now_ms);
        self.learn(now_ms, 0, msg.own);
        for entry in msg.entries {
            if entry.vector.node != self.me.0 && self.map.get(NodeId(entry.vector.node)).is_some() {
                self.learn(now_ms, u64::from(entry.age_ms), entry.vector);
            }
        }
        Ok(())
    }

    fn learn(&mut self, now_ms: u64, age_ms: u64, vector: LoadVector) {
        let origin_ms = now_ms.saturating_sub(age_ms);
        let node = vector.node;
        let newer = self.known.get(&node).is_none_or(|k| {
            vector.version() > k.vector.version()
                || (vector.version() == k.vector.version() && origin_ms > k.origin_ms)
        });
        if newer {
            if self.bumps.get(&node).is_some_and(|(_, v)| *v != vector.version()) {
                self.bumps.remove(&node);
            }
            self.known.insert(node, Known { vector: vector.clone(), origin_ms });
        }
        let _: Offer = self.window.offer(now_ms, age_ms, vector);
    }

    fn alive(&self, now_ms: u64, node: u32) -> bool {
        node == self.me.0
            || self
                .known
                .get(&node)
                .is_some_and(|k| now_ms.saturating_sub(k.origin_ms) < self.config.down_after_ms)
    }

    /// The cluster as this node sees it.
    pub fn view(&self, now_ms: u64) -> ClusterView {
        let nodes = self
            .map
            .nodes()
            .map(|node| {
                let (vector, age) = if node.id == self.me {
                    (self.own.as_ref(), self.own.as_ref().map(|_| 0))
                } else {
                    let k = self.known.get(&node.id.0);
                    (k.map(|k| &k.vector), k.map(|k| now_ms.saturating_sub(k.origin_ms)))
                };
                NodeView {
                    id: node.id.0,
                    address: node.addr.to_string(),
                    alive: self.alive(now_ms, node.id.0),
                    load: vector.map(|v| v.load),
                    cpus: vector.map(|v| v.cpus),
                    speed: vector.map(|v| v.speed),
                    mem_free: vector.map(|v| v.mem_free),
                    mem_total: vector.map(|v| v.mem_total),
                    guests: vector.map(|v| v.guests),
                    blocks_guests: vector.map(LoadVector::blocks_guests),
                    stays: vector.map(LoadVector::stays),
                    lstays: vector.map(LoadVector::lstays),
                    age_ms: age,
                }
            })
            .collect();
        ClusterView { node: self.me.0, nodes, counters: self.counters.clone() }
    }

    /// The best node for a new job needing `mem_bytes`: the lowest load per unit of computing power among
    /// this node and the live nodes of the window that accept guests and have the memory. Ties go to this
    /// node, then to the lower id. The chosen node's load is bumped locally by one job until its next vector.
    pub fn best(&mut self, now_ms: u64, mem_bytes: u64) -> NodeId {
        let Some((node, version)) = self.choose(now_ms, mem_bytes) else { return self.me };
        let bump = self.bumps.entry(node.0).or_insert((0.0, version));
        if bump.1 != version {
            *bump = (0.0, version);
        }
        bump.0 += 1.0;
        node
    }

    /// What [`Engine::best`] would answer, without counting a job there.
    pub fn peek_best(&self, now_ms: u64, mem_bytes: u64) -> NodeId {
        self.choose(now_ms, mem_bytes).map_or(self.me, |(node, _)| node)
    }

    fn choose(&self, now_ms: u64, mem_bytes: u64) -> Option<(NodeId, (u64, u64))> {
        // (cost, not this node, id): the smallest wins.
        let mut best: Option<(f64, bool, u32, (u64, u64))> = None;
        let own = self.own.iter().map(|v| (v, true));
        let others = self
            .window
            .iter()
            .filter(|e| e.age_ms(now_ms) < self.config.down_after_ms)
            .map(|e| (&e.vector, false));
        for (v, mine) in own.chain(others) {
            if (!mine && v.blocks_guests()) || v.mem_free < mem_bytes {
                continue;
            }
            let bump = self.bumps.get(&v.node).filter(|b| b.1 == v.version()).map_or(0.0, |b| b.0);
            let power = f64::from(v.cpus.max(1)) * v.speed;
            let key = ((v.load + bump + 1.0) / power, !mine, v.node, v.version());
            let better = best.is_none_or(|b| {
                key.0.total_cmp(&b.0).then(key.1.cmp(&b.1)).then(key.2.cmp(&b.2)).is_lt()
            });
            if better {
                best = Some(key);
            }
        }
        best.map(|(_, _, node, version)| (NodeId(node), version))
    }

    /// The window (for simulations and tests).
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The drop and traffic counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

#[cfg(test)]
mod tests {
    use rmosix_common::map::Node;
    use rmosix_common::wire::Entry;

    use super::*;

    fn map(n: u32) -> Arc<ClusterMap> {
        Arc::new(ClusterMap::from_nodes((1..=n).map(|i| Node {
            id: NodeId(i),
            addr: Ipv4Addr::new(10, 9, 0, u8::try_from(i).unwrap()),
            speed: 1.0,
            mem_weight: 1.0,
            line: 1,
        })))
    }

    fn config() -> EngineConfig {
        EngineConfig {
            window: 8,
            gossip_entries: 8,
            max_age_ms: 30_000,
            down_after_ms: 10_000,
            max_clock_skew_ms: 60_000,
        }
    }

    fn vector(node: u32, load: f64, seq: u64) -> LoadVector {
        LoadVector {
            node,
            cpus: 1,
            speed: 1.0,
            load,
            mem_free: 1 << 30,
            mem_total: 2 << 30,
            guests: 0,
            flags: 0,
            incarnation: 100,
            seq,
        }
    }

    fn gossip(sender: u32, counter: u64, entries: Vec<Entry>) -> Gossip {
        Gossip {
            sender,
            incarnation: 100,
            counter,
            sent_at_ms: WALL,
            own: vector(sender, 0.5, counter),
            entries,
        }
    }

    const WALL: u64 = 1_800_000_000_000;

    #[expect(clippy::unnecessary_wraps, reason = "`receive` takes the source address as an Option")]
    fn addr(n: u8) -> Option<Ipv4Addr> {
        Some(Ipv4Addr::new(10, 9, 0, n))
    }

    #[test]
    fn peers_are_chosen_at_random_among_the_others() {
        let mut e = Engine::new(NodeId(1), map(5), config(), 1, 42);
        let mut rounds = Vec::new();
        for round in 0..50 {
            let mut seen = Vec::new();
            for t in round * 4..round * 4 + 4 {
                let (to, msg) = e.tick(t * 1000, WALL, vector(1, 0.0, t)).unwrap();
                assert_eq!(msg.counter, t + 1);
                seen.push(to.0);
            }
            rounds.push(seen.clone());
            seen.sort_unstable();
            assert_eq!(seen, [2, 3, 4, 5], "every peer once per round");
        }
        rounds.sort();
        rounds.dedup();
        assert!(rounds.len() > 10, "orders vary: {rounds:?}");
        let mut alone = Engine::new(NodeId(1), map(1), config(), 1, 42);
        assert!(alone.tick(0, WALL, vector(1, 0.0, 0)).is_none());
    }

    /// The property the 4-node cluster test relies on: infods started a little apart, first datagram after
    /// 750 ms, one a second after that; by 5 s every node has heard of every other, whatever the seed.
    #[test]
    fn a_small_cluster_converges_within_five_intervals() {
        for seed in 0..2000u64 {
            let mut engines: Vec<Engine> =
                (1..=4).map(|i| Engine::new(NodeId(i), map(4), config(), 100, seed * 31 + u64::from(i))).collect();
            let mut events: Vec<(u64, usize)> = (0..4)
                .flat_map(|i| (0..5).map(move |k| (750 - 100 * i as u64 + 1000 * k, i)))
                .filter(|&(t, _)| t <= 5000)
                .collect();
            events.sort_unstable();
            for (seq, (t, i)) in events.into_iter().enumerate() {
                let own = vector(u32::try_from(i).unwrap() + 1, 0.0, seq as u64);
                let (to, msg) = engines[i].tick(t, WALL, own).unwrap();
                let from = addr(u8::try_from(i).unwrap() + 1);
                engines[to.0 as usize - 1].receive(t, WALL, from, Ok(msg)).unwrap();
            }
            for e in &engines {
                let view = e.view(5000);
                assert!(view.nodes.iter().all(|n| n.alive), "seed {seed}: node {} {view:?}", e.me());
            }
        }
    }

    #[test]
    fn relayed_information_is_learned_with_its_age() {
        let mut e = Engine::new(NodeId(1), map(4), config(), 1, 1);
        let relayed = Entry { age_ms: 2500, vector: vector(3, 2.0, 7) };
        e.receive(50_000, WALL, addr(2), Ok(gossip(2, 1, vec![relayed]))).unwrap();
        let view = e.view(51_000);
        let n3 = &view.nodes[2];
        assert_eq!((n3.id, n3.alive, n3.load, n3.age_ms), (3, true, Some(2.0), Some(3500)));
        assert_eq!(view.nodes[1].age_ms, Some(1000));
        assert!(!view.nodes[3].alive, "node 4 was never heard of");
        assert!(e.view(57_400).nodes[2].alive);
        assert!(!e.view(57_500).nodes[2].alive, "not heard of for 10 s: down");
    }

    #[test]
    fn replays_forgeries_and_strangers_are_dropped_and_counted() {
        let mut e = Engine::new(NodeId(1), map(4), config(), 1, 1);
        e.receive(1000, WALL, addr(2), Ok(gossip(2, 5, vec![]))).unwrap();
        assert_eq!(e.receive(1000, WALL, addr(2), Ok(gossip(2, 5, vec![]))), Err(Drop::Replay));
        assert_eq!(e.receive(1000, WALL, addr(2), Ok(gossip(2, 4, vec![]))), Err(Drop::Replay));
        assert_eq!(
            e.receive(1000, WALL, addr(3), Ok(gossip(2, 6, vec![]))),
            Err(Drop::UnknownSender),
            "node 2's id from node 3's address"
        );
        assert_eq!(e.receive(1000, WALL, None, Ok(gossip(9, 1, vec![]))), Err(Drop::UnknownSender));
        assert_eq!(e.receive(1000, WALL, None, Ok(gossip(1, 1, vec![]))), Err(Drop::FromSelf));
        assert_eq!(
            e.receive(1000, WALL + 61_000, addr(3), Ok(gossip(3, 1, vec![]))),
            Err(Drop::Stale)
        );
        assert_eq!(
            e.receive(1000, WALL, addr(3), Err(DecodeError::BadMac)),
            Err(Drop::Decode("mac"))
        );
        let c = e.counters();
        assert_eq!((c.received, c.accepted), (8, 1));
        assert_eq!(c.dropped["replay"], 2);
        assert_eq!(c.dropped["unknown_sender"], 2);
        assert_eq!(c.dropped["mac"], 1);
        // a restarted sender (new incarnation) starts its counter again
        let mut restarted = gossip(2, 1, vec![]);
        restarted.incarnation = 101;
        restarted.own.incarnation = 101;
        e.receive(2000, WALL, addr(2), Ok(restarted)).unwrap();
    }

    #[test]
    fn entries_about_unknown_nodes_or_ourselves_are_ignored() {
        let mut e = Engine::new(NodeId(1), map(3), config(), 1, 1);
        let entries = vec![
            Entry { age_ms: 0, vector: vector(1, 9.0, 1) },
            Entry { age_ms: 0, vector: vector(77, 9.0, 1) },
        ];
        e.receive(1000, WALL, addr(2), Ok(gossip(2, 1, entries))).unwrap();
        assert_eq!(e.window().len(), 1);
    }

    #[test]
    fn best_spreads_back_to_back_placements() {
        let mut e = Engine::new(NodeId(1), map(3), config(), 1, 1);
        e.tick(0, WALL, vector(1, 1.0, 1));
        let mut g2 = gossip(2, 1, vec![]);
        g2.own.load = 0.0;
        e.receive(0, WALL, addr(2), Ok(g2)).unwrap();
        let mut g3 = gossip(3, 1, vec![]);
        g3.own.load = 0.2;
        e.receive(0, WALL, addr(3), Ok(g3)).unwrap();
        let picks: Vec<u32> = (0..4).map(|_| e.best(10, 0).0).collect();
        // costs: n1 2.0, n2 1.0, n3 1.2 -> n2 (2.0), n3 (2.2), n1 and n2 tie at 2.0 -> self wins
        assert_eq!(picks, [2, 3, 1, 2]);
        // a fresh vector from node 2 clears its bump
        let mut g2 = gossip(2, 2, vec![]);
        g2.own.load = 0.0;
        e.receive(20, WALL, addr(2), Ok(g2)).unwrap();
        assert_eq!(e.best(30, 0), NodeId(2));
    }

    #[test]
    fn best_skips_nodes_that_block_guests_or_lack_memory() {
        let mut e = Engine::new(NodeId(1), map(3), config(), 1, 1);
        e.tick(0, WALL, vector(1, 5.0, 1));
        let mut g2 = gossip(2, 1, vec![]);
        g2.own.load = 0.0;
        g2.own.flags = rmosix_common::load::FLAG_BLOCKS_GUESTS;
        e.receive(0, WALL, addr(2), Ok(g2)).unwrap();
        let mut g3 = gossip(3, 1, vec![]);
        g3.own.load = 0.0;
        g3.own.mem_free = 100;
        e.receive(0, WALL, addr(3), Ok(g3)).unwrap();
        assert_eq!(e.best(10, 1000), NodeId(1));
        assert_eq!(e.best(10, 0), NodeId(3));
    }
}
