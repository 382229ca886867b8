//! The pipeline of one session: staging's messages in, production's transactions out. It
//! skips what production already has, assembles transactions, batches consecutive ones until a
//! limit, sends large ones in pieces, routes streamed transactions to their own sessions, and
//! confirms a position only once the target reports it durable. Everything it does to the
//! target goes through [`Target`], so its decisions are tested without a database.

mod streamed;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::feed::Feed;
use super::handover;
use super::heartbeat::emit_heartbeat;
use super::pace::Pace;
use super::report::{ChangeCounts, Op};
use super::run_state::{RunState, SessionEnd};
use super::until::Until;
use super::{SyncError, database_error};
use crate::apply::{self, ApplyError, Target};
use crate::catalog;
use crate::change::{Source, StagingChange};
use crate::config::{Config, DdlMode, TableName};
use crate::ddl::{self, SchemaChange};
use crate::model::{Lag, Lsn, Oid, OldTuple, PgTimestamp, Relation, Tuple, Value, Xid};
use crate::pg::connect::Endpoint;
use crate::pg::replication::{DurablePosition, FlushHandle, ReplicationError};
use crate::pgoutput::LogicalMessage;
use crate::repair::{self, KeyText, Watermark, Windows};
use crate::state::Progress;
pub(super) use streamed::StreamSessions;
use streamed::StreamedTxn;

/// The transaction being received.
struct OpenTxn {
    xid: Xid,
    /// Already on production (its commit lies before production's progress).
    skip: bool,
    /// Where its commit record starts (Begin's final LSN).
    commit_lsn: Lsn,
}

/// A staging relation the pipeline has seen, and the managed table it is of.
struct Known {
    table: usize,
    /// Its table was copied from a snapshot taken at this position, later than the hand-off.
    copied_at: Option<Lsn>,
    /// As staging sent it, and its columns' type names: a session opened later learns it too.
    relation: Relation,
    types: Vec<String>,
}

