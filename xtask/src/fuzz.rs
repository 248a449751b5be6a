//! `cargo xtask fuzz [TARGET] [--seconds N]`: long libFuzzer runs of the fuzz targets in `fuzz/`, on the
//! nightly toolchain (cargo-fuzz needs its sanitizer flags), one target after another under `nice -n 19`,
//! since other people build and test on the same two cores.
//!
//! For each target: its seeds (`fuzz-seeds`, built by the current encoders) go into a scratch corpus under
//! the target directory, libFuzzer runs from that and the kept corpus for N seconds with a per-input time
//! limit (a hang is a failure) and a per-allocation limit (so is an allocation beyond the largest frame a
//! decoder accepts), then everything is merged into a fresh minimal corpus that replaces
//! `fuzz/corpus/<target>/`. An input that breaks a promise is copied to `fuzz/regressions/<target>/`, which
//! the stable replay in `cargo xtask test` runs forever after. The result becomes the target's row in the
//! "Fuzzing" section of RELIABILITY.md.
//!
//! cargo-fuzz is installed from crates.io when missing; the nightly toolchain must be there already.

use std::fmt::Write as _;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail, ensure};
use clap::Args;

/// The cargo-fuzz release this project is run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A single input that runs longer than this is a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;

/// No decoder allocates more than a 4 MiB frame and its framing at once (the replay checks the same).
const MALLOC_LIMIT_MB: u32 = 5;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, Args)]
pub struct FuzzArgs {
    /// The target to run; all of them, one after another, when absent.
    pub target: Option<String>,
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// List the targets and what each feeds, and stop.
    #[arg(long)]
    pub list: bool,
    /// Do not write RELIABILITY.md.
    #[arg(long)]
    pub no_record: bool,
}

/// What one run found.
#[derive(Debug, Default)]
struct Outcome {
    target: String,
    feeds: String,
    seconds: u64,
    runs: u64,
    exec_per_sec: u64,
    /// libFuzzer's `cov:`: edges (PCs) covered.
    cov: u64,
    /// libFuzzer's `ft:`: coverage features.
    features: u64,
    peak_rss_mb: u64,
    /// Files and bytes of the corpus kept after the merge.
    kept_files: usize,
    kept_bytes: u64,
    /// Inputs that broke a promise, as copied into `fuzz/regressions/`.
    failures: Vec<PathBuf>,
}

