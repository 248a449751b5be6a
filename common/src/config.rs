//! The TOML configuration shared by the daemons and tools of one node.
//!
//! Every field has a default, so an empty file (or none at all at the default path) is a working
//! configuration; unknown fields are refused so a misspelt option is an error, not a silent no-op. The
//! documented defaults live in `etc/rmosix.toml`, which a unit test parses so it cannot drift.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::NodeId;
use crate::cgroup::CgroupPath;

/// Where the configuration is looked for when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rmosix/rmosix.toml";
/// Environment variable naming the configuration file (the test cluster sets it per node).
pub const CONFIG_ENV: &str = "RMOSIX_CONFIG";

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Path of the cluster map (`mosix.map` format).
    pub map: PathBuf,
    /// Path of the cluster key: shared secret of all nodes, hex, mode 0600.
    pub cluster_key: PathBuf,
    /// This node's id; when absent, the node whose map address is assigned to this host.
    pub node: Option<NodeId>,
    /// Information daemon settings.
    pub infod: InfodConfig,
    /// How the load is smoothed before it is advertised.
    pub load: LoadConfig,
    /// Where the node's resources are measured.
    pub resources: ResourcesConfig,
    /// Policy this node advertises to others.
    pub policy: PolicyConfig,
    /// Checkpoint and restore.
    pub checkpoint: CheckpointConfig,
    /// Migration daemon settings.
    pub migd: MigdConfig,
    /// Automatic load balancing and memory ushering, by migd.
    pub balance: BalanceConfig,
}

/// How migd moves jobs by itself (see `rmosix_common::balance`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Move CPU-bound jobs to less loaded nodes, and memory-hungry ones off a node short of memory, without
    /// anyone asking. `migrate` works either way.
    pub auto: bool,
    /// Milliseconds between two decisions.
    pub interval_ms: u64,
    /// How much more of a CPU a job must get elsewhere, as a fraction of what it gets here, to be moved.
    pub margin: f64,
    /// Seconds a job stays on a node before the balancer moves it again.
    pub min_residence_secs: u64,
    /// Free memory, as a fraction of the node's, below which the node sends jobs away; no job is moved to a
    /// node it would bring below it.
    pub usher_below: f64,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self { auto: true, interval_ms: 1000, margin: 0.3, min_residence_secs: 3, usher_below: 0.1 }
    }
}

/// Settings of migd, the migration daemon.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigdConfig {
    /// TCP port migd listens on at the node's map address, for other migds.
    pub port: u16,
    /// Unix socket for local users (`mosrun`, `migrate`).
    pub socket: PathBuf,
    /// Directory of the home records of the jobs started on this node.
    pub records: PathBuf,
    /// `rmosix-init`; default: beside the migd binary.
    pub init: Option<PathBuf>,
    /// The most image bytes this node takes in one incoming move. 0: automatic, the node's available memory
    /// (`MemAvailable`) less 10 % of its memory or 256 MiB, whichever is larger, when the offer arrives
    /// (`rmosix_checkpoint::transfer::image_limit`). Images land on a tmpfs, in memory, so a peer could
    /// otherwise fill it: a larger offer is refused, and so is a stream that announces or carries more.
    pub max_image_bytes: u64,
    /// Seconds of silence after which a node is taken for down by the migds that deal with it: a job link
    /// or a move with nothing heard for this long has ended. A deputy whose job's node went silent says so
    /// and exits 255 within this time. Both ends send keepalives several times within it.
    pub silence_secs: u32,
    /// Control connections one local user other than root may hold at once that are not running a job:
    /// connected and not yet asked (a client has a few seconds to ask), or asking (`migrate`). A `mosrun`
    /// counts only until its job has started, so a user may run any number of jobs; connections beyond
    /// this wait their turn for those few seconds, and migd refuses ("busy") what is still waiting then, or
    /// what arrives while eight times this many wait. This bounds the threads and descriptors one user
    /// can take from migd; root is not counted, so its tools get through whatever users do.
    pub requests_per_user: u32,
    /// Watch jobs with the eBPF probes (`rmosix_ebpf_probes`). When false, or when they cannot load, migd
    /// reads `/proc` instead: coarser (the counts of a job's processes that exited go with them) and a
    /// little dearer per job, but no program runs in the kernel.
    pub probes: bool,
}

impl Default for MigdConfig {
    fn default() -> Self {
        Self {
            port: 5402,
            socket: PathBuf::from("/run/rmosix/migd.sock"),
            records: PathBuf::from("/var/lib/rmosix/records"),
            init: None,
            max_image_bytes: 0,
            silence_secs: 30,
            requests_per_user: 32,
            probes: true,
        }
    }
}

/// Where CRIU is and where its images and logs go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// The criu binary (4.0 or newer). Default: the one `cargo xtask setup` provisioned.
    pub criu: PathBuf,
    /// Image store: a tmpfs (mounted there with huge pages if it is not one yet) for image sets.
    pub image_store: PathBuf,
    /// Where CRIU's logs go; the log of a failed operation is kept and named in the error.
    pub log_dir: PathBuf,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            criu: PathBuf::from("/opt/rmosix/criu/bin/criu"),
            image_store: PathBuf::from("/run/rmosix/images"),
            log_dir: PathBuf::from("/var/log/rmosix/criu"),
        }
    }
}

