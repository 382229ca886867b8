//! `stagingprop.quarantine`: changes a `skip` policy did not apply, each whole (key and row as
//! JSON), with its staging position and the reason, written in the transaction that skipped it.

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::model::{Lsn, Xid};

/// One skipped change.
#[derive(Debug)]
pub struct Entry<'a> {
    pub slot: &'a str,
    pub lsn: Lsn,
    pub xid: Xid,
    pub table: &'a str,
    pub operation: &'a str,
    pub reason: &'a str,
    pub key: &'a serde_json::Value,
    pub row: Option<&'a serde_json::Value>,
}

/// Writes `entry` in the caller's transaction.
pub async fn insert(client: &Client, entry: &Entry<'_>) -> Result<(), StateError> {
    let sql = format!(
        "INSERT INTO {} (slot, lsn, xid, table_name, operation, reason, key, row_data) \
         VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb)",
        table("quarantine")
    );
    let lsn = entry.lsn.to_string();
    let xid = i64::from(entry.xid);
    let key = entry.key.to_string();
    let row = entry.row.map(|r| r.to_string());
    client
        .execute(
            &sql,
            &[
                &entry.slot,
                &lsn,
                &xid,
                &entry.table,
                &entry.operation,
                &entry.reason,
                &key,
                &row,
            ],
        )
        .await
        .map_err(query_error("writing to the quarantine table"))?;
    Ok(())
}

/// How many changes of `slot` are quarantined (0 when the table does not exist).
pub async fn count(client: &Client, slot: &str) -> Result<i64, StateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&table("quarantine")],
        )
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            &format!(
                "SELECT count(*) FROM {} WHERE slot = $1",
                table("quarantine")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the quarantine table"))?
        .get(0))
}
