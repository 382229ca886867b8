//! The TOML configuration file: connections to staging and production, the sync tunables, the
//! staging-managed tables with their key rules and conflict policies, and the extra references
//! that have no declared foreign key. Everything is validated when the file is loaded, so a
//! command never starts with a configuration it would trip over later; every error names the key
//! (and, for syntax errors, the line) and says what to do. Passwords never live in the file: they
//! are read from an environment variable or a secrets file when a connection is made.

mod conninfo;
pub mod libpq;
mod names;
mod patterns;
mod secrets;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::model::ConflictKind;

pub(crate) use conninfo::{ConnError, resolve as resolve_connection_string};
pub use names::{ColumnName, TableName};
use names::{check_slot_name, parse_identifier};
pub use patterns::{TablePattern, glob_matches};
pub(crate) use validate::with_causes;
use validate::{RawConfig, Validator, syntax_message};

/// The `application_name` stagingprop's connections report (visible in `pg_stat_activity`),
/// unless the url sets its own.
pub const APPLICATION_NAME: &str = "stagingprop";

const DEFAULT_SLOT: &str = "stagingprop";
const DEFAULT_PUBLICATION: &str = "stagingprop";
const DEFAULT_BATCH_MAX_ROWS: usize = 20_000;
const DEFAULT_BATCH_MAX_BYTES: usize = 64 * 1024 * 1024;
const DEFAULT_BATCH_MAX_DELAY_MS: u64 = 100;
const DEFAULT_HEARTBEAT_INTERVAL_SECS: u64 = 10;
const DEFAULT_STATUS_INTERVAL_SECS: u64 = 10;
const DEFAULT_RECEIVE_TIMEOUT_SECS: u64 = 60;
const DEFAULT_CONNECT_TIMEOUT_SECS: u64 = 10;

/// PostgreSQL's `NAMEDATALEN - 1`: the longest identifier the server keeps without truncating.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// The whole configuration file, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub staging: DbConfig,
    pub production: DbConfig,
    pub sync: SyncConfig,
    /// The durable spool (`[spool]`); off when absent.
    pub spool: Option<SpoolConfig>,
    /// The JetStream stream of fan-out (`[stream]`): `publish` writes it, `sync --from-stream`
    /// reads it.
    pub stream: Option<StreamConfig>,
    /// The staging-managed tables, in file order, each listed once.
    pub tables: Vec<TableConfig>,
    /// Columns holding keys of a managed table without a declared foreign key.
    pub references: Vec<ReferenceConfig>,
    /// The named scopes (`[scopes.NAME]`), in name order.
    pub scopes: Vec<ScopeConfig>,
    /// The scope this configuration was narrowed to ([`Config::scoped`]), if any.
    pub scope: Option<String>,
    /// Schema changes on staging (`[ddl]`).
    pub ddl: DdlConfig,
    /// `[[table_patterns]]`: schemas whose tables are managed without being listed.
    pub table_patterns: Vec<TablePattern>,
}

/// `guard` (per table, default from `[guard] default`): what production does when anyone but
/// stagingprop writes a staging-managed row (see docs/guard.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    /// No triggers: production's writes go through unseen.
    #[default]
    Off,
    /// The write goes through and is recorded in `stagingprop.production_edits`.
    Record,
    /// The write fails with an error naming the table and where to change it.
    Refuse,
}

/// `on_production_edit` (per table, default from `[guard] on_production_edit`): what sync does
/// when a staging change meets a row production's own users edited (recorded by `guard =
/// "record"`) since stagingprop last wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EditPolicy {
    /// Staging's change is applied; production's overwritten values stay in the conflict log.
    #[default]
    StagingWins,
    /// Production's row is left as it is; staging's change is logged.
    ProductionWins,
    /// Staging's change is set aside (the quarantine, with the three images) for an operator's
    /// `quarantine resolve`; the rest goes on.
    Park,
}

/// What a staging change that met a production edit becomes under a table's edit policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditResolution {
    /// Apply staging's change over production's edit.
    Apply,
    /// Insert staging's whole row (production deleted it).
    InsertRow,
    /// Nothing to do: production already removed the row staging deletes.
    AlreadyDone,
    /// Leave production's row as it is.
    KeepProduction,
    /// Set staging's change aside for an operator.
    Park,
}

