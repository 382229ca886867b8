//! A repair chunk at its high watermark: production's rows of the chunk made equal to the
//! rows staging's snapshot held (missing inserted, different updated, extra deleted), in the
//! open transaction after everything the stream carried before it, with the chunk's outcome
//! written beside them (`stagingprop.repair_chunks`), so the chunk and the progress row
//! commit together. Rows production's users edited were left out by the repair already.

use std::collections::HashMap;

use bytes::Bytes;
use tokio_postgres::types::ToSql;

use super::error::query_error;
use super::in_flight::TextArray;
use super::shape::key_of;
use super::{Applier, ApplyError, statements};
use crate::change::{Entry, Key, NetChange, Source};
use crate::model::{Tuple, Value};
use crate::remap::RemapError;
use crate::repair::{AtHigh, Chunk};
use crate::state::repairs::{self, ChunkState, Outcome};

/// Why the chunk was not written, when it was not.
type Refusal = (ChunkState, String);

impl Applier {
    /// Applies (or records interrupted) one repair chunk in the open transaction.
    pub async fn repair_chunk(&mut self, at: AtHigh, source: Source) -> Result<(), ApplyError> {
        // The stream's changes before the watermark go first.
        self.flush().await?;
        self.begin().await?;
        self.settle().await?;
        let (chunk, result) = match at {
            AtHigh::Interrupted(chunk) => {
                let why = "sync did not see the chunk's window whole (it restarted between the \
                           watermarks, or the stream changed the table in a way keys cannot \
                           tell): the repair reads it again";
                (chunk, Err((ChunkState::Interrupted, why.to_owned())))
            }
            AtHigh::Apply { chunk, left_out } => {
                let result = self
                    .guarded_write(&chunk, source)
                    .await?
                    .map(|mut outcome| {
                        outcome.left_out = left_out as i64;
                        outcome
                    });
                (chunk, result)
            }
        };
        let (state, outcome, reason) = match result {
            Ok(outcome) => (ChunkState::Applied, outcome, None),
            Err((state, reason)) => {
                tracing::warn!(repair = chunk.id.repair, chunk = chunk.id.chunk, table = %chunk.table, "repair chunk not applied: {reason}");
                (state, Outcome::default(), Some(reason))
            }
        };
        if state == ChunkState::Applied {
            tracing::info!(
                repair = chunk.id.repair,
                chunk = chunk.id.chunk,
                table = %chunk.table,
                inserted = outcome.inserted,
                updated = outcome.updated,
                deleted = outcome.deleted,
                left_to_the_stream = outcome.left_out,
                "repair chunk applied"
            );
            for (action, rows) in [
                ("inserted", outcome.inserted),
                ("updated", outcome.updated),
                ("deleted", outcome.deleted),
            ] {
                metrics::counter!("stagingprop_repair_rows_total", "table" => chunk.table.clone(), "action" => action)
                    .increment(rows as u64);
            }
        }
        metrics::counter!("stagingprop_repair_chunks_total", "state" => state.as_str())
            .increment(1);
        let lsn = source.lsn.to_string();
        let params: [&(dyn ToSql + Sync); 10] = [
            &chunk.id.repair,
            &chunk.id.chunk,
            &chunk.table,
            &state.as_str(),
            &lsn,
            &outcome.inserted,
            &outcome.updated,
            &outcome.deleted,
            &outcome.left_out,
            &reason,
        ];
        self.client
            .execute(&repairs::record_outcome(), &params)
            .await
            .map_err(query_error("recording a repair chunk's outcome"))?;
        Ok(())
    }

