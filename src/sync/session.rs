//! One sync session: connect both sides, check the slot and production's progress, compare the
//! tables, open production's session and the feed, then run the pipeline until it stops or
//! fails. The retry loop ([`super::retry`]) starts the next one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::dry_run::DryRun;
use super::feed::Feed;
use super::pipeline::{Confirm, Pipeline};
use super::retry::{RunState, SessionEnd};
use super::streamed::StreamSessions;
use super::target::Target;
use super::until::Until;
use super::{Feeding, HEARTBEAT_PREFIX, StopAt, SyncError, SyncOptions, database_error};
use crate::apply::{Applier, ApplyError, statistics};
use crate::catalog::{self, ColumnReference, TableMeta};
use crate::config::{Config, TableName};
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::pg::replication::{PgOutputOptions, ReplicationClient};
use crate::remap::Remapper;
use crate::spool::store::SpoolReader;
use crate::state;

/// A transactional message through the slot: gives an idle sync a transaction to apply and
/// confirm, so staging never keeps WAL for it.
pub(super) async fn emit_heartbeat(
    staging: &Endpoint,
    s: &tokio_postgres::Client,
) -> Result<(), SyncError> {
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
pub(super) struct StagingSchema {
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
        let configs: Vec<&crate::config::TableConfig> = config.tables.iter().collect();
        let tables =
            catalog::managed_parts(&configs, tables, "staging").map_err(SyncError::Schema)?;
        let references = catalog::column_references(client)
            .await
            .map_err(database_error(endpoint, "reading foreign keys"))?;
        Ok(StagingSchema { tables, references })
    }
}

