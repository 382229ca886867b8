//! The heartbeat: a transactional logical message through the slot, so an idle sync has a
//! transaction to apply and confirm.

use super::{HEARTBEAT_PREFIX, SyncError, database_error};
use crate::pg::connect::Endpoint;

/// A transactional message through the slot: gives an idle sync a transaction to apply and
/// confirm, so staging never keeps WAL for it.
pub(super) async fn emit_heartbeat(
    staging: &Endpoint,
    s: &tokio_postgres::Client,
) -> Result<(), SyncError> {
    s.execute(
        "SELECT pg_logical_emit_message(true, $1, '')",
        &[&HEARTBEAT_PREFIX],
    )
    .await
    .map_err(database_error(staging, "emitting a heartbeat"))?;
    Ok(())
}
