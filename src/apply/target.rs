//! The seam between the pipeline and a target. The pipeline decides: which staging
//! transactions a batch holds and when it commits, what the target already has, the order
//! streamed transactions commit in, aborts. A [`Target`] carries that out and keeps what only
//! it knows: its tables' shapes, how large its open batch is, how far it is durable.
//! Production's session ([`super::Applier`]), a dry run and the pipeline's test recorder
//! implement it.

use super::shape::{RowChange, key_of};
use super::{ApplyError, ApplyStats, Committed};
use crate::catalog::sequences::SequenceValue;
use crate::change::{RowOp, Source, StagingChange};
use crate::ddl::{Plan, SchemaChange};
use crate::model::{Lsn, Oid, Relation};
use crate::pg::QueryError;
use crate::repair::AtHigh;
use crate::state::Progress;

/// One target session with at most one open transaction.
pub trait Target {
    /// What rolling back to a savepoint restores.
    type Savepoint: Copy;

    /// Staging's shape of managed table `table` (its index in `[[tables]]`), each column's
    /// type as staging names it: the target maps it onto its own table, or refuses a column it
    /// lacks or cannot store (`ApplyError::Types`).
    async fn relation(
        &mut self,
        relation: &Relation,
        table: usize,
        column_types: &[String],
    ) -> Result<(), ApplyError>;

    /// One of staging's row changes of `relation`, into the open transaction (opened as
    /// needed). A large transaction is sent on in pieces as it grows.
    async fn write(
        &mut self,
        relation: Oid,
        change: StagingChange,
        source: Source,
    ) -> Result<(), ApplyError>;

    /// A schema change staging captured, in its place among the row changes: `apply` runs its
    /// plan in the open transaction; otherwise the plan is only made (to show it). The plans,
    /// one per managed table it touches.
    async fn schema_change(
        &mut self,
        change: &SchemaChange,
        source: Source,
        apply: bool,
    ) -> Result<Vec<Plan>, ApplyError>;

    /// A repair chunk at its high watermark, after everything written before it: applied (or
    /// recorded interrupted) in the open transaction, with its outcome.
    async fn repair_chunk(&mut self, at: AtHigh, source: Source) -> Result<(), ApplyError>;

    /// A seeding repair of `tables` (config names) starts (`on`) or ends, in its place in the
    /// stream: while seeding, their conflicts are the seed's to settle. Its end is noted on the
    /// target (repair `repair`) in the open transaction.
    async fn seeding(
        &mut self,
        repair: i64,
        tables: &[String],
        on: bool,
        source: Source,
    ) -> Result<(), ApplyError>;

    /// TRUNCATE of managed tables, after everything written before it.
    async fn truncate(
        &mut self,
        tables: &[usize],
        restart_identity: bool,
    ) -> Result<(), ApplyError>;

    /// Whether the open batch reached a limit of its size (`batch_max_rows`,
    /// `batch_max_bytes`).
    fn batch_full(&self) -> bool;

    /// Ends the open batch, `last` being its last staging transaction, whose end position the
    /// target stores in the same transaction as the rows (the exactly-once record). Sent now;
    /// committed by [`Target::complete`] or when the next batch needs the session.
    async fn commit(&mut self, last: &Progress) -> Result<(), ApplyError>;
    /// Whether a batch is sent and not known committed yet.
    fn committing(&self) -> bool;
    /// Waits for the batch sent to commit.
    async fn complete(&mut self) -> Result<(), ApplyError>;
    /// The batches committed since last asked, oldest first.
    fn take_committed(&mut self) -> Vec<Committed>;
    /// Where the target's progress row stands, as this session last wrote or was told.
    fn progress_at(&self) -> Lsn;
    /// Another session of the same target moved the progress row to `lsn`.
    fn set_progress_at(&mut self, lsn: Lsn);

    /// Discards the open transaction.
    async fn rollback(&mut self) -> Result<(), ApplyError>;
    /// A point a streamed subtransaction can roll back to.
    async fn savepoint(&mut self, name: &str) -> Result<Self::Savepoint, ApplyError>;
    async fn rollback_to(&mut self, name: &str, at: Self::Savepoint) -> Result<(), ApplyError>;

    /// How far the target's commits are durable (its WAL position flushed); with `flush_now`
    /// it flushes first instead of waiting for its WAL writer.
    async fn durable(&self, flush_now: bool) -> Result<Lsn, ApplyError>;

    /// Raises the target's identity sequences to at least `values`, between transactions
    /// (none is raised while one is open); how many it raised.
    async fn follow_sequences(&mut self, values: &[SequenceValue]) -> Result<u64, ApplyError>;
    /// Applies every change on its own, to find the one a set-based statement tripped on.
    fn set_one_by_one(&mut self, on: bool);
    fn stats(&self) -> ApplyStats;
    fn stats_mut(&mut self) -> &mut ApplyStats;
}

impl Target for super::Applier {
    type Savepoint = super::Savepoint;

