//! The copy workers: each takes jobs from the shared queue and streams its pieces from the
//! source snapshot into the target (binary COPY, keys rewritten on the way), or builds a set-aside
//! index of a complete table.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt, pin_mut};
use tokio_postgres::Client;

use super::keys::KeyPlan;
use super::plan::{Job, Loading, SplitGroup, TablePart};
use super::rewrite::KeyRewriter;
use super::split::Piece;
use super::view::CopyProgress;
use super::{CopyError, TableReport, db_error, indexes, merge_reports, prepared, schedule};
use crate::catalog::TableMeta;
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::quote::{quote_ident, quote_literal};
use crate::state;
use crate::state::copy_indexes::SetAside;

/// Bytes gathered before they are sent to the target as one CopyData message.
const COALESCE_BYTES: usize = 256 * 1024;

/// The jobs no worker has taken yet, which of them may start, and the index builds of
/// complete tables.
pub(super) struct Queue {
    pub(super) state: Mutex<QueueState>,
    /// Signalled whenever a job ends, so workers waiting for a parent table look again.
    pub(super) changed: tokio::sync::Notify,
}

pub(super) struct QueueState {
    pub(super) jobs: VecDeque<Job>,
    pub(super) board: schedule::Board,
    /// Per table loaded alone: the secondary indexes set aside until it is complete.
    pub(super) aside: HashMap<usize, Vec<SetAside>>,
    /// Indexes of complete tables, ready to build.
    pub(super) builds: VecDeque<(usize, SetAside)>,
    /// Per table: its indexes not built yet (it is analyzed after the last).
    pub(super) unbuilt: HashMap<usize, usize>,
}

pub(super) enum Next {
    Run(Job),
    /// Can never load: the parent table at this index failed.
    Blocked(Job, usize),
    /// Build a set-aside index of this complete table.
    Index(usize, SetAside),
    Wait,
    Empty,
}

impl Queue {
    pub(super) fn new(
        jobs: Vec<Job>,
        tables: usize,
        aside: HashMap<usize, Vec<SetAside>>,
    ) -> Queue {
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Loads first; index builds when no load can start.
    pub(super) fn next(&self) -> Next {
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
    pub(super) fn finished(&self, job: &Job, committed: bool) -> Vec<usize> {
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
    pub(super) fn index_built(&self, table: usize) -> bool {
        let mut state = self.lock();
        let left = state.unbuilt.entry(table).or_insert(1);
        *left -= 1;
        *left == 0
    }

    pub(super) fn abandoned(&self, job: &Job) {
        self.lock().board.abandoned(&job.alone_tables());
        self.changed.notify_waiters();
    }
}

pub(super) struct Worker {
    pub(super) id: usize,
    pub(super) source: Endpoint,
    pub(super) target: Endpoint,
    pub(super) snapshot: String,
    pub(super) queue: Arc<Queue>,
    pub(super) metas: Arc<Vec<TableMeta>>,
    pub(super) plans: Arc<Vec<KeyPlan>>,
    pub(super) parts: Arc<Vec<TablePart>>,
    pub(super) progress: Arc<CopyProgress>,
    /// For a copy with a hand-off: the slot and snapshot position each committed piece is
    /// recorded under (`stagingprop.copy_tables`), so a failed copy can be resumed.
    pub(super) record: Option<(String, Lsn)>,
}

#[derive(Default)]
pub(super) struct WorkerOutcome {
    pub(super) done: Vec<TableReport>,
    pub(super) failed: Vec<(Vec<String>, String)>,
}

impl Worker {
    pub(super) async fn run(
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
    pub(super) fn table_names(&self, job: &Job) -> Vec<String> {
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
    pub(super) async fn open(&self) -> Result<(Client, Client), CopyError> {
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

    pub(super) async fn connect_target(&self) -> Result<Client, CopyError> {
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
    pub(super) async fn copy_group(
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
    pub(super) async fn commit_pieces(
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
    pub(super) async fn record(
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
    pub(super) async fn copy_part(
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
        let gid = super::split::part_gid(&split.id, job.part);
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
    pub(super) async fn abandon(&self, split: &SplitGroup) -> String {
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
    pub(super) async fn load(
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
    pub(super) fn committed(&self, reports: &[TableReport]) {
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
    pub(super) async fn analyze(&self, t: &Client, tables: &[usize]) -> Result<(), CopyError> {
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
    pub(super) async fn copy_piece(
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
            "COPY (SELECT {columns} FROM {}{condition}) TO STDOUT (FORMAT binary)",
            meta.own_rows()
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
        let board = self.progress.show(label.clone(), piece.bytes);
        let mut bytes = 0u64;
        let mut messages = 0u64;
        // The source sends a message per row; the target gets them coalesced into large
        // messages (COPY data is one byte stream, message boundaries carry no meaning), which
        // saves a channel hand-off and a frame per row.
        let mut pending = bytes::BytesMut::with_capacity(COALESCE_BYTES);
        // Key columns to rewrite: only bytes already rewritten (whole fields) are sent.
        let mut rewriter = (!plan.rewrites.is_empty())
            .then(|| KeyRewriter::new(meta.columns.len(), plan.rewrites.clone()));
        let mut rewritten = 0;
        let rewrite_error = |e: super::rewrite::RewriteError| {
            CopyError::Refused(format!("copying {}: {e}", meta.table_name()))
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(db_error(&self.source, "reading the table"))?;
            bytes += chunk.len() as u64;
            messages += 1;
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
        // A binary COPY out is one message per row and one for the trailer (the header rides
        // with the first): every row read must be a row the target took.
        let read = messages.saturating_sub(1);
        if read != rows {
            return Err(CopyError::Refused(format!(
                "copying {label}: read {read} rows from {} but {} took {rows}; the piece \
                 is not recorded as loaded: run the copy again",
                self.source.describe(),
                self.target.describe()
            )));
        }
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
pub(super) fn merge_sql(meta: &TableMeta, scratch: &str) -> String {
    let columns: Vec<String> = meta.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let keys: Vec<String> = meta
        .key
        .iter()
        .map(|&k| quote_ident(&meta.columns[k].name))
        .collect();
    let set: Vec<String> = (0..meta.columns.len())
        .filter(|&i| !meta.key.contains(&i) && meta.assignable(i))
        .map(|i| format!("{0} = EXCLUDED.{0}", quote_ident(&meta.columns[i].name)))
        .collect();
    let action = if set.is_empty() {
        "NOTHING".to_owned()
    } else {
        format!("UPDATE SET {}", set.join(", "))
    };
    format!(
        "INSERT INTO {table} ({cols}){overriding} SELECT {cols} FROM {scratch} ON CONFLICT ({keys}) DO {action}",
        table = meta.qualified(),
        overriding = meta.overriding(0..meta.columns.len()),
        cols = columns.join(", "),
        keys = keys.join(", "),
    )
}
