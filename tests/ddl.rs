//! Schema changes made on staging reach production in order with the rows, exactly once: the
//! capture `init` installs, the plan applied in the rows' transaction (columns added with their
//! default, dropped, renamed by attnum, retyped, defaults and NOT NULL changed, identities,
//! generation expressions and primary keys), tables created, renamed and dropped, a change
//! production cannot take stopping sync until production is fixed, `[ddl] mode = "stop"`, a
//! partially managed table, the spool, indexes built after commit, and sync killed with SIGKILL
//! while changes and rows keep coming.

mod support;

use std::time::Duration;

use stagingprop::pg::connect::Endpoint;
use stagingprop::sync::{StopAt, SyncError, SyncOptions};
use support::faults::{self, Rng, shared_production, shared_staging, test_seed};
use support::{Pair, PairBuilder, caught_up};

/// Every column of `table` as a catalog shows it: name, type, NOT NULL, default; in column order.
fn columns(pair: &Pair, staging: bool, table: &str) -> String {
    let sql = format!(
        "SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' ' || \
                a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-'), ', ' \
                ORDER BY a.attnum)
           FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = '{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped"
    );
    let out = if staging {
        pair.on_staging(&sql)
    } else {
        pair.on_production(&sql)
    };
    out.trim().to_owned()
}

fn rows(pair: &Pair, staging: bool, table: &str) -> String {
    let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
    if staging {
        pair.on_staging(&sql)
    } else {
        pair.on_production(&sql)
    }
}

fn assert_same(pair: &Pair, table: &str) {
    assert_eq!(
        columns(pair, true, table),
        columns(pair, false, table),
        "the columns of {table} differ"
    );
    assert_eq!(
        rows(pair, true, table),
        rows(pair, false, table),
        "the rows of {table} differ"
    );
}

const SCHEMA: &str = "CREATE TABLE price (id int PRIMARY KEY, amount numeric(10,2), note text);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_follow_staging_in_order_with_the_rows() {
    let pair = PairBuilder::new("ddl_follow", SCHEMA)
        .table("public.price", "")
        .init()
        .await;
    pair.on_staging("INSERT INTO price SELECT g, g / 3.0, 'n' || g FROM generate_series(1, 20) g");
    caught_up(&pair.config).await.expect("sync");
    // Each change with rows that need it, in the same transaction and after it.
    pair.on_staging(
        "BEGIN;
         INSERT INTO price VALUES (100, 1, 'before the column');
         ALTER TABLE price ADD COLUMN currency char(3) NOT NULL DEFAULT 'EUR';
         INSERT INTO price VALUES (101, 2, 'after', 'USD');
         COMMIT;
         ALTER TABLE price RENAME COLUMN note TO remark;
         UPDATE price SET remark = 'renamed' WHERE id <= 5;
         ALTER TABLE price ALTER COLUMN amount TYPE numeric(12,4);
         INSERT INTO price VALUES (102, 2.0001, 'four places', 'GBP');
         ALTER TABLE price ALTER COLUMN currency DROP NOT NULL, ALTER COLUMN currency SET DEFAULT 'USD';
         INSERT INTO price (id, amount) VALUES (103, 1.2345);
         ALTER TABLE price DROP COLUMN remark;
         UPDATE price SET amount = amount + 1 WHERE id = 1;",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of the schema changes");
    assert_same(&pair, "price");
    let recorded = pair.on_production("SELECT count(*) FROM stagingprop.schema_changes");
    assert_eq!(recorded.trim(), "5", "one record per change");
    // Exactly once: another run applies nothing more.
    caught_up(&pair.config).await.expect("sync again");
    let recorded = pair.on_production("SELECT count(*) FROM stagingprop.schema_changes");
    assert_eq!(recorded.trim(), "5");

    // A required column dropped on staging while sync is down: at the next start production
    // still requires a column staging no longer sends, and the drop on its way accounts for it.
    pair.on_staging(
        "ALTER TABLE price ADD COLUMN sku text;
         UPDATE price SET sku = 'sku' || id;
         ALTER TABLE price ALTER COLUMN sku SET NOT NULL;",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of the new column");
    pair.on_staging(
        "ALTER TABLE price DROP COLUMN sku;
         INSERT INTO price (id, amount) VALUES (104, 4);",
    );
    caught_up(&pair.config)
        .await
        .expect("a start with the drop still on its way");
    assert_same(&pair, "price");
}

