//! A sans-IO decoder for pgoutput, PostgreSQL's logical replication output plugin: it turns the
//! payload of one XLogData frame into one [`LogicalMessage`]. It covers every message PostgreSQL
//! 14 to 17 sends for protocol versions 1 and 2 (including streamed in-progress transactions) and
//! the abort LSN and time that protocol version 4 appends to Stream Abort. It owns no socket and
//! no buffer: the caller hands it one complete payload at a time, and column values come back as
//! zero-copy slices of that payload. Malformed input is always an error that says what was wrong
//! and where, never a panic. [`encode`] builds the same wire bytes for tests, benchmarks and
//! fuzzing.

use bytes::Bytes;

use crate::model::{
    Column, Lsn, Oid, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Tuple, Value, Xid,
};

/// One pgoutput message. `xid` fields are `Some` only inside a streamed transaction (protocol
/// version 2, between [`LogicalMessage::StreamStart`] and [`LogicalMessage::StreamStop`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogicalMessage {
    /// 'B': a transaction starts; `final_lsn` is the LSN of its commit record.
    Begin {
        final_lsn: Lsn,
        commit_time: PgTimestamp,
        xid: Xid,
    },
    /// 'C': the transaction committed; `end_lsn` is the position to confirm once it is applied.
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// 'O': the transaction came from another node through a replication origin.
    Origin { commit_lsn: Lsn, name: String },
    /// 'R': a relation's shape, sent before its first change and again when it changes.
    Relation {
        xid: Option<Xid>,
        relation: Relation,
    },
    /// 'Y': a non-built-in data type used by a following relation.
    Type {
        xid: Option<Xid>,
        oid: Oid,
        namespace: String,
        name: String,
    },
    /// 'I'
    Insert {
        xid: Option<Xid>,
        relation: Oid,
        new: Tuple,
    },
    /// 'U': `old` is the old key ('K') when the update changed the replica identity columns, the
    /// whole old row ('O') under REPLICA IDENTITY FULL, and `None` otherwise.
    Update {
        xid: Option<Xid>,
        relation: Oid,
        old: Option<OldTuple>,
        new: Tuple,
    },
    /// 'D'
    Delete {
        xid: Option<Xid>,
        relation: Oid,
        old: OldTuple,
    },
    /// 'T'
    Truncate {
        xid: Option<Xid>,
        relations: Vec<Oid>,
        cascade: bool,
        restart_identity: bool,
    },
    /// 'M': a `pg_logical_emit_message` (only with `messages 'true'`).
    Message {
        xid: Option<Xid>,
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Bytes,
    },
    /// 'S': a block of changes of the in-progress transaction `xid` follows.
    StreamStart { xid: Xid, first_segment: bool },
    /// 'E': the block opened by the last Stream Start ends.
    StreamStop,
    /// 'c': the streamed transaction committed.
    StreamCommit {
        xid: Xid,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    },
    /// 'A': the streamed (sub)transaction aborted; the LSN and time come only with protocol
    /// version 4 and `streaming 'parallel'`.
    StreamAbort {
        xid: Xid,
        subxact_xid: Xid,
        abort_lsn: Option<Lsn>,
        abort_time: Option<PgTimestamp>,
    },
}

impl LogicalMessage {
    /// The message's name as PostgreSQL's documentation spells it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            LogicalMessage::Begin { .. } => "Begin",
            LogicalMessage::Commit { .. } => "Commit",
            LogicalMessage::Origin { .. } => "Origin",
            LogicalMessage::Relation { .. } => "Relation",
            LogicalMessage::Type { .. } => "Type",
            LogicalMessage::Insert { .. } => "Insert",
            LogicalMessage::Update { .. } => "Update",
            LogicalMessage::Delete { .. } => "Delete",
            LogicalMessage::Truncate { .. } => "Truncate",
            LogicalMessage::Message { .. } => "Message",
            LogicalMessage::StreamStart { .. } => "Stream Start",
            LogicalMessage::StreamStop => "Stream Stop",
            LogicalMessage::StreamCommit { .. } => "Stream Commit",
            LogicalMessage::StreamAbort { .. } => "Stream Abort",
        }
    }
}

/// What was wrong with a payload. Offsets count from the payload's first byte (the tag).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message: no tag byte")]
    Empty,
    #[error(
        "truncated {message} message: {field} needs {needed} bytes at offset {offset}, only {available} left"
    )]
    Truncated {
        message: &'static str,
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "truncated {message} message: {field} starting at offset {offset} has no terminating NUL"
    )]
    UnterminatedString {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    #[error("unknown pgoutput message tag {}", show_byte(*.tag))]
    UnknownTag { tag: u8 },
    #[error(
        "{message} message (tag {}) belongs to two-phase commit (protocol version 3), which is not supported: start replication without two_phase",
        show_byte(*.tag)
    )]
    TwoPhaseUnsupported { message: &'static str, tag: u8 },
    #[error("{message} message: column {column} has unknown tuple data kind {} at offset {offset}", show_byte(*.kind))]
    UnknownTupleKind {
        message: &'static str,
        column: usize,
        kind: u8,
        offset: usize,
    },
    #[error("{message} message: expected {expected} at offset {offset}, found {}", show_byte(*.found))]
    UnexpectedTupleMarker {
        message: &'static str,
        expected: &'static str,
        found: u8,
        offset: usize,
    },
    #[error("Relation message for OID {relation}: unknown replica identity {} at offset {offset}", show_byte(*.byte))]
    BadReplicaIdentity {
        relation: Oid,
        byte: u8,
        offset: usize,
    },
    #[error("{message} message: {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    #[error("{message} message: negative {field} {length} at offset {offset}")]
    NegativeLength {
        message: &'static str,
        field: &'static str,
        length: i32,
        offset: usize,
    },
    #[error("{message} message: {count} trailing bytes after the message ends at offset {offset}")]
    TrailingBytes {
        message: &'static str,
        count: usize,
        offset: usize,
    },
    #[error(
        "Stream Start for transaction {xid} while the stream of transaction {open_xid} is still open"
    )]
    StreamStartInsideStream { xid: Xid, open_xid: Xid },
    #[error("Stream Stop without an open stream")]
    StreamStopOutsideStream,
    #[error(
        "{message} message inside the streamed block of transaction {open_xid}; only changes belong there"
    )]
    NotAllowedInStream {
        message: &'static str,
        open_xid: Xid,
    },
}

