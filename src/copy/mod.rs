//! `stagingprop copy`: seeds one database's managed tables from the other's, all read in one
//! consistent snapshot by parallel workers, as binary COPY streamed from source to target without
//! materializing rows.
//!
//! Hand-off: when the copy goes from staging to production (the database sync feeds), the
//! snapshot is the one exported by creating the sync slot, and the slot's consistent point is
//! recorded in production's progress table once every table is in. The first `sync` then starts
//! exactly there: what the snapshot holds is never applied twice, and everything after it
//! streams, even with writes on staging during the copy.
//!
//! Keys: copy applies the tables' key rules as sync does ([`crate::remap`]). Rows of
//! `allocate` and `natural` tables get fresh production keys (the target is empty, so nothing
//! matches), `offset` adds its constant, `remap-on-conflict` keeps keys (nothing collides in an
//! empty table), and every column referring to such a table follows; the key columns are
//! rewritten inside the binary stream ([`rewrite`]), and each table's key-map entries are
//! replaced in the transaction that loads it. A copy back from production to staging gives
//! staging production's keys: `offset` is undone and production's key map is reset to match.
//!
//! Loading: empty target tables load piece by piece, a table or a block range of a large one
//! ([`split`]) per target transaction, committed as it ends, so every worker is busy whatever
//! the target allows; [`schedule`] holds children back until their parents are in when the
//! target checks foreign keys. Each piece is recorded with its snapshot position, so a failed
//! copy into production is resumed by the next run ([`resume`]). Groups that must appear at
//! once (`--atomic`, `--truncate` of tables with rows) load in one target transaction, or, when
//! large, in parts prepared and committed together ([`prepared`]), which needs
//! `max_prepared_transactions` on the target. [`view`] is the operator's progress display.
//!
//! Rooms: this file runs a copy from start to hand-off; [`plan`] cuts it into worker jobs,
//! [`worker`] loads them, [`keys`] plans the key rewrites and key-map entries.

mod indexes;
mod keys;
mod plan;
pub(crate) mod prepared;
mod resume;
pub mod rewrite;
mod schedule;
pub(crate) mod split;
mod view;
mod worker;

use std::sync::Arc;

use futures_util::{StreamExt, pin_mut};
use tokio_postgres::Client;

use self::keys::{KeyPlan, plan_keys, reset_production_key_map};
use self::plan::{Job, TablePart, TableSize, TargetAbilities, plan_jobs, replica_role};
use self::view::{CopyProgress, report_progress};
use self::worker::{Queue, Worker};
use crate::apply;
use crate::catalog::{self, TableMeta};
use crate::config::{Config, KeyRule, TableConfig, TableName};
use crate::model::Lsn;
use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::{ReplicationClient, ReplicationError, SnapshotAction};
use crate::quote::{qualified, quote_ident};
use crate::state::{self, Progress};

/// One of the two configured databases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Staging,
    Production,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Staging => "staging",
            Side::Production => "production",
        })
    }
}

/// Default of [`CopyOptions::split_bytes`] (`--split-mb 256`).
pub const DEFAULT_SPLIT_BYTES: u64 = 256 << 20;

#[derive(Clone, Debug)]
pub struct CopyOptions {
    pub from: Side,
    pub to: Side,
    /// Only these tables (default: every managed table with `copy = true`).
    pub tables: Vec<TableName>,
    pub exclude: Vec<TableName>,
    /// Empty each target table in the transaction that loads it.
    pub truncate: bool,
    pub jobs: usize,
    /// Tables of at least this many bytes (heap and TOAST) are copied in block ranges by several
    /// workers at once.
    pub split_bytes: u64,
    /// A shell command to run after a successful copy.
    pub after: Option<String>,
    /// Allow `--truncate` of tables with a column list (it empties the columns production owns).
    pub force: bool,
    /// Seed a target fed from the JetStream stream: the snapshot comes from a temporary slot,
    /// the publisher's own slot is left alone, and the hand-off is the temporary slot's position.
    pub for_stream: bool,
    /// Load each group of tables linked by foreign keys so that it becomes visible at once (one
    /// transaction, or prepared parts committed together), as `--truncate` of tables with rows
    /// always does; without it, empty target tables load piece by piece, each committed alone.
    pub atomic: bool,
}

