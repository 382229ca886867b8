//! `stagingprop demo`: the whole product on one machine with nothing but the PostgreSQL server
//! binaries: two throwaway clusters, a sample catalogue on staging, `copy` to seed production,
//! `sync` while a small generator edits staging, live lag and throughput, then `verify`. The
//! clusters are removed at the end (also on Ctrl-C).

use std::future::Future;
use std::time::{Duration, Instant};

use super::OpsError;
use super::init::{InitOptions, init};
use super::status::{Thresholds, status};
use super::verify::{VerifyOptions, render, verify};
use crate::cluster::{ClusterOptions, LocalCluster};
use crate::config::Config;
use crate::copy::{CopyOptions, Side, copy};
use crate::sync::{self, SyncOptions};

/// The demo's sample catalogue: categories, products, descriptions, category relations, offers
/// and prices, linked by foreign keys.
pub const CATALOGUE: &str = "
CREATE TABLE category (category_id bigint PRIMARY KEY, identifier varchar(64) NOT NULL UNIQUE, name text NOT NULL);
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber varchar(64) NOT NULL UNIQUE,
  published boolean NOT NULL DEFAULT true, attrs jsonb, lastupdate timestamptz NOT NULL DEFAULT now());
CREATE TABLE catentdesc (catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE,
  language_id int NOT NULL, name varchar(128), longdescription text, PRIMARY KEY (catentry_id, language_id));
CREATE TABLE catgpenrel (category_id bigint NOT NULL REFERENCES category, catentry_id bigint NOT NULL
  REFERENCES catentry ON DELETE CASCADE, sequence int NOT NULL DEFAULT 0, PRIMARY KEY (category_id, catentry_id));
CREATE TABLE offer (offer_id bigint PRIMARY KEY, catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE,
  published boolean NOT NULL DEFAULT true, merchant_note text NOT NULL DEFAULT '');
CREATE TABLE offerprice (offer_id bigint NOT NULL REFERENCES offer ON DELETE CASCADE, currency char(3) NOT NULL,
  price numeric(20,5) NOT NULL, PRIMARY KEY (offer_id, currency));
";

const TABLES: [&str; 6] = [
    "category",
    "catentry",
    "catentdesc",
    "catgpenrel",
    "offer",
    "offerprice",
];

/// Rows for [`CATALOGUE`].
pub const SEED: &str = "
INSERT INTO category SELECT g, 'CAT-' || g, 'Category ' || g FROM generate_series(1, 50) g;
INSERT INTO catentry SELECT g, 'PN-' || g, true, jsonb_build_object('color', (ARRAY['red','green','blue'])[1 + g % 3], 'size', g % 40)
  FROM generate_series(1, 5000) g;
INSERT INTO catentdesc SELECT g, l, 'Product ' || g, repeat('A fine product. ', 5 + g % 200)
  FROM generate_series(1, 5000) g, generate_series(-2, -1) l;
INSERT INTO catgpenrel SELECT 1 + g % 50, g, g % 10 FROM generate_series(1, 5000) g;
INSERT INTO offer SELECT g, g, true FROM generate_series(1, 5000) g;
INSERT INTO offerprice SELECT g, c, 10 + (g % 500) + 0.99 FROM generate_series(1, 5000) g, unnest(ARRAY['USD','EUR']) c;
";