/// A byte as `'X'` when printable, and always in hex.
fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}' (0x{b:02x})", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

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

/// Builds pgoutput wire bytes exactly as the server sends them, for tests, benchmarks and fuzzing.
/// Inputs are trusted: a tuple of more than 65535 columns or a name containing NUL panics or
/// produces a different message.
#[doc(hidden)]
pub mod encode {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::LogicalMessage;
    use crate::model::{Lsn, Oid, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Value, Xid};

    fn start(tag: u8, xid: Option<Xid>) -> BytesMut {
        let mut buf = BytesMut::with_capacity(64);
        buf.put_u8(tag);
        if let Some(xid) = xid {
            buf.put_u32(xid);
        }
        buf
    }

    fn put_str(buf: &mut BytesMut, s: &str) {
        buf.put_slice(s.as_bytes());
        buf.put_u8(0);
    }

    fn put_namespace(buf: &mut BytesMut, namespace: &str) {
        put_str(
            buf,
            if namespace == "pg_catalog" {
                ""
            } else {
                namespace
            },
        );
    }

    fn put_len(buf: &mut BytesMut, len: usize) {
        buf.put_i32(i32::try_from(len).expect("length fits in Int32"));
    }

    /// TupleData.
    pub fn put_tuple(buf: &mut BytesMut, tuple: &[Value]) {
        buf.put_u16(u16::try_from(tuple.len()).expect("at most 65535 columns"));
        for value in tuple {
            match value {
                Value::Null => buf.put_u8(b'n'),
                Value::UnchangedToast => buf.put_u8(b'u'),
                Value::Text(bytes) | Value::Binary(bytes) => {
                    buf.put_u8(if matches!(value, Value::Text(_)) {
                        b't'
                    } else {
                        b'b'
                    });
                    put_len(buf, bytes.len());
                    buf.put_slice(bytes);
                }
            }
        }
    }

    fn put_old(buf: &mut BytesMut, old: &OldTuple) {
        match old {
            OldTuple::Key(_) => buf.put_u8(b'K'),
            OldTuple::Full(_) => buf.put_u8(b'O'),
        }
        put_tuple(buf, old.tuple());
    }

    pub fn begin(final_lsn: Lsn, commit_time: PgTimestamp, xid: Xid) -> Bytes {
        let mut buf = start(b'B', None);
        buf.put_u64(final_lsn.0);
        buf.put_i64(commit_time.0);
        buf.put_u32(xid);
        buf.freeze()
    }

    pub fn commit(flags: u8, commit_lsn: Lsn, end_lsn: Lsn, commit_time: PgTimestamp) -> Bytes {
        let mut buf = start(b'C', None);
        buf.put_u8(flags);
        buf.put_u64(commit_lsn.0);
        buf.put_u64(end_lsn.0);
        buf.put_i64(commit_time.0);
        buf.freeze()
    }

    pub fn origin(commit_lsn: Lsn, name: &str) -> Bytes {
        let mut buf = start(b'O', None);
        buf.put_u64(commit_lsn.0);
        put_str(&mut buf, name);
        buf.freeze()
    }

    pub fn relation(xid: Option<Xid>, relation: &Relation) -> Bytes {
        let mut buf = start(b'R', xid);
        buf.put_u32(relation.oid);
        put_namespace(&mut buf, &relation.namespace);
        put_str(&mut buf, &relation.name);
        buf.put_u8(match relation.replica_identity {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        });
        buf.put_u16(u16::try_from(relation.columns.len()).expect("at most 65535 columns"));
        for column in &relation.columns {
            buf.put_u8(u8::from(column.is_key));
            put_str(&mut buf, &column.name);
            buf.put_u32(column.type_oid);
            buf.put_i32(column.type_modifier);
        }
        buf.freeze()
    }

    pub fn type_(xid: Option<Xid>, oid: Oid, namespace: &str, name: &str) -> Bytes {
        let mut buf = start(b'Y', xid);
        buf.put_u32(oid);
        put_namespace(&mut buf, namespace);
        put_str(&mut buf, name);
        buf.freeze()
    }

    pub fn insert(xid: Option<Xid>, relation: Oid, new: &[Value]) -> Bytes {
        let mut buf = start(b'I', xid);
        buf.put_u32(relation);
        buf.put_u8(b'N');
        put_tuple(&mut buf, new);
        buf.freeze()
    }

