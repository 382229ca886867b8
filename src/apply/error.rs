//! What applying can fail with, and the conflicts a table's policy decides.

use std::fmt;

use super::managed_files::FileError;
use crate::config::TableName;
use crate::model::{Lsn, Xid};
use crate::pg::QueryError;
use crate::remap::RemapError;
use crate::remap::store::StoreError;
use crate::state::StateError;

/// What production must not be left with: a change that cannot be applied as the policy says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// An INSERT whose key already exists on production.
    InsertExists,
    /// An UPDATE of a row production lacks.
    UpdateMissing,
    /// A DELETE of a row production lacks.
    DeleteMissing,
    /// An UPDATE of a row that has no key mapping (an allocating rule never saw it).
    UpdateUnmapped,
    /// A DELETE of a row that has no key mapping.
    DeleteUnmapped,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConflictKind::InsertExists => "insert of a key that already exists on production",
            ConflictKind::UpdateMissing => "update of a row production lacks",
            ConflictKind::DeleteMissing => "delete of a row production lacks",
            ConflictKind::UpdateUnmapped => {
                "update of a row that has no key mapping, so production has no row for it"
            }
            ConflictKind::DeleteUnmapped => {
                "delete of a row that has no key mapping, so production has no row for it"
            }
        })
    }
}

impl ConflictKind {
    pub(super) fn operation(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert",
            ConflictKind::UpdateMissing | ConflictKind::UpdateUnmapped => "update",
            ConflictKind::DeleteMissing | ConflictKind::DeleteUnmapped => "delete",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "conflict in {table} (on_conflict = error): {kind}, key {key}, staging transaction {xid} at {lsn}. \
         Nothing of this batch was applied and staging was not told to release it. Fix the row on \
         production, or set on_conflict = \"skip\" (quarantine) or \"overwrite\" for the table, then start sync again"
    )]
    Conflict {
        table: TableName,
        kind: ConflictKind,
        key: String,
        lsn: Lsn,
        xid: Xid,
    },
    #[error("{0}")]
    Schema(String),
    #[error("on production: {0}")]
    Query(QueryError),
    #[error("on production: {0}")]
    State(#[from] StateError),
    #[error("key remapping: {0}")]
    Remap(#[from] RemapError),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error(
        "staging sent a value that is not UTF-8 text in {table}; check staging's server_encoding"
    )]
    NotUtf8 { table: TableName },
    #[error(
        "the progress row of slot {slot} moved from {expected} while this batch was applied: \
         another stagingprop (a second sync, or a replay) is applying to the same database. \
         This batch was rolled back; stop the other one, then start sync again"
    )]
    ProgressMoved { slot: String, expected: Lsn },
}

impl ApplyError {
    /// Worth retrying on a new connection (production restarting, network lost).
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Query(q) => q.transient,
            ApplyError::State(e) => e.is_transient(),
            ApplyError::Remap(RemapError::Store(e)) => match e.as_ref() {
                StoreError::Query { source, .. } => QueryError::new("", source).transient,
                _ => false,
            },
            _ => false,
        }
    }

    /// A statement failed for a reason the set-based fast path can cause on its own (a unique or
    /// foreign-key check seeing rows in a different order than staging applied them): applying
    /// the same changes one by one decides whether it is real.
    pub fn may_be_ordering(&self) -> bool {
        matches!(self, ApplyError::Query(q)
            if q.server.as_ref().is_some_and(|s| s.code.starts_with("23")))
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Query(q) => q.sqlstate(),
            ApplyError::State(e) => e.sqlstate(),
            _ => None,
        }
    }
}

pub(super) fn query_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + '_ {
    move |e| ApplyError::Query(QueryError::new(what, &e))
}
