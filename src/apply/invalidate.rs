//! Cache invalidation in the transaction that applies a batch: the production keys each batch
//! changed, per table and operation, sent as `NOTIFY` payloads (tables with `notify = true`)
//! and handed to `[sync] after_batch_sql` as JSON. Both run just before the batch's COMMIT, so
//! listeners hear of a change exactly when it is committed, and of a rolled-back batch never.
//! Payload building is sans-IO.

use std::collections::{BTreeMap, HashSet};

use serde_json::{Value as Json, json};

use crate::change::Key;

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const PAYLOAD_LIMIT: usize = 7_900;

/// At most this many notifications per table, operation and batch; past it, one notification
/// says "all keys" and how many.
pub const MAX_PAYLOADS: usize = 16;

/// A table as the notifications name it.
#[derive(Clone, Debug)]
pub struct NotifiedTable {
    /// `schema.table`.
    pub name: String,
    /// Its key columns, in key order.
    pub key_columns: Vec<String>,
    /// `notify = true`.
    pub notify: bool,
}

/// The keys a batch changed, in the order it changed them.
#[derive(Debug, Default)]
pub struct Invalidations {
    changes: Vec<(usize, &'static str, Option<Key>)>,
}

impl Invalidations {
    /// `op` (insert, update, delete) of the row under production key `key` of `table`.
    pub fn record(&mut self, table: usize, op: &'static str, key: Key) {
        self.changes.push((table, op, Some(key)));
    }

    /// Every row of `table` went.
    pub fn truncated(&mut self, table: usize) {
        self.changes.push((table, "truncate", None));
    }

    /// Where a savepoint was set: rolling back to it forgets what came after.
    pub fn mark(&self) -> usize {
        self.changes.len()
    }

    pub fn rewind(&mut self, mark: usize) {
        self.changes.truncate(mark);
    }