    pub fn update(xid: Option<Xid>, relation: Oid, old: Option<&OldTuple>, new: &[Value]) -> Bytes {
        let mut buf = start(b'U', xid);
        buf.put_u32(relation);
        if let Some(old) = old {
            put_old(&mut buf, old);
        }
        buf.put_u8(b'N');
        put_tuple(&mut buf, new);
        buf.freeze()
    }

    pub fn delete(xid: Option<Xid>, relation: Oid, old: &OldTuple) -> Bytes {
        let mut buf = start(b'D', xid);
        buf.put_u32(relation);
        put_old(&mut buf, old);
        buf.freeze()
    }

    pub fn truncate(
        xid: Option<Xid>,
        relations: &[Oid],
        cascade: bool,
        restart_identity: bool,
    ) -> Bytes {
        let mut buf = start(b'T', xid);
        put_len(&mut buf, relations.len());
        buf.put_u8(u8::from(cascade) | (u8::from(restart_identity) << 1));
        for &oid in relations {
            buf.put_u32(oid);
        }
        buf.freeze()
    }

    pub fn message(
        xid: Option<Xid>,
        transactional: bool,
        lsn: Lsn,
        prefix: &str,
        content: &[u8],
    ) -> Bytes {
        let mut buf = start(b'M', xid);
        buf.put_u8(u8::from(transactional));
        buf.put_u64(lsn.0);
        put_str(&mut buf, prefix);
        put_len(&mut buf, content.len());
        buf.put_slice(content);
        buf.freeze()
    }

    pub fn stream_start(xid: Xid, first_segment: bool) -> Bytes {
        let mut buf = start(b'S', None);
        buf.put_u32(xid);
        buf.put_u8(u8::from(first_segment));
        buf.freeze()
    }

    pub fn stream_stop() -> Bytes {
        Bytes::from_static(b"E")
    }

    pub fn stream_commit(
        xid: Xid,
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: PgTimestamp,
    ) -> Bytes {
        let mut buf = start(b'c', None);
        buf.put_u32(xid);
        buf.put_u8(flags);
        buf.put_u64(commit_lsn.0);
        buf.put_u64(end_lsn.0);
        buf.put_i64(commit_time.0);
        buf.freeze()
    }

    /// `abort` is the protocol 4 (parallel streaming) abort LSN and time.
    pub fn stream_abort(xid: Xid, subxact_xid: Xid, abort: Option<(Lsn, PgTimestamp)>) -> Bytes {
        let mut buf = start(b'A', None);
        buf.put_u32(xid);
        buf.put_u32(subxact_xid);
        if let Some((lsn, time)) = abort {
            buf.put_u64(lsn.0);
            buf.put_i64(time.0);
        }
        buf.freeze()
    }

