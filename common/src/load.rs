//! The load vector: what one node tells the others about itself, and the decay that smooths its load.

use crate::config::LoadConfig;

/// Policy flag: the node refuses guest jobs.
pub const FLAG_BLOCKS_GUESTS: u32 = 1;
/// Policy flag: nothing leaves the node by itself (`mosctl stay`).
pub const FLAG_STAYS: u32 = 2;
/// Policy flag: the node's own jobs do not leave it by themselves (`mosctl lstay`).
pub const FLAG_LSTAYS: u32 = 4;
/// Every flag this version knows; others are kept but not interpreted.
pub const KNOWN_FLAGS: u32 = FLAG_BLOCKS_GUESTS | FLAG_STAYS | FLAG_LSTAYS;

/// One node's state at one moment, as measured by its infod.
#[derive(
    Debug,
    Clone,
    PartialEq,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct LoadVector {
    /// The node measured.
    pub node: u32,
    /// CPUs the node may run jobs on.
    pub cpus: u32,
    /// Relative CPU speed (1.0 = reference).
    pub speed: f64,
    /// Decayed run-queue length (processes running or ready), see [`Decay`].
    pub load: f64,
    /// Bytes of memory available to new jobs.
    pub mem_free: u64,
    /// Bytes of memory in all.
    pub mem_total: u64,
    /// Guest jobs (homed elsewhere) running on the node.
    pub guests: u32,
    /// Policy flags (`FLAG_*`).
    pub flags: u32,
    /// Identifies one run of the node's infod (its start time in nanoseconds since the epoch), so a restarted
    /// daemon's vectors are newer than its previous run's.
    pub incarnation: u64,
    /// Measurement number within the incarnation.
    pub seq: u64,
}

impl LoadVector {
    /// `(incarnation, seq)`: orders two vectors of the same node, larger is newer.
    pub fn version(&self) -> (u64, u64) {
        (self.incarnation, self.seq)
    }

    /// Load per unit of computing power if one more job came: the figure nodes are compared by
    /// when choosing where a job should go. Lower is better.
    pub fn placement_cost(&self) -> f64 {
        let power = f64::from(self.cpus.max(1)) * self.speed.max(f64::MIN_POSITIVE);
        (self.load + 1.0) / power
    }

    /// True when every number is in its domain. Vectors failing this are dropped on receipt.
    pub fn is_sane(&self) -> bool {
        self.speed.is_finite()
            && self.speed > 0.0
            && self.load.is_finite()
            && self.load >= 0.0
            && self.mem_free <= self.mem_total
            && self.cpus > 0
    }

    /// True when the node refuses guest jobs.
    pub fn blocks_guests(&self) -> bool {
        self.flags & FLAG_BLOCKS_GUESTS != 0
    }

    /// True when nothing leaves the node by itself.
    pub fn stays(&self) -> bool {
        self.flags & FLAG_STAYS != 0
    }

    /// True when the node's own jobs do not leave it by themselves.
    pub fn lstays(&self) -> bool {
        self.flags & FLAG_LSTAYS != 0
    }
}

/// MOSIX-style decayed load average: rises fast, falls slowly.
#[derive(Debug, Clone)]
pub struct Decay {
    value: f64,
    rise: f64,
    fall: f64,
}

impl Decay {
    /// A decay starting at zero.
    pub fn new(config: &LoadConfig) -> Self {
        Self { value: 0.0, rise: config.rise, fall: config.fall }
    }

    /// Folds one interval's run-queue sample in and returns the new load.
    pub fn update(&mut self, sample: f64) -> f64 {
        let sample = if sample.is_finite() { sample.max(0.0) } else { 0.0 };
        let k = if sample > self.value { self.rise } else { self.fall };
        self.value = self.value * k + sample * (1.0 - k);
        self.value
    }

    /// The current load.
    pub fn value(&self) -> f64 {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decay() -> Decay {
        Decay::new(&LoadConfig { rise: 0.4, fall: 0.85, samples_per_interval: 1 })
    }

    #[test]
    fn one_step_is_the_weighted_mean() {
        let mut d = decay();
        assert!((d.update(2.0) - 1.2).abs() < 1e-12); // 0*0.4 + 2*0.6
        assert!((d.update(0.0) - 1.02).abs() < 1e-12); // 1.2*0.85
    }

    #[test]
    fn load_rises_fast_and_falls_slowly() {
        let mut d = decay();
        let steps_up = (1..100).find(|_| d.update(1.0) > 0.9).unwrap();
        let steps_down = (1..100).find(|_| d.update(0.0) < 0.1).unwrap();
        assert_eq!(steps_up, 3); // 0.6, 0.84, 0.936
        assert!(steps_down > 3 * steps_up, "fell in {steps_down} steps, rose in {steps_up}");
        assert_eq!(steps_down, 14); // 0.936 * 0.85^14 = 0.096
    }

    #[test]
    fn steady_state_is_the_sample() {
        let mut d = decay();
        for _ in 0..200 {
            d.update(3.0);
        }
        assert!((d.value() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn garbage_samples_do_not_poison_the_load() {
        let mut d = decay();
        d.update(f64::NAN);
        d.update(-5.0);
        assert!(d.value().abs() < f64::EPSILON);
    }

    #[test]
    fn placement_prefers_idle_power() {
        let v = |cpus, speed, load| LoadVector {
            node: 1,
            cpus,
            speed,
            load,
            mem_free: 0,
            mem_total: 0,
            guests: 0,
            flags: 0,
            incarnation: 0,
            seq: 0,
        };
        assert!(v(2, 1.0, 0.0).placement_cost() < v(1, 1.0, 0.0).placement_cost());
        assert!(v(1, 2.0, 1.0).placement_cost() < v(1, 1.0, 0.5).placement_cost());
        assert!(!v(1, f64::NAN, 0.0).is_sane());
    }
}
