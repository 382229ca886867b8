//! Staging's transactions as JetStream messages (sans-IO). A transaction read from the spool
//! becomes one or more messages ("chunks") whose payloads are the spool's own framed records
//! (`spool::segment`), cut at record boundaries once a chunk would pass `chunk_bytes`. Each
//! transaction carries the Relation records of the tables it changes before their first change,
//! so a consumer can start at any transaction. The cut depends only on the spooled transaction
//! and `chunk_bytes`, so publishing a transaction again produces the same messages, message
//! ids included, and the stream's deduplication drops them.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::model::{Lsn, Oid, Relation};
use crate::pgoutput::LogicalMessage;
use crate::spool::record::{self, RecordError};
use crate::spool::segment::{self, Scan};

/// The commit LSN of the chunk's transaction (every chunk).
pub const HEADER_COMMIT_LSN: &str = "Stagingprop-Commit-Lsn";
/// Where everything committed before the transaction ends (every chunk): a consumer that has
/// less than this missed a transaction.
pub const HEADER_PREVIOUS_END_LSN: &str = "Stagingprop-Previous-End-Lsn";
/// The chunk's index in its transaction, from 0.
pub const HEADER_CHUNK: &str = "Stagingprop-Chunk";
/// `true` on the transaction's last chunk, which ends with its Commit record.
pub const HEADER_LAST_CHUNK: &str = "Stagingprop-Last-Chunk";
/// The end LSN of the transaction (last chunk only).
pub const HEADER_END_LSN: &str = "Stagingprop-End-Lsn";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("a stream message lacks its {0} header (was it published by stagingprop?)")]
    MissingHeader(&'static str),
    #[error("a stream message has a malformed {name} header: {value:?}")]
    BadHeader { name: &'static str, value: String },
    #[error("a stream message's payload is damaged at byte {at}: {reason}")]
    Corrupt { at: usize, reason: &'static str },
    #[error("a stream message holds a bad record: {0}")]
    Record(#[from] RecordError),
    #[error("the spool sent {0} outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("the spool sent a Begin inside the transaction committing at {0}")]
    NestedBegin(Lsn),
    #[error("a change of relation {0} before its Relation record")]
    UnknownRelation(Oid),
    #[error("a record of {0} bytes cannot be framed")]
    TooLarge(usize),
}

/// What a chunk's headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeaders {
    pub commit_lsn: Lsn,
    pub previous_end: Lsn,
    pub index: u32,
    pub last: bool,
    /// Invalid unless `last`.
    pub end_lsn: Lsn,
}

impl ChunkHeaders {
    /// The message id the stream deduplicates on: the same staging (system id), slot,
    /// transaction and chunk always give the same id.
    pub fn message_id(&self, system_id: &str, slot: &str) -> String {
        format!(
            "{system_id}.{slot}.{:016X}.{}",
            self.commit_lsn.0, self.index
        )
    }

    /// The headers as name/value pairs.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            (HEADER_COMMIT_LSN, self.commit_lsn.to_string()),
            (HEADER_PREVIOUS_END_LSN, self.previous_end.to_string()),
            (HEADER_CHUNK, self.index.to_string()),
            (HEADER_LAST_CHUNK, self.last.to_string()),
        ];
        if self.last {
            pairs.push((HEADER_END_LSN, self.end_lsn.to_string()));
        }
        pairs
    }

    /// Reads the headers through `get` (a header's value by name).
    pub fn parse<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<ChunkHeaders, ChunkError> {
        fn field<'a, T: std::str::FromStr>(
            get: &impl Fn(&str) -> Option<&'a str>,
            name: &'static str,
        ) -> Result<T, ChunkError> {
            let value = get(name).ok_or(ChunkError::MissingHeader(name))?;
            value.parse().map_err(|_| ChunkError::BadHeader {
                name,
                value: value.to_owned(),
            })
        }
        let last: bool = field(&get, HEADER_LAST_CHUNK)?;
        Ok(ChunkHeaders {
            commit_lsn: field(&get, HEADER_COMMIT_LSN)?,
            previous_end: field(&get, HEADER_PREVIOUS_END_LSN)?,
            index: field(&get, HEADER_CHUNK)?,
            last,
            end_lsn: if last {
                field(&get, HEADER_END_LSN)?
            } else {
                Lsn::INVALID
            },
        })
    }
}

/// One message of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub headers: ChunkHeaders,
    pub payload: Bytes,
}

