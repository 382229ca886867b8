//! A caught-up batch in one round trip: its statements, the progress row's write and the COMMIT
//! sent together, instead of waiting for the statements' results before the COMMIT.
//!
//! The careful way reads what each statement reports (rows not inserted, not updated, not
//! deleted) before committing, because the table's conflict policy decides what a conflict
//! does. Under `on_conflict = "error"` every conflict stops the batch, and under `"overwrite"`
//! an insert never conflicts (it replaces the row) and the other conflicts are rare, so the
//! statements can be *checked* ones that fail on the server at a conflict (a plain INSERT's
//! unique violation, an UPDATE or DELETE whose row count falls short): a failure aborts
//! production's transaction and the COMMIT behind it rolls back. Nothing of such a batch is
//! committed; it is then applied again the careful way in the same session, which finds the
//! conflict and handles it as before (or, for an ordering artefact of a set-based statement,
//! meets the same error the careful way would). A caught-up sync saves one round trip to production per batch, which
//! is most of what it adds to a change's lag after staging's walsender.
//!
//! Only batches whose every change is still in memory at the close go this way, with no key
//! remapping, cache invalidation, managed files, replaced rows or replay one change at a time,
//! and no table under `on_conflict = "skip"` (its conflicts go to the quarantine, in the same
//! transaction); the rest take the careful way.

use tokio::task::JoinHandle;
use tokio_postgres::SimpleQueryMessage;

use super::commit::COMMIT_AND_POSITIONS;
use super::error::query_error;
use super::in_flight::{lost_response, start};
use super::{Applier, ApplyError};
use crate::change::{Entry, NetChange};
use crate::state::{self, Progress, StateError};

type CommitReply = (
    Result<bool, StateError>,
    Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>,
);

/// A batch sent with its COMMIT.
pub(super) struct OneTrip {
    /// Its changes per table, to apply again the careful way.
    drained: Vec<Vec<Entry>>,
    /// The progress row's write and the COMMIT.
    commit: JoinHandle<CommitReply>,
}

impl OneTrip {
    /// The session gives the batch up (it rolls back).
    pub(super) fn abandon(self) {
        self.commit.abort();
    }
}

/// Production refused a batch sent the quick way: it is applied again the careful way.
fn note_refused() {
    metrics::counter!("stagingprop_batches_total", "round_trips" => "one, refused").increment(1);
    tracing::debug!(
        "production refused a batch sent with its COMMIT: applying it again the careful way"
    );
}

impl Applier {
    /// Whether the batch being closed may go in one round trip, before anything is sent.
    fn one_trip_allowed(&self) -> bool {
        !self.in_transaction
            && self.closing.is_none()
            && !self.one_by_one
            && self.record_progress
            && self.remap.is_none()
            && self.hooks.is_none()
            && self.files.mark() == 0
            && self
                .tables
                .iter()
                .all(|t| t.changes.is_empty() || t.policy.allows_one_trip())
    }

    /// Closes the batch ending with `last` in one round trip when it may; false when it went
    /// nowhere (the caller takes the careful way). Any batch closed before commits first.
    pub(super) async fn close_in_one_trip(&mut self, last: &Progress) -> Result<bool, ApplyError> {
        self.complete().await?;
        if !self.one_trip_allowed() {
            return Ok(false);
        }
        let statement = match &self.progress_statement {
            Some(statement) => statement.clone(),
            None => {
                let statement = state::progress::prepare_advance(&self.client).await?;
                self.progress_statement = Some(statement.clone());
                statement
            }
        };
        self.begin().await?;
        let drained = self.drain_pending();
        let replaces = drained
            .iter()
            .flatten()
            .any(|e| matches!(e.change, NetChange::Replace(_)));
        if replaces {
            // A replaced row's delete may find no row: not a conflict, so not checkable.
            self.send_drained(drained).await?;
            return Ok(true);
        }
        if self.send_statements(drained.clone(), true).await.is_err() {
            // A checked statement failed on the server before a later one was prepared (the
            // prepare then fails in the aborted transaction): no COMMIT went, so roll back and
            // take the careful way from the start.
            for flight in std::mem::take(&mut self.in_flight) {
                let _ = flight.result.await;
            }
            self.in_transaction = false;
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(query_error("ROLLBACK"))?;
            note_refused();
            self.stats.batches_refused += 1;
            self.begin().await?;
            self.send_drained(drained).await?;
            return Ok(true);
        }
        let client = self.client.clone();
        let (slot, last, expected) = (self.slot.clone(), *last, self.progress_at);
        let commit = start(async move {
            let advance =
                state::progress::advance_prepared(&client, &statement, &slot, &last, expected);
            tokio::join!(advance, client.simple_query(COMMIT_AND_POSITIONS))
        })
        .await;
        self.one_trip = Some(OneTrip { drained, commit });
        Ok(true)
    }

    /// Completes a batch sent with its COMMIT: committed when every statement succeeded;
    /// otherwise production rolled it back, and it is applied again the careful way.
    pub(super) async fn complete_one_trip(
        &mut self,
        last: Progress,
        trip: OneTrip,
    ) -> Result<(), ApplyError> {
        let mut reported = Vec::with_capacity(self.in_flight.len());
        let mut refused = false;
        for flight in std::mem::take(&mut self.in_flight) {
            match lost_response(flight.result.await)? {
                Ok(result) => reported.push((flight.purpose, result)),
                Err(_) => refused = true,
            }
        }
        let (written, replies) = trip
            .commit
            .await
            .map_err(|e| ApplyError::Schema(format!("the COMMIT's response was lost: {e}")))?;
        // Whatever the rest says, the COMMIT of a transaction a statement aborted rolled back.
        self.in_transaction = false;
        if refused {
            note_refused();
            self.stats.batches_refused += 1;
            self.begin().await?;
            self.send_drained(trip.drained).await?;
            self.closing = Some(last);
            return Box::pin(self.complete()).await;
        }
        match written {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.rollback().await;
                return Err(ApplyError::ProgressMoved {
                    slot: self.slot.clone(),
                    expected: self.progress_at,
                });
            }
            Err(e) => {
                let _ = self.rollback().await;
                return Err(e.into());
            }
        }
        let replies = replies.map_err(query_error("COMMIT"))?;
        // Counts only: a checked statement that succeeded met no conflict.
        for (purpose, result) in reported {
            self.settle_one(purpose, result).await?;
        }
        metrics::counter!("stagingprop_batches_total", "round_trips" => "one").increment(1);
        self.stats.batches_one_trip += 1;
        self.committed_with(&last, replies)
    }
}
