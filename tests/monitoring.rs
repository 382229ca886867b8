//! Monitoring for real: a Prometheus (Debian's `prometheus`, or `STAGINGPROP_PROMETHEUS`) scrapes
//! two syncs under load, one with the spool and one without (streamed transactions, a managed-file
//! table, conflicts quarantined), and evaluates `monitoring/alerts.yml`. Every series the Grafana
//! dashboard and the rules query that a sync records exists in Prometheus, and the lag alert
//! fires once a production is stopped. (The series `copy` and the fan-out commands record are
//! checked against the code by `tests/docs.rs`: a sync does not record them.) The rules run with
//! their `for:` durations and the lag threshold scaled down, so the test ends in a minute.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use support::faults::{Cluster, PairBuilder, dedicated, shared_staging};
use support::{Scratch, stagingprop as run};

const BIN: &str = env!("CARGO_BIN_EXE_stagingprop");

fn tool(env: &str, name: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| PathBuf::from(name), PathBuf::from)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_alerting_rules_are_valid() {
    let out = Command::new(tool("STAGINGPROP_PROMTOOL", "promtool"))
        .arg("check")
        .arg("rules")
        .arg(root().join("monitoring/alerts.yml"))
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names the dashboard's and the rules' expressions read.
fn queried_metrics() -> BTreeSet<String> {
    let dashboard: Json = serde_json::from_str(
        &std::fs::read_to_string(root().join("monitoring/grafana/dashboards/stagingprop.json"))
            .unwrap(),
    )
    .unwrap();
    let mut expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    let rules = std::fs::read_to_string(root().join("monitoring/alerts.yml")).unwrap();
    expressions.extend(
        rules
            .lines()
            .filter_map(|l| l.trim().strip_prefix("expr:"))
            .map(str::to_owned),
    );
    let mut names = BTreeSet::new();
    for expression in expressions {
        for word in expression.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(metric) = word.strip_prefix("stagingprop_") {
                names.insert(format!("stagingprop_{metric}"));
            }
        }
    }
    names
}

/// Metrics only `copy`, `publish` or a `sync --from-stream` record.
fn recorded_elsewhere(metric: &str) -> bool {
    metric.starts_with("stagingprop_copy_") || metric.starts_with("stagingprop_stream_")
}

