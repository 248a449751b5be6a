//! Network faults on the local test cluster: a node that goes silent, or a path between two nodes that
//! stops carrying packets, and the repair of both.
//!
//! A real cluster loses nodes in a way a test cannot fake by killing a process or closing a socket: a
//! switch port dies, a cable is pulled, a machine freezes. The peers hear nothing at all, no FIN and no RST,
//! and only their own timers can tell them. These faults do the same to the nodes of a [`Cluster`]: an
//! nftables table in the node's own network namespace drops packets on its `eth0` as they come in and as
//! they go out (netdev family, `ingress` and `egress` hooks, so ARP goes too when the whole node is cut),
//! and removing the table heals the node. Nothing outside the node's namespace changes, so several clusters
//! keep working beside a silent one. `nft` comes from the `nftables` package, which `cargo xtask setup`
//! installs; netem would do for one direction only, and this kernel does not have it.

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::Stdio;

use anyhow::{Context as _, ensure};

use crate::Cluster;

/// The nftables table that holds a node's faults. Only faults live in it, so deleting it heals the node.
const TABLE: &str = "rmosix_fault";

/// The nft commands that make sure node's fault table and its two base chains exist (dropping nothing by
/// themselves).
fn table_script() -> String {
    // Priority -500: before anything else that might look at the packet.
    format!(
        "add table netdev {TABLE}\n\
         add chain netdev {TABLE} ingress {{ type filter hook ingress device \"eth0\" priority -500 ; policy accept ; }}\n\
         add chain netdev {TABLE} egress {{ type filter hook egress device \"eth0\" priority -500 ; policy accept ; }}\n"
    )
}

/// Commands that drop every packet of the node, both ways.
fn isolate_script() -> String {
    format!("{}add rule netdev {TABLE} ingress drop\nadd rule netdev {TABLE} egress drop\n", table_script())
}

/// Commands that drop the node's packets from and to `peer`, and only those.
fn cut_script(peer: Ipv4Addr) -> String {
    format!(
        "{}add rule netdev {TABLE} ingress ip saddr {peer} drop\nadd rule netdev {TABLE} egress ip daddr {peer} drop\n",
        table_script()
    )
}

/// Commands that remove the node's faults, whether it has any or not (`add` first, so `delete` finds it).
fn heal_script() -> String {
    format!("add table netdev {TABLE}\ndelete table netdev {TABLE}\n")
}

impl Cluster {
    /// Runs an nft script in node `i`'s network namespace.
    fn nft(&self, i: u32, script: &str, what: &str) -> anyhow::Result<()> {
        let mut child = self
            .command(i, "nft")?
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run nft to {what} on node {i}: is nftables installed (`cargo xtask setup`)?"))?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(script.as_bytes())
            .with_context(|| format!("cannot give nft its rules to {what} on node {i}"))?;
        let out = child.wait_with_output().with_context(|| format!("nft to {what} on node {i} did not finish"))?;
        ensure!(
            out.status.success(),
            "nft could not {what} on node {i} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Node `i` goes silent: every packet it would send or receive is dropped, without a word to anyone
    /// (no FIN, no RST, no ICMP), as when its machine freezes or its cable is pulled. Its processes run on
    /// and may talk to each other over loopback. [`Cluster::heal`] ends it.
    pub fn isolate(&self, i: u32) -> anyhow::Result<()> {
        self.nft(i, &isolate_script(), "drop all its packets")
    }

    /// The path between nodes `a` and `b` stops carrying packets, both ways, silently; both still reach
    /// every other node. The rules live in `a`'s namespace: [`Cluster::heal`] of `a` ends it.
    pub fn cut(&self, a: u32, b: u32) -> anyhow::Result<()> {
        ensure!(a != b, "cannot cut node {a} from itself");
        ensure!(self.node_ids().contains(&b), "cluster {} has no node {b}", self.name());
        self.nft(a, &cut_script(self.addr(b)), &format!("cut it from node {b}"))
    }

    /// Ends every network fault of node `i` made by [`Cluster::isolate`] or [`Cluster::cut`]; a node
    /// without faults is left as it is. Connections that were silent carry on from where they stopped if
    /// their ends have not given up meanwhile.
    pub fn heal(&self, i: u32) -> anyhow::Result<()> {
        self.nft(i, &heal_script(), "remove its network faults")
    }

    /// Ends the network faults of every node.
    pub fn heal_all(&self) -> anyhow::Result<()> {
        self.node_ids().try_for_each(|i| self.heal(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_node_drops_everything_on_eth0_both_ways() {
        let script = isolate_script();
        assert!(script.contains("hook ingress device \"eth0\""), "{script}");
        assert!(script.contains("hook egress device \"eth0\""), "{script}");
        assert!(script.ends_with("add rule netdev rmosix_fault ingress drop\nadd rule netdev rmosix_fault egress drop\n"));
    }

    #[test]
    fn a_cut_drops_only_the_peers_packets_and_healing_removes_the_whole_table() {
        let script = cut_script(Ipv4Addr::new(10, 213, 0, 3));
        assert!(script.contains("ingress ip saddr 10.213.0.3 drop\n"), "{script}");
        assert!(script.contains("egress ip daddr 10.213.0.3 drop\n"), "{script}");
        assert!(!script.contains("ingress drop"), "{script}");
        assert_eq!(heal_script(), "add table netdev rmosix_fault\ndelete table netdev rmosix_fault\n");
    }
}
