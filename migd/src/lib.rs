//! migd, the migration daemon of every node: it will run the jobs started with `mosrun`, keep the home
//! records of the jobs homed on this node, and move CPU-bound jobs between nodes by checkpoint/restore.
//!
//! Nothing is implemented yet: the crate exists so the workspace has its final shape. infod, the
//! information daemon it will consult for placement, is in `infod/`.
