//! A repair chunk at its high watermark: production's rows of the chunk made equal to the
//! rows staging's snapshot held (missing inserted, different updated, extra deleted), in the
//! open transaction after everything the stream carried before it, with the chunk's outcome
//! written beside them (`stagingprop.repair_chunks`), so the chunk and the progress row
//! commit together. Rows production's users edited were left out by the repair already.

use bytes::Bytes;

use super::error::query_error;
use super::in_flight::TextArray;
use super::{Applier, ApplyError, statements};
use crate::change::Source;
use crate::repair::{AtHigh, Chunk};
use crate::state::repairs::{self, ChunkState, Outcome};
use tokio_postgres::types::ToSql;

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
                let result = self.guarded_write(&chunk).await?.map(|mut outcome| {
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
    /// type) fails the chunk, not the batch, so a repair never stops sync.
    async fn guarded_write(
        &mut self,
        chunk: &Chunk,
    ) -> Result<Result<Outcome, Refusal>, ApplyError> {
        self.client
            .batch_execute("SAVEPOINT stagingprop_repair")
            .await
            .map_err(query_error("SAVEPOINT"))?;
        match self.write_chunk(chunk).await {
            Err(tokio_err) if tokio_err.as_db_error().is_some() => {
                self.client
                    .batch_execute("ROLLBACK TO SAVEPOINT stagingprop_repair")
                    .await
                    .map_err(query_error("ROLLBACK TO SAVEPOINT"))?;
                let db = tokio_err.as_db_error().expect("checked");
                Ok(Err((
                    ChunkState::Failed,
                    format!(
                        "production refused the repair of {}: {} (SQLSTATE {})",
                        chunk.table,
                        db.message(),
                        db.code().code()
                    ),
                )))
            }
            Err(e) => Err(query_error("repairing rows")(e)),
            Ok(result) => {
                self.client
                    .batch_execute("RELEASE SAVEPOINT stagingprop_repair")
                    .await
                    .map_err(query_error("RELEASE SAVEPOINT"))?;
                if let Ok(outcome) = &result {
                    self.stats.rows_inserted += outcome.inserted as u64;
                    self.stats.rows_updated += outcome.updated as u64;
                    self.stats.rows_deleted += outcome.deleted as u64;
                }
                Ok(result)
            }
        }
    }

    /// Writes the chunk's rows; its counts, or why it could not.
    async fn write_chunk(
        &mut self,
        chunk: &Chunk,
    ) -> Result<Result<Outcome, Refusal>, tokio_postgres::Error> {
        let Some(t) = self
            .tables
            .iter()
            .position(|s| s.meta.table_name().to_string() == chunk.table)
        else {
            return Ok(Err((
                ChunkState::Failed,
                format!("{} is not a managed table of this target", chunk.table),
            )));
        };
        let meta = &self.tables[t].meta;
        let mut columns = Vec::with_capacity(chunk.columns.len());
        for name in &chunk.columns {
            match meta.column_index(name) {
                Some(c) => columns.push(c),
                None => {
                    return Ok(Err((
                        ChunkState::Failed,
                        format!("production's {} has no column {name}", chunk.table),
                    )));
                }
            }
        }
        let chunk_key: Vec<usize> = chunk.key.iter().map(|&k| columns[k]).collect();
        if chunk_key != meta.key {
            return Ok(Err((
                ChunkState::Failed,
                format!(
                    "production's {} has another primary key than staging's",
                    chunk.table
                ),
            )));
        }
        let mut outcome = Outcome::default();
        if !chunk.upserts.is_empty() {
            let arrays: Vec<TextArray> = (0..columns.len())
                .map(|j| {
                    TextArray(
                        chunk
                            .upserts
                            .iter()
                            .map(|row| row[j].clone().map(Bytes::from))
                            .collect(),
                    )
                })
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let row = self
                .client
                .query_one(&statements::repair_rows(meta, &columns), &refs)
                .await?;
            outcome.inserted = row.get(0);
            outcome.updated = row.get(1);
        }
        if !chunk.deletes.is_empty() {
            let arrays: Vec<TextArray> = (0..chunk.key.len())
                .map(|k| {
                    TextArray(
                        chunk
                            .deletes
                            .iter()
                            .map(|key| key[k].clone().map(Bytes::from))
                            .collect(),
                    )
                })
                .collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
            let deleted = self
                .client
                .execute(&statements::repair_deletes(meta), &refs)
                .await?;
            outcome.deleted = deleted as i64;
        }
        Ok(Ok(outcome))
    }
}
