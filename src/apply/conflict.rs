//! Conflicts: what each sent statement reported, the rows production lacks or already has, and
//! the table's policy (stop, skip into the quarantine, overwrite) applied to each.

use std::collections::HashSet;

use bytes::Bytes;

use super::in_flight::{Purpose, Reported, TextArray};
use super::{Applier, ApplyError, ConflictKind, statements, value_bytes};
use crate::catalog::TableMeta;
use crate::change::{Entry, Key, NetChange};
use crate::config::Resolution;
use crate::model::{Tuple, Value};
use crate::state::{self, conflicts, quarantine};

impl Applier {
    pub(super) async fn settle_one(
        &mut self,
        purpose: Purpose,
        reported: Reported,
    ) -> Result<(), ApplyError> {
        let (ordinals, count) = match reported {
            Reported::Ordinals(ordinals) => (ordinals, 0),
            Reported::Count(count) => (Vec::new(), count),
        };
        match purpose {
            Purpose::Deletes { table, targets } => {
                let deleted: HashSet<i64> = ordinals.into_iter().collect();
                let mut count = 0;
                for (i, target) in targets.into_iter().enumerate() {
                    let Some((key, source)) = target else {
                        continue;
                    };
                    if deleted.contains(&(i as i64 + 1)) {
                        count += 1;
                    } else {
                        let entry = Entry {
                            key,
                            change: NetChange::Delete,
                            source,
                        };
                        self.conflict(table, ConflictKind::DeleteMissing, &entry)
                            .await?;
                    }
                }
                self.stats.rows_deleted += count;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "delete")
                    .increment(count);
            }
            Purpose::Inserts { table, entries } => {
                let inserted = (entries.len() - ordinals.len()) as u64;
                self.stats.rows_inserted += inserted;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "insert")
                    .increment(inserted);
                let policy = self.tables[table].policy;
                if policy.inserts_overwrite() && self.tables[table].edits.is_none() {
                    // Rows the statement overwrote (and logged), staging's values in place.
                    let overwritten = ordinals.len() as u64;
                    self.stats.conflicts_overwritten += overwritten;
                    metrics::counter!(
                        "stagingprop_conflicts_total",
                        "table" => self.tables[table].meta.table_name().to_string(),
                        "kind" => ConflictKind::InsertExists.name(),
                        "policy" => policy.as_str()
                    )
                    .increment(overwritten);
                    return Ok(());
                }
                for ordinal in ordinals {
                    let entry = &entries[ordinal as usize - 1];
                    self.conflict(table, ConflictKind::InsertExists, entry)
                        .await?;
                }
            }
            Purpose::KeyMap | Purpose::EditSnapshot | Purpose::Begin => {}
            Purpose::EditRace { table } => {
                if !ordinals.is_empty() {
                    return Err(ApplyError::EditRace {
                        table: self.tables[table].meta.table_name(),
                        rows: ordinals.len(),
                    });
                }
            }
            Purpose::Updates { table, entries } => {
                self.stats.rows_updated += count;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "update")
                    .increment(count);
                if (count as usize) < entries.len() {
                    let missing: HashSet<usize> = self
                        .missing_rows(table, &entries)
                        .await?
                        .into_iter()
                        .collect();
                    // In a table whose edits sync watches, rows with an open edit were left too.
                    let edited: HashSet<usize> = self
                        .edited_rows(table, &entries)
                        .await?
                        .into_iter()
                        .collect();
                    for (i, entry) in entries.iter().enumerate() {
                        let kind = if missing.contains(&i) {
                            ConflictKind::UpdateMissing
                        } else if edited.contains(&i) {
                            ConflictKind::UpdateOriginDiffers
                        } else {
                            continue;
                        };
                        self.conflict(table, kind, entry).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Which of `entries` (by index) have no row on production.
    pub(super) async fn missing_rows(
        &mut self,
        table: usize,
        entries: &[Entry],
    ) -> Result<Vec<usize>, ApplyError> {
        let meta = &self.tables[table].meta;
        let mut columns: Vec<Vec<Option<Bytes>>> = vec![Vec::new(); meta.key.len()];
        for entry in entries {
            for (k, value) in entry.key.iter().enumerate() {
                columns[k].push(value.clone());
            }
        }
        let sql = statements::missing_keys(meta);
        let columns: Vec<TextArray> = columns.into_iter().map(TextArray).collect();
        let rows = self
            .query_now(sql, &columns, "finding rows production lacks")
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i64>(0) as usize - 1)
            .collect())
    }