/// What `columns` leaves out: each column's identity and generation, and the primary key.
fn kinds_and_key(pair: &Pair, staging: bool, table: &str) -> String {
    let sql = format!(
        "SELECT string_agg(attname || ':' || attidentity::text || attgenerated::text, ', ' ORDER BY attnum)
                || ' / ' || coalesce((SELECT conname || ' ' || pg_get_constraintdef(oid)
                                        FROM pg_constraint
                                       WHERE conrelid = '{table}'::regclass AND contype = 'p'), '-')
           FROM pg_attribute
          WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped"
    );
    let out = if staging {
        pair.on_staging(&sql)
    } else {
        pair.on_production(&sql)
    };
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_generation_expressions_and_primary_keys_follow() {
    let pair = PairBuilder::new(
        "ddl_kinds",
        "CREATE TABLE price (id int PRIMARY KEY, amount numeric(10,2), code int,
                             total numeric GENERATED ALWAYS AS (amount * 2) STORED);",
    )
    .table("public.price", "")
    .init()
    .await;
    pair.on_staging(
        "INSERT INTO price (id, amount, code) SELECT g, g, g FROM generate_series(1, 20) g",
    );
    caught_up(&pair.config).await.expect("sync");
    // Each change with rows that need it: an identity ALWAYS insert (production must override
    // its own identity), the old generated column written, rows found by the new key.
    pair.on_staging(
        "ALTER TABLE price ALTER COLUMN code SET NOT NULL,
                          ALTER COLUMN code ADD GENERATED ALWAYS AS IDENTITY (START WITH 100);
         INSERT INTO price (id, amount) VALUES (21, 21);
         ALTER TABLE price ALTER COLUMN total DROP EXPRESSION;
         UPDATE price SET total = 0 WHERE id = 1;
         BEGIN;
         ALTER TABLE price DROP CONSTRAINT price_pkey,
                           ADD CONSTRAINT price_code_key PRIMARY KEY (code);
         UPDATE price SET amount = 5 WHERE code = 3;
         COMMIT;
         DELETE FROM price WHERE code = 4;
         ALTER TABLE price ALTER COLUMN code SET GENERATED BY DEFAULT;
         INSERT INTO price (id, amount, code) VALUES (22, 22, 500);
         ALTER INDEX price_code_key RENAME TO price_pkey;
         ALTER TABLE price ALTER COLUMN code DROP IDENTITY;
         INSERT INTO price (id, amount, code) VALUES (23, 23, 501);",
    );
    caught_up(&pair.config).await.expect("sync of the changes");
    assert_same(&pair, "price");
    assert_eq!(
        kinds_and_key(&pair, true, "price"),
        kinds_and_key(&pair, false, "price"),
        "identities, generation or the key differ"
    );
    assert!(
        kinds_and_key(&pair, false, "price").ends_with("price_pkey PRIMARY KEY (code)"),
        "{}",
        kinds_and_key(&pair, false, "price")
    );
    // A new generation expression (PostgreSQL 17's SET EXPRESSION) where both sides have it.
    let major = |out: String| out.trim().parse::<u32>().unwrap_or(0) / 10000;
    if major(pair.on_staging("SHOW server_version_num")) >= 17
        && major(pair.on_production("SHOW server_version_num")) >= 17
    {
        pair.on_staging(
            "ALTER TABLE price ADD COLUMN twice numeric GENERATED ALWAYS AS (amount * 2) STORED;
             ALTER TABLE price ALTER COLUMN twice SET EXPRESSION AS (amount * 3);
             UPDATE price SET amount = amount + 1 WHERE code <= 10;",
        );
        caught_up(&pair.config)
            .await
            .expect("sync of a new expression");
        assert_same(&pair, "price");
        // PostgreSQL 18 refuses updates of a REPLICA IDENTITY FULL table (below) with a
        // generated column the publication leaves out.
        pair.on_staging("ALTER TABLE price DROP COLUMN twice");
    }
    // Losing the key stops before anything of its transaction, and goes on once production's
    // table is keyless as staging's.
    pair.on_staging(
        "BEGIN;
         INSERT INTO price (id, amount, code) VALUES (24, 24, 502);
         ALTER TABLE price DROP CONSTRAINT price_pkey, REPLICA IDENTITY FULL;
         COMMIT;
         UPDATE price SET amount = 7 WHERE code = 502;",
    );
    let refused = caught_up(&pair.config)
        .await
        .expect_err("a lost key stops sync");
    assert!(
        refused
            .to_string()
            .contains("is now none on staging, production's is (code)"),
        "{refused}"
    );
    assert_eq!(
        pair.on_production("SELECT count(*) FROM price WHERE code = 502")
            .trim(),
        "0"
    );
    pair.on_production("ALTER TABLE price DROP CONSTRAINT price_pkey, REPLICA IDENTITY FULL");
    caught_up(&pair.config)
        .await
        .expect("sync once production's table is keyless too");
    assert_same(&pair, "price");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_production_cannot_take_stops_sync_until_production_is_fixed() {
    let pair = PairBuilder::new("ddl_refused", SCHEMA)
        .table("public.price", "on_conflict = \"skip\"")
        .init()
        .await;
    pair.on_staging("INSERT INTO price VALUES (1, 1, 'a')");
    caught_up(&pair.config).await.expect("sync");
    // Production's own row has no note; staging's rows all do.
    pair.on_production("INSERT INTO price VALUES (-1, 0, NULL)");
    pair.on_staging(
        "ALTER TABLE price ALTER COLUMN note SET NOT NULL;
         INSERT INTO price VALUES (2, 2, 'b');",
    );
    let err = caught_up(&pair.config)
        .await
        .expect_err("production cannot take it");
    let message = err.to_string();
    assert!(
        message.contains("SET NOT NULL") && message.contains("contains null values"),
        "{message}"
    );
    assert!(matches!(
        err,
        SyncError::Apply(stagingprop::ApplyError::SchemaChange(_))
    ));
    let applied = pair.on_production("SELECT count(*) FROM price WHERE id = 2");
    assert_eq!(
        applied.trim(),
        "0",
        "nothing of the transaction was applied"
    );
    pair.on_production("UPDATE price SET note = 'production' WHERE id = -1");
    caught_up(&pair.config)
        .await
        .expect("sync once production is fixed");
    let not_null = pair.on_production(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'price'::regclass AND attname = 'note'",
    );
    assert_eq!(not_null.trim(), "t");
    let applied = pair.on_production("SELECT count(*) FROM price WHERE id = 2");
    assert_eq!(applied.trim(), "1");
}

/// A remapped table follows staging's schema changes (its key widened from integer to bigint
/// too), a column added elsewhere with a foreign key to it is translated from its first row (the
/// bug: once staging had such a column, sync refused to start, "does not exist on production",
/// before it could apply the change that adds it),
/// and a reference column renamed while sync was down is translated before and after the
/// rename; a rename of a column `[[references]]` names stops sync with nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remapped_tables_follow_changes_and_new_references_are_translated() {
    let pair = PairBuilder::new(
        "ddl_remapped",
        "CREATE SEQUENCE catentry_seq START 1000000;
         CREATE TABLE catentry (catentry_id int PRIMARY KEY, partnumber text NOT NULL, name text);
         CREATE TABLE offer (offer_id int PRIMARY KEY, price numeric(10,2));
         CREATE TABLE attr (attr_id int PRIMARY KEY, catentry_ref bigint);",
    )
    .table(
        "public.catentry",
        "key = { rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }",
    )
    .table("public.offer", "")
    .table("public.attr", "")
    .extra("[[references]]\ncolumn = \"public.attr.catentry_ref\"\ntable = \"public.catentry\"\n")
    .init()
    .await;
    pair.on_production("INSERT INTO catentry VALUES (1, 'PROD-1', 'production-born')");
    pair.on_staging("INSERT INTO catentry VALUES (1, 'A', 'a'), (2, 'B', 'b')");
    caught_up(&pair.config).await.expect("sync");
    let remapped = || {
        pair.on_production("SELECT catentry_id FROM catentry WHERE partnumber = 'A'")
            .trim()
            .to_owned()
    };
    assert_eq!(
        remapped(),
        "1000000",
        "staging's 1 collided with production's own row"
    );

    pair.on_staging(
        "BEGIN;
         ALTER TABLE catentry ADD COLUMN buyable int NOT NULL DEFAULT 1;
         INSERT INTO catentry VALUES (3, 'C', 'c', 0);
         COMMIT;
         ALTER TABLE catentry RENAME COLUMN name TO title;
         UPDATE catentry SET title = 'one' WHERE catentry_id = 1;
         ALTER TABLE catentry ALTER COLUMN catentry_id TYPE bigint;
         BEGIN;
         ALTER TABLE offer ADD COLUMN catentry_id bigint REFERENCES catentry;
         INSERT INTO offer VALUES (10, 9.99, 1), (11, 5, 2);
         COMMIT;
         UPDATE offer SET catentry_id = 1 WHERE offer_id = 11;
         INSERT INTO catentry VALUES (4, 'D', 'd', 1);
         INSERT INTO offer VALUES (12, 1, 4);",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of the remapped table's changes");
    for table in ["catentry", "offer"] {
        assert_eq!(
            columns(&pair, true, table),
            columns(&pair, false, table),
            "the columns of {table} differ"
        );
    }
    assert_eq!(remapped(), "1000000");
    let production = pair.on_production(
        "SELECT string_agg(concat_ws(' ', catentry_id, partnumber, title, buyable), ', ' ORDER BY partnumber)
           FROM catentry",
    );
    assert_eq!(
        production.trim(),
        "1000000 A one 1, 2 B b 1, 3 C c 0, 4 D d 1, 1 PROD-1 production-born 1",
        "staging's rows under their production keys, production's own row untouched"
    );
    let offers = pair.on_production(
        "SELECT string_agg(offer_id || ' ' || catentry_id, ', ' ORDER BY offer_id) FROM offer",
    );
    assert_eq!(
        offers.trim(),
        "10 1000000, 11 1000000, 12 4",
        "the new reference follows catentry's key map"
    );

    // Renamed while sync is down: at its start production's foreign key still names the
    // column, and the rows before the rename are translated as well as those after.
    pair.on_staging(
        "INSERT INTO offer VALUES (13, 1, 1);
         ALTER TABLE offer RENAME COLUMN catentry_id TO ce_id;
         INSERT INTO offer VALUES (14, 1, 1);",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of the renamed reference");
    assert_eq!(
        columns(&pair, true, "offer"),
        columns(&pair, false, "offer")
    );
    let offers = pair.on_production(
        "SELECT string_agg(offer_id || ' ' || ce_id, ', ' ORDER BY offer_id) FROM offer WHERE offer_id > 12",
    );
    assert_eq!(offers.trim(), "13 1000000, 14 1000000");

    let (stop, running) = support::sync_in_background(&pair.config, tracing::info_span!("sync"));
    pair.on_staging("INSERT INTO attr VALUES (1, 1)");
    production_until(
        &pair,
        "SELECT catentry_ref = 1000000 FROM attr WHERE attr_id = 1",
    )
    .await;
    pair.on_staging(
        "BEGIN;
         INSERT INTO catentry VALUES (5, 'E', 'e', 1);
         ALTER TABLE attr RENAME COLUMN catentry_ref TO ce_ref;
         COMMIT;",
    );
    let err = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("sync stops")
        .expect("sync task")
        .expect_err("a renamed configured reference stops sync");
    drop(stop);
    let message = err.to_string();
    assert!(
        message.contains("public.attr.catentry_ref")
            && message.contains("renamed it to ce_ref")
            && message.contains("[[references]]")
            && message.contains("copy --tables"),
        "{message}"
    );
    assert!(
        matches!(
            err,
            SyncError::Apply(stagingprop::ApplyError::SchemaChange(_))
        ),
        "{err:?}"
    );
    let applied = pair.on_production("SELECT count(*) FROM catentry WHERE partnumber = 'E'");
    assert_eq!(
        applied.trim(),
        "0",
        "nothing of the transaction was applied"
    );
}

