//! The key map on production and the queries remapping needs there: stored mappings, whether
//! keys are taken, natural-key matches, and fresh keys from a sequence or a KEYS-style table.
//! Every statement's SQL text is built here.

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::apply::STATE_SCHEMA;
use crate::config::{KeySource, TableName};
use crate::sql::{qualified, quote_ident, quote_literal};

/// The key map: one row per remapped row, staging key to production key. Only the staging key
/// is indexed (every lookup goes that way); two mappings to one production key would make the
/// second row's insert conflict on production's own primary key.
pub fn key_map_table() -> String {
    qualified(STATE_SCHEMA, "key_map")
}

/// DDL of the key map (part of stagingprop's schema on production).
pub fn create_key_map() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
             table_name text NOT NULL,
             source_key bigint NOT NULL,
             target_key bigint NOT NULL,
             mapped_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (table_name, source_key))",
        key_map_table()
    )
}

/// Records mappings: parameters are text arrays of table names, staging keys, production keys.
/// A mapping left from a row staging no longer has is replaced.
pub fn insert_mappings() -> String {
    format!(
        "INSERT INTO {} (table_name, source_key, target_key) \
         SELECT u.t, u.s::bigint, u.g::bigint FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, s, g) \
         ON CONFLICT (table_name, source_key) DO UPDATE SET target_key = EXCLUDED.target_key, mapped_at = now()",
        key_map_table()
    )
}

/// Removes mappings: parameters are text arrays of table names and staging keys.
pub fn delete_mappings() -> String {
    format!(
        "DELETE FROM {} k USING unnest($1::text[], $2::text[]) AS u(t, s) \
         WHERE k.table_name = u.t AND k.source_key = u.s::bigint",
        key_map_table()
    )
}

/// Records the mappings of one table: $1 the table's name, $2 and $3 arrays of staging and
/// production keys.
pub fn insert_table_mappings() -> String {
    format!(
        "INSERT INTO {} (table_name, source_key, target_key) \
         SELECT $1, u.s, u.g FROM unnest($2::bigint[], $3::bigint[]) AS u(s, g)",
        key_map_table()
    )
}

/// Maps every row of `table` to itself (no parameters).
pub fn identity_mappings(table: &TableName, key_column: &str) -> String {
    format!(
        "INSERT INTO {} (table_name, source_key, target_key) SELECT {}, t.{key}, t.{key} FROM {} t",
        key_map_table(),
        quote_literal(&table.to_string()),
        qualified(&table.schema, &table.name),
        key = quote_ident(key_column)
    )
}

/// Removes every mapping of the tables named in the text array parameter.
pub fn delete_table_mappings() -> String {
    format!(
        "DELETE FROM {} WHERE table_name = ANY($1::text[])",
        key_map_table()
    )
}

/// Why a query of remapping failed or found nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what}: {source}")]
    Query {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error(
        "the keys table {keys_table} has no row with tablename = '{name}' (the counter of {table}): insert one with counter, lowerbound and upperbound"
    )]
    KeysRowMissing {
        keys_table: TableName,
        name: String,
        table: TableName,
    },
    #[error(
        "the keys table {keys_table} ran out of keys for {table}: row '{name}' has counter {counter} and upperbound {upper}, and {wanted} more keys are needed. \
         Nothing of this batch was applied; raise upperbound (or give the table a new range) and start sync again"
    )]
    KeysExhausted {
        keys_table: TableName,
        name: String,
        table: TableName,
        counter: i64,
        upper: i64,
        wanted: i64,
    },
    #[error("the sequence {sequence} handed out {got} keys for {table}, {wanted} were asked for")]
    ShortSequence {
        sequence: TableName,
        table: TableName,
        got: usize,
        wanted: usize,
    },
}

/// Prepared statements of remapping on one production session.
#[derive(Default)]
pub struct Statements {
    prepared: HashMap<String, Statement>,
}

