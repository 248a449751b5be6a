//! The command-line tools' shared pieces: finding the local daemons and printing the cluster.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rmosix_common::config::Config;
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
        "{:>5}  {:<15}  {:<5}  {:>6}  {:>4}  {:>5}  {:>17}  {:>6}  {:>7}",
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
        let _ = writeln!(
            out,
            "{:>4}{me}  {:<15}  {:<5}  {:>6}  {:>4}  {:>5}  {:>17}  {:>6}  {:>7}",
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
            age_ms: None,
        };
        let view = ClusterView { node: 1, nodes: vec![up, down], counters: Counters::default() };
        let table = status_table(&view);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].starts_with("   1*  10.0.0.1         up       1.25     2   1.00"), "{table}");
        assert!(lines[1].ends_with("1.5s"), "{table}");
        assert!(lines[2].contains("down") && lines[2].ends_with('-'), "{table}");
        let json = status_json(&view);
        assert_eq!(json["nodes"][0]["age_ms"], 1500);
        assert_eq!(json["nodes"][1]["alive"], false);
    }
}
