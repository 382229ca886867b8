//! `stagingprop.production_edits`: writes to staging-managed rows that production's own users
//! made, recorded by the guard's triggers (`guard = "record"`) in the writer's transaction.
//! The triggers insert; stagingprop reads (and, when a staging change meets an edit, settles).

use tokio_postgres::Client;

use super::{StateError, query_error, table};

/// The table's DDL (part of layout step 5 -> 6). `key` holds the production key's columns as
/// text (`NULL` for a table without a key, whose images identify the row); `before` and `after`
/// are the managed columns' images; `settled_at` is set once a staging change met the edit.
pub(super) fn create_table() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {edits} (
             id bigserial PRIMARY KEY,
             table_name text NOT NULL,
             operation text NOT NULL,
             key text[],
             columns text[] NOT NULL,
             before jsonb,
             after jsonb,
             role text NOT NULL,
             application text NOT NULL,
             xid bigint NOT NULL,
             edited_at timestamptz NOT NULL DEFAULT now(),
             settled_at timestamptz,
             outcome text);
         CREATE INDEX IF NOT EXISTS production_edits_open
             ON {edits} (table_name, key) WHERE settled_at IS NULL;",
        edits = table("production_edits")
    )
}

/// `"stagingprop"."production_edits"`, for the guard's trigger functions.
pub fn qualified_name() -> String {
    table("production_edits")
}

/// `EXISTS` an open edit of table `name` (a SQL literal) for the row whose key columns print
/// as the SQL expressions `key_text`. Sync's UPDATEs and DELETEs of a watched table add `AND
/// NOT` it, so that a row production's users edited is left for the edit policy.
pub fn open_exists(name: &str, key_text: &[String]) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {} AS e WHERE e.settled_at IS NULL AND e.table_name = {name} \
         AND e.key = ARRAY[{}])",
        table("production_edits"),
        key_text.join(", ")
    )
}

/// Notes the snapshot a batch writes a watched table under, for [`made_after_snapshot`].
pub const NOTE_SNAPSHOT: &str =
    "SELECT set_config('stagingprop.edits_snapshot', pg_current_snapshot()::text, true)";

/// `EXISTS` an open edit of table `name` (a SQL literal) for the row whose key prints as
/// `key_text`, committed after the snapshot [`NOTE_SNAPSHOT`] noted: one sync's statements,
/// taking their snapshots after that one, may have written over unseen.
pub fn made_after_snapshot(name: &str, key_text: &[String]) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {} AS e WHERE e.settled_at IS NULL AND e.table_name = {name} \
         AND e.key = ARRAY[{}] AND NOT pg_visible_in_snapshot(e.xid::text::xid8, \
         current_setting('stagingprop.edits_snapshot')::pg_snapshot))",
        table("production_edits"),
        key_text.join(", ")
    )
}

/// The open edits of one row, oldest first, locked until the caller's transaction ends (so the
/// guard's record and a `quarantine resolve` are never decided twice): `(id, before)`.
/// Parameters: `$1` the table's name; the key is `key_text` (SQL expressions).
pub fn open_for_key(key_text: &[String]) -> String {
    format!(
        "SELECT id, before::text FROM {} WHERE settled_at IS NULL AND table_name = $1 \
         AND key = ARRAY[{}] ORDER BY id FOR UPDATE",
        table("production_edits"),
        key_text.join(", ")
    )
}

/// Marks edits `ids` as met by a staging change, with what was done (in the caller's
/// transaction).
pub async fn settle(client: &Client, ids: &[i64], outcome: &str) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET settled_at = now(), outcome = $2 WHERE id = ANY($1)",
                table("production_edits")
            ),
            &[&ids, &outcome],
        )
        .await
        .map_err(query_error("settling production edits"))?;
    Ok(())
}

/// Recorded edits per table: (table, open, all), tables in name order.
pub async fn counts(client: &Client) -> Result<Vec<(String, i64, i64)>, StateError> {
    if !super::exists(client, "production_edits")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT table_name, count(*) FILTER (WHERE settled_at IS NULL), count(*) \
                 FROM {} GROUP BY table_name ORDER BY table_name",
                table("production_edits")
            ),
            &[],
        )
        .await
        .map_err(query_error("reading the production edits"))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// `EXISTS` an edit of table `name` (a SQL literal) that production keeps (see [`kept_keys`])
/// for the row whose key columns print as the SQL expressions `key_text`.
pub fn kept_exists(name: &str, key_text: &[String]) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {} AS e WHERE e.table_name = {name} AND e.key = ARRAY[{}] \
         AND (e.settled_at IS NULL OR e.outcome NOT LIKE 'staging-wins%'))",
        table("production_edits"),
        key_text.join(", ")
    )
}

/// The keys of `table`'s rows production's users edited and sync did not overwrite since (the
/// edit is open, parked, or production won): differences there are production's decision.
pub async fn kept_keys(client: &Client, table_name: &str) -> Result<Vec<Vec<String>>, StateError> {
    if !super::exists(client, "production_edits")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT key FROM {} WHERE table_name = $1 AND key IS NOT NULL \
                 AND (settled_at IS NULL OR outcome NOT LIKE 'staging-wins%')",
                table("production_edits")
            ),
            &[&table_name],
        )
        .await
        .map_err(query_error("reading the production edits"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
