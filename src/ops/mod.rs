//! Operator commands: `init` prepares both databases, `status` reports on replication,
//! `verify` compares the managed tables, `tail` prints decoded changes.

pub mod demo;
pub mod discover;
pub mod init;
pub mod metrics;
pub mod quarantine;
pub mod status;
pub mod tail;
pub mod verify;

use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::ReplicationError;

/// What an operator command can fail with. Each says what happened and where.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot connect to {target}: {source}")]
    Connect { target: String, source: QueryError },
    #[error("on {target}: {source}")]
    Query { target: String, source: QueryError },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("{} check(s) failed, nothing was changed:\n  - {}", problems.len(), problems.join("\n  - "))]
    ChecksFailed { problems: Vec<String> },
    #[error("{0}")]
    Refused(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error(transparent)]
    Spool(#[from] crate::spool::store::SpoolError),
    #[error("on {target}: {source}")]
    State {
        target: String,
        source: crate::state::StateError,
    },
}

impl OpsError {
    /// The server's SQLSTATE, when a server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            OpsError::Connect { source, .. } | OpsError::Query { source, .. } => source.sqlstate(),
            OpsError::Replication(e) => e.sqlstate(),
            OpsError::State { source, .. } => source.sqlstate(),
            _ => None,
        }
    }
}

/// Connects an ordinary session, naming the database in the error.
pub(crate) async fn connect(endpoint: &Endpoint) -> Result<tokio_postgres::Client, OpsError> {
    endpoint.connect().await.map_err(|e| OpsError::Connect {
        target: endpoint.describe(),
        source: QueryError::new("connect", &e),
    })
}

/// Maps a query error to one naming the database and what was being done.
pub(crate) fn query_error(
    endpoint: &Endpoint,
    what: &str,
) -> impl FnOnce(tokio_postgres::Error) -> OpsError {
    let target = endpoint.describe();
    let what = what.to_owned();
    move |e| OpsError::Query {
        target,
        source: QueryError::new(what, &e),
    }
}

/// Maps an error on stagingprop's tables to one naming the database.
pub(crate) fn state_error(
    endpoint: &Endpoint,
) -> impl Fn(crate::state::StateError) -> OpsError + use<> {
    let target = endpoint.describe();
    move |source| OpsError::State {
        target: target.clone(),
        source,
    }
}
