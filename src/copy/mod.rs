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
//! Atomicity: tables linked by foreign keys are loaded together in one target transaction (and
//! truncated together with `--truncate`, since PostgreSQL cannot truncate a referenced table
//! alone), so a failed copy leaves every table either untouched or complete.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio_postgres::Client;

use crate::apply::schema::{self, TableMeta};
use crate::apply::{self, Progress};
use crate::config::{Config, TableName};
use crate::model::{Lsn, PgTimestamp};
use crate::pg::QueryError;
use crate::pg::connect::{Endpoint, EndpointError};
use crate::pg::replication::{ReplicationClient, ReplicationError, SnapshotAction};
use crate::sql::{qualified, quote_ident};

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
    /// A shell command to run after a successful copy.
    pub after: Option<String>,
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
    #[error("source and target differ, nothing was copied:\n  - {}", .0.join("\n  - "))]
    Schema(Vec<String>),
    #[error("{} table(s) failed and were left as they were ({}); the others are complete. Run the copy again with --truncate to finish", failed.len(), failed.join(", "))]
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

    // Validation before anything is written.
    let mut problems = Vec::new();
    let mut metas = Vec::new();
    for name in &tables {
        let on_source = schema::load_table(&s, name)
            .await
            .map_err(db_error(&source, "reading table definitions"))?;
        let on_target = schema::load_table(&t, name)
            .await
            .map_err(db_error(&target, "reading table definitions"))?;
        match (on_source, on_target) {
            (None, _) => problems.push(format!("{}: table {name} does not exist", options.from)),
            (Some(_), None) => problems.push(format!(
                "{}: table {name} does not exist; create it first",
                options.to
            )),
            (Some(src), Some(dst)) => {
                problems.extend(schema::compare(&src, &dst));
                metas.push(src);
            }
        }
    }
    if !problems.is_empty() {
        return Err(CopyError::Schema(problems));
    }
    if !options.truncate {
        let mut non_empty = Vec::new();
        for meta in &metas {
            let has_rows: bool = t
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {})", meta.qualified()),
                    &[],
                )
                .await
                .map_err(db_error(&target, "checking target tables"))?
                .get(0);
            if has_rows {
                non_empty.push(meta.table_name().to_string());
            }
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
    let meta_refs: Vec<&TableMeta> = metas.iter().collect();
    let edges = schema::foreign_keys(&t, &meta_refs)
        .await
        .map_err(db_error(&target, "reading foreign keys"))?;
    let groups = schema::linked_groups(metas.len(), &edges);

    // The snapshot, and for the sync hand-off the slot it comes from.
    let handoff = options.from == Side::Staging && options.to == Side::Production;
    let slot = &config.sync.slot;
    let (exporter, snapshot, consistent_point) = if handoff {
        apply::ensure_state_tables(&t)
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        prepare_slot(config, &source, &s).await?;
        // Until the copy completes, production's progress says "copy in progress" (0/0), so
        // sync refuses to stream onto a half-seeded production.
        let marker = Progress {
            end_lsn: Lsn::INVALID,
            commit_lsn: Lsn::INVALID,
            xid: 0,
            commit_time: PgTimestamp::now(),
        };
        record_handoff(&t, &target, slot, &marker).await?;
        let mut repl = ReplicationClient::connect(&source).await?;
        let created = repl
            .create_logical_slot(slot, false, SnapshotAction::Export)
            .await?;
        let snapshot = created.snapshot_name.ok_or_else(|| {
            CopyError::Refused("the server exported no snapshot with the slot".into())
        })?;
        tracing::info!(slot = %slot, consistent_point = %created.consistent_point, "created the sync slot; copying its snapshot");
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

    // Largest groups first, so the long ones start early.
    let mut sized: Vec<(i64, Vec<usize>)> = Vec::new();
    for group in groups {
        let mut size = 0i64;
        for &i in &group {
            let bytes: i64 = s
                .query_one(
                    "SELECT pg_table_size($1::text::regclass)",
                    &[&metas[i].qualified()],
                )
                .await
                .map_err(db_error(&source, "reading table sizes"))?
                .get(0);
            size += bytes;
        }
        sized.push((size, group));
    }
    sized.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let progress = Arc::new(CopyProgress {
        estimate: sized.iter().map(|(size, _)| *size as u64).sum(),
        tables: metas.len(),
        ..CopyProgress::default()
    });
    let reporter = tokio::spawn(report_progress(progress.clone()));
    let queue: Arc<Mutex<VecDeque<Vec<usize>>>> =
        Arc::new(Mutex::new(sized.into_iter().map(|(_, g)| g).collect()));
    let metas = Arc::new(metas);
    let jobs = options
        .jobs
        .max(1)
        .min(queue.lock().map(|q| q.len()).unwrap_or(1));

    // Every worker imports the snapshot before the exporter may go.
    let (imported_tx, mut imported_rx) = tokio::sync::mpsc::channel::<Result<(), CopyError>>(jobs);
    let mut workers = Vec::with_capacity(jobs);
    for worker in 0..jobs {
        let ctx = Worker {
            id: worker,
            source: source.clone(),
            target: target.clone(),
            snapshot: snapshot.clone(),
            truncate: options.truncate,
            queue: queue.clone(),
            metas: metas.clone(),
            progress: progress.clone(),
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
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
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
    if !failed.is_empty() || !errors.is_empty() {
        for e in &errors {
            tracing::error!("{e}");
        }
        return Err(CopyError::Partial { failed, errors });
    }

    // Sequences of identity-keyed tables follow the source (never lowered on the target).
    let values = apply::sequences::read_owned(&s, config)
        .await
        .map_err(db_error(&source, "reading sequences"))?;
    apply::sequences::raise(&t, &values)
        .await
        .map_err(db_error(&target, "setting sequences"))?;

    if let Some(point) = consistent_point {
        let progress = Progress {
            end_lsn: point,
            commit_lsn: point,
            xid: 0,
            commit_time: PgTimestamp::now(),
        };
        record_handoff(&t, &target, slot, &progress).await?;
        report.handoff = Some(point);
        tracing::info!(slot = %slot, at = %point, "hand-off recorded: sync starts exactly after the copied snapshot");
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

async fn record_handoff(
    t: &Client,
    target: &Endpoint,
    slot: &str,
    progress: &Progress,
) -> Result<(), CopyError> {
    let sql = format!(
        "INSERT INTO {} (slot, end_lsn, commit_lsn, xid, commit_time, applied_at) \
         VALUES ($1, $2::text::pg_lsn, $2::text::pg_lsn, 0, now(), now()) \
         ON CONFLICT (slot) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, commit_lsn = EXCLUDED.commit_lsn, \
         xid = 0, commit_time = now(), applied_at = now()",
        qualified(apply::STATE_SCHEMA, "progress")
    );
    t.execute(&sql, &[&slot, &progress.end_lsn.to_string()])
        .await
        .map_err(db_error(target, "recording the hand-off position"))?;
    Ok(())
}

/// Shared counters for the operator's view of a running copy.
#[derive(Default)]
struct CopyProgress {
    /// The source tables' on-disk size: the denominator of the estimate.
    estimate: u64,
    tables: usize,
    bytes: AtomicU64,
    rows: AtomicU64,
    tables_done: AtomicUsize,
}

/// A progress line redrawn every second on a terminal; a log line every 10 s otherwise.
async fn report_progress(progress: Arc<CopyProgress>) {
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let every = if terminal { 1 } else { 10 };
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.tick().await;
    loop {
        tick.tick().await;
        let bytes = progress.bytes.load(Ordering::Relaxed);
        let rows = progress.rows.load(Ordering::Relaxed);
        let done = progress.tables_done.load(Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64().max(0.001);
        let rate = bytes as f64 / elapsed;
        // COPY's binary size differs from the on-disk size: never claim to be done early.
        let fraction = (bytes as f64 / progress.estimate.max(1) as f64).min(0.99);
        let eta = if rate > 0.0 {
            (progress.estimate.saturating_sub(bytes)) as f64 / rate
        } else {
            0.0
        };
        let line = format!(
            "copy: {:>5.1}% {:.0} MB at {:.1} MB/s, {done}/{} tables, {rows} rows in finished tables, ETA {:.0} s",
            fraction * 100.0,
            bytes as f64 / 1e6,
            rate / 1e6,
            progress.tables,
            eta
        );
        if terminal {
            eprint!("\r{line}   ");
        } else {
            tracing::info!("{line}");
        }
    }
}

/// Bytes gathered before they are sent to the target as one CopyData message.
const COALESCE_BYTES: usize = 256 * 1024;

struct Worker {
    id: usize,
    source: Endpoint,
    target: Endpoint,
    snapshot: String,
    truncate: bool,
    queue: Arc<Mutex<VecDeque<Vec<usize>>>>,
    metas: Arc<Vec<TableMeta>>,
    progress: Arc<CopyProgress>,
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
        let (s, t) = match sessions {
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
            let next = self.queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(group) = next else { break };
            match self.copy_group(&s, &t, &group).await {
                Ok(reports) => outcome.done.extend(reports),
                Err(e) => {
                    let _ = t.batch_execute("ROLLBACK").await;
                    let names = group
                        .iter()
                        .map(|&i| self.metas[i].table_name().to_string())
                        .collect();
                    outcome.failed.push((names, e.to_string()));
                }
            }
        }
        outcome
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
            crate::sql::quote_literal(&self.snapshot)
        ))
        .await
        .map_err(db_error(&self.source, "importing the snapshot"))?;
        let t = self
            .target
            .connect()
            .await
            .map_err(db_error(&self.target, "connect"))?;
        // Foreign keys are satisfied by the snapshot; without the privilege, groups load parents first.
        let _ = t
            .batch_execute("SET session_replication_role = replica")
            .await;
        Ok((s, t))
    }

    async fn copy_group(
        &self,
        s: &Client,
        t: &Client,
        group: &[usize],
    ) -> Result<Vec<TableReport>, CopyError> {
        t.batch_execute("BEGIN")
            .await
            .map_err(db_error(&self.target, "BEGIN"))?;
        if self.truncate {
            let list = group
                .iter()
                .map(|&i| self.metas[i].qualified())
                .collect::<Vec<_>>()
                .join(", ");
            t.batch_execute(&format!("TRUNCATE {list}"))
                .await
                .map_err(db_error(&self.target, "emptying the target tables"))?;
        }
        let mut reports = Vec::with_capacity(group.len());
        for &i in group {
            reports.push(self.copy_table(s, t, &self.metas[i]).await?);
        }
        t.batch_execute("COMMIT")
            .await
            .map_err(db_error(&self.target, "COMMIT"))?;
        for report in &reports {
            tracing::info!(
                worker = self.id,
                table = %report.table,
                rows = report.rows,
                mb = format!("{:.1}", report.bytes as f64 / 1e6),
                seconds = format!("{:.1}", report.seconds),
                "copied"
            );
        }
        for &i in group {
            t.batch_execute(&format!("ANALYZE {}", self.metas[i].qualified()))
                .await
                .map_err(db_error(&self.target, "ANALYZE"))?;
        }
        Ok(reports)
    }

    /// Streams one table as binary COPY, chunk by chunk, from source to target.
    async fn copy_table(
        &self,
        s: &Client,
        t: &Client,
        meta: &TableMeta,
    ) -> Result<TableReport, CopyError> {
        let started = Instant::now();
        let columns = meta
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let out_sql = format!(
            "COPY (SELECT {columns} FROM ONLY {}) TO STDOUT (FORMAT binary)",
            meta.qualified()
        );
        let in_sql = format!(
            "COPY {} ({columns}) FROM STDIN (FORMAT binary)",
            meta.qualified()
        );
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
        let mut bytes = 0u64;
        let mut last_log = Instant::now();
        // The source sends a message per row; the target gets them coalesced into large
        // messages (COPY data is one byte stream, message boundaries carry no meaning), which
        // saves a channel hand-off and a frame per row.
        let mut pending = bytes::BytesMut::with_capacity(COALESCE_BYTES);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(db_error(&self.source, "reading the table"))?;
            bytes += chunk.len() as u64;
            self.progress
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            pending.extend_from_slice(&chunk);
            if pending.len() >= COALESCE_BYTES {
                sink.feed(pending.split().freeze())
                    .await
                    .map_err(db_error(&self.target, "writing the table"))?;
                pending.reserve(COALESCE_BYTES);
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                tracing::info!(table = %meta.table_name(), mb = format!("{:.0}", bytes as f64 / 1e6), "copying");
            }
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
        self.progress.rows.fetch_add(rows, Ordering::Relaxed);
        let table = meta.table_name().to_string();
        metrics::counter!("stagingprop_copy_rows_total", "table" => table.clone()).increment(rows);
        metrics::counter!("stagingprop_copy_bytes_total", "table" => table).increment(bytes);
        self.progress.tables_done.fetch_add(1, Ordering::Relaxed);
        Ok(TableReport {
            table: meta.table_name(),
            rows,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
