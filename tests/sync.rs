//! `sync` against real clusters: every change shape, exactly-once resumption, conflict
//! policies, schema mismatches.

mod support;

use stagingprop::apply::ApplyError;
use stagingprop::config::Config;
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::sync::{self, StopAt, SyncError, SyncOptions, SyncSummary};
use support::{clusters, fresh_db, psql};

const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL UNIQUE,
  price numeric(12,2), counter int NOT NULL DEFAULT 0, descr text, data bytea, attrs jsonb,
  tags text[], published bool, updated timestamptz, uid uuid);
ALTER TABLE catentry ALTER descr SET STORAGE EXTERNAL;
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, longdescription text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE offerprice (offer_id bigint, currency char(3), price numeric(20,5),
  PRIMARY KEY (offer_id, currency));
CREATE TABLE auditlog (a int, b text);
";

const TABLES: [(&str, &str); 3] = [
    ("catentry", "catentry_id"),
    ("catentdesc", "catentry_id, language_id"),
    ("offerprice", "offer_id, currency"),
];

struct Pair {
    staging: String,
    production: String,
    config: Config,
}

fn pair(prefix: &str, policies: &[(&str, &str)]) -> Pair {
    let c = clusters();
    let staging = fresh_db(&c.staging, prefix);
    let production = fresh_db(&c.production, prefix);
    psql(&c.staging, &staging, CATALOGUE);
    psql(&c.production, &production, CATALOGUE);
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
         [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\nbatch_max_rows = 500\n",
        c.staging.conninfo(&staging, "postgres"),
        c.production.conninfo(&production, "postgres"),
    );
    for (table, _) in TABLES {
        let policy = policies
            .iter()
            .find(|(t, _)| *t == table)
            .map_or("error", |(_, p)| p);
        text.push_str(&format!(
            "[[tables]]\nname = \"public.{table}\"\non_conflict = \"{policy}\"\n"
        ));
    }
    let config = Config::from_toml_str(&text, "test").unwrap();
    Pair {
        staging,
        production,
        config,
    }
}

async fn caught_up(config: &Config) -> Result<SyncSummary, SyncError> {
    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(3),
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        sync::run(config, &options, std::future::pending()),
    )
    .await
    .expect("sync did not catch up within 120 s")
}

