//! What applying can fail with, and the conflicts a table's policy decides.

use super::managed_files::FileError;
use crate::config::TableName;
use crate::model::{Lsn, Xid};
use crate::pg::QueryError;
use crate::remap::RemapError;
use crate::remap::store::StoreError;
use crate::state::StateError;

pub use crate::model::ConflictKind;

/// Why a schema change from staging was not applied to production.
#[derive(Debug, thiserror::Error)]
#[error(
    "staging's schema change of {table} (staging transaction {xid} at {lsn}) cannot be applied \
     to production, nothing of that transaction was applied: {obstacle}\n  statement on staging: \
     {statement}\n  plan for production:\n    {plan}\nFix production (or the config), then start \
     sync again: it resumes at that transaction"
)]
pub struct SchemaChangeRefused {
    pub table: TableName,
    pub statement: String,
    pub plan: String,
    pub obstacle: String,
    pub lsn: Lsn,
    pub xid: Xid,
}

impl SchemaChangeRefused {
    /// `table`'s part of `change` (staging's `statement`, at `source`) refused with `obstacle`,
    /// under `plan` (empty when none could be made).
    pub fn error(
        table: TableName,
        statement: &str,
        plan: String,
        obstacle: String,
        source: crate::change::Source,
    ) -> ApplyError {
        ApplyError::SchemaChange(Box::new(SchemaChangeRefused {
            table,
            statement: statement.to_owned(),
            plan,
            obstacle,
            lsn: source.lsn,
            xid: source.xid,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A schema change from staging that production cannot take (or that is not carried):
    /// nothing of its transaction was applied.
    #[error(transparent)]
    SchemaChange(Box<SchemaChangeRefused>),
    /// An index build (or drop) a schema change left to run after its transaction failed: the
    /// transaction is applied, the build is still to do.
    #[error(
        "production could not run `{statement}` for staging's schema change: {obstacle}. The \
         change's transaction is applied; the index is built (or dropped) before anything more \
         is applied: fix production, then start sync again"
    )]
    IndexBuild {
        index: String,
        statement: String,
        obstacle: String,
    },
    /// Columns of a Relation message whose staging types the target cannot store.
    #[error("staging and production differ, nothing was applied:\n  - {}", .0.join("\n  - "))]
    Types(Vec<String>),
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
    /// A production edit of rows the batch wrote committed while sync wrote them (after the
    /// statement's snapshot was taken): the batch is rolled back and applied again, when the
    /// edit is seen and its policy decides.
    #[error(
        "{rows} row(s) of {table} were edited on production while sync wrote them; the batch is \
         rolled back and applied again"
    )]
    EditRace { table: TableName, rows: usize },
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
            ApplyError::EditRace { .. } => true,
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
