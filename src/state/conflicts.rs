//! `stagingprop.conflicts`: the conflict log. One row per conflict sync met and resolved, of
//! every kind (PostgreSQL 18's names: `insert_exists`, `update_origin_differs`,
//! `update_missing`, `delete_origin_differs`, `delete_missing`, and stagingprop's own
//! `update_unmapped`, `delete_unmapped`) and every policy, with the images involved and what
//! was done, written in the transaction that resolved it.

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::model::{Lsn, Xid};

/// The table's DDL (part of layout step 5 -> 6).
pub(super) fn create_table() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {conflicts} (
             id bigserial PRIMARY KEY,
             slot text NOT NULL,
             lsn pg_lsn NOT NULL,
             xid bigint NOT NULL,
             table_name text NOT NULL,
             kind text NOT NULL,
             key jsonb NOT NULL,
             staging_row jsonb,
             production_row jsonb,
             last_written jsonb,
             edits bigint[],
             policy text NOT NULL,
             action text NOT NULL,
             quarantine_id bigint,
             logged_at timestamptz NOT NULL DEFAULT now());",
        conflicts = table("conflicts")
    )
}

/// `"stagingprop"."conflicts"`, for the statements that log as they apply.
pub fn qualified_name() -> String {
    table("conflicts")
}

/// One conflict and its resolution.
#[derive(Debug)]
pub struct Entry<'a> {
    pub slot: &'a str,
    pub lsn: Lsn,
    pub xid: Xid,
    pub table: &'a str,
    /// `ConflictKind::name`.
    pub kind: &'a str,
    pub key: &'a serde_json::Value,
    /// What staging sent (none for a delete).
    pub staging_row: Option<&'a serde_json::Value>,
    /// Production's row when the conflict was met (none when it had none), JSON text.
    pub production_row: Option<&'a str>,
    /// What stagingprop last wrote to the row, when a production edit recorded it (JSON text).
    pub last_written: Option<&'a str>,
    /// The production edits involved (`production_edits.id`).
    pub edits: &'a [i64],
    /// `on_conflict` or `on_production_edit`, as configured.
    pub policy: &'a str,
    /// What was done: `stopped`, `skipped`, `overwritten`, `already-done`, `staging-wins`,
    /// `production-wins`, `parked`.
    pub action: &'a str,
    pub quarantine_id: Option<i64>,
}

/// Writes `entry` in the caller's transaction.
pub async fn insert(client: &Client, entry: &Entry<'_>) -> Result<(), StateError> {
    let sql = format!(
        "INSERT INTO {} (slot, lsn, xid, table_name, kind, key, staging_row, production_row, \
         last_written, edits, policy, action, quarantine_id) \
         VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6::text::jsonb, $7::text::jsonb, \
         $8::text::jsonb, $9::text::jsonb, $10, $11, $12, $13)",
        table("conflicts")
    );
    let text = |v: Option<&serde_json::Value>| v.map(|v| v.to_string());
    client
        .execute(
            &sql,
            &[
                &entry.slot,
                &entry.lsn.to_string(),
                &i64::from(entry.xid),
                &entry.table,
                &entry.kind,
                &entry.key.to_string(),
                &text(entry.staging_row),
                &entry.production_row,
                &entry.last_written,
                &entry.edits,
                &entry.policy,
                &entry.action,
                &entry.quarantine_id,
            ],
        )
        .await
        .map_err(query_error("writing to the conflict log"))?;
    Ok(())
}

/// Conflicts logged per (table, kind, action), for `status`.
pub async fn counts(
    client: &Client,
    slot: &str,
) -> Result<Vec<(String, String, String, i64)>, StateError> {
    if !super::exists(client, "conflicts")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT table_name, kind, action, count(*) FROM {} WHERE slot = $1 \
                 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                table("conflicts")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the conflict log"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}