impl Statements {
    async fn get(
        &mut self,
        client: &Client,
        sql: String,
        types: &[Type],
    ) -> Result<Statement, StoreError> {
        if let Some(statement) = self.prepared.get(&sql) {
            return Ok(statement.clone());
        }
        let statement =
            client
                .prepare_typed(&sql, types)
                .await
                .map_err(|source| StoreError::Query {
                    what: "preparing a key-map statement".into(),
                    source,
                })?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    async fn rows(
        &mut self,
        client: &Client,
        what: &str,
        sql: String,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let statement = self.get(client, sql, types).await?;
        client
            .query(&statement, params)
            .await
            .map_err(|source| StoreError::Query {
                what: what.to_owned(),
                source,
            })
    }

    /// The stored mappings of `sources` in `table`, as (staging key, production key).
    pub async fn lookup(
        &mut self,
        client: &Client,
        table: &TableName,
        sources: &[i64],
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        let sql = format!(
            "SELECT source_key, target_key FROM {} WHERE table_name = $1 AND source_key = ANY($2)",
            key_map_table()
        );
        let name = table.to_string();
        let rows = self
            .rows(
                client,
                "reading the key map",
                sql,
                &[Type::TEXT, Type::INT8_ARRAY],
                &[&name, &sources],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every mapping of `table`, unless there are more than `limit`.
    pub async fn whole_table(
        &mut self,
        client: &Client,
        table: &TableName,
        limit: usize,
    ) -> Result<Option<Vec<(i64, i64)>>, StoreError> {
        // Two arrays in one row: a row per mapping costs the client several times more to
        // receive and decode (this runs at the start of every session, on the whole key map).
        let sql = format!(
            "SELECT array_agg(source_key), array_agg(target_key) \
             FROM (SELECT source_key, target_key FROM {} WHERE table_name = $1 LIMIT $2) m",
            key_map_table()
        );
        let name = table.to_string();
        let over = limit as i64 + 1;
        let rows = self
            .rows(
                client,
                "reading the key map",
                sql,
                &[Type::TEXT, Type::INT8],
                &[&name, &over],
            )
            .await?;
        let (sources, targets): (Option<Vec<i64>>, Option<Vec<i64>>) = match rows.first() {
            Some(row) => (row.get(0), row.get(1)),
            None => (None, None),
        };
        let (sources, targets) = (sources.unwrap_or_default(), targets.unwrap_or_default());
        if sources.len() > limit {
            return Ok(None);
        }
        Ok(Some(sources.into_iter().zip(targets).collect()))
    }

    /// Which of `keys` production's `table` has a row under (its key column `key_column`).
    pub async fn existing(
        &mut self,
        client: &Client,
        table: &TableName,
        key_column: &str,
        keys: &[i64],
    ) -> Result<Vec<i64>, StoreError> {
        let sql = format!(
            "SELECT u.k FROM unnest($1::bigint[]) AS u(k) WHERE EXISTS (SELECT 1 FROM {} t WHERE t.{} = u.k)",
            qualified(&table.schema, &table.name),
            quote_ident(key_column)
        );
        let rows = self
            .rows(
                client,
                &format!("finding which keys {table} has"),
                sql,
                &[Type::INT8_ARRAY],
                &[&keys],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Production rows of `table` matching staging rows on the natural-key `columns` (name, SQL
    /// type). `values[c][i]` is the text of column `c` of row `i`; returns (row index, key).
    pub async fn natural_matches(
        &mut self,
        client: &Client,
        table: &TableName,
        key_column: &str,
        columns: &[(String, String)],
        values: Vec<Vec<Option<String>>>,
    ) -> Result<Vec<(usize, i64)>, StoreError> {
        let aliases: Vec<String> = (0..columns.len()).map(|c| format!("c{c}")).collect();
        let arrays: Vec<String> = (1..=columns.len())
            .map(|p| format!("${p}::text[]"))
            .collect();
        let conditions: Vec<String> = columns
            .iter()
            .zip(&aliases)
            .map(|((name, type_sql), alias)| {
                format!("t.{} = u.{alias}::{type_sql}", quote_ident(name))
            })
            .collect();
        let sql = format!(
            "SELECT u.ord, t.{}::bigint FROM unnest({}) WITH ORDINALITY AS u({}, ord) JOIN {} t ON {}",
            quote_ident(key_column),
            arrays.join(", "),
            aliases.join(", "),
            qualified(&table.schema, &table.name),
            conditions.join(" AND ")
        );
        let types = vec![Type::TEXT_ARRAY; columns.len()];
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self
            .rows(
                client,
                &format!("matching natural keys of {table}"),
                sql,
                &types,
                &params,
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as usize - 1, r.get(1)))
            .collect())
    }

    /// `count` fresh production keys for `table` from `source`, in the open transaction.
    pub async fn allocate(
        &mut self,
        client: &Client,
        table: &TableName,
        source: &KeySource,
        count: usize,
    ) -> Result<Vec<i64>, StoreError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let wanted = count as i64;
        match source {
            KeySource::Sequence(sequence) => {
                let sql = "SELECT nextval($1::text::regclass) FROM generate_series(1, $2)";
                let name = qualified(&sequence.schema, &sequence.name);
                let rows = self
                    .rows(
                        client,
                        &format!("allocating keys for {table} from sequence {sequence}"),
                        sql.to_owned(),
                        &[Type::TEXT, Type::INT8],
                        &[&name, &wanted],
                    )
                    .await?;
                let keys: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                if keys.len() != count {
                    return Err(StoreError::ShortSequence {
                        sequence: sequence.clone(),
                        table: table.clone(),
                        got: keys.len(),
                        wanted: count,
                    });
                }
                Ok(keys)
            }
            KeySource::KeysTable {
                table: keys_table,
                name,
            } => {
                // The counter holds the last key handed out; the range is lowerbound..=upperbound.
                // The row stays locked until this transaction ends, as production's own
                // allocations from it expect.
                let keys_sql = qualified(&keys_table.schema, &keys_table.name);
                let sql = format!(
                    "UPDATE {keys_sql} SET counter = GREATEST(counter, lowerbound - 1) + $2 \
                     WHERE tablename = $1 AND GREATEST(counter, lowerbound - 1) + $2 <= upperbound \
                     RETURNING counter::bigint"
                );
                let what = format!("allocating keys for {table} from {keys_table}");
                let rows = self
                    .rows(
                        client,
                        &what,
                        sql,
                        &[Type::TEXT, Type::INT8],
                        &[name, &wanted],
                    )
                    .await?;
                if let Some(row) = rows.first() {
                    let last: i64 = row.get(0);
                    return Ok((last - wanted + 1..=last).collect());
                }
                let sql = format!(
                    "SELECT GREATEST(counter, lowerbound - 1)::bigint, upperbound::bigint FROM {keys_sql} WHERE tablename = $1"
                );
                let rows = self
                    .rows(client, &what, sql, &[Type::TEXT], &[name])
                    .await?;
                match rows.first() {
                    None => Err(StoreError::KeysRowMissing {
                        keys_table: keys_table.clone(),
                        name: name.clone(),
                        table: table.clone(),
                    }),
                    Some(row) => Err(StoreError::KeysExhausted {
                        keys_table: keys_table.clone(),
                        name: name.clone(),
                        table: table.clone(),
                        counter: row.get(0),
                        upper: row.get(1),
                        wanted,
                    }),
                }
            }
        }
    }
}
