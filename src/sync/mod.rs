//! `stagingprop sync`: tails staging's slot and applies every committed transaction of the
//! managed tables to production, in commit order and exactly once.
//!
//! Exactly once: production's progress table holds the end LSN of the last applied staging
//! transaction, written in the same production transaction as its changes. A session starts the
//! slot there and skips every transaction whose commit record lies before it. Production commits
//! asynchronously; staging is told a position (through [`DurablePosition`]) only once
//! production's WAL is flushed past the commit covering it.
//!
//! With `[spool]` (`receiver.rs`), staging's stream goes to the spool first and staging is told
//! what the spool holds durably; the applier reads the spool (`feed.rs`) and production's
//! progress table remains the truth of what production has. `replay` (`replay.rs`) is the same
//! applier reading a spool into any target until the spool's end.
//!
//! Batching: consecutive staging transactions share one production transaction until
//! `batch_max_rows` / `batch_max_bytes` are reached or `batch_max_delay_ms` passed; changes are
//! consolidated per row and sent set-based. A large staging transaction is sent in pieces inside
//! one production transaction, so memory stays bounded whatever its size. A closed batch's
//! statements run on production while the next batch is read and consolidated; it commits when
//! the next batch first needs production, or as soon as nothing more is ready to read.

mod feed;
mod receiver;
mod replay;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::apply::files::Publisher;
use crate::apply::{self, Applier, ApplyError, Savepoint};
use crate::catalog::{self, ColumnMap, ColumnReference, TableMeta};
use crate::change::{Key, RowOp, Source};
use crate::config::{Config, ConflictPolicy, TableName};
use crate::model::{Lsn, Oid, OldTuple, Relation, Tuple, Value, Xid};
use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::{
    DurablePosition, FlushHandle, PgOutputOptions, ReplicationClient, ReplicationError,
};
use crate::pgoutput::LogicalMessage;
use crate::remap::Remapper;
use crate::spool::files::{SpoolError, SpoolReader};
use crate::state::{self, Progress};
use feed::Feed;
pub use replay::{ReplayOptions, ReplayTo, replay};

/// The prefix of the heartbeat messages sync emits on an idle staging.
pub const HEARTBEAT_PREFIX: &str = "stagingprop-heartbeat";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot use {target}: {source}")]
    Database { target: String, source: QueryError },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("staging and production differ, nothing was applied:\n  - {}", .0.join("\n  - "))]
    Schema(Vec<String>),
    #[error("key remapping cannot work with these tables, nothing was applied:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
    #[error("{0}")]
    Slot(String),
    #[error(
        "staging sent changes of {0}, which is not in [[tables]]; run `stagingprop init` so the publication lists exactly the managed tables"
    )]
    UnknownTable(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("{0}")]
    Replay(String),
}

impl SyncError {
    /// Worth retrying after a pause: a database went away or is restarting.
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Database { source, .. } => source.transient,
            SyncError::Apply(e) => e.is_transient(),
            SyncError::Replication(e) => match e {
                ReplicationError::Connect { .. }
                | ReplicationError::ConnectTimeout { .. }
                | ReplicationError::Io { .. }
                | ReplicationError::Closed { .. } => true,
                ReplicationError::Stream { source, .. }
                | ReplicationError::Server { source, .. }
                | ReplicationError::AuthFailed { source, .. } => {
                    // Shutting down / starting up / slot busy with a session that is ending.
                    matches!(source.code.as_str(), "57P01" | "57P02" | "57P03" | "55006")
                        || source.code.starts_with("08")
                }
                _ => false,
            },
            _ => false,
        }
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            SyncError::Database { source, .. } => source.sqlstate(),
            SyncError::Apply(e) => e.sqlstate(),
            SyncError::Replication(e) => e.sqlstate(),
            _ => None,
        }
    }
}

/// How a sync run ends besides a signal (for tests and benchmarks).
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Stop once production has everything staging had written when sync started (or when the
    /// given LSN is reached), instead of following staging forever.
    pub stop_at: Option<StopAt>,
    /// Give up after this many consecutive failed attempts (None: keep trying).
    pub max_attempts: Option<u32>,
}

