//! Fan-out (issue 20): one staging published once to a real NATS JetStream stream and applied
//! to several production targets by `sync --from-stream`, each exactly once, at its own pace,
//! with its own key rules; the publisher killed with SIGKILL at random moments; a target that
//! fell off the stream's retention stopped with the gap error.

mod support;

use std::time::{Duration, Instant};

use stagingprop::config::Config;
use stagingprop::model::Lsn;
use stagingprop::stream;
use stagingprop::sync::{self, StopAt, SyncOptions};
use support::nats::{NatsCluster, NatsServer};
use support::{Scratch, clusters, fresh_db, psql, rng::Rng};

const SCHEMA: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL, price numeric(12,2));
CREATE TABLE offer (offer_id bigint PRIMARY KEY,
  catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE, note text);
";

/// The tests of this file run one at a time: each starts NATS servers, clusters and processes
/// that share two cores, and a JetStream cluster starved of CPU may not elect its leader.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How far catentry keys move on the target with the `offset` rule.
const OFFSET: i64 = 1_000_000;

/// Staging's workload while a fault test kills and restarts things: `rounds` rounds of 15 small
/// transactions, 150 ms apart, and in two of them one transaction inserting `big_rows` products
/// (many chunks) from key `big_keys` on.
fn workload_beside_faults(
    staging_db: String,
    seed: u64,
    rounds: u64,
    big_rows: u64,
    big_keys: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        for round in 0..rounds {
            psql(
                &clusters().staging,
                &staging_db,
                &workload(&mut rng, 1 + round * 100, 15),
            );
            if round % (rounds / 2) == rounds / 4 {
                psql(
                    &clusters().staging,
                    &staging_db,
                    &format!(
                        "INSERT INTO catentry SELECT g, 'big' || g, g FROM generate_series({0}, {0} + {1}) g",
                        big_keys + round * 10_000,
                        big_rows - 1
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    })
}

/// `count` staging transactions of random catalogue edits, keys from `first_id` on.
fn workload(rng: &mut Rng, first_id: u64, count: u64) -> String {
    let mut sql = String::new();
    let mut next = first_id;
    for _ in 0..count {
        sql.push_str("BEGIN;\n");
        for _ in 0..1 + rng.below(4) {
            let some = first_id.saturating_sub(200) + rng.below(next - first_id + 200);
            match rng.below(6) {
                0 | 1 => {
                    sql.push_str(&format!(
                        "INSERT INTO catentry VALUES ({next}, 'p{next}', {}.{:02});\n",
                        rng.below(1000),
                        rng.below(100)
                    ));
                    next += 1;
                }
                2 => sql.push_str(&format!(
                    "UPDATE catentry SET price = coalesce(price, 0) + 1 WHERE catentry_id = {some};\n"
                )),
                3 => sql.push_str(&format!(
                    "DELETE FROM catentry WHERE catentry_id = {some};\n"
                )),
                4 => sql.push_str(&format!(
                    "INSERT INTO offer SELECT {}, catentry_id, 'o' FROM catentry WHERE catentry_id = {some} ON CONFLICT DO NOTHING;\n",
                    rng.below(5000)
                )),
                _ => sql.push_str(&format!(
                    "UPDATE offer SET note = note || 'x' WHERE offer_id = {};\n",
                    rng.below(5000)
                )),
            }
        }
        sql.push_str("COMMIT;\n");
    }
    sql
}

/// The managed rows of a database, keys shifted back by `offset` (md5 of each table).
fn fingerprint(cluster: &stagingprop::cluster::LocalCluster, db: &str, offset: i64) -> String {
    psql(
        cluster,
        db,
        &format!(
            "SELECT (SELECT count(*) || ' ' || md5(coalesce(string_agg((catentry_id - {offset}) || ':' || partnumber || ':' || coalesce(price::text, '-'), ',' ORDER BY catentry_id), '')) FROM catentry) \
             || ' | ' || (SELECT count(*) || ' ' || md5(coalesce(string_agg(offer_id || ':' || (catentry_id - {offset}) || ':' || coalesce(note, '-'), ',' ORDER BY offer_id), '')) FROM offer)"
        ),
    )
    .trim()
    .to_owned()
}

/// One staging database, its slot and publication, the spool and the stream.
struct Fanout {
    prefix: String,
    staging: String,
    nats_url: String,
    spool: Scratch,
    /// `[stream]` lines beyond url, name and consumer.
    stream_extra: String,
}

impl Fanout {
    fn new(prefix: &str, nats_url: &str, stream_extra: &str) -> Fanout {
        let staging = fresh_db(&clusters().staging, prefix);
        psql(&clusters().staging, &staging, SCHEMA);
        Fanout {
            prefix: prefix.into(),
            staging,
            nats_url: nats_url.to_owned(),
            spool: Scratch::new(&format!("{prefix}-spool")),
            stream_extra: stream_extra.into(),
        }
    }

    /// A target: a new production database and the config that feeds it from the stream
    /// through its own consumer; `catentry_rules` are catentry's extra `[[tables]]` lines.
    fn target(&self, name: &str, catentry_rules: &str) -> (String, Config) {
        let (production, _, config) = self.target_text(name, catentry_rules);
        (production, config)
    }

    /// [`Fanout::target`], with the config file's text.
    fn target_text(&self, name: &str, catentry_rules: &str) -> (String, String, Config) {
        let c = clusters();
        let production = fresh_db(&c.production, &format!("{}_{name}", self.prefix));
        psql(&c.production, &production, SCHEMA);
        let text = format!(
            "[staging]\nurl = \"{staging}\"\nsslmode = \"disable\"\n\
             [production]\nurl = \"{production}\"\nsslmode = \"disable\"\n\
             [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\n\
             [spool]\ndir = \"{spool}\"\n\
             [stream]\nurl = \"{url}\"\nname = \"{stream}\"\nconsumer = \"{name}\"\n{extra}\n\
             [[tables]]\nname = \"public.catentry\"\n{catentry_rules}\n\
             [[tables]]\nname = \"public.offer\"\n",
            staging = c.staging.conninfo(&self.staging, "postgres"),
            production = c.production.conninfo(&production, "postgres"),
            prefix = self.prefix,
            spool = self.spool.0.display(),
            url = self.nats_url,
            stream = self.prefix.to_uppercase(),
            extra = self.stream_extra,
        );
        let config = Config::from_toml_str(&text, "test")
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        (production, text, config)
    }

    fn on_staging(&self, sql: &str) -> String {
        psql(&clusters().staging, &self.staging, sql)
    }
}

/// The end of the last transaction the stream holds whole.
async fn published_end(config: &Config) -> Result<Lsn, stream::StreamError> {
    let stream_config = config.stream.as_ref().unwrap();
    let js = stream::connect(stream_config).await?;
    let opened = stream::open_stream(&js, stream_config).await?;
    let last = stream::last_published(&opened, stream_config).await?;
    Ok(stream::Published::after(last, 0).end)
}

/// Waits (120 s at most) until the stream holds every transaction staging committed so far
/// (a server that does not answer, as while a cluster elects a leader, is asked again; the
/// publisher's own retries back off up to 30 s).
async fn wait_published(fanout: &Fanout, config: &Config) {
    let now: Lsn = fanout
        .on_staging("SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    // The publisher's heartbeats (every second while idle) commit past `now`.
    loop {
        let published = published_end(config).await;
        if published.as_ref().is_ok_and(|end| *end >= now) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not reach staging's {now} within 120 s (last: {published:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `sync --from-stream` until the target has everything the stream holds.
async fn apply_stream(config: &Config) -> sync::SyncSummary {
    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(10),
        from_stream: true,
        ..Default::default()
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        sync::run(config, &options, std::future::pending()),
    )
    .await
    .expect("sync --from-stream did not catch up within 120 s")
    .expect("sync --from-stream")
}

/// Starts `publish` in this process; the sender stops it.
fn start_publisher(
    config: &Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<sync::PublishSummary, sync::SyncError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = config.clone();
    let task = tokio::spawn(async move {
        sync::publish(&config, async move {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_targets_with_their_own_key_rules_each_apply_the_stream_exactly_once() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    // A small max_payload: the big transaction goes out in many chunks.
    let nats = NatsServer::start("three", "max_payload: 65536");
    let fanout = Fanout::new("fan_three", &nats.url(), "chunk_bytes = 4096");
    let (a_db, a) = fanout.target("a", "");
    let (b_db, b) = fanout.target("b", "");
    let (c_db, c) = fanout.target(
        "c",
        &format!("key = {{ rule = \"offset\", offset = {OFFSET} }}"),
    );
    for config in [&a, &b, &c] {
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let (stop, publisher) = start_publisher(&a);
    let production = &clusters().production;
    let mut rng = Rng::new(0x5eed_f00d);

    // Round 1: a random workload; every target applies what the stream holds.
    fanout.on_staging(&workload(&mut rng, 1, 150));
    wait_published(&fanout, &a).await;
    for config in [&a, &b, &c] {
        apply_stream(config).await;
    }
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert_eq!(fingerprint(production, &a_db, 0), staging);

    // Round 2: more edits and one large transaction (hundreds of chunks); target B stays
    // behind for a while and catches up from its own position later.
    fanout.on_staging(&workload(&mut rng, 1000, 150));
    fanout.on_staging(
        "INSERT INTO catentry SELECT g, 'big' || g, g FROM generate_series(100001, 103000) g",
    );
    wait_published(&fanout, &a).await;
    let a_summary = apply_stream(&a).await;
    assert!(
        a_summary.stats.rows_inserted >= 3000,
        "{:?}",
        a_summary.stats
    );
    apply_stream(&c).await;
    fanout.on_staging(&workload(&mut rng, 5000, 100));
    wait_published(&fanout, &a).await;
    for config in [&a, &b, &c] {
        apply_stream(config).await;
    }
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert!(
        staging.starts_with("3"),
        "the workload left rows: {staging}"
    );
    assert_eq!(fingerprint(production, &a_db, 0), staging, "target a");
    assert_eq!(fingerprint(production, &b_db, 0), staging, "target b");
    assert_eq!(
        fingerprint(production, &c_db, OFFSET),
        staging,
        "target c, through its offset"
    );
    // Each target's progress row names the stream sequence it resumes after.
    for db in [&a_db, &b_db, &c_db] {
        let seq = psql(
            production,
            db,
            "SELECT stream_seq FROM stagingprop.progress",
        );
        assert!(seq.trim().parse::<u64>().unwrap() > 100, "{db}: {seq}");
    }
    // With the publisher stopped (its idle heartbeats are transactions too), a run with
    // nothing new applies nothing.
    stop.send(()).unwrap();
    let summary = publisher.await.unwrap().expect("publish");
    assert!(summary.published.is_valid());
    apply_stream(&b).await;
    let again = apply_stream(&b).await;
    assert_eq!(again.stats.transactions, 0, "{:?}", again.stats);
    // status: target b has applied the whole stream.
    let report = stagingprop::ops::status::status(&b, &Default::default())
        .await
        .expect("status");
    let position = report.stream.expect("the stream's part of status");
    assert_eq!(position.behind_messages, 0, "{position:?}");
    assert_eq!(position.applied_sequence, Some(position.last_sequence));

    // Staging decoded its WAL once: one slot, confirmed by the publisher.
    let slots = fanout.on_staging(
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    );
    assert_eq!(slots.trim(), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_behind_the_streams_retention_stops_with_the_gap_error() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("gap", "");
    let fanout = Fanout::new("fan_gap", &nats.url(), "");
    let (_, a) = fanout.target("a", "");
    stagingprop::ops::init::init(&a, &Default::default())
        .await
        .expect("init");
    // The stream keeps only a few messages.
    let stream_config = a.stream.clone().unwrap();
    let js = stream::connect(&stream_config).await.unwrap();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: stream_config.name.clone(),
        subjects: vec![stream_config.subject.clone()],
        max_messages: 5,
        ..Default::default()
    })
    .await
    .unwrap();
    let (stop, publisher) = start_publisher(&a);
    let mut rng = Rng::new(7);
    fanout.on_staging(&workload(&mut rng, 1, 3));
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    // Twenty transactions later the stream no longer holds what follows the target's position.
    fanout.on_staging(&workload(&mut rng, 1000, 20));
    wait_published(&fanout, &a).await;
    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(1),
        from_stream: true,
        ..Default::default()
    };
    let before = psql(
        &clusters().production,
        &a.production_db_name(),
        "SELECT end_lsn FROM stagingprop.progress",
    );
    let result = sync::run(&a, &options, std::future::pending()).await;
    match result {
        Err(sync::SyncError::Stream(e @ stream::StreamError::Gap { .. })) => {
            let text = e.to_string();
            assert!(text.contains("re-seed"), "{text}");
        }
        other => panic!("expected the gap error, got {other:?}"),
    }
    let after = psql(
        &clusters().production,
        &a.production_db_name(),
        "SELECT end_lsn FROM stagingprop.progress",
    );
    assert_eq!(before, after, "nothing was applied past the gap");
    let report = stagingprop::ops::status::status(&a, &Default::default())
        .await
        .expect("status");
    let stream_position = report.stream.clone().expect("the stream's part of status");
    assert_eq!(
        stream_position.retention_headroom, 0.0,
        "{stream_position:?}"
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("no longer holds the next message")),
        "{:?}",
        report.problems
    );
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_seeded_by_copy_while_publishing_runs_continues_from_its_hand_off() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("seed", "");
    let fanout = Fanout::new("fan_seed", &nats.url(), "");
    let (a_db, a) = fanout.target("a", "");
    stagingprop::ops::init::init(&a, &Default::default())
        .await
        .expect("init");
    let (stop, publisher) = start_publisher(&a);
    let mut rng = Rng::new(99);
    fanout.on_staging(&workload(&mut rng, 1, 100));
    wait_published(&fanout, &a).await;

    // A new target joins: seeded by copy while staging keeps changing and the stream already
    // holds transactions from before its snapshot.
    let (d_db, d) = fanout.target("d", "");
    let staging_db = fanout.staging.clone();
    let edits = std::thread::spawn(move || {
        let mut rng = Rng::new(1234);
        for round in 0..10 {
            psql(
                &clusters().staging,
                &staging_db,
                &workload(&mut rng, 2000 + round * 100, 10),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut options = stagingprop::copy::CopyOptions::new(
        stagingprop::copy::Side::Staging,
        stagingprop::copy::Side::Production,
    );
    options.for_stream = true;
    let report = stagingprop::copy::copy(&d, &options).await.expect("copy");
    let handoff = report.handoff.expect("a hand-off position");
    edits.join().unwrap();
    // The publisher's slot was left alone; the copy's own slot is gone.
    let slots = fanout.on_staging(
        "SELECT string_agg(slot_name, ',') FROM pg_replication_slots WHERE database = current_database()",
    );
    assert_eq!(slots.trim(), "fan_seed");
    let production = &clusters().production;
    assert_eq!(
        psql(
            production,
            &d_db,
            "SELECT end_lsn FROM stagingprop.progress"
        )
        .trim(),
        handoff.to_string()
    );
    wait_published(&fanout, &a).await;
    let applied = apply_stream(&d).await;
    assert!(applied.stats.transactions > 0, "{:?}", applied.stats);
    apply_stream(&a).await;
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert_eq!(
        fingerprint(production, &d_db, 0),
        staging,
        "the seeded target"
    );
    assert_eq!(fingerprint(production, &a_db, 0), staging, "target a");
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

/// What the catalogs say of the managed tables' columns, indexes and constraints.
fn shape(cluster: &stagingprop::cluster::LocalCluster, db: &str) -> String {
    psql(
        cluster,
        db,
        "SELECT string_agg(d, '; ' ORDER BY d) FROM (
           SELECT c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
                  || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '-') d
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
            WHERE c.relname IN ('catentry', 'offer') AND a.attnum > 0 AND NOT a.attisdropped
           UNION ALL
           SELECT pg_get_indexdef(indexrelid) FROM pg_index
            WHERE indrelid IN ('catentry'::regclass, 'offer'::regclass)
           UNION ALL
           SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
            WHERE conrelid IN ('catentry'::regclass, 'offer'::regclass) AND contype <> 'n') s",
    )
    .trim()
    .to_owned()
}

/// Schema changes staging captured reach every target through the stream, in their place among
/// the rows: one target applies them as they come, the other several at once later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_reach_each_target_through_the_stream() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("ddl", "");
    let fanout = Fanout::new("fan_ddl", &nats.url(), "");
    let (a_db, a) = fanout.target("a", "");
    let (b_db, b) = fanout.target("b", "");
    for config in [&a, &b] {
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let (stop, publisher) = start_publisher(&a);
    let mut rng = Rng::new(0xdd1);
    fanout.on_staging(&workload(&mut rng, 1, 50));
    fanout.on_staging(
        "ALTER TABLE catentry ADD COLUMN descr text DEFAULT 'new';
         UPDATE catentry SET descr = 'd' || catentry_id WHERE catentry_id % 3 = 0;",
    );
    fanout.on_staging(&workload(&mut rng, 1000, 50));
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    fanout.on_staging("CREATE INDEX catentry_descr ON catentry (descr)");
    fanout.on_staging(
        "ALTER TABLE offer ADD CONSTRAINT offer_note_short CHECK (length(note) < 10000);
         ALTER TABLE catentry ALTER COLUMN partnumber TYPE varchar(64);",
    );
    fanout.on_staging(&workload(&mut rng, 2000, 50));
    wait_published(&fanout, &a).await;
    for config in [&a, &b] {
        apply_stream(config).await;
    }
    let staging = &clusters().staging;
    let production = &clusters().production;
    let staging_shape = shape(staging, &fanout.staging);
    assert!(staging_shape.contains("catentry_descr"), "{staging_shape}");
    let descr = "SELECT string_agg(catentry_id || ':' || coalesce(descr, '-'), ',' ORDER BY catentry_id) \
                 FROM catentry";
    let staging_rows = fingerprint(staging, &fanout.staging, 0);
    for (name, db) in [("a", &a_db), ("b", &b_db)] {
        assert_eq!(
            shape(production, db),
            staging_shape,
            "target {name}'s schema"
        );
        assert_eq!(
            fingerprint(production, db, 0),
            staging_rows,
            "target {name}'s rows"
        );
        assert_eq!(
            psql(production, db, descr),
            psql(staging, &fanout.staging, descr),
            "target {name}'s new column"
        );
        let applied = psql(
            production,
            db,
            "SELECT count(*) FROM stagingprop.schema_changes",
        );
        assert_eq!(
            applied.trim(),
            "4",
            "target {name} applied each change once"
        );
    }
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

/// A table created on staging in a schema `[[table_patterns]]` manages reaches every target
/// through the stream, created in its place with its rows, each target with its own key rules:
/// on the offset target the new table's reference to a remapped table is translated from its
/// first row on (the capture says what its foreign key refers to), though the target never
/// reads staging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_table_reaches_each_target_with_its_own_key_rules() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("create", "");
    let fanout = Fanout::new("fan_create", &nats.url(), "");
    let pattern = "[[table_patterns]]\nschema = \"public\"";
    let (a_db, a) = fanout.target("a", pattern);
    let (c_db, c) = fanout.target(
        "c",
        &format!("key = {{ rule = \"offset\", offset = {OFFSET} }}\n{pattern}"),
    );
    for config in [&a, &c] {
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let (stop, publisher) = start_publisher(&a);
    let mut rng = Rng::new(0xc4ea7e);
    fanout.on_staging(&workload(&mut rng, 1, 40));
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    fanout.on_staging(
        "BEGIN;
         CREATE TABLE review (review_id bigint PRIMARY KEY,
                              catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE,
                              stars int NOT NULL DEFAULT 5);
         INSERT INTO review SELECT catentry_id, catentry_id, 4 FROM catentry;
         COMMIT;
         UPDATE review SET stars = 1 WHERE review_id % 2 = 0;",
    );
    fanout.on_staging(&workload(&mut rng, 1000, 40));
    wait_published(&fanout, &a).await;
    for config in [&a, &c] {
        apply_stream(config).await;
    }
    let staging = &clusters().staging;
    let production = &clusters().production;
    let reviews = |offset: i64| {
        format!(
            "SELECT count(*) || ':' || coalesce(string_agg(review_id || '>' || (catentry_id - {offset}) \
                    || '*' || stars, ',' ORDER BY review_id), '') FROM review"
        )
    };
    let on_staging = psql(staging, &fanout.staging, &reviews(0));
    assert!(!on_staging.starts_with("0:"), "{on_staging}");
    assert_eq!(psql(production, &a_db, &reviews(0)), on_staging, "target a");
    assert_eq!(
        psql(production, &c_db, &reviews(OFFSET)),
        on_staging,
        "target c: the new table's references follow catentry's offset"
    );
    assert_eq!(
        fingerprint(production, &c_db, OFFSET),
        fingerprint(staging, &fanout.staging, 0)
    );
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

/// Every transaction the stream holds, read through a consumer of its own: their commit
/// LSNs, in stream order (a repeated or missing chunk fails the read).
async fn stream_commits(config: &Config) -> Vec<Lsn> {
    let mut stream_config = config.stream.clone().unwrap();
    stream_config.consumer = "audit".into();
    // A cluster electing a new leader does not answer for a while: ask again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reader = loop {
        let opened = async {
            let js = stream::connect(&stream_config).await?;
            stream::StreamReader::open(&js, &stream_config, None, Lsn::INVALID).await
        };
        match opened.await {
            Ok(reader) => break reader,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cannot read the stream back: {e}"),
        }
    };
    let mut commits = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(3), reader.next()).await {
        match next.expect("the stream reads back in order") {
            Some((_, stagingprop::pgoutput::LogicalMessage::Begin { final_lsn, .. })) => {
                commits.push(final_lsn)
            }
            Some(_) => {}
            None => break,
        }
    }
    commits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_publisher_and_a_nats_restart_lose_and_double_nothing() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsServer::start("kill", "max_payload: 65536");
    let fanout = Fanout::new("fan_kill", &nats.url(), "chunk_bytes = 2048");
    let (a_db, a_text, a) = fanout.target_text("a", "");
    let (b_db, b) = fanout.target(
        "b",
        &format!("key = {{ rule = \"offset\", offset = {OFFSET} }}"),
    );
    for config in [&a, &b] {
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let scratch = Scratch::new("fan-kill-config");
    let config_path = scratch.0.join("stagingprop.toml");
    std::fs::write(&config_path, &a_text).unwrap();
    let spawn_publisher = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
            .arg("--config")
            .arg(&config_path)
            .arg("publish")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start stagingprop publish")
    };
    // The workload runs beside the kills: small transactions and two large ones (chunked).
    let workload_thread =
        workload_beside_faults(fanout.staging.clone(), 0xdead_beef, 24, 1500, 200_000);
    let mut rng = Rng::new(42);
    for kill in 0..10 {
        let mut publisher = spawn_publisher();
        tokio::time::sleep(Duration::from_millis(300 + rng.below(700))).await;
        if kill == 4 {
            // The server goes away under the publisher and comes back.
            nats.restart();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        publisher.kill().unwrap();
        publisher.wait().unwrap();
        if kill == 6 {
            // Target a applies what the stream holds so far, mid-way.
            apply_stream(&a).await;
        }
    }
    workload_thread.join().unwrap();
    let mut publisher = spawn_publisher();
    wait_published(&fanout, &a).await;
    for config in [&a, &b] {
        apply_stream(config).await;
    }
    publisher.kill().unwrap();
    publisher.wait().unwrap();
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    let production = &clusters().production;
    assert_eq!(fingerprint(production, &a_db, 0), staging, "target a");
    assert_eq!(fingerprint(production, &b_db, OFFSET), staging, "target b");
    // The stream holds each transaction once, in commit order.
    let commits = stream_commits(&a).await;
    // (A transaction whose statements changed no row is not sent at all.)
    assert!(commits.len() > 150, "{} transactions", commits.len());
    assert!(
        commits.windows(2).all(|w| w[0] < w[1]),
        "a transaction is in the stream twice or out of order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_applier_loses_and_doubles_nothing() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("applier", "max_payload: 65536");
    let fanout = Fanout::new("fan_applier", &nats.url(), "chunk_bytes = 2048");
    let (a_db, a_text, a) = fanout.target_text(
        "a",
        &format!("key = {{ rule = \"offset\", offset = {OFFSET} }}"),
    );
    stagingprop::ops::init::init(&a, &Default::default())
        .await
        .expect("init");
    let scratch = Scratch::new("fan-applier-config");
    let config_path = scratch.0.join("stagingprop.toml");
    std::fs::write(&config_path, &a_text).unwrap();
    let (stop, publisher) = start_publisher(&a);
    let workload_thread = workload_beside_faults(fanout.staging.clone(), 0xfeed, 20, 2000, 300_000);
    // The applier (the binary) is killed at random moments while the stream grows.
    let mut rng = Rng::new(7);
    for _ in 0..8 {
        let mut applier = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
            .arg("--config")
            .arg(&config_path)
            .args(["sync", "--from-stream"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start stagingprop sync --from-stream");
        tokio::time::sleep(Duration::from_millis(200 + rng.below(600))).await;
        applier.kill().unwrap();
        applier.wait().unwrap();
    }
    workload_thread.join().unwrap();
    // The killed appliers did apply part of the stream (their progress row moved).
    let seq = psql(
        &clusters().production,
        &a_db,
        "SELECT coalesce(max(stream_seq), 0) FROM stagingprop.progress",
    );
    assert!(seq.trim().parse::<u64>().unwrap() > 0, "{seq}");
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert_eq!(
        fingerprint(&clusters().production, &a_db, OFFSET),
        staging,
        "the target, through its offset"
    );
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_the_stream_brings_a_restored_backup_up_to_date() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("replay", "");
    let fanout = Fanout::new("fan_replay", &nats.url(), "");
    let (a_db, a) = fanout.target("a", "");
    stagingprop::ops::init::init(&a, &Default::default())
        .await
        .expect("init");
    let (stop, publisher) = start_publisher(&a);
    let mut rng = Rng::new(31);
    fanout.on_staging(&workload(&mut rng, 1, 60));
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    // The backup: a copy of target a as it is now.
    let production = &clusters().production;
    let backup = format!("{a_db}_backup");
    let mut copied = false;
    for _ in 0..50 {
        if production
            .psql(
                "postgres",
                &format!("CREATE DATABASE {backup} TEMPLATE {a_db}"),
            )
            .is_ok()
        {
            copied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(copied, "cannot copy {a_db} (still in use?)");
    // Target a goes on; the backup stays behind.
    fanout.on_staging(&workload(&mut rng, 1000, 60));
    let mark: Lsn = fanout
        .on_staging("SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();
    fanout.on_staging(&workload(&mut rng, 2000, 60));
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    let backup_db = stagingprop::config::DbConfig::from_command_line(
        "--to",
        &production.conninfo(&backup, "postgres"),
        None,
        None,
    )
    .unwrap();
    let replay = |until: Option<String>| {
        let (a, backup_db) = (a.clone(), backup_db.clone());
        async move {
            let options = sync::ReplayOptions {
                to: sync::ReplayTo::Database(backup_db),
                until,
                from_stream: true,
            };
            sync::replay(&a, &options, std::future::pending())
                .await
                .expect("replay --from-stream")
        }
    };
    let backed_up: Lsn = psql(
        production,
        &backup,
        "SELECT end_lsn FROM stagingprop.progress",
    )
    .trim()
    .parse()
    .unwrap();
    // Up to a cutoff first: the backup stops before the first transaction past it.
    replay(Some(mark.to_string())).await;
    let at: Lsn = psql(
        production,
        &backup,
        "SELECT end_lsn FROM stagingprop.progress",
    )
    .trim()
    .parse()
    .unwrap();
    assert!(at <= mark, "{at} is past the cutoff {mark}");
    assert!(at > backed_up, "the replay to the cutoff applied nothing");
    // Then to the end: the backup equals staging (and target a).
    let summary = replay(None).await;
    assert!(summary.stats.transactions > 0, "{:?}", summary.stats);
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert_eq!(fingerprint(production, &backup, 0), staging, "the backup");
    assert_eq!(fingerprint(production, &a_db, 0), staging, "target a");
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_survives_a_node_killed_while_publishing() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start("jsc", 3);
    wait_for_jetstream(&mut cluster).await;
    let fanout = Fanout::new(
        "fan_cluster",
        &cluster.url(),
        "replicas = 3\nchunk_bytes = 4096",
    );
    let (a_db, a) = fanout.target("a", "");
    stagingprop::ops::init::init(&a, &Default::default())
        .await
        .expect("init");
    // publish creates the stream with three replicas once the cluster has elected its leader.
    let (stop, publisher) = start_publisher(&a);
    let staging_db = fanout.staging.clone();
    let workload_thread = std::thread::spawn(move || {
        let mut rng = Rng::new(0xc105);
        for round in 0..16u64 {
            psql(
                &clusters().staging,
                &staging_db,
                &workload(&mut rng, 1 + round * 100, 15),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // One of the three servers dies mid-stream (with its replica of the stream).
    cluster.servers[1].kill();
    workload_thread.join().unwrap();
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    let staging = fingerprint(&clusters().staging, &fanout.staging, 0);
    assert_eq!(fingerprint(&clusters().production, &a_db, 0), staging);
    let info = {
        let stream_config = a.stream.as_ref().unwrap();
        let js = stream::connect(stream_config).await.unwrap();
        let mut opened = stream::open_stream(&js, stream_config).await.unwrap();
        opened.info().await.unwrap().clone()
    };
    assert_eq!(info.config.num_replicas, 3);
    // Stopped first: its heartbeats would keep the audit reading.
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
    let commits = stream_commits(&a).await;
    assert!(commits.len() > 50, "{} transactions", commits.len());
    assert!(
        commits.windows(2).all(|w| w[0] < w[1]),
        "a transaction is in the stream twice or out of order"
    );
}

/// Waits until the cluster's JetStream answers (it has elected its metadata leader); a cluster
/// that has not after 30 s is started again, once.
async fn wait_for_jetstream(cluster: &mut NatsCluster) {
    for attempt in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let url = cluster.url();
            let answered = async {
                let servers: Vec<async_nats::ServerAddr> =
                    url.split(',').filter_map(|u| u.parse().ok()).collect();
                let client = async_nats::connect(servers).await.ok()?;
                async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .ok()
            };
            if tokio::time::timeout(Duration::from_secs(5), answered)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if attempt == 0 {
            for server in &mut cluster.servers {
                server.kill();
            }
            for server in &mut cluster.servers {
                server.restart();
            }
        }
    }
    panic!("the JetStream cluster elected no leader (twice 30 s)");
}

trait ProductionDb {
    fn production_db_name(&self) -> String;
}

impl ProductionDb for Config {
    fn production_db_name(&self) -> String {
        self.production
            .url
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("dbname="))
            .unwrap()
            .to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_target_has_its_own_guard_and_edit_policy() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("guard", "");
    let fanout = Fanout::new("fan_guard", &nats.url(), "");
    let (a_db, a) = fanout.target("a", "guard = \"record\"\non_production_edit = \"park\"");
    let (b_db, b) = fanout.target("b", "guard = \"refuse\"");
    let production = &clusters().production;
    psql(
        production,
        "postgres",
        "DO $$ BEGIN CREATE ROLE fan_merchant LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    for (config, db) in [(&a, &a_db), (&b, &b_db)] {
        psql(production, db, "GRANT ALL ON catentry TO fan_merchant");
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let (stop, publisher) = start_publisher(&a);
    fanout.on_staging("INSERT INTO catentry SELECT g, 'p' || g, g FROM generate_series(1, 5) g");
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    apply_stream(&b).await;

    let merchant = |db: &str| {
        let conninfo = production.conninfo(db, "fan_merchant");
        async move {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("merchant connects");
            tokio::spawn(connection);
            client
        }
    };
    let edit = "UPDATE catentry SET price = 999 WHERE catentry_id = 3";
    merchant(&a_db)
        .await
        .batch_execute(edit)
        .await
        .expect("target a records production's edits");
    let refused = merchant(&b_db).await.batch_execute(edit).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "target b refuses them: {refused}"
    );

    fanout.on_staging("UPDATE catentry SET price = price + 100");
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    apply_stream(&b).await;
    let prices =
        "SELECT string_agg(catentry_id || ':' || price, ',' ORDER BY catentry_id) FROM catentry";
    assert_eq!(
        psql(production, &a_db, prices).trim(),
        "1:101.00,2:102.00,3:999.00,4:104.00,5:105.00",
        "target a parked staging's change of the edited row"
    );
    assert_eq!(
        psql(
            production,
            &a_db,
            "SELECT operation || ' ' || (row_data->>'price') FROM stagingprop.quarantine WHERE parked"
        )
        .trim(),
        "update 103.00"
    );
    assert_eq!(
        psql(production, &b_db, prices).trim(),
        "1:101.00,2:102.00,3:103.00,4:104.00,5:105.00"
    );
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_travels_the_stream_and_only_the_target_it_was_made_for_applies_it() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start("repair", "");
    let fanout = Fanout::new("fan_repair", &nats.url(), "");
    let (a_db, a_text, a) = fanout.target_text("a", "");
    let (b_db, b) = fanout.target("b", "");
    for config in [&a, &b] {
        stagingprop::ops::init::init(config, &Default::default())
            .await
            .expect("init");
    }
    let (stop, publisher) = start_publisher(&a);
    fanout.on_staging("INSERT INTO catentry SELECT g, 'p' || g, g FROM generate_series(1, 300) g");
    wait_published(&fanout, &a).await;
    apply_stream(&a).await;
    apply_stream(&b).await;
    // The same drift on both targets, and more on b.
    let production = &clusters().production;
    for db in [&a_db, &b_db] {
        psql(
            production,
            db,
            "DELETE FROM catentry WHERE catentry_id = 10; UPDATE catentry SET price = 0 WHERE catentry_id = 250",
        );
    }
    psql(
        production,
        &b_db,
        "UPDATE catentry SET price = 1 WHERE catentry_id = 20",
    );

    // Target a's sync runs from the stream while a repair made with a's config goes through it.
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let sync_a = tokio::spawn({
        let a = a.clone();
        async move {
            let options = SyncOptions {
                from_stream: true,
                max_attempts: Some(10),
                ..Default::default()
            };
            sync::run(&a, &options, async move {
                let _ = stopped_a.await;
            })
            .await
        }
    });
    let scratch = Scratch::new("fan_repair_config");
    let a_path = scratch.0.join("a.toml");
    std::fs::write(&a_path, &a_text).unwrap();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        support::stagingprop(
            &a_path,
            &[
                "verify",
                "--repair",
                "--chunk-rows",
                "100",
                "--wait-seconds",
                "60",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("public.catentry: 2 differing chunk(s); did insert 1, update 1, delete 0 row(s); 2 chunk(s) done"),
        "{out}"
    );
    stop_a.send(()).unwrap();
    sync_a.await.unwrap().expect("sync a");
    // Target b read the same watermarks and applied none: they were a's.
    apply_stream(&b).await;
    let verify = |config: Config| async move {
        stagingprop::ops::verify::verify(&config, &Default::default())
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.table.clone(), d.missing, d.different, d.extra))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        verify(a.clone()).await,
        vec![
            ("public.catentry".to_owned(), 0, 0, 0),
            ("public.offer".to_owned(), 0, 0, 0)
        ]
    );
    assert_eq!(
        verify(b.clone()).await,
        vec![
            ("public.catentry".to_owned(), 1, 2, 0),
            ("public.offer".to_owned(), 0, 0, 0)
        ]
    );
    stop.send(()).unwrap();
    publisher.await.unwrap().expect("publish");
}