/// With the spool on, everything sync applies was read back from the spool's records: a schema
/// change travels there in its place among the rows (the bug: the spool kept no decoding
/// message, so the change never reached production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_primary_key_of_a_remapped_table_stops_sync() {
    let pair = PairBuilder::new(
        "ddl_remapped_key",
        "CREATE SEQUENCE catentry_seq START 1000000;
         CREATE TABLE catentry (catentry_id int PRIMARY KEY, partnumber text NOT NULL);",
    )
    .table(
        "public.catentry",
        "key = { rule = \"remap-on-conflict\", sequence = \"public.catentry_seq\" }",
    )
    .init()
    .await;
    pair.on_staging("INSERT INTO catentry VALUES (1, 'A')");
    caught_up(&pair.config).await.expect("sync");
    pair.on_staging(
        "BEGIN;
         INSERT INTO catentry VALUES (2, 'B');
         ALTER TABLE catentry DROP CONSTRAINT catentry_pkey,
                              ADD PRIMARY KEY (catentry_id, partnumber);
         COMMIT;",
    );
    let err = caught_up(&pair.config)
        .await
        .expect_err("a remapped table's new key stops sync");
    let message = err.to_string();
    assert!(
        message.contains("changed its primary key") && message.contains("copy --tables"),
        "{message}"
    );
    assert_eq!(
        pair.on_production("SELECT count(*) FROM catentry WHERE partnumber = 'B'")
            .trim(),
        "0",
        "nothing of the transaction was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_travel_through_the_spool() {
    let spool = support::Scratch::new("ddl-spool");
    let pair = PairBuilder::new("ddl_spool", SCHEMA)
        .table("public.price", "")
        .extra(&format!("[spool]\ndir = \"{}\"", spool.0.display()))
        .init()
        .await;
    pair.on_staging("INSERT INTO price VALUES (1, 1, 'a')");
    pair.on_staging(
        "ALTER TABLE price ADD COLUMN stock int NOT NULL DEFAULT 3;
         INSERT INTO price VALUES (2, 2, 'b', 7);
         ALTER TABLE price RENAME COLUMN note TO remark;",
    );
    pair.on_staging("CREATE INDEX price_stock ON price (stock)");
    pair.on_staging("UPDATE price SET remark = 'c', stock = 9 WHERE id = 1");
    caught_up(&pair.config)
        .await
        .expect("sync through the spool");
    assert_same(&pair, "price");
    assert_eq!(
        indexes_and_constraints(&pair, true, "price"),
        indexes_and_constraints(&pair, false, "price")
    );
    let mut lines = Vec::new();
    stagingprop::ops::tail::tail_spool(&spool.0, None, &mut lines).expect("tail --spool");
    let lines = String::from_utf8(lines).unwrap();
    assert_eq!(
        lines.matches("\"prefix\":\"stagingprop.ddl\"").count(),
        3,
        "the spool holds each schema change: {lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_mode_waits_for_the_operator_and_a_flag_applies() {
    let pair = PairBuilder::new("ddl_stop", SCHEMA)
        .table("public.price", "")
        .extra("[ddl]\nmode = \"stop\"")
        .init()
        .await;
    pair.on_staging("INSERT INTO price VALUES (1, 1, 'a')");
    caught_up(&pair.config).await.expect("sync");
    pair.on_staging(
        "ALTER TABLE price ADD COLUMN stock int NOT NULL DEFAULT 0;
         INSERT INTO price VALUES (2, 2, 'b', 7);",
    );
    match caught_up(&pair.config).await {
        Err(SyncError::SchemaChangeWaiting {
            statement, plan, ..
        }) => {
            assert!(statement.contains("ADD COLUMN stock"), "{statement}");
            assert!(
                plan.contains("ADD COLUMN \"stock\" integer DEFAULT 0 NOT NULL"),
                "{plan}"
            );
        }
        other => panic!("expected to wait for the operator, got {other:?}"),
    }
    let applied = pair.on_production("SELECT count(*) FROM price WHERE id = 2");
    assert_eq!(applied.trim(), "0");
    // status tells the operator what waits.
    let status = |config| async move {
        stagingprop::ops::status::status(config, &stagingprop::ops::status::Thresholds::default())
            .await
            .expect("status")
    };
    let st = status(&pair.config).await;
    assert_eq!(st.schema_changes_waiting, vec!["public.price".to_owned()]);
    assert!(
        st.problems
            .iter()
            .any(|p| p.contains("--apply-schema-change")),
        "{:?}",
        st.problems
    );
    let options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(3),
        apply_schema_change: true,
        ..Default::default()
    };
    stagingprop::sync::run(&pair.config, &options, std::future::pending())
        .await
        .expect("sync --apply-schema-change");
    assert_same(&pair, "price");
    let st = status(&pair.config).await;
    assert!(st.schema_changes_waiting.is_empty(), "{st:?}");
    assert!(
        !st.problems.iter().any(|p| p.contains("schema change")),
        "{:?}",
        st.problems
    );
    assert!(
        st.last_schema_change
            .is_some_and(|c| c.statement.contains("ADD COLUMN stock")),
        "the last change applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_managed_table_keeps_production_s_columns() {
    let pair = PairBuilder::new(
        "ddl_partial",
        "CREATE TABLE offer (id int PRIMARY KEY, price numeric(10,2), merchant_note text);",
    )
    .table("public.offer", "exclude_columns = [\"merchant_note\"]")
    .init()
    .await;
    pair.on_staging("INSERT INTO offer VALUES (1, 1, 'staging note')");
    caught_up(&pair.config).await.expect("sync");
    pair.on_production("UPDATE offer SET merchant_note = 'production note'");
    // A managed column retyped, and production's own column changed on staging.
    // A column added on staging (outside the list), and production's own column changed there.
    // (PostgreSQL refuses to retype a column a publication's column list names.)
    pair.on_staging(
        "ALTER TABLE offer ADD COLUMN margin numeric;
         ALTER TABLE offer ALTER COLUMN merchant_note TYPE varchar(500);
         UPDATE offer SET price = 2, margin = 1;",
    );
    caught_up(&pair.config).await.expect("sync");
    let production = pair.on_production("SELECT price, merchant_note FROM offer");
    assert_eq!(production.trim(), "2.00|production note");
    let margin = pair.on_production(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'offer'::regclass AND attname = 'margin'",
    );
    assert_eq!(
        margin.trim(),
        "0",
        "a column outside the list stays staging's"
    );
    let note_type = pair.on_production(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = 'offer'::regclass AND attname = 'merchant_note'",
    );
    assert_eq!(
        note_type.trim(),
        "text",
        "production's own column was left alone"
    );
}

/// Changes and rows keep coming while sync is killed with SIGKILL at random moments: every change
/// is applied exactly once and production ends as staging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_columns_change_applies_each_change_once() {
    let name = "sigkill_while_columns_change_applies_each_change_once";
    let seed = test_seed(name);
    let mut rng = Rng::new(seed);
    let pair = faults::setup(
        shared_staging(),
        shared_production(),
        "ddl_kill",
        "CREATE TABLE item (id int PRIMARY KEY, v text);",
        &[("item", "id")],
        "",
    )
    .await;
    let mut next_id = 0;
    let mut columns = 0;
    let mut drops = 0;
    let mut dropped_upto = 0;
    let mut indexes = 0;
    let mut sync = KilledSync::start(&pair, "ddl-kill");
    for round in 0..12 {
        // A column added with a default, rows that use it, and now and then a column dropped.
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..rng.between(5, 50) {
            next_id += 1;
            sql.push_str(&format!(
                "INSERT INTO item (id, v) VALUES ({next_id}, 'r{round}');\n"
            ));
        }
        columns += 1;
        sql.push_str(&format!(
            "ALTER TABLE item ADD COLUMN c{columns} int NOT NULL DEFAULT {columns};\n\
             UPDATE item SET c{columns} = id WHERE id % 3 = 0;\n"
        ));
        // An index on it now and then: built concurrently after the transaction, maybe by the
        // next sync when this one is killed first.
        if rng.percent(50) {
            indexes += 1;
            sql.push_str(&format!(
                "CREATE INDEX item_c{columns}_idx ON item (c{columns});\n"
            ));
        }
        if columns > 2 && rng.percent(40) && dropped_upto < columns - 2 {
            dropped_upto = columns - 2;
            drops += 1;
            sql.push_str(&format!("ALTER TABLE item DROP COLUMN c{dropped_upto};\n"));
        }
        sql.push_str("COMMIT;");
        pair.staging.sql(&sql);
        tokio::time::sleep(Duration::from_millis(rng.between(0, 300))).await;
        sync.kill_now_and_then(&mut rng);
    }
    sync.settle(seed).await;
    assert_eq!(
        schema_of(&pair.staging, "item"),
        schema_of(&pair.production, "item"),
        "seed {seed}"
    );
    pair.assert_equal();
    // Exactly once: one record per change, none twice.
    let recorded: u32 = pair
        .production
        .value("SELECT count(*) FROM stagingprop.schema_changes")
        .parse()
        .unwrap();
    assert_eq!(recorded, columns + drops + indexes, "seed {seed}");
}

