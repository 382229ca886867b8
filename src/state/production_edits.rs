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
