//! The cluster map, in the format of MOSIX's `/etc/mosix.map`.
//!
//! Each non-blank, non-comment line is `<first-node-id> <hostname-or-IPv4> <count> [key=value ...]`: `count`
//! consecutive node ids starting at `first-node-id`, on `count` consecutive IPv4 addresses starting at the
//! given one. `1 10.0.0.1 99` is 99 nodes; `3 node03 1` is one. After the count, optional weights (dshd's
//! idea) describe the nodes of that line: `speed=2.0` is a relative CPU speed, `mem=0.5` a memory weight.
//!
//! The map decides who belongs to the cluster: a datagram from an address or id that is not in it is
//! dropped. Parsing is strict, and every error names the file, the line and what is wrong, because a
//! cluster that silently ignored half its map would be far harder to debug than one that refuses to start.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Most nodes a map may describe: ids are `u32` on the wire, but no real cluster is this big and the
/// limit keeps a typo like `1 10.0.0.1 99999999` from allocating gigabytes.
pub const MAX_NODES: u32 = 65_536;

/// A node's number in the cluster, as written in the map.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Its id, unique in the map.
    pub id: NodeId,
    /// Its address, unique in the map; infod listens and is reached there.
    pub addr: Ipv4Addr,
    /// Relative CPU speed (1.0 is the reference machine); scales the load when choosing a node.
    pub speed: f64,
    /// Relative memory weight; scales free memory when comparing nodes.
    pub mem_weight: f64,
    /// Line of the map this node came from, so later errors can point back at it.
    pub line: usize,
}

/// A parsed, validated cluster map.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterMap {
    nodes: BTreeMap<NodeId, Node>,
}

/// What is wrong with a map line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapErrorKind {
    #[error("expected `<first-node-id> <host-or-ipv4> <count> [key=value ...]`, found {found} field(s)")]
    MissingFields { found: usize },
    #[error("bad node id {text:?}: expected a whole number from 1 to {max}", max = u32::MAX)]
    BadId { text: String },
    #[error("bad count {text:?}: expected a whole number from 1 to {MAX_NODES}")]
    BadCount { text: String },
    #[error("count is 0: a line must describe at least one node")]
    ZeroCount,
    #[error("cannot resolve host {host:?}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("ids {first}..={last} run past the largest node id")]
    IdOverflow { first: u32, last: u64 },
    #[error("{count} addresses from {first} run past 255.255.255.255")]
    AddrOverflow { first: Ipv4Addr, count: u32 },
    #[error("node id {id} is already given on line {other_line}")]
    DuplicateId { id: NodeId, other_line: usize },
    #[error("address {addr} is already given to node {other} on line {other_line}")]
    DuplicateAddr { addr: Ipv4Addr, other: NodeId, other_line: usize },
    #[error("bad weight {text:?}: expected key=value")]
    BadWeightSyntax { text: String },
    #[error("unknown key {key:?} (known keys: speed, mem)")]
    UnknownKey { key: String },
    #[error("bad value {value:?} for {key}: expected a positive number")]
    BadWeight { key: String, value: String },
    #[error("the map describes more than {MAX_NODES} nodes")]
    TooManyNodes,
}

