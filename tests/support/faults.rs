//! The fault tests' harness: seeded randomness, shared or dedicated clusters, a database pair
//! with its config file and init done (optionally with key rules), the binary run as a child
//! that can be killed, log capture, and the two workloads whose every change shows when lost
//! or applied twice (a ledger, and a randomized catalogue with descriptions, offers and prices).

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
use stagingprop::ops::init::{InitOptions, init};

use super::Scratch;

pub const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

// ---------------------------------------------------------------------------------------------
// Randomness

/// xorshift64*, seeded through splitmix64 so that any seed (even 0) gives a good state.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The seed of a randomized test: `STAGINGPROP_TEST_SEED`, else the clock. Printed either way.
pub fn test_seed(test: &str) -> u64 {
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
pub enum Cluster {
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

pub fn shared_staging() -> Cluster {
    Cluster::Shared(&super::clusters().staging)
}

pub fn shared_production() -> Cluster {
    Cluster::Shared(&super::clusters().production)
}

/// Starts dedicated clusters in parallel (for tests that stop or kill a server).
pub fn dedicated<const N: usize>(names: [&str; N]) -> [Cluster; N] {
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
pub struct Db {
    pub cluster: Cluster,
    pub name: String,
}

impl Db {
    pub fn sql(&self, sql: &str) -> String {
        super::psql(&self.cluster, &self.name, sql)
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, ClusterError> {
        self.cluster.psql(&self.name, sql)
    }

    /// A single value, trimmed.
    pub fn value(&self, sql: &str) -> String {
        self.sql(sql).trim().to_owned()
    }
}

/// A staging and a production database with the same schema, a config for them, and init done.
pub struct FaultPair {
    pub staging: Db,
    pub production: Db,
    pub slot: String,
    /// Managed tables and their key columns (for ordered dumps).
    pub tables: Vec<(&'static str, &'static str)>,
    pub config: Config,
    pub config_path: PathBuf,
    pub scratch: Scratch,
    pub remapping: Option<&'static Remapping>,
}

pub async fn setup(
    staging: Cluster,
    production: Cluster,
    prefix: &str,
    schema: &str,
    tables: &[(&'static str, &'static str)],
    extra_sync: &str,
) -> FaultPair {
    setup_remapped(
        staging, production, prefix, schema, tables, extra_sync, None,
    )
    .await
}

/// Key rules for a fault test: what the config says, what production holds of its own, and how
/// the test translates staging's rows to compare them.
pub struct Remapping {
    /// `key = {...}` lines per table (tables not listed keep their keys).
    pub rules: &'static [(&'static str, &'static str)],
    /// Run on production before sync: its own rows and its key sources.
    pub production_sql: &'static str,
    /// Columns translated through the key map: (table, column, table whose keys it holds).
    pub translate: &'static [(&'static str, &'static str, &'static str)],
    /// Production-born rows per table, left out of the comparison.
    pub production_born: &'static [(&'static str, &'static str)],
    /// Per remapped table: the condition on staging rows that must have exactly one mapping.
    pub mapped_rows: &'static [(&'static str, &'static str, &'static str)],
}

