//! Staging's side of a session's validation, kept across sessions for a spool applier while
//! staging is down.

use super::{SyncError, database_error};
use crate::catalog::{self, ColumnReference, TableMeta};
use crate::config::{Config, TableName};
use crate::pg::connect::Endpoint;

/// Staging's side of validation: the managed tables as staging defines them, and the foreign
/// keys that say which columns follow a remapped key.
pub(super) struct StagingSchema {
    pub(super) tables: Vec<Option<TableMeta>>,
    pub(super) references: Vec<ColumnReference>,
}

impl StagingSchema {
    /// Reads them from `client` (staging, or a copy of it standing in while staging is down).
    pub(super) async fn load(
        config: &Config,
        endpoint: &Endpoint,
        client: &tokio_postgres::Client,
    ) -> Result<StagingSchema, SyncError> {
        let names: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
        let tables = catalog::load_tables(client, &names)
            .await
            .map_err(database_error(endpoint, "reading table definitions"))?;
        let configs: Vec<&crate::config::TableConfig> = config.tables.iter().collect();
        let tables =
            catalog::managed_parts(&configs, tables, "staging").map_err(SyncError::Schema)?;
        let references = catalog::column_references(client)
            .await
            .map_err(database_error(endpoint, "reading foreign keys"))?;
        Ok(StagingSchema { tables, references })
    }
}
