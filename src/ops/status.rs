//! `stagingprop status`: the truth about replication, from both databases: the slot (active,
//! confirmed position, WAL staging retains for it), lag in bytes and seconds, the last applied
//! staging transaction, conflicts quarantined, and whether that is healthy.

use serde::Serialize;

use super::{OpsError, connect, query_error, state_error};
use crate::config::Config;
use crate::model::{Lag, PgTimestamp};
use crate::pg::connect::Endpoint;
use crate::state;

/// When `status` calls replication unhealthy.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub max_lag_bytes: u64,
    pub max_lag_seconds: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_lag_bytes: 1 << 30,
            max_lag_seconds: 300.0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub exists: bool,
    pub active: bool,
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    /// WAL staging keeps for the slot: current WAL position minus the slot's restart position.
    pub retained_wal_bytes: Option<i64>,
    /// Staging's WAL position now.
    pub staging_wal_lsn: String,
    /// A failover slot (PostgreSQL 17+; `None` before 17).
    pub failover: Option<bool>,
    /// The other servers of staging's host list (a standby to fail over to) and the slot there.
    pub standbys: Vec<StandbySlot>,
}

/// The slot as one more server of staging's host list sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StandbySlot {
    pub host: String,
    pub port: u16,
    /// "standby", "primary", or "unreachable: why".
    pub role: String,
    /// The standby holds the slot, synchronized from the primary and ready to use once promoted.
    pub synced: bool,
    pub confirmed_flush_lsn: Option<String>,
}

/// Below this share of the stream's retention left, a stream-fed target is a problem.
const RETENTION_WARNING: f64 = 0.2;

