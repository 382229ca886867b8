//! `stagingprop tail`: prints staging's decoded changes as JSON lines, a debugging aid like
//! pg_recvlogical. By default it reads a temporary slot, so it never moves the real one; with
//! `--slot` it reads a named slot and never confirms anything, so the slot stays where it was.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

use super::OpsError;
use crate::catalog::{self, TableMeta};
use crate::config::{Config, TableName};
use crate::model::{Column, Lsn, Oid, OldTuple, PgTimestamp, Relation, Value, Xid};
use crate::pg::connect::Endpoint;
use crate::pg::replication::{PgOutputOptions, ReplicationClient, SnapshotAction};
use crate::pgoutput::{Decoder, LogicalMessage};
use crate::remap::Remapper;

#[derive(Clone, Debug, Default)]
pub struct TailOptions {
    /// Read this existing slot (without confirming) instead of a temporary one.
    pub slot: Option<String>,
    pub publication: String,
    /// Stop after this many changes.
    pub limit: Option<u64>,
    /// Stop when nothing arrived for this long.
    pub idle_exit: Option<Duration>,
    /// Also write every raw pgoutput payload to this file as `[u32 length][payload]` records
    /// (the decode benchmark replays such recordings).
    pub record: Option<PathBuf>,
    /// Also print each change's key on production (`mapped_key`), translated by this
    /// configuration's key rules through production's key map.
    pub mapped: Option<Config>,
}

/// Translates staging keys into production's, for `--mapped`.
struct KeyTranslator {
    production: tokio_postgres::Client,
    target: String,
    remapper: Option<Remapper>,
    tables: HashMap<TableName, usize>,
    /// Production's tables, in config order.
    metas: Vec<TableMeta>,
}

impl KeyTranslator {
    async fn connect(config: &Config) -> Result<KeyTranslator, OpsError> {
        let staging = Endpoint::from_db_config(&config.staging)?;
        let production = Endpoint::from_db_config(&config.production)?;
        let s = super::connect(&staging).await?;
        let p = super::connect(&production).await?;
        let query_error = |endpoint: &Endpoint| {
            let target = endpoint.describe();
            move |e: tokio_postgres::Error| OpsError::Query {
                target,
                source: crate::pg::QueryError::new("reading table definitions", &e),
            }
        };
        let mut metas = Vec::with_capacity(config.tables.len());
        for table in &config.tables {
            let meta = catalog::load_table(&p, &table.name)
                .await
                .map_err(query_error(&production))?
                .ok_or_else(|| {
                    OpsError::Refused(format!("production has no table {}", table.name))
                })?;
            metas.push(meta);
        }
        let declared = catalog::column_references(&s)
            .await
            .map_err(query_error(&staging))?;
        let remapper = Remapper::new(config, &metas, &declared).map_err(|problems| {
            OpsError::Refused(format!(
                "key remapping cannot work with these tables:\n  - {}",
                problems.join("\n  - ")
            ))
        })?;
        Ok(KeyTranslator {
            production: p,
            target: production.describe(),
            remapper,
            tables: config
                .tables
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            metas,
        })
    }

