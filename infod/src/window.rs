//! The window: a bounded set of the newest information this node holds about other nodes.
//!
//! MOSIX's insight is that a node needs recent information about *some* nodes, not all: each node keeps a
//! small window, sends its freshest part to one random peer per interval, and so per-node traffic and memory
//! stay constant however large the cluster grows. Entries carry their age; the window converts it to a local
//! time of origin on arrival, so no clock synchronisation is needed.

use std::collections::HashMap;

use rmosix_common::load::LoadVector;
use rmosix_common::wire::Entry;

/// One node's newest known vector.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowEntry {
    /// The vector as measured by its node.
    pub vector: LoadVector,
    /// Local monotonic time (ms) at which the vector was measured, estimated from its age on arrival.
    pub origin_ms: u64,
}

impl WindowEntry {
    /// Age of the information at local time `now_ms`.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.origin_ms)
    }
}

/// Bounded window of entries keyed by node id.
#[derive(Debug, Clone)]
pub struct Window {
    capacity: usize,
    max_age_ms: u64,
    entries: HashMap<u32, WindowEntry>,
}

/// What [`Window::offer`] did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The entry is new or newer than what the window held, and is now in it.
    Taken,
    /// The window already holds this or newer information about the node.
    NotNewer,
    /// The entry is older than the maximum age.
    TooOld,
    /// The window is full of fresher entries.
    NoRoom,
}

impl Window {
    /// An empty window of at most `capacity` entries none older than `max_age_ms`.
    pub fn new(capacity: usize, max_age_ms: u64) -> Self {
        Self { capacity, max_age_ms, entries: HashMap::with_capacity(capacity + 1) }
    }

    /// Offers information `age_ms` old at local time `now_ms`.
    pub fn offer(&mut self, now_ms: u64, age_ms: u64, vector: LoadVector) -> Offer {
        if age_ms >= self.max_age_ms {
            return Offer::TooOld;
        }
        let origin_ms = now_ms.saturating_sub(age_ms);
        if let Some(held) = self.entries.get_mut(&vector.node) {
            return match vector.version().cmp(&held.vector.version()) {
                std::cmp::Ordering::Greater => {
                    *held = WindowEntry { vector, origin_ms };
                    Offer::Taken
                }
                std::cmp::Ordering::Equal => {
                    // The same measurement by a shorter path: keep the better age estimate.
                    held.origin_ms = held.origin_ms.max(origin_ms);
                    Offer::NotNewer
                }
                std::cmp::Ordering::Less => Offer::NotNewer,
            };
        }
        // A full window makes room by dropping its oldest entry (expired ones are the oldest).
        if self.entries.len() >= self.capacity {
            let (&oldest, entry) = self
                .entries
                .iter()
                .min_by_key(|(id, e)| (e.origin_ms, **id))
                .expect("a full window is not empty");
            if entry.origin_ms >= origin_ms {
                return Offer::NoRoom;
            }
            self.entries.remove(&oldest);
        }
        self.entries.insert(vector.node, WindowEntry { vector, origin_ms });
        Offer::Taken
    }

    /// Drops entries that reached the maximum age.
    pub fn expire(&mut self, now_ms: u64) {
        let max_age = self.max_age_ms;
        self.entries.retain(|_, e| e.age_ms(now_ms) < max_age);
    }

    /// Up to `n` freshest entries younger than `younger_than_ms`, with their ages at `now_ms`, freshest first.
    pub fn freshest(&self, now_ms: u64, n: usize, younger_than_ms: u64) -> Vec<Entry> {
        let limit = younger_than_ms.min(self.max_age_ms);
        let mut all: Vec<&WindowEntry> = self.entries.values().filter(|e| e.age_ms(now_ms) < limit).collect();
        all.sort_unstable_by_key(|e| (std::cmp::Reverse(e.origin_ms), e.vector.node));
        all.into_iter()
            .take(n)
            .map(|e| Entry {
                age_ms: u32::try_from(e.age_ms(now_ms)).unwrap_or(u32::MAX),
                vector: e.vector.clone(),
            })
            .collect()
    }

    /// The entry about `node`, if held.
    pub fn get(&self, node: u32) -> Option<&WindowEntry> {
        self.entries.get(&node)
    }

    /// Every entry held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &WindowEntry> {
        self.entries.values()
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(node: u32, seq: u64) -> LoadVector {
        LoadVector {
            node,
            cpus: 1,
            speed: 1.0,
            load: 0.0,
            mem_free: 0,
            mem_total: 0,
            guests: 0,
            flags: 0,
            incarnation: 1,
            seq,
        }
    }

    #[test]
    fn newer_versions_replace_older_ones() {
        let mut w = Window::new(4, 10_000);
        assert_eq!(w.offer(1000, 0, v(2, 5)), Offer::Taken);
        assert_eq!(w.offer(1100, 0, v(2, 4)), Offer::NotNewer);
        assert_eq!(w.get(2).unwrap().vector.seq, 5);
        assert_eq!(w.offer(1200, 50, v(2, 6)), Offer::Taken);
        assert_eq!(w.get(2).unwrap().origin_ms, 1150);
        let mut restarted = v(2, 0);
        restarted.incarnation = 2;
        assert_eq!(w.offer(1300, 0, restarted), Offer::Taken, "a new incarnation is newer");
    }

    #[test]
    fn the_same_measurement_keeps_the_best_age() {
        let mut w = Window::new(4, 10_000);
        w.offer(1000, 500, v(2, 5));
        assert_eq!(w.offer(1000, 100, v(2, 5)), Offer::NotNewer);
        assert_eq!(w.get(2).unwrap().age_ms(1000), 100);
    }

    #[test]
    fn entries_age_and_leave() {
        let mut w = Window::new(4, 3000);
        assert_eq!(w.offer(1000, 3000, v(2, 1)), Offer::TooOld);
        w.offer(1000, 1000, v(2, 1));
        w.offer(1000, 0, v(3, 1));
        assert_eq!(w.freshest(2500, 10, u64::MAX).iter().map(|e| e.age_ms).collect::<Vec<_>>(), [1500, 2500]);
        assert_eq!(w.freshest(2500, 10, 2000).len(), 1, "older news stays home");
        w.expire(3000);
        assert_eq!(w.len(), 1);
        assert_eq!(w.freshest(3000, 10, u64::MAX)[0].vector.node, 3);
        w.expire(4000);
        assert!(w.is_empty());
    }

    #[test]
    fn a_full_window_evicts_its_oldest_for_fresher_news_only() {
        let mut w = Window::new(3, 60_000);
        for node in 2..5 {
            w.offer(10_000, u64::from(node) * 100, v(node, 1));
        }
        // older than everything held: no room
        assert_eq!(w.offer(10_000, 900, v(9, 1)), Offer::NoRoom);
        // fresher than the oldest (node 4, 400 ms): it goes
        assert_eq!(w.offer(10_000, 50, v(8, 1)), Offer::Taken);
        assert_eq!(w.len(), 3);
        assert!(w.get(4).is_none());
        assert_eq!(w.freshest(10_000, 2, u64::MAX).iter().map(|e| e.vector.node).collect::<Vec<_>>(), [8, 2]);
    }
}