impl CopyOptions {
    /// Every managed table, two workers, empty targets required, nothing after.
    pub fn new(from: Side, to: Side) -> CopyOptions {
        CopyOptions {
            from,
            to,
            tables: Vec::new(),
            exclude: Vec::new(),
            truncate: false,
            jobs: 2,
            split_bytes: DEFAULT_SPLIT_BYTES,
            after: None,
            force: false,
            for_stream: false,
            atomic: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("on {target}: {source}")]
    Database { target: String, source: QueryError },
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}; the copy did not record its hand-off: run it again")]
    Files(#[from] apply::managed_files::FileError),
    #[error("source and target differ, nothing was copied:\n  - {}", .0.join("\n  - "))]
    Schema(Vec<String>),
    #[error("key remapping cannot work with these tables, nothing was copied:\n  - {}", .0.join("\n  - "))]
    Rules(Vec<String>),
    #[error("key remapping on {target}: {message}. Nothing was copied")]
    Keys { target: String, message: String },
    #[error("{} table(s) failed ({}): each is empty, or holds the pieces that committed before the failure; the others are complete. From staging to production, run the same copy again to load only what is missing; otherwise, or to start over, run it again with --truncate", failed.len(), failed.join(", "))]
    Partial {
        failed: Vec<String>,
        errors: Vec<String>,
    },
}

fn db_error(endpoint: &Endpoint, what: &str) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    let target = endpoint.describe();
    let what = what.to_owned();
    move |e| CopyError::Database {
        target,
        source: QueryError::new(what, &e),
    }
}

/// What one table's copy did.
#[derive(Clone, Debug)]
pub struct TableReport {
    pub table: TableName,
    pub rows: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Block ranges it was copied in by parallel workers (1: the whole table at once).
    pub ranges: usize,
}

#[derive(Clone, Debug, Default)]
pub struct CopyReport {
    pub tables: Vec<TableReport>,
    /// Where sync will start (staging -> production copies).
    pub handoff: Option<Lsn>,
    /// Exit code of the `--after` command.
    pub after_status: Option<i32>,
}

fn endpoint(config: &Config, side: Side) -> Result<Endpoint, EndpointError> {
    Endpoint::from_db_config(match side {
        Side::Staging => &config.staging,
        Side::Production => &config.production,
    })
}