    /// Production's key of a row staging keys with `tuple` (columns of `rel`): a JSON object of
    /// the key columns, `null` for a key no mapping covers. `None` for unmanaged tables.
    async fn mapped_key(
        &mut self,
        rel: &Relation,
        tuple: &[Value],
    ) -> Result<Option<serde_json::Value>, OpsError> {
        let name = TableName::new(rel.namespace.clone(), rel.name.clone());
        let Some(&t) = self.tables.get(&name) else {
            return Ok(None);
        };
        let meta = &self.metas[t];
        let mut key = serde_json::Map::new();
        for &k in &meta.key {
            let column = &meta.columns[k].name;
            let value =
                rel.columns
                    .iter()
                    .position(|c| &c.name == column)
                    .and_then(|i| match &tuple[i] {
                        Value::Text(b) => Some(b.clone()),
                        _ => None,
                    });
            let Some(value) = value else {
                key.insert(column.clone(), serde_json::Value::Null);
                continue;
            };
            let text = String::from_utf8_lossy(&value).into_owned();
            let translated = match (&mut self.remapper, text.trim().parse::<i64>()) {
                (Some(remapper), Ok(number)) => remapper
                    .production_value(&self.production, t, k, number)
                    .await
                    .map_err(|e| OpsError::Refused(format!("on {}: {e}", self.target)))?
                    .map(|v| serde_json::Value::String(v.to_string()))
                    .unwrap_or(serde_json::Value::Null),
                _ => serde_json::Value::String(text),
            };
            key.insert(column.clone(), translated);
        }
        Ok(Some(serde_json::Value::Object(key)))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TailSummary {
    pub changes: u64,
    pub transactions: u64,
}

/// The transaction a change belongs to, from its Begin message.
#[derive(Clone, Copy, Debug)]
struct TxnContext {
    xid: Xid,
    commit_lsn: Lsn,
    commit_time: PgTimestamp,
}

/// Prints the spool's records in `dir` as the same JSON lines, oldest first, up to `limit`
/// changes; returns at the end of the spool.
pub fn tail_spool<W: Write>(
    dir: &std::path::Path,
    limit: Option<u64>,
    out: &mut W,
) -> Result<TailSummary, OpsError> {
    let mut reader = crate::spool::store::SpoolReader::open(dir, Lsn::INVALID)?;
    let mut printer = Printer::default();
    while let Some((lsn, message)) = reader.next_message()? {
        if limit.is_some_and(|limit| printer.summary.changes >= limit) {
            break;
        }
        printer.take(lsn, message, None, out)?;
    }
    out.flush()?;
    Ok(printer.summary)
}

/// Turns messages into JSON lines: the relations described so far, the open transaction, and
/// what was printed.
#[derive(Default)]
struct Printer {
    relations: HashMap<Oid, Relation>,
    txn: Option<TxnContext>,
    summary: TailSummary,
}

impl Printer {
    /// Takes one message; a change becomes a line (`mapped`: its key on production).
    fn take<W: Write>(
        &mut self,
        lsn: Lsn,
        message: LogicalMessage,
        mapped: Option<serde_json::Value>,
        out: &mut W,
    ) -> Result<(), OpsError> {
        match message {
            LogicalMessage::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.txn = Some(TxnContext {
                    xid,
                    commit_lsn: final_lsn,
                    commit_time,
                })
            }
            LogicalMessage::Commit { .. } => {
                self.txn = None;
                self.summary.transactions += 1;
                out.flush()?;
            }
            LogicalMessage::Relation { relation, .. } => {
                self.relations.insert(relation.oid, relation);
            }
            other => {
                if let Some(line) =
                    change_line(lsn, self.txn.as_ref(), &self.relations, &other, mapped)?
                {
                    out.write_all(line.as_bytes())?;
                    out.write_all(b"\n")?;
                    self.summary.changes += 1;
                }
            }
        }
        Ok(())
    }
}

pub async fn tail<W, S>(
    staging: &Endpoint,
    options: &TailOptions,
    out: &mut W,
    shutdown: S,
) -> Result<TailSummary, OpsError>
where
    W: Write,
    S: Future<Output = ()>,
{
    let mut client = ReplicationClient::connect(staging).await?;
    let slot = match &options.slot {
        Some(slot) => slot.clone(),
        None => {
            let name = format!("stagingprop_tail_{}", std::process::id());
            client
                .create_logical_slot(&name, true, SnapshotAction::Nothing, false)
                .await?;
            name
        }
    };
    let pgoutput = PgOutputOptions::new(vec![options.publication.clone()]);
    let mut stream = client.start_logical(&slot, Lsn::INVALID, &pgoutput).await?;
    tracing::info!(
        slot = %slot,
        temporary = options.slot.is_none(),
        publication = %options.publication,
        "streaming changes from {}; nothing is confirmed, the slot does not move",
        staging.describe()
    );
    let mut recorder = match &options.record {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };

    let mut translator = match &options.mapped {
        Some(config) => Some(KeyTranslator::connect(config).await?),
        None => None,
    };
    let mut decoder = Decoder::new();
    let mut printer = Printer::default();
    let idle = options
        .idle_exit
        .unwrap_or(Duration::from_secs(u64::MAX / 4));
    tokio::pin!(shutdown);
    let result = loop {
        if options
            .limit
            .is_some_and(|limit| printer.summary.changes >= limit)
        {
            break Ok(());
        }
        let raw = tokio::select! {
            raw = tokio::time::timeout(idle, stream.next_raw()) => match raw {
                Err(_) => break Ok(()),
                Ok(Err(e)) => break Err(OpsError::from(e)),
                Ok(Ok(None)) => break Ok(()),
                Ok(Ok(Some(raw))) => raw,
            },
            _ = &mut shutdown => break Ok(()),
        };
        if let Some(recorder) = recorder.as_mut() {
            recorder.write_all(&(raw.payload.len() as u32).to_be_bytes())?;
            recorder.write_all(&raw.payload)?;
        }
        let message = match decoder.decode(raw.payload) {
            Ok(m) => m,
            Err(source) => {
                break Err(OpsError::Replication(
                    crate::pg::replication::ReplicationError::Decode {
                        target: staging.describe(),
                        lsn: raw.wal_start,
                        source,
                    },
                ));
            }
        };
        let mapped = match (&mut translator, key_tuple(&message)) {
            (Some(translator), Some((oid, tuple))) => match printer.relations.get(&oid) {
                Some(rel) if rel.columns.len() == tuple.len() => {
                    translator.mapped_key(rel, tuple).await?
                }
                _ => None,
            },
            _ => None,
        };
        printer.take(raw.wal_start, message, mapped, out)?;
    };
    out.flush()?;
    if let Some(mut recorder) = recorder {
        recorder.flush()?;
    }
    let closed = stream.close().await;
    result?;
    closed?;
    Ok(printer.summary)
}

/// The relation and the tuple holding the key of a row change.
fn key_tuple(message: &LogicalMessage) -> Option<(Oid, &[Value])> {
    match message {
        LogicalMessage::Insert { relation, new, .. } => Some((*relation, new)),
        LogicalMessage::Update {
            relation, old, new, ..
        } => Some((*relation, old.as_ref().map_or(&new[..], |o| o.tuple()))),
        LogicalMessage::Delete { relation, old, .. } => Some((*relation, old.tuple())),
        _ => None,
    }
}

/// One JSON line for a change, or `None` for messages that are not changes (Type, Origin, ...).
fn change_line(
    lsn: Lsn,
    txn: Option<&TxnContext>,
    relations: &HashMap<Oid, Relation>,
    message: &LogicalMessage,
    mapped_key: Option<serde_json::Value>,
) -> Result<Option<String>, OpsError> {
    let relation = |oid: &Oid| {
        relations.get(oid).ok_or_else(|| {
            OpsError::Refused(format!(
                "change at {lsn} refers to relation {oid}, which no Relation message described"
            ))
        })
    };
    let mut line = ChangeLine {
        lsn,
        xid: txn.map(|t| t.xid),
        commit_lsn: txn.map(|t| t.commit_lsn),
        commit_time: txn.map(|t| t.commit_time.to_string()),
        table: None,
        op: "",
        key: None,
        mapped_key,
        new: None,
        old: None,
        tables: None,
        cascade: None,
        restart_identity: None,
        transactional: None,
        prefix: None,
        content: None,
    };
    match message {
        LogicalMessage::Insert {
            relation: oid, new, ..
        } => {
            let rel = relation(oid)?;
            check_width(rel, new, lsn)?;
            line.table = Some(rel.qualified_name());
            line.op = "insert";
            line.key = Some(Row::keys(&rel.columns, new));
            line.new = Some(Row::all(&rel.columns, new));
        }
        LogicalMessage::Update {
            relation: oid,
            old,
            new,
            ..
        } => {
            let rel = relation(oid)?;
            check_width(rel, new, lsn)?;
            line.table = Some(rel.qualified_name());
            line.op = "update";
            line.new = Some(Row::all(&rel.columns, new));
            match old {
                Some(old) => {
                    check_width(rel, old.tuple(), lsn)?;
                    line.key = Some(Row::keys(&rel.columns, old.tuple()));
                    line.old = Some(old_row(&rel.columns, old));
                }
                None => line.key = Some(Row::keys(&rel.columns, new)),
            }
        }
        LogicalMessage::Delete {
            relation: oid, old, ..
        } => {
            let rel = relation(oid)?;
            check_width(rel, old.tuple(), lsn)?;
            line.table = Some(rel.qualified_name());
            line.op = "delete";
            line.key = Some(Row::keys(&rel.columns, old.tuple()));
            line.old = Some(old_row(&rel.columns, old));
        }
        LogicalMessage::Truncate {
            relations: oids,
            cascade,
            restart_identity,
            ..
        } => {
            let mut names = Vec::with_capacity(oids.len());
            for oid in oids {
                names.push(relation(oid)?.qualified_name());
            }
            line.op = "truncate";
            line.tables = Some(names);
            line.cascade = Some(*cascade);
            line.restart_identity = Some(*restart_identity);
        }
        LogicalMessage::Message {
            transactional,
            prefix,
            content,
            ..
        } => {
            line.op = "message";
            line.transactional = Some(*transactional);
            if !*transactional {
                line.xid = None;
                line.commit_lsn = None;
                line.commit_time = None;
            }
            line.prefix = Some(prefix.clone());
            line.content = Some(String::from_utf8_lossy(content).into_owned());
        }
        _ => return Ok(None),
    }
    serde_json::to_string(&line)
        .map(Some)
        .map_err(|e| OpsError::Refused(format!("cannot encode the change at {lsn}: {e}")))
}

fn check_width(rel: &Relation, tuple: &[Value], lsn: Lsn) -> Result<(), OpsError> {
    if rel.columns.len() == tuple.len() {
        Ok(())
    } else {
        Err(OpsError::Refused(format!(
            "change at {lsn} to {} carries {} columns, its Relation message {}",
            rel.qualified_name(),
            tuple.len(),
            rel.columns.len()
        )))
    }
}

fn old_row<'a>(columns: &'a [Column], old: &'a OldTuple) -> Row<'a> {
    match old {
        // Only the key columns of a 'K' tuple carry values; the rest are placeholders.
        OldTuple::Key(t) => Row::keys(columns, t),
        OldTuple::Full(t) => Row::all(columns, t),
    }
}

#[derive(Serialize)]
struct ChangeLine<'a> {
    lsn: Lsn,
    xid: Option<Xid>,
    commit_lsn: Option<Lsn>,
    commit_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<Row<'a>>,
    /// The key on production (`--mapped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    mapped_key: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<Row<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<Row<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tables: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cascade: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    restart_identity: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transactional: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<String>,
}