/// Where the applier reports what the target committed.
pub(super) enum Confirm {
    /// Staging may release it.
    Slot(FlushHandle),
    /// The spool's receiver may delete it (and, over `max_bytes`, confirm it to staging).
    Spool(Arc<handover::SpoolShared>),
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
    relations: HashMap<Oid, Known>,
    txn: Option<OpenTxn>,
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
    /// A schema change of this session created a table.
    created_tables: bool,
    pub(super) last_commit_time: Option<PgTimestamp>,
    /// Where this session's feed starts (the slot's confirmed position, or the spool's oldest
    /// transaction): lag is measured from it until the target has a progress row.
    pub(super) feed_start: Lsn,
    /// As last measured.
    pub(super) lag: Option<Lag>,
    /// Staging's WAL position as staging last said, and when it was asked.
    staging_end: Lsn,
    staging_end_asked: Option<Instant>,
    /// Staging's column types by OID and modifier (Relation messages name them so).
    pub(super) types: catalog::types::TypeNames,
    /// `sync --apply-schema-change`: apply schema changes even under `[ddl] mode = "stop"`.
    pub(super) apply_schema_changes: bool,
    /// Relations of tables that are not managed, until their first change says which managed
    /// table they are part of.
    unresolved: HashMap<Oid, Relation>,
    /// Staging, where it can be asked (not while it is down under a spool, nor in a replay).
    staging_client: Option<&'a tokio_postgres::Client>,
    rows_at_batch_start: u64,
    unflushed: Unflushed,
    /// Set when staging streams large transactions in progress.
    stream_sessions: Option<StreamSessions<T>>,
    /// Streamed transactions in progress.
    streams: HashMap<Xid, StreamedTxn<T>>,
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
    reached_until: bool,
    /// The streamed transaction whose block is open (between Stream Start and Stream Stop):
    /// the changes that arrive belong to it.
    in_stream: Option<Xid>,
    /// Fed from a JetStream stream: the sequence of the message the last one came from.
    feed_sequence: Option<u64>,
    /// Tables a resumed copy loaded from a snapshot later than the hand-off, with its position.
    pub(super) copied_at: HashMap<TableName, Lsn>,
    /// Repair chunks between their watermarks, and the keys the stream changed meanwhile.
    windows: Windows,
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

/// How often the pipeline asks staging where its WAL ends (for the lag).
const STAGING_END_POLL: Duration = Duration::from_secs(1);

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
            created_tables: false,
            last_commit_time: None,
            feed_start: Lsn::INVALID,
            lag: None,
            staging_end: Lsn::INVALID,
            staging_end_asked: None,
            types: catalog::types::TypeNames::default(),
            staging_client: None,
            unresolved: HashMap::new(),
            apply_schema_changes: false,
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
            windows: Windows::default(),
        }
    }

    pub(super) async fn run<S>(
        &mut self,
        feed: &mut Feed,
        staging: Option<&'a tokio_postgres::Client>,
        state: &mut RunState,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Result<SessionEnd, SyncError>
    where
        S: Future<Output = ()>,
    {
        self.staging_client = staging;
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
                    if self.applier.committing() {
                        self.complete_batch().await?;
                    } else if self.batch_started.is_some() && self.txn.is_none() {
                        self.commit_batch().await?;
                    } else if !self.unflushed.is_empty() && self.txn.is_none() {
                        let flushed = self.applier.durable(false).await?;
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
        self.measure_lag(feed).await;
        if report.elapsed() >= Duration::from_secs(10) || !self.sequences_synced {
            *report = Instant::now();
            // Between staging transactions a closed batch may commit early, so that a long
            // backlog does not keep sequences from following.
            if self.txn.is_none() {
                self.complete_batch().await?;
            }
            if let Some(staging) = staging {
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
                lag_bytes = self.lag.map(|l| l.bytes),
                lag_seconds = self.lag.and_then(|l| l.seconds),
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
        if self.applier.committing() {
            wait = Duration::ZERO;
        }
        Ok(wait)
    }

    /// Measures the lag and sets its gauges; a gauge is left alone while its figure is unknown,
    /// so a dashboard never shows a lag that did not happen. Staging's WAL position is asked of
    /// staging once a second: while a backlog streams, the walsender's messages carry their own
    /// position as "end of WAL" and its keepalives are rare, so the stream alone would show a
    /// backlog as no lag.
    async fn measure_lag(&mut self, feed: &Feed) {
        if let Some(staging) = self.staging_client
            && self
                .staging_end_asked
                .is_none_or(|at| at.elapsed() >= STAGING_END_POLL)
        {
            self.staging_end_asked = Some(Instant::now());
            // With it, the WAL staging keeps for the slot (what fills staging's disk).
            let asked = staging
                .query_one(
                    "SELECT end_lsn::text, (SELECT pg_wal_lsn_diff(end_lsn, restart_lsn)::bigint \
                                             FROM pg_replication_slots WHERE slot_name = $1) \
                       FROM (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                                         ELSE pg_current_wal_lsn() END AS end_lsn) e",
                    &[&self.config.sync.slot],
                )
                .await;
            // A broken connection shows in the stream too; here it only leaves the figure older.
            if let Ok(row) = asked {
                if let Some(end) = row.get::<_, Option<String>>(0) {
                    self.staging_end = self.staging_end.max(end.parse().unwrap_or_default());
                }
                if let Some(retained) = row.get::<_, Option<i64>>(1) {
                    metrics::gauge!("stagingprop_slot_retained_bytes").set(retained as f64);
                }
            }
        }
        self.lag = Lag::measure(
            feed.server_wal_end().max(self.staging_end),
            self.applied_end,
            self.feed_start,
            self.last_commit_time,
            PgTimestamp::now(),
        );
        super::lag::record(self.lag);
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
        self.flush_committed().await?;
        // The sequences of tables this session created follow before it ends.
        if self.created_tables
            && let Some(staging) = self.staging_client
        {
            self.sync_sequences(staging).await?;
        }
        Ok(())
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
        match self.applier.durable(true).await {
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
        self.applier.commit(&last).await?;
        self.closed_counts
            .push_back(std::mem::take(&mut self.open_counts));
        self.record_committed();
        self.last_commit_time = Some(last.commit_time);
        tracing::trace!(
            since_staging_commit_us = PgTimestamp::now().0 - last.commit_time.0,
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
        let closing = self.applier.committing();
        let completed = self.applier.complete().await;
        if closing && let Some(at) = self.last_commit_time {
            let lag_us = PgTimestamp::now().0 - at.0;
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
                    since_staging_commit_us = PgTimestamp::now().0 - commit_time.0,
                    "commit received"
                );
                let full = self.applier.batch_full()
                    || self.one_by_one_until.is_some()
                    || self.batch_started.is_some_and(|s| {
                        s.elapsed() >= Duration::from_millis(self.config.sync.batch_max_delay_ms)
                    });
                if full {
                    self.commit_batch().await?;
                }
            }
            LogicalMessage::Relation { relation, .. } => self.relation(relation).await?,
            LogicalMessage::Insert {
                xid, relation, new, ..
            } => {
                self.write(
                    lsn,
                    xid,
                    relation,
                    StagingChange::Insert { new },
                    Op::Insert,
                )
                .await?
            }
            LogicalMessage::Update {
                xid,
                relation,
                old,
                new,
            } => {
                let old = old.map(|old| match old {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                });
                self.write(
                    lsn,
                    xid,
                    relation,
                    StagingChange::Update { old, new },
                    Op::Update,
                )
                .await?
            }
            LogicalMessage::Delete {
                xid, relation, old, ..
            } => {
                let old = match old {
                    OldTuple::Key(t) | OldTuple::Full(t) => t,
                };
                self.write(
                    lsn,
                    xid,
                    relation,
                    StagingChange::Delete { old },
                    Op::Delete,
                )
                .await?
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
                    if !self.held_by_copy(oid).await? {
                        let table = self.relation_info(oid)?.table;
                        self.windows
                            .spoil(Some(&self.config.tables[table].name.to_string()));
                        tables.push(table);
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
            LogicalMessage::StreamStart { xid, .. } => {
                // Its changes arrive before it commits: a window cannot tell whether they
                // come before or after its chunk's snapshot.
                self.windows.spoil(None);
                self.stream_start(xid).await?
            }
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
            LogicalMessage::Message {
                xid,
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == ddl::PREFIX => self.schema_change(lsn, xid, &content).await?,
            LogicalMessage::Message {
                xid,
                transactional: true,
                prefix,
                content,
                ..
            } if prefix == repair::PREFIX => self.watermark(lsn, xid, &content).await?,
            LogicalMessage::Message { .. }
            | LogicalMessage::Origin { .. }
            | LogicalMessage::Type { .. } => {}
        }
        Ok(())
    }

    /// A schema change staging captured: applied in its place, in the transaction's production
    /// transaction; with `[ddl] mode = "stop"` (unless this run was told to apply it), sync stops
    /// before it, showing the plan, and nothing of its transaction is applied.
    async fn schema_change(
        &mut self,
        lsn: Lsn,
        xid: Option<Xid>,
        content: &[u8],
    ) -> Result<(), SyncError> {
        if self.skipping() {
            return Ok(());
        }
        let change = SchemaChange::parse(content).map_err(SyncError::Protocol)?;
        let created = self.tables_to_take(&change);
        if !created.is_empty() {
            // This session cannot take a table in mid-stream: the next one, which manages it,
            // starts again before this transaction (none of it is committed).
            return Err(SyncError::TableCreated(created));
        }
        self.enter_subxact(xid).await?;
        let source = self.source(lsn);
        let apply = match self.config.ddl.mode {
            DdlMode::Apply => true,
            DdlMode::Stop => self.apply_schema_changes,
            // Captured by a trigger left from an earlier config: followed as if applying, since
            // the rows after it need the new shape.
            DdlMode::Off => true,
        };
        let plans = self.target()?.schema_change(&change, source, apply).await?;
        if change.tables.iter().any(|c| c.before.is_none()) {
            // A created table's sequences follow staging's from its creation on.
            self.sequences_synced = false;
            self.created_tables = true;
        }
        if !apply {
            let plan = plans
                .iter()
                .map(|p| format!("{}: {}", p.table, apply::describe_plan(p)))
                .collect::<Vec<_>>()
                .join("\n    ");
            return Err(SyncError::SchemaChangeWaiting {
                statement: change.statement,
                plan,
                lsn,
            });
        }
        Ok(())
    }

    /// The tables `change` created, or a pattern's table it renamed, under a name the
    /// configuration's patterns manage and this session does not yet.
    fn tables_to_take(&self, change: &SchemaChange) -> Vec<ddl::TableShape> {
        let from_pattern = |name: &TableName| {
            self.table_index(name)
                .is_some_and(|t| self.config.tables[t].from_pattern)
        };
        change
            .tables
            .iter()
            .filter(|c| match (&c.before, &c.after) {
                (None, _) => true,
                (Some(before), Some(after)) => {
                    before.table_name() != after.table_name() && from_pattern(&before.table_name())
                }
                (Some(_), None) => false,
            })
            .filter_map(|c| c.after.clone())
            .filter(|after| {
                let name = after.table_name();
                self.table_index(&name).is_none() && self.config.pattern_of(&name).is_some()
            })
            .collect()
    }

    /// A repair's watermark addressed to this target: a low one opens its chunk's window; at a
    /// high one the chunk, minus what the stream changed in the window, is applied in its place
    /// (or recorded interrupted when the window was not seen whole). One that cannot be read is
    /// left alone: a repair never stops sync (the repair sees its chunk go unanswered).
    async fn watermark(
        &mut self,
        lsn: Lsn,
        xid: Option<Xid>,
        content: &[u8],
    ) -> Result<(), SyncError> {
        if self.skipping() {
            return Ok(());
        }
        let mark = match Watermark::parse(content) {
            Ok(mark) => mark,
            Err(problem) => {
                tracing::warn!(%lsn, "{problem}; left alone");
                return Ok(());
            }
        };
        let starts = matches!(mark, Watermark::Seeding { .. });
        match mark {
            Watermark::Low { id, table, key } => {
                if id.target != self.config.repair_target() {
                    return Ok(());
                }
                self.windows.open(id, table, key);
                if !self.streams.is_empty() {
                    self.windows.spoil(None);
                }
            }
            Watermark::High(chunk) => {
                if chunk.id.target != self.config.repair_target() {
                    return Ok(());
                }
                let at = self.windows.close(chunk);
                self.enter_subxact(xid).await?;
                let source = self.source(lsn);
                self.target()?.repair_chunk(at, source).await?;
            }
            Watermark::Seeding {
                repair,
                target,
                tables,
            }
            | Watermark::Seeded {
                repair,
                target,
                tables,
            } if target == self.config.repair_target() => {
                self.enter_subxact(xid).await?;
                let source = self.source(lsn);
                self.target()?
                    .seeding(repair, &tables, starts, source)
                    .await?;
            }
            Watermark::Seeding { .. } | Watermark::Seeded { .. } => {}
        }
        Ok(())
    }

    /// Notes, for the repair windows open on its table, which row a change of `relation`
    /// touched (by the window's key columns, in staging's text form).
    fn watch_windows(&mut self, relation: Oid, change: &StagingChange) -> Result<(), SyncError> {
        let known = self.relation_info(relation)?;
        let table = self.config.tables[known.table].name.to_string();
        let keys: Vec<Vec<String>> = self
            .windows
            .keys_watched(&table)
            .into_iter()
            .map(<[String]>::to_vec)
            .collect();
        let columns = &known.relation.columns;
        let mut touched: Vec<(Vec<String>, Option<KeyText>)> = Vec::new();
        for key in keys {
            let positions: Option<Vec<usize>> = key
                .iter()
                .map(|name| columns.iter().position(|c| &c.name == name))
                .collect();
            let tuples: Vec<&Tuple> = match change {
                StagingChange::Insert { new } => vec![new],
                StagingChange::Update { old, new } => old.iter().chain([new]).collect(),
                StagingChange::Delete { old } => vec![old],
            };
            for tuple in tuples {
                let values = positions.as_ref().and_then(|positions| {
                    positions
                        .iter()
                        .map(|&p| match &tuple[p] {
                            Value::Null => Some(None),
                            Value::Text(b) => Some(Some(String::from_utf8_lossy(b).into_owned())),
                            Value::Binary(_) | Value::UnchangedToast => None,
                        })
                        .collect::<Option<KeyText>>()
                });
                touched.push((key.clone(), values));
            }
        }
        for (key, values) in touched {
            self.windows.changed(&table, &key, values);
        }
        Ok(())
    }

    /// Keeps production's sequences of identity-keyed tables at least as high as staging's.
    async fn sync_sequences(&mut self, staging: &tokio_postgres::Client) -> Result<(), SyncError> {
        let values = catalog::sequences::read_owned(staging, self.config)
            .await
            .map_err(database_error(self.staging, "reading sequences"))?;
        let raised = self.applier.follow_sequences(&values).await?;
        if raised > 0 {
            tracing::debug!(raised, "raised production sequences to staging's values");
        }
        Ok(())
    }

    fn skipping(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.skip)
    }

    /// One of staging's row changes of `relation` (`op`, for the run's counts), to the session
    /// it belongs to, unless production has it or its table's copy holds it.
    async fn write(
        &mut self,
        lsn: Lsn,
        xid: Option<Xid>,
        relation: Oid,
        change: StagingChange,
        op: Op,
    ) -> Result<(), SyncError> {
        if self.skipping() || self.held_by_copy(relation).await? {
            return Ok(());
        }
        if !self.windows.is_empty() {
            self.watch_windows(relation, &change)?;
        }
        self.enter_subxact(xid).await?;
        let known = self.relation_info(relation)?;
        let table = known.table;
        let width = known.relation.columns.len();
        let widths = match &change {
            StagingChange::Insert { new } => [None, Some(new.len())],
            StagingChange::Update { old, new } => [old.as_ref().map(|t| t.len()), Some(new.len())],
            StagingChange::Delete { old } => [Some(old.len()), None],
        };
        if let Some(sent) = widths.into_iter().flatten().find(|&n| n != width) {
            return Err(SyncError::Protocol(format!(
                "a change of relation {relation} has {sent} columns, its Relation message {width}"
            )));
        }
        let source = self.source(lsn);
        self.target()?.write(relation, change, source).await?;
        self.count(table, op);
        Ok(())
    }

    /// A change of this relation that its table's copy snapshot holds already: its
    /// transaction committed before that snapshot was taken.
    /// Also learns, at its first change, which managed table a relation that is not one
    /// itself belongs to (see [`Self::relation`]).
    async fn held_by_copy(&mut self, relation: Oid) -> Result<bool, SyncError> {
        if let Some(unresolved) = self.unresolved.remove(&relation) {
            let sent = TableName::new(unresolved.namespace.clone(), unresolved.name.clone());
            let (table, name) = self.partition_of_managed(&unresolved, sent).await?;
            self.register(unresolved, table, &name).await?;
        }
        let copied_at = self.relation_info(relation)?.copied_at;
        Ok(match (copied_at, &self.txn) {
            (Some(at), Some(txn)) => txn.commit_lsn < at,
            _ => false,
        })
    }

    /// A Relation message. One of a table that is not managed is kept aside until a change of
    /// it arrives: pgoutput sends the Relation of a partition before its partitioned table's
    /// changes even when it publishes them as the partitioned table's.
    async fn relation(&mut self, relation: Relation) -> Result<(), SyncError> {
        let sent = TableName::new(relation.namespace.clone(), relation.name.clone());
        self.relations.remove(&relation.oid);
        match self.table_index(&sent) {
            Some(table) => self.register(relation, table, &sent).await,
            None => {
                self.unresolved.insert(relation.oid, relation);
                Ok(())
            }
        }
    }

    /// A managed table's index in `[[tables]]`.
    fn table_index(&self, name: &TableName) -> Option<usize> {
        self.config.tables.iter().position(|t| &t.name == name)
    }

    /// Takes `relation` as the shape of managed table `table` (`name`) from now on, in every
    /// session: the target maps it onto its table and refuses a type it cannot store.
    async fn register(
        &mut self,
        relation: Relation,
        table: usize,
        name: &TableName,
    ) -> Result<(), SyncError> {
        let types = self.column_types(&relation).await?;
        let shaped = |e: ApplyError| match e {
            ApplyError::Types(problems) => SyncError::Schema(problems),
            e => SyncError::Apply(e),
        };
        self.applier
            .relation(&relation, table, &types)
            .await
            .map_err(shaped)?;
        for streamed in self.streams.values_mut() {
            streamed
                .applier
                .relation(&relation, table, &types)
                .await
                .map_err(shaped)?;
        }
        self.relations.insert(
            relation.oid,
            Known {
                table,
                copied_at: self.copied_at.get(name).copied(),
                relation,
                types,
            },
        );
        Ok(())
    }

    /// Every relation known so far, for a session that opens now.
    async fn shape_session(&mut self, target: &mut T) -> Result<(), SyncError> {
        for known in self.relations.values() {
            target
                .relation(&known.relation, known.table, &known.types)
                .await?;
        }
        Ok(())
    }

    /// A Relation of a partition whose partitioned table is managed: a publication without
    /// `publish_via_partition_root` (or a spool written from one) sends the partitions' own
    /// changes, which are the partitioned table's.
    async fn partition_of_managed(
        &mut self,
        relation: &Relation,
        sent: TableName,
    ) -> Result<(usize, TableName), SyncError> {
        let unknown = || SyncError::UnknownTable(sent.to_string());
        let Some(staging) = self.staging_client else {
            return Err(SyncError::StagingNeeded(format!(
                "staging sent changes of {sent}, which is not in [[tables]]; only staging can \
                 say whether it is a partition of a managed table, and staging is unreachable: \
                 waiting for it"
            )));
        };
        let root = staging
            .query_opt(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = pg_partition_root($1::oid) AND c.oid <> $1::oid",
                &[&relation.oid],
            )
            .await
            .map_err(database_error(self.staging, "finding a partition's table"))?
            .ok_or_else(unknown)?;
        let root = TableName::new(root.get::<_, String>(0), root.get::<_, String>(1));
        let table = self.table_index(&root).ok_or_else(unknown)?;
        tracing::debug!(partition = %sent, table = %root, "applying a partition's changes to its partitioned table");
        Ok((table, root))
    }

    /// The type of each column of a Relation message as staging names it: a type changed on
    /// staging while sync runs is checked by the target before the first change of the new
    /// shape, rather than stored rounded or cut.
    async fn column_types(&mut self, relation: &Relation) -> Result<Vec<String>, SyncError> {
        let mut types = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            let name = self
                .types
                .name(column.type_oid, column.type_modifier, self.staging_client)
                .await
                .map_err(database_error(self.staging, "naming a column's type"))?
                .ok_or_else(|| {
                    SyncError::StagingNeeded(format!(
                        "staging's column {}.{} now has a type (OID {}, modifier {}) that only \
                         staging can name, and staging is unreachable: waiting for it",
                        relation.qualified_name(),
                        column.name,
                        column.type_oid,
                        column.type_modifier
                    ))
                })?;
            types.push(name);
        }
        Ok(types)
    }

    fn relation_info(&self, oid: Oid) -> Result<&Known, SyncError> {
        self.relations.get(&oid).ok_or_else(|| {
            SyncError::Protocol(format!(
                "change of relation {oid} before its Relation message"
            ))
        })
    }
}
