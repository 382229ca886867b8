//! Staging fails over to its standby (PostgreSQL 17+): the slot is a failover slot, the standby
//! synchronizes it (`sync_replication_slots`), the primary holds logical decoding back for the
//! standby (`synchronized_standby_slots`), and sync's staging connection lists both servers with
//! `target_session_attrs=read-write`. The primary is killed under load and the standby promoted:
//! sync reconnects to it and production ends equal to the promoted staging, every acknowledged
//! row once.
//!
//! Needs PostgreSQL 17 or later: `STAGINGPROP_FAILOVER_PG_BIN`, `STAGINGPROP_PG_BIN` when it is
//! 17+, or what `scripts/pg-majors.sh 17` put in its cache.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stagingprop::cluster::{ClusterOptions, LocalCluster};
use support::{Scratch, stagingprop};

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

fn major_of(bin: &Path) -> Option<u32> {
    let out = Command::new(bin.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
}

/// The server binaries of PostgreSQL 17 or later.
fn pg17_bin() -> PathBuf {
    let cache = std::env::var_os("STAGINGPROP_PG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/stagingprop/pg")
        });
    let candidates = [
        std::env::var_os("STAGINGPROP_FAILOVER_PG_BIN").map(PathBuf::from),
        std::env::var_os("STAGINGPROP_PG_BIN").map(PathBuf::from),
        Some(cache.join("17/bin")),
        Some(cache.join("18/bin")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|bin| bin.join("initdb").is_file() && major_of(bin).is_some_and(|m| m >= 17))
        .unwrap_or_else(|| {
            panic!(
                "the failover test needs PostgreSQL 17 or later server binaries: run \
                 scripts/pg-majors.sh 17, or set STAGINGPROP_FAILOVER_PG_BIN"
            )
        })
}

