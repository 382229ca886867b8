//! Staging's changes that meet a row production's own users edited since stagingprop last
//! wrote it (recorded by the guard, `guard = "record"`). Sync's UPDATEs and DELETEs of such a
//! table leave out every row with an open edit, and afterwards (holding the rows' locks) look
//! for an edit committed while they ran, which sends the batch round again; what was left out
//! comes here, one change at a time, and the table's `on_production_edit` decides: apply it
//! over the edit (`staging-wins`, production's values kept in the conflict log), leave
//! production's row (`production-wins`, staging's change logged), or set it aside with the
//! three images (`park`). Every decision is one row of the conflict log, and the edits it
//! settles are marked, in the batch's transaction.

use tokio_postgres::types::ToSql;

use super::conflict::{key_json, staging_row, whole_row};
use super::error::query_error;
use super::in_flight::TextArray;
use super::{Applier, ApplyError, ConflictKind, as_str, statements, value_bytes};
use crate::catalog::TableMeta;
use crate::change::{Entry, Key, NetChange};
use crate::config::{EditPolicy, EditResolution};
use crate::model::Value;
use crate::state::{conflicts, production_edits, quarantine};

/// The open edits of one row.
pub(super) struct OpenEdits {
    /// The table as the guard records it, and its edit policy.
    table: String,
    policy: EditPolicy,
    pub(super) ids: Vec<i64>,
    /// The first edit's before-image: what stagingprop last wrote to the row (JSON text, kept
    /// as text so that no number loses a digit).
    pub(super) last_written: Option<String>,
}

/// What a change that met an edit leaves its caller to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decided {
    /// Nothing: the change was applied, kept out or parked here.
    Done,
    /// Apply the change as usual (a key change, which its caller applies).
    ApplyIt,
}

