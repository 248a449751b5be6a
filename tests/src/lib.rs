//! A real rmosix cluster on one machine, for the integration tests and the demo.
//!
//! Each node is a network namespace (`rmx-<cluster>-<i>`) joined to the others by a bridge, with its own
//! address `10.213.0.<i>`, its own cgroup `/rmosix-<cluster>/node<i>` (a share of the machine's cores, a
//! memory limit; made through [`rmosix_common::cgroup`], so on cgroup v1 and v2 alike), and its own
//! configuration under `/run/rmosix-cluster/<cluster>/node<i>/`; the daemons run inside it. The nodes
//! share a generated `mosix.map` and cluster key. Nothing is mocked: the daemons talk real UDP over real veth
//! links, and each sees only its own cgroup's load.
//!
//! Several clusters (with different names) can exist at once; every name owns its own namespaces, bridge and
//! cgroups, so tests run in parallel. A [`Cluster`] removes everything it made when dropped, unless
//! [`Cluster::keep`] is called (the `cargo xtask cluster up` case); `up` first removes whatever a crashed
//! run of the same name left behind.

use std::fmt::Write as _;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rmosix_common::cgroup::{self, Cgroup, CgroupPath, Controller, Hierarchy};
use rmosix_common::control;
use rmosix_common::key::ClusterKey;
use rmosix_common::query::{self, ClusterView, Request, Response};

pub mod netfault;
pub mod user;

/// How long a test waits for something that should happen in seconds before it gives up and fails. It is
/// no measure of speed: on a loaded machine (two cores, several clusters of parallel tests) things happen
/// late but still happen, and this only keeps a broken run from hanging.
pub const PATIENCE: Duration = Duration::from_mins(2);

/// Waits until `done` holds, looking every 20 ms, and panics naming `what` when it does not within
/// `timeout`. Tests wait for the condition they need, never a fixed time: a fixed sleep is too short on a
/// loaded machine and hides nothing on an idle one.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    wait_until_some(what, timeout, || done().then_some(()));
}

/// Waits until `found` returns something, looking every 20 ms, and returns it; panics naming `what` when
/// nothing comes within `timeout`.
pub fn wait_until_some<T>(what: &str, timeout: Duration, mut found: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(start.elapsed() < timeout, "waited {timeout:?} for {what}, in vain");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The number of threads of process `pid`, from `/proc/PID/status`.
pub fn threads_of(pid: i32) -> anyhow::Result<usize> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status.lines().find_map(|l| l.strip_prefix("Threads:")).with_context(|| format!("no Threads: in {path}"))?;
    line.trim().parse().with_context(|| format!("bad Threads: line {line:?} in {path}"))
}

/// Where cluster state lives.
pub const STATE_ROOT: &str = "/run/rmosix-cluster";
/// The first three octets of every node address; node `i` is `10.213.0.i`. Each cluster has its own bridge
/// and namespaces, so clusters do not see each other even though they share the range.
pub const SUBNET: [u8; 3] = [10, 213, 0];
/// infod's port inside the cluster.
pub const INFOD_PORT: u16 = 5401;
/// migd's port inside the cluster.
pub const MIGD_PORT: u16 = 5402;
/// Where the nodes of a local cluster keep image sets (one tmpfs on this machine; each image set is still
/// sent over the network between nodes).
pub const IMAGE_STORE: &str = "/run/rmosix/images";

/// The criu the cluster's nodes use: `$RMOSIX_CRIU`, else the one `cargo xtask setup` provisions.
pub fn criu_path() -> PathBuf {
    std::env::var_os("RMOSIX_CRIU").map_or_else(|| PathBuf::from("/opt/rmosix/criu/bin/criu"), PathBuf::from)
}

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Short name (1 to 8 of `a-z0-9`): part of every namespace, link and cgroup name.
    pub name: String,
    /// Number of nodes (1 to 200).
    pub nodes: u32,
    /// Memory limit of each node, bytes.
    pub mem_limit: u64,
    /// Directory holding the built `infod` (and the other binaries, put first on PATH for `exec`).
    pub bin_dir: PathBuf,
    /// migd's balancer moves jobs by itself (`[balance] auto`). Off unless a test is about it, so that
    /// every other test's jobs stay where the test puts them.
    pub balance: bool,
}

