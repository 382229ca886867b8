//! One sync session: connect both sides, check the slot and production's progress, compare the
//! tables, open production's session and the feed, then run the pipeline until it stops or
//! fails. The retry loop ([`super::retry`]) starts the next one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::dry_run::DryRun;
use super::feed::Feed;
use super::heartbeat::emit_heartbeat;
use super::pipeline::{Confirm, Pipeline, StreamSessions};
use super::run_state::{RunState, SessionEnd};
use super::staging_schema::StagingSchema;
use super::until::Until;
use super::{Feeding, StopAt, SyncError, SyncOptions, database_error};
use crate::apply::Target;
use crate::apply::{Applier, ApplyError, statistics};
use crate::catalog::types::TypeNames;
use crate::catalog::{self, TableMeta};
use crate::config::{Config, ConflictPolicy, TableName};
use crate::ddl::TableShape;
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::pg::replication::{PgOutputOptions, ReplicationClient};
use crate::remap::Remapper;
use crate::spool::store::SpoolReader;
use crate::state::{self, Progress};

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

/// The last change staging captured of each table (none without the capture).
async fn captured_changes(
    config: &Config,
    staging: &Endpoint,
    s: &tokio_postgres::Client,
) -> Result<Vec<(TableName, i64)>, SyncError> {
    if !config.ddl.mode.captures() {
        return Ok(Vec::new());
    }
    crate::ddl::capture::last_changes(s, &config.sync.publication)
        .await
        .map_err(database_error(
            staging,
            "reading the captured schema changes",
        ))
}

/// The tables of `captured` whose last change production has not applied yet: it is in the
/// stream, ahead of the rows that need it.
async fn schema_changes_on_their_way(
    config: &Config,
    captured: Vec<(TableName, i64)>,
    p: &tokio_postgres::Client,
) -> Result<Vec<TableName>, SyncError> {
    let ids: Vec<i64> = captured.iter().map(|(_, id)| *id).collect();
    let applied = state::schema_changes::applied(p, &config.sync.slot, &ids)
        .await
        .map_err(ApplyError::from)?;
    Ok(crate::ddl::not_applied(captured, &applied))
}

/// Whether a schema change on its way to production (`coming`: the tables it changes)
/// accounts for `problem`: a column staging added, retyped or dropped, but never one the
/// table's column list leaves to production, nor a table or a key.
fn on_its_way(config: &Config, coming: &[TableName], problem: &catalog::compare::Problem) -> bool {
    use catalog::compare::Cause;
    match &problem.cause {
        Cause::Structure => false,
        Cause::Column(table) => coming.contains(table),
        Cause::Unsent { table, column } => {
            coming.contains(table)
                && config
                    .tables
                    .iter()
                    .any(|t| &t.name == table && t.columns.includes(column, false))
        }
    }
}

/// Compares the managed tables on both sides. A difference in a table's columns that a schema
/// change on its way (`coming`) accounts for is no reason to refuse: the change is applied
/// ahead of the rows that need it.
async fn validate(
    config: &Config,
    staging: &StagingSchema,
    production: &Endpoint,
    p: &tokio_postgres::Client,
    (coming, created): (&[TableName], &[TableShape]),
) -> Result<Validated, SyncError> {
    let names: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
    let mut on_production = catalog::load_tables(p, &names)
        .await
        .map_err(database_error(production, "reading table definitions"))?;
    let mut on_staging = staging.tables.clone();
    let absent = pattern_tables_one_side_lacks(
        config,
        (&mut on_staging, &mut on_production),
        coming,
        created,
    );
    let sides = catalog::compare::Sides {
        source: "staging",
        target: &production.role,
    };
    let metas: Vec<TableMeta> =
        match catalog::compare::compare_all(&names, &on_staging, on_production.clone(), sides) {
            Ok(pairs) => pairs
                .into_iter()
                .map(|(_, on_production)| on_production)
                .collect(),
            Err(problems) => {
                let (coming, own): (Vec<_>, Vec<_>) = problems
                    .into_iter()
                    .partition(|p| on_its_way(config, coming, p));
                if !own.is_empty() {
                    return Err(SyncError::Schema(catalog::compare::messages(own)));
                }
                for problem in &coming {
                    tracing::info!(
                        "{problem}: staging's schema change of the table is on its way and is \
                     applied before the rows that need it"
                    );
                }
                on_production.into_iter().flatten().collect()
            }
        };
    // A table whose schema change is on its way has, until that change is applied, the
    // references production's foreign keys show (a reference column renamed on staging has its
    // old name here); staging's, on columns production has, come too.
    let mut references = staging.references.clone();
    if !coming.is_empty() {
        let own = catalog::column_references(p)
            .await
            .map_err(database_error(production, "reading foreign keys"))?;
        for r in own {
            if coming.contains(&r.child) && !references.contains(&r) {
                references.push(r);
            }
        }
    }
    let remapper = Remapper::new(config, &metas, &references).map_err(SyncError::Rules)?;
    Ok(Validated {
        metas,
        remapper,
        absent,
    })
}

