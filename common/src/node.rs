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
/// on is an error. The directory is made reachable by everyone (0755) when it is ours and is not: a socket
/// nobody can get to is no use, and `/run/rmosix` may have been made private by something else of ours.
pub fn bind_local_socket(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
        let meta = std::fs::metadata(dir)?;
        if meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o005 != 0o005 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode((meta.mode() & 0o7777) | 0o755))?;
        }
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another daemon is answering on this socket"));
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// The first map node whose address this host can bind: that is us.
pub fn local_node(map: &ClusterMap) -> Option<NodeId> {
    map.nodes().find(|n| std::net::UdpSocket::bind((n.addr, 0)).is_ok()).map(|n| n.id)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_local_socket_is_reachable_by_every_user_even_in_a_private_directory() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("run-rmosix");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = dir.join("migd.sock");
        let _listener = super::bind_local_socket(&socket).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(mode(&socket), 0o666);
        // A second daemon on the same socket is refused while the first answers.
        assert!(super::bind_local_socket(&socket).is_err());
    }
}
