//! Sans-IO framing of the streaming replication sub-protocol carried inside CopyData: the
//! server's XLogData and primary keepalive messages, and the client's standby status update.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::model::{Lsn, PgTimestamp};

/// What the server sends inside one CopyData message while streaming.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerCopyData {
    /// 'w': WAL data; for logical replication the payload is one output-plugin message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: PgTimestamp,
        payload: Bytes,
    },
    /// 'k': the server's WAL end and whether it wants a status update now.
    Keepalive {
        wal_end: Lsn,
        send_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// A CopyData body the client cannot interpret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("empty CopyData message from the server")]
    Empty,
    #[error("unknown replication message tag {0:#04x} inside CopyData")]
    UnknownTag(u8),
    #[error("{what} message is {len} bytes long, expected {expected}")]
    BadLength {
        what: &'static str,
        len: usize,
        expected: &'static str,
    },
}

const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;

/// Splits one CopyData body into a replication message. The XLogData payload is a slice of `body`.
pub fn parse_server_copy_data(mut body: Bytes) -> Result<ServerCopyData, FrameError> {
    let tag = *body.first().ok_or(FrameError::Empty)?;
    match tag {
        b'w' => {
            if body.len() < XLOG_DATA_HEADER {
                return Err(FrameError::BadLength {
                    what: "XLogData",
                    len: body.len(),
                    expected: "at least 25",
                });
            }
            body.advance(1);
            let wal_start = Lsn(body.get_u64());
            let wal_end = Lsn(body.get_u64());
            let send_time = PgTimestamp(body.get_i64());
            Ok(ServerCopyData::XLogData {
                wal_start,
                wal_end,
                send_time,
                payload: body,
            })
        }
        b'k' => {
            if body.len() != KEEPALIVE_LEN {
                return Err(FrameError::BadLength {
                    what: "primary keepalive",
                    len: body.len(),
                    expected: "18",
                });
            }
            body.advance(1);
            let wal_end = Lsn(body.get_u64());
            let send_time = PgTimestamp(body.get_i64());
            let reply_requested = body.get_u8() != 0;
            Ok(ServerCopyData::Keepalive {
                wal_end,
                send_time,
                reply_requested,
            })
        }
        other => Err(FrameError::UnknownTag(other)),
    }
}

/// The positions a standby status update reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandbyStatus {
    /// Received by the client (informational for logical slots).
    pub written: Lsn,
    /// Durably applied by the client: the slot's confirmed_flush_lsn advances to this.
    pub flushed: Lsn,
    pub applied: Lsn,
    pub client_time: PgTimestamp,
    pub reply_requested: bool,
}

/// Appends a complete CopyData frame ('d' + length + 'r' standby status update) to `out`.
pub fn encode_standby_status(status: &StandbyStatus, out: &mut BytesMut) {
    const BODY: usize = 1 + 8 + 8 + 8 + 8 + 1;
    out.reserve(1 + 4 + BODY);
    out.put_u8(b'd');
    out.put_i32((4 + BODY) as i32);
    out.put_u8(b'r');
    out.put_u64(status.written.0);
    out.put_u64(status.flushed.0);
    out.put_u64(status.applied.0);
    out.put_i64(status.client_time.0);
    out.put_u8(u8::from(status.reply_requested));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_slices_payload() {
        let mut b = BytesMut::new();
        b.put_u8(b'w');
        b.put_u64(0x1_0000_0010);
        b.put_u64(0x1_0000_0020);
        b.put_i64(42);
        b.put_slice(b"Bpayload");
        let frame = parse_server_copy_data(b.freeze()).unwrap();
        assert_eq!(
            frame,
            ServerCopyData::XLogData {
                wal_start: Lsn(0x1_0000_0010),
                wal_end: Lsn(0x1_0000_0020),
                send_time: PgTimestamp(42),
                payload: Bytes::from_static(b"Bpayload"),
            }
        );
    }

    #[test]
    fn parses_keepalive() {
        let mut b = BytesMut::new();
        b.put_u8(b'k');
        b.put_u64(7);
        b.put_i64(9);
        b.put_u8(1);
        assert_eq!(
            parse_server_copy_data(b.freeze()).unwrap(),
            ServerCopyData::Keepalive {
                wal_end: Lsn(7),
                send_time: PgTimestamp(9),
                reply_requested: true
            }
        );
    }

    #[test]
    fn rejects_short_and_unknown_frames() {
        assert_eq!(parse_server_copy_data(Bytes::new()), Err(FrameError::Empty));
        assert!(matches!(
            parse_server_copy_data(Bytes::from_static(b"w\0\0")),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            parse_server_copy_data(Bytes::from_static(b"k\0")),
            Err(FrameError::BadLength { .. })
        ));
        assert_eq!(
            parse_server_copy_data(Bytes::from_static(b"z")),
            Err(FrameError::UnknownTag(b'z'))
        );
    }

    #[test]
    fn encodes_standby_status_update() {
        let mut out = BytesMut::new();
        encode_standby_status(
            &StandbyStatus {
                written: Lsn(3),
                flushed: Lsn(2),
                applied: Lsn(1),
                client_time: PgTimestamp(5),
                reply_requested: false,
            },
            &mut out,
        );
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &3u64.to_be_bytes());
        assert_eq!(&out[14..22], &2u64.to_be_bytes());
        assert_eq!(&out[22..30], &1u64.to_be_bytes());
        assert_eq!(&out[30..38], &5i64.to_be_bytes());
        assert_eq!(out[38], 0);
    }
}
