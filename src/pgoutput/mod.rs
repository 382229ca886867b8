//! A sans-IO decoder for pgoutput, PostgreSQL's logical replication output plugin: it turns the
//! payload of one XLogData frame into one [`LogicalMessage`]. It covers every message PostgreSQL
//! 14 to 17 sends for protocol versions 1 and 2 (including streamed in-progress transactions) and
//! the abort LSN and time that protocol version 4 appends to Stream Abort. It owns no socket and
//! no buffer: the caller hands it one complete payload at a time, and column values come back as
//! zero-copy slices of that payload. Malformed input is always an error that says what was wrong
//! and where, never a panic. [`encode`] builds the same wire bytes for tests, benchmarks and
//! fuzzing.
//!
//! The module holds the messages and their errors; [`decode`] the decoder, [`encode`] the
//! encoder, and the tests sit beside them.

mod decode;
#[doc(hidden)]
pub mod encode;
#[cfg(test)]
mod tests;

pub use decode::Decoder;

use bytes::Bytes;

use crate::model::{Lsn, Oid, OldTuple, PgTimestamp, Relation, Tuple, Xid};

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
