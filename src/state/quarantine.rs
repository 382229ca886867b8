//! `stagingprop.quarantine`: changes a `skip` policy did not apply, and changes an
//! `on_production_edit = "park"` policy set aside, each whole (key and row as JSON), with its
//! staging position and the reason, written in the transaction that skipped it.

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
    /// Set for a change parked because it met a production edit (`on_production_edit =
    /// "park"`): the other two images and the edits.
    pub parked: Option<Parked<'a>>,
}

/// What a parked change keeps beside staging's change, for the operator who resolves it.
#[derive(Debug)]
pub struct Parked<'a> {
    /// Production's row now (none when production deleted it), JSON text.
    pub production_row: Option<&'a str>,
    /// What stagingprop last wrote to the row (the first open edit's before-image), JSON text.
    pub last_written: Option<&'a str>,
    pub edits: &'a [i64],
}

/// Writes `entry` in the caller's transaction; its id.
pub async fn insert(client: &Client, entry: &Entry<'_>) -> Result<i64, StateError> {
    let sql = format!(
        "INSERT INTO {} (slot, lsn, xid, table_name, operation, reason, key, row_data, parked, \
         production_row, last_written, edits) \
         VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7::text::jsonb, $8::text::jsonb, $9, \
         $10::text::jsonb, $11::text::jsonb, $12) RETURNING id",
        table("quarantine")
    );
    let lsn = entry.lsn.to_string();
    let xid = i64::from(entry.xid);
    let key = entry.key.to_string();
    let row = entry.row.map(|r| r.to_string());
    let parked = entry.parked.is_some();
    let production_row = entry.parked.as_ref().and_then(|p| p.production_row);
    let last_written = entry.parked.as_ref().and_then(|p| p.last_written);
    let edits: Option<Vec<i64>> = entry.parked.as_ref().map(|p| p.edits.to_vec());
    let id = client
        .query_one(
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
                &parked,
                &production_row,
                &last_written,
                &edits,
            ],
        )
        .await
        .map_err(query_error("writing to the quarantine table"))?
        .get(0);
    Ok(id)
}

/// The layout step's DDL: what a parked change keeps (part of layout step 5 -> 6).
pub(super) fn add_parked_columns() -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS parked boolean NOT NULL DEFAULT false,
             ADD COLUMN IF NOT EXISTS production_row jsonb,
             ADD COLUMN IF NOT EXISTS last_written jsonb,
             ADD COLUMN IF NOT EXISTS edits bigint[];",
        table("quarantine")
    )
}

/// How many changes of `slot` are quarantined (0 when the table does not exist).
pub async fn count(client: &Client, slot: &str) -> Result<i64, StateError> {
    let exists = super::exists(client, "quarantine")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?;
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

/// A quarantined change as stored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stored {
    pub id: i64,
    pub lsn: String,
    pub xid: i64,
    pub table: String,
    pub operation: String,
    pub reason: String,
    pub key: serde_json::Value,
    pub row: Option<serde_json::Value>,
    pub quarantined_at: String,
    /// Parked because it met a production edit; then production's row, what stagingprop last
    /// wrote, and the edits.
    pub parked: bool,
    pub production_row: Option<serde_json::Value>,
    pub last_written: Option<serde_json::Value>,
    pub edits: Vec<i64>,
}

/// Which quarantined changes of a slot a command works on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Id(i64),
    Table(String),
    All,
}

impl Selection {
    /// `AND ...` restricting a query whose $1 is the slot to this selection ($2).
    fn condition(&self) -> &'static str {
        match self {
            Selection::Id(_) => " AND id = $2",
            Selection::Table(_) => " AND table_name = $2",
            Selection::All => "",
        }
    }
}

/// The selected changes of `slot`, in staging's order. Empty when there is no quarantine.
pub async fn list(
    client: &Client,
    slot: &str,
    selection: &Selection,
) -> Result<Vec<Stored>, StateError> {
    let exists = super::exists(client, "quarantine")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?;
    if !exists {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM {} WHERE slot = $1{} ORDER BY lsn, id",
        table("quarantine"),
        selection.condition()
    );
    let rows = match selection {
        Selection::Id(id) => client.query(&sql, &[&slot, id]).await,
        Selection::Table(name) => client.query(&sql, &[&slot, name]).await,
        Selection::All => client.query(&sql, &[&slot]).await,
    }
    .map_err(query_error("reading the quarantine table"))?;
    Ok(rows.iter().map(stored).collect())
}

/// What [`stored`] reads. The images production wrote hold numbers as JSON numbers: they are
/// read with every value as text, so that none loses a digit on its way to the operator.
const COLUMNS: &str = "id, lsn::text, xid, table_name, operation, reason, key::text, \
    row_data::text, quarantined_at::text, parked, \
    (SELECT jsonb_object_agg(key, value #>> '{}') FROM jsonb_each(production_row))::text, \
    (SELECT jsonb_object_agg(key, value #>> '{}') FROM jsonb_each(last_written))::text, edits";

fn stored(r: &tokio_postgres::Row) -> Stored {
    let json = |text: Option<String>| {
        text.map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)))
    };
    Stored {
        id: r.get(0),
        lsn: r.get(1),
        xid: r.get(2),
        table: r.get(3),
        operation: r.get(4),
        reason: r.get(5),
        key: json(r.get(6)).unwrap_or(serde_json::Value::Null),
        row: json(r.get(7)),
        quarantined_at: r.get(8),
        parked: r.get(9),
        production_row: json(r.get(10)),
        last_written: json(r.get(11)),
        edits: r.get::<_, Option<Vec<i64>>>(12).unwrap_or_default(),
    }
}

/// The parked changes of one row (`table`, `key` as stored), in staging's order, locked until
/// the caller's transaction ends.
pub async fn parked_of_row(
    client: &Client,
    slot: &str,
    table_name: &str,
    key: &serde_json::Value,
) -> Result<Vec<Stored>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM {} WHERE slot = $1 AND parked AND table_name = $2 \
                 AND key = $3::text::jsonb ORDER BY lsn, id FOR UPDATE",
                table("quarantine")
            ),
            &[&slot, &table_name, &key.to_string()],
        )
        .await
        .map_err(query_error("reading the quarantine table"))?;
    Ok(rows.iter().map(stored).collect())
}

/// Removes change `id` (in the caller's transaction: the one that applied it).
pub async fn remove(client: &Client, id: i64) -> Result<(), StateError> {
    client
        .execute(
            &format!("DELETE FROM {} WHERE id = $1", table("quarantine")),
            &[&id],
        )
        .await
        .map_err(query_error("removing a change from the quarantine"))?;
    Ok(())
}

/// Records why change `id` still cannot be applied.
pub async fn set_reason(client: &Client, id: i64, reason: &str) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET reason = $2 WHERE id = $1",
                table("quarantine")
            ),
            &[&id, &reason],
        )
        .await
        .map_err(query_error("updating the quarantine table"))?;
    Ok(())
}

/// Deletes the selected changes of `slot`; how many.
pub async fn discard(
    client: &Client,
    slot: &str,
    selection: &Selection,
) -> Result<u64, StateError> {
    let sql = format!(
        "DELETE FROM {} WHERE slot = $1{}",
        table("quarantine"),
        selection.condition()
    );
    match selection {
        Selection::Id(id) => client.execute(&sql, &[&slot, id]).await,
        Selection::Table(name) => client.execute(&sql, &[&slot, name]).await,
        Selection::All => client.execute(&sql, &[&slot]).await,
    }
    .map_err(query_error("discarding quarantined changes"))
}
