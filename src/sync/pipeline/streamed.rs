//! Large transactions staging streams while they are in progress (pgoutput protocol 2): each is
//! applied as it arrives in a target session of its own, with a savepoint per subtransaction,
//! and commits with the progress row at its Stream Commit, after everything that committed on
//! staging before it.

use std::future::Future;
use std::pin::Pin;

use super::Pipeline;
use crate::apply::ApplyStats;
use crate::apply::Target;
use crate::model::{Lsn, Xid};
use crate::state::Progress;
use crate::sync::SyncError;
use crate::sync::report::ChangeCounts;

/// Opens a target session for a streamed transaction.
pub(in crate::sync) type OpenSession<T> =
    Box<dyn FnMut() -> Pin<Box<dyn Future<Output = Result<T, SyncError>> + Send>> + Send>;

/// How sync opens target sessions for streamed transactions, and the ones it may reuse.
pub(in crate::sync) struct StreamSessions<T> {
    open: OpenSession<T>,
    idle: Vec<T>,
}

impl<T> StreamSessions<T> {
    pub(in crate::sync) fn new(open: OpenSession<T>) -> Self {
        StreamSessions {
            open,
            idle: Vec::new(),
        }
    }
}

/// A large staging transaction staging streams while it is in progress: applied as it
/// arrives in a production transaction of its own, committed when staging's commits.
pub(super) struct StreamedTxn<T: Target> {
    pub(super) applier: T,
    /// Staging's changes applied in it so far (the run's count once it commits).
    pub(super) counts: ChangeCounts,
    /// Its subtransactions seen so far, in order, with the savepoint each started at: a
    /// subtransaction that aborts rolls back to its savepoint, which also undoes the ones
    /// nested in it (they all came after it).
    savepoints: Vec<(Xid, T::Savepoint, ChangeCounts)>,
}

fn streamed_transaction_ended(outcome: &'static str, open: usize) {
    metrics::counter!("stagingprop_streamed_transactions_total", "outcome" => outcome).increment(1);
    metrics::gauge!("stagingprop_streamed_transactions_open").set(open as f64);
}

/// The savepoint a streamed subtransaction starts at.
fn savepoint_name(subxact: Xid) -> String {
    format!("stagingprop_subxact_{subxact}")
}

