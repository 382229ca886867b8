//! The pipeline of one session: staging's messages in, production's transactions out. It
//! skips what production already has, assembles transactions, batches consecutive ones until a
//! limit, sends large ones in pieces, routes streamed transactions to their own sessions, and
//! confirms a position only once the target reports it durable. Everything it does to the
//! target goes through [`Target`], so its decisions are tested without a database.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;

use super::feed::Feed;
use super::pace::Pace;
use super::receiver;
use super::report::{ChangeCounts, Op};
use super::retry::{RunState, SessionEnd};
use super::session::emit_heartbeat;
use super::streamed::{StreamSessions, StreamedTxn};
use super::target::Target;
use super::until::Until;
use super::{SyncError, database_error};
use crate::apply::{self, ApplyError};
use crate::catalog::{self, ColumnMap};
use crate::change::{Key, RowOp, Source};
use crate::config::{Config, TableName};
use crate::model::{Lsn, Oid, OldTuple, Relation, Tuple, Value, Xid};
use crate::pg::connect::Endpoint;
use crate::pg::replication::{DurablePosition, FlushHandle, ReplicationError};
use crate::pgoutput::LogicalMessage;
use crate::state::Progress;

/// The transaction being received.
pub(super) struct OpenTxn {
    xid: Xid,
    /// Already on production (its commit lies before production's progress).
    skip: bool,
    /// Where its commit record starts (Begin's final LSN).
    commit_lsn: Lsn,
}

/// A staging relation as sync applies it.
struct RelationInfo {
    table: usize,
    map: ColumnMap,
    production_width: usize,
    /// Staging's columns are production's, in the same order.
    identity: bool,
    /// Its table was copied from a snapshot taken at this position, later than the hand-off.
    copied_at: Option<Lsn>,
}

/// Where the applier reports what the target committed.
pub(super) enum Confirm {
    /// Staging may release it.
    Slot(FlushHandle),
    /// The spool's receiver may delete it (and, over `max_bytes`, confirm it to staging).
    Spool(Arc<receiver::SpoolShared>),
    /// Replay: nobody.
    Nothing,
    /// The pipeline's unit tests: every position confirmed, in order.
    #[cfg(test)]
    Record(Arc<std::sync::Mutex<Vec<Lsn>>>),
}

impl Confirm {
    pub(super) fn applied(&self, end: Lsn) {
        match self {
            Confirm::Slot(flush) => flush.confirm(DurablePosition::after_durable_commit(end)),
            Confirm::Spool(shared) => {
                shared.applied.send_if_modified(|applied| {
                    let newer = end > *applied;
                    *applied = (*applied).max(end);
                    newer
                });
            }
            Confirm::Nothing => {}
            #[cfg(test)]
            Confirm::Record(confirmed) => confirmed.lock().unwrap().push(end),
        }
    }
}

pub(super) struct Pipeline<'a, T: Target> {
    config: &'a Config,
    staging: &'a Endpoint,
    /// The main session: every transaction but the streamed ones.
    pub(super) applier: T,
    relations: HashMap<Oid, RelationInfo>,
    pub(super) txn: Option<OpenTxn>,
    /// The last staging transaction in the open production transaction.
    batch_last: Option<Progress>,
    batch_started: Option<Instant>,
    /// How late batches commit (for `batch_linger_ms`).
    pace: Pace,
    pub(super) applied_end: Lsn,
    confirm: Confirm,
    last_activity: Instant,
    pub(super) one_by_one_until: Option<Lsn>,
    pub(super) last_received: Lsn,
    sequences_synced: bool,
    pub(super) last_commit_time: Option<crate::model::PgTimestamp>,
    rows_at_batch_start: u64,
    unflushed: Unflushed,
    /// Set when staging streams large transactions in progress.
    pub(super) stream_sessions: Option<StreamSessions<T>>,
    /// Streamed transactions in progress.
    pub(super) streams: HashMap<Xid, StreamedTxn<T>>,
    /// Staging's changes of the open batch, of closed batches waiting for their commit (oldest
    /// first), and of every batch committed (what the run report shows).
    open_counts: ChangeCounts,
    closed_counts: VecDeque<ChangeCounts>,
    pub(super) committed_counts: ChangeCounts,
    /// Quarantined changes the progress report has mentioned.
    quarantine_reported: u64,
    /// `--until`: the cutoff, and whether a transaction past it has arrived (the run then ends
    /// once everything before it is committed).
    pub(super) until: Option<Until>,
    pub(super) reached_until: bool,
    /// The streamed transaction whose block is open (between Stream Start and Stream Stop):
    /// the changes that arrive belong to it.
    pub(super) in_stream: Option<Xid>,
    /// Fed from a JetStream stream: the sequence of the message the last one came from.
    feed_sequence: Option<u64>,
    /// Tables a resumed copy loaded from a snapshot later than the hand-off, with its position.
    pub(super) copied_at: HashMap<TableName, Lsn>,
}

/// Batches committed on production whose commit record production may not have flushed yet:
/// (production WAL position to be flushed past, staging end), oldest first.
#[derive(Debug, Default)]
pub(super) struct Unflushed(VecDeque<(Lsn, Lsn)>);

impl Unflushed {
    fn committed(&mut self, durable_at: Lsn, end: Lsn) {
        self.0.push_back((durable_at, end));
    }

