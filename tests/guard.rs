//! The production guard: `init` installs triggers on production's managed tables that refuse or
//! record writes by anyone but stagingprop, on managed rows and columns only, while sync's own
//! writes go through.

mod support;

use stagingprop::ops::init::{InitOptions, init};
use support::{Pair, PairBuilder, caught_up, clusters, endpoint, psql};

const SCHEMA: &str = "
CREATE TABLE item (id int PRIMARY KEY, price numeric(10,2) NOT NULL, name text);
CREATE TABLE offer (id int, store int, price numeric(10,2), merchant_note text, stock int,
                    PRIMARY KEY (id, store));
CREATE TABLE price (item_id int, currency text, amount numeric(12,4), doc json,
                    PRIMARY KEY (item_id, currency));
CREATE TABLE note (id int PRIMARY KEY, body text);";

/// Roles are cluster-wide: made once, whoever asks first.
fn role(name: &str) {
    psql(
        &clusters().production,
        "postgres",
        &format!(
            "DO $$ BEGIN CREATE ROLE {name} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ),
    );
}

/// A pair whose production is written by `writer`, a plain role that owns the managed tables,
/// and edited by `merchant`, a plain role with every privilege on them. `guard` holds the
/// guard lines of each table (item, offer, price) and `extra` the TOML after them.
fn pair(prefix: &str, writer: &str, merchant: &str, guard: [&str; 3], extra: &str) -> Pair {
    role(writer);
    role(merchant);
    let p = PairBuilder::new(prefix, SCHEMA)
        .production_user(writer)
        .table("public.item", guard[0])
        .table("public.offer", guard[1])
        .table("public.price", guard[2])
        .extra(extra)
        .build();
    p.on_production(&format!(
        "GRANT CREATE ON DATABASE {db} TO {writer};
         ALTER TABLE item OWNER TO {writer};
         ALTER TABLE offer OWNER TO {writer};
         ALTER TABLE price OWNER TO {writer};
         GRANT ALL ON item, offer, price TO {merchant};",
        db = p.production
    ));
    p
}

/// A session on production as `user`, calling itself what stagingprop calls itself and
/// setting whatever a plain role may set to look like it.
async fn imitating_stagingprop(p: &Pair, user: &str) -> tokio_postgres::Client {
    let mut ep = endpoint(&p.production_cluster, &p.production, user);
    ep.pg.application_name("stagingprop");
    let client = ep.connect().await.expect("merchant connects");
    client
        .batch_execute("SET stagingprop.writer = 'on'; SET search_path = stagingprop, public")
        .await
        .unwrap();
    // A plain role may not turn triggers off.
    assert!(
        client
            .batch_execute("SET session_replication_role = replica")
            .await
            .is_err()
    );
    client
}

/// The server's error for `sql`, which must fail.
async fn refused(client: &tokio_postgres::Client, sql: &str) -> tokio_postgres::error::DbError {
    let e = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("the guard let through: {sql}"));
    e.as_db_error()
        .unwrap_or_else(|| panic!("{sql}: {e}"))
        .clone()
}