impl<T: Target> Pipeline<'_, T> {
    /// In a streamed block, a change of a subtransaction not seen before starts a savepoint.
    pub(super) async fn enter_subxact(&mut self, xid: Option<Xid>) -> Result<(), SyncError> {
        let (Some(top), Some(xid)) = (self.in_stream, xid) else {
            return Ok(());
        };
        let Some(streamed) = self.streams.get_mut(&top) else {
            return Ok(());
        };
        if xid == top || streamed.savepoints.iter().any(|(x, _, _)| *x == xid) {
            return Ok(());
        }
        let at = streamed.applier.savepoint(&savepoint_name(xid)).await?;
        streamed.savepoints.push((xid, at, streamed.counts.clone()));
        Ok(())
    }

    /// Stream Start: the changes that follow belong to `xid`, in a session of its own.
    pub(super) async fn stream_start(&mut self, xid: Xid) -> Result<(), SyncError> {
        // What committed on staging before this block may hold row locks its changes need (it
        // committed first there): it commits on production first, or the two sessions would
        // wait for each other.
        self.commit_batch().await?;
        self.complete_batch().await?;
        if !self.streams.contains_key(&xid) {
            let Some(sessions) = &mut self.stream_sessions else {
                return Err(SyncError::Protocol(format!(
                    "staging streamed transaction {xid}, which sync did not ask for"
                )));
            };
            let mut applier = match sessions.idle.pop() {
                Some(applier) => applier,
                None => (sessions.open)().await?,
            };
            applier.set_one_by_one(self.one_by_one_until.is_some());
            self.shape_session(&mut applier).await?;
            self.streams.insert(
                xid,
                StreamedTxn {
                    applier,
                    counts: ChangeCounts::default(),
                    savepoints: Vec::new(),
                },
            );
            metrics::gauge!("stagingprop_streamed_transactions_open")
                .set(self.streams.len() as f64);
        }
        self.in_stream = Some(xid);
        Ok(())
    }

    /// Stream Abort: of the whole transaction, or of a subtransaction (back to its savepoint).
    /// `abort_lsn` is known with protocol 4 only; it names the abort in the log.
    pub(super) async fn stream_abort(
        &mut self,
        xid: Xid,
        subxact: Xid,
        abort_lsn: Option<Lsn>,
    ) -> Result<(), SyncError> {
        if subxact == xid {
            if let Some(mut streamed) = self.streams.remove(&xid) {
                match abort_lsn {
                    Some(lsn) => tracing::info!(
                        xid,
                        %lsn,
                        "staging rolled back streamed transaction {xid} at {lsn}; its production session rolls back"
                    ),
                    None => tracing::info!(
                        xid,
                        "staging rolled back streamed transaction {xid}; its production session rolls back"
                    ),
                }
                streamed.applier.rollback().await?;
                self.reuse(streamed.applier);
                streamed_transaction_ended("aborted", self.streams.len());
            }
            return Ok(());
        }
        let Some(streamed) = self.streams.get_mut(&xid) else {
            return Ok(());
        };
        // A subtransaction with no change of a managed table has no savepoint: nothing to undo.
        if let Some(i) = streamed
            .savepoints
            .iter()
            .position(|(x, _, _)| *x == subxact)
        {
            let at = streamed.savepoints[i].1;
            streamed.counts = streamed.savepoints[i].2.clone();
            streamed
                .applier
                .rollback_to(&savepoint_name(subxact), at)
                .await?;
            streamed.savepoints.truncate(i);
        }
        Ok(())
    }

    /// Stream Commit: everything committed before it is committed first, then its session
    /// commits with the progress row (or rolls back: already applied by an earlier run).
    pub(super) async fn stream_commit(
        &mut self,
        xid: Xid,
        last: Progress,
    ) -> Result<(), SyncError> {
        let Some(mut streamed) = self.streams.remove(&xid) else {
            return Err(SyncError::Protocol(format!(
                "Stream Commit of transaction {xid} at {}, which was never streamed",
                last.commit_lsn
            )));
        };
        self.commit_batch().await?;
        self.complete_batch().await?;
        if self.applied_end.is_valid() && last.commit_lsn < self.applied_end {
            streamed.applier.rollback().await?;
            self.reuse(streamed.applier);
            streamed_transaction_ended("already_applied", self.streams.len());
            return Ok(());
        }
        if self
            .until
            .is_some_and(|until| until.passed_by(last.commit_lsn, last.commit_time))
        {
            // Committed past the cutoff: not applied, nor anything after it.
            streamed.applier.rollback().await?;
            self.reuse(streamed.applier);
            streamed_transaction_ended("past_cutoff", self.streams.len());
            self.reached_until = true;
            return Ok(());
        }
        let applier = &mut streamed.applier;
        applier.set_progress_at(self.applier.progress_at());
        applier.commit(&last).await?;
        applier.complete().await?;
        self.applier.set_progress_at(last.end_lsn);
        applier.stats_mut().transactions += 1;
        let stats = applier.stats();
        self.applier.stats_mut().add(&stats);
        self.committed_counts.add(&streamed.counts);
        let committed = applier.take_committed();
        self.reuse(streamed.applier);
        streamed_transaction_ended("committed", self.streams.len());
        self.last_commit_time = Some(last.commit_time);
        for committed in committed {
            self.note_committed(committed);
        }
        Ok(())
    }

    /// Keeps a streamed transaction's session, its transaction ended (its counts taken or
    /// void), for the next one.
    fn reuse(&mut self, mut applier: T) {
        *applier.stats_mut() = ApplyStats::default();
        if let Some(sessions) = &mut self.stream_sessions {
            sessions.idle.push(applier);
        }
    }
}