#[derive(Clone, Copy, Debug)]
pub enum StopAt {
    /// Staging's current WAL position when the session starts.
    CaughtUp,
    Lsn(Lsn),
}

/// What a sync run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncSummary {
    pub stats: apply::ApplyStats,
    pub last_applied: Option<Lsn>,
}

/// The part of a run that survives reconnects.
struct RunState {
    stats: apply::ApplyStats,
    /// Apply one change at a time until production's progress passes this position.
    one_by_one_until: Option<Lsn>,
    last_applied: Option<Lsn>,
    /// The last position received from staging.
    last_received: Lsn,
    stop_lsn: Option<Lsn>,
    /// Staging's table definitions as last read, for a spool applier while staging is down.
    staging_schema: Option<Arc<StagingSchema>>,
}

enum SessionEnd {
    Stopped,
}

/// Runs sync until `shutdown` resolves (or `options.stop_at` is reached), retrying transient
/// failures of either database with backoff. With `[spool]`, a receiver writes staging's
/// stream to the spool and confirms it to staging, and the applier applies the spool.
pub async fn run<S>(
    config: &Config,
    options: &SyncOptions,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    match &config.spool {
        None => apply_loop(config, options, &Feeding::Slot, shutdown).await,
        Some(spool) => receiver::spooled(config, spool, options, shutdown).await,
    }
}

/// Where the applier reads staging's transactions from.
enum Feeding {
    /// Staging's slot: what production committed is confirmed to it.
    Slot,
    /// The spool a receiver of this process writes; the receiver confirms to staging.
    Spool(Arc<receiver::SpoolShared>),
    /// A spool on disk, applied to a target up to its end or a limit (`replay`).
    Replay(Box<replay::ReplayPlan>),
}

impl Feeding {
    fn holder(&self) -> &'static str {
        match self {
            Feeding::Slot => "staging keeps what production has not confirmed",
            Feeding::Spool(_) | Feeding::Replay(_) => {
                "the spool keeps what the target has not applied"
            }
        }
    }
}

/// The applier's retry loop: sessions until stopped, with backoff on transient failures.
async fn apply_loop<S>(
    config: &Config,
    options: &SyncOptions,
    feeding: &Feeding,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    // Latched: a session that fails while stopping (production down during the last commit)
    // leads back here, and the backoff must see the request again rather than poll a future
    // that already completed.
    let mut shutdown = Latch::new(shutdown);
    let mut shutdown = std::pin::Pin::new(&mut shutdown);
    let mut state = RunState {
        stats: apply::ApplyStats::default(),
        one_by_one_until: None,
        last_applied: None,
        last_received: Lsn::INVALID,
        stop_lsn: match options.stop_at {
            Some(StopAt::Lsn(lsn)) => Some(lsn),
            _ => None,
        },
        staging_schema: None,
    };
    let mut attempt: u32 = 0;
    loop {
        let batches_before = state.stats.batches;
        let result = session(config, options, &mut state, feeding, shutdown.as_mut()).await;
        if state.stats.batches > batches_before {
            // This session committed on production: a failure now starts the backoff afresh.
            attempt = 0;
        }
        match result {
            Ok(SessionEnd::Stopped) => {
                return Ok(SyncSummary {
                    stats: state.stats,
                    last_applied: state.last_applied,
                });
            }
            Err(e) if e.is_transient() => {
                let what = format!("nothing is lost: {}", feeding.holder());
                if pause_before_retry(e, &mut attempt, options, "", &what, shutdown.as_mut())
                    .await?
                {
                    return Ok(SyncSummary {
                        stats: state.stats,
                        last_applied: state.last_applied,
                    });
                }
            }
            Err(SyncError::Apply(e)) if e.may_be_ordering() && state.one_by_one_until.is_none() => {
                // Set-based apply can trip a unique or foreign-key check that applying the
                // changes in staging's order would not: replay this stretch one change at a time.
                let from = state.last_applied.unwrap_or_default();
                let until = state.last_received;
                tracing::warn!(
                    "{e}; replaying {from} to {until} one change at a time to see whether the error is real"
                );
                state.one_by_one_until = Some(until);
            }
            Err(e) => return Err(e),
        }
    }
}

