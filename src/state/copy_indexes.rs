//! `stagingprop.copy_indexes`: the secondary indexes a copy dropped from empty target tables to
//! load them faster, each recorded (name and `CREATE INDEX` statement) in the transaction that
//! drops it and forgotten in the one that builds it again, so an index a failed copy left
//! dropped is built by the next copy into that database.

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::config::TableName;

/// A dropped index and the statement that makes it again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetAside {
    pub table: TableName,
    /// The index's name, unquoted (it lives in its table's schema).
    pub name: String,
    pub definition: String,
}

/// Whether the table exists (nothing was ever set aside before it did).
async fn exists(client: &Client) -> Result<bool, tokio_postgres::Error> {
    super::exists(client, "copy_indexes").await
}

/// Every index set aside and not built again yet.
pub async fn read(client: &Client) -> Result<Vec<SetAside>, StateError> {
    let error = || query_error("reading the indexes a copy set aside");
    if !exists(client).await.map_err(error())? {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT table_name, index_name, definition FROM {} ORDER BY 1, 2",
                table("copy_indexes")
            ),
            &[],
        )
        .await
        .map_err(error())?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            Some(SetAside {
                table: name.parse().ok()?,
                name: r.get(1),
                definition: r.get(2),
            })
        })
        .collect())
}

/// Records an index about to be dropped (in the dropping transaction).
pub async fn record(client: &Client, index: &SetAside) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (table_name, index_name, definition) VALUES ($1, $2, $3) \
                 ON CONFLICT (table_name, index_name) DO NOTHING",
                table("copy_indexes")
            ),
            &[&index.table.to_string(), &index.name, &index.definition],
        )
        .await
        .map(drop)
}

/// Forgets an index built again (in the building transaction).
pub async fn forget(client: &Client, index: &SetAside) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "DELETE FROM {} WHERE table_name = $1 AND index_name = $2",
                table("copy_indexes")
            ),
            &[&index.table.to_string(), &index.name],
        )
        .await
        .map(drop)
}
