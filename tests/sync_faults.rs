//! `sync` under faults: a randomized catalogue workload applied while sync runs, kill -9 of the
//! binary and of production's postmaster, restarts of either database, SIGTERM, an idle slot
//! that must keep advancing, and a slot that disappeared.
//!
//! Randomized tests print their seed; rerun one with `STAGINGPROP_TEST_SEED=<seed>`.
//! Tests that stop or kill a server start dedicated clusters: the shared ones serve the other
//! tests of this binary, which run in parallel.

mod support;

use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use stagingprop::cluster::{ClusterError, ClusterOptions, LocalCluster};
use stagingprop::config::Config;
use stagingprop::model::Lsn;
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::sync::{self, StopAt, SyncOptions};
use tracing::Instrument;

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

// ---------------------------------------------------------------------------------------------
// Randomness

/// xorshift64*, seeded through splitmix64 so that any seed (even 0) gives a good state.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The seed of a randomized test: `STAGINGPROP_TEST_SEED`, else the clock. Printed either way.
fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("STAGINGPROP_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .expect("STAGINGPROP_TEST_SEED must be an unsigned integer"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{test}: seed {seed} (rerun with STAGINGPROP_TEST_SEED={seed})");
    seed
}

// ---------------------------------------------------------------------------------------------
// Clusters, databases, config

/// A shared cluster of this test binary, or one a test started for itself (removed on drop).
#[derive(Clone)]
enum Cluster {
    Shared(&'static LocalCluster),
    Owned(Arc<LocalCluster>),
}

impl Deref for Cluster {
    type Target = LocalCluster;

    fn deref(&self) -> &LocalCluster {
        match self {
            Cluster::Shared(c) => c,
            Cluster::Owned(c) => c,
        }
    }
}

fn shared_staging() -> Cluster {
    Cluster::Shared(&support::clusters().staging)
}

fn shared_production() -> Cluster {
    Cluster::Shared(&support::clusters().production)
}

/// Starts dedicated clusters in parallel (for tests that stop or kill a server).
fn dedicated<const N: usize>(names: [&str; N]) -> [Cluster; N] {
    thread::scope(|scope| {
        let handles = names.map(|name| {
            scope.spawn(move || {
                LocalCluster::start(&ClusterOptions::new(name))
                    .unwrap_or_else(|e| panic!("cannot start the {name} cluster: {e}"))
            })
        });
        handles.map(|h| Cluster::Owned(Arc::new(h.join().expect("cluster start panicked"))))
    })
}

/// One database on one cluster.
#[derive(Clone)]
struct Db {
    cluster: Cluster,
    name: String,
}

impl Db {
    fn sql(&self, sql: &str) -> String {
        support::psql(&self.cluster, &self.name, sql)
    }

    fn try_sql(&self, sql: &str) -> Result<String, ClusterError> {
        self.cluster.psql(&self.name, sql)
    }

    /// A single value, trimmed.
    fn value(&self, sql: &str) -> String {
        self.sql(sql).trim().to_owned()
    }
}

/// A scratch directory for config files and logs, removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("stagingprop-faults-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A staging and a production database with the same schema, a config for them, and init done.
struct Pair {
    staging: Db,
    production: Db,
    slot: String,
    /// Managed tables and their key columns (for ordered dumps).
    tables: Vec<(&'static str, &'static str)>,
    config: Config,
    config_path: PathBuf,
    scratch: Scratch,
    remapping: Option<&'static Remapping>,
}

async fn setup(
    staging: Cluster,
    production: Cluster,
    prefix: &str,
    schema: &str,
    tables: &[(&'static str, &'static str)],
    extra_sync: &str,
) -> Pair {
    setup_remapped(
        staging, production, prefix, schema, tables, extra_sync, None,
    )
    .await
}

/// Key rules for a fault test: what the config says, what production holds of its own, and how
/// the test translates staging's rows to compare them.
struct Remapping {
    /// `key = {...}` lines per table (tables not listed keep their keys).
    rules: &'static [(&'static str, &'static str)],
    /// Run on production before sync: its own rows and its key sources.
    production_sql: &'static str,
    /// Columns translated through the key map: (table, column, table whose keys it holds).
    translate: &'static [(&'static str, &'static str, &'static str)],
    /// Production-born rows per table, left out of the comparison.
    production_born: &'static [(&'static str, &'static str)],
    /// Per remapped table: the condition on staging rows that must have exactly one mapping.
    mapped_rows: &'static [(&'static str, &'static str, &'static str)],
}