/// After a transient failure `error`: counts the attempt, says what happened and waits before
/// the next one (1 s doubling up to 30 s). `Err(error)` when attempts are used up; `Ok(true)`
/// when `stop` came first.
async fn pause_before_retry<S>(
    error: SyncError,
    attempt: &mut u32,
    options: &SyncOptions,
    who: &str,
    why_nothing_is_lost: &str,
    stop: std::pin::Pin<&mut S>,
) -> Result<bool, SyncError>
where
    S: Future<Output = ()>,
{
    *attempt += 1;
    metrics::counter!("stagingprop_retries_total").increment(1);
    if options.max_attempts.is_some_and(|max| *attempt >= max) {
        return Err(error);
    }
    let delay = Duration::from_millis((500u64 << (*attempt).min(6)).min(30_000));
    tracing::warn!(
        attempt = *attempt,
        "{who}{error}; retrying in {:.1} s ({why_nothing_is_lost})",
        delay.as_secs_f64()
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(false),
        _ = stop => Ok(true),
    }
}

/// A future that, once resolved, stays resolved: polling it again returns `Ready` at once.
struct Latch<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
}

impl<F: Future<Output = ()>> Latch<F> {
    fn new(inner: F) -> Self {
        Latch {
            inner: Some(Box::pin(inner)),
        }
    }
}

impl<F: Future<Output = ()>> Future for Latch<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(());
        };
        match inner.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.inner = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

fn database_error(
    endpoint: &Endpoint,
    what: &str,
) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let target = endpoint.describe();
    let what = what.to_owned();
    move |e| SyncError::Database {
        target,
        source: QueryError::new(what, &e),
    }
}

/// A transactional message through the slot: gives an idle sync a transaction to apply and
/// confirm, so staging never keeps WAL for it.
async fn emit_heartbeat(staging: &Endpoint, s: &tokio_postgres::Client) -> Result<(), SyncError> {
    s.execute(
        "SELECT pg_logical_emit_message(true, $1, '')",
        &[&HEARTBEAT_PREFIX],
    )
    .await
    .map_err(database_error(staging, "emitting a heartbeat"))?;
    Ok(())
}

/// Staging's side of validation: the managed tables as staging defines them, and the foreign
/// keys that say which columns follow a remapped key.
struct StagingSchema {
    tables: Vec<Option<TableMeta>>,
    references: Vec<ColumnReference>,
}

impl StagingSchema {
    /// Reads them from `client` (staging, or a copy of it standing in while staging is down).
    async fn load(
        config: &Config,
        endpoint: &Endpoint,
        client: &tokio_postgres::Client,
    ) -> Result<StagingSchema, SyncError> {
        let names: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
        let tables = catalog::load_tables(client, &names)
            .await
            .map_err(database_error(endpoint, "reading table definitions"))?;
        let references = catalog::column_references(client)
            .await
            .map_err(database_error(endpoint, "reading foreign keys"))?;
        Ok(StagingSchema { tables, references })
    }
}

/// Compares the managed tables on both sides.
async fn validate(
    config: &Config,
    staging: &StagingSchema,
    production: &Endpoint,
    p: &tokio_postgres::Client,
) -> Result<(Vec<TableMeta>, Option<Remapper>), SyncError> {
    let names: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
    let on_production = catalog::load_tables(p, &names)
        .await
        .map_err(database_error(production, "reading table definitions"))?;
    let sides = catalog::compare::Sides {
        source: "staging",
        target: &production.role,
    };
    let metas: Vec<TableMeta> =
        catalog::compare::compare_all(&names, &staging.tables, on_production, sides)
            .map_err(SyncError::Schema)?
            .into_iter()
            .map(|(_, on_production)| on_production)
            .collect();
    let remapper = Remapper::new(config, &metas, &staging.references).map_err(SyncError::Rules)?;
    Ok((metas, remapper))
}

