//! Rewriting key columns inside a binary COPY stream (sans-IO), so copy can remap keys while it
//! streams rows from source to target without decoding them otherwise.
//!
//! The format: an 11-byte signature, an Int32 flags word and an Int32 header-extension length
//! (plus the extension), then per row an Int16 field count followed by each field as an Int32
//! length (-1 for NULL) and its bytes, and an Int16 -1 after the last row. Integer keys are
//! big-endian `int2`/`int4`/`int8`; a rewritten value keeps its width, so rewriting happens in
//! place and the stream's length never changes.

use std::collections::HashMap;
use std::sync::Arc;

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// How one column's values change.
#[derive(Clone, Debug)]
pub enum Translate {
    /// value + N.
    Offset(i64),
    /// Through a map; values it lacks are kept.
    Map(Arc<HashMap<i64, i64>>),
}

impl Translate {
    fn apply(&self, value: i64) -> Option<i64> {
        match self {
            Translate::Offset(n) => value.checked_add(*n),
            Translate::Map(map) => Some(map.get(&value).copied().unwrap_or(value)),
        }
    }
}

/// A column to rewrite: its position in the COPY column list and the translation.
#[derive(Clone, Debug)]
pub struct ColumnRewrite {
    pub column: usize,
    pub translate: Translate,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("the binary COPY stream does not start with the PGCOPY signature")]
    Signature,
    #[error("row {row} has {found} fields, the table {expected}")]
    FieldCount {
        row: u64,
        found: i16,
        expected: usize,
    },
    #[error("row {row}: column {column} is {len} bytes long, not an integer key")]
    NotAnInteger { row: u64, column: usize, len: i32 },
    #[error("row {row}: column {column}: {value} translates to a value its type cannot hold")]
    OutOfRange { row: u64, column: usize, value: i64 },
    #[error("bytes after the end of the binary COPY stream")]
    TrailingData,
    #[error("a negative field length {len} in row {row}")]
    BadLength { row: u64, len: i32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Header,
    RowStart,
    Field { index: usize },
    Done,
}

/// Walks a binary COPY stream, rewriting the chosen columns in place.
#[derive(Debug)]
pub struct KeyRewriter {
    by_column: Vec<Option<Translate>>,
    phase: Phase,
    rows: u64,
}

impl KeyRewriter {
    /// `columns`: the number of columns in each row.
    pub fn new(columns: usize, rewrites: Vec<ColumnRewrite>) -> KeyRewriter {
        let mut by_column = vec![None; columns];
        for rewrite in rewrites {
            if rewrite.column < columns {
                by_column[rewrite.column] = Some(rewrite.translate);
            }
        }
        KeyRewriter {
            by_column,
            phase: Phase::Header,
            rows: 0,
        }
    }

    /// Rewrites the complete pieces at the start of `data` (which starts where the last call
    /// stopped) and returns how many bytes they took; the rest must be offered again with more
    /// bytes appended.
    pub fn rewrite(&mut self, data: &mut [u8]) -> Result<usize, RewriteError> {
        let mut at = 0;
        loop {
            let rest = &data[at..];
            match self.phase {
                Phase::Header => {
                    if rest.len() < SIGNATURE.len() + 8 {
                        return Ok(at);
                    }
                    if &rest[..SIGNATURE.len()] != SIGNATURE {
                        return Err(RewriteError::Signature);
                    }
                    let ext = be_i32(&rest[SIGNATURE.len() + 4..]);
                    let ext = usize::try_from(ext)
                        .map_err(|_| RewriteError::BadLength { row: 0, len: ext })?;
                    let len = SIGNATURE.len() + 8 + ext;
                    if rest.len() < len {
                        return Ok(at);
                    }
                    at += len;
                    self.phase = Phase::RowStart;
                }
                Phase::RowStart => {
                    if rest.len() < 2 {
                        return Ok(at);
                    }
                    let count = i16::from_be_bytes([rest[0], rest[1]]);
                    at += 2;
                    if count == -1 {
                        self.phase = Phase::Done;
                    } else if count as usize != self.by_column.len() || count < 0 {
                        return Err(RewriteError::FieldCount {
                            row: self.rows + 1,
                            found: count,
                            expected: self.by_column.len(),
                        });
                    } else {
                        self.rows += 1;
                        self.phase = if count == 0 {
                            Phase::RowStart
                        } else {
                            Phase::Field { index: 0 }
                        };
                    }
                }
                Phase::Field { index } => {
                    if rest.len() < 4 {
                        return Ok(at);
                    }
                    let len = be_i32(rest);
                    let body = if len == -1 {
                        0
                    } else {
                        usize::try_from(len).map_err(|_| RewriteError::BadLength {
                            row: self.rows,
                            len,
                        })?
                    };
                    if rest.len() < 4 + body {
                        return Ok(at);
                    }
                    if let (Some(translate), true) = (&self.by_column[index], len >= 0) {
                        let field = &mut data[at + 4..at + 4 + body];
                        rewrite_integer(field, translate).map_err(|value| match value {
                            None => RewriteError::NotAnInteger {
                                row: self.rows,
                                column: index,
                                len,
                            },
                            Some(value) => RewriteError::OutOfRange {
                                row: self.rows,
                                column: index,
                                value,
                            },
                        })?;
                    }
                    at += 4 + body;
                    self.phase = if index + 1 == self.by_column.len() {
                        Phase::RowStart
                    } else {
                        Phase::Field { index: index + 1 }
                    };
                }
                Phase::Done => {
                    return if rest.is_empty() {
                        Ok(at)
                    } else {
                        Err(RewriteError::TrailingData)
                    };
                }
            }
        }
    }

