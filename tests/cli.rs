//! The `stagingprop` binary: `init` and `tail` against real clusters, and its errors.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::{Scratch, clusters, fresh_db, psql, scrape, stagingprop as run};

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL,
                       price numeric(12,2), published bool, descr text, data bytea, attrs jsonb,
                       uid uuid, tags text[], updated timestamptz);
ALTER TABLE catentry ALTER descr SET STORAGE EXTERNAL;
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry, language_id int,
                         name text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE nokey (a int);
";

fn write_config(
    dir: &Path,
    staging_db: &str,
    production_db: &str,
    tables: &[&str],
    slot: &str,
) -> PathBuf {
    let c = clusters();
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\n[sync]\nslot = \"{slot}\"\npublication = \"{slot}_pub\"\n",
        c.staging.conninfo(staging_db, "postgres"),
        c.production.conninfo(production_db, "postgres"),
    );
    for table in tables {
        text.push_str(&format!("\n[[tables]]\nname = \"{table}\"\n"));
    }
    let path = dir.join("stagingprop.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A scratch directory with a config for `staging` and `production` managing `tables`.
fn catalogue_config(
    name: &str,
    staging: &str,
    production: &str,
    tables: &[&str],
    slot: &str,
) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(name);
    let config = write_config(&scratch.0, staging, production, tables, slot);
    (scratch, config)
}

/// Two databases with the catalogue schema on both sides.
fn catalogue_pair(prefix: &str) -> (String, String) {
    let c = clusters();
    let staging = fresh_db(&c.staging, prefix);
    let production = fresh_db(&c.production, prefix);
    psql(&c.staging, &staging, CATALOGUE);
    psql(&c.production, &production, CATALOGUE);
    (staging, production)
}

