//! The layout of stagingprop's tables and its version. Every release that changes a table adds
//! a step here; `init` and every command that writes to production bring an older layout up to
//! date in one transaction, forward only, and refuse a newer layout than they know.
//!
//! The versions shipped so far:
//! 1. `progress`, `quarantine`, `key_map` (created by `init`, `sync` and `copy`), and
//!    `copy_commits` (created by `copy` when it first split a table); no version row.
//! 2. The `layout` version row; `copy_commits` is part of the layout.
//! 3. `progress.stream_seq`: the stream sequence of the last applied transaction of a target
//!    fed from a JetStream stream (`sync --from-stream`).
//! 4. `copy_tables`: the tables and block ranges a copy loading piece by piece has committed,
//!    with the position of the snapshot each was read in; `copy_indexes`: the secondary
//!    indexes a copy dropped to load faster, until it has built them again.
//! 5. `schema_changes`: every schema change from staging that sync applied to production (or
//!    left alone), with its staging position, statement and plan; `index_builds`: the index
//!    builds and drops a schema change left to run concurrently after its transaction, until
//!    done.
//! 6. `production_edits`: writes by production's own users to staging-managed rows, recorded
//!    by the guard's triggers; `conflicts`, the conflict log; the quarantine's columns for
//!    changes parked at a production edit (`parked`, `production_row`, `last_written`,
//!    `edits`).
//! 7. `repairs` and `repair_chunks`: the online repairs `verify --repair` planned, chunk by
//!    chunk, with each chunk's outcome as sync applied it; `production_keys`: keys of
//!    `remap-on-conflict` tables proven production's own.

use tokio_postgres::Client;

use super::{
    SCHEMA, StateError, conflicts, key_map, production_edits, quarantine, query_error, repairs,
    table,
};
use crate::quote::quote_ident;

/// The layout this release writes.
pub const LAYOUT_VERSION: i32 = 7;

/// Serializes upgrades by concurrent stagingprop processes (any constant works: it only has to
/// be the same in every release).
const UPGRADE_LOCK: i64 = 0x7374_6167_5f6c_6179;

/// The DDL that takes the layout from version `n` to `n + 1`. `IF NOT EXISTS` throughout, so a
/// step also completes a layout left half-made by hand.
fn step(from: i32) -> String {
    let schema = quote_ident(SCHEMA);
    match from {
        0 => format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {progress} (
                 slot text PRIMARY KEY,
                 end_lsn pg_lsn NOT NULL,
                 commit_lsn pg_lsn NOT NULL,
                 xid bigint NOT NULL,
                 commit_time timestamptz NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {quarantine} (
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
             {key_map};",
            progress = table("progress"),
            quarantine = table("quarantine"),
            key_map = key_map::create_table(),
        ),
        1 => format!(
            "CREATE TABLE IF NOT EXISTS {copy_commits} (
                 group_id text PRIMARY KEY,
                 decided_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {layout} (
                 only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
                 version integer NOT NULL,
                 upgraded_at timestamptz NOT NULL DEFAULT now());",
            copy_commits = table("copy_commits"),
            layout = table("layout"),
        ),
        2 => format!(
            "ALTER TABLE {progress} ADD COLUMN IF NOT EXISTS stream_seq bigint;",
            progress = table("progress"),
        ),
        3 => format!(
            "CREATE TABLE IF NOT EXISTS {copy_tables} (
                 slot text NOT NULL,
                 table_name text NOT NULL,
                 piece text NOT NULL,
                 of_pieces integer NOT NULL,
                 snapshot_lsn pg_lsn NOT NULL,
                 loaded_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (slot, table_name, piece));
             CREATE TABLE IF NOT EXISTS {copy_indexes} (
                 table_name text NOT NULL,
                 index_name text NOT NULL,
                 definition text NOT NULL,
                 set_aside_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (table_name, index_name));",
            copy_tables = table("copy_tables"),
            copy_indexes = table("copy_indexes"),
        ),
        4 => format!(
            "CREATE TABLE IF NOT EXISTS {schema_changes} (
                 id bigserial PRIMARY KEY,
                 slot text NOT NULL,
                 lsn pg_lsn NOT NULL,
                 xid bigint NOT NULL,
                 change_id bigint,
                 table_name text NOT NULL,
                 statement text NOT NULL,
                 plan text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS {index_builds} (
                 id bigserial PRIMARY KEY,
                 slot text NOT NULL,
                 change_id bigint,
                 index_name text NOT NULL,
                 statement text NOT NULL,
                 recorded_at timestamptz NOT NULL DEFAULT now(),
                 done_at timestamptz);",
            schema_changes = table("schema_changes"),
            index_builds = table("index_builds"),
        ),
        5 => format!(
            "{}\n{}\n{}",
            production_edits::create_table(),
            conflicts::create_table(),
            quarantine::add_parked_columns()
        ),
        6 => format!(
            "{};\n{}",
            repairs::create_tables(),
            key_map::create_production_keys()
        ),
        _ => unreachable!("no layout step from version {from}"),
    }
}

