//! Online repair: `verify --repair` makes production's drifted chunks equal to staging's while
//! sync runs, through watermarks in staging's WAL, exactly once, across kills of sync and of the
//! repair itself; rows the guard recorded as production's own edits are kept.

mod support;

use std::time::{Duration, Instant};

use support::{Pair, PairBuilder, caught_up, clusters, endpoint, psql, stagingprop};

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, price numeric(10,2) NOT NULL, name text);
CREATE TABLE price (item_id int, currency text, amount numeric(12,4), doc json,
                    PRIMARY KEY (item_id, currency));
CREATE TABLE tag (code text PRIMARY KEY, label text);
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL, name text);
CREATE SEQUENCE catentry_seq START 1000000;";

/// Production's own catalogue entries, under keys staging uses too (the fault test).
const BORN: &str = "INSERT INTO catentry VALUES (5, 'prod-5', 'born'), (6, 'prod-6', 'born'), (7, 'prod-7', 'born')";
const BORN_ROWS: &str = "SELECT * FROM catentry WHERE partnumber LIKE 'prod-%' ORDER BY 1";

const SEED: &str = "
INSERT INTO item SELECT g, g, 'item ' || g FROM generate_series(1, 3000) g;
INSERT INTO price SELECT g, c, g * 1.5, '{\"n\": 1}' FROM generate_series(1, 1500) g, unnest(ARRAY['EUR', 'USD']) c;
INSERT INTO tag SELECT 'tag-' || g, 'label ' || g FROM generate_series(1, 800) g;";

/// Drift made on production by someone else: rows deleted, changed and added in each table.
const DRIFT: &str = "
DELETE FROM item WHERE id % 97 = 3;
UPDATE item SET price = price + 1000, name = 'drifted' WHERE id % 89 = 5;
INSERT INTO item SELECT g, 1, 'production only' FROM generate_series(5001, 5040) g;
DELETE FROM price WHERE item_id % 71 = 1 AND currency = 'USD';
UPDATE price SET amount = -1, doc = '{\"drift\": true}' WHERE item_id % 53 = 2;
INSERT INTO price VALUES (9999, 'GBP', 1, NULL);
DELETE FROM tag WHERE code LIKE 'tag-1_';
UPDATE tag SET label = NULL WHERE code LIKE 'tag-7%';
INSERT INTO tag VALUES ('zzz-only-here', 'extra');";

/// The three tables, item's with the extra lines `item` and every table's with `all`.
fn pair(prefix: &str, item: &str, all: &str) -> Pair {
    PairBuilder::new(prefix, SCHEMA)
        .sync("batch_max_rows = 200")
        .table("public.item", &format!("{item}\n{all}"))
        .table("public.price", all)
        .table("public.tag", all)
        .build()
}

async fn differing_tables(p: &Pair) -> Vec<String> {
    let options = stagingprop::ops::verify::VerifyOptions {
        chunk_rows: 250,
        ..Default::default()
    };
    stagingprop::ops::verify::verify(&p.config, &options)
        .await
        .expect("verify")
        .into_iter()
        .filter(|d| !d.matches())
        .map(|d| format!("{d:?}"))
        .collect()
}

