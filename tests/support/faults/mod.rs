//! The fault tests' harness: a database pair on shared or dedicated clusters with its config
//! file and init done (optionally with key rules), the binary run as a child that can be
//! killed (`binary.rs`), log capture (`logs.rs`), and the two workloads whose every change shows
//! when lost or applied twice (`ledger.rs`, and `catalogue.rs`, a randomized catalogue with
//! descriptions, offers and prices).

mod binary;
mod catalogue;
mod ledger;
mod logs;

use std::collections::HashMap;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use stagingprop::cluster::ClusterError;
use stagingprop::config::Config;
use stagingprop::ops::init::{InitOptions, init};

// What the fault tests take with `use support::faults::*` (not every test binary uses all).
#[allow(unused_imports)]
pub use super::rng::{Rng, test_seed};
#[allow(unused_imports)]
pub use super::{Cluster, PairBuilder, Scratch, dedicated, shared_production, shared_staging};
#[allow(unused_imports)]
pub use {binary::*, catalogue::*, ledger::*, logs::*};

pub const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

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
    let mut builder = PairBuilder::new(prefix, schema)
        .on(staging, production)
        .sync(&format!("status_interval_secs = 1\n{extra_sync}"));
    for (table, _) in tables {
        let rule = remapping
            .and_then(|r| r.rules.iter().find(|(t, _)| t == table))
            .map_or("", |(_, rule)| rule);
        builder = builder.table(
            &format!("public.{table}"),
            &format!("on_conflict = \"error\"\n{rule}"),
        );
    }
    let pair = builder.build();
    if let Some(remapping) = remapping {
        pair.on_production(remapping.production_sql);
    }
    let scratch = Scratch::new(prefix);
    let config_path = pair.write_config(&scratch.0);
    init(&pair.config, &InitOptions::default())
        .await
        .expect("init");
    FaultPair {
        staging: Db {
            cluster: pair.staging_cluster,
            name: pair.staging,
        },
        production: Db {
            cluster: pair.production_cluster,
            name: pair.production,
        },
        slot: prefix.to_owned(),
        tables: tables.to_vec(),
        config: pair.config,
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