/// The layout version of the connected database: 0 when there is nothing of stagingprop's.
pub async fn version(client: &Client) -> Result<i32, StateError> {
    let row = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL",
            &[&table("layout"), &table("progress")],
        )
        .await
        .map_err(query_error("looking for stagingprop's tables"))?;
    let (has_layout, has_progress): (bool, bool) = (row.get(0), row.get(1));
    if !has_layout {
        // Releases before the version row: their tables are version 1.
        return Ok(i32::from(has_progress));
    }
    let row = client
        .query_opt(&format!("SELECT version FROM {}", table("layout")), &[])
        .await
        .map_err(query_error("reading the layout version"))?;
    // A layout table without its row: the upgrade that made it wrote the row in the same
    // transaction, so someone deleted it; the tables are those of the step that adds it.
    Ok(row.map_or(1, |r| r.get(0)))
}

/// Creates stagingprop's tables, or upgrades them to [`LAYOUT_VERSION`], in one transaction.
/// On a layout already current it changes nothing (and needs no privilege beyond reading).
pub async fn ensure(client: &Client) -> Result<(), StateError> {
    let found = version(client).await?;
    if found == LAYOUT_VERSION {
        return Ok(());
    }
    refuse_newer(found)?;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(query_error("BEGIN"))?;
    let upgraded = upgrade(client).await;
    let end = if upgraded.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client.batch_execute(end).await.map_err(query_error(end));
    let from = upgraded?;
    ended?;
    if from > 0 {
        tracing::info!(
            from,
            to = LAYOUT_VERSION,
            "upgraded stagingprop's tables on this database"
        );
    }
    Ok(())
}

/// The upgrade inside the open transaction; returns the version it started from.
async fn upgrade(client: &Client) -> Result<i32, StateError> {
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&UPGRADE_LOCK])
        .await
        .map_err(query_error("waiting for another stagingprop's upgrade"))?;
    // Read again under the lock: another process may have upgraded meanwhile.
    let found = version(client).await?;
    refuse_newer(found)?;
    for from in found..LAYOUT_VERSION {
        client
            .batch_execute(&step(from))
            .await
            .map_err(query_error("creating stagingprop's tables"))?;
    }
    client
        .execute(
            &format!(
                "INSERT INTO {} (version) VALUES ($1) \
                 ON CONFLICT (only_row) DO UPDATE SET version = EXCLUDED.version, upgraded_at = now()",
                table("layout")
            ),
            &[&LAYOUT_VERSION],
        )
        .await
        .map_err(query_error("writing the layout version"))?;
    Ok(found)
}

fn refuse_newer(found: i32) -> Result<(), StateError> {
    if found > LAYOUT_VERSION {
        return Err(StateError::NewerLayout {
            found,
            known: LAYOUT_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_before_the_current_one_has_a_step() {
        for from in 0..LAYOUT_VERSION {
            assert!(
                step(from).contains("CREATE") || step(from).contains("ALTER"),
                "step from {from}"
            );
        }
        // The version row comes with a step, so an upgraded layout can say what it is.
        assert!((0..LAYOUT_VERSION).any(|from| step(from).contains(&table("layout"))));
    }
}
