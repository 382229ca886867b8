//! Builds pgoutput wire bytes exactly as the server sends them, for tests, benchmarks and fuzzing.
//! Inputs are trusted: a tuple of more than 65535 columns or a name containing NUL panics or
//! produces a different message.

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
        LogicalMessage::StreamStart { xid, first_segment } => stream_start(*xid, *first_segment),
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