/// Tables created (and now and then dropped) on staging in a schema `[[table_patterns]]`
/// manages, each in a transaction with rows of it and of another table, while sync is killed
/// with SIGKILL at random moments: every created table reaches production once, with its rows,
/// and each creation and drop is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_tables_are_created_creates_each_once() {
    let name = "sigkill_while_tables_are_created_creates_each_once";
    let seed = test_seed(name);
    let mut rng = Rng::new(seed);
    let pair = faults::setup(
        shared_staging(),
        shared_production(),
        "ddl_kill_create",
        "CREATE TABLE item (id int PRIMARY KEY, v text);",
        &[("item", "id")],
        // Ends [sync]: the pattern manages every other table of public.
        "[[table_patterns]]\nschema = \"public\"",
    )
    .await;
    let mut next_id = 0;
    let mut created: Vec<u32> = Vec::new();
    let mut dropped = 0;
    let mut sync = KilledSync::start(&pair, "ddl-kill-create");
    for round in 0..8u32 {
        let mut sql = String::from("BEGIN;\n");
        for _ in 0..rng.between(5, 30) {
            next_id += 1;
            sql.push_str(&format!(
                "INSERT INTO item VALUES ({next_id}, 'r{round}');\n"
            ));
        }
        sql.push_str(&format!(
            "CREATE TABLE t{round} (id serial PRIMARY KEY, v text NOT NULL DEFAULT 'd', \
             item_id int REFERENCES item);\n\
             INSERT INTO t{round} (v, item_id) SELECT 'v' || g, {next_id} FROM generate_series(1, {}) g;\n",
            rng.between(1, 40)
        ));
        if let Some(&older) = created.last() {
            sql.push_str(&format!(
                "UPDATE t{older} SET v = 'later' WHERE id % 2 = 0;\n"
            ));
        }
        if created.len() > 2 && rng.percent(30) {
            let gone = created.remove(0);
            dropped += 1;
            sql.push_str(&format!("DROP TABLE t{gone};\n"));
        }
        created.push(round);
        sql.push_str("COMMIT;");
        pair.staging.sql(&sql);
        tokio::time::sleep(Duration::from_millis(rng.between(0, 300))).await;
        sync.kill_now_and_then(&mut rng);
    }
    sync.settle(seed).await;
    pair.assert_equal();
    for round in &created {
        let table = format!("t{round}");
        assert_eq!(
            rows_of(&pair.staging, &table),
            rows_of(&pair.production, &table),
            "seed {seed}: {table}"
        );
    }
    // Exactly once: one record per creation and per drop (production keeps a dropped table).
    let recorded: usize = pair
        .production
        .value("SELECT count(*) FROM stagingprop.schema_changes")
        .parse()
        .unwrap();
    assert_eq!(recorded, created.len() + 2 * dropped, "seed {seed}");
    let tables_on_production: usize = pair
        .production
        .value("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename ~ '^t[0-9]+$'")
        .parse()
        .unwrap();
    assert_eq!(tables_on_production, created.len() + dropped, "seed {seed}");
}