impl Applier {
    /// The open production edits of row `key` of table `t`, locked until the batch ends;
    /// `None` when sync does not watch the table's edits or there are none.
    pub(super) async fn open_edits(
        &mut self,
        t: usize,
        key: &Key,
    ) -> Result<Option<OpenEdits>, ApplyError> {
        let Some(watch) = &self.tables[t].edits else {
            return Ok(None);
        };
        let meta = &self.tables[t].meta;
        let mut params: Vec<Option<&str>> = vec![Some(watch.name.as_str())];
        params.extend(key_params(meta, key)?);
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self
            .client
            .query(&statements::open_edits_of_row(meta), &refs)
            .await
            .map_err(query_error("reading production's edits of a row"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let last_written = rows[0].get::<_, Option<String>>(1);
        Ok(Some(OpenEdits {
            table: watch.name.clone(),
            policy: watch.policy,
            ids: rows.iter().map(|r| r.get(0)).collect(),
            last_written,
        }))
    }

    /// Production's row under `key` in table `t`, as JSON text; `None` when it has none.
    pub(super) async fn current_row(
        &mut self,
        t: usize,
        key: &Key,
    ) -> Result<Option<String>, ApplyError> {
        let meta = &self.tables[t].meta;
        let params = key_params(meta, key)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let row = self
            .client
            .query_opt(&statements::row_as_json(meta), &refs)
            .await
            .map_err(query_error("reading production's row"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Decides `entry`, which met the open `edits` of its row, under the table's edit policy.
    /// `key_change`: the caller applies a staging-wins key change itself.
    pub(super) async fn production_edit(
        &mut self,
        t: usize,
        entry: &Entry,
        edits: OpenEdits,
        key_change: bool,
    ) -> Result<Decided, ApplyError> {
        let current = self.current_row(t, &entry.key).await?;
        let exists = current.is_some();
        let kind = match (&entry.change, exists) {
            (NetChange::Delete, true) => ConflictKind::DeleteOriginDiffers,
            (NetChange::Delete, false) => ConflictKind::DeleteMissing,
            (NetChange::Insert(_), _) => ConflictKind::InsertExists,
            (NetChange::Update(_) | NetChange::Replace(_), true) => {
                ConflictKind::UpdateOriginDiffers
            }
            (NetChange::Update(_) | NetChange::Replace(_), false) => ConflictKind::UpdateMissing,
        };
        let whole_row = whole_row(&entry.change);
        let (policy, table) = (edits.policy, edits.table.clone());
        let resolution = policy.resolve(kind, whole_row);
        let mut decided = Decided::Done;
        let action = match resolution {
            EditResolution::Apply if key_change => {
                decided = Decided::ApplyIt;
                "staging-wins"
            }
            EditResolution::Apply => {
                self.apply_over_edit(t, entry).await?;
                "staging-wins"
            }
            EditResolution::InsertRow => {
                self.insert_whole_row(t, entry).await?;
                "staging-wins"
            }
            EditResolution::AlreadyDone => "staging-wins",
            EditResolution::KeepProduction => "production-wins",
            EditResolution::Park => "parked",
        };
        let meta = &self.tables[t].meta;
        let key = key_json(meta, &entry.key);
        let staging_row = staging_row(meta, &entry.change);
        let quarantine_id = if resolution == EditResolution::Park {
            let reason = format!(
                "{}: {kind}; parked (on_production_edit = \"park\"): resolve it with `stagingprop quarantine resolve`",
                kind.name()
            );
            Some(
                quarantine::insert(
                    &self.client,
                    &quarantine::Entry {
                        slot: &self.slot,
                        lsn: entry.source.lsn,
                        xid: entry.source.xid,
                        table: &table,
                        operation: kind.operation(),
                        reason: &reason,
                        key: &key,
                        row: staging_row.as_ref(),
                        parked: Some(quarantine::Parked {
                            production_row: current.as_deref(),
                            last_written: edits.last_written.as_deref(),
                            edits: &edits.ids,
                        }),
                    },
                )
                .await?,
            )
        } else {
            production_edits::settle(&self.client, &edits.ids, action).await?;
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
                key: &key,
                staging_row: staging_row.as_ref(),
                production_row: current.as_deref(),
                last_written: edits.last_written.as_deref(),
                edits: &edits.ids,
                policy: policy.as_str(),
                action,
                quarantine_id,
            },
        )
        .await?;
        metrics::counter!(
            "stagingprop_conflicts_total",
            "table" => table.clone(),
            "kind" => kind.name(),
            "policy" => policy.as_str()
        )
        .increment(1);
        match resolution {
            EditResolution::Park => self.stats.conflicts_skipped += 1,
            EditResolution::KeepProduction => self.stats.conflicts_skipped += 1,
            _ => self.stats.conflicts_overwritten += 1,
        }
        tracing::warn!(
            table = %table, key = %key, lsn = %entry.source.lsn, xid = entry.source.xid,
            edits = ?edits.ids,
            "staging's {} met a production edit ({}): {action} (on_production_edit = \"{}\"); logged in stagingprop.conflicts",
            kind.operation(), kind.name(), policy.as_str()
        );
        Ok(decided)
    }

    /// Applies `entry` to its row whatever production's users did to it.
    pub(super) async fn apply_over_edit(
        &mut self,
        t: usize,
        entry: &Entry,
    ) -> Result<(), ApplyError> {
        let meta = &self.tables[t].meta;
        let keys: Vec<TextArray> = entry
            .key
            .iter()
            .map(|k| TextArray(vec![k.clone()]))
            .collect();
        let (sql, columns) = match &entry.change {
            NetChange::Delete => (statements::delete_rows(meta, None), keys),
            NetChange::Update(row) => {
                let set: Vec<usize> = (0..row.len())
                    .filter(|&c| {
                        !meta.key.contains(&c)
                            && meta.assignable(c)
                            && !matches!(row[c], Value::UnchangedToast)
                    })
                    .collect();
                let mut columns = keys;
                for &c in &set {
                    columns.push(TextArray(vec![value_bytes(&row[c], meta)?]));
                }
                (statements::update_rows(meta, &set, None), columns)
            }
            NetChange::Insert(_) | NetChange::Replace(_) => {
                return self.insert_whole_row(t, entry).await;
            }
        };
        self.execute_now(sql, &columns, "applying a change over a production edit")
            .await?;
        Ok(())
    }

    /// Inserts (or overwrites) `entry`'s whole row.
    async fn insert_whole_row(&mut self, t: usize, entry: &Entry) -> Result<(), ApplyError> {
        let meta = &self.tables[t].meta;
        let (NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row)) =
            &entry.change
        else {
            return Ok(());
        };
        let present: Vec<usize> = (0..row.len())
            .filter(|&c| !matches!(row[c], Value::UnchangedToast))
            .collect();
        let columns = present
            .iter()
            .map(|&c| value_bytes(&row[c], meta).map(|b| TextArray(vec![b])))
            .collect::<Result<Vec<_>, _>>()?;
        let sql = statements::insert_rows(meta, &present, true);
        self.execute_now(
            sql,
            &columns,
            "writing staging's row over a production edit",
        )
        .await?;
        Ok(())
    }

    /// The keys (one array per key column) of the rows `drained` updates or deletes in each
    /// table whose production edits sync watches.
    pub(super) fn watched_keys(&self, drained: &[Vec<Entry>]) -> Vec<(usize, Vec<TextArray>)> {
        let mut out = Vec::new();
        for (t, entries) in drained.iter().enumerate() {
            if self.tables[t].edits.is_none() {
                continue;
            }
            let mut columns: Vec<Vec<Option<bytes::Bytes>>> =
                vec![Vec::new(); self.tables[t].meta.key.len()];
            for entry in entries {
                if matches!(entry.change, NetChange::Insert(_)) {
                    continue;
                }
                for (k, value) in entry.key.iter().enumerate() {
                    columns[k].push(value.clone());
                }
            }
            if columns.first().is_some_and(|c| !c.is_empty()) {
                out.push((t, columns.into_iter().map(TextArray).collect()));
            }
        }
        out
    }

    /// Notes the snapshot the batch's statements start from: an edit committed after it may
    /// have been written over unseen (an UPDATE waiting for the editor's row lock goes on with
    /// the row as the editor left it, but reads production's edits as of its own start).
    pub(super) async fn note_edit_snapshot(&mut self) -> Result<(), ApplyError> {
        self.send(
            production_edits::NOTE_SNAPSHOT.to_owned(),
            Vec::new(),
            super::in_flight::Purpose::EditSnapshot,
        )
        .await
    }

    /// After the batch's statements of table `t` (which hold the rows' locks now): finds edits
    /// of the rows `keys` committed since the noted snapshot. There should be none; if there
    /// is one, the batch is applied again (`checked`: it fails on the server, for a batch sent
    /// with its COMMIT).
    pub(super) async fn check_edit_race(
        &mut self,
        t: usize,
        keys: Vec<TextArray>,
        checked: bool,
    ) -> Result<(), ApplyError> {
        let Some(watched) = self.watched(t).map(str::to_owned) else {
            return Ok(());
        };
        let sql = statements::raced_keys(&self.tables[t].meta, &watched, checked);
        self.send(sql, keys, super::in_flight::Purpose::EditRace { table: t })
            .await
    }

    /// Locks the row of `key` in table `t` now (before a key change reads its edits).
    pub(super) async fn lock_row(&mut self, t: usize, key: &Key) -> Result<(), ApplyError> {
        let columns: Vec<TextArray> = key.iter().map(|k| TextArray(vec![k.clone()])).collect();
        let sql = statements::lock_rows(&self.tables[t].meta);
        self.execute_now(sql, &columns, "locking a row production's users may edit")
            .await?;
        Ok(())
    }

    /// Which of `entries` (by index) have an open production edit.
    pub(super) async fn edited_rows(
        &mut self,
        t: usize,
        entries: &[Entry],
    ) -> Result<Vec<usize>, ApplyError> {
        let Some(watched) = self.watched(t).map(str::to_owned) else {
            return Ok(Vec::new());
        };
        let meta = &self.tables[t].meta;
        let mut columns: Vec<Vec<Option<bytes::Bytes>>> = vec![Vec::new(); meta.key.len()];
        for entry in entries {
            for (k, value) in entry.key.iter().enumerate() {
                columns[k].push(value.clone());
            }
        }
        let sql = statements::edited_keys(meta, &watched);
        let columns: Vec<TextArray> = columns.into_iter().map(TextArray).collect();
        let rows = self
            .query_now(sql, &columns, "finding rows production edited")
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i64>(0) as usize - 1)
            .collect())
    }

    /// Opens the transaction now, so that what an operator's resolution reads and locks
    /// (`quarantine resolve`) belongs to it.
    pub async fn begin_now(&mut self) -> Result<(), ApplyError> {
        self.begin().await?;
        self.settle().await
    }

    /// The ids of the open production edits of row `key` of table `t`, locked until the
    /// transaction ends (the row itself is locked first, as sync locks it).
    pub async fn lock_row_and_edits(
        &mut self,
        t: usize,
        key: &Key,
    ) -> Result<Vec<i64>, ApplyError> {
        self.lock_row(t, key).await?;
        Ok(self
            .open_edits(t, key)
            .await?
            .map(|edits| edits.ids)
            .unwrap_or_default())
    }

    /// Sets columns of row `key` of table `t` to `values` (text, or NULL) in the open
    /// transaction: an operator's merged values. How many rows it changed (0 or 1).
    pub async fn write_values(
        &mut self,
        t: usize,
        key: &Key,
        values: &[(usize, Option<bytes::Bytes>)],
    ) -> Result<u64, ApplyError> {
        let meta = &self.tables[t].meta;
        let set: Vec<usize> = values.iter().map(|(c, _)| *c).collect();
        let mut columns: Vec<TextArray> = key.iter().map(|k| TextArray(vec![k.clone()])).collect();
        columns.extend(values.iter().map(|(_, v)| TextArray(vec![v.clone()])));
        let sql = statements::update_rows(meta, &set, None);
        self.execute_now(sql, &columns, "writing an operator's merged values")
            .await
    }
}

/// A row's key as text parameters.
fn key_params<'a>(meta: &TableMeta, key: &'a Key) -> Result<Vec<Option<&'a str>>, ApplyError> {
    let name = meta.table_name();
    key.iter().map(|v| as_str(v.as_ref(), &name)).collect()
}
