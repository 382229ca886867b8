//! What a sync run keeps from one session to the next, and how a session ends.

use std::sync::Arc;

use super::SyncSummary;
use super::report::ChangeCounts;
use super::staging_schema::StagingSchema;
use crate::apply;
use crate::model::{Lag, Lsn, PgTimestamp};

/// The part of a run that survives reconnects.
pub(super) struct RunState {
    pub(super) stats: apply::ApplyStats,
    /// Apply one change at a time until production's progress passes this position.
    pub(super) one_by_one_until: Option<Lsn>,
    pub(super) last_applied: Option<Lsn>,
    /// The last position received from staging.
    pub(super) last_received: Lsn,
    pub(super) stop_lsn: Option<Lsn>,
    /// Staging's table definitions as last read, for a spool applier while staging is down.
    pub(super) staging_schema: Option<Arc<StagingSchema>>,
    /// Staging's changes applied by every session of the run.
    pub(super) changes: ChangeCounts,
    /// As last measured.
    pub(super) lag: Option<Lag>,
    /// When the last applied transaction committed on staging, and where the feed started:
    /// what lag is measured from between sessions.
    pub(super) last_commit_time: Option<PgTimestamp>,
    pub(super) feed_start: Lsn,
    /// Tables a `[[table_patterns]]` entry manages that staging created while a session ran
    /// (their shapes as created): every later session manages them, whether staging still has
    /// them or not.
    pub(super) created: Vec<crate::ddl::TableShape>,
}

impl RunState {
    pub(super) fn summary(&mut self) -> SyncSummary {
        SyncSummary {
            stats: self.stats,
            last_applied: self.last_applied,
            changes: std::mem::take(&mut self.changes),
            lag: self.lag,
        }
    }
}

pub(super) enum SessionEnd {
    Stopped,
}
