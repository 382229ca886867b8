//! Staging's side of a session's validation, kept across sessions for a spool applier while
//! staging is down.

use super::{SyncError, database_error};
use crate::catalog::{self, ColumnReference, TableMeta};
use crate::config::{Config, TableName};
use crate::pg::connect::Endpoint;

/// Staging's side of validation: the managed tables as staging defines them, and the foreign
/// keys that say which columns follow a remapped key.
pub(super) struct StagingSchema {
    /// The tables it was read for, and each one's definition (`None`: staging has no such table).
    pub(super) names: Vec<TableName>,
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
        Ok(StagingSchema {
            names: names.into_iter().cloned().collect(),
            tables,
            references,
        })
    }

    /// The same, for `config`'s tables (which a pattern may have grown since it was read): a
    /// table it was not read for is one it does not know.
    pub(super) fn for_config(&self, config: &Config) -> StagingSchema {
        let tables = config
            .tables
            .iter()
            .map(|t| {
                let i = self.names.iter().position(|n| n == &t.name)?;
                self.tables[i].clone()
            })
            .collect();
        StagingSchema {
            names: config.tables.iter().map(|t| t.name.clone()).collect(),
            tables,
            references: self.references.clone(),
        }
    }
}