/// The slot must exist and still hold what it promised; it is never created here. Returns its
/// confirmed position.
async fn check_slot(
    config: &Config,
    staging: &Endpoint,
    s: &tokio_postgres::Client,
) -> Result<Lsn, SyncError> {
    let slot = &config.sync.slot;
    let row = s
        .query_opt(
            "SELECT wal_status, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[slot],
        )
        .await
        .map_err(database_error(staging, "reading pg_replication_slots"))?;
    match row {
        None => Err(SyncError::Slot(format!(
            "the replication slot {slot} does not exist on {}. sync never creates it silently: \
             changes made since it disappeared cannot be streamed. Create it and re-seed production \
             (`stagingprop init --no-slot` then `stagingprop copy`), or `stagingprop init` if production \
             is already equal to staging",
            staging.describe()
        ))),
        Some(row) if row.get::<_, Option<String>>(0).as_deref() == Some("lost") => {
            Err(SyncError::Slot(format!(
                "the replication slot {slot} on {} was invalidated: staging removed WAL it still \
                 needed (max_slot_wal_keep_size), so changes since production's last applied \
                 transaction are lost. Drop the slot (SELECT pg_drop_replication_slot('{slot}')) and \
                 re-seed production with `stagingprop copy`",
                staging.describe()
            )))
        }
        Some(row) => Ok(row
            .get::<_, Option<String>>(1)
            .and_then(|l| l.parse().ok())
            .unwrap_or_default()),
    }
}

/// The transaction being received.
struct OpenTxn {
    xid: Xid,
    /// Already on production (its commit lies before production's progress).
    skip: bool,
}

/// A staging relation as sync applies it.
struct RelationInfo {
    table: usize,
    map: ColumnMap,
    production_width: usize,
    /// Staging's columns are production's, in the same order.
    identity: bool,
}

