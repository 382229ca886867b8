//! Shared by the integration tests: one staging and one production cluster per test binary,
//! started on first use and removed when the binary exits, plus a fresh database per test.

#![allow(dead_code)]

pub mod faults;
pub mod nats;
pub mod rng;

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;

use stagingprop::cluster::{ClusterOptions, LocalCluster};
use stagingprop::pg::connect::{Endpoint, TlsPolicy};

pub struct Clusters {
    pub staging: LocalCluster,
    pub production: LocalCluster,
}

/// Roles the authentication tests log in as; pg_hba.conf demands the method in the name.
pub const MD5_USER: &str = "md5_user";
pub const SCRAM_USER: &str = "scram_user";
pub const CLEARTEXT_USER: &str = "cleartext_user";
pub const TEST_PASSWORD: &str = "s3cret-'pass\"word";

fn start(name: &str) -> LocalCluster {
    let mut options = ClusterOptions::new(name);
    // Mixed pairs: production on another major than staging (STAGINGPROP_PG_BIN).
    if name == "production" {
        options.bin = std::env::var_os("STAGINGPROP_PRODUCTION_PG_BIN").map(Into::into);
    }
    options.hba = vec![
        format!("host all {MD5_USER} 127.0.0.1/32 md5"),
        format!("host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256"),
        format!("host all {CLEARTEXT_USER} 127.0.0.1/32 password"),
    ];
    let cluster = LocalCluster::start(&options)
        .unwrap_or_else(|e| panic!("cannot start the {name} test cluster: {e}"));
    let password = TEST_PASSWORD.replace('\'', "''");
    cluster
        .psql(
            "postgres",
            &format!(
                "SET password_encryption = 'md5'; \
                 CREATE ROLE {MD5_USER} LOGIN REPLICATION SUPERUSER PASSWORD '{password}'; \
                 SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE {SCRAM_USER} LOGIN REPLICATION SUPERUSER PASSWORD '{password}'; \
                 CREATE ROLE {CLEARTEXT_USER} LOGIN REPLICATION SUPERUSER PASSWORD '{password}';"
            ),
        )
        .unwrap_or_else(|e| panic!("cannot create test roles: {e}"));
    cluster
}

/// The per-binary clusters, started on first use.
pub fn clusters() -> &'static Clusters {
    static CLUSTERS: OnceLock<Clusters> = OnceLock::new();
    CLUSTERS.get_or_init(|| Clusters {
        staging: start("staging"),
        production: start("production"),
    })
}

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
    Cluster::Shared(&clusters().staging)
}