async fn setup_remapped(
    staging: Cluster,
    production: Cluster,
    prefix: &str,
    schema: &str,
    tables: &[(&'static str, &'static str)],
    extra_sync: &str,
    remapping: Option<&'static Remapping>,
) -> Pair {
    let staging = Db {
        name: support::fresh_db(&staging, prefix),
        cluster: staging,
    };
    let production = Db {
        name: support::fresh_db(&production, prefix),
        cluster: production,
    };
    staging.sql(schema);
    production.sql(schema);
    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\n\
         [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\nstatus_interval_secs = 1\n{extra_sync}\n",
        staging.cluster.conninfo(&staging.name, "postgres"),
        production.cluster.conninfo(&production.name, "postgres"),
    );
    for (table, _) in tables {
        let rule = remapping
            .and_then(|r| r.rules.iter().find(|(t, _)| t == table))
            .map_or("", |(_, rule)| rule);
        text.push_str(&format!(
            "\n[[tables]]\nname = \"public.{table}\"\non_conflict = \"error\"\n{rule}\n"
        ));
    }
    if let Some(remapping) = remapping {
        production.sql(remapping.production_sql);
    }
    let scratch = Scratch::new(prefix);
    let config_path = scratch.0.join("stagingprop.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::from_toml_str(&text, "test").expect("test config");
    init(&config, &InitOptions::default()).await.expect("init");
    Pair {
        staging,
        production,
        slot: prefix.to_owned(),
        tables: tables.to_vec(),
        config,
        config_path,
        scratch,
        remapping,
    }
}

impl Pair {
    /// Has staging stream every transaction past 64 kB of changes (sync's walsender reads the
    /// database's setting when it connects).
    fn stream_past_64kb(&self) {
        self.staging.sql(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            self.staging.name
        ));
    }

    /// Staging streamed at least one transaction to sync's slot.
    fn assert_streamed(&self) {
        let streamed: u64 = self
            .staging
            .value(&format!(
                "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = '{}'",
                self.slot
            ))
            .parse()
            .unwrap();
        assert!(streamed > 0, "staging streamed no transaction");
    }

    /// Publishes the ledger's rows as files (path: note, content: blob) into the scratch
    /// directory; staging then sends whole old rows of the ledger.
    fn publish_ledger_files(&mut self) -> PathBuf {
        let dir = self.scratch.0.join("files");
        self.staging.sql("ALTER TABLE ledger REPLICA IDENTITY FULL");
        let text = std::fs::read_to_string(&self.config_path).unwrap().replace(
            "name = \"public.ledger\"\n",
            &format!(
                "name = \"public.ledger\"\nfiles = {{ dir = \"{}\", path_column = \"note\", content_column = \"blob\" }}\n",
                dir.display()
            ),
        );
        std::fs::write(&self.config_path, &text).unwrap();
        self.config = Config::from_toml_str(&text, "test").expect("test config with files");
        dir
    }

    /// Turns the spool on (`[spool]` with `extra` settings), in the scratch directory.
    fn enable_spool(&mut self, extra: &str) -> PathBuf {
        let dir = self.scratch.0.join("spool");
        let mut text = std::fs::read_to_string(&self.config_path).unwrap();
        text.push_str(&format!(
            "\n[spool]\ndir = \"{}\"\n{extra}\n",
            dir.display()
        ));
        std::fs::write(&self.config_path, &text).unwrap();
        self.config = Config::from_toml_str(&text, "test").expect("test config with a spool");
        dir
    }

    /// Bytes of WAL staging keeps for the slot.
    fn retained_wal(&self) -> i64 {
        self.staging
            .value(&format!(
                "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
                self.slot
            ))
            .parse::<f64>()
            .expect("retained WAL") as i64
    }

    /// Staging's current WAL position.
    fn staging_lsn(&self) -> String {
        self.staging.value("SELECT pg_current_wal_lsn()")
    }

    /// Whether production's progress has reached `lsn` (false while it cannot be read).
    fn applied_at_least(&self, lsn: &str) -> bool {
        self.production
            .try_sql(&format!(
                "SELECT coalesce((SELECT end_lsn >= '{lsn}'::pg_lsn FROM stagingprop.progress WHERE slot = '{}'), false)",
                self.slot
            ))
            .is_ok_and(|out| out.trim() == "t")
    }

    /// Waits until production's progress reaches `lsn`.
    async fn wait_applied(&self, lsn: &str, within: Duration) {
        if let Err(e) = self.try_wait_applied(lsn, within).await {
            panic!("{e}");
        }
    }

    async fn try_wait_applied(&self, lsn: &str, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !self.applied_at_least(lsn) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "production did not reach staging's {lsn} within {within:?}; progress: {:?}",
                    self.production
                        .try_sql("SELECT end_lsn FROM stagingprop.progress")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    fn slot_column(&self, column: &str) -> String {
        self.staging.value(&format!(
            "SELECT {column} FROM pg_replication_slots WHERE slot_name = '{}'",
            self.slot
        ))
    }

    /// Waits until no walsender holds the slot (a killed sync's session is gone).
    fn wait_slot_inactive(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.slot_column("active") != "f" {
            assert!(
                Instant::now() < deadline,
                "slot {} still active after {within:?}",
                self.slot
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Staging's rows translated through production's key map (copied to staging for the
    /// comparison) equal production's own rows but those it made itself; and every remapped
    /// table has exactly one mapping per row that needs one.
    fn assert_equal_through_key_map(&self, remapping: &Remapping) {
        let key_map = self.production.sql(
            "SELECT table_name || ',' || source_key || ',' || target_key FROM stagingprop.key_map",
        );
        let mut load = String::from(
            "DROP TABLE IF EXISTS key_map_check; \
             CREATE TABLE key_map_check (table_name text, source_key bigint, target_key bigint, \
             PRIMARY KEY (table_name, source_key));\n",
        );
        let values: Vec<String> = key_map
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let parts: Vec<&str> = l.split(',').collect();
                format!("('{}', {}, {})", parts[0], parts[1], parts[2])
            })
            .collect();
        for chunk in values.chunks(5000) {
            load.push_str(&format!(
                "INSERT INTO key_map_check VALUES {};\n",
                chunk.join(",")
            ));
        }
        self.staging.sql(&load);
        for (table, _) in &self.tables {
            let mut translated = String::new();
            for (_, column, parent) in remapping.translate.iter().filter(|(t, _, _)| t == table) {
                translated.push_str(&format!(
                    " || jsonb_build_object('{column}', coalesce((SELECT target_key FROM key_map_check k \
                     WHERE k.table_name = 'public.{parent}' AND k.source_key = t.{column}), t.{column}))"
                ));
            }
            let born = remapping
                .production_born
                .iter()
                .find(|(t, _)| t == table)
                .map_or("false", |(_, c)| c);
            let hashes = |db: &Db, sql: String| -> Vec<String> {
                let mut h: Vec<String> = db.sql(&sql).lines().map(str::to_owned).collect();
                h.sort();
                h
            };
            let staging = hashes(
                &self.staging,
                format!("SELECT md5((to_jsonb(t){translated})::text) FROM {table} t"),
            );
            let production = hashes(
                &self.production,
                format!("SELECT md5(to_jsonb(t)::text) FROM {table} t WHERE ({born}) IS NOT TRUE"),
            );
            if staging == production {
                continue;
            }
            let only_staging: Vec<&String> = staging
                .iter()
                .filter(|h| production.binary_search(h).is_err())
                .collect();
            let only_production: Vec<&String> = production
                .iter()
                .filter(|h| staging.binary_search(h).is_err())
                .collect();
            let show = |db: &Db, row: &str, hashes: &[&String]| {
                let list: Vec<String> = hashes.iter().take(5).map(|h| format!("'{h}'")).collect();
                if list.is_empty() {
                    return String::new();
                }
                db.sql(&format!(
                    "SELECT left(r::text, 200) FROM (SELECT {row} AS r FROM {table} t) x \
                     WHERE md5(r::text) IN ({})",
                    list.join(",")
                ))
            };
            panic!(
                "{table} differs through the key map: {} rows on staging, {} on production \
                 (not production-born); {} only on staging, {} only on production\n\
                 staging (translated):\n{}production:\n{}",
                staging.len(),
                production.len(),
                only_staging.len(),
                only_production.len(),
                show(
                    &self.staging,
                    &format!("to_jsonb(t){translated}"),
                    &only_staging
                ),
                show(&self.production, "to_jsonb(t)", &only_production),
            );
        }
        for (table, key, condition) in remapping.mapped_rows {
            let counts = self.staging.value(&format!(
                "SELECT (SELECT count(*) FROM {table} t WHERE {condition}) || ' ' || \
                 (SELECT count(*) FROM key_map_check WHERE table_name = 'public.{table}') || ' ' || \
                 (SELECT count(*) FROM key_map_check k WHERE table_name = 'public.{table}' AND NOT EXISTS \
                   (SELECT 1 FROM {table} t WHERE t.{key} = k.source_key AND {condition}))"
            ));
            let parts: Vec<&str> = counts.split(' ').collect();
            assert!(
                parts[0] == parts[1] && parts[2] == "0",
                "{table}: {} rows need a mapping, the key map has {} entries, {} of them for no such row",
                parts[0],
                parts[1],
                parts[2]
            );
        }
    }

    fn quarantined(&self) -> String {
        self.production
            .value("SELECT count(*) FROM stagingprop.quarantine")
    }

    /// Production equals staging, table by table, row by row (through the key map when keys
    /// are remapped).
    fn assert_equal(&self) {
        if let Some(remapping) = self.remapping {
            return self.assert_equal_through_key_map(remapping);
        }
        self.assert_same_rows(&self.staging, &self.production);
    }

    /// Every managed table holds the same rows in `expected` and `actual`.
    fn assert_same_rows(&self, expected: &Db, actual: &Db) {
        let (left, right) = (&expected.name, &actual.name);
        for (table, key) in &self.tables {
            let rows = |db: &Db| -> Vec<String> {
                db.sql(&format!(
                    "SELECT row({key})::text || ' ' || md5(t::text) FROM {table} t ORDER BY {key}"
                ))
                .lines()
                .map(str::to_owned)
                .collect()
            };
            let staging = rows(expected);
            let production = rows(actual);
            if staging == production {
                continue;
            }
            let s: HashMap<&str, &str> =
                staging.iter().filter_map(|l| l.rsplit_once(' ')).collect();
            let p: HashMap<&str, &str> = production
                .iter()
                .filter_map(|l| l.rsplit_once(' '))
                .collect();
            let mut report = format!(
                "{table} differs: {} rows in {left}, {} in {right}\n",
                staging.len(),
                production.len()
            );
            let show = |db: &Db, k: &str| {
                db.sql(&format!(
                    "SELECT left(t::text, 300) FROM {table} t WHERE row({key})::text = '{}'",
                    k.replace('\'', "''")
                ))
            };
            let mut shown = 0;
            for (k, hash) in &s {
                if shown == 8 {
                    break;
                }
                match p.get(k) {
                    None => report.push_str(&format!("  missing in {right}: {k}\n")),
                    Some(h) if h != hash => report.push_str(&format!(
                        "  differs {k}:\n    {left}: {}    {right}: {}",
                        show(expected, k),
                        show(actual, k)
                    )),
                    _ => continue,
                }
                shown += 1;
            }
            for k in p.keys().filter(|k| !s.contains_key(*k)).take(8) {
                report.push_str(&format!("  extra in {right}: {k}\n"));
            }
            panic!("{report}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The binary

/// Starts `stagingprop sync` with its stderr in a file (a pipe nobody reads would block it).
fn spawn_sync(pair: &Pair, args: &[&str], log: &str) -> (Child, PathBuf) {
    let log_path = pair.scratch.0.join(log);
    let log_file = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&pair.config_path)
        .arg("sync")
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("spawn stagingprop");
    (child, log_path)
}

/// Sends SIGTERM to the child (sync finishes its batch, confirms and exits 0).
fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(kill.success());
}

/// Waits for the child to exit, at most `within` (then kills it and returns None).
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Log capture (the library's retry lines)

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log line of this test binary to [`LOG`]; tests find theirs by span.
fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

fn logged_lines(marker: &str) -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ledger workload: every change shows if it is lost or applied twice

const LEDGER: &str = "
CREATE TABLE ledger (id bigint PRIMARY KEY, txn bigint NOT NULL, note text, blob text);
ALTER TABLE ledger ALTER blob SET STORAGE EXTERNAL;
CREATE TABLE counter (id int PRIMARY KEY, value bigint NOT NULL, last_txn bigint NOT NULL);
INSERT INTO counter VALUES (1, 0, 0);
CREATE TABLE auditlog (a int, b text);
";

const LEDGER_TABLES: &[(&str, &str)] = &[("ledger", "id"), ("counter", "id")];

/// One ledger transaction: a new row, the counter +1, an update of a recent row (its TOAST value
/// unchanged) and, every third time, a delete of an older row. Under `on_conflict = "error"` a
/// duplicated insert or delete is a conflict; a lost or duplicated one changes the counter.
fn ledger_txn(i: u64) -> String {
    let blob = if i.is_multiple_of(7) {
        format!("repeat('blob{i}', 2000)")
    } else {
        "NULL".to_owned()
    };
    let delete = if i.is_multiple_of(3) && i > 20 {
        format!("DELETE FROM ledger WHERE id = {};", i - 20)
    } else {
        String::new()
    };
    // Now and then a larger one: past a small logical_decoding_work_mem staging streams it.
    let bulk = if i.is_multiple_of(50) {
        format!(
            "UPDATE ledger SET txn = txn + 1 WHERE id BETWEEN {} AND {};",
            i.saturating_sub(45),
            i.saturating_sub(6)
        )
    } else {
        String::new()
    };
    format!(
        "BEGIN; INSERT INTO ledger VALUES ({i}, {i}, 'note {i}', {blob});
         UPDATE counter SET value = value + 1, last_txn = {i} WHERE id = 1;
         UPDATE ledger SET note = note || '+' WHERE id = {};
         {bulk} {delete} COMMIT;\n",
        i.saturating_sub(5)
    )
}

/// Writes ledger transactions to staging, 5 per psql call, until `stop`. Returns how many
/// committed. With `tolerate_errors` (staging restarts), a failed call is skipped.
fn ledger_workload(
    staging: Db,
    stop: Arc<AtomicBool>,
    tolerate_errors: bool,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut next = 1;
        let mut committed = 0;
        while !stop.load(Ordering::Relaxed) {
            let sql: String = (next..next + 5).map(ledger_txn).collect();
            match staging.try_sql(&sql) {
                Ok(_) => committed += 5,
                Err(e) if tolerate_errors => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("ledger workload: {e}"),
            }
            next += 5;
            thread::sleep(Duration::from_millis(10));
        }
        committed
    })
}

// ---------------------------------------------------------------------------------------------
// Catalogue workload: a model of staging's rows generates random valid transactions

const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL UNIQUE,
  price numeric(12,2), counter int NOT NULL DEFAULT 0, descr text, data bytea, attrs jsonb,
  published bool);
ALTER TABLE catentry ALTER descr SET STORAGE EXTERNAL;
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, longdescription text, PRIMARY KEY (catentry_id, language_id));
ALTER TABLE catentdesc ALTER longdescription SET STORAGE EXTERNAL;
CREATE TABLE offer (offer_id bigint, store_id int,
  catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE, published bool,
  PRIMARY KEY (offer_id, store_id));
CREATE TABLE offerprice (offer_id bigint, store_id int, currency char(3), price numeric(20,5),
  note text, PRIMARY KEY (offer_id, store_id, currency),
  FOREIGN KEY (offer_id, store_id) REFERENCES offer ON DELETE CASCADE);
";

const CATALOGUE_TABLES: &[(&str, &str)] = &[
    ("catentry", "catentry_id"),
    ("catentdesc", "catentry_id, language_id"),
    ("offer", "offer_id, store_id"),
    ("offerprice", "offer_id, store_id, currency"),
];

const LANGUAGES: [i32; 6] = [-1, -2, -3, -4, -5, -6];
const CURRENCIES: [&str; 6] = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"];
const STORES: [i32; 2] = [1, 2];

/// A set with O(1) insert, remove and random pick.
struct IndexedSet<T> {
    items: Vec<T>,
    index: HashMap<T, usize>,
}

impl<T: Copy + Eq + Hash> IndexedSet<T> {
    fn new() -> Self {
        IndexedSet {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn insert(&mut self, item: T) {
        if !self.index.contains_key(&item) {
            self.index.insert(item, self.items.len());
            self.items.push(item);
        }
    }

    fn remove(&mut self, item: &T) {
        if let Some(i) = self.index.remove(item) {
            self.items.swap_remove(i);
            if i < self.items.len() {
                self.index.insert(self.items[i], i);
            }
        }
    }

    fn contains(&self, item: &T) -> bool {
        self.index.contains_key(item)
    }

    fn pick(&self, rng: &mut Rng) -> Option<T> {
        (!self.items.is_empty()).then(|| self.items[rng.below(self.items.len() as u64) as usize])
    }
}

/// What staging holds, so that every generated statement is valid (one failure would abort the
/// rest of its psql call and desynchronise the model).
struct Catalogue {
    rng: Rng,
    entries: IndexedSet<i64>,
    partnumbers: HashMap<i64, String>,
    descs: HashMap<i64, Vec<i32>>,
    offers: IndexedSet<(i64, i32)>,
    offer_parent: HashMap<(i64, i32), i64>,
    offers_of: HashMap<i64, Vec<(i64, i32)>>,
    prices: HashMap<(i64, i32), Vec<&'static str>>,
    next_id: i64,
    next_offer: i64,
    serial: u64,
    bulk_start: Option<(i64, i64)>,
}

impl Catalogue {
    fn new(seed: u64) -> Catalogue {
        Catalogue {
            rng: Rng::new(seed),
            entries: IndexedSet::new(),
            partnumbers: HashMap::new(),
            descs: HashMap::new(),
            offers: IndexedSet::new(),
            offer_parent: HashMap::new(),
            offers_of: HashMap::new(),
            prices: HashMap::new(),
            next_id: 1,
            next_offer: 1,
            serial: 0,
            bulk_start: None,
        }
    }

    fn serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    // Values, as SQL literals.

    fn price(&mut self) -> String {
        if self.rng.percent(10) {
            "NULL".into()
        } else {
            format!("{}.{:02}", self.rng.below(10_000), self.rng.below(100))
        }
    }

    fn boolean(&mut self) -> &'static str {
        self.rng.pick(&["NULL", "true", "false"])
    }

    fn name(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(10) {
            0 => "NULL".into(),
            1 => format!("'O''Brien \"{n}\" é ü ✓'"),
            2 => format!("E'line one\\nline two {n}\\t\\\\'"),
            _ => format!("'name {n}'"),
        }
    }

    /// NULL, a short text, or a long one (often over 8 KB) that is stored out of line.
    fn toast(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(20) {
            0..=2 => "NULL".into(),
            3..=7 => format!("'short {n}'"),
            _ => {
                let len = self.rng.between(2_500, 20_000);
                format!("repeat('t{n:07}', {})", len / 8)
            }
        }
    }

    fn bytea(&mut self) -> String {
        match self.rng.below(10) {
            0..=1 => "NULL".into(),
            2 => format!("convert_to(repeat('bin{}', 1500), 'UTF8')", self.serial()),
            _ => {
                let len = self.rng.below(40);
                let hex: String = (0..len)
                    .map(|_| format!("{:02x}", self.rng.below(256)))
                    .collect();
                format!("'\\x{hex}'::bytea")
            }
        }
    }

    fn json(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(5) {
            0 => "NULL".into(),
            1 => "'[]'::jsonb".into(),
            _ => format!(
                "jsonb_build_object('n', {n}, 'tags', jsonb_build_array('a{n}', NULL, true), \
                 'nested', jsonb_build_object('x', 1.5, 's', 'it''s \"quoted\"'))"
            ),
        }
    }

    // Picking existing rows.

    fn pick_desc(&mut self) -> Option<(i64, i32)> {
        for _ in 0..8 {
            let id = self.entries.pick(&mut self.rng)?;
            if let Some(languages) = self.descs.get(&id).filter(|l| !l.is_empty()) {
                let l = languages[self.rng.below(languages.len() as u64) as usize];
                return Some((id, l));
            }
        }
        None
    }

    fn pick_price(&mut self) -> Option<((i64, i32), &'static str)> {
        for _ in 0..8 {
            let offer = self.offers.pick(&mut self.rng)?;
            if let Some(currencies) = self.prices.get(&offer).filter(|c| !c.is_empty()) {
                let c = currencies[self.rng.below(currencies.len() as u64) as usize];
                return Some((offer, c));
            }
        }
        None
    }

    fn free_language(&mut self, id: i64) -> Option<i32> {
        let used = self.descs.get(&id).cloned().unwrap_or_default();
        let free: Vec<i32> = LANGUAGES
            .iter()
            .copied()
            .filter(|l| !used.contains(l))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    fn free_currency(&mut self, offer: (i64, i32)) -> Option<&'static str> {
        let used = self.prices.get(&offer).cloned().unwrap_or_default();
        let free: Vec<&'static str> = CURRENCIES
            .iter()
            .copied()
            .filter(|c| !used.contains(c))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    // Model updates.

    fn forget_offer(&mut self, offer: (i64, i32)) {
        self.offers.remove(&offer);
        self.prices.remove(&offer);
        if let Some(parent) = self.offer_parent.remove(&offer)
            && let Some(list) = self.offers_of.get_mut(&parent)
        {
            list.retain(|o| *o != offer);
        }
    }

    /// A catentry delete, with what ON DELETE CASCADE takes along.
    fn forget_entry(&mut self, id: i64) {
        self.entries.remove(&id);
        self.partnumbers.remove(&id);
        self.descs.remove(&id);
        for offer in self.offers_of.remove(&id).unwrap_or_default() {
            self.offers.remove(&offer);
            self.prices.remove(&offer);
            self.offer_parent.remove(&offer);
        }
    }

    // Operations: each appends valid SQL; false when there was nothing to act on.

    fn insert_entry(&mut self, sql: &mut String) {
        let id = self.next_id;
        self.next_id += 1;
        let partnumber = format!("PN-{id}");
        let (price, descr, data, attrs, published) = (
            self.price(),
            self.toast(),
            self.bytea(),
            self.json(),
            self.boolean(),
        );
        sql.push_str(&format!(
            "INSERT INTO catentry (catentry_id, partnumber, price, descr, data, attrs, published) \
             VALUES ({id}, '{partnumber}', {price}, {descr}, {data}, {attrs}, {published});\n"
        ));
        self.entries.insert(id);
        self.partnumbers.insert(id, partnumber);
        for _ in 0..self.rng.below(4) {
            self.insert_desc_for(id, sql);
        }
        for _ in 0..self.rng.below(3) {
            self.insert_offer_for(id, sql);
        }
    }

    fn insert_desc_for(&mut self, id: i64, sql: &mut String) -> bool {
        let Some(language) = self.free_language(id) else {
            return false;
        };
        let (name, long) = (self.name(), self.toast());
        sql.push_str(&format!(
            "INSERT INTO catentdesc VALUES ({id}, {language}, {name}, {long});\n"
        ));
        self.descs.entry(id).or_default().push(language);
        true
    }

    fn insert_offer_for(&mut self, id: i64, sql: &mut String) {
        let offer_id = self.next_offer;
        self.next_offer += 1;
        for store in STORES {
            if store == 2 && self.rng.percent(50) {
                continue;
            }
            let published = self.boolean();
            sql.push_str(&format!(
                "INSERT INTO offer VALUES ({offer_id}, {store}, {id}, {published});\n"
            ));
            let offer = (offer_id, store);
            self.offers.insert(offer);
            self.offer_parent.insert(offer, id);
            self.offers_of.entry(id).or_default().push(offer);
            for _ in 0..self.rng.below(4) {
                self.insert_price_for(offer, sql);
            }
        }
    }

    fn insert_price_for(&mut self, offer: (i64, i32), sql: &mut String) -> bool {
        let Some(currency) = self.free_currency(offer) else {
            return false;
        };
        let (price, note) = (self.price(), self.name());
        sql.push_str(&format!(
            "INSERT INTO offerprice VALUES ({}, {}, '{currency}', {price}, {note});\n",
            offer.0, offer.1
        ));
        self.prices.entry(offer).or_default().push(currency);
        true
    }

    fn random_op(&mut self, sql: &mut String) {
        // Op 19 (a unique-column swap) costs a one-by-one replay each time: see `swap`.
        const WEIGHTS: [u64; 21] = [
            18, 14, 6, 6, 4, 8, 8, 4, 5, 4, 2, 5, 3, 2, 5, 6, 5, 3, 2, 0, 3,
        ];
        let total: u64 = WEIGHTS.iter().sum();
        let mut roll = self.rng.below(total);
        let mut op = 0;
        while roll >= WEIGHTS[op] {
            roll -= WEIGHTS[op];
            op += 1;
        }
        if !self.op(op, sql) {
            self.insert_entry(sql);
        }
    }

    fn op(&mut self, op: usize, sql: &mut String) -> bool {
        match op {
            0 => {
                self.insert_entry(sql);
                true
            }
            // Only columns that are not TOASTed: descr must arrive as 'unchanged'.
            1 => {
                let ids: Vec<String> = (0..self.rng.between(1, 3))
                    .filter_map(|_| self.entries.pick(&mut self.rng))
                    .map(|id| id.to_string())
                    .collect();
                if ids.is_empty() {
                    return false;
                }
                let price = self.price();
                sql.push_str(&format!(
                    "UPDATE catentry SET counter = counter + 1, price = {price} WHERE catentry_id IN ({});\n",
                    ids.join(", ")
                ));
                true
            }
            2 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let descr = self.toast();
                sql.push_str(&format!(
                    "UPDATE catentry SET descr = {descr} WHERE catentry_id = {id};\n"
                ));
                true
            }
            3 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let (data, attrs, published) = (self.bytea(), self.json(), self.boolean());
                sql.push_str(&format!(
                    "UPDATE catentry SET data = {data}, attrs = {attrs}, published = {published} WHERE catentry_id = {id};\n"
                ));
                true
            }
            4 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                sql.push_str(&format!("DELETE FROM catentry WHERE catentry_id = {id};\n"));
                self.forget_entry(id);
                true
            }
            5 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_desc_for(id, sql)
            }
            6 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let name = self.name();
                sql.push_str(&format!(
                    "UPDATE catentdesc SET name = {name} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                true
            }
            7 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let long = self.toast();
                sql.push_str(&format!(
                    "UPDATE catentdesc SET longdescription = {long} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                true
            }
            // Key change on a leaf table (longdescription usually arrives 'unchanged').
            8 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let Some(to) = self.free_language(id) else {
                    return false;
                };
                let name = if self.rng.percent(50) {
                    format!(", name = {}", self.name())
                } else {
                    String::new()
                };
                sql.push_str(&format!(
                    "UPDATE catentdesc SET language_id = {to}{name} WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                let languages = self.descs.get_mut(&id).expect("picked");
                languages.retain(|x| *x != l);
                languages.push(to);
                true
            }
            9 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM catentdesc WHERE catentry_id = {id} AND language_id = {l};\n"
                ));
                self.descs.get_mut(&id).expect("picked").retain(|x| *x != l);
                true
            }
            // Deleted and inserted again with the same key.
            10 => {
                let Some((id, l)) = self.pick_desc() else {
                    return false;
                };
                let (name, long) = (self.name(), self.toast());
                sql.push_str(&format!(
                    "DELETE FROM catentdesc WHERE catentry_id = {id} AND language_id = {l};\n\
                     INSERT INTO catentdesc VALUES ({id}, {l}, {name}, {long});\n"
                ));
                true
            }
            11 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_offer_for(id, sql);
                true
            }
            12 => {
                let Some((o, s)) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                let published = self.boolean();
                sql.push_str(&format!(
                    "UPDATE offer SET published = {published} WHERE offer_id = {o} AND store_id = {s};\n"
                ));
                true
            }
            13 => {
                let Some((o, s)) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM offer WHERE offer_id = {o} AND store_id = {s};\n"
                ));
                self.forget_offer((o, s));
                true
            }
            14 => {
                let Some(offer) = self.offers.pick(&mut self.rng) else {
                    return false;
                };
                self.insert_price_for(offer, sql)
            }
            15 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                let price = self.price();
                sql.push_str(&format!(
                    "UPDATE offerprice SET price = {price} WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                true
            }
            // Key change on a leaf table.
            16 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                let Some(to) = self.free_currency((o, s)) else {
                    return false;
                };
                sql.push_str(&format!(
                    "UPDATE offerprice SET currency = '{to}' WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                let currencies = self.prices.get_mut(&(o, s)).expect("picked");
                currencies.retain(|x| *x != c);
                currencies.push(to);
                true
            }
            17 => {
                let Some(((o, s), c)) = self.pick_price() else {
                    return false;
                };
                sql.push_str(&format!(
                    "DELETE FROM offerprice WHERE offer_id = {o} AND store_id = {s} AND currency = '{c}';\n"
                ));
                self.prices
                    .get_mut(&(o, s))
                    .expect("picked")
                    .retain(|x| *x != c);
                true
            }
            18 => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let partnumber = format!("PN-{id}-{}", self.serial());
                sql.push_str(&format!(
                    "UPDATE catentry SET partnumber = '{partnumber}' WHERE catentry_id = {id};\n"
                ));
                self.partnumbers.insert(id, partnumber);
                true
            }
            // Two rows swap a unique column: set-based apply may trip the unique index where
            // staging's order did not.
            19 => {
                let (Some(a), Some(b)) = (
                    self.entries.pick(&mut self.rng),
                    self.entries.pick(&mut self.rng),
                ) else {
                    return false;
                };
                if a == b {
                    return false;
                }
                let pa = self.partnumbers[&a].clone();
                let pb = self.partnumbers[&b].clone();
                sql.push_str(&format!(
                    "UPDATE catentry SET partnumber = 'swap-{a}' WHERE catentry_id = {a};\n\
                     UPDATE catentry SET partnumber = '{pa}' WHERE catentry_id = {b};\n\
                     UPDATE catentry SET partnumber = '{pb}' WHERE catentry_id = {a};\n"
                ));
                self.partnumbers.insert(a, pb);
                self.partnumbers.insert(b, pa);
                true
            }
            // The same row several times in one transaction.
            _ => {
                let Some(id) = self.entries.pick(&mut self.rng) else {
                    return false;
                };
                let (d1, d2) = (self.toast(), self.price());
                sql.push_str(&format!(
                    "UPDATE catentry SET descr = {d1} WHERE catentry_id = {id};\n\
                     UPDATE catentry SET price = {d2}, counter = counter + 1 WHERE catentry_id = {id};\n\
                     UPDATE catentry SET counter = counter * 2 WHERE catentry_id = {id};\n"
                ));
                true
            }
        }
    }

    /// A random small transaction.
    fn transaction(&mut self) -> String {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..self.rng.between(1, 6) {
            self.random_op(&mut sql);
        }
        sql.push_str("COMMIT;\n");
        sql
    }

    /// Two catentries swap partnumbers (a unique column) in one transaction, among other changes.
    fn swap(&mut self) -> String {
        let mut sql = String::from("BEGIN;\n");
        self.random_op(&mut sql);
        if !self.op(19, &mut sql) {
            self.random_op(&mut sql);
        }
        self.random_op(&mut sql);
        sql.push_str("COMMIT;\n");
        sql
    }

    /// TRUNCATE of a leaf table.
    fn truncate(&mut self) -> String {
        if self.rng.percent(50) {
            self.prices.clear();
            "BEGIN; TRUNCATE offerprice; COMMIT;\n".into()
        } else {
            self.descs.clear();
            "BEGIN; TRUNCATE catentdesc; COMMIT;\n".into()
        }
    }

    /// 10k-50k rows in one transaction: catentries with a description each.
    fn bulk_insert(&mut self) -> String {
        let n = self.rng.between(5_000, 25_000) as i64;
        let (a, b) = (self.next_id, self.next_id + n - 1);
        self.next_id = b + 1;
        self.bulk_start = Some((a, b));
        for id in a..=b {
            self.entries.insert(id);
            self.partnumbers.insert(id, format!("PN-{id}"));
            self.descs.insert(id, vec![-1]);
        }
        format!(
            "BEGIN;
             INSERT INTO catentry (catentry_id, partnumber, price, descr, attrs)
               SELECT g, 'PN-' || g, (g % 1000) + 0.25,
                      CASE WHEN g % 50 = 0 THEN repeat('bulk' || g, 2000) END, jsonb_build_object('g', g)
               FROM generate_series({a}, {b}) g;
             INSERT INTO catentdesc (catentry_id, language_id, name)
               SELECT g, -1, 'bulk ' || g FROM generate_series({a}, {b}) g;
             COMMIT;\n"
        )
    }

    /// Many rows updated in one transaction, TOAST columns untouched.
    fn bulk_update(&mut self) -> String {
        "BEGIN;
         UPDATE catentdesc SET name = coalesce(name, '') || '*' WHERE catentry_id % 2 = 0;
         UPDATE catentry SET counter = counter + 1 WHERE catentry_id % 3 = 0;
         COMMIT;\n"
            .into()
    }

    /// A third of the bulk-inserted catentries deleted at once, with their cascades.
    fn bulk_delete(&mut self) -> String {
        let Some((a, b)) = self.bulk_start else {
            return self.transaction();
        };
        let to = a + (b - a) / 3;
        for id in a..=to {
            if self.entries.contains(&id) {
                self.forget_entry(id);
            }
        }
        format!("BEGIN; DELETE FROM catentry WHERE catentry_id BETWEEN {a} AND {to}; COMMIT;\n")
    }
}

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
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let options = SyncOptions {
            stop_at: None,
            max_attempts: Some(3),
            ..Default::default()
        };
        sync::run(&config, &options, async move {
            let _ = stop_rx.await;
        })
        .instrument(tracing::info_span!("faults", test = label))
        .await
    });

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
    let again = tokio::time::timeout(
        Duration::from_secs(60),
        sync::run(
            &p.config,
            &SyncOptions {
                stop_at: Some(StopAt::CaughtUp),
                max_attempts: Some(3),
                ..Default::default()
            },
            std::future::pending(),
        ),
    )
    .await
    .expect("caught up within 60 s")
    .expect("second run");
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
    p: &Pair,
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
fn assert_slot_at_progress(p: &Pair, text: &str) {
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
fn catch_up(p: &Pair, log_name: &str, within: Duration) {
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
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        let options = SyncOptions {
            stop_at: None,
            max_attempts: Some(3),
            ..Default::default()
        };
        sync::run(&config, &options, async move {
            let _ = stop_rx.await;
        })
        .await
    });
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
fn run_replay(p: &Pair, args: &[&str]) -> (Option<i32>, String) {
    run_command(p, "replay", args)
}

/// Runs `stagingprop COMMAND` with `args`; returns (exit code, stdout + stderr).
fn run_command(p: &Pair, command: &str, args: &[&str]) -> (Option<i32>, String) {
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
fn sync_until_caught_up(p: &Pair, log: &str) {
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
