//! stagingprop's tables on production: created, upgraded from every earlier layout, and a newer
//! layout refused.

mod support;

use stagingprop::state::{self, StateError};
use support::{clusters, endpoint, fresh_db, psql};

/// The tables as every release before the layout version row created them (version 1): `init`
/// and `sync` made progress, quarantine and key_map; `copy` made copy_commits when it split a
/// table.
const LAYOUT_1: &str = "
CREATE SCHEMA stagingprop;
CREATE TABLE stagingprop.progress (
    slot text PRIMARY KEY,
    end_lsn pg_lsn NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    commit_time timestamptz NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE stagingprop.quarantine (
    id bigserial PRIMARY KEY,
    slot text NOT NULL,
    lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    table_name text NOT NULL,
    operation text NOT NULL,
    reason text NOT NULL,
    key jsonb NOT NULL,
    row_data jsonb,
    quarantined_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE stagingprop.key_map (
    table_name text NOT NULL,
    source_key bigint NOT NULL,
    target_key bigint NOT NULL,
    mapped_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, source_key));
INSERT INTO stagingprop.progress VALUES ('sp', '0/1A2B3C4', '0/1A2B3A0', 745, '2026-11-25 12:00:00+00', now());
INSERT INTO stagingprop.quarantine (slot, lsn, xid, table_name, operation, reason, key)
    VALUES ('sp', '0/1A2B3C4', 745, 'public.catentry', 'insert', 'taken', '{\"catentry_id\": \"1\"}');
INSERT INTO stagingprop.key_map (table_name, source_key, target_key) VALUES ('public.catentry', 1, 5001);
";

fn contents(db: &str) -> String {
    let production = &clusters().production;
    psql(
        production,
        db,
        "SELECT (SELECT slot || ' ' || end_lsn || ' ' || commit_lsn || ' ' || xid FROM stagingprop.progress) \
         || ' | ' || (SELECT string_agg(table_name || ' ' || operation || ' ' || (key->>'catentry_id'), ',') FROM stagingprop.quarantine) \
         || ' | ' || (SELECT string_agg(source_key || '->' || target_key, ',') FROM stagingprop.key_map)",
    )
}

#[tokio::test]
async fn the_layout_every_earlier_release_made_is_upgraded_in_place() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout1");
    psql(production, &db, LAYOUT_1);
    let before = contents(&db);
    assert_eq!(
        before.trim(),
        "sp 0/1A2B3C4 0/1A2B3A0 745 | public.catentry insert 1 | 1->5001"
    );
    let client = endpoint(production, &db, "postgres")
        .connect()
        .await
        .unwrap();
    assert_eq!(state::layout::version(&client).await.unwrap(), 1);

    state::ensure(&client).await.unwrap();
    assert_eq!(
        state::layout::version(&client).await.unwrap(),
        state::LAYOUT_VERSION
    );
    assert_eq!(contents(&db), before, "the upgrade kept every row");
    assert_eq!(
        psql(
            production,
            &db,
            "SELECT to_regclass('stagingprop.copy_commits') IS NOT NULL"
        )
        .trim(),
        "t"
    );
    // Running it again changes nothing.
    state::ensure(&client).await.unwrap();
    assert_eq!(contents(&db), before);
    let progress = state::progress::read(&client, "sp").await.unwrap().unwrap();
    assert_eq!(progress.end_lsn.to_string(), "0/1A2B3C4");
    assert_eq!(progress.xid, 745);
}

/// Layout 2 (the version row; before `progress.stream_seq`), as releases of 2026-12 made it.
const LAYOUT_2_EXTRA: &str = "
CREATE TABLE stagingprop.copy_commits (group_id text PRIMARY KEY, decided_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE stagingprop.layout (only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    version integer NOT NULL, upgraded_at timestamptz NOT NULL DEFAULT now());
INSERT INTO stagingprop.layout (version) VALUES (2);
";

#[tokio::test]
async fn layout_2_gains_the_stream_sequence_and_keeps_its_rows() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout2");
    psql(production, &db, LAYOUT_1);
    psql(production, &db, LAYOUT_2_EXTRA);
    let before = contents(&db);
    let client = endpoint(production, &db, "postgres")
        .connect()
        .await
        .unwrap();
    assert_eq!(state::layout::version(&client).await.unwrap(), 2);
    // The progress row reads on the older layout too (a receiver may ask before the upgrade).
    let progress = state::progress::read(&client, "sp").await.unwrap().unwrap();
    assert_eq!(progress.stream_seq, None);
    state::ensure(&client).await.unwrap();
    assert_eq!(
        state::layout::version(&client).await.unwrap(),
        state::LAYOUT_VERSION
    );
    assert_eq!(contents(&db), before, "the upgrade kept every row");
    let mut moved = progress;
    moved.end_lsn = "0/1A2B400".parse().unwrap();
    moved.stream_seq = Some(42);
    assert!(
        state::progress::advance(&client, "sp", &moved, progress.end_lsn)
            .await
            .unwrap()
    );
    let read = state::progress::read(&client, "sp").await.unwrap().unwrap();
    assert_eq!(read.stream_seq, Some(42));
}

