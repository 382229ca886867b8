//! Backend messages of the PostgreSQL wire protocol, parsed without a socket (sans-IO): cutting
//! messages off a read buffer, authentication requests, parameter status, row descriptions and
//! data rows. The replication connection ([`super::replication`]) does the I/O around them; the
//! fuzz target `backend_messages` feeds them arbitrary bytes.

use bytes::{Buf, Bytes, BytesMut};

/// The longest message accepted. A server's largest is a CopyData carrying one pgoutput message,
/// which PostgreSQL builds in a buffer of at most 1 GiB; a longer length word is a broken or
/// hostile server, and believing it would have us wait for (and buffer) gigabytes.
pub const MAX_MESSAGE_LEN: usize = (1 << 30) + 64 * 1024;

/// How much of a long message's announced length is reserved at once; the rest grows as it
/// arrives, so a lying length word costs nothing until the bytes are really sent.
const RESERVE_AHEAD: usize = 64 * 1024 * 1024;

/// What makes a backend message unreadable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message {tag:?} has the invalid length {len}")]
    BadLength { tag: char, len: i32 },
    #[error(
        "message {tag:?} announces {len} bytes, more than the {} a PostgreSQL server sends",
        MAX_MESSAGE_LEN
    )]
    TooLong { tag: char, len: usize },
    #[error("{what} is cut short")]
    Short { what: &'static str },
}

/// One backend message: its tag and body (without the length word).
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

/// Takes one complete backend message off the front of `buf`, or `None` if it is not all there.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, MessageError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(MessageError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let len = len as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(MessageError::TooLong {
            tag: tag as char,
            len,
        });
    }
    let total = 1 + len;
    if buf.len() < total {
        buf.reserve((total - buf.len()).min(RESERVE_AHEAD));
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame }))
}

/// Reads a NUL-terminated string off `body`.
pub fn take_cstr(body: &mut Bytes) -> Option<String> {
    let end = body.iter().position(|&b| b == 0)?;
    let s = String::from_utf8_lossy(&body[..end]).into_owned();
    body.advance(end + 1);
    Some(s)
}

/// An authentication request ('R').
#[derive(Debug, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// A method stagingprop does not speak, by its code.
    Other(i32),
}

impl AuthRequest {
    pub fn parse(mut body: Bytes) -> Result<AuthRequest, MessageError> {
        if body.len() < 4 {
            return Err(MessageError::Short {
                what: "the authentication request",
            });
        }
        Ok(match body.get_i32() {
            0 => AuthRequest::Ok,
            3 => AuthRequest::Cleartext,
            5 => {
                if body.len() < 4 {
                    return Err(MessageError::Short {
                        what: "the md5 salt",
                    });
                }
                AuthRequest::Md5 {
                    salt: [body[0], body[1], body[2], body[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                while let Some(m) = take_cstr(&mut body) {
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m);
                }
                AuthRequest::Sasl { mechanisms }
            }
            11 => AuthRequest::SaslContinue(body),
            12 => AuthRequest::SaslFinal(body),
            other => AuthRequest::Other(other),
        })
    }
}

/// The name of an authentication method stagingprop does not support, for the error.
pub fn auth_method_name(code: i32) -> &'static str {
    match code {
        2 => "Kerberos V5",
        6 => "SCM credentials",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "unknown",
    }
}

/// A ParameterStatus ('S') body: name and value.
pub fn parameter_status(mut body: Bytes) -> Option<(String, String)> {
    let name = take_cstr(&mut body)?;
    let value = take_cstr(&mut body)?;
    Some((name, value))
}

/// "15.8 (Debian 15.8-1)" -> 150008; "9.6.3" -> 90603.
pub fn server_version_num(value: &str) -> u32 {
    let numeric: String = value
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0).min(9999));
    let major = parts.next().unwrap_or(0).min(999);
    let second = parts.next().unwrap_or(0);
    if major >= 10 {
        major * 10000 + second
    } else {
        major * 10000 + second.min(99) * 100 + parts.next().unwrap_or(0).min(99)
    }
}

/// A RowDescription ('T') body: the column names.
pub fn row_description(mut body: Bytes) -> Vec<String> {
    if body.len() < 2 {
        return Vec::new();
    }
    let count = body.get_i16().max(0) as usize;
    let mut names = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let Some(name) = take_cstr(&mut body) else {
            break;
        };
        names.push(name);
        if body.len() < 18 {
            break;
        }
        body.advance(18);
    }
    names
}

/// A DataRow ('D') body: text values, `None` for NULL; `None` when the row is malformed.
pub fn data_row(mut body: Bytes) -> Option<Vec<Option<String>>> {
    if body.len() < 2 {
        return None;
    }
    let count = body.get_i16().max(0) as usize;
    let mut values = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return None;
        }
        values.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    #[test]
    fn frames_split_across_reads() {
        let mut buf = BytesMut::new();
        buf.put_slice(&[b'Z', 0, 0, 0, 5]);
        assert!(take_frame(&mut buf).unwrap().is_none());
        buf.put_u8(b'I');
        buf.put_slice(&[b'C', 0, 0]);
        let frame = take_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.tag, b'Z');
        assert_eq!(&frame.body[..], b"I");
        assert!(take_frame(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn rejects_bad_and_huge_lengths() {
        let mut buf = BytesMut::from(&[b'Z', 0, 0, 0, 3][..]);
        assert_eq!(
            take_frame(&mut buf).unwrap_err(),
            MessageError::BadLength { tag: 'Z', len: 3 }
        );
        let mut buf = BytesMut::from(&[b'd', 0x7f, 0xff, 0xff, 0xf0][..]);
        assert!(matches!(
            take_frame(&mut buf),
            Err(MessageError::TooLong { tag: 'd', .. })
        ));
        // A long but possible message is awaited without reserving all of it up front.
        let mut buf = BytesMut::from(&[b'd', 0x3f, 0xff, 0xff, 0xff][..]);
        assert!(take_frame(&mut buf).unwrap().is_none());
        assert!(buf.capacity() <= RESERVE_AHEAD + 64);
    }

    #[test]
    fn parses_versions() {
        assert_eq!(server_version_num("15.8 (Debian 15.8-1.pgdg120+1)"), 150008);
        assert_eq!(server_version_num("17devel"), 170000);
        assert_eq!(server_version_num("9.6.3"), 90603);
        // Nonsense does not overflow.
        assert_eq!(server_version_num("4000000.5"), 9990005);
    }

    #[test]
    fn parses_rows() {
        let mut body = BytesMut::new();
        body.put_i16(2);
        body.put_i32(3);
        body.put_slice(b"abc");
        body.put_i32(-1);
        let row = data_row(body.freeze()).unwrap();
        assert_eq!(row, vec![Some("abc".to_owned()), None]);
        let short = Bytes::from_static(&[0, 1, 0, 0, 0, 9, b'x']);
        assert!(data_row(short).is_none());
    }

    #[test]
    fn parses_auth_requests() {
        let sasl = Bytes::from_static(b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        assert_eq!(
            AuthRequest::parse(sasl).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }
        );
        assert_eq!(
            AuthRequest::parse(Bytes::from_static(b"\0\0\0\x05ab")).unwrap_err(),
            MessageError::Short {
                what: "the md5 salt"
            }
        );
        assert_eq!(
            AuthRequest::parse(Bytes::from_static(b"\0\0\0\x07")).unwrap(),
            AuthRequest::Other(7)
        );
    }
}
