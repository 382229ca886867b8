//! The vocabulary every stage speaks: WAL positions, relations as pgoutput describes them, column
//! values and row changes. Decoding produces these types; sync, copy and tail consume them.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// A position in PostgreSQL's write-ahead log (`pg_lsn`), printed as `X/Y` in hex like the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: the server treats a reported position of 0 as "nothing".
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self.0 != 0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl serde::Serialize for Lsn {
    /// As text, `X/Y`, like the server prints it.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An LSN string that is not `X/Y` in hex.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

impl PgTimestamp {
    pub fn now() -> Self {
        let since_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let micros = i64::try_from(since_unix.as_micros()).unwrap_or(i64::MAX);
        PgTimestamp(micros - PG_EPOCH_UNIX_SECS * 1_000_000)
    }

    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000)
    }
}

/// What production must not be left with: a change that cannot be applied as the policy says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// An INSERT whose key already exists on production.
    InsertExists,
    /// An UPDATE of a row production lacks.
    UpdateMissing,
    /// A DELETE of a row production lacks.
    DeleteMissing,
    /// An UPDATE of a row that has no key mapping (an allocating rule never saw it).
    UpdateUnmapped,
    /// A DELETE of a row that has no key mapping.
    DeleteUnmapped,
    /// An UPDATE of a row production's own users changed since stagingprop last wrote it
    /// (recorded by the guard).
    UpdateOriginDiffers,
    /// A DELETE of such a row.
    DeleteOriginDiffers,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConflictKind::InsertExists => "insert of a key that already exists on production",
            ConflictKind::UpdateMissing => "update of a row production lacks",
            ConflictKind::DeleteMissing => "delete of a row production lacks",
            ConflictKind::UpdateUnmapped => {
                "update of a row that has no key mapping, so production has no row for it"
            }
            ConflictKind::DeleteUnmapped => {
                "delete of a row that has no key mapping, so production has no row for it"
            }
            ConflictKind::UpdateOriginDiffers => {
                "update of a row production edited since stagingprop last wrote it"
            }
            ConflictKind::DeleteOriginDiffers => {
                "delete of a row production edited since stagingprop last wrote it"
            }
        })
    }
}

impl ConflictKind {
    /// Its name in logs and metrics, as PostgreSQL 18 names the kinds it counts
    /// (`pg_stat_subscription_stats`), with stagingprop's own two for key remapping.
    pub fn name(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert_exists",
            ConflictKind::UpdateMissing => "update_missing",
            ConflictKind::DeleteMissing => "delete_missing",
            ConflictKind::UpdateUnmapped => "update_unmapped",
            ConflictKind::DeleteUnmapped => "delete_unmapped",
            ConflictKind::UpdateOriginDiffers => "update_origin_differs",
            ConflictKind::DeleteOriginDiffers => "delete_origin_differs",
        }
    }

    pub fn operation(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert",
            ConflictKind::UpdateMissing
            | ConflictKind::UpdateUnmapped
            | ConflictKind::UpdateOriginDiffers => "update",
            ConflictKind::DeleteMissing
            | ConflictKind::DeleteUnmapped
            | ConflictKind::DeleteOriginDiffers => "delete",
        }
    }
}

/// Below this WAL distance production counts as caught up: an idle staging still writes WAL
/// (heartbeats, checkpoints, other databases) that holds nothing to apply.
pub const CAUGHT_UP_BYTES: u64 = 64 * 1024;

/// How far production is behind staging, measured the same way by sync's log line and gauges,
/// `status` and the run report.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Lag {
    /// Staging WAL past what production has.
    pub bytes: u64,
    /// Since the last transaction production has committed on staging; 0 when caught up, unknown
    /// while behind with nothing applied yet.
    pub seconds: Option<f64>,
}

impl Lag {
    /// The lag of a target whose progress row says `applied` (invalid: it has none yet) behind
    /// `staging_end`, staging's WAL position now. Without a progress row the target is measured
    /// from `start`, where the slot starts (its confirmed position: nothing before it will be
    /// sent), never from 0/0. `last_commit` is when the last applied transaction committed on
    /// staging. Unknown (None) when staging's position or both of the others are.
    pub fn measure(
        staging_end: Lsn,
        applied: Lsn,
        start: Lsn,
        last_commit: Option<PgTimestamp>,
        now: PgTimestamp,
    ) -> Option<Lag> {
        let from = if applied.is_valid() { applied } else { start };
        if !staging_end.is_valid() || !from.is_valid() {
            return None;
        }
        let bytes = staging_end.0.saturating_sub(from.0);
        let seconds = if bytes <= CAUGHT_UP_BYTES {
            Some(0.0)
        } else {
            last_commit.map(|t| (now.0 - t.0).max(0) as f64 / 1e6)
        };
        Some(Lag { bytes, seconds })
    }
}

