//! The command-line tools' shared pieces: finding the local daemons and printing the cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rmosix_common::config::Config;
use rmosix_common::control::{JobView, NodeJobs};
use rmosix_common::query::{ClusterView, SOCKET_ENV};

/// infod's socket: `--socket`, else `$RMOSIX_INFOD_SOCKET`, else the configuration's `infod.socket`.
pub fn infod_socket(explicit: Option<&Path>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os(SOCKET_ENV) {
        return Ok(PathBuf::from(p));
    }
    let (config, _) = Config::load(config)?;
    Ok(config.infod.socket)
}

/// migd's control socket: `--migd-socket`, else `$RMOSIX_MIGD_SOCKET`, else the configuration's `migd.socket`.
pub fn migd_socket(explicit: Option<&Path>, config: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os(rmosix_common::control::SOCKET_ENV) {
        return Ok(PathBuf::from(p));
    }
    let (config, _) = Config::load(config)?;
    Ok(config.migd.socket)
}

/// Which jobs `mosctl jobs` shows.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only jobs running on this node.
    pub node: Option<u32>,
    /// Only jobs of this user (by uid).
    pub uid: Option<u32>,
}

impl JobFilter {
    fn keeps(&self, job: &JobView) -> bool {
        self.node.is_none_or(|n| job.node == n) && self.uid.is_none_or(|u| job.uid == u)
    }
}

/// The jobs of `nodes` that `filter` keeps, in home order.
fn kept_jobs<'a>(nodes: &'a [NodeJobs], filter: &JobFilter) -> Vec<&'a JobView> {
    let mut jobs: Vec<&JobView> = nodes.iter().flat_map(|n| &n.jobs).filter(|j| filter.keeps(j)).collect();
    jobs.sort_by_key(|j| (j.home_node, j.home_pid));
    jobs
}

/// A user's name, or the uid when it has none here.
pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// A start time as `HH:MM` (UTC) today, else as the date.
fn started(secs: u64, now: u64) -> String {
    let day = |t: u64| t / 86_400;
    if day(secs) == day(now) {
        format!("{:02}:{:02}", secs % 86_400 / 3600, secs % 3600 / 60)
    } else {
        // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
        let z = day(secs).cast_signed() + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}-{d:02}")
    }
}

/// The table printed by `mosctl jobs`: one line per job, then the nodes that did not answer.
pub fn jobs_table(nodes: &[NodeJobs], unreachable: &[(u32, String)], filter: &JobFilter, now: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4} {:>8}  {:>4} {:>8}  {:<10} {:<8} {:<12} {:>5} {:>7} {:>7} {:>7} {:>3} {:>10}  COMMAND",
        "HOME", "HOME_PID", "NODE", "PID", "OWNER", "STATE", "CLASS", "%CPU", "RSS", "READ/s", "WRITE/s", "MIG", "STARTED"
    );
    for j in kept_jobs(nodes, filter) {
        let mut command = j.command.join(" ");
        if let Some(reason) = &j.reason {
            let _ = write!(command, "  [{reason}]");
        }
        let _ = writeln!(
            out,
            "{:>4} {:>8}  {:>4} {:>8}  {:<10} {:<8} {:<12} {:>5.1} {:>7} {:>7} {:>7} {:>3} {:>10}  {command}",
            j.home_node,
            j.home_pid,
            j.node,
            j.pid,
            user_name(j.uid),
            j.state,
            j.class.to_string(),
            j.cpu,
            human_bytes(j.rss),
            human_bytes(j.read_bps),
            human_bytes(j.write_bps),
            j.migrations,
            started(j.started, now),
        );
    }
    for (node, why) in unreachable {
        let _ = writeln!(out, "node {node} did not answer: {why}");
    }
    out
}