#[test]
fn init_creates_publication_slot_and_schema_and_is_idempotent() {
    let c = clusters();
    let (staging, production) = catalogue_pair("init_ok");
    let (scratch, config) = catalogue_config(
        "init_ok",
        &staging,
        &production,
        &["public.catentry", "catentdesc"],
        "init_ok",
    );

    let (code, stdout, stderr) = run(&config, &["init"]);
    assert_eq!(code, 0, "init failed: {stdout}{stderr}");
    assert!(
        stdout.contains("created publication init_ok_pub"),
        "{stdout}"
    );
    assert!(stdout.contains("created slot init_ok"), "{stdout}");
    let published = psql(
        &c.staging,
        &staging,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'init_ok_pub'",
    );
    assert_eq!(published.trim(), "catentdesc,catentry");
    let slot = psql(
        &c.staging,
        &staging,
        "SELECT plugin FROM pg_replication_slots WHERE slot_name = 'init_ok'",
    );
    assert_eq!(slot.trim(), "pgoutput");
    let schema = psql(
        &c.production,
        &production,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'stagingprop'",
    );
    assert_eq!(schema.trim(), "1");

    // Second run: nothing new, same state.
    let (code, stdout, stderr) = run(&config, &["init"]);
    assert_eq!(code, 0, "second init failed: {stdout}{stderr}");
    assert!(stdout.contains("slot init_ok exists"), "{stdout}");
    assert!(
        stdout.contains("already lists the 2 managed table(s)"),
        "{stdout}"
    );

    // A table dropped from the config leaves the publication.
    let config = write_config(
        &scratch.0,
        &staging,
        &production,
        &["public.catentry"],
        "init_ok",
    );
    let (code, stdout, _) = run(&config, &["init"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("removed: public.catentdesc"), "{stdout}");
    psql(
        &c.staging,
        &staging,
        "SELECT pg_drop_replication_slot('init_ok')",
    );
}

#[test]
fn init_reports_every_failed_check_and_changes_nothing() {
    let c = clusters();
    let (staging, production) = catalogue_pair("init_bad");
    psql(&c.production, &production, "DROP TABLE catentdesc");
    let (scratch, config) = catalogue_config(
        "init_bad",
        &staging,
        &production,
        &[
            "public.catentry",
            "public.catentdesc",
            "public.nokey",
            "public.missing",
        ],
        "init_bad",
    );
    // A spool directory under a regular file can never be created, even by root.
    let not_a_dir = scratch.0.join("a-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[spool]\ndir = \"{}\"\n",
        not_a_dir.join("spool").display()
    ));
    std::fs::write(&config, text).unwrap();
    let (code, stdout, stderr) = run(&config, &["init"]);
    assert_eq!(code, 4, "expected exit 4 (checks failed): {stdout}{stderr}");
    assert!(stderr.contains("spool: cannot write to"), "{stderr}");
    assert!(
        stderr.contains("staging: table public.nokey has no primary key"),
        "{stderr}"
    );
    assert!(stderr.contains("REPLICA IDENTITY FULL"), "{stderr}");
    assert!(
        stderr.contains("staging: table public.missing does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.contains("production: table public.catentdesc does not exist"),
        "{stderr}"
    );
    let created = psql(
        &c.staging,
        &staging,
        "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'init_bad')",
    );
    assert_eq!(
        created.trim(),
        "0",
        "nothing may be created when a check fails"
    );
}

#[test]
fn config_errors_exit_2_and_never_echo_passwords() {
    let scratch = Scratch::new("badconfig");
    let path = scratch.0.join("stagingprop.toml");
    std::fs::write(
        &path,
        "[staging]\nurl = \"host=127.0.0.1 dbname=x user=y\"\npassword = \"hunter2\"\n[production]\nurl = \"host=127.0.0.1 dbname=z\"\n[[tables]]\nname = \"a\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&path, &["init"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("password_env or password_file"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");

    let (code, _, stderr) = run(&scratch.0.join("absent.toml"), &["tail"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("absent.toml"), "{stderr}");
}

#[test]
fn unreachable_staging_exits_3_naming_the_database() {
    let scratch = Scratch::new("unreachable");
    let port = stagingprop::cluster::free_port().unwrap();
    let path = scratch.0.join("stagingprop.toml");
    std::fs::write(
        &path,
        format!("[staging]\nurl = \"host=127.0.0.1 port={port} dbname=x user=y\"\nsslmode = \"disable\"\n[production]\nurl = \"host=127.0.0.1 port={port} dbname=z user=y\"\nsslmode = \"disable\"\n[[tables]]\nname = \"a\"\n"),
    )
    .unwrap();
    let (code, _, stderr) = run(&path, &["tail"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains(&format!("port={port}")), "{stderr}");
    assert!(stderr.contains("staging"), "{stderr}");
}

/// A running `stagingprop tail` whose stdout lines arrive on a channel.
struct TailProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl TailProcess {
    /// Starts tail and waits until it reports that it is streaming.
    fn start(config: &Path, args: &[&str]) -> TailProcess {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tail");
        let stderr = child.stderr.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("streaming changes") {
                    let _ = ready_tx.send(Ok(()));
                } else if line.contains("error") {
                    let _ = ready_tx.send(Err(line.clone()));
                }
                eprintln!("tail: {line}");
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            other => {
                let _ = child.kill();
                panic!("tail did not start streaming: {other:?}");
            }
        }
        TailProcess { child, lines }
    }

    fn read(&self, count: usize) -> Vec<Json> {
        let deadline = Instant::now() + Duration::from_secs(30);
        (0..count)
            .map(|i| {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = self
                    .lines
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("only {i} of {count} lines from tail"));
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line}: {e}"))
            })
            .collect()
    }

    fn wait(mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tail did not exit");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn tail_prints_what_was_written() {
    let c = clusters();
    let (staging, production) = catalogue_pair("tail");
    let (_scratch, config) = catalogue_config(
        "tail",
        &staging,
        &production,
        &["public.catentry", "public.catentdesc"],
        "tail_real",
    );
    let (code, out, err) = run(&config, &["init"]);
    assert_eq!(code, 0, "{out}{err}");

    let tail = TailProcess::start(&config, &["--limit", "6"]);
    let long = "d".repeat(10_000);
    psql(
        &c.staging,
        &staging,
        &format!(
            "BEGIN;
             INSERT INTO catentry VALUES (1, 'SKU-1', 19.99, true, '{long}', '\\xdeadbeef',
               '{{\"size\": \"XL\"}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', ARRAY['x', 'y z'],
               '2026-11-25 12:00:00+00');
             INSERT INTO catentdesc VALUES (1, -1, 'Shirt');
             COMMIT;
             UPDATE catentry SET price = 17.50 WHERE catentry_id = 1;
             UPDATE catentdesc SET catentry_id = catentry_id, language_id = -2 WHERE catentry_id = 1;
             DELETE FROM catentdesc WHERE catentry_id = 1;
             TRUNCATE catentdesc;"
        ),
    );
    let lines = tail.read(6);
    assert_eq!(tail.wait(), 0);

    let insert = &lines[0];
    assert_eq!(insert["op"], "insert");
    assert_eq!(insert["table"], "public.catentry");
    assert_eq!(insert["key"], serde_json::json!({"catentry_id": "1"}));
    let new = &insert["new"];
    assert_eq!(new["partnumber"], "SKU-1");
    assert_eq!(new["price"], "19.99");
    assert_eq!(new["published"], "t");
    assert_eq!(new["descr"].as_str().unwrap().len(), 10_000);
    assert_eq!(new["data"], "\\xdeadbeef");
    assert_eq!(new["attrs"], "{\"size\": \"XL\"}");
    assert_eq!(new["uid"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(new["tags"], "{x,\"y z\"}");
    assert_eq!(new["updated"], "2026-11-25 12:00:00+00");
    assert!(insert["xid"].as_u64().unwrap() > 0);
    assert!(insert["commit_time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["xid"], insert["xid"], "same transaction");
    assert_eq!(
        lines[1]["key"],
        serde_json::json!({"catentry_id": "1", "language_id": "-1"})
    );

    let update = &lines[2];
    assert_eq!(update["op"], "update");
    assert_eq!(update["new"]["price"], "17.50");
    assert_eq!(
        update["new"]["descr"],
        serde_json::json!({"unchanged_toast": true})
    );
    assert!(update.get("old").is_none(), "no key change, no old tuple");

    let key_change = &lines[3];
    assert_eq!(
        key_change["old"],
        serde_json::json!({"catentry_id": "1", "language_id": "-1"})
    );
    assert_eq!(key_change["new"]["language_id"], "-2");

    assert_eq!(lines[4]["op"], "delete");
    assert_eq!(
        lines[4]["key"],
        serde_json::json!({"catentry_id": "1", "language_id": "-2"})
    );
    assert_eq!(lines[5]["op"], "truncate");
    assert_eq!(lines[5]["tables"], serde_json::json!(["public.catentdesc"]));

    // The real slot was not touched: tail used a temporary one, now gone.
    let slots = psql(
        &c.staging,
        &staging,
        "SELECT string_agg(slot_name, ',') FROM pg_replication_slots WHERE database = current_database()",
    );
    assert_eq!(slots.trim(), "tail_real");
    psql(
        &c.staging,
        &staging,
        "SELECT pg_drop_replication_slot('tail_real')",
    );
}

#[test]
fn tail_on_a_named_slot_confirms_nothing() {
    let c = clusters();
    let (staging, production) = catalogue_pair("tailslot");
    let (_scratch, config) = catalogue_config(
        "tailslot",
        &staging,
        &production,
        &["public.catentry"],
        "tail_slot",
    );
    let (code, out, err) = run(&config, &["init"]);
    assert_eq!(code, 0, "{out}{err}");
    let confirmed = || {
        psql(
            &c.staging,
            &staging,
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'tail_slot'",
        )
        .trim()
        .to_owned()
    };
    let before = confirmed();
    psql(
        &c.staging,
        &staging,
        "INSERT INTO catentry (catentry_id, partnumber) SELECT g, 'P' || g FROM generate_series(1, 50) g",
    );
    for _ in 0..2 {
        let tail = TailProcess::start(&config, &["--slot", "tail_slot", "--limit", "50"]);
        let lines = tail.read(50);
        assert_eq!(tail.wait(), 0);
        assert_eq!(lines[49]["new"]["partnumber"], "P50");
        // Read twice from the same place: the slot did not move.
        assert_eq!(confirmed(), before);
    }
    psql(
        &c.staging,
        &staging,
        "SELECT pg_drop_replication_slot('tail_slot')",
    );
}

#[test]
fn copy_prints_a_summary_per_table() {
    let c = clusters();
    let (staging, production) = catalogue_pair("cli_copy");
    psql(
        &c.production,
        &production,
        "INSERT INTO catentry (catentry_id, partnumber) SELECT g, 'P' || g FROM generate_series(1, 1234) g",
    );
    let (_scratch, config) = catalogue_config(
        "cli_copy",
        &staging,
        &production,
        &["public.catentry", "public.catentdesc"],
        "cli_copy",
    );
    let (code, stdout, stderr) = run(
        &config,
        &[
            "copy",
            "--from",
            "production",
            "--to",
            "staging",
            "--jobs",
            "2",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("public.catentry "))
        .unwrap_or_else(|| panic!("no summary line: {stdout}"));
    assert!(line.contains(" 1234 "), "{line}");
    assert!(stdout.contains("copy: 1234 rows"), "{stdout}");
    assert_eq!(
        psql(&c.staging, &staging, "SELECT count(*) FROM catentry").trim(),
        "1234"
    );
    // The same for scripts, with --truncate.
    let (code, stdout, stderr) = run(
        &config,
        &[
            "copy",
            "--from",
            "production",
            "--to",
            "staging",
            "--truncate",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(report["rows"], 1234);
    assert_eq!(report["tables"][0]["table"], "public.catentry");
    assert_eq!(report["tables"][0]["rows"], 1234);
    // Same direction again without --truncate: refused, exit 1, nothing changed.
    let (code, _, stderr) = run(
        &config,
        &["copy", "--from", "production", "--to", "staging"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not empty"), "{stderr}");
}

#[test]
fn status_tells_healthy_from_unhealthy() {
    let c = clusters();
    let (staging, production) = catalogue_pair("cli_status");
    let (_scratch, config) = catalogue_config(
        "cli_status",
        &staging,
        &production,
        &["public.catentry", "public.catentdesc"],
        "cli_status",
    );
    let (code, out, err) = run(&config, &["init"]);
    assert_eq!(code, 0, "{out}{err}");
    let status = |extra: &[&str]| -> (i32, Json) {
        let mut args = vec!["status", "--json"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run(&config, &args);
        let json = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {stdout}{stderr}"));
        (code, json)
    };

    // Sync running and caught up: healthy.
    let mut sync = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("sync")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    psql(
        &c.staging,
        &staging,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (1, 'A')",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, json) = loop {
        let (code, json) = status(&[]);
        if code == 0 || Instant::now() > deadline {
            break (code, json);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(json["healthy"], true);
    assert_eq!(json["slot"]["active"], true);
    assert!(
        json["last_applied"]["xid"].as_i64().unwrap() > 0,
        "{json:#}"
    );
    assert!(json["lag_bytes"].as_i64().unwrap() < 1 << 20, "{json:#}");
    assert_eq!(json["quarantined_changes"], 0);
    // A tight lag threshold makes the same state unhealthy.
    psql(
        &c.staging,
        &staging,
        "SELECT pg_switch_wal(); CREATE TABLE filler AS SELECT g FROM generate_series(1, 1000) g",
    );
    let _ = sync.kill();
    let _ = sync.wait();

    // Sync stopped: the slot is unused, and staging is ahead.
    let (code, json) = status(&["--max-lag-bytes", "1"]);
    assert_eq!(code, 8, "{json:#}");
    assert_eq!(json["healthy"], false);
    let problems = json["problems"].to_string();
    assert!(problems.contains("not in use"), "{problems}");
    assert!(
        problems.contains("bytes of staging WAL behind"),
        "{problems}"
    );

    // The human form says the same.
    let (code, stdout, _) = run(&config, &["status"]);
    assert_eq!(code, 8);
    assert!(
        stdout.contains("UNHEALTHY") && stdout.contains("inactive"),
        "{stdout}"
    );

    // verify: equal now (exit 0); a change sync has not applied makes them differ (exit 9).
    let (code, stdout, stderr) = run(&config, &["verify"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("public.catentry: match (1 rows"),
        "{stdout}"
    );
    psql(
        &c.staging,
        &staging,
        "INSERT INTO catentry (catentry_id, partnumber) VALUES (2, 'B')",
    );
    let (code, stdout, _) = run(&config, &["verify"]);
    assert_eq!(code, 9, "{stdout}");
    assert!(stdout.contains("missing: catentry_id=2"), "{stdout}");

    // Slot dropped: unhealthy, and says what to do.
    psql(
        &c.staging,
        &staging,
        "SELECT pg_drop_replication_slot('cli_status')",
    );
    let (code, json) = status(&[]);
    assert_eq!(code, 8);
    assert_eq!(json["slot"]["exists"], false);
    assert!(
        json["problems"].to_string().contains("does not exist"),
        "{json:#}"
    );
}

#[test]
fn demo_runs_end_to_end_and_removes_its_clusters() {
    let out = Command::new(BIN)
        .args(["demo", "--duration", "3"])
        .stdin(Stdio::null())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("4. copy: 6 tables"), "{stdout}");
    assert!(stdout.contains("verify: match"), "{stdout}");
    assert!(!stdout.contains("DIFFERS"), "{stdout}");
    // The partial table: merchants' edits on production survived the live sync.
    let kept = stdout
        .split("merchant_note of ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u32>().ok());
    assert!(kept.is_some_and(|n| n > 0), "{stdout}");
    // Its clusters are gone: no directory or server of the demo's process is left.
    let leftovers: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("stagingprop-demo-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let servers = Command::new("pgrep")
        .args(["-f", "stagingprop-demo-"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&servers.stdout).trim().is_empty(),
        "demo servers still running"
    );
}

#[test]
fn metrics_endpoint_shows_applied_rows() {
    let c = clusters();
    let (staging, production) = catalogue_pair("cli_metrics");
    let (_scratch, config) = catalogue_config(
        "cli_metrics",
        &staging,
        &production,
        &["public.catentry"],
        "cli_metrics",
    );
    let (code, out, err) = run(&config, &["init"]);
    assert_eq!(code, 0, "{out}{err}");
    let port = stagingprop::cluster::free_port().unwrap();
    let mut sync = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["--metrics-listen", &format!("127.0.0.1:{port}"), "sync"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    psql(
        &c.staging,
        &staging,
        "INSERT INTO catentry (catentry_id, partnumber) SELECT g, 'P' || g FROM generate_series(1, 25) g",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    let found = loop {
        if let Some(body) = scrape(port) {
            if body.contains(
                r#"stagingprop_rows_applied_total{table="public.catentry",op="insert"} 25"#,
            ) {
                break true;
            }
            last = body;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = sync.kill();
    let _ = sync.wait();
    assert!(found, "no applied rows in the metrics:\n{last}");
    assert!(
        last.is_empty() || last.starts_with("HTTP/1.1 200"),
        "{last}"
    );
}

/// `sync`'s exit codes for what stops it for good: a missing slot (5), tables that differ (6),
/// a conflict under `on_conflict = "error"` (7); each message names the thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_exit_codes_name_what_stopped_it() {
    let schema = "CREATE TABLE t (id int PRIMARY KEY, v text);";
    let sync = |pair: &support::Pair, name: &str| {
        let scratch = Scratch::new(name);
        let config = pair.write_config(&scratch.0);
        run(&config, &["sync", "--until-caught-up"])
    };

    let pair = support::PairBuilder::new("exit_slot", schema)
        .table("public.t", "")
        .init()
        .await;
    pair.on_staging("SELECT pg_drop_replication_slot('exit_slot')");
    let (code, _, stderr) = sync(&pair, "exit-slot");
    assert_eq!(code, 5, "a missing slot is exit 5: {stderr}");
    assert!(stderr.contains("exit_slot"), "{stderr}");

    let pair = support::PairBuilder::new("exit_schema", schema)
        .table("public.t", "")
        .init()
        .await;
    pair.on_production("ALTER TABLE t DROP COLUMN v");
    pair.on_staging("INSERT INTO t VALUES (1, 'a')");
    let (code, _, stderr) = sync(&pair, "exit-schema");
    assert_eq!(code, 6, "tables that differ are exit 6: {stderr}");
    assert!(
        stderr.contains("\"v\"") || stderr.contains(" v "),
        "{stderr}"
    );
    assert_eq!(pair.on_production("SELECT count(*) FROM t").trim(), "0");

    let pair = support::PairBuilder::new("exit_conflict", schema)
        .table("public.t", "on_conflict = \"error\"")
        .init()
        .await;
    pair.on_production("INSERT INTO t VALUES (1, 'production''s own')");
    pair.on_staging("INSERT INTO t VALUES (1, 'staging''s'); INSERT INTO t VALUES (2, 'b')");
    let (code, _, stderr) = sync(&pair, "exit-conflict");
    assert_eq!(
        code, 7,
        "a conflict under on_conflict = error is exit 7: {stderr}"
    );
    assert!(stderr.contains("public.t"), "{stderr}");
    assert_eq!(
        pair.on_production("SELECT string_agg(v, ',') FROM t")
            .trim(),
        "production's own",
        "nothing of the batch was applied"
    );
}

/// `[sync] failover` on a server that cannot keep a failover slot safely (before 17, or without
/// `synchronized_standby_slots`) is refused by `init` with what to change, and no slot is made.
#[test]
fn init_refuses_failover_where_it_cannot_hold() {
    let pair =
        support::PairBuilder::new("failover_refused", "CREATE TABLE t (id int PRIMARY KEY);")
            .table("public.t", "")
            .sync("failover = true")
            .build();
    let scratch = Scratch::new("failover-refused");
    let (code, stdout, stderr) = run(&pair.write_config(&scratch.0), &["init"]);
    assert_eq!(code, 4, "{stdout}{stderr}");
    let said = format!("{stdout}{stderr}");
    assert!(
        said.contains("failover needs PostgreSQL 17")
            || said.contains("synchronized_standby_slots"),
        "{said}"
    );
    assert_eq!(
        pair.on_staging(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'failover_refused'"
        )
        .trim(),
        "0"
    );
}