/// Staging must send exactly the managed part of each partial table: never a column the
/// config leaves to production.
async fn check_publication(
    config: &Config,
    schema: &StagingSchema,
    staging: &Endpoint,
    s: &tokio_postgres::Client,
) -> Result<(), SyncError> {
    if !config.tables.iter().any(|t| t.is_partial()) {
        return Ok(());
    }
    let published = catalog::publication::published(s, &config.sync.publication)
        .await
        .map_err(database_error(staging, "reading the publication"))?;
    let problems: Vec<String> = config
        .tables
        .iter()
        .zip(&schema.tables)
        .filter_map(|(table, meta)| {
            let entry = published.iter().find(|p| p.table == table.name)?;
            catalog::publication::mismatch(table, meta.as_ref()?, entry)
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SyncError::Schema(problems))
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
pub(super) async fn check_slot(
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

pub(super) async fn session<S>(
    config: &Config,
    options: &SyncOptions,
    state: &mut RunState,
    feeding: &Feeding,
    shutdown: std::pin::Pin<&mut S>,
) -> Result<SessionEnd, SyncError>
where
    S: Future<Output = ()>,
{
    let staging = Endpoint::from_db_config(&config.staging)?;
    let target = match feeding {
        Feeding::Replay(plan) => plan.target.clone(),
        Feeding::Stream(feeding) => match &feeding.replay_to {
            Some(target) => target.clone(),
            None => Endpoint::from_db_config(&config.production)?,
        },
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
    if !options.dry_run {
        state::ensure(&p).await.map_err(ApplyError::from)?;
    }
    let staging_schema = match (&s, &state.staging_schema) {
        (Some(s), _) => {
            let schema = StagingSchema::load(config, &staging, s).await?;
            check_publication(config, &schema, &staging, s).await?;
            Arc::new(schema)
        }
        (None, Some(cached)) => cached.clone(),
        (None, None) => Arc::new(StagingSchema::load(config, &target, &p).await?),
    };
    if s.is_some() {
        state.staging_schema = Some(staging_schema.clone());
    }
    let (metas, remapper) = validate(config, &staging_schema, &target, &p).await?;
    let progress = match state::progress::read(&p, &config.sync.slot).await {
        // A dry run creates nothing: no progress table yet means production has nothing.
        Err(e) if options.dry_run && e.sqlstate() == Some("42P01") => None,
        read => read.map_err(ApplyError::from)?,
    };
    if progress.is_some_and(|p| p.is_copy_in_progress()) {
        return Err(SyncError::Slot(format!(
            "a `stagingprop copy` into {} started but did not complete, so it is not a \
             consistent copy of staging: run the copy again (with --truncate) before sync",
            target.describe()
        )));
    }
    let applied_end = progress.map(|p| p.end_lsn).unwrap_or_default();
    // Tables a resumed copy loaded from a later snapshot than the hand-off: their changes up to
    // that snapshot are in their rows already.
    let copied_at = if options.dry_run && progress.is_none() {
        HashMap::new()
    } else {
        state::copy_tables::ahead_of(&p, &config.sync.slot, applied_end)
            .await
            .map_err(ApplyError::from)?
    };
    for (table, at) in &copied_at {
        tracing::info!(
            table = %table,
            snapshot = %at,
            "{table} was copied from a later snapshot than the hand-off; its changes committed before {at} are skipped"
        );
    }
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
        (Feeding::Stream(feeding), _) if progress.is_none() && feeding.replay_to.is_none() => {
            tracing::warn!(
                "{} has no progress row for slot {}: reading the stream from its first message, \
                 as if the target held what staging had before it (seed it with `stagingprop copy` \
                 otherwise)",
                target.describe(),
                config.sync.slot
            );
        }
        (Feeding::Replay(_) | Feeding::Stream(_), _) if progress.is_none() => {
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
    // One NATS connection per session, for what the stream holds and for reading it.
    let stream_js = match feeding {
        Feeding::Stream(feeding) => Some(crate::stream::connect(&feeding.stream).await?),
        _ => None,
    };
    if let (Feeding::Stream(feeding), Some(js), Some(StopAt::CaughtUp), None) =
        (feeding, &stream_js, options.stop_at, state.stop_lsn)
    {
        let stream = &feeding.stream;
        // Caught up with the stream: everything it held whole when the run started.
        let opened = crate::stream::open_stream(js, stream).await?;
        let last = crate::stream::last_published(&opened, stream).await?;
        let published = crate::stream::publisher::Published::after(last, 0);
        if !published.end.is_valid() || (applied_end.is_valid() && applied_end >= published.end) {
            return Ok(SessionEnd::Stopped);
        }
        state.stop_lsn = Some(published.end);
    }
    if (options.dry_run || matches!(options.stop_at, Some(StopAt::CaughtUp)))
        && state.stop_lsn.is_none()
    {
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
    if let (Some(Until::Lsn(cutoff)), true) = (options.until, applied_end.is_valid())
        && applied_end > cutoff
    {
        tracing::info!(applied = %applied_end, "production already has everything committed up to the cutoff {cutoff}");
        return Ok(SessionEnd::Stopped);
    }
    if let (Some(_), Feeding::Slot, Some(s)) = (options.until, feeding, &s) {
        // A transaction committed now: past a cutoff in the past, it ends the run as soon as
        // everything before it is applied, even if no managed table changes.
        emit_heartbeat(&staging, s).await?;
    }

    if !options.dry_run {
        // The first statements of a session get custom plans from the statistics as they are:
        // they must not tell the planner a managed table is empty.
        let analyzed = statistics::analyze_misleading(&p, &metas)
            .await
            .map_err(database_error(&target, "checking table statistics"))?;
        for (table, before) in analyzed {
            tracing::info!(
                table = %table,
                relpages = before.relpages,
                reltuples = before.reltuples,
                pages = before.pages,
                "analyzed {table} on {}: its statistics claimed {} rows over {} pages (taken during a bulk load, or never), which would make the planner scan it whole for every batch",
                target.role, before.reltuples.max(0.0), before.relpages
            );
        }
    }
    let tables: Vec<(TableMeta, _)> = metas
        .into_iter()
        .zip(&config.tables)
        .map(|(meta, t)| (meta, t.on_conflict))
        .collect();
    // Large transactions are applied while staging still decodes them, each in a production
    // session of its own. Not with key remapping: two sessions would allocate keys apart.
    // Nor while tables copied from a later snapshot still skip changes: whether a change is in
    // that snapshot is known from its transaction's commit position, which a streamed
    // transaction tells only at its end (the next session streams again).
    let streaming = config.sync.streaming
        && remapper.is_none()
        && matches!(feeding, Feeding::Slot)
        && !options.dry_run
        && copied_at.is_empty();
    let stream_sessions = streaming.then(|| {
        let (target, tables, config) = (target.clone(), tables.clone(), config.clone());
        StreamSessions::new(Box::new(move || {
            let (target, tables, config) = (target.clone(), tables.clone(), config.clone());
            Box::pin(async move {
                let p = target
                    .connect()
                    .await
                    .map_err(database_error(&target, "connect"))?;
                let mut applier =
                    Applier::new(p, &config.sync.slot, tables, None, Lsn::INVALID).await?;
                applier.publish_files(&config)?;
                applier.set_hooks(&config);
                Ok(applier)
            })
        }))
    });
    let (feed, confirm) = match feeding {
        Feeding::Slot => {
            let mut replication = ReplicationClient::connect(&staging).await?;
            let _ = replication.identify_system().await?;
            let mut pgoutput = PgOutputOptions::new(vec![config.sync.publication.clone()]);
            pgoutput.status_interval = Duration::from_secs(config.sync.status_interval_secs);
            pgoutput.receive_timeout = Duration::from_secs(config.sync.receive_timeout_secs);
            if streaming {
                pgoutput.stream_in_progress(replication.server_version_num());
            }
            let stream = replication
                .start_logical(&config.sync.slot, applied_end, &pgoutput)
                .await?;
            let flush = stream.flush_handle();
            // A dry run confirms nothing: the slot stays where it is.
            let confirm = if options.dry_run {
                Confirm::Nothing
            } else {
                Confirm::Slot(flush)
            };
            (Feed::Slot(stream), confirm)
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
                    end: plan.end,
                },
                Confirm::Nothing,
            )
        }
        Feeding::Stream(feeding) => {
            let stream = &feeding.stream;
            let js = match stream_js {
                Some(js) => js,
                None => crate::stream::connect(stream).await?,
            };
            let after = progress.and_then(|p| p.stream_seq);
            let reader =
                crate::stream::reader::StreamReader::open(&js, stream, after, applied_end).await?;
            (Feed::Stream(Box::new(reader)), Confirm::Nothing)
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
        "{} {} to {}",
        if options.dry_run { "reading (dry run: nothing is applied or confirmed)" } else { "applying" },
        feed.describe(&staging),
        target.describe()
    );
    let run = Run {
        config,
        staging: &staging,
        applied_end,
        confirm,
        until: options.until,
        staging_client: s.as_ref(),
        copied_at,
    };
    if options.dry_run {
        let metas = tables.into_iter().map(|(meta, _)| meta).collect();
        let dry = DryRun::new(metas, applied_end, state.stats);
        return run.drive(dry, None, feed, state, shutdown).await;
    }
    let mut applier = Applier::new(p, &config.sync.slot, tables, remapper, applied_end).await?;
    applier.publish_files(config)?;
    applier.set_hooks(config);
    applier
        .files()
        .remove_leftovers()
        .map_err(ApplyError::from)?;
    *applier.stats_mut() = state.stats;
    if let Some(until) = state.one_by_one_until {
        applier.set_one_by_one(applied_end < until);
    }
    if !applier.replica_role() {
        tracing::info!(
            "{} checks foreign keys during apply (the role may not set session_replication_role); tables are applied parents first",
            target.role
        );
    }

    run.drive(applier, stream_sessions, feed, state, shutdown)
        .await
}

/// What a session's pipeline runs with, its target aside.
struct Run<'a> {
    config: &'a Config,
    staging: &'a Endpoint,
    applied_end: Lsn,
    confirm: Confirm,
    until: Option<Until>,
    staging_client: Option<&'a tokio_postgres::Client>,
    /// Tables a resumed copy loaded from a later snapshot, and that snapshot's position.
    copied_at: HashMap<TableName, Lsn>,
}

impl Run<'_> {
    /// Runs the pipeline into `target` until it stops or fails, and keeps what survives the
    /// session in `state`.
    async fn drive<T: Target, S>(
        self,
        target: T,
        stream_sessions: Option<StreamSessions<T>>,
        mut feed: Feed,
        state: &mut RunState,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Result<SessionEnd, SyncError>
    where
        S: Future<Output = ()>,
    {
        let mut pipeline = Pipeline::new(
            self.config,
            self.staging,
            target,
            self.applied_end,
            self.confirm,
            state,
            stream_sessions,
        );
        pipeline.until = self.until;
        pipeline.copied_at = self.copied_at;
        let result = pipeline
            .run(&mut feed, self.staging_client, state, shutdown.as_mut())
            .await;
        // A batch may have committed just before an error.
        pipeline.record_committed();
        state.stats = pipeline.applier.stats();
        state.changes.add(&pipeline.committed_counts);
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
}