/// The transaction being cut.
struct OpenTxn {
    commit_lsn: Lsn,
    previous_end: Lsn,
    index: u32,
    /// Relations whose definition this transaction already carries.
    announced: HashSet<Oid>,
    payload: Vec<u8>,
}

/// Cuts the spool's messages, in order, into chunks.
pub struct Chunker {
    chunk_bytes: usize,
    /// Every relation's latest definition, as the spool delivered them.
    relations: HashMap<Oid, Relation>,
    txn: Option<OpenTxn>,
    record: Vec<u8>,
}

impl Chunker {
    pub fn new(chunk_bytes: usize) -> Chunker {
        Chunker {
            chunk_bytes,
            relations: HashMap::new(),
            txn: None,
            record: Vec::new(),
        }
    }

    /// Whether a transaction is being cut.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Takes the next spooled message (`previous_end`: what the spool's Begin records) and
    /// returns the chunks it completed, in order.
    pub fn push(
        &mut self,
        lsn: Lsn,
        message: &LogicalMessage,
        previous_end: Lsn,
    ) -> Result<Vec<Chunk>, ChunkError> {
        let mut done = Vec::new();
        match message {
            LogicalMessage::Begin { final_lsn, .. } => {
                if let Some(txn) = &self.txn {
                    return Err(ChunkError::NestedBegin(txn.commit_lsn));
                }
                self.txn = Some(OpenTxn {
                    commit_lsn: *final_lsn,
                    previous_end,
                    index: 0,
                    announced: HashSet::new(),
                    payload: Vec::new(),
                });
                self.append(lsn, message, &mut done)?;
            }
            LogicalMessage::Relation { relation, .. } => {
                self.relations.insert(relation.oid, relation.clone());
                // A definition that changed inside the transaction goes in where it changed.
                if let Some(txn) = &mut self.txn
                    && txn.announced.contains(&relation.oid)
                {
                    self.append(lsn, message, &mut done)?;
                }
            }
            LogicalMessage::Insert { relation, .. }
            | LogicalMessage::Update { relation, .. }
            | LogicalMessage::Delete { relation, .. } => {
                self.announce(&[*relation], &mut done)?;
                self.append(lsn, message, &mut done)?;
            }
            LogicalMessage::Truncate { relations, .. } => {
                self.announce(relations, &mut done)?;
                self.append(lsn, message, &mut done)?;
            }
            // A schema change staging captured (the record keeps only those), in its place.
            LogicalMessage::Message {
                transactional: true,
                ..
            } => self.append(lsn, message, &mut done)?,
            LogicalMessage::Commit { end_lsn, .. } => {
                self.append(lsn, message, &mut done)?;
                let txn = self
                    .txn
                    .take()
                    .ok_or(ChunkError::OutsideTransaction("a Commit"))?;
                done.push(Chunk {
                    headers: ChunkHeaders {
                        commit_lsn: txn.commit_lsn,
                        previous_end: txn.previous_end,
                        index: txn.index,
                        last: true,
                        end_lsn: *end_lsn,
                    },
                    payload: Bytes::from(txn.payload),
                });
            }
            // What the spool does not keep.
            _ => {}
        }
        Ok(done)
    }

    /// Puts the definitions of `oids` not yet in the transaction before a change of them.
    fn announce(&mut self, oids: &[Oid], done: &mut Vec<Chunk>) -> Result<(), ChunkError> {
        for &oid in oids {
            let txn = self
                .txn
                .as_mut()
                .ok_or(ChunkError::OutsideTransaction("a change"))?;
            if !txn.announced.insert(oid) {
                continue;
            }
            let relation = self
                .relations
                .get(&oid)
                .ok_or(ChunkError::UnknownRelation(oid))?
                .clone();
            let message = LogicalMessage::Relation {
                xid: None,
                relation,
            };
            self.append(Lsn::INVALID, &message, done)?;
        }
        Ok(())
    }

    /// Appends the message's record to the open transaction, first closing the chunk when the
    /// record would take it past `chunk_bytes` (a record larger than that has a chunk of its own).
    fn append(
        &mut self,
        lsn: Lsn,
        message: &LogicalMessage,
        done: &mut Vec<Chunk>,
    ) -> Result<(), ChunkError> {
        let txn = self
            .txn
            .as_mut()
            .ok_or(ChunkError::OutsideTransaction("a change"))?;
        let Some(mut rec) = record::to_record(lsn, message, &self.relations) else {
            return Ok(());
        };
        if let Some(crate::spool::proto::record::Body::Begin(begin)) = &mut rec.body {
            begin.previous_end_lsn = txn.previous_end.0;
        }
        self.record.clear();
        record::encode(&rec, &mut self.record);
        let framed = segment::HEADER + self.record.len();
        if !txn.payload.is_empty() && txn.payload.len() + framed > self.chunk_bytes {
            done.push(Chunk {
                headers: ChunkHeaders {
                    commit_lsn: txn.commit_lsn,
                    previous_end: txn.previous_end,
                    index: txn.index,
                    last: false,
                    end_lsn: Lsn::INVALID,
                },
                payload: Bytes::from(std::mem::take(&mut txn.payload)),
            });
            txn.index += 1;
        }
        segment::encode_frame(&self.record, &mut txn.payload)
            .map_err(|e| ChunkError::TooLarge(e.0))?;
        Ok(())
    }
}

