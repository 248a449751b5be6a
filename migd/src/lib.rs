//! migd, the migration daemon of every node: it runs the jobs started with `mosrun`, keeps the home records
//! of the jobs homed on this node, and moves jobs between nodes by checkpoint/restore.
//!
//! [`channel`]: the authenticated connection between two migds. [`records`]: the home records. [`limits`]:
//! what one local user can hold of migd through its control socket. [`keeper`]: what lets jobs outlive
//! migd. [`observe`]: what each job running here does, and its class.

pub mod channel;
pub mod daemon;
pub mod keeper;
pub mod limits;
pub mod observe;
pub mod protocol;
pub mod relay;
pub mod records;
