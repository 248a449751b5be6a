//! A node's policy as its administrator sets it with `mosctl` (`block`, `stay`, `lstay`, `setspeed`):
//! kept in a small JSON file (`[policy] state`) that migd writes and infod reads, so it survives restarts
//! of either, and advertised to the cluster in the load vector's flags and speed.
//!
//! Until `mosctl` first changes it, a node's policy is the configuration's (`[policy] block_guests`,
//! `[resources] speed`). A file that cannot be read or decoded is reported, and the configuration's
//! policy is used meanwhile: a node never blocks or unblocks by accident.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::load::{FLAG_BLOCKS_GUESTS, FLAG_LSTAYS, FLAG_STAYS};

/// What a node allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePolicy {
    /// Refuse guest jobs (`mosctl block`); a job coming back home is always taken.
    pub block_guests: bool,
    /// Nothing leaves this node by itself: neither its own jobs nor its guests (`mosctl stay`).
    pub stay: bool,
    /// The jobs started here do not leave by themselves while they run here; guests still may
    /// (`mosctl lstay`).
    pub lstay: bool,
    /// Relative CPU speed advertised instead of the map's or the configuration's (`mosctl setspeed`).
    pub speed: Option<f64>,
}

/// A change `mosctl` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Block,
    NoBlock,
    Stay,
    NoStay,
    LStay,
    NoLStay,
    SetSpeed(f64),
}

impl NodePolicy {
    /// The configuration's policy, before `mosctl` changed anything.
    pub fn configured(config: &Config) -> Self {
        Self { block_guests: config.policy.block_guests, stay: false, lstay: false, speed: None }
    }

    /// The policy in force: the state file's if there is one, else the configuration's.
    pub fn load(config: &Config) -> Result<Self, PolicyError> {
        let path = &config.policy.state;
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PolicyError::Decode { path: path.clone(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::configured(config)),
            Err(source) => Err(PolicyError::Io { path: path.clone(), source }),
        }
    }

    /// Writes the policy to `path` so that a crash leaves the old file or the new one (temporary file,
    /// fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), PolicyError> {
        let io = |source| PolicyError::Io { path: path.to_owned(), source };
        let temp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp).map_err(io)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("a policy encodes")).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temp, path).map_err(io)?;
        Ok(())
    }

    /// This policy with `change` made; an error for a speed that is not a positive number.
    pub fn with(mut self, change: Change) -> Result<Self, PolicyError> {
        match change {
            Change::Block => self.block_guests = true,
            Change::NoBlock => self.block_guests = false,
            Change::Stay => self.stay = true,
            Change::NoStay => self.stay = false,
            Change::LStay => self.lstay = true,
            Change::NoLStay => self.lstay = false,
            Change::SetSpeed(speed) if speed.is_finite() && speed > 0.0 && speed <= 1e6 => self.speed = Some(speed),
            Change::SetSpeed(speed) => return Err(PolicyError::BadSpeed(speed)),
        }
        Ok(self)
    }

    /// The load vector's flags for this policy.
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.block_guests {
            flags |= FLAG_BLOCKS_GUESTS;
        }
        if self.stay {
            flags |= FLAG_STAYS;
        }
        if self.lstay {
            flags |= FLAG_LSTAYS;
        }
        flags
    }

    /// In words, for `mosctl status` and the logs: `block stay lstay speed=2` or `-`.
    pub fn words(&self) -> String {
        let mut words: Vec<String> = Vec::new();
        for (set, word) in [(self.block_guests, "block"), (self.stay, "stay"), (self.lstay, "lstay")] {
            if set {
                words.push(word.to_owned());
            }
        }
        if let Some(speed) = self.speed {
            words.push(format!("speed={speed}"));
        }
        if words.is_empty() { "-".to_owned() } else { words.join(" ") }
    }
}

/// The policy could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: not a node policy ({why}); remove it to fall back on the configuration", path.display())]
    Decode { path: PathBuf, why: String },
    #[error("speed {0} is not a positive number")]
    BadSpeed(f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let mut c = Config::default();
        c.policy.state = dir.join("policy.json");
        c
    }

    #[test]
    fn a_policy_survives_being_saved_and_the_configuration_holds_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.policy.block_guests = true;
        assert_eq!(NodePolicy::load(&c).unwrap(), NodePolicy { block_guests: true, ..NodePolicy::default() });
        let p = NodePolicy::load(&c).unwrap().with(Change::NoBlock).unwrap().with(Change::Stay).unwrap();
        let p = p.with(Change::SetSpeed(2.5)).unwrap();
        p.save(&c.policy.state).unwrap();
        assert_eq!(NodePolicy::load(&c).unwrap(), p);
        assert_eq!(p.flags(), FLAG_STAYS);
        assert_eq!(p.words(), "stay speed=2.5");
    }

    #[test]
    fn a_bad_speed_or_a_bad_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        assert!(matches!(NodePolicy::default().with(Change::SetSpeed(0.0)), Err(PolicyError::BadSpeed(_))));
        assert!(NodePolicy::default().with(Change::SetSpeed(f64::NAN)).is_err());
        std::fs::write(&c.policy.state, "{\"block_guests\": 1}").unwrap();
        let e = NodePolicy::load(&c).unwrap_err().to_string();
        assert!(e.contains("policy.json") && e.contains("not a node policy"), "{e}");
    }
}