/// Layout 3 (`progress.stream_seq`; before `copy_tables`), as releases of 2026-12 made it.
const LAYOUT_3_EXTRA: &str = "
ALTER TABLE stagingprop.progress ADD COLUMN stream_seq bigint;
UPDATE stagingprop.progress SET stream_seq = 17;
UPDATE stagingprop.layout SET version = 3;
";

#[tokio::test]
async fn layout_3_gains_the_copys_loaded_pieces_and_keeps_its_rows() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout3");
    psql(production, &db, LAYOUT_1);
    psql(production, &db, LAYOUT_2_EXTRA);
    psql(production, &db, LAYOUT_3_EXTRA);
    let before = contents(&db);
    let client = endpoint(production, &db, "postgres")
        .connect()
        .await
        .unwrap();
    assert_eq!(state::layout::version(&client).await.unwrap(), 3);
    // Sync reads the copy's pieces on the older layout too (none: nothing to skip).
    let ahead = state::copy_tables::ahead_of(&client, "sp", stagingprop::model::Lsn(0))
        .await
        .unwrap();
    assert!(ahead.is_empty());
    state::ensure(&client).await.unwrap();
    assert_eq!(
        state::layout::version(&client).await.unwrap(),
        state::LAYOUT_VERSION
    );
    assert_eq!(contents(&db), before, "the upgrade kept every row");
    let progress = state::progress::read(&client, "sp").await.unwrap().unwrap();
    assert_eq!(progress.stream_seq, Some(17));
    let piece = state::copy_tables::LoadedPiece {
        table: "public.catentry".parse().unwrap(),
        piece: String::new(),
        of_pieces: 1,
        snapshot_lsn: "0/1A2B400".parse().unwrap(),
    };
    state::copy_tables::record(&client, "sp", &piece)
        .await
        .unwrap();
    let ahead = state::copy_tables::ahead_of(&client, "sp", progress.end_lsn)
        .await
        .unwrap();
    assert_eq!(ahead.get(&piece.table), Some(&piece.snapshot_lsn));
}

#[tokio::test]
async fn a_fresh_database_gets_the_current_layout_and_concurrent_upgrades_agree() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout0");
    let ep = endpoint(production, &db, "postgres");
    let (a, b) = (ep.connect().await.unwrap(), ep.connect().await.unwrap());
    assert_eq!(state::layout::version(&a).await.unwrap(), 0);
    let (ra, rb) = tokio::join!(state::ensure(&a), state::ensure(&b));
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        state::layout::version(&a).await.unwrap(),
        state::LAYOUT_VERSION
    );
    assert_eq!(
        psql(production, &db, "SELECT count(*) FROM stagingprop.layout").trim(),
        "1"
    );
}

#[tokio::test]
async fn a_newer_layout_is_refused_and_left_alone() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout_new");
    let client = endpoint(production, &db, "postgres")
        .connect()
        .await
        .unwrap();
    state::ensure(&client).await.unwrap();
    let newer = state::LAYOUT_VERSION + 1;
    psql(
        production,
        &db,
        &format!("UPDATE stagingprop.layout SET version = {newer}"),
    );
    match state::ensure(&client).await {
        Err(e @ StateError::NewerLayout { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("layout version {newer}")), "{text}");
            assert!(text.contains("nothing was changed"), "{text}");
        }
        other => panic!("expected the newer layout to be refused, got {other:?}"),
    }
    assert_eq!(
        psql(production, &db, "SELECT version FROM stagingprop.layout").trim(),
        newer.to_string()
    );
}

#[tokio::test]
async fn a_current_layout_needs_no_privilege_to_create() {
    let production = &clusters().production;
    let db = fresh_db(production, "layout_priv");
    let owner = endpoint(production, &db, "postgres")
        .connect()
        .await
        .unwrap();
    state::ensure(&owner).await.unwrap();
    psql(
        production,
        &db,
        &format!(
            "DO $$ BEGIN CREATE ROLE layout_reader LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             REVOKE CREATE ON DATABASE {db} FROM PUBLIC;
             GRANT USAGE ON SCHEMA stagingprop TO layout_reader;
             GRANT SELECT ON ALL TABLES IN SCHEMA stagingprop TO layout_reader;"
        ),
    );
    let reader = endpoint(production, &db, "layout_reader")
        .connect()
        .await
        .unwrap();
    state::ensure(&reader).await.unwrap();
}