/// Every question about an edit policy is answered here, by exhaustive matches.
impl EditPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            EditPolicy::StagingWins => "staging-wins",
            EditPolicy::ProductionWins => "production-wins",
            EditPolicy::Park => "park",
        }
    }

    /// What a change of `kind` that met a production edit becomes; `whole_row`: staging sent
    /// every column of it.
    pub fn resolve(self, kind: crate::model::ConflictKind, whole_row: bool) -> EditResolution {
        use crate::model::ConflictKind as K;
        match (self, kind) {
            (EditPolicy::ProductionWins, _) => EditResolution::KeepProduction,
            (EditPolicy::Park, _) => EditResolution::Park,
            (EditPolicy::StagingWins, K::DeleteMissing | K::DeleteUnmapped) => {
                EditResolution::AlreadyDone
            }
            (EditPolicy::StagingWins, K::UpdateMissing | K::UpdateUnmapped) if whole_row => {
                EditResolution::InsertRow
            }
            // Production deleted the row and staging sent only part of it: an operator decides.
            (EditPolicy::StagingWins, K::UpdateMissing | K::UpdateUnmapped) => EditResolution::Park,
            (
                EditPolicy::StagingWins,
                K::InsertExists | K::UpdateOriginDiffers | K::DeleteOriginDiffers,
            ) => EditResolution::Apply,
        }
    }
}

impl GuardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardMode::Off => "off",
            GuardMode::Record => "record",
            GuardMode::Refuse => "refuse",
        }
    }
}

/// `[ddl]`: what happens to a schema change made on staging to a managed table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DdlConfig {
    pub mode: DdlMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DdlMode {
    /// Captured on staging (an event trigger `init` installs) and applied to production in
    /// order with the rows, in the same transaction.
    #[default]
    Apply,
    /// Captured, and sync stops before the change: it prints the statement and the plan, and
    /// `sync --apply-schema-change` applies it and goes on.
    Stop,
    /// Not captured (`init` removes the trigger): a change production lacks stops sync at the
    /// first row that needs it.
    Off,
}

impl DdlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DdlMode::Apply => "apply",
            DdlMode::Stop => "stop",
            DdlMode::Off => "off",
        }
    }

    /// Whether staging captures schema changes into the stream.
    pub fn captures(self) -> bool {
        match self {
            DdlMode::Apply | DdlMode::Stop => true,
            DdlMode::Off => false,
        }
    }
}

/// How to reach one database (`[staging]` or `[production]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbConfig {
    /// The config section this came from (`staging`, `production`); used in messages.
    pub section: String,
    /// libpq key=value string or postgres:// URL, without a password. It may carry `sslmode`
    /// and `sslrootcert`; those are lifted into the fields below (and must agree with them).
    pub url: String,
    pub password: PasswordSource,
    pub sslmode: SslMode,
    /// CA bundle (PEM) that verifies the server certificate for `verify-ca` / `verify-full`.
    pub sslrootcert: Option<PathBuf>,
    /// A client certificate (PEM) and its private key (PEM, not readable by group or others),
    /// for servers that authenticate clients by certificate.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// libpq's `passfile` from the url: the password file instead of `~/.pgpass`.
    pub passfile: Option<PathBuf>,
    /// 0 waits indefinitely, like libpq.
    pub connect_timeout_secs: u64,
}

/// Where a database password comes from. Never from the config file itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// No password (trust, peer or certificate authentication).
    None,
    /// `password_env = "VAR"`: the value of an environment variable.
    Env(String),
    /// `password_file = "path"`: the contents of a file, minus one trailing newline.
    File(PathBuf),
}

