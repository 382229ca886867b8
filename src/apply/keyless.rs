//! Tables without a key (`REPLICA IDENTITY FULL`, no primary key): each change is applied on
//! its own, in order, with nothing consolidated, since two rows may be identical. An UPDATE or
//! DELETE changes exactly one row whose values equal the old row staging sent, as PostgreSQL's
//! own apply worker does; none is a conflict under the table's policy.

use tokio_postgres::types::ToSql;

use super::error::query_error;
use super::{Applier, ApplyError, ConflictKind, statements, value_str};
use crate::change::{Entry, Key, NetChange, Source};
use crate::model::{Tuple, Value};

/// Columns that carry a value (not an unchanged TOAST marker).
fn sent(row: &Tuple) -> impl Iterator<Item = usize> + '_ {
    (0..row.len()).filter(|&c| !matches!(row[c], Value::UnchangedToast))
}

impl Applier {
    /// One change of a table without a key: `old` is the whole old row (UPDATE, DELETE),
    /// `new` the new one (INSERT, UPDATE), both in production's column order.
    pub async fn keyless_change(
        &mut self,
        table: usize,
        old: Option<Tuple>,
        new: Option<Tuple>,
        source: Source,
    ) -> Result<(), ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        let meta = &self.tables[table].meta;
        let name = meta.table_name();
        let mut params: Vec<Option<&str>> = Vec::new();
        let (sql, op) = match (&old, &new) {
            (None, Some(new)) => {
                let columns: Vec<usize> = sent(new).collect();
                for &c in &columns {
                    params.push(value_str(&new[c], &name)?);
                }
                (statements::insert_one(meta, &columns), "insert")
            }
            (Some(old), Some(new)) => {
                let set: Vec<usize> = sent(new).filter(|&c| meta.assignable(c)).collect();
                let matched: Vec<usize> = sent(old).collect();
                for &c in &set {
                    params.push(value_str(&new[c], &name)?);
                }
                for &c in &matched {
                    params.push(value_str(&old[c], &name)?);
                }
                (statements::update_one(meta, &set, &matched), "update")
            }
            (Some(old), None) => {
                let matched: Vec<usize> = sent(old).collect();
                for &c in &matched {
                    params.push(value_str(&old[c], &name)?);
                }
                (statements::delete_one(meta, &matched), "delete")
            }
            (None, None) => return Ok(()),
        };
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let changed = self
            .client
            .execute(&sql, &refs)
            .await
            .map_err(query_error("applying a change of a table without a key"))?;
        if changed == 0 {
            // The row staging changed is not on production: the old values say which it was.
            let key: Key = old
                .iter()
                .flatten()
                .map(|v| match v {
                    Value::Text(b) | Value::Binary(b) => Some(b.clone()),
                    _ => None,
                })
                .collect();
            let (kind, change) = match new {
                Some(new) => (ConflictKind::UpdateMissing, NetChange::Update(new)),
                None => (ConflictKind::DeleteMissing, NetChange::Delete),
            };
            let entry = Entry {
                key,
                change,
                source,
            };
            return self.conflict(table, kind, &entry).await;
        }
        match op {
            "insert" => self.stats.rows_inserted += 1,
            "update" => self.stats.rows_updated += 1,
            _ => self.stats.rows_deleted += 1,
        }
        metrics::counter!("stagingprop_rows_applied_total", "table" => name.to_string(), "op" => op)
            .increment(1);
        Ok(())
    }
}
