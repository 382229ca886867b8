//! The decoder: one payload at a time, every read a checked split of it.

use bytes::Bytes;

use super::{DecodeError, LogicalMessage};
use crate::model::{
    Column, Lsn, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Tuple, Value, Xid,
};

/// Decodes one payload at a time, remembering whether a streamed block is open: between Stream
/// Start and Stream Stop, Relation, Type, Insert, Update, Delete, Truncate and Message carry the
/// streamed transaction's xid first. Use one decoder per replication connection.
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    /// The xid of the open streamed block.
    open_stream: Option<Xid>,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder { open_stream: None }
    }

    /// Between a Stream Start and its Stream Stop.
    pub fn in_streamed_block(&self) -> bool {
        self.open_stream.is_some()
    }

    /// Decodes one whole pgoutput message. On error the decoder's state is unchanged.
    pub fn decode(&mut self, payload: Bytes) -> Result<LogicalMessage, DecodeError> {
        let Some((&tag, body)) = payload.split_first() else {
            return Err(DecodeError::Empty);
        };
        let mut r = Reader {
            payload: &payload,
            rest: body,
            message: message_name(tag),
        };
        let message = match tag {
            b'B' => {
                self.not_in_stream(r.message)?;
                LogicalMessage::Begin {
                    final_lsn: r.lsn("final LSN")?,
                    commit_time: r.timestamp("commit time")?,
                    xid: r.u32("xid")?,
                }
            }
            b'C' => {
                self.not_in_stream(r.message)?;
                LogicalMessage::Commit {
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_time: r.timestamp("commit time")?,
                }
            }
            b'O' => LogicalMessage::Origin {
                commit_lsn: r.lsn("commit LSN")?,
                name: r.string("origin name")?,
            },
            b'R' => {
                let xid = self.stream_xid(&mut r)?;
                LogicalMessage::Relation {
                    xid,
                    relation: r.relation()?,
                }
            }
            b'Y' => LogicalMessage::Type {
                xid: self.stream_xid(&mut r)?,
                oid: r.u32("type OID")?,
                namespace: r.namespace()?,
                name: r.string("type name")?,
            },
            b'I' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("relation OID")?;
                r.expect_marker(b'N', "'N' (new tuple)")?;
                LogicalMessage::Insert {
                    xid,
                    relation,
                    new: r.tuple()?,
                }
            }
            b'U' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("relation OID")?;
                let marker_offset = r.offset();
                let (old, new) = match r.u8("tuple marker")? {
                    b'N' => (None, r.tuple()?),
                    marker @ (b'K' | b'O') => {
                        let old = r.tuple()?;
                        let old = if marker == b'K' {
                            OldTuple::Key(old)
                        } else {
                            OldTuple::Full(old)
                        };
                        r.expect_marker(b'N', "'N' (new tuple)")?;
                        (Some(old), r.tuple()?)
                    }
                    found => {
                        return Err(r.unexpected_marker("'K', 'O' or 'N'", found, marker_offset));
                    }
                };
                LogicalMessage::Update {
                    xid,
                    relation,
                    old,
                    new,
                }
            }
            b'D' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32("relation OID")?;
                let marker_offset = r.offset();
                let old = match r.u8("tuple marker")? {
                    b'K' => OldTuple::Key(r.tuple()?),
                    b'O' => OldTuple::Full(r.tuple()?),
                    found => return Err(r.unexpected_marker("'K' or 'O'", found, marker_offset)),
                };
                LogicalMessage::Delete { xid, relation, old }
            }
            b'T' => {
                let xid = self.stream_xid(&mut r)?;
                let count = r.len_i32("relation count")?;
                let options = r.u8("options")?;
                // Each OID takes 4 bytes: never reserve more than the payload can hold.
                let mut relations = Vec::with_capacity(count.min(r.rest.len() / 4));
                for _ in 0..count {
                    relations.push(r.u32("relation OID")?);
                }
                LogicalMessage::Truncate {
                    xid,
                    relations,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8("flags")?;
                let lsn = r.lsn("LSN")?;
                let prefix = r.string("prefix")?;
                let len = r.len_i32("content length")?;
                LogicalMessage::Message {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content: r.bytes("content", len)?,
                }
            }
            b'S' => {
                let xid = r.u32("xid")?;
                let first_segment = r.u8("first segment")? != 0;
                r.finish()?;
                if let Some(open_xid) = self.open_stream {
                    return Err(DecodeError::StreamStartInsideStream { xid, open_xid });
                }
                self.open_stream = Some(xid);
                return Ok(LogicalMessage::StreamStart { xid, first_segment });
            }
            b'E' => {
                r.finish()?;
                if self.open_stream.take().is_none() {
                    return Err(DecodeError::StreamStopOutsideStream);
                }
                return Ok(LogicalMessage::StreamStop);
            }
            b'c' => {
                self.not_in_stream(r.message)?;
                LogicalMessage::StreamCommit {
                    xid: r.u32("xid")?,
                    flags: r.u8("flags")?,
                    commit_lsn: r.lsn("commit LSN")?,
                    end_lsn: r.lsn("end LSN")?,
                    commit_time: r.timestamp("commit time")?,
                }
            }
            b'A' => {
                self.not_in_stream(r.message)?;
                let xid = r.u32("xid")?;
                let subxact_xid = r.u32("subtransaction xid")?;
                // Protocol 4 with parallel streaming appends the abort LSN and time.
                let (abort_lsn, abort_time) = if r.rest.is_empty() {
                    (None, None)
                } else {
                    (Some(r.lsn("abort LSN")?), Some(r.timestamp("abort time")?))
                };
                LogicalMessage::StreamAbort {
                    xid,
                    subxact_xid,
                    abort_lsn,
                    abort_time,
                }
            }
            b'b' | b'P' | b'K' | b'r' | b'p' => {
                return Err(DecodeError::TwoPhaseUnsupported {
                    message: r.message,
                    tag,
                });
            }
            _ => return Err(DecodeError::UnknownTag { tag }),
        };
        r.finish()?;
        Ok(message)
    }

    /// The Int32 xid that precedes a change inside a streamed block.
    #[inline]
    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<Xid>, DecodeError> {
        match self.open_stream {
            Some(_) => Ok(Some(r.u32("streamed xid")?)),
            None => Ok(None),
        }
    }

    /// Transaction boundaries never occur inside a streamed block; one there means the stream is
    /// out of step with the server.
    fn not_in_stream(&self, message: &'static str) -> Result<(), DecodeError> {
        match self.open_stream {
            Some(open_xid) => Err(DecodeError::NotAllowedInStream { message, open_xid }),
            None => Ok(()),
        }
    }
}