    async fn relation(
        &mut self,
        relation: &Relation,
        table: usize,
        column_types: &[String],
    ) -> Result<(), ApplyError> {
        let learned = self
            .shapes
            .learn(relation, table, &self.tables[table].meta, column_types);
        if learned.is_err() {
            // Another session of this sync may have applied a schema change since this one
            // read the table: read it again before refusing.
            let name = self.tables[table].meta.table_name();
            if let Some(meta) = crate::catalog::load_table(&self.client, &name)
                .await
                .map_err(super::error::query_error("reading a table"))?
            {
                self.tables[table].meta = meta;
            }
            self.shapes
                .learn(relation, table, &self.tables[table].meta, column_types)?;
        }
        Ok(self
            .files
            .check_identity(table, relation.replica_identity)?)
    }

    async fn write(
        &mut self,
        relation: Oid,
        change: StagingChange,
        source: Source,
    ) -> Result<(), ApplyError> {
        let (table, change) = self.shapes.rearrange(relation, change)?;
        let keyless = self.tables[table].meta.key.is_empty();
        match change {
            RowChange::Insert(new) => {
                self.files.stage(table, None, Some(&new))?;
                if keyless {
                    self.keyless_change(table, None, Some(new), source).await?;
                } else {
                    let key = key_of(&self.tables[table].meta, &new)?;
                    self.row_change(table, key, RowOp::Insert(new), source)
                        .await?;
                }
            }
            RowChange::Update(old, new) if keyless => {
                let Some(old) = old else {
                    return Err(ApplyError::Schema(format!(
                        "an UPDATE of {}, which has no key, came without its old row (is its \
                         replica identity still FULL on staging?)",
                        self.tables[table].meta.table_name()
                    )));
                };
                self.files.stage(table, Some(&old), Some(&new))?;
                self.keyless_change(table, Some(old), Some(new), source)
                    .await?;
            }
            RowChange::Update(old, new) => {
                let meta = &self.tables[table].meta;
                let new_key = key_of(meta, &new)?;
                let old_key = old.as_ref().map(|old| key_of(meta, old)).transpose()?;
                self.files.stage(table, old.as_ref(), Some(&new))?;
                match old_key {
                    Some(old_key) if old_key != new_key => {
                        self.key_change(table, old_key, new, source).await?
                    }
                    _ => {
                        self.row_change(table, new_key, RowOp::Update(new), source)
                            .await?
                    }
                }
            }
            RowChange::Delete(old) => {
                self.files.stage(table, Some(&old), None)?;
                if keyless {
                    self.keyless_change(table, Some(old), None, source).await?;
                } else {
                    let key = key_of(&self.tables[table].meta, &old)?;
                    self.row_change(table, key, RowOp::Delete, source).await?;
                }
            }
        }
        // Bounded memory: a large transaction is sent in pieces inside the open transaction.
        if self.pending_rows >= self.limits.0 || self.pending_bytes() >= self.limits.1 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn schema_change(
        &mut self,
        change: &SchemaChange,
        source: Source,
        apply: bool,
    ) -> Result<Vec<Plan>, ApplyError> {
        if apply {
            self.apply_schema_change(change, source).await
        } else {
            self.plan_schema_change(change, source)
        }
    }

    async fn repair_chunk(&mut self, at: AtHigh, source: Source) -> Result<(), ApplyError> {
        super::Applier::repair_chunk(self, at, source).await
    }

    async fn seeding(
        &mut self,
        repair: i64,
        tables: &[String],
        on: bool,
        source: Source,
    ) -> Result<(), ApplyError> {
        super::Applier::seeding(self, repair, tables, on, source).await
    }

    async fn truncate(
        &mut self,
        tables: &[usize],
        restart_identity: bool,
    ) -> Result<(), ApplyError> {
        super::Applier::truncate(self, tables, restart_identity).await
    }

    fn batch_full(&self) -> bool {
        self.sent_rows + self.pending_rows >= self.limits.0
            || self.sent_bytes + self.pending_bytes() >= self.limits.1
    }

    async fn commit(&mut self, last: &Progress) -> Result<(), ApplyError> {
        self.close(last).await
    }

    fn committing(&self) -> bool {
        self.closing.is_some()
    }

    async fn complete(&mut self) -> Result<(), ApplyError> {
        super::Applier::complete(self).await
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
        super::Applier::rollback(self).await
    }

    async fn savepoint(&mut self, name: &str) -> Result<Self::Savepoint, ApplyError> {
        super::Applier::savepoint(self, name).await
    }

    async fn rollback_to(&mut self, name: &str, at: Self::Savepoint) -> Result<(), ApplyError> {
        super::Applier::rollback_to(self, name, at).await
    }

    async fn durable(&self, flush_now: bool) -> Result<Lsn, ApplyError> {
        if flush_now {
            self.flush_wal().await
        } else {
            self.wal_flushed().await
        }
    }

    async fn follow_sequences(&mut self, values: &[SequenceValue]) -> Result<u64, ApplyError> {
        if self.in_transaction {
            return Ok(0);
        }
        crate::catalog::sequences::raise(&self.client, values)
            .await
            .map_err(|e| ApplyError::Query(QueryError::new("raising sequences", &e)))
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
}