#[derive(Clone, Debug, Default, Serialize)]
pub struct AppliedStatus {
    pub end_lsn: String,
    /// A stream-fed target's stream sequence.
    pub stream_seq: Option<i64>,
    pub xid: i64,
    /// When the last applied transaction committed on staging.
    pub commit_time: String,
    /// When production applied it.
    pub applied_at: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SchemaChangeStatus {
    /// Where it was in staging's WAL.
    pub lsn: String,
    pub table: String,
    pub statement: String,
    pub applied_at: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SpoolStatus {
    pub dir: String,
    #[serde(flatten)]
    pub held: crate::spool::store::SpoolSummary,
    /// Bytes of staging WAL between production's progress and the newest spooled transaction.
    pub production_behind_bytes: Option<u64>,
    pub max_bytes: u64,
    /// Over `max_bytes` with production behind: sync reads no further and staging keeps WAL.
    pub full: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyMapSize {
    pub table: String,
    pub entries: i64,
}

/// Production's own edits of one table's managed rows, recorded by the guard.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProductionEdits {
    pub table: String,
    /// Recorded and not met by a staging change yet.
    pub open: i64,
    pub recorded: i64,
}

/// Conflicts the log holds of one table, kind and action.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConflictCount {
    pub table: String,
    pub kind: String,
    pub action: String,
    pub count: i64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub slot: SlotStatus,
    pub last_applied: Option<AppliedStatus>,
    /// Staging WAL not yet applied on production (bytes), when known.
    pub lag_bytes: Option<i64>,
    /// Seconds since the last applied transaction committed on staging, when there is lag.
    pub lag_seconds: Option<f64>,
    pub quarantined_changes: i64,
    /// The last schema change from staging applied to production.
    pub last_schema_change: Option<SchemaChangeStatus>,
    /// Managed tables whose last schema change staging captured production has not applied:
    /// in the stream (or, with `[ddl] mode = "stop"`, waiting for the operator).
    pub schema_changes_waiting: Vec<String>,
    /// Index builds and drops a schema change left to run after its transaction, not done.
    pub index_builds_pending: Vec<String>,
    /// While a copy into production has not handed off: the tables it completed, which the
    /// same copy run again keeps.
    pub copy_complete_tables: Option<usize>,
    /// Secondary indexes a copy into production dropped and has not built again.
    pub copy_indexes_aside: Vec<String>,
    /// Entries of the key map per remapped table.
    pub key_map: Vec<KeyMapSize>,
    /// The guard's record of production's own edits, per table that has any.
    pub production_edits: Vec<ProductionEdits>,
    /// The conflict log, counted by table, kind and what was done.
    pub conflicts: Vec<ConflictCount>,
    /// An online repair (`verify --repair`) not finished.
    pub repair: Option<state::repairs::InProgress>,
    /// The spool, when `[spool]` is configured.
    pub spool: Option<SpoolStatus>,
    /// With `[stream]`: the stream and this target's place in it.
    pub stream: Option<crate::stream::TargetPosition>,
    pub healthy: bool,
    /// Why not healthy, one line each.
    pub problems: Vec<String>,
}

pub async fn status(config: &Config, thresholds: &Thresholds) -> Result<Status, OpsError> {
    let staging = Endpoint::from_db_config(&config.staging)?;
    let production = Endpoint::from_db_config(&config.production)?;
    let s = connect(&staging).await?;
    // Production down is what the slot and the spool are for: report them anyway. A login it
    // refuses is not an outage but settings to fix, and fails like any command's (exit 3).
    let (p, production_down) = match connect(&production).await {
        Ok(p) => (Some(p), None),
        Err(OpsError::Connect { target, source }) if source.refused => {
            return Err(OpsError::Connect { target, source });
        }
        Err(e) => (None, Some(e)),
    };
    let slot_name = &config.sync.slot;
    let mut st = Status::default();

    let now: String = s
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(query_error(&staging, "reading the WAL position"))?
        .get(0);
    st.slot.name = slot_name.clone();
    st.slot.staging_wal_lsn = now;
    let row = s
        .query_opt(
            "SELECT active, wal_status, confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    (to_jsonb(s) ->> 'failover')::bool
               FROM pg_replication_slots s WHERE slot_name = $1",
            &[slot_name],
        )
        .await
        .map_err(query_error(&staging, "reading pg_replication_slots"))?;
    if let Some(row) = row {
        st.slot.exists = true;
        st.slot.active = row.get(0);
        st.slot.wal_status = row.get(1);
        st.slot.confirmed_flush_lsn = row.get(2);
        st.slot.retained_wal_bytes = row.get(3);
        st.slot.failover = row.get(4);
    }
    let addresses = staging.addresses();
    if addresses.len() > 1 {
        for (host, port) in addresses {
            st.slot
                .standbys
                .push(standby_slot(&staging.only(&host, port), slot_name, host, port).await);
        }
        // The primary is the one sync reads from; the list shows the others.
        st.slot.standbys.retain(|s| s.role != "primary");
    }
    if config.sync.failover {
        if st.slot.exists && st.slot.failover != Some(true) {
            st.problems.push(format!(
                "slot {slot_name} is not a failover slot, but [sync] failover is on: a promoted standby would not have it"
            ));
        }
        for standby in st.slot.standbys.iter().filter(|s| !s.synced) {
            st.problems.push(format!(
                "slot {slot_name} is not synchronized to {}:{} ({}): failing over there now would need a re-seed (check sync_replication_slots, hot_standby_feedback, primary_slot_name and a dbname in primary_conninfo on the standby)",
                standby.host, standby.port, standby.role
            ));
        }
    }

    if let Some(p) = &p {
        let state_error = state_error(&production);
        let applied = state::progress::applied(p, slot_name)
            .await
            .map_err(&state_error)?;
        let since_commit = applied.as_ref().map(|a| a.since_commit);
        st.last_applied = applied.map(|a| AppliedStatus {
            end_lsn: a.end_lsn,
            stream_seq: a.stream_seq,
            xid: a.xid,
            commit_time: a.commit_time,
            applied_at: a.applied_at,
        });
        if st.last_applied.as_ref().is_some_and(|a| a.end_lsn == "0/0") {
            st.copy_complete_tables = Some(
                state::copy_tables::complete_tables(p, slot_name)
                    .await
                    .map_err(&state_error)?
                    .len(),
            );
        }
        st.copy_indexes_aside = state::copy_indexes::read(p)
            .await
            .map_err(&state_error)?
            .into_iter()
            .map(|x| format!("{}.{}", x.table.schema, x.name))
            .collect();
        st.quarantined_changes = state::quarantine::count(p, slot_name)
            .await
            .map_err(&state_error)?;
        st.production_edits = state::production_edits::counts(p)
            .await
            .map_err(&state_error)?
            .into_iter()
            .map(|(table, open, recorded)| ProductionEdits {
                table,
                open,
                recorded,
            })
            .collect();
        st.conflicts = state::conflicts::counts(p, slot_name)
            .await
            .map_err(&state_error)?
            .into_iter()
            .map(|(table, kind, action, count)| ConflictCount {
                table,
                kind,
                action,
                count,
            })
            .collect();
        st.repair = state::repairs::in_progress(p, slot_name)
            .await
            .map_err(&state_error)?;
        st.last_schema_change = state::schema_changes::last(p, slot_name)
            .await
            .map_err(&state_error)?
            .map(|(lsn, table, statement, applied_at)| SchemaChangeStatus {
                lsn,
                table,
                statement,
                applied_at,
            });
        if config.ddl.mode.captures() {
            let captured = crate::ddl::capture::last_changes(&s, &config.sync.publication)
                .await
                .map_err(query_error(&staging, "reading the captured schema changes"))?;
            let ids: Vec<i64> = captured.iter().map(|(_, id)| *id).collect();
            let applied = state::schema_changes::applied(p, slot_name, &ids)
                .await
                .map_err(&state_error)?;
            st.schema_changes_waiting = crate::ddl::not_applied(captured, &applied)
                .iter()
                .map(ToString::to_string)
                .collect();
            if config.ddl.mode == crate::config::DdlMode::Stop
                && !st.schema_changes_waiting.is_empty()
            {
                st.problems.push(format!(
                    "a schema change of {} waits for the operator ([ddl] mode = \"stop\"): \
                     `stagingprop sync --dry-run` shows its plan, `stagingprop sync \
                     --apply-schema-change` applies it",
                    st.schema_changes_waiting.join(", ")
                ));
            }
        }
        st.index_builds_pending = state::schema_changes::pending_builds(p, slot_name)
            .await
            .map_err(&state_error)?
            .into_iter()
            .map(|b| b.statement)
            .collect();
        st.key_map = state::key_map::sizes(p)
            .await
            .map_err(&state_error)?
            .into_iter()
            .map(|(table, entries)| KeyMapSize { table, entries })
            .collect();
        // The one definition of lag (sync's gauges and report use it too): from production's
        // progress, or before it has any, from where the slot starts, never from 0/0.
        let now_pg = PgTimestamp::now();
        let lag = Lag::measure(
            st.slot.staging_wal_lsn.parse().unwrap_or_default(),
            st.last_applied
                .as_ref()
                .and_then(|a| a.end_lsn.parse().ok())
                .unwrap_or_default(),
            st.slot
                .confirmed_flush_lsn
                .as_deref()
                .and_then(|l| l.parse().ok())
                .unwrap_or_default(),
            since_commit.map(|secs| PgTimestamp(now_pg.0 - (secs.max(0.0) * 1e6) as i64)),
            now_pg,
        );
        st.lag_bytes = lag.map(|l| i64::try_from(l.bytes).unwrap_or(i64::MAX));
        st.lag_seconds = lag.and_then(|l| l.seconds);
    }
    // Parts of an interrupted copy hold locks and the cluster's xmin horizon until resolved.
    for (side, client, endpoint) in [
        ("staging", Some(&s), &staging),
        ("production", p.as_ref(), &production),
    ] {
        let Some(client) = client else { continue };
        let parts = crate::copy::prepared::leftover_count(client)
            .await
            .map_err(query_error(endpoint, "reading pg_prepared_xacts"))?;
        if parts > 0 {
            st.problems.push(format!(
                "{parts} part(s) of an interrupted copy are still prepared on {side}; they hold \
                 their locks and hold back vacuum and slot creation on that cluster: run \
                 `stagingprop copy` into {side} again, which finishes them first"
            ));
        }
    }
    if let Some(e) = production_down {
        st.problems.push(format!(
            "{e}: production's progress, lag and quarantine are unknown; while it is down the \
             slot (or the spool) keeps what it has not applied"
        ));
    }

    if let Some(spool) = &config.spool {
        let held = crate::spool::store::summary(&spool.dir)?;
        let applied: Option<crate::model::Lsn> = st
            .last_applied
            .as_ref()
            .and_then(|a| a.end_lsn.parse().ok());
        let production_behind_bytes = match (held.newest_end, applied) {
            (Some(end), Some(applied)) => Some(end.0.saturating_sub(applied.0)),
            _ => None,
        };
        // Unknown when production is down: over the limit is then full.
        let full = held.bytes > spool.max_bytes && production_behind_bytes.is_none_or(|b| b > 0);
        if full {
            st.problems.push(format!(
                "the spool in {} is full ({} of spool.max_bytes {}) and production is behind it: \
                 sync stopped reading staging's stream, so staging keeps WAL until production \
                 catches up (or raise max_bytes)",
                spool.dir.display(),
                mb(held.bytes as i64),
                mb(spool.max_bytes as i64)
            ));
        }
        st.spool = Some(SpoolStatus {
            dir: spool.dir.display().to_string(),
            held,
            production_behind_bytes,
            max_bytes: spool.max_bytes,
            full,
        });
    }

    if let Some(stream) = &config.stream {
        let applied = st
            .last_applied
            .as_ref()
            .and_then(|a| a.stream_seq)
            .map(|s| s as u64);
        match crate::stream::target_position(stream, applied).await {
            Ok(position) => {
                if position.retention_headroom <= 0.0 {
                    st.problems.push(format!(
                        "the stream {} no longer holds the next message this target needs \
                         (sequence {}; it starts at {}): re-seed the target with `stagingprop \
                         copy --for-stream`",
                        position.stream,
                        applied.map_or(position.first_sequence, |s| s + 1),
                        position.first_sequence
                    ));
                } else if position.retention_headroom < RETENTION_WARNING {
                    st.problems.push(format!(
                        "this target is {} message(s) behind in the stream {}, with {:.0}% of \
                         its retention left before it falls off (then it must be re-seeded)",
                        position.behind_messages,
                        position.stream,
                        position.retention_headroom * 100.0
                    ));
                }
                st.stream = Some(position);
            }
            Err(e) => st.problems.push(format!("{e}")),
        }
    }

    if !st.slot.exists {
        st.problems.push(format!(
            "the slot {slot_name} does not exist on staging: run `stagingprop init` (or re-seed with `copy`)"
        ));
    } else {
        if st.slot.wal_status.as_deref() == Some("lost") {
            st.problems.push(format!(
                "the slot {slot_name} was invalidated: re-seed production with `stagingprop copy`"
            ));
        }
        if !st.slot.active {
            st.problems.push(format!(
                "the slot {slot_name} is not in use: sync is not running"
            ));
        }
    }
    match &st.last_applied {
        None => st
            .problems
            .push("production has applied nothing from this slot yet".into()),
        Some(a) if a.end_lsn == "0/0" => st.problems.push(format!(
            "a copy into production started and did not complete ({} of its tables are complete): run the same `stagingprop copy` again to load the rest, or add --truncate to start over",
            st.copy_complete_tables.unwrap_or(0)
        )),
        Some(_) => {}
    }
    if !st.copy_indexes_aside.is_empty() {
        st.problems.push(format!(
            "an interrupted copy dropped these secondary indexes on production to load faster and did not build them again: {}; the next `stagingprop copy` builds them (their definitions are in stagingprop.copy_indexes)",
            st.copy_indexes_aside.join(", ")
        ));
    }
    if let Some(lag) = st.lag_bytes
        && lag as u64 > thresholds.max_lag_bytes
    {
        st.problems.push(format!(
            "production is {lag} bytes of staging WAL behind (threshold {})",
            thresholds.max_lag_bytes
        ));
    }
    if let Some(secs) = st.lag_seconds
        && secs > thresholds.max_lag_seconds
    {
        st.problems.push(format!(
            "production is {secs:.0} s behind staging (threshold {:.0} s)",
            thresholds.max_lag_seconds
        ));
    }
    st.healthy = st.problems.is_empty();
    Ok(st)
}

/// What one server of staging's host list says about the slot.
async fn standby_slot(endpoint: &Endpoint, slot: &str, host: String, port: u16) -> StandbySlot {
    let mut out = StandbySlot {
        host,
        port,
        ..StandbySlot::default()
    };
    let client = match tokio::time::timeout(endpoint.connect_timeout(), endpoint.connect()).await {
        Ok(Ok(client)) => client,
        Ok(Err(e)) => {
            out.role = format!("unreachable: {e}");
            return out;
        }
        Err(_) => {
            out.role = "unreachable: timed out".into();
            return out;
        }
    };
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(),
                    (SELECT (to_jsonb(s) ->> 'synced')::bool AND NOT temporary
                       FROM pg_replication_slots s WHERE slot_name = $1),
                    (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await;
    match row {
        Ok(row) => {
            let in_recovery: bool = row.get(0);
            out.role = if in_recovery { "standby" } else { "primary" }.into();
            out.synced = in_recovery && row.get::<_, Option<bool>>(1).unwrap_or(false);
            out.confirmed_flush_lsn = row.get(2);
        }
        Err(e) => out.role = format!("unreachable: {e}"),
    }
    out
}

fn mb(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The human-readable report.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "slot {}: {}\n",
        st.slot.name,
        if !st.slot.exists {
            "missing".to_owned()
        } else {
            format!(
                "{}, confirmed {}, staging keeps {} of WAL for it{}",
                if st.slot.active { "active" } else { "inactive" },
                st.slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                st.slot.retained_wal_bytes.map_or("-".into(), mb),
                st.slot
                    .wal_status
                    .as_deref()
                    .map_or(String::new(), |w| format!(" (wal_status {w})"))
            )
        }
    ));
    out.push_str(&format!(
        "staging WAL position: {}\n",
        st.slot.staging_wal_lsn
    ));
    if let Some(failover) = st.slot.failover {
        out.push_str(&format!(
            "failover slot: {}\n",
            if failover { "yes" } else { "no" }
        ));
    }
    for standby in &st.slot.standbys {
        out.push_str(&format!(
            "{} {}:{}: slot {}\n",
            standby.role,
            standby.host,
            standby.port,
            if standby.synced {
                format!(
                    "synchronized (confirmed {})",
                    standby.confirmed_flush_lsn.as_deref().unwrap_or("-")
                )
            } else {
                "not synchronized".to_owned()
            }
        ));
    }
    match &st.last_applied {
        Some(a) => out.push_str(&format!(
            "last applied: transaction {} ending at {}, committed on staging {}, applied {}\n",
            a.xid, a.end_lsn, a.commit_time, a.applied_at
        )),
        None => out.push_str("last applied: nothing yet\n"),
    }
    match (st.lag_bytes, st.lag_seconds) {
        (Some(bytes), Some(secs)) => out.push_str(&format!(
            "lag: {} ({bytes} bytes), {secs:.1} s\n",
            mb(bytes)
        )),
        (Some(bytes), None) => out.push_str(&format!(
            "lag: {} ({bytes} bytes) since the slot's start, nothing applied yet\n",
            mb(bytes)
        )),
        _ => out.push_str("lag: unknown\n"),
    }
    out.push_str(&format!(
        "quarantined changes (conflicts skipped or parked): {}\n",
        st.quarantined_changes
    ));
    for c in &st.conflicts {
        out.push_str(&format!(
            "conflicts logged in {}: {} {}, {}\n",
            c.table, c.count, c.kind, c.action
        ));
    }
    for edits in &st.production_edits {
        out.push_str(&format!(
            "production edits of {} (recorded by the guard): {} open of {}\n",
            edits.table, edits.open, edits.recorded
        ));
    }
    if let Some(r) = &st.repair {
        out.push_str(&format!(
            "repair {} of {} in progress since {}: {} of {} chunks done; {} rows inserted, {} updated, {} deleted\n",
            r.id,
            r.tables.join(", "),
            r.started_at,
            r.chunks_done,
            r.chunks,
            r.inserted,
            r.updated,
            r.deleted
        ));
    }
    if let Some(change) = &st.last_schema_change {
        out.push_str(&format!(
            "last schema change applied: {} at {} ({}), applied {}\n",
            change.table,
            change.lsn,
            change.statement.trim(),
            change.applied_at
        ));
    }
    if !st.schema_changes_waiting.is_empty() {
        out.push_str(&format!(
            "schema changes captured on staging, not applied yet: {}\n",
            st.schema_changes_waiting.join(", ")
        ));
    }
    for build in &st.index_builds_pending {
        out.push_str(&format!("index build to run: {build}\n"));
    }
    if let Some(spool) = &st.spool {
        let held = &spool.held;
        match (held.oldest, held.newest_end) {
            (Some(oldest), Some(newest)) => out.push_str(&format!(
                "spool {}: {} segment(s), {} of {}{}, transactions committing from {oldest} to {newest}{}\n",
                spool.dir,
                held.segments,
                mb(held.bytes as i64),
                mb(spool.max_bytes as i64),
                if spool.full { " (full)" } else { "" },
                spool
                    .production_behind_bytes
                    .map_or(String::new(), |b| format!("; production is {b} bytes behind it"))
            )),
            _ => out.push_str(&format!("spool {}: empty\n", spool.dir)),
        }
    }
    if let Some(stream) = &st.stream {
        out.push_str(&format!(
            "stream {}: sequences {}..{} ({} messages, {}); this target applied up to {}, {} message(s) and {:.1} s behind, {:.0}% of retention left\n",
            stream.stream,
            stream.first_sequence,
            stream.last_sequence,
            stream.messages,
            mb(stream.bytes as i64),
            stream
                .applied_sequence
                .map_or("nothing".into(), |s| s.to_string()),
            stream.behind_messages,
            stream.behind_seconds,
            stream.retention_headroom * 100.0
        ));
    }
    if st.key_map.is_empty() {
        out.push_str("key map: empty\n");
    } else {
        let sizes: Vec<String> = st
            .key_map
            .iter()
            .map(|k| format!("{} {}", k.table, k.entries))
            .collect();
        out.push_str(&format!("key map entries: {}\n", sizes.join(", ")));
    }
    if st.healthy {
        out.push_str("healthy\n");
    } else {
        out.push_str("UNHEALTHY:\n");
        for p in &st.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}
