//! `copy` against real clusters: both directions, the exact hand-off to sync under concurrent
//! writes, refusal of non-empty targets, a connection killed mid-copy.

mod support;

use std::time::Duration;

use stagingprop::config::Config;
use stagingprop::copy::{self, CopyError, CopyOptions, Side};
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::sync::{self, StopAt, SyncOptions};
use support::{clusters, fresh_db, psql};

const SCHEMA: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL,
  price numeric(12,2), counter int NOT NULL DEFAULT 0, descr text, data bytea, attrs jsonb);
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE attribute (attribute_id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE staticfile (path text PRIMARY KEY, content bytea);
";

const TABLES: [(&str, &str); 4] = [
    ("catentry", "catentry_id"),
    ("catentdesc", "catentry_id, language_id"),
    ("attribute", "attribute_id"),
    ("staticfile", "path"),
];

const SEED: &str = "
INSERT INTO catentry SELECT g, 'PN-' || g, g / 10.0, 0, repeat('descr ', g % 50),
  decode(md5(g::text), 'hex'), jsonb_build_object('g', g) FROM generate_series(1, 20000) g;
INSERT INTO catentdesc SELECT g, l, 'name ' || g FROM generate_series(1, 20000) g, generate_series(-2, -1) l;
INSERT INTO attribute (name) SELECT 'a' || g FROM generate_series(1, 100) g;
INSERT INTO staticfile VALUES ('/index.html', 'hello'), ('/logo.png', '\\x89504e47');
";

struct Pair {
    staging: String,
    production: String,
    config: Config,
}

fn pair(prefix: &str) -> Pair {
    let c = clusters();
    let staging = fresh_db(&c.staging, prefix);
    let production = fresh_db(&c.production, prefix);
    psql(&c.staging, &staging, SCHEMA);
    psql(&c.production, &production, SCHEMA);
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
         [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\n",
        c.staging.conninfo(&staging, "postgres"),
        c.production.conninfo(&production, "postgres"),
    );
    for (table, _) in TABLES {
        text.push_str(&format!("[[tables]]\nname = \"public.{table}\"\n"));
    }
    Pair {
        staging,
        production,
        config: Config::from_toml_str(&text, "test").unwrap(),
    }
}

fn options(from: Side, to: Side) -> CopyOptions {
    support::copy_options(from, to)
}

fn dump(cluster: &stagingprop::cluster::LocalCluster, db: &str, table: &str, key: &str) -> String {
    psql(
        cluster,
        db,
        &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, E'\\n' ORDER BY {key})), '') FROM {table} t"),
    )
    .trim()
    .to_owned()
}

