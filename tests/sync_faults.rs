//! `sync` under faults: a randomized catalogue workload applied while sync runs, kill -9 of the
//! binary and of production's postmaster, restarts of either database, SIGTERM, an idle slot
//! that must keep advancing, and a slot that disappeared.
//!
//! Randomized tests print their seed; rerun one with `STAGINGPROP_TEST_SEED=<seed>`.
//! Tests that stop or kill a server start dedicated clusters: the shared ones serve the other
//! tests of this binary, which run in parallel.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use stagingprop::cluster::LocalCluster;
use stagingprop::model::Lsn;
use stagingprop::sync::{self, SyncOptions};
use tracing::Instrument;

use support::faults::*;
use support::sync_in_background;

// ---------------------------------------------------------------------------------------------
// 1. Randomized correctness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_catalogue_workload_while_syncing_ends_equal() {
    random_catalogue_workload(
        "random_catalogue_workload_while_syncing_ends_equal",
        "random",
        None,
    )
    .await;
}

/// catentry keys staging allocates from 1 up; production made rows of its own under every
/// tenth key up to 50,000 (with a description each), so staging's rows under those keys move
/// to production's sequence, and their descriptions and offers follow.
static CATALOGUE_REMAPPING: Remapping = Remapping {
    rules: &[(
        "catentry",
        "key = { rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }",
    )],
    production_sql: "CREATE SEQUENCE catentry_seq START 1000000000;
        INSERT INTO catentry (catentry_id, partnumber, descr)
          SELECT g, 'PROD-' || g, 'production-born' FROM generate_series(10, 50000, 10) g;
        INSERT INTO catentdesc SELECT g, -1, 'prod-born', NULL FROM generate_series(10, 50000, 10) g;",
    translate: &[
        ("catentry", "catentry_id", "catentry"),
        ("catentdesc", "catentry_id", "catentry"),
        ("offer", "catentry_id", "catentry"),
    ],
    production_born: &[
        ("catentry", "partnumber LIKE 'PROD-%'"),
        ("catentdesc", "name = 'prod-born'"),
    ],
    mapped_rows: &[(
        "catentry",
        "catentry_id",
        "t.catentry_id % 10 = 0 AND t.catentry_id <= 50000",
    )],
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_catalogue_workload_with_remapped_keys_ends_equal_through_the_key_map() {
    random_catalogue_workload(
        "random_catalogue_workload_with_remapped_keys_ends_equal_through_the_key_map",
        "random-remap",
        Some(&CATALOGUE_REMAPPING),
    )
    .await;
}

async fn random_catalogue_workload(
    name: &str,
    label: &'static str,
    remapping: Option<&'static Remapping>,
) {
    let started = Instant::now();
    capture_logs();
    let seed = test_seed(name);
    let p = setup_remapped(
        shared_staging(),
        shared_production(),
        &format!("faults_{}", label.replace('-', "_")),
        CATALOGUE,
        CATALOGUE_TABLES,
        "batch_max_rows = 2000",
        remapping,
    )
    .await;

    // Without remapping, staging streams every transaction past 64 kB (the bulk ones, some
    // truncates) and sync applies them while they stream.
    let streaming = remapping.is_none();
    if streaming {
        p.stream_past_64kb();
    }

    // Sync follows staging while the workload runs.
    let (stop_tx, running) =
        sync_in_background(&p.config, tracing::info_span!("faults", test = label));

    // 2000 transactions, 50 per psql call; the body runs outside the runtime's workers, so
    // blocking here does not slow sync down.
    let mut catalogue = Catalogue::new(seed);
    let mut call = String::new();
    let mut in_call = 0;
    for i in 0..2000 {
        let txn = match i {
            600 => catalogue.bulk_insert(),
            900 => catalogue.truncate(),
            1200 => catalogue.bulk_update(),
            1600 => catalogue.bulk_delete(),
            300 | 700 | 1100 | 1500 | 1900 => catalogue.swap(),
            _ if catalogue.rng.below(500) == 0 => catalogue.truncate(),
            _ => catalogue.transaction(),
        };
        call.push_str(&txn);
        in_call += 1;
        if in_call == 50 {
            p.staging.sql(&call);
            call.clear();
            in_call = 0;
        }
    }
    if !call.is_empty() {
        p.staging.sql(&call);
    }
    let workload_done = started.elapsed();
    assert!(
        !running.is_finished(),
        "sync stopped during the workload: {:?}",
        running.await
    );

    // The running sync catches up by itself (an idle heartbeat takes it past the last commit).
    let end = p.staging_lsn();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !p.applied_at_least(&end) {
        if running.is_finished() {
            panic!("sync stopped before catching up: {:?}", running.await);
        }
        assert!(
            Instant::now() < deadline,
            "production did not reach staging's {end} within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let caught_up = started.elapsed();
    let _ = stop_tx.send(());
    let summary = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("sync stops on request")
        .unwrap()
        .expect("sync ran without error");
    assert!(summary.stats.transactions > 0);
    p.assert_equal();
    assert_eq!(p.quarantined(), "0", "nothing quarantined");
    if streaming {
        p.assert_streamed();
    }

    // A new run applies nothing twice.
    let again = support::caught_up(&p.config).await.expect("second run");
    let st = again.stats;
    assert_eq!(
        (
            st.rows_inserted,
            st.rows_updated,
            st.rows_deleted,
            st.truncates
        ),
        (0, 0, 0, 0),
        "a restart re-applied changes"
    );
    p.assert_equal();
    let rows = p.staging.value(
        "SELECT (SELECT count(*) FROM catentry) || '/' || (SELECT count(*) FROM catentdesc) || '/' \
         || (SELECT count(*) FROM offer) || '/' || (SELECT count(*) FROM offerprice)",
    );
    let replays = logged_lines(&format!("test=\"{label}\""))
        .iter()
        .filter(|l| l.contains("one change at a time"))
        .count();
    println!(
        "{label} workload: seed {seed}, rows catentry/catentdesc/offer/offerprice {rows}, \
         {} staging transactions applied, {replays} one-by-one replays, workload done at {:.1} s, \
         caught up at {:.1} s, total {:.1} s",
        summary.stats.transactions,
        workload_done.as_secs_f64(),
        caught_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 of sync (and once of production)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_sync_and_production_loses_and_duplicates_nothing() {
    sigkill_rounds(
        "sigkill_of_sync_and_production_loses_and_duplicates_nothing",
        "kill",
        None,
        false,
    )
    .await;
}

/// The same with the spool on: kills land while segments are written (small segments, so
/// several are started), and between spooling and applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_the_spool_on_loses_and_duplicates_nothing() {
    sigkill_rounds(
        "sigkill_with_the_spool_on_loses_and_duplicates_nothing",
        "killspool",
        None,
        true,
    )
    .await;
}

/// Every ledger row gets a production key of its own: a lost or doubled mapping shows as a
/// ledger row without one, or an update or delete that finds no row (a conflict).
static LEDGER_REMAPPING: Remapping = Remapping {
    rules: &[(
        "ledger",
        "key = { rule = \"allocate\", sequence = \"public.ledger_seq\" }",
    )],
    production_sql: "CREATE SEQUENCE ledger_seq START 1000000000;",
    translate: &[("ledger", "id", "ledger")],
    production_born: &[],
    mapped_rows: &[("ledger", "id", "true")],
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_allocated_keys_keeps_one_mapping_per_row() {
    sigkill_rounds(
        "sigkill_with_allocated_keys_keeps_one_mapping_per_row",
        "killmap",
        Some(&LEDGER_REMAPPING),
        false,
    )
    .await;
}

async fn sigkill_rounds(
    name: &str,
    label: &str,
    remapping: Option<&'static Remapping>,
    spool: bool,
) {
    let started = Instant::now();
    let seed = test_seed(name);
    let mut rng = Rng::new(seed);
    let [staging, production] = dedicated([
        &format!("faults-{label}-staging"),
        &format!("faults-{label}-production"),
    ]);
    let mut p = setup_remapped(
        staging,
        production.clone(),
        &format!("faults_{label}"),
        LEDGER,
        LEDGER_TABLES,
        "batch_max_rows = 50",
        remapping,
    )
    .await;
    let spool_dir = spool.then(|| p.enable_spool("segment_bytes = 32768"));
    // Kills land between a batch's files and its COMMIT too: the files must still end equal.
    let files_dir = p.publish_ledger_files();
    // And while staging streams a transaction in progress (without the spool or remapping).
    let streaming = !spool && remapping.is_none();
    if streaming {
        p.stream_past_64kb();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let workload = ledger_workload(p.staging.clone(), stop.clone(), false);
    let kills = 12;
    let production_crash_at = 1 + rng.below(kills - 2);
    let progress = || {
        p.production
            .try_sql("SELECT end_lsn FROM stagingprop.progress")
            .unwrap_or_default()
    };
    let mut rounds_with_progress = 0;
    for round in 0..kills {
        p.wait_slot_inactive(Duration::from_secs(15));
        let before = progress();
        let (mut child, log) = spawn_sync(&p, &[], &format!("sync-{round}.log"));
        let run_for = Duration::from_millis(rng.between(200, 1500));
        if round == production_crash_at {
            thread::sleep(Duration::from_millis(300));
            production.kill_postmaster().expect("kill -9 production");
            restart(&production);
        }
        thread::sleep(run_for);
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "sync exited by itself ({status}) in round {round}:\n{}",
                read_log(&log)
            );
        }
        child.kill().expect("SIGKILL sync");
        child.wait().unwrap();
        if progress() != before {
            rounds_with_progress += 1;
        }
    }
    assert!(
        rounds_with_progress >= kills / 2,
        "only {rounds_with_progress} of {kills} runs applied anything before being killed"
    );
    stop.store(true, Ordering::Relaxed);
    let committed = workload.join().expect("workload");
    assert!(committed > 0);

    // The last run catches up and exits 0 without a conflict.
    p.wait_slot_inactive(Duration::from_secs(15));
    let (mut child, log) = spawn_sync(&p, &["--until-caught-up"], "sync-final.log");
    let status = wait_exit(&mut child, Duration::from_secs(90));
    let text = read_log(&log);
    assert!(
        status.is_some_and(|s| s.success()),
        "final sync: {status:?}\n{text}"
    );
    let conflicts: Vec<&str> = text
        .lines()
        .filter(|l| {
            // The counters in the progress and summary lines name conflicts too.
            l.replace("conflicts_skipped", "")
                .replace("skipped_conflicts", "")
                .contains("conflict")
        })
        .collect();
    assert!(
        conflicts.is_empty(),
        "final sync:\n{}",
        conflicts.join("\n")
    );
    p.assert_equal();
    let counter = |db: &Db| db.value("SELECT value FROM counter WHERE id = 1");
    assert_eq!(counter(&p.staging), committed.to_string());
    assert_eq!(counter(&p.production), committed.to_string());
    assert_eq!(p.quarantined(), "0");
    let mut expected: Vec<String> = p
        .staging
        .sql("SELECT note || '|' || encode(convert_to(blob, 'UTF8'), 'hex') FROM ledger WHERE blob IS NOT NULL")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(
        support::published(&files_dir),
        expected,
        "the published files are staging's rows"
    );
    if streaming {
        p.assert_streamed();
    }
    if let Some(dir) = &spool_dir {
        let held = stagingprop::spool::store::summary(dir).expect("spool summary");
        assert!(held.segments > 1, "the spool was used: {held:?}");
        assert_eq!(
            held.newest_end.map(|l| l.to_string()),
            Some(p.slot_column("confirmed_flush_lsn")),
            "staging was told exactly what the spool holds"
        );
    }
    println!(
        "{label}: seed {seed}, {kills} kills (production crashed in round {production_crash_at}), \
         {rounds_with_progress} runs applied something, {committed} transactions, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Starts a crashed server again; its orphaned backends may take a moment to go.
fn restart(cluster: &LocalCluster) {
    let mut last = None;
    for _ in 0..20 {
        match cluster.start_server() {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(500));
    }
    panic!("cannot restart {}: {:?}", cluster.name, last);
}

// ---------------------------------------------------------------------------------------------
// 3. Restarts of production and staging

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_production_and_staging_are_retried_and_resumed() {
    let started = Instant::now();
    capture_logs();
    let [staging, production] = dedicated(["faults-restart-staging", "faults-restart-prod"]);
    let p = setup(
        staging.clone(),
        production.clone(),
        "faults_restart",
        LEDGER,
        LEDGER_TABLES,
        "batch_max_rows = 200",
    )
    .await;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = p.config.clone();
    let mut running = tokio::spawn(
        async move {
            let options = SyncOptions {
                stop_at: None,
                max_attempts: None,
                ..Default::default()
            };
            sync::run(&config, &options, async move {
                let _ = stop_rx.await;
            })
            .await
        }
        .instrument(tracing::info_span!("faults", test = "restarts")),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let workload = ledger_workload(p.staging.clone(), stop.clone(), true);

    let lsn = p.staging_lsn();
    applied(&p, &lsn, 30, &mut running).await;

    // Production away for 3 s: consecutive failed attempts, backing off.
    production.stop_server("fast").expect("stop production");
    thread::sleep(Duration::from_secs(3));
    production.start_server().expect("start production");
    let lsn = p.staging_lsn();
    applied(&p, &lsn, 60, &mut running).await;
    let retries = logged_lines("test=\"restarts\"")
        .into_iter()
        .filter(|l| l.contains("retrying in"))
        .collect::<Vec<_>>();
    assert!(
        retries.len() >= 2,
        "expected retries while production was down:\n{}",
        retries.join("\n")
    );
    assert!(
        retries.iter().any(|l| l.contains("attempt=2")),
        "consecutive failures must back off (attempt 2 waits longer than attempt 1):\n{}",
        retries.join("\n")
    );

    // Staging away for 2 s.
    println!(
        "restarts: production back at {:.1} s",
        started.elapsed().as_secs_f64()
    );
    staging.stop_server("fast").expect("stop staging");
    println!(
        "restarts: staging stopped at {:.1} s",
        started.elapsed().as_secs_f64()
    );
    thread::sleep(Duration::from_secs(2));
    staging.start_server().expect("start staging");
    thread::sleep(Duration::from_millis(500));
    let lsn = p.staging_lsn();
    applied(&p, &lsn, 60, &mut running).await;

    stop.store(true, Ordering::Relaxed);
    workload.join().expect("workload");
    let lsn = p.staging_lsn();
    applied(&p, &lsn, 60, &mut running).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("sync stops on request")
        .unwrap()
        .expect("sync ends without error");
    p.assert_equal();
    assert_eq!(p.quarantined(), "0");
    let retries = logged_lines("test=\"restarts\"")
        .into_iter()
        .filter(|l| l.contains("retrying in"))
        .count();
    println!(
        "restarts: {retries} retry lines, {} ledger rows, {:.1} s",
        p.staging.value("SELECT count(*) FROM ledger"),
        started.elapsed().as_secs_f64()
    );
}

/// Waits for production to reach `lsn` while sync keeps running; on failure shows what sync
/// logged in this test.
async fn applied(
    p: &FaultPair,
    lsn: &str,
    secs: u64,
    running: &mut tokio::task::JoinHandle<Result<sync::SyncSummary, sync::SyncError>>,
) {
    let result = tokio::select! {
        r = p.try_wait_applied(lsn, Duration::from_secs(secs)) => r,
        ended = &mut *running => Err(format!("sync gave up instead of retrying: {ended:?}")),
    };
    if let Err(e) = result {
        let server_log = |db: &Db| {
            let log = std::fs::read_to_string(db.cluster.log_file()).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        panic!(
            "{e}\nsync log:\n{}\nstaging server log:\n{}\nproduction server log:\n{}",
            logged_lines("test=\"restarts\"").join("\n"),
            server_log(&p.staging),
            server_log(&p.production),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_with_the_slot_confirmed_at_production_progress() {
    let started = Instant::now();
    let p = setup(
        shared_staging(),
        shared_production(),
        "faults_sigterm",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    let (mut child, log) = spawn_sync(&p, &[], "sync.log");
    let sql: String = (1..=30).map(ledger_txn).collect();
    p.staging.sql(&sql);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.production.value("SELECT value FROM counter") != "30" {
        assert!(
            Instant::now() < deadline,
            "not applied within 30 s:\n{}",
            read_log(&log)
        );
        assert!(child.try_wait().unwrap().is_none(), "{}", read_log(&log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More changes in flight when the signal arrives.
    p.staging
        .sql(&(31..=40).map(ledger_txn).collect::<String>());

    let (took, text) = sigterm_and_wait(&mut child, &log, Duration::from_secs(20));
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM took {took:?}\n{text}"
    );
    assert_slot_at_progress(&p, &text);

    // What was not applied yet is still there for the next run.
    catch_up(&p, "sync-2.log", Duration::from_secs(60));
    assert_eq!(p.production.value("SELECT value FROM counter"), "40");

    // A signal while a backlog streams in (every message ready at once) is still seen within a
    // few hundred messages, not once the backlog is drained.
    let big_txns = 6;
    let rows_per_txn = 40_000;
    let backlog: String = (0..big_txns)
        .map(|t| {
            let first = 1_000 + t * rows_per_txn;
            format!(
                "BEGIN; INSERT INTO ledger (id, txn, note) SELECT i, i, 'bulk' FROM \
                 generate_series({first}, {}) i; \
                 UPDATE counter SET value = value + 1, last_txn = {first} WHERE id = 1; COMMIT;\n",
                first + rows_per_txn - 1
            )
        })
        .collect();
    p.staging.sql(&backlog);
    let (mut child, log) = spawn_sync(&p, &[], "sync-3.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.production.value("SELECT value FROM counter") == "40" {
        assert!(
            Instant::now() < deadline,
            "the first bulk transaction was not applied within 60 s:\n{}",
            read_log(&log)
        );
        assert!(child.try_wait().unwrap().is_none(), "{}", read_log(&log));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (took_in_backlog, text) = sigterm_and_wait(&mut child, &log, Duration::from_secs(30));
    assert!(
        took_in_backlog < Duration::from_secs(3),
        "SIGTERM during a backlog took {took_in_backlog:?}\n{text}"
    );
    let applied_at_exit: u64 = p
        .production
        .value("SELECT value FROM counter")
        .parse()
        .unwrap();
    assert!(
        applied_at_exit < 40 + big_txns,
        "sync went on to the end of the backlog ({applied_at_exit}) instead of stopping\n{text}"
    );
    assert_slot_at_progress(&p, &text);
    catch_up(&p, "sync-4.log", Duration::from_secs(120));
    assert_eq!(
        p.production.value("SELECT value FROM counter"),
        (40 + big_txns).to_string()
    );
    println!(
        "sigterm: exited in {:.2} s, in a backlog in {:.2} s, {:.1} s",
        took.as_secs_f64(),
        took_in_backlog.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Sends SIGTERM and waits for the exit, which must be 0; how long it took, and the log.
fn sigterm_and_wait(child: &mut Child, log: &Path, within: Duration) -> (Duration, String) {
    let signalled = Instant::now();
    sigterm(child);
    let status = wait_exit(child, within);
    let took = signalled.elapsed();
    let text = read_log(log);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{text}");
    (took, text)
}

/// After a stop: the slot is confirmed exactly at production's progress row.
fn assert_slot_at_progress(p: &FaultPair, text: &str) {
    p.wait_slot_inactive(Duration::from_secs(10));
    let confirmed = p.slot_column("confirmed_flush_lsn");
    let progress = p.production.value(&format!(
        "SELECT end_lsn FROM stagingprop.progress WHERE slot = '{}'",
        p.slot
    ));
    assert_eq!(
        confirmed, progress,
        "the slot must be confirmed exactly at what production committed\n{text}"
    );
}

/// Runs `sync --until-caught-up` to a successful end; production then equals staging.
fn catch_up(p: &FaultPair, log_name: &str, within: Duration) {
    let (mut child, log) = spawn_sync(p, &["--until-caught-up"], log_name);
    let status = wait_exit(&mut child, within);
    assert!(status.is_some_and(|s| s.success()), "{}", read_log(&log));
    p.assert_equal();
}

// ---------------------------------------------------------------------------------------------
// 5. An idle slot keeps advancing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sync_keeps_the_slot_advancing_past_unrelated_wal() {
    let started = Instant::now();
    // Its own staging cluster: the shared one's WAL moves with the other tests' workloads.
    let [staging] = dedicated(["faults-idle-staging"]);
    let p = setup(
        staging,
        shared_production(),
        "faults_idle",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    assert_eq!(p.config.sync.heartbeat_interval_secs, 1);
    let (stop_tx, running) = sync_in_background(&p.config, tracing::Span::none());
    p.staging.sql(&(1..=5).map(ledger_txn).collect::<String>());
    let lsn = p.staging_lsn();
    p.wait_applied(&lsn, Duration::from_secs(30)).await;

    let retained = || -> f64 {
        p.slot_column("pg_current_wal_lsn() - confirmed_flush_lsn")
            .parse()
            .expect("retained bytes")
    };
    const SMALL: f64 = 64.0 * 1024.0;
    for round in 0..3 {
        // A few MB of WAL that no managed table is part of.
        p.staging.sql(
            "INSERT INTO auditlog SELECT g, repeat('x', 200) FROM generate_series(1, 10000) g",
        );
        let written = p.staging_lsn();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = retained();
            let past = p.staging.value(&format!(
                "SELECT confirmed_flush_lsn >= '{written}'::pg_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
                p.slot
            ));
            if now < SMALL && past == "t" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: after 10 s the idle slot is still behind the unrelated WAL \
                 (retained {now} bytes, confirmed past {written}: {past})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(!running.is_finished());
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("sync stops on request")
        .unwrap()
        .expect("sync ends without error");
    p.assert_equal();
    println!("idle: {:.1} s", started.elapsed().as_secs_f64());
}

/// A new session tells staging that what production holds is applied only once production has
/// made it durable: sync commits asynchronously, so the last run's commits can be visible on
/// production and not flushed yet, and a production crash right then would lose what staging
/// had already released (the next sync stops with exit 5: production must be copied again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_session_confirms_only_what_production_made_durable() {
    let [staging, production] = dedicated(["faults-durable-staging", "faults-durable-prod"]);
    let p = setup(
        staging,
        production.clone(),
        "faults_durable",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    // Production's WAL writer flushes asynchronous commits every 10 s only.
    p.production
        .sql("ALTER SYSTEM SET wal_writer_delay = '10s'");
    p.production.sql("SELECT pg_reload_conf()");
    let (mut child, _) = spawn_sync(&p, &[], "durable-1.log");
    p.staging.sql(&(1..=5).map(ledger_txn).collect::<String>());
    let lsn = p.staging_lsn();
    p.wait_applied(&lsn, Duration::from_secs(30)).await;
    child.kill().expect("SIGKILL sync");
    child.wait().unwrap();
    let applied = p
        .production
        .value("SELECT end_lsn FROM stagingprop.progress");
    // The next session confirms what it found; production crashes right after.
    let (mut child, log) = spawn_sync(&p, &[], "durable-2.log");
    let confirmed_past = format!(
        "SELECT confirmed_flush_lsn >= '{applied}'::pg_lsn FROM pg_replication_slots \
          WHERE slot_name = '{}'",
        p.slot
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.staging.value(&confirmed_past) != "t" {
        assert!(
            Instant::now() < deadline,
            "the new session did not confirm {applied} within 20 s:\n{}",
            read_log(&log)
        );
        thread::sleep(Duration::from_millis(20));
    }
    production.kill_postmaster().expect("kill -9 production");
    restart(&production);
    child.kill().expect("SIGKILL sync");
    child.wait().unwrap();
    let kept = p
        .production
        .value("SELECT coalesce((SELECT end_lsn FROM stagingprop.progress), '0/0')");
    let released = p.slot_column("confirmed_flush_lsn");
    let behind = p
        .staging
        .value(&format!("SELECT '{kept}'::pg_lsn < '{released}'::pg_lsn"));
    assert_eq!(
        behind, "f",
        "staging released {released}, production kept {kept} after its crash"
    );
    // And sync goes on from there.
    p.staging.sql(&(6..=8).map(ledger_txn).collect::<String>());
    let lsn = p.staging_lsn();
    let (mut child, log) = spawn_sync(&p, &[], "durable-3.log");
    let caught_up = p.try_wait_applied(&lsn, Duration::from_secs(30)).await;
    let _ = child.kill();
    let _ = child.wait();
    caught_up.unwrap_or_else(|e| panic!("{e}\n{}", read_log(&log)));
    p.assert_equal();
}

// ---------------------------------------------------------------------------------------------
// 6. A missing slot

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_slot_fails_fast_and_is_not_recreated() {
    let started = Instant::now();
    let p = setup(
        shared_staging(),
        shared_production(),
        "faults_noslot",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    p.staging
        .sql(&format!("SELECT pg_drop_replication_slot('{}')", p.slot));
    p.staging.sql(&ledger_txn(1));
    let (mut child, log) = spawn_sync(&p, &[], "sync.log");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let text = read_log(&log);
    let code = status.and_then(|s| s.code());
    assert!(
        code.is_some_and(|c| c != 0),
        "sync must fail promptly without its slot, got {status:?}\n{text}"
    );
    assert!(
        text.contains("does not exist") && text.contains(&p.slot) && text.contains("copy"),
        "the error must say the slot is gone and how to re-seed:\n{text}"
    );
    let slots = p.staging.value(&format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
        p.slot
    ));
    assert_eq!(slots, "0", "sync must not recreate the slot");
    assert_eq!(p.production.value("SELECT count(*) FROM ledger"), "0");
    println!(
        "missing slot: exit {code:?}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// 7. The spool: production outages, a full spool, replay into a restored backup

/// The spool's segment files in bytes.
fn spool_bytes(dir: &Path) -> u64 {
    stagingprop::spool::store::summary(dir)
        .map(|s| s.bytes)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_with_the_spool_release_staging_wal_until_the_spool_is_full() {
    let started = Instant::now();
    let [staging, production] = dedicated(["faults-outage-staging", "faults-outage-prod"]);
    let mut p = setup(
        staging,
        production.clone(),
        "faults_outage",
        LEDGER,
        LEDGER_TABLES,
        "batch_max_rows = 200",
    )
    .await;
    let max_bytes: u64 = 1 << 20;
    let dir = p.enable_spool(&format!("max_bytes = {max_bytes}\nsegment_bytes = 65536"));
    let (mut child, log) = spawn_sync(&p, &[], "sync.log");
    let stop = Arc::new(AtomicBool::new(false));
    let workload = ledger_workload(p.staging.clone(), stop.clone(), false);
    let lsn = p.staging_lsn();
    p.wait_applied(&lsn, Duration::from_secs(30)).await;

    // Production away: the spool grows and staging keeps (almost) nothing until the spool is
    // over max_bytes; then staging keeps WAL again and the spool stops growing.
    production.stop_server("fast").expect("stop production");
    let outage_from: Lsn = p.staging_lsn().parse().unwrap();
    let mut most_retained_with_room = 0;
    let mut wal_while_room = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while !read_log(&log).contains("the spool is full") {
        assert!(
            Instant::now() < deadline,
            "the spool never filled: {} bytes\n{}",
            spool_bytes(&dir),
            read_log(&log)
        );
        assert!(child.try_wait().unwrap().is_none(), "{}", read_log(&log));
        if spool_bytes(&dir) < max_bytes / 2 {
            most_retained_with_room = most_retained_with_room.max(p.retained_wal());
            let now: Lsn = p.staging_lsn().parse().unwrap();
            wal_while_room = now.0 - outage_from.0;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        wal_while_room > 4 * most_retained_with_room as u64,
        "while the spool had room, staging kept {most_retained_with_room} bytes of the {wal_while_room} written"
    );
    let full_at = p.retained_wal();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let retained_full = p.retained_wal();
    let bytes_full = spool_bytes(&dir);
    assert!(
        retained_full > full_at,
        "with the spool full staging keeps WAL again: {full_at} then {retained_full}"
    );
    assert!(
        bytes_full < max_bytes + (4 << 20),
        "the spool stopped growing near max_bytes: {bytes_full}"
    );
    assert!(child.try_wait().unwrap().is_none(), "{}", read_log(&log));
    // status still tells what the slot and the spool hold while production is down.
    let (code, out) = run_command(&p, "status", &[]);
    assert_eq!(code, Some(8), "{out}");
    assert!(
        out.contains("production's progress, lag and quarantine are unknown"),
        "{out}"
    );
    assert!(out.contains("(full)"), "{out}");
    assert!(out.contains(&format!("slot {}: ", p.slot)), "{out}");

    // Staging away too, then production back: production catches up on what is spooled
    // without staging.
    stop.store(true, Ordering::Relaxed);
    let committed = workload.join().expect("workload");
    p.staging.cluster.stop_server("fast").expect("stop staging");
    production.start_server().expect("start production");
    let spooled = stagingprop::spool::store::summary(&dir)
        .unwrap()
        .newest_end
        .expect("spooled transactions")
        .to_string();
    // The applier's retries back off up to 30 s while production is down.
    if let Err(e) = p.try_wait_applied(&spooled, Duration::from_secs(90)).await {
        panic!("{e}\n{}", read_log(&log));
    }
    assert!(child.try_wait().unwrap().is_none(), "{}", read_log(&log));

    // Staging back: the rest arrives once, and the spool has room again.
    p.staging.cluster.start_server().expect("start staging");
    let lsn = p.staging_lsn();
    if let Err(e) = p.try_wait_applied(&lsn, Duration::from_secs(90)).await {
        panic!("{e}\n{}", read_log(&log));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read_log(&log).contains("the spool has room again") {
        assert!(Instant::now() < deadline, "{}", read_log(&log));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let text = read_log(&log);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{text}");
    p.assert_equal();
    let counter = |db: &Db| db.value("SELECT value FROM counter WHERE id = 1");
    assert_eq!(counter(&p.production), committed.to_string());
    assert!(
        spool_bytes(&dir) <= max_bytes + 65536 * 2,
        "applied segments were removed: {} bytes",
        spool_bytes(&dir)
    );
    println!(
        "outage: {committed} transactions; with room staging kept at most {most_retained_with_room} of {wal_while_room} bytes of WAL; \
         full: {bytes_full} bytes spooled, staging kept {full_at} then {retained_full}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs `stagingprop replay` with `args`; returns (exit code, stdout + stderr).
fn run_replay(p: &FaultPair, args: &[&str]) -> (Option<i32>, String) {
    run_command(p, "replay", args)
}

/// Runs `stagingprop COMMAND` with `args`; returns (exit code, stdout + stderr).
fn run_command(p: &FaultPair, command: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&p.config_path)
        .arg(command)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run stagingprop");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Runs sync until it has everything staging has.
fn sync_until_caught_up(p: &FaultPair, log: &str) {
    let (mut child, log) = spawn_sync(p, &["--until-caught-up"], log);
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{}", read_log(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_brings_a_restored_backup_up_to_production() {
    let started = Instant::now();
    let mut p = setup(
        shared_staging(),
        shared_production(),
        "faults_replay",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    let dir = p.enable_spool("segment_bytes = 16384");
    p.staging.sql(&(1..=40).map(ledger_txn).collect::<String>());
    sync_until_caught_up(&p, "sync-1.log");

    // Last night's backup of production.
    let bin = stagingprop::cluster::find_pg_bin().expect("PostgreSQL binaries");
    let dump = p.scratch.0.join("production.dump");
    let dumped = Command::new(bin.join("pg_dump"))
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg(
            p.production
                .cluster
                .conninfo(&p.production.name, "postgres"),
        )
        .status()
        .expect("pg_dump");
    assert!(dumped.success());
    let restore = |prefix: &str| -> Db {
        let db = Db {
            name: support::fresh_db(&p.production.cluster, prefix),
            cluster: p.production.cluster.clone(),
        };
        let restored = Command::new(bin.join("pg_restore"))
            .args(["--no-owner", "-d"])
            .arg(db.cluster.conninfo(&db.name, "postgres"))
            .arg(&dump)
            .status()
            .expect("pg_restore");
        assert!(restored.success());
        db
    };

    // A day of changes after the backup, applied by sync as usual.
    let mut marks = Vec::new();
    for round in 0..3 {
        let from = 41 + round * 40;
        p.staging
            .sql(&(from..from + 40).map(ledger_txn).collect::<String>());
        marks.push(p.staging_lsn());
        sync_until_caught_up(&p, &format!("sync-{}.log", round + 2));
    }
    assert!(stagingprop::spool::store::segments(&dir).unwrap().len() > 3);

    // Restored and replayed: equal to production; a second replay has nothing to do.
    let restored = restore("faults_replay_restored");
    assert_eq!(restored.value("SELECT value FROM counter"), "40");
    let to = restored.cluster.conninfo(&restored.name, "postgres");
    let (code, out) = run_replay(&p, &["--to", &to]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replay: "), "{out}");
    p.assert_same_rows(&p.production, &restored);
    let (code, out) = run_replay(&p, &["--to", &to]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replay: 0 transactions"), "{out}");

    // --until stops at a position: the counter says exactly how far it got.
    let partial = restore("faults_replay_until");
    let to = partial.cluster.conninfo(&partial.name, "postgres");
    let (code, out) = run_replay(&p, &["--to", &to, "--until", &marks[0]]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(partial.value("SELECT value FROM counter"), "80", "{out}");
    // A time before every spooled commit applies nothing.
    let (code, out) = run_replay(&p, &["--to", &to, "--until", "2001-01-01 00:00:00+00"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(partial.value("SELECT value FROM counter"), "80", "{out}");
    // A cutoff PostgreSQL cannot read is a bad command line.
    let (code, out) = run_replay(&p, &["--to", &to, "--until", "yesterday-ish"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("neither an LSN"), "{out}");

    // The oldest segments gone (as retention removes them): a restored backup older than the
    // spool is an error that says what the spool holds, and nothing is applied.
    let round_two: Lsn = marks[0].parse().unwrap();
    for (first, path) in stagingprop::spool::store::segments(&dir).unwrap() {
        if first < round_two {
            std::fs::remove_file(path).unwrap();
        }
    }
    let stale = restore("faults_replay_stale");
    let to = stale.cluster.conninfo(&stale.name, "postgres");
    let (code, out) = run_replay(&p, &["--to", &to]);
    assert_eq!(code, Some(10), "{out}");
    assert!(
        out.contains("lacks staging's transactions between"),
        "{out}"
    );
    assert_eq!(stale.value("SELECT value FROM counter"), "40");
    println!(
        "replay: {} spooled segments, {:.1} s",
        stagingprop::spool::store::segments(&dir).unwrap().len(),
        started.elapsed().as_secs_f64()
    );
}

/// Two appliers on one target would apply the same transactions twice: a second process on the
/// same spool is refused, and a sync whose progress row another writer moved stops, rolling its
/// batch back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_applier_on_the_same_target_is_refused() {
    let mut p = setup(
        shared_staging(),
        shared_production(),
        "faults_second",
        LEDGER,
        LEDGER_TABLES,
        "",
    )
    .await;
    let plain_config = std::fs::read_to_string(&p.config_path).unwrap();
    p.enable_spool("");
    let (mut child, log) = spawn_sync(&p, &[], "sync-spool.log");
    p.staging.sql(&(1..=10).map(ledger_txn).collect::<String>());
    let lsn = p.staging_lsn();
    p.wait_applied(&lsn, Duration::from_secs(30)).await;
    let (code, out) = run_replay(&p, &[]);
    assert_eq!(code, Some(10), "{out}");
    assert!(
        out.contains("another stagingprop process is using the spool"),
        "{out}"
    );
    let (mut second, second_log) = spawn_sync(&p, &[], "sync-second.log");
    let status = wait_exit(&mut second, Duration::from_secs(30));
    let text = read_log(&second_log);
    assert_eq!(status.and_then(|s| s.code()), Some(10), "{text}");
    assert!(text.contains("another stagingprop process"), "{text}");
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", read_log(&log));

    // Without the spool: production's progress row moved by someone else.
    std::fs::write(&p.config_path, plain_config).unwrap();
    p.wait_slot_inactive(Duration::from_secs(15));
    let (mut child, log) = spawn_sync(&p, &[], "sync-plain.log");
    p.staging
        .sql(&(11..=20).map(ledger_txn).collect::<String>());
    let lsn = p.staging_lsn();
    p.wait_applied(&lsn, Duration::from_secs(30)).await;
    p.production.sql(&format!(
        "UPDATE stagingprop.progress SET end_lsn = end_lsn + 1 WHERE slot = '{}'",
        p.slot
    ));
    let before = p.production.value("SELECT value FROM counter");
    p.staging
        .sql(&(21..=30).map(ledger_txn).collect::<String>());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let text = read_log(&log);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{text}");
    assert!(text.contains("another stagingprop"), "{text}");
    assert_eq!(
        p.production.value("SELECT value FROM counter"),
        before,
        "the batch was rolled back"
    );
}
