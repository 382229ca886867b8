//! `sync --dry-run`: a [`Target`] that applies nothing. The pipeline runs as usual (the same
//! transaction boundaries, skipping and batching), so the run report says what a real run
//! would apply; nothing is written to production and nothing is confirmed to staging.

use crate::apply::{ApplyError, ApplyStats, Committed};
use crate::catalog::TableMeta;
use crate::catalog::sequences::SequenceValue;
use crate::change::{Key, RowOp, Source};
use crate::config::TableName;
use crate::model::{Lsn, Tuple};
use crate::state::Progress;

use super::target::Target;

pub(super) struct DryRun {
    metas: Vec<TableMeta>,
    pending_rows: usize,
    sent_rows: usize,
    closing: Option<Progress>,
    committed: Vec<Committed>,
    progress_at: Lsn,
    stats: ApplyStats,
}

impl DryRun {
    pub(super) fn new(metas: Vec<TableMeta>, progress_at: Lsn, stats: ApplyStats) -> Self {
        DryRun {
            metas,
            pending_rows: 0,
            sent_rows: 0,
            closing: None,
            committed: Vec::new(),
            progress_at,
            stats,
        }
    }
}

impl Target for DryRun {
    type Savepoint = ();

    fn table_id(&self, name: &TableName) -> Option<usize> {
        self.metas.iter().position(|m| &m.table_name() == name)
    }

    fn meta(&self, table: usize) -> &TableMeta {
        &self.metas[table]
    }

    async fn row_change(
        &mut self,
        _: usize,
        _: Key,
        _: RowOp,
        _: Source,
    ) -> Result<(), ApplyError> {
        self.pending_rows += 1;
        Ok(())
    }

    async fn key_change(
        &mut self,
        _: usize,
        _: Key,
        _: Tuple,
        _: Source,
    ) -> Result<(), ApplyError> {
        self.pending_rows += 1;
        Ok(())
    }

    async fn truncate(&mut self, _: &[usize], _: bool) -> Result<(), ApplyError> {
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
        self.sent_rows += std::mem::take(&mut self.pending_rows);
        Ok(())
    }

    async fn close(&mut self, last: &Progress) -> Result<(), ApplyError> {
        self.complete().await?;
        self.closing = Some(*last);
        self.sent_rows = 0;
        self.pending_rows = 0;
        Ok(())
    }

    fn closing(&self) -> bool {
        self.closing.is_some()
    }

    async fn complete(&mut self) -> Result<(), ApplyError> {
        if let Some(last) = self.closing.take() {
            self.progress_at = last.end_lsn;
            self.stats.batches += 1;
            // Nothing to make durable; nothing is confirmed either (the run's Confirm is none).
            self.committed.push(Committed {
                end: last.end_lsn,
                durable_at: Lsn::INVALID,
                flushed: Lsn::INVALID,
            });
        }
        Ok(())
    }

    fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    fn in_transaction(&self) -> bool {
        self.closing.is_some() || self.pending_rows + self.sent_rows > 0
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.closing = None;
        self.pending_rows = 0;
        self.sent_rows = 0;
        Ok(())
    }

    async fn savepoint(&mut self, _: &str) -> Result<(), ApplyError> {
        Ok(())
    }

    async fn rollback_to(&mut self, _: &str, _: ()) -> Result<(), ApplyError> {
        Ok(())
    }

    fn progress_at(&self) -> Lsn {
        self.progress_at
    }

    fn set_progress_at(&mut self, lsn: Lsn) {
        self.progress_at = lsn;
    }

    fn one_by_one(&self) -> bool {
        false
    }

    fn set_one_by_one(&mut self, _: bool) {}

    fn stats(&self) -> ApplyStats {
        self.stats
    }

    fn stats_mut(&mut self) -> &mut ApplyStats {
        &mut self.stats
    }

    async fn wal_flushed(&self) -> Result<Lsn, ApplyError> {
        Ok(Lsn::INVALID)
    }

    async fn flush_wal(&self) -> Result<Lsn, ApplyError> {
        Ok(Lsn::INVALID)
    }

    async fn raise_sequences(&self, _: &[SequenceValue]) -> Result<u64, ApplyError> {
        Ok(0)
    }
}