/// `mosctl jobs --json`: `{"jobs":[{"home_node","home_pid","node","pid","owner","uid","command","state",
/// "class","reason","cpu","rss","read_bps","write_bps","migrations","started"}...],"unreachable":[{"node",
/// "reason"}...],"sources":[{"node","source"}...]}`; `command` is one string, `started` seconds since the
/// Unix epoch, `cpu` percent of one CPU, rates in bytes per second.
pub fn jobs_json(nodes: &[NodeJobs], unreachable: &[(u32, String)], filter: &JobFilter) -> serde_json::Value {
    let jobs: Vec<serde_json::Value> = kept_jobs(nodes, filter)
        .into_iter()
        .map(|j| {
            serde_json::json!({
                "home_node": j.home_node,
                "home_pid": j.home_pid,
                "node": j.node,
                "pid": j.pid,
                "owner": user_name(j.uid),
                "uid": j.uid,
                "command": j.command.join(" "),
                "state": j.state,
                "class": j.class,
                "reason": j.reason,
                "cpu": j.cpu,
                "rss": j.rss,
                "read_bps": j.read_bps,
                "write_bps": j.write_bps,
                "migrations": j.migrations,
                "started": j.started,
            })
        })
        .collect();
    let unreachable: Vec<serde_json::Value> =
        unreachable.iter().map(|(node, why)| serde_json::json!({"node": node, "reason": why})).collect();
    let sources: Vec<serde_json::Value> =
        nodes.iter().map(|n| serde_json::json!({"node": n.node, "source": n.source})).collect();
    serde_json::json!({"jobs": jobs, "unreachable": unreachable, "sources": sources})
}

/// Formats a byte count the way `free -h` does (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "Ki", "Mi", "Gi", "Ti"];
    #[expect(clippy::cast_precision_loss, reason = "display only")]
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes}B") } else { format!("{value:.1}{}", UNITS[unit]) }
}

/// The cluster table printed by `mosctl status`.
pub fn status_table(view: &ClusterView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<15}  {:<5}  {:>6}  {:>4}  {:>5}  {:>17}  {:>6}  {:>7}  POLICY",
        "NODE", "ADDRESS", "STATE", "LOAD", "CPUS", "SPEED", "FREE/TOTAL MEM", "GUESTS", "AGE"
    );
    for n in &view.nodes {
        let me = if n.id == view.node { "*" } else { " " };
        let state = match (n.alive, n.blocks_guests) {
            (false, _) => "down",
            (true, Some(true)) => "block",
            (true, _) => "up",
        };
        let dash = || "-".to_owned();
        let policy: Vec<&str> = [(n.blocks_guests, "block"), (n.stays, "stay"), (n.lstays, "lstay")]
            .into_iter()
            .filter_map(|(set, word)| (set == Some(true)).then_some(word))
            .collect();
        let policy = if policy.is_empty() { dash() } else { policy.join(",") };
        let _ = writeln!(
            out,
            "{:>4}{me}  {:<15}  {:<5}  {:>6}  {:>4}  {:>5}  {:>17}  {:>6}  {:>7}  {policy}",
            n.id,
            n.address,
            state,
            n.load.map_or_else(dash, |l| format!("{l:.2}")),
            n.cpus.map_or_else(dash, |c| c.to_string()),
            n.speed.map_or_else(dash, |s| format!("{s:.2}")),
            match (n.mem_free, n.mem_total) {
                (Some(f), Some(t)) => format!("{}/{}", human_bytes(f), human_bytes(t)),
                _ => dash(),
            },
            n.guests.map_or_else(dash, |g| g.to_string()),
            n.age_ms.map_or_else(dash, |a| format!("{:.1}s", Duration::from_millis(a).as_secs_f64())),
        );
    }
    out
}

use std::time::Duration;

/// `mosctl status --json`: `{"nodes":[{"id","address","alive","load","cpus","speed","mem_free","mem_total",
/// "guests","age_ms"}...]}` plus the answering node and its datagram counters.
pub fn status_json(view: &ClusterView) -> serde_json::Value {
    serde_json::to_value(view).expect("views serialize")
}

#[cfg(test)]
mod tests {
    use rmosix_common::query::{Counters, NodeView};

    use super::*;