/// libpq's `sslmode`, less `allow` (which tokio-postgres cannot do and nobody should want).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server certificate must be checked against `sslrootcert`.
    pub fn verifies_certificate(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => {
                Err("sslmode \"allow\" is not supported: use \"prefer\" or \"disable\"".into())
            }
            other => Err(format!(
                "unknown sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }
}

/// `[sync]`: the replication slot, the publication and the batching tunables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    pub slot: String,
    pub publication: String,
    pub batch_max_rows: usize,
    pub batch_max_bytes: usize,
    pub batch_max_delay_ms: u64,
    /// While batches commit on production more than twice this long after staging committed
    /// them (a staging too busy for batches of one), an open batch waits until it is this old
    /// before it is applied, instead of at once: fewer, larger batches keep sync from falling
    /// behind in bursts. 0: always at once.
    pub batch_linger_ms: u64,
    pub heartbeat_interval_secs: u64,
    pub status_interval_secs: u64,
    /// A replication stream on which staging sends nothing, not even a keepalive, for this long
    /// is given up as dead (like PostgreSQL's `wal_receiver_timeout`); at half of it staging is
    /// asked for a keepalive.
    pub receive_timeout_secs: u64,
    /// Ask staging to stream large transactions while they are in progress, and apply them
    /// as they arrive (in a production session of their own, committed with them).
    pub streaming: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys that synchronize
    /// slots keep, so that sync continues on a promoted standby.
    pub failover: bool,
    /// The channel of the cache-invalidation notifications of tables with `notify = true`.
    pub notify_channel: String,
    /// SQL run in every batch's production transaction before its commit; `$1` is the batch's
    /// changes as JSON text (tables, operations, production keys).
    pub after_batch_sql: Option<String>,
}

/// `[spool]`: where sync keeps staging's transactions on local disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Past this many bytes sync stops reading ahead of production.
    pub max_bytes: u64,
    /// How long applied transactions stay for `replay`.
    pub retain_secs: u64,
    /// A new segment file starts past this size.
    pub segment_bytes: u64,
}

/// `[stream]`: where staging's transactions are published for several targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// One or more `nats://` / `tls://` server addresses, comma-separated.
    pub url: String,
    /// The JetStream stream.
    pub name: String,
    /// The subject `publish` writes to (default `stagingprop.<slot>`).
    pub subject: String,
    /// This target's durable consumer (`sync --from-stream`).
    pub consumer: String,
    /// With `password`: user and password authentication; without `user`, the secret is a token.
    pub user: Option<String>,
    pub password: PasswordSource,
    /// A CA bundle (PEM) that verifies the server's certificate (TLS is then required).
    pub tls_ca: Option<PathBuf>,
    /// The largest message payload a transaction is cut into (records are never split).
    pub chunk_bytes: usize,
    /// Messages published and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// When `publish` creates the stream: its replicas, `max_age` (0: unlimited) and
    /// duplicate window.
    pub replicas: usize,
    pub max_age_secs: u64,
    pub duplicate_window_secs: u64,
}

/// Under NATS's default `max_payload` (1 MiB), with room for the headers.
pub const DEFAULT_STREAM_CHUNK_BYTES: usize = 512 * 1024;

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 4 << 30;
pub const DEFAULT_SPOOL_RETAIN_SECS: u64 = 24 * 3600;
pub const DEFAULT_SPOOL_SEGMENT_BYTES: u64 = 64 << 20;

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            slot: DEFAULT_SLOT.into(),
            publication: DEFAULT_PUBLICATION.into(),
            batch_max_rows: DEFAULT_BATCH_MAX_ROWS,
            batch_max_bytes: DEFAULT_BATCH_MAX_BYTES,
            batch_max_delay_ms: DEFAULT_BATCH_MAX_DELAY_MS,
            batch_linger_ms: 3,
            heartbeat_interval_secs: DEFAULT_HEARTBEAT_INTERVAL_SECS,
            status_interval_secs: DEFAULT_STATUS_INTERVAL_SECS,
            receive_timeout_secs: DEFAULT_RECEIVE_TIMEOUT_SECS,
            streaming: true,
            failover: false,
            notify_channel: DEFAULT_NOTIFY_CHANNEL.into(),
            after_batch_sql: None,
        }
    }
}

/// The default `[sync] notify_channel`.
pub const DEFAULT_NOTIFY_CHANNEL: &str = "stagingprop";

/// One `[[tables]]` entry: a staging-managed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableConfig {
    pub name: TableName,
    pub key: KeyRule,
    pub on_conflict: ConflictPolicy,
    /// Whether `copy` includes the table (default true).
    pub copy: bool,
    /// Set for tables whose rows are published as files.
    pub files: Option<FilesConfig>,
    /// Send a cache-invalidation notification (`NOTIFY`) naming the keys each batch changed.
    pub notify: bool,
    /// `filter = "..."`: only the rows for which this SQL condition (over the table's columns)
    /// is true are staging-managed; the publication's row filter, copy's and verify's WHERE.
    pub filter: Option<String>,
    /// `columns` / `exclude_columns`: the columns stagingprop manages; production owns the rest.
    pub columns: ColumnList,
    /// What production does with a write to this table's managed rows by anyone else.
    pub guard: GuardMode,
    /// What sync does when a staging change meets such a recorded write.
    pub on_production_edit: EditPolicy,
    /// Managed by a `[[table_patterns]]` entry rather than listed: either side may lack it (created
    /// on staging and on its way, or dropped on staging and kept on production).
    pub from_pattern: bool,
    /// Dropped on production when staging's is dropped (a pattern's `on_staging_drop = "drop"`).
    pub drop_with_staging: bool,
}

