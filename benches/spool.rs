//! Spool write and read throughput: catalogue-shaped transactions (a product row with a
//! description of 300 bytes to 4 KB, two offer prices) appended, framed, written and made
//! durable the way sync will (one fdatasync per 100 transactions), then read back. Prints MB/s
//! of spool bytes.

use std::hint::black_box;
use std::path::PathBuf;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stagingprop::model::{Column, Lsn, PgTimestamp, Relation, ReplicaIdentity, Value};
use stagingprop::pgoutput::LogicalMessage;
use stagingprop::spool::store::{SpoolReader, SpoolWriter};

fn relation(oid: u32, name: &str, columns: &[&str]) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, c)| Column {
                name: (*c).into(),
                is_key: i == 0,
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    }
}

/// 5,000 transactions, each: Begin, an insert into catentry, two into offerprice, Commit.
fn transactions() -> Vec<(Lsn, LogicalMessage)> {
    let text = |s: String| Value::Text(Bytes::from(s));
    let mut out = vec![
        (
            Lsn(1),
            LogicalMessage::Relation {
                xid: None,
                relation: relation(
                    1,
                    "catentry",
                    &["catentry_id", "partnumber", "price", "descr"],
                ),
            },
        ),
        (
            Lsn(1),
            LogicalMessage::Relation {
                xid: None,
                relation: relation(2, "offerprice", &["offer_id", "currency", "price"]),
            },
        ),
    ];
    for n in 1..=5_000u64 {
        let commit = Lsn(n * 10_000);
        out.push((
            commit,
            LogicalMessage::Begin {
                final_lsn: commit,
                commit_time: PgTimestamp(n as i64),
                xid: n as u32,
            },
        ));
        out.push((
            Lsn(commit.0 - 100),
            LogicalMessage::Insert {
                xid: None,
                relation: 1,
                new: vec![
                    text(n.to_string()),
                    text(format!("PN-{n:09}")),
                    text(format!("{}.99", n % 1000)),
                    text("description ".repeat(25 + (n % 10) as usize * 30)),
                ],
            },
        ));
        for currency in ["USD", "EUR"] {
            out.push((
                Lsn(commit.0 - 50),
                LogicalMessage::Insert {
                    xid: None,
                    relation: 2,
                    new: vec![
                        text((2 * n).to_string()),
                        text(currency.into()),
                        text(format!("{}.50", n % 500)),
                    ],
                },
            ));
        }
        out.push((
            commit,
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: commit,
                end_lsn: Lsn(commit.0 + 8),
                commit_time: PgTimestamp(n as i64),
            },
        ));
    }
    out
}

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "stagingprop-bench-spool-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn write_all(dir: &PathBuf, input: &[(Lsn, LogicalMessage)]) -> u64 {
    let _ = std::fs::remove_dir_all(dir);
    let (mut writer, _) = SpoolWriter::open(dir, 64 << 20).unwrap();
    let mut commits = 0;
    for (lsn, message) in input {
        writer.append(*lsn, message).unwrap();
        if matches!(message, LogicalMessage::Commit { .. }) {
            commits += 1;
            if commits % 100 == 0 {
                writer.flush().unwrap();
            }
        }
    }
    writer.flush().unwrap();
    writer.bytes()
}

fn bench_spool(c: &mut Criterion) {
    let input = transactions();
    let write_dir = dir("write");
    let bytes = write_all(&write_dir, &input);
    println!(
        "spool of {} transactions: {:.1} MB",
        input.len() / 5,
        bytes as f64 / 1e6
    );
    let mut group = c.benchmark_group("spool");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20);
    group.bench_function("write_fdatasync_every_100_txns", |b| {
        b.iter(|| black_box(write_all(&write_dir, &input)))
    });
    let read_dir = dir("read");
    write_all(&read_dir, &input);
    group.bench_function("read", |b| {
        b.iter(|| {
            let mut reader = SpoolReader::open(&read_dir, Lsn::INVALID).unwrap();
            let mut n = 0;
            while let Some(m) = reader.next_message().unwrap() {
                black_box(m);
                n += 1;
            }
            n
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&write_dir);
    let _ = std::fs::remove_dir_all(&read_dir);
}

criterion_group!(benches, bench_spool);
criterion_main!(benches);
