//! A [`Target`] for the pipeline's unit tests: it applies nothing and writes down, in one log
//! shared by every session, what it was asked to do. Commits advance a pretend WAL; what the
//! pretend production reports flushed lags one commit behind, as an asynchronous commit does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::target::Target;
use crate::apply::{ApplyError, ApplyStats, Committed};
use crate::catalog::TableMeta;
use crate::catalog::sequences::SequenceValue;
use crate::change::{Key, RowOp, Source};
use crate::config::TableName;
use crate::model::{Lsn, Tuple};
use crate::state::Progress;

/// What every session of one test did, in order.
#[derive(Clone, Debug, Default)]
pub(super) struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    pub(super) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// The pretend production all sessions of a test share: its WAL end and flush position.
#[derive(Debug, Default)]
pub(super) struct Wal {
    end: AtomicU64,
    flushed: AtomicU64,
}

pub(super) struct Recorder {
    name: String,
    log: Log,
    wal: Arc<Wal>,
    metas: Vec<TableMeta>,
    pending_rows: usize,
    sent_rows: usize,
    in_transaction: bool,
    closing: Option<Progress>,
    committed: Vec<Committed>,
    progress_at: Lsn,
    one_by_one: bool,
    stats: ApplyStats,
}

impl Recorder {
    pub(super) fn new(name: &str, log: &Log, wal: &Arc<Wal>, metas: Vec<TableMeta>) -> Self {
        Recorder {
            name: name.to_owned(),
            log: log.clone(),
            wal: wal.clone(),
            metas,
            pending_rows: 0,
            sent_rows: 0,
            in_transaction: false,
            closing: None,
            committed: Vec::new(),
            progress_at: Lsn::INVALID,
            one_by_one: false,
            stats: ApplyStats::default(),
        }
    }

    fn note(&self, what: impl std::fmt::Display) {
        self.log.push(format!("{} {what}", self.name));
    }

    fn begin(&mut self) {
        if !self.in_transaction {
            self.in_transaction = true;
            self.note("BEGIN");
        }
    }
}

fn key_text(key: &Key) -> String {
    key.iter()
        .map(|k| {
            k.as_ref()
                .map_or("NULL".into(), |b| String::from_utf8_lossy(b).into_owned())
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Target for Recorder {
    type Savepoint = ApplyStats;

    fn table_id(&self, name: &TableName) -> Option<usize> {
        self.metas.iter().position(|m| &m.table_name() == name)
    }

    fn meta(&self, table: usize) -> &TableMeta {
        &self.metas[table]
    }

    async fn row_change(
        &mut self,
        _table: usize,
        key: Key,
        op: RowOp,
        _source: Source,
    ) -> Result<(), ApplyError> {
        self.begin();
        let op = match op {
            RowOp::Insert(_) => "insert",
            RowOp::Update(_) => "update",
            RowOp::Delete => "delete",
        };
        self.note(format_args!("{op} {}", key_text(&key)));
        self.pending_rows += 1;
        Ok(())
    }

    async fn key_change(
        &mut self,
        _table: usize,
        old_key: Key,
        _new: Tuple,
        _source: Source,
    ) -> Result<(), ApplyError> {
        self.begin();
        self.note(format_args!("key change of {}", key_text(&old_key)));
        Ok(())
    }

    async fn truncate(&mut self, tables: &[usize], _: bool) -> Result<(), ApplyError> {
        self.begin();
        self.note(format_args!("truncate {tables:?}"));
        Ok(())
    }

    fn pending_rows(&self) -> usize {
        self.pending_rows
    }

    fn pending_bytes(&self) -> usize {
        0
    }

    fn batch_rows(&self) -> usize {
        self.sent_rows + self.pending_rows
    }

    fn batch_bytes(&self) -> usize {
        0
    }

    async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending_rows > 0 {
            // As production's session: a closed batch commits before the next one is sent.
            self.complete().await?;
            self.begin();
            self.note(format_args!("flush {} rows", self.pending_rows));
            self.sent_rows += self.pending_rows;
            self.pending_rows = 0;
        }
        Ok(())
    }

    async fn close(&mut self, last: &Progress) -> Result<(), ApplyError> {
        self.complete().await?;
        self.begin();
        self.flush().await?;
        self.closing = Some(*last);
        self.sent_rows = 0;
        Ok(())
    }

    fn closing(&self) -> bool {
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
        // The WAL writer has flushed the commits before this one by now, not this one.
        let flushed = self.wal.end.load(Ordering::SeqCst);
        self.wal.flushed.fetch_max(flushed, Ordering::SeqCst);
        let durable_at = self.wal.end.fetch_add(100, Ordering::SeqCst) + 100;
        self.committed.push(Committed {
            end: last.end_lsn,
            durable_at: Lsn(durable_at),
            flushed: Lsn(self.wal.flushed.load(Ordering::SeqCst)),
        });
        Ok(())
    }

    fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
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

    fn progress_at(&self) -> Lsn {
        self.progress_at
    }

    fn set_progress_at(&mut self, lsn: Lsn) {
        self.progress_at = lsn;
    }

    fn one_by_one(&self) -> bool {
        self.one_by_one
    }

    fn set_one_by_one(&mut self, on: bool) {
        self.one_by_one = on;
    }

    fn stats(&self) -> ApplyStats {
        self.stats
    }

    fn stats_mut(&mut self) -> &mut ApplyStats {
        &mut self.stats
    }

    async fn wal_flushed(&self) -> Result<Lsn, ApplyError> {
        Ok(Lsn(self.wal.flushed.load(Ordering::SeqCst)))
    }

    async fn flush_wal(&self) -> Result<Lsn, ApplyError> {
        let end = self.wal.end.load(Ordering::SeqCst);
        self.wal.flushed.fetch_max(end, Ordering::SeqCst);
        Ok(Lsn(end))
    }

    async fn raise_sequences(&self, _: &[SequenceValue]) -> Result<u64, ApplyError> {
        Ok(0)
    }
}
