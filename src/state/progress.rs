//! `stagingprop.progress`: per slot, the last staging transaction the database has, written in
//! the same transaction as its rows. It is the truth of what a target has: a session starts
//! the slot (or the spool) there and skips everything before it. Every write is guarded by the
//! value the writer last saw, so two writers (two syncs, a sync and a copy or a replay) never
//! both move it.

use tokio_postgres::{Client, Statement};

use super::{StateError, query_error, table};
use crate::model::{Lsn, PgTimestamp, Xid};

/// The last staging transaction a database has, as recorded in its progress row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub end_lsn: Lsn,
    pub commit_lsn: Lsn,
    pub xid: Xid,
    pub commit_time: PgTimestamp,
    /// For a target fed from a JetStream stream: the stream sequence of the message that
    /// ended this transaction (where reading resumes).
    pub stream_seq: Option<u64>,
}

impl Progress {
    /// What `copy` writes before it starts loading: sync refuses a target in this state.
    pub fn copy_in_progress() -> Progress {
        Progress {
            end_lsn: Lsn::INVALID,
            commit_lsn: Lsn::INVALID,
            xid: 0,
            commit_time: PgTimestamp::now(),
            stream_seq: None,
        }
    }

    /// The hand-off of a copy taken at `point`: sync starts right after it.
    pub fn handoff(point: Lsn) -> Progress {
        Progress {
            end_lsn: point,
            commit_lsn: point,
            xid: 0,
            commit_time: PgTimestamp::now(),
            stream_seq: None,
        }
    }

    /// A copy started writing this target and did not hand off.
    pub fn is_copy_in_progress(&self) -> bool {
        !self.end_lsn.is_valid()
    }
}

/// Reads what the database has from `slot`.
pub async fn read(client: &Client, slot: &str) -> Result<Option<Progress>, StateError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT end_lsn::text, commit_lsn::text, xid, \
                 (extract(epoch FROM commit_time) * 1000000)::bigint, \
                 (to_jsonb(p) ->> 'stream_seq')::bigint \
                 FROM {} p WHERE slot = $1",
                table("progress")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the progress table"))?;
    Ok(row.map(|r| {
        let end: String = r.get(0);
        let commit: String = r.get(1);
        let xid: i64 = r.get(2);
        let unix_micros: i64 = r.get(3);
        let stream_seq: Option<i64> = r.get(4);
        Progress {
            end_lsn: end.parse().unwrap_or_default(),
            commit_lsn: commit.parse().unwrap_or_default(),
            xid: xid as Xid,
            commit_time: PgTimestamp(unix_micros - PgTimestamp(0).unix_micros()),
            stream_seq: stream_seq.map(|s| s as u64),
        }
    }))
}

/// What the guarded write raises when the row holds something else.
const MOVED: &str = "stagingprop: the progress row moved";

/// The guarded write of [`advance`]: $1 slot, $2 end, $3 commit LSN, $4 xid, $5 commit time
/// (microseconds since the Unix epoch), $6 the expected end, $7 the stream sequence (or NULL).
/// When the row holds something else it writes nothing and fails (an invalid integer naming [`MOVED`]), which aborts the caller's
/// transaction: a COMMIT sent right behind it, without waiting, then rolls back.
fn advance_sql() -> String {
    let progress = table("progress");
    format!(
        "WITH w AS (INSERT INTO {progress} (slot, end_lsn, commit_lsn, xid, commit_time, applied_at, stream_seq) \
         VALUES ($1, $2::text::pg_lsn, $3::text::pg_lsn, $4, to_timestamp($5::float8 / 1000000), now(), $7) \
         ON CONFLICT (slot) DO UPDATE SET end_lsn = EXCLUDED.end_lsn, commit_lsn = EXCLUDED.commit_lsn, \
         xid = EXCLUDED.xid, commit_time = EXCLUDED.commit_time, applied_at = now(), \
         stream_seq = EXCLUDED.stream_seq \
         WHERE {progress}.end_lsn = $6::text::pg_lsn RETURNING 1) \
         SELECT CASE WHEN EXISTS (SELECT FROM w) THEN 1 \
                     ELSE ('{MOVED} ' || (SELECT count(*) FROM w))::int END"
    )
}

/// Prepares [`advance`]'s statement, for a session that writes the row at every commit.
pub async fn prepare_advance(client: &Client) -> Result<Statement, StateError> {
    client
        .prepare(&advance_sql())
        .await
        .map_err(query_error("preparing the progress table's write"))
}

/// Moves `slot`'s row to `to`, only from `expected` (the value the caller last saw; invalid
/// when it saw no row or a copy in progress). Returns false, writing nothing, when the row
/// holds something else: another writer moved it; the caller's transaction is then aborted.
pub async fn advance(
    client: &Client,
    slot: &str,
    to: &Progress,
    expected: Lsn,
) -> Result<bool, StateError> {
    let statement = prepare_advance(client).await?;
    advance_prepared(client, &statement, slot, to, expected).await
}

/// [`advance`] with its statement prepared by [`prepare_advance`].
pub async fn advance_prepared(
    client: &Client,
    statement: &Statement,
    slot: &str,
    to: &Progress,
    expected: Lsn,
) -> Result<bool, StateError> {
    let end = to.end_lsn.to_string();
    let commit = to.commit_lsn.to_string();
    let xid = i64::from(to.xid);
    let micros = to.commit_time.unix_micros() as f64;
    let expected = expected.to_string();
    let stream_seq = to.stream_seq.map(|s| s as i64);
    match client
        .execute(
            statement,
            &[&slot, &end, &commit, &xid, &micros, &expected, &stream_seq],
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_db_error()
                .is_some_and(|db| db.message().contains(MOVED)) =>
        {
            Ok(false)
        }
        Err(e) => Err(query_error("updating the progress table")(e)),
    }
}

/// Rewrites `slot`'s row unchanged: a write for a synchronous commit to flush.
pub async fn touch(client: &Client, slot: &str) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "UPDATE {} SET applied_at = applied_at WHERE slot = $1",
                table("progress")
            ),
            &[&slot],
        )
        .await
        .map(drop)
}

/// The progress row as `status` shows it.
#[derive(Clone, Debug)]
pub struct Applied {
    pub end_lsn: String,
    pub xid: i64,
    pub commit_time: String,
    pub applied_at: String,
    /// Seconds from its staging commit to now, by the database's clock.
    pub since_commit: f64,
    /// A stream-fed target's stream sequence.
    pub stream_seq: Option<i64>,
}

/// `slot`'s row for `status`, if the table and the row exist.
pub async fn applied(client: &Client, slot: &str) -> Result<Option<Applied>, StateError> {
    let exists = super::exists(client, "progress")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?;
    if !exists {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT end_lsn::text, xid, commit_time::text, applied_at::text,
                        extract(epoch FROM now() - commit_time)::float8,
                        (to_jsonb(p) ->> 'stream_seq')::bigint
                   FROM {} p WHERE slot = $1",
                table("progress")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the progress table"))?;
    Ok(row.map(|r| Applied {
        end_lsn: r.get(0),
        xid: r.get(1),
        commit_time: r.get(2),
        applied_at: r.get(3),
        since_commit: r.get(4),
        stream_seq: r.get(5),
    }))
}