async fn run_init(p: &Pair) -> String {
    init(&p.config, &InitOptions::default())
        .await
        .expect("init")
        .lines
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_lets_only_stagingprop_write_managed_rows_and_columns() {
    let p = pair(
        "guard_refuse",
        "guard_writer",
        "guard_merchant",
        [
            "guard = \"refuse\"",
            "guard = \"refuse\"\ncolumns = [\"store\", \"price\"]\nfilter = \"store < 100\"",
            "",
        ],
        "[guard]\ndefault = \"refuse\"",
    );
    let report = run_init(&p).await;
    p.on_staging(
        "INSERT INTO item SELECT g, g, 'item ' || g FROM generate_series(1, 5) g;
         INSERT INTO offer VALUES (1, 1, 10, NULL, NULL), (2, 500, 20, NULL, NULL);
         INSERT INTO price VALUES (1, 'EUR', 1.5, '{\"a\": 1}');",
    );
    for table in ["public.item", "public.offer", "public.price"] {
        assert!(
            report.contains(&format!("guard = \"refuse\" installed on {table}")),
            "{report}"
        );
    }
    assert!(report.contains("role \"guard_writer\""), "{report}");
    // Sync, as the writer (not a superuser, so the triggers fire for it too), passes.
    caught_up(&p.config).await.expect("sync");
    assert_eq!(p.on_production("SELECT count(*) FROM item").trim(), "5");

    let merchant = imitating_stagingprop(&p, "guard_merchant").await;
    let e = refused(&merchant, "UPDATE item SET price = 99 WHERE id = 1").await;
    assert_eq!(e.code().code(), "42501");
    assert!(
        e.message()
            .contains("table public.item is managed from staging")
            && e.message().contains("update by role guard_merchant"),
        "{}",
        e.message()
    );
    assert!(e.detail().unwrap().contains("price"), "{:?}", e.detail());
    assert!(
        e.hint().unwrap().contains("guard = \"record\""),
        "{:?}",
        e.hint()
    );
    refused(&merchant, "INSERT INTO item VALUES (9, 9, 'x')").await;
    refused(&merchant, "DELETE FROM item WHERE id = 2").await;
    refused(&merchant, "TRUNCATE item").await;
    refused(&merchant, "UPDATE price SET doc = '{\"a\": 2}'").await;
    refused(&merchant, "DELETE FROM price").await;
    // Within the filter, the managed columns are refused and production's own are free.
    refused(&merchant, "UPDATE offer SET price = 11 WHERE id = 1").await;
    refused(&merchant, "UPDATE offer SET store = 600 WHERE id = 1").await;
    refused(&merchant, "INSERT INTO offer VALUES (3, 3, 1, NULL, NULL)").await;
    merchant
        .batch_execute("UPDATE offer SET merchant_note = 'mine', stock = 7 WHERE id = 1")
        .await
        .expect("an unmanaged column is production's");
    // Rows outside the filter are not staging's.
    merchant
        .batch_execute(
            "UPDATE offer SET price = 21 WHERE id = 2;
             INSERT INTO offer VALUES (4, 700, 1, 'local', 1);
             DELETE FROM offer WHERE id = 4;",
        )
        .await
        .expect("rows outside the filter are production's");
    // An update that changes nothing managed is no edit.
    merchant
        .batch_execute("UPDATE item SET price = price WHERE id = 1")
        .await
        .expect("a no-op update");
    assert_eq!(
        p.on_production("SELECT price FROM item WHERE id = 1")
            .trim(),
        "1.00"
    );

    // Staging's changes still arrive, the merchant's columns kept.
    p.on_staging(
        "UPDATE item SET price = 50 WHERE id = 1; DELETE FROM item WHERE id = 5;
         UPDATE offer SET price = 12 WHERE id = 1; TRUNCATE price;",
    );
    caught_up(&p.config).await.expect("sync");
    assert_eq!(
        p.on_production("SELECT string_agg(id || ':' || price, ',' ORDER BY id) FROM item")
            .trim(),
        "1:50.00,2:2.00,3:3.00,4:4.00"
    );
    assert_eq!(
        p.on_production(
            "SELECT price || ' ' || merchant_note || ' ' || stock FROM offer WHERE id = 1"
        )
        .trim(),
        "12.00 mine 7"
    );
    assert_eq!(p.on_production("SELECT count(*) FROM price").trim(), "0");

    // Running init again changes nothing; turning a table's guard off removes its triggers.
    let again = run_init(&p).await;
    assert_eq!(
        again.matches("(as configured already)").count(),
        3,
        "{again}"
    );
    // Another mode replaces a table's guard in one go.
    let mut recording = p.config.clone();
    recording.tables[2].guard = stagingprop::config::GuardMode::Record;
    let report = init(&recording, &InitOptions::default())
        .await
        .expect("init")
        .lines
        .join("\n");
    assert!(
        report.contains("guard = \"record\" installed on public.price"),
        "{report}"
    );
    p.on_staging("INSERT INTO price VALUES (2, 'USD', 3, NULL)");
    caught_up(&recording).await.expect("sync");
    merchant
        .batch_execute("UPDATE price SET amount = 4")
        .await
        .expect("recorded now");
    assert_eq!(
        p.on_production("SELECT table_name || ' ' || array_to_string(key, ',') FROM stagingprop.production_edits")
            .trim(),
        "public.price 2,USD"
    );
    let mut off = recording.clone();
    off.tables[0].guard = stagingprop::config::GuardMode::Off;
    let report = init(&off, &InitOptions::default())
        .await
        .expect("init")
        .lines
        .join("\n");
    assert!(
        report.contains("guard removed from public.item"),
        "{report}"
    );
    merchant
        .batch_execute("UPDATE item SET name = 'unguarded' WHERE id = 1")
        .await
        .expect("guard off");
    assert_eq!(
        p.on_production(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'stagingprop'::regnamespace AND proname LIKE 'guard%'"
        )
        .trim(),
        "2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_keeps_each_production_edit_of_managed_data_and_nothing_else() {
    let p = pair(
        "guard_record",
        "guard_writer",
        "guard_merchant",
        [
            "",
            "columns = [\"store\", \"price\"]\nfilter = \"store < 100\"",
            "guard = \"off\"",
        ],
        "[guard]\ndefault = \"record\"",
    );
    let report = run_init(&p).await;
    p.on_staging(
        "INSERT INTO item SELECT g, g, 'item ' || g FROM generate_series(1, 3) g;
         INSERT INTO offer VALUES (1, 1, 10, NULL, NULL), (2, 500, 20, NULL, NULL);",
    );
    assert!(
        report.contains("guard = \"record\" installed on public.item")
            && report.contains("guard = \"record\" installed on public.offer")
            && !report.contains("public.price:"),
        "{report}"
    );
    caught_up(&p.config).await.expect("sync");

    let merchant = imitating_stagingprop(&p, "guard_merchant").await;
    merchant
        .batch_execute(
            "UPDATE item SET price = 7.5 WHERE id = 1;
             DELETE FROM item WHERE id = 2;
             INSERT INTO item VALUES (10, 1, 'production-born');
             UPDATE offer SET merchant_note = 'mine';
             UPDATE offer SET price = 11;
             UPDATE item SET name = name;
             UPDATE price SET amount = 1;",
        )
        .await
        .expect("recorded writes go through");
    let edits = p.on_production(
        "SELECT table_name, operation, array_to_string(key, ','), array_to_string(columns, ','),
                coalesce(before->>'price', '-'), coalesce(after->>'price', '-'), role, application
           FROM stagingprop.production_edits ORDER BY id",
    );
    assert_eq!(
        edits.trim(),
        "public.item|UPDATE|1|price|1.00|7.50|guard_merchant|stagingprop
public.item|DELETE|2|id,name,price|2.00|-|guard_merchant|stagingprop
public.item|INSERT|10|id,name,price|-|1.00|guard_merchant|stagingprop
public.offer|UPDATE|1,1|price|10.00|11.00|guard_merchant|stagingprop"
    );
    // The images of a partly managed table hold its managed columns only.
    assert_eq!(
        p.on_production(
            "SELECT string_agg(k, ',' ORDER BY k) FROM stagingprop.production_edits, jsonb_object_keys(after) k WHERE table_name = 'public.offer'"
        )
        .trim(),
        "id,price,store"
    );

    // Sync's own writes are not edits.
    p.on_staging("UPDATE item SET price = 8 WHERE id = 1; UPDATE offer SET price = 13 WHERE id = 1; INSERT INTO item VALUES (4, 4, 'four');");
    caught_up(&p.config).await.expect("sync");
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.production_edits")
            .trim(),
        "4"
    );
    let status = stagingprop::ops::status::status(&p.config, &Default::default())
        .await
        .expect("status");
    let rendered = stagingprop::ops::status::render(&status);
    // Staging's updates of item 1 and offer 1 met the edits: staging won (the default).
    for line in [
        "production edits of public.item (recorded by the guard): 2 open of 3",
        "production edits of public.offer (recorded by the guard): 0 open of 1",
        "conflicts logged in public.item: 1 update_origin_differs, staging-wins",
        "conflicts logged in public.offer: 1 update_origin_differs, staging-wins",
    ] {
        assert!(rendered.contains(line), "{line}:\n{rendered}");
    }
}

/// The open conflicts log, one line per row: table, kind, policy, action, and a column of each
/// image (staging's, production's, what stagingprop last wrote).
fn conflict_log(p: &Pair, column: &str) -> String {
    p.on_production(&format!(
        "SELECT table_name || ' ' || kind || ' ' || policy || ' ' || action || ' ' ||
                coalesce(staging_row->>'{column}', '-') || ' ' || coalesce(production_row->>'{column}', '-') || ' ' ||
                coalesce(last_written->>'{column}', '-')
           FROM stagingprop.conflicts ORDER BY id"
    ))
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_edit_policy_decides_a_staging_change_that_meets_a_production_edit() {
    let p = pair(
        "guard_policies",
        "guard_writer",
        "guard_merchant",
        [
            "on_production_edit = \"staging-wins\"",
            "on_production_edit = \"production-wins\"\ncolumns = [\"store\", \"price\"]",
            "on_production_edit = \"park\"",
        ],
        "[guard]\ndefault = \"record\"",
    );
    run_init(&p).await;
    p.on_staging(
        "INSERT INTO item SELECT g, g, 'item ' || g FROM generate_series(1, 3) g;
         INSERT INTO offer VALUES (1, 1, 10, NULL, NULL);
         INSERT INTO price VALUES (1, 'EUR', 1.5, NULL);",
    );
    caught_up(&p.config).await.expect("sync");

    let merchant = imitating_stagingprop(&p, "guard_merchant").await;
    merchant
        .batch_execute(
            "UPDATE item SET price = 99 WHERE id = 1;
             DELETE FROM item WHERE id = 2;
             UPDATE offer SET price = 55, merchant_note = 'mine';
             UPDATE price SET amount = 7;",
        )
        .await
        .unwrap();
    p.on_staging(
        "UPDATE item SET price = price + 10;
         UPDATE offer SET price = 12;
         UPDATE price SET amount = 2;",
    );
    caught_up(&p.config).await.expect("sync");
    assert_eq!(
        p.on_production("SELECT string_agg(id || ':' || price, ',' ORDER BY id) FROM item")
            .trim(),
        "1:11.00,2:12.00,3:13.00",
        "staging wins: its update over the edit, its whole row where production deleted it"
    );
    assert_eq!(
        p.on_production("SELECT price || ' ' || merchant_note FROM offer")
            .trim(),
        "55.00 mine",
        "production wins"
    );
    assert_eq!(p.on_production("SELECT amount FROM price").trim(), "7.0000");
    assert_eq!(
        conflict_log(&p, "price"),
        "public.item update_origin_differs staging-wins staging-wins 11.00 99.00 1.00
public.item update_missing staging-wins staging-wins 12.00 - 2.00
public.offer update_origin_differs production-wins production-wins 12.00 55.00 10.00
public.price update_origin_differs park parked - - -"
    );
    assert_eq!(
        p.on_production(
            "SELECT string_agg(table_name || ':' || coalesce(outcome, 'open'), ',' ORDER BY id) FROM stagingprop.production_edits"
        )
        .trim(),
        "public.item:staging-wins,public.item:staging-wins,public.offer:production-wins,public.price:open"
    );

    // verify tells rows production's users edited apart from drift nobody recorded.
    // (A superuser can get past the guard: drift it does not record.)
    p.on_production(
        "SET session_replication_role = replica; UPDATE item SET name = 'drift' WHERE id = 3",
    );
    let diffs = stagingprop::ops::verify::verify(&p.config, &Default::default())
        .await
        .expect("verify");
    let of = |name: &str| diffs.iter().find(|d| d.table == name).unwrap();
    assert_eq!(
        (of("public.offer").edited, of("public.offer").matches()),
        (1, true)
    );
    assert_eq!(of("public.price").edited, 1);
    assert_eq!(
        (of("public.item").edited, of("public.item").different),
        (0, 1),
        "a staging-wins edit explains nothing: the drift of row 3 does not hide"
    );
    let rendered = stagingprop::ops::verify::render(&diffs);
    assert!(
        rendered.contains("public.offer: match (1 rows, ")
            && rendered.contains("1 row(s) differ where production's users edited them (recorded by the guard): id=1,store=1"),
        "{rendered}"
    );
    p.on_production(
        "SET session_replication_role = replica; UPDATE item SET name = 'item 3' WHERE id = 3",
    );

    // The parked change keeps the three images; a later change of the row parks behind it.
    p.on_staging("UPDATE price SET amount = 3;");
    caught_up(&p.config).await.expect("sync");
    let parked = p.on_production(
        "SELECT id || ' ' || (row_data->>'amount') || ' ' || (production_row->>'amount') || ' ' || (last_written->>'amount')
           FROM stagingprop.quarantine WHERE parked ORDER BY id",
    );
    let parked: Vec<&str> = parked.trim().lines().collect();
    assert_eq!(parked.len(), 2, "{parked:?}");
    let ids: Vec<&str> = parked
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(parked[0], format!("{} 2.0000 7.0000 1.5000", ids[0]));
    assert_eq!(parked[1], format!("{} 3.0000 7.0000 1.5000", ids[1]));
    assert_eq!(p.on_production("SELECT amount FROM price").trim(), "7.0000");

    let scratch = support::Scratch::new("guard_policies");
    let config = p.write_config(&scratch.0);
    let (code, _, err) = support::stagingprop(
        &config,
        &["quarantine", "resolve", "--id", ids[1], "--take", "staging"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("parked behind change {}", ids[0])),
        "{err}"
    );
    let (code, out, err) = support::stagingprop(
        &config,
        &["quarantine", "resolve", "--id", ids[0], "--take", "staging"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("took staging"), "{out}");
    assert_eq!(
        p.on_production("SELECT amount FROM price").trim(),
        "3.0000",
        "staging's parked changes applied in order"
    );
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.quarantine")
            .trim(),
        "0"
    );
    // Exactly once: the decision is gone with the changes it decided.
    let (code, _, err) = support::stagingprop(
        &config,
        &["quarantine", "resolve", "--id", ids[0], "--take", "staging"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no quarantined change"), "{err}");
    // Resolved, the row follows staging again.
    p.on_staging("UPDATE price SET amount = 4;");
    caught_up(&p.config).await.expect("sync");
    assert_eq!(p.on_production("SELECT amount FROM price").trim(), "4.0000");

    // Production's side, and merged values.
    for (take, edited, extra, expected) in [
        ("production", 8, vec![], "8.0000 {\"x\": 1}"),
        (
            "merged",
            9,
            vec!["--set", "amount=6.5", "--set-null", "doc"],
            "6.5000 -",
        ),
    ] {
        merchant
            .batch_execute(&format!(
                "UPDATE price SET amount = {edited}, doc = '{{\"x\": 1}}'"
            ))
            .await
            .unwrap();
        p.on_staging("UPDATE price SET amount = amount + 1;");
        caught_up(&p.config).await.expect("sync");
        let id = p.on_production("SELECT id FROM stagingprop.quarantine WHERE parked");
        let mut args = vec!["quarantine", "resolve", "--id", id.trim(), "--take", take];
        args.extend(extra);
        let (code, out, err) = support::stagingprop(&config, &args);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(
            p.on_production("SELECT amount || ' ' || coalesce(doc::text, '-') FROM price")
                .trim(),
            expected,
            "took {take}"
        );
        assert_eq!(
            p.on_production(
                "SELECT count(*) FROM stagingprop.production_edits WHERE settled_at IS NULL"
            )
            .trim(),
            "0"
        );
    }
}

/// Staging's side of the randomized test: small transactions over 120 keys of each table.
async fn staging_workload(
    staging: tokio_postgres::Client,
    seed: u64,
    until: std::time::Instant,
) -> u64 {
    let mut rng = support::rng::Rng::new(seed);
    let mut committed = 0;
    while std::time::Instant::now() < until {
        let id = rng.between(1, 120);
        let value = rng.between(1, 1_000_000);
        let sql = match rng.below(10) {
            0 => format!(
                "INSERT INTO item VALUES ({id}, {value}, 'new') ON CONFLICT (id) DO UPDATE SET name = 'renewed'"
            ),
            1 => format!("DELETE FROM item WHERE id = {id}"),
            2 | 3 => format!("UPDATE offer SET price = {value} WHERE id = {id}"),
            4 => format!("UPDATE price SET amount = {value} WHERE item_id = {id}"),
            5 => format!(
                "INSERT INTO note VALUES ({id}, 'n{value}') ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body"
            ),
            6 => format!(
                "UPDATE item SET price = {value} WHERE id = {id}; UPDATE price SET amount = {value} WHERE item_id = {id}"
            ),
            _ => format!("UPDATE item SET price = {value}, name = 'v{value}' WHERE id = {id}"),
        };
        staging
            .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
            .await
            .expect("staging workload");
        committed += 1;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    committed
}

/// The merchant's side: single-row edits of managed and unmanaged columns on production;
/// returns how many rows the managed ones changed, and how many writes to the refusing table
/// were tried (each must fail).
async fn merchant_workload(
    merchant: tokio_postgres::Client,
    seed: u64,
    until: std::time::Instant,
) -> (u64, u64) {
    let mut rng = support::rng::Rng::new(seed ^ 0x5eed);
    let mut managed = 0;
    let mut refused = 0;
    while std::time::Instant::now() < until {
        let id = rng.between(1, 120) as i32;
        // Values staging never writes, so every managed edit changes the row.
        let value = format!("{}.5", rng.between(2_000_000, 9_000_000));
        if rng.below(9) == 0 {
            let e = merchant
                .execute("UPDATE note SET body = 'merchant' WHERE id = $1", &[&id])
                .await
                .expect_err("the refusing table took a merchant's write");
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
                "{e}"
            );
            refused += 1;
            continue;
        }
        let (sql, counts) = match rng.below(8) {
            0 => ("DELETE FROM item WHERE id = $1".to_owned(), true),
            1 | 2 => (
                format!("UPDATE item SET price = {value} WHERE id = $1"),
                true,
            ),
            3 | 4 => (
                format!("UPDATE offer SET price = {value} WHERE id = $1"),
                true,
            ),
            5 => (
                format!("UPDATE offer SET merchant_note = '{value}' WHERE id = $1"),
                false,
            ),
            _ => (
                format!("UPDATE price SET amount = {value} WHERE item_id = $1"),
                true,
            ),
        };
        let changed = merchant.execute(&sql, &[&id]).await.expect("merchant edit");
        if counts {
            managed += changed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    (managed, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_edits_under_random_writes_and_sigkills_of_sync_are_never_lost_silently() {
    let started = std::time::Instant::now();
    let seed = support::rng::test_seed(
        "production_edits_under_random_writes_and_sigkills_of_sync_are_never_lost_silently",
    );
    let mut rng = support::rng::Rng::new(seed);
    // Sync as a superuser this time: its session turns triggers off altogether.
    role("guard_merchant");
    let p = PairBuilder::new("guard_faults", SCHEMA)
        .sync("batch_max_rows = 50")
        .table("public.item", "on_production_edit = \"staging-wins\"")
        .table(
            "public.offer",
            "on_production_edit = \"production-wins\"\ncolumns = [\"store\", \"price\"]",
        )
        .table("public.price", "on_production_edit = \"park\"")
        .table("public.note", "guard = \"refuse\"")
        .extra("[guard]\ndefault = \"record\"")
        .build();
    p.on_production("GRANT ALL ON item, offer, price, note TO guard_merchant");
    run_init(&p).await;
    p.on_staging(
        "INSERT INTO item SELECT g, g, 'item ' || g FROM generate_series(1, 100) g;
         INSERT INTO offer SELECT g, 1, g, NULL, NULL FROM generate_series(1, 120) g;
         INSERT INTO price SELECT g, 'EUR', g, NULL FROM generate_series(1, 120) g;
         INSERT INTO note SELECT g, 'n' || g FROM generate_series(1, 120) g;",
    );
    caught_up(&p.config).await.expect("sync");
    let scratch = support::Scratch::new("guard_faults");
    let config = p.write_config(&scratch.0);

    let until = std::time::Instant::now() + std::time::Duration::from_secs(12);
    let staging = endpoint(&p.staging_cluster, &p.staging, "postgres")
        .connect()
        .await
        .unwrap();
    let merchant = endpoint(&p.production_cluster, &p.production, "guard_merchant")
        .connect()
        .await
        .unwrap();
    let staging_side = tokio::spawn(staging_workload(staging, seed, until));
    let merchant_side = tokio::spawn(merchant_workload(merchant, seed, until));
    let mut kills = 0;
    while std::time::Instant::now() < until {
        let log = std::fs::File::create(scratch.0.join(format!("sync-{kills}.log"))).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
            .arg("--config")
            .arg(&config)
            .arg("sync")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(rng.between(300, 1500))).await;
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "sync exited by itself ({status}):\n{}",
                std::fs::read_to_string(scratch.0.join(format!("sync-{kills}.log"))).unwrap()
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    let committed = staging_side.await.unwrap();
    let (managed_edits, refused) = merchant_side.await.unwrap();
    caught_up(&p.config).await.expect("final sync");
    // The refusing table took every change of sync's and none of the merchant's.
    assert!(refused > 0);
    let notes = "SELECT id, body FROM note ORDER BY id";
    assert_eq!(p.on_staging(notes), p.on_production(notes));

    // Every edit of a managed column was recorded, and nothing of sync's or of the unmanaged
    // column was.
    assert_eq!(
        p.on_production("SELECT count(*) FROM stagingprop.production_edits")
            .trim(),
        managed_edits.to_string()
    );
    // An edit a staging change met was decided exactly once, in the conflict log.
    assert_eq!(
        p.on_production(
            "SELECT count(*) FROM stagingprop.production_edits e WHERE settled_at IS NOT NULL
               AND (SELECT count(*) FROM stagingprop.conflicts c WHERE e.id = ANY(c.edits) AND c.action <> 'parked') <> 1"
        )
        .trim(),
        "0"
    );
    // An open edit is still what production has: its row was not overwritten. (On failure:
    // each such edit, with every edit of its row and the conflicts that name it.)
    let overwritten = p.on_production(
        "SELECT e.id || ' ' || e.table_name || ' ' || e.key::text || ' ' || e.after::text
                || ' edits: ' || (SELECT string_agg(l.id || ':' || l.operation || ':' || coalesce(l.outcome, 'open')
                                                    || ':' || coalesce(l.after::text, '-'), ' ' ORDER BY l.id)
                                    FROM stagingprop.production_edits l
                                   WHERE l.table_name = e.table_name AND l.key = e.key)
                || ' conflicts: ' || coalesce((SELECT string_agg(c.kind || ':' || c.action, ' ')
                                                 FROM stagingprop.conflicts c
                                                WHERE c.edits && ARRAY[e.id]), '-')
           FROM stagingprop.production_edits e
          WHERE settled_at IS NULL AND operation = 'UPDATE'
                AND e.id = (SELECT max(id) FROM stagingprop.production_edits l
                             WHERE l.table_name = e.table_name AND l.key = e.key AND l.settled_at IS NULL)
                AND NOT EXISTS (
                  SELECT 1 FROM item t WHERE e.table_name = 'public.item' AND ARRAY[t.id::text] = e.key AND to_jsonb(t) @> e.after
                  UNION ALL
                  SELECT 1 FROM offer t WHERE e.table_name = 'public.offer' AND ARRAY[t.id::text, t.store::text] = e.key
                    AND to_jsonb(t) @> e.after
                  UNION ALL
                  SELECT 1 FROM price t WHERE e.table_name = 'public.price' AND ARRAY[t.item_id::text, t.currency] = e.key
                    AND to_jsonb(t) @> e.after)",
    );
    assert_eq!(
        overwritten.trim(),
        "",
        "seed {seed}: open edits overwritten"
    );
    // Only parked changes wait for an operator, and each keeps an open edit of its row.
    assert_eq!(
        p.on_production(
            "SELECT count(*) FROM stagingprop.quarantine q WHERE NOT parked OR NOT EXISTS (
               SELECT 1 FROM stagingprop.production_edits e WHERE e.id = ANY(q.edits) AND e.settled_at IS NULL)"
        )
        .trim(),
        "0"
    );
    // Under staging-wins, every row without an open edit is staging's.
    let items = |db: &str| {
        format!(
            "SELECT id, price, name FROM item t WHERE NOT EXISTS (SELECT 1 FROM {db} e WHERE e.settled_at IS NULL AND e.table_name = 'public.item' AND e.key = ARRAY[t.id::text]) ORDER BY id"
        )
    };
    let open_keys = p.on_production(
        "SELECT coalesce(string_agg(DISTINCT key[1], ','), '') FROM stagingprop.production_edits WHERE settled_at IS NULL AND table_name = 'public.item'",
    );
    let open_keys = open_keys.trim();
    let filter = if open_keys.is_empty() {
        String::new()
    } else {
        format!(" AND id NOT IN ({open_keys})")
    };
    assert_eq!(
        p.on_staging(&format!(
            "SELECT id, price, name FROM item WHERE true{filter} ORDER BY id"
        )),
        p.on_production(&items("stagingprop.production_edits"))
    );
    let decided = p.on_production(
        "SELECT coalesce(string_agg(action || ' ' || n, ', '), 'none') FROM (SELECT action, count(*) n FROM stagingprop.conflicts GROUP BY action) x",
    );
    assert!(
        decided.contains("staging-wins") && decided.contains("parked"),
        "the workload met edits under each policy: {decided}"
    );
    println!(
        "guard faults: seed {seed}, {kills} kills, {committed} staging transactions, {managed_edits} production edits, {refused} refused, decided: {}, {:.1} s",
        decided.trim(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_sync_creates_is_guarded_and_its_guard_follows_its_key() {
    let p = pair(
        "guard_created",
        "guard_c_writer",
        "guard_c_merchant",
        ["", "", ""],
        "[[table_patterns]]\nschema = \"shop\"\nguard = \"record\"",
    );
    // The pattern's schema is staging's only: sync makes it on production with its first table.
    p.on_staging("CREATE SCHEMA shop");
    run_init(&p).await;
    p.on_staging(
        "CREATE TABLE shop.gift (id int PRIMARY KEY, code text NOT NULL, note text);
         INSERT INTO shop.gift VALUES (1, 'a', 'one'), (2, 'b', 'two');",
    );
    caught_up(&p.config).await.expect("sync creates the table");
    assert_eq!(
        p.on_production("SELECT string_agg(note, ',' ORDER BY id) FROM shop.gift")
            .trim(),
        "one,two"
    );
    // Guarded from its creation on: an edit by anyone but stagingprop is recorded by its key.
    p.on_production("UPDATE shop.gift SET note = 'edited' WHERE id = 1");
    let recorded = |p: &Pair| {
        p.on_production(
            "SELECT string_agg(table_name || ' ' || array_to_string(key, ','), '; ' ORDER BY id)
               FROM stagingprop.production_edits",
        )
        .trim()
        .to_owned()
    };
    assert_eq!(recorded(&p), "shop.gift 1");
    // The key changes on staging: the guard records edits by the new one.
    p.on_staging(
        "ALTER TABLE shop.gift DROP CONSTRAINT gift_pkey, ADD PRIMARY KEY (id, code);
         UPDATE shop.gift SET note = 'after' WHERE id = 2;",
    );
    caught_up(&p.config).await.expect("sync of the new key");
    assert_eq!(
        p.on_production("SELECT note FROM shop.gift WHERE id = 2")
            .trim(),
        "after"
    );
    p.on_production("UPDATE shop.gift SET note = 'edited' WHERE id = 2");
    assert_eq!(recorded(&p), "shop.gift 1; shop.gift 2,b");
    // Renamed on staging: the guard records edits under the new name.
    p.on_staging(
        "ALTER TABLE shop.gift RENAME TO gifts;
         INSERT INTO shop.gifts VALUES (3, 'c', 'three');",
    );
    caught_up(&p.config).await.expect("sync of the rename");
    p.on_production("UPDATE shop.gifts SET note = 'edited' WHERE id = 3");
    assert_eq!(recorded(&p), "shop.gift 1; shop.gift 2,b; shop.gifts 3,c");
    // init finds the guard sync installed current.
    let again = run_init(&p).await;
    assert!(
        again.contains("guard = \"record\" on shop.gifts (as configured already)"),
        "{again}"
    );
}
