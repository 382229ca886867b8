//! A [`Target`] that writes nothing: `sync --dry-run` runs the pipeline as usual (the same
//! transaction boundaries, skipping and batching) into it, so the run report says what a real
//! run would apply, with nothing written to production and nothing confirmed to staging. The
//! pipeline's unit tests run it recording: it writes down, in one log shared by every session,
//! what it was asked to do, and its commits advance a pretend WAL whose flushed position lags
//! one commit behind, as an asynchronous commit does.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::apply::{ApplyError, ApplyStats, Committed, SchemaChangeRefused, Shapes, Target};
use crate::catalog::sequences::SequenceValue;
use crate::catalog::{ColumnMeta, TableMeta};
use crate::change::{Source, StagingChange};
use crate::config::ColumnList;
use crate::ddl::{self, Plan, SchemaChange};
use crate::model::{Lsn, Oid, Relation};
use crate::repair::AtHigh;
use crate::state::Progress;

/// What every session of one recorded run did, in order.
#[derive(Clone, Debug, Default)]
pub(super) struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(line);
        }
    }

    #[cfg(test)]
    pub(super) fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The pretend production all recorded sessions of a run share: its WAL end and flush position.
#[derive(Debug, Default)]
pub(super) struct Wal {
    end: AtomicU64,
    flushed: AtomicU64,
}

/// Where a recording session writes down what it does.
struct Recording {
    name: String,
    log: Log,
    wal: Arc<Wal>,
}

pub(super) struct DryRun {
    metas: Vec<TableMeta>,
    shapes: Shapes,
    /// `batch_max_rows`: a batch this large is full, and what is pending is sent on.
    max_rows: usize,
    pending_rows: usize,
    sent_rows: usize,
    in_transaction: bool,
    closing: Option<Progress>,
    committed: Vec<Committed>,
    progress_at: Lsn,
    stats: ApplyStats,
    recording: Option<Recording>,
}

impl DryRun {
    pub(super) fn new(metas: Vec<TableMeta>, max_rows: usize, progress_at: Lsn) -> Self {
        DryRun {
            metas,
            shapes: Shapes::default(),
            max_rows,
            pending_rows: 0,
            sent_rows: 0,
            in_transaction: false,
            closing: None,
            committed: Vec::new(),
            progress_at,
            stats: ApplyStats::default(),
            recording: None,
        }
    }

    /// A session of a recorded run, named `name` in the log.
    #[cfg(test)]
    pub(super) fn recording(
        name: &str,
        log: &Log,
        wal: &Arc<Wal>,
        metas: Vec<TableMeta>,
        max_rows: usize,
    ) -> Self {
        DryRun {
            recording: Some(Recording {
                name: name.to_owned(),
                log: log.clone(),
                wal: wal.clone(),
            }),
            ..DryRun::new(metas, max_rows, Lsn::INVALID)
        }
    }

    fn note(&self, what: impl std::fmt::Display) {
        if let Some(r) = &self.recording {
            r.log.push(format!("{} {what}", r.name));
        }
    }

    fn begin(&mut self) {
        if !self.in_transaction {
            self.in_transaction = true;
            self.note("BEGIN");
        }
    }

    /// Sends on what is pending; as production's session does, a closed batch commits first.
    async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending_rows > 0 {
            self.complete().await?;
            self.begin();
            self.note(format_args!("flush {} rows", self.pending_rows));
            self.sent_rows += std::mem::take(&mut self.pending_rows);
        }
        Ok(())
    }
}

