//! stagingprop carries committed changes to a set of staging-managed tables from a staging
//! PostgreSQL database to production, read from staging's write-ahead log through a logical
//! replication slot (pgoutput), in commit order and exactly once, remapping keys where
//! production's key space differs.
//!
//! Modules by responsibility:
//! - [`model`]: the vocabulary every stage speaks (LSNs, relations, values).
//! - [`config`]: the TOML config file (connections, managed tables, key rules), validated up front;
//!   passwords come from the environment or a secrets file, never from the file.

pub mod config;
pub mod model;