/// The tables to copy, in config order.
fn select_tables(config: &Config, options: &CopyOptions) -> Result<Vec<TableName>, CopyError> {
    for name in options.tables.iter().chain(&options.exclude) {
        if config.table(name).is_none() {
            return Err(CopyError::Refused(format!(
                "{name} is not a managed table; --tables and --exclude take names from [[tables]]"
            )));
        }
    }
    let chosen: Vec<TableName> = config
        .tables
        .iter()
        .filter(|t| {
            if options.tables.is_empty() {
                t.copy
            } else {
                options.tables.contains(&t.name)
            }
        })
        .filter(|t| !options.exclude.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    if chosen.is_empty() {
        return Err(CopyError::Refused("no table left to copy".into()));
    }
    Ok(chosen)
}

/// The session whose snapshot every worker imports; it must stay idle until they all have.
enum Exporter {
    Slot(ReplicationClient),
    Session(Client),
}

impl Exporter {
    /// Ends the exporting session (the slot stays).
    async fn release(self) {
        match self {
            Exporter::Slot(repl) => {
                let _ = repl.close().await;
            }
            Exporter::Session(client) => {
                let _ = client.batch_execute("COMMIT").await;
            }
        }
    }
}

pub async fn copy(config: &Config, options: &CopyOptions) -> Result<CopyReport, CopyError> {
    if options.from == options.to {
        return Err(CopyError::Refused(
            "--from and --to name the same database".into(),
        ));
    }
    let source = endpoint(config, options.from)?;
    let target = endpoint(config, options.to)?;
    let s = source
        .connect()
        .await
        .map_err(db_error(&source, "connect"))?;
    let config = &crate::catalog::expand_patterns(config, &[&s])
        .await
        .map_err(db_error(
            &source,
            "listing the tables of [[table_patterns]]",
        ))?;
    let tables = select_tables(config, options)?;
    let t = target
        .connect()
        .await
        .map_err(db_error(&target, "connect"))?;

    lock_target(&t, &target).await?;

    // Validation before anything is written.
    let (configs, metas) = validate(config, options, &tables, (&s, &source), (&t, &target)).await?;
    let mut parts: Vec<TablePart> = configs
        .iter()
        .map(|c| TablePart {
            filter: c.filter.clone(),
            merge: false,
        })
        .collect();
    let (edges, groups, abilities) = target_abilities(&t, &target, &metas).await?;

    // A copy into production that failed piece by piece is resumed: what it committed stays.
    let handoff = options.from == Side::Staging && options.to == Side::Production;
    let slot = &config.sync.slot;
    let resume = if handoff && !options.truncate && !options.atomic {
        state::ensure(&t)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        let found = resume::Found {
            configs: &configs,
            metas: &metas,
            groups: &groups,
            edges: &edges,
            checked: abilities.replica.is_err(),
        };
        resume::find(
            &found,
            slot,
            options.for_stream,
            (&s, &source),
            (&t, &target),
        )
        .await?
    } else {
        None
    };
    check_target_tables(
        options,
        &configs,
        &metas,
        resume.as_ref(),
        (&t, &target),
        &mut parts,
    )
    .await?;
    // Resuming with tables kept, the sync slot stays where the first run created it.
    let kept_handoff = resume.as_ref().and_then(|r| r.kept_handoff);
    if let Some(resume) = &resume {
        resume.empty_the_rest(&t, &target, slot, &metas).await?;
    }

    // The snapshot, and for the sync hand-off the slot it comes from.
    let (exporter, snapshot, consistent_point) = take_snapshot(
        config,
        options,
        handoff.then_some(Handoff {
            resumed: resume.is_some(),
            kept: kept_handoff.is_some(),
        }),
        (&s, &source),
        (&t, &target),
    )
    .await?;
    // From here on a schema change of a copied table waits for the copy (it then reaches the
    // target through the stream, after the hand-off); one that committed since the tables were
    // compared stops the copy before anything is loaded.
    let _definitions_held =
        hold_definitions(options, &tables, &configs, &metas, (&s, &source)).await?;

    let (plans, reset_key_map) =
        plan_keys(config, options, &metas, &source, &s, &target, &t, &snapshot).await?;
    let plans = Arc::new(plans);

    let sizes = table_sizes(&s, &source, &metas).await?;
    // A resumed copy loads what the earlier run did not complete.
    let groups: Vec<Vec<usize>> = groups
        .into_iter()
        .map(|g| {
            g.into_iter()
                .filter(|&i| !resume.as_ref().is_some_and(|r| r.keeps(i)))
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect();
    let jobs = plan_jobs(
        &t, &target, &metas, &parts, groups, &edges, &abilities, &sizes, options,
    )
    .await?;
    let mut report = run_workers(
        jobs,
        metas,
        parts,
        &sizes,
        Shared {
            plans,
            snapshot,
            record: consistent_point.map(|lsn| (slot.clone(), lsn)),
        },
        exporter,
        options,
        (&source, (&t, &target)),
    )
    .await?;

    finish(
        config,
        options,
        &tables,
        (&s, &source),
        (&t, &target),
        Finish {
            reset_key_map,
            handoff: kept_handoff.or(consistent_point),
            kept: kept_handoff.is_some(),
        },
        &mut report,
    )
    .await?;
    Ok(report)
}

/// What every worker shares besides the queue: the key plans, the snapshot, and where a copy
/// into production records what it loaded.
struct Shared {
    plans: Arc<Vec<KeyPlan>>,
    snapshot: String,
    record: Option<(String, Lsn)>,
}

/// Runs the workers over the jobs until every piece is loaded or failed; the exporter is
/// released once every worker imported the snapshot.
#[allow(clippy::too_many_arguments)]
async fn run_workers(
    jobs: Vec<Job>,
    metas: Vec<TableMeta>,
    parts: Vec<TablePart>,
    sizes: &[TableSize],
    shared: Shared,
    exporter: Exporter,
    options: &CopyOptions,
    (source, (t, target)): (&Endpoint, (&Client, &Endpoint)),
) -> Result<CopyReport, CopyError> {
    let progress = Arc::new(CopyProgress::new(
        metas.len(),
        sizes.iter().map(|size| size.bytes).sum(),
    ));
    let reporter = tokio::spawn(report_progress(progress.clone()));
    // Secondary indexes of the tables loaded alone are built again once each is complete.
    let mut loaded_alone: Vec<usize> = jobs
        .iter()
        .filter(|j| j.loads_alone())
        .flat_map(|j| j.pieces.iter().map(|p| p.table))
        .collect();
    loaded_alone.sort_unstable();
    loaded_alone.dedup();
    let aside = indexes::prepare(t, target, &metas, &loaded_alone).await?;
    let queue = Arc::new(Queue::new(jobs, metas.len(), aside));
    let metas = Arc::new(metas);
    let parts = Arc::new(parts);
    let jobs = options.jobs.max(1).min(queue.len().max(1));

    // Every worker imports the snapshot before the exporter may go.
    let (imported_tx, mut imported_rx) = tokio::sync::mpsc::channel::<Result<(), CopyError>>(jobs);
    let mut workers = Vec::with_capacity(jobs);
    for worker in 0..jobs {
        let ctx = Worker {
            id: worker,
            source: source.clone(),
            target: target.clone(),
            snapshot: shared.snapshot.clone(),
            queue: queue.clone(),
            metas: metas.clone(),
            plans: shared.plans.clone(),
            parts: parts.clone(),
            progress: progress.clone(),
            record: shared.record.clone(),
        };
        let imported = imported_tx.clone();
        workers.push(tokio::spawn(async move { ctx.run(imported).await }));
    }
    drop(imported_tx);
    let mut import_error = None;
    for _ in 0..jobs {
        match imported_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                import_error.get_or_insert(e);
            }
            None => break,
        }
    }
    exporter.release().await;
    if let Some(e) = import_error {
        for w in workers {
            w.abort();
        }
        return Err(e);
    }

    let mut report = CopyReport::default();
    let mut workers_done = Vec::with_capacity(workers.len());
    for worker in workers {
        workers_done.push(worker.await);
    }
    reporter.abort();
    crate::bars::clear();
    let mut failed = Vec::new();
    let mut errors = Vec::new();
    for worker in workers_done {
        match worker {
            Ok(outcome) => {
                report.tables.extend(outcome.done);
                for (tables, error) in outcome.failed {
                    failed.extend(tables);
                    errors.push(error);
                }
            }
            Err(e) => errors.push(format!("a copy worker stopped: {e}")),
        }
    }
    report.tables = merge_reports(std::mem::take(&mut report.tables));
    failed.sort();
    failed.dedup();
    if !failed.is_empty() || !errors.is_empty() {
        for e in &errors {
            tracing::error!("{e}");
        }
        return Err(CopyError::Partial { failed, errors });
    }
    Ok(report)
}

/// Target tables with rows: refused without `--truncate`, but for a column-listed table, which is
/// merged by key (production owns its other columns); `--truncate` of such a table needs
/// `--force`.
async fn check_target_tables(
    options: &CopyOptions,
    configs: &[&TableConfig],
    metas: &[TableMeta],
    resume: Option<&resume::Resume>,
    (t, target): (&Client, &Endpoint),
    parts: &mut [TablePart],
) -> Result<(), CopyError> {
    if options.truncate && !options.force {
        let owned: Vec<String> = configs
            .iter()
            .filter(|c| !c.columns.is_all())
            .map(|c| c.name.to_string())
            .collect();
        if !owned.is_empty() {
            return Err(CopyError::Refused(format!(
                "--truncate would empty the columns production owns in {} (outside their column lists); nothing was copied. Copy without --truncate to update only the managed columns, or add --force to empty them anyway",
                owned.join(", ")
            )));
        }
    }
    if !options.truncate {
        let mut non_empty = Vec::new();
        for (i, meta) in metas.iter().enumerate() {
            if resume.is_some_and(|r| r.handles(i)) {
                continue;
            }
            let has_rows: bool = t
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {})", meta.qualified()),
                    &[],
                )
                .await
                .map_err(db_error(target, "checking target tables"))?
                .get(0);
            if !has_rows {
                continue;
            }
            let table = configs[i];
            // Production owns the other columns of a column-listed table: its rows stay, and
            // copy updates (or inserts) only the managed columns, by key.
            if !table.columns.is_all() {
                if !matches!(table.key, KeyRule::Identity | KeyRule::Offset { .. }) {
                    return Err(CopyError::Refused(format!(
                        "{} has rows on {} and a column list; copy merges such a table by key, which its key rule {} cannot do (it allocates keys). Nothing was copied",
                        table.name,
                        options.to,
                        table.key.as_str()
                    )));
                }
                parts[i].merge = true;
                continue;
            }
            non_empty.push(meta.table_name().to_string());
        }
        if !non_empty.is_empty() {
            return Err(CopyError::Refused(format!(
                "{} table(s) on {} are not empty ({}); nothing was copied. Use --truncate to replace their contents",
                non_empty.len(),
                options.to,
                non_empty.join(", ")
            )));
        }
    }
    Ok(())
}