/// Which columns of a table are staging-managed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ColumnList {
    /// Every column.
    #[default]
    All,
    /// Only these (the key columns are always added).
    Only(Vec<String>),
    /// Every column but these (never a key column).
    Except(Vec<String>),
}

impl ColumnList {
    /// Whether `column` is managed; `is_key` says whether it is part of the primary key.
    pub fn includes(&self, column: &str, is_key: bool) -> bool {
        match self {
            ColumnList::All => true,
            ColumnList::Only(names) => is_key || names.iter().any(|n| n == column),
            ColumnList::Except(names) => is_key || !names.iter().any(|n| n == column),
        }
    }

    /// The columns named in the file (to check that the table has them).
    pub fn named(&self) -> &[String] {
        match self {
            ColumnList::All => &[],
            ColumnList::Only(names) | ColumnList::Except(names) => names,
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, ColumnList::All)
    }
}

impl TableConfig {
    /// Whether only part of the table (some rows or some columns) is staging-managed.
    pub fn is_partial(&self) -> bool {
        self.filter.is_some() || !self.columns.is_all()
    }
}

/// `[scopes.NAME]`: a named group of per-table row filters with a publication and slot of its
/// own, chosen with `--scope NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeConfig {
    pub name: String,
    pub publication: String,
    pub slot: String,
    /// The filter of each table the scope names (it replaces the table's own `filter`).
    pub filters: Vec<(TableName, String)>,
}

/// How a staging key becomes a production key (see docs/design.md, "Key remapping").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRule {
    /// The key is kept; a collision follows the conflict policy.
    Identity,
    /// The key is kept unless it collides with a production-born row; then a fresh key is
    /// allocated from `source` and recorded.
    RemapOnConflict { source: KeySource },
    /// Every new row gets a fresh production key from `source`.
    Allocate { source: KeySource },
    /// target = source + offset; nothing stored.
    Offset { offset: i64 },
    /// Match an existing production row on `columns`; allocate from `source` when none matches.
    Natural {
        columns: Vec<String>,
        source: KeySource,
    },
}

impl KeyRule {
    /// The rule's name as written in the file.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyRule::Identity => "identity",
            KeyRule::RemapOnConflict { .. } => "remap-on-conflict",
            KeyRule::Allocate { .. } => "allocate",
            KeyRule::Offset { .. } => "offset",
            KeyRule::Natural { .. } => "natural",
        }
    }

    /// Where fresh production keys come from, for the rules that allocate.
    pub fn source(&self) -> Option<&KeySource> {
        match self {
            KeyRule::RemapOnConflict { source }
            | KeyRule::Allocate { source }
            | KeyRule::Natural { source, .. } => Some(source),
            KeyRule::Identity | KeyRule::Offset { .. } => None,
        }
    }
}

/// Where fresh production keys are allocated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A sequence on production (`sequence = "schema.seq"`).
    Sequence(TableName),
    /// A row of a KEYS-style table (counter with lower/upper bounds) on production
    /// (`keys_table = "schema.keys", keys_name = "catentry"`).
    KeysTable { table: TableName, name: String },
}

/// What to do when a change conflicts with production's rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConflictPolicy {
    /// Stop, report the row and the staging LSN, apply nothing of that batch.
    #[default]
    Error,
    /// Skip the change, writing it to the quarantine table.
    Skip,
    /// Overwrite production's row.
    Overwrite,
}

/// What a conflicting change becomes under a table's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Stop: nothing of the batch is applied, and staging is not told to release it.
    Stop,
    /// Nothing to do: production is already as staging wants it (the row is gone).
    AlreadyDone,
    /// Insert staging's whole row in place of the missing one.
    InsertRow,
    /// Write the change to the quarantine and go on; `incomplete_row`: an overwrite that could
    /// not insert the row, since staging did not send every column.
    Quarantine { incomplete_row: bool },
    /// The table is being seeded online: the seed brings the row as staging has it.
    LeftToSeed,
}