impl fmt::Display for PgTimestamp {
    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-25T10:58:37.123456Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let micros = self.unix_micros();
        let secs = micros.div_euclid(1_000_000);
        let frac = micros.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let tod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
            tod / 3600,
            (tod / 60) % 60,
            tod % 60
        )
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// PostgreSQL's transaction id as pgoutput sends it.
pub type Xid = u32;

/// A relation's OID on the source server. Stable for the life of the table, not across servers.
pub type Oid = u32;

/// How the source identifies a row in UPDATE and DELETE messages (`relreplident`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// 'd': the primary key.
    Default,
    /// 'n': nothing; updates and deletes carry no old key.
    Nothing,
    /// 'f': the whole old row.
    Full,
    /// 'i': a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }

    /// The byte pgoutput sends for it.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "default",
            ReplicaIdentity::Nothing => "nothing",
            ReplicaIdentity::Full => "full",
            ReplicaIdentity::Index => "index",
        }
    }
}

/// A column as the Relation message describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// Part of the replica identity (the key that UPDATE/DELETE old tuples carry).
    pub is_key: bool,
    pub type_oid: Oid,
    pub type_modifier: i32,
}

/// A table as the Relation message describes it. Cached by OID; replaced when a new one arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: Oid,
    /// Schema name; pgoutput sends "" for pg_catalog, which this type stores as "pg_catalog".
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

impl Relation {
    /// `schema.table`, unquoted, as the config names tables.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    /// Indexes of the replica identity columns, in column order.
    pub fn key_columns(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
    }
}

/// One column of a row as the source sent it. Column bytes are slices of the received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// 'n'
    Null,
    /// 'u': a TOASTed value the UPDATE did not change and the server did not send; the target keeps
    /// its value.
    UnchangedToast,
    /// 't': the value in PostgreSQL's text output format.
    Text(Bytes),
    /// 'b': the value in the type's binary send format (only with `binary 'true'`).
    Binary(Bytes),
}

/// A row image: one value per column of the relation, in column order.
pub type Tuple = Vec<Value>;

/// What a DELETE or UPDATE carried to identify the old row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity columns are meaningful (others are sent as NULL).
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_without_a_progress_row_is_measured_from_where_the_slot_starts() {
        let now = PgTimestamp(1_000_000_000);
        // Nothing pending: staging's WAL is where the slot starts, whatever its absolute value.
        let fresh = Lag::measure(
            Lsn(9_408_683_128),
            Lsn::INVALID,
            Lsn(9_408_683_128),
            None,
            now,
        );
        assert_eq!(
            fresh,
            Some(Lag {
                bytes: 0,
                seconds: Some(0.0)
            })
        );
        // A backlog before the first transaction: its size is known, its age is not.
        let backlog = Lag::measure(Lsn(5_000_000), Lsn::INVALID, Lsn(1_000_000), None, now);
        assert_eq!(
            backlog,
            Some(Lag {
                bytes: 4_000_000,
                seconds: None
            })
        );
        // Neither a progress row nor a slot position: unknown, not the whole WAL.
        assert_eq!(
            Lag::measure(Lsn(5_000_000), Lsn::INVALID, Lsn::INVALID, None, now),
            None
        );
    }

    #[test]
    fn lag_with_a_progress_row_counts_from_it_and_ages_from_its_commit() {
        let now = PgTimestamp(10_000_000);
        let commit = Some(PgTimestamp(7_500_000));
        // The progress row wins over the slot's position (a spool confirms ahead of production).
        let behind = Lag::measure(Lsn(2_000_000), Lsn(1_000_000), Lsn(1_900_000), commit, now);
        assert_eq!(
            behind,
            Some(Lag {
                bytes: 1_000_000,
                seconds: Some(2.5)
            })
        );
        let close = Lag::measure(Lsn(1_000_100), Lsn(1_000_000), Lsn::INVALID, commit, now);
        assert_eq!(close.map(|l| (l.bytes, l.seconds)), Some((100, Some(0.0))));
        // Staging's position unknown (a replay, a stream): unknown.
        assert_eq!(
            Lag::measure(Lsn::INVALID, Lsn(1_000_000), Lsn::INVALID, commit, now),
            None
        );
    }
}