/// Settings of infod, the information daemon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InfodConfig {
    /// UDP port infod listens on at the node's map address, and sends to on its peers.
    pub port: u16,
    /// Milliseconds between two measurements and two datagrams sent.
    pub interval_ms: u64,
    /// Most entries about other nodes kept in the window.
    pub window: usize,
    /// Most window entries carried by one datagram besides the sender's own vector.
    pub gossip_entries: usize,
    /// Entries older than this leave the window (milliseconds).
    pub max_age_ms: u64,
    /// A node not heard of, directly or through others, for this long is shown as down (milliseconds).
    pub down_after_ms: u64,
    /// Datagrams whose send time differs from ours by more than this are dropped as replays (milliseconds).
    pub max_clock_skew_ms: u64,
    /// Unix socket for local queries (`mosctl status`, `mosctl best`).
    pub socket: PathBuf,
}

/// Decay of the advertised load: the new value is `old * k + sample * (1 - k)`, with `k = rise` when the
/// sample is above the current load and `k = fall` when it is below. A small `rise` and a large `fall` make
/// the load rise fast and fall slowly, so a node that just got work stops attracting more at once, and a
/// briefly idle node does not look free.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// Weight of the old value when the load rises, per interval (0 ≤ rise < 1).
    pub rise: f64,
    /// Weight of the old value when the load falls, per interval (0 ≤ fall < 1).
    pub fall: f64,
    /// Run-queue samples taken per interval and averaged.
    pub samples_per_interval: u32,
}

/// Where the load and memory of the node are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceSource {
    /// The whole host: `/proc/loadavg`, `/proc/meminfo`, the CPUs infod may run on.
    Host,
    /// One cgroup (v1 or v2, see [`crate::cgroup`]): a simulated node of the local test cluster.
    Cgroup,
}

/// Settings of the resource view.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// Which view to use.
    pub source: ResourceSource,
    /// The node's cgroup (for `source = "cgroup"`): its CPUs, tasks, memory limit and usage. A path from the
    /// root of the cgroup hierarchy such as `/rmosix-local/node1`, not a directory, so the same setting works
    /// on cgroup v1 (in the cpuset and memory hierarchies) and v2.
    pub cgroup: Option<CgroupPath>,
    /// Relative CPU speed; overrides the map's `speed=` for this node.
    pub speed: Option<f64>,
}

/// Policy flags the node advertises.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Refuse guest jobs from other nodes.
    pub block_guests: bool,
    /// Take root's jobs (uid 0) from other nodes. Off by default: whoever holds the cluster key could
    /// otherwise run anything as root on this node. A root job coming back to its home node is always taken.
    pub allow_root_guests: bool,
    /// Where the policy set with `mosctl` (block, stay, lstay, setspeed) is kept across restarts; until it
    /// exists, the policy is this section's. Relative paths are taken from the configuration file's directory.
    pub state: PathBuf,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { block_guests: false, allow_root_guests: false, state: PathBuf::from("/var/lib/rmosix/policy.json") }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            map: PathBuf::from("/etc/rmosix/mosix.map"),
            cluster_key: PathBuf::from("/etc/rmosix/cluster.key"),
            node: None,
            infod: InfodConfig::default(),
            load: LoadConfig::default(),
            resources: ResourcesConfig::default(),
            policy: PolicyConfig::default(),
            checkpoint: CheckpointConfig::default(),
            migd: MigdConfig::default(),
            balance: BalanceConfig::default(),
        }
    }
}

impl Default for InfodConfig {
    fn default() -> Self {
        Self {
            port: 5401,
            interval_ms: 1000,
            window: 20,
            gossip_entries: 20,
            max_age_ms: 30_000,
            down_after_ms: 10_000,
            max_clock_skew_ms: 60_000,
            socket: PathBuf::from("/run/rmosix/infod.sock"),
        }
    }
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self { rise: 0.4, fall: 0.85, samples_per_interval: 4 }
    }
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self { source: ResourceSource::Host, cgroup: None, speed: None }
    }
}

/// A configuration that can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {field}: {problem}")]
    Invalid { path: PathBuf, field: &'static str, problem: String },
}