async fn session<S>(
    config: &Config,
    options: &SyncOptions,
    state: &mut RunState,
    feeding: &Feeding,
    mut shutdown: std::pin::Pin<&mut S>,
) -> Result<SessionEnd, SyncError>
where
    S: Future<Output = ()>,
{
    let staging = Endpoint::from_db_config(&config.staging)?;
    let target = match feeding {
        Feeding::Replay(plan) => plan.target.clone(),
        _ => Endpoint::from_db_config(&config.production)?,
    };
    let s = staging
        .connect()
        .await
        .map_err(database_error(&staging, "connect"));
    let s = match (s, feeding) {
        (Ok(s), _) => Some(s),
        (Err(e), Feeding::Slot) => return Err(e),
        (Err(e), _) => {
            // The spool has what the target needs; staging is only asked for its table
            // definitions, which the target (a copy of it) stands in for.
            tracing::warn!(
                "{e}; applying from the spool without staging, checking tables against {}",
                if state.staging_schema.is_some() {
                    "staging's definitions as read before"
                } else {
                    "the target's own definitions"
                }
            );
            None
        }
    };
    let p = target
        .connect()
        .await
        .map_err(database_error(&target, "connect"))?;
    state::ensure(&p).await.map_err(ApplyError::from)?;
    let staging_schema = match (&s, &state.staging_schema) {
        (Some(s), _) => Arc::new(StagingSchema::load(config, &staging, s).await?),
        (None, Some(cached)) => cached.clone(),
        (None, None) => Arc::new(StagingSchema::load(config, &target, &p).await?),
    };
    if s.is_some() {
        state.staging_schema = Some(staging_schema.clone());
    }
    let (metas, remapper) = validate(config, &staging_schema, &target, &p).await?;
    let progress = state::progress::read(&p, &config.sync.slot)
        .await
        .map_err(ApplyError::from)?;
    if progress.is_some_and(|p| p.is_copy_in_progress()) {
        return Err(SyncError::Slot(format!(
            "a `stagingprop copy` into {} started but did not complete, so it is not a \
             consistent copy of staging: run the copy again (with --truncate) before sync",
            target.describe()
        )));
    }
    let applied_end = progress.map(|p| p.end_lsn).unwrap_or_default();
    match (feeding, &s) {
        (Feeding::Slot, Some(s)) => {
            let confirmed = check_slot(config, &staging, s).await?;
            if applied_end.is_valid() && confirmed > applied_end {
                // sync confirms only what production committed, so production lost commits
                // it had: restored from a backup, or its progress table was changed.
                return Err(SyncError::Slot(format!(
                    "production's progress ({applied_end}) is behind what the slot {} already \
                     released ({confirmed}): production lacks changes staging no longer has (was \
                     it restored from a backup?). With a [spool] that holds them, `stagingprop \
                     replay` brings it up to date; otherwise re-seed production with `stagingprop copy`",
                    config.sync.slot
                )));
            }
        }
        (Feeding::Replay(_), _) if progress.is_none() => {
            return Err(SyncError::Replay(format!(
                "{} has no row for slot {} in stagingprop.progress, so nothing says which staging \
                 transactions it already has: replay needs a target seeded by `stagingprop copy` \
                 (or restored from a backup of one)",
                target.describe(),
                config.sync.slot
            )));
        }
        _ => {}
    }
    if matches!(options.stop_at, Some(StopAt::CaughtUp)) && state.stop_lsn.is_none() {
        let Some(s) = &s else {
            return Err(SyncError::Slot(
                "--until-caught-up needs staging, to know where it is: staging is unreachable"
                    .into(),
            ));
        };
        let lsn: String = s
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(database_error(&staging, "reading the WAL position"))?
            .get(0);
        state.stop_lsn = lsn.parse().ok();
        // Something to apply past that point even if no managed table changes.
        emit_heartbeat(&staging, s).await?;
    }
    if let (Some(stop), true) = (state.stop_lsn, applied_end.is_valid())
        && applied_end >= stop
    {
        return Ok(SessionEnd::Stopped);
    }

    let tables: Vec<(TableMeta, _)> = metas
        .into_iter()
        .zip(&config.tables)
        .map(|(meta, t)| (meta, t.on_conflict))
        .collect();
    // Large transactions are applied while staging still decodes them, each in a production
    // session of its own. Not with key remapping: two sessions would allocate keys apart.
    let streaming = config.sync.streaming && remapper.is_none() && matches!(feeding, Feeding::Slot);
    let stream_sessions = streaming.then(|| StreamSessions {
        target: target.clone(),
        tables: tables.clone(),
        idle: Vec::new(),
    });
    let mut applier = Applier::new(p, &config.sync.slot, tables, remapper, applied_end).await?;
    applier.files = file_publisher(config, &applier)?;
    applier.files.remove_leftovers().map_err(ApplyError::from)?;
    applier.stats = state.stats;
    if let Some(until) = state.one_by_one_until {
        applier.one_by_one = applied_end < until;
    }
    if !applier.replica_role {
        tracing::info!(
            "{} checks foreign keys during apply (the role may not set session_replication_role); tables are applied parents first",
            target.role
        );
    }

    let (mut feed, confirm) = match feeding {
        Feeding::Slot => {
            let mut replication = ReplicationClient::connect(&staging).await?;
            let _ = replication.identify_system().await?;
            let mut pgoutput = PgOutputOptions::new(vec![config.sync.publication.clone()]);
            pgoutput.status_interval = Duration::from_secs(config.sync.status_interval_secs);
            if streaming {
                pgoutput.proto_version = 2;
                pgoutput.streaming = true;
            }
            let stream = replication
                .start_logical(&config.sync.slot, applied_end, &pgoutput)
                .await?;
            let flush = stream.flush_handle();
            (Feed::Slot(stream), Confirm::Slot(flush))
        }
        Feeding::Spool(shared) => {
            let reader = SpoolReader::open(&shared.dir, applied_end)?;
            (
                Feed::Spool {
                    reader,
                    shared: shared.clone(),
                    mark: shared.mark.subscribe(),
                },
                Confirm::Spool(shared.clone()),
            )
        }
        Feeding::Replay(plan) => {
            let reader = SpoolReader::open(&plan.dir, applied_end)?;
            (
                Feed::Replay {
                    reader,
                    until: plan.until,
                    end: plan.end,
                },
                Confirm::Nothing,
            )
        }
    };
    if applied_end.is_valid() {
        // What production has is durable: staging may release it even if it was applied by an
        // earlier run that died before confirming.
        confirm.applied(applied_end);
    }
    tracing::info!(
        slot = %config.sync.slot,
        from = %applied_end,
        "applying {} to {}",
        feed.describe(&staging),
        target.describe()
    );

    let mut pipeline = Pipeline {
        config,
        staging: &staging,
        applier,
        relations: HashMap::new(),
        txn: None,
        batch_last: None,
        batch_started: None,
        applied_end,
        confirm,
        last_activity: Instant::now(),
        one_by_one_until: state.one_by_one_until,
        last_received: state.last_received,
        sequences_synced: false,
        last_commit_time: None,
        rows_at_batch_start: state.stats.rows_inserted
            + state.stats.rows_updated
            + state.stats.rows_deleted,
        unflushed: Unflushed::default(),
        stream_sessions,
        streams: HashMap::new(),
        in_stream: None,
    };
    let result = pipeline
        .run(&mut feed, s.as_ref(), state, shutdown.as_mut())
        .await;
    // A batch may have committed just before an error.
    pipeline.record_committed();
    state.stats = pipeline.applier.stats;
    state.last_received = pipeline.last_received;
    state.one_by_one_until = pipeline.one_by_one_until;
    if pipeline.applied_end.is_valid() {
        state.last_applied = Some(pipeline.applied_end);
    }
    if result.is_err() {
        let _ = pipeline.applier.rollback().await;
    }
    let closed = feed.close().await;
    let end = result?;
    closed?;
    Ok(end)
}

