//! Networking shared by both protocols: accepting with admission, TLS, upstream dialling.

pub mod listener;
pub mod stream;
pub mod tls;
pub mod upstream;