    /// Drops the batches production has flushed past; the staging end of the newest of them.
    fn flushed(&mut self, flushed: Lsn) -> Option<Lsn> {
        let mut durable = None;
        while let Some(&(at, end)) = self.0.front() {
            if at > flushed {
                break;
            }
            durable = Some(end);
            self.0.pop_front();
        }
        durable
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// At most how many received messages are handled one after the other without looking at the
/// clock, the shutdown signal or the gauges.
const READY_BURST: usize = 256;

/// How often an idle pipeline asks production how far its WAL is flushed, while batches wait
/// to be confirmed (the WAL writer flushes asynchronous commits within 3 x wal_writer_delay).
const FLUSH_POLL: Duration = Duration::from_millis(200);

impl<'a, T: Target> Pipeline<'a, T> {
    /// A pipeline starting after `applied_end` (what the target has), its run's counters in
    /// `state`.
    pub(super) fn new(
        config: &'a Config,
        staging: &'a Endpoint,
        applier: T,
        applied_end: Lsn,
        confirm: Confirm,
        state: &RunState,
        stream_sessions: Option<StreamSessions<T>>,
    ) -> Self {
        let quarantine_reported = applier.stats().conflicts_skipped;
        let rows = applier.stats().rows_inserted
            + applier.stats().rows_updated
            + applier.stats().rows_deleted;
        Pipeline {
            config,
            staging,
            applier,
            relations: HashMap::new(),
            txn: None,
            batch_last: None,
            batch_started: None,
            pace: Pace::new(Duration::from_millis(config.sync.batch_linger_ms)),
            applied_end,
            confirm,
            last_activity: Instant::now(),
            one_by_one_until: state.one_by_one_until,
            last_received: state.last_received,
            sequences_synced: false,
            last_commit_time: None,
            rows_at_batch_start: rows,
            unflushed: Unflushed::default(),
            stream_sessions,
            streams: HashMap::new(),
            quarantine_reported,
            open_counts: ChangeCounts::default(),
            closed_counts: VecDeque::new(),
            committed_counts: ChangeCounts::default(),
            until: None,
            reached_until: false,
            in_stream: None,
            feed_sequence: None,
            copied_at: HashMap::new(),
        }
    }

    pub(super) async fn run<S>(
        &mut self,
        feed: &mut Feed,
        staging: Option<&tokio_postgres::Client>,
        state: &mut RunState,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Result<SessionEnd, SyncError>
    where
        S: Future<Output = ()>,
    {
        let heartbeat = Duration::from_secs(self.config.sync.heartbeat_interval_secs);
        let mut report = Instant::now();
        let mut burst: usize = 0;
        loop {
            if let Some(stop) = state.stop_lsn
                && self.applied_end.is_valid()
                && self.applied_end >= stop
                && self.txn.is_none()
            {
                self.finish().await?;
                return Ok(SessionEnd::Stopped);
            }
            // Messages already received are taken in bursts, past the timers, gauges and
            // reports below: per message those would cost more than decoding it does.
            let ready = match burst.checked_sub(1) {
                Some(left) => {
                    burst = left;
                    feed.next_ready().await
                }
                None => None,
            };
            // `None`: nothing arrived within the wait.
            let next = match ready {
                Some(next) => Some(next),
                None => {
                    let wait = self.between_bursts(feed, staging, &mut report).await?;
                    burst = READY_BURST;
                    if wait.is_zero() {
                        // No timer: a zero-length one still waits for the timer's next tick
                        // (a millisecond), which a caught-up batch would pay twice.
                        feed.next_ready().await
                    } else {
                        tokio::select! {
                            next = tokio::time::timeout(wait, feed.next()) => next.ok(),
                            _ = shutdown.as_mut() => {
                                self.finish().await?;
                                tracing::info!(applied = %self.applied_end, "stopping: everything applied is confirmed");
                                return Ok(SessionEnd::Stopped);
                            }
                        }
                    }
                }
            };
            match next {
                None => {
                    if self.applier.closing() {
                        self.complete_batch().await?;
                    } else if self.batch_started.is_some() && self.txn.is_none() {
                        self.commit_batch().await?;
                    } else if !self.unflushed.is_empty() && self.txn.is_none() {
                        let flushed = self.applier.wal_flushed().await?;
                        self.confirm_flushed(flushed);
                    } else if self.txn.is_none() && self.last_activity.elapsed() >= heartbeat {
                        // Idle: a transactional message gives the slot something to confirm,
                        // so staging never keeps WAL for an idle sync (in spool mode the
                        // receiver does this).
                        // Best effort: failing to emit only delays the slot's advance.
                        if let (Feed::Slot(_), Some(staging)) = (&*feed, staging)
                            && let Err(e) = emit_heartbeat(self.staging, staging).await
                        {
                            tracing::warn!("cannot emit a heartbeat on staging: {e}");
                        }
                        self.last_activity = Instant::now();
                    }
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) => {
                    if feed.ends() {
                        self.finish().await?;
                        tracing::info!(applied = %self.applied_end, "reached the end of what to replay");
                        return Ok(SessionEnd::Stopped);
                    }
                    return Err(SyncError::Replication(ReplicationError::Closed {
                        target: "staging".into(),
                    }));
                }
                Some(Ok(Some((lsn, message)))) => {
                    self.last_activity = Instant::now();
                    self.feed_sequence = feed.stream_sequence();
                    self.last_received = self.last_received.max(lsn);
                    let handled = self.handle(lsn, message).await;
                    // The message may have made a closed batch commit.
                    self.record_committed();
                    handled?;
                    if self.reached_until {
                        self.finish().await?;
                        tracing::info!(applied = %self.applied_end, "reached the cutoff: everything committed on staging up to it is applied");
                        return Ok(SessionEnd::Stopped);
                    }
                }
            }
        }
    }

    /// What the loop does between bursts of received messages (when none is ready, and at
    /// least every [`READY_BURST`] messages): the progress report and sequence sync every 10 s,
    /// the lag gauges, and how long to wait for the next message.
    async fn between_bursts(
        &mut self,
        feed: &Feed,
        staging: Option<&tokio_postgres::Client>,
        report: &mut Instant,
    ) -> Result<Duration, SyncError> {
        let heartbeat = Duration::from_secs(self.config.sync.heartbeat_interval_secs);
        if report.elapsed() >= Duration::from_secs(10) || !self.sequences_synced {
            *report = Instant::now();
            // Between staging transactions a closed batch may commit early, so that a long
            // backlog does not keep sequences from following.
            if self.txn.is_none() {
                self.complete_batch().await?;
            }
            if let (false, Some(staging)) = (self.applier.in_transaction(), staging) {
                self.sync_sequences(staging).await?;
            }
            self.sequences_synced = true;
            let st = self.applier.stats();
            tracing::info!(
                applied = %self.applied_end,
                transactions = st.transactions,
                inserted = st.rows_inserted,
                updated = st.rows_updated,
                deleted = st.rows_deleted,
                skipped_conflicts = st.conflicts_skipped,
                lag_bytes = feed.server_wal_end().0.saturating_sub(self.applied_end.0),
                "sync progress"
            );
            if st.conflicts_skipped > self.quarantine_reported {
                tracing::warn!(
                    new = st.conflicts_skipped - self.quarantine_reported,
                    total = st.conflicts_skipped,
                    "{} more change(s) quarantined since the last report (conflicts under on_conflict = \"skip\"); \
                     see `stagingprop quarantine list`, fix the rows, then `stagingprop quarantine retry`",
                    st.conflicts_skipped - self.quarantine_reported
                );
                self.quarantine_reported = st.conflicts_skipped;
            }
        }
        let lag_bytes = feed.server_wal_end().0.saturating_sub(self.applied_end.0);
        metrics::gauge!("stagingprop_lag_bytes").set(lag_bytes as f64);
        let lag_seconds = match self.last_commit_time {
            Some(t) if lag_bytes > 64 * 1024 => {
                (crate::model::PgTimestamp::now().0 - t.0).max(0) as f64 / 1e6
            }
            _ => 0.0,
        };
        metrics::gauge!("stagingprop_lag_seconds").set(lag_seconds);
        // Adaptive batching: a batch grows while staging's messages are ready to read; between
        // transactions with nothing ready (caught up), it is applied at once instead of
        // waiting for more, unless batches have been committing late: then it waits until it
        // is batch_linger_ms old, since one small batch per transaction falls behind a busy
        // staging and catches up in bursts (see `pace`). batch_max_delay_ms only bounds how long
        // it grows while changes keep coming (checked at each commit).
        let mut wait = match (self.txn.is_none(), self.batch_started) {
            (true, Some(started)) if feed.arrives_as_sent() => {
                self.pace.linger().saturating_sub(started.elapsed())
            }
            (true, Some(_)) => Duration::ZERO,
            (true, None) => heartbeat.saturating_sub(self.last_activity.elapsed()),
            (false, _) => heartbeat,
        };
        if !self.unflushed.is_empty() && self.txn.is_none() {
            wait = wait.min(FLUSH_POLL);
        }
        // A closed batch commits as soon as nothing is ready to read (in a
        // backlog, when the next batch needs the session).
        if self.applier.closing() {
            wait = Duration::ZERO;
        }
        Ok(wait)
    }

    /// Commits the open batch, or rolls back a transaction received only in part (it comes
    /// again next time).
    async fn finish(&mut self) -> Result<(), SyncError> {
        if self.txn.is_none() {
            self.commit_batch().await?;
        }
        self.complete_batch().await?;
        if self.txn.is_some() {
            self.applier.rollback().await?;
            self.open_counts = ChangeCounts::default();
        }
        // Streamed transactions not committed yet come again, from their start.
        for (_, mut streamed) in self.streams.drain() {
            let _ = streamed.applier.rollback().await;
        }
        self.flush_committed().await
    }

    /// Confirms every batch production has flushed past.
    fn confirm_flushed(&mut self, flushed: Lsn) {
        if let Some(end) = self.unflushed.flushed(flushed) {
            self.confirm.applied(end);
        }
    }

    /// Has production flush its WAL now (rather than wait for its WAL writer) and confirms
    /// every batch committed. Best effort: what stays unconfirmed is sent again and skipped
    /// next time.
    async fn flush_committed(&mut self) -> Result<(), SyncError> {
        if self.unflushed.is_empty() {
            return Ok(());
        }
        match self.applier.flush_wal().await {
            Ok(flushed) => self.confirm_flushed(flushed),
            Err(e) => tracing::warn!(
                "cannot confirm the last batches: {e}; staging sends them again next time and they are skipped"
            ),
        }
        Ok(())
    }

    /// Closes the open batch: its statements run on production while the next batch is read;
    /// it commits in [`Pipeline::complete_batch`] or when the next batch needs the session.
    pub(super) async fn commit_batch(&mut self) -> Result<(), SyncError> {
        let Some(last) = self.batch_last.take() else {
            return Ok(());
        };
        let started = self.batch_started.take();
        self.applier.close(&last).await?;
        self.closed_counts
            .push_back(std::mem::take(&mut self.open_counts));
        self.record_committed();
        self.last_commit_time = Some(last.commit_time);
        tracing::trace!(
            since_staging_commit_us = crate::model::PgTimestamp::now().0 - last.commit_time.0,
            "batch closed"
        );
        if let Some(started) = started {
            metrics::histogram!("stagingprop_batch_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Commits the closed batch now, if there is one.
    pub(super) async fn complete_batch(&mut self) -> Result<(), SyncError> {
        let closing = self.applier.closing();
        let completed = self.applier.complete().await;
        if closing && let Some(at) = self.last_commit_time {
            let lag_us = crate::model::PgTimestamp::now().0 - at.0;
            self.pace
                .batch_committed(Duration::from_micros(lag_us.max(0) as u64));
        }
        self.record_committed();
        Ok(completed?)
    }

    /// Takes note of the batches production committed: applied, and confirmed once flushed.
    pub(super) fn record_committed(&mut self) {
        for committed in self.applier.take_committed() {
            if let Some(counts) = self.closed_counts.pop_front() {
                self.committed_counts.add(&counts);
            }
            self.note_committed(committed);
        }
    }

    /// Counts one of staging's changes of `table` into the batch (or streamed transaction) it
    /// goes to.
    fn count(&mut self, table: usize, op: Op) {
        match self.in_stream.and_then(|xid| self.streams.get_mut(&xid)) {
            Some(streamed) => streamed.counts.count(table, op),
            None => self.open_counts.count(table, op),
        }
    }

    /// One batch committed, by the main session or a streamed transaction's.
    pub(super) fn note_committed(&mut self, committed: apply::Committed) {
        let end = committed.end;
        self.applied_end = end;
        let st = self.applier.stats();
        let rows = st.rows_inserted + st.rows_updated + st.rows_deleted;
        metrics::histogram!("stagingprop_batch_rows")
            .record((rows - self.rows_at_batch_start) as f64);
        self.rows_at_batch_start = rows;
        metrics::gauge!("stagingprop_transactions_applied_total").set(st.transactions as f64);
        self.unflushed.committed(committed.durable_at, end);
        self.confirm_flushed(committed.flushed);
        if self.one_by_one_until.is_some_and(|until| end >= until) {
            self.one_by_one_until = None;
            self.applier.set_one_by_one(false);
            tracing::info!("past the replayed stretch; applying set-based again");
        }
    }

    fn source(&self, lsn: Lsn) -> Source {
        Source {
            lsn,
            xid: self
                .txn
                .as_ref()
                .map(|t| t.xid)
                .or(self.in_stream)
                .unwrap_or(0),
        }
    }

    /// The session a row change goes to: a streamed transaction's while its block is open.
    fn target(&mut self) -> Result<&mut T, SyncError> {
        match self.in_stream {
            None => Ok(&mut self.applier),
            Some(xid) => match self.streams.get_mut(&xid) {
                Some(streamed) => Ok(&mut streamed.applier),
                None => Err(SyncError::Protocol(format!(
                    "a change in the stream of transaction {xid}, which was already aborted"
                ))),
            },
        }
    }

    /// In a streamed block, a change of a subtransaction not seen before starts a savepoint.
    async fn handle(&mut self, lsn: Lsn, message: LogicalMessage) -> Result<(), SyncError> {
        match message {
            LogicalMessage::Begin {
                final_lsn,
                xid,
                commit_time,
            } => {
                if self
                    .until
                    .is_some_and(|until| until.passed_by(final_lsn, commit_time))
                {
                    // Not applied, nor anything after it.
                    self.reached_until = true;
                    return Ok(());
                }
                // Its commit record lies before the end of the last applied transaction: applied.
                let skip = self.applied_end.is_valid() && final_lsn < self.applied_end;
                self.txn = Some(OpenTxn {
                    xid,
                    skip,
                    commit_lsn: final_lsn,
                });
                if !skip && self.batch_started.is_none() {
                    self.batch_started = Some(Instant::now());
                }
            }
            LogicalMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let txn = self
                    .txn
                    .take()
                    .ok_or_else(|| SyncError::Protocol(format!("Commit at {lsn} without Begin")))?;
                if txn.skip {
                    return Ok(());
                }
                self.batch_last = Some(Progress {
                    end_lsn,
                    commit_lsn,
                    xid: txn.xid,
                    commit_time,
                    stream_seq: self.feed_sequence,
                });
                self.applier.stats_mut().transactions += 1;
                tracing::trace!(
                    since_staging_commit_us = crate::model::PgTimestamp::now().0 - commit_time.0,
                    "commit received"
                );
                let sync = &self.config.sync;
                let full = self.applier.batch_rows() >= sync.batch_max_rows
                    || self.applier.batch_bytes() >= sync.batch_max_bytes
                    || self.applier.one_by_one()
                    || self.batch_started.is_some_and(|s| {
                        s.elapsed() >= Duration::from_millis(sync.batch_max_delay_ms)
                    });
                if full {
                    self.commit_batch().await?;
                }
            }
            LogicalMessage::Relation { relation, .. } => self.relation(relation)?,
            LogicalMessage::Insert {
                xid, relation, new, ..
            } => {
                if self.skipping() || self.held_by_copy(relation)? {
                    return Ok(());
                }
                self.enter_subxact(xid).await?;
                let (table, row) = self.to_production(relation, new)?;
                let key = self.key_of(table, &row)?;
                self.stage_file(table, None, Some(&row))?;
                let source = self.source(lsn);
                self.target()?
                    .row_change(table, key, RowOp::Insert(row), source)
                    .await?;
                self.count(table, Op::Insert);
                self.flush_if_large().await?;
            }
            LogicalMessage::Update {
                xid,
                relation,
                old,
                new,
            } => {
                if self.skipping() || self.held_by_copy(relation)? {
                    return Ok(());
                }
                self.enter_subxact(xid).await?;
                let (table, row) = self.to_production(relation, new)?;
                let new_key = self.key_of(table, &row)?;
                let old_row = match old {
                    Some(OldTuple::Key(t) | OldTuple::Full(t)) => {
                        Some(self.to_production(relation, t)?.1)
                    }
                    None => None,
                };
                let old_key = match &old_row {
                    Some(old_row) => Some(self.key_of(table, old_row)?),
                    None => None,
                };
                self.stage_file(table, old_row.as_ref(), Some(&row))?;
                let source = self.source(lsn);
                match old_key {
                    Some(old_key) if old_key != new_key => {
                        self.target()?
                            .key_change(table, old_key, row, source)
                            .await?
                    }
                    _ => {
                        self.target()?
                            .row_change(table, new_key, RowOp::Update(row), source)
                            .await?
                    }
                }
                self.count(table, Op::Update);
                self.flush_if_large().await?;
            }
            LogicalMessage::Delete {
                xid, relation, old, ..
            } => {
                if self.skipping() || self.held_by_copy(relation)? {
                    return Ok(());
                }
                self.enter_subxact(xid).await?;
                let (table, old_row) = self.to_production(relation, old.tuple().clone())?;
                let key = self.key_of(table, &old_row)?;
                self.stage_file(table, Some(&old_row), None)?;
                let source = self.source(lsn);
                self.target()?
                    .row_change(table, key, RowOp::Delete, source)
                    .await?;
                self.count(table, Op::Delete);
                self.flush_if_large().await?;
            }
            LogicalMessage::Truncate {
                xid,
                relations,
                restart_identity,
                ..
            } => {
                if self.skipping() {
                    return Ok(());
                }
                let mut tables = Vec::with_capacity(relations.len());
                for oid in relations {
                    if !self.held_by_copy(oid)? {
                        tables.push(self.relation_info(oid)?.table);
                    }
                }
                if tables.is_empty() {
                    return Ok(());
                }
                self.enter_subxact(xid).await?;
                self.target()?.truncate(&tables, restart_identity).await?;
                for table in tables {
                    self.count(table, Op::Truncate);
                }
            }
            LogicalMessage::StreamStart { xid, .. } => self.stream_start(xid).await?,
            LogicalMessage::StreamStop => self.in_stream = None,
            LogicalMessage::StreamAbort {
                xid,
                subxact_xid,
                abort_lsn,
                ..
            } => self.stream_abort(xid, subxact_xid, abort_lsn).await?,
            LogicalMessage::StreamCommit {
                xid,
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let last = Progress {
                    end_lsn,
                    commit_lsn,
                    xid,
                    commit_time,
                    stream_seq: self.feed_sequence,
                };
                self.stream_commit(xid, last).await?;
            }
            LogicalMessage::Message { .. }
            | LogicalMessage::Origin { .. }
            | LogicalMessage::Type { .. } => {}
        }
        Ok(())
    }

    /// Keeps production's sequences of identity-keyed tables at least as high as staging's.
    async fn sync_sequences(&mut self, staging: &tokio_postgres::Client) -> Result<(), SyncError> {
        let values = catalog::sequences::read_owned(staging, self.config)
            .await
            .map_err(database_error(self.staging, "reading sequences"))?;
        let raised = self.applier.raise_sequences(&values).await?;
        if raised > 0 {
            tracing::debug!(raised, "raised production sequences to staging's values");
        }
        Ok(())
    }

    /// A change of a managed-file table: its file is written aside now, put in place with
    /// its batch.
    fn stage_file(
        &mut self,
        table: usize,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Result<(), SyncError> {
        Ok(self.target()?.stage_file(table, old, new)?)
    }

    fn skipping(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.skip)
    }

    /// A change of this relation that its table's copy snapshot holds already: its
    /// transaction committed before that snapshot was taken.
    fn held_by_copy(&self, relation: Oid) -> Result<bool, SyncError> {
        let copied_at = self.relation_info(relation)?.copied_at;
        Ok(match (copied_at, &self.txn) {
            (Some(at), Some(txn)) => txn.commit_lsn < at,
            _ => false,
        })
    }

    /// Bounded memory: a large transaction is sent in pieces inside the open transaction.
    async fn flush_if_large(&mut self) -> Result<(), SyncError> {
        let (max_rows, max_bytes) = (
            self.config.sync.batch_max_rows,
            self.config.sync.batch_max_bytes,
        );
        let target = self.target()?;
        if target.pending_rows() >= max_rows || target.pending_bytes() >= max_bytes {
            target.flush().await?;
        }
        Ok(())
    }

    fn relation(&mut self, relation: Relation) -> Result<(), SyncError> {
        let name = TableName::new(relation.namespace.clone(), relation.name.clone());
        let table = self
            .applier
            .table_id(&name)
            .ok_or_else(|| SyncError::UnknownTable(name.to_string()))?;
        let meta = self.applier.meta(table);
        let map = catalog::map_relation(&relation, meta)
            .map_err(|m| SyncError::Apply(ApplyError::Schema(m)))?;
        self.applier
            .check_file_identity(table, relation.replica_identity)?;
        let production_width = meta.columns.len();
        let identity = map.to_production.len() == production_width
            && map.to_production.iter().enumerate().all(|(i, &p)| i == p);
        self.relations.insert(
            relation.oid,
            RelationInfo {
                table,
                map,
                production_width,
                identity,
                copied_at: self.copied_at.get(&name).copied(),
            },
        );
        Ok(())
    }

    fn relation_info(&self, oid: Oid) -> Result<&RelationInfo, SyncError> {
        self.relations.get(&oid).ok_or_else(|| {
            SyncError::Protocol(format!(
                "change of relation {oid} before its Relation message"
            ))
        })
    }

    /// A staging tuple in production column order; columns staging does not send are marked
    /// unchanged, so they are never written.
    fn to_production(&self, oid: Oid, tuple: Tuple) -> Result<(usize, Tuple), SyncError> {
        let info = self.relation_info(oid)?;
        if tuple.len() != info.map.to_production.len() {
            return Err(SyncError::Protocol(format!(
                "a change of relation {oid} has {} columns, its Relation message {}",
                tuple.len(),
                info.map.to_production.len()
            )));
        }
        if info.identity {
            // Same columns in the same order on both sides: no copy.
            return Ok((info.table, tuple));
        }
        let mut row = vec![Value::UnchangedToast; info.production_width];
        for (value, &p) in tuple.into_iter().zip(&info.map.to_production) {
            row[p] = value;
        }
        Ok((info.table, row))
    }

    fn key_of(&self, table: usize, row: &Tuple) -> Result<Key, SyncError> {
        let meta = self.applier.meta(table);
        meta.key
            .iter()
            .map(|&k| match &row[k] {
                Value::Text(b) => Ok(Some(b.clone())),
                Value::Binary(b) => Ok(Some(b.clone())),
                _ => Err(SyncError::Apply(ApplyError::Schema(format!(
                    "staging did not send key column {} of {} (its replica identity must cover production's primary key)",
                    meta.columns[k].name,
                    meta.table_name()
                )))),
            })
            .collect::<Result<Vec<Option<Bytes>>, _>>()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::feed::Scripted;
    use super::super::recorder::{Log, Recorder, Wal};
    use super::*;
    use crate::catalog::{ColumnMeta, TableMeta};
    use crate::model::{Column, PgTimestamp, ReplicaIdentity};
    use crate::pg::connect::TlsPolicy;

    const OID: Oid = 16384;

    fn metas() -> Vec<TableMeta> {
        let column = |name: &str, type_sql: &str| ColumnMeta::new(name, type_sql);
        vec![TableMeta {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![column("id", "bigint"), column("v", "text")],
            key: vec![0],
        }]
    }

    fn relation() -> LogicalMessage {
        let column = |name: &str, is_key: bool| Column {
            name: name.into(),
            is_key,
            type_oid: 20,
            type_modifier: -1,
        };
        LogicalMessage::Relation {
            xid: None,
            relation: Relation {
                oid: OID,
                namespace: "public".into(),
                name: "t".into(),
                replica_identity: ReplicaIdentity::Default,
                columns: vec![column("id", true), column("v", false)],
            },
        }
    }

    fn row(id: u32) -> Tuple {
        vec![
            Value::Text(Bytes::from(id.to_string())),
            Value::Text(Bytes::from(format!("v{id}"))),
        ]
    }

    /// A script of messages, each at the next position.
    #[derive(Default)]
    struct Script {
        messages: VecDeque<Scripted>,
        at: u64,
        /// How long after staging committed them its transactions arrive (their commit
        /// timestamps are that far in the past).
        late: Duration,
    }

    impl Script {
        fn push(&mut self, message: LogicalMessage) -> &mut Self {
            self.at += 8;
            self.messages
                .push_back(Scripted::Message(Lsn(self.at), message));
            self
        }

        /// Staging sends nothing for a while (sync is caught up): as many polls as a pipeline
        /// that waits for nothing makes to close its batch and then commit it.
        fn idle(&mut self) -> &mut Self {
            self.messages.push_back(Scripted::Idle(4));
            self
        }

        /// Staging sends nothing for `millis` (tokio's clock).
        fn pause(&mut self, millis: u64) -> &mut Self {
            self.messages
                .push_back(Scripted::Pause(Duration::from_millis(millis)));
            self
        }

        /// A whole transaction `xid` inserting `ids`, committing at `commit` (its end 8 later).
        fn transaction(&mut self, xid: Xid, commit: u64, ids: &[u32]) -> &mut Self {
            self.push(LogicalMessage::Begin {
                final_lsn: Lsn(commit),
                commit_time: PgTimestamp(0),
                xid,
            });
            for &id in ids {
                self.push(LogicalMessage::Insert {
                    xid: None,
                    relation: OID,
                    new: row(id),
                });
            }
            let stamp = PgTimestamp::now().0 - i64::try_from(self.late.as_micros()).unwrap();
            self.push(commit_message(commit, PgTimestamp(stamp)))
        }

        /// Inserts of `ids` inside a streamed block of `xid` (changes of subtransaction `sub`).
        fn streamed(&mut self, xid: Xid, sub: Xid, ids: &[u32]) -> &mut Self {
            self.push(LogicalMessage::StreamStart {
                xid,
                first_segment: false,
            });
            for &id in ids {
                self.push(LogicalMessage::Insert {
                    xid: Some(sub),
                    relation: OID,
                    new: row(id),
                });
            }
            self.push(LogicalMessage::StreamStop)
        }
    }

    fn commit_message(commit: u64, commit_time: PgTimestamp) -> LogicalMessage {
        LogicalMessage::Commit {
            flags: 0,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            commit_time,
        }
    }

    fn stream_commit(xid: Xid, commit: u64) -> LogicalMessage {
        LogicalMessage::StreamCommit {
            xid,
            flags: 0,
            commit_lsn: Lsn(commit),
            end_lsn: Lsn(commit + 8),
            commit_time: PgTimestamp::now(),
        }
    }

    fn stream_abort(xid: Xid, subxact_xid: Xid) -> LogicalMessage {
        LogicalMessage::StreamAbort {
            xid,
            subxact_xid,
            abort_lsn: None,
            abort_time: None,
        }
    }

    /// What one run of the pipeline over a script did.
    struct Run {
        result: Result<(), SyncError>,
        log: Vec<String>,
        confirmed: Vec<Lsn>,
        /// Staging's inserts the run counts as applied.
        inserted: u64,
    }

    /// Runs a pipeline over `script` to its end, production having everything up to
    /// `applied_end`, with `[sync]` settings `sync_conf` (batches close only on their limits
    /// unless it says otherwise).
    async fn apply_script(script: Script, applied_end: Lsn, sync_conf: &str) -> Run {
        apply_until(script, applied_end, sync_conf, None).await
    }

    /// [`apply_script`] with a cutoff.
    async fn apply_until(
        script: Script,
        applied_end: Lsn,
        sync_conf: &str,
        until: Option<Until>,
    ) -> Run {
        let config = Config::from_toml_str(
            &format!(
                "[staging]\nurl = \"host=127.0.0.1 dbname=s user=u\"\n\
                 [production]\nurl = \"host=127.0.0.1 dbname=p user=u\"\n\
                 [sync]\nbatch_max_delay_ms = 3600000\n{sync_conf}\n\
                 [[tables]]\nname = \"public.t\"\n"
            ),
            "test.toml",
        )
        .unwrap();
        let staging = Endpoint::new(
            "staging",
            "host=127.0.0.1 dbname=s user=u".parse().unwrap(),
            TlsPolicy::Disable,
        );
        let (log, wal) = (Log::default(), Arc::new(Wal::default()));
        let mut main = Recorder::new("main", &log, &wal, metas());
        main.set_progress_at(applied_end);
        let sessions = StreamSessions::new({
            let (log, wal) = (log.clone(), wal.clone());
            let mut opened = 0;
            Box::new(move || {
                opened += 1;
                let session = Recorder::new(&format!("s{opened}"), &log, &wal, metas());
                Box::pin(async move { Ok(session) })
            })
        });
        let confirmed = Arc::new(Mutex::new(Vec::new()));
        let mut state = RunState {
            stats: apply::ApplyStats::default(),
            one_by_one_until: None,
            last_applied: None,
            last_received: Lsn::INVALID,
            stop_lsn: None,
            staging_schema: None,
            changes: ChangeCounts::default(),
        };
        let mut pipeline = Pipeline::new(
            &config,
            &staging,
            main,
            applied_end,
            Confirm::Record(confirmed.clone()),
            &state,
            Some(sessions),
        );
        pipeline.until = until;
        let mut feed = Feed::Script(script.messages);
        let mut shutdown = std::pin::pin!(std::future::pending::<()>());
        let result = pipeline
            .run(&mut feed, None, &mut state, shutdown.as_mut())
            .await
            .map(|_| ());
        Run {
            result,
            log: log.lines(),
            confirmed: confirmed.lock().unwrap().clone(),
            inserted: pipeline.committed_counts.total().inserted,
        }
    }

    fn lines(expected: &[&str]) -> Vec<String> {
        expected.iter().map(|l| (*l).to_owned()).collect()
    }

    #[tokio::test]
    async fn what_production_has_is_skipped_and_the_rest_committed_in_one_batch() {
        let mut script = Script::default();
        script.push(relation());
        script.transaction(700, 100, &[1]); // production has it (its commit is before 0/C8)
        script.transaction(701, 300, &[2, 3]);
        script.transaction(702, 400, &[4]);
        let run = apply_script(script, Lsn(200), "").await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "main BEGIN",
                "main insert 2",
                "main insert 3",
                "main insert 4",
                "main flush 3 rows",
                "main COMMIT 0/198 (progress from 0/C8)",
            ])
        );
        // Confirmed once production flushed past the commit (the stop flushes it).
        assert_eq!(run.confirmed, vec![Lsn(408)]);
    }

    #[tokio::test]
    async fn a_batch_closes_at_the_first_commit_past_its_row_limit() {
        let mut script = Script::default();
        script.push(relation());
        script.transaction(701, 100, &[1]);
        // Its second row reaches the limit: sent at once (memory stays bounded), and the
        // batch closes at its commit, however many rows were sent before.
        script.transaction(702, 200, &[2, 3, 4]);
        script.transaction(703, 300, &[5]);
        let run = apply_script(script, Lsn::INVALID, "batch_max_rows = 2").await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "main BEGIN",
                "main insert 1",
                "main insert 2",
                "main flush 2 rows",
                "main insert 3",
                "main insert 4",
                "main flush 2 rows",
                // The closed batch commits when the next one first needs production.
                "main insert 5",
                "main COMMIT 0/D0 (progress from 0/0)",
                "main BEGIN",
                "main flush 1 rows",
                "main COMMIT 0/134 (progress from 0/D0)",
            ])
        );
        // The first batch is confirmed once the second commit shows it flushed, the second
        // when the stop flushes production's WAL.
        assert_eq!(run.confirmed, vec![Lsn(208), Lsn(308)]);
        assert_eq!(run.inserted, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn late_batches_linger_and_timely_or_quiet_ones_do_not() {
        // One transaction, then two back to back, then one more 2 ms later.
        let script = |late: Duration| {
            let mut script = Script {
                late,
                ..Script::default()
            };
            script.push(relation());
            script.transaction(700, 50, &[0]);
            script.idle();
            script.transaction(701, 100, &[1]);
            script.transaction(702, 200, &[2]);
            script.pause(2);
            script.transaction(703, 300, &[3]);
            script.idle();
            script
        };
        let commits = |log: &[String]| log.iter().filter(|l| l.contains("COMMIT")).count();
        let late = Duration::from_secs(1);
        // Without a linger the batch of the two close transactions is applied when nothing is
        // ready, however late.
        let run = apply_script(script(late), Lsn::INVALID, "batch_linger_ms = 0").await;
        run.result.unwrap();
        assert_eq!(commits(&run.log), 3, "{:?}", run.log);
        // With 5 ms, once a batch committed a second after staging, the next one waits and
        // takes the last transaction too.
        let run = apply_script(script(late), Lsn::INVALID, "batch_linger_ms = 5").await;
        run.result.unwrap();
        assert_eq!(commits(&run.log), 2, "{:?}", run.log);
        assert_eq!(run.inserted, 4);
        // Transactions that arrive on time are applied at once.
        let run = apply_script(script(Duration::ZERO), Lsn::INVALID, "batch_linger_ms = 5").await;
        run.result.unwrap();
        assert_eq!(commits(&run.log), 3, "{:?}", run.log);
        // A transaction after a quiet spell does not wait for one that may never come.
        let mut quiet = Script {
            late,
            ..Script::default()
        };
        quiet.push(relation());
        quiet.transaction(701, 100, &[1]);
        quiet.idle();
        let started = tokio::time::Instant::now();
        let run = apply_script(quiet, Lsn::INVALID, "batch_linger_ms = 60000").await;
        run.result.unwrap();
        assert_eq!(commits(&run.log), 1);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the lone batch lingered"
        );
    }

    #[tokio::test]
    async fn a_caught_up_batch_is_applied_at_once_and_a_backlog_is_batched() {
        let mut script = Script::default();
        script.push(relation());
        // A backlog: both transactions are ready at once and share a batch.
        script.transaction(701, 100, &[1]);
        script.transaction(702, 200, &[2]);
        // Caught up: the batch does not wait (the test's batch_max_delay_ms is an hour).
        script.idle();
        script.transaction(703, 300, &[3]);
        // A pipeline that waited for more would sit on the first batch past this.
        let run = tokio::time::timeout(
            Duration::from_secs(5),
            apply_script(script, Lsn::INVALID, ""),
        )
        .await
        .expect("the caught-up batch was applied without waiting for more");
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "main BEGIN",
                "main insert 1",
                "main insert 2",
                "main flush 2 rows",
                "main COMMIT 0/D0 (progress from 0/0)",
                "main BEGIN",
                "main insert 3",
                "main flush 1 rows",
                "main COMMIT 0/134 (progress from 0/D0)",
            ])
        );
    }

    #[tokio::test]
    async fn a_transaction_received_in_part_is_rolled_back_and_nothing_confirmed() {
        let mut script = Script::default();
        script.push(relation());
        script.push(LogicalMessage::Begin {
            final_lsn: Lsn(100),
            commit_time: PgTimestamp(0),
            xid: 700,
        });
        script.push(LogicalMessage::Insert {
            xid: None,
            relation: OID,
            new: row(1),
        });
        let run = apply_script(script, Lsn::INVALID, "").await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&["main BEGIN", "main insert 1", "main ROLLBACK"])
        );
        assert!(run.confirmed.is_empty());
        assert_eq!(run.inserted, 0);
    }

    #[tokio::test]
    async fn messages_out_of_order_are_protocol_errors_and_nothing_is_committed() {
        let mut commit_alone = Script::default();
        commit_alone.push(relation());
        commit_alone.push(commit_message(100, PgTimestamp::now()));
        let run = apply_script(commit_alone, Lsn::INVALID, "").await;
        assert!(
            matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("without Begin")),
            "{:?}",
            run.result
        );
        assert!(run.log.is_empty() && run.confirmed.is_empty());

        let mut unannounced = Script::default();
        unannounced.transaction(700, 100, &[1]);
        let run = apply_script(unannounced, Lsn::INVALID, "").await;
        assert!(
            matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("before its Relation")),
            "{:?}",
            run.result
        );
        assert!(run.confirmed.is_empty());

        let mut never_streamed = Script::default();
        never_streamed.push(relation());
        never_streamed.push(stream_commit(900, 100));
        let run = apply_script(never_streamed, Lsn::INVALID, "").await;
        assert!(
            matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("never streamed")),
            "{:?}",
            run.result
        );
        assert!(
            !run.log.iter().any(|l| l.contains("COMMIT")),
            "{:#?}",
            run.log
        );
    }

    #[tokio::test]
    async fn streamed_transactions_commit_in_staging_order_in_sessions_of_their_own() {
        let mut script = Script::default();
        script.push(relation());
        script.transaction(701, 100, &[1]);
        // A large transaction starts streaming: what committed before it commits first.
        script.streamed(900, 900, &[2]);
        script.transaction(702, 200, &[3]);
        // A subtransaction of it, rolled back.
        script.streamed(900, 901, &[4]);
        script.push(stream_abort(900, 901));
        script.streamed(900, 900, &[5]);
        script.push(stream_commit(900, 300));
        // Reuses the first session; aborted whole.
        script.streamed(950, 950, &[6]);
        script.push(stream_abort(950, 950));
        script.transaction(703, 400, &[7]);
        let run = apply_script(script, Lsn::INVALID, "").await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "main BEGIN",
                "main insert 1",
                "main flush 1 rows",
                "main COMMIT 0/6C (progress from 0/0)",
                "s1 BEGIN",
                "s1 insert 2",
                "main BEGIN",
                "main insert 3",
                "main flush 1 rows",
                "main COMMIT 0/D0 (progress from 0/6C)",
                "s1 flush 1 rows",
                "s1 SAVEPOINT stagingprop_subxact_901",
                "s1 insert 4",
                "s1 ROLLBACK TO stagingprop_subxact_901",
                "s1 insert 5",
                "s1 flush 1 rows",
                "s1 COMMIT 0/134 (progress from 0/D0)",
                "s1 BEGIN",
                "s1 insert 6",
                "s1 ROLLBACK",
                "main BEGIN",
                "main insert 7",
                "main flush 1 rows",
                "main COMMIT 0/198 (progress from 0/134)",
            ])
        );
        assert_eq!(run.confirmed, vec![Lsn(108), Lsn(208), Lsn(308), Lsn(408)]);
    }

    #[tokio::test]
    async fn a_cutoff_applies_what_committed_up_to_it_and_nothing_after() {
        let mut script = Script::default();
        script.push(relation());
        script.transaction(701, 100, &[1]);
        script.transaction(702, 200, &[2]);
        script.transaction(703, 300, &[3]);
        script.transaction(704, 400, &[4]);
        let run = apply_until(script, Lsn::INVALID, "", Some(Until::Lsn(Lsn(200)))).await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "main BEGIN",
                "main insert 1",
                "main insert 2",
                "main flush 2 rows",
                "main COMMIT 0/D0 (progress from 0/0)",
            ])
        );
        assert_eq!(run.confirmed, vec![Lsn(208)]);
        assert_eq!(run.inserted, 2);

        // A streamed transaction committing past the cutoff is rolled back; what committed
        // before it stays applied.
        let mut script = Script::default();
        script.push(relation());
        script.streamed(900, 900, &[1]);
        script.transaction(701, 100, &[2]);
        script.push(stream_commit(900, 300));
        script.transaction(702, 400, &[3]);
        let run = apply_until(script, Lsn::INVALID, "", Some(Until::Lsn(Lsn(250)))).await;
        run.result.unwrap();
        assert_eq!(
            run.log,
            lines(&[
                "s1 BEGIN",
                "s1 insert 1",
                "main BEGIN",
                "main insert 2",
                "main flush 1 rows",
                "main COMMIT 0/6C (progress from 0/0)",
                "s1 ROLLBACK",
            ])
        );
        assert_eq!(run.confirmed, vec![Lsn(108)]);
    }

    #[tokio::test]
    async fn a_streamed_transaction_production_already_has_is_rolled_back() {
        let mut script = Script::default();
        script.push(relation());
        script.streamed(900, 900, &[1]);
        script.push(stream_commit(900, 300));
        let run = apply_script(script, Lsn(500), "").await;
        run.result.unwrap();
        assert_eq!(run.log, lines(&["s1 BEGIN", "s1 insert 1", "s1 ROLLBACK"]));
        assert!(run.confirmed.is_empty());
    }

    #[test]
    fn a_batch_is_confirmed_only_once_production_flushed_past_its_commit() {
        let mut unflushed = Unflushed::default();
        unflushed.committed(Lsn(1000), Lsn(10));
        unflushed.committed(Lsn(2000), Lsn(20));
        unflushed.committed(Lsn(3000), Lsn(30));
        assert_eq!(unflushed.flushed(Lsn(999)), None);
        assert_eq!(unflushed.flushed(Lsn(2500)), Some(Lsn(20)));
        assert!(!unflushed.is_empty());
        assert_eq!(unflushed.flushed(Lsn(2500)), None);
        assert_eq!(unflushed.flushed(Lsn(3000)), Some(Lsn(30)));
        assert!(unflushed.is_empty());
    }
}
