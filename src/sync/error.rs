//! What sync can fail with, and which failures are worth a retry.

use crate::apply::ApplyError;
use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::ReplicationError;
use crate::spool::store::SpoolError;
use crate::stream::StreamError;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot use {target}: {source}")]
    Database { target: String, source: QueryError },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("staging and production differ, nothing was applied:\n  - {}", .0.join("\n  - "))]
    Schema(Vec<String>),
    #[error("key remapping cannot work with these tables, nothing was applied:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
    #[error("{0}")]
    Slot(String),
    #[error(
        "staging sent changes of {0}, which is not in [[tables]]; run `stagingprop init` so the publication lists exactly the managed tables"
    )]
    UnknownTable(String),
    /// The stream's messages came in an order pgoutput never sends (or the stream is from
    /// another source than it claims): nothing from the broken transaction on is applied.
    #[error(
        "the replication stream broke pgoutput's rules: {0}; nothing from there on was applied \
         or confirmed, so a restart receives it again (if this repeats, look at what sits \
         between stagingprop and the server: a proxy or pooler that alters the stream)"
    )]
    Protocol(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("{0}")]
    Replay(String),
    #[error("{0}")]
    BadUntil(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// `[ddl] mode = "stop"`: a schema change waits for the operator.
    #[error(
        "staging changed the schema of a managed table at {lsn}, and [ddl] mode = \"stop\": sync \
         stopped before that transaction (nothing of it was applied).\n  statement on staging: \
         {statement}\n  plan for production:\n    {plan}\nApply it and go on with `stagingprop sync \
         --apply-schema-change`, or make the change on production yourself first"
    )]
    SchemaChangeWaiting {
        statement: String,
        plan: String,
        lsn: crate::model::Lsn,
    },
    /// Staging created tables a `[[table_patterns]]` entry manages, which this session does
    /// not: the next one does (nothing of the transaction was applied).
    #[error("staging created {} (managed by [[table_patterns]])", .0.iter().map(|t| t.table_name().to_string()).collect::<Vec<_>>().join(", "))]
    TableCreated(Vec<crate::ddl::TableShape>),
    /// A session's start found the tables differ, and staging captured a schema change while
    /// the start read its catalogs (a table created or renamed in between): the next session
    /// reads them again.
    #[error("staging's schema changed while a session started")]
    SchemaMoved,
    /// Something only staging can answer, while it is unreachable: retried.
    #[error("{0}")]
    StagingNeeded(String),
}

impl SyncError {
    /// Worth retrying after a pause: a database went away or is restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Database { source, .. } => source.transient,
            SyncError::Apply(e) => e.is_transient(),
            SyncError::Stream(e) => e.is_transient(),
            SyncError::Replication(e) => e.is_transient(),
            SyncError::StagingNeeded(_) => true,
            _ => false,
        }
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SyncError::Database { source, .. } => source.sqlstate(),
            SyncError::Apply(e) => e.sqlstate(),
            SyncError::Replication(e) => e.sqlstate(),
            _ => None,
        }
    }
}

pub(super) fn database_error(
    endpoint: &Endpoint,
    what: &str,
) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let target = endpoint.describe();
    let what = what.to_owned();
    move |e| SyncError::Database {
        target,
        source: QueryError::new(what, &e),
    }
}