/// A GET of Prometheus's HTTP API; the JSON `data`.
fn api(port: u16, path_and_query: &str) -> Option<Json> {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    socket
        .write_all(
            format!(
                "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    socket.read_to_string(&mut response).ok()?;
    let body = response.split_once("\r\n\r\n")?.1;
    // Chunked or not, the JSON object is the first `{` to the last `}`.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let value: Json = serde_json::from_str(json).ok()?;
    (value["status"] == "success").then(|| value["data"].clone())
}

fn query(port: u16, promql: &str) -> Vec<Json> {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    api(port, &format!("/api/v1/query?query={encoded}"))
        .and_then(|d| d["result"].as_array().cloned())
        .unwrap_or_default()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_sync(config: &std::path::Path, port: u16, log: &std::path::Path) -> Killed {
    Killed(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(["--metrics-listen", &format!("127.0.0.1:{port}"), "sync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, v text);
CREATE TABLE page (path text PRIMARY KEY, body bytea);
ALTER TABLE page REPLICA IDENTITY FULL;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_every_series_and_the_lag_alert_fires_when_production_stops() {
    let scratch = Scratch::new("monitoring");
    let files = scratch.0.join("files");
    // With the spool, on the binary's shared clusters.
    let spooled = PairBuilder::new("mon_spooled", SCHEMA)
        .table("public.item", "")
        .extra(&format!(
            "[spool]\ndir = \"{}\"\n",
            scratch.0.join("spool").display()
        ))
        .build();
    // Without it, onto a production of its own that the test stops: large transactions streamed,
    // managed files, conflicts quarantined.
    let [production] = dedicated(["mon_production"]);
    let direct = PairBuilder::new("mon_direct", SCHEMA)
        .on(shared_staging(), Cluster::clone(&production))
        .table("public.item", "on_conflict = \"skip\"")
        .table(
            "public.page",
            &format!(
                "files = {{ dir = \"{}\", path_column = \"path\", content_column = \"body\" }}",
                files.display()
            ),
        )
        .build();
    direct.on_staging(&format!(
        "ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'",
        direct.staging
    ));
    let mut targets = Vec::new();
    let mut syncs = Vec::new();
    for (name, pair) in [("spooled", &spooled), ("direct", &direct)] {
        let dir = scratch.0.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = pair.write_config(&dir);
        let (code, out, err) = run(&config, &["init"]);
        assert_eq!(code, 0, "{out}{err}");
        let port = stagingprop::cluster::free_port().unwrap();
        syncs.push(spawn_sync(&config, port, &dir.join("sync.log")));
        targets.push(format!("\"127.0.0.1:{port}\""));
    }
    // A row production has already: staging's insert of it is quarantined.
    direct.on_production("INSERT INTO item VALUES (-1, 'production-born')");

    // Prometheus, every second, with the rules scaled down in time.
    let rules = std::fs::read_to_string(root().join("monitoring/alerts.yml"))
        .unwrap()
        .replace("for: 2m", "for: 0s")
        .replace("for: 5m", "for: 0s")
        .replace("for: 15m", "for: 0s")
        .replace(
            "stagingprop_lag_seconds > 300",
            "stagingprop_lag_seconds > 3",
        );
    let rules_path = scratch.0.join("alerts.yml");
    std::fs::write(&rules_path, rules).unwrap();
    let prometheus_config = scratch.0.join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: stagingprop\n    static_configs:\n      - targets: [{}]\n",
            rules_path.display(),
            targets.join(", ")
        ),
    )
    .unwrap();
    let prometheus_port = stagingprop::cluster::free_port().unwrap();
    let _prometheus = Killed(
        Command::new(tool("STAGINGPROP_PROMETHEUS", "prometheus"))
            .arg(format!("--config.file={}", prometheus_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.0.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package; scripts/test.sh installs it)"),
    );

    // Load on both: small transactions, a large one that staging streams, files, a conflict.
    let load = |round: u32| {
        let sql = format!(
            "INSERT INTO item SELECT g, 'v' FROM generate_series({a}, {b}) g;
             UPDATE item SET v = 'u{round}' WHERE id BETWEEN {a} AND {b};
             INSERT INTO page VALUES ('/p{round}.html', 'page {round}');",
            a = round * 100 + 1,
            b = round * 100 + 50
        );
        spooled.on_staging(&sql);
        direct.on_staging(&sql);
    };
    direct.on_staging("INSERT INTO item VALUES (-1, 'staging')");
    direct.on_staging(
        "INSERT INTO item SELECT g, repeat('x', 200) FROM generate_series(100000, 120000) g",
    );
    let wanted: BTreeSet<String> = queried_metrics()
        .into_iter()
        .filter(|m| !recorded_elsewhere(m))
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut round = 0;
    let mut missing = wanted.clone();
    let mut stopped = false;
    while !missing.is_empty() && Instant::now() < deadline {
        round += 1;
        load(round);
        tokio::time::sleep(Duration::from_millis(500)).await;
        missing.retain(|metric| {
            // Histograms are queried by their buckets.
            query(
                prometheus_port,
                &format!("{{__name__=~\"{metric}(_bucket)?\"}}"),
            )
            .is_empty()
        });
        // The retries series appears once a sync retried: stop the direct production when the
        // rest is there.
        if !stopped && missing.iter().all(|m| m == "stagingprop_retries_total") {
            production.stop_server("fast").expect("stop production");
            stopped = true;
        }
    }
    if !stopped {
        production.stop_server("fast").expect("stop production");
    }
    assert!(
        missing.is_empty(),
        "series the dashboard or the rules query and no sync recorded within 90 s: {missing:?}"
    );

    // Production stopped while staging keeps changing: the lag alert fires.
    let deadline = Instant::now() + Duration::from_secs(60);
    let fired = loop {
        round += 1;
        load(round);
        let alerts = query(
            prometheus_port,
            "ALERTS{alertname=\"StagingpropLagHigh\",alertstate=\"firing\"}",
        );
        if !alerts.is_empty() {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let lag = query(prometheus_port, "stagingprop_lag_seconds");
    assert!(
        fired,
        "StagingpropLagHigh did not fire within 60 s of production stopping; lag: {lag:?}"
    );
    drop(syncs);
}