/// What a session applies to: production's tables, the key remapping, and which tables
/// production lacks until their creation, on its way, is applied.
struct Validated {
    metas: Vec<TableMeta>,
    remapper: Option<Remapper>,
    absent: Vec<bool>,
}

/// A table a `[[table_patterns]]` entry manages may be missing on one side: dropped on
/// staging (production's is kept, and the rows of it still in the stream are applied to it), or
/// created on staging and on its way (`coming`, or created while this run went on: `created`),
/// which production stands in for with the table as its creation will make it. Says which
/// tables production lacks so.
fn pattern_tables_one_side_lacks(
    config: &Config,
    (on_staging, on_production): (&mut [Option<TableMeta>], &mut [Option<TableMeta>]),
    coming: &[TableName],
    created: &[TableShape],
) -> Vec<bool> {
    let mut absent = vec![false; config.tables.len()];
    for (i, table) in config.tables.iter().enumerate() {
        if !table.from_pattern {
            continue;
        }
        let name = &table.name;
        match (&on_staging[i], &on_production[i]) {
            (None, Some(meta)) => {
                tracing::info!(
                    table = %name,
                    "{name} is not on staging (dropped there): production's is kept"
                );
                on_staging[i] = Some(meta.clone());
            }
            (staging_meta, None) => {
                let shape = created.iter().find(|c| &c.table_name() == name);
                if shape.is_none() && !coming.contains(name) {
                    continue;
                }
                let Some(coming_meta) = staging_meta.clone().or_else(|| shape.map(|s| s.meta()))
                else {
                    continue;
                };
                tracing::info!(
                    table = %name,
                    "{name} was created on staging: sync creates it on production in its place in the stream"
                );
                on_staging[i].get_or_insert_with(|| coming_meta.clone());
                on_production[i] = Some(coming_meta);
                absent[i] = true;
            }
            _ => {}
        }
    }
    absent
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
    let target = target_of(config, feeding)?;
    let s = connect_staging(&staging, feeding, state).await?;
    let p = target
        .connect()
        .await
        .map_err(database_error(&target, "connect"))?;
    // Read before anything else of staging's catalogs: a change captured while they are read
    // (a table created or renamed in between) shows as a difference from this list.
    let captured = match &s {
        Some(s) => captured_changes(config, &staging, s).await?,
        None => Vec::new(),
    };
    let expanded = expand_patterns(config, (&target, &p), s.as_ref(), &state.created).await?;
    let config = &expanded;
    if !options.dry_run {
        state::ensure(&p).await.map_err(ApplyError::from)?;
    }
    let staging_schema = match (&s, &state.staging_schema) {
        (Some(s), _) => {
            let schema = StagingSchema::load(config, &staging, s).await?;
            check_publication(config, &schema, &staging, s).await?;
            Arc::new(schema)
        }
        (None, Some(cached)) => Arc::new(cached.for_config(config)),
        (None, None) => Arc::new(StagingSchema::load(config, &target, &p).await?),
    };
    if s.is_some() {
        state.staging_schema = Some(staging_schema.clone());
    }
    let coming = schema_changes_on_their_way(config, captured.clone(), &p).await?;
    let validated = validate(
        config,
        &staging_schema,
        &target,
        &p,
        (&coming, &state.created),
    )
    .await;
    if validated.is_err()
        && let Some(s) = &s
        && captured_changes(config, &staging, s).await? != captured
    {
        return Err(SyncError::SchemaMoved);
    }
    let Validated {
        metas,
        remapper,
        absent,
    } = validated?;
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
    let slot_start =
        check_progress(config, feeding, (&staging, s.as_ref()), &target, progress).await?;
    // One NATS connection per session, for what the stream holds and for reading it.
    let stream_js = match feeding {
        Feeding::Stream(feeding) => Some(crate::stream::connect(&feeding.stream).await?),
        _ => None,
    };
    let ends = Ends {
        staging: &staging,
        s: s.as_ref(),
        applied_end,
    };
    if !options.dry_run {
        // Index builds a schema change left when sync stopped: before anything more is
        // applied, and before production is found caught up (a build is part of applying).
        let built = crate::apply::index_builds::run_pending(&p, &config.sync.slot).await?;
        if built > 0 {
            tracing::info!(built, "ran the index builds left from the last run");
        }
    }
    if done_before_starting(options, state, feeding, &ends, stream_js.as_ref()).await? {
        return Ok(SessionEnd::Stopped);
    }
    if !options.dry_run {
        let present: Vec<TableMeta> = metas
            .iter()
            .zip(&absent)
            .filter(|&(_, &absent)| !absent)
            .map(|(meta, _)| meta.clone())
            .collect();
        analyze_misleading(&p, &present, &target).await?;
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
        && copied_at.is_empty()
        // A table created on its way is created by the main session.
        && !absent.contains(&true);
    let stream_sessions = streaming.then(|| stream_sessions(config, &target, &tables));
    let opened = open_feed(
        config, options, feeding, &ends, progress, stream_js, streaming,
    )
    .await?;
    if applied_end.is_valid() && !options.dry_run {
        // What production has, once durable, staging may release, even if it was applied by an
        // earlier run that died before confirming. Visible is not durable yet: that run committed
        // asynchronously, and a production crash now would lose what it had not flushed.
        crate::apply::flush_wal(&p, &config.sync.slot).await?;
        opened.confirm.applied(applied_end);
    }
    tracing::info!(
        slot = %config.sync.slot,
        from = %applied_end,
        "{} {} to {}",
        if options.dry_run { "reading (dry run: nothing is applied or confirmed)" } else { "applying" },
        opened.feed.describe(&staging),
        target.describe()
    );
    let run = Run {
        config,
        staging: &staging,
        applied_end,
        feed_start: opened.start.unwrap_or(slot_start),
        types: TypeNames::of_tables(staging_schema.tables.iter().flatten()),
        apply_schema_change: options.apply_schema_change,
        confirm: opened.confirm,
        until: options.until,
        staging_client: s.as_ref(),
        copied_at,
    };
    if options.dry_run {
        let metas = tables.into_iter().map(|(meta, _)| meta).collect();
        let mut dry = DryRun::new(metas, config.sync.batch_max_rows, applied_end);
        *dry.stats_mut() = state.stats;
        return run.drive(dry, None, opened.feed, state, shutdown).await;
    }
    let mut applier =
        open_applier(config, p, tables, remapper, (&target, applied_end), state).await?;
    applier.set_lifecycles(config, &absent);
    run.drive(applier, stream_sessions, opened.feed, state, shutdown)
        .await
}

/// `config` with the tables its `[[table_patterns]]` manage: those of either side, and those
/// staging created while this run went on (`created`).
async fn expand_patterns(
    config: &Config,
    (target, p): (&Endpoint, &tokio_postgres::Client),
    s: Option<&tokio_postgres::Client>,
    created: &[TableShape],
) -> Result<Config, SyncError> {
    if config.table_patterns.is_empty() {
        return Ok(config.clone());
    }
    let mut clients = vec![p];
    clients.extend(s);
    let expanded = catalog::expand_patterns(config, &clients)
        .await
        .map_err(database_error(
            target,
            "listing the tables of [[table_patterns]]",
        ))?;
    let names: Vec<TableName> = created.iter().map(|c| c.table_name()).collect();
    Ok(expanded.with_found(&names))
}

/// Where a session applies to: production, or the target of a replay.
fn target_of(config: &Config, feeding: &Feeding) -> Result<Endpoint, SyncError> {
    Ok(match feeding {
        Feeding::Replay(plan) => plan.target.clone(),
        Feeding::Stream(feeding) => match &feeding.replay_to {
            Some(target) => target.clone(),
            None => Endpoint::from_db_config(&config.production)?,
        },
        _ => Endpoint::from_db_config(&config.production)?,
    })
}

/// Staging, which a session reading its slot needs; one applying a spool or a stream goes on
/// without it (only its table definitions are asked of it, and a copy stands in).
async fn connect_staging(
    staging: &Endpoint,
    feeding: &Feeding,
    state: &RunState,
) -> Result<Option<tokio_postgres::Client>, SyncError> {
    match (
        staging
            .connect()
            .await
            .map_err(database_error(staging, "connect")),
        feeding,
    ) {
        (Ok(s), _) => Ok(Some(s)),
        (Err(e), Feeding::Slot) => Err(e),
        (Err(e), _) => {
            tracing::warn!(
                "{e}; applying from the spool without staging, checking tables against {}",
                if state.staging_schema.is_some() {
                    "staging's definitions as read before"
                } else {
                    "the target's own definitions"
                }
            );
            Ok(None)
        }
    }
}

/// Production's progress must fit what feeds it: the slot cannot have released what
/// production lacks, and a replay needs a seeded target. Returns where the slot starts (for
/// the lag before production has a progress row).
async fn check_progress(
    config: &Config,
    feeding: &Feeding,
    (staging, s): (&Endpoint, Option<&tokio_postgres::Client>),
    target: &Endpoint,
    progress: Option<Progress>,
) -> Result<Lsn, SyncError> {
    let applied_end = progress.map(|p| p.end_lsn).unwrap_or_default();
    match (feeding, s) {
        (Feeding::Slot, Some(s)) => {
            let confirmed = check_slot(config, staging, s).await?;
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
            Ok(confirmed)
        }
        (Feeding::Stream(feeding), _) if progress.is_none() && feeding.replay_to.is_none() => {
            tracing::warn!(
                "{} has no progress row for slot {}: reading the stream from its first message, \
                 as if the target held what staging had before it (seed it with `stagingprop copy` \
                 otherwise)",
                target.describe(),
                config.sync.slot
            );
            Ok(Lsn::INVALID)
        }
        (Feeding::Replay(_) | Feeding::Stream(_), _) if progress.is_none() => {
            Err(SyncError::Replay(format!(
                "{} has no row for slot {} in stagingprop.progress, so nothing says which staging \
                 transactions it already has: replay needs a target seeded by `stagingprop copy` \
                 (or restored from a backup of one)",
                target.describe(),
                config.sync.slot
            )))
        }
        _ => Ok(Lsn::INVALID),
    }
}

/// Staging as a session sees it, and where production is.
struct Ends<'a> {
    staging: &'a Endpoint,
    s: Option<&'a tokio_postgres::Client>,
    applied_end: Lsn,
}