/// A table's indexes (with whether each is valid) and constraints, from a catalog.
/// The catalogue's own tables changing (columns added, renamed, retyped and dropped, defaults,
/// a constraint, an index built concurrently) and tables created, renamed and dropped
/// (`on_staging_drop = "drop"`) in a schema made on staging after init, in transactions of their own and inside the
/// catalogue workload's, while that workload runs and sync is killed with SIGKILL at random: the
/// catalogue's rows and catalogs equal, every table there once with its rows, every dropped one
/// gone, one record per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_tables_come_and_go_beside_the_catalogue_workload() {
    let name = "sigkill_while_tables_come_and_go_beside_the_catalogue_workload";
    let seed = test_seed(name);
    let mut rng = Rng::new(seed);
    let pair = faults::setup(
        shared_staging(),
        shared_production(),
        "ddl_kill_cat",
        faults::CATALOGUE,
        faults::CATALOGUE_TABLES,
        "[[table_patterns]]\nschema = \"extra\"\non_staging_drop = \"drop\"",
    )
    .await;
    pair.staging.sql("CREATE SCHEMA extra");
    let mut catalogue = faults::Catalogue::new(seed);
    // The pattern's tables on staging: t<n> as created, r<n> once renamed.
    let mut live: Vec<String> = Vec::new();
    let (mut created, mut dropped, mut renamed) = (0u32, 0usize, 0usize);
    let (mut added, mut changes) = (Vec::new(), 0);
    let mut sync = KilledSync::start(&pair, "ddl-kill-cat");
    for round in 0..10u32 {
        let mut sql = String::new();
        for _ in 0..rng.between(5, 40) {
            sql.push_str(&catalogue.transaction());
        }
        // A table made with its rows, alone or inside a catalogue transaction; an older one
        // written to, now and then one renamed and one dropped.
        let mut ddl = format!(
            "CREATE TABLE extra.t{created} (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
             v text NOT NULL, n int DEFAULT 0);\n\
             INSERT INTO extra.t{created} (v) SELECT 'v' || g FROM generate_series(1, {}) g;\n",
            rng.between(1, 50)
        );
        if let Some(older) = live.last() {
            ddl.push_str(&format!(
                "UPDATE extra.{older} SET n = n + 1 WHERE id % 2 = 0;\n"
            ));
        }
        if let Some(i) = live.iter().position(|t| t.starts_with('t'))
            && rng.percent(40)
        {
            let new_name = live[i].replacen('t', "r", 1);
            ddl.push_str(&format!(
                "ALTER TABLE extra.{} RENAME TO {new_name};\n\
                 UPDATE extra.{new_name} SET n = n + 10 WHERE id % 3 = 0;\n",
                live[i]
            ));
            live[i] = new_name;
            renamed += 1;
        }
        if live.len() > 2 && rng.percent(40) {
            let gone = live.remove(rng.below(live.len() as u64) as usize);
            dropped += 1;
            ddl.push_str(&format!("DROP TABLE extra.{gone};\n"));
        }
        live.push(format!("t{created}"));
        created += 1;
        let (change, made) = catalogue_change(round, &mut added);
        ddl.push_str(&change);
        changes += made;
        if rng.percent(50) {
            let txn = catalogue.transaction();
            let body = txn
                .trim_end()
                .strip_suffix("COMMIT;")
                .expect("a transaction");
            sql.push_str(&format!("{body}{ddl}COMMIT;\n"));
        } else {
            sql.push_str(&format!("BEGIN;\n{ddl}COMMIT;\n"));
        }
        for _ in 0..rng.between(0, 20) {
            sql.push_str(&catalogue.transaction());
        }
        pair.staging.sql(&sql);
        tokio::time::sleep(Duration::from_millis(rng.between(0, 400))).await;
        sync.kill_now_and_then(&mut rng);
    }
    sync.settle(seed).await;
    pair.assert_equal();
    for (table, _) in faults::CATALOGUE_TABLES {
        assert_eq!(
            schema_of(&pair.staging, table),
            schema_of(&pair.production, table),
            "seed {seed}: {table}"
        );
    }
    for t in &live {
        let table = format!("extra.{t}");
        assert_eq!(
            rows_of(&pair.staging, &table),
            rows_of(&pair.production, &table),
            "seed {seed}: {table}"
        );
    }
    let on_production: Vec<String> = pair
        .production
        .sql("SELECT tablename FROM pg_tables WHERE schemaname = 'extra' ORDER BY tablename::text COLLATE \"C\"")
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    let mut expected = live.clone();
    expected.sort();
    assert_eq!(
        on_production, expected,
        "seed {seed}: dropped tables go, renamed ones are renamed, the others stay"
    );
    let recorded: usize = pair
        .production
        .value("SELECT count(*) FROM stagingprop.schema_changes WHERE table_name LIKE 'extra.%'")
        .parse()
        .unwrap();
    assert_eq!(
        recorded,
        created as usize + dropped + renamed,
        "seed {seed}: each applied once"
    );
    let recorded: usize = pair
        .production
        .value(
            "SELECT count(*) FROM stagingprop.schema_changes WHERE table_name NOT LIKE 'extra.%'",
        )
        .parse()
        .unwrap();
    assert_eq!(
        recorded, changes,
        "seed {seed}: each catalogue change applied once"
    );
}

