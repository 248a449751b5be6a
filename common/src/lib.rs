//! Types every rmosix component agrees on: the cluster map (`mosix.map`), the TOML configuration, the
//! load vector and its decay, the authenticated datagram format spoken between infod daemons, the cluster
//! key, and the local query protocol between infod and the command-line tools.
//!
//! Nothing here touches the network, and only [`cgroup`] touches the host (its cgroup files, through paths
//! it is given, so it too is tested without root on fake trees): the rest are pure data types and codecs,
//! reused unchanged by the daemons, the tools and the simulations.

pub mod balance;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod key;
pub mod load;
pub mod map;
pub mod mountinfo;
pub mod node;
pub mod policy;
pub mod query;
pub mod wire;

pub use map::NodeId;