    /// [`Self::write_chunk`] under a savepoint: what production refuses (a constraint, a
    /// type, a reference to a row it lacks) fails the chunk, not the batch, so a repair never
    /// stops sync.
    async fn guarded_write(
        &mut self,
        chunk: &Chunk,
        source: Source,
    ) -> Result<Result<Outcome, Refusal>, ApplyError> {
        let (t, columns) = match self.chunk_shape(chunk) {
            Ok(shape) => shape,
            Err(refusal) => return Ok(Err(refusal)),
        };
        self.client
            .batch_execute("SAVEPOINT stagingprop_repair")
            .await
            .map_err(query_error("SAVEPOINT"))?;
        let written = self.write_chunk(t, &columns, chunk, source).await;
        let refused = match &written {
            Ok(Ok(_)) => None,
            Ok(Err(refusal)) => Some(refusal.1.clone()),
            Err(ApplyError::Remap(RemapError::Store(_))) => None,
            Err(ApplyError::Remap(e)) => Some(e.to_string()),
            Err(ApplyError::Query(q)) if q.server.is_some() && !q.transient => {
                Some(format!("production refused it: {q}"))
            }
            Err(_) => None,
        };
        match refused {
            None => {
                let outcome = written?.expect("not refused");
                self.client
                    .batch_execute("RELEASE SAVEPOINT stagingprop_repair")
                    .await
                    .map_err(query_error("RELEASE SAVEPOINT"))?;
                self.stats.rows_inserted += outcome.inserted as u64;
                self.stats.rows_updated += outcome.updated as u64;
                self.stats.rows_deleted += outcome.deleted as u64;
                Ok(Ok(outcome))
            }
            Some(why) => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT stagingprop_repair")
                    .await
                    .map_err(query_error("ROLLBACK TO SAVEPOINT"))?;
                // Mappings learned or made under the savepoint are gone with it.
                if let Some(remap) = &mut self.remap {
                    remap.rolled_back();
                }
                Ok(Err((
                    ChunkState::Failed,
                    format!("the repair of {} failed: {why}", chunk.table),
                )))
            }
        }
    }

    /// A seeding repair of `tables` starts or ends in the stream (see [`super::Target`]).
    pub async fn seeding(
        &mut self,
        repair: i64,
        tables: &[String],
        on: bool,
        source: Source,
    ) -> Result<(), ApplyError> {
        // What came before applies under the old rules.
        self.flush().await?;
        self.set_seeding(tables, on);
        if !on {
            self.begin().await?;
            self.settle().await?;
            let lsn = source.lsn.to_string();
            self.client
                .execute(&repairs::record_seeded(), &[&repair, &lsn])
                .await
                .map_err(query_error("noting a seeding's end"))?;
        }
        tracing::info!(repair, tables = %tables.join(", "), "online seeding {}", if on { "starts" } else { "done" });
        Ok(())
    }

    /// Marks `tables` (config names) as being seeded, or not.
    fn set_seeding(&mut self, tables: &[String], on: bool) {
        for t in &mut self.tables {
            if tables.contains(&t.meta.table_name().to_string()) {
                t.seeding = on;
            }
        }
    }

    /// Marks the tables of seeding repairs not ended as the target's state says (a session
    /// starting where the stream is between a seeding's start and its end).
    pub async fn load_seeding(&mut self) -> Result<(), ApplyError> {
        let tables = repairs::seeding_tables(&self.client, &self.slot).await?;
        self.set_seeding(&tables, true);
        Ok(())
    }

    /// The chunk's table and, for each of its columns, the production column.
    fn chunk_shape(&self, chunk: &Chunk) -> Result<(usize, Vec<usize>), Refusal> {
        let Some(t) = self
            .tables
            .iter()
            .position(|s| s.meta.table_name().to_string() == chunk.table)
        else {
            return Err((
                ChunkState::Failed,
                format!("{} is not a managed table of this target", chunk.table),
            ));
        };
        let meta = &self.tables[t].meta;
        let mut columns = Vec::with_capacity(chunk.columns.len());
        for name in &chunk.columns {
            match meta.column_index(name) {
                Some(c) => columns.push(c),
                None => {
                    return Err((
                        ChunkState::Failed,
                        format!("production's {} has no column {name}", chunk.table),
                    ));
                }
            }
        }
        let chunk_key: Vec<usize> = chunk.key.iter().map(|&k| columns[k]).collect();
        if chunk_key != meta.key {
            return Err((
                ChunkState::Failed,
                format!(
                    "production's {} has another primary key than staging's",
                    chunk.table
                ),
            ));
        }
        Ok((t, columns))
    }

    /// Writes the chunk's rows into table `t` (`columns`: production's column of each of the
    /// chunk's), through the key map when remapping touches the table; its counts.
    async fn write_chunk(
        &mut self,
        t: usize,
        columns: &[usize],
        chunk: &Chunk,
        source: Source,
    ) -> Result<Result<Outcome, Refusal>, ApplyError> {
        let width = self.tables[t].meta.columns.len();
        let mut entries: Vec<Entry> = Vec::with_capacity(chunk.upserts.len() + chunk.deletes.len());
        for values in &chunk.upserts {
            let mut row: Tuple = vec![Value::UnchangedToast; width];
            for (&c, value) in columns.iter().zip(values) {
                row[c] = text_value(value);
            }
            // An update finds the row's production key through the key map (or keeps it);
            // a row production never had a key for is a new row (below).
            entries.push(Entry {
                key: key_of(&self.tables[t].meta, &row)?,
                change: NetChange::Update(row),
                source,
            });
        }
        for key in &chunk.deletes {
            entries.push(Entry {
                key: key.iter().map(|v| v.clone().map(Bytes::from)).collect(),
                change: NetChange::Delete,
                source,
            });
        }
        if self.remap.as_ref().is_some_and(|r| r.touches(t)) {
            let originals: HashMap<Key, Tuple> = entries
                .iter()
                .filter_map(|e| match &e.change {
                    NetChange::Update(row) => Some((e.key.clone(), row.clone())),
                    _ => None,
                })
                .collect();
            let (translated, unresolved) = self.translate_for_repair(t, entries).await?;
            entries = translated;
            // Rows production has no key for get one as inserts do; a key production never
            // had needs no delete.
            let new_rows: Vec<Entry> = unresolved
                .into_iter()
                .filter_map(|e| {
                    let row = originals.get(&e.key)?.clone();
                    Some(Entry {
                        key: e.key,
                        change: NetChange::Replace(row),
                        source,
                    })
                })
                .collect();
            if !new_rows.is_empty() {
                let (translated, _) = self.translate_for_repair(t, new_rows).await?;
                entries.extend(translated);
            }
            self.settle().await?;
        }
        let meta = &self.tables[t].meta;
        let mut outcome = Outcome::default();
        let (upserts, deletes): (Vec<&Entry>, Vec<&Entry>) = entries
            .iter()
            .partition(|e| !matches!(e.change, NetChange::Delete));
        if !upserts.is_empty() {
            let arrays: Vec<TextArray> = columns
                .iter()
                .map(|&c| {
                    TextArray(
                        upserts
                            .iter()
                            .map(|e| match &e.change {
                                NetChange::Replace(row)
                                | NetChange::Update(row)
                                | NetChange::Insert(row) => bytes_of(&row[c]),
                                NetChange::Delete => unreachable!("partitioned"),
                            })
                            .collect(),
                    )
                })
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let row = self
                .client
                .query_one(&statements::repair_rows(meta, columns), &refs)
                .await
                .map_err(query_error("repairing rows"))?;
            outcome.inserted = row.get(0);
            outcome.updated = row.get(1);
        }
        if !deletes.is_empty() {
            let arrays: Vec<TextArray> = (0..meta.key.len())
                .map(|k| TextArray(deletes.iter().map(|e| e.key[k].clone()).collect()))
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let deleted = self
                .client
                .execute(&statements::repair_deletes(meta), &refs)
                .await
                .map_err(query_error("repairing rows"))?;
            outcome.deleted = deleted as i64;
        }
        Ok(Ok(outcome))
    }
}

impl Applier {
    /// Table `t`'s `entries` in production's keys, the key-map writes that go with them sent;
    /// the entries that found no production key are handed back as they were.
    async fn translate_for_repair(
        &mut self,
        t: usize,
        entries: Vec<Entry>,
    ) -> Result<(Vec<Entry>, Vec<Entry>), ApplyError> {
        let mut drained: Vec<Vec<Entry>> = vec![Vec::new(); self.tables.len()];
        drained[t] = entries;
        let remap = self.remap.as_mut().expect("remapping touches the table");
        let translated = remap
            .translate(&self.client, &self.order, &mut drained)
            .await?;
        self.send_key_map(translated.writes).await?;
        let unresolved = translated.unresolved.into_iter().map(|u| u.entry).collect();
        Ok((std::mem::take(&mut drained[t]), unresolved))
    }
}

fn text_value(value: &Option<String>) -> Value {
    match value {
        Some(text) => Value::Text(Bytes::from(text.clone())),
        None => Value::Null,
    }
}

fn bytes_of(value: &Value) -> Option<Bytes> {
    match value {
        Value::Text(b) | Value::Binary(b) => Some(b.clone()),
        Value::Null | Value::UnchangedToast => None,
    }
}
