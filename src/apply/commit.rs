//! Ending a batch: closing it, committing it with its progress row, rolling back, savepoints,
//! and production's WAL flush position that says when a commit is durable.

use super::error::query_error;
use super::managed_files::FileStats;
use super::{Applier, ApplyError, ApplyStats};
use crate::model::Lsn;
use crate::quote::quote_ident;
use crate::state::{self, Progress};

/// The COMMIT, then where production's WAL ends after its commit record and how far it is
/// flushed (see [`Committed`]).
pub(super) const COMMIT_AND_POSITIONS: &str =
    "COMMIT; SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text";

/// Where a savepoint was set ([`Applier::savepoint`]): what rolling back to it restores.
#[derive(Clone, Copy, Debug)]
pub struct Savepoint {
    stats: ApplyStats,
    files: usize,
    invalidations: usize,
}

/// A batch committed on production, not necessarily flushed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// End of the last staging transaction in it.
    pub end: Lsn,
    /// Production's WAL position at or past its commit record: durable once flushed this far.
    pub durable_at: Lsn,
    /// Production's WAL flush position right after the commit.
    pub flushed: Lsn,
}

/// Makes production flush its WAL as far as it goes now: a transaction that writes (`slot`'s
/// progress row, unchanged) commits synchronously, and the flush of its commit record covers
/// every asynchronous commit before it. What a session sees committed is visible before it is
/// durable (sync commits asynchronously): only after this may staging be told it is applied.
pub async fn flush_wal(client: &tokio_postgres::Client, slot: &str) -> Result<(), ApplyError> {
    let flush = async {
        client
            .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
            .await?;
        state::progress::touch(client, slot).await?;
        client.batch_execute("COMMIT").await
    };
    if let Err(e) = flush.await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(query_error("flushing production's WAL")(e));
    }
    Ok(())
}

