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
                    PRIMARY KEY (item_id, currency));";

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
    let mut off = p.config.clone();
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
    assert!(
        rendered.contains("production edits of public.item (recorded by the guard): 3 open of 3")
            && rendered
                .contains("production edits of public.offer (recorded by the guard): 1 open of 1"),
        "{rendered}"
    );
}
