//! `cargo xtask bench gossip`: placeholder, being written.

pub fn run(_args: &crate::GossipBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench gossip is not written yet")
}
