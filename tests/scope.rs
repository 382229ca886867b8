//! Part of a table (issue 15): row filters, column lists and named scopes, end to end on real
//! clusters: init's checks, copy, sync with rows moving in and out of a filter, production-owned
//! columns never written, two scopes side by side, verify inside and outside the scope.

mod support;

use std::time::Duration;

use stagingprop::config::Config;
use stagingprop::copy::{CopyOptions, Side, copy};
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::ops::verify::{VerifyOptions, verify};
use stagingprop::sync;
use support::rng::Rng;
use support::{Pair, PairBuilder, caught_up, init_without_slot};

async fn verify_table(config: &Config) -> stagingprop::ops::verify::TableDiff {
    let diffs = verify(config, &VerifyOptions::default())
        .await
        .expect("verify");
    diffs.into_iter().next().expect("one table")
}

const OFFERS: &str = "
CREATE TABLE offer (offer_id bigint PRIMARY KEY, storeent_id int NOT NULL, price numeric(12,2));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_table_follows_rows_moving_in_and_out_of_the_filter() {
    let p = PairBuilder::new("scope_filter", OFFERS)
        .table("public.offer", "filter = \"storeent_id IN (10001, 10002)\"")
        .build();
    // The filter reads a column outside the primary key: UPDATEs and DELETEs must carry it.
    p.on_staging("ALTER TABLE offer REPLICA IDENTITY FULL");
    p.on_staging("INSERT INTO offer SELECT g, 10000 + g % 4, g FROM generate_series(1, 200) g");
    init_without_slot(&p.config).await;
    let row_filter = p.on_staging(&format!(
        "SELECT rowfilter FROM pg_publication_tables WHERE pubname = '{}'",
        p.config.sync.publication
    ));
    assert!(
        row_filter.contains("10001"),
        "publication row filter: {row_filter}"
    );

    let report = copy(
        &p.config,
        &CopyOptions::new(Side::Staging, Side::Production),
    )
    .await
    .expect("copy");
    assert_eq!(
        report.tables[0].rows, 100,
        "copy takes only the filtered rows"
    );

    let mut rng = Rng::new(15);
    for _ in 0..300 {
        let id = rng.below(260) + 1;
        let store = 10000 + rng.below(4);
        let sql = match rng.below(4) {
            0 => format!("INSERT INTO offer VALUES ({id}, {store}, {id}) ON CONFLICT DO NOTHING"),
            1 => format!("UPDATE offer SET storeent_id = {store} WHERE offer_id = {id}"),
            2 => format!("UPDATE offer SET price = price + 1 WHERE offer_id = {id}"),
            _ => format!("DELETE FROM offer WHERE offer_id = {id}"),
        };
        p.on_staging(&sql);
    }
    caught_up(&p.config).await.expect("sync");
    let rows = "SELECT string_agg(format('%s:%s:%s', offer_id, storeent_id, price), ',' ORDER BY offer_id) FROM offer";
    let in_scope = p.on_staging(
        "SELECT string_agg(format('%s:%s:%s', offer_id, storeent_id, price), ',' ORDER BY offer_id) FROM offer WHERE storeent_id IN (10001, 10002)",
    );
    assert_eq!(p.on_production(rows), in_scope);
    let moved_out =
        p.on_staging("SELECT count(*) FROM offer WHERE storeent_id NOT IN (10001, 10002)");
    assert_ne!(
        moved_out.trim(),
        "0",
        "the workload leaves rows outside the filter"
    );

    let diff = verify_table(&p.config).await;
    assert!(diff.matches(), "{diff:?}");
    assert_eq!(diff.outside_scope, 0);

    // A production row outside the filter is not extra; a changed row inside it differs.
    p.on_production("INSERT INTO offer VALUES (9000, 10003, 1)");
    let first = p.on_production("SELECT min(offer_id) FROM offer WHERE offer_id < 9000");
    p.on_production(&format!(
        "UPDATE offer SET price = price + 1000 WHERE offer_id = {}",
        first.trim()
    ));
    let diff = verify_table(&p.config).await;
    assert_eq!(diff.outside_scope, 1, "{diff:?}");
    assert_eq!(
        (diff.missing, diff.extra, diff.different),
        (0, 0, 1),
        "{diff:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_a_filter_on_a_column_outside_the_replica_identity() {
    let p = PairBuilder::new("scope_identity", OFFERS)
        .table("public.offer", "filter = \"storeent_id = 10001\"")
        .build();
    let err = init(&p.config, &InitOptions::default())
        .await
        .expect_err("init must refuse")
        .to_string();
    assert!(err.contains("storeent_id"), "{err}");
    assert!(err.contains("replica identity"), "{err}");
    let created = p.on_staging(&format!(
        "SELECT count(*) FROM pg_publication WHERE pubname = '{}'",
        p.config.sync.publication
    ));
    assert_eq!(created.trim(), "0", "nothing is created when a check fails");

    // A filter the server cannot take is named with the table.
    let bad = PairBuilder::new("scope_badfilter", OFFERS)
        .table("public.offer", "filter = \"no_such_column = 1\"")
        .build();
    let err = init(&bad.config, &InitOptions::default())
        .await
        .expect_err("init must refuse")
        .to_string();
    assert!(
        err.contains("public.offer") && err.contains("no_such_column"),
        "{err}"
    );
}

const MERCHANT_OFFERS: &str = "
CREATE TABLE offer (offer_id bigint PRIMARY KEY, price numeric(12,2), published int,
  merchant_note text DEFAULT 'none', merchant_flag int NOT NULL DEFAULT 0);
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_owned_columns_are_never_written_by_copy_or_sync() {
    let p = PairBuilder::new("scope_columns", MERCHANT_OFFERS)
        .table("public.offer", "columns = [\"price\", \"published\"]")
        .build();
    p.on_staging(
        "INSERT INTO offer (offer_id, price, published, merchant_note) SELECT g, g, 1, 'staging' FROM generate_series(1, 100) g",
    );
    // Production merchants already own rows 1..50 with notes of their own.
    p.on_production(
        "INSERT INTO offer SELECT g, 0, 0, 'merchant ' || g, 7 FROM generate_series(1, 50) g",
    );
    init_without_slot(&p.config).await;
    let published = p.on_staging(&format!(
        "SELECT attnames FROM pg_publication_tables WHERE pubname = '{}'",
        p.config.sync.publication
    ));
    assert_eq!(published.trim(), "{offer_id,price,published}");

    // --truncate would empty production's columns: refused unless forced.
    let mut truncating = CopyOptions::new(Side::Staging, Side::Production);
    truncating.truncate = true;
    let err = copy(&p.config, &truncating)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("--force"), "{err}");

    copy(
        &p.config,
        &CopyOptions::new(Side::Staging, Side::Production),
    )
    .await
    .expect("copy merges the managed columns");
    assert_eq!(
        p.on_production("SELECT count(*), sum(price), count(*) FILTER (WHERE merchant_note LIKE 'merchant %' AND merchant_flag = 7), count(*) FILTER (WHERE merchant_note = 'none') FROM offer").trim(),
        "100|5050.00|50|50",
        "rows 1-50 keep production's columns, rows 51-100 take the defaults"
    );

    // Sync while merchants edit their columns on production.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = p.config.clone();
    let running = tokio::spawn(async move {
        sync::run(&config, &sync::SyncOptions::default(), async {
            let _ = stop_rx.await;
        })
        .await
    });
    for round in 0..20 {
        p.on_staging(&format!(
            "UPDATE offer SET price = price + 1, merchant_note = 'staging {round}' WHERE offer_id % 10 = {}",
            round % 10
        ));
        p.on_production(&format!(
            "UPDATE offer SET merchant_note = 'edited {round}', merchant_flag = merchant_flag + 1 WHERE offer_id % 10 = {}",
            round % 10
        ));
    }
    p.on_staging("INSERT INTO offer (offer_id, price, published) VALUES (1000, 1, 1)");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while p
        .on_production("SELECT count(*) FROM offer WHERE offer_id = 1000")
        .trim()
        != "1"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "sync did not apply the changes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    running.await.unwrap().expect("sync");

    let managed = "SELECT string_agg(format('%s:%s:%s', offer_id, price, published), ',' ORDER BY offer_id) FROM offer";
    assert_eq!(p.on_production(managed), p.on_staging(managed));
    let merchant = p.on_production(
        "SELECT count(*) FILTER (WHERE merchant_note LIKE 'edited %'), count(*) FILTER (WHERE merchant_note LIKE 'staging%') FROM offer",
    );
    assert_eq!(merchant.trim(), "100|0", "production's notes are its own");
    assert_eq!(
        p.on_production("SELECT merchant_note, merchant_flag FROM offer WHERE offer_id = 1000")
            .trim(),
        "none|0",
        "an insert leaves production's columns to their defaults"
    );
    let diff = verify_table(&p.config).await;
    assert!(
        diff.matches(),
        "verify compares only the managed columns: {diff:?}"
    );
    p.on_production("UPDATE offer SET price = 0 WHERE offer_id = 3");
    let diff = verify_table(&p.config).await;
    assert_eq!(diff.different, 1, "{diff:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_production_column_outside_the_list_and_a_stale_publication_are_refused() {
    let p = PairBuilder::new("scope_required", MERCHANT_OFFERS)
        .table(
            "public.offer",
            "exclude_columns = [\"merchant_note\", \"merchant_flag\"]",
        )
        .build();
    p.on_production("ALTER TABLE offer ALTER COLUMN merchant_flag DROP DEFAULT");
    init(&p.config, &InitOptions::default())
        .await
        .expect("init");
    let err = caught_up(&p.config)
        .await
        .expect_err("sync must refuse")
        .to_string();
    assert!(
        err.contains("merchant_flag") && err.contains("NOT NULL"),
        "{err}"
    );
    p.on_production("ALTER TABLE offer ALTER COLUMN merchant_flag SET DEFAULT 0");

    // A publication that sends every column, while the config leaves two to production.
    p.on_staging(&format!(
        "ALTER PUBLICATION {} SET TABLE offer",
        p.config.sync.publication
    ));
    let err = caught_up(&p.config)
        .await
        .expect_err("sync must refuse")
        .to_string();
    assert!(err.contains("init --apply-changes"), "{err}");
    // init shows the difference and changes nothing without --apply-changes.
    let err = init(&p.config, &InitOptions::default())
        .await
        .expect_err("differences need --apply-changes")
        .to_string();
    assert!(
        err.contains("every column -> offer_id, price, published"),
        "{err}"
    );
    let options = InitOptions {
        apply_changes: true,
        ..InitOptions::default()
    };
    let report = init(&p.config, &options)
        .await
        .expect("init --apply-changes");
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.contains("changed: public.offer: columns")),
        "{:?}",
        report.lines
    );
    p.on_staging("INSERT INTO offer VALUES (1, 2, 3, 'staging', 9)");
    caught_up(&p.config).await.expect("sync");
    assert_eq!(
        p.on_production("SELECT price, published, merchant_note, merchant_flag FROM offer")
            .trim(),
        "2.00|3|none|0"
    );
}

