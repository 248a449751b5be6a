//! `cargo xtask bench checkpoint`: how long a job is frozen when it moves between two nodes, beside plain
//! `criu dump` + `criu restore` run by the CLI on tmpfs in the same run.
//!
//! Ours: a job (`rmx-job mem SIZE ...` under `rmosix-init` in its own PID namespace, stdio on pipes) on node 1
//! of a local 2-node cluster is dumped by the checkpoint library (migratability check, CRIU RPC, images on
//! tmpfs), packed and streamed over TCP from node 1's network namespace to node 2's, unpacked and verified
//! there, and restored in node 2's namespace and cgroups; then the frozen original is killed. The freeze
//! lasts from the start of the dump until the restore returns with the job running on node 2.
//!
//! Baseline: the same program as a plain process, `criu dump -t PID -D DIR` then `criu restore -D DIR -d`
//! with the same criu binary, images on /dev/shm, no transfer.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use rmosix_checkpoint::criu::Criu;
use rmosix_checkpoint::images::{DEFAULT_STORE, ImageDir, prepare_store};
use rmosix_checkpoint::job::{Job, JobSpec, placement};
use rmosix_checkpoint::transfer;
use rmosix_testcluster::Cluster;

use crate::benchmarks::{lines, move_cluster, until_filled};

/// Options of `cargo xtask bench checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointBenchArgs {
    /// Resident sizes of the job, MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256, 1024, 2048])]
    pub sizes: Vec<u64>,
    /// Runs per size (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Do not write BENCHMARKS.md.
    #[arg(long)]
    pub no_write: bool,
}

/// The baseline's images: plain tmpfs, what a hand-made script would use.
pub(crate) const PLAIN_TMPFS: &str = "/dev/shm/rmosix-bench";
const STEPS: &str = "600";
const WORK: &str = "300000";

#[derive(Debug, Clone, Copy, Default)]
struct Ours {
    dump: Duration,
    transfer: Duration,
    restore: Duration,
    freeze: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Baseline {
    pub(crate) dump: Duration,
    pub(crate) restore: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median<T: Copy>(mut v: Vec<T>, key: impl Fn(&T) -> Duration) -> T {
    v.sort_by_key(|x| key(x));
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: &CheckpointBenchArgs) -> anyhow::Result<()> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    crate::setup::run()?;
    crate::build_release()?;
    let bins = crate::release_bin_dir();
    let criu_path = rmosix_testcluster::criu_path();
    let criu = Criu::new(&criu_path, "/dev/shm/rmosix-bench-logs")?;
    let store = Path::new(DEFAULT_STORE);
    prepare_store(store)?;
    criu.check()?;
    let cluster = move_cluster("benchc", args.sizes.iter().copied().max().unwrap_or(0), &bins)?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let reference = reference_output(&bins, size)?;
        let mut ours = Vec::new();
        let mut base = Vec::new();
        let mut base_store = Vec::new();
        for run in 0..args.runs {
            base.push(baseline(&criu_path, &bins, size, Path::new(PLAIN_TMPFS))?);
            base_store.push(baseline(&criu_path, &bins, size, store)?);
            ours.push(migrate_once(&criu, &cluster, &bins, size, &reference, store)?);
            let (b, bs, o) = (base[run], base_store[run], ours[run]);
            eprintln!(
                "bench checkpoint: {size} MiB run {}: criu CLI {:.0}+{:.0} ms (image store {:.0}+{:.0}); ours dump {:.0} transfer {:.0} restore {:.0} = frozen {:.0} ms",
                run + 1,
                ms(b.dump),
                ms(b.restore),
                ms(bs.dump),
                ms(bs.restore),
                ms(o.dump),
                ms(o.transfer),
                ms(o.restore),
                ms(o.freeze)
            );
        }
        rows.push((
            size,
            median(base, |b| b.dump + b.restore),
            median(base_store, |b| b.dump + b.restore),
            median(ours, |o| o.freeze),
        ));
    }
    drop(cluster);