/// One round of merchandiser edits: price changes, description edits, a new product with its
/// description, offer and prices, and an occasional delete.
fn edits(round: u64) -> String {
    let id = 100_000 + round;
    let mut sql = format!(
        "UPDATE offerprice SET price = price * 1.01 WHERE offer_id % 97 = {m};
         UPDATE catentdesc SET name = name || '*' WHERE catentry_id = {d} AND language_id = -1;
         INSERT INTO catentry (catentry_id, partnumber, attrs) VALUES ({id}, 'NEW-{id}', '{{\"new\": true}}');
         INSERT INTO catentdesc VALUES ({id}, -1, 'New product {id}', 'Just arrived.');
         INSERT INTO catgpenrel VALUES ({c}, {id}, 0);
         INSERT INTO offer VALUES ({id}, {id}, true);
         INSERT INTO offerprice VALUES ({id}, 'USD', 19.99), ({id}, 'EUR', 18.99);",
        m = round % 97,
        d = 1 + round % 5000,
        c = 1 + round % 50,
    );
    if round % 5 == 4 {
        sql.push_str(&format!(
            "DELETE FROM catentry WHERE catentry_id = {};",
            1 + (round * 37) % 5000
        ));
    }
    sql
}

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub duration: Duration,
}

/// What the demo ends with.
#[derive(Clone, Debug)]
pub struct DemoOutcome {
    pub verified: bool,
    pub edit_rounds: u64,
}

fn say(line: impl AsRef<str>) {
    println!("{}", line.as_ref());
}

fn cluster_error(e: crate::cluster::ClusterError) -> OpsError {
    OpsError::Refused(e.to_string())
}

