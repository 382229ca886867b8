//! stagingprop carries committed changes to a set of staging-managed tables from a staging
//! PostgreSQL database to production, read from staging's write-ahead log through a logical
//! replication slot (pgoutput), in commit order and exactly once, remapping keys where
//! production's key space differs.
//!
//! Modules by responsibility, lowest first (each imports only from those above it, and from
//! `config`, `quote`, `model` and `pg`):
//! - [`config`]: the TOML configuration, validated up front; secrets from env or file.
//! - `quote`: the one place identifiers and literals are quoted.
//! - [`model`]: the vocabulary every stage speaks (LSNs, relations, values).
//! - [`pgoutput`]: sans-IO decoder from pgoutput payloads to logical replication messages.
//! - [`pg`]: connections to PostgreSQL, TLS, and the replication connection.
//! - `catalog`: what a managed table is, read from a database's catalogs, and the one
//!   comparison of two sides' tables.
//! - `change`: row changes and their consolidation per key (sans-IO).
//! - [`state`]: stagingprop's own tables on production (progress, key map, quarantine, copy
//!   decisions, layout version): their DDL and every statement on them.
//! - [`spool`]: the durable local spool of staging's transactions (segments, records, store).
//! - [`stream`]: fan-out through NATS JetStream: the message format, publishing the spool,
//!   reading a target's way through the stream.
//! - `remap`: key remapping rules, the key map's cache and the queries remapping runs.
//! - `apply`: production's session: set-based statements, conflicts, managed files.
//! - [`sync`]: the sync command: retry loop, sessions, the pipeline, streamed transactions,
//!   the spool's receiver and replay.
//! - [`ddl`]: schema changes captured on staging and planned for production (sans-IO, and
//!   the event trigger that captures them).
//! - `repair`: online repair's watermark messages and the window sync keeps between them
//!   (sans-IO).
//! - [`guard`]: the production guard's triggers (refuse or record writes to managed rows by
//!   anyone but stagingprop) and their installation.
//! - [`copy`]: consistent parallel snapshot copy with the hand-off to sync.
//! - [`ops`]: operator commands (`init`, `status`, `verify`, `tail`, `demo`, metrics).
//! - `bars`: progress bars on a terminal that log lines do not tear.
//! - [`cluster`]: throwaway local clusters for tests and the demo.

// What the binary, the tests, the benchmarks and the fuzz targets use is public; the rest is the
// library's own (the module list above says what each holds).
pub mod cluster;
pub mod config;
pub mod copy;
pub mod ddl;
pub mod guard;
pub mod model;
pub mod ops;
pub mod pg;
pub mod pgoutput;
pub mod spool;
pub mod state;
pub mod stream;
pub mod sync;

mod apply;
mod bars;
mod catalog;
mod change;
mod quote;
mod remap;
mod repair;

pub use apply::managed_files::FileError;
pub use apply::{ApplyError, ApplyStats};
pub use bars::LogWriter;
pub use change::{RowOp, Source, TableChanges};
pub use model::ConflictKind;
pub use remap::RemapError;
