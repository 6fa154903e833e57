//! Portcullis: a TLS-terminating, authenticating sidecar proxy for PostgreSQL (and Redis).
//!
//! # Pipeline
//! `accept → admission (allow-list, limits) → TLS (rustls) → protocol startup → lockout →
//! client authentication → login policy → upstream connect + runtime-credential login →
//! superuser check → forward bytes → close + audit`.
//!
//! Shared code (`config`, `net`, `auth`, `metrics`, `audit`, `admin`) never imports a
//! protocol module; `app` wires the protocols to it.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod auth;
pub mod certs;
pub mod config;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod postgres;
pub mod posture;
pub mod redis;
