//! Resuming a copy into production that failed while loading piece by piece. Every committed
//! piece was recorded with its snapshot position (`stagingprop.copy_tables`); a table all of
//! whose pieces are in is kept, the others are emptied and loaded again from a new snapshot.
//! The hand-off stays the first run's position (the sync slot has not moved since), and sync
//! skips, in each table loaded later, the changes its later snapshot already holds. Not with
//! key rules that allocate keys (a later snapshot would map keys apart from the kept tables'),
//! and, when the target checks foreign keys, only whole groups of linked tables are kept.

use tokio_postgres::Client;

use super::{CopyError, db_error};
use crate::catalog::TableMeta;
use crate::config::{KeyRule, TableConfig};
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::state;

/// What the resumption looks at.
pub(super) struct Found<'a> {
    pub configs: &'a [&'a TableConfig],
    pub metas: &'a [TableMeta],
    pub groups: &'a [Vec<usize>],
    /// (child, parent) foreign keys among the copied tables.
    pub edges: &'a [(usize, usize)],
    /// The target checks foreign keys on load.
    pub checked: bool,
}

/// How a copy resumes what an earlier run left.
#[derive(Debug)]
pub(super) struct Resume {
    keep: Vec<bool>,
    /// Tables holding rows of the earlier run that load again: emptied first.
    empty: Vec<usize>,
    /// When tables are kept: the earlier run's snapshot position, the hand-off.
    pub kept_handoff: Option<Lsn>,
}

impl Resume {
    /// Table `i` is complete from the earlier run and is not loaded again.
    pub fn keeps(&self, i: usize) -> bool {
        self.keep[i]
    }

    /// Table `i` holds rows the resumption accounts for (kept, or emptied).
    pub fn handles(&self, i: usize) -> bool {
        self.keep[i] || self.empty.contains(&i)
    }

    /// Empties the tables the earlier run left incomplete and forgets their pieces, in one
    /// transaction.
    pub async fn empty_the_rest(
        &self,
        t: &Client,
        target: &Endpoint,
        slot: &str,
        metas: &[TableMeta],
    ) -> Result<(), CopyError> {
        let reloaded: Vec<_> = (0..metas.len())
            .filter(|&i| !self.keep[i])
            .map(|i| metas[i].table_name())
            .collect();
        t.batch_execute("BEGIN")
            .await
            .map_err(db_error(target, "BEGIN"))?;
        if !self.empty.is_empty() {
            let list: Vec<String> = self.empty.iter().map(|&i| metas[i].qualified()).collect();
            t.batch_execute(&format!("TRUNCATE {}", list.join(", ")))
                .await
                .map_err(db_error(
                    target,
                    "emptying the tables the interrupted copy left incomplete",
                ))?;
        }
        state::copy_tables::forget(t, slot, Some(&reloaded))
            .await
            .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
        t.batch_execute("COMMIT")
            .await
            .map_err(db_error(target, "COMMIT"))?;
        Ok(())
    }
}

/// The resumption of an interrupted copy into `slot`'s target, or `None` when there is none to
/// resume (the target's progress row does not say "copy in progress", or nothing was recorded).
pub(super) async fn find(
    found: &Found<'_>,
    slot: &str,
    for_stream: bool,
    (s, source): (&Client, &Endpoint),
    (t, target): (&Client, &Endpoint),
) -> Result<Option<Resume>, CopyError> {
    let refused =
        |e: state::StateError| CopyError::Refused(format!("on {}: {e}", target.describe()));
    let progress = state::progress::read(t, slot).await.map_err(refused)?;
    if !progress.is_some_and(|p| p.is_copy_in_progress()) {
        return Ok(None);
    }
    let pieces = state::copy_tables::read(t, slot).await.map_err(refused)?;
    if pieces.is_empty() {
        return Ok(None);
    }
    let count = found.metas.len();
    let names: Vec<_> = found.metas.iter().map(|m| m.table_name()).collect();
    let ours: Vec<bool> = names
        .iter()
        .map(|n| pieces.iter().any(|p| &p.table == n))
        .collect();
    let mut has_rows = vec![false; count];
    for (i, meta) in found.metas.iter().enumerate() {
        has_rows[i] = t
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", meta.qualified()),
                &[],
            )
            .await
            .map_err(db_error(target, "checking target tables"))?
            .get(0);
    }
    let complete = state::copy_tables::complete(&pieces);
    let mut keep: Vec<bool> = names.iter().map(|n| complete.contains_key(n)).collect();
    let allocating: Vec<String> = found
        .configs
        .iter()
        .filter(|c| !matches!(c.key, KeyRule::Identity | KeyRule::Offset { .. }))
        .map(|c| c.name.to_string())
        .collect();
    if !allocating.is_empty() && keep.iter().any(|&k| k) {
        tracing::warn!(
            tables = %allocating.join(", "),
            "the interrupted copy's complete tables are loaded again: with key rules that allocate keys, tables of two snapshots would map keys apart"
        );
        keep.fill(false);
    }
    if found.checked {
        // The target checks foreign keys: a group is kept whole or loaded again whole.
        for group in found.groups {
            if group.iter().any(|&i| !keep[i]) {
                for &i in group {
                    keep[i] = false;
                }
            }
        }
    }
    // A table emptied again cannot be truncated under a kept table referring to it.
    loop {
        let mut changed = false;
        for &(child, parent) in found.edges {
            if keep[child] && !keep[parent] && has_rows[parent] {
                keep[child] = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut kept_handoff = (0..count)
        .filter(|&i| keep[i])
        .map(|i| complete[&names[i]])
        .min();
    if let (Some(at), false) = (kept_handoff, for_stream) {
        // The sync slot the earlier run created must still stand at (or before) its snapshot.
        let row = s
            .query_opt(
                "SELECT confirmed_flush_lsn::text, wal_status, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(db_error(source, "reading pg_replication_slots"))?;
        let usable = match &row {
            None => Some("it no longer exists"),
            Some(row) => {
                let confirmed: Option<String> = row.get(0);
                let wal_status: Option<String> = row.get(1);
                let active: bool = row.get(2);
                if active {
                    return Err(CopyError::Refused(format!(
                        "the slot {slot} is in use (is sync running?); stop it before resuming the copy"
                    )));
                }
                let confirmed = confirmed.and_then(|c| c.parse::<Lsn>().ok());
                if wal_status.as_deref() == Some("lost") {
                    Some("it was invalidated")
                } else if confirmed.is_none_or(|c| c > at) {
                    Some("it moved past the interrupted copy's snapshot")
                } else {
                    None
                }
            }
        };
        if let Some(why) = usable {
            tracing::warn!(slot = %slot, "the interrupted copy's complete tables are loaded again: the slot {slot} cannot hand off after their snapshot ({why})");
            keep.fill(false);
            kept_handoff = None;
        }
    }
    let empty: Vec<usize> = (0..count)
        .filter(|&i| !keep[i] && has_rows[i] && ours[i])
        .collect();
    let list = |pick: &dyn Fn(usize) -> bool| {
        (0..count)
            .filter(|&i| pick(i))
            .map(|i| names[i].to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    tracing::info!(
        kept = %list(&|i| keep[i]),
        emptied = %list(&|i| empty.contains(&i)),
        "resuming the interrupted copy: complete tables stay, the others load again"
    );
    Ok(Some(Resume {
        keep,
        empty,
        kept_handoff,
    }))
}