/// The managed-file publisher for a production session.
fn file_publisher(config: &Config, applier: &Applier) -> Result<Publisher, ApplyError> {
    let file_tables = config
        .tables
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.files.as_ref().map(|files| (i, files, applier.meta(i))));
    Ok(Publisher::new(file_tables.collect())?)
}

/// How sync opens production sessions for streamed transactions, and the ones it may reuse.
struct StreamSessions {
    target: Endpoint,
    tables: Vec<(TableMeta, ConflictPolicy)>,
    idle: Vec<Applier>,
}

/// A large staging transaction staging streams while it is in progress: applied as it
/// arrives in a production transaction of its own, committed when staging's commits.
struct StreamedTxn {
    applier: Applier,
    /// Its subtransactions seen so far, in order, with the savepoint each started at: a
    /// subtransaction that aborts rolls back to its savepoint, which also undoes the ones
    /// nested in it (they all came after it).
    savepoints: Vec<(Xid, Savepoint)>,
}

fn streamed_transaction_ended(outcome: &'static str, open: usize) {
    metrics::counter!("stagingprop_streamed_transactions_total", "outcome" => outcome).increment(1);
    metrics::gauge!("stagingprop_streamed_transactions_open").set(open as f64);
}

/// The savepoint a streamed subtransaction starts at.
fn savepoint_name(subxact: Xid) -> String {
    format!("stagingprop_subxact_{subxact}")
}

/// Where the applier reports what the target committed.
enum Confirm {
    /// Staging may release it.
    Slot(FlushHandle),
    /// The spool's receiver may delete it (and, over `max_bytes`, confirm it to staging).
    Spool(Arc<receiver::SpoolShared>),
    /// Replay: nobody.
    Nothing,
}

impl Confirm {
    fn applied(&self, end: Lsn) {
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
        }
    }
}

struct Pipeline<'a> {
    config: &'a Config,
    staging: &'a Endpoint,
    applier: Applier,
    relations: HashMap<Oid, RelationInfo>,
    txn: Option<OpenTxn>,
    /// The last staging transaction in the open production transaction.
    batch_last: Option<Progress>,
    batch_started: Option<Instant>,
    applied_end: Lsn,
    confirm: Confirm,
    last_activity: Instant,
    one_by_one_until: Option<Lsn>,
    last_received: Lsn,
    sequences_synced: bool,
    last_commit_time: Option<crate::model::PgTimestamp>,
    rows_at_batch_start: u64,
    unflushed: Unflushed,
    /// Set when staging streams large transactions in progress.
    stream_sessions: Option<StreamSessions>,
    /// Streamed transactions in progress.
    streams: HashMap<Xid, StreamedTxn>,
    /// The streamed transaction whose block is open (between Stream Start and Stream Stop):
    /// the changes that arrive belong to it.
    in_stream: Option<Xid>,
}

/// Batches committed on production whose commit record production may not have flushed yet:
/// (production WAL position to be flushed past, staging end), oldest first.
#[derive(Debug, Default)]
struct Unflushed(VecDeque<(Lsn, Lsn)>);

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