/// A map error, located.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{path}:{line}: {kind}")]
    Line { path: PathBuf, line: usize, kind: MapErrorKind },
    #[error("{path}: the map lists no nodes")]
    Empty { path: PathBuf },
    #[error("cannot read cluster map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ClusterMap {
    /// Reads and parses the map at `path`, resolving host names with the system resolver.
    pub fn load(path: &Path) -> Result<Self, MapError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| MapError::Read { path: path.to_owned(), source: e })?;
        Self::parse(&text, path, &system_resolve)
    }

    /// Parses map text; `path` is only used in error messages and `resolve` turns host names into addresses.
    pub fn parse(
        text: &str,
        path: &Path,
        resolve: &dyn Fn(&str) -> Result<Ipv4Addr, String>,
    ) -> Result<Self, MapError> {
        let mut map = ClusterMap::default();
        let mut by_addr: BTreeMap<Ipv4Addr, NodeId> = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let at = |kind| MapError::Line { path: path.to_owned(), line, kind };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.len() < 3 {
                return Err(at(MapErrorKind::MissingFields { found: fields.len() }));
            }
            let first: u32 = fields[0]
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| at(MapErrorKind::BadId { text: fields[0].to_owned() }))?;
            let addr = match fields[1].parse::<Ipv4Addr>() {
                Ok(addr) => addr,
                Err(_) => resolve(fields[1]).map_err(|reason| {
                    at(MapErrorKind::Resolve { host: fields[1].to_owned(), reason })
                })?,
            };
            let count: u32 = match fields[2].parse::<u32>() {
                Ok(0) => return Err(at(MapErrorKind::ZeroCount)),
                Ok(n) if n <= MAX_NODES => n,
                _ => return Err(at(MapErrorKind::BadCount { text: fields[2].to_owned() })),
            };
            let (mut speed, mut mem_weight) = (1.0, 1.0);
            for weight in &fields[3..] {
                let (key, value) = weight
                    .split_once('=')
                    .ok_or_else(|| at(MapErrorKind::BadWeightSyntax { text: (*weight).to_owned() }))?;
                let slot = match key {
                    "speed" => &mut speed,
                    "mem" => &mut mem_weight,
                    _ => return Err(at(MapErrorKind::UnknownKey { key: key.to_owned() })),
                };
                *slot = value.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0).ok_or_else(
                    || at(MapErrorKind::BadWeight { key: key.to_owned(), value: value.to_owned() }),
                )?;
            }
            let last_id = u64::from(first) + u64::from(count) - 1;
            if last_id > u64::from(u32::MAX) {
                return Err(at(MapErrorKind::IdOverflow { first, last: last_id }));
            }
            if u64::from(u32::from(addr)) + u64::from(count) - 1 > u64::from(u32::MAX) {
                return Err(at(MapErrorKind::AddrOverflow { first: addr, count }));
            }
            if map.nodes.len() + count as usize > MAX_NODES as usize {
                return Err(at(MapErrorKind::TooManyNodes));
            }
            for offset in 0..count {
                let id = NodeId(first + offset);
                let addr = Ipv4Addr::from(u32::from(addr) + offset);
                if let Some(other) = map.nodes.get(&id) {
                    return Err(at(MapErrorKind::DuplicateId { id, other_line: other.line }));
                }
                if let Some(&other) = by_addr.get(&addr) {
                    let other_line = map.nodes[&other].line;
                    return Err(at(MapErrorKind::DuplicateAddr { addr, other, other_line }));
                }
                by_addr.insert(addr, id);
                map.nodes.insert(id, Node { id, addr, speed, mem_weight, line });
            }
        }
        if map.nodes.is_empty() {
            return Err(MapError::Empty { path: path.to_owned() });
        }
        Ok(map)
    }

    /// Every node, in id order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = &Node> {
        self.nodes.values()
    }

    /// The node with this id.
    pub fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    /// The node at this address.
    pub fn by_addr(&self, addr: IpAddr) -> Option<&Node> {
        let IpAddr::V4(addr) = addr else { return None };
        self.nodes.values().find(|n| n.addr == addr)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when the map has no nodes (a parsed map never is).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Builds a map from nodes directly (simulations and tests).
    pub fn from_nodes(nodes: impl IntoIterator<Item = Node>) -> Self {
        Self { nodes: nodes.into_iter().map(|n| (n.id, n)).collect() }
    }
}