    /// Whether the end-of-data marker was seen.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }
}

fn be_i32(b: &[u8]) -> i32 {
    i32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Rewrites a big-endian integer field in place. Err(None): not an integer width;
/// Err(Some(v)): the translation of v does not fit.
fn rewrite_integer(field: &mut [u8], translate: &Translate) -> Result<(), Option<i64>> {
    match field.len() {
        2 => {
            let v = i64::from(i16::from_be_bytes([field[0], field[1]]));
            let t = translate.apply(v).ok_or(Some(v))?;
            let t = i16::try_from(t).map_err(|_| Some(v))?;
            field.copy_from_slice(&t.to_be_bytes());
        }
        4 => {
            let v = i64::from(be_i32(field));
            let t = translate.apply(v).ok_or(Some(v))?;
            let t = i32::try_from(t).map_err(|_| Some(v))?;
            field.copy_from_slice(&t.to_be_bytes());
        }
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(field);
            let v = i64::from_be_bytes(b);
            let t = translate.apply(v).ok_or(Some(v))?;
            field.copy_from_slice(&t.to_be_bytes());
        }
        _ => return Err(None),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A binary COPY stream of rows of (int8 or NULL, text, int4).
    fn stream(rows: &[(Option<i64>, &str, i32)]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for (a, b, c) in rows {
            out.extend_from_slice(&3i16.to_be_bytes());
            match a {
                Some(a) => {
                    out.extend_from_slice(&8i32.to_be_bytes());
                    out.extend_from_slice(&a.to_be_bytes());
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
            out.extend_from_slice(&(b.len() as i32).to_be_bytes());
            out.extend_from_slice(b.as_bytes());
            out.extend_from_slice(&4i32.to_be_bytes());
            out.extend_from_slice(&c.to_be_bytes());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn rewriter() -> KeyRewriter {
        let map = Arc::new(HashMap::from([(1, 100), (2, 200)]));
        KeyRewriter::new(
            3,
            vec![
                ColumnRewrite {
                    column: 0,
                    translate: Translate::Map(map),
                },
                ColumnRewrite {
                    column: 2,
                    translate: Translate::Offset(1000),
                },
            ],
        )
    }

    #[test]
    fn rewrites_the_chosen_columns_in_place() {
        let mut data = stream(&[(Some(1), "a", 5), (None, "bb", 6), (Some(3), "", -7)]);
        let expected = stream(&[
            (Some(100), "a", 1005),
            (None, "bb", 1006),
            (Some(3), "", 993),
        ]);
        let mut r = rewriter();
        assert_eq!(r.rewrite(&mut data).unwrap(), data.len());
        assert!(r.finished());
        assert_eq!(r.rows(), 3);
        assert_eq!(data, expected);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let mut data = stream(&[(Some(1), "a", i32::MAX)]);
        assert!(matches!(
            rewriter().rewrite(&mut data),
            Err(RewriteError::OutOfRange {
                row: 1,
                column: 2,
                ..
            })
        ));
        let mut data = stream(&[]);
        data[0] = b'X';
        assert_eq!(rewriter().rewrite(&mut data), Err(RewriteError::Signature));
        let mut data = stream(&[(Some(1), "a", 1)]);
        data.push(0);
        assert_eq!(
            rewriter().rewrite(&mut data),
            Err(RewriteError::TrailingData)
        );
        let mut r = KeyRewriter::new(2, Vec::new());
        let mut data = stream(&[(Some(1), "a", 1)]);
        assert!(matches!(
            r.rewrite(&mut data),
            Err(RewriteError::FieldCount { found: 3, .. })
        ));
    }

    proptest! {
        /// Any split of the stream into pieces gives the same bytes as one piece.
        #[test]
        fn pieces_give_the_same_result(
            rows in proptest::collection::vec((proptest::option::of(-5i64..5), "[a-z]{0,12}", -5i32..5), 0..20),
            cuts in proptest::collection::vec(0usize..400, 0..12),
        ) {
            let rows: Vec<(Option<i64>, &str, i32)> =
                rows.iter().map(|(a, b, c)| (*a, b.as_str(), *c)).collect();
            let mut whole = stream(&rows);
            let original = whole.clone();
            rewriter().rewrite(&mut whole).unwrap();

            let mut r = rewriter();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (original.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.push(original.len());
            let mut out = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let mut from = 0;
            for cut in cuts {
                pending.extend_from_slice(&original[from..cut]);
                from = cut;
                let done = r.rewrite(&mut pending).unwrap();
                out.extend(pending.drain(..done));
            }
            prop_assert!(r.finished());
            prop_assert!(pending.is_empty());
            prop_assert_eq!(out, whole);
        }

        /// Arbitrary bytes never panic.
        #[test]
        fn arbitrary_input_never_panics(mut data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = rewriter().rewrite(&mut data);
        }
    }
}