impl Pipeline<'_> {
    async fn run<S>(
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
            let next = match ready {
                Some(next) => Ok::<_, tokio::time::error::Elapsed>(next),
                None => {
                    let wait = self.between_bursts(feed, staging, &mut report).await?;
                    burst = READY_BURST;
                    tokio::select! {
                        next = tokio::time::timeout(wait, feed.next()) => next,
                        _ = shutdown.as_mut() => {
                            self.finish().await?;
                            tracing::info!(applied = %self.applied_end, "stopping: everything applied is confirmed");
                            return Ok(SessionEnd::Stopped);
                        }
                    }
                }
            };
            match next {
                Err(_) => {
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
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => {
                    if feed.ends() {
                        self.finish().await?;
                        tracing::info!(applied = %self.applied_end, "reached the end of what to replay");
                        return Ok(SessionEnd::Stopped);
                    }
                    return Err(SyncError::Replication(ReplicationError::Closed {
                        target: "staging".into(),
                    }));
                }
                Ok(Ok(Some((lsn, message)))) => {
                    self.last_activity = Instant::now();
                    self.last_received = self.last_received.max(lsn);
                    let handled = self.handle(lsn, message).await;
                    // The message may have made a closed batch commit.
                    self.record_committed();
                    handled?;
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
        let max_delay = Duration::from_millis(self.config.sync.batch_max_delay_ms);
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
            let st = self.applier.stats;
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
        // Between transactions with a batch open, wait no longer than the batch may.
        let mut wait = match (self.txn.is_none(), self.batch_started) {
            (true, Some(started)) => max_delay.saturating_sub(started.elapsed()),
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
    async fn commit_batch(&mut self) -> Result<(), SyncError> {
        let Some(last) = self.batch_last.take() else {
            return Ok(());
        };
        let started = self.batch_started.take();
        self.applier.close(&last).await?;
        self.record_committed();
        self.last_commit_time = Some(last.commit_time);
        if let Some(started) = started {
            metrics::histogram!("stagingprop_batch_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Commits the closed batch now, if there is one.
    async fn complete_batch(&mut self) -> Result<(), SyncError> {
        let completed = self.applier.complete().await;
        self.record_committed();
        Ok(completed?)
    }

    /// Takes note of the batches production committed: applied, and confirmed once flushed.
    fn record_committed(&mut self) {
        for committed in self.applier.take_committed() {
            self.note_committed(committed);
        }
    }

    /// One batch committed, by the main session or a streamed transaction's.
    fn note_committed(&mut self, committed: apply::Committed) {
        let end = committed.end;
        self.applied_end = end;
        let st = &self.applier.stats;
        let rows = st.rows_inserted + st.rows_updated + st.rows_deleted;
        metrics::histogram!("stagingprop_batch_rows")
            .record((rows - self.rows_at_batch_start) as f64);
        self.rows_at_batch_start = rows;
        metrics::gauge!("stagingprop_transactions_applied_total").set(st.transactions as f64);
        self.unflushed.committed(committed.durable_at, end);
        self.confirm_flushed(committed.flushed);
        if self.one_by_one_until.is_some_and(|until| end >= until) {
            self.one_by_one_until = None;
            self.applier.one_by_one = false;
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
    fn target(&mut self) -> Result<&mut Applier, SyncError> {
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
    async fn enter_subxact(&mut self, xid: Option<Xid>) -> Result<(), SyncError> {
        let (Some(top), Some(xid)) = (self.in_stream, xid) else {
            return Ok(());
        };
        let Some(streamed) = self.streams.get_mut(&top) else {
            return Ok(());
        };
        if xid == top || streamed.savepoints.iter().any(|(x, _)| *x == xid) {
            return Ok(());
        }
        let at = streamed.applier.savepoint(&savepoint_name(xid)).await?;
        streamed.savepoints.push((xid, at));
        Ok(())
    }

    /// Stream Start: the changes that follow belong to `xid`, in a session of its own.
    async fn stream_start(&mut self, xid: Xid) -> Result<(), SyncError> {
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
                None => {
                    let p = sessions
                        .target
                        .connect()
                        .await
                        .map_err(database_error(&sessions.target, "connect"))?;
                    let mut applier = Applier::new(
                        p,
                        &self.config.sync.slot,
                        sessions.tables.clone(),
                        None,
                        Lsn::INVALID,
                    )
                    .await?;
                    applier.files = file_publisher(self.config, &applier)?;
                    applier
                }
            };
            applier.one_by_one = self.applier.one_by_one;
            self.streams.insert(
                xid,
                StreamedTxn {
                    applier,
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
    async fn stream_abort(&mut self, xid: Xid, subxact: Xid) -> Result<(), SyncError> {
        if subxact == xid {
            if let Some(mut streamed) = self.streams.remove(&xid) {
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
        if let Some(i) = streamed.savepoints.iter().position(|(x, _)| *x == subxact) {
            let at = streamed.savepoints[i].1;
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
    async fn stream_commit(&mut self, xid: Xid, last: Progress) -> Result<(), SyncError> {
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
        let applier = &mut streamed.applier;
        applier.set_progress_at(self.applier.progress_at());
        applier.close(&last).await?;
        applier.complete().await?;
        self.applier.set_progress_at(last.end_lsn);
        applier.stats.transactions += 1;
        self.applier.stats.add(&applier.stats);
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
    fn reuse(&mut self, mut applier: Applier) {
        applier.stats = apply::ApplyStats::default();
        if let Some(sessions) = &mut self.stream_sessions {
            sessions.idle.push(applier);
        }
    }

    async fn handle(&mut self, lsn: Lsn, message: LogicalMessage) -> Result<(), SyncError> {
        match message {
            LogicalMessage::Begin { final_lsn, xid, .. } => {
                // Its commit record lies before the end of the last applied transaction: applied.
                let skip = self.applied_end.is_valid() && final_lsn < self.applied_end;
                self.txn = Some(OpenTxn { xid, skip });
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
                });
                self.applier.stats.transactions += 1;
                let sync = &self.config.sync;
                let full = self.applier.pending_rows() >= sync.batch_max_rows
                    || self.applier.pending_bytes() >= sync.batch_max_bytes
                    || self.applier.one_by_one
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
                if self.skipping() {
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
                self.flush_if_large().await?;
            }
            LogicalMessage::Update {
                xid,
                relation,
                old,
                new,
            } => {
                if self.skipping() {
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
                self.flush_if_large().await?;
            }
            LogicalMessage::Delete {
                xid, relation, old, ..
            } => {
                if self.skipping() {
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
                self.enter_subxact(xid).await?;
                let mut tables = Vec::with_capacity(relations.len());
                for oid in relations {
                    tables.push(self.relation_info(oid)?.table);
                }
                self.target()?.truncate(&tables, restart_identity).await?;
            }
            LogicalMessage::StreamStart { xid, .. } => self.stream_start(xid).await?,
            LogicalMessage::StreamStop => self.in_stream = None,
            LogicalMessage::StreamAbort {
                xid, subxact_xid, ..
            } => self.stream_abort(xid, subxact_xid).await?,
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
        let raised = catalog::sequences::raise(self.applier.client(), &values)
            .await
            .map_err(|e| {
                SyncError::Apply(ApplyError::Query(QueryError::new("raising sequences", &e)))
            })?;
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
        self.target()?
            .files
            .stage(table, old, new)
            .map_err(|e| SyncError::Apply(e.into()))
    }

    fn skipping(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.skip)
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
            .files
            .check_identity(table, relation.replica_identity)
            .map_err(|e| SyncError::Apply(e.into()))?;
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
    use super::*;

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

    /// A shutdown request seen once is seen again: `run` polls it after a session that failed
    /// while stopping, and an `async` block polled after completion panics.
    #[tokio::test]
    async fn a_latched_shutdown_stays_resolved() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut latch = Latch::new(async move {
            let _ = rx.await;
        });
        let mut latch = std::pin::Pin::new(&mut latch);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(latch.as_mut().poll(&mut cx).is_pending());
        drop(tx);
        latch.as_mut().await;
        latch.as_mut().await;
        assert!(latch.as_mut().poll(&mut cx).is_ready());
    }
}
