//! How records sit in a segment file (sans-IO): each one framed as
//! `[u32 payload length][u32 CRC32C of the payload][u32 CRC32C of those 8 bytes][payload]`,
//! big-endian. The header's own checksum tells a damaged length from a write cut short: after a
//! crash the file ends in a prefix of what was written (or in zeros the file system filled in),
//! which [`next_frame`] reports as [`Scan::Torn`]; anything else that does not check out is
//! [`Scan::Corrupt`], never skipped.

use std::ops::Range;

/// Bytes before each payload.
pub const HEADER: usize = 12;
/// No record is larger (a row is at most 1 GB in PostgreSQL, and values are sent once).
pub const MAX_PAYLOAD: usize = 1 << 31;

/// A record too large for a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a record of {0} bytes is larger than a spool record may be ({MAX_PAYLOAD} bytes)")]
pub struct TooLarge(pub usize);

/// Appends one framed payload to `out`.
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), TooLarge> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len as usize <= MAX_PAYLOAD)
        .ok_or(TooLarge(payload.len()))?;
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&len.to_be_bytes());
    header[4..].copy_from_slice(&crc32c::crc32c(payload).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&crc32c::crc32c(&header).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// What lies at an offset of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scan {
    /// A whole, intact record: its payload's byte range and where the next frame starts.
    Frame { payload: Range<usize>, next: usize },
    /// The end of the data, exactly at a frame boundary.
    End,
    /// The data ends in a frame that was being written (cut short, or zeros after it).
    Torn,
    /// The bytes here are damaged.
    Corrupt { reason: &'static str },
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Reads the frame at `at` in `data` (a whole segment, or its start).
pub fn next_frame(data: &[u8], at: usize) -> Scan {
    let rest = data.get(at..).unwrap_or_default();
    if rest.is_empty() {
        return Scan::End;
    }
    if rest.len() < HEADER {
        return Scan::Torn;
    }
    if crc32c::crc32c(&rest[..8]) != be32(&rest[8..12]) {
        return if all_zero(rest) {
            Scan::Torn
        } else {
            Scan::Corrupt {
                reason: "the record header's checksum does not match",
            }
        };
    }
    let len = be32(&rest[..4]) as usize;
    if len > MAX_PAYLOAD {
        return Scan::Corrupt {
            reason: "the record header names an impossible length",
        };
    }
    if rest.len() < HEADER + len {
        return Scan::Torn;
    }
    let payload = &rest[HEADER..HEADER + len];
    if crc32c::crc32c(payload) != be32(&rest[4..8]) {
        // The last frame's payload may be what the crash left half written.
        return if all_zero(&rest[HEADER + len..]) {
            Scan::Torn
        } else {
            Scan::Corrupt {
                reason: "the record's checksum does not match its contents",
            }
        };
    }
    Scan::Frame {
        payload: at + HEADER..at + HEADER + len,
        next: at + HEADER + len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode_frame(p, &mut out).unwrap();
        }
        out
    }

    fn frames(data: &[u8]) -> (Vec<Vec<u8>>, Scan) {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            match next_frame(data, at) {
                Scan::Frame { payload, next } => {
                    out.push(data[payload].to_vec());
                    at = next;
                }
                end => return (out, end),
            }
        }
    }

    #[test]
    fn frames_come_back_in_order() {
        let data = segment(&[b"one", b"", b"three"]);
        let (got, end) = frames(&data);
        assert_eq!(got, vec![b"one".to_vec(), Vec::new(), b"three".to_vec()]);
        assert_eq!(end, Scan::End);
    }

    #[test]
    fn a_cut_or_zero_filled_tail_is_torn() {
        let data = segment(&[b"one", b"two two"]);
        for cut in 1..HEADER + 7 {
            let (got, end) = frames(&data[..data.len() - cut]);
            assert_eq!(got, vec![b"one".to_vec()], "cut {cut}");
            assert_eq!(end, Scan::Torn, "cut {cut}");
        }
        // The file system may leave zeros where the last write did not land.
        let mut zeroed = data.clone();
        let n = zeroed.len();
        zeroed[n - 3..].fill(0);
        assert_eq!(frames(&zeroed).1, Scan::Torn);
        let mut padded = data.clone();
        padded.extend_from_slice(&[0; 40]);
        assert_eq!(
            frames(&padded),
            (vec![b"one".to_vec(), b"two two".to_vec()], Scan::Torn)
        );
    }

    #[test]
    fn damage_before_the_tail_is_corrupt() {
        let data = segment(&[b"first record", b"second", b"third"]);
        // A flipped byte in the first payload, in its header's length, in its checksum.
        for at in [HEADER + 2, 1, 5, 9] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            let (got, end) = frames(&bad);
            assert!(got.is_empty(), "byte {at}");
            assert!(matches!(end, Scan::Corrupt { .. }), "byte {at}: {end:?}");
        }
    }

    proptest! {
        /// Any damage is found: a flipped bit never yields a different record silently.
        #[test]
        fn a_flipped_bit_never_passes(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6),
            bit in any::<usize>(),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let data = segment(&refs);
            let mut bad = data.clone();
            let bit = bit % (bad.len() * 8);
            bad[bit / 8] ^= 1 << (bit % 8);
            let (got, end) = frames(&bad);
            prop_assert!(got.len() < payloads.len());
            for (g, p) in got.iter().zip(&payloads) {
                prop_assert_eq!(g, p);
            }
            prop_assert_ne!(end, Scan::End);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = frames(&data);
        }
    }
}