    /// Any message. A Stream Abort is written with its protocol 4 fields when `abort_lsn` is set
    /// (a missing `abort_time` is then written as 0).
    pub fn logical_message(msg: &LogicalMessage) -> Bytes {
        match msg {
            LogicalMessage::Begin {
                final_lsn,
                commit_time,
                xid,
            } => begin(*final_lsn, *commit_time, *xid),
            LogicalMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => commit(*flags, *commit_lsn, *end_lsn, *commit_time),
            LogicalMessage::Origin { commit_lsn, name } => origin(*commit_lsn, name),
            LogicalMessage::Relation { xid, relation: rel } => relation(*xid, rel),
            LogicalMessage::Type {
                xid,
                oid,
                namespace,
                name,
            } => type_(*xid, *oid, namespace, name),
            LogicalMessage::Insert { xid, relation, new } => insert(*xid, *relation, new),
            LogicalMessage::Update {
                xid,
                relation,
                old,
                new,
            } => update(*xid, *relation, old.as_ref(), new),
            LogicalMessage::Delete { xid, relation, old } => delete(*xid, *relation, old),
            LogicalMessage::Truncate {
                xid,
                relations,
                cascade,
                restart_identity,
            } => truncate(*xid, relations, *cascade, *restart_identity),
            LogicalMessage::Message {
                xid,
                transactional,
                lsn,
                prefix,
                content,
            } => message(*xid, *transactional, *lsn, prefix, content),
            LogicalMessage::StreamStart { xid, first_segment } => {
                stream_start(*xid, *first_segment)
            }
            LogicalMessage::StreamStop => stream_stop(),
            LogicalMessage::StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => stream_commit(*xid, *flags, *commit_lsn, *end_lsn, *commit_time),
            LogicalMessage::StreamAbort {
                xid,
                subxact_xid,
                abort_lsn,
                abort_time,
            } => stream_abort(
                *xid,
                *subxact_xid,
                abort_lsn.map(|lsn| (lsn, abort_time.unwrap_or_default())),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REL: Oid = 16385;
    const XID: Xid = 1000;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn binary(b: &[u8]) -> Value {
        Value::Binary(Bytes::copy_from_slice(b))
    }

    /// A decoder inside the streamed block of `XID`.
    fn streaming() -> Decoder {
        let mut decoder = Decoder::new();
        decoder.decode(encode::stream_start(XID, true)).unwrap();
        decoder
    }

    fn decoder_for(streamed: bool) -> Decoder {
        if streamed {
            streaming()
        } else {
            Decoder::new()
        }
    }

    fn decode(streamed: bool, bytes: &[u8]) -> Result<LogicalMessage, DecodeError> {
        decoder_for(streamed).decode(Bytes::copy_from_slice(bytes))
    }

    fn products() -> Relation {
        Relation {
            oid: REL,
            namespace: "shop".into(),
            name: "products".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "id".into(),
                    is_key: true,
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    name: "name".into(),
                    is_key: false,
                    type_oid: 25,
                    type_modifier: -1,
                },
                Column {
                    name: "price".into(),
                    is_key: false,
                    type_oid: 1700,
                    type_modifier: 655366,
                },
            ],
        }
    }

    // ---- Hand-written fixtures: the bytes come from the protocol documentation, not the encoder.

    const BEGIN: &[u8] = &[
        b'B', //
        0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x48, // final LSN 1/6B374D48
        0, 2, 0x9D, 0x3A, 0x1B, 0x2C, 0x3D, 0x4E, // commit time
        0, 0, 2, 0xE9, // xid 745
    ];

    const COMMIT: &[u8] = &[
        b'C', 0, // flags
        0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x48, // commit LSN
        0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x78, // end LSN
        0, 2, 0x9D, 0x3A, 0x1B, 0x2C, 0x3D, 0x4E, // commit time
    ];

    /// Protocol 1 Relation in pg_catalog (namespace sent as ""), REPLICA IDENTITY FULL.
    const RELATION_PG_CATALOG: &[u8] = &[
        b'R', 0, 0, 0x40, 0x01, // OID 16385
        0,    // namespace ""
        b't', b'a', b'g', b's', 0,    // name
        b'f', // replica identity full
        0, 2, // columns
        1, b'i', b'd', 0, 0, 0, 0, 23, 0xFF, 0xFF, 0xFF, 0xFF, // key int4, typmod -1
        0, b'n', b'a', b'm', b'e', 0, 0, 0, 0, 25, 0xFF, 0xFF, 0xFF, 0xFF, // text
    ];

    /// Protocol 2 streamed Insert with every tuple kind.
    const INSERT_STREAMED: &[u8] = &[
        b'I', 0, 0, 0x03, 0xE8, // xid 1000
        0, 0, 0x40, 0x01, // relation
        b'N', 0, 4, // 4 columns
        b'n', b'u', //
        b't', 0, 0, 0, 2, b'h', b'i', //
        b'b', 0, 0, 0, 3, 1, 2, 3,
    ];

    const UPDATE_KEY: &[u8] = &[
        b'U', 0, 0, 0x40, 0x01, //
        b'K', 0, 2, b't', 0, 0, 0, 1, b'7', b'n', //
        b'N', 0, 2, b't', 0, 0, 0, 1, b'8', b't', 0, 0, 0, 3, b'a', b'b', b'c',
    ];

    const TRUNCATE: &[u8] = &[
        b'T', 0, 0, 0, 2, // two relations
        3, // CASCADE | RESTART IDENTITY
        0, 0, 0x40, 0x01, 0, 0, 0x40, 0x02,
    ];

    const MESSAGE: &[u8] = &[
        b'M', 1, // transactional
        0, 0, 0, 0, 0, 0, 0x10, 0x00, // LSN
        b'p', b'f', b'x', 0, // prefix
        0, 0, 0, 3, b'a', b'b', b'c',
    ];

    /// Protocol 4 Stream Abort with the abort LSN and time.
    const STREAM_ABORT_V4: &[u8] = &[
        b'A', 0, 0, 0x03, 0xE8, 0, 0, 0x03, 0xE9, //
        0, 0, 0, 0, 0, 0, 0x20, 0x00, // abort LSN
        0, 0, 0, 0, 0, 0, 0, 42, // abort time
    ];

    #[test]
    fn hand_written_fixtures_decode_and_the_encoder_matches_them() {
        let cases: Vec<(&[u8], bool, LogicalMessage, Bytes)> = vec![
            (
                BEGIN,
                false,
                LogicalMessage::Begin {
                    final_lsn: Lsn(0x1_6B37_4D48),
                    commit_time: PgTimestamp(0x0002_9D3A_1B2C_3D4E),
                    xid: 745,
                },
                encode::begin(Lsn(0x1_6B37_4D48), PgTimestamp(0x0002_9D3A_1B2C_3D4E), 745),
            ),
            (
                COMMIT,
                false,
                LogicalMessage::Commit {
                    flags: 0,
                    commit_lsn: Lsn(0x1_6B37_4D48),
                    end_lsn: Lsn(0x1_6B37_4D78),
                    commit_time: PgTimestamp(0x0002_9D3A_1B2C_3D4E),
                },
                encode::commit(
                    0,
                    Lsn(0x1_6B37_4D48),
                    Lsn(0x1_6B37_4D78),
                    PgTimestamp(0x0002_9D3A_1B2C_3D4E),
                ),
            ),
            {
                let relation = Relation {
                    oid: REL,
                    namespace: "pg_catalog".into(),
                    name: "tags".into(),
                    replica_identity: ReplicaIdentity::Full,
                    columns: vec![
                        Column {
                            name: "id".into(),
                            is_key: true,
                            type_oid: 23,
                            type_modifier: -1,
                        },
                        Column {
                            name: "name".into(),
                            is_key: false,
                            type_oid: 25,
                            type_modifier: -1,
                        },
                    ],
                };
                let bytes = encode::relation(None, &relation);
                (
                    RELATION_PG_CATALOG,
                    false,
                    LogicalMessage::Relation {
                        xid: None,
                        relation,
                    },
                    bytes,
                )
            },
            {
                let new = vec![
                    Value::Null,
                    Value::UnchangedToast,
                    text("hi"),
                    binary(&[1, 2, 3]),
                ];
                let bytes = encode::insert(Some(XID), REL, &new);
                (
                    INSERT_STREAMED,
                    true,
                    LogicalMessage::Insert {
                        xid: Some(XID),
                        relation: REL,
                        new,
                    },
                    bytes,
                )
            },
            {
                let old = OldTuple::Key(vec![text("7"), Value::Null]);
                let new = vec![text("8"), text("abc")];
                let bytes = encode::update(None, REL, Some(&old), &new);
                (
                    UPDATE_KEY,
                    false,
                    LogicalMessage::Update {
                        xid: None,
                        relation: REL,
                        old: Some(old),
                        new,
                    },
                    bytes,
                )
            },
            (
                TRUNCATE,
                false,
                LogicalMessage::Truncate {
                    xid: None,
                    relations: vec![REL, REL + 1],
                    cascade: true,
                    restart_identity: true,
                },
                encode::truncate(None, &[REL, REL + 1], true, true),
            ),
            (
                MESSAGE,
                false,
                LogicalMessage::Message {
                    xid: None,
                    transactional: true,
                    lsn: Lsn(0x1000),
                    prefix: "pfx".into(),
                    content: Bytes::from_static(b"abc"),
                },
                encode::message(None, true, Lsn(0x1000), "pfx", b"abc"),
            ),
            (
                STREAM_ABORT_V4,
                false,
                LogicalMessage::StreamAbort {
                    xid: 1000,
                    subxact_xid: 1001,
                    abort_lsn: Some(Lsn(0x2000)),
                    abort_time: Some(PgTimestamp(42)),
                },
                encode::stream_abort(1000, 1001, Some((Lsn(0x2000), PgTimestamp(42)))),
            ),
        ];
        for (bytes, streamed, expected, encoded) in cases {
            assert_eq!(decode(streamed, bytes).unwrap(), expected, "{bytes:?}");
            assert_eq!(
                &encoded[..],
                bytes,
                "encoder disagrees with the fixture for {}",
                expected.name()
            );
        }
    }

    /// Every message shape: (streamed decoder?, message). Used for the round trip and for the
    /// truncation sweep.
    fn all_fixtures() -> Vec<(bool, LogicalMessage)> {
        let row = vec![
            text("42"),
            text("Widget"),
            Value::Null,
            Value::UnchangedToast,
            binary(b"\x00\x01"),
        ];
        let key = OldTuple::Key(vec![
            text("42"),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Null,
        ]);
        let full = OldTuple::Full(row.clone());
        let mut fixtures = vec![
            (
                false,
                LogicalMessage::Begin {
                    final_lsn: Lsn(0x16_B374_D848),
                    commit_time: PgTimestamp(1),
                    xid: 7,
                },
            ),
            (
                false,
                LogicalMessage::Commit {
                    flags: 0,
                    commit_lsn: Lsn(10),
                    end_lsn: Lsn(20),
                    commit_time: PgTimestamp(-5),
                },
            ),
            (
                false,
                LogicalMessage::Origin {
                    commit_lsn: Lsn(99),
                    name: "node_a".into(),
                },
            ),
            (
                false,
                LogicalMessage::StreamStart {
                    xid: 5,
                    first_segment: true,
                },
            ),
            (
                false,
                LogicalMessage::StreamStart {
                    xid: 5,
                    first_segment: false,
                },
            ),
            (true, LogicalMessage::StreamStop),
            (
                false,
                LogicalMessage::StreamCommit {
                    xid: 5,
                    flags: 0,
                    commit_lsn: Lsn(30),
                    end_lsn: Lsn(40),
                    commit_time: PgTimestamp(50),
                },
            ),
            (
                false,
                LogicalMessage::StreamAbort {
                    xid: 5,
                    subxact_xid: 6,
                    abort_lsn: None,
                    abort_time: None,
                },
            ),
            (
                false,
                LogicalMessage::StreamAbort {
                    xid: 5,
                    subxact_xid: 6,
                    abort_lsn: Some(Lsn(60)),
                    abort_time: Some(PgTimestamp(70)),
                },
            ),
        ];
        for (streamed, xid) in [(false, None), (true, Some(XID))] {
            fixtures.extend([
                (
                    streamed,
                    LogicalMessage::Relation {
                        xid,
                        relation: products(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Relation {
                        xid,
                        relation: Relation {
                            namespace: "pg_catalog".into(),
                            replica_identity: ReplicaIdentity::Nothing,
                            columns: vec![],
                            ..products()
                        },
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Relation {
                        xid,
                        relation: Relation {
                            replica_identity: ReplicaIdentity::Index,
                            ..products()
                        },
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Type {
                        xid,
                        oid: 90001,
                        namespace: "public".into(),
                        name: "mood".into(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Type {
                        xid,
                        oid: 90002,
                        namespace: "pg_catalog".into(),
                        name: "x".into(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Insert {
                        xid,
                        relation: REL,
                        new: row.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Insert {
                        xid,
                        relation: REL,
                        new: vec![],
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Update {
                        xid,
                        relation: REL,
                        old: None,
                        new: row.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Update {
                        xid,
                        relation: REL,
                        old: Some(key.clone()),
                        new: row.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Update {
                        xid,
                        relation: REL,
                        old: Some(full.clone()),
                        new: row.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Delete {
                        xid,
                        relation: REL,
                        old: key.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Delete {
                        xid,
                        relation: REL,
                        old: full.clone(),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Message {
                        xid,
                        transactional: true,
                        lsn: Lsn(1),
                        prefix: "app".into(),
                        content: Bytes::from_static(b"payload"),
                    },
                ),
                (
                    streamed,
                    LogicalMessage::Message {
                        xid,
                        transactional: false,
                        lsn: Lsn(2),
                        prefix: "".into(),
                        content: Bytes::new(),
                    },
                ),
            ]);
            for (cascade, restart_identity) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                fixtures.push((
                    streamed,
                    LogicalMessage::Truncate {
                        xid,
                        relations: vec![REL, REL + 7],
                        cascade,
                        restart_identity,
                    },
                ));
            }
        }
        fixtures
    }

    #[test]
    fn every_message_round_trips() {
        for (streamed, message) in all_fixtures() {
            let bytes = encode::logical_message(&message);
            assert_eq!(decoder_for(streamed).decode(bytes).unwrap(), message);
        }
    }

    #[test]
    fn every_truncated_prefix_is_an_error() {
        let mut fixtures: Vec<(bool, Bytes)> = all_fixtures()
            .iter()
            .map(|(s, m)| (*s, encode::logical_message(m)))
            .collect();
        for hand in [
            BEGIN,
            COMMIT,
            RELATION_PG_CATALOG,
            UPDATE_KEY,
            TRUNCATE,
            MESSAGE,
            STREAM_ABORT_V4,
        ] {
            fixtures.push((false, Bytes::from_static(hand)));
        }
        fixtures.push((true, Bytes::from_static(INSERT_STREAMED)));
        for (streamed, bytes) in fixtures {
            for len in 0..bytes.len() {
                let result = decoder_for(streamed).decode(bytes.slice(..len));
                // The only valid prefix: a protocol 4 Stream Abort cut before its optional fields.
                if bytes[0] == b'A' && len == 9 {
                    assert!(matches!(
                        result,
                        Ok(LogicalMessage::StreamAbort {
                            abort_lsn: None,
                            ..
                        })
                    ));
                } else {
                    assert!(
                        result.is_err(),
                        "prefix {len} of {bytes:?} decoded as {result:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn column_values_are_slices_of_the_payload() {
        let payload = Bytes::from_static(INSERT_STREAMED);
        let LogicalMessage::Insert { new, .. } = streaming().decode(payload.clone()).unwrap()
        else {
            panic!("not an insert");
        };
        let range = payload.as_ptr_range();
        for value in new {
            if let Value::Text(b) | Value::Binary(b) = value {
                assert!(range.contains(&b.as_ptr()), "column bytes were copied");
            }
        }
    }

    #[test]
    fn streamed_block_state() {
        let mut decoder = Decoder::new();
        assert!(!decoder.in_streamed_block());
        assert_eq!(
            decoder.decode(encode::stream_stop()),
            Err(DecodeError::StreamStopOutsideStream)
        );
        decoder.decode(encode::stream_start(5, true)).unwrap();
        assert!(decoder.in_streamed_block());
        assert_eq!(
            decoder.decode(encode::stream_start(6, true)),
            Err(DecodeError::StreamStartInsideStream {
                xid: 6,
                open_xid: 5
            })
        );
        for boundary in [
            encode::begin(Lsn(1), PgTimestamp(1), 9),
            encode::commit(0, Lsn(1), Lsn(2), PgTimestamp(1)),
            encode::stream_commit(5, 0, Lsn(1), Lsn(2), PgTimestamp(1)),
            encode::stream_abort(5, 5, None),
        ] {
            assert!(matches!(
                decoder.decode(boundary),
                Err(DecodeError::NotAllowedInStream { open_xid: 5, .. })
            ));
        }
        // A failed Stream Stop leaves the block open.
        assert!(decoder.decode(Bytes::from_static(b"Ex")).is_err());
        assert!(decoder.in_streamed_block());
        // Inside the block changes carry the xid.
        assert_eq!(
            decoder
                .decode(encode::insert(Some(5), REL, &[text("a")]))
                .unwrap(),
            LogicalMessage::Insert {
                xid: Some(5),
                relation: REL,
                new: vec![text("a")]
            }
        );
        assert_eq!(
            decoder.decode(encode::stream_stop()),
            Ok(LogicalMessage::StreamStop)
        );
        assert!(!decoder.in_streamed_block());
        // A truncated Stream Start does not open a block.
        assert!(decoder.decode(Bytes::from_static(b"S\0\0\0")).is_err());
        assert!(!decoder.in_streamed_block());
    }

    #[test]
    fn errors_name_what_was_wrong() {
        assert_eq!(decode(false, b""), Err(DecodeError::Empty));
        assert_eq!(
            decode(false, b"Z"),
            Err(DecodeError::UnknownTag { tag: b'Z' })
        );
        assert_eq!(
            DecodeError::UnknownTag { tag: b'Z' }.to_string(),
            "unknown pgoutput message tag 'Z' (0x5a)"
        );
        assert!(matches!(
            decode(false, b"P"),
            Err(DecodeError::TwoPhaseUnsupported { tag: b'P', .. })
        ));

        // Unknown tuple kind 'x' in column 1 at offset 9.
        let bad_kind = [b'I', 0, 0, 0x40, 1, b'N', 0, 2, b'n', b'x'];
        assert_eq!(
            decode(false, &bad_kind),
            Err(DecodeError::UnknownTupleKind {
                message: "Insert",
                column: 1,
                kind: b'x',
                offset: 9
            })
        );

        let mut trailing = INSERT_STREAMED.to_vec();
        trailing.extend_from_slice(b"zz");
        assert_eq!(
            decode(true, &trailing),
            Err(DecodeError::TrailingBytes {
                message: "Insert",
                count: 2,
                offset: INSERT_STREAMED.len()
            })
        );
        let mut trailing_abort = STREAM_ABORT_V4.to_vec();
        trailing_abort.push(0);
        assert!(matches!(
            decode(false, &trailing_abort),
            Err(DecodeError::TrailingBytes { count: 1, .. })
        ));

        let mut bad_identity = RELATION_PG_CATALOG.to_vec();
        bad_identity[11] = b'q';
        assert_eq!(
            decode(false, &bad_identity),
            Err(DecodeError::BadReplicaIdentity {
                relation: REL,
                byte: b'q',
                offset: 11
            })
        );

        let mut bad_utf8 = RELATION_PG_CATALOG.to_vec();
        bad_utf8[6] = 0xFF;
        assert_eq!(
            decode(false, &bad_utf8),
            Err(DecodeError::InvalidUtf8 {
                message: "Relation",
                field: "relation name",
                offset: 6
            })
        );

        let negative = [
            b'I', 0, 0, 0x40, 1, b'N', 0, 1, b't', 0xFF, 0xFF, 0xFF, 0xFE,
        ];
        assert_eq!(
            decode(false, &negative),
            Err(DecodeError::NegativeLength {
                message: "Insert",
                field: "column length",
                length: -2,
                offset: 9
            })
        );
        let negative_truncate = [b'T', 0x80, 0, 0, 0, 0];
        assert!(matches!(
            decode(false, &negative_truncate),
            Err(DecodeError::NegativeLength { .. })
        ));

        assert_eq!(
            decode(true, &INSERT_STREAMED[..11]),
            Err(DecodeError::Truncated {
                message: "Insert",
                field: "column count",
                offset: 10,
                needed: 2,
                available: 1
            })
        );
        assert!(matches!(
            decode(false, &[b'O', 0, 0, 0, 0, 0, 0, 0, 1, b'a']),
            Err(DecodeError::UnterminatedString { .. })
        ));

        let wrong_marker = [b'I', 0, 0, 0x40, 1, b'K', 0, 0];
        assert!(matches!(
            decode(false, &wrong_marker),
            Err(DecodeError::UnexpectedTupleMarker {
                found: b'K',
                offset: 5,
                ..
            })
        ));
        let wrong_update = [b'U', 0, 0, 0x40, 1, b'X', 0, 0];
        assert!(matches!(
            decode(false, &wrong_update),
            Err(DecodeError::UnexpectedTupleMarker { .. })
        ));
        let wrong_delete = [b'D', 0, 0, 0x40, 1, b'N', 0, 0];
        assert!(matches!(
            decode(false, &wrong_delete),
            Err(DecodeError::UnexpectedTupleMarker { .. })
        ));
        // Update whose old tuple is not followed by 'N'.
        let update_no_new = [b'U', 0, 0, 0x40, 1, b'K', 0, 0, b'K', 0, 0];
        assert!(matches!(
            decode(false, &update_no_new),
            Err(DecodeError::UnexpectedTupleMarker { .. })
        ));
    }

    #[test]
    fn hostile_counts_do_not_allocate_up_front() {
        // 65535 columns announced, none present.
        let insert = [b'I', 0, 0, 0x40, 1, b'N', 0xFF, 0xFF];
        assert!(matches!(
            decode(false, &insert),
            Err(DecodeError::Truncated {
                field: "column kind",
                ..
            })
        ));
        let relation = [b'R', 0, 0, 0x40, 1, 0, b't', 0, b'd', 0xFF, 0xFF];
        assert!(matches!(
            decode(false, &relation),
            Err(DecodeError::Truncated { .. })
        ));
        let truncate = [b'T', 0x7F, 0xFF, 0xFF, 0xFF, 0];
        assert!(matches!(
            decode(false, &truncate),
            Err(DecodeError::Truncated { .. })
        ));
        let message = [b'M', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            decode(false, &message),
            Err(DecodeError::Truncated {
                field: "content",
                ..
            })
        ));
    }

    // ---- Properties.

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::UnchangedToast),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| Value::Text(Bytes::from(v))),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|v| Value::Binary(Bytes::from(v))),
        ]
    }

    fn arb_tuple() -> impl Strategy<Value = Tuple> {
        proptest::collection::vec(arb_value(), 0..12)
    }

    fn arb_old() -> impl Strategy<Value = OldTuple> {
        prop_oneof![
            arb_tuple().prop_map(OldTuple::Key),
            arb_tuple().prop_map(OldTuple::Full)
        ]
    }

    /// Names never contain NUL; "" is not a namespace pgoutput can mean (it stands for pg_catalog).
    fn arb_name() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    fn arb_namespace() -> impl Strategy<Value = String> {
        prop_oneof![Just("pg_catalog".to_owned()), "\\PC{1,12}"]
    }

    fn arb_relation() -> impl Strategy<Value = Relation> {
        let column = (arb_name(), any::<bool>(), any::<u32>(), any::<i32>()).prop_map(
            |(name, is_key, type_oid, type_modifier)| Column {
                name,
                is_key,
                type_oid,
                type_modifier,
            },
        );
        let identity = prop_oneof![
            Just(ReplicaIdentity::Default),
            Just(ReplicaIdentity::Nothing),
            Just(ReplicaIdentity::Full),
            Just(ReplicaIdentity::Index)
        ];
        (
            any::<u32>(),
            arb_namespace(),
            arb_name(),
            identity,
            proptest::collection::vec(column, 0..8),
        )
            .prop_map(
                |(oid, namespace, name, replica_identity, columns)| Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    fn ts() -> impl Strategy<Value = PgTimestamp> {
        any::<i64>().prop_map(PgTimestamp)
    }

    /// A message that a change-carrying decoder state accepts: `xid` is `Some` for messages sent
    /// inside a streamed block. Returns (decode inside a stream?, message).
    fn arb_message() -> impl Strategy<Value = (bool, LogicalMessage)> {
        let xid = proptest::option::of(any::<u32>());
        let change = prop_oneof![
            (xid.clone(), arb_relation())
                .prop_map(|(xid, relation)| LogicalMessage::Relation { xid, relation }),
            (xid.clone(), any::<u32>(), arb_namespace(), arb_name()).prop_map(
                |(xid, oid, namespace, name)| LogicalMessage::Type {
                    xid,
                    oid,
                    namespace,
                    name
                }
            ),
            (xid.clone(), any::<u32>(), arb_tuple())
                .prop_map(|(xid, relation, new)| LogicalMessage::Insert { xid, relation, new }),
            (
                xid.clone(),
                any::<u32>(),
                proptest::option::of(arb_old()),
                arb_tuple()
            )
                .prop_map(|(xid, relation, old, new)| LogicalMessage::Update {
                    xid,
                    relation,
                    old,
                    new
                }),
            (xid.clone(), any::<u32>(), arb_old())
                .prop_map(|(xid, relation, old)| LogicalMessage::Delete { xid, relation, old }),
            (
                xid.clone(),
                proptest::collection::vec(any::<u32>(), 0..6),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(xid, relations, cascade, restart_identity)| {
                    LogicalMessage::Truncate {
                        xid,
                        relations,
                        cascade,
                        restart_identity,
                    }
                }),
            (
                xid,
                any::<bool>(),
                lsn(),
                arb_name(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(xid, transactional, lsn, prefix, content)| {
                    LogicalMessage::Message {
                        xid,
                        transactional,
                        lsn,
                        prefix,
                        content: content.into(),
                    }
                }),
        ]
        .prop_map(|m| {
            let streamed = match &m {
                LogicalMessage::Relation { xid, .. }
                | LogicalMessage::Type { xid, .. }
                | LogicalMessage::Insert { xid, .. }
                | LogicalMessage::Update { xid, .. }
                | LogicalMessage::Delete { xid, .. }
                | LogicalMessage::Truncate { xid, .. }
                | LogicalMessage::Message { xid, .. } => xid.is_some(),
                _ => false,
            };
            (streamed, m)
        });
        let control = prop_oneof![
            (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                LogicalMessage::Begin {
                    final_lsn,
                    commit_time,
                    xid,
                }
            }),
            (any::<u8>(), lsn(), lsn(), ts()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| {
                    LogicalMessage::Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    }
                }
            ),
            (lsn(), arb_name())
                .prop_map(|(commit_lsn, name)| LogicalMessage::Origin { commit_lsn, name }),
            (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                LogicalMessage::StreamStart { xid, first_segment }
            }),
            (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, commit_time)| LogicalMessage::StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time
                }
            ),
            (
                any::<u32>(),
                any::<u32>(),
                proptest::option::of((lsn(), ts()))
            )
                .prop_map(|(xid, subxact_xid, abort)| LogicalMessage::StreamAbort {
                    xid,
                    subxact_xid,
                    abort_lsn: abort.map(|a| a.0),
                    abort_time: abort.map(|a| a.1),
                }),
        ]
        .prop_map(|m| (false, m));
        prop_oneof![3 => change, 1 => control, 1 => Just((true, LogicalMessage::StreamStop))]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn round_trip((streamed, message) in arb_message()) {
            let bytes = encode::logical_message(&message);
            prop_assert_eq!(decoder_for(streamed).decode(bytes.clone()).unwrap(), message.clone());
            // Every strict prefix is an error, except the protocol 2 form of a protocol 4 Stream
            // Abort.
            for len in 0..bytes.len() {
                let result = decoder_for(streamed).decode(bytes.slice(..len));
                if !(bytes[0] == b'A' && len == 9) {
                    prop_assert!(result.is_err(), "prefix {} decoded as {:?}", len, result);
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(false, &bytes);
            let _ = decode(true, &bytes);
        }

        #[test]
        fn mutated_messages_never_panic(
            (_, message) in arb_message(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode::logical_message(&message).to_vec();
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 if i < bytes.len() => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ if i < bytes.len() => { bytes.remove(i); }
                    _ => {}
                }
            }
            let truncated = &bytes[..cut.index(bytes.len() + 1)];
            for input in [&bytes[..], truncated] {
                for streamed in [false, true] {
                    if let Ok(decoded) = decode(streamed, input) {
                        // Whatever decodes re-encodes to something that decodes the same.
                        let again = decoder_for(streamed).decode(encode::logical_message(&decoded));
                        prop_assert_eq!(again, Ok(decoded));
                    }
                }
            }
        }
    }
}