fn key_text(key: &[Option<bytes::Bytes>]) -> String {
    key.iter()
        .map(|k| {
            k.as_ref()
                .map_or("NULL".into(), |b| String::from_utf8_lossy(b).into_owned())
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Target for DryRun {
    type Savepoint = ApplyStats;

    async fn relation(
        &mut self,
        relation: &Relation,
        table: usize,
        column_types: &[String],
    ) -> Result<(), ApplyError> {
        self.shapes
            .learn(relation, table, &self.metas[table], column_types)
    }

    async fn write(
        &mut self,
        relation: Oid,
        change: StagingChange,
        _: Source,
    ) -> Result<(), ApplyError> {
        use crate::apply::RowChange;
        let (table, change) = self.shapes.rearrange(relation, change)?;
        self.begin();
        let meta = &self.metas[table];
        let key = |row| crate::apply::key_of(meta, row).map(|k| key_text(&k));
        let line = match (&change, meta.key.is_empty()) {
            (_, true) => format!("keyless change of table {table}"),
            (RowChange::Insert(new), false) => format!("insert {}", key(new)?),
            (RowChange::Update(Some(old), new), false) if key(old)? != key(new)? => {
                format!("key change of {}", key(old)?)
            }
            (RowChange::Update(_, new), false) => format!("update {}", key(new)?),
            (RowChange::Delete(old), false) => format!("delete {}", key(old)?),
        };
        self.note(line);
        self.pending_rows += 1;
        if self.pending_rows >= self.max_rows {
            self.flush().await?;
        }
        Ok(())
    }

    async fn schema_change(
        &mut self,
        change: &SchemaChange,
        source: Source,
        _apply: bool,
    ) -> Result<Vec<Plan>, ApplyError> {
        let mut plans = Vec::new();
        for table_change in &change.tables {
            let Some(shape) = table_change.before.as_ref().or(table_change.after.as_ref()) else {
                continue;
            };
            let name = shape.table_name();
            let Some(t) = self.metas.iter().position(|m| m.table_name() == name) else {
                continue;
            };
            let refused = |obstacle: String| {
                SchemaChangeRefused::error(
                    name.clone(),
                    &change.statement,
                    String::new(),
                    obstacle,
                    source,
                )
            };
            let plan = match (&table_change.before, &table_change.after) {
                (None, Some(after)) => ddl::create_plan(after).map_err(refused)?,
                (Some(before), Some(after))
                    if before.table_name() != after.table_name()
                        && index_of(&self.metas, after).is_some() =>
                {
                    ddl::rename_plan(before, after).map_err(refused)?
                }
                // What production keeps or drops is the config's: shown as a real run keeps it.
                (Some(before), None) => ddl::drop_plan(before, false),
                _ => ddl::plan(table_change, &self.metas[t], &ColumnList::All).map_err(refused)?,
            };
            self.begin();
            let described = crate::apply::describe_plan(&plan).replace("\n    ", "; ");
            self.note(format_args!("schema change of {}: {described}", plan.table));
            tracing::info!(
                table = %plan.table,
                lsn = %source.lsn,
                "dry run: staging's schema change of {} would apply: {described}",
                plan.table
            );
            if let Some(after) = &table_change.after {
                // What production's table would be once the plan ran: the rows after it use it
                // (a renamed table's, under its new name).
                let t = index_of(&self.metas, after).unwrap_or(t);
                let old = &self.metas[t];
                let key: Vec<String> = match &after.primary_key {
                    Some(key) => key.columns.clone(),
                    None => old
                        .key
                        .iter()
                        .map(|&k| old.columns[k].name.clone())
                        .collect(),
                };
                let meta = &mut self.metas[t];
                meta.columns = after
                    .columns
                    .iter()
                    .map(|c| ColumnMeta {
                        name: c.name.clone(),
                        type_sql: c.type_sql.clone(),
                        required: false,
                        identity_always: c.identity == "a",
                        type_oid: 0,
                        type_modifier: -1,
                    })
                    .collect();
                meta.key = key.iter().filter_map(|k| meta.column_index(k)).collect();
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    async fn seeding(
        &mut self,
        _: i64,
        tables: &[String],
        on: bool,
        _: Source,
    ) -> Result<(), ApplyError> {
        let what = if on { "starts" } else { "ends" };
        self.note(format_args!("seeding of {} {what}", tables.join(", ")));
        Ok(())
    }

    async fn repair_chunk(&mut self, at: AtHigh, _: Source) -> Result<(), ApplyError> {
        self.flush().await?;
        self.begin();
        match at {
            AtHigh::Apply { chunk, left_out } => self.note(format_args!(
                "repair chunk {}: {} rows, {} deletes, {left_out} left to the stream",
                chunk.id.chunk,
                chunk.upserts.len(),
                chunk.deletes.len()
            )),
            AtHigh::Interrupted(chunk) => {
                self.note(format_args!("repair chunk {} interrupted", chunk.id.chunk))
            }
        }
        Ok(())
    }

    async fn truncate(&mut self, tables: &[usize], _: bool) -> Result<(), ApplyError> {
        self.begin();
        self.note(format_args!("truncate {tables:?}"));
        Ok(())
    }

    fn batch_full(&self) -> bool {
        self.sent_rows + self.pending_rows >= self.max_rows
    }

    async fn commit(&mut self, last: &Progress) -> Result<(), ApplyError> {
        self.complete().await?;
        self.begin();
        self.flush().await?;
        self.closing = Some(*last);
        self.sent_rows = 0;
        Ok(())
    }

    fn committing(&self) -> bool {
        self.closing.is_some()
    }

    async fn complete(&mut self) -> Result<(), ApplyError> {
        let Some(last) = self.closing.take() else {
            return Ok(());
        };
        self.note(format_args!(
            "COMMIT {} (progress from {})",
            last.end_lsn, self.progress_at
        ));
        self.in_transaction = false;
        self.progress_at = last.end_lsn;
        self.stats.batches += 1;
        let committed = match &self.recording {
            // The WAL writer has flushed the commits before this one by now, not this one.
            Some(r) => {
                let flushed = r.wal.end.load(Ordering::SeqCst);
                r.wal.flushed.fetch_max(flushed, Ordering::SeqCst);
                let durable_at = r.wal.end.fetch_add(100, Ordering::SeqCst) + 100;
                Committed {
                    end: last.end_lsn,
                    durable_at: Lsn(durable_at),
                    flushed: Lsn(r.wal.flushed.load(Ordering::SeqCst)),
                }
            }
            // Nothing to make durable; nothing is confirmed either (a dry run confirms none).
            None => Committed {
                end: last.end_lsn,
                durable_at: Lsn::INVALID,
                flushed: Lsn::INVALID,
            },
        };
        self.committed.push(committed);
        Ok(())
    }

    fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    fn progress_at(&self) -> Lsn {
        self.progress_at
    }

    fn set_progress_at(&mut self, lsn: Lsn) {
        self.progress_at = lsn;
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        if self.in_transaction || self.closing.is_some() {
            self.note("ROLLBACK");
        }
        self.in_transaction = false;
        self.closing = None;
        self.pending_rows = 0;
        self.sent_rows = 0;
        Ok(())
    }

    async fn savepoint(&mut self, name: &str) -> Result<ApplyStats, ApplyError> {
        self.begin();
        self.flush().await?;
        self.note(format_args!("SAVEPOINT {name}"));
        Ok(self.stats)
    }

    async fn rollback_to(&mut self, name: &str, at: ApplyStats) -> Result<(), ApplyError> {
        self.pending_rows = 0;
        self.stats = at;
        self.note(format_args!("ROLLBACK TO {name}"));
        Ok(())
    }

    async fn durable(&self, flush_now: bool) -> Result<Lsn, ApplyError> {
        let Some(r) = &self.recording else {
            return Ok(Lsn::INVALID);
        };
        if flush_now {
            let end = r.wal.end.load(Ordering::SeqCst);
            r.wal.flushed.fetch_max(end, Ordering::SeqCst);
        }
        Ok(Lsn(r.wal.flushed.load(Ordering::SeqCst)))
    }

    async fn follow_sequences(&mut self, _: &[SequenceValue]) -> Result<u64, ApplyError> {
        Ok(0)
    }

    fn set_one_by_one(&mut self, _: bool) {}

    fn stats(&self) -> ApplyStats {
        self.stats
    }

    fn stats_mut(&mut self) -> &mut ApplyStats {
        &mut self.stats
    }
}

/// The index of `shape`'s table among `metas`.
fn index_of(metas: &[TableMeta], shape: &ddl::TableShape) -> Option<usize> {
    let name = shape.table_name();
    metas.iter().position(|m| m.table_name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_created_table_is_described_and_its_creation_shapes_the_rows_after() {
        let change = SchemaChange::parse(
            br#"{"id":7,"tag":"CREATE TABLE","statement":"CREATE TABLE cat.gift (...)",
                 "tables":[{"before":null,"after":{"schema":"cat","name":"gift",
                   "columns":[{"attnum":1,"name":"id","type":"integer","not_null":true,"default":null},
                              {"attnum":2,"name":"note","type":"text","not_null":false,"default":null}],
                   "primary_key":{"name":"gift_pkey","columns":["id"]}}}]}"#,
        )
        .expect("a creation message");
        // A session that manages the table before production has it holds a placeholder.
        let placeholder = TableMeta {
            columns: Vec::new(),
            key: Vec::new(),
            ..change.tables[0].after.as_ref().unwrap().meta()
        };
        let (log, wal) = (Log::default(), Arc::new(Wal::default()));
        let mut dry = DryRun::recording("s", &log, &wal, vec![placeholder], 10);
        let source = Source {
            lsn: Lsn(100),
            xid: 1,
        };
        let plans = dry
            .schema_change(&change, source, true)
            .await
            .expect("a creation is planned");
        assert!(
            plans[0]
                .statements
                .iter()
                .any(|s| s.starts_with("CREATE TABLE \"cat\".\"gift\"")),
            "{plans:?}"
        );
        let lines = log.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("s schema change of cat.gift: ")
                    && l.contains("CREATE TABLE")),
            "{lines:?}"
        );
        assert_eq!(dry.metas[0].columns.len(), 2);
        assert_eq!(dry.metas[0].key, [0]);
    }
}
