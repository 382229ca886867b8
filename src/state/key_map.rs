//! `stagingprop.key_map`: one row per remapped row, staging key to production key, written in
//! the transaction that applies the row. Only the staging key is indexed (every lookup goes
//! that way); two mappings to one production key would make the second row's insert conflict
//! on production's own primary key.
//!
//! Statements that run on sync's hot path are returned as SQL text for the caller to prepare
//! once per session; the rest run here.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::config::TableName;
use crate::quote::{qualified, quote_ident, quote_literal};

/// The key map's qualified name.
fn key_map() -> String {
    table("key_map")
}

/// Its DDL (part of the layout).
pub(super) fn create_table() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
             table_name text NOT NULL,
             source_key bigint NOT NULL,
             target_key bigint NOT NULL,
             mapped_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (table_name, source_key))",
        key_map()
    )
}

/// `stagingprop.production_keys`: keys of a `remap-on-conflict` table that production's own
/// rows held when staging's row of the same key arrived (so staging's was moved away). The
/// mapping goes with staging's row; this record keeps proving the production row its own.
pub(crate) fn production_keys() -> String {
    table("production_keys")
}

/// Its DDL (part of the layout).
pub(super) fn create_production_keys() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
             table_name text NOT NULL,
             key bigint NOT NULL,
             noted_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (table_name, key))",
        production_keys()
    )
}

/// Notes production's own keys: parameters are text arrays of table names and keys.
pub fn insert_production_keys() -> String {
    format!(
        "INSERT INTO {} (table_name, key) SELECT u.t, u.k::bigint \
         FROM unnest($1::text[], $2::text[]) AS u(t, k) ON CONFLICT DO NOTHING",
        production_keys()
    )
}

/// Forgets production's own keys that staging's rows hold now (production's row went).
pub fn delete_production_keys() -> String {
    format!(
        "DELETE FROM {} p USING unnest($1::text[], $2::text[]) AS u(t, k) \
         WHERE p.table_name = u.t AND p.key = u.k::bigint",
        production_keys()
    )
}

/// True when production key `key` (an SQL expression) of `parent` is noted as production's own.
pub fn is_production_key(parent: &TableName, key: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {} x WHERE x.table_name = {} AND x.key = {key})",
        production_keys(),
        quote_literal(&parent.to_string())
    )
}

/// Records mappings: parameters are text arrays of table names, staging keys, production keys.
/// A mapping left from a row staging no longer has is replaced.
pub fn insert_mappings() -> String {
    format!(
        "INSERT INTO {} (table_name, source_key, target_key) \
         SELECT u.t, u.s::bigint, u.g::bigint FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, s, g) \
         ON CONFLICT (table_name, source_key) DO UPDATE SET target_key = EXCLUDED.target_key, mapped_at = now()",
        key_map()
    )
}

/// Removes mappings: parameters are text arrays of table names and staging keys.
pub fn delete_mappings() -> String {
    format!(
        "DELETE FROM {} k USING unnest($1::text[], $2::text[]) AS u(t, s) \
         WHERE k.table_name = u.t AND k.source_key = u.s::bigint",
        key_map()
    )
}

/// Removes every mapping of the tables named in the text array parameter.
pub fn delete_table_mappings() -> String {
    format!(
        "DELETE FROM {} WHERE table_name = ANY($1::text[])",
        key_map()
    )
}

/// The stored mappings of some staging keys: $1 the table's name, $2 a bigint array of keys;
/// rows of (staging key, production key).
pub fn lookup() -> String {
    format!(
        "SELECT source_key, target_key FROM {} WHERE table_name = $1 AND source_key = ANY($2)",
        key_map()
    )
}

/// At most $2 mappings of table $1, as two arrays in one row: a row per mapping costs the
/// client several times more to receive and decode (this reads a whole table's map).
pub fn whole_table() -> String {
    format!(
        "SELECT array_agg(source_key), array_agg(target_key) \
         FROM (SELECT source_key, target_key FROM {} WHERE table_name = $1 LIMIT $2) m",
        key_map()
    )
}

/// Every mapping of `table`.
pub async fn read_table(
    client: &Client,
    table: &TableName,
) -> Result<HashMap<i64, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT source_key, target_key FROM {} WHERE table_name = $1",
                key_map()
            ),
            &[&table.to_string()],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Replaces `table`'s mappings with `entries` (staging key, production key), in the caller's
/// transaction.
pub async fn replace_table(
    client: &Client,
    table: &TableName,
    entries: &[(i64, i64)],
) -> Result<(), tokio_postgres::Error> {
    let name = table.to_string();
    client
        .execute(&delete_table_mappings(), &[&vec![name.clone()]])
        .await?;
    let insert = client
        .prepare(&format!(
            "INSERT INTO {} (table_name, source_key, target_key) \
             SELECT $1, u.s, u.g FROM unnest($2::bigint[], $3::bigint[]) AS u(s, g)",
            key_map()
        ))
        .await?;
    for chunk in entries.chunks(100_000) {
        let (sources, targets): (Vec<i64>, Vec<i64>) = chunk.iter().copied().unzip();
        client
            .execute(&insert, &[&name, &sources, &targets])
            .await?;
    }
    Ok(())
}

/// Statements that reset `table`'s mappings: none, or with `identity_key` (its key column on
/// production) every row mapped to itself.
pub fn reset_table(table: &TableName, identity_key: Option<&str>) -> String {
    let name = quote_literal(&table.to_string());
    let mut sql = format!("DELETE FROM {} WHERE table_name = {name};", key_map());
    if let Some(key) = identity_key {
        sql.push_str(&format!(
            "INSERT INTO {} (table_name, source_key, target_key) SELECT {name}, t.{key}, t.{key} FROM {} t;",
            key_map(),
            qualified(&table.schema, &table.name),
            key = quote_ident(key)
        ));
    }
    sql
}

/// Entries per table, for `status` (empty when there is no key map).
pub async fn sizes(client: &Client) -> Result<Vec<(String, i64)>, StateError> {
    let exists = super::exists(client, "key_map")
        .await
        .map_err(query_error("looking for the key map"))?;
    if !exists {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            &format!(
                "SELECT table_name, count(*) FROM {} GROUP BY 1 ORDER BY 1",
                key_map()
            ),
            &[],
        )
        .await
        .map_err(query_error("reading the key map"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A join that finds the staging key of `production_key` (an SQL expression) in `parent`'s
/// mappings, as `alias.source_key` (NULL when nothing maps to it).
pub fn join_to_source(alias: &str, parent: &TableName, production_key: &str) -> String {
    format!(
        "LEFT JOIN {} {alias} ON {alias}.table_name = {} AND {alias}.target_key = {production_key}",
        key_map(),
        quote_literal(&parent.to_string())
    )
}

/// True when staging key `key` (an SQL expression) of `parent` is mapped (to some other
/// production key, when the caller found none mapped to it).
pub fn is_mapped(parent: &TableName, key: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {} x WHERE x.table_name = {} AND x.source_key = {key})",
        key_map(),
        quote_literal(&parent.to_string())
    )
}
