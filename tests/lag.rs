//! Lag as sync reports it (issue 40), in a test binary of its own: it writes tens of megabytes of
//! WAL, which tests sharing its clusters would see as their own lag.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{PairBuilder, Scratch, scrape, stagingprop as run};

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

/// `stagingprop_lag_bytes` as a scrape shows it, if it is there.
fn lag_gauge(port: u16) -> Option<u64> {
    let body = scrape(port)?;
    body.lines()
        .find_map(|l| l.strip_prefix("stagingprop_lag_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A fresh sync with nothing pending reads no lag (not staging's whole WAL position), and a
/// real backlog reads as its size until it is applied.
#[test]
fn lag_gauge_reads_nothing_on_a_fresh_slot_and_a_backlog_as_its_size() {
    let pair = PairBuilder::new(
        "lag_gauge",
        "CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text, descr text);",
    )
    .table("public.catentry", "")
    .build();
    let scratch = Scratch::new("lag-gauge");
    let config = pair.write_config(&scratch.0);
    let (code, out, err) = run(&config, &["init"]);
    assert_eq!(code, 0, "{out}{err}");
    let wal_position = || -> u64 {
        pair.on_staging("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint")
            .trim()
            .parse()
            .unwrap()
    };
    // Where the slot starts: the true lag never exceeds the WAL written since, and the bug read
    // staging's whole position.
    let slot_start: u64 = pair
        .on_staging(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::bigint FROM pg_replication_slots \
             WHERE slot_name = 'lag_gauge'",
        )
        .trim()
        .parse()
        .unwrap();
    let spawn_sync = |port: u16| {
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(["--metrics-listen", &format!("127.0.0.1:{port}"), "sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // Nothing pending: the gauge appears (the slot's start is known) and reads about nothing.
    let port = stagingprop::cluster::free_port().unwrap();
    let mut sync = spawn_sync(port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline && seen.len() < 10 {
        if let Some(lag) = lag_gauge(port) {
            seen.push(lag);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = sync.kill();
    let _ = sync.wait();
    let since_start = wal_position() - slot_start;
    assert!(!seen.is_empty(), "no stagingprop_lag_bytes within 30 s");
    assert!(
        seen.iter().all(|&lag| lag <= since_start),
        "a fresh sync with nothing to apply reported lag {seen:?}, more than the {since_start} \
         bytes of WAL written since the slot's start {slot_start}"
    );

    // A backlog of about 30 MB while sync is down: the gauge reads (most of) it, then drains.
    let before = wal_position();
    pair.on_staging(
        "INSERT INTO catentry (catentry_id, partnumber, descr)
         SELECT g, 'P' || g, repeat('x', 100) FROM generate_series(1, 150000) g",
    );
    let backlog = wal_position() - before;
    assert!(backlog > 10 << 20, "the backlog is only {backlog} bytes");
    let port = stagingprop::cluster::free_port().unwrap();
    let mut sync = spawn_sync(port);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut readings = Vec::new();
    let mut drained = false;
    while Instant::now() < deadline {
        if let Some(lag) = lag_gauge(port) {
            readings.push(lag);
            if lag < 1 << 20 {
                drained = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sync.kill();
    let _ = sync.wait();
    let since_start = wal_position() - slot_start;
    let highest = readings.iter().copied().max().unwrap_or(0);
    assert!(
        highest >= backlog / 2 && highest <= since_start,
        "with a backlog of {backlog} bytes the gauge read {readings:?} ({since_start} bytes of \
         WAL since the slot's start)"
    );
    assert!(drained, "the lag never drained: {readings:?}");
}
