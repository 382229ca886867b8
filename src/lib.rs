//! stagingprop carries committed changes to a set of staging-managed tables from a staging
//! PostgreSQL database to production, read from staging's write-ahead log through a logical
//! replication slot (pgoutput), in commit order and exactly once, remapping keys where
//! production's key space differs.
//!
//! Modules by responsibility:
//! - [`config`]: the TOML configuration, validated up front; secrets from env or file.
//! - [`model`]: the vocabulary every stage speaks (LSNs, relations, values).
//! - [`pgoutput`]: sans-IO decoder from pgoutput payloads to logical replication messages.
//! - [`pg`]: connections to PostgreSQL, TLS, and the replication connection.
//! - [`sync`]: the sync command's pipeline: stream, skip what is applied, batch, apply, confirm.
//! - [`sql`]: the one place identifiers and literals are quoted.
//! - [`ops`]: operator commands (`init`, `tail`).
//! - [`catalog`]: what a managed table is, read from a database's catalogs, and the one
//!   comparison of two sides' tables.
//! - [`change`]: row changes and their consolidation per key (sans-IO).
//! - [`apply`]: set-based, exactly-once apply to production, conflicts, progress.
//! - [`copy`]: consistent parallel snapshot copy with the hand-off to sync.
//! - [`remap`]: key remapping rules, the key map's cache and the queries remapping runs.
//! - [`state`]: stagingprop's own tables on production (progress, key map, quarantine, copy
//!   decisions, layout version): their DDL and every statement on them.
//! - [`cluster`]: throwaway local clusters for tests and the demo.
//! - [`progress`]: progress bars on a terminal that log lines do not tear.

pub mod apply;
pub mod catalog;
pub mod change;
pub mod cluster;
pub mod config;
pub mod copy;
pub mod model;
pub mod ops;
pub mod pg;
pub mod pgoutput;
pub mod progress;
pub mod remap;
pub mod spool;
pub mod sql;
pub mod state;
pub mod sync;
