//! Authenticated node-to-node channel. (being written)
