//! Checkpoint and restore of whole jobs (a process tree in its own PID namespace) through CRIU's RPC.
//!
//! Nothing is implemented yet: this crate will hold the job model, the CRIU driver and the image transfer
//! that migd uses to move a job from one node to another.