/// The messages a chunk's payload holds, with the positions staging sent them at (invalid for
/// Relation records). Never panics, whatever the bytes.
pub fn decode(payload: &Bytes) -> Result<Vec<(Lsn, LogicalMessage)>, ChunkError> {
    let mut messages = Vec::new();
    let mut at = 0;
    loop {
        match segment::next_frame(payload, at) {
            Scan::End => return Ok(messages),
            Scan::Torn => {
                return Err(ChunkError::Corrupt {
                    at,
                    reason: "the payload ends inside a record",
                });
            }
            Scan::Corrupt { reason } => return Err(ChunkError::Corrupt { at, reason }),
            Scan::Frame {
                payload: range,
                next,
            } => {
                let rec = record::decode(payload.slice(range))?;
                messages.push(record::from_record(rec)?);
                at = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, PgTimestamp, ReplicaIdentity, Value};
    use proptest::prelude::*;

    fn relation(oid: Oid) -> Relation {
        Relation {
            oid,
            namespace: "public".into(),
            name: format!("t{oid}"),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "id".into(),
                    is_key: true,
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    name: "v".into(),
                    is_key: false,
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }
    }

    /// A transaction of `rows` inserts of `width`-byte values into relation 1, as the spool
    /// delivers it (the relation's definition before the transaction).
    fn transaction(commit: u64, rows: usize, width: usize) -> Vec<(Lsn, LogicalMessage)> {
        let mut messages = vec![
            (
                Lsn::INVALID,
                LogicalMessage::Relation {
                    xid: None,
                    relation: relation(1),
                },
            ),
            (
                Lsn(commit),
                LogicalMessage::Begin {
                    final_lsn: Lsn(commit),
                    commit_time: PgTimestamp(7),
                    xid: 9,
                },
            ),
        ];
        for i in 0..rows {
            messages.push((
                Lsn(commit - 100 + i as u64),
                LogicalMessage::Insert {
                    xid: None,
                    relation: 1,
                    new: vec![
                        Value::Text(Bytes::from(i.to_string())),
                        Value::Text(Bytes::from(vec![b'x'; width])),
                    ],
                },
            ));
        }
        messages.push((
            Lsn(commit),
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(commit),
                end_lsn: Lsn(commit + 8),
                commit_time: PgTimestamp(7),
            },
        ));
        messages
    }

    fn cut(chunk_bytes: usize, messages: &[(Lsn, LogicalMessage)]) -> Vec<Chunk> {
        let mut chunker = Chunker::new(chunk_bytes);
        let mut chunks = Vec::new();
        for (lsn, message) in messages {
            chunks.extend(chunker.push(*lsn, message, Lsn(500)).unwrap());
        }
        assert!(!chunker.in_transaction());
        chunks
    }

    #[test]
    fn a_transaction_is_cut_under_the_limit_and_reads_back_whole() {
        let messages = transaction(10_000, 50, 200);
        let chunks = cut(2048, &messages);
        assert!(chunks.len() > 3, "{} chunks", chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.payload.len() <= 2048);
            assert_eq!(chunk.headers.index as usize, i);
            assert_eq!(chunk.headers.last, i == chunks.len() - 1);
            assert_eq!(chunk.headers.commit_lsn, Lsn(10_000));
            assert_eq!(chunk.headers.previous_end, Lsn(500));
        }
        assert_eq!(chunks.last().unwrap().headers.end_lsn, Lsn(10_008));
        let decoded: Vec<_> = chunks
            .iter()
            .flat_map(|c| decode(&c.payload).unwrap())
            .collect();
        // The relation is announced inside the transaction, right after Begin.
        assert!(matches!(decoded[0].1, LogicalMessage::Begin { .. }));
        assert!(matches!(decoded[1].1, LogicalMessage::Relation { .. }));
        let changes: Vec<_> = decoded
            .iter()
            .filter(|(_, m)| matches!(m, LogicalMessage::Insert { .. }))
            .collect();
        let sent: Vec<_> = messages
            .iter()
            .filter(|(_, m)| matches!(m, LogicalMessage::Insert { .. }))
            .collect();
        assert_eq!(changes.len(), sent.len());
        for (a, b) in changes.iter().zip(&sent) {
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_record_larger_than_the_limit_has_a_chunk_of_its_own() {
        let chunks = cut(1024, &transaction(10_000, 3, 5000));
        assert!(chunks.iter().any(|c| c.payload.len() > 5000));
        let total: usize = chunks
            .iter()
            .map(|c| decode(&c.payload).unwrap().len())
            .sum();
        // Begin, Relation, three inserts, Commit.
        assert_eq!(total, 6);
    }

    #[test]
    fn a_schema_change_goes_in_its_place_and_other_decoding_messages_do_not() {
        let message = |prefix: &str| LogicalMessage::Message {
            xid: Some(9),
            transactional: true,
            lsn: Lsn(9_950),
            prefix: prefix.into(),
            content: Bytes::from_static(b"{}"),
        };
        let mut messages = transaction(10_000, 2, 10);
        // After Begin: a heartbeat, then the schema change, before the inserts.
        messages.insert(2, (Lsn(9_950), message(crate::ddl::PREFIX)));
        messages.insert(2, (Lsn(9_940), message("stagingprop-heartbeat")));
        let decoded: Vec<_> = cut(4096, &messages)
            .iter()
            .flat_map(|c| decode(&c.payload).unwrap())
            .collect();
        let kinds: Vec<&str> = decoded.iter().map(|(_, m)| m.name()).collect();
        assert_eq!(
            kinds,
            ["Begin", "Message", "Relation", "Insert", "Insert", "Commit"]
        );
        assert!(
            matches!(&decoded[1], (Lsn(9_950), LogicalMessage::Message { prefix, .. }) if prefix == crate::ddl::PREFIX)
        );
    }

    #[test]
    fn headers_round_trip_and_name_what_is_wrong() {
        let headers = ChunkHeaders {
            commit_lsn: Lsn(0x1_0000_0010),
            previous_end: Lsn(0x20),
            index: 3,
            last: true,
            end_lsn: Lsn(0x1_0000_0040),
        };
        let pairs = headers.pairs();
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(ChunkHeaders::parse(get), Ok(headers));
        assert_eq!(
            headers.message_id("7318", "stagingprop"),
            "7318.stagingprop.0000000100000010.3"
        );
        let none = |_: &str| None;
        assert_eq!(
            ChunkHeaders::parse(none),
            Err(ChunkError::MissingHeader(HEADER_LAST_CHUNK))
        );
        let bad = |name: &str| (name == HEADER_LAST_CHUNK).then_some("maybe");
        assert!(matches!(
            ChunkHeaders::parse(bad),
            Err(ChunkError::BadHeader { .. })
        ));
    }

    #[test]
    fn a_change_of_a_relation_never_defined_is_an_error() {
        let mut chunker = Chunker::new(4096);
        let begin = LogicalMessage::Begin {
            final_lsn: Lsn(10),
            commit_time: PgTimestamp(0),
            xid: 1,
        };
        chunker.push(Lsn(10), &begin, Lsn::INVALID).unwrap();
        let insert = LogicalMessage::Insert {
            xid: None,
            relation: 77,
            new: vec![Value::Null],
        };
        assert_eq!(
            chunker.push(Lsn(5), &insert, Lsn::INVALID),
            Err(ChunkError::UnknownRelation(77))
        );
    }

    proptest! {
        /// Cutting is deterministic, every chunk but a single oversized record stays under the
        /// limit, and the chunks read back as the transaction's messages.
        #[test]
        fn cutting_again_gives_the_same_chunks(rows in 1usize..40, width in 0usize..600, limit in 1024usize..4096) {
            let messages = transaction(90_000, rows, width);
            let first = cut(limit, &messages);
            prop_assert_eq!(&first, &cut(limit, &messages));
            for chunk in &first {
                let records = decode(&chunk.payload).unwrap();
                prop_assert!(chunk.payload.len() <= limit || records.len() == 1);
            }
            let inserts = first
                .iter()
                .flat_map(|c| decode(&c.payload).unwrap())
                .filter(|(_, m)| matches!(m, LogicalMessage::Insert { .. }))
                .count();
            prop_assert_eq!(inserts, rows);
        }

        /// Any bytes: an error or messages, never a panic.
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
