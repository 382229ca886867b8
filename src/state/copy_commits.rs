//! `stagingprop.copy_commits`: the commit decisions of copy's two-phase loads. A group's row is
//! committed before any of its prepared parts, so a copy that dies in between leaves a record
//! of which prepared parts must be committed and which rolled back.

use tokio_postgres::Client;

use super::table;

/// Records that group `group_id` commits (its own transaction, before any part commits).
pub async fn decide(client: &Client, group_id: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (group_id) VALUES ($1)",
                table("copy_commits")
            ),
            &[&group_id],
        )
        .await
        .map(drop)
}

/// Whether group `group_id` was decided (false when the table does not exist: nothing was).
pub async fn decided(client: &Client, group_id: &str) -> Result<bool, tokio_postgres::Error> {
    let exists = super::exists(client, "copy_commits").await?;
    if !exists {
        return Ok(false);
    }
    Ok(client
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {} WHERE group_id = $1)",
                table("copy_commits")
            ),
            &[&group_id],
        )
        .await?
        .get(0))
}

/// Removes the decision of a group whose parts are all committed.
pub async fn forget(client: &Client, group_id: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!("DELETE FROM {} WHERE group_id = $1", table("copy_commits")),
            &[&group_id],
        )
        .await
        .map(drop)
}

/// Removes every decision: nothing of any group is prepared any more.
pub async fn forget_all(client: &Client) -> Result<(), tokio_postgres::Error> {
    let exists = super::exists(client, "copy_commits").await?;
    if exists {
        client
            .batch_execute(&format!("DELETE FROM {}", table("copy_commits")))
            .await?;
    }
    Ok(())
}
