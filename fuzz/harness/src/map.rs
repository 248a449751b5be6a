//! Target `cluster_map`: `ClusterMap::parse`, which reads the `mosix.map` an administrator wrote.
//!
//! Host names resolve through a fake resolver (a hash of the name, and "unknown" for names starting with
//! `x`), so the target is deterministic and never touches DNS. Texts whose counts add up to more than
//! [`MAX_FUZZED_NODES`] are left out: parsing is linear in the nodes (a map of 65536 takes a tenth of a
//! second), and the fuzzer, drawn to large counts, slowed to a crawl on them without reaching new code;
//! the limit of `MAX_NODES` itself is the unit tests' to check.
//!
//! Checked: parsing returns, whatever the text; every error names the file, and a line error a line of
//! the text; an accepted map is not empty, holds at most `MAX_NODES` nodes with distinct ids and
//! addresses, positive finite weights, each coming from a line of the text, and finds each node by id and
//! by address; written out again in the same format (one line per run of consecutive nodes) it parses to
//! the same nodes.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use rmosix_common::map::{ClusterMap, MAX_NODES, MapError, Node};

/// Pieces of map lines worth splicing in.
pub const TOKENS: &[&[u8]] = &[
    b"speed=",
    b"mem=",
    b" # ",
    b"\n",
    b"10.0.0.1",
    b"255.255.255.255",
    b"4294967295",
    b"65536",
    b"node01",
    b"1e308",
    b"NaN",
    b"inf",
    b"-0",
];

const PATH: &str = "/etc/rmosix/mosix.map";

/// The most nodes a fuzzed map may declare.
pub const MAX_FUZZED_NODES: u64 = 4096;

/// The nodes a text declares: the sum of its lines' counts, as far as they are numbers the parser would
/// build nodes for (a count above `MAX_NODES` is refused before any).
fn declared_nodes(text: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split('#').next()?.split_whitespace().nth(2)?.parse::<u64>().ok())
        .filter(|&count| count <= u64::from(MAX_NODES))
        .fold(0, u64::saturating_add)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if declared_nodes(&text) > MAX_FUZZED_NODES {
        return;
    }
    match ClusterMap::parse(&text, Path::new(PATH), &resolve) {
        Ok(map) => check_accepted(&map, &text),
        Err(e) => {
            assert!(e.to_string().starts_with(PATH), "error does not name the file: {e}");
            match e {
                MapError::Line { line, .. } => {
                    assert!(line >= 1 && line <= text.lines().count(), "line {line} is not in the text");
                }
                MapError::Empty { .. } => {}
                MapError::Read { .. } => panic!("parsing text read a file: {e}"),
            }
        }
    }
}

/// Names resolve to an address derived from the name (FNV-1a), except names starting with `x`.
fn resolve(host: &str) -> Result<Ipv4Addr, String> {
    if host.starts_with('x') {
        return Err("Name or service not known".to_owned());
    }
    let hash = host.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    Ok(Ipv4Addr::from(hash))
}

fn check_accepted(map: &ClusterMap, text: &str) {
    assert!(!map.is_empty(), "an empty map was accepted");
    assert!(map.len() <= MAX_NODES as usize, "{} nodes accepted", map.len());
    let lines = text.lines().count();
    let mut addrs = std::collections::BTreeSet::new();
    for node in map.nodes() {
        assert!(addrs.insert(node.addr), "address {} given twice", node.addr);
        assert!(node.speed.is_finite() && node.speed > 0.0, "speed {}", node.speed);
        assert!(node.mem_weight.is_finite() && node.mem_weight > 0.0, "mem {}", node.mem_weight);
        assert!(node.line >= 1 && node.line <= lines, "node from line {} of {lines}", node.line);
        assert!(node.id.0 >= 1);
        assert_eq!(map.get(node.id), Some(node));
    }
    // `by_addr` walks the map: look up a few nodes, not all of them.
    let nodes: Vec<&Node> = map.nodes().collect();
    for node in [nodes[0], nodes[nodes.len() / 2], nodes[nodes.len() - 1]] {
        assert_eq!(map.by_addr(node.addr.into()).map(|n| n.id), Some(node.id));
    }
    let written = write(&nodes);
    let again = ClusterMap::parse(&written, Path::new(PATH), &resolve)
        .unwrap_or_else(|e| panic!("the map written out again is refused: {e}\n{written}"));
    assert_eq!(again.len(), map.len());
    for (a, b) in map.nodes().zip(again.nodes()) {
        assert_eq!((a.id, a.addr), (b.id, b.addr));
        assert_eq!(a.speed.to_bits(), b.speed.to_bits(), "speed of node {} changed", a.id);
        assert_eq!(a.mem_weight.to_bits(), b.mem_weight.to_bits(), "mem of node {} changed", a.id);
    }
}

/// The nodes in map format, one line per run of nodes with consecutive ids and addresses and equal weights.
fn write(nodes: &[&Node]) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < nodes.len() {
        let first = nodes[start];
        let mut end = start + 1;
        while end < nodes.len() {
            let (prev, next) = (nodes[end - 1], nodes[end]);
            let consecutive = u64::from(next.id.0) == u64::from(prev.id.0) + 1
                && u64::from(u32::from(next.addr)) == u64::from(u32::from(prev.addr)) + 1;
            let same = next.speed.to_bits() == first.speed.to_bits()
                && next.mem_weight.to_bits() == first.mem_weight.to_bits();
            if !(consecutive && same) {
                break;
            }
            end += 1;
        }
        let _ =
            writeln!(out, "{} {} {} speed={} mem={}", first.id, first.addr, end - start, first.speed, first.mem_weight);
        start = end;
    }
    out
}

/// The documented example, and maps that reach each error.
pub fn seeds() -> Vec<Vec<u8>> {
    let texts: &[&str] = &[
        include_str!("../../../etc/mosix.map.example"),
        "1 10.0.0.1 1\n",
        "1 10.0.0.1 4 speed=2.5 mem=0.5\n5 node05 1 # head node\n",
        "# only a comment\n\n",
        "1 10.0.0.1 4096\n",
        "1 10.0.0.1 2\n3 11.0.0.1 4094 # the most nodes fuzzed\n",
        "1 10.0.0.1 65537\n",
        "1 10.0.0.1 0\n",
        "0 10.0.0.1 1\n",
        "1 xunknown 1\n",
        "1 10.0.0.1 4\n3 10.0.1.1 1\n",
        "1 10.0.0.1 4\n10 10.0.0.4 2\n",
        "1 255.255.255.250 10\n",
        "4294967290 10.0.0.1 10\n",
        "1 10.0.0.1 1 colour=red\n",
        "1 10.0.0.1 1 speed\n",
        "1 10.0.0.1 1 speed=-1 mem=inf\n",
        "1 10.0.0.1\n",
    ];
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}