    let mut table = String::from(
        "| resident | CLI dump | CLI restore | CLI dump+restore | CLI on the image store | ours: dump | pack+TCP+unpack | restore | ours: frozen | frozen / CLI | frozen / CLI on the store |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut headline = None;
    for (size, b, bs, o) in &rows {
        let cli = b.dump + b.restore;
        let cli_store = bs.dump + bs.restore;
        let ratio = o.freeze.as_secs_f64() / cli.as_secs_f64();
        let ratio_store = o.freeze.as_secs_f64() / cli_store.as_secs_f64();
        let _ = writeln!(
            table,
            "| {size} MiB | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms | {ratio:.2}x | {ratio_store:.2}x |",
            ms(b.dump),
            ms(b.restore),
            ms(cli),
            ms(cli_store),
            ms(o.dump),
            ms(o.transfer),
            ms(o.restore),
            ms(o.freeze),
        );
        if *size == 1024 || headline.is_none() {
            headline = Some((*size, o.freeze, cli, ratio));
        }
    }
    let body = format!(
        "Reproduce: `cargo xtask bench checkpoint` (release build; `--sizes 64,256,1024,2048 --runs 3`). Run {}; \
         CRIU {} at {}; the median of {} runs per size.\n\n\
         *Ours*: a job (`rmx-job mem SIZE`, under `rmosix-init` in its own PID namespace, stdio on pipes) on node 1 \
         of a local 2-node cluster is checked for migratability and dumped through CRIU's RPC into a private \
         directory of the image store ({DEFAULT_STORE}, a tmpfs with transparent huge pages that migd mounts) \
         (left frozen), packed and streamed over TCP from node 1's network namespace to \
         node 2's (encrypted and authenticated with AES-256-GCM), unpacked and verified there, and restored through the RPC in node 2's namespace and cgroups; \
         then the frozen original is killed. *Frozen* is the time from the start of the dump until the restore \
         returns with the job running on node 2. After each move the job runs to its end and its output is \
         checked against an unmoved run.\n\n\
         *CLI*: the same program as a plain process; `criu dump -t PID -D DIR` then `criu restore -d -D DIR`, \
         images on /dev/shm (plain tmpfs), no transfer, each timed as a whole command; the target is set against \
         it. *CLI on the image store*: the same with the images on the image store, to show what the store \
         alone gains.\n\n{table}",
        crate::benchmarks::machine(),
        criu.version(),
        criu.path().display(),
        args.runs,
    );
    println!("{body}");
    if !args.no_write {
        crate::benchmarks::update_section("checkpoint", "checkpoint: freeze time of a move between two nodes", &body)?;
    }
    let (size, freeze, cli, ratio) = headline.context("no sizes measured")?;
    println!(
        "checkpoint: {size} MiB job frozen {:.0} ms moving between nodes = {ratio:.2}x CLI criu dump+restore {:.0} ms (target <= 1.4x at 1024 MiB): {}",
        ms(freeze),
        ms(cli),
        crate::benchmarks::verdict(size == 1024 && ratio <= 1.4)
    );
    Ok(())
}

pub(crate) fn job_args(size: u64) -> Vec<String> {
    vec!["mem".into(), size.to_string(), STEPS.into(), WORK.into()]
}

pub(crate) fn reference_output(bins: &Path, size: u64) -> anyhow::Result<Vec<String>> {
    let out = Command::new(bins.join("rmx-job")).args(job_args(size)).output().context("cannot run rmx-job")?;
    ensure!(out.status.success(), "rmx-job failed: {}", out.status);
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}

pub(crate) fn baseline(criu: &Path, bins: &Path, size: u64, base: &Path) -> anyhow::Result<Baseline> {
    let images = ImageDir::create(base)?;
    let out_path = images.path().join("job.out");
    let out = File::create(&out_path)?;
    let mut child = Command::new(bins.join("rmx-job"))
        .args(job_args(size))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    wait_for_line(&out_path, "filled")?;
    let dir = images.path().join("img");
    std::fs::create_dir(&dir)?;
    let pid = child.id().to_string();
    let start = Instant::now();
    let status = Command::new(criu)
        .args(["dump", "-t", &pid, "-D"])
        .arg(&dir)
        .args(["-o", "dump.log", "--shell-job"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let dump = start.elapsed();
    ensure!(status.success(), "criu dump failed; see {}", dir.join("dump.log").display());
    // Reap the dumped process so its PID is free for the restore.
    child.wait()?;
    let start = Instant::now();
    let status = Command::new(criu)
        .args(["restore", "-d", "-D"])
        .arg(&dir)
        .args(["-o", "restore.log", "--shell-job"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let restore = start.elapsed();
    ensure!(status.success(), "criu restore failed; see {}", dir.join("restore.log").display());
    let raw: i32 = pid.parse()?;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), nix::sys::signal::Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(raw), None);
    Ok(Baseline { dump, restore })
}

fn wait_for_line(path: &Path, prefix: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_mins(2);
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.starts_with(prefix))) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("{} never printed {prefix:?}", path.display())
}

fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    let ns = File::open(Path::new("/run/netns").join(netns))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
    })
}