/// Round `round`'s change of the catalogue's own tables (each kind once in seven rounds; the
/// workload names catentry's columns and fills the others' first ones, so none breaks it),
/// and how many schema changes it makes. `added` holds the columns added to catentry.
fn catalogue_change(round: u32, added: &mut Vec<u32>) -> (String, usize) {
    match round % 7 {
        0 => {
            added.push(round);
            (
                format!(
                    "ALTER TABLE catentry ADD COLUMN extra{round} int NOT NULL DEFAULT {round};\n\
                     UPDATE catentry SET extra{round} = counter WHERE catentry_id % 2 = 0;\n"
                ),
                1,
            )
        }
        1 => (
            format!("CREATE INDEX catentdesc_name_{round} ON catentdesc (name);\n"),
            1,
        ),
        2 => (
            format!(
                "ALTER TABLE offer ADD COLUMN note{round} text DEFAULT 'n';\n\
                 ALTER TABLE offer RENAME COLUMN note{round} TO remark{round};\n"
            ),
            2,
        ),
        3 => (
            format!(
                "ALTER TABLE catentry ALTER COLUMN price TYPE numeric({},2);\n",
                14 + round
            ),
            1,
        ),
        4 => (
            format!(
                "ALTER TABLE offerprice ADD CONSTRAINT offerprice_currency_{round} \
                 CHECK (length(currency) = 3);\n"
            ),
            1,
        ),
        5 if !added.is_empty() => {
            let gone = added.remove(0);
            (
                format!("ALTER TABLE catentry DROP COLUMN extra{gone};\n"),
                1,
            )
        }
        _ => (
            format!("ALTER TABLE catentdesc ALTER COLUMN name SET DEFAULT 'unnamed {round}';\n"),
            1,
        ),
    }
}

/// Sync run as a child process, killed with SIGKILL now and then and started again, each run
/// logging to a file of its own.
struct KilledSync<'a> {
    pair: &'a faults::FaultPair,
    name: &'static str,
    runs: u32,
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl<'a> KilledSync<'a> {
    fn start(pair: &'a faults::FaultPair, name: &'static str) -> KilledSync<'a> {
        let (child, log) = faults::spawn_sync(pair, &[], &format!("{name}-1.log"));
        KilledSync {
            pair,
            name,
            runs: 1,
            child,
            log,
        }
    }

    /// Half the time: SIGKILL, and another sync.
    fn kill_now_and_then(&mut self, rng: &mut Rng) {
        if rng.percent(50) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.runs += 1;
            let log = format!("{}-{}.log", self.name, self.runs);
            (self.child, self.log) = faults::spawn_sync(self.pair, &[], &log);
        }
    }

    /// Waits until production has applied all staging has and every index build ran (they run
    /// once their transaction committed), then stops sync; panics with its log if production
    /// did not get there.
    async fn settle(mut self, seed: u64) {
        let lsn = self.pair.staging_lsn();
        let mut applied = self
            .pair
            .try_wait_applied(&lsn, Duration::from_secs(90))
            .await;
        let pending = "SELECT count(*) FROM stagingprop.index_builds WHERE done_at IS NULL";
        for _ in 0..300 {
            if applied.is_err() || self.pair.production.value(pending) == "0" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if applied.is_ok() && self.pair.production.value(pending) != "0" {
            applied = Err("index builds still pending 30 s after the rows were applied".into());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = applied {
            // Every run's log, and what staging captured and production applied of the schema.
            let mut all = String::new();
            for run in 1..=self.runs {
                let path = self.log.with_file_name(format!("{}-{run}.log", self.name));
                all.push_str(&format!("--- sync run {run}:\n{}", faults::read_log(&path)));
            }
            let captured = self
                .pair
                .staging
                .sql("SELECT relid, shape->>'name', change_id FROM stagingprop.shapes ORDER BY 1");
            let applied = self.pair.production.sql(
                "SELECT change_id, table_name, lsn FROM stagingprop.schema_changes ORDER BY 1",
            );
            panic!(
                "seed {seed}: {e}\n{all}--- captured on staging:\n{captured}--- applied on production:\n{applied}"
            );
        }
    }
}

/// A table's rows, counted and in key order (`id`).
fn rows_of(db: &faults::Db, table: &str) -> String {
    db.value(&format!(
        "SELECT count(*) || ' ' || coalesce(string_agg(t::text, ',' ORDER BY id), '') FROM {table} t"
    ))
}

/// A table's shape as the catalogs show it: columns in order (type, NOT NULL, default,
/// identity, generation), indexes (and whether valid) and constraints.
fn schema_of(db: &faults::Db, table: &str) -> String {
    db.value(&format!(
        "SELECT (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
                                   || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '-')
                                   || ' ' || a.attidentity::text || a.attgenerated::text,
                                   ', ' ORDER BY a.attnum)
                   FROM pg_attribute a
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = '{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped)
             || ' | ' || coalesce((SELECT string_agg(d, '; ' ORDER BY d) FROM (
                  SELECT pg_get_indexdef(indexrelid)
                         || CASE WHEN indisvalid THEN '' ELSE ' INVALID' END d
                    FROM pg_index WHERE indrelid = '{table}'::regclass
                  UNION ALL
                  SELECT conname || ' ' || pg_get_constraintdef(oid)
                    FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype <> 'n') s), '')"
    ))
}

