//! What an operator does around propagation (issue 16): cutoffs, dry runs, cache
//! invalidation, quarantine repair, run reports.

mod support;

use std::time::Duration;

use stagingprop::config::Config;
use stagingprop::sync::{self, SyncOptions, Until};
use support::{Pair, PairBuilder, endpoint};

const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL UNIQUE,
  price numeric(12,2));
CREATE TABLE offerprice (offer_id bigint, currency char(3), price numeric(20,5),
  PRIMARY KEY (offer_id, currency));
";

async fn catalogue_pair(prefix: &str) -> Pair {
    PairBuilder::new(prefix, CATALOGUE)
        .table("public.catentry", "")
        .table("public.offerprice", "")
        .init()
        .await
}

/// Runs sync with `options` until it stops by itself (60 s at most).
async fn sync_until(config: &Config, options: SyncOptions) -> sync::SyncSummary {
    tokio::time::timeout(
        Duration::from_secs(60),
        sync::run(config, &options, std::future::pending()),
    )
    .await
    .expect("sync did not stop at its cutoff within 60 s")
    .expect("sync")
}

fn slot_confirmed(p: &Pair) -> String {
    p.on_staging(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        p.config.sync.slot
    ))
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutoff_by_time_applies_exactly_what_committed_before_it() {
    let p = catalogue_pair("cutoff_time").await;
    p.on_staging("INSERT INTO catentry VALUES (1, 'PN-1', 10)");
    let cutoff = p.on_staging("SELECT clock_timestamp()::text");
    let cutoff = cutoff.trim();
    std::thread::sleep(Duration::from_millis(20));
    p.on_staging("INSERT INTO catentry VALUES (2, 'PN-2', 20); UPDATE catentry SET price = 11 WHERE catentry_id = 1");

    let staging = endpoint(&support::clusters().staging, &p.staging, "postgres");
    let until = sync::parse_until(cutoff, &staging).await.unwrap();
    assert!(matches!(until, Until::Time(_)));
    let summary = sync_until(
        &p.config,
        SyncOptions {
            until: Some(until),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(summary.stats.rows_inserted, 1);
    assert_eq!(
        p.on_production("SELECT string_agg(catentry_id || ':' || price, ',') FROM catentry")
            .trim(),
        "1:10.00",
        "only the transaction committed before the cutoff"
    );
    let progress = p.on_production("SELECT end_lsn FROM stagingprop.progress");
    assert_eq!(
        slot_confirmed(&p),
        progress.trim(),
        "the slot confirms exactly the cutoff"
    );
    let applied_before: bool = p
        .on_production(&format!(
            "SELECT commit_time <= '{cutoff}'::timestamptz FROM stagingprop.progress"
        ))
        .trim()
        == "t";
    assert!(applied_before);

    // A later cutoff continues from there.
    let later = sync::parse_until("now", &staging).await.unwrap();
    let summary = sync_until(
        &p.config,
        SyncOptions {
            until: Some(later),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(summary.stats.rows_inserted, 1);
    assert_eq!(summary.stats.rows_updated, 1);
    assert_eq!(
        p.on_production(
            "SELECT string_agg(catentry_id || ':' || price, ',' ORDER BY catentry_id) FROM catentry"
        )
        .trim(),
        "1:11.00,2:20.00"
    );
    let progress = p.on_production("SELECT end_lsn FROM stagingprop.progress");
    assert_eq!(slot_confirmed(&p), progress.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutoff_by_lsn_stops_before_the_first_transaction_past_it() {
    let p = catalogue_pair("cutoff_lsn").await;
    p.on_staging("INSERT INTO catentry VALUES (1, 'PN-1', 10)");
    let cutoff = p.on_staging("SELECT pg_current_wal_lsn()");
    p.on_staging("INSERT INTO catentry VALUES (2, 'PN-2', 20)");
    let until = sync::parse_until(
        cutoff.trim(),
        &endpoint(&support::clusters().staging, &p.staging, "postgres"),
    )
    .await
    .unwrap();
    assert!(matches!(until, Until::Lsn(_)));
    sync_until(
        &p.config,
        SyncOptions {
            until: Some(until),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(p.on_production("SELECT count(*) FROM catentry").trim(), "1");
    // Run again with the same cutoff: production has all of it, so nothing more is applied.
    let summary = sync_until(
        &p.config,
        SyncOptions {
            until: Some(until),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(summary.stats.transactions, 0);
    assert_eq!(p.on_production("SELECT count(*) FROM catentry").trim(), "1");
}

#[test]
fn the_run_report_counts_every_change_applied() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = rt.block_on(catalogue_pair("report"));
    let scratch = support::Scratch::new("report");
    let config = p.write_config(&scratch.0);
    p.on_staging(
        "INSERT INTO catentry SELECT g, 'PN-' || g, g FROM generate_series(1, 30) g;
         INSERT INTO offerprice SELECT g, 'USD', g FROM generate_series(1, 7) g;",
    );
    p.on_staging("UPDATE catentry SET price = price + 1 WHERE catentry_id <= 5");
    p.on_staging("DELETE FROM catentry WHERE catentry_id > 27");
    p.on_staging("TRUNCATE offerprice");
    let (code, stdout, stderr) =
        support::stagingprop(&config, &["sync", "--until-caught-up", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    let catentry = &report["tables"][0];
    assert_eq!(catentry["table"], "public.catentry");
    assert_eq!(
        (
            &catentry["inserted"],
            &catentry["updated"],
            &catentry["deleted"]
        ),
        (&30.into(), &5.into(), &3.into())
    );
    let offerprice = &report["tables"][1];
    assert_eq!(offerprice["inserted"], 7);
    assert_eq!(offerprice["truncated"], 1);
    assert_eq!(report["total"]["inserted"], 37);
    assert!(report["transactions"].as_u64().unwrap() >= 4, "{report}");
    // The counts are what production received.
    assert_eq!(
        p.on_production("SELECT count(*) FROM catentry").trim(),
        "27"
    );

    // The table form for people.
    p.on_staging("UPDATE catentry SET price = 0 WHERE catentry_id = 1");
    let (code, stdout, stderr) = support::stagingprop(&config, &["sync", "--until-caught-up"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("public.catentry"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("total") && l.split_whitespace().nth(2) == Some("1")),
        "{stdout}"
    );
}

#[test]
fn a_dry_run_changes_nothing_and_counts_what_a_real_run_then_applies() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p = rt.block_on(catalogue_pair("dry_run"));
    let scratch = support::Scratch::new("dry_run");
    let config = p.write_config(&scratch.0);
    p.on_staging(
        "INSERT INTO catentry SELECT g, 'PN-' || g, g FROM generate_series(1, 12) g;
         INSERT INTO offerprice SELECT g, 'EUR', g FROM generate_series(1, 4) g;",
    );
    p.on_staging("UPDATE catentry SET price = 0 WHERE catentry_id IN (1, 2)");
    p.on_staging("DELETE FROM offerprice WHERE offer_id = 4");
    let slot_before = slot_confirmed(&p);

    let (code, dry, stderr) = support::stagingprop(&config, &["sync", "--dry-run", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let dry: serde_json::Value = serde_json::from_str(dry.trim()).expect(&dry);
    assert_eq!(dry["run"], "dry run");
    assert_eq!(dry["total"]["inserted"], 16);
    assert_eq!(
        slot_confirmed(&p),
        slot_before,
        "a dry run confirms nothing"
    );
    assert_eq!(p.on_production("SELECT count(*) FROM catentry").trim(), "0");
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.progress")
            .trim(),
        "0"
    );

    let (code, real, stderr) =
        support::stagingprop(&config, &["sync", "--until-caught-up", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let real: serde_json::Value = serde_json::from_str(real.trim()).expect(&real);
    assert_eq!(dry["tables"], real["tables"], "dry {dry}\nreal {real}");
    assert_eq!(dry["total"], real["total"]);
    assert_eq!(
        p.on_production("SELECT count(*) FROM catentry").trim(),
        "12"
    );
    assert_eq!(
        p.on_production("SELECT count(*) FROM offerprice").trim(),
        "3"
    );
}

fn quarantine_ids(config: &std::path::Path) -> Vec<serde_json::Value> {
    let (code, out, err) = support::stagingprop(config, &["quarantine", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_changes_are_listed_retried_once_fixed_and_discarded() {
    let p = PairBuilder::new("quarantine", CATALOGUE)
        .table("public.catentry", "on_conflict = \"skip\"")
        .table("public.offerprice", "")
        .init()
        .await;
    p.on_production("INSERT INTO catentry SELECT g, 'PROD-' || g, 0 FROM generate_series(1, 5) g");
    p.on_staging("INSERT INTO catentry SELECT g, 'PN-' || g, g FROM generate_series(1, 6) g");
    p.on_production("DELETE FROM catentry WHERE catentry_id = 6");
    support::caught_up(&p.config).await.unwrap();
    // 6 went in; 1..5 collided. Now staging updates 6, which production lost meanwhile.
    p.on_production("DELETE FROM catentry WHERE catentry_id = 6");
    p.on_staging("UPDATE catentry SET price = 60 WHERE catentry_id = 6");
    support::caught_up(&p.config).await.unwrap();

    let scratch = support::Scratch::new("quarantine");
    let config = p.write_config(&scratch.0);
    let entries = quarantine_ids(&config);
    assert_eq!(entries.len(), 6, "{entries:?}");
    assert_eq!(entries[0]["operation"], "insert");
    assert_eq!(entries[0]["key"]["catentry_id"], "1");
    assert_eq!(entries[0]["row"]["partnumber"], "PN-1");
    assert_eq!(entries[5]["operation"], "update");
    let (code, text, _) = support::stagingprop(
        &config,
        &["quarantine", "list", "--table", "public.catentry"],
    );
    assert_eq!(code, 0);
    assert!(text.contains("6 quarantined change(s)"), "{text}");

    // Fix four of the five collisions; 5 still collides and 6 is still missing.
    p.on_production("DELETE FROM catentry WHERE catentry_id <= 4");
    let (code, out, err) = support::stagingprop(&config, &["quarantine", "retry", "--all"]);
    assert_eq!(code, 7, "{out}{err}");
    assert!(
        out.contains("4 applied and removed, 2 still conflicting"),
        "{out}"
    );
    assert_eq!(
        p.on_production("SELECT string_agg(catentry_id || ':' || partnumber, ',' ORDER BY catentry_id) FROM catentry")
            .trim(),
        "1:PN-1,2:PN-2,3:PN-3,4:PN-4,5:PROD-5"
    );
    let left = quarantine_ids(&config);
    assert_eq!(left.len(), 2);
    assert!(
        left.iter()
            .all(|e| e["reason"].as_str().unwrap().starts_with("retried:")),
        "{left:?}"
    );
    // Retrying again changes nothing and applies nothing twice.
    let (code, out, _) = support::stagingprop(&config, &["quarantine", "retry", "--all"]);
    assert_eq!(code, 7, "{out}");
    assert_eq!(p.on_production("SELECT count(*) FROM catentry").trim(), "5");

    // The update of 6 applies once the row is back; the insert of 5 is discarded.
    p.on_production("INSERT INTO catentry VALUES (6, 'PN-6', 6)");
    let id5 = left[0]["id"].as_i64().unwrap();
    let (code, out, _) = support::stagingprop(
        &config,
        &["quarantine", "discard", "--id", &id5.to_string()],
    );
    assert_eq!(code, 0);
    assert!(out.contains("1 change(s) removed"), "{out}");
    let (code, out, err) = support::stagingprop(
        &config,
        &["quarantine", "retry", "--table", "public.catentry"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1 applied and removed, 0 still conflicting"),
        "{out}"
    );
    assert_eq!(
        p.on_production("SELECT price FROM catentry WHERE catentry_id = 6")
            .trim(),
        "60.00"
    );
    assert!(quarantine_ids(&config).is_empty());
    let (code, _, err) = support::stagingprop(&config, &["quarantine", "retry"]);
    assert_eq!(code, 2, "a selection is required: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_killed_part_way_neither_loses_nor_repeats_an_entry() {
    const N: u32 = 400;
    let p = PairBuilder::new("quarantine_kill", CATALOGUE)
        .table("public.catentry", "on_conflict = \"skip\"")
        .table("public.offerprice", "")
        .init()
        .await;
    p.on_production(&format!(
        "INSERT INTO catentry SELECT g, 'PROD-' || g, 0 FROM generate_series(1, {N}) g"
    ));
    // One transaction per row: quarantined one by one.
    for chunk in 0..(N / 100) {
        let mut sql = String::new();
        for g in chunk * 100 + 1..=chunk * 100 + 100 {
            sql.push_str(&format!(
                "INSERT INTO catentry VALUES ({g}, 'PN-{g}', {g});\n"
            ));
        }
        p.on_staging(&sql);
    }
    support::caught_up(&p.config).await.unwrap();
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.quarantine")
            .trim(),
        N.to_string()
    );
    p.on_production("DELETE FROM catentry");
    let scratch = support::Scratch::new("quarantine_kill");
    let config = p.write_config(&scratch.0);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
        .arg("--config")
        .arg(&config)
        .args(["quarantine", "retry", "--all"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut killed_at = None;
    while started.elapsed() < Duration::from_secs(60) {
        let left: u32 = p
            .on_production("SELECT count(*) FROM stagingprop.quarantine")
            .trim()
            .parse()
            .unwrap();
        if left < N - 20 {
            child.kill().unwrap();
            killed_at = Some(left);
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    let left_after_kill: u32 = p
        .on_production("SELECT count(*) FROM stagingprop.quarantine")
        .trim()
        .parse()
        .unwrap();
    let applied: u32 = p
        .on_production("SELECT count(*) FROM catentry")
        .trim()
        .parse()
        .unwrap();
    assert!(
        killed_at.is_some(),
        "the retry ended before it could be killed"
    );
    assert!(left_after_kill > 0, "killed before the end");
    assert_eq!(
        applied + left_after_kill,
        N,
        "each entry is either applied or still quarantined"
    );
    let (code, out, err) = support::stagingprop(&config, &["quarantine", "retry", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        p.on_production("SELECT count(*) || ':' || sum(price) FROM catentry")
            .trim(),
        format!("{N}:{}.00", N * (N + 1) / 2)
    );
    assert!(quarantine_ids(&config).is_empty());
}

/// Collects every notification production sends on `channel` to a listening session.
struct Listener {
    received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    _client: tokio_postgres::Client,
}

impl Listener {
    async fn start(p: &Pair, channel: &str) -> Listener {
        use futures_util::StreamExt;
        let (client, mut connection) = tokio_postgres::connect(
            &support::clusters()
                .production
                .conninfo(&p.production, "postgres"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    sink.lock().unwrap().push(
                        serde_json::from_str(n.payload())
                            .unwrap_or_else(|e| panic!("{e}: {}", n.payload())),
                    );
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .unwrap();
        Listener {
            received,
            _client: client,
        }
    }

    /// What arrived since the last call (after a moment for delivery).
    async fn take(&self) -> Vec<serde_json::Value> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

/// (op, key) of every key the notifications name, sorted: a key named twice appears twice.
fn notified(notifications: &[serde_json::Value]) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for n in notifications {
        assert_eq!(
            n["table"], "public.catentry",
            "only notify = true tables: {n}"
        );
        for key in n["keys"].as_array().unwrap() {
            out.push((
                n["op"].as_str().unwrap().to_owned(),
                key[0].as_str().unwrap().parse().unwrap(),
            ));
        }
    }
    out.sort();
    out
}

fn expected(op: &str, keys: std::ops::RangeInclusive<i64>) -> Vec<(String, i64)> {
    keys.map(|k| (op.to_owned(), k)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_hear_each_committed_change_once_and_nothing_of_a_rolled_back_batch() {
    let p = PairBuilder::new("notify", CATALOGUE)
        .table("public.catentry", "notify = true")
        .table("public.offerprice", "")
        .sync("notify_channel = \"catalogue_cache\"")
        .sync("after_batch_sql = \"INSERT INTO cache_log (changes) SELECT $1::jsonb\"")
        .init()
        .await;
    p.on_production("CREATE TABLE cache_log (id bigserial PRIMARY KEY, changes jsonb NOT NULL)");
    let listener = Listener::start(&p, "catalogue_cache").await;

    for chunk in 0..5 {
        p.on_staging(&format!(
            "INSERT INTO catentry SELECT g, 'PN-' || g, g FROM generate_series({}, {}) g;
             INSERT INTO offerprice VALUES ({chunk}, 'USD', 1);",
            chunk * 10 + 1,
            chunk * 10 + 10
        ));
    }
    support::caught_up(&p.config).await.unwrap();
    assert_eq!(notified(&listener.take().await), expected("insert", 1..=50));

    p.on_staging("UPDATE catentry SET price = 0 WHERE catentry_id <= 10");
    p.on_staging("DELETE FROM catentry WHERE catentry_id >= 41");
    support::caught_up(&p.config).await.unwrap();
    let mut want = expected("delete", 41..=50);
    want.extend(expected("update", 1..=10));
    assert_eq!(notified(&listener.take().await), want);
    let logged = p.on_production("SELECT count(*) FROM cache_log");

    // A batch rolled back by a conflict notifies nothing and logs nothing.
    p.on_production("INSERT INTO catentry VALUES (100, 'PROD-100', 0)");
    p.on_staging("INSERT INTO catentry VALUES (101, 'PN-101', 1), (100, 'PN-100', 1)");
    let failed = support::caught_up(&p.config).await;
    assert!(failed.is_err(), "the conflict stops sync");
    assert!(listener.take().await.is_empty());
    assert_eq!(p.on_production("SELECT count(*) FROM cache_log"), logged);

    p.on_production("DELETE FROM catentry WHERE catentry_id = 100");
    support::caught_up(&p.config).await.unwrap();
    assert_eq!(
        notified(&listener.take().await),
        expected("insert", 100..=101)
    );

    // after_batch_sql saw every table's changes, in the same transactions.
    let logged_keys = p.on_production(
        "SELECT string_agg(DISTINCT c->>'table' || ':' || (c->>'op'), ',') FROM cache_log, jsonb_array_elements(changes) c",
    );
    assert_eq!(
        logged_keys.trim(),
        "public.catentry:delete,public.catentry:insert,public.catentry:update,public.offerprice:insert"
    );
    let logged_inserts = p.on_production(
        "SELECT count(*) FROM cache_log, jsonb_array_elements(changes) c, jsonb_array_elements(c->'keys') k
          WHERE c->>'table' = 'public.catentry' AND c->>'op' = 'insert'",
    );
    assert_eq!(logged_inserts.trim(), "52");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_after_batch_sql_rolls_the_batch_back() {
    let p = PairBuilder::new("after_batch_fails", CATALOGUE)
        .table("public.catentry", "")
        .table("public.offerprice", "")
        .sync("after_batch_sql = \"INSERT INTO missing_table VALUES ($1)\"")
        .init()
        .await;
    p.on_staging("INSERT INTO catentry VALUES (1, 'PN-1', 1)");
    let error = support::caught_up(&p.config).await.unwrap_err();
    assert!(error.to_string().contains("after_batch_sql"), "{error}");
    assert_eq!(p.on_production("SELECT count(*) FROM catentry").trim(), "0");
}