fn psql(cluster: &LocalCluster, db: &str, sql: &str) -> String {
    cluster
        .psql(db, sql)
        .unwrap_or_else(|e| panic!("on {}: {sql}: {e}", cluster.name))
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Inserts rows one transaction each into `t` on whichever server is primary, counting from
/// `first`, until stopped; returns the ids whose commit was acknowledged.
fn writer(
    port: Arc<std::sync::atomic::AtomicU16>,
    first: i64,
    stop: Arc<AtomicBool>,
    bin: PathBuf,
) -> Vec<i64> {
    let mut acknowledged = Vec::new();
    let mut id = first;
    while !stop.load(Ordering::SeqCst) {
        let out = Command::new(bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "shop",
            ])
            .arg("-p")
            .arg(port.load(Ordering::SeqCst).to_string())
            .args(["-c", &format!("INSERT INTO t VALUES ({id}, 'row {id}')")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() {
            acknowledged.push(id);
            id += 1;
        } else {
            // The primary is gone or not yet promoted: the same id again later.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    acknowledged
}

fn ids(cluster: &LocalCluster, db: &str) -> Vec<i64> {
    psql(cluster, db, "SELECT id FROM t ORDER BY id")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

fn spawn_sync(config: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("sync")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("spawn stagingprop sync")
}

#[test]
fn sync_continues_on_a_promoted_standby_with_nothing_lost_or_doubled() {
    let bin = pg17_bin();
    // Every cluster of this test binary comes from these binaries.
    unsafe { std::env::set_var("STAGINGPROP_PG_BIN", &bin) };
    let deadline = Instant::now() + Duration::from_secs(240);

    let primary = LocalCluster::start(&ClusterOptions::new("fo-primary")).expect("primary");
    let production =
        LocalCluster::start(&ClusterOptions::new("fo-production")).expect("production");
    psql(&primary, "postgres", "CREATE DATABASE shop");
    psql(&production, "postgres", "CREATE DATABASE shop");
    let schema = "CREATE TABLE t (id bigint PRIMARY KEY, note text)";
    psql(&primary, "shop", schema);
    psql(&production, "shop", schema);

    let standby = primary
        .start_standby(
            "fo_standby",
            "fo_standby_slot",
            &["sync_replication_slots = on".into()],
        )
        .expect("standby");
    psql(
        &primary,
        "postgres",
        "ALTER SYSTEM SET synchronized_standby_slots = 'fo_standby_slot'",
    );
    // Commits wait for the standby, so an acknowledged row survives the failover.
    psql(
        &primary,
        "postgres",
        "ALTER SYSTEM SET synchronous_standby_names = 'fo_standby'",
    );
    psql(&primary, "postgres", "SELECT pg_reload_conf()");

    let scratch = Scratch::new("failover");
    let config = scratch.0.join("stagingprop.toml");
    std::fs::write(
        &config,
        format!(
            "[staging]\nurl = \"host=127.0.0.1,127.0.0.1 port={},{} dbname=shop user=postgres \
                 target_session_attrs=read-write connect_timeout=5\"\nsslmode = \"disable\"\n\
                 [production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
                 [sync]\nslot = \"fo\"\npublication = \"fo\"\nheartbeat_interval_secs = 1\n\
                 receive_timeout_secs = 10\nfailover = true\n\
                 [[tables]]\nname = \"public.t\"\n",
            primary.port,
            standby.port,
            production.conninfo("shop", "postgres")
        ),
    )
    .unwrap();

    // The slot is created as a failover slot, and status follows it to the standby.
    let (code, out, err) = stagingprop(&config, &["init"]);
    assert_eq!(code, 0, "init:\n{out}{err}");
    assert_eq!(
        psql(
            &primary,
            "postgres",
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'fo'"
        )
        .trim(),
        "t"
    );
    let log = scratch.0.join("sync.log");
    let mut sync = spawn_sync(&config, &log);

    let port = Arc::new(std::sync::atomic::AtomicU16::new(primary.port));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = {
        let (port, stop, bin) = (port.clone(), stop.clone(), bin.clone());
        std::thread::spawn(move || writer(port, 1, stop, bin))
    };

    // The standby holds the slot once the primary's slot has moved past what it has.
    wait_for(
        "the slot synchronized to the standby",
        Duration::from_secs(90),
        || {
            psql(
            &standby,
            "postgres",
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'fo' AND synced AND NOT temporary",
        )
        .trim()
            == "1"
        },
    );
    let (code, out, err) = stagingprop(&config, &["status"]);
    assert!(
        out.contains(&format!(
            "standby 127.0.0.1:{}: slot synchronized",
            standby.port
        )),
        "status shows the synchronized slot (exit {code}):\n{out}{err}"
    );
    assert!(out.contains("failover slot: yes"), "{out}");
    wait_for(
        "rows applied before the failover",
        Duration::from_secs(60),
        || ids(&production, "shop").len() >= 20,
    );

    // The primary dies under load; the standby takes over.
    primary.kill_postmaster().expect("kill the primary");
    standby.promote().expect("promote the standby");
    port.store(standby.port, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    let acknowledged = writing.join().unwrap();
    assert!(
        acknowledged.len() > 20,
        "the workload ran: {acknowledged:?}"
    );

    // Sync found the promoted standby and carries everything it has.
    let expected = ids(&standby, "shop");
    wait_for(
        "production to equal the promoted staging",
        deadline - Instant::now(),
        || ids(&production, "shop") == expected,
    );
    let missing: Vec<i64> = acknowledged
        .iter()
        .copied()
        .filter(|id| !expected.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged rows lost in the failover: {missing:?}"
    );
    Command::new("kill")
        .args(["-TERM", &sync.id().to_string()])
        .status()
        .unwrap();
    let status = sync.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(0), "sync:\n{text}");
    assert!(
        text.contains("retrying") && text.matches("applying staging's stream").count() >= 2,
        "sync's log says it lost staging and went on with the promoted standby:\n{text}"
    );
    // Exactly once: the key would have refused a second copy, and nothing was skipped.
    assert_eq!(
        psql(
            &production,
            "shop",
            "SELECT count(*), count(DISTINCT id) FROM t"
        )
        .trim(),
        format!("{0}|{0}", expected.len())
    );
}
