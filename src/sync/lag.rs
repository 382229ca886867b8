//! The lag gauges: set from the pipeline while it runs, and between attempts while sync cannot
//! apply (production down), so that the gauges and the alerts on them see lag grow during an
//! outage rather than freeze at its last value.

use std::time::Duration;

use super::run_state::RunState;
use crate::config::Config;
use crate::model::{Lag, PgTimestamp};
use crate::pg::connect::Endpoint;

/// Sets the gauges to `lag`; one whose figure is unknown is left alone, so a dashboard never
/// shows a lag that did not happen.
pub(super) fn record(lag: Option<Lag>) {
    if let Some(lag) = lag {
        metrics::gauge!("stagingprop_lag_bytes").set(lag.bytes as f64);
        if let Some(seconds) = lag.seconds {
            metrics::gauge!("stagingprop_lag_seconds").set(seconds);
        }
    }
}

/// How long measuring between attempts may take: it must not delay the next attempt much.
const ASK_STAGING_WITHIN: Duration = Duration::from_secs(2);

/// Measures the lag from staging's WAL position and what production had when the last session
/// ended. Staging unreachable too: the lag stays unknown and the gauges as they were.
pub(super) async fn measure_between_attempts(config: &Config, state: &mut RunState) {
    let Ok(staging) = Endpoint::from_db_config(&config.staging) else {
        return;
    };
    let Ok(Ok(client)) = tokio::time::timeout(ASK_STAGING_WITHIN, staging.connect()).await else {
        return;
    };
    let end = tokio::time::timeout(
        ASK_STAGING_WITHIN,
        client.query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                     ELSE pg_current_wal_lsn() END)::text",
            &[],
        ),
    )
    .await;
    let Ok(Ok(row)) = end else {
        return;
    };
    let end = row
        .get::<_, Option<String>>(0)
        .and_then(|l| l.parse().ok())
        .unwrap_or_default();
    state.lag = Lag::measure(
        end,
        state.last_applied.unwrap_or_default(),
        state.feed_start,
        state.last_commit_time,
        PgTimestamp::now(),
    );
    record(state.lag);
}
