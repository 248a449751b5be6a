//! The classification half of `cargo xtask bench probes`: how often migd puts a job in the right class
//! (`cpu`, `io`, `sleeping`) a few seconds after it starts, on a labelled mix of 20 real programs started
//! at once with `mosrun` by the ordinary test user on node 1 of a 1-node local cluster (one core of this
//! machine): spinners in sh and python, compressors (gzip, xz, bzip2), hashing (sha256sum, python), a shell
//! pipeline; synchronous and direct writes and reads with dd and python; sleepers (sleep, python, a shell
//! waiting on its input or waking every half second, tail -f). Each round starts the 20 together, reads
//! `mosctl jobs --json` 3 s after the last started (and again later, for context), and ends them.
//!
//! The label is what the program does, not what migd said of it before: a compressor reading
//! `/dev/zero` is `cpu`, a loop of `dd oflag=dsync` is `io`. Eight CPU-bound programs on one core means
//! each gets an eighth of it and waits for the rest: the I/O-bound ones have to be told apart under load.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rmosix_testcluster::user::{TestUser, test_user};
use rmosix_testcluster::{Cluster, Spec};

const PYTHON: &str = "/usr/bin/python3";

/// A job of the mix: its class, a name, and the command (`{dir}` is a scratch directory on disk, the test
/// user's own).
const MIX: &[(&str, &str, &[&str])] = &[
    ("cpu", "sh spin", &["sh", "-c", "while :; do :; done"]),
    ("cpu", "python spin", &[PYTHON, "-c", "while True: pass"]),
    ("cpu", "gzip pipeline", &["sh", "-c", "head -c 100000000000 /dev/zero | gzip -1 > /dev/null"]),
    ("cpu", "xz", &["sh", "-c", "xz -3 -T1 < /dev/zero > /dev/null"]),
    ("cpu", "bzip2", &["sh", "-c", "bzip2 -9 < /dev/zero > /dev/null"]),
    ("cpu", "sha256sum", &["sha256sum", "/dev/zero"]),
    ("cpu", "python hashing", &[PYTHON, "-c", "import hashlib\nh = hashlib.sha256()\nwhile True: h.update(b'x' * 4096)"]),
    ("cpu", "yes | tr | md5sum", &["sh", "-c", "yes | tr y n | md5sum"]),
    ("io", "dd dsync 4k", &["sh", "-c", "while :; do dd if=/dev/zero of={dir}/a bs=4k count=256 oflag=dsync 2>/dev/null; done"]),
    ("io", "dd dsync 64k", &["sh", "-c", "while :; do dd if=/dev/zero of={dir}/b bs=64k count=64 oflag=dsync 2>/dev/null; done"]),
    ("io", "dd direct read", &["sh", "-c", "while :; do dd if={dir}/input of=/dev/null bs=64k iflag=direct 2>/dev/null; done"]),
    ("io", "dd direct write", &["sh", "-c", "while :; do dd if=/dev/zero of={dir}/c bs=1M count=4 oflag=direct 2>/dev/null; done"]),
    (
        "io",
        "python fsync",
        &[PYTHON, "-c", "import os\nf = open('{dir}/d', 'wb')\nwhile True:\n    f.write(b'x' * 4096)\n    f.flush()\n    os.fsync(f.fileno())"],
    ),
    (
        "io",
        "python O_DSYNC",
        &[PYTHON, "-c", "import os\nfd = os.open('{dir}/e', os.O_WRONLY | os.O_CREAT | os.O_DSYNC)\nwhile True: os.write(fd, b'y' * 8192)"],
    ),
    ("sleeping", "sleep", &["sleep", "100000"]),
    ("sleeping", "python sleep", &[PYTHON, "-c", "import time\nwhile True: time.sleep(1)"]),
    ("sleeping", "sh read", &["sh", "-c", "read x"]),
    ("sleeping", "tail -f", &["tail", "-f", "/dev/null"]),
    ("sleeping", "python stdin", &[PYTHON, "-c", "import sys\nsys.stdin.read()"]),
    ("sleeping", "sh wakes", &["sh", "-c", "while :; do sleep 0.5; done"]),
];

/// When the classes are read, after the last job started.
pub const AFTER: Duration = Duration::from_secs(3);
/// A later reading, for context.
const LATER: Duration = Duration::from_secs(8);

/// What the rounds found.
#[derive(Debug, Default)]
pub struct Accuracy {
    pub rounds: usize,
    /// Per class: right after [`AFTER`], right after [`LATER`], jobs.
    pub per_class: BTreeMap<&'static str, (usize, usize, usize)>,
    /// Jobs classed wrong after [`AFTER`]: "name: said (label)".
    pub wrong: Vec<String>,
    /// Where the nodes' counters came from.
    pub source: String,
}