impl Resolution {
    /// What a conflict of `kind` becomes in a table being seeded online (`resync`, a table
    /// added), whatever its policy: production lacks rows the seed has not reached yet, and
    /// has rows it already brought. A whole row is written; anything else is the seed's to
    /// bring.
    pub fn while_seeding(kind: ConflictKind, whole_row: bool) -> Resolution {
        match kind {
            ConflictKind::InsertExists | ConflictKind::UpdateMissing if whole_row => {
                Resolution::InsertRow
            }
            ConflictKind::InsertExists
            | ConflictKind::UpdateMissing
            | ConflictKind::DeleteMissing
            | ConflictKind::UpdateUnmapped
            | ConflictKind::DeleteUnmapped
            | ConflictKind::UpdateOriginDiffers
            | ConflictKind::DeleteOriginDiffers => Resolution::LeftToSeed,
        }
    }
}

/// Every question about a conflict policy is answered here, each by an exhaustive match, so a
/// new policy is a compile error wherever it must be decided.
impl ConflictPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::Error => "error",
            ConflictPolicy::Skip => "skip",
            ConflictPolicy::Overwrite => "overwrite",
        }
    }

    /// What a conflict of `kind` becomes; `whole_row`: staging sent every column of the change.
    pub fn resolve(self, kind: ConflictKind, whole_row: bool) -> Resolution {
        match (self, kind) {
            (ConflictPolicy::Error, _) => Resolution::Stop,
            (ConflictPolicy::Skip, _) => Resolution::Quarantine {
                incomplete_row: false,
            },
            (ConflictPolicy::Overwrite, ConflictKind::DeleteMissing) => Resolution::AlreadyDone,
            // (An insert meets its key only where sync watches production's edits: elsewhere
            // it overwrites as it goes.)
            (
                ConflictPolicy::Overwrite,
                ConflictKind::UpdateMissing | ConflictKind::InsertExists,
            ) if whole_row => Resolution::InsertRow,
            (
                ConflictPolicy::Overwrite,
                ConflictKind::UpdateMissing | ConflictKind::InsertExists,
            ) => Resolution::Quarantine {
                incomplete_row: true,
            },
            // A row without a mapping is not production's to overwrite: it is not there. And a
            // row production's users edited is the edit policy's to decide (it never gets here).
            (
                ConflictPolicy::Overwrite,
                ConflictKind::UpdateUnmapped
                | ConflictKind::DeleteUnmapped
                | ConflictKind::UpdateOriginDiffers
                | ConflictKind::DeleteOriginDiffers,
            ) => Resolution::Quarantine {
                incomplete_row: false,
            },
        }
    }

    /// Whether an insert whose key exists replaces production's row as it goes (rather than
    /// being reported as a conflict).
    pub fn inserts_overwrite(self) -> bool {
        match self {
            ConflictPolicy::Overwrite => true,
            ConflictPolicy::Error | ConflictPolicy::Skip => false,
        }
    }

    /// Whether the table's changes may go with their batch's COMMIT in one round trip: there,
    /// a conflict can only fail the batch on the server (then applied again the careful way),
    /// so a policy that writes the conflict down needs the careful way.
    pub fn allows_one_trip(self) -> bool {
        match self {
            ConflictPolicy::Error | ConflictPolicy::Overwrite => true,
            ConflictPolicy::Skip => false,
        }
    }

    /// The policy `quarantine retry` applies a quarantined change under: a change that still
    /// conflicts stays where it is rather than being quarantined again.
    pub fn on_retry(self) -> ConflictPolicy {
        match self {
            ConflictPolicy::Skip => ConflictPolicy::Error,
            ConflictPolicy::Error | ConflictPolicy::Overwrite => self,
        }
    }
}

/// A table whose rows are published as files into `dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesConfig {
    pub dir: PathBuf,
    pub path_column: String,
    pub content_column: String,
}

/// One `[[references]]` entry: `column` holds keys of the managed `table`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceConfig {
    pub column: ColumnName,
    pub table: TableName,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key; the message carries the line and column.
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    /// A value that parses but cannot be used.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        origin: String,
        key: String,
        message: String,
    },
    /// A password written into the file (a `password` key or inside the url).
    #[error(
        "{origin}: {found_in} holds a password; passwords are never read from the config file: \
         set password_env or password_file in [{section}] and remove it from {found_in}"
    )]
    InlinePassword {
        origin: String,
        section: String,
        found_in: String,
    },
    #[error("[{section}] password_env: environment variable {var} {problem}")]
    PasswordEnv {
        section: String,
        var: String,
        problem: String,
    },
    #[error("[{section}] password_file: {}: {problem}", path.display())]
    PasswordFile {
        section: String,
        path: PathBuf,
        problem: String,
    },
    /// The url of a hand-built [`DbConfig`] that does not parse.
    #[error("[{section}] url: {message}")]
    Url { section: String, message: String },
}