pub async fn setup_remapped(
    staging: Cluster,
    production: Cluster,
    prefix: &str,
    schema: &str,
    tables: &[(&'static str, &'static str)],
    extra_sync: &str,
    remapping: Option<&'static Remapping>,
) -> FaultPair {
    let staging = Db {
        name: super::fresh_db(&staging, prefix),
        cluster: staging,
    };
    let production = Db {
        name: super::fresh_db(&production, prefix),
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
    FaultPair {
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

impl FaultPair {
    /// Has staging stream every transaction past 64 kB of changes (sync's walsender reads the
    /// database's setting when it connects).
    pub fn stream_past_64kb(&self) {
        self.staging.sql(&format!(
            "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
            self.staging.name
        ));
    }

    /// Staging streamed at least one transaction to sync's slot.
    pub fn assert_streamed(&self) {
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
    pub fn publish_ledger_files(&mut self) -> PathBuf {
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
    pub fn enable_spool(&mut self, extra: &str) -> PathBuf {
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
    pub fn retained_wal(&self) -> i64 {
        self.staging
            .value(&format!(
                "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
                self.slot
            ))
            .parse::<f64>()
            .expect("retained WAL") as i64
    }

    /// Staging's current WAL position.
    pub fn staging_lsn(&self) -> String {
        self.staging.value("SELECT pg_current_wal_lsn()")
    }

    /// Whether production's progress has reached `lsn` (false while it cannot be read).
    pub fn applied_at_least(&self, lsn: &str) -> bool {
        self.production
            .try_sql(&format!(
                "SELECT coalesce((SELECT end_lsn >= '{lsn}'::pg_lsn FROM stagingprop.progress WHERE slot = '{}'), false)",
                self.slot
            ))
            .is_ok_and(|out| out.trim() == "t")
    }

    /// Waits until production's progress reaches `lsn`.
    pub async fn wait_applied(&self, lsn: &str, within: Duration) {
        if let Err(e) = self.try_wait_applied(lsn, within).await {
            panic!("{e}");
        }
    }

    pub async fn try_wait_applied(&self, lsn: &str, within: Duration) -> Result<(), String> {
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

    pub fn slot_column(&self, column: &str) -> String {
        self.staging.value(&format!(
            "SELECT {column} FROM pg_replication_slots WHERE slot_name = '{}'",
            self.slot
        ))
    }

    /// Waits until no walsender holds the slot (a killed sync's session is gone).
    pub fn wait_slot_inactive(&self, within: Duration) {
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
    pub fn assert_equal_through_key_map(&self, remapping: &Remapping) {
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

    pub fn quarantined(&self) -> String {
        self.production
            .value("SELECT count(*) FROM stagingprop.quarantine")
    }

    /// Production equals staging, table by table, row by row (through the key map when keys
    /// are remapped).
    pub fn assert_equal(&self) {
        if let Some(remapping) = self.remapping {
            return self.assert_equal_through_key_map(remapping);
        }
        self.assert_same_rows(&self.staging, &self.production);
    }

    /// Every managed table holds the same rows in `expected` and `actual`.
    pub fn assert_same_rows(&self, expected: &Db, actual: &Db) {
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
pub fn spawn_sync(pair: &FaultPair, args: &[&str], log: &str) -> (Child, PathBuf) {
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
pub fn sigterm(child: &Child) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(kill.success());
}

/// Waits for the child to exit, at most `within` (then kills it and returns None).
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
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

pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Log capture (the library's retry lines)

pub static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

pub struct LogWriter;

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
pub fn capture_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

pub fn logged_lines(marker: &str) -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap())
        .lines()
        .filter(|l| l.contains(marker))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ledger workload: every change shows if it is lost or applied twice

pub const LEDGER: &str = "
CREATE TABLE ledger (id bigint PRIMARY KEY, txn bigint NOT NULL, note text, blob text);
ALTER TABLE ledger ALTER blob SET STORAGE EXTERNAL;
CREATE TABLE counter (id int PRIMARY KEY, value bigint NOT NULL, last_txn bigint NOT NULL);
INSERT INTO counter VALUES (1, 0, 0);
CREATE TABLE auditlog (a int, b text);
";

pub const LEDGER_TABLES: &[(&str, &str)] = &[("ledger", "id"), ("counter", "id")];

/// One ledger transaction: a new row, the counter +1, an update of a recent row (its TOAST value
/// unchanged) and, every third time, a delete of an older row. Under `on_conflict = "error"` a
/// duplicated insert or delete is a conflict; a lost or duplicated one changes the counter.
pub fn ledger_txn(i: u64) -> String {
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
pub fn ledger_workload(
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

pub const CATALOGUE: &str = "
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

pub const CATALOGUE_TABLES: &[(&str, &str)] = &[
    ("catentry", "catentry_id"),
    ("catentdesc", "catentry_id, language_id"),
    ("offer", "offer_id, store_id"),
    ("offerprice", "offer_id, store_id, currency"),
];

pub const LANGUAGES: [i32; 6] = [-1, -2, -3, -4, -5, -6];
pub const CURRENCIES: [&str; 6] = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"];
pub const STORES: [i32; 2] = [1, 2];

/// A set with O(1) insert, remove and random pick.
pub struct IndexedSet<T> {
    pub items: Vec<T>,
    pub index: HashMap<T, usize>,
}

impl<T: Copy + Eq + Hash> IndexedSet<T> {
    pub fn new() -> Self {
        IndexedSet {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }

    pub fn insert(&mut self, item: T) {
        if !self.index.contains_key(&item) {
            self.index.insert(item, self.items.len());
            self.items.push(item);
        }
    }

    pub fn remove(&mut self, item: &T) {
        if let Some(i) = self.index.remove(item) {
            self.items.swap_remove(i);
            if i < self.items.len() {
                self.index.insert(self.items[i], i);
            }
        }
    }

    pub fn contains(&self, item: &T) -> bool {
        self.index.contains_key(item)
    }

    pub fn pick(&self, rng: &mut Rng) -> Option<T> {
        (!self.items.is_empty()).then(|| self.items[rng.below(self.items.len() as u64) as usize])
    }
}

/// What staging holds, so that every generated statement is valid (one failure would abort the
/// rest of its psql call and desynchronise the model).
pub struct Catalogue {
    pub rng: Rng,
    pub entries: IndexedSet<i64>,
    pub partnumbers: HashMap<i64, String>,
    pub descs: HashMap<i64, Vec<i32>>,
    pub offers: IndexedSet<(i64, i32)>,
    pub offer_parent: HashMap<(i64, i32), i64>,
    pub offers_of: HashMap<i64, Vec<(i64, i32)>>,
    pub prices: HashMap<(i64, i32), Vec<&'static str>>,
    pub next_id: i64,
    pub next_offer: i64,
    pub serial: u64,
    pub bulk_start: Option<(i64, i64)>,
}

impl Catalogue {
    pub fn new(seed: u64) -> Catalogue {
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

    pub fn serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    // Values, as SQL literals.

    pub fn price(&mut self) -> String {
        if self.rng.percent(10) {
            "NULL".into()
        } else {
            format!("{}.{:02}", self.rng.below(10_000), self.rng.below(100))
        }
    }

    pub fn boolean(&mut self) -> &'static str {
        self.rng.pick(&["NULL", "true", "false"])
    }

    pub fn name(&mut self) -> String {
        let n = self.serial();
        match self.rng.below(10) {
            0 => "NULL".into(),
            1 => format!("'O''Brien \"{n}\" é ü ✓'"),
            2 => format!("E'line one\\nline two {n}\\t\\\\'"),
            _ => format!("'name {n}'"),
        }
    }

    /// NULL, a short text, or a long one (often over 8 KB) that is stored out of line.
    pub fn toast(&mut self) -> String {
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

    pub fn bytea(&mut self) -> String {
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

    pub fn json(&mut self) -> String {
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

    pub fn pick_desc(&mut self) -> Option<(i64, i32)> {
        for _ in 0..8 {
            let id = self.entries.pick(&mut self.rng)?;
            if let Some(languages) = self.descs.get(&id).filter(|l| !l.is_empty()) {
                let l = languages[self.rng.below(languages.len() as u64) as usize];
                return Some((id, l));
            }
        }
        None
    }

    pub fn pick_price(&mut self) -> Option<((i64, i32), &'static str)> {
        for _ in 0..8 {
            let offer = self.offers.pick(&mut self.rng)?;
            if let Some(currencies) = self.prices.get(&offer).filter(|c| !c.is_empty()) {
                let c = currencies[self.rng.below(currencies.len() as u64) as usize];
                return Some((offer, c));
            }
        }
        None
    }

    pub fn free_language(&mut self, id: i64) -> Option<i32> {
        let used = self.descs.get(&id).cloned().unwrap_or_default();
        let free: Vec<i32> = LANGUAGES
            .iter()
            .copied()
            .filter(|l| !used.contains(l))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    pub fn free_currency(&mut self, offer: (i64, i32)) -> Option<&'static str> {
        let used = self.prices.get(&offer).cloned().unwrap_or_default();
        let free: Vec<&'static str> = CURRENCIES
            .iter()
            .copied()
            .filter(|c| !used.contains(c))
            .collect();
        (!free.is_empty()).then(|| self.rng.pick(&free))
    }

    // Model updates.

    pub fn forget_offer(&mut self, offer: (i64, i32)) {
        self.offers.remove(&offer);
        self.prices.remove(&offer);
        if let Some(parent) = self.offer_parent.remove(&offer)
            && let Some(list) = self.offers_of.get_mut(&parent)
        {
            list.retain(|o| *o != offer);
        }
    }

    /// A catentry delete, with what ON DELETE CASCADE takes along.
    pub fn forget_entry(&mut self, id: i64) {
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

    pub fn insert_entry(&mut self, sql: &mut String) {
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

    pub fn insert_desc_for(&mut self, id: i64, sql: &mut String) -> bool {
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

    pub fn insert_offer_for(&mut self, id: i64, sql: &mut String) {
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

    pub fn insert_price_for(&mut self, offer: (i64, i32), sql: &mut String) -> bool {
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

    pub fn random_op(&mut self, sql: &mut String) {
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

    pub fn op(&mut self, op: usize, sql: &mut String) -> bool {
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
    pub fn transaction(&mut self) -> String {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..self.rng.between(1, 6) {
            self.random_op(&mut sql);
        }
        sql.push_str("COMMIT;\n");
        sql
    }

    /// Two catentries swap partnumbers (a unique column) in one transaction, among other changes.
    pub fn swap(&mut self) -> String {
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
    pub fn truncate(&mut self) -> String {
        if self.rng.percent(50) {
            self.prices.clear();
            "BEGIN; TRUNCATE offerprice; COMMIT;\n".into()
        } else {
            self.descs.clear();
            "BEGIN; TRUNCATE catentdesc; COMMIT;\n".into()
        }
    }

    /// 10k-50k rows in one transaction: catentries with a description each.
    pub fn bulk_insert(&mut self) -> String {
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
    pub fn bulk_update(&mut self) -> String {
        "BEGIN;
         UPDATE catentdesc SET name = coalesce(name, '') || '*' WHERE catentry_id % 2 = 0;
         UPDATE catentry SET counter = counter + 1 WHERE catentry_id % 3 = 0;
         COMMIT;\n"
            .into()
    }

    /// A third of the bulk-inserted catentries deleted at once, with their cascades.
    pub fn bulk_delete(&mut self) -> String {
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