/// Settles where the run stops (`--until-caught-up`, `--until`, a dry run's end) when it is not
/// known yet; whether production already has everything up to there.
async fn done_before_starting(
    options: &SyncOptions,
    state: &mut RunState,
    feeding: &Feeding,
    ends: &Ends<'_>,
    stream_js: Option<&async_nats::jetstream::Context>,
) -> Result<bool, SyncError> {
    let applied_end = ends.applied_end;
    if let (Feeding::Stream(feeding), Some(js), Some(StopAt::CaughtUp), None) =
        (feeding, stream_js, options.stop_at, state.stop_lsn)
    {
        let stream = &feeding.stream;
        // Caught up with the stream: everything it held whole when the run started.
        let opened = crate::stream::open_stream(js, stream).await?;
        let last = crate::stream::last_published(&opened, stream).await?;
        let published = crate::stream::publisher::Published::after(last, 0);
        if !published.end.is_valid() || (applied_end.is_valid() && applied_end >= published.end) {
            return Ok(true);
        }
        state.stop_lsn = Some(published.end);
    }
    if (options.dry_run || matches!(options.stop_at, Some(StopAt::CaughtUp)))
        && state.stop_lsn.is_none()
    {
        let Some(s) = ends.s else {
            return Err(SyncError::Slot(
                "--until-caught-up needs staging, to know where it is: staging is unreachable"
                    .into(),
            ));
        };
        let lsn: String = s
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(database_error(ends.staging, "reading the WAL position"))?
            .get(0);
        state.stop_lsn = lsn.parse().ok();
        // Something to apply past that point even if no managed table changes.
        emit_heartbeat(ends.staging, s).await?;
    }
    if let (Some(stop), true) = (state.stop_lsn, applied_end.is_valid())
        && applied_end >= stop
    {
        return Ok(true);
    }
    if let (Some(Until::Lsn(cutoff)), true) = (options.until, applied_end.is_valid())
        && applied_end > cutoff
    {
        tracing::info!(applied = %applied_end, "production already has everything committed up to the cutoff {cutoff}");
        return Ok(true);
    }
    if let (Some(_), Feeding::Slot, Some(s)) = (options.until, feeding, ends.s) {
        // A transaction committed now: past a cutoff in the past, it ends the run as soon as
        // everything before it is applied, even if no managed table changes.
        emit_heartbeat(ends.staging, s).await?;
    }
    Ok(false)
}