/// A copy into production that hands over to sync: whether it resumes an earlier run, and
/// whether it keeps that run's hand-off (and sync slot).
struct Handoff {
    resumed: bool,
    kept: bool,
}

/// The snapshot every worker reads: exported by creating the sync slot (or a temporary one) when
/// the copy hands over to sync, whose position it returns; else by a session of its own.
async fn take_snapshot(
    config: &Config,
    options: &CopyOptions,
    handoff: Option<Handoff>,
    (s, source): (&Client, &Endpoint),
    (t, target): (&Client, &Endpoint),
) -> Result<(Exporter, String, Option<Lsn>), CopyError> {
    let slot = &config.sync.slot;
    Ok(if let Some(handoff) = handoff {
        state::ensure(t)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        if !options.for_stream && !handoff.kept {
            prepare_slot(config, source, s).await?;
        }
        if !handoff.resumed {
            state::copy_tables::forget(t, slot, None)
                .await
                .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        }
        // Until the copy completes, production's progress says "copy in progress" (0/0), so
        // sync refuses to stream onto a half-seeded production.
        let found = state::progress::read(t, slot)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        let was = found.map_or(Lsn::INVALID, |p| p.end_lsn);
        record_handoff(t, target, slot, &Progress::copy_in_progress(), was).await?;
        let mut repl = ReplicationClient::connect(source).await?;
        // For a stream target, or a resumed copy keeping the sync slot, a slot of this copy's
        // own, gone when the copy's connection closes: the stream (or the sync slot) carries
        // everything committed after its position.
        let (snapshot_slot, temporary) = if options.for_stream || handoff.kept {
            (format!("stagingprop_copy_{}", std::process::id()), true)
        } else {
            (slot.clone(), false)
        };
        let created = repl
            .create_logical_slot(
                &snapshot_slot,
                temporary,
                SnapshotAction::Export,
                config.sync.failover && !temporary,
            )
            .await?;
        let snapshot = created.snapshot_name.ok_or_else(|| {
            CopyError::Refused("the server exported no snapshot with the slot".into())
        })?;
        if temporary {
            tracing::info!(slot = %snapshot_slot, consistent_point = %created.consistent_point, "created a temporary slot for the snapshot (the sync slot stays where it is); copying its snapshot");
        } else {
            tracing::info!(slot = %slot, consistent_point = %created.consistent_point, "created the sync slot; copying its snapshot");
        }
        (
            Exporter::Slot(repl),
            snapshot,
            Some(created.consistent_point),
        )
    } else {
        let exporter = source
            .connect()
            .await
            .map_err(db_error(source, "connect"))?;
        exporter
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(db_error(source, "starting the snapshot"))?;
        let snapshot: String = exporter
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(db_error(source, "exporting the snapshot"))?
            .get(0);
        (Exporter::Session(exporter), snapshot, None)
    })
}