impl Accuracy {
    /// Right after [`AFTER`], and in all.
    pub fn right(&self) -> (usize, usize) {
        self.per_class.values().fold((0, 0), |(r, t), (right, _, total)| (r + right, t + total))
    }
}

/// Runs `rounds` rounds of the mix on a fresh 1-node cluster of the binaries in `bins`.
pub fn measure(rounds: usize, bins: &std::path::Path) -> anyhow::Result<Accuracy> {
    let c = Cluster::up(Spec::new("classes", 1, bins.to_owned()))?;
    let user = test_user()?;
    let dir = user.home.join("rmosix-bench-classes");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid)))?;
    // The direct reads' input: 64 MiB on disk.
    let input = dir.join("input");
    std::fs::write(&input, vec![7u8; 64 << 20])?;
    let mut accuracy = Accuracy::default();
    for round in 0..rounds {
        one_round(&c, &user, &dir, &mut accuracy).with_context(|| format!("round {}", round + 1))?;
        accuracy.rounds += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(accuracy)
}

fn one_round(c: &Cluster, user: &TestUser, dir: &std::path::Path, accuracy: &mut Accuracy) -> anyhow::Result<()> {
    let dir = dir.display().to_string();
    let mut jobs: Vec<(&'static str, &'static str, Child)> = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        for (class, name, argv) in MIX {
            let argv: Vec<String> = argv.iter().map(|a| a.replace("{dir}", &dir)).collect();
            let child = c
                .command_as(1, user, "mosrun")?
                .args(&argv)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            jobs.push((class, name, child));
        }
        Ok(())
    })();
    let readings = started.and_then(|()| {
        let start = Instant::now();
        let first = at(c, user, start + AFTER)?;
        let later = at(c, user, start + LATER)?;
        Ok((first, later))
    });
    for (_, _, child) in &mut jobs {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (first, later) = readings?;
    first["sources"][0]["source"].as_str().unwrap_or("?").clone_into(&mut accuracy.source);
    for (class, name, child) in &jobs {
        let said = |view: &serde_json::Value| -> String {
            view["jobs"]
                .as_array()
                .and_then(|all| all.iter().find(|j| j["home_pid"] == child.id()))
                .and_then(|j| j["class"].as_str())
                .unwrap_or("missing")
                .to_owned()
        };
        let (now, then) = (said(&first), said(&later));
        let entry = accuracy.per_class.entry(class).or_default();
        entry.2 += 1;
        if now == *class {
            entry.0 += 1;
        } else {
            accuracy.wrong.push(format!("{name}: {now} ({class})"));
        }
        if then == *class {
            entry.1 += 1;
        }
    }
    // Every job gone before the next round.
    let deadline = Instant::now() + Duration::from_mins(1);
    while at(c, user, Instant::now())?["jobs"].as_array().is_some_and(|j| !j.is_empty()) {
        if Instant::now() > deadline {
            bail!("the jobs of the round did not end");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// `mosctl jobs --json` on node 1 at `when`.
fn at(c: &Cluster, user: &TestUser, when: Instant) -> anyhow::Result<serde_json::Value> {
    std::thread::sleep(when.saturating_duration_since(Instant::now()));
    let out = c.command_as(1, user, "mosctl")?.args(["jobs", "--json"]).output()?;
    if !out.status.success() {
        bail!("mosctl jobs: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The section's part on classes: a table per class and the jobs classed wrong.
pub fn report(accuracy: &Accuracy) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Classification: {} rounds of the 20-job mix on one core (counters from {}).\n",
        accuracy.rounds, accuracy.source
    );
    let _ = writeln!(out, "| class | jobs | right after {} s | right after {} s |", AFTER.as_secs(), LATER.as_secs());
    let _ = writeln!(out, "|---|---|---|---|");
    for (class, (right, later, total)) in &accuracy.per_class {
        let _ = writeln!(out, "| {class} | {total} | {right} | {later} |");
    }
    let (right, total) = accuracy.right();
    let _ = writeln!(out, "| all | {total} | {right} | {} |", accuracy.per_class.values().map(|v| v.1).sum::<usize>());
    if !accuracy.wrong.is_empty() {
        let _ = writeln!(out, "\nClassed wrong after {} s (said, and the label): {}.", AFTER.as_secs(), accuracy.wrong.join("; "));
    }
    out
}