impl Spec {
    /// A cluster of `nodes` nodes called `name`, 4 GiB each, binaries from `bin_dir`.
    pub fn new(name: &str, nodes: u32, bin_dir: PathBuf) -> Self {
        Self { name: name.to_owned(), nodes, mem_limit: 4 << 30, bin_dir, balance: false }
    }
}

/// A running local cluster.
#[derive(Debug)]
pub struct Cluster {
    spec: Spec,
    dir: PathBuf,
    keep: bool,
    outsider: bool,
    /// `/rmosix-<name>`, the parent of the node cgroups, in every controller of [`cgroup::CONTROLLERS`]
    /// this host has, so a node's migd can put job cgroups under its node in each of them.
    cgroup: Cgroup,
    /// The lock on this cluster's name (see [`lock_name`]); `None` for a cluster attached to.
    name_lock: Option<File>,
}

/// The directory holding this test binary's sibling binaries (`target/<profile>`), for tests, as they were
/// when this test process first asked: a snapshot of hard links, `target/<profile>/test-bins/<build>/`.
/// Several people build in one checkout while tests run; a build replaces `target/<profile>/migd` and the
/// others by new files, and a test must not start a new tool against an old daemon, lose a copied tool
/// directory, or try to move a job whose program file is gone (CRIU refuses to dump a deleted executable of
/// more than a megabyte).
pub fn bin_dir_of_current_test() -> PathBuf {
    static SNAPSHOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SNAPSHOT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("current exe");
            let dir = exe.parent().expect("exe dir");
            let profile = if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().expect("profile dir") } else { dir };
            // A build replacing a binary between the listing and the link makes one attempt fail.
            let mut attempts = 0;
            loop {
                match snapshot_of(profile) {
                    Ok(dir) => break dir,
                    Err(e) if attempts < 5 => {
                        attempts += 1;
                        eprintln!("taking a snapshot of the binaries in {} again: {e:#}", profile.display());
                    }
                    Err(e) => panic!("cannot take a snapshot of the binaries in {}: {e:#}", profile.display()),
                }
            }
        })
        .clone()
}

/// How long snapshots of binaries are kept: longer than any test run.
pub(crate) const SNAPSHOT_LIFE: Duration = Duration::from_hours(2);

/// Hard links to the executables of `profile`, in a directory named after their inodes (one per build, so
/// the test binaries of one run share it), made once and atomically. Snapshots older than
/// [`SNAPSHOT_LIFE`] are removed.
fn snapshot_of(profile: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash as _, Hasher as _};
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mut bins = Vec::new();
    for entry in std::fs::read_dir(profile).with_context(|| format!("cannot list {}", profile.display()))? {
        let entry = entry?;
        let meta = std::fs::symlink_metadata(entry.path())?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            bins.push((entry.file_name(), meta.ino()));
        }
    }
    bins.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bins.hash(&mut hasher);
    let root = profile.join("test-bins");
    let dir = root.join(format!("{:016x}", hasher.finish()));
    if dir.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    remove_older_than(&root, SNAPSHOT_LIFE);
    let tmp = root.join(format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (name, _) in &bins {
        std::fs::hard_link(profile.join(name), tmp.join(name))
            .with_context(|| format!("cannot link {} into {}", profile.join(name).display(), tmp.display()))?;
    }
    // Another test process may have made the same snapshot meanwhile: either is fine.
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        ensure!(dir.exists(), "cannot rename {} to {}: {e}", tmp.display(), dir.display());
    }
    Ok(dir)
}

/// Removes the entries of `dir` last changed more than `age` ago: snapshots that no test of a run still
/// going can be using. Best effort: what cannot be removed stays for the next time.
pub(crate) fn remove_older_than(dir: &Path, age: Duration) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age));
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Fails, loudly and with what is missing, when this machine can't host a test cluster.
pub fn check_prerequisites(bin_dir: &Path) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the local test cluster needs root (network namespaces, cgroups); run `sudo cargo xtask test`"
    );
    ensure!(
        Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()),
        "`ip` (iproute2) is missing: run `cargo xtask setup`"
    );
    let hierarchy = Hierarchy::detect().context("the local test cluster needs cgroups")?;
    hierarchy.require(cgroup::REQUIRED).context("the local test cluster needs the cpuset and memory controllers")?;
    let infod = bin_dir.join("infod");
    ensure!(infod.exists(), "{} is missing: build the workspace first (`cargo build --workspace`)", infod.display());
    Ok(())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