/// One copy at a time into a database: it owns whatever copy parts it finds prepared there,
/// and finishes them.
async fn lock_target(t: &Client, target: &Endpoint) -> Result<(), CopyError> {
    let locked: bool = t
        .query_one("SELECT pg_try_advisory_lock($1)", &[&COPY_LOCK])
        .await
        .map_err(db_error(target, "taking the copy lock"))?
        .get(0);
    if !locked {
        return Err(CopyError::Refused(format!(
            "another stagingprop copy is writing into {}; wait for it to end",
            target.describe()
        )));
    }
    let leftovers = prepared::resolve_leftovers(t).await.map_err(db_error(
        target,
        "finishing what an interrupted copy left prepared",
    ))?;
    for leftover in leftovers {
        if leftover.committed {
            tracing::warn!(gid = %leftover.gid, "committed a part an interrupted copy had prepared (its group's commit had been decided)");
        } else {
            tracing::warn!(gid = %leftover.gid, "rolled back a part an interrupted copy had prepared but not committed");
        }
    }

    Ok(())
}

/// The tables as both sides have them, compared before anything is written: each table's
/// config and the source's definition of its managed part.
async fn validate<'a>(
    config: &'a Config,
    options: &CopyOptions,
    tables: &'a [TableName],
    (s, source): (&Client, &Endpoint),
    (t, target): (&Client, &Endpoint),
) -> Result<(Vec<&'a TableConfig>, Vec<TableMeta>), CopyError> {
    let names: Vec<&TableName> = tables.iter().collect();
    let on_source = catalog::load_tables(s, &names)
        .await
        .map_err(db_error(source, "reading table definitions"))?;
    let configs: Vec<&TableConfig> = names
        .iter()
        .map(|name| {
            config
                .table(name)
                .expect("copy's tables are managed tables")
        })
        .collect();
    let on_source = catalog::managed_parts(&configs, on_source, &options.from.to_string())
        .map_err(CopyError::Schema)?;
    let on_target = catalog::load_tables(t, &names)
        .await
        .map_err(db_error(target, "reading table definitions"))?;
    let (from, to) = (options.from.to_string(), options.to.to_string());
    let sides = catalog::compare::Sides {
        source: &from,
        target: &to,
    };
    let metas: Vec<TableMeta> = catalog::compare::compare_all(&names, &on_source, on_target, sides)
        .map_err(|problems| CopyError::Schema(catalog::compare::messages(problems)))?
        .into_iter()
        .map(|(on_source, _)| on_source)
        .collect();
    Ok((configs, metas))
}