/// Runs the statement `next` makes, each in its own staging transaction, until told to stop;
/// how many committed.
async fn run_workload(
    staging: tokio_postgres::Client,
    seed: u64,
    stop: tokio::sync::watch::Receiver<bool>,
    next: impl Fn(&mut support::rng::Rng) -> String,
) -> u64 {
    let mut rng = support::rng::Rng::new(seed);
    let mut committed = 0;
    while !*stop.borrow() {
        let sql = next(&mut rng);
        staging
            .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
            .await
            .expect("staging workload");
        committed += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    committed
}

/// Small changes of the first 400 items (and their prices, tags, catalogue entries), some of
/// them in chunks the drift touched.
fn fault_workload(rng: &mut support::rng::Rng) -> String {
    let id = rng.between(1, 400);
    let value = rng.between(1, 1_000_000);
    match rng.below(9) {
        0 => format!(
            "INSERT INTO item VALUES ({id}, {value}, 'new') ON CONFLICT (id) DO UPDATE SET name = 'renewed {value}'"
        ),
        1 => format!("DELETE FROM item WHERE id = {id}"),
        2 => format!("UPDATE price SET amount = {value} WHERE item_id = {id}"),
        3 => format!(
            "INSERT INTO tag VALUES ('tag-{id}', 'w{value}') ON CONFLICT (code) DO UPDATE SET label = EXCLUDED.label"
        ),
        4 => format!(
            "INSERT INTO catentry VALUES ({id}, 'P{id}', 'n{value}') ON CONFLICT (catentry_id) DO UPDATE SET name = EXCLUDED.name"
        ),
        5 => format!("DELETE FROM catentry WHERE catentry_id = {id}"),
        6 => format!("UPDATE catentry SET name = 'u{value}' WHERE catentry_id = {id}"),
        _ => format!("UPDATE item SET price = {value}, name = 'v{value}' WHERE id = {id}"),
    }
}

fn spawn(config: &std::path::Path, args: &[&str], log: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(log.with_extension("out")).unwrap())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// [`stagingprop`] off the runtime's threads (sync may run on them meanwhile).
async fn stagingprop_beside(config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        stagingprop(&config, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_online_exactly_once_across_sigkills_of_sync_and_of_the_repair() {
    let started = Instant::now();
    let seed = support::rng::test_seed(
        "drift_is_repaired_online_exactly_once_across_sigkills_of_sync_and_of_the_repair",
    );
    let mut rng = support::rng::Rng::new(seed);
    // Staging's changes of drifted rows meet the drift before the repair gets there: the
    // operator's policy for that overwrites. catentry's keys are remapped where production's
    // own rows hold them.
    let overwrite = "on_conflict = \"overwrite\"";
    let p = PairBuilder::new("repair_faults", SCHEMA)
        .sync("batch_max_rows = 200")
        .table("public.item", overwrite)
        .table("public.price", overwrite)
        .table("public.tag", overwrite)
        .table(
            "public.catentry",
            &format!(
                "key = {{ rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }}\n{overwrite}"
            ),
        )
        .build();
    p.on_production(BORN);
    let born = p.on_production(BORN_ROWS);
    stagingprop::ops::init::init(&p.config, &Default::default())
        .await
        .expect("init");
    p.on_staging(SEED);
    p.on_staging(
        "INSERT INTO catentry SELECT g, 'P' || g, 'entry ' || g FROM generate_series(1, 1500) g",
    );
    caught_up(&p.config).await.expect("sync");
    p.on_production(DRIFT);
    p.on_production(
        "DELETE FROM catentry WHERE catentry_id % 83 = 4 AND catentry_id > 10;
         UPDATE catentry SET name = 'drifted' WHERE catentry_id % 79 = 6 AND catentry_id > 10;
         UPDATE catentry SET name = 'drifted' WHERE catentry_id >= 1000000;",
    );
    let before = differing_tables(&p).await;
    assert_eq!(
        before.len(),
        4,
        "the drift shows in every table: {before:?}"
    );

    let scratch = support::Scratch::new("repair_faults");
    let config = p.write_config(&scratch.0);
    let staging = endpoint(&p.staging_cluster, &p.staging, "postgres")
        .connect()
        .await
        .unwrap();
    // The workload runs until the repair is done (and a little after).
    let (stop_workload, workload_stopped) = tokio::sync::watch::channel(false);
    let workload = tokio::spawn(run_workload(
        staging,
        seed,
        workload_stopped,
        fault_workload,
    ));

    let mut sync_kills = 0;
    let mut repair_runs = 0;
    let mut outputs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut sync = spawn(&config, &["sync"], &scratch.0.join("sync-0.log"));
    let mut repair = None;
    let mut next_sync_kill = Instant::now() + Duration::from_millis(rng.between(150, 600));
    let mut repair_kill_at = Some(Instant::now() + Duration::from_millis(rng.between(200, 1000)));
    loop {
        assert!(
            Instant::now() < deadline,
            "the repair did not finish within 150 s: {outputs:?}"
        );
        if repair.is_none() {
            repair_runs += 1;
            repair = Some(spawn(
                &config,
                &[
                    "verify",
                    "--repair",
                    "--chunk-rows",
                    "100",
                    "--wait-seconds",
                    "60",
                ],
                &scratch.0.join(format!("repair-{repair_runs}.log")),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Some(status) = repair.as_mut().unwrap().try_wait().unwrap() {
            let log = scratch.0.join(format!("repair-{repair_runs}.log"));
            let out = std::fs::read_to_string(log.with_extension("out")).unwrap();
            let err = std::fs::read_to_string(&log).unwrap();
            assert!(status.success(), "repair failed ({status}):\n{out}\n{err}");
            outputs.push(out);
            break;
        }
        if repair_kill_at.is_some_and(|at| Instant::now() >= at) {
            // Killed once, at a random moment: the next run resumes.
            repair_kill_at = None;
            let mut killed = repair.take().unwrap();
            killed.kill().unwrap();
            killed.wait().unwrap();
            outputs.push("(killed)".into());
        }
        if Instant::now() >= next_sync_kill {
            if let Some(status) = sync.try_wait().unwrap() {
                panic!(
                    "sync exited by itself ({status}):\n{}",
                    std::fs::read_to_string(scratch.0.join(format!("sync-{sync_kills}.log")))
                        .unwrap()
                );
            }
            sync.kill().unwrap();
            sync.wait().unwrap();
            sync_kills += 1;
            sync = spawn(
                &config,
                &["sync"],
                &scratch.0.join(format!("sync-{sync_kills}.log")),
            );
            next_sync_kill = Instant::now() + Duration::from_millis(rng.between(150, 600));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_workload.send(true).unwrap();
    let committed = workload.await.unwrap();
    sync.kill().unwrap();
    sync.wait().unwrap();
    caught_up(&p.config).await.expect("final sync");

    let after = differing_tables(&p).await;
    assert!(
        after.is_empty(),
        "still differing after the repair: {after:?}"
    );
    assert_eq!(
        p.on_production(BORN_ROWS),
        born,
        "production's own rows untouched"
    );
    // Every chunk of the last repair ended applied or found equal, once each, and the rows it
    // wrote add up to the drift it found.
    let last = outputs.last().unwrap();
    assert!(last.contains("chunk(s) done"), "{last}");
    let states = p.on_production(
        "SELECT string_agg(DISTINCT state, ',') FROM stagingprop.repair_chunks
          WHERE repair_id = (SELECT max(id) FROM stagingprop.repairs)",
    );
    assert!(
        states.trim() == "applied" || states.trim() == "applied,unchanged",
        "{states}"
    );
    assert_eq!(
        p.on_production(
            "SELECT count(*) FROM stagingprop.repairs WHERE finished_at IS NULL OR outcome NOT IN ('done', 'abandoned')"
        )
        .trim(),
        "0"
    );
    let deleted = p.on_production(
        "SELECT coalesce(sum(deleted), 0) FROM stagingprop.repair_chunks
          WHERE repair_id = (SELECT max(id) FROM stagingprop.repairs)",
    );
    assert!(
        deleted.trim().parse::<i64>().unwrap() > 0,
        "the production-only rows went: {deleted}"
    );
    println!(
        "repair faults: seed {seed}, {sync_kills} sync kills, {repair_runs} repair runs, {committed} staging transactions, {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        outputs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_says_what_a_repair_would_write_and_edited_rows_are_kept() {
    let p = pair("repair_dry", "guard = \"record\"", "");
    psql(
        &clusters().production,
        "postgres",
        "DO $$ BEGIN CREATE ROLE repair_merchant LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
    );
    stagingprop::ops::init::init(&p.config, &Default::default())
        .await
        .expect("init");
    p.on_production("GRANT ALL ON item, price, tag TO repair_merchant");
    p.on_staging(SEED);
    caught_up(&p.config).await.expect("sync");
    // A merchant's edit, recorded by the guard, and drift nobody recorded (triggers off).
    let merchant = endpoint(&p.production_cluster, &p.production, "repair_merchant")
        .connect()
        .await
        .unwrap();
    merchant
        .batch_execute("UPDATE item SET price = 4242 WHERE id = 17")
        .await
        .unwrap();
    p.on_production(
        "SET session_replication_role = replica;
         DELETE FROM item WHERE id IN (5, 2500);
         UPDATE item SET name = 'drifted' WHERE id = 1200;
         INSERT INTO tag VALUES ('zzz-only-here', 'extra');",
    );
    let scratch = support::Scratch::new("repair_dry");
    let config = p.write_config(&scratch.0);
    let items = "SELECT id, price, name FROM item ORDER BY id";
    let production_before = p.on_production(items);

    let (code, out, err) = stagingprop(
        &config,
        &["verify", "--repair", "--dry-run", "--chunk-rows", "500"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(
            "public.item: 3 differing chunk(s); would insert 2, update 1, delete 0 row(s)"
        ),
        "{out}"
    );
    assert!(
        out.contains("kept 1 row(s)") && out.contains("id=17"),
        "{out}"
    );
    assert!(
        out.contains("public.tag: 1 differing chunk(s); would insert 0, update 0, delete 1 row(s)"),
        "{out}"
    );
    assert!(out.contains("public.price: match"), "{out}");
    assert_eq!(
        p.on_production(items),
        production_before,
        "a dry run writes nothing"
    );

    // The repair needs sync to apply its chunks; without it, it says so and stops.
    let (code, out, err) = stagingprop(
        &config,
        &[
            "verify",
            "--repair",
            "--chunk-rows",
            "500",
            "--wait-seconds",
            "2",
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("is sync running?"), "{err}");
    let status = stagingprop(&config, &["status"]).1;
    assert!(
        status.contains("repair 1 of public.item, public.price, public.tag in progress"),
        "{status}"
    );

    // With sync running, the same repair resumes and finishes.
    let (stop, running) = support::sync_in_background(&p.config, tracing::info_span!("sync"));
    let (code, out, err) = stagingprop_beside(
        &config,
        &[
            "verify",
            "--repair",
            "--chunk-rows",
            "500",
            "--wait-seconds",
            "60",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("repair 1 (resumed)"), "{out}");
    assert!(
        out.contains("public.item: 3 differing chunk(s); did insert 2, update 1, delete 0 row(s); 3 chunk(s) done"),
        "{out}"
    );
    stop.send(()).unwrap();
    running.await.unwrap().expect("sync");
    // Everything matches but the merchant's edit, which verify reports apart.
    let diffs = stagingprop::ops::verify::verify(&p.config, &Default::default())
        .await
        .unwrap();
    for d in &diffs {
        assert!(d.matches(), "{d:?}");
    }
    let item = diffs.iter().find(|d| d.table == "public.item").unwrap();
    assert_eq!(item.edited_keys, vec!["id=17".to_owned()]);
    assert_eq!(
        p.on_production("SELECT price FROM item WHERE id = 17")
            .trim(),
        "4242.00"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_repair_cannot_handle_are_named_with_the_remedy() {
    let p = PairBuilder::new(
        "repair_refused",
        "CREATE TABLE item (id int PRIMARY KEY, name text);
         CREATE TABLE note (lang text, item_id int REFERENCES item, body text,
                            PRIMARY KEY (lang, item_id));
         CREATE TABLE loose (a int, b text);
         ALTER TABLE loose REPLICA IDENTITY FULL;",
    )
    .table(
        "public.item",
        "key = { rule = \"offset\", offset = 1000000 }",
    )
    .table("public.note", "")
    .table("public.loose", "")
    .build();
    stagingprop::ops::init::init(&p.config, &Default::default())
        .await
        .expect("init");
    let scratch = support::Scratch::new("repair_refused");
    let config = p.write_config(&scratch.0);
    let (code, _, err) = stagingprop(&config, &["verify", "--repair", "--table", "public.loose"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot repair public.loose: it has no primary key")
            && err.contains("copy --tables NAME --truncate"),
        "{err}"
    );
    let (code, out, err) = stagingprop(&config, &["verify", "--repair", "--dry-run"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("public.loose: not repaired: it has no primary key"),
        "{out}"
    );
    assert!(
        out.contains("public.note: not repaired: key remapping touches it and its first key column is not an integer"),
        "{out}"
    );
    assert!(
        out.contains("public.item: match, nothing to repair"),
        "{out}"
    );
    let (code, _, err) = stagingprop(&config, &["verify", "--repair", "--table", "public.nope"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--table public.nope: not a managed table"),
        "{err}"
    );
}

const REMAPPED: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, partnumber text NOT NULL, name text);
CREATE TABLE catentdesc (catentry_id bigint REFERENCES catentry ON DELETE CASCADE,
  language_id int, name text, PRIMARY KEY (catentry_id, language_id));
CREATE SEQUENCE catentry_seq START 1000000;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remapped_tables_are_repaired_through_the_key_map_and_production_born_rows_are_untouched() {
    let p = PairBuilder::new("repair_remap", REMAPPED)
        .sync("batch_max_rows = 200")
        .table(
            "public.catentry",
            "key = { rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }",
        )
        .table("public.catentdesc", "")
        .build();
    // Production's own rows, under keys staging will use too.
    p.on_production(
        "INSERT INTO catentry VALUES (5, 'prod-5', 'born on production'), (6, 'prod-6', 'born too');
         INSERT INTO catentdesc VALUES (5, 1, 'production''s description');",
    );
    stagingprop::ops::init::init(&p.config, &Default::default())
        .await
        .expect("init");
    p.on_staging(
        "INSERT INTO catentry SELECT g, 'P' || g, 'entry ' || g FROM generate_series(1, 600) g;
         INSERT INTO catentdesc SELECT g, 1, 'desc ' || g FROM generate_series(1, 600) g;",
    );
    caught_up(&p.config).await.expect("sync");
    let moved = p.on_production(
        "SELECT target_key FROM stagingprop.key_map WHERE table_name = 'public.catentry' AND source_key = 5",
    );
    let moved = moved.trim().to_owned();
    assert!(
        moved.parse::<i64>().unwrap() >= 1_000_000,
        "staging's 5 moved: {moved}"
    );
    let born = "SELECT catentry_id, partnumber, name FROM catentry WHERE catentry_id IN (5, 6)
                UNION ALL SELECT catentry_id, language_id::text, name FROM catentdesc WHERE catentry_id = 5
                ORDER BY 1, 2";
    let born_before = p.on_production(born);
    // Drift: rows deleted and changed (staging's 5 under its moved key among them), a
    // description added that staging lacks.
    p.on_production(&format!(
        "SET session_replication_role = replica;
         DELETE FROM catentry WHERE catentry_id IN (10, 300);
         UPDATE catentry SET name = 'drifted' WHERE catentry_id IN (20, {moved});
         DELETE FROM catentdesc WHERE catentry_id IN (30, 400);
         UPDATE catentdesc SET name = 'drifted' WHERE catentry_id = {moved};
         INSERT INTO catentdesc VALUES (40, 99, 'extra');"
    ));
    let scratch = support::Scratch::new("repair_remap");
    let config = p.write_config(&scratch.0);
    let (stop, running) = support::sync_in_background(&p.config, tracing::info_span!("sync"));
    let (code, out, err) = stagingprop_beside(
        &config,
        &[
            "verify",
            "--repair",
            "--chunk-rows",
            "100",
            "--wait-seconds",
            "60",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains(
            "public.catentry: 2 differing chunk(s); did insert 2, update 2, delete 0 row(s)"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "public.catentdesc: 2 differing chunk(s); did insert 2, update 1, delete 1 row(s)"
        ),
        "{out}"
    );
    stop.send(()).unwrap();
    running.await.unwrap().expect("sync");
    let diffs = stagingprop::ops::verify::verify(&p.config, &Default::default())
        .await
        .unwrap();
    for d in &diffs {
        assert!(d.matches(), "{d:?}");
    }
    assert_eq!(
        p.on_production(born),
        born_before,
        "production's own rows untouched"
    );
    assert_eq!(
        p.on_production(&format!(
            "SELECT name FROM catentry WHERE catentry_id = {moved}"
        ))
        .trim(),
        "entry 5"
    );
}

/// Small changes of `table` (id int PRIMARY KEY, v text) rows 1..3000.
fn keyed_change(rng: &mut support::rng::Rng, table: &str) -> String {
    let id = rng.between(1, 3000);
    let value = rng.between(1, 1_000_000);
    match rng.below(4) {
        0 => format!(
            "INSERT INTO {table} VALUES ({id}, 'i{value}') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"
        ),
        1 => format!("DELETE FROM {table} WHERE id = {id}"),
        _ => format!("UPDATE {table} SET v = 'u{value}' WHERE id = {id}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_config_is_seeded_online_under_load_and_a_removed_one_is_left() {
    let p = PairBuilder::new(
        "repair_added",
        "CREATE TABLE item (id int PRIMARY KEY, v text);
         CREATE TABLE extra (id int PRIMARY KEY, v text);",
    )
    .table("public.item", "")
    .table("public.extra", "")
    .build();
    let scratch = support::Scratch::new("repair_added");
    let after = p.write_config(&scratch.0);
    let before = scratch.0.join("before.toml");
    let without_extra = p
        .text
        .replace("[[tables]]\nname = \"public.extra\"\n\n", "");
    assert_ne!(without_extra, p.text);
    std::fs::write(&before, &without_extra).unwrap();
    let (code, out, err) = stagingprop(&before, &["init"]);
    assert_eq!(code, 0, "{out}\n{err}");
    p.on_staging(
        "INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 2000) g;
         INSERT INTO extra SELECT g, 'extra ' || g FROM generate_series(1, 3000) g;",
    );
    let staging = endpoint(&p.staging_cluster, &p.staging, "postgres")
        .connect()
        .await
        .unwrap();
    let (stop_workload, stopped) = tokio::sync::watch::channel(false);
    let seed = support::rng::test_seed("a_table_added_to_a_running_config_is_seeded_online");
    let workload = tokio::spawn(run_workload(staging, seed, stopped, |rng| {
        let table = rng.pick(&["item", "extra"]);
        keyed_change(rng, table)
    }));
    let mut sync = spawn(&before, &["sync"], &scratch.0.join("sync-before.log"));
    tokio::time::sleep(Duration::from_millis(800)).await;

    // The table joins the config: init adds it to the publication and registers its seeding.
    let (code, out, err) = stagingprop(&after, &["init"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("public.extra added to a running target")
            && out.contains("stagingprop resync --table public.extra"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    sync.kill().unwrap();
    sync.wait().unwrap();
    let mut sync = spawn(&after, &["sync"], &scratch.0.join("sync-after.log"));
    // Changes of the new table meet rows production lacks: left to the seed, sync goes on.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        sync.try_wait().unwrap().is_none(),
        "sync stopped: {}",
        std::fs::read_to_string(scratch.0.join("sync-after.log")).unwrap()
    );
    let (code, out, err) = stagingprop_beside(
        &after,
        &[
            "resync",
            "--table",
            "public.extra",
            "--chunk-rows",
            "500",
            "--wait-seconds",
            "60",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("repair 1 (resumed)"),
        "the registered seeding: {out}"
    );
    assert!(
        out.contains("public.extra: ") && out.contains("chunk(s) done"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_workload.send(true).unwrap();
    let committed = workload.await.unwrap();
    assert!(
        sync.try_wait().unwrap().is_none(),
        "sync stopped: {}",
        std::fs::read_to_string(scratch.0.join("sync-after.log")).unwrap()
    );
    sync.kill().unwrap();
    sync.wait().unwrap();
    caught_up(&p.config).await.expect("final sync");
    let diffs = stagingprop::ops::verify::verify(&p.config, &Default::default())
        .await
        .unwrap();
    for d in &diffs {
        assert!(d.matches(), "after {committed} staging transactions: {d:?}");
    }
    // The seeding ended in the stream: the table conflicts as usual again.
    assert_eq!(
        p.on_production(
            "SELECT count(*) FROM stagingprop.repairs WHERE seeding AND seeded_lsn IS NULL"
        )
        .trim(),
        "0"
    );

    // Removed from the config: sync leaves its rows as they are.
    let only_extra = scratch.0.join("only-extra.toml");
    std::fs::write(
        &only_extra,
        p.text.replace("[[tables]]\nname = \"public.item\"\n\n", ""),
    )
    .unwrap();
    let (code, out, err) = stagingprop(&only_extra, &["init"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("sync no longer applies public.item"), "{out}");
    let items = "SELECT count(*), sum(hashtext(v)) FROM item";
    let kept = p.on_production(items);
    // An upsert: the random workload may have deleted row 5.
    p.on_staging(
        "DELETE FROM item WHERE id < 100;
         INSERT INTO extra VALUES (5, 'after') ON CONFLICT (id) DO UPDATE SET v = 'after';",
    );
    let (code, out, err) = stagingprop(&only_extra, &["sync", "--until-caught-up"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(p.on_production(items), kept);
    assert_eq!(
        p.on_production("SELECT v FROM extra WHERE id = 5").trim(),
        "after"
    );
}
