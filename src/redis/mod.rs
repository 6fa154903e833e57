//! The Redis side (RESP2 and RESP3).

pub mod codec;
pub mod command;
