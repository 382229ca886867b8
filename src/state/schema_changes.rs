//! `stagingprop.schema_changes`: every schema change from staging that sync applied to
//! production (or left alone), written in the transaction that applied it.

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::model::{Lsn, Xid};

/// One applied change of one table.
#[derive(Debug)]
pub struct Entry<'a> {
    pub slot: &'a str,
    pub lsn: Lsn,
    pub xid: Xid,
    /// The capture's number for the change.
    pub change: Option<i64>,
    pub table: &'a str,
    pub statement: &'a str,
    /// The statements run on production, one per line (or what was left alone, and why).
    pub plan: &'a str,
}

/// Writes `entry` in the caller's transaction.
pub async fn record(client: &Client, entry: &Entry<'_>) -> Result<(), StateError> {
    let sql = format!(
        "INSERT INTO {} (slot, lsn, xid, change_id, table_name, statement, plan) \
         VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7)",
        table("schema_changes")
    );
    client
        .execute(
            &sql,
            &[
                &entry.slot,
                &entry.lsn.to_string(),
                &i64::from(entry.xid),
                &entry.change,
                &entry.table,
                &entry.statement,
                &entry.plan,
            ],
        )
        .await
        .map_err(query_error("recording a schema change"))?;
    Ok(())
}

/// The last change applied for `slot`: (staging position, table, statement, when), if any.
pub async fn last(
    client: &Client,
    slot: &str,
) -> Result<Option<(String, String, String, String)>, StateError> {
    if !super::exists(client, "schema_changes")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT lsn::text, table_name, statement, applied_at::text FROM {} \
                 WHERE slot = $1 ORDER BY id DESC LIMIT 1",
                table("schema_changes")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the schema changes"))?;
    Ok(row.map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

/// Which of the capture's change numbers `ids` sync applied for `slot`.
pub async fn applied(client: &Client, slot: &str, ids: &[i64]) -> Result<Vec<i64>, StateError> {
    if ids.is_empty()
        || !super::exists(client, "schema_changes")
            .await
            .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT change_id FROM {} WHERE slot = $1 AND change_id = ANY($2)",
                table("schema_changes")
            ),
            &[&slot, &ids],
        )
        .await
        .map_err(query_error("reading the schema changes"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// An index build or drop to run once the transaction writing it committed.
#[derive(Debug)]
pub struct IndexBuild {
    pub id: i64,
    /// The index, schema-qualified and quoted.
    pub index: String,
    pub statement: String,
}

/// Writes a build to run after the caller's transaction commits; returns its id.
pub async fn record_build(
    client: &Client,
    slot: &str,
    change: Option<i64>,
    index: &str,
    statement: &str,
) -> Result<i64, StateError> {
    let row = client
        .query_one(
            &format!(
                "INSERT INTO {} (slot, change_id, index_name, statement) VALUES ($1, $2, $3, $4) \
                 RETURNING id",
                table("index_builds")
            ),
            &[&slot, &change, &index, &statement],
        )
        .await
        .map_err(query_error("recording an index build"))?;
    Ok(row.get(0))
}

/// Which of `ids` are recorded and not done (in the caller's transaction).
pub async fn still_pending(client: &Client, ids: &[i64]) -> Result<Vec<i64>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT id FROM {} WHERE id = ANY($1) AND done_at IS NULL ORDER BY id",
                table("index_builds")
            ),
            &[&ids],
        )
        .await
        .map_err(query_error("reading the index builds"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The builds of `slot` not done yet, in the order they were recorded.
pub async fn pending_builds(client: &Client, slot: &str) -> Result<Vec<IndexBuild>, StateError> {
    if !super::exists(client, "index_builds")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT id, index_name, statement FROM {} \
                 WHERE slot = $1 AND done_at IS NULL ORDER BY id",
                table("index_builds")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the index builds"))?;
    Ok(rows
        .iter()
        .map(|r| IndexBuild {
            id: r.get(0),
            index: r.get(1),
            statement: r.get(2),
        })
        .collect())
}

/// Marks build `id` done.
pub async fn build_done(client: &Client, id: i64) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET done_at = now() WHERE id = $1",
                table("index_builds")
            ),
            &[&id],
        )
        .await
        .map_err(query_error("recording a finished index build"))?;
    Ok(())
}
