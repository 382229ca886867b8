//! stagingprop's own tables on production, in schema `stagingprop`: the progress row per slot
//! ([`progress`]), the key map ([`key_map`]), the quarantine of skipped changes
//! ([`quarantine`]), copy's two-phase commit decisions ([`copy_commits`]), the pieces a copy
//! committed ([`copy_tables`]), the indexes a copy set aside ([`copy_indexes`]), the schema
//! changes sync applied ([`schema_changes`]), production's own edits of managed rows
//! ([`production_edits`]), the conflict log ([`conflicts`]), online repairs ([`repairs`]) and the layout
//! version row ([`layout`]). This is the only module that names them: their DDL and every
//! statement that reads or writes them are built here, and everything else calls in.

pub mod conflicts;
pub(crate) mod copy_commits;
pub(crate) mod copy_indexes;
pub mod copy_tables;
pub(crate) mod key_map;
pub mod layout;
pub mod production_edits;
pub mod progress;
pub mod quarantine;
pub mod repairs;
pub mod schema_changes;

use tokio_postgres::Client;

use crate::pg::QueryError;
use crate::quote::qualified;

pub use layout::{LAYOUT_VERSION, ensure};
pub use progress::Progress;

/// The schema on production holding stagingprop's own tables.
pub const SCHEMA: &str = "stagingprop";

/// `"stagingprop"."name"`.
fn table(name: &str) -> String {
    qualified(SCHEMA, name)
}

/// Whether stagingprop's table `name` exists: readers on a database where `init` never ran (or
/// an older layout) find nothing rather than fail.
async fn exists(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table(name)])
        .await?
        .get(0))
}

/// Why reading or writing stagingprop's tables failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Query(QueryError),
    #[error(
        "production's {SCHEMA} tables have layout version {found}, newer than this stagingprop \
         knows (up to {known}): a newer stagingprop release upgraded them. Run that release (or a \
         newer one); nothing was changed"
    )]
    NewerLayout { found: i32, known: i32 },
    #[error("production's {SCHEMA} tables hold what no stagingprop writes: {0}")]
    Corrupt(String),
}

impl StateError {
    /// Worth retrying on a new connection.
    pub fn is_transient(&self) -> bool {
        matches!(self, StateError::Query(q) if q.transient)
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StateError::Query(q) => q.sqlstate(),
            StateError::NewerLayout { .. } | StateError::Corrupt(_) => None,
        }
    }
}

fn query_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> StateError + '_ {
    move |e| StateError::Query(QueryError::new(what, &e))
}