/// Locks the copied tables on the source against schema changes until the returned session
/// ends (ACCESS SHARE, as the workers' reads take anyway), then reads their definitions again:
/// a change committed after `validate` compared them (before the snapshot, whose schema change
/// message the hand-off would leave behind, or after it, which the snapshot's rows would not
/// match) refuses the copy, with nothing loaded.
async fn hold_definitions(
    options: &CopyOptions,
    tables: &[TableName],
    configs: &[&TableConfig],
    validated: &[TableMeta],
    (s, source): (&Client, &Endpoint),
) -> Result<Client, CopyError> {
    let holder = source
        .connect()
        .await
        .map_err(db_error(source, "connect"))?;
    let list = tables
        .iter()
        .map(|t| qualified(&t.schema, &t.name))
        .collect::<Vec<_>>()
        .join(", ");
    holder
        .batch_execute(&format!("BEGIN; LOCK TABLE {list} IN ACCESS SHARE MODE"))
        .await
        .map_err(db_error(source, "locking the copied tables"))?;
    let names: Vec<&TableName> = tables.iter().collect();
    let now = catalog::load_tables(s, &names)
        .await
        .map_err(db_error(source, "reading table definitions"))?;
    let side = options.from.to_string();
    let now = catalog::managed_parts(configs, now, &side).map_err(CopyError::Schema)?;
    for ((name, before), after) in names.iter().zip(validated).zip(now) {
        if after.as_ref() != Some(before) {
            return Err(CopyError::Refused(format!(
                "{side}: table {name} was changed (a schema change committed while the copy \
                 started, after it compared the tables); nothing was loaded. Make the {} table \
                 match if it needs to, then run copy again",
                options.to
            )));
        }
    }
    Ok(holder)
}