/// Columns as a JSON object in table order.
struct Row<'a> {
    columns: &'a [Column],
    values: &'a [Value],
    keys_only: bool,
}

impl<'a> Row<'a> {
    fn all(columns: &'a [Column], values: &'a [Value]) -> Self {
        Row {
            columns,
            values,
            keys_only: false,
        }
    }

    fn keys(columns: &'a [Column], values: &'a [Value]) -> Self {
        Row {
            columns,
            values,
            keys_only: true,
        }
    }
}

impl Serialize for Row<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (column, value) in self.columns.iter().zip(self.values) {
            if self.keys_only && !column.is_key {
                continue;
            }
            map.serialize_entry(&column.name, &JsonValue(value))?;
        }
        map.end()
    }
}

/// A column value: text as a string, NULL as null, an unsent TOAST value and binary data as
/// small objects so they can never be mistaken for text.
struct JsonValue<'a>(&'a Value);

impl Serialize for JsonValue<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_none(),
            Value::Text(bytes) => s.serialize_str(&String::from_utf8_lossy(bytes)),
            Value::UnchangedToast => {
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("unchanged_toast", &true)?;
                map.end()
            }
            Value::Binary(bytes) => {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                let mut map = s.serialize_map(Some(1))?;
                map.serialize_entry("binary_hex", &hex)?;
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReplicaIdentity;
    use bytes::Bytes;

    fn relation() -> Relation {
        let column = |name: &str, is_key| Column {
            name: name.into(),
            is_key,
            type_oid: 25,
            type_modifier: -1,
        };
        Relation {
            oid: 42,
            namespace: "public".into(),
            name: "product".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", true),
                column("name", false),
                column("note", false),
            ],
        }
    }

    fn txn() -> TxnContext {
        TxnContext {
            xid: 7,
            commit_lsn: Lsn(0x10),
            commit_time: PgTimestamp(0),
        }
    }

    #[test]
    fn update_line_marks_unchanged_toast_and_keeps_column_order() {
        let relations = HashMap::from([(42, relation())]);
        let message = LogicalMessage::Update {
            xid: None,
            relation: 42,
            old: Some(OldTuple::Key(vec![
                Value::Text(Bytes::from_static(b"1")),
                Value::Null,
                Value::Null,
            ])),
            new: vec![
                Value::Text(Bytes::from_static(b"2")),
                Value::Null,
                Value::UnchangedToast,
            ],
        };
        let line = change_line(Lsn(0x0F), Some(&txn()), &relations, &message, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            line,
            r#"{"lsn":"0/F","xid":7,"commit_lsn":"0/10","commit_time":"2000-01-01T00:00:00.000000Z","table":"public.product","op":"update","key":{"id":"1"},"new":{"id":"2","name":null,"note":{"unchanged_toast":true}},"old":{"id":"1"}}"#
        );
    }

    #[test]
    fn unknown_relation_and_wrong_width_are_errors() {
        let relations = HashMap::from([(42, relation())]);
        let insert = |oid, n| LogicalMessage::Insert {
            xid: None,
            relation: oid,
            new: vec![Value::Null; n],
        };
        assert!(change_line(Lsn(1), Some(&txn()), &relations, &insert(43, 3), None).is_err());
        assert!(change_line(Lsn(1), Some(&txn()), &relations, &insert(42, 2), None).is_err());
        assert!(
            change_line(Lsn(1), Some(&txn()), &relations, &insert(42, 3), None)
                .unwrap()
                .is_some()
        );
    }
}