/// The cgroup of the cluster `name`, parent of its nodes' cgroups, in this host's hierarchy.
fn cluster_cgroup(name: &str) -> anyhow::Result<Cgroup> {
    let path = CgroupPath::root().join(&format!("rmosix-{name}"))?;
    Ok(Hierarchy::detect()?.cgroup(&path, cgroup::CONTROLLERS)?)
}

/// CPUs given to node `i` (1-based) of `nodes`: an even share when there are more CPUs than nodes, else the
/// nodes take turns on the CPUs.
fn node_cpus(all: &[u32], nodes: u32, i: u32) -> String {
    let n = all.len();
    let nodes = nodes as usize;
    let i = i as usize - 1;
    let chosen: Vec<u32> = if n >= nodes {
        let share = n / nodes;
        all[i * share..(i + 1) * share].to_vec()
    } else {
        vec![all[i % n]]
    };
    chosen.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// Where the locks on cluster names are: one file per name.
const NAME_LOCKS: &str = "/run/rmosix-cluster-locks";

/// Takes the cluster name `name` for this process: an exclusive lock on its file, held while the returned
/// file is open, waiting (a quarter of an hour at most) while another process holds it. Test runs side by
/// side (several people work on one machine) use the same names: without the lock, one's `up` would tear
/// down the other's running cluster as a leftover. A process that died holds no lock any more, so what it
/// left behind is still removed.
fn lock_name(name: &str) -> anyhow::Result<File> {
    use std::io::{Read as _, Seek as _, Write as _};
    std::fs::create_dir_all(NAME_LOCKS).with_context(|| format!("cannot create {NAME_LOCKS}"))?;
    let path = Path::new(NAME_LOCKS).join(name);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let start = Instant::now();
    let mut said = false;
    // SAFETY: flock(2) on a descriptor we own.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        ensure!(error.kind() == std::io::ErrorKind::WouldBlock, "cannot lock {}: {error}", path.display());
        let mut holder = String::new();
        file.rewind()?;
        file.read_to_string(&mut holder)?;
        ensure!(
            start.elapsed() < Duration::from_mins(15),
            "cluster name {name} is still in use by process {} after {:?}",
            holder.trim(),
            start.elapsed()
        );
        if !said {
            eprintln!("waiting for process {} to be done with a cluster named {name}", holder.trim());
            said = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

impl Cluster {
    /// Builds and starts a cluster, replacing any leftover of one with the same name once no other
    /// process uses that name.
    pub fn up(spec: Spec) -> anyhow::Result<Self> {
        ensure!(
            !spec.name.is_empty()
                && spec.name.len() <= 8
                && spec.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "cluster name {:?} must be 1 to 8 of a-z0-9",
            spec.name
        );
        ensure!((1..=200).contains(&spec.nodes), "a local cluster has 1 to 200 nodes");
        check_prerequisites(&spec.bin_dir)?;
        let name_lock = Some(lock_name(&spec.name)?);
        Self::remove(&spec.name)?;
        let dir = Path::new(STATE_ROOT).join(&spec.name);
        let cgroup = cluster_cgroup(&spec.name)?;
        let cluster = Self { spec, dir, keep: false, outsider: false, cgroup, name_lock };
        cluster.build().with_context(|| format!("cannot build cluster {}", cluster.spec.name))?;
        for node in cluster.node_ids() {
            cluster.start_infod(node)?;
            cluster.start_migd(node)?;
        }
        Ok(cluster)
    }

    /// Attaches to a cluster made earlier (by `cargo xtask cluster up`); it is kept when dropped.
    pub fn attach(name: &str) -> anyhow::Result<Self> {
        let dir = Path::new(STATE_ROOT).join(name);
        let text = std::fs::read_to_string(dir.join("cluster.json"))
            .with_context(|| format!("no cluster {name:?} is up (try `cargo xtask cluster up`)"))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("corrupt cluster.json")?;
        let spec = Spec {
            name: name.to_owned(),
            nodes: v["nodes"].as_u64().and_then(|n| u32::try_from(n).ok()).context("cluster.json: nodes")?,
            mem_limit: v["mem_limit"].as_u64().context("cluster.json: mem_limit")?,
            bin_dir: PathBuf::from(v["bin_dir"].as_str().context("cluster.json: bin_dir")?),
            balance: v["balance"].as_bool().unwrap_or(false),
        };
        let cgroup = cluster_cgroup(name)?;
        Ok(Self { spec, dir, keep: true, outsider: false, cgroup, name_lock: None })
    }

    /// Leaves the cluster running when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Leaves everything as a crashed test process would: the cluster keeps running, untouched, and its
    /// name is free again (a dead process holds no lock), so the next `up` of that name removes it.
    pub fn crash(mut self) {
        drop(self.name_lock.take());
        std::mem::forget(self);
    }

    /// The node ids, 1 to N.
    pub fn node_ids(&self) -> std::ops::RangeInclusive<u32> {
        1..=self.spec.nodes
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Directory of the cluster's state (map, key, per-node configuration and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Address of node `i`.
    pub fn addr(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], u8::try_from(i).expect("at most 200 nodes"))
    }

    /// Network namespace name of node `i`.
    pub fn netns(&self, i: u32) -> String {
        format!("rmx-{}-{i}", self.spec.name)
    }

    /// The directory of the binaries the nodes run.
    pub fn bin_dir(&self) -> &Path {
        &self.spec.bin_dir
    }

    /// State directory of node `i`.
    pub fn node_dir(&self, i: u32) -> PathBuf {
        self.dir.join(format!("node{i}"))
    }

    /// infod's query socket on node `i`.
    pub fn infod_socket(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("infod.sock")
    }

    /// Configuration file of node `i`.
    pub fn config(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("rmosix.toml")
    }

    /// The cluster key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }

    /// The cgroup of node `i`: `/rmosix-<name>/node<i>`, in every controller hierarchy used (v1) or the
    /// unified one (v2). Its processes, CPUs, memory, and its `cgroup.procs` files.
    pub fn cgroup(&self, i: u32) -> Cgroup {
        self.cgroup.child(&format!("node{i}")).expect("node<i> is a valid cgroup name")
    }

    /// The path of node `i`'s cgroup from the root of the hierarchy, as its configuration names it.
    pub fn cgroup_path(&self, i: u32) -> CgroupPath {
        self.cgroup(i).path().clone()
    }

    /// The directories of node `i`'s cgroup, one per hierarchy (one on v2): a process joins the node by
    /// writing itself into each `<dir>/cgroup.procs`, as `checkpoint::job::placement` does.
    pub fn cgroup_dirs(&self, i: u32) -> Vec<PathBuf> {
        self.cgroup(i).dirs()
    }

    /// The directory whose `cgroup.procs` lists every process placed on node `i` (v1: its cpuset
    /// directory). Processes in child cgroups of the node (jobs in cgroups of their own) are listed in
    /// those instead: [`Cluster::procs`] covers the whole node.
    pub fn procs_dir(&self, i: u32) -> PathBuf {
        self.cgroup(i).procs_dir()
    }

    /// Every process on node `i`, in its cgroup and the cgroups below it.
    pub fn procs(&self, i: u32) -> anyhow::Result<Vec<i32>> {
        let cgroup = self.cgroup(i);
        let pids = cgroup.procs().with_context(|| format!("cannot list the processes of node {i} ({cgroup})"))?;
        Ok(pids.into_iter().map(nix::unistd::Pid::as_raw).collect())
    }

    /// Node `i`'s procs directory and its memory directory (the same directory on v2). Kept only until
    /// `tests/tests/migd.rs` and `tests/tests/users.rs` use [`Cluster::procs_dir`]; new code uses
    /// [`Cluster::cgroup_dirs`], [`Cluster::procs_dir`] or [`Cluster::cgroup`].
    pub fn cgroups(&self, i: u32) -> [PathBuf; 2] {
        let cgroup = self.cgroup(i);
        let memory = cgroup.controller_dir(Controller::Memory).unwrap_or_else(|| cgroup.procs_dir());
        [cgroup.procs_dir(), memory]
    }

    fn bridge(name: &str) -> String {
        format!("rmx-{name}")
    }

    fn build(&self) -> anyhow::Result<()> {
        let name = &self.spec.name;
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

        // cgroups: the cluster's, with every CPU the machine lets it have, then one child per node.
        self.cgroup.create()?;
        let cpus = self.cgroup.cpus()?;
        let all_cpus = cgroup::parse_cpus(&cpus).with_context(|| format!("bad CPU list {cpus:?} of {}", self.cgroup))?;
        ensure!(!all_cpus.is_empty(), "no CPUs in cgroup {}", self.cgroup);

        ip(&["link", "add", &Self::bridge(name), "type", "bridge"])?;
        ip(&["link", "set", &Self::bridge(name), "up"])?;

        let mut map = String::from("# generated by the rmosix test cluster\n");
        for i in self.node_ids() {
            let node = self.cgroup(i);
            node.create()?;
            node.set_cpus(&node_cpus(&all_cpus, self.spec.nodes, i))?;
            node.set_memory_limit(Some(self.spec.mem_limit))?;

            self.add_host_link(&self.netns(i), &format!("rx-{name}-{i}"), self.addr(i))?;
            writeln!(map, "{i} {} 1", self.addr(i))?;

            let node_dir = self.node_dir(i);
            std::fs::create_dir_all(&node_dir)?;
            let config = format!(
                "# node {i} of the local test cluster {name}\n\
                 map = \"../mosix.map\"\n\
                 cluster_key = \"../cluster.key\"\n\
                 node = {i}\n\n\
                 [infod]\n\
                 port = {INFOD_PORT}\n\
                 socket = \"infod.sock\"\n\n\
                 [resources]\n\
                 source = \"cgroup\"\n\
                 cgroup = \"{}\"\n\n\
                 [migd]\n\
                 port = {MIGD_PORT}\n\
                 socket = \"migd.sock\"\n\
                 records = \"records\"\n\n\
                 [balance]\n\
                 auto = {}\n\n\
                 # The tests move root's jobs too.\n\
                 [policy]\n\
                 allow_root_guests = true\n\
                 state = \"policy.json\"\n\n\
                 [checkpoint]\n\
                 criu = \"{}\"\n\
                 image_store = \"{IMAGE_STORE}\"\n\
                 log_dir = \"criu-logs\"\n",
                node.path(),
                self.spec.balance,
                criu_path().display(),
            );
            std::fs::write(self.config(i), config)?;
        }
        std::fs::write(self.dir.join("mosix.map"), map)?;
        ClusterKey::generate().write_new(&self.key_path())?;
        let meta = serde_json::json!({
            "name": name,
            "nodes": self.spec.nodes,
            "mem_limit": self.spec.mem_limit,
            "balance": self.spec.balance,
            "bin_dir": self.spec.bin_dir,
        });
        std::fs::write(self.dir.join("cluster.json"), meta.to_string())?;
        Ok(())
    }

    /// A namespace `netns` linked to the bridge by a veth pair whose host end is `host_if`, with `addr`.
    fn add_host_link(&self, netns: &str, host_if: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        ip(&["netns", "add", netns])?;
        ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
        ip(&["link", "set", host_if, "master", &Self::bridge(&self.spec.name)])?;
        ip(&["link", "set", host_if, "up"])?;
        let cidr = format!("{addr}/24");
        ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A namespace outside the cluster map but on its bridge (address `10.213.0.250`), for tests that play a
    /// stranger. Removed with the cluster.
    pub fn outsider(&mut self) -> anyhow::Result<(String, Ipv4Addr)> {
        let netns = format!("rmx-{}-x", self.spec.name);
        let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 250);
        if !self.outsider {
            self.add_host_link(&netns, &format!("rx-{}-x", self.spec.name), addr)?;
            self.outsider = true;
        }
        Ok((netns, addr))
    }

    /// A command that will run on node `i`: in its network namespace and cgroups, with the node's
    /// configuration and socket paths in the environment and the workspace's binaries first on PATH.
    pub fn command(&self, i: u32, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        ensure!(self.node_ids().contains(&i), "cluster {} has no node {i}", self.spec.name);
        let netns = File::open(Path::new("/run/netns").join(self.netns(i)))
            .with_context(|| format!("node {i} of cluster {} is not up", self.spec.name))?;
        let procs = self
            .cgroup(i)
            .procs_files()
            .into_iter()
            .map(|p| std::fs::OpenOptions::new().write(true).open(&p).with_context(|| format!("cannot open {}", p.display())))
            .collect::<anyhow::Result<Vec<File>>>()?;
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut search = std::ffi::OsString::from(self.spec.bin_dir.as_os_str());
        search.push(":");
        search.push(path);
        let mut cmd = Command::new(program);
        cmd.env("PATH", search)
            .env(rmosix_common::config::CONFIG_ENV, self.config(i))
            .env(query::SOCKET_ENV, self.infod_socket(i))
            .env(rmosix_common::control::SOCKET_ENV, self.migd_socket(i))
            .env("RMOSIX_NODE", i.to_string());
        // SAFETY: only async-signal-safe calls (setns, write) on descriptors opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for f in &procs {
                    // "0" moves the writing process itself.
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    fn pid_file(&self, i: u32, daemon: &str) -> PathBuf {
        self.node_dir(i).join(format!("{daemon}.pid"))
    }

    /// migd's control socket on node `i`.
    pub fn migd_socket(&self, i: u32) -> PathBuf {
        self.node_dir(i).join("migd.sock")
    }

    /// Sends one request to node `i`'s migd and returns its answer, asked as root or, with `user` (uid and
    /// gid, no supplementary groups), as that user: migd decides what a caller may do from the credentials
    /// it reads from the socket. A thread of its own takes them for this one connection (Linux keeps
    /// credentials per thread, and the raw system calls, unlike libc's wrappers, change only the calling
    /// thread), so the test process stays root. Tests use it to see a refusal's kind, which the `migrate`
    /// tool turns into words.
    pub fn ask_migd(&self, i: u32, user: Option<(u32, u32)>, request: &control::Request) -> anyhow::Result<control::Response> {
        let socket = self.migd_socket(i);
        let request = request.clone();
        let asking = std::thread::spawn(move || -> anyhow::Result<control::Response> {
            if let Some((uid, gid)) = user {
                let (uid, gid) = (libc::c_long::from(uid), libc::c_long::from(gid));
                // SAFETY: system calls that change only this thread's credentials; the thread ends after
                // this one connection.
                unsafe {
                    ensure!(
                        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0,
                        "cannot drop the supplementary groups: {}",
                        std::io::Error::last_os_error()
                    );
                    ensure!(
                        libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0,
                        "cannot become gid {gid}: {}",
                        std::io::Error::last_os_error()
                    );
                    ensure!(
                        libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0,
                        "cannot become uid {uid}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
            let mut stream = std::os::unix::net::UnixStream::connect(&socket)
                .with_context(|| format!("cannot reach migd at {}", socket.display()))?;
            control::send(&mut stream, &request).with_context(|| format!("cannot send {request:?} to migd"))?;
            control::recv(&mut stream).with_context(|| format!("no answer from migd to {request:?}"))
        });
        asking.join().map_err(|_| anyhow::anyhow!("the thread asking migd on node {i} panicked"))?
    }

    /// Host PID of a daemon (`infod`, `migd`) of node `i`.
    pub fn daemon_pid(&self, i: u32, daemon: &str) -> anyhow::Result<i32> {
        Ok(std::fs::read_to_string(self.pid_file(i, daemon))?.trim().parse()?)
    }

    /// Starts a daemon (`infod` or `migd`) on node `i`, in its own session (so a terminal's Ctrl-C does not
    /// reach it), logging to `node<i>/<daemon>.log`, and waits until it answers on its socket.
    fn start_daemon(&self, i: u32, daemon: &str, ready: impl Fn() -> bool) -> anyhow::Result<()> {
        let log_path = self.node_dir(i).join(format!("{daemon}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = self.command(i, self.spec.bin_dir.join(daemon))?;
        cmd.arg("--config").arg(self.config(i)).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        cmd.process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {daemon} on node {i}"))?;
        std::fs::write(self.pid_file(i, daemon), child.id().to_string())?;
        // A daemon that dies says so at once (below); one that is slow to answer on a loaded machine is
        // given time.
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if ready() {
                // Not waited for here: a test that stops the daemon reaps it through `kill_daemon`, and a
                // daemon outliving `cargo xtask cluster up` is meant to.
                std::mem::forget(child);
                return Ok(());
            }
            if Instant::now() > deadline || child.try_wait().is_ok_and(|s| s.is_some()) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("{daemon} on node {i} did not come up; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts infod on node `i` and waits until it answers.
    pub fn start_infod(&self, i: u32) -> anyhow::Result<()> {
        let socket = self.infod_socket(i);
        self.start_daemon(i, "infod", || query::ask(&socket, &Request::View).is_ok())
    }

    /// Starts migd on node `i` and waits until it accepts connections.
    pub fn start_migd(&self, i: u32) -> anyhow::Result<()> {
        let socket = self.migd_socket(i);
        self.start_daemon(i, "migd", || std::os::unix::net::UnixStream::connect(&socket).is_ok())
    }

    /// Stops a daemon of node `i` with SIGKILL (a crash, as far as the rest of the cluster can tell).
    pub fn kill_daemon(&self, i: u32, daemon: &str) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.daemon_pid(i, daemon)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
            .with_context(|| format!("cannot kill {daemon} {pid} on node {i}"))?;
        // Reap it if it is our child; if not, it is someone else's to reap.
        let _ = nix::sys::wait::waitpid(pid, None);
        std::fs::remove_file(self.pid_file(i, daemon))?;
        Ok(())
    }

    /// Stops infod on node `i` with SIGKILL.
    pub fn kill_infod(&self, i: u32) -> anyhow::Result<()> {
        self.kill_daemon(i, "infod")
    }

    /// Node `i`'s view of the cluster, through its infod socket.
    pub fn view(&self, i: u32) -> anyhow::Result<ClusterView> {
        match query::ask(&self.infod_socket(i), &Request::View)? {
            Response::View(v) => Ok(v),
            other => bail!("unexpected answer {other:?}"),
        }
    }

    /// Polls until `check` holds for every node's view, or `timeout` passes; returns the time it took.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        check: impl FnMut(u32, &ClusterView) -> bool,
    ) -> anyhow::Result<Duration> {
        let all: Vec<u32> = self.node_ids().collect();
        self.wait_for_nodes(&all, timeout, what, check)
    }

    /// Polls until `check` holds for the views of `nodes`, or `timeout` passes; returns the time it took.
    pub fn wait_for_nodes(
        &self,
        nodes: &[u32],
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(u32, &ClusterView) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = Vec::new();
        loop {
            last.clear();
            let mut all = true;
            for &i in nodes {
                let view = self.view(i)?;
                if !check(i, &view) {
                    all = false;
                }
                last.push(view);
            }
            if all {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("{what}: not reached within {timeout:?}; last views: {last:#?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Removes everything a cluster of this name made: processes, namespaces, links, cgroups, state.
    pub fn remove(name: &str) -> anyhow::Result<()> {
        // Processes first: every task of every node, then the cgroups, nodes before the cluster's.
        let cgroup = cluster_cgroup(name)?;
        cgroup.kill().with_context(|| format!("cannot kill the processes of cluster {name}"))?;
        cgroup.remove().with_context(|| format!("cannot remove the cgroups of cluster {name}"))?;
        let prefix = format!("rmx-{name}-");
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.filter_map(Result::ok) {
                let ns = e.file_name().to_string_lossy().into_owned();
                if ns.strip_prefix(&prefix).is_some_and(|rest| rest == "x" || rest.parse::<u32>().is_ok()) {
                    // Deleting the namespace deletes its veth end, and with it the host end. One gone meanwhile
                    // (`cargo xtask cluster down` beside us) is gone.
                    let deleted = ip(&["netns", "delete", &ns]);
                    if deleted.is_err() && Path::new("/run/netns").join(&ns).exists() {
                        deleted?;
                    }
                }
            }
        }
        // Host ends of the links: they go with their namespace, but only once the kernel has freed it, which
        // happens in the background; remove them now so a new cluster can reuse the names.
        let host_prefix = format!("rx-{name}-");
        for e in std::fs::read_dir("/sys/class/net").into_iter().flatten().flatten() {
            let link = e.file_name().to_string_lossy().into_owned();
            if link.starts_with(&host_prefix) {
                let gone = run(Command::new("ip").args(["link", "delete", &link]));
                if gone.is_err() && Path::new("/sys/class/net").join(&link).exists() {
                    gone?;
                }
            }
        }
        let bridge = Self::bridge(name);
        if Path::new("/sys/class/net").join(&bridge).exists() {
            ip(&["link", "delete", &bridge])?;
        }
        let dir = Path::new(STATE_ROOT).join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        Ok(())
    }

    /// Names of the clusters that are up.
    pub fn list() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(STATE_ROOT)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = Self::remove(&self.spec.name)
        {
            eprintln!("cannot remove cluster {}: {e:#}", self.spec.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_shared_out() {
        let two = [0, 1];
        let picks: Vec<String> = (1..=4).map(|i| node_cpus(&two, 4, i)).collect();
        assert_eq!(picks, ["0", "1", "0", "1"]);
        let eight: Vec<u32> = (0..8).collect();
        assert_eq!(node_cpus(&eight, 2, 2), "4,5,6,7");
        assert_eq!(node_cpus(&eight, 3, 3), "4,5");
    }
}
