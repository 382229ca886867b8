//! Spool records and the logical replication messages they hold (sans-IO): what sync receives
//! from staging becomes a [`Record`], and a record read back becomes the same message again.

use std::collections::HashMap;

use bytes::Bytes;

use super::proto::{self, Record, record::Body, value::Kind};
use crate::ddl;
use crate::model::{Column, Lsn, Oid, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Value};
use crate::pgoutput::LogicalMessage;

/// The newest record format version this build reads and writes.
pub const VERSION: u32 = 2;

/// The version of records every build reads (all but decoding messages).
const FIRST_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error(
        "record format version {0} is newer than this build reads ({VERSION}): upgrade stagingprop"
    )]
    Version(u32),
    #[error("the record holds nothing")]
    Empty,
    #[error("a change with an unknown operation {0}")]
    Operation(i32),
    #[error("a value of unknown kind {0}")]
    Kind(i32),
    #[error("replica identity {0:?} is not one pgoutput sends")]
    ReplicaIdentity(u32),
    #[error("cannot decode a record: {0}")]
    Decode(String),
}

fn value(v: &Value) -> proto::Value {
    let (kind, data) = match v {
        Value::Null => (Kind::Null, Bytes::new()),
        Value::UnchangedToast => (Kind::UnchangedToast, Bytes::new()),
        Value::Text(b) => (Kind::Text, b.clone()),
        Value::Binary(b) => (Kind::Binary, b.clone()),
    };
    proto::Value {
        kind: kind as i32,
        data,
    }
}

fn values(t: &[Value]) -> Vec<proto::Value> {
    t.iter().map(value).collect()
}

fn from_value(v: proto::Value) -> Result<Value, RecordError> {
    Ok(
        match Kind::try_from(v.kind).map_err(|_| RecordError::Kind(v.kind))? {
            Kind::Null => Value::Null,
            Kind::UnchangedToast => Value::UnchangedToast,
            Kind::Text => Value::Text(v.data),
            Kind::Binary => Value::Binary(v.data),
        },
    )
}

fn from_values(v: Vec<proto::Value>) -> Result<Vec<Value>, RecordError> {
    v.into_iter().map(from_value).collect()
}

/// The key column values of a row of `relation` (empty when the relation is unknown).
fn key_of(relation: Option<&Relation>, tuple: &[Value]) -> Vec<proto::Value> {
    relation
        .map(|r| {
            r.key_columns()
                .filter_map(|i| tuple.get(i))
                .map(value)
                .collect()
        })
        .unwrap_or_default()
}

fn record(body: Body) -> Record {
    Record {
        // The lowest version that reads it: a build from before schema changes stops at a
        // decoding message rather than skip it, and reads everything else as before.
        version: match body {
            Body::Message(_) => VERSION,
            _ => FIRST_VERSION,
        },
        body: Some(body),
    }
}

/// The record of a message sync spools, or `None` for messages the spool does not keep
/// (Origin, Type, logical decoding messages other than schema changes, streaming control).
pub fn to_record(
    lsn: Lsn,
    message: &LogicalMessage,
    relations: &HashMap<Oid, Relation>,
) -> Option<Record> {
    use proto::change::Operation;
    let change = |operation: Operation,
                  oid: Oid,
                  key_tuple: &[Value],
                  new: &[Value],
                  old: Option<&OldTuple>| {
        record(Body::Change(proto::Change {
            operation: operation as i32,
            relation_oid: oid,
            lsn: lsn.0,
            key: key_of(relations.get(&oid), key_tuple),
            new: values(new),
            old: old.map(|o| values(o.tuple())).unwrap_or_default(),
            old_is_full: matches!(old, Some(OldTuple::Full(_))),
        }))
    };
    Some(match message {
        LogicalMessage::Begin {
            final_lsn,
            commit_time,
            xid,
        } => record(Body::Begin(proto::Begin {
            xid: *xid,
            commit_lsn: final_lsn.0,
            commit_time: commit_time.0,
            // The writer knows what it spooled before; it fills this in.
            previous_end_lsn: 0,
        })),
        LogicalMessage::Commit {
            commit_lsn,
            end_lsn,
            commit_time,
            ..
        } => record(Body::Commit(proto::Commit {
            commit_lsn: commit_lsn.0,
            end_lsn: end_lsn.0,
            commit_time: commit_time.0,
        })),
        LogicalMessage::Relation { relation, .. } => record(Body::Relation(proto::Relation {
            oid: relation.oid,
            schema: relation.namespace.clone(),
            name: relation.name.clone(),
            columns: relation
                .columns
                .iter()
                .map(|c| proto::Column {
                    name: c.name.clone(),
                    type_oid: c.type_oid,
                    type_modifier: c.type_modifier,
                    key: c.is_key,
                })
                .collect(),
            replica_identity: u32::from(relation.replica_identity.as_byte()),
        })),
        LogicalMessage::Insert { relation, new, .. } => {
            change(Operation::Insert, *relation, new, new, None)
        }
        LogicalMessage::Update {
            relation, old, new, ..
        } => {
            let key_tuple = old.as_ref().map_or(&new[..], |o| &o.tuple()[..]);
            change(Operation::Update, *relation, key_tuple, new, old.as_ref())
        }
        LogicalMessage::Delete { relation, old, .. } => {
            change(Operation::Delete, *relation, old.tuple(), &[], Some(old))
        }
        LogicalMessage::Truncate {
            relations: oids,
            cascade,
            restart_identity,
            ..
        } => record(Body::Truncate(proto::Truncate {
            relation_oids: oids.clone(),
            cascade: *cascade,
            restart_identity: *restart_identity,
            lsn: lsn.0,
        })),
        LogicalMessage::Message {
            transactional: true,
            lsn,
            prefix,
            content,
            ..
        } if prefix == ddl::PREFIX || prefix == crate::repair::PREFIX => {
            record(Body::Message(proto::DecodingMessage {
                lsn: lsn.0,
                prefix: prefix.clone(),
                content: content.clone(),
            }))
        }
        _ => return None,
    })
}