fn migrate_once(
    criu: &Criu,
    cluster: &Cluster,
    bins: &Path,
    size: u64,
    reference: &[String],
    store: &Path,
) -> anyhow::Result<Ours> {
    let node = |i: u32| placement(Some(&Path::new("/run/netns").join(cluster.netns(i))), &cluster.cgroup_dirs(i));
    let spec = JobSpec {
        init: bins.join("rmosix-init"),
        program: bins.join("rmx-job").into(),
        args: job_args(size).into_iter().map(Into::into).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        credentials: None,
        umask: 0o022,
        rlimits: Vec::new(),
    };
    let (job, stdio) = Job::spawn(&spec, &node(1)?)?;
    let rx = lines(File::from(stdio.stdout));
    let mut seen = until_filled(&rx)?;
    let source = ImageDir::create(store)?;
    let dest = ImageDir::create(store)?;
    let listener = in_netns(&cluster.netns(2), || Ok(std::net::TcpListener::bind((cluster.addr(2), 0))?))?;
    let port = listener.local_addr()?.port();
    let (to_node1, to_node2) = (node(1)?, node(2)?);

    let start = Instant::now();
    let frozen = job.dump(criu, &source, &to_node1)?;
    let dumped = start.elapsed();
    let src = source.path().to_owned();
    let key: transfer::StreamKey = rand::random();
    let (target, ns1) = (cluster.addr(2), cluster.netns(1));
    let sender = std::thread::spawn(move || {
        in_netns(&ns1, || {
            let mut stream = std::net::TcpStream::connect((target, port))?;
            stream.set_nodelay(true)?;
            transfer::pack(&src, &mut stream, &key)?;
            stream.flush()?;
            Ok(())
        })
    });
    let (mut conn, _) = listener.accept()?;
    transfer::unpack(&mut conn, dest.path(), &key)?;
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let transferred = start.elapsed();
    let (restored, stdio2) = Job::restore(criu, &dest, to_node2, None)?;
    let freeze = start.elapsed();
    frozen.commit()?;
    drop((source, dest));

    seen.extend(rx.iter());
    seen.extend(lines(File::from(stdio2.stdout)).iter());
    ensure!(restored.wait()? == 0, "the moved job failed");
    ensure!(seen == reference, "the moved job's output differs from an unmoved run's ({} lines vs {})", seen.len(), reference.len());
    Ok(Ours {
        dump: dumped,
        transfer: transferred.saturating_sub(dumped),
        restore: freeze.saturating_sub(transferred),
        freeze,
    })
}

use std::os::unix::process::CommandExt as _;
