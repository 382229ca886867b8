//! The queries remapping runs on production: stored mappings (the key map's statements come
//! from [`crate::state::key_map`]), whether keys are taken, natural-key matches, and fresh keys
//! from a sequence or a KEYS-style table. Prepared once per session.

use std::collections::HashMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use crate::config::{KeySource, TableName};
use crate::quote::{qualified, quote_ident};
use crate::state::key_map;

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
        let sql = key_map::lookup();
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
        let sql = key_map::whole_table();
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

    /// Of `keys`: those a row of `table` holds on production, and those noted as production's
    /// own ([`key_map::production_keys`]), in one query.
    pub async fn taken_or_noted(
        &mut self,
        client: &Client,
        table: &TableName,
        key_column: &str,
        keys: &[i64],
    ) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
        let sql = format!(
            "SELECT u.k, EXISTS (SELECT 1 FROM {} t WHERE t.{} = u.k), \
                    EXISTS (SELECT 1 FROM {} p WHERE p.table_name = $2 AND p.key = u.k) \
               FROM unnest($1::bigint[]) AS u(k)",
            qualified(&table.schema, &table.name),
            quote_ident(key_column),
            key_map::production_keys()
        );
        let name = table.to_string();
        let rows = self
            .rows(
                client,
                &format!("finding which keys {table} has"),
                sql,
                &[Type::INT8_ARRAY, Type::TEXT],
                &[&keys, &name],
            )
            .await?;
        let (mut taken, mut noted) = (Vec::new(), Vec::new());
        for row in rows {
            let key: i64 = row.get(0);
            if row.get(1) {
                taken.push(key);
            }
            if row.get(2) {
                noted.push(key);
            }
        }
        Ok((taken, noted))
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