/// What the target does as rows arrive: its foreign keys among the copied tables (and the
/// groups they link), and whether it checks them.
async fn target_abilities(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
) -> Result<(Vec<(usize, usize)>, Vec<Vec<usize>>, TargetAbilities), CopyError> {
    let meta_refs: Vec<&TableMeta> = metas.iter().collect();
    let edges = catalog::foreign_keys(t, &meta_refs)
        .await
        .map_err(db_error(target, "reading foreign keys"))?;
    let groups = catalog::linked_groups(metas.len(), &edges);
    let replica = replica_role(t).await;
    let self_referencing = if replica.is_err() {
        let references = catalog::column_references(t)
            .await
            .map_err(db_error(target, "reading foreign keys"))?;
        metas
            .iter()
            .map(|m| {
                let name = m.table_name();
                references
                    .iter()
                    .any(|r| r.child == name && r.parent == name)
            })
            .collect()
    } else {
        vec![false; metas.len()]
    };
    let abilities = TargetAbilities {
        replica,
        self_referencing,
    };
    Ok((edges, groups, abilities))
}

/// Each table's size on the source, for progress and to cut large tables into block ranges.
async fn table_sizes(
    s: &Client,
    source: &Endpoint,
    metas: &[TableMeta],
) -> Result<Vec<TableSize>, CopyError> {
    let mut sizes = Vec::with_capacity(metas.len());
    for meta in metas {
        let row = s
        .query_one(
            // A partitioned table's size is its partitions'; it is read whole, not by blocks.
            "SELECT CASE WHEN partitioned THEN (SELECT coalesce(sum(pg_table_size(relid)), 0)::bigint \
                                                 FROM pg_partition_tree(c) WHERE isleaf) \
                         ELSE pg_table_size(c) END, \
                    CASE WHEN partitioned THEN 0 \
                         ELSE pg_relation_size(c) / current_setting('block_size')::bigint END \
             FROM (SELECT c, (SELECT relkind = 'p' FROM pg_class WHERE oid = c) AS partitioned \
                     FROM (SELECT $1::text::regclass AS c) r) t",
            &[&meta.qualified()],
        )
        .await
        .map_err(db_error(source, "reading table sizes"))?;
        sizes.push(TableSize {
            bytes: row.get::<_, i64>(0).max(0) as u64,
            blocks: row.get::<_, i64>(1).max(0) as u64,
        });
    }
    Ok(sizes)
}

/// What a copy's last steps need from the rest of it.
struct Finish {
    /// Tables whose production key map the copy replaced.
    reset_key_map: Vec<usize>,
    /// Where sync starts, and whether it is the first run's position kept by a resumed copy.
    handoff: Option<Lsn>,
    kept: bool,
}

/// After every table is loaded: the key map, sequences, managed files, the hand-off, and the
/// `--after` command.
async fn finish(
    config: &Config,
    options: &CopyOptions,
    tables: &[TableName],
    (s, source): (&Client, &Endpoint),
    (t, target): (&Client, &Endpoint),
    finish: Finish,
    report: &mut CopyReport,
) -> Result<(), CopyError> {
    if !finish.reset_key_map.is_empty() {
        reset_production_key_map(config, s, source, &finish.reset_key_map).await?;
    }

    // Sequences of identity-keyed tables follow the source (never lowered on the target).
    let values = catalog::sequences::read_owned(s, config)
        .await
        .map_err(db_error(source, "reading sequences"))?;
    catalog::sequences::raise(t, &values)
        .await
        .map_err(db_error(target, "setting sequences"))?;

    // Production's managed files are published from what was copied, before the hand-off:
    // sync then keeps them current.
    if options.to == Side::Production {
        publish_files(config, tables, t, target).await?;
    }

    if let Some(point) = finish.handoff {
        record_handoff(
            t,
            target,
            &config.sync.slot,
            &Progress::handoff(point),
            Lsn::INVALID,
        )
        .await?;
        report.handoff = Some(point);
        if finish.kept {
            tracing::info!(slot = %config.sync.slot, at = %point, "hand-off recorded: sync starts after the first run's snapshot, and skips in the tables this run loaded what their later snapshot holds");
        } else {
            tracing::info!(slot = %config.sync.slot, at = %point, "hand-off recorded: sync starts exactly after the copied snapshot");
        }
    }

    if let Some(command) = &options.after {
        tracing::info!(command = %command, "running the --after command");
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .status()
            .await
            .map_err(|e| CopyError::Refused(format!("cannot run --after command: {e}")))?;
        report.after_status = Some(status.code().unwrap_or(-1));
    }
    Ok(())
}