fn message_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => "unknown",
    }
}

/// A cursor over one payload. `rest` is what is left of `payload`; the offset is derived from
/// its length so that every read is a checked split and nothing can index out of bounds.
struct Reader<'a> {
    payload: &'a Bytes,
    rest: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    #[inline]
    fn offset(&self) -> usize {
        self.payload.len() - self.rest.len()
    }

    #[inline]
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.truncated(field, N)),
        }
    }

    #[inline]
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        match self.rest.split_first() {
            Some((&b, tail)) => {
                self.rest = tail;
                Ok(b)
            }
            None => Err(self.truncated(field, 1)),
        }
    }

    #[inline]
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    #[inline]
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    #[inline]
    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(field)
            .map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// An Int32 length that must not be negative.
    #[inline]
    fn len_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(field)?;
        usize::try_from(len).map_err(|_| self.negative(field, len))
    }

    /// `len` bytes as a zero-copy slice of the payload.
    #[inline]
    fn bytes(&mut self, field: &'static str, len: usize) -> Result<Bytes, DecodeError> {
        match self.rest.split_at_checked(len) {
            Some((head, tail)) => {
                let start = self.offset();
                self.rest = tail;
                // An empty slice shares nothing; `Bytes::slice` returns the static empty value.
                Ok(self.payload.slice(start..start + head.len()))
            }
            None => Err(self.truncated(field, len)),
        }
    }

    /// A NUL-terminated UTF-8 string, borrowed.
    fn str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let offset = self.offset();
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.message,
                field,
                offset,
            });
        };
        let (text, tail) = (&self.rest[..nul], &self.rest[nul + 1..]);
        let text = std::str::from_utf8(text).map_err(|_| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset,
        })?;
        self.rest = tail;
        Ok(text)
    }

    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        self.str(field).map(str::to_owned)
    }

    /// pgoutput sends "" for pg_catalog.
    fn namespace(&mut self) -> Result<String, DecodeError> {
        match self.str("namespace")? {
            "" => Ok("pg_catalog".to_owned()),
            namespace => Ok(namespace.to_owned()),
        }
    }

    fn expect_marker(&mut self, expected: u8, what: &'static str) -> Result<(), DecodeError> {
        let offset = self.offset();
        match self.u8("tuple marker")? {
            found if found == expected => Ok(()),
            found => Err(self.unexpected_marker(what, found, offset)),
        }
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let oid = self.u32("relation OID")?;
        let namespace = self.namespace()?;
        let name = self.string("relation name")?;
        let identity_offset = self.offset();
        let identity = self.u8("replica identity")?;
        let replica_identity =
            ReplicaIdentity::from_byte(identity).ok_or(DecodeError::BadReplicaIdentity {
                relation: oid,
                byte: identity,
                offset: identity_offset,
            })?;
        let count = usize::from(self.u16("column count")?);
        // A column takes at least 10 bytes (flags, empty name, type OID, modifier).
        let mut columns = Vec::with_capacity(count.min(self.rest.len() / 10));
        for _ in 0..count {
            let flags = self.u8("column flags")?;
            let name = self.string("column name")?;
            let type_oid = self.u32("column type OID")?;
            let type_modifier = self.i32("column type modifier")?;
            columns.push(Column {
                name,
                is_key: flags & 1 != 0,
                type_oid,
                type_modifier,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// TupleData: Int16 column count, then per column a kind byte and for 't'/'b' an Int32 length
    /// and the bytes. The hot path of the whole decoder.
    #[inline]
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = usize::from(self.u16("column count")?);
        // Every column takes at least its kind byte, so a hostile count cannot reserve more than
        // the payload could fill.
        let mut values = Vec::with_capacity(count.min(self.rest.len()));
        for column in 0..count {
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.column_bytes()?),
                b'b' => Value::Binary(self.column_bytes()?),
                kind => return Err(self.unknown_kind(column, kind)),
            };
            values.push(value);
        }
        Ok(values)
    }

    #[inline]
    fn column_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.len_i32("column length")?;
        self.bytes("column value", len)
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message: self.message,
                count: self.rest.len(),
                offset: self.offset(),
            })
        }
    }

    // Error constructors stay out of line so the hot paths remain small.

    #[cold]
    #[inline(never)]
    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            offset: self.offset(),
            needed,
            available: self.rest.len(),
        }
    }

    #[cold]
    #[inline(never)]
    fn negative(&self, field: &'static str, length: i32) -> DecodeError {
        DecodeError::NegativeLength {
            message: self.message,
            field,
            length,
            offset: self.offset() - 4,
        }
    }

    #[cold]
    #[inline(never)]
    fn unknown_kind(&self, column: usize, kind: u8) -> DecodeError {
        DecodeError::UnknownTupleKind {
            message: self.message,
            column,
            kind,
            offset: self.offset() - 1,
        }
    }

    #[cold]
    #[inline(never)]
    fn unexpected_marker(&self, expected: &'static str, found: u8, offset: usize) -> DecodeError {
        DecodeError::UnexpectedTupleMarker {
            message: self.message,
            expected,
            found,
            offset,
        }
    }
}
