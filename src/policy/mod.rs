//! Pure policy decisions (no I/O, no async): what a user may run. Forwarding needs the
//! `Permit` a decision returns.

pub mod glob;
pub mod redis_acl;

pub use redis_acl::{AclRules, Decision, Denial};