/// Polls production until `sql` returns true (30 s at most).
async fn wait_for(db: &str, sql: &str) {
    let c = clusters();
    for _ in 0..300 {
        if psql(&c.production, db, sql).trim() == "t" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {sql}");
}

/// Every managed table, row by row as text, on one side.
fn dump(cluster: &stagingprop::cluster::LocalCluster, db: &str) -> Vec<String> {
    TABLES
        .iter()
        .map(|(table, key)| {
            psql(
                cluster,
                db,
                &format!(
                    "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY {key}), '') FROM {table} t"
                ),
            )
        })
        .collect()
}

fn assert_equal(p: &Pair) {
    let c = clusters();
    let staging = dump(&c.staging, &p.staging);
    let production = dump(&c.production, &p.production);
    for ((table, _), (s, pr)) in TABLES.iter().zip(staging.iter().zip(&production)) {
        assert!(
            s == pr,
            "{table} differs:\nstaging:\n{s}\nproduction:\n{pr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_applies_every_change_shape_and_resumes_exactly_once() {
    let c = clusters();
    let p = pair("shapes_sync", &[]);
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    let long = "x".repeat(30_000);
    psql(
        &c.staging,
        &p.staging,
        &format!(
            "INSERT INTO catentry SELECT g, 'PN-' || g, g * 1.5, 0, CASE WHEN g % 3 = 0 THEN '{long}' || g END,
               decode(md5(g::text), 'hex'), jsonb_build_object('g', g), ARRAY['a', 'b' || g],
               g % 2 = 0, '2026-11-25 10:00:00+00'::timestamptz + g * interval '1 minute',
               md5(g::text)::uuid FROM generate_series(1, 300) g;
             INSERT INTO catentdesc SELECT g, l, 'name ' || g, repeat('d', g * 10) FROM generate_series(1, 300) g, generate_series(-2, -1) l;
             INSERT INTO offerprice SELECT g, c, g + 0.5 FROM generate_series(1, 100) g, unnest(ARRAY['USD', 'EUR']) c;"
        ),
    );
    // Small transactions of every kind, many touching the same rows.
    for i in 1..=40 {
        psql(
            &c.staging,
            &p.staging,
            &format!(
                "UPDATE catentry SET counter = counter + 1, price = price + 1 WHERE catentry_id % 7 = {m};
                 UPDATE catentdesc SET name = name || '+' WHERE catentry_id = {i};
                 DELETE FROM catentdesc WHERE catentry_id = {i} + 100 AND language_id = -2;
                 INSERT INTO catentry (catentry_id, partnumber) VALUES (1000 + {i}, 'NEW-{i}');
                 UPDATE offerprice SET offer_id = offer_id + 1000 WHERE offer_id = {i} AND currency = 'EUR';",
                m = i % 7
            ),
        );
    }
    psql(
        &c.staging,
        &p.staging,
        "BEGIN; DELETE FROM catentry WHERE catentry_id BETWEEN 200 AND 250;
         UPDATE catentry SET descr = NULL WHERE catentry_id = 3;
         INSERT INTO catentry (catentry_id, partnumber) VALUES (200, 'REBORN-200');
         UPDATE catentry SET price = NULL, attrs = '{\"deep\": {\"x\": [1, null]}}' WHERE catentry_id = 200;
         COMMIT;",
    );
    let summary = caught_up(&p.config).await.expect("first sync");
    assert!(summary.stats.rows_inserted > 0);
    assert_equal(&p);

    // Truncate and refill, then run again: only the new transactions are applied.
    psql(
        &c.staging,
        &p.staging,
        "TRUNCATE offerprice; INSERT INTO offerprice VALUES (1, 'USD', 1), (2, 'USD', 2);
         UPDATE catentry SET counter = counter + 10 WHERE catentry_id < 50;",
    );
    let summary = caught_up(&p.config).await.expect("second sync");
    assert_equal(&p);
    assert_eq!(summary.stats.truncates, 1);
    assert_eq!(
        summary.stats.rows_inserted, 2,
        "only the new transactions were applied"
    );
    let quarantined = psql(
        &c.production,
        &p.production,
        "SELECT count(*) FROM stagingprop.quarantine",
    );
    assert_eq!(quarantined.trim(), "0");

    // The slot was confirmed exactly to what production recorded.
    let recorded = psql(
        &c.production,
        &p.production,
        "SELECT end_lsn FROM stagingprop.progress",
    );
    let confirmed = psql(
        &c.staging,
        &p.staging,
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'shapes_sync'",
    );
    assert_eq!(recorded.trim(), confirmed.trim());

    // Nothing new: a third run applies nothing and changes nothing.
    let summary = caught_up(&p.config).await.expect("third sync");
    assert_eq!(
        summary.stats.rows_inserted + summary.stats.rows_updated + summary.stats.rows_deleted,
        0
    );
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_policy_error_stops_and_applies_nothing_of_the_batch() {
    let c = clusters();
    let p = pair("conflict_error", &[]);
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    // A production-born row with a key staging is about to use.
    psql(
        &c.production,
        &p.production,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (5, 'PROD-5')",
    );
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO offerprice VALUES (1, 'USD', 1);
         INSERT INTO catentry (catentry_id, partnumber) SELECT g, 'S-' || g FROM generate_series(1, 10) g;",
    );
    let err = caught_up(&p.config)
        .await
        .expect_err("conflict must stop sync");
    let SyncError::Apply(ApplyError::Conflict {
        table,
        key,
        lsn,
        xid,
        ..
    }) = &err
    else {
        panic!("expected a conflict, got {err}");
    };
    assert_eq!(table.to_string(), "public.catentry");
    assert_eq!(key, "{\"catentry_id\":\"5\"}");
    assert!(lsn.is_valid() && *xid > 0);
    let text = err.to_string();
    assert!(
        text.contains("on_conflict") && text.contains("public.catentry"),
        "{text}"
    );
    // Nothing of the batch: not even the offer price from the transaction before.
    let applied = psql(
        &c.production,
        &p.production,
        "SELECT (SELECT count(*) FROM offerprice) + (SELECT count(*) FROM catentry)",
    );
    assert_eq!(applied.trim(), "1", "only the production-born row is there");
    // The slot did not move past what production has.
    let confirmed = psql(
        &c.staging,
        &p.staging,
        "SELECT confirmed_flush_lsn < pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = 'conflict_error'",
    );
    assert_eq!(confirmed.trim(), "t");

    // The operator removes the production row: sync resumes and ends equal.
    psql(
        &c.production,
        &p.production,
        "DELETE FROM catentry WHERE catentry_id = 5",
    );
    caught_up(&p.config).await.expect("sync after the fix");
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_policies_skip_and_overwrite() {
    let c = clusters();
    let p = pair(
        "conflict_skip",
        &[("catentry", "skip"), ("offerprice", "overwrite")],
    );
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    psql(
        &c.production,
        &p.production,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (5, 'PROD-5');
         INSERT INTO offerprice VALUES (1, 'USD', 99);",
    );
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO catentry (catentry_id, partnumber, price) VALUES (5, 'S-5', 1), (6, 'S-6', 2);
         UPDATE catentry SET price = 3 WHERE catentry_id = 6;
         INSERT INTO offerprice VALUES (1, 'USD', 1), (2, 'USD', 2);
         INSERT INTO offerprice VALUES (3, 'USD', 3);",
    );
    // A staging update and delete of rows production lacks.
    psql(
        &c.production,
        &p.production,
        "DELETE FROM offerprice WHERE offer_id = 3",
    );
    psql(
        &c.staging,
        &p.staging,
        "UPDATE offerprice SET price = 33 WHERE offer_id = 3",
    );
    psql(&c.production, &p.production, "SELECT 1");
    caught_up(&p.config)
        .await
        .expect("sync with skip/overwrite");
    // skip: production keeps its row, staging's is quarantined whole with its LSN and reason.
    let row = psql(
        &c.production,
        &p.production,
        "SELECT partnumber FROM catentry WHERE catentry_id = 5",
    );
    assert_eq!(row.trim(), "PROD-5");
    let q = psql(
        &c.production,
        &p.production,
        "SELECT table_name || '|' || operation || '|' || (key->>'catentry_id') || '|' || (row_data->>'partnumber') || '|' || (lsn > '0/0') FROM stagingprop.quarantine",
    );
    assert_eq!(q.trim(), "public.catentry|insert|5|S-5|true");
    let six = psql(
        &c.production,
        &p.production,
        "SELECT price FROM catentry WHERE catentry_id = 6",
    );
    assert_eq!(six.trim(), "3.00");
    // overwrite: staging's values win, and the update of a missing row inserted it.
    let prices = psql(
        &c.production,
        &p.production,
        "SELECT string_agg(offer_id || '=' || price::int, ',' ORDER BY offer_id) FROM offerprice",
    );
    assert_eq!(prices.trim(), "1=1,2=2,3=33");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_mismatch_is_named_before_anything_is_applied_and_resumes_after_the_fix() {
    let c = clusters();
    let p = pair("mismatch", &[]);
    psql(
        &c.production,
        &p.production,
        "ALTER TABLE offerprice DROP COLUMN price; ALTER TABLE catentdesc ALTER name TYPE int USING 0",
    );
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (1, 'A')",
    );
    let err = caught_up(&p.config)
        .await
        .expect_err("mismatch must stop sync");
    let text = err.to_string();
    assert!(matches!(err, SyncError::Schema(_)), "{text}");
    assert!(
        text.contains("public.offerprice lacks column price"),
        "{text}"
    );
    assert!(
        text.contains("public.catentdesc.name is integer but text on staging"),
        "{text}"
    );
    let count = psql(
        &c.production,
        &p.production,
        "SELECT count(*) FROM catentry",
    );
    assert_eq!(count.trim(), "0");

    psql(
        &c.production,
        &p.production,
        "ALTER TABLE offerprice ADD COLUMN price numeric(20,5); ALTER TABLE catentdesc ALTER name TYPE text",
    );
    caught_up(&p.config).await.expect("sync after the fix");
    assert_equal(&p);

    // A column added on staging while sync runs: stops with a clear error, nothing lost.
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let options = SyncOptions {
            stop_at: None,
            max_attempts: Some(3),
        };
        sync::run(&config, &options, std::future::pending()).await
    });
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (3, 'C')",
    );
    wait_for(
        &p.production,
        "SELECT count(*) = 1 FROM catentry WHERE catentry_id = 3",
    )
    .await;
    psql(
        &c.staging,
        &p.staging,
        "ALTER TABLE catentry ADD COLUMN color text; INSERT INTO catentry (catentry_id, partnumber, color) VALUES (2, 'B', 'red')",
    );
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), running)
        .await
        .expect("sync stops on the new column")
        .unwrap()
        .expect_err("new staging column");
    let text = err.to_string();
    assert!(
        matches!(err, SyncError::Apply(ApplyError::Schema(_))),
        "{text}"
    );
    assert!(
        text.contains("column color which production lacks"),
        "{text}"
    );
    let count = psql(
        &c.production,
        &p.production,
        "SELECT count(*) FROM catentry WHERE catentry_id = 2",
    );
    assert_eq!(count.trim(), "0");
    psql(
        &c.production,
        &p.production,
        "ALTER TABLE catentry ADD COLUMN color text",
    );
    caught_up(&p.config)
        .await
        .expect("sync after adding the column");
    assert_equal(&p);
    let color = psql(
        &c.production,
        &p.production,
        "SELECT color FROM catentry WHERE catentry_id = 2",
    );
    assert_eq!(color.trim(), "red");
}