/// Writes the files of every copied managed-file table from the target's rows; files under
/// each directory that no row names are removed.
async fn publish_files(
    config: &Config,
    copied: &[TableName],
    t: &Client,
    target: &Endpoint,
) -> Result<(), CopyError> {
    for table in config.tables.iter().filter(|t| copied.contains(&t.name)) {
        let Some(files) = &table.files else { continue };
        let from = qualified(&table.name.schema, &table.name.name);
        let (path, content) = (
            quote_ident(&files.path_column),
            quote_ident(&files.content_column),
        );
        let read = db_error(target, "reading managed files");
        let mut statement = t
            .prepare(&format!("SELECT {path}::text, {content} FROM {from}"))
            .await
            .map_err(read)?;
        // bytea is written as is; any other type as its text.
        let bytea = statement.columns()[1].type_() == &tokio_postgres::types::Type::BYTEA;
        if !bytea {
            statement = t
                .prepare(&format!("SELECT {path}::text, {content}::text FROM {from}"))
                .await
                .map_err(db_error(target, "reading managed files"))?;
        }
        let no_params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
        let rows = t
            .query_raw(&statement, no_params)
            .await
            .map_err(db_error(target, "reading managed files"))?;
        pin_mut!(rows);
        let mut publish = apply::managed_files::Republish::new(table.name.clone(), files)?;
        while let Some(row) = rows.next().await {
            let row = row.map_err(db_error(target, "reading managed files"))?;
            let content: Option<&[u8]> = if bytea {
                row.get(1)
            } else {
                row.get::<_, Option<&str>>(1).map(str::as_bytes)
            };
            publish.row(row.get(0), content)?;
        }
        let stats = publish.finish()?;
        tracing::info!(
            table = %table.name,
            written = stats.written,
            removed = stats.removed,
            refused = stats.refused,
            "published managed files into {}",
            files.dir.display()
        );
    }
    Ok(())
}

/// Makes room for a fresh sync slot: refuses when sync could be using production already, drops
/// a slot left by an earlier copy that never completed.
async fn prepare_slot(config: &Config, staging: &Endpoint, s: &Client) -> Result<(), CopyError> {
    let slot = &config.sync.slot;
    let row = s
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(db_error(staging, "reading pg_replication_slots"))?;
    let Some(row) = row else { return Ok(()) };
    let active: bool = row.get(0);
    if active {
        return Err(CopyError::Refused(format!(
            "the slot {slot} is in use (is sync running?); stop sync before re-seeding production"
        )));
    }
    // copy is the explicit re-seed: the old slot's position is replaced by the new snapshot's.
    tracing::warn!(slot = %slot, "dropping the existing slot {slot}: the copy re-seeds production and creates it afresh at its snapshot");
    s.execute("SELECT pg_drop_replication_slot($1)", &[slot])
        .await
        .map_err(db_error(staging, "dropping the old slot"))?;
    Ok(())
}

/// Moves the target's progress row from `expected` to `progress` with the same guarded write
/// sync's commits use: a sync or another copy that moved it meanwhile makes this copy stop.
async fn record_handoff(
    t: &Client,
    target: &Endpoint,
    slot: &str,
    progress: &Progress,
    expected: Lsn,
) -> Result<(), CopyError> {
    let written = state::progress::advance(t, slot, progress, expected)
        .await
        .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
    if !written {
        return Err(CopyError::Refused(format!(
            "the progress row of slot {slot} on {} changed while this copy ran: another \
             stagingprop (a sync, a replay or a copy) writes to it. Stop it, then copy again",
            target.describe()
        )));
    }
    Ok(())
}

/// Advisory lock key held on the target for a copy's duration ("stagcopy").
const COPY_LOCK: i64 = 0x7374_6167_636f_7079;

/// One table's figures from the reports of its ranges (rows and bytes add up; they ran side by
/// side, so the longest range's time).
pub(super) fn merge_reports(reports: Vec<TableReport>) -> Vec<TableReport> {
    let mut merged: Vec<TableReport> = Vec::with_capacity(reports.len());
    for report in reports {
        match merged.iter_mut().find(|m| m.table == report.table) {
            Some(m) => {
                m.rows += report.rows;
                m.bytes += report.bytes;
                m.seconds = m.seconds.max(report.seconds);
                m.ranges += report.ranges;
            }
            None => merged.push(report),
        }
    }
    merged
}
