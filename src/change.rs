//! The net effect of a run of row changes, per table and key (sans-IO). Consecutive changes to
//! the same row are consolidated when the end state is the same (insert + update = insert of the
//! updated row, update + delete = delete, delete + insert = replace, ...), so production receives
//! one set-based statement per table, operation and column set instead of one per change. A
//! combination with no single equivalent (a change after a delete that is not an insert, say)
//! asks the caller to apply what is pending first, which keeps the result identical to applying
//! every change in order.

use std::collections::HashMap;

use bytes::Bytes;

use crate::model::{Lsn, Tuple, Value, Xid};

/// Where a change came from, for conflict reports and the quarantine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub lsn: Lsn,
    pub xid: Xid,
}

/// A row's key as staging sent it (text values of the production key columns, in key order).
pub type Key = Vec<Option<Bytes>>;

/// One of staging's row changes as pgoutput sends it, in staging's column order: what the
/// pipeline hands a target, which rearranges it into its own columns.
#[derive(Clone, Debug)]
pub enum StagingChange {
    Insert {
        new: Tuple,
    },
    /// `old`: the old key or the whole old row, when staging sent either.
    Update {
        old: Option<Tuple>,
        new: Tuple,
    },
    /// `old`: the old key, or the whole old row.
    Delete {
        old: Tuple,
    },
}

/// The consolidated change of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetChange {
    /// A new row: every column present.
    Insert(Tuple),
    /// Changed columns; `Value::UnchangedToast` marks columns to leave as they are.
    Update(Tuple),
    Delete,
    /// Deleted, then inserted again with this full row.
    Replace(Tuple),
}

/// One incoming change of a row.
#[derive(Clone, Debug)]
pub enum RowOp {
    Insert(Tuple),
    Update(Tuple),
    Delete,
}

/// The caller must apply what is pending before this change can be taken; it is handed back.
#[derive(Debug)]
pub struct NeedsFlush {
    pub key: Key,
    pub op: RowOp,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub key: Key,
    pub change: NetChange,
    pub source: Source,
}

/// Pending net changes of one table, in first-change order.
#[derive(Debug, Default)]
pub struct TableChanges {
    index: HashMap<Key, usize>,
    entries: Vec<Option<Entry>>,
    live: usize,
}

/// `new` over `old`: columns `new` left unchanged keep `old`'s value.
fn overlay(old: &Tuple, new: Tuple) -> Tuple {
    new.into_iter()
        .zip(old)
        .map(|(n, o)| match n {
            Value::UnchangedToast => o.clone(),
            other => other,
        })
        .collect()
}

fn tuple_bytes(t: &Tuple) -> usize {
    t.iter()
        .map(|v| match v {
            Value::Text(b) | Value::Binary(b) => b.len() + 8,
            _ => 8,
        })
        .sum()
}

impl TableChanges {
    /// Takes one change. Returns the change in byte size of what is pending.
    pub fn absorb(&mut self, key: Key, op: RowOp, source: Source) -> Result<isize, NeedsFlush> {
        let slot = self.index.get(&key).copied();
        let existing = slot.and_then(|i| self.entries[i].take());
        let before = existing.as_ref().map_or(0, |e| change_bytes(&e.change)) as isize;
        let (existing, existing_source) = match existing {
            Some(e) => (Some(e.change), e.source),
            None => (None, source),
        };
        let merged = match (existing, op) {
            (None, RowOp::Insert(r)) => Some(NetChange::Insert(r)),
            (None, RowOp::Update(r)) => Some(NetChange::Update(r)),
            (None, RowOp::Delete) => Some(NetChange::Delete),
            (Some(NetChange::Insert(a)), RowOp::Update(b)) => {
                Some(NetChange::Insert(overlay(&a, b)))
            }
            // Inserted and deleted within the run: production never needs to see it.
            (Some(NetChange::Insert(_)), RowOp::Delete) => None,
            (Some(NetChange::Update(a)), RowOp::Update(b)) => {
                Some(NetChange::Update(overlay(&a, b)))
            }
            (Some(NetChange::Update(_)), RowOp::Delete) => Some(NetChange::Delete),
            (Some(NetChange::Delete), RowOp::Insert(r)) => Some(NetChange::Replace(r)),
            (Some(NetChange::Replace(a)), RowOp::Update(b)) => {
                Some(NetChange::Replace(overlay(&a, b)))
            }
            (Some(NetChange::Replace(_)), RowOp::Delete) => Some(NetChange::Delete),
            (Some(previous), op) => {
                // No single equivalent: put it back and let the caller apply what is pending.
                let i = slot.expect("existing entries have a slot");
                self.entries[i] = Some(Entry {
                    key: key.clone(),
                    change: previous,
                    source: existing_source,
                });
                return Err(NeedsFlush { key, op });
            }
        };
        let after = merged.as_ref().map_or(0, change_bytes) as isize;
        match (slot, merged) {
            (Some(i), Some(change)) => {
                self.entries[i] = Some(Entry {
                    key,
                    change,
                    source,
                })
            }
            (Some(_), None) => {
                self.index.remove(&key);
                self.live -= 1;
            }
            (None, Some(change)) => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push(Some(Entry {
                    key,
                    change,
                    source,
                }));
                self.live += 1;
            }
            (None, None) => {}
        }
        Ok(after - before)
    }

    /// Rows with a pending change.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The pending changes in first-change order, leaving this empty.
    pub fn drain(&mut self) -> Vec<Entry> {
        self.index.clear();
        self.live = 0;
        self.entries.drain(..).flatten().collect()
    }
}

