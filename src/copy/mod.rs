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

mod indexes;
pub(crate) mod prepared;
mod resume;
pub mod rewrite;
mod schedule;
pub mod split;
mod view;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio_postgres::Client;

use self::rewrite::{ColumnRewrite, KeyRewriter, Translate};
use self::split::Piece;
use self::view::{CopyProgress, report_progress};
use crate::apply;
use crate::catalog::{self, TableMeta};
use crate::config::{Config, KeyRule, TableConfig, TableName};
use crate::model::Lsn;
use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::{ReplicationClient, ReplicationError, SnapshotAction};
use crate::quote::{qualified, quote_ident, quote_literal};
use crate::remap::Remapper;
use crate::remap::store::{self as key_map, Statements};
use crate::state::copy_indexes::SetAside;
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
    let tables = select_tables(config, options)?;
    let s = source
        .connect()
        .await
        .map_err(db_error(&source, "connect"))?;
    let t = target
        .connect()
        .await
        .map_err(db_error(&target, "connect"))?;

    // One copy at a time into a database: it owns whatever copy parts it finds prepared there.
    let locked: bool = t
        .query_one("SELECT pg_try_advisory_lock($1)", &[&COPY_LOCK])
        .await
        .map_err(db_error(&target, "taking the copy lock"))?
        .get(0);
    if !locked {
        return Err(CopyError::Refused(format!(
            "another stagingprop copy is writing into {}; wait for it to end",
            target.describe()
        )));
    }
    let leftovers = prepared::resolve_leftovers(&t).await.map_err(db_error(
        &target,
        "finishing what an interrupted copy left prepared",
    ))?;
    for leftover in leftovers {
        if leftover.committed {
            tracing::warn!(gid = %leftover.gid, "committed a part an interrupted copy had prepared (its group's commit had been decided)");
        } else {
            tracing::warn!(gid = %leftover.gid, "rolled back a part an interrupted copy had prepared but not committed");
        }
    }

    // Validation before anything is written.
    let names: Vec<&TableName> = tables.iter().collect();
    let on_source = catalog::load_tables(&s, &names)
        .await
        .map_err(db_error(&source, "reading table definitions"))?;
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
    let on_target = catalog::load_tables(&t, &names)
        .await
        .map_err(db_error(&target, "reading table definitions"))?;
    let (from, to) = (options.from.to_string(), options.to.to_string());
    let sides = catalog::compare::Sides {
        source: &from,
        target: &to,
    };
    let metas: Vec<TableMeta> = catalog::compare::compare_all(&names, &on_source, on_target, sides)
        .map_err(CopyError::Schema)?
        .into_iter()
        .map(|(on_source, _)| on_source)
        .collect();
    let mut parts: Vec<TablePart> = configs
        .iter()
        .map(|c| TablePart {
            filter: c.filter.clone(),
            merge: false,
        })
        .collect();
    let meta_refs: Vec<&TableMeta> = metas.iter().collect();
    let edges = catalog::foreign_keys(&t, &meta_refs)
        .await
        .map_err(db_error(&target, "reading foreign keys"))?;
    let groups = catalog::linked_groups(metas.len(), &edges);
    let replica = replica_role(&t).await;
    let self_referencing = if replica.is_err() {
        let references = catalog::column_references(&t)
            .await
            .map_err(db_error(&target, "reading foreign keys"))?;
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
            if resume.as_ref().is_some_and(|r| r.handles(i)) {
                continue;
            }
            let has_rows: bool = t
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {})", meta.qualified()),
                    &[],
                )
                .await
                .map_err(db_error(&target, "checking target tables"))?
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
    // Resuming with tables kept, the sync slot stays where the first run created it.
    let kept_handoff = resume.as_ref().and_then(|r| r.kept_handoff);
    if let Some(resume) = &resume {
        resume.empty_the_rest(&t, &target, slot, &metas).await?;
    }

    // The snapshot, and for the sync hand-off the slot it comes from.
    let (exporter, snapshot, consistent_point) = if handoff {
        state::ensure(&t)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        if !options.for_stream && kept_handoff.is_none() {
            prepare_slot(config, &source, &s).await?;
        }
        if resume.is_none() {
            state::copy_tables::forget(&t, slot, None)
                .await
                .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        }
        // Until the copy completes, production's progress says "copy in progress" (0/0), so
        // sync refuses to stream onto a half-seeded production.
        let found = state::progress::read(&t, slot)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        let was = found.map_or(Lsn::INVALID, |p| p.end_lsn);
        record_handoff(&t, &target, slot, &Progress::copy_in_progress(), was).await?;
        let mut repl = ReplicationClient::connect(&source).await?;
        // For a stream target, or a resumed copy keeping the sync slot, a slot of this copy's
        // own, gone when the copy's connection closes: the stream (or the sync slot) carries
        // everything committed after its position.
        let (snapshot_slot, temporary) = if options.for_stream || kept_handoff.is_some() {
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
            .map_err(db_error(&source, "connect"))?;
        exporter
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(db_error(&source, "starting the snapshot"))?;
        let snapshot: String = exporter
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(db_error(&source, "exporting the snapshot"))?
            .get(0);
        (Exporter::Session(exporter), snapshot, None)
    };

    let (plans, reset_key_map) =
        plan_keys(config, options, &metas, &source, &s, &target, &t, &snapshot).await?;
    let plans = Arc::new(plans);

    let mut sizes = Vec::with_capacity(metas.len());
    for meta in &metas {
        let row = s
            .query_one(
                "SELECT pg_table_size(c), pg_relation_size(c) / current_setting('block_size')::bigint \
                 FROM (SELECT $1::text::regclass AS c) r",
                &[&meta.qualified()],
            )
            .await
            .map_err(db_error(&source, "reading table sizes"))?;
        sizes.push(TableSize {
            bytes: row.get::<_, i64>(0).max(0) as u64,
            blocks: row.get::<_, i64>(1).max(0) as u64,
        });
    }
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
    let aside = indexes::prepare(&t, &target, &metas, &loaded_alone).await?;
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
            snapshot: snapshot.clone(),
            queue: queue.clone(),
            metas: metas.clone(),
            plans: plans.clone(),
            parts: parts.clone(),
            progress: progress.clone(),
            record: consistent_point.map(|lsn| (slot.clone(), lsn)),
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

    if !reset_key_map.is_empty() {
        reset_production_key_map(config, &s, &source, &reset_key_map).await?;
    }

    // Sequences of identity-keyed tables follow the source (never lowered on the target).
    let values = catalog::sequences::read_owned(&s, config)
        .await
        .map_err(db_error(&source, "reading sequences"))?;
    catalog::sequences::raise(&t, &values)
        .await
        .map_err(db_error(&target, "setting sequences"))?;

    // Production's managed files are published from what was copied, before the hand-off:
    // sync then keeps them current.
    if options.to == Side::Production {
        publish_files(config, &tables, &t, &target).await?;
    }

    if let Some(point) = kept_handoff.or(consistent_point) {
        record_handoff(&t, &target, slot, &Progress::handoff(point), Lsn::INVALID).await?;
        report.handoff = Some(point);
        if kept_handoff.is_some() {
            tracing::info!(slot = %slot, at = %point, "hand-off recorded: sync starts after the first run's snapshot, and skips in the tables this run loaded what their later snapshot holds");
        } else {
            tracing::info!(slot = %slot, at = %point, "hand-off recorded: sync starts exactly after the copied snapshot");
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
    Ok(report)
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

/// Bytes gathered before they are sent to the target as one CopyData message.
const COALESCE_BYTES: usize = 256 * 1024;

/// Advisory lock key held on the target for a copy's duration ("stagcopy").
const COPY_LOCK: i64 = 0x7374_6167_636f_7079;

#[derive(Clone, Copy, Debug)]
struct TableSize {
    /// Heap and TOAST bytes on disk.
    bytes: u64,
    /// Heap blocks.
    blocks: u64,
}

/// Tables linked by foreign keys, and how they reach the target.
struct GroupJob {
    tables: Vec<usize>,
    loading: Loading,
}

enum Loading {
    /// The whole group in one transaction, visible at once; emptied first with `truncate`.
    Together { truncate: bool },
    /// Several prepared transactions committed together, visible at once (the tables are empty).
    Prepared(SplitGroup),
    /// Each table or block range in a transaction of its own, committed when it is in: empty
    /// target tables, seeded by every worker whatever the target's prepared-transaction limit.
    Alone,
}

struct SplitGroup {
    /// What the parts' global ids and the commit decision are named by.
    id: String,
    parts: usize,
    state: Mutex<SplitState>,
}

#[derive(Default)]
struct SplitState {
    prepared: Vec<String>,
    reports: Vec<TableReport>,
    failed: bool,
}

impl SplitGroup {
    fn state(&self) -> std::sync::MutexGuard<'_, SplitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one worker transaction loads: a whole group, one part of a split group, or one piece
/// loaded alone.
struct Job {
    group: Arc<GroupJob>,
    part: usize,
    pieces: Vec<Piece>,
    /// Tables every piece of which must have committed first (foreign keys checked on load).
    needs: Vec<usize>,
    /// How many pieces its table was cut into (loaded alone: one piece per job).
    table_pieces: usize,
}

impl Job {
    fn bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.bytes).sum()
    }
}

/// What the target allows that decides how groups load.
struct TargetAbilities {
    /// `Err(why)` when the target role may not set `session_replication_role`: foreign keys
    /// are then checked as rows arrive.
    replica: Result<(), String>,
    /// Per table: it has a foreign key to itself (its ranges could not load apart unchecked).
    self_referencing: Vec<bool>,
}

/// Cuts the copy into worker transactions, largest first. Empty target tables load piece by
/// piece (a table, or a block range of one of at least `split_bytes`), each committed alone;
/// groups that must appear at once (`--atomic`, `--truncate` of tables with rows, merges, or
/// foreign-key cycles the target would check) load in one transaction per group, or in parts
/// prepared and committed together when the target can.
#[allow(clippy::too_many_arguments)]
async fn plan_jobs(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
    parts_of: &[TablePart],
    groups: Vec<Vec<usize>>,
    edges: &[(usize, usize)],
    abilities: &TargetAbilities,
    sizes: &[TableSize],
    options: &CopyOptions,
) -> Result<Vec<Job>, CopyError> {
    let workers = options.jobs.max(1);
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let large = |tables: &[usize]| -> Vec<usize> {
        tables
            .iter()
            .copied()
            .filter(|&i| sizes[i].bytes >= options.split_bytes && sizes[i].blocks > 1)
            .collect()
    };
    let checked = abilities.replica.is_err();
    let cyclic = schedule::on_cycle(metas.len(), edges);
    let ranges_of = |table: usize| -> Vec<Option<split::BlockRange>> {
        if workers > 1 && !large(&[table]).is_empty() {
            split::block_ranges(sizes[table].blocks, workers)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        }
    };
    // Whether the target can take prepared parts at all: free slots, or why not.
    let mut capacity = None;
    let mut jobs = Vec::new();
    let mut ordered_for_checks = Vec::new();
    for (g, tables) in groups.into_iter().enumerate() {
        let whole = |tables: Vec<usize>, truncate: bool| Job {
            pieces: tables
                .iter()
                .map(|&table| Piece {
                    table,
                    range: None,
                    bytes: sizes[table].bytes,
                })
                .collect(),
            group: Arc::new(GroupJob {
                tables,
                loading: Loading::Together { truncate },
            }),
            part: 0,
            needs: Vec::new(),
            table_pieces: 1,
        };
        let names = |tables: &[usize]| {
            tables
                .iter()
                .map(|&i| metas[i].table_name().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let merges = tables.iter().any(|&i| parts_of[i].merge);
        // TRUNCATE of tables with rows: the group is replaced in one transaction.
        let replaces = options.truncate && !merges && !all_empty(t, target, metas, &tables).await?;
        let cycle = checked && tables.iter().any(|&i| cyclic[i]);
        if !options.atomic && !merges && !replaces && !cycle {
            let group = Arc::new(GroupJob {
                tables: tables.clone(),
                loading: Loading::Alone,
            });
            for &table in &tables {
                // Checked foreign keys: a table's rows may refer to rows of its other ranges.
                let ranges = if checked && abilities.self_referencing[table] {
                    vec![None]
                } else {
                    ranges_of(table)
                };
                let needs: Vec<usize> = if checked {
                    edges
                        .iter()
                        .filter(|&&(child, _)| child == table)
                        .map(|&(_, parent)| parent)
                        .collect()
                } else {
                    Vec::new()
                };
                if !needs.is_empty() {
                    ordered_for_checks.push(metas[table].table_name().to_string());
                }
                let bytes = sizes[table].bytes / ranges.len() as u64;
                let table_pieces = ranges.len();
                for range in ranges {
                    jobs.push(Job {
                        group: group.clone(),
                        part: 0,
                        pieces: vec![Piece {
                            table,
                            range,
                            bytes,
                        }],
                        needs: needs.clone(),
                        table_pieces,
                    });
                }
            }
            continue;
        }
        let why_together = if merges {
            "a table with rows and a column list is merged by key in one transaction"
        } else if replaces {
            "--truncate on tables with rows empties and loads them in one transaction"
        } else if cycle {
            "their foreign keys form a cycle and the target checks them on load"
        } else {
            "--atomic"
        };
        let large = large(&tables);
        // A merge goes through a temporary table, which a prepared transaction cannot hold.
        if workers < 2 || large.is_empty() || merges {
            tracing::info!(tables = %names(&tables), "copying the group in one transaction: {why_together}");
            jobs.push(whole(tables, options.truncate));
            continue;
        }
        let mut pieces = Vec::new();
        for &table in &tables {
            let ranges = ranges_of(table);
            let bytes = sizes[table].bytes / ranges.len() as u64;
            pieces.extend(ranges.into_iter().map(|range| Piece {
                table,
                range,
                bytes,
            }));
        }
        let parts = split::pack(pieces, workers);
        if capacity.is_none() {
            capacity = Some(split_capacity(t, &abilities.replica).await);
        }
        let refusal = match capacity.as_mut().expect("set above") {
            Err(why) => Some(why.clone()),
            Ok(free) if *free < parts.len() => Some(format!(
                "the target has {free} free prepared-transaction slot(s) and {} are needed; raise max_prepared_transactions (a restart) to at least --jobs",
                parts.len()
            )),
            _ if replaces => Some(why_together.into()),
            Ok(free) => {
                *free -= parts.len();
                None
            }
        };
        if let Some(why) = refusal {
            tracing::info!(tables = %names(&large), "copying with one worker ({why_together}): {why}");
            jobs.push(whole(tables, options.truncate));
            continue;
        }
        tracing::info!(tables = %names(&large), parts = parts.len(), "copying in block ranges by several workers, committed together ({why_together})");
        let group = Arc::new(GroupJob {
            tables,
            loading: Loading::Prepared(SplitGroup {
                id: split::group_id(&run, g),
                parts: parts.len(),
                state: Mutex::default(),
            }),
        });
        for (part, pieces) in parts.into_iter().enumerate() {
            jobs.push(Job {
                group: group.clone(),
                part,
                pieces,
                needs: Vec::new(),
                table_pieces: 0,
            });
        }
    }
    if let (Err(why), false) = (&abilities.replica, ordered_for_checks.is_empty()) {
        tracing::warn!(
            tables = %ordered_for_checks.join(", "),
            "these tables load only after their parent tables are complete, since {why}; run copy as a role that may set session_replication_role (a superuser) to load every table at once"
        );
    }
    jobs.sort_by_key(|job| std::cmp::Reverse(job.bytes()));
    Ok(jobs)
}

/// Whether the target role may set `session_replication_role` (foreign keys and triggers off
/// while loading), or why not.
async fn replica_role(t: &Client) -> Result<(), String> {
    t.batch_execute("SET session_replication_role = replica; RESET session_replication_role")
        .await
        .map_err(|e| {
            format!(
                "the target role may not set session_replication_role ({})",
                QueryError::new("SET", &e)
            )
        })
}

/// How many parts the target can hold prepared, or why it cannot take split groups.
async fn split_capacity(t: &Client, replica: &Result<(), String>) -> Result<usize, String> {
    // Parts see neither each other's rows nor the other tables' of their group: foreign keys
    // must not be checked while loading.
    if let Err(why) = replica {
        return Err(format!(
            "{why}, so foreign keys would be checked against rows other workers have not committed"
        ));
    }
    let free = prepared::free_slots(t)
        .await
        .map_err(|e| QueryError::new("reading max_prepared_transactions", &e).to_string())?;
    if free < 2 {
        return Err(format!(
            "max_prepared_transactions leaves {free} free slot(s) on the target; set it to at least --jobs (a restart) to let several workers load one group"
        ));
    }
    state::ensure(t).await.map_err(|e| {
        format!("cannot create the copy's commit-decision table on the target ({e})")
    })?;
    Ok(free as usize)
}

async fn all_empty(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
    tables: &[usize],
) -> Result<bool, CopyError> {
    for &i in tables {
        let has_rows: bool = t
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", metas[i].qualified()),
                &[],
            )
            .await
            .map_err(db_error(target, "checking target tables"))?
            .get(0);
        if has_rows {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One table's figures from the reports of its ranges (rows and bytes add up; they ran side by
/// side, so the longest range's time).
fn merge_reports(reports: Vec<TableReport>) -> Vec<TableReport> {
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

/// The jobs no worker has taken yet, which of them may start, and the index builds of
/// complete tables.
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled whenever a job ends, so workers waiting for a parent table look again.
    changed: tokio::sync::Notify,
}

struct QueueState {
    jobs: VecDeque<Job>,
    board: schedule::Board,
    /// Per table loaded alone: the secondary indexes set aside until it is complete.
    aside: HashMap<usize, Vec<SetAside>>,
    /// Indexes of complete tables, ready to build.
    builds: VecDeque<(usize, SetAside)>,
    /// Per table: its indexes not built yet (it is analyzed after the last).
    unbuilt: HashMap<usize, usize>,
}

enum Next {
    Run(Job),
    /// Can never load: the parent table at this index failed.
    Blocked(Job, usize),
    /// Build a set-aside index of this complete table.
    Index(usize, SetAside),
    Wait,
    Empty,
}

impl Queue {
    fn new(jobs: Vec<Job>, tables: usize, aside: HashMap<usize, Vec<SetAside>>) -> Queue {
        let mut pieces = vec![0; tables];
        for job in jobs.iter().filter(|j| j.loads_alone()) {
            for piece in &job.pieces {
                pieces[piece.table] += 1;
            }
        }
        Queue {
            state: Mutex::new(QueueState {
                jobs: jobs.into(),
                board: schedule::Board::new(pieces),
                aside,
                builds: VecDeque::new(),
                unbuilt: HashMap::new(),
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Loads first; index builds when no load can start.
    fn next(&self) -> Next {
        let mut state = self.lock();
        let state = &mut *state;
        let pick = state.board.pick(&state.jobs, |job| &job.needs);
        match pick {
            schedule::Pick::Run(i) => {
                Next::Run(state.jobs.remove(i).expect("picked from the queue"))
            }
            schedule::Pick::Blocked(i, parent) => {
                Next::Blocked(state.jobs.remove(i).expect("picked from the queue"), parent)
            }
            schedule::Pick::Wait | schedule::Pick::Empty => {
                if let Some((table, index)) = state.builds.pop_front() {
                    Next::Index(table, index)
                } else if pick == schedule::Pick::Empty && state.board.in_flight() == 0 {
                    Next::Empty
                } else {
                    // A load in flight may complete a table whose indexes then need building.
                    Next::Wait
                }
            }
        }
    }

    /// A taken job ended; returns the tables its commit completed that have no index to
    /// build (ready to analyze). The others' indexes are queued.
    fn finished(&self, job: &Job, committed: bool) -> Vec<usize> {
        let mut state = self.lock();
        let completed = state.board.finished(&job.alone_tables(), committed);
        let mut ready = Vec::new();
        for table in completed {
            match state.aside.remove(&table) {
                Some(indexes) if !indexes.is_empty() => {
                    state.unbuilt.insert(table, indexes.len());
                    state
                        .builds
                        .extend(indexes.into_iter().map(|index| (table, index)));
                }
                _ => ready.push(table),
            }
        }
        drop(state);
        self.changed.notify_waiters();
        ready
    }

    /// An index of `table` was built; whether it was the table's last.
    fn index_built(&self, table: usize) -> bool {
        let mut state = self.lock();
        let left = state.unbuilt.entry(table).or_insert(1);
        *left -= 1;
        *left == 0
    }

    fn abandoned(&self, job: &Job) {
        self.lock().board.abandoned(&job.alone_tables());
        self.changed.notify_waiters();
    }
}

impl Job {
    fn loads_alone(&self) -> bool {
        matches!(self.group.loading, Loading::Alone)
    }

    /// The tables of its pieces when they load alone (the board tracks only those).
    fn alone_tables(&self) -> Vec<usize> {
        if self.loads_alone() {
            self.pieces.iter().map(|p| p.table).collect()
        } else {
            Vec::new()
        }
    }
}

struct Worker {
    id: usize,
    source: Endpoint,
    target: Endpoint,
    snapshot: String,
    queue: Arc<Queue>,
    metas: Arc<Vec<TableMeta>>,
    plans: Arc<Vec<KeyPlan>>,
    parts: Arc<Vec<TablePart>>,
    progress: Arc<CopyProgress>,
    /// For a copy with a hand-off: the slot and snapshot position each committed piece is
    /// recorded under (`stagingprop.copy_tables`), so a failed copy can be resumed.
    record: Option<(String, Lsn)>,
}

/// Which part of a table is copied, and how it lands.
#[derive(Clone, Debug)]
struct TablePart {
    /// The table's row filter: only the rows it selects are copied.
    filter: Option<String>,
    /// The target table has rows and production owns some columns: the managed columns are
    /// merged by key (insert or update) instead of loaded.
    merge: bool,
}

#[derive(Default)]
struct WorkerOutcome {
    done: Vec<TableReport>,
    failed: Vec<(Vec<String>, String)>,
}

impl Worker {
    async fn run(
        self,
        imported: tokio::sync::mpsc::Sender<Result<(), CopyError>>,
    ) -> WorkerOutcome {
        let mut outcome = WorkerOutcome::default();
        let sessions = self.open().await;
        let (s, mut t) = match sessions {
            Ok(pair) => {
                let _ = imported.send(Ok(())).await;
                pair
            }
            Err(e) => {
                let _ = imported.send(Err(e)).await;
                return outcome;
            }
        };
        drop(imported);
        loop {
            // A target session that ended (a backend terminated, a dropped connection) is made
            // again, so one failed job does not fail every job this worker takes after it (the
            // source session holds the snapshot and cannot be).
            if t.is_closed() {
                match self.connect_target().await {
                    Ok(new) => t = new,
                    Err(e) => tracing::warn!(worker = self.id, "{e}"),
                }
            }
            // Made before looking, so a job finishing meanwhile still wakes this worker.
            let changed = self.queue.changed.notified();
            let job = match self.queue.next() {
                Next::Empty => break,
                Next::Wait => {
                    changed.await;
                    continue;
                }
                Next::Blocked(job, parent) => {
                    self.queue.abandoned(&job);
                    outcome.failed.push((
                        self.table_names(&job),
                        format!(
                            "not loaded: {} failed first, and the target checks foreign keys as rows arrive",
                            self.metas[parent].table_name()
                        ),
                    ));
                    continue;
                }
                Next::Index(table, index) => {
                    let built = indexes::build(&t, &self.target, &index).await;
                    let analyzed = match built {
                        Ok(()) if self.queue.index_built(table) => self.analyze(&t, &[table]).await,
                        other => other,
                    };
                    if let Err(e) = analyzed {
                        let _ = t.batch_execute("ROLLBACK").await;
                        outcome.failed.push((
                            vec![self.metas[table].table_name().to_string()],
                            format!("{e} (the index stays recorded in stagingprop.copy_indexes; the next copy into this database builds it)"),
                        ));
                    }
                    continue;
                }
                Next::Run(job) => job,
            };
            let result = match &job.group.loading {
                Loading::Together { .. } => self.copy_group(&s, &t, &job).await,
                Loading::Prepared(split) => self.copy_part(&s, &t, &job, split).await,
                Loading::Alone => self.commit_pieces(&s, &t, &job).await,
            };
            let completed = self.queue.finished(&job, result.is_ok());
            let result = match result {
                Ok(reports) => self.analyze(&t, &completed).await.map(|()| reports),
                Err(e) => Err(e),
            };
            match result {
                Ok(reports) => outcome.done.extend(reports),
                Err(e) => {
                    let _ = t.batch_execute("ROLLBACK").await;
                    let mut error = e.to_string();
                    if let Loading::Prepared(split) = &job.group.loading {
                        error.push_str(&self.abandon(split).await);
                    }
                    outcome.failed.push((self.table_names(&job), error));
                }
            }
        }
        outcome
    }

    /// The tables a failed job leaves incomplete: a piece's own, or its whole group.
    fn table_names(&self, job: &Job) -> Vec<String> {
        let tables: Vec<usize> = match job.group.loading {
            Loading::Alone => job.pieces.iter().map(|p| p.table).collect(),
            _ => job.group.tables.clone(),
        };
        tables
            .iter()
            .map(|&i| self.metas[i].table_name().to_string())
            .collect()
    }

    /// The source session in the shared snapshot, and the target session.
    async fn open(&self) -> Result<(Client, Client), CopyError> {
        let s = self
            .source
            .connect()
            .await
            .map_err(db_error(&self.source, "connect"))?;
        s.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&self.snapshot)
        ))
        .await
        .map_err(db_error(&self.source, "importing the snapshot"))?;
        Ok((s, self.connect_target().await?))
    }

    async fn connect_target(&self) -> Result<Client, CopyError> {
        let t = self
            .target
            .connect()
            .await
            .map_err(db_error(&self.target, "connect"))?;
        // Foreign keys are satisfied by the snapshot; without the privilege, tables load
        // parents first.
        let _ = t
            .batch_execute("SET session_replication_role = replica")
            .await;
        Ok(t)
    }

    /// A whole group in one transaction, then analyzed.
    async fn copy_group(
        &self,
        s: &Client,
        t: &Client,
        job: &Job,
    ) -> Result<Vec<TableReport>, CopyError> {
        let reports = self.commit_pieces(s, t, job).await?;
        self.analyze(t, &job.group.tables).await?;
        Ok(reports)
    }

    /// A job's pieces in one transaction, committed at once (a group loading together is
    /// emptied first with --truncate).
    async fn commit_pieces(
        &self,
        s: &Client,
        t: &Client,
        job: &Job,
    ) -> Result<Vec<TableReport>, CopyError> {
        t.batch_execute("BEGIN")
            .await
            .map_err(db_error(&self.target, "BEGIN"))?;
        if matches!(job.group.loading, Loading::Together { truncate: true }) {
            let list = job
                .group
                .tables
                .iter()
                .map(|&i| self.metas[i].qualified())
                .collect::<Vec<_>>()
                .join(", ");
            t.batch_execute(&format!("TRUNCATE {list}"))
                .await
                .map_err(db_error(&self.target, "emptying the target tables"))?;
        }
        let reports = self.load(s, t, &job.pieces).await?;
        self.record(t, &job.pieces, job.table_pieces).await?;
        t.batch_execute("COMMIT")
            .await
            .map_err(db_error(&self.target, "COMMIT"))?;
        self.committed(&reports);
        Ok(reports)
    }

    /// Records committed pieces in the transaction that loads them (copies with a hand-off).
    async fn record(
        &self,
        t: &Client,
        pieces: &[Piece],
        of_pieces: usize,
    ) -> Result<(), CopyError> {
        let Some((slot, snapshot_lsn)) = &self.record else {
            return Ok(());
        };
        for piece in pieces {
            let loaded = state::copy_tables::LoadedPiece {
                table: self.metas[piece.table].table_name(),
                piece: piece.range.map_or(String::new(), |r| r.to_string()),
                of_pieces: of_pieces as i32,
                snapshot_lsn: *snapshot_lsn,
            };
            state::copy_tables::record(t, slot, &loaded)
                .await
                .map_err(db_error(&self.target, "recording the loaded piece"))?;
        }
        Ok(())
    }

    /// One part of a split group, prepared; the worker preparing the last part commits them all.
    async fn copy_part(
        &self,
        s: &Client,
        t: &Client,
        job: &Job,
        split: &SplitGroup,
    ) -> Result<Vec<TableReport>, CopyError> {
        if split.state().failed {
            return Ok(Vec::new());
        }
        t.batch_execute("BEGIN")
            .await
            .map_err(db_error(&self.target, "BEGIN"))?;
        let reports = self.load(s, t, &job.pieces).await?;
        if split.state().failed {
            t.batch_execute("ROLLBACK")
                .await
                .map_err(db_error(&self.target, "ROLLBACK"))?;
            return Ok(Vec::new());
        }
        let gid = split::part_gid(&split.id, job.part);
        t.batch_execute(&format!("PREPARE TRANSACTION {}", quote_literal(&gid)))
            .await
            .map_err(db_error(&self.target, "PREPARE TRANSACTION"))?;
        let all = {
            let mut state = split.state();
            if state.failed {
                None
            } else {
                state.prepared.push(gid.clone());
                state.reports.extend(reports);
                (state.prepared.len() == split.parts).then(|| {
                    (
                        std::mem::take(&mut state.prepared),
                        std::mem::take(&mut state.reports),
                    )
                })
            }
        };
        let Some((gids, reports)) = all else {
            if split.state().failed {
                // Another part failed after this one checked: this part goes too.
                prepared::rollback_parts(t, &[gid]).await;
            }
            return Ok(Vec::new());
        };
        if let Err(e) = prepared::commit_group(t, &split.id, &gids).await {
            // As a database error, so the server's SQLSTATE reaches the operator.
            let (what, source) = match e {
                prepared::CommitError::Undecided(source) => {
                    // Nothing committed: the caller's abandon() rolls every part back.
                    split.state().prepared = gids;
                    ("recording the commit decision", source)
                }
                prepared::CommitError::Decided(source) => (
                    "committing the prepared parts (part of the data may be visible until the \
                     next `stagingprop copy` into this database commits the rest)",
                    source,
                ),
            };
            return Err(db_error(&self.target, what)(source));
        }
        let reports = merge_reports(reports);
        self.committed(&reports);
        self.analyze(t, &job.group.tables).await?;
        Ok(reports)
    }

    /// Marks a split group failed and rolls back its prepared parts, through a new session (this
    /// worker's may be what failed). Says what is left for the next copy, if anything.
    async fn abandon(&self, split: &SplitGroup) -> String {
        let gids = {
            let mut state = split.state();
            state.failed = true;
            std::mem::take(&mut state.prepared)
        };
        if gids.is_empty() {
            return String::new();
        }
        let left = match self.target.connect().await {
            Ok(t) => prepared::rollback_parts(&t, &gids).await,
            Err(_) => gids,
        };
        if left.is_empty() {
            String::new()
        } else {
            format!(
                "; {} part(s) stay prepared (holding their locks) until the next `stagingprop copy` into this database rolls them back: {}",
                left.len(),
                left.join(", ")
            )
        }
    }

    /// Key-map entries, then every piece's rows, in the caller's transaction.
    async fn load(
        &self,
        s: &Client,
        t: &Client,
        pieces: &[Piece],
    ) -> Result<Vec<TableReport>, CopyError> {
        for piece in pieces.iter().filter(|p| p.first_of_table()) {
            if let Some(entries) = &self.plans[piece.table].key_map {
                state::key_map::replace_table(t, &self.metas[piece.table].table_name(), entries)
                    .await
                    .map_err(db_error(&self.target, "writing the key map"))?;
            }
        }
        let mut reports = Vec::with_capacity(pieces.len());
        for piece in pieces {
            reports.push(self.copy_piece(s, t, piece).await?);
        }
        Ok(reports)
    }

    /// After a commit: a log line per table or range.
    fn committed(&self, reports: &[TableReport]) {
        for report in reports {
            tracing::info!(
                worker = self.id,
                table = %report.table,
                rows = report.rows,
                mb = format!("{:.1}", report.bytes as f64 / 1e6),
                seconds = format!("{:.1}", report.seconds),
                "copied"
            );
        }
    }

    /// Tables complete on the target: counted, and `ANALYZE`d for the planner.
    async fn analyze(&self, t: &Client, tables: &[usize]) -> Result<(), CopyError> {
        self.progress
            .tables_done
            .fetch_add(tables.len(), Ordering::Relaxed);
        for &i in tables {
            t.batch_execute(&format!("ANALYZE {}", self.metas[i].qualified()))
                .await
                .map_err(db_error(&self.target, "ANALYZE"))?;
        }
        Ok(())
    }

    /// Streams one table, or one block range of it, as binary COPY from source to target.
    async fn copy_piece(
        &self,
        s: &Client,
        t: &Client,
        piece: &Piece,
    ) -> Result<TableReport, CopyError> {
        let meta = &self.metas[piece.table];
        let plan = &self.plans[piece.table];
        let started = Instant::now();
        let columns = meta
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let part = &self.parts[piece.table];
        let conditions: Vec<String> = piece
            .range
            .map(|r| r.condition())
            .into_iter()
            .chain(part.filter.as_ref().map(|f| format!("({f})")))
            .collect();
        let condition = if conditions.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conditions.join(" AND "))
        };
        let out_sql = format!(
            "COPY (SELECT {columns} FROM ONLY {}{condition}) TO STDOUT (FORMAT binary)",
            meta.qualified()
        );
        let merge_table = part
            .merge
            .then(|| format!("stagingprop_merge_{}", piece.table));
        let in_sql = match &merge_table {
            Some(scratch) => {
                t.batch_execute(&format!(
                    "CREATE TEMP TABLE {scratch} ON COMMIT DROP AS SELECT {columns} FROM {} WITH NO DATA",
                    meta.qualified()
                ))
                .await
                .map_err(db_error(&self.target, "creating the merge table"))?;
                format!("COPY {scratch} ({columns}) FROM STDIN (FORMAT binary)")
            }
            None => format!(
                "COPY {} ({columns}) FROM STDIN (FORMAT binary)",
                meta.qualified()
            ),
        };
        let stream = s
            .copy_out(&out_sql)
            .await
            .map_err(db_error(&self.source, "reading the table"))?;
        let sink = t
            .copy_in::<_, bytes::Bytes>(&in_sql)
            .await
            .map_err(db_error(&self.target, "writing the table"))?;
        pin_mut!(stream);
        pin_mut!(sink);
        let label = match piece.range {
            None => meta.table_name().to_string(),
            Some(r) => format!("{}, {r}", meta.table_name()),
        };
        let board = self.progress.show(label, piece.bytes);
        let mut bytes = 0u64;
        // The source sends a message per row; the target gets them coalesced into large
        // messages (COPY data is one byte stream, message boundaries carry no meaning), which
        // saves a channel hand-off and a frame per row.
        let mut pending = bytes::BytesMut::with_capacity(COALESCE_BYTES);
        // Key columns to rewrite: only bytes already rewritten (whole fields) are sent.
        let mut rewriter = (!plan.rewrites.is_empty())
            .then(|| KeyRewriter::new(meta.columns.len(), plan.rewrites.clone()));
        let mut rewritten = 0;
        let rewrite_error = |e: rewrite::RewriteError| {
            CopyError::Refused(format!("copying {}: {e}", meta.table_name()))
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(db_error(&self.source, "reading the table"))?;
            bytes += chunk.len() as u64;
            // A message per row (the header and trailer ride along): close enough for progress.
            for counters in [
                (&self.progress.bytes, &self.progress.rows),
                (&board.piece.bytes, &board.piece.rows),
            ] {
                counters.0.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                counters.1.fetch_add(1, Ordering::Relaxed);
            }
            pending.extend_from_slice(&chunk);
            let ready = match &mut rewriter {
                Some(r) => {
                    rewritten += r
                        .rewrite(&mut pending[rewritten..])
                        .map_err(rewrite_error)?;
                    rewritten
                }
                None => pending.len(),
            };
            if ready >= COALESCE_BYTES {
                sink.feed(pending.split_to(ready).freeze())
                    .await
                    .map_err(db_error(&self.target, "writing the table"))?;
                rewritten = 0;
                pending.reserve(COALESCE_BYTES);
            }
        }
        if rewriter
            .as_ref()
            .is_some_and(|r| !r.finished() || rewritten != pending.len())
        {
            return Err(CopyError::Refused(format!(
                "copying {}: the binary COPY stream ended in the middle of a row",
                meta.table_name()
            )));
        }
        if !pending.is_empty() {
            sink.feed(pending.freeze())
                .await
                .map_err(db_error(&self.target, "writing the table"))?;
        }
        let rows = sink
            .finish()
            .await
            .map_err(db_error(&self.target, "finishing the table"))?;
        if let Some(scratch) = &merge_table {
            t.batch_execute(&merge_sql(meta, scratch))
                .await
                .map_err(db_error(&self.target, "merging the managed columns"))?;
            t.batch_execute(&format!("DROP TABLE {scratch}"))
                .await
                .map_err(db_error(&self.target, "dropping the merge table"))?;
        }
        let table = meta.table_name().to_string();
        metrics::counter!("stagingprop_copy_rows_total", "table" => table.clone()).increment(rows);
        metrics::counter!("stagingprop_copy_bytes_total", "table" => table).increment(bytes);
        Ok(TableReport {
            table: meta.table_name(),
            rows,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            ranges: 1,
        })
    }
}

/// Inserts the rows of `scratch` into the table, or sets their managed columns where the key
/// exists: the columns production owns are never written.
fn merge_sql(meta: &TableMeta, scratch: &str) -> String {
    let columns: Vec<String> = meta.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let keys: Vec<String> = meta
        .key
        .iter()
        .map(|&k| quote_ident(&meta.columns[k].name))
        .collect();
    let set: Vec<String> = (0..meta.columns.len())
        .filter(|i| !meta.key.contains(i))
        .map(|i| format!("{0} = EXCLUDED.{0}", quote_ident(&meta.columns[i].name)))
        .collect();
    let action = if set.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!("UPDATE SET {}", set.join(", "))
    };
    format!(
        "INSERT INTO {table} ({cols}) SELECT {cols} FROM {scratch} ON CONFLICT ({keys}) DO {action}",
        table = meta.qualified(),
        cols = columns.join(", "),
        keys = keys.join(", "),
    )
}

/// How copy changes one table's keys on the way.
#[derive(Clone, Debug, Default)]
struct KeyPlan {
    rewrites: Vec<ColumnRewrite>,
    /// Tables with a mapping rule: the key-map entries (staging key, production key) that
    /// replace the table's, written in the transaction that loads it.
    key_map: Option<Arc<Vec<(i64, i64)>>>,
}

/// The key rules of the copied tables (`metas`, the source's): one plan per table, and (copies
/// to staging) the config indexes of tables whose key map on production is reset afterwards.
#[allow(clippy::too_many_arguments)]
async fn plan_keys(
    config: &Config,
    options: &CopyOptions,
    metas: &[TableMeta],
    source: &Endpoint,
    s: &Client,
    target: &Endpoint,
    t: &Client,
    snapshot: &str,
) -> Result<(Vec<KeyPlan>, Vec<usize>), CopyError> {
    let mut plans = vec![KeyPlan::default(); metas.len()];
    if config.tables.iter().all(|t| t.key == KeyRule::Identity) {
        return Ok((plans, Vec::new()));
    }
    let forward = options.to == Side::Production;
    let (production, p) = if forward { (target, t) } else { (source, s) };
    let (staging, st) = if forward { (source, s) } else { (target, t) };
    let mut production_metas = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        match catalog::load_table(p, &table.name)
            .await
            .map_err(db_error(production, "reading table definitions"))?
        {
            Some(meta) => production_metas.push(meta),
            None => {
                return Err(CopyError::Schema(vec![format!(
                    "production: table {} does not exist; key remapping needs every managed table",
                    table.name
                )]));
            }
        }
    }
    let declared = catalog::column_references(st)
        .await
        .map_err(db_error(staging, "reading foreign keys"))?;
    let remapper = Remapper::new(config, &production_metas, &declared).map_err(CopyError::Rules)?;
    let Some(remapper) = remapper else {
        return Ok((plans, Vec::new()));
    };
    let config_index: Vec<usize> = metas
        .iter()
        .map(|m| {
            config
                .tables
                .iter()
                .position(|t| t.name == m.table_name())
                .expect("copied tables are managed tables")
        })
        .collect();
    let copied: HashMap<usize, usize> = config_index
        .iter()
        .enumerate()
        .map(|(i, &ci)| (ci, i))
        .collect();
    // The copy column list is the source's column order.
    let position = |i: usize, ci: usize, c: usize| -> Result<usize, CopyError> {
        let name = remapper.column_name(ci, c);
        metas[i].column_index(name).ok_or_else(|| {
            CopyError::Rules(vec![format!(
                "{}.{name} holds remapped keys on production but does not exist on the source; add it there or remove it from [[references]]",
                config.tables[ci].name
            )])
        })
    };

    if !forward {
        // Production's keys become staging's: only offsets are undone.
        let mut reset = Vec::new();
        for (i, &ci) in config_index.iter().enumerate() {
            let rule = remapper.rule(ci);
            if let (KeyRule::Offset { offset }, Some(k)) = (rule, remapper.key_column(ci)) {
                plans[i].rewrites.push(ColumnRewrite {
                    column: position(i, ci, k)?,
                    translate: Translate::Offset(-offset),
                });
            }
            for reference in remapper.references(ci) {
                if let KeyRule::Offset { offset } = remapper.rule(reference.parent) {
                    plans[i].rewrites.push(ColumnRewrite {
                        column: position(i, ci, reference.column)?,
                        translate: Translate::Offset(-offset),
                    });
                }
            }
            if !matches!(rule, KeyRule::Identity | KeyRule::Offset { .. }) {
                reset.push(ci);
            }
        }
        return Ok((plans, reset));
    }

    // Fresh production keys for every row of the copied allocate/natural tables, in key order.
    let mut maps: HashMap<usize, Arc<HashMap<i64, i64>>> = HashMap::new();
    let keys_error = |e: key_map::StoreError| CopyError::Keys {
        target: production.describe(),
        message: e.to_string(),
    };
    let mut statements = Statements::default();
    let mut planner: Option<Client> = None;
    for (i, &ci) in config_index.iter().enumerate() {
        let (KeyRule::Allocate { source: keys } | KeyRule::Natural { source: keys, .. }) =
            remapper.rule(ci)
        else {
            continue;
        };
        if planner.is_none() {
            let c = source
                .connect()
                .await
                .map_err(db_error(source, "connect"))?;
            c.batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::quote::quote_literal(snapshot)
            ))
            .await
            .map_err(db_error(source, "importing the snapshot"))?;
            planner = Some(c);
        }
        let key = remapper.key_column(ci).expect("mapping rules have a key");
        let key_name = quote_ident(remapper.column_name(ci, key));
        let sources: Vec<i64> = planner
            .as_ref()
            .expect("opened above")
            .query(
                &format!(
                    "SELECT {key_name}::bigint FROM ONLY {} ORDER BY 1",
                    metas[i].qualified()
                ),
                &[],
            )
            .await
            .map_err(db_error(source, "reading keys"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let targets = statements
            .allocate(p, &config.tables[ci].name, keys, sources.len())
            .await
            .map_err(keys_error)?;
        let pairs: Vec<(i64, i64)> = sources.into_iter().zip(targets).collect();
        maps.insert(ci, Arc::new(pairs.iter().copied().collect()));
        plans[i].key_map = Some(Arc::new(pairs));
        plans[i].rewrites.push(ColumnRewrite {
            column: position(i, ci, key)?,
            translate: Translate::Map(maps[&ci].clone()),
        });
    }
    for (i, &ci) in config_index.iter().enumerate() {
        match remapper.rule(ci) {
            KeyRule::RemapOnConflict { .. } => plans[i].key_map = Some(Arc::new(Vec::new())),
            KeyRule::Offset { offset } => {
                let key = remapper.key_column(ci).expect("offset tables have a key");
                plans[i].rewrites.push(ColumnRewrite {
                    column: position(i, ci, key)?,
                    translate: Translate::Offset(*offset),
                });
            }
            _ => {}
        }
        for reference in remapper.references(ci) {
            let parent = reference.parent;
            let translate = match remapper.rule(parent) {
                KeyRule::Identity => continue,
                KeyRule::Offset { offset } => Translate::Offset(*offset),
                // Copied now: its keys are kept.
                KeyRule::RemapOnConflict { .. } if copied.contains_key(&parent) => continue,
                _ => match maps.get(&parent) {
                    Some(map) => Translate::Map(map.clone()),
                    None => {
                        // Not copied now: production's key map says where its rows are.
                        let stored = state::key_map::read_table(p, &config.tables[parent].name)
                            .await
                            .map_err(db_error(production, "reading the key map"))?;
                        let map = Arc::new(stored);
                        maps.insert(parent, map.clone());
                        Translate::Map(map)
                    }
                },
            };
            plans[i].rewrites.push(ColumnRewrite {
                column: position(i, ci, reference.column)?,
                translate,
            });
        }
    }
    if let Some(planner) = planner {
        let _ = planner.batch_execute("COMMIT").await;
    }
    Ok((plans, Vec::new()))
}

/// After a copy to staging, staging's keys are production's: production's key map is reset to
/// say so (no entries for remap-on-conflict tables, `key = key` for allocating ones).
async fn reset_production_key_map(
    config: &Config,
    p: &Client,
    production: &Endpoint,
    tables: &[usize],
) -> Result<(), CopyError> {
    state::ensure(p)
        .await
        .map_err(|e| CopyError::Refused(format!("on {}: {e}", production.describe())))?;
    let mut sql = String::from("BEGIN;");
    for &ci in tables {
        let table = &config.tables[ci];
        let mut identity_key = None;
        if matches!(
            table.key,
            KeyRule::Allocate { .. } | KeyRule::Natural { .. }
        ) {
            let meta = catalog::load_table(p, &table.name)
                .await
                .map_err(db_error(production, "reading table definitions"))?
                .ok_or_else(|| {
                    CopyError::Refused(format!("production: no table {}", table.name))
                })?;
            identity_key = meta.key.first().map(|&k| meta.columns[k].name.clone());
        }
        sql.push_str(&state::key_map::reset_table(
            &table.name,
            identity_key.as_deref(),
        ));
    }
    sql.push_str("COMMIT;");
    p.batch_execute(&sql)
        .await
        .map_err(db_error(production, "resetting the key map"))?;
    tracing::info!(
        tables = tables.len(),
        "production's key map reset: staging now has production's keys"
    );
    Ok(())
}
