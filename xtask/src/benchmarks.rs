//! BENCHMARKS.md: one section per benchmark, each replaced whole by its next run and left alone by the
//! others, between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->`.

use std::process::Command;

use anyhow::Context as _;

const HEADER: &str = "# Benchmarks\n\nEach section is written by `cargo xtask bench NAME` and says how it was measured. \
Figures are from one run on the machine named in the section.\n";

/// Replaces (or appends) the section `name` of BENCHMARKS.md with `title` and `body`.
pub fn update_section(name: &str, title: &str, body: &str) -> anyhow::Result<()> {
    let path = crate::root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| HEADER.to_owned());
    let new = replace_section(&old, name, title, body);
    std::fs::write(&path, new).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote section {name} of {}", path.display());
    Ok(())
}

fn replace_section(old: &str, name: &str, title: &str, body: &str) -> String {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let section = format!("{start}\n## {title}\n\n{}\n{end}", body.trim_end());
    match (old.find(&start), old.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{section}{}", &old[..a], &old[b + end.len()..]),
        _ => format!("{}\n{section}\n", old.trim_end()),
    }
}

/// A program's output lines, read on a thread and handed over as they come.
pub fn lines(source: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(source).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines of `rmx-job mem` up to its `filled` line: its memory is resident, it is worth moving now.
pub fn until_filled(rx: &std::sync::mpsc::Receiver<String>) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    loop {
        let line = rx.recv_timeout(std::time::Duration::from_mins(2)).context("the job stopped talking")?;
        let filled = line.starts_with("filled");
        seen.push(line);
        if filled {
            return Ok(seen);
        }
    }
}

/// A 2-node local cluster with room for jobs of up to `biggest` MiB, their images and their copies, for the
/// move benchmarks; this process becomes the reaper of the orphans `criu restore -d` leaves.
pub fn move_cluster(name: &str, biggest: u64, bins: &std::path::Path) -> anyhow::Result<rmosix_testcluster::Cluster> {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut spec = rmosix_testcluster::Spec::new(name, 2, bins.to_owned());
    spec.mem_limit = (biggest * 3 + 1024) << 20;
    rmosix_testcluster::Cluster::up(spec)
}

/// One line naming the machine a benchmark ran on.
pub fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{date}, {cpus} CPUs, Linux {kernel}")
}

/// The node's load averages over 1, 5 and 15 minutes, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "unknown".to_owned(), |text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

/// The last word of a benchmark's summary line: whether its target was `met` or `missed`.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_replaced_in_place_and_others_kept() {
        let doc = replace_section(HEADER, "a", "A", "first figures");
        let doc = replace_section(&doc, "b", "B", "two");
        let doc = replace_section(&doc, "a", "A", "three");
        assert!(doc.contains("## A\n\nthree\n<!-- bench:a:end -->"));
        assert!(doc.contains("## B\n\ntwo\n"));
        assert!(!doc.contains("first figures"));
        assert!(doc.find("bench:a:start").unwrap() < doc.find("bench:b:start").unwrap());
    }
}