impl Applier {
    /// Production's WAL flush position now.
    pub(super) async fn wal_flushed(&self) -> Result<Lsn, ApplyError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(query_error("reading production's WAL flush position"))?;
        Ok(row.get::<_, &str>(0).parse().unwrap_or_default())
    }

    /// Makes production flush its WAL as far as it goes now and returns the flush position
    /// (see [`flush_wal`]).
    pub(super) async fn flush_wal(&self) -> Result<Lsn, ApplyError> {
        flush_wal(&self.client, &self.slot).await?;
        self.wal_flushed().await
    }

    /// Ends the batch whose last staging transaction is `last`: sends what is pending and
    /// returns without waiting for production. The batch commits ([`Applier::complete`]) when
    /// the next batch first needs the session, so production runs one batch's statements while
    /// the pipeline reads and consolidates the next.
    /// A small batch on a caught-up session may go with its COMMIT instead ([`super::one_trip`]).
    pub async fn close(&mut self, last: &Progress) -> Result<(), ApplyError> {
        if !self.close_in_one_trip(last).await? {
            self.begin().await?;
            self.flush().await?;
        }
        self.closing = Some(*last);
        self.sent_rows = 0;
        self.sent_bytes = 0;
        self.files.close();
        Ok(())
    }

    /// Commits the closed batch, if there is one: settles its statements (conflict policy),
    /// records its last staging transaction in the progress table, and commits (asynchronously:
    /// see [`Committed`]). The caller takes the result from [`Applier::take_committed`].
    /// Index builds a schema change of the batch left to run after it run next (not while a
    /// transaction is still open: a build cannot run inside one).
    pub async fn complete(&mut self) -> Result<(), ApplyError> {
        self.complete_batch().await?;
        if !self.builds_waiting.is_empty() && !self.in_transaction {
            self.run_index_builds().await?;
        }
        Ok(())
    }

    async fn complete_batch(&mut self) -> Result<(), ApplyError> {
        let Some(last) = self.closing.take() else {
            return Ok(());
        };
        if let Some(trip) = self.one_trip.take() {
            return Box::pin(self.complete_one_trip(last, trip)).await;
        }
        self.settle().await?;
        if let Err(e) = self.run_hooks().await {
            let _ = self.rollback().await;
            return Err(e);
        }
        // Files go into place before the COMMIT: a crash between the two leaves them ahead of
        // production, and applying the batch again rewrites the same content.
        if let Err(e) = self.files.publish() {
            let _ = self.rollback().await;
            return Err(e.into());
        }
        let files = std::mem::take(&mut self.files.stats);
        if files != FileStats::default() {
            metrics::counter!("stagingprop_files_total", "op" => "written")
                .increment(files.written);
            metrics::counter!("stagingprop_files_total", "op" => "removed")
                .increment(files.removed);
            metrics::counter!("stagingprop_files_total", "op" => "refused")
                .increment(files.refused);
        }
        self.stats.files.add(files);
        let statement = match (&self.progress_statement, self.record_progress) {
            (_, false) => None,
            (Some(statement), true) => Some(statement.clone()),
            (None, true) => {
                let statement = state::progress::prepare_advance(&self.client).await?;
                self.progress_statement = Some(statement.clone());
                Some(statement)
            }
        };
        // The progress row's guarded write and the COMMIT travel together (one round trip): a
        // write that finds the row moved fails, so the COMMIT behind it rolls back. With the
        // COMMIT: where production's WAL ends after the commit record (durable once flushed
        // that far) and how far it is flushed already.
        let advance = async {
            match &statement {
                Some(statement) => {
                    state::progress::advance_prepared(
                        &self.client,
                        statement,
                        &self.slot,
                        &last,
                        self.progress_at,
                    )
                    .await
                }
                None => Ok(true),
            }
        };
        let commit = self.client.simple_query(COMMIT_AND_POSITIONS);
        let (written, replies) = tokio::join!(advance, commit);
        if !matches!(written, Ok(true)) {
            // The transaction is over (the COMMIT rolled it back, or the session is gone).
            self.in_transaction = false;
            let _ = self.rollback().await;
            return Err(match written {
                Err(e) => e.into(),
                // The error to report is the moved row, whatever the rollback says.
                _ => ApplyError::ProgressMoved {
                    slot: self.slot.clone(),
                    expected: self.progress_at,
                },
            });
        }
        metrics::counter!("stagingprop_batches_total", "round_trips" => "two").increment(1);
        self.committed_with(&last, replies.map_err(query_error("COMMIT"))?)
    }

    /// The batch ending with `last` committed; `replies` is what production answered the
    /// COMMIT with its WAL positions.
    pub(super) fn committed_with(
        &mut self,
        last: &Progress,
        replies: Vec<tokio_postgres::SimpleQueryMessage>,
    ) -> Result<(), ApplyError> {
        self.in_transaction = false;
        self.stats.batches += 1;
        self.progress_at = last.end_lsn;
        let row = replies.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let lsn = |i: usize| -> Result<Lsn, ApplyError> {
            row.and_then(|r| r.get(i))
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    ApplyError::Schema(
                        "production did not report its WAL position after COMMIT".into(),
                    )
                })
        };
        self.committed.push(Committed {
            end: last.end_lsn,
            durable_at: lsn(0)?,
            flushed: lsn(1)?,
        });
        Ok(())
    }

    /// Sends and settles everything pending, then sets savepoint `name` in the open
    /// transaction (a staging subtransaction starts: it may be rolled back alone).
    pub async fn savepoint(&mut self, name: &str) -> Result<Savepoint, ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        self.client
            .batch_execute(&format!("SAVEPOINT {}", quote_ident(name)))
            .await
            .map_err(query_error("SAVEPOINT"))?;
        Ok(Savepoint {
            stats: self.stats,
            files: self.files.mark(),
            invalidations: self.invalidations.mark(),
        })
    }

    /// Undoes everything since savepoint `name`, what is pending in memory included.
    pub async fn rollback_to(&mut self, name: &str, at: Savepoint) -> Result<(), ApplyError> {
        self.settle().await?;
        for t in &mut self.tables {
            t.changes.drain();
        }
        self.pending_rows = 0;
        self.pending_bytes = 0;
        self.files.rewind(at.files);
        self.invalidations.rewind(at.invalidations);
        self.stats = at.stats;
        self.client
            .batch_execute(&format!("ROLLBACK TO SAVEPOINT {}", quote_ident(name)))
            .await
            .map_err(query_error("ROLLBACK TO SAVEPOINT"))
    }

    /// Rolls the open transaction back at once, statements still in flight included, before
    /// an error ends the batch (the caller's [`Applier::rollback`] then has nothing left to
    /// roll back).
    pub(super) async fn abandon_batch(&mut self) {
        if self.in_transaction {
            for flight in self.in_flight.drain(..) {
                let _ = flight.result.await;
            }
            self.in_transaction = false;
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
    }

    /// Abandons the open transaction (a closed batch included) and everything pending.
    pub async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.closing = None;
        if let Some(trip) = self.one_trip.take() {
            trip.abandon();
        }
        self.files.discard();
        self.invalidations.clear();
        // Recorded in the transaction, gone with it.
        self.builds_waiting.clear();
        for flight in self.in_flight.drain(..) {
            flight.result.abort();
        }
        for t in &mut self.tables {
            t.changes.drain();
        }
        if let Some(remap) = &mut self.remap {
            remap.rolled_back();
        }
        self.pending_rows = 0;
        self.pending_bytes = 0;
        self.sent_rows = 0;
        self.sent_bytes = 0;
        if self.in_transaction {
            self.in_transaction = false;
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(query_error("ROLLBACK"))?;
        }
        Ok(())
    }
}