/// The first statements of a session get custom plans from the statistics as they are: they
/// must not tell the planner a managed table is empty.
async fn analyze_misleading(
    p: &tokio_postgres::Client,
    metas: &[TableMeta],
    target: &Endpoint,
) -> Result<(), SyncError> {
    let analyzed = statistics::analyze_misleading(p, metas)
        .await
        .map_err(database_error(target, "checking table statistics"))?;
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
    Ok(())
}

/// Opens a production session of its own for each large transaction staging streams.
fn stream_sessions(
    config: &Config,
    target: &Endpoint,
    tables: &[(TableMeta, ConflictPolicy)],
) -> StreamSessions<Applier> {
    let (target, tables, config) = (target.clone(), tables.to_vec(), config.clone());
    StreamSessions::new(Box::new(move || {
        let (target, tables, config) = (target.clone(), tables.clone(), config.clone());
        Box::pin(async move {
            let p = target
                .connect()
                .await
                .map_err(database_error(&target, "connect"))?;
            let mut applier =
                Applier::new(p, &config.sync.slot, tables, None, Lsn::INVALID).await?;
            applier.limit_batches(config.sync.batch_max_rows, config.sync.batch_max_bytes);
            applier.set_column_lists(&config);
            applier.watch_production_edits(&config);
            applier.publish_files(&config)?;
            applier.set_hooks(&config);
            applier.load_seeding().await?;
            Ok(applier)
        })
    }))
}

