//! infod, the information daemon of every node.
//!
//! Every interval it measures the node's load vector ([`resources`]) and sends it, with the freshest part of
//! its window of news about other nodes, to one peer chosen at random (MOSIX's probabilistic
//! dissemination, [`engine`], [`window`]). It answers local queries about the cluster on a Unix socket
//! ([`daemon`]).

pub mod daemon;
pub mod engine;
pub mod resources;
pub mod window;