fn assert_equal(p: &Pair) {
    let c = clusters();
    for (table, key) in TABLES {
        let s = dump(&c.staging, &p.staging, table, key);
        let pr = dump(&c.production, &p.production, table, key);
        assert_eq!(s, pr, "{table} differs (count:md5)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_then_sync_loses_and_doubles_nothing_under_concurrent_writes() {
    let c = clusters();
    let p = pair("copy_handoff");
    psql(&c.staging, &p.staging, SEED);
    init(&p.config, &InitOptions { create_slot: false })
        .await
        .expect("init");

    // Staging keeps changing while the copy runs; every change must arrive exactly once.
    let staging_db = p.staging.clone();
    let writer = std::thread::spawn(move || {
        let c = clusters();
        for i in 0..60 {
            psql(
                &c.staging,
                &staging_db,
                &format!(
                    "UPDATE catentry SET counter = counter + 1 WHERE catentry_id % 50 = {m};
                     INSERT INTO catentry (catentry_id, partnumber) VALUES (100000 + {i}, 'LIVE-{i}');
                     INSERT INTO catentdesc VALUES (100000 + {i}, -1, 'live');
                     DELETE FROM catentry WHERE catentry_id = {d};
                     INSERT INTO attribute (name) VALUES ('live {i}');",
                    m = i % 50,
                    d = 1000 + i
                ),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let report = copy::copy(&p.config, &options(Side::Staging, Side::Production))
        .await
        .expect("copy");
    writer.join().unwrap();
    let handoff = report
        .handoff
        .expect("staging -> production records a hand-off");
    assert_eq!(report.tables.len(), 4);
    let recorded = psql(
        &c.production,
        &p.production,
        "SELECT end_lsn FROM stagingprop.progress",
    );
    assert_eq!(recorded.trim(), handoff.to_string());
    let slot = psql(
        &c.staging,
        &p.staging,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'copy_handoff'",
    );
    assert_eq!(slot.trim(), "1");

    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(3),
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        sync::run(&p.config, &options, std::future::pending()),
    )
    .await
    .expect("sync in time")
    .expect("sync after copy: a doubled insert or delete would be a conflict error");
    assert_equal(&p);
    assert_eq!(summary.stats.conflicts_skipped, 0);
    // The sequence came along: production's next attribute id follows staging's.
    let next_staging = psql(
        &c.staging,
        &p.staging,
        "SELECT last_value FROM attribute_attribute_id_seq",
    );
    let next_production = psql(
        &c.production,
        &p.production,
        "SELECT last_value FROM attribute_attribute_id_seq",
    );
    assert_eq!(next_staging.trim(), next_production.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_production_seeds_a_new_staging_without_a_slot() {
    let c = clusters();
    let p = pair("copy_reverse");
    psql(&c.production, &p.production, SEED);
    let mut opts = options(Side::Production, Side::Staging);
    opts.exclude = vec!["public.staticfile".parse().unwrap()];
    let marker = std::env::temp_dir().join(format!("stagingprop-after-{}", std::process::id()));
    opts.after = Some(format!("echo rebuilt > '{}'", marker.display()));
    let report = copy::copy(&p.config, &opts).await.expect("copy");
    assert!(report.handoff.is_none());
    assert_eq!(report.after_status, Some(0));
    assert_eq!(std::fs::read_to_string(&marker).unwrap().trim(), "rebuilt");
    let _ = std::fs::remove_file(&marker);
    let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
    assert_eq!(rows, 20000 + 40000 + 100);
    for (table, key) in &TABLES[..3] {
        assert_eq!(
            dump(&c.production, &p.production, table, key),
            dump(&c.staging, &p.staging, table, key),
            "{table}"
        );
    }
    // Excluded: untouched.
    assert_eq!(
        psql(&c.staging, &p.staging, "SELECT count(*) FROM staticfile").trim(),
        "0"
    );
    let slots = psql(
        &c.production,
        &p.production,
        "SELECT count(*) FROM pg_replication_slots",
    );
    assert_eq!(slots.trim(), "0");

    // A second copy into the now non-empty staging is refused before anything is written.
    let err = copy::copy(&p.config, &options(Side::Production, Side::Staging))
        .await
        .expect_err("non-empty target");
    let text = err.to_string();
    assert!(
        text.contains("not empty") && text.contains("--truncate"),
        "{text}"
    );
    // With --truncate it replaces the contents.
    psql(
        &c.staging,
        &p.staging,
        "UPDATE catentry SET partnumber = 'changed'",
    );
    let mut again = options(Side::Production, Side::Staging);
    again.truncate = true;
    copy::copy(&p.config, &again)
        .await
        .expect("copy --truncate");
    assert_eq!(
        dump(&c.production, &p.production, "catentry", "catentry_id"),
        dump(&c.staging, &p.staging, "catentry", "catentry_id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_copy_leaves_tables_untouched_or_complete() {
    let c = clusters();
    let p = pair("copy_killed");
    psql(&c.production, &p.production, SEED);
    psql(
        &c.production,
        &p.production,
        "INSERT INTO staticfile SELECT '/f/' || g, convert_to(repeat(md5(g::text), 10), 'UTF8') FROM generate_series(1, 100000) g",
    );
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let mut opts = options(Side::Production, Side::Staging);
        opts.jobs = 2;
        copy::copy(&config, &opts).await
    });
    // Kill the target session loading the big table.
    let mut killed = false;
    for _ in 0..400 {
        let n = psql(
            &c.staging,
            &p.staging,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'COPY \"public\".\"staticfile\"%'",
        );
        if n.trim() != "0" {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed, "the big table's COPY was never seen on the target");
    let result = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("copy ends")
        .unwrap();
    let Err(CopyError::Partial { failed, .. }) = result else {
        panic!("expected a partial failure, got {result:?}");
    };
    assert!(
        failed.contains(&"public.staticfile".to_owned()),
        "{failed:?}"
    );
    for (table, key) in TABLES {
        let target = dump(&c.staging, &p.staging, table, key);
        let source = dump(&c.production, &p.production, table, key);
        assert!(
            target == source || target.starts_with("0:"),
            "{table} is neither untouched nor complete: {target} vs {source}"
        );
    }
    // Re-running with --truncate finishes the job.
    let mut again = options(Side::Production, Side::Staging);
    again.truncate = true;
    copy::copy(&p.config, &again).await.expect("re-run");
    for (table, key) in TABLES {
        assert_eq!(
            dump(&c.staging, &p.staging, table, key),
            dump(&c.production, &p.production, table, key),
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_refuses_a_production_whose_seeding_copy_failed() {
    let c = clusters();
    let p = pair("copy_failed_handoff");
    psql(&c.staging, &p.staging, SEED);
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO staticfile SELECT '/f/' || g, convert_to(repeat(md5(g::text), 10), 'UTF8') FROM generate_series(1, 100000) g",
    );
    init(&p.config, &InitOptions { create_slot: false })
        .await
        .expect("init");
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        copy::copy(&config, &options(Side::Staging, Side::Production)).await
    });
    let mut killed = false;
    for _ in 0..400 {
        let n = psql(
            &c.production,
            &p.production,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'COPY \"public\".\"staticfile\"%'",
        );
        if n.trim() != "0" {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(killed, "the big table's COPY was never seen on production");
    let result = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("copy ends")
        .unwrap();
    assert!(
        matches!(result, Err(CopyError::Partial { .. })),
        "{result:?}"
    );

    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(2),
    };
    let err = sync::run(&p.config, &options, std::future::pending())
        .await
        .expect_err("sync must not stream onto a half-seeded production");
    assert!(err.to_string().contains("did not complete"), "{err}");

    let mut again = self::options(Side::Staging, Side::Production);
    again.truncate = true;
    copy::copy(&p.config, &again).await.expect("copy again");
    psql(
        &c.staging,
        &p.staging,
        "UPDATE catentry SET counter = 7 WHERE catentry_id < 10",
    );
    tokio::time::timeout(
        Duration::from_secs(120),
        sync::run(&p.config, &options, std::future::pending()),
    )
    .await
    .expect("sync in time")
    .expect("sync after a complete copy");
    assert_equal(&p);
}
