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