/// Runs the fuzz targets.
pub fn run(args: &FuzzArgs) -> anyhow::Result<()> {
    let targets = list_targets()?;
    if args.list {
        for (name, feeds) in &targets {
            println!("{name:16} {feeds}");
        }
        return Ok(());
    }
    let chosen: Vec<&(String, String)> = match &args.target {
        None => targets.iter().collect(),
        Some(name) => vec![targets.iter().find(|(n, _)| n == name).with_context(|| {
            let names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
            format!("no fuzz target {name}; there are {}", names.join(", "))
        })?],
    };
    require_nightly()?;
    install_cargo_fuzz()?;
    // The fuzzed code should be what ships: the fuzz project takes the workspace's locked versions.
    let root = crate::root();
    std::fs::copy(root.join("Cargo.lock"), root.join("fuzz/Cargo.lock"))
        .context("cannot copy Cargo.lock into fuzz/")?;
    let mut failed = Vec::new();
    for (name, feeds) in chosen {
        let outcome = run_target(name, feeds, args.seconds)?;
        println!(
            "fuzz {name}: {} runs in {} s, cov {}, ft {}, corpus {} files ({} bytes), {} failing inputs",
            outcome.runs,
            outcome.seconds,
            outcome.cov,
            outcome.features,
            outcome.kept_files,
            outcome.kept_bytes,
            outcome.failures.len()
        );
        if !args.no_record {
            record(&outcome)?;
        }
        failed.extend(outcome.failures);
    }
    ensure!(
        failed.is_empty(),
        "inputs broke a promise, kept in: {}",
        failed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The targets (name, what it feeds), from the harness itself.
fn list_targets() -> anyhow::Result<Vec<(String, String)>> {
    let out = crate::cargo()
        .args(["run", "--quiet", "--package", "rmosix-fuzz-harness", "--bin", "fuzz-seeds", "--", "--list"])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo")?;
    ensure!(out.status.success(), "fuzz-seeds --list failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(n, f)| (n.to_owned(), f.to_owned()))
        .collect())
}

/// `rustup run nightly CMD ...` under `nice -n 19`, in the workspace root, with cargo's variables of the
/// stable toolchain that runs this xtask removed.
fn nightly(args: &[&str]) -> Command {
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19", "rustup", "run", "nightly"]).args(args).current_dir(crate::root());
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR", "RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    cmd
}

fn require_nightly() -> anyhow::Result<()> {
    let ok = nightly(&["rustc", "--version"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    ensure!(
        ok.is_ok_and(|s| s.success()),
        "cargo xtask fuzz needs the nightly toolchain (libFuzzer's sanitizer flags): rustup toolchain install \
         nightly. The short replay of every target runs on stable in cargo xtask test."
    );
    Ok(())
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    let installed = nightly(&["cargo", "fuzz", "--version"]).output();
    if installed.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} from crates.io");
    let status = crate::cargo()
        .args(["install", "--locked", "--version", CARGO_FUZZ_VERSION, "cargo-fuzz"])
        .status()
        .context("cannot run cargo install")?;
    ensure!(status.success(), "cargo install cargo-fuzz failed ({status})");
    Ok(())
}

/// `cargo fuzz run` of `target` with these corpus directories and libFuzzer flags.
fn cargo_fuzz_run(target: &str, corpora: &[&Path], flags: &[String]) -> Command {
    let mut cmd = nightly(&["cargo", "fuzz", "run", "--fuzz-dir", "fuzz", "--release", "--debug-assertions", target]);
    cmd.args(corpora).arg("--").args(flags);
    cmd
}

fn run_target(name: &str, feeds: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let scratch = crate::bin_dir().parent().context("no target directory")?.join("fuzz").join(name);
    let (work, artifacts, merged) = (scratch.join("corpus"), scratch.join("artifacts"), scratch.join("merged"));
    for dir in [&work, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let status = crate::cargo()
        .args(["run", "--quiet", "--package", "rmosix-fuzz-harness", "--bin", "fuzz-seeds", "--", name])
        .arg(&work)
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "fuzz-seeds {name} failed ({status})");
    let root = crate::root();
    let [kept, regressions] = ["corpus", "regressions"].map(|d| root.join("fuzz").join(d).join(name));
    std::fs::create_dir_all(&kept).with_context(|| format!("cannot create {}", kept.display()))?;
    let mut corpora = vec![work.as_path(), kept.as_path()];
    if regressions.is_dir() {
        corpora.push(&regressions);
    }
    let flags = vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"),
        "-rss_limit_mb=2048".to_owned(),
        "-print_final_stats=1".to_owned(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ];
    eprintln!("fuzz: {name} for {seconds} s ({feeds})");
    let mut outcome = Outcome { target: name.to_owned(), feeds: feeds.to_owned(), seconds, ..Outcome::default() };
    let written = fuzz_and_read(cargo_fuzz_run(name, &corpora, &flags), &mut outcome)?;
    for artifact in written {
        let file = artifact.file_name().context("an artifact without a name")?;
        std::fs::create_dir_all(&regressions)?;
        let keep = regressions.join(file);
        std::fs::copy(&artifact, &keep).with_context(|| format!("cannot keep {}", artifact.display()))?;
        outcome.failures.push(keep);
    }
    if outcome.failures.is_empty() {
        minimize(name, &merged, &kept, &work)?;
    }
    (outcome.kept_files, outcome.kept_bytes) = dir_size(&kept)?;
    Ok(outcome)
}

/// Runs libFuzzer, passing its output through and reading its figures; returns the artifacts it wrote
/// (inputs that crashed, hung or allocated too much).
fn fuzz_and_read(mut cmd: Command, outcome: &mut Outcome) -> anyhow::Result<Vec<PathBuf>> {
    let mut child = cmd.stderr(Stdio::piped()).spawn().context("cannot run cargo fuzz")?;
    let mut artifacts = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().context("no stderr")?).lines() {
        let line = line?;
        eprintln!("{line}");
        read_figures(&line, outcome);
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            artifacts.push(PathBuf::from(path.trim()));
        }
    }
    let status = child.wait()?;
    if !status.success() && artifacts.is_empty() {
        bail!("cargo fuzz run {} failed ({status}) without writing an input", outcome.target);
    }
    Ok(artifacts)
}

/// Takes what a libFuzzer line says: the status lines' `cov:` and `ft:`, and the final `stat::` lines.
fn read_figures(line: &str, outcome: &mut Outcome) {
    let number = |after: &str| -> Option<u64> {
        let (_, rest) = line.split_once(after)?;
        rest.split_whitespace().next()?.parse().ok()
    };
    if line.starts_with('#') {
        outcome.cov = number("cov: ").unwrap_or(outcome.cov);
        outcome.features = number("ft: ").unwrap_or(outcome.features);
    }
    for (stat, slot) in [
        ("stat::number_of_executed_units:", &mut outcome.runs),
        ("stat::average_exec_per_sec:", &mut outcome.exec_per_sec),
        ("stat::peak_rss_mb:", &mut outcome.peak_rss_mb),
    ] {
        if line.starts_with(stat) {
            *slot = number(stat).unwrap_or(*slot);
        }
    }
}

/// Merges the kept corpus and the run's scratch corpus into a fresh small one and makes it the kept corpus:
/// libFuzzer's `-set_cover_merge=1` with hit counts left out (`-use_counters=0`), an approximately
/// smallest set of inputs that reaches every edge any of them reaches. Counting hit counts too kept five
/// times as many files.
fn minimize(name: &str, merged: &Path, kept: &Path, work: &Path) -> anyhow::Result<()> {
    if merged.exists() {
        std::fs::remove_dir_all(merged).with_context(|| format!("cannot empty {}", merged.display()))?;
    }
    std::fs::create_dir_all(merged)?;
    let flags =
        ["-set_cover_merge=1".to_owned(), "-use_counters=0".to_owned(), format!("-timeout={INPUT_TIMEOUT_SECS}")];
    let out = cargo_fuzz_run(name, &[merged, kept, work], &flags).output().context("cannot run cargo fuzz")?;
    ensure!(
        out.status.success(),
        "merging the corpus of {name} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for entry in std::fs::read_dir(kept)? {
        std::fs::remove_file(entry?.path())?;
    }
    for entry in std::fs::read_dir(merged)? {
        let entry = entry?;
        std::fs::copy(entry.path(), kept.join(entry.file_name()))?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<(usize, u64)> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        files += 1;
        bytes += entry?.metadata()?.len();
    }
    Ok((files, bytes))
}

/// Writes the target's row into the "Fuzzing" section of RELIABILITY.md, creating what is missing and
/// leaving the rest of the file alone.
fn record(outcome: &Outcome) -> anyhow::Result<()> {
    let path = crate::root().join("RELIABILITY.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let row = row(outcome, &crate::benchmarks::machine());
    std::fs::write(&path, with_row(&old, &outcome.target, &row))
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("fuzz: wrote the row of {} in {}", outcome.target, path.display());
    Ok(())
}

fn row(o: &Outcome, machine: &str) -> String {
    let failures = if o.failures.is_empty() {
        "0".to_owned()
    } else {
        let names: Vec<String> =
            o.failures.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
        format!("**{}**: `fuzz/regressions/{}/` {}", o.failures.len(), o.target, names.join(", "))
    };
    let mut row = String::new();
    let _ = write!(
        row,
        "| `{}` | {} | {} s | {} | {} | {} | {} | {} MiB | {} files, {} KiB | {failures} | {machine} |",
        o.target,
        o.feeds,
        o.seconds,
        o.runs,
        o.exec_per_sec,
        o.cov,
        o.features,
        o.peak_rss_mb,
        o.kept_files,
        o.kept_bytes.div_ceil(1024),
    );
    row
}

const SECTION: &str = "## Fuzzing";

const SECTION_TEXT: &str = "Every decoder fed from the network or from users has a fuzz target (`fuzz/`; their bodies, and what \
each checks, are in `fuzz/harness/src/`). `cargo xtask fuzz [TARGET] [--seconds N]` runs them with libFuzzer \
(cargo-fuzz, nightly toolchain, debug assertions on, at most 10 s per input and 5 MiB per allocation) and \
rewrites a target's row below; `cargo xtask test` replays every seed, kept input and regression plus a few \
thousand deterministic mutations per target on the stable toolchain. Coverage: libFuzzer's `cov` (edges \
reached) and `ft` (features).\n\n\
| target | feeds | time | runs | exec/s | cov | ft | peak RSS | corpus kept | failing inputs | when, where |\n\
|---|---|---|---|---|---|---|---|---|---|---|\n";

/// `doc` with the row of `target` replaced, or added to the section's table; the section is added at the
/// end if it is missing.
fn with_row(doc: &str, target: &str, row: &str) -> String {
    let doc = if doc.trim().is_empty() { "# Reliability\n".to_owned() } else { doc.to_owned() };
    let Some(start) = doc.find(&format!("\n{SECTION}\n")).map(|i| i + 1) else {
        return format!("{}\n\n{SECTION}\n\n{SECTION_TEXT}{row}\n", doc.trim_end());
    };
    let body_start = start + SECTION.len() + 1;
    let end = doc[body_start..].find("\n## ").map_or(doc.len(), |i| body_start + i + 1);
    let mut lines: Vec<String> = doc[body_start..end].lines().map(str::to_owned).collect();
    let prefix = format!("| `{target}` |");
    if let Some(line) = lines.iter_mut().find(|l| l.starts_with(&prefix)) {
        row.clone_into(line);
    } else if let Some(last) = lines.iter().rposition(|l| l.starts_with('|')) {
        lines.insert(last + 1, row.to_owned());
    } else {
        lines.push(String::new());
        lines.extend(SECTION_TEXT.lines().map(str::to_owned));
        lines.push(row.to_owned());
    }
    let mut body = lines.join("\n");
    body.push('\n');
    if end < doc.len() && !body.ends_with("\n\n") {
        body.push('\n');
    }
    format!("{}{body}{}", &doc[..body_start], &doc[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_replaced_or_added_and_other_sections_kept() {
        let doc = with_row("", "a", "| `a` | one |");
        assert!(doc.starts_with("# Reliability\n\n## Fuzzing\n\n"), "{doc}");
        assert!(doc.ends_with("| `a` | one |\n"), "{doc}");
        let doc = format!("{doc}\n## Other\n\nkept\n");
        let doc = with_row(&doc, "b", "| `b` | two |");
        let doc = with_row(&doc, "a", "| `a` | three |");
        assert!(doc.contains("| `a` | three |\n| `b` | two |\n\n## Other\n\nkept\n"), "{doc}");
        assert!(!doc.contains("one"));
        assert_eq!(doc.matches(SECTION).count(), 1);
    }

    #[test]
    fn a_section_after_others_is_added_at_the_end() {
        let doc = with_row("# Reliability\n\n## Faults\n\ntext\n", "a", "| `a` | x |");
        assert!(doc.starts_with("# Reliability\n\n## Faults\n\ntext\n\n## Fuzzing\n"), "{doc}");
    }

    #[test]
    fn libfuzzer_figures_are_read() {
        let mut o = Outcome::default();
        for line in [
            "#2\tINITED cov: 10 ft: 12 corp: 1/1b exec/s: 0 rss: 30Mb",
            "#1048576\tpulse  cov: 812 ft: 2930 corp: 300/20Kb lim: 4096 exec/s: 3495 rss: 400Mb",
            "stat::number_of_executed_units: 2097152",
            "stat::average_exec_per_sec:     3495",
            "stat::peak_rss_mb:              412",
        ] {
            read_figures(line, &mut o);
        }
        assert_eq!((o.cov, o.features, o.runs, o.exec_per_sec, o.peak_rss_mb), (812, 2930, 2_097_152, 3495, 412));
    }
}