/// The message a record holds, with the WAL position staging sent it at (changes and truncates;
/// the commit LSN for Begin and Commit; invalid for Relation).
pub fn from_record(record: Record) -> Result<(Lsn, LogicalMessage), RecordError> {
    use proto::change::Operation;
    if record.version > VERSION {
        return Err(RecordError::Version(record.version));
    }
    Ok(match record.body.ok_or(RecordError::Empty)? {
        Body::Begin(b) => (
            Lsn(b.commit_lsn),
            LogicalMessage::Begin {
                final_lsn: Lsn(b.commit_lsn),
                commit_time: PgTimestamp(b.commit_time),
                xid: b.xid,
            },
        ),
        Body::Commit(c) => (
            Lsn(c.commit_lsn),
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(c.commit_lsn),
                end_lsn: Lsn(c.end_lsn),
                commit_time: PgTimestamp(c.commit_time),
            },
        ),
        Body::Relation(r) => {
            let identity = u8::try_from(r.replica_identity)
                .ok()
                .and_then(ReplicaIdentity::from_byte)
                .ok_or(RecordError::ReplicaIdentity(r.replica_identity))?;
            (
                Lsn::INVALID,
                LogicalMessage::Relation {
                    xid: None,
                    relation: Relation {
                        oid: r.oid,
                        namespace: r.schema,
                        name: r.name,
                        replica_identity: identity,
                        columns: r
                            .columns
                            .into_iter()
                            .map(|c| Column {
                                name: c.name,
                                is_key: c.key,
                                type_oid: c.type_oid,
                                type_modifier: c.type_modifier,
                            })
                            .collect(),
                    },
                },
            )
        }
        Body::Change(c) => {
            let lsn = Lsn(c.lsn);
            let old = if c.old.is_empty() {
                None
            } else {
                let tuple = from_values(c.old)?;
                Some(if c.old_is_full {
                    OldTuple::Full(tuple)
                } else {
                    OldTuple::Key(tuple)
                })
            };
            let message = match Operation::try_from(c.operation) {
                Ok(Operation::Insert) => LogicalMessage::Insert {
                    xid: None,
                    relation: c.relation_oid,
                    new: from_values(c.new)?,
                },
                Ok(Operation::Update) => LogicalMessage::Update {
                    xid: None,
                    relation: c.relation_oid,
                    old,
                    new: from_values(c.new)?,
                },
                Ok(Operation::Delete) => LogicalMessage::Delete {
                    xid: None,
                    relation: c.relation_oid,
                    old: old.unwrap_or(OldTuple::Key(Vec::new())),
                },
                _ => return Err(RecordError::Operation(c.operation)),
            };
            (lsn, message)
        }
        Body::Truncate(t) => (
            Lsn(t.lsn),
            LogicalMessage::Truncate {
                xid: None,
                relations: t.relation_oids,
                cascade: t.cascade,
                restart_identity: t.restart_identity,
            },
        ),
        Body::Message(m) => (
            Lsn(m.lsn),
            LogicalMessage::Message {
                xid: None,
                transactional: true,
                lsn: Lsn(m.lsn),
                prefix: m.prefix,
                content: m.content,
            },
        ),
    })
}

/// Encodes a record's payload.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    use prost::Message;
    record
        .encode(out)
        .expect("a Vec grows as needed, so encoding cannot run out of room");
}

