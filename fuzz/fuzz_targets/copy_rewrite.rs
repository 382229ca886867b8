//! Feeds arbitrary binary COPY streams to the key rewriter, once whole and once in pieces of a
//! fuzzer-chosen size, and checks both ways end alike: the same bytes rewritten the same way,
//! the same error at the same place. The first four bytes choose the table shape and rewrites.

#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use stagingprop::copy::rewrite::{ColumnRewrite, KeyRewriter, Translate};

fn rewriter(columns: usize, mask: u8, mode: u8) -> KeyRewriter {
    let translate = match mode % 3 {
        0 => Translate::Offset(i64::from(mode as i8) * 1_000),
        // Near the edge of every integer width, so out-of-range values are reached.
        1 => Translate::Offset(i64::MAX - i64::from(mode)),
        _ => Translate::Map(Arc::new(
            (0..64)
                .map(|k| (k, k * 1_000_003 + 1))
                .collect::<HashMap<_, _>>(),
        )),
    };
    let rewrites = (0..columns)
        .filter(|c| mask & (1 << c) != 0)
        .map(|column| ColumnRewrite {
            column,
            translate: translate.clone(),
        })
        .collect();
    KeyRewriter::new(columns, rewrites)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let columns = usize::from(data[0] % 8);
    let (mask, mode, step) = (data[1], data[2], usize::from(data[3]) + 1);
    let stream = &data[4..];

    let mut whole = stream.to_vec();
    let mut one = rewriter(columns, mask, mode);
    let whole_result = one.rewrite(&mut whole);

    let mut pieces = stream.to_vec();
    let mut many = rewriter(columns, mask, mode);
    let mut done = 0;
    let mut available = 0;
    let pieces_result = loop {
        available = (available + step).min(pieces.len());
        match many.rewrite(&mut pieces[done..available]) {
            Ok(n) => {
                assert!(done + n <= available);
                done += n;
                if available == pieces.len() {
                    break Ok(done);
                }
            }
            Err(e) => break Err(e),
        }
    };

    assert_eq!(
        whole_result, pieces_result,
        "whole and piecewise rewrites disagree"
    );
    if let Ok(n) = whole_result {
        assert_eq!(
            whole[..n],
            pieces[..n],
            "whole and piecewise rewrites wrote differently"
        );
        assert_eq!(one.rows(), many.rows());
        assert_eq!(one.finished(), many.finished());
    }
});
