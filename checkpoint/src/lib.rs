//! Checkpoint and restore of whole jobs, the step migd moves jobs with.
//!
//! A *job* is a process tree in its own PID namespace whose PID 1 is `rmosix-init` ([`job`]): restored PIDs
//! never collide on the destination, and signals reach the program. Its stdin, stdout and stderr are pipes
//! owned by its supervisor; at dump they are declared external and at restore replaced by new pipes, so output
//! keeps flowing after a move. [`criu`] drives CRIU through its RPC (`criu swrk`). A dump leaves the job frozen,
//! not dead, until the caller commits (kills it) or aborts (resumes it). [`migratable`] tells, before any dump,
//! why a job can't move. [`transfer`] packs an image directory into an authenticated stream and unpacks it on the
//! other side; [`images`] keeps image directories private and removes them whatever happens.

pub mod criu;
pub mod images;
pub mod job;
pub mod migratable;
pub mod transfer;