    fn job(node: u32, home_pid: i32, uid: u32) -> JobView {
        JobView {
            home_node: 1,
            home_pid,
            node,
            pid: 4000 + home_pid,
            uid,
            command: vec!["python3".into(), "sim.py".into()],
            state: "running".into(),
            class: rmosix_common::control::Class::Cpu,
            reason: None,
            cpu: 98.5,
            rss: 300 << 20,
            read_bps: 0,
            write_bps: 2048,
            migrations: 2,
            started: 1_764_547_200 + 3600 * 13 + 60 * 5,
        }
    }

    #[test]
    fn jobs_are_listed_in_home_order_filtered_with_the_silent_nodes_named() {
        let nodes = vec![
            NodeJobs { node: 2, source: "bpf (tp_btf)".into(), jobs: vec![job(2, 30, 0)] },
            NodeJobs {
                node: 1,
                source: "proc (no BTF)".into(),
                jobs: vec![job(1, 20, 0), JobView { reason: Some("holds a TCP socket".into()), ..job(1, 10, 65534) }],
            },
        ];
        let unreachable = vec![(3, "no answer within 2 s".to_owned())];
        let now = 1_764_547_200 + 3600 * 14;
        let table = jobs_table(&nodes, &unreachable, &JobFilter::default(), now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[1].contains(" 10 ") && lines[1].ends_with("python3 sim.py  [holds a TCP socket]"), "{table}");
        assert!(lines[2].contains("root") && lines[2].contains("13:05") && lines[2].contains(" 98.5 "), "{table}");
        assert_eq!(lines[4], "node 3 did not answer: no answer within 2 s");
        let only_node_2 = jobs_table(&nodes, &[], &JobFilter { node: Some(2), uid: None }, now);
        assert_eq!(only_node_2.lines().count(), 2, "{only_node_2}");
        assert_eq!(started(0, now), "1970-01-01");
        let json = jobs_json(&nodes, &unreachable, &JobFilter { node: None, uid: Some(0) });
        assert_eq!(json["jobs"].as_array().unwrap().len(), 2);
        assert_eq!(json["jobs"][0]["class"], "cpu");
        assert_eq!(json["jobs"][0]["command"], "python3 sim.py");
        assert_eq!(json["jobs"][0]["owner"], "root");
        assert_eq!(json["unreachable"][0]["node"], 3);
        assert_eq!(json["sources"][1]["source"], "proc (no BTF)");
    }

    #[test]
    fn bytes_read_like_free() {
        assert_eq!(human_bytes(512), "512B");
        assert_eq!(human_bytes(3 << 30), "3.0Gi");
        assert_eq!(human_bytes(1536 << 20), "1.5Gi");
    }

    #[test]
    fn the_table_shows_down_nodes_with_dashes() {
        let up = NodeView {
            id: 1,
            address: "10.0.0.1".into(),
            alive: true,
            load: Some(1.25),
            cpus: Some(2),
            speed: Some(1.0),
            mem_free: Some(1 << 30),
            mem_total: Some(2 << 30),
            guests: Some(0),
            blocks_guests: Some(false),
            stays: Some(false),
            lstays: Some(false),
            age_ms: Some(1500),
        };
        let down = NodeView {
            id: 2,
            address: "10.0.0.2".into(),
            alive: false,
            load: None,
            cpus: None,
            speed: None,
            mem_free: None,
            mem_total: None,
            guests: None,
            blocks_guests: None,
            stays: None,
            lstays: None,
            age_ms: None,
        };
        let view = ClusterView { node: 1, nodes: vec![up, down], counters: Counters::default() };
        let table = status_table(&view);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("   1*  10.0.0.1         up       1.25     2   1.00"), "{table}");
        assert!(lines[1].ends_with("1.5s  -"), "{table}");
        assert!(lines[2].contains("down") && lines[2].ends_with('-'), "{table}");
        let json = status_json(&view);
        assert_eq!(json["nodes"][0]["age_ms"], 1500);
        assert_eq!(json["nodes"][1]["alive"], false);
    }
}