/// Resolves a host name to its first IPv4 address with the system resolver.
pub fn system_resolve(host: &str) -> Result<Ipv4Addr, String> {
    let mut addrs = (host, 0).to_socket_addrs().map_err(|e| e.to_string())?;
    addrs
        .find_map(|a| match a.ip() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .ok_or_else(|| "no IPv4 address".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(host: &str) -> Result<Ipv4Addr, String> {
        match host {
            "node01" => Ok(Ipv4Addr::new(192, 0, 2, 1)),
            "node02" => Ok(Ipv4Addr::new(192, 0, 2, 2)),
            _ => Err("Name or service not known".to_owned()),
        }
    }

    fn parse(text: &str) -> Result<ClusterMap, MapError> {
        ClusterMap::parse(text, Path::new("/etc/mosix.map"), &resolver)
    }

    fn kind(text: &str) -> (usize, MapErrorKind) {
        match parse(text).unwrap_err() {
            MapError::Line { line, kind, .. } => (line, kind),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn ranges_expand_to_consecutive_ids_and_addresses() {
        let map = parse("# a cluster\n\n1 10.0.0.1 99\n100 node01 1 # the head\n").unwrap();
        assert_eq!(map.len(), 100);
        let n50 = map.get(NodeId(50)).unwrap();
        assert_eq!(n50.addr, Ipv4Addr::new(10, 0, 0, 50));
        assert_eq!(map.get(NodeId(100)).unwrap().addr, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(map.by_addr("10.0.0.99".parse().unwrap()).unwrap().id, NodeId(99));
        assert!(map.get(NodeId(101)).is_none());
    }

    #[test]
    fn weights_apply_to_every_node_of_their_line() {
        let map = parse("1 10.0.0.1 2 speed=2.5 mem=0.5\n3 10.0.0.3 1\n").unwrap();
        assert!((map.get(NodeId(2)).unwrap().speed - 2.5).abs() < f64::EPSILON);
        assert!((map.get(NodeId(2)).unwrap().mem_weight - 0.5).abs() < f64::EPSILON);
        assert!((map.get(NodeId(3)).unwrap().speed - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let err = parse("1 10.0.0.1 1\n2 10.0.0.2 zero\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/mosix.map:2: bad count \"zero\": expected a whole number from 1 to 65536"
        );
        assert_eq!(kind("1 10.0.0.1 0"), (1, MapErrorKind::ZeroCount));
        assert_eq!(kind("x 10.0.0.1 1").1, MapErrorKind::BadId { text: "x".into() });
        assert_eq!(kind("0 10.0.0.1 1").1, MapErrorKind::BadId { text: "0".into() });
        assert_eq!(kind("1 10.0.0.1").1, MapErrorKind::MissingFields { found: 2 });
        assert_eq!(
            kind("1 10.0.0.1 1 colour=red").1,
            MapErrorKind::UnknownKey { key: "colour".into() }
        );
        assert_eq!(
            kind("1 10.0.0.1 1 speed=-1").1,
            MapErrorKind::BadWeight { key: "speed".into(), value: "-1".into() }
        );
        assert_eq!(
            kind("1 10.0.0.1 1 speed").1,
            MapErrorKind::BadWeightSyntax { text: "speed".into() }
        );
        assert!(matches!(kind("1 nosuchhost 1").1, MapErrorKind::Resolve { .. }));
        assert!(matches!(kind("1 255.255.255.250 10").1, MapErrorKind::AddrOverflow { .. }));
        assert!(matches!(kind("4294967290 10.0.0.1 10").1, MapErrorKind::IdOverflow { .. }));
    }

    #[test]
    fn overlapping_ids_and_addresses_are_refused() {
        assert_eq!(
            kind("1 10.0.0.1 4\n3 10.0.1.1 1\n"),
            (2, MapErrorKind::DuplicateId { id: NodeId(3), other_line: 1 })
        );
        assert_eq!(
            kind("1 10.0.0.1 4\n10 10.0.0.4 2\n"),
            (
                2,
                MapErrorKind::DuplicateAddr {
                    addr: Ipv4Addr::new(10, 0, 0, 4),
                    other: NodeId(4),
                    other_line: 1
                }
            )
        );
        assert_eq!(kind("1 node01 1\n2 192.0.2.1 1").0, 2);
    }

    #[test]
    fn an_empty_map_is_an_error() {
        assert!(matches!(parse("# nothing\n\n"), Err(MapError::Empty { .. })));
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = ClusterMap::load(Path::new("/nonexistent/mosix.map")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read cluster map /nonexistent/mosix.map"));
    }
}