pub async fn demo<S>(options: &DemoOptions, interrupt: S) -> Result<DemoOutcome, OpsError>
where
    S: Future<Output = ()>,
{
    tokio::pin!(interrupt);
    say("stagingprop demo: two throwaway PostgreSQL clusters on this machine, removed at the end.");
    let started = Instant::now();
    let staging =
        LocalCluster::start(&ClusterOptions::new("demo-staging")).map_err(cluster_error)?;
    let production =
        LocalCluster::start(&ClusterOptions::new("demo-production")).map_err(cluster_error)?;
    say(format!(
        "1. started staging on port {} and production on port {} ({:.1} s)",
        staging.port,
        production.port,
        started.elapsed().as_secs_f64()
    ));
    for cluster in [&staging, &production] {
        cluster
            .psql("postgres", "CREATE DATABASE shop")
            .map_err(cluster_error)?;
        cluster.psql("shop", CATALOGUE).map_err(cluster_error)?;
    }
    staging.psql("shop", SEED).map_err(cluster_error)?;
    say(
        "2. loaded a sample catalogue on staging: 50 categories, 5,000 products with descriptions, category relations, offers and prices",
    );

    let mut text = format!(
        "[staging]\nurl = \"{}\"\nsslmode = \"disable\"\n[production]\nurl = \"{}\"\nsslmode = \"disable\"\n\
         [sync]\nslot = \"stagingprop_demo\"\npublication = \"stagingprop_demo\"\nheartbeat_interval_secs = 2\n",
        staging.conninfo("shop", "postgres"),
        production.conninfo("shop", "postgres")
    );
    for table in TABLES {
        text.push_str(&format!("[[tables]]\nname = \"public.{table}\"\n"));
        // Merchants write offer.merchant_note on production: staging manages the rest of offer.
        if table == "offer" {
            text.push_str("exclude_columns = [\"merchant_note\"]\n");
        }
    }
    let config =
        Config::from_toml_str(&text, "demo").map_err(|e| OpsError::Refused(e.to_string()))?;
    init(
        &config,
        &InitOptions {
            create_slot: false,
            ..InitOptions::default()
        },
    )
    .await?;
    say(
        "3. init: checked both databases, created the publication and stagingprop's schema on production",
    );

    let report = copy(&config, &CopyOptions::new(Side::Staging, Side::Production))
        .await
        .map_err(|e| OpsError::Refused(e.to_string()))?;
    let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
    say(format!(
        "4. copy: {} tables, {rows} rows from one consistent snapshot; sync will start at {}",
        report.tables.len(),
        report.handoff.map(|l| l.to_string()).unwrap_or_default()
    ));

    let (stop_sync_tx, stop_sync_rx) = tokio::sync::oneshot::channel::<()>();
    let sync_config = config.clone();
    let sync_task = tokio::spawn(async move {
        let stop = async {
            let _ = stop_sync_rx.await;
        };
        sync::run(&sync_config, &SyncOptions::default(), stop).await
    });
    say(format!(
        "5. sync is running; a generator edits staging for {} s (Ctrl-C to stop early):",
        options.duration.as_secs()
    ));

    let shop = crate::pg::connect::Endpoint::from_db_config(&config.staging)?;
    let editor = super::connect(&shop).await?;
    let production_endpoint = crate::pg::connect::Endpoint::from_db_config(&config.production)?;
    let counter = super::connect(&production_endpoint).await?;
    let applied_rows = || async {
        counter
            .query_one(
                "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = 'public'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    let mut last_rows = applied_rows().await;
    let mut last_tick = Instant::now();
    let mut round = 0u64;
    let deadline = Instant::now() + options.duration;
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let mut interrupted = false;
    while Instant::now() < deadline {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut interrupt => {
                interrupted = true;
                break;
            }
        }
        editor
            .batch_execute(&edits(round))
            .await
            .map_err(super::query_error(&shop, "editing the catalogue"))?;
        counter
            .batch_execute(&format!(
                "UPDATE offer SET merchant_note = 'merchant edit {round}' WHERE offer_id = {}",
                1 + round % 5000
            ))
            .await
            .map_err(super::query_error(
                &production_endpoint,
                "a merchant's edit",
            ))?;
        round += 1;
        if last_tick.elapsed() >= Duration::from_secs(2) {
            let st = status(&config, &Thresholds::default()).await?;
            let now_rows = applied_rows().await;
            let rate = (now_rows - last_rows) as f64 / last_tick.elapsed().as_secs_f64();
            last_rows = now_rows;
            last_tick = Instant::now();
            say(format!(
                "   {:>4.0} s  {round:>5} edit transactions on staging  lag {:>7} bytes / {:>4.1} s  production applies {:>6.0} rows/s",
                started.elapsed().as_secs_f64(),
                st.lag_bytes.unwrap_or(0),
                st.lag_seconds.unwrap_or(0.0),
                rate
            ));
        }
    }
    if interrupted {
        say("   interrupted: finishing up");
    }

    // Let sync catch up, then stop it cleanly and compare.
    let catch_up = Instant::now();
    loop {
        let st = status(&config, &Thresholds::default()).await?;
        if st.lag_bytes.is_some_and(|b| b < 1024) || catch_up.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_sync_tx.send(());
    let summary = sync_task
        .await
        .map_err(|e| OpsError::Refused(format!("sync task failed: {e}")))?
        .map_err(|e| OpsError::Refused(e.to_string()))?;
    say(format!(
        "6. sync stopped after applying {} staging transactions ({} rows inserted, {} updated, {} deleted)",
        summary.stats.transactions,
        summary.stats.rows_inserted,
        summary.stats.rows_updated,
        summary.stats.rows_deleted
    ));
    let kept: i64 = counter
        .query_one(
            "SELECT count(*) FROM offer WHERE merchant_note LIKE 'merchant edit %'",
            &[],
        )
        .await
        .map_err(super::query_error(
            &production_endpoint,
            "counting merchant edits",
        ))?
        .get(0);
    say(format!(
        "   offer is managed in part: merchants edited merchant_note of {kept} offers on production meanwhile, and sync wrote none of them (it manages offer's other columns)"
    ));
    let diffs = verify(&config, &VerifyOptions::default()).await?;
    let verified = diffs.iter().all(|d| d.matches());
    say("7. verify, table by table:");
    for line in render(&diffs).lines() {
        say(format!("   {line}"));
    }
    say(if verified {
        "verify: match. Production equals staging after copy and live sync. Removing the clusters."
    } else {
        "verify: DIFFERENCES found (see above). Removing the clusters."
    });
    drop(editor);
    drop(counter);
    drop(staging);
    drop(production);
    Ok(DemoOutcome {
        verified,
        edit_rounds: round,
    })
}
