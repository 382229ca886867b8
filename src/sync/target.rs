//! What the pipeline applies to. The pipeline decides: transaction boundaries, what production
//! already has, batch limits, the order streamed transactions commit in, aborts. A [`Target`]
//! carries that out: production's session ([`Applier`]), or in the pipeline's unit tests a
//! recorder that writes down what it was asked to do.

use crate::apply::{Applier, ApplyError, ApplyStats, Committed, Savepoint};
use crate::catalog::TableMeta;
use crate::catalog::sequences::{self, SequenceValue};
use crate::change::{Key, RowOp, Source};
use crate::config::TableName;
use crate::model::{Lsn, ReplicaIdentity, Tuple};
use crate::pg::QueryError;
use crate::state::Progress;

/// One target session with at most one open transaction. The methods mean what [`Applier`]'s
/// of the same name do.
pub(super) trait Target {
    /// What rolling back to a savepoint restores.
    type Savepoint: Copy;

    fn table_id(&self, name: &TableName) -> Option<usize>;
    fn meta(&self, table: usize) -> &TableMeta;
    /// A managed-file table needs staging to send whole old rows (targets that publish no
    /// files accept any).
    fn check_file_identity(
        &self,
        _table: usize,
        _identity: ReplicaIdentity,
    ) -> Result<(), ApplyError> {
        Ok(())
    }
    /// A change of a managed-file table: its file is written aside, put in place with its batch
    /// (targets that publish no files ignore it).
    fn stage_file(
        &mut self,
        _table: usize,
        _old: Option<&Tuple>,
        _new: Option<&Tuple>,
    ) -> Result<(), ApplyError> {
        Ok(())
    }

    async fn row_change(
        &mut self,
        table: usize,
        key: Key,
        op: RowOp,
        source: Source,
    ) -> Result<(), ApplyError>;
    async fn key_change(
        &mut self,
        table: usize,
        old_key: Key,
        new: Tuple,
        source: Source,
    ) -> Result<(), ApplyError>;
    async fn truncate(
        &mut self,
        tables: &[usize],
        restart_identity: bool,
    ) -> Result<(), ApplyError>;
    fn pending_rows(&self) -> usize;
    fn pending_bytes(&self) -> usize;
    fn batch_rows(&self) -> usize;
    fn batch_bytes(&self) -> usize;
    async fn flush(&mut self) -> Result<(), ApplyError>;

    async fn close(&mut self, last: &Progress) -> Result<(), ApplyError>;
    fn closing(&self) -> bool;
    async fn complete(&mut self) -> Result<(), ApplyError>;
    fn take_committed(&mut self) -> Vec<Committed>;
    fn in_transaction(&self) -> bool;
    async fn rollback(&mut self) -> Result<(), ApplyError>;
    async fn savepoint(&mut self, name: &str) -> Result<Self::Savepoint, ApplyError>;
    async fn rollback_to(&mut self, name: &str, at: Self::Savepoint) -> Result<(), ApplyError>;

    fn progress_at(&self) -> Lsn;
    fn set_progress_at(&mut self, lsn: Lsn);
    fn one_by_one(&self) -> bool;
    fn set_one_by_one(&mut self, on: bool);
    fn stats(&self) -> ApplyStats;
    fn stats_mut(&mut self) -> &mut ApplyStats;

    async fn wal_flushed(&self) -> Result<Lsn, ApplyError>;
    async fn flush_wal(&self) -> Result<Lsn, ApplyError>;
    /// Raises the target's sequences to at least `values`; how many it raised.
    async fn raise_sequences(&self, values: &[SequenceValue]) -> Result<u64, ApplyError>;
}

impl Target for Applier {
    type Savepoint = Savepoint;

    fn table_id(&self, name: &TableName) -> Option<usize> {
        Applier::table_id(self, name)
    }

    fn meta(&self, table: usize) -> &TableMeta {
        Applier::meta(self, table)
    }

    fn check_file_identity(
        &self,
        table: usize,
        identity: ReplicaIdentity,
    ) -> Result<(), ApplyError> {
        Ok(self.files().check_identity(table, identity)?)
    }

    fn stage_file(
        &mut self,
        table: usize,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Result<(), ApplyError> {
        Ok(self.files_mut().stage(table, old, new)?)
    }

    async fn row_change(
        &mut self,
        table: usize,
        key: Key,
        op: RowOp,
        source: Source,
    ) -> Result<(), ApplyError> {
        Applier::row_change(self, table, key, op, source).await
    }

    async fn key_change(
        &mut self,
        table: usize,
        old_key: Key,
        new: Tuple,
        source: Source,
    ) -> Result<(), ApplyError> {
        Applier::key_change(self, table, old_key, new, source).await
    }

    async fn truncate(
        &mut self,
        tables: &[usize],
        restart_identity: bool,
    ) -> Result<(), ApplyError> {
        Applier::truncate(self, tables, restart_identity).await
    }

    fn pending_rows(&self) -> usize {
        Applier::pending_rows(self)
    }

    fn pending_bytes(&self) -> usize {
        Applier::pending_bytes(self)
    }

    fn batch_rows(&self) -> usize {
        Applier::batch_rows(self)
    }

    fn batch_bytes(&self) -> usize {
        Applier::batch_bytes(self)
    }

    async fn flush(&mut self) -> Result<(), ApplyError> {
        Applier::flush(self).await
    }

    async fn close(&mut self, last: &Progress) -> Result<(), ApplyError> {
        Applier::close(self, last).await
    }

    fn closing(&self) -> bool {
        Applier::closing(self)
    }

    async fn complete(&mut self) -> Result<(), ApplyError> {
        Applier::complete(self).await
    }

    fn take_committed(&mut self) -> Vec<Committed> {
        Applier::take_committed(self)
    }

    fn in_transaction(&self) -> bool {
        Applier::in_transaction(self)
    }

    async fn rollback(&mut self) -> Result<(), ApplyError> {
        Applier::rollback(self).await
    }

    async fn savepoint(&mut self, name: &str) -> Result<Savepoint, ApplyError> {
        Applier::savepoint(self, name).await
    }

    async fn rollback_to(&mut self, name: &str, at: Savepoint) -> Result<(), ApplyError> {
        Applier::rollback_to(self, name, at).await
    }

    fn progress_at(&self) -> Lsn {
        Applier::progress_at(self)
    }

    fn set_progress_at(&mut self, lsn: Lsn) {
        Applier::set_progress_at(self, lsn)
    }

    fn one_by_one(&self) -> bool {
        Applier::one_by_one(self)
    }

    fn set_one_by_one(&mut self, on: bool) {
        Applier::set_one_by_one(self, on)
    }

    fn stats(&self) -> ApplyStats {
        Applier::stats(self)
    }

    fn stats_mut(&mut self) -> &mut ApplyStats {
        Applier::stats_mut(self)
    }

    async fn wal_flushed(&self) -> Result<Lsn, ApplyError> {
        Applier::wal_flushed(self).await
    }

    async fn flush_wal(&self) -> Result<Lsn, ApplyError> {
        Applier::flush_wal(self).await
    }

    async fn raise_sequences(&self, values: &[SequenceValue]) -> Result<u64, ApplyError> {
        sequences::raise(self.client(), values)
            .await
            .map_err(|e| ApplyError::Query(QueryError::new("raising sequences", &e)))
    }
}