/// Polls `sql` on production until it answers `t` (30 s at most).
async fn production_until(pair: &Pair, sql: &str) {
    for _ in 0..300 {
        if pair.on_production(sql).trim() == "t" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let activity = pair.on_production(
        "SELECT string_agg(state || ' ' || coalesce(wait_event, '-') || ' ' || left(query, 80), E'\\n') \
           FROM pg_stat_activity WHERE backend_type = 'client backend'",
    );
    let builds = pair.on_production("SELECT string_agg(id || ' ' || index_name || ' ' || coalesce(done_at::text, 'pending'), E'\\n' ORDER BY id) FROM stagingprop.index_builds");
    panic!(
        "timed out waiting on production for: {sql}\nproduction's sessions:\n{activity}\n{builds}"
    );
}

/// The indexes (valid or not) and constraints of `table` on one side, from its catalogs.
fn indexes_and_constraints(pair: &Pair, staging: bool, table: &str) -> String {
    let sql = format!(
        "SELECT coalesce(string_agg(d, '; ' ORDER BY d), '') FROM (
           SELECT pg_get_indexdef(indexrelid) || CASE WHEN indisvalid THEN '' ELSE ' INVALID' END d
             FROM pg_index WHERE indrelid = '{table}'::regclass
           UNION ALL
           SELECT conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype <> 'n') s"
    );
    let out = if staging {
        pair.on_staging(&sql)
    } else {
        pair.on_production(&sql)
    };
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn indexes_and_constraints_follow_and_a_build_cut_short_runs_again() {
    let pair = PairBuilder::new(
        "ddl_indexes",
        "CREATE TABLE category (id int PRIMARY KEY, name text);
         CREATE TABLE price (id int PRIMARY KEY, amount numeric(10,2), note text, category int);",
    )
    .table("public.category", "")
    .table("public.price", "")
    .init()
    .await;
    pair.on_staging(
        "INSERT INTO category SELECT g, 'c' || g FROM generate_series(1, 5) g;
         INSERT INTO price SELECT g, g, 'n' || g, g % 5 + 1 FROM generate_series(1, 200) g;",
    );
    caught_up(&pair.config).await.expect("sync");
    // Each kind, with rows between them; CREATE INDEX CONCURRENTLY on staging too.
    pair.on_staging("CREATE INDEX price_amount ON price (amount)");
    pair.on_staging(
        "BEGIN;
         ALTER TABLE price ADD CONSTRAINT amount_positive CHECK (amount >= 0);
         INSERT INTO price VALUES (201, 1, 'n201', 1);
         ALTER TABLE price ADD CONSTRAINT price_category_fk
           FOREIGN KEY (category) REFERENCES category (id);
         ALTER TABLE price ADD CONSTRAINT price_note_amount UNIQUE (note, amount);
         COMMIT;",
    );
    pair.on_staging(
        "CREATE INDEX CONCURRENTLY price_lower_note ON price (lower(note)) WHERE amount > 1",
    );
    pair.on_staging(
        "ALTER INDEX price_amount RENAME TO price_by_amount;
         ALTER TABLE price RENAME CONSTRAINT amount_positive TO amount_not_negative;
         ALTER TABLE price DROP CONSTRAINT price_note_amount;
         INSERT INTO price VALUES (202, 2, 'n202', 2);",
    );
    pair.on_staging("DROP INDEX price_lower_note");
    pair.on_staging("CREATE UNIQUE INDEX price_note ON price (note)");
    // Later changes in the same transaction need the builds before them done: a rename of the
    // new index, a foreign key that needs a new unique index.
    pair.on_staging(
        "BEGIN;
         CREATE INDEX price_tmp ON price (category);
         ALTER INDEX price_tmp RENAME TO price_by_category;
         CREATE UNIQUE INDEX category_name ON category (name);
         ALTER TABLE price ADD COLUMN category_name text REFERENCES category (name);
         COMMIT;",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of indexes and constraints");
    assert_eq!(
        indexes_and_constraints(&pair, true, "price"),
        indexes_and_constraints(&pair, false, "price")
    );
    assert_same(&pair, "price");
    let builds = pair
        .on_production("SELECT count(*) || ' ' || count(done_at) FROM stagingprop.index_builds");
    assert_eq!(
        builds.trim(),
        "6 6",
        "built and dropped after their transactions, or in them"
    );
    assert_eq!(
        indexes_and_constraints(&pair, true, "category"),
        indexes_and_constraints(&pair, false, "category")
    );

    // A build production's own rows stop: sync names them, and builds once they are fixed.
    // Production's own row 1000 repeats staging's row 5 in (amount, category).
    pair.on_production("INSERT INTO price VALUES (1000, 5, 'own', 1)");
    pair.on_staging("CREATE UNIQUE INDEX price_amount_category ON price (amount, category)");
    let err = caught_up(&pair.config)
        .await
        .expect_err("production's duplicates stop the build");
    let message = err.to_string();
    assert!(
        message.contains("price_amount_category") && message.contains("(5.00, 1)"),
        "{message}"
    );
    assert!(matches!(err, SyncError::Apply(_)), "{message}");
    pair.on_production("DELETE FROM price WHERE id = 1000");
    caught_up(&pair.config).await.expect("sync after the fix");

    // A build cut short (its backend terminated while it waits for production's own writer)
    // leaves an invalid index: the next attempt drops it and builds it again.
    let holder = Endpoint::from_db_config(&pair.config.production)
        .expect("production's endpoint")
        .connect()
        .await
        .expect("connect");
    holder
        .batch_execute("BEGIN; LOCK TABLE price IN ROW EXCLUSIVE MODE")
        .await
        .expect("production's own writer");
    pair.on_staging("CREATE INDEX price_category ON price (category, amount)");
    let (_stop, running) = support::sync_in_background(&pair.config, tracing::Span::none());
    production_until(
        &pair,
        "SELECT count(*) = 1 FROM pg_stat_progress_create_index \
          WHERE relid = 'price'::regclass",
    )
    .await;
    pair.on_production(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_progress_create_index \
          WHERE relid = 'price'::regclass",
    );
    holder.batch_execute("COMMIT").await.expect("commit");
    let result = tokio::time::timeout(Duration::from_secs(5), running).await;
    if let Ok(ended) = result {
        // The lost session ended the run: the next one finishes the build.
        let err = ended
            .expect("sync task")
            .expect_err("the session was terminated");
        eprintln!("sync ended with: {err}");
        caught_up(&pair.config)
            .await
            .expect("sync after the lost session");
    }
    production_until(
        &pair,
        "SELECT count(*) = 0 FROM stagingprop.index_builds WHERE done_at IS NULL",
    )
    .await;
    assert_eq!(
        indexes_and_constraints(&pair, true, "price"),
        indexes_and_constraints(&pair, false, "price")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_committed_while_copy_starts_refuses_it_and_later_ones_follow_the_hand_off()
{
    let pair = PairBuilder::new("ddl_copy", SCHEMA)
        .table("public.price", "")
        .build();
    support::init_without_slot(&pair.config).await;
    pair.on_staging("INSERT INTO price SELECT g, g, 'n' || g FROM generate_series(1, 2000) g");
    let scratch = support::Scratch::new("ddl_copy");
    let config = pair.write_config(&scratch.0);
    // A schema change in flight as the copy starts: the copy compares the tables, then the
    // snapshot it takes with the sync slot waits for that transaction, which commits first.
    let staging = support::endpoint(&pair.staging_cluster, &pair.staging, "postgres")
        .connect()
        .await
        .unwrap();
    staging
        .batch_execute("BEGIN; ALTER TABLE price ADD COLUMN currency char(3) DEFAULT 'EUR'")
        .await
        .unwrap();
    let copy = std::process::Command::new(env!("CARGO_BIN_EXE_stagingprop"))
        .arg("--config")
        .arg(&config)
        .args(["copy", "--from", "staging", "--to", "production"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' \
                   AND datname = current_database()";
    for _ in 0..200 {
        if pair.on_staging(waiting).trim() != "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    staging.batch_execute("COMMIT").await.unwrap();
    let out = tokio::task::spawn_blocking(move || copy.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the copy went on: {err}");
    assert!(
        err.contains("table public.price was changed") && err.contains("nothing was loaded"),
        "{err}"
    );
    assert_eq!(pair.on_production("SELECT count(*) FROM price").trim(), "0");

    // Production made to match, the copy goes through; what staging changes after it (schema
    // and rows) follows from the hand-off.
    pair.on_production("ALTER TABLE price ADD COLUMN currency char(3) DEFAULT 'EUR'");
    let (code, out, err) = support::stagingprop(
        &config,
        &["copy", "--from", "staging", "--to", "production"],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    pair.on_staging(
        "ALTER TABLE price DROP COLUMN note;
         INSERT INTO price VALUES (5000, 1, 'USD');
         UPDATE price SET currency = 'GBP' WHERE id <= 10;",
    );
    caught_up(&pair.config).await.expect("sync after the copy");
    assert_same(&pair, "price");
}

/// A schema a `[[table_patterns]]` entry manages: a table created there on staging joins the
/// publication in its creating transaction and is created on production in its place in the
/// stream, with the rows of that transaction and after, whether sync was down when it was made
/// (the next start finds its creation on its way) or running (a new session takes it); an
/// excluded table stays staging's; a table created with its rows is refused on staging; a table
/// dropped on staging is dropped on production (`on_staging_drop = "drop"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_created_in_a_managed_schema_follow_with_their_rows() {
    let pair = PairBuilder::new(
        "ddl_create",
        "CREATE SCHEMA cat;
         CREATE TABLE cat.product (id int PRIMARY KEY, name text NOT NULL);",
    )
    .extra(
        "[[table_patterns]]\nschema = \"cat\"\nexclude = [\"audit_*\"]\non_staging_drop = \"drop\"",
    )
    .init()
    .await;
    pair.on_staging("INSERT INTO cat.product VALUES (1, 'one'), (2, 'two')");
    caught_up(&pair.config)
        .await
        .expect("sync of the pattern's table");
    assert_same(&pair, "cat.product");

    // Made while sync is down: the creation, rows in its transaction, rows after.
    pair.on_staging(
        "BEGIN;
         CREATE TABLE cat.offer (id serial PRIMARY KEY,
                                 product_id int NOT NULL REFERENCES cat.product,
                                 price numeric(10,2) CHECK (price >= 0),
                                 code text UNIQUE);
         CREATE INDEX offer_price ON cat.offer (price);
         INSERT INTO cat.offer (product_id, price, code) VALUES (1, 9.5, 'a'), (2, 3, 'b');
         COMMIT;
         INSERT INTO cat.offer (product_id, price, code) VALUES (1, 1, 'c');
         CREATE TABLE cat.audit_trail (id int PRIMARY KEY);
         INSERT INTO cat.audit_trail VALUES (1);",
    );
    // A dry run across the creation counts its rows and makes nothing.
    let dry = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        max_attempts: Some(3),
        dry_run: true,
        ..Default::default()
    };
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        stagingprop::sync::run(&pair.config, &dry, std::future::pending()),
    )
    .await
    .expect("the dry run ends")
    .expect("a dry run across a creation");
    assert_eq!(
        summary.changes.total().inserted,
        3,
        "the created table's rows"
    );
    assert_eq!(
        pair.on_production("SELECT to_regclass('cat.offer') IS NULL")
            .trim(),
        "t",
        "a dry run creates nothing"
    );
    caught_up(&pair.config)
        .await
        .expect("sync of a created table");
    assert_same(&pair, "cat.offer");
    assert_eq!(
        indexes_and_constraints(&pair, true, "cat.offer"),
        indexes_and_constraints(&pair, false, "cat.offer")
    );
    assert_eq!(
        pair.on_production("SELECT to_regclass('cat.audit_trail') IS NULL")
            .trim(),
        "t",
        "an excluded table is not created"
    );
    // The serial column's sequence came with it and follows staging's.
    assert_eq!(
        pair.on_production("SELECT last_value FROM cat.offer_id_seq")
            .trim(),
        "3"
    );

    // Made while sync runs.
    let (stop, running) = support::sync_in_background(&pair.config, tracing::info_span!("sync"));
    pair.on_staging("INSERT INTO cat.product VALUES (3, 'three')");
    production_until(&pair, "SELECT count(*) = 3 FROM cat.product").await;
    pair.on_staging(
        "BEGIN;
         INSERT INTO cat.product VALUES (4, 'four');
         CREATE TABLE cat.review (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                  product_id int REFERENCES cat.product, stars int DEFAULT 5);
         INSERT INTO cat.review (product_id) VALUES (4), (3);
         COMMIT;
         UPDATE cat.review SET stars = 1 WHERE product_id = 3;",
    );
    production_until(&pair, "SELECT to_regclass('cat.review') IS NOT NULL").await;
    production_until(
        &pair,
        "SELECT count(*) = 2 FROM cat.review WHERE stars = 1 OR product_id = 4",
    )
    .await;
    // Created with its rows: refused on staging, nothing made.
    let refused = pair
        .staging_cluster
        .psql(
            &pair.staging,
            "CREATE TABLE cat.snapshot AS SELECT * FROM cat.product",
        )
        .expect_err("a table created with its rows is refused")
        .to_string();
    assert!(refused.contains("INSERT ... SELECT"), "{refused}");
    assert_eq!(
        pair.on_staging("SELECT to_regclass('cat.snapshot') IS NULL")
            .trim(),
        "t"
    );
    // Renamed on staging: production's table is renamed in its place, with rows either side.
    pair.on_staging(
        "BEGIN;
         INSERT INTO cat.offer (product_id, price, code) VALUES (2, 4, 'd');
         ALTER TABLE cat.offer RENAME TO offers;
         INSERT INTO cat.offers (product_id, price, code) VALUES (2, 5, 'e');
         COMMIT;",
    );
    production_until(
        &pair,
        "SELECT to_regclass('cat.offer') IS NULL AND to_regclass('cat.offers') IS NOT NULL",
    )
    .await;
    production_until(&pair, "SELECT count(*) = 5 FROM cat.offers").await;
    // Dropped on staging, dropped on production in its place.
    pair.on_staging("DROP TABLE cat.review; INSERT INTO cat.product VALUES (5, 'five');");
    production_until(
        &pair,
        "SELECT to_regclass('cat.review') IS NULL AND (SELECT count(*) = 5 FROM cat.product)",
    )
    .await;
    stop.send(()).expect("sync runs");
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("sync stops")
        .expect("sync task")
        .expect("sync ends without an error");
    // Renamed while sync is down: the new name is on its way at the start.
    pair.on_staging(
        "ALTER TABLE cat.offers RENAME TO offer_list;
         UPDATE cat.offer_list SET price = price + 1 WHERE code = 'e';",
    );
    caught_up(&pair.config)
        .await
        .expect("sync of a rename on its way");
    for table in ["cat.product", "cat.offer_list"] {
        assert_same(&pair, table);
    }
    assert_eq!(
        indexes_and_constraints(&pair, true, "cat.offer_list"),
        indexes_and_constraints(&pair, false, "cat.offer_list")
    );
    assert_eq!(
        pair.on_production("SELECT to_regclass('cat.offers') IS NULL")
            .trim(),
        "t"
    );
    let diffs = stagingprop::ops::verify::verify(&pair.config, &Default::default())
        .await
        .expect("verify");
    assert!(
        diffs.iter().all(|d| d.matches()),
        "verify finds the pattern's tables equal: {diffs:?}"
    );
    assert_eq!(diffs.len(), 2, "{diffs:?}");
}
