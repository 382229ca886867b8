//! `copy` against real clusters: both directions, the exact hand-off to sync under concurrent
//! writes, refusal of non-empty targets, a connection killed mid-copy; empty targets loaded by
//! table and block range, each committed alone (parents first when the target checks foreign
//! keys); with `--atomic`, ranges loaded by several workers and committed together (two-phase
//! commit), a part failing, a copy killed with its parts prepared, and what an interrupted copy
//! left being finished.

mod support;

use std::time::Duration;

use stagingprop::copy::{self, CopyError, CopyOptions, Side};
use stagingprop::sync::{self, StopAt, SyncOptions};
use support::{Pair, PairBuilder, caught_up, clusters, init_without_slot, psql};

const SCHEMA: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL,
  price numeric(12,2), counter int NOT NULL DEFAULT 0, descr text, data bytea, attrs jsonb);
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE attribute (attribute_id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE staticfile (path text PRIMARY KEY, content bytea);
CREATE INDEX catentry_partnumber_lower ON catentry (lower(partnumber));
CREATE INDEX catentry_pricey ON catentry (price) WHERE price > 100;
CREATE INDEX catentdesc_name ON catentdesc (name);
CREATE INDEX staticfile_length ON staticfile (length(content));
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

fn pair(prefix: &str) -> Pair {
    pair_as(prefix, "postgres")
}

/// A pair whose production connection logs in as `production_user`.
fn pair_as(prefix: &str, production_user: &str) -> Pair {
    let mut builder = PairBuilder::new(prefix, SCHEMA).production_user(production_user);
    for (table, _) in TABLES {
        builder = builder.table(&format!("public.{table}"), "");
    }
    builder.build()
}

fn options(from: Side, to: Side) -> CopyOptions {
    stagingprop::copy::CopyOptions::new(from, to)
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

/// The definitions of every index of the copied tables.
fn index_definitions(cluster: &stagingprop::cluster::LocalCluster, db: &str) -> String {
    psql(
        cluster,
        db,
        "SELECT string_agg(pg_get_indexdef(indexrelid), E'\n' ORDER BY pg_get_indexdef(indexrelid)) FROM pg_index \
         WHERE indrelid IN ('catentry'::regclass, 'catentdesc'::regclass, 'attribute'::regclass, 'staticfile'::regclass)",
    )
}

fn assert_equal(p: &Pair) {
    let c = clusters();
    // Secondary indexes a copy set aside are all built again, exactly as they were.
    assert_eq!(
        index_definitions(&c.staging, &p.staging),
        index_definitions(&c.production, &p.production)
    );
    for (table, key) in TABLES {
        let s = dump(&c.staging, &p.staging, table, key);
        let pr = dump(&c.production, &p.production, table, key);
        assert_eq!(s, pr, "{table} differs (count:md5)");
    }
}

/// Terminates the target session(s) loading staticfile (`only_one`: one of them) as soon as one
/// shows up (4 s at most); whether one was seen.
async fn kill_staticfile_copy(
    cluster: &stagingprop::cluster::LocalCluster,
    db: &str,
    only_one: bool,
) -> bool {
    let limit = if only_one { " LIMIT 1" } else { "" };
    let sql = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'COPY \"public\".\"staticfile\"%'{limit}) copying"
    );
    for _ in 0..400 {
        if psql(cluster, db, &sql).trim() != "0" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// After a failed copy into staging: every table is still empty or equals production's.
fn assert_untouched_or_complete(p: &Pair) {
    let c = clusters();
    for (table, key) in TABLES {
        let target = dump(&c.staging, &p.staging, table, key);
        let source = dump(&c.production, &p.production, table, key);
        assert!(
            target == source || target.starts_with("0:"),
            "{table} is neither untouched nor complete: {target} vs {source}"
        );
    }
}

/// Changes staging for a while (updates, inserts, deletes, a sequence), as merchandisers would
/// during a copy.
fn write_during_copy(staging_db: String) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
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
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_then_sync_loses_and_doubles_nothing_under_concurrent_writes() {
    let p = pair("copy_handoff");
    p.on_staging(SEED);
    init_without_slot(&p.config).await;

    // Staging keeps changing while the copy runs; every change must arrive exactly once.
    let writer = write_during_copy(p.staging.clone());
    let report = copy::copy(&p.config, &options(Side::Staging, Side::Production))
        .await
        .expect("copy");
    writer.join().unwrap();
    let handoff = report
        .handoff
        .expect("staging -> production records a hand-off");
    assert_eq!(report.tables.len(), 4);
    let recorded = p.on_production("SELECT end_lsn FROM stagingprop.progress");
    assert_eq!(recorded.trim(), handoff.to_string());
    let slot =
        p.on_staging("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'copy_handoff'");
    assert_eq!(slot.trim(), "1");

    let summary = caught_up(&p.config)
        .await
        .expect("sync after copy: a doubled insert or delete would be a conflict error");
    assert_equal(&p);
    assert_eq!(summary.stats.conflicts_skipped, 0);
    // The sequence came along: production's next attribute id follows staging's.
    let next_staging = p.on_staging("SELECT last_value FROM attribute_attribute_id_seq");
    let next_production = p.on_production("SELECT last_value FROM attribute_attribute_id_seq");
    assert_eq!(next_staging.trim(), next_production.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_production_seeds_a_new_staging_without_a_slot() {
    let c = clusters();
    let p = pair("copy_reverse");
    p.on_production(SEED);
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
    assert_eq!(p.on_staging("SELECT count(*) FROM staticfile").trim(), "0");
    let slots = p.on_production("SELECT count(*) FROM pg_replication_slots");
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
    p.on_staging("UPDATE catentry SET partnumber = 'changed'");
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
    p.on_production(SEED);
    p.on_production("INSERT INTO staticfile SELECT '/f/' || g, convert_to(repeat(md5(g::text), 10), 'UTF8') FROM generate_series(1, 100000) g");
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let mut opts = options(Side::Production, Side::Staging);
        opts.jobs = 2;
        copy::copy(&config, &opts).await
    });
    // Kill the target session loading the big table.
    let killed = kill_staticfile_copy(&c.staging, &p.staging, false).await;
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
    assert_untouched_or_complete(&p);
    // Re-running with --truncate finishes the job.
    let mut again = options(Side::Production, Side::Staging);
    again.truncate = true;
    copy::copy(&p.config, &again).await.expect("re-run");
    assert_equal(&p);
}

/// A copy from staging to production whose big table's COPY is terminated on production:
/// the pair and what the copy returned.
async fn failed_seeding_copy(prefix: &str) -> (Pair, Result<copy::CopyReport, CopyError>) {
    let c = clusters();
    let p = pair(prefix);
    p.on_staging(SEED);
    p.on_staging(BIG_STATICFILE);
    init_without_slot(&p.config).await;
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        copy::copy(&config, &options(Side::Staging, Side::Production)).await
    });
    let killed = kill_staticfile_copy(&c.production, &p.production, false).await;
    assert!(killed, "the big table's COPY was never seen on production");
    let result = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("copy ends")
        .unwrap();
    (p, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_refuses_a_production_whose_seeding_copy_failed() {
    let (p, result) = failed_seeding_copy("copy_failed_handoff").await;
    assert!(
        matches!(result, Err(CopyError::Partial { .. })),
        "{result:?}"
    );

    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(2),
        ..Default::default()
    };
    let err = sync::run(&p.config, &options, std::future::pending())
        .await
        .expect_err("sync must not stream onto a half-seeded production");
    assert!(err.to_string().contains("did not complete"), "{err}");

    let mut again = self::options(Side::Staging, Side::Production);
    again.truncate = true;
    copy::copy(&p.config, &again).await.expect("copy again");
    p.on_staging("UPDATE catentry SET counter = 7 WHERE catentry_id < 10");
    tokio::time::timeout(
        Duration::from_secs(120),
        sync::run(&p.config, &options, std::future::pending()),
    )
    .await
    .expect("sync in time")
    .expect("sync after a complete copy");
    assert_equal(&p);
}

/// How many ranges `report` says `table` was loaded in.
fn ranges_of(report: &copy::CopyReport, table: &str) -> usize {
    report
        .tables
        .iter()
        .find(|t| t.table.to_string() == table)
        .map(|t| t.ranges)
        .unwrap_or_else(|| panic!("{table} missing from {:?}", report.tables))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_tables_load_range_by_range_each_committed_alone() {
    let c = clusters();
    let p = pair("copy_alone");
    p.on_staging(SEED);
    // Setting an index of catentdesc aside would wait for the lock this test holds on it.
    p.on_staging("DROP INDEX catentdesc_name");
    p.on_production("DROP INDEX catentdesc_name");
    init_without_slot(&p.config).await;
    // Holding catentdesc (SHARE: readers pass, COPY waits) keeps its ranges from loading.
    let (holder, connection) = tokio_postgres::connect(
        &c.production.conninfo(&p.production, "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; LOCK TABLE catentdesc IN SHARE MODE")
        .await
        .unwrap();
    let writer = write_during_copy(p.staging.clone());
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let mut opts = options(Side::Staging, Side::Production);
        opts.split_bytes = 0;
        copy::copy(&config, &opts).await
    });
    // catentry, catentdesc's parent, is committed while catentdesc waits: in the one-transaction
    // or prepared modes nothing of the group would be visible yet.
    let mut visible = String::new();
    for _ in 0..600 {
        visible = p.on_production("SELECT count(*) FROM catentry");
        if visible.trim().parse::<u64>().unwrap() >= 19_900 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        visible.trim().parse::<u64>().unwrap() >= 19_900,
        "catentry never became visible on its own: {visible}"
    );
    assert!(
        !running.is_finished(),
        "the copy ended with catentdesc held"
    );
    assert_eq!(prepared_count(&c.production, &p.production), 0);
    // Until the hand-off, the progress row says "copy in progress": sync refuses.
    assert_eq!(
        p.on_production("SELECT end_lsn FROM stagingprop.progress")
            .trim(),
        "0/0"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("copy ends")
        .unwrap()
        .expect("copy");
    writer.join().unwrap();
    assert_eq!(ranges_of(&report, "public.catentry"), 2);
    assert_eq!(ranges_of(&report, "public.catentdesc"), 2);
    support::caught_up(&p.config)
        .await
        .expect("sync after the copy: a doubled insert or delete would be a conflict error");
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_checks_foreign_keys_gets_parents_before_children() {
    let c = clusters();
    psql(
        &c.production,
        "postgres",
        "DO $$ BEGIN CREATE ROLE plain_copier LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    let p = pair_as("copy_checked", "plain_copier");
    psql(
        &c.production,
        &p.production,
        &format!(
            "ALTER DATABASE {} OWNER TO plain_copier;
             ALTER TABLE catentry OWNER TO plain_copier; ALTER TABLE catentdesc OWNER TO plain_copier;
             ALTER TABLE attribute OWNER TO plain_copier; ALTER TABLE staticfile OWNER TO plain_copier;",
            p.production
        ),
    );
    p.on_staging(SEED);
    p.on_staging("INSERT INTO catentdesc SELECT g, l, repeat('name ', 20) FROM generate_series(1, 20000) g, generate_series(1, 8) l");
    let report = init_without_slot(&p.config).await;
    // init says what the role costs and what to change.
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.contains("may not set session_replication_role") && l.contains("superuser")),
        "{:?}",
        report.lines
    );
    let writer = write_during_copy(p.staging.clone());
    // catentdesc, the larger, is queued first; every row of it refers to catentry, whose two
    // ranges must both be committed before any of catentdesc loads, or the target refuses it.
    let mut opts = options(Side::Staging, Side::Production);
    opts.split_bytes = 0;
    let report = copy::copy(&p.config, &opts)
        .await
        .expect("copy with foreign keys checked");
    writer.join().unwrap();
    assert_eq!(ranges_of(&report, "public.catentry"), 2);
    assert_eq!(ranges_of(&report, "public.catentdesc"), 2);
    support::caught_up(&p.config)
        .await
        .expect("sync after the copy");
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_is_resumed_with_only_what_is_missing() {
    let c = clusters();
    let (p, result) = failed_seeding_copy("copy_resume").await;
    let Err(CopyError::Partial { failed, .. }) = result else {
        panic!("expected a partial failure, got {result:?}");
    };
    assert!(
        failed.contains(&"public.staticfile".to_owned()),
        "{failed:?}"
    );
    // What the first run completed (each table here is one piece, committed with its rows).
    let complete: Vec<&str> = TABLES
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| {
            p.on_production(&format!("SELECT count(*) > 0 FROM {t}"))
                .trim()
                == "t"
        })
        .collect();
    assert!(!complete.contains(&"staticfile"));
    // staticfile's secondary index was set aside for the load: it stays recorded, not built.
    assert_eq!(
        p.on_production("SELECT string_agg(index_name, ',') FROM stagingprop.copy_indexes WHERE table_name = 'public.staticfile'")
        .trim(),
        "staticfile_length"
    );
    assert_eq!(
        p.on_production("SELECT count(*) FROM pg_indexes WHERE indexname = 'staticfile_length'")
            .trim(),
        "0"
    );
    // status says what is left and what to do.
    let st = stagingprop::ops::status::status(
        &p.config,
        &stagingprop::ops::status::Thresholds::default(),
    )
    .await
    .expect("status");
    assert_eq!(st.copy_complete_tables, Some(complete.len()));
    assert_eq!(
        st.copy_indexes_aside,
        vec!["public.staticfile_length".to_owned()]
    );
    let expected = format!("({} of its tables are complete)", complete.len());
    assert!(
        st.problems
            .iter()
            .any(|p| p.contains(&expected) && p.contains("run the same `stagingprop copy` again")),
        "{:?}",
        st.problems
    );
    // Staging moves on between the runs: kept tables get these from sync, the tables loaded
    // again from the second snapshot (which holds them) must not get them twice.
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO staticfile VALUES ('/between/1', 'a'), ('/between/2', 'b');
         DELETE FROM staticfile WHERE path = '/f/7';
         UPDATE catentry SET counter = counter + 1 WHERE catentry_id < 100;
         INSERT INTO catentry (catentry_id, partnumber) VALUES (500000, 'BETWEEN');
         INSERT INTO catentdesc VALUES (500000, -1, 'between');
         INSERT INTO attribute (name) VALUES ('between');",
    );
    let report = copy::copy(&p.config, &options(Side::Staging, Side::Production))
        .await
        .expect("the copy run again resumes");
    let mut loaded: Vec<String> = report.tables.iter().map(|t| t.table.to_string()).collect();
    loaded.sort();
    let mut missing: Vec<String> = TABLES
        .iter()
        .filter(|(t, _)| !complete.contains(t))
        .map(|(t, _)| format!("public.{t}"))
        .collect();
    missing.sort();
    assert_eq!(
        loaded, missing,
        "the second run loads only what the first did not complete"
    );
    psql(
        &c.staging,
        &p.staging,
        "INSERT INTO staticfile VALUES ('/after/1', 'c');
         UPDATE staticfile SET content = 'changed' WHERE path = '/between/1';
         UPDATE catentry SET counter = counter + 1 WHERE catentry_id < 50;",
    );
    support::caught_up(&p.config)
        .await
        .expect("sync after the resumed copy: a change applied twice would be a conflict error");
    assert_equal(&p);
}

/// Options that split every table of more than one block across `jobs` workers, each group
/// committed at once (prepared parts).
fn split_options(from: Side, to: Side, jobs: usize) -> CopyOptions {
    let mut opts = options(from, to);
    opts.jobs = jobs;
    opts.split_bytes = 0;
    opts.atomic = true;
    opts
}

/// Rolls back whatever is left prepared in a database when a test ends, passed or not: a prepared
/// transaction holds back every slot created on the cluster, which other tests share.
struct RollbackPreparedOnDrop(String);

impl Drop for RollbackPreparedOnDrop {
    fn drop(&mut self) {
        let c = clusters();
        let gids = psql(
            &c.staging,
            &self.0,
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
        );
        for gid in gids.lines().filter(|g| !g.is_empty()) {
            let _ = c
                .staging
                .psql(&self.0, &format!("ROLLBACK PREPARED '{gid}'"));
        }
    }
}

fn prepared_count(cluster: &stagingprop::cluster::LocalCluster, db: &str) -> u64 {
    psql(
        cluster,
        db,
        "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
    )
    .trim()
    .parse()
    .unwrap()
}

const BIG_STATICFILE: &str = "INSERT INTO staticfile SELECT '/f/' || g, convert_to(repeat(md5(g::text), 10), 'UTF8') FROM generate_series(1, 100000) g";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_copy_loads_ranges_in_parallel_and_hands_off_exactly() {
    let c = clusters();
    let p = pair("copy_split");
    p.on_staging(SEED);
    init_without_slot(&p.config).await;
    let writer = write_during_copy(p.staging.clone());
    let report = copy::copy(
        &p.config,
        &split_options(Side::Staging, Side::Production, 3),
    )
    .await
    .expect("split copy");
    writer.join().unwrap();
    let ranges = |name: &str| {
        report
            .tables
            .iter()
            .find(|t| t.table.to_string() == name)
            .map(|t| t.ranges)
            .unwrap_or_else(|| panic!("{name} missing from {:?}", report.tables))
    };
    // Each table is reported once, with the ranges it was cut into.
    assert_eq!(report.tables.len(), 4, "{:?}", report.tables);
    assert_eq!(ranges("public.catentry"), 3);
    assert_eq!(ranges("public.catentdesc"), 3);
    let rows = |name: &str| {
        report
            .tables
            .iter()
            .find(|t| t.table.to_string() == name)
            .unwrap()
            .rows
    };
    assert!(rows("public.catentry") >= 19_900, "{:?}", report.tables);
    assert_eq!(prepared_count(&c.production, &p.production), 0);
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.copy_commits")
            .trim(),
        "0"
    );
    // Nothing the snapshot held is applied twice, nothing after it is lost.
    support::caught_up(&p.config)
        .await
        .expect("sync after a split copy: a doubled insert or delete would be a conflict error");
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_rolls_back_every_part_of_its_group() {
    let c = clusters();
    let p = pair("copy_split_killed");
    let _cleanup = RollbackPreparedOnDrop(p.staging.clone());
    p.on_production(SEED);
    p.on_production(BIG_STATICFILE);
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        copy::copy(&config, &split_options(Side::Production, Side::Staging, 2)).await
    });
    // Kill the target session of one of staticfile's parts only.
    let killed = kill_staticfile_copy(&c.staging, &p.staging, true).await;
    assert!(
        killed,
        "a staticfile part was never seen loading on the target"
    );
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
    // The other part of staticfile, whether it was prepared or still loading, is gone too.
    assert_eq!(prepared_count(&c.staging, &p.staging), 0);
    assert_untouched_or_complete(&p);
    let mut again = split_options(Side::Production, Side::Staging, 2);
    again.truncate = true;
    copy::copy(&p.config, &again).await.expect("re-run");
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_with_its_parts_prepared_is_finished_by_the_next() {
    let c = clusters();
    let p = pair("copy_split_kill9");
    let _cleanup = RollbackPreparedOnDrop(p.staging.clone());
    p.on_production(SEED);
    p.on_production(BIG_STATICFILE);
    // A first split copy creates the decision table; the target is then emptied again.
    copy::copy(
        &p.config,
        &split_options(Side::Production, Side::Staging, 2),
    )
    .await
    .expect("first copy");
    p.on_staging("TRUNCATE catentry, catentdesc, attribute, staticfile");
    // Holding the decision table makes the copy stop with every part of a group prepared.
    let (holder, connection) = tokio_postgres::connect(
        &c.staging.conninfo(&p.staging, "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; LOCK TABLE stagingprop.copy_commits IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("stagingprop-copy-kill9-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("stagingprop.toml");
    std::fs::write(&config_path, &p.text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "copy",
            "--from",
            "production",
            "--to",
            "staging",
            "--jobs",
            "2",
            "--split-mb",
            "0",
            "--atomic",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn stagingprop copy");
    // (Polled from another session: pg_stat_activity is read once per transaction.)
    let mut waiting = false;
    for _ in 0..600 {
        let n = psql(
            &c.staging,
            &p.staging,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"stagingprop\".\"copy_commits\"%'",
        );
        if n.trim() != "0" {
            waiting = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().expect("kill -9 the copy");
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(waiting, "the copy never reached its commit decision");
    assert!(prepared_count(&c.staging, &p.staging) >= 2);
    // status tells the operator what is left and what to do.
    let st = stagingprop::ops::status::status(
        &p.config,
        &stagingprop::ops::status::Thresholds::default(),
    )
    .await
    .expect("status");
    assert!(
        st.problems
            .iter()
            .any(|p| p.contains("of an interrupted copy are still prepared on staging")),
        "{:?}",
        st.problems
    );
    // A prepared part is invisible: its tables are still empty; the rest is complete.
    let mut invisible = 0;
    for (table, key) in TABLES {
        let target = dump(&c.staging, &p.staging, table, key);
        let source = dump(&c.production, &p.production, table, key);
        if target.starts_with("0:") {
            invisible += 1;
        } else {
            assert_eq!(target, source, "{table} is neither untouched nor complete");
        }
    }
    assert!(invisible >= 1);
    holder.batch_execute("COMMIT").await.unwrap();

    // The next copy finds the parts (rolled back, or committed if the killed copy's decision
    // still went through) and then completes every table.
    let mut again = split_options(Side::Production, Side::Staging, 2);
    again.truncate = true;
    let mut result = copy::copy(&p.config, &again).await;
    for _ in 0..50 {
        match &result {
            // The killed copy's session may take a moment to end and release its lock.
            Err(e) if e.to_string().contains("another stagingprop copy") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                result = copy::copy(&p.config, &again).await;
            }
            _ => break,
        }
    }
    result.expect("copy after the killed one");
    assert_eq!(prepared_count(&c.staging, &p.staging), 0);
    assert_equal(&p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_left_prepared_are_committed_when_decided_and_rolled_back_otherwise() {
    let c = clusters();
    let p = pair("copy_leftovers");
    let _cleanup = RollbackPreparedOnDrop(p.staging.clone());
    p.on_production(SEED);
    // What a copy killed mid-commit leaves: group 0 undecided, group 1 decided; and a prepared
    // transaction that is not stagingprop's, which must be left alone.
    psql(
        &c.staging,
        &p.staging,
        "CREATE SCHEMA stagingprop;
         CREATE TABLE stagingprop.copy_commits (group_id text PRIMARY KEY, decided_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO stagingprop.copy_commits VALUES ('stagingprop_copy:9-1:1');",
    );
    for (gid, sql) in [
        (
            "stagingprop_copy:9-1:0:0",
            "INSERT INTO attribute (name) VALUES ('undecided')",
        ),
        (
            "stagingprop_copy:9-1:1:0",
            "INSERT INTO staticfile VALUES ('/decided', 'x')",
        ),
        (
            "stagingprop_copy:9-1:1:1",
            "INSERT INTO staticfile VALUES ('/decided-2', 'y')",
        ),
        (
            "someone_else",
            "INSERT INTO staticfile VALUES ('/not-ours', 'z')",
        ),
    ] {
        p.on_staging(&format!("BEGIN; {sql}; PREPARE TRANSACTION '{gid}'"));
    }
    assert_eq!(prepared_count(&c.staging, &p.staging), 4);

    // The copy resolves them first; the committed group's table is then not empty.
    let err = copy::copy(&p.config, &options(Side::Production, Side::Staging))
        .await
        .expect_err("staticfile holds the decided group's rows");
    assert!(err.to_string().contains("public.staticfile"), "{err}");
    assert_eq!(
        p.on_staging("SELECT string_agg(path, ',' ORDER BY path) FROM staticfile")
            .trim(),
        "/decided,/decided-2"
    );
    assert_eq!(p.on_staging("SELECT count(*) FROM attribute").trim(), "0");
    assert_eq!(
        p.on_staging("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
            .trim(),
        "someone_else"
    );
    assert_eq!(
        p.on_staging("SELECT count(*) FROM stagingprop.copy_commits")
            .trim(),
        "0"
    );
    p.on_staging("ROLLBACK PREPARED 'someone_else'");

    // Two copies into one database at once: the second is refused.
    let (holder, connection) = tokio_postgres::connect(
        &c.staging.conninfo(&p.staging, "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&0x7374_6167_636f_7079i64])
        .await
        .unwrap();
    let err = copy::copy(&p.config, &options(Side::Production, Side::Staging))
        .await
        .expect_err("the copy lock is taken");
    assert!(
        err.to_string().contains("another stagingprop copy"),
        "{err}"
    );
}