const STORES: &str = "
CREATE TABLE offer (offer_id bigint PRIMARY KEY, storeent_id int NOT NULL, price numeric(12,2));
ALTER TABLE offer REPLICA IDENTITY FULL;
";

fn scopes_pair(prefix: &str) -> Pair {
    PairBuilder::new(prefix, STORES)
        .table("public.offer", "")
        .extra(
            "[scopes.store-1.filters]\n\"public.offer\" = \"storeent_id = 1\"\n\
             [scopes.store-2.filters]\n\"public.offer\" = \"storeent_id = 2\"\n",
        )
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scopes_run_side_by_side_each_with_its_own_publication_and_slot() {
    let p = scopes_pair("scope_two");
    let one = p.config.scoped("store-1").unwrap();
    let two = p.config.scoped("store-2").unwrap();
    assert_eq!(one.sync.slot, "scope_two_store_1");
    assert_ne!(one.sync.publication, two.sync.publication);
    for scoped in [&one, &two] {
        init(scoped, &InitOptions::default()).await.expect("init");
    }
    let rows = |store: u32| {
        format!(
            "SELECT string_agg(format('%s:%s', offer_id, price), ',' ORDER BY offer_id) FROM offer WHERE storeent_id = {store}"
        )
    };
    for round in 0..40 {
        p.on_staging(&format!(
            "INSERT INTO offer VALUES ({round}, {}, {round}); UPDATE offer SET price = price + 1 WHERE offer_id = {}",
            round % 3 + 1,
            round / 2
        ));
    }
    // Both scopes apply at once onto the same production table.
    let (a, b) = tokio::join!(caught_up(&one), caught_up(&two));
    a.expect("sync store-1");
    b.expect("sync store-2");
    assert_eq!(p.on_production(&rows(1)), p.on_staging(&rows(1)));
    assert_eq!(p.on_production(&rows(2)), p.on_staging(&rows(2)));
    assert_eq!(
        p.on_production("SELECT count(*) FROM offer WHERE storeent_id = 3")
            .trim(),
        "0",
        "no scope carries store 3"
    );
    let slots = p.on_staging(
        "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'scope_two_%'",
    );
    assert_eq!(slots.trim(), "scope_two_store_1,scope_two_store_2");
    // verify --scope store-1: store 2's rows on production are outside that scope.
    let diff = verify_table(&one).await;
    assert!(diff.matches(), "{diff:?}");
    let store_two = p.on_production("SELECT count(*) FROM offer WHERE storeent_id = 2");
    assert_eq!(diff.outside_scope.to_string(), store_two.trim());
}

const CATALOGUE: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, buyable int NOT NULL, partnumber text);
ALTER TABLE catentry REPLICA IDENTITY FULL;
CREATE TABLE catentdesc (catentry_id bigint, language_id int, name text,
  merchant_text text DEFAULT 'none', PRIMARY KEY (catentry_id, language_id));
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remapped_tables_with_filters_and_column_lists_keep_references_translated() {
    let p = PairBuilder::new("scope_remap", CATALOGUE)
        .table(
            "public.catentry",
            "key = { rule = \"offset\", offset = 1000000 }\nfilter = \"buyable = 1\"",
        )
        .table("public.catentdesc", "columns = [\"name\"]")
        .build();
    // The foreign key is declared on staging only: it says catentdesc.catentry_id follows.
    p.on_staging(
        "ALTER TABLE catentdesc ADD FOREIGN KEY (catentry_id) REFERENCES catentry ON DELETE CASCADE",
    );
    p.on_staging(
        "INSERT INTO catentry SELECT g, g % 2, 'PN-' || g FROM generate_series(1, 20) g;
         INSERT INTO catentdesc (catentry_id, language_id, name) SELECT g, -1, 'name ' || g FROM generate_series(1, 20) g",
    );
    init_without_slot(&p.config).await;
    copy(
        &p.config,
        &CopyOptions::new(Side::Staging, Side::Production),
    )
    .await
    .expect("copy");
    p.on_production("UPDATE catentdesc SET merchant_text = 'merchant'");
    p.on_staging(
        "UPDATE catentry SET buyable = 1 WHERE catentry_id = 2;
         UPDATE catentry SET buyable = 0 WHERE catentry_id = 3;
         UPDATE catentdesc SET name = name || ' v2' WHERE catentry_id <= 4;
         INSERT INTO catentry VALUES (21, 1, 'PN-21');
         INSERT INTO catentdesc (catentry_id, language_id, name) VALUES (21, -1, 'name 21')",
    );
    caught_up(&p.config).await.expect("sync");
    let buyable = p.on_staging(
        "SELECT string_agg((catentry_id + 1000000)::text, ',' ORDER BY catentry_id) FROM catentry WHERE buyable = 1",
    );
    assert_eq!(
        p.on_production(
            "SELECT string_agg(catentry_id::text, ',' ORDER BY catentry_id) FROM catentry"
        ),
        buyable,
        "the filtered parents, moved by the offset (2 moved in, 3 out)"
    );
    assert_eq!(
        p.on_production(
            "SELECT string_agg(format('%s:%s:%s', catentry_id, name, merchant_text), ',' ORDER BY catentry_id) FROM catentdesc WHERE catentry_id <= 1000004 OR catentry_id = 1000021"
        )
        .trim(),
        "1000001:name 1 v2:merchant,1000002:name 2 v2:merchant,1000003:name 3 v2:merchant,1000004:name 4 v2:merchant,1000021:name 21:none"
    );
    let diffs = verify(&p.config, &VerifyOptions::default())
        .await
        .expect("verify");
    assert!(diffs.iter().all(|d| d.matches()), "{diffs:?}");
}
