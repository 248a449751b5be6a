//! This node's identity in the cluster: the configuration, the map, the key, and which map node we are.
//! Every daemon starts from it; `infod --check` and `migd --check` validate it.

use std::net::Ipv4Addr;

use crate::NodeId;
use crate::config::Config;
use crate::key::{ClusterKey, KeyError};
use crate::map::{ClusterMap, MapError};

/// The node could not be identified.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("node {0} is not in the cluster map")]
    NodeNotInMap(NodeId),
    #[error("no address of the cluster map belongs to this host; set `node` in the configuration")]
    NoLocalNode,
}

/// Everything a daemon needs to know about its node, checked.
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub map: ClusterMap,
    pub key: ClusterKey,
    pub me: NodeId,
}

impl Settings {
    /// Loads the map and the key the configuration names, and finds this node in the map.
    pub fn load(config: Config) -> Result<Self, NodeError> {
        let map = ClusterMap::load(&config.map)?;
        let key = ClusterKey::load(&config.cluster_key)?;
        let me = match config.node {
            Some(id) => map.get(id).map(|n| n.id).ok_or(NodeError::NodeNotInMap(id))?,
            None => local_node(&map).ok_or(NodeError::NoLocalNode)?,
        };
        Ok(Self { config, map, key, me })
    }

    /// This node's map address.
    pub fn addr(&self) -> Ipv4Addr {
        self.map.get(self.me).expect("checked at load").addr
    }
}

/// Binds a daemon's local socket at `path` for every local user (mode 0666: the daemon decides per request
/// what a caller may do). A socket file left by a crashed daemon is replaced; one a live daemon still answers
/// on is an error.
pub fn bind_local_socket(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another daemon is answering on this socket"));
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    Ok(listener)
}

/// The first map node whose address this host can bind: that is us.
pub fn local_node(map: &ClusterMap) -> Option<NodeId> {
    map.nodes().find(|n| std::net::UdpSocket::bind((n.addr, 0)).is_ok()).map(|n| n.id)
}