    /// Applies the table's conflict policy to one conflicting change.
    pub(super) async fn conflict(
        &mut self,
        t: usize,
        kind: ConflictKind,
        entry: &Entry,
    ) -> Result<(), ApplyError> {
        // An unmapped key is staging's, not a production row's: no edit can be about it.
        let production_key = !matches!(
            kind,
            ConflictKind::UpdateUnmapped | ConflictKind::DeleteUnmapped
        );
        if production_key && let Some(edits) = self.open_edits(t, &entry.key).await? {
            self.production_edit(t, entry, edits, false).await?;
            return Ok(());
        }
        if production_key
            && self.tables[t].edits.is_some()
            && !matches!(entry.change, NetChange::Insert(_))
            && self.current_row(t, &entry.key).await?.is_some()
        {
            // Left out for an edit that `quarantine resolve` settled meanwhile: the row is there
            // and nobody's edit stands in the way any more.
            return self.apply_over_edit(t, entry).await;
        }
        let meta = &self.tables[t].meta;
        let policy = self.tables[t].policy;
        let seeding = self.tables[t].seeding;
        let policy_name = if seeding { "seeding" } else { policy.as_str() };
        let key_json = key_json(meta, &entry.key);
        metrics::counter!(
            "stagingprop_conflicts_total",
            "table" => meta.table_name().to_string(),
            "kind" => kind.name(),
            "policy" => policy_name
        )
        .increment(1);
        let whole_row = whole_row(&entry.change);
        let row_json = staging_row(meta, &entry.change);
        let table = meta.table_name().to_string();
        let resolution = if seeding {
            Resolution::while_seeding(kind, whole_row)
        } else {
            policy.resolve(kind, whole_row)
        };
        let (action, quarantine_id) = match resolution {
            Resolution::LeftToSeed => ("left-to-seed", None),
            Resolution::Stop => {
                let error = ApplyError::Conflict {
                    table: meta.table_name(),
                    kind,
                    key: key_json.to_string(),
                    lsn: entry.source.lsn,
                    xid: entry.source.xid,
                };
                // The batch is given up here, so that the conflict's row in the log (written
                // after it, on its own) outlives it.
                self.abandon_batch().await;
                let logged = conflicts::insert(
                    &self.client,
                    &conflicts::Entry {
                        slot: &self.slot,
                        lsn: entry.source.lsn,
                        xid: entry.source.xid,
                        table: &table,
                        kind: kind.name(),
                        key: &key_json,
                        staging_row: row_json.as_ref(),
                        production_row: None,
                        last_written: None,
                        edits: &[],
                        policy: policy.as_str(),
                        action: "stopped",
                        quarantine_id: None,
                    },
                )
                .await;
                if let Err(e) = logged {
                    tracing::warn!(
                        "cannot log the conflict in {}.conflicts: {e}",
                        state::SCHEMA
                    );
                }
                return Err(error);
            }
            Resolution::AlreadyDone => {
                self.stats.conflicts_overwritten += 1;
                ("already-done", None)
            }
            Resolution::InsertRow => {
                let (NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row)) =
                    &entry.change
                else {
                    unreachable!("a whole row was sent")
                };
                let all: Vec<usize> = (0..row.len()).collect();
                // A table without a key has nothing to conflict on: a plain insert.
                let sql = if meta.key.is_empty() {
                    statements::insert_rows_checked(meta, &all)
                } else {
                    statements::insert_rows(meta, &all, true)
                };
                let columns = row
                    .iter()
                    .map(|v| value_bytes(v, meta).map(|b| TextArray(vec![b])))
                    .collect::<Result<Vec<_>, _>>()?;
                self.execute_now(sql, &columns, "inserting an overwritten row")
                    .await?;
                self.stats.conflicts_overwritten += 1;
                ("overwritten", None)
            }
            Resolution::Quarantine { incomplete_row } => {
                let reason = if incomplete_row {
                    format!(
                        "{kind}; not every column was sent (unchanged TOAST values), so it cannot be inserted"
                    )
                } else {
                    kind.to_string()
                };
                let id = quarantine::insert(
                    &self.client,
                    &quarantine::Entry {
                        slot: &self.slot,
                        lsn: entry.source.lsn,
                        xid: entry.source.xid,
                        table: &table,
                        operation: kind.operation(),
                        reason: &reason,
                        key: &key_json,
                        row: row_json.as_ref(),
                        parked: None,
                    },
                )
                .await?;
                self.stats.conflicts_skipped += 1;
                tracing::warn!(
                    table = %table, key = %key_json, lsn = %entry.source.lsn, xid = entry.source.xid,
                    "conflict: {reason}; the change was written to {}.quarantine and skipped",
                    state::SCHEMA
                );
                ("skipped", Some(id))
            }
        };
        // The row an insert met, for the log (a missing row has none to show).
        let production_row = if kind == ConflictKind::InsertExists && !entry.key.is_empty() {
            self.current_row(t, &entry.key).await?
        } else {
            None
        };
        conflicts::insert(
            &self.client,
            &conflicts::Entry {
                slot: &self.slot,
                lsn: entry.source.lsn,
                xid: entry.source.xid,
                table: &table,
                kind: kind.name(),
                key: &key_json,
                staging_row: row_json.as_ref(),
                production_row: production_row.as_deref(),
                last_written: None,
                edits: &[],
                policy: policy_name,
                action,
                quarantine_id,
            },
        )
        .await?;
        Ok(())
    }
}

/// Whether staging sent every column of the change's row (none is an unchanged TOAST value).
pub(super) fn whole_row(change: &NetChange) -> bool {
    match change {
        NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) => {
            row.iter().all(|v| !matches!(v, Value::UnchangedToast))
        }
        NetChange::Delete => false,
    }
}

/// The row staging sent, as the logs keep it (none for a delete).
pub(super) fn staging_row(meta: &TableMeta, change: &NetChange) -> Option<serde_json::Value> {
    match change {
        NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) => {
            Some(row_json(meta, row))
        }
        NetChange::Delete => None,
    }
}

pub(super) fn key_json(meta: &TableMeta, key: &Key) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (k, value) in meta.identifying_columns().into_iter().zip(key) {
        let v = value
            .as_ref()
            .map(|b| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
            .unwrap_or(serde_json::Value::Null);
        map.insert(meta.columns[k].name.clone(), v);
    }
    serde_json::Value::Object(map)
}

pub(super) fn row_json(meta: &TableMeta, row: &Tuple) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (column, value) in meta.columns.iter().zip(row) {
        let v = match value {
            Value::Text(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
            Value::Null => serde_json::Value::Null,
            Value::UnchangedToast => serde_json::json!({"unchanged_toast": true}),
            Value::Binary(b) => serde_json::json!({"binary_len": b.len()}),
        };
        map.insert(column.name.clone(), v);
    }
    serde_json::Value::Object(map)
}
