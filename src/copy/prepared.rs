//! Two-phase commit on the copy target, for a group of tables loaded by several workers at once
//! ([`super::split`]): each part is prepared, and when all are, a commit decision is recorded
//! ([`crate::state::copy_commits`], committed before any part) and the parts are committed.
//! A copy that dies in between leaves prepared transactions holding their locks; the next copy
//! into the same database commits those whose group was decided and rolls back the others, so
//! every table ends untouched or complete.

use tokio_postgres::Client;

use super::split;
use crate::quote::quote_literal;
use crate::state::copy_commits;

/// How many more transactions the target can hold prepared.
pub(super) async fn free_slots(t: &Client) -> Result<i64, tokio_postgres::Error> {
    let row = t
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::bigint - (SELECT count(*) FROM pg_prepared_xacts)",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// The ids of copy parts prepared in the connected database, oldest first.
async fn prepared_parts(t: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(t
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared",
            &[&format!("{}:", split::GID_PREFIX)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .filter(|gid: &String| split::parse_gid(gid).is_some())
        .collect())
}

/// How many copy parts an interrupted copy left prepared in the connected database.
pub(crate) async fn leftover_count(client: &Client) -> Result<usize, tokio_postgres::Error> {
    Ok(prepared_parts(client).await?.len())
}

/// What [`resolve_leftovers`] did with one prepared transaction.
#[derive(Debug)]
pub(super) struct Resolved {
    pub gid: String,
    pub committed: bool,
}

/// Finishes what an interrupted copy into this database left prepared: commits the parts of a
/// group whose commit was decided, rolls back the rest. The caller holds the copy lock, so no
/// running copy's parts are touched.
pub(super) async fn resolve_leftovers(t: &Client) -> Result<Vec<Resolved>, tokio_postgres::Error> {
    let gids = prepared_parts(t).await?;
    let mut resolved = Vec::new();
    for gid in gids {
        let Some(group) = split::parse_gid(&gid) else {
            continue;
        };
        let committed = copy_commits::decided(t, group).await?;
        let verb = if committed { "COMMIT" } else { "ROLLBACK" };
        t.batch_execute(&format!("{verb} PREPARED {}", quote_literal(&gid)))
            .await?;
        resolved.push(Resolved { gid, committed });
    }
    if !resolved.is_empty() {
        // Nothing of any group is prepared any more: every decision is carried out.
        copy_commits::forget_all(t).await?;
    }
    Ok(resolved)
}

/// Why committing a group's parts failed.
#[derive(Debug)]
pub(super) enum CommitError {
    /// Nothing was committed; the parts are still prepared (the caller rolls them back).
    Undecided(tokio_postgres::Error),
    /// Some parts may be committed; the next copy commits the rest.
    Decided(tokio_postgres::Error),
}

/// Commits every prepared part of group `group_id`: the decision first, then each part.
pub(super) async fn commit_group(
    t: &Client,
    group_id: &str,
    gids: &[String],
) -> Result<(), CommitError> {
    copy_commits::decide(t, group_id)
        .await
        .map_err(CommitError::Undecided)?;
    for gid in gids {
        t.batch_execute(&format!("COMMIT PREPARED {}", quote_literal(gid)))
            .await
            .map_err(CommitError::Decided)?;
    }
    // Every part is committed; a decision row left behind is removed by the next copy.
    if let Err(e) = copy_commits::forget(t, group_id).await {
        tracing::warn!(
            group = group_id,
            "could not remove a carried-out commit decision: {e}"
        );
    }
    Ok(())
}

/// Rolls back prepared parts of a group that failed (best effort: what stays prepared is rolled
/// back by the next copy). Returns the ids it could not roll back.
pub(super) async fn rollback_parts(t: &Client, gids: &[String]) -> Vec<String> {
    let mut left = Vec::new();
    for gid in gids {
        if t.batch_execute(&format!("ROLLBACK PREPARED {}", quote_literal(gid)))
            .await
            .is_err()
        {
            left.push(gid.clone());
        }
    }
    left
}
