//! Issue 21: production's statistics taken while a bulk load was uncommitted made one apply
//! statement scan the whole table for every key, for minutes. Sync analyzes such tables first.

mod support;

use std::time::Duration;

use support::{PairBuilder, clusters};

const ROWS: i64 = 400_000;

const SCHEMA: &str = "
CREATE TABLE t (id bigint PRIMARY KEY, member_id bigint, name varchar(64), attrs jsonb)
  WITH (autovacuum_enabled = false);
";

fn seed(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO t SELECT i, 7, 'PN-' || i, '{{\"a\": 1}}' FROM generate_series({from}, {to}) i"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_taken_during_a_bulk_load_do_not_make_a_batch_scan_the_table_per_key() {
    let p = PairBuilder::new("stats_bulk_load", SCHEMA)
        .table("public.t", "")
        .build();
    // Both sides hold the same rows before sync starts.
    p.on_staging(&seed(1, ROWS));
    stagingprop::ops::init::init(&p.config, &Default::default())
        .await
        .expect("init");
    // Production: analyzed full, reloaded, and vacuumed while the reload was uncommitted.
    p.on_production(&seed(1, ROWS));
    p.on_production("ANALYZE t");
    p.on_production(&format!("TRUNCATE t; {}", seed(1, 1)));
    let production = clusters().production.conninfo(&p.production, "postgres");
    let (loader, connection) = tokio_postgres::connect(&production, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    loader.batch_execute("BEGIN").await.unwrap();
    loader.batch_execute(&seed(2, ROWS)).await.unwrap();
    p.on_production("VACUUM t");
    loader.batch_execute("COMMIT").await.unwrap();
    let stats =
        p.on_production("SELECT relpages || ' ' || reltuples FROM pg_class WHERE relname = 't'");
    let (pages, tuples) = stats.trim().split_once(' ').unwrap();
    let (pages, tuples): (f64, f64) = (pages.parse().unwrap(), tuples.parse().unwrap());
    assert!(
        pages > 1000.0 && tuples < pages,
        "the trigger state: {stats}"
    );
    // A statement of the old plan would run for minutes: make it fail instead.
    p.on_production(&format!(
        "ALTER DATABASE {} SET statement_timeout = '20s'",
        p.production
    ));

    // Staging deletes 2,000 rows spread over the table and updates 2,000 more.
    p.on_staging(&format!(
        "BEGIN; DELETE FROM t WHERE id % {} = 0; UPDATE t SET name = 'changed' WHERE id % {} = 1; COMMIT;",
        ROWS / 2000,
        ROWS / 2000
    ));
    let started = std::time::Instant::now();
    let summary = support::caught_up(&p.config)
        .await
        .expect("sync applies the batch");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(summary.stats.rows_deleted, 2000);
    assert_eq!(summary.stats.rows_updated, 2000);
    assert_eq!(
        p.on_production("SELECT count(*) FROM t").trim(),
        (ROWS - 2000).to_string()
    );
    let tuples: f64 = p
        .on_production("SELECT reltuples FROM pg_class WHERE relname = 't'")
        .trim()
        .parse()
        .unwrap();
    assert!(
        tuples > (ROWS / 2) as f64,
        "sync analyzed the table: {tuples}"
    );
}