impl Config {
    /// Loads the configuration: from `explicit` if given (it must exist), else from `$RMOSIX_CONFIG`, else from
    /// [`DEFAULT_CONFIG_PATH`] when that file exists, else the built-in defaults.
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let path = explicit
            .map(Path::to_owned)
            .or_else(|| std::env::var_os(CONFIG_ENV).map(PathBuf::from))
            .or_else(|| {
                let default = PathBuf::from(DEFAULT_CONFIG_PATH);
                default.exists().then_some(default)
            });
        match path {
            None => Ok((Self::default(), None)),
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                Ok((Self::parse(&text, &path)?, Some(path)))
            }
        }
    }

    /// Parses and validates configuration text; `path` only appears in errors. Relative paths in the file
    /// are taken relative to the file's directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), source: Box::new(e) })?;
        if let Some(dir) = path.parent() {
            for p in [
                &mut config.map,
                &mut config.cluster_key,
                &mut config.infod.socket,
                &mut config.checkpoint.criu,
                &mut config.checkpoint.image_store,
                &mut config.checkpoint.log_dir,
                &mut config.migd.socket,
                &mut config.migd.records,
                &mut config.policy.state,
            ] {
                if p.is_relative() {
                    *p = normalize(&dir.join(&*p));
                }
            }
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field, problem: &str| {
            Err(ConfigError::Invalid { path: path.to_owned(), field, problem: problem.to_owned() })
        };
        let i = &self.infod;
        if i.interval_ms == 0 {
            return bad("infod.interval_ms", "must be at least 1");
        }
        if i.window == 0 {
            return bad("infod.window", "must be at least 1");
        }
        if i.down_after_ms <= i.interval_ms {
            return bad("infod.down_after_ms", "must be longer than infod.interval_ms");
        }
        if i.max_age_ms < i.down_after_ms {
            return bad("infod.max_age_ms", "must be at least infod.down_after_ms");
        }
        if i.port == 0 {
            return bad("infod.port", "must not be 0");
        }
        for (field, k) in [("load.rise", self.load.rise), ("load.fall", self.load.fall)] {
            if !(0.0..1.0).contains(&k) {
                return bad(field, "must be at least 0 and below 1");
            }
        }
        if self.load.samples_per_interval == 0 {
            return bad("load.samples_per_interval", "must be at least 1");
        }
        if let Some(speed) = self.resources.speed
            && !(speed.is_finite() && speed > 0.0)
        {
            return bad("resources.speed", "must be a positive number");
        }
        if self.migd.requests_per_user == 0 {
            return bad("migd.requests_per_user", "must be at least 1");
        }
        if self.resources.source == ResourceSource::Cgroup && self.resources.cgroup.is_none() {
            return bad(
                "resources.cgroup",
                "source = \"cgroup\" needs the node's cgroup, a path such as \"/rmosix-local/node1\"",
            );
        }
        Ok(())
    }
}

/// Removes `.` and `name/..` from a path without touching the file system, so error messages show
/// `/srv/mosix.map`, not `/srv/node1/../mosix.map`.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("/etc/rmosix/rmosix.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn the_documented_example_is_the_defaults() {
        let text = include_str!("../../etc/rmosix.toml");
        let c = Config::parse(text, Path::new("/etc/rmosix/rmosix.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[infod]\nintervall_ms = 5\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("unknown field `intervall_ms`"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let c = Config::parse("map = \"mosix.map\"\n", Path::new("/srv/n1/rmosix.toml")).unwrap();
        assert_eq!(c.map, Path::new("/srv/n1/mosix.map"));
        let c = Config::parse("map = \"../x/./mosix.map\"\n", Path::new("/srv/n1/rmosix.toml")).unwrap();
        assert_eq!(c.map, Path::new("/srv/x/mosix.map"));
    }

    #[test]
    fn inconsistent_values_are_refused() {
        let err = Config::parse("[infod]\ndown_after_ms = 500\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.toml: infod.down_after_ms: must be longer than infod.interval_ms"
        );
        assert!(Config::parse("[load]\nrise = 1.0\n", Path::new("x")).is_err());
        let err = Config::parse("[resources]\nsource = \"cgroup\"\n", Path::new("x.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.toml: resources.cgroup: source = \"cgroup\" needs the node's cgroup, a path such as \"/rmosix-local/node1\""
        );
    }

    #[test]
    fn the_image_limit_is_automatic_unless_set() {
        assert_eq!(Config::default().migd.max_image_bytes, 0);
        let c = Config::parse("[migd]\nmax_image_bytes = 8589934592\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.migd.max_image_bytes, 8 << 30);
        let err = Config::parse("[migd]\nmax_image_bytes = -1\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("max_image_bytes"), "{err}");
    }

    #[test]
    fn the_node_cgroup_is_one_path_from_the_hierarchy_root() {
        let text = "[resources]\nsource = \"cgroup\"\ncgroup = \"/rmosix-local/node1\"\n";
        let c = Config::parse(text, Path::new("/srv/n1/rmosix.toml")).unwrap();
        assert_eq!(c.resources.source, ResourceSource::Cgroup);
        assert_eq!(c.resources.cgroup.unwrap().as_str(), "/rmosix-local/node1");
        // Not a directory, and not relative to the file: relative paths and `..` are refused.
        for bad in ["rmosix-local/node1", "/rmosix-local/../node1"] {
            let text = format!("[resources]\nsource = \"cgroup\"\ncgroup = \"{bad}\"\n");
            let err = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
            assert!(err.contains("is not a cgroup path"), "{err}");
        }
        // The v1-only keys of earlier versions are gone.
        let err = Config::parse("[resources]\ncpuset_cgroup = \"/sys/fs/cgroup/cpuset/x\"\n", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cpuset_cgroup`"), "{err}");
    }
}
