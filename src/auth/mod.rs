//! Client authentication material and decisions: the users file, SCRAM (both sides) and the
//! per-source lockout. Shared by both protocols.

pub mod argon;
pub mod lockout;
pub mod scram;
pub mod users;

pub use lockout::Lockout;
pub use users::{User, Users};
