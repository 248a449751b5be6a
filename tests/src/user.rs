//! The ordinary user the tests run jobs as, and what tests need to watch a job's output.
//!
//! The people a cluster like this serves are ordinary users, not root: a test that moves a job starts it as
//! [`TestUser`], a real account with a home directory and a supplementary group, created on first use. Its
//! tools (`mosrun`, `migrate`, `mosctl`) run from copies every user can reach, since the build directory of
//! a fresh clone may not be (a 0700 checkout).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context as _, ensure};

use crate::Cluster;

/// The test user's name.
pub const NAME: &str = "rmosix-user";
/// A supplementary group of the test user: a move must keep it.
pub const EXTRA_GROUP: &str = "rmosix-extra";

/// An ordinary account of this machine.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one and [`EXTRA_GROUP`]).
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// The test user, created (with its home and group) the first time any test asks.
pub fn test_user() -> anyhow::Result<TestUser> {
    static USER: OnceLock<Result<TestUser, String>> = OnceLock::new();
    USER.get_or_init(|| create().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn create() -> anyhow::Result<TestUser> {
    ensure!(nix::unistd::geteuid().is_root(), "creating the test user needs root");
    let status = Command::new("groupadd").args(["-f", EXTRA_GROUP]).status().context("cannot run groupadd")?;
    ensure!(status.success(), "groupadd {EXTRA_GROUP} failed ({status})");
    if nix::unistd::User::from_name(NAME)?.is_none() {
        let status = Command::new("useradd")
            .args(["--create-home", "--user-group", "--shell", "/bin/sh", "--groups", EXTRA_GROUP, NAME])
            .status()
            .context("cannot run useradd")?;
        // 9: the name was taken meanwhile, by another test process.
        ensure!(status.success() || status.code() == Some(9), "useradd {NAME} failed ({status})");
    }
    let user = nix::unistd::User::from_name(NAME)?.with_context(|| format!("user {NAME} missing after useradd"))?;
    let name = std::ffi::CString::new(NAME)?;
    let mut groups: Vec<u32> =
        nix::unistd::getgrouplist(&name, user.gid)?.into_iter().map(nix::unistd::Gid::as_raw).collect();
    groups.sort_unstable();
    groups.dedup();
    std::fs::create_dir_all(&user.dir)?;
    std::os::unix::fs::chown(&user.dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    Ok(TestUser { name: NAME.to_owned(), uid: user.uid.as_raw(), gid: user.gid.as_raw(), groups, home: user.dir })
}

/// Copies of the workspace's tools (`mosrun`, `migrate`, `mosctl`, and the test job `rmx-job`) from `bin_dir`
/// in a directory every user can reach, one per build (named after the binaries' sizes and times). Copies older than any test run are
/// removed; newer ones may belong to tests still running, of this build or another.
pub fn reachable_tools(bin_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    const TOOLS: [&str; 4] = ["rmx-job", "mosrun", "migrate", "mosctl"];
    static DIR: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut cached = DIR.lock().expect("tools lock");
    if let Some(dir) = &*cached {
        return Ok(dir.clone());
    }
    let mut hasher = DefaultHasher::new();
    for tool in TOOLS {
        let meta = std::fs::metadata(bin_dir.join(tool)).with_context(|| format!("{tool} is not built"))?;
        (meta.len(), meta.modified()?).hash(&mut hasher);
    }
    let root = Path::new("/run/rmosix-test-tools");
    let dir = root.join(format!("{:016x}", hasher.finish()));
    if !dir.join(TOOLS[TOOLS.len() - 1]).exists() {
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        crate::remove_older_than(root, crate::SNAPSHOT_LIFE);
        let tmp = root.join(format!("tmp-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        for tool in TOOLS {
            std::fs::copy(bin_dir.join(tool), tmp.join(tool))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &dir).or_else(|e| if dir.exists() { Ok(()) } else { Err(e) })?;
    }
    *cached = Some(dir.clone());
    Ok(dir)
}

impl Cluster {
    /// A command running `program` (a tool name such as `mosrun`, or a path) on node `i` as `user`, with
    /// the user's groups, home and a plain `PATH`, after entering the node (which needs root).
    pub fn command_as(&self, i: u32, user: &TestUser, program: &str) -> anyhow::Result<Command> {
        let tools = reachable_tools(&self.spec.bin_dir)?;
        let program = if program.contains('/') { PathBuf::from(program) } else { tools.join(program) };
        let mut cmd = self.command(i, "setpriv")?;
        cmd.args([format!("--reuid={}", user.uid), format!("--regid={}", user.gid), "--init-groups".to_owned()])
            .arg("--")
            .arg(program)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(&user.home);
        Ok(cmd)
    }
}

impl Cluster {
    /// Processes of node `i` (in its cgroup or below: every job has a cgroup of its own) running `comm`.
    pub fn processes(&self, i: u32, comm: &str) -> Vec<i32> {
        fn walk(dir: &Path, out: &mut Vec<i32>) {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            out.extend(procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()));
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        let mut pids = Vec::new();
        walk(&self.cgroups(i)[0], &mut pids);
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm));
        pids
    }
}

/// The lines a child prints on its stdout, collected by a thread as they come. Tests wait on it for what
/// they need (so many lines, or the end of the output), never for a fixed time.
#[derive(Debug, Clone)]
pub struct Lines(Arc<(Mutex<Collected>, Condvar)>);

#[derive(Debug, Default)]
struct Collected {
    lines: Vec<String>,
    /// The reader saw the end of the output: every holder of the pipe's write end closed it.
    ended: bool,
}

impl Lines {
    /// Starts collecting `child`'s stdout (which must be piped).
    pub fn of(child: &mut std::process::Child) -> Self {
        let shared = Arc::new((Mutex::new(Collected::default()), Condvar::new()));
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout piped"));
        let sink = Arc::clone(&shared);
        std::thread::spawn(move || {
            let (collected, changed) = &*sink;
            for line in std::io::BufRead::lines(out).map_while(Result::ok) {
                collected.lock().expect("lines").lines.push(line);
                changed.notify_all();
            }
            collected.lock().expect("lines").ended = true;
            changed.notify_all();
        });
        Self(shared)
    }

    /// How many lines so far.
    pub fn count(&self) -> usize {
        self.0.0.lock().expect("lines").lines.len()
    }

    /// Waits until `done` holds for what was collected, panicking with `what` if it does not within
    /// [`crate::PATIENCE`] or the output ends first.
    fn wait(&self, what: &str, done: impl Fn(&Collected) -> bool) {
        let (collected, changed) = &*self.0;
        let deadline = Instant::now() + crate::PATIENCE;
        let mut guard = collected.lock().expect("lines");
        while !done(&guard) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !guard.ended && !left.is_zero(),
                "waited for {what}; the output {} after {} lines, the last: {:?}",
                if guard.ended { "ended" } else { "stalled" },
                guard.lines.len(),
                guard.lines.last()
            );
            guard = changed.wait_timeout(guard, left).expect("lines").0;
        }
    }

    /// Waits until there are at least `n` lines; panics if they do not come.
    pub fn wait_for(&self, n: usize) {
        self.wait(&format!("{n} lines"), |c| c.lines.len() >= n);
    }

    /// Waits until the output has ended (the child and whatever else held its stdout closed it) and
    /// returns all of it, each line ending in a newline. A test reads the whole output only after this:
    /// the lines its child printed last may still be on their way when the child has exited.
    pub fn finish(&self) -> String {
        self.wait("the end of the output", |c| c.ended);
        self.text()
    }

    /// Every line so far, each ending in a newline.
    pub fn text(&self) -> String {
        self.0.0.lock().expect("lines").lines.iter().flat_map(|l| [l.as_str(), "\n"]).collect()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.0.lock().expect("lines").lines.clone()
    }
}