    pub fn clear(&mut self) {
        self.changes.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Keys per (table, operation), each key once, tables and operations in a stable order.
    fn grouped(&self) -> BTreeMap<(usize, &'static str), Vec<&Key>> {
        type Keys<'a> = (Vec<&'a Key>, HashSet<&'a Key>);
        let mut groups: BTreeMap<(usize, &'static str), Keys<'_>> = BTreeMap::new();
        for (table, op, key) in &self.changes {
            let (keys, seen) = groups.entry((*table, op)).or_default();
            if let Some(key) = key
                && seen.insert(key)
            {
                keys.push(key);
            }
        }
        groups
            .into_iter()
            .map(|(group, (keys, _))| (group, keys))
            .collect()
    }

    /// The NOTIFY payloads of the tables with `notify` set.
    pub fn payloads(&self, tables: &[NotifiedTable]) -> Vec<String> {
        let mut out = Vec::new();
        for ((t, op), keys) in self.grouped() {
            let table = &tables[t];
            if !table.notify {
                continue;
            }
            out.extend(table_payloads(table, op, &keys));
        }
        out
    }

    /// Every change of the batch for `after_batch_sql`: one object per table and operation.
    pub fn as_json(&self, tables: &[NotifiedTable]) -> Json {
        Json::Array(
            self.grouped()
                .into_iter()
                .map(|((t, op), keys)| {
                    let table = &tables[t];
                    let mut object = header(table, op);
                    object.insert(
                        "keys".into(),
                        Json::Array(keys.iter().map(|k| key_json(k)).collect()),
                    );
                    Json::Object(object)
                })
                .collect(),
        )
    }
}

fn header(table: &NotifiedTable, op: &str) -> serde_json::Map<String, Json> {
    let mut object = serde_json::Map::new();
    object.insert("table".into(), Json::String(table.name.clone()));
    object.insert("op".into(), Json::String(op.into()));
    object.insert("columns".into(), json!(table.key_columns));
    object
}

fn key_json(key: &Key) -> Json {
    Json::Array(
        key.iter()
            .map(|v| match v {
                Some(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
                None => Json::Null,
            })
            .collect(),
    )
}

/// `{"table":...,"op":...,"columns":[...],` in that order, ready for the rest of a payload.
fn payload_head(table: &NotifiedTable, op: &str) -> String {
    format!(
        "{{\"table\":{},\"op\":{},\"columns\":{},",
        Json::String(table.name.clone()),
        Json::String(op.into()),
        json!(table.key_columns)
    )
}

/// One table's and operation's payloads: the keys split under the limit, or "all keys".
fn table_payloads(table: &NotifiedTable, op: &str, keys: &[&Key]) -> Vec<String> {
    let head = payload_head(table, op);
    let all_keys = || {
        let count = if op == "truncate" {
            String::new()
        } else {
            format!(",\"count\":{}", keys.len())
        };
        vec![format!("{head}\"all_keys\":true{count}}}")]
    };
    if op == "truncate" {
        return all_keys();
    }
    let start = format!("{head}\"keys\":[");
    let mut payloads = Vec::new();
    let mut current = start.clone();
    let mut in_current = 0;
    for key in keys {
        let text = key_json(key).to_string();
        if start.len() + text.len() + 2 > PAYLOAD_LIMIT {
            // One key alone does not fit.
            return all_keys();
        }
        if current.len() + text.len() + 3 > PAYLOAD_LIMIT {
            current.push_str("]}");
            payloads.push(std::mem::replace(&mut current, start.clone()));
            in_current = 0;
            if payloads.len() == MAX_PAYLOADS {
                return all_keys();
            }
        }
        if in_current > 0 {
            current.push(',');
        }
        current.push_str(&text);
        in_current += 1;
    }
    if in_current > 0 {
        current.push_str("]}");
        payloads.push(current);
    }
    payloads
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn tables() -> Vec<NotifiedTable> {
        vec![
            NotifiedTable {
                name: "public.catentry".into(),
                key_columns: vec!["catentry_id".into()],
                notify: true,
            },
            NotifiedTable {
                name: "public.audit".into(),
                key_columns: vec!["id".into()],
                notify: false,
            },
        ]
    }

    fn key(n: u64) -> Key {
        vec![Some(Bytes::from(n.to_string()))]
    }

    #[test]
    fn payloads_name_table_operation_and_keys_once_each() {
        let mut inv = Invalidations::default();
        inv.record(0, "update", key(1));
        inv.record(0, "update", key(2));
        inv.record(0, "update", key(1));
        inv.record(0, "delete", key(3));
        inv.record(1, "insert", key(9));
        let payloads = inv.payloads(&tables());
        assert_eq!(
            payloads,
            vec![
                r#"{"table":"public.catentry","op":"delete","columns":["catentry_id"],"keys":[["3"]]}"#,
                r#"{"table":"public.catentry","op":"update","columns":["catentry_id"],"keys":[["1"],["2"]]}"#,
            ]
        );
        // after_batch_sql sees every table, notify or not.
        let json = inv.as_json(&tables());
        assert_eq!(json.as_array().unwrap().len(), 3);
        assert_eq!(json[2]["table"], "public.audit");
    }

    #[test]
    fn many_keys_are_split_under_the_limit_and_too_many_become_all_keys() {
        let mut inv = Invalidations::default();
        for n in 0..2_000 {
            inv.record(0, "insert", key(1_000_000 + n));
        }
        let payloads = inv.payloads(&tables());
        assert!(payloads.len() > 1 && payloads.len() <= MAX_PAYLOADS);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() < 8_000, "{}", p.len());
            let v: Json = serde_json::from_str(p).unwrap();
            seen += v["keys"].as_array().unwrap().len();
        }
        assert_eq!(seen, 2_000, "every key in exactly one payload");

        let mut inv = Invalidations::default();
        for n in 0..100_000 {
            inv.record(0, "delete", key(n));
        }
        let payloads = inv.payloads(&tables());
        assert_eq!(payloads.len(), 1);
        let v: Json = serde_json::from_str(&payloads[0]).unwrap();
        assert_eq!(v["all_keys"], true);
        assert_eq!(v["count"], 100_000);

        let mut inv = Invalidations::default();
        inv.record(0, "insert", vec![Some(Bytes::from("x".repeat(9_000)))]);
        inv.truncated(0);
        let payloads = inv.payloads(&tables());
        assert_eq!(payloads.len(), 2);
        assert!(
            payloads.iter().all(|p| p.contains(r#""all_keys":true"#)),
            "{payloads:?}"
        );
    }

    #[test]
    fn rolling_back_to_a_mark_forgets_what_came_after() {
        let mut inv = Invalidations::default();
        inv.record(0, "insert", key(1));
        let mark = inv.mark();
        inv.record(0, "insert", key(2));
        inv.rewind(mark);
        assert_eq!(inv.payloads(&tables()).len(), 1);
        assert!(inv.payloads(&tables())[0].contains(r#"[["1"]]"#));
        inv.clear();
        assert!(inv.is_empty());
    }
}