fn change_bytes(change: &NetChange) -> usize {
    match change {
        NetChange::Insert(t) | NetChange::Update(t) | NetChange::Replace(t) => tuple_bytes(t),
        NetChange::Delete => 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn key(k: &str) -> Key {
        vec![Some(Bytes::copy_from_slice(k.as_bytes()))]
    }

    fn src(lsn: u64) -> Source {
        Source {
            lsn: Lsn(lsn),
            xid: 1,
        }
    }

    #[test]
    fn consolidates_changes_of_one_row() {
        let mut t = TableChanges::default();
        t.absorb(
            key("1"),
            RowOp::Insert(vec![text("1"), text("a"), text("x")]),
            src(1),
        )
        .unwrap();
        t.absorb(
            key("1"),
            RowOp::Update(vec![text("1"), text("b"), Value::UnchangedToast]),
            src(2),
        )
        .unwrap();
        t.absorb(
            key("2"),
            RowOp::Update(vec![text("2"), Value::UnchangedToast, text("y")]),
            src(3),
        )
        .unwrap();
        t.absorb(
            key("2"),
            RowOp::Update(vec![text("2"), text("c"), Value::UnchangedToast]),
            src(4),
        )
        .unwrap();
        t.absorb(key("3"), RowOp::Delete, src(5)).unwrap();
        t.absorb(
            key("3"),
            RowOp::Insert(vec![text("3"), text("d"), text("z")]),
            src(6),
        )
        .unwrap();
        t.absorb(
            key("4"),
            RowOp::Insert(vec![text("4"), text("e"), text("w")]),
            src(7),
        )
        .unwrap();
        t.absorb(key("4"), RowOp::Delete, src(8)).unwrap();
        assert_eq!(t.len(), 3);
        let entries = t.drain();
        assert!(t.is_empty());
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].change,
            NetChange::Insert(vec![text("1"), text("b"), text("x")])
        );
        assert_eq!(entries[0].source, src(2));
        assert_eq!(
            entries[1].change,
            NetChange::Update(vec![text("2"), text("c"), text("y")])
        );
        assert_eq!(
            entries[2].change,
            NetChange::Replace(vec![text("3"), text("d"), text("z")])
        );
    }

    #[test]
    fn asks_for_a_flush_when_there_is_no_equivalent() {
        let mut t = TableChanges::default();
        t.absorb(key("1"), RowOp::Delete, src(1)).unwrap();
        let rejected = t
            .absorb(key("1"), RowOp::Update(vec![text("1")]), src(2))
            .unwrap_err();
        assert_eq!(rejected.key, key("1"));
        assert!(matches!(rejected.op, RowOp::Update(_)));
        // The pending delete is still there, with its own source.
        let pending = t.drain();
        assert_eq!(pending[0].change, NetChange::Delete);
        assert_eq!(pending[0].source, src(1));
        t.absorb(key("1"), RowOp::Insert(vec![text("1")]), src(3))
            .unwrap();
        assert!(
            t.absorb(key("1"), RowOp::Insert(vec![text("1")]), src(4))
                .is_err()
        );
    }

    #[test]
    fn tracks_pending_bytes() {
        let mut t = TableChanges::default();
        let grow = t
            .absorb(
                key("1"),
                RowOp::Insert(vec![text("1"), text("abcd")]),
                src(1),
            )
            .unwrap();
        assert_eq!(grow, (1 + 8 + 4 + 8) as isize);
        let shrink = t.absorb(key("1"), RowOp::Delete, src(2)).unwrap();
        assert_eq!(shrink, -grow);
    }
}