/// Decodes a record's payload (zero-copy: values share `payload`'s memory).
pub fn decode(payload: Bytes) -> Result<Record, RecordError> {
    use prost::Message;
    Record::decode(payload).map_err(|e| RecordError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn relation() -> Relation {
        Relation {
            oid: 16384,
            namespace: "public".into(),
            name: "catentry".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "catentry_id".into(),
                    is_key: true,
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    name: "descr".into(),
                    is_key: false,
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }
    }

    fn round_trip(lsn: Lsn, message: LogicalMessage) -> (Record, Lsn, LogicalMessage) {
        let relations = HashMap::from([(16384, relation())]);
        let record = to_record(lsn, &message, &relations).expect("spooled");
        let mut bytes = Vec::new();
        encode(&record, &mut bytes);
        let decoded = decode(Bytes::from(bytes)).unwrap();
        assert_eq!(decoded, record);
        let (lsn, message) = from_record(decoded).unwrap();
        (record, lsn, message)
    }

    #[test]
    fn every_spooled_message_comes_back_the_same() {
        let text = |s: &str| Value::Text(Bytes::copy_from_slice(s.as_bytes()));
        let messages = vec![
            LogicalMessage::Begin {
                final_lsn: Lsn(0x10),
                commit_time: PgTimestamp(12345),
                xid: 7,
            },
            LogicalMessage::Relation {
                xid: None,
                relation: relation(),
            },
            LogicalMessage::Insert {
                xid: None,
                relation: 16384,
                new: vec![text("1"), Value::Null],
            },
            LogicalMessage::Update {
                xid: None,
                relation: 16384,
                old: Some(OldTuple::Key(vec![text("1"), Value::Null])),
                new: vec![text("2"), Value::UnchangedToast],
            },
            LogicalMessage::Update {
                xid: None,
                relation: 16384,
                old: None,
                new: vec![text("2"), Value::Binary(Bytes::from_static(b"\x00\xff"))],
            },
            LogicalMessage::Delete {
                xid: None,
                relation: 16384,
                old: OldTuple::Full(vec![text("2"), text("x")]),
            },
            LogicalMessage::Truncate {
                xid: None,
                relations: vec![16384, 16390],
                cascade: false,
                restart_identity: true,
            },
            LogicalMessage::Message {
                xid: None,
                transactional: true,
                lsn: Lsn(0x16),
                prefix: ddl::PREFIX.into(),
                content: Bytes::from_static(br#"{"tag":"ALTER TABLE"}"#),
            },
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x18),
                commit_time: PgTimestamp(12345),
            },
        ];
        for message in messages {
            let (_, _, back) = round_trip(Lsn(0x14), message.clone());
            assert_eq!(back, message);
        }
        // The key of an update comes from its old key tuple.
        let (record, lsn, _) = round_trip(
            Lsn(0x14),
            LogicalMessage::Update {
                xid: None,
                relation: 16384,
                old: Some(OldTuple::Key(vec![text("1"), Value::Null])),
                new: vec![text("2"), Value::Null],
            },
        );
        assert_eq!(lsn, Lsn(0x14));
        let Some(Body::Change(change)) = record.body else {
            panic!("a change")
        };
        assert_eq!(change.key, vec![value(&text("1"))]);
    }

    #[test]
    fn only_schema_changes_and_repair_watermarks_of_the_decoding_messages_are_kept_in_version_2() {
        let message = |transactional: bool, prefix: &str| LogicalMessage::Message {
            xid: Some(7),
            transactional,
            lsn: Lsn(0x16),
            prefix: prefix.into(),
            content: Bytes::from_static(b"{}"),
        };
        let relations = HashMap::new();
        assert!(
            to_record(
                Lsn(0x16),
                &message(true, "stagingprop-heartbeat"),
                &relations
            )
            .is_none()
        );
        assert!(to_record(Lsn(0x16), &message(false, ddl::PREFIX), &relations).is_none());
        let kept = to_record(Lsn(0x16), &message(true, ddl::PREFIX), &relations).expect("kept");
        assert_eq!(kept.version, 2);
        // A repair's watermarks travel too (to a target behind a spool or a stream).
        let kept_too =
            to_record(Lsn(0x16), &message(true, crate::repair::PREFIX), &relations).expect("kept");
        let (
            _,
            LogicalMessage::Message {
                prefix, content, ..
            },
        ) = from_record(kept_too).unwrap()
        else {
            panic!("a message comes back");
        };
        assert_eq!(
            (prefix.as_str(), &content[..]),
            (crate::repair::PREFIX, &b"{}"[..])
        );
        let change = to_record(
            Lsn(0x14),
            &LogicalMessage::Truncate {
                xid: None,
                relations: vec![1],
                cascade: false,
                restart_identity: false,
            },
            &relations,
        )
        .unwrap();
        assert_eq!(change.version, 1, "a build before version 2 reads the rest");
    }

    #[test]
    fn unknown_contents_are_errors() {
        let newer = Record {
            version: VERSION + 1,
            body: None,
        };
        assert_eq!(from_record(newer), Err(RecordError::Version(VERSION + 1)));
        let empty = Record {
            version: VERSION,
            body: None,
        };
        assert_eq!(from_record(empty), Err(RecordError::Empty));
        let bad_kind = record(Body::Change(proto::Change {
            operation: 1,
            new: vec![proto::Value {
                kind: 9,
                data: Bytes::new(),
            }],
            ..Default::default()
        }));
        assert_eq!(from_record(bad_kind), Err(RecordError::Kind(9)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(record) = decode(Bytes::from(data)) {
                let _ = from_record(record);
            }
        }
    }
}
