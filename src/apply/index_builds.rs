//! The index builds and drops a schema change leaves to run after its transaction commits,
//! `CONCURRENTLY` so that production's own writes go on while a large table is indexed. Each is
//! written to `stagingprop.index_builds` in the transaction that applied the change and marked
//! done once it ran, so a crash in between runs it again, once: a build it interrupted left an
//! invalid index, which is dropped first.

use tokio_postgres::Client;

use super::error::query_error;
use super::{Applier, ApplyError};
use crate::config::TableName;
use crate::state::schema_changes::{self, IndexBuild};

impl Applier {
    /// Runs every build not done yet (none in an open transaction); returns how many ran.
    pub async fn run_index_builds(&mut self) -> Result<usize, ApplyError> {
        self.builds_waiting.clear();
        run_pending(&self.client, &self.slot).await
    }

    /// Runs, inside the open transaction and without `CONCURRENTLY`, the builds this transaction
    /// recorded: a later schema change in the same transaction (an index renamed, a column
    /// dropped, a foreign key needing a unique index) must find them done, as it did on staging.
    /// Only when two schema changes land in one production transaction; otherwise builds run
    /// concurrently after the commit.
    pub(super) async fn run_waiting_builds(
        &mut self,
        before: &TableName,
    ) -> Result<(), ApplyError> {
        let now = std::mem::take(&mut self.builds_waiting);
        if now.is_empty() {
            return Ok(());
        }
        // A staging subtransaction rolled back may have taken some with it.
        let ids: Vec<i64> = now.iter().map(|b| b.id).collect();
        let pending = schema_changes::still_pending(&self.client, &ids).await?;
        for build in now.iter().filter(|b| pending.contains(&b.id)) {
            tracing::info!(
                index = %build.index,
                "a later schema change (of {before}) comes in the same transaction: `{}` runs in it",
                build.in_transaction
            );
            self.client
                .batch_execute(&build.in_transaction)
                .await
                .map_err(|e| build_failed(&build.index, &build.in_transaction, e))?;
            schema_changes::build_done(&self.client, build.id).await?;
        }
        Ok(())
    }
}

/// An index build recorded in the open transaction.
pub(super) struct WaitingBuild {
    pub id: i64,
    pub index: String,
    pub in_transaction: String,
}

/// What stopped an index build, for the operator.
fn build_failed(index: &str, statement: &str, e: tokio_postgres::Error) -> ApplyError {
    let obstacle = match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    };
    ApplyError::IndexBuild {
        index: index.to_owned(),
        statement: statement.to_owned(),
        obstacle,
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
    let failed = |e| build_failed(&build.index, &build.statement, e);
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
