//! Consolidation throughput: how many row changes per second `TableChanges` takes, for a
//! catalogue-shaped mix of inserts, updates (some leaving TOASTed columns unchanged) and deletes,
//! with repeated keys as in an OLTP backlog.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stagingprop::model::{Lsn, Value};
use stagingprop::{RowOp, Source, TableChanges};

fn text(s: String) -> Value {
    Value::Text(Bytes::from(s))
}

/// 100,000 changes over 20,000 keys: inserts, then updates and deletes of earlier keys.
fn changes() -> Vec<(Vec<Option<Bytes>>, RowOp)> {
    let mut out = Vec::with_capacity(100_000);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..100_000u64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let id = if i < 20_000 { i } else { state % 20_000 };
        let key = vec![Some(Bytes::from(id.to_string()))];
        let row = |descr: Value| {
            vec![
                text(id.to_string()),
                text(format!("PN-{id}")),
                text(format!("{}.99", state % 1000)),
                text("2026-11-25 10:00:00+00".to_owned()),
                descr,
            ]
        };
        let op = match (i < 20_000, state % 10) {
            (true, _) => RowOp::Insert(row(text("long description ".repeat(8)))),
            (false, 0) => RowOp::Delete,
            (false, _) => RowOp::Update(row(Value::UnchangedToast)),
        };
        out.push((key, op));
    }
    out
}

fn bench_absorb(c: &mut Criterion) {
    let input = changes();
    let mut group = c.benchmark_group("consolidate");
    group.throughput(Throughput::Elements(input.len() as u64));
    group.bench_function("absorb_100k_changes", |b| {
        b.iter_batched(
            || input.clone(),
            |input| {
                let mut table = TableChanges::default();
                let source = Source {
                    lsn: Lsn(1),
                    xid: 1,
                };
                for (key, op) in input {
                    if let Err(rejected) = table.absorb(key, op, source) {
                        // What the applier does: send what is pending, then take the change.
                        black_box(table.drain());
                        let _ = table.absorb(rejected.key, rejected.op, source);
                    }
                }
                black_box(table.drain())
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_absorb);
criterion_main!(benches);
