//! The index builds and drops a schema change leaves to run after its transaction commits,
//! `CONCURRENTLY` so that production's own writes go on while a large table is indexed. Each is
//! written to `stagingprop.index_builds` in the transaction that applied the change and marked
//! done once it ran, so a crash in between runs it again, once: a build it interrupted left an
//! invalid index, which is dropped first.

use tokio_postgres::Client;

use super::error::query_error;
use super::{Applier, ApplyError};
use crate::state::schema_changes::{self, IndexBuild};

impl Applier {
    /// Runs every build not done yet (none in an open transaction); returns how many ran.
    pub async fn run_index_builds(&mut self) -> Result<usize, ApplyError> {
        self.index_builds_waiting = false;
        run_pending(&self.client, &self.slot).await
    }
}

/// Runs every build of `slot` not done yet, in order, on `client` (outside a transaction);
/// returns how many ran. Sync runs them before it decides production has caught up, so that a
/// build left by the last run is never skipped for having nothing more to apply.
pub async fn run_pending(client: &Client, slot: &str) -> Result<usize, ApplyError> {
    let builds = schema_changes::pending_builds(client, slot).await?;
    for build in &builds {
        run_build(client, build).await?;
        schema_changes::build_done(client, build.id).await?;
    }
    Ok(builds.len())
}

async fn run_build(client: &Client, build: &IndexBuild) -> Result<(), ApplyError> {
    let started = std::time::Instant::now();
    let failed = |e: tokio_postgres::Error| {
        let obstacle = match e.as_db_error() {
            Some(db) => match db.detail() {
                Some(detail) => format!("{} ({detail})", db.message()),
                None => db.message().to_owned(),
            },
            None => e.to_string(),
        };
        ApplyError::IndexBuild {
            index: build.index.clone(),
            statement: build.statement.clone(),
            obstacle,
        }
    };
    // A build cut short leaves an invalid index of that name, which IF NOT EXISTS would
    // take for done.
    let invalid: bool = client
        .query_one(
            "SELECT coalesce((SELECT NOT indisvalid FROM pg_index \
                               WHERE indexrelid = to_regclass($1)), false)",
            &[&build.index],
        )
        .await
        .map_err(query_error("looking for an index build cut short"))?
        .get(0);
    if invalid {
        tracing::info!(index = %build.index, "dropping the invalid index an interrupted build left");
        client
            .batch_execute(&format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}",
                build.index
            ))
            .await
            .map_err(failed)?;
    }
    tracing::info!(index = %build.index, "running `{}`", build.statement);
    client
        .batch_execute(&build.statement)
        .await
        .map_err(failed)?;
    tracing::info!(
        index = %build.index,
        seconds = started.elapsed().as_secs_f64(),
        "done: `{}`",
        build.statement
    );
    Ok(())
}
