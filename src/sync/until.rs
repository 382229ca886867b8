//! Cutoffs: `sync --until` and `replay --until` apply every staging transaction committed up
//! to a position or a time, and stop before the first one past it.

use super::{SyncError, database_error};
use crate::model::{Lsn, PgTimestamp};
use crate::pg::connect::Endpoint;

/// Where a run stops: the first transaction past it is not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// Transactions whose commit record lies at or before this position.
    Lsn(Lsn),
    /// Transactions committed at or before this time.
    Time(PgTimestamp),
}

impl Until {
    /// Whether a transaction committing at `commit_lsn`, `commit_time` is past the cutoff.
    pub fn passed_by(self, commit_lsn: Lsn, commit_time: PgTimestamp) -> bool {
        match self {
            Until::Lsn(lsn) => commit_lsn > lsn,
            Until::Time(time) => commit_time > time,
        }
    }
}

/// An LSN, or a time read by `server`'s PostgreSQL (so every format and time zone it knows
/// works).
pub async fn parse_until(text: &str, server: &Endpoint) -> Result<Until, SyncError> {
    if let Ok(lsn) = text.parse::<Lsn>() {
        return Ok(Until::Lsn(lsn));
    }
    let client = server
        .connect()
        .await
        .map_err(database_error(server, "connect"))?;
    let row = client
        .query_one(
            "SELECT ((extract(epoch FROM $1::text::timestamptz) - 946684800) * 1000000)::int8",
            &[&text],
        )
        .await
        .map_err(|e| {
            SyncError::BadUntil(format!(
                "--until {text:?} is neither an LSN (like 0/1A2B3C4) nor a time PostgreSQL reads \
                 (like '2026-11-25 18:00:00+00'): {}",
                e.as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned())
            ))
        })?;
    Ok(Until::Time(PgTimestamp(row.get(0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cutoff_takes_what_committed_at_or_before_it() {
        let at = Until::Lsn(Lsn(100));
        assert!(!at.passed_by(Lsn(100), PgTimestamp(0)));
        assert!(at.passed_by(Lsn(101), PgTimestamp(0)));
        let at = Until::Time(PgTimestamp(5_000));
        assert!(!at.passed_by(Lsn(900), PgTimestamp(5_000)));
        assert!(at.passed_by(Lsn(1), PgTimestamp(5_001)));
    }
}