impl Config {
    /// The name online repair addresses this target's chunks by: its `[stream] consumer` (one
    /// per target of a fan-out), else its slot.
    pub fn repair_target(&self) -> &str {
        match &self.stream {
            Some(stream) => &stream.consumer,
            None => &self.sync.slot,
        }
    }

    /// Reads, parses and validates the file. Relative paths in it (`password_file`,
    /// `sslrootcert`, `files.dir`) are taken relative to the file's directory, so the result
    /// does not depend on where the command was started.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::from_toml_str(&text, &path.display().to_string())?;
        if let Some(base) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            config.resolve_relative_paths(base);
        }
        Ok(config)
    }

    /// Parses and validates `text`; `origin` names it in errors (usually the file path).
    /// Relative paths are kept as written.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: syntax_message(text, &err),
        })?;
        Validator { text, origin }.config(raw)
    }

    /// The managed table called `name`, if any.
    pub fn table(&self, name: &TableName) -> Option<&TableConfig> {
        self.tables.iter().find(|t| &t.name == name)
    }

    /// This configuration narrowed to the scope `name` (`--scope`): the scope's publication
    /// and slot replace `[sync]`'s, its filters replace the tables' own, and a spool gets a
    /// directory of its own, so that two scopes can run side by side.
    pub fn scoped(&self, name: &str) -> Result<Config, ConfigError> {
        let Some(scope) = self.scopes.iter().find(|s| s.name == name) else {
            let known: Vec<&str> = self.scopes.iter().map(|s| s.name.as_str()).collect();
            return Err(ConfigError::Invalid {
                origin: "--scope".into(),
                key: name.into(),
                message: if known.is_empty() {
                    "the config defines no scopes: add a [scopes.NAME] section".into()
                } else {
                    format!("no such scope; the config defines: {}", known.join(", "))
                },
            });
        };
        let mut config = self.clone();
        config.sync.publication = scope.publication.clone();
        config.sync.slot = scope.slot.clone();
        for (table, filter) in &scope.filters {
            if let Some(t) = config.tables.iter_mut().find(|t| &t.name == table) {
                t.filter = Some(filter.clone());
            }
        }
        if let Some(spool) = &mut config.spool {
            spool.dir = spool.dir.join(&scope.name);
        }
        config.scope = Some(scope.name.clone());
        Ok(config)
    }

    fn resolve_relative_paths(&mut self, base: &Path) {
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for db in [&mut self.staging, &mut self.production] {
            if let PasswordSource::File(p) = &mut db.password {
                rebase(p);
            }
            for p in [&mut db.sslrootcert, &mut db.sslcert, &mut db.sslkey]
                .into_iter()
                .flatten()
            {
                rebase(p);
            }
        }
        for table in &mut self.tables {
            if let Some(files) = &mut table.files {
                rebase(&mut files.dir);
            }
        }
        if let Some(stream) = &mut self.stream {
            if let PasswordSource::File(p) = &mut stream.password {
                rebase(p);
            }
            if let Some(p) = &mut stream.tls_ca {
                rebase(p);
            }
        }
    }
}

impl DbConfig {
    /// A printable description with no password: "host=... port=... dbname=... user=...".
    pub fn describe(&self) -> String {
        let parsed = resolve_connection_string(&self.url).ok().map(|(_, pg)| pg);
        let Some(pg) = parsed else {
            return format!("[{}] (unparseable url)", self.section);
        };
        let mut hosts: Vec<String> = pg
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        if hosts.is_empty() {
            hosts = pg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
        }
        let ports: Vec<String> = if pg.get_ports().is_empty() {
            vec!["5432".into()]
        } else {
            pg.get_ports().iter().map(|p| p.to_string()).collect()
        };
        let mut out = format!("host={} port={}", hosts.join(","), ports.join(","));
        if let Some(dbname) = pg.get_dbname() {
            out.push_str(&format!(" dbname={dbname}"));
        }
        if let Some(user) = pg.get_user() {
            out.push_str(&format!(" user={user}"));
        }
        out.push_str(&format!(" sslmode={}", self.sslmode));
        out
    }
}