/// What a session reads, who learns what it applied, and where it starts when that is the
/// feed's to say.
struct OpenedFeed {
    feed: Feed,
    confirm: Confirm,
    start: Option<Lsn>,
}

/// Opens what the session reads from: staging's slot, the spool, a replay's spool, or a stream.
async fn open_feed(
    config: &Config,
    options: &SyncOptions,
    feeding: &Feeding,
    ends: &Ends<'_>,
    progress: Option<Progress>,
    stream_js: Option<async_nats::jetstream::Context>,
    streaming: bool,
) -> Result<OpenedFeed, SyncError> {
    let applied_end = ends.applied_end;
    Ok(match feeding {
        Feeding::Slot => {
            let mut replication = ReplicationClient::connect(ends.staging).await?;
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
            OpenedFeed {
                feed: Feed::Slot(stream),
                // A dry run confirms nothing: the slot stays where it is.
                confirm: if options.dry_run {
                    Confirm::Nothing
                } else {
                    Confirm::Slot(flush)
                },
                start: None,
            }
        }
        Feeding::Spool(shared) => {
            let reader = SpoolReader::open(&shared.dir, applied_end)?;
            OpenedFeed {
                start: Some(reader.oldest().unwrap_or_default()),
                feed: Feed::Spool {
                    reader,
                    shared: shared.clone(),
                    mark: shared.mark.subscribe(),
                },
                confirm: Confirm::Spool(shared.clone()),
            }
        }
        Feeding::Replay(plan) => OpenedFeed {
            feed: Feed::Replay {
                reader: SpoolReader::open(&plan.dir, applied_end)?,
                end: plan.end,
            },
            confirm: Confirm::Nothing,
            start: None,
        },
        Feeding::Stream(feeding) => {
            let stream = &feeding.stream;
            let js = match stream_js {
                Some(js) => js,
                None => crate::stream::connect(stream).await?,
            };
            let after = progress.and_then(|p| p.stream_seq);
            let reader =
                crate::stream::reader::StreamReader::open(&js, stream, after, applied_end).await?;
            OpenedFeed {
                feed: Feed::Stream(Box::new(reader)),
                confirm: Confirm::Nothing,
                start: None,
            }
        }
    })
}

/// Opens production's session for the main line of transactions.
async fn open_applier(
    config: &Config,
    p: tokio_postgres::Client,
    tables: Vec<(TableMeta, ConflictPolicy)>,
    remapper: Option<Remapper>,
    (target, applied_end): (&Endpoint, Lsn),
    state: &RunState,
) -> Result<Applier, SyncError> {
    let mut applier = Applier::new(p, &config.sync.slot, tables, remapper, applied_end).await?;
    applier.limit_batches(config.sync.batch_max_rows, config.sync.batch_max_bytes);
    applier.set_column_lists(config);
    applier.watch_production_edits(config);
    applier.publish_files(config)?;
    applier.set_hooks(config);
    applier.load_seeding().await?;
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
    Ok(applier)
}

/// What a session's pipeline runs with, its target aside.
struct Run<'a> {
    config: &'a Config,
    staging: &'a Endpoint,
    applied_end: Lsn,
    feed_start: Lsn,
    /// Staging's column types as its tables showed them when the session started.
    types: TypeNames,
    apply_schema_change: bool,
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
        pipeline.feed_start = self.feed_start;
        pipeline.apply_schema_changes = self.apply_schema_change;
        pipeline.types = self.types;
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
        state.lag = pipeline.lag.or(state.lag);
        state.last_commit_time = pipeline.last_commit_time.or(state.last_commit_time);
        if pipeline.feed_start.is_valid() {
            state.feed_start = pipeline.feed_start;
        }
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