pub fn shared_production() -> Cluster {
    Cluster::Shared(&clusters().production)
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

/// A new, empty database on `cluster` with a name unique in this process.
pub fn fresh_db(cluster: &LocalCluster, prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    cluster
        .psql("postgres", &format!("CREATE DATABASE {name}"))
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    name
}

/// A plaintext endpoint for `dbname` as `user` (no password).
pub fn endpoint(cluster: &LocalCluster, dbname: &str, user: &str) -> Endpoint {
    let pg = cluster
        .conninfo(dbname, user)
        .parse()
        .expect("test conninfo parses");
    Endpoint::new(cluster.name.clone(), pg, TlsPolicy::Disable)
}

/// Runs `sql` on `dbname` through psql and returns its unaligned output.
pub fn psql(cluster: &LocalCluster, dbname: &str, sql: &str) -> String {
    cluster
        .psql(dbname, sql)
        .unwrap_or_else(|e| panic!("psql failed: {e}\nSQL: {sql}"))
}

/// Runs sync until production has what staging had when it started (120 s at most).
pub async fn caught_up(
    config: &stagingprop::config::Config,
) -> Result<stagingprop::sync::SyncSummary, stagingprop::sync::SyncError> {
    let options = stagingprop::sync::SyncOptions {
        stop_at: Some(stagingprop::sync::StopAt::CaughtUp),
        max_attempts: Some(3),
        ..Default::default()
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        stagingprop::sync::run(config, &options, std::future::pending()),
    )
    .await
    .expect("sync did not catch up within 120 s")
}

/// Sync running in the background (three attempts per error) until the returned sender is
/// used or dropped; `span` carries its log lines (e.g. for [`faults::logged_lines`]).
pub fn sync_in_background(
    config: &stagingprop::config::Config,
    span: tracing::Span,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<stagingprop::sync::SyncSummary, stagingprop::sync::SyncError>>,
) {
    use tracing::Instrument;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = config.clone();
    let running = tokio::spawn(async move {
        let options = stagingprop::sync::SyncOptions {
            stop_at: None,
            max_attempts: Some(3),
            ..Default::default()
        };
        stagingprop::sync::run(&config, &options, async move {
            let _ = stopped.await;
        })
        .instrument(span)
        .await
    });
    (stop, running)
}

/// Waits (15 s at most) until a `tail` of `dbname` has created its temporary slot, after which
/// it sees every change.
pub async fn wait_for_tail_slot(cluster: &LocalCluster, dbname: &str) {
    for _ in 0..300 {
        let slots = psql(
            cluster,
            dbname,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'stagingprop_tail_%' AND database = current_database()",
        );
        if slots.trim() == "1" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("tail did not create its slot within 15 s");
}

/// What `dir` holds: every file's path under it and its content in hex, sorted.
pub fn published(dir: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let hex: String = std::fs::read(&path)
                    .unwrap()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let name = path.strip_prefix(root).unwrap().to_string_lossy();
                out.push(format!("{name}|{hex}"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A staging and a production database with the same schema, and a config that manages some
/// of their tables: built by [`PairBuilder`].
pub struct Pair {
    pub staging: String,
    pub production: String,
    /// The config file's text (for tests that run the binary).
    pub text: String,
    pub config: stagingprop::config::Config,
    pub staging_cluster: Cluster,
    pub production_cluster: Cluster,
}

/// Builds a [`Pair`]: `schema` on both sides, each managed table with its own TOML lines, and
/// `[sync]` settings beyond the defaults (slot and publication are named after `prefix`).
pub struct PairBuilder {
    prefix: String,
    schema: String,
    tables: Vec<(String, String)>,
    sync: String,
    production_user: String,
    extra: String,
    /// Where the two databases are made: the binary's shared clusters unless set.
    on: Option<(Cluster, Cluster)>,
}

impl PairBuilder {
    pub fn new(prefix: &str, schema: &str) -> Self {
        PairBuilder {
            prefix: prefix.to_owned(),
            schema: schema.to_owned(),
            tables: Vec::new(),
            sync: String::new(),
            production_user: "postgres".into(),
            extra: String::new(),
            on: None,
        }
    }

    /// Makes the databases on these clusters (a test's own, which it may stop or kill).
    pub fn on(mut self, staging: Cluster, production: Cluster) -> Self {
        self.on = Some((staging, production));
        self
    }

    /// Manages `name` with the extra `[[tables]]` lines `rules` (e.g. `on_conflict = "skip"`).
    pub fn table(mut self, name: &str, rules: &str) -> Self {
        self.tables.push((name.to_owned(), rules.to_owned()));
        self
    }

    /// Extra `[sync]` lines.
    pub fn sync(mut self, lines: &str) -> Self {
        self.sync.push_str(lines);
        self.sync.push('\n');
        self
    }

    /// TOML appended after the tables (e.g. `[scopes.NAME]` sections).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn production_user(mut self, user: &str) -> Self {
        self.production_user = user.to_owned();
        self
    }

    pub fn build(self) -> Pair {
        let (staging_cluster, production_cluster) = self
            .on
            .clone()
            .unwrap_or_else(|| (shared_staging(), shared_production()));
        let staging = fresh_db(&staging_cluster, &self.prefix);
        let production = fresh_db(&production_cluster, &self.prefix);
        psql(&staging_cluster, &staging, &self.schema);
        psql(&production_cluster, &production, &self.schema);
        let mut text = format!(
            "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n\
             [production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
             [sync]\nslot = \"{prefix}\"\npublication = \"{prefix}\"\nheartbeat_interval_secs = 1\n{sync}",
            staging_cluster.conninfo(&staging, "postgres"),
            production_cluster.conninfo(&production, &self.production_user),
            prefix = self.prefix,
            sync = self.sync,
        );
        for (name, rules) in &self.tables {
            text.push_str(&format!("[[tables]]\nname = \"{name}\"\n{rules}\n"));
        }
        text.push_str(&self.extra);
        let config = stagingprop::config::Config::from_toml_str(&text, "test")
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        Pair {
            staging,
            production,
            text,
            config,
            staging_cluster,
            production_cluster,
        }
    }

    /// Builds the pair and runs `init` on it.
    pub async fn init(self) -> Pair {
        let pair = self.build();
        stagingprop::ops::init::init(&pair.config, &Default::default())
            .await
            .expect("init");
        pair
    }
}

impl Pair {
    /// Runs `sql` on staging.
    pub fn on_staging(&self, sql: &str) -> String {
        psql(&self.staging_cluster, &self.staging, sql)
    }

    /// Runs `sql` on production.
    pub fn on_production(&self, sql: &str) -> String {
        psql(&self.production_cluster, &self.production, sql)
    }
}

/// A scratch directory for one test's files, removed at the end.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("stagingprop-{name}-{}", std::process::id()));
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

impl Pair {
    /// Writes the pair's config into `dir`; its path.
    pub fn write_config(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("stagingprop.toml");
        std::fs::write(&path, &self.text).unwrap();
        path
    }
}

/// Runs the stagingprop binary with `--config config` and `args`: (exit code, stdout, stderr).
pub fn stagingprop(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run stagingprop");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `init` without the sync slot: what a test runs before `copy`, which creates the slot and
/// takes its snapshot from it.
pub async fn init_without_slot(
    config: &stagingprop::config::Config,
) -> stagingprop::ops::init::InitReport {
    let options = stagingprop::ops::init::InitOptions {
        create_slot: false,
        ..Default::default()
    };
    stagingprop::ops::init::init(config, &options)
        .await
        .expect("init")
}

/// GET /metrics on a loopback port, the plain way a Prometheus scrape does.
pub fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    socket.read_to_string(&mut response).ok()?;
    Some(response)
}
