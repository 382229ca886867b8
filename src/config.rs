//! The TOML configuration file: connections to staging and production, the sync tunables, the
//! staging-managed tables with their key rules and conflict policies, and the extra references
//! that have no declared foreign key. Everything is validated when the file is loaded, so a
//! command never starts with a configuration it would trip over later; every error names the key
//! (and, for syntax errors, the line) and says what to do. Passwords never live in the file: they
//! are read from an environment variable or a secrets file when a connection is made.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;

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
    /// The staging-managed tables, in file order, each listed once.
    pub tables: Vec<TableConfig>,
    /// Columns holding keys of a managed table without a declared foreign key.
    pub references: Vec<ReferenceConfig>,
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
    pub heartbeat_interval_secs: u64,
    pub status_interval_secs: u64,
    /// Ask staging to stream large transactions while they are in progress, and apply them
    /// as they arrive (in a production session of their own, committed with them).
    pub streaming: bool,
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
            heartbeat_interval_secs: DEFAULT_HEARTBEAT_INTERVAL_SECS,
            status_interval_secs: DEFAULT_STATUS_INTERVAL_SECS,
            streaming: true,
            notify_channel: DEFAULT_NOTIFY_CHANNEL.into(),
            after_batch_sql: None,
        }
    }
}

/// The default `[sync] notify_channel`.
pub const DEFAULT_NOTIFY_CHANNEL: &str = "stagingprop";

/// A schema-qualified table (or sequence) name, as the catalogs spell it: written `schema.table`
/// in the file, unqualified meaning `public`, unquoted parts folded to lower case and
/// double-quoted parts kept as written, as SQL does. Displayed unquoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl FromStr for TableName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = parse_qualified_name(s)?;
        match parts.len() {
            1 => Ok(TableName::new("public", parts.remove(0))),
            2 => {
                let name = parts.remove(1);
                Ok(TableName::new(parts.remove(0), name))
            }
            _ => Err(format!(
                "{s:?} is not a table name: write \"schema.table\" (or just \"table\" for public)"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A column of a table, written `schema.table.column` in full.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ColumnName {
    pub table: TableName,
    pub column: String,
}

impl fmt::Display for ColumnName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.table, self.column)
    }
}

impl FromStr for ColumnName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = parse_qualified_name(s)?;
        if parts.len() != 3 {
            return Err(format!(
                "{s:?} is not a column name: write it in full as \"schema.table.column\""
            ));
        }
        let column = parts.remove(2);
        let name = parts.remove(1);
        Ok(ColumnName {
            table: TableName::new(parts.remove(0), name),
            column,
        })
    }
}

impl<'de> Deserialize<'de> for ColumnName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

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
}

/// How a staging key becomes a production key (see DESIGN.md, "Key remapping").
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
            if let Some(p) = &mut db.sslrootcert {
                rebase(p);
            }
        }
        for table in &mut self.tables {
            if let Some(files) = &mut table.files {
                rebase(&mut files.dir);
            }
        }
    }
}

impl DbConfig {
    /// Reads the password from its environment variable or file. A file loses one trailing
    /// newline (`\n` or `\r\n`); an unset or empty variable, or an unreadable or empty file, is an
    /// error naming it. The password itself never appears in an error.
    pub fn resolve_password(&self) -> Result<Option<String>, ConfigError> {
        match &self.password {
            PasswordSource::None => Ok(None),
            PasswordSource::Env(var) => {
                let env_error = |problem: &str| ConfigError::PasswordEnv {
                    section: self.section.clone(),
                    var: var.clone(),
                    problem: problem.to_owned(),
                };
                match std::env::var(var) {
                    Ok(value) if value.is_empty() => Err(env_error(
                        "is empty: export the password in it before starting stagingprop",
                    )),
                    Ok(value) => Ok(Some(value)),
                    Err(std::env::VarError::NotPresent) => Err(env_error(
                        "is not set: export the password in it before starting stagingprop, or use password_file",
                    )),
                    Err(std::env::VarError::NotUnicode(_)) => {
                        Err(env_error("is not valid UTF-8: fix its value"))
                    }
                }
            }
            PasswordSource::File(path) => {
                let file_error = |problem: String| ConfigError::PasswordFile {
                    section: self.section.clone(),
                    path: path.clone(),
                    problem,
                };
                let bytes = std::fs::read(path).map_err(|err| {
                    file_error(format!(
                        "cannot read it ({err}): check the path and that stagingprop may read it"
                    ))
                })?;
                let mut text = String::from_utf8(bytes)
                    .map_err(|_| file_error("is not valid UTF-8: fix its contents".into()))?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                if text.is_empty() {
                    return Err(file_error("is empty: write the password into it".into()));
                }
                Ok(Some(text))
            }
        }
    }

    /// The tokio-postgres connection settings: the url, the resolved password, the connect
    /// timeout and `application_name = stagingprop` (unless the url names one). `sslmode` is this
    /// struct's: `verify-ca` and `verify-full` map to tokio-postgres's `Require`, and the TLS
    /// connector does the verification with `sslrootcert`.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let url_error = |message: String| ConfigError::Url {
            section: self.section.clone(),
            message,
        };
        let parts = split_connection_string(&self.url).map_err(url_error)?;
        if parts.has_password {
            return Err(url_error(
                "holds a password: remove it and use password_env or password_file".into(),
            ));
        }
        let mut pg: tokio_postgres::Config = parts
            .rest
            .parse()
            .map_err(|err| url_error(format!("does not parse: {}", with_causes(&err))))?;
        if pg.get_password().is_some() {
            return Err(url_error(
                "holds a password: remove it and use password_env or password_file".into(),
            ));
        }
        if let Some(password) = self.resolve_password()? {
            pg.password(password);
        }
        pg.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        if self.connect_timeout_secs > 0 {
            pg.connect_timeout(Duration::from_secs(self.connect_timeout_secs));
        }
        if pg.get_application_name().is_none() {
            pg.application_name(APPLICATION_NAME);
        }
        Ok(pg)
    }

    /// A printable description with no password: "host=... port=... dbname=... user=...".
    pub fn describe(&self) -> String {
        let parsed = split_connection_string(&self.url)
            .ok()
            .and_then(|parts| parts.rest.parse::<tokio_postgres::Config>().ok());
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

// ---------------------------------------------------------------------------------------------
// The file as serde sees it; `Validator` turns it into the types above.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    staging: Option<RawDb>,
    production: Option<RawDb>,
    sync: Option<RawSync>,
    spool: Option<RawSpool>,
    #[serde(default)]
    tables: Vec<RawTable>,
    #[serde(default)]
    references: Vec<RawReference>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDb {
    url: Option<String>,
    /// Accepted only to be refused with a specific message; its value is never kept.
    password: Option<IgnoredAny>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    sslmode: Option<SslMode>,
    sslrootcert: Option<PathBuf>,
    connect_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    slot: Option<String>,
    publication: Option<String>,
    batch_max_rows: Option<usize>,
    batch_max_bytes: Option<usize>,
    batch_max_delay_ms: Option<u64>,
    heartbeat_interval_secs: Option<u64>,
    status_interval_secs: Option<u64>,
    streaming: Option<bool>,
    notify_channel: Option<String>,
    after_batch_sql: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    dir: Option<PathBuf>,
    max_bytes: Option<u64>,
    retain_secs: Option<u64>,
    segment_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    name: Option<Spanned<TableName>>,
    key: Option<RawKey>,
    on_conflict: Option<ConflictPolicy>,
    copy: Option<bool>,
    files: Option<RawFiles>,
    notify: Option<bool>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawRule {
    Identity,
    RemapOnConflict,
    Allocate,
    Offset,
    Natural,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    rule: Option<RawRule>,
    sequence: Option<TableName>,
    keys_table: Option<TableName>,
    keys_name: Option<String>,
    offset: Option<i64>,
    columns: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFiles {
    dir: Option<PathBuf>,
    path_column: Option<String>,
    content_column: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReference {
    column: Option<Spanned<ColumnName>>,
    table: Option<TableName>,
}

/// toml's own message (line, column, the offending line and what was wrong) — unless the line
/// may hold a password, in which case only its position is shown.
fn syntax_message(text: &str, err: &toml::de::Error) -> String {
    if let Some(span) = err.span() {
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line = &text[line_start..line_end];
        if line.to_ascii_lowercase().contains("password") {
            let line_number = text[..start].matches('\n').count() + 1;
            let column = text[line_start..start].chars().count() + 1;
            return format!(
                "TOML parse error at line {line_number}, column {column} (line not shown: it may hold a password)\n{}",
                err.message().trim_end()
            );
        }
    }
    err.to_string().trim_end().to_owned()
}

impl DbConfig {
    /// A database named on the command line (`replay --to URL`): the same rules as a config
    /// section (no password in the URL; sslmode and sslrootcert may be given in it), with the
    /// password from an environment variable or a file. `origin` names the option in errors.
    pub fn from_command_line(
        origin: &str,
        url: &str,
        password_env: Option<String>,
        password_file: Option<PathBuf>,
    ) -> Result<DbConfig, ConfigError> {
        let raw = RawDb {
            url: Some(url.to_owned()),
            password: None,
            password_env,
            password_file,
            sslmode: None,
            sslrootcert: None,
            connect_timeout_secs: None,
        };
        Validator { text: "", origin }.db("target", Some(raw))
    }
}

struct Validator<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Validator<'_> {
    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text[..offset].matches('\n').count() + 1
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let staging = self.db("staging", raw.staging)?;
        let production = self.db("production", raw.production)?;
        let sync = self.sync(raw.sync)?;
        let spool = match raw.spool {
            None => None,
            Some(raw_spool) => Some(self.spool(raw_spool)?),
        };
        if raw.tables.is_empty() {
            return Err(self.invalid(
                "tables",
                "no managed tables: add a [[tables]] entry with name = \"schema.table\" for each staging-managed table",
            ));
        }
        let mut tables: Vec<TableConfig> = Vec::with_capacity(raw.tables.len());
        let mut seen: HashMap<TableName, usize> = HashMap::new();
        for (index, mut raw_table) in raw.tables.into_iter().enumerate() {
            let key = format!("tables[{index}]");
            let Some(name) = raw_table.name.take() else {
                return Err(self.invalid(
                    key,
                    "has no name: add name = \"schema.table\" to this [[tables]] entry",
                ));
            };
            let line = self.line_of(name.span().start);
            let name = name.into_inner();
            if let Some(first_line) = seen.insert(name.clone(), line) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!(
                        "table {name} is listed twice (lines {first_line} and {line}): keep one [[tables]] entry for it"
                    ),
                ));
            }
            tables.push(self.table(&key, name, raw_table)?);
        }
        let references = self.references(raw.references, &tables)?;
        Ok(Config {
            staging,
            production,
            sync,
            spool,
            tables,
            references,
        })
    }

    fn db(&self, section: &str, raw: Option<RawDb>) -> Result<DbConfig, ConfigError> {
        let Some(raw) = raw else {
            return Err(self.invalid(
                format!("[{section}]"),
                format!(
                    "the section is missing: add [{section}] with url = \"host=... dbname=... user=...\" (or a postgres:// URL)"
                ),
            ));
        };
        let inline_password = |found_in: String| ConfigError::InlinePassword {
            origin: self.origin.to_owned(),
            section: section.to_owned(),
            found_in,
        };
        if raw.password.is_some() {
            return Err(inline_password(format!("{section}.password")));
        }
        let url_key = format!("{section}.url");
        let Some(url) = raw.url else {
            return Err(self.invalid(
                url_key,
                "is missing: set url to a libpq key=value string (\"host=... dbname=... user=...\") or a postgres:// URL",
            ));
        };
        if url.trim().is_empty() {
            return Err(self.invalid(
                url_key,
                "is empty: set it to a libpq key=value string or a postgres:// URL",
            ));
        }
        let parts = split_connection_string(&url).map_err(|m| self.invalid(&url_key, m))?;
        if parts.has_password {
            return Err(inline_password(url_key));
        }
        let pg: tokio_postgres::Config = parts.rest.parse().map_err(|err| {
            self.invalid(
                &url_key,
                format!(
                    "does not parse as a libpq connection string or postgres:// URL: {}",
                    with_causes(&err)
                ),
            )
        })?;
        if pg.get_password().is_some() {
            return Err(inline_password(url_key));
        }
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(self.invalid(
                url_key,
                "names no host: add host=... (or a host in the postgres:// URL)",
            ));
        }

        let password = match (raw.password_env, raw.password_file) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    format!("[{section}]"),
                    "both password_env and password_file are set: keep only one",
                ));
            }
            (Some(var), None) => {
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    return Err(self.invalid(
                        format!("{section}.password_env"),
                        format!("{var:?} is not an environment variable name: write the variable's name, e.g. \"STAGING_PASSWORD\""),
                    ));
                }
                PasswordSource::Env(var)
            }
            (None, Some(path)) => {
                if path.as_os_str().is_empty() {
                    return Err(self.invalid(
                        format!("{section}.password_file"),
                        "is empty: set it to the path of a file holding the password",
                    ));
                }
                PasswordSource::File(path)
            }
            (None, None) => PasswordSource::None,
        };

        let url_sslmode = match &parts.sslmode {
            Some(text) => Some(
                text.parse::<SslMode>()
                    .map_err(|m| self.invalid(&url_key, m))?,
            ),
            None => None,
        };
        let sslmode = match (raw.sslmode, url_sslmode) {
            (Some(field), Some(in_url)) if field != in_url => {
                return Err(self.invalid(
                    format!("{section}.sslmode"),
                    format!(
                        "sslmode = \"{field}\" conflicts with sslmode={in_url} in {url_key}: give it in one place"
                    ),
                ));
            }
            (field, in_url) => field.or(in_url).unwrap_or_default(),
        };
        let url_rootcert = parts.sslrootcert.map(PathBuf::from);
        let sslrootcert = match (raw.sslrootcert, url_rootcert) {
            (Some(field), Some(in_url)) if field != in_url => {
                return Err(self.invalid(
                    format!("{section}.sslrootcert"),
                    format!(
                        "sslrootcert = {:?} conflicts with sslrootcert={} in {url_key}: give it in one place",
                        field.display().to_string(),
                        in_url.display()
                    ),
                ));
            }
            (field, in_url) => field.or(in_url),
        };
        if sslrootcert
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(self.invalid(
                format!("{section}.sslrootcert"),
                "is empty: set it to a PEM file of CA certificates, or remove it",
            ));
        }
        match (sslmode.verifies_certificate(), &sslrootcert) {
            (true, None) => {
                return Err(self.invalid(
                    format!("{section}.sslmode"),
                    format!(
                        "sslmode = \"{sslmode}\" needs the CA certificates to verify the server: set sslrootcert = \"/path/to/ca.pem\" in [{section}]"
                    ),
                ));
            }
            (false, Some(_)) => {
                return Err(self.invalid(
                    format!("{section}.sslrootcert"),
                    format!(
                        "is only used to verify the server, but sslmode is \"{sslmode}\": set sslmode = \"verify-full\" (or \"verify-ca\"), or remove sslrootcert"
                    ),
                ));
            }
            _ => {}
        }

        let url_timeout = pg.get_connect_timeout().map(Duration::as_secs);
        let connect_timeout_secs = match (raw.connect_timeout_secs, url_timeout) {
            (Some(field), Some(in_url)) if field != in_url => {
                return Err(self.invalid(
                    format!("{section}.connect_timeout_secs"),
                    format!(
                        "connect_timeout_secs = {field} conflicts with connect_timeout={in_url} in {url_key}: give it in one place"
                    ),
                ));
            }
            (field, in_url) => field.or(in_url).unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECS),
        };

        Ok(DbConfig {
            section: section.to_owned(),
            url,
            password,
            sslmode,
            sslrootcert,
            connect_timeout_secs,
        })
    }

    fn spool(&self, raw: RawSpool) -> Result<SpoolConfig, ConfigError> {
        let dir = raw
            .dir
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| {
                self.invalid(
                    "spool",
                    "needs dir = \"/path\": the directory that holds the spool's segment files",
                )
            })?;
        let positive = |key: &str, value: Option<u64>, default: u64| match value {
            Some(0) => Err(self.invalid(format!("spool.{key}"), "must be greater than 0")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let segment_bytes = positive(
            "segment_bytes",
            raw.segment_bytes,
            DEFAULT_SPOOL_SEGMENT_BYTES,
        )?;
        let max_bytes = positive("max_bytes", raw.max_bytes, DEFAULT_SPOOL_MAX_BYTES)?;
        if max_bytes < segment_bytes {
            return Err(self.invalid(
                "spool.max_bytes",
                format!(
                    "{max_bytes} is smaller than one segment ({segment_bytes} bytes): raise max_bytes or lower segment_bytes"
                ),
            ));
        }
        Ok(SpoolConfig {
            dir,
            max_bytes,
            retain_secs: raw.retain_secs.unwrap_or(DEFAULT_SPOOL_RETAIN_SECS),
            segment_bytes,
        })
    }

    fn sync(&self, raw: Option<RawSync>) -> Result<SyncConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(SyncConfig::default());
        };
        let defaults = SyncConfig::default();
        let slot = raw.slot.unwrap_or(defaults.slot);
        if let Err(problem) = check_slot_name(&slot) {
            return Err(self.invalid(
                "sync.slot",
                format!("{slot:?} is not a valid replication slot name: {problem}"),
            ));
        }
        let publication = raw.publication.unwrap_or(defaults.publication);
        if let Err(problem) = check_slot_name(&publication) {
            return Err(self.invalid(
                "sync.publication",
                format!("{publication:?} is not a usable publication name: {problem}"),
            ));
        }
        let at_least_one = |key: &str, value: u64| {
            if value == 0 {
                Err(self.invalid(format!("sync.{key}"), "must be at least 1"))
            } else {
                Ok(())
            }
        };
        let batch_max_rows = raw.batch_max_rows.unwrap_or(defaults.batch_max_rows);
        at_least_one("batch_max_rows", batch_max_rows as u64)?;
        let batch_max_bytes = raw.batch_max_bytes.unwrap_or(defaults.batch_max_bytes);
        at_least_one("batch_max_bytes", batch_max_bytes as u64)?;
        let heartbeat_interval_secs = raw
            .heartbeat_interval_secs
            .unwrap_or(defaults.heartbeat_interval_secs);
        at_least_one("heartbeat_interval_secs", heartbeat_interval_secs)?;
        let status_interval_secs = raw
            .status_interval_secs
            .unwrap_or(defaults.status_interval_secs);
        at_least_one("status_interval_secs", status_interval_secs)?;
        let streaming = raw.streaming.unwrap_or(defaults.streaming);
        let notify_channel = raw.notify_channel.unwrap_or(defaults.notify_channel);
        if let Err(problem) = check_slot_name(&notify_channel) {
            return Err(self.invalid(
                "sync.notify_channel",
                format!("{notify_channel:?} is not a usable channel name: {problem}"),
            ));
        }
        let after_batch_sql = raw.after_batch_sql.filter(|sql| !sql.trim().is_empty());
        Ok(SyncConfig {
            streaming,
            notify_channel,
            after_batch_sql,
            slot,
            publication,
            batch_max_rows,
            batch_max_bytes,
            batch_max_delay_ms: raw
                .batch_max_delay_ms
                .unwrap_or(defaults.batch_max_delay_ms),
            heartbeat_interval_secs,
            status_interval_secs,
        })
    }

    fn table(&self, key: &str, name: TableName, raw: RawTable) -> Result<TableConfig, ConfigError> {
        let key_rule = match raw.key {
            None => KeyRule::Identity,
            Some(raw_key) => self.key_rule(&format!("{key}.key ({name})"), raw_key)?,
        };
        let files = match raw.files {
            None => None,
            Some(files) => Some(self.files(&format!("{key}.files ({name})"), files)?),
        };
        Ok(TableConfig {
            name,
            key: key_rule,
            on_conflict: raw.on_conflict.unwrap_or_default(),
            copy: raw.copy.unwrap_or(true),
            files,
            notify: raw.notify.unwrap_or(false),
        })
    }

    fn key_rule(&self, key: &str, raw: RawKey) -> Result<KeyRule, ConfigError> {
        let Some(rule) = raw.rule else {
            return Err(self.invalid(
                key,
                "has no rule: add rule = \"identity\" | \"remap-on-conflict\" | \"allocate\" | \"offset\" | \"natural\"",
            ));
        };
        let rule_name = match rule {
            RawRule::Identity => "identity",
            RawRule::RemapOnConflict => "remap-on-conflict",
            RawRule::Allocate => "allocate",
            RawRule::Offset => "offset",
            RawRule::Natural => "natural",
        };
        let refuse = |field: &str, present: bool| {
            if present {
                Err(self.invalid(
                    key,
                    format!("rule = \"{rule_name}\" takes no {field}: remove it"),
                ))
            } else {
                Ok(())
            }
        };
        let has_source =
            raw.sequence.is_some() || raw.keys_table.is_some() || raw.keys_name.is_some();
        match rule {
            RawRule::Identity => {
                refuse("sequence, keys_table or keys_name", has_source)?;
                refuse("offset", raw.offset.is_some())?;
                refuse("columns", raw.columns.is_some())?;
                Ok(KeyRule::Identity)
            }
            RawRule::Offset => {
                refuse("sequence, keys_table or keys_name", has_source)?;
                refuse("columns", raw.columns.is_some())?;
                match raw.offset {
                    None => Err(self.invalid(
                        key,
                        "rule = \"offset\" needs offset = N (target key = staging key + N)",
                    )),
                    Some(0) => Err(self.invalid(
                        key,
                        "offset = 0 keeps every key as it is: use rule = \"identity\", or a non-zero offset",
                    )),
                    Some(offset) => Ok(KeyRule::Offset { offset }),
                }
            }
            RawRule::RemapOnConflict | RawRule::Allocate => {
                refuse("offset", raw.offset.is_some())?;
                refuse("columns", raw.columns.is_some())?;
                let source =
                    self.key_source(key, rule_name, raw.sequence, raw.keys_table, raw.keys_name)?;
                Ok(match rule {
                    RawRule::Allocate => KeyRule::Allocate { source },
                    _ => KeyRule::RemapOnConflict { source },
                })
            }
            RawRule::Natural => {
                refuse("offset", raw.offset.is_some())?;
                let Some(raw_columns) = raw.columns.filter(|c| !c.is_empty()) else {
                    return Err(self.invalid(
                        key,
                        "rule = \"natural\" needs columns = [\"col\", ...]: the columns that identify a row on both sides",
                    ));
                };
                let mut columns = Vec::with_capacity(raw_columns.len());
                for column in &raw_columns {
                    let parsed = parse_identifier(column)
                        .map_err(|m| self.invalid(format!("{key}.columns"), m))?;
                    if columns.contains(&parsed) {
                        return Err(self.invalid(
                            format!("{key}.columns"),
                            format!("column {parsed} is listed twice: list each once"),
                        ));
                    }
                    columns.push(parsed);
                }
                let source =
                    self.key_source(key, rule_name, raw.sequence, raw.keys_table, raw.keys_name)?;
                Ok(KeyRule::Natural { columns, source })
            }
        }
    }

    fn key_source(
        &self,
        key: &str,
        rule_name: &str,
        sequence: Option<TableName>,
        keys_table: Option<TableName>,
        keys_name: Option<String>,
    ) -> Result<KeySource, ConfigError> {
        match (sequence, keys_table, keys_name) {
            (Some(sequence), None, None) => Ok(KeySource::Sequence(sequence)),
            (None, Some(table), Some(name)) => {
                if name.is_empty() {
                    Err(self.invalid(
                        key,
                        "keys_name is empty: name the row of the keys table that holds this table's counter",
                    ))
                } else {
                    Ok(KeySource::KeysTable { table, name })
                }
            }
            (None, Some(_), None) => Err(self.invalid(
                key,
                "keys_table needs keys_name: the row of the keys table that holds this table's counter",
            )),
            (None, None, Some(_)) => Err(self.invalid(
                key,
                "keys_name needs keys_table = \"schema.table\": the KEYS-style table that holds the counter",
            )),
            (None, None, None) => Err(self.invalid(
                key,
                format!(
                    "rule = \"{rule_name}\" needs a source of fresh production keys: sequence = \"schema.seq\", or keys_table = \"schema.keys\" with keys_name = \"...\""
                ),
            )),
            (Some(_), _, _) => Err(self.invalid(
                key,
                "give either sequence or keys_table/keys_name, not both",
            )),
        }
    }

    fn files(&self, key: &str, raw: RawFiles) -> Result<FilesConfig, ConfigError> {
        let dir = raw
            .dir
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| {
                self.invalid(
                    key,
                    "needs dir = \"/path\": the directory the files are published into",
                )
            })?;
        let column = |field: &str, value: Option<String>| -> Result<String, ConfigError> {
            let value =
                value.ok_or_else(|| self.invalid(key, format!("needs {field} = \"column\"")))?;
            parse_identifier(&value).map_err(|m| self.invalid(format!("{key}.{field}"), m))
        };
        let path_column = column("path_column", raw.path_column)?;
        let content_column = column("content_column", raw.content_column)?;
        if path_column == content_column {
            return Err(self.invalid(
                key,
                "path_column and content_column are the same column: name the column holding the file's path and the one holding its content",
            ));
        }
        Ok(FilesConfig {
            dir,
            path_column,
            content_column,
        })
    }

    fn references(
        &self,
        raw: Vec<RawReference>,
        tables: &[TableConfig],
    ) -> Result<Vec<ReferenceConfig>, ConfigError> {
        let managed: HashSet<&TableName> = tables.iter().map(|t| &t.name).collect();
        let mut seen: HashMap<ColumnName, usize> = HashMap::new();
        let mut references = Vec::with_capacity(raw.len());
        for (index, reference) in raw.into_iter().enumerate() {
            let key = format!("references[{index}]");
            let Some(column) = reference.column else {
                return Err(self.invalid(
                    key,
                    "has no column: add column = \"schema.table.column\" (the column holding the key)",
                ));
            };
            let line = self.line_of(column.span().start);
            let column = column.into_inner();
            let Some(table) = reference.table else {
                return Err(self.invalid(
                    key,
                    format!("{column} has no table: add table = \"schema.table\" (the managed table whose keys it holds)"),
                ));
            };
            if !managed.contains(&table) {
                return Err(self.invalid(
                    format!("{key}.table"),
                    format!(
                        "{column} references {table}, which is not a managed table: add a [[tables]] entry for {table} or fix the name"
                    ),
                ));
            }
            if let Some(first_line) = seen.insert(column.clone(), line) {
                return Err(self.invalid(
                    format!("{key}.column"),
                    format!(
                        "column {column} is listed twice (lines {first_line} and {line}): keep one [[references]] entry for it"
                    ),
                ));
            }
            references.push(ReferenceConfig { column, table });
        }
        Ok(references)
    }
}

/// tokio-postgres says "invalid connection string" and puts what was wrong in the source.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Replication slot names allow lower-case letters, digits and underscores, at most 63 bytes.
/// Publications are held to the same rule so that neither ever needs quoting.
fn check_slot_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty; use lower-case letters, digits and underscores");
    }
    if name.len() > MAX_IDENTIFIER_BYTES {
        return Err("it is longer than 63 bytes; use a shorter name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("use only lower-case letters, digits and underscores");
    }
    Ok(())
}

/// Splits a dotted SQL name into its parts: unquoted parts are folded to lower case and must be
/// plain identifiers; double-quoted parts are kept as written, `""` standing for one `"`.
fn parse_qualified_name(text: &str) -> Result<Vec<String>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err("the name is empty".into());
    }
    let mut parts = Vec::new();
    let mut chars = trimmed.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                    None => return Err(format!("{text:?} has an unterminated double quote")),
                }
            }
            if part.is_empty() {
                return Err(format!("{text:?} has an empty quoted identifier (\"\")"));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if !(c.is_alphanumeric() || c == '_' || c == '$') {
                    return Err(format!(
                        "{text:?} has the character {c:?} outside double quotes: write that part as \"...\""
                    ));
                }
                part.push(c.to_ascii_lowercase());
                chars.next();
            }
            match part.chars().next() {
                None => return Err(format!("{text:?} has an empty part")),
                Some(first) if first.is_ascii_digit() || first == '$' => {
                    return Err(format!(
                        "{text:?}: the unquoted part {part:?} must start with a letter or underscore"
                    ));
                }
                Some(_) => {}
            }
        }
        if part.len() > MAX_IDENTIFIER_BYTES {
            return Err(format!(
                "{text:?}: the part {part:?} is longer than 63 bytes, which PostgreSQL would truncate"
            ));
        }
        parts.push(part);
        match chars.next() {
            None => return Ok(parts),
            Some('.') => {}
            Some(c) => {
                return Err(format!(
                    "{text:?} has {c:?} after a quoted part: separate parts with '.'"
                ));
            }
        }
    }
}

/// A single column name, by the same rules as [`parse_qualified_name`].
fn parse_identifier(text: &str) -> Result<String, String> {
    let mut parts = parse_qualified_name(text)?;
    if parts.len() != 1 {
        return Err(format!(
            "{text:?} is not a single column name: give the column alone (quote it if it contains '.')"
        ));
    }
    Ok(parts.remove(0))
}

/// A connection string with the settings stagingprop handles itself taken out.
#[derive(Debug, Default)]
struct ConnectionParts {
    /// What tokio-postgres parses (it knows neither `verify-*` nor `sslrootcert`).
    rest: String,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    /// Whether a password was seen (its value is dropped on the spot).
    has_password: bool,
}

/// Lifts `sslmode` and `sslrootcert` out of a libpq key=value string or postgres:// URL and
/// notes whether it carries a password. Errors never quote values.
fn split_connection_string(url: &str) -> Result<ConnectionParts, String> {
    let trimmed = url.trim();
    let after_scheme = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| trimmed.strip_prefix(scheme));
    match after_scheme {
        Some(after_scheme) => split_url(trimmed, after_scheme),
        None => split_key_value(trimmed),
    }
}

fn split_url(url: &str, after_scheme: &str) -> Result<ConnectionParts, String> {
    let mut parts = ConnectionParts::default();
    // tokio-postgres takes everything before the first '@' as user[:password].
    if let Some(at) = after_scheme.find('@') {
        parts.has_password = after_scheme[..at].contains(':');
    }
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut kept = Vec::new();
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        let Some((key, value)) = param.split_once('=') else {
            kept.push(param);
            continue;
        };
        match percent_decode(key)?.as_str() {
            "password" => parts.has_password = true,
            "sslmode" => parts.sslmode = Some(percent_decode(value)?),
            "sslrootcert" => parts.sslrootcert = Some(percent_decode(value)?),
            _ => kept.push(param),
        }
    }
    parts.rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(parts)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has a '%' not followed by two hexadecimal digits in its parameters")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has parameters that do not decode to UTF-8".to_owned())
}

/// libpq key=value syntax: `key = value` pairs separated by whitespace, values optionally in
/// single quotes, backslash escaping the next character.
fn split_key_value(text: &str) -> Result<ConnectionParts, String> {
    let mut parts = ConnectionParts::default();
    let mut kept: Vec<(String, String)> = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "is neither a postgres:// URL nor libpq key=value pairs: expected '=' after {key:?}"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("has an unterminated quoted value for {key:?}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return Err(format!("has no value for {key:?}"));
            }
        }
        match key.as_str() {
            "password" => parts.has_password = true,
            "sslmode" => parts.sslmode = Some(value),
            "sslrootcert" => parts.sslrootcert = Some(value),
            _ => kept.push((key, value)),
        }
    }
    let quoted: Vec<String> = kept
        .iter()
        .map(|(key, value)| {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{key}='{escaped}'")
        })
        .collect();
    parts.rest = quoted.join(" ");
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL_DBS: &str = r#"
[staging]
url = "host=127.0.0.1 port=5432 dbname=staging user=stagingprop"
[production]
url = "postgres://stagingprop@127.0.0.1:5433/production"
"#;

    const ONE_TABLE: &str = r#"
[[tables]]
name = "public.catentry"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "test.toml")
    }

    fn with_dbs(rest: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL_DBS}\n{rest}"))
    }

    fn with_tables(rest: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL_DBS}\n{ONE_TABLE}\n{rest}"))
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(err) => err.to_string(),
        }
    }

    fn assert_error(result: Result<Config, ConfigError>, needles: &[&str]) {
        let text = error_text(result);
        for needle in needles {
            assert!(text.contains(needle), "{needle:?} not in error: {text}");
        }
    }

    /// The sample from DESIGN.md's "Configuration" section, verbatim.
    const DESIGN_SAMPLE: &str = r#"
# stagingprop.toml
[staging]
url = "host=127.0.0.1 port=5432 dbname=staging user=stagingprop"   # libpq key=value or postgres:// URL
password_env = "STAGING_PASSWORD"        # or password_file = "..."; never in the file itself
[production]
url = "postgres://stagingprop@127.0.0.1:5433/production"
password_file = "/run/secrets/production"

[sync]
slot = "stagingprop"          # logical replication slot on staging
publication = "stagingprop"   # publication on staging, created by `init` from the table list
batch_max_rows = 20000
batch_max_delay_ms = 100

[[tables]]                    # the staging-managed tables, parents and children alike
name = "public.catentry"
key = { rule = "remap-on-conflict", sequence = "public.catentry_seq" }
on_conflict = "error"         # error | skip | overwrite

[[tables]]
name = "public.catentdesc"    # its catentry_id follows catentry's mapping through the declared FK

[[references]]                # a column that holds a key without a declared foreign key
column = "public.attrval.catentry_id"
table = "public.catentry"
"#;

    #[test]
    fn design_sample_parses() {
        let config = parse(DESIGN_SAMPLE).unwrap();
        assert_eq!(config.staging.section, "staging");
        assert_eq!(
            config.staging.password,
            PasswordSource::Env("STAGING_PASSWORD".into())
        );
        assert_eq!(config.staging.sslmode, SslMode::Prefer);
        assert_eq!(config.staging.connect_timeout_secs, 10);
        assert_eq!(
            config.production.password,
            PasswordSource::File("/run/secrets/production".into())
        );
        assert_eq!(config.sync, SyncConfig::default());
        assert_eq!(config.tables.len(), 2);
        let catentry = &config.tables[0];
        assert_eq!(catentry.name, TableName::new("public", "catentry"));
        assert_eq!(
            catentry.key,
            KeyRule::RemapOnConflict {
                source: KeySource::Sequence(TableName::new("public", "catentry_seq"))
            }
        );
        assert_eq!(catentry.on_conflict, ConflictPolicy::Error);
        assert!(catentry.copy);
        assert_eq!(catentry.files, None);
        let catentdesc = config
            .table(&TableName::new("public", "catentdesc"))
            .unwrap();
        assert_eq!(catentdesc.key, KeyRule::Identity);
        assert_eq!(
            config.references,
            vec![ReferenceConfig {
                column: "public.attrval.catentry_id".parse().unwrap(),
                table: TableName::new("public", "catentry"),
            }]
        );
        assert!(config.table(&TableName::new("public", "orders")).is_none());
    }

    #[test]
    fn example_file_parses() {
        let config = parse(include_str!("../stagingprop.example.toml")).unwrap();
        assert!(config.tables.len() >= 5);
        assert!(config.tables.iter().any(|t| t.files.is_some() && !t.copy));
        assert!(config.spool.is_some());
        for rule in [
            "identity",
            "remap-on-conflict",
            "allocate",
            "offset",
            "natural",
        ] {
            assert!(
                config.tables.iter().any(|t| t.key.as_str() == rule),
                "example lacks rule {rule}"
            );
        }
    }

    #[test]
    fn spool_section() {
        let config = with_tables("").unwrap();
        assert_eq!(config.spool, None);
        let config =
            with_tables("[spool]\ndir = \"/var/spool/stagingprop\"\nmax_bytes = 1000000000\n")
                .unwrap();
        let spool = config.spool.unwrap();
        assert_eq!(spool.dir, PathBuf::from("/var/spool/stagingprop"));
        assert_eq!(spool.max_bytes, 1_000_000_000);
        assert_eq!(spool.retain_secs, DEFAULT_SPOOL_RETAIN_SECS);
        assert_eq!(spool.segment_bytes, DEFAULT_SPOOL_SEGMENT_BYTES);
        for (text, expected) in [
            ("[spool]\nmax_bytes = 5\n", "needs dir"),
            ("[spool]\ndir = \"/x\"\nmax_bytes = 0\n", "spool.max_bytes"),
            (
                "[spool]\ndir = \"/x\"\nmax_bytes = 10\n",
                "smaller than one segment",
            ),
            ("[spool]\ndir = \"/x\"\nsize = 1\n", "size"),
        ] {
            let err = error_text(with_tables(text));
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn defaults() {
        let config = with_tables("").unwrap();
        assert_eq!(config.sync.slot, "stagingprop");
        assert_eq!(config.sync.publication, "stagingprop");
        assert_eq!(config.sync.batch_max_rows, 20_000);
        assert_eq!(config.sync.batch_max_bytes, 64 * 1024 * 1024);
        assert_eq!(config.sync.batch_max_delay_ms, 100);
        assert_eq!(config.sync.heartbeat_interval_secs, 10);
        assert_eq!(config.sync.status_interval_secs, 10);
        assert_eq!(config.staging.password, PasswordSource::None);
        assert_eq!(config.production.sslmode, SslMode::Prefer);
        assert_eq!(config.production.sslrootcert, None);
        assert!(config.references.is_empty());
    }

    #[test]
    fn full_valid_example() {
        let config = with_dbs(
            r#"
[sync]
slot = "shop_1"
publication = "shop_pub"
batch_max_rows = 500
batch_max_bytes = 1048576
batch_max_delay_ms = 0
heartbeat_interval_secs = 30
status_interval_secs = 5

[[tables]]
name = "catentry"
key = { rule = "allocate", keys_table = "public.keys", keys_name = "catentry" }
on_conflict = "skip"

[[tables]]
name = '"My Schema"."Prices"'
key = { rule = "offset", offset = -1000000 }
on_conflict = "overwrite"

[[tables]]
name = "Public.Member"
key = { rule = "natural", columns = ["partnumber", "MEMBER_ID"], sequence = "member_seq" }

[[tables]]
name = "public.managedfile"
copy = false
files = { dir = "/srv/assets", path_column = "filename", content_column = "content" }
key = { rule = "identity" }

[[references]]
column = "public.attrval.catentry_id"
table = "catentry"
"#,
        )
        .unwrap();
        assert_eq!(config.sync.slot, "shop_1");
        assert_eq!(config.sync.batch_max_delay_ms, 0);
        assert_eq!(config.sync.heartbeat_interval_secs, 30);
        assert_eq!(
            config.tables[0].key,
            KeyRule::Allocate {
                source: KeySource::KeysTable {
                    table: TableName::new("public", "keys"),
                    name: "catentry".into()
                }
            }
        );
        assert_eq!(config.tables[0].on_conflict, ConflictPolicy::Skip);
        assert_eq!(config.tables[1].name, TableName::new("My Schema", "Prices"));
        assert_eq!(config.tables[1].name.to_string(), "My Schema.Prices");
        assert_eq!(config.tables[1].key, KeyRule::Offset { offset: -1_000_000 });
        assert_eq!(config.tables[2].name, TableName::new("public", "member"));
        assert_eq!(
            config.tables[2].key,
            KeyRule::Natural {
                columns: vec!["partnumber".into(), "member_id".into()],
                source: KeySource::Sequence(TableName::new("public", "member_seq")),
            }
        );
        let files = config.tables[3].files.as_ref().unwrap();
        assert_eq!(files.dir, PathBuf::from("/srv/assets"));
        assert_eq!(files.path_column, "filename");
        assert!(!config.tables[3].copy);
        assert_eq!(
            config.references[0].table,
            TableName::new("public", "catentry")
        );
    }

    #[test]
    fn table_names_follow_sql_rules() {
        let parse_table = |s: &str| s.parse::<TableName>();
        assert_eq!(
            parse_table("catentry").unwrap(),
            TableName::new("public", "catentry")
        );
        assert_eq!(
            parse_table("Shop.CatEntry").unwrap(),
            TableName::new("shop", "catentry")
        );
        assert_eq!(
            parse_table(r#""My Schema"."T""#).unwrap(),
            TableName::new("My Schema", "T")
        );
        assert_eq!(
            parse_table(r#"public."a""b.c""#).unwrap(),
            TableName::new("public", "a\"b.c")
        );
        assert_eq!(
            parse_table("_x$1").unwrap(),
            TableName::new("public", "_x$1")
        );
        assert_eq!(TableName::new("My Schema", "T").to_string(), "My Schema.T");
        for bad in [
            "",
            "a.b.c",
            "a..b",
            ".a",
            "a.",
            "1abc",
            "my table",
            r#""unterminated"#,
            r#""""#,
            r#""a"b"#,
            "a-b",
        ] {
            assert!(parse_table(bad).is_err(), "{bad:?} should not parse");
        }
        assert!(parse_table(&"x".repeat(64)).is_err());
        assert!(parse_table(&"x".repeat(63)).is_ok());

        let column: ColumnName = "public.attrval.CATENTRY_ID".parse().unwrap();
        assert_eq!(column.table, TableName::new("public", "attrval"));
        assert_eq!(column.column, "catentry_id");
        assert_eq!(column.to_string(), "public.attrval.catentry_id");
        assert!("attrval.catentry_id".parse::<ColumnName>().is_err());
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = error_text(with_tables("[sync]\nslot = \"s\"\nbatch_rows = 5\n"));
        assert!(text.contains("batch_rows"), "{text}");
        assert!(text.contains("line 13"), "{text}");
        assert!(text.starts_with("test.toml: "), "{text}");

        assert_error(with_tables("[colour]\nx = 1\n"), &["colour"]);
        assert_error(
            parse(&format!(
                "[staging]\nurl = \"host=a\"\nuser = \"x\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
            )),
            &["user", "line 3"],
        );
        assert_error(
            with_dbs("[[tables]]\nname = \"t\"\nkey = { rule = \"identity\", seq = \"s\" }\n"),
            &["seq"],
        );
        assert_error(
            with_dbs(
                "[[tables]]\nname = \"t\"\nfiles = { dir = \"/d\", path_column = \"p\", content_column = \"c\", mode = 1 }\n",
            ),
            &["mode"],
        );
        assert_error(
            with_tables("[[references]]\ncolumn = \"a.b.c\"\ntable = \"catentry\"\nfk = true\n"),
            &["fk"],
        );
        assert_error(
            with_dbs("[[tables]]\nname = \"t\"\nkey = { rule = \"renumber\" }\n"),
            &["renumber", "remap-on-conflict"],
        );
        assert_error(
            with_dbs("[[tables]]\nname = \"t\"\non_conflict = \"ignore\"\n"),
            &["ignore", "overwrite"],
        );
    }

    #[test]
    fn missing_sections_and_urls() {
        assert_error(
            parse(&format!("[production]\nurl = \"host=b\"\n{ONE_TABLE}")),
            &["[staging]", "missing"],
        );
        assert_error(
            parse(&format!("[staging]\nurl = \"host=b\"\n{ONE_TABLE}")),
            &["[production]", "missing"],
        );
        assert_error(
            parse(&format!(
                "[staging]\npassword_env = \"X\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
            )),
            &["staging.url", "missing"],
        );
        assert_error(
            parse(&format!(
                "[staging]\nurl = \"  \"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
            )),
            &["staging.url", "empty"],
        );
    }

    #[test]
    fn inline_passwords_are_refused_without_echoing_them() {
        let secret = "hunter2secret";
        let cases = [
            format!(
                "[staging]\nurl = \"host=a\"\npassword = \"{secret}\"\n[production]\nurl = \"host=b\"\n"
            ),
            format!(
                "[staging]\nurl = \"host=a password={secret}\"\n[production]\nurl = \"host=b\"\n"
            ),
            format!(
                "[staging]\nurl = \"host=a password='{secret} x'\"\n[production]\nurl = \"host=b\"\n"
            ),
            format!(
                "[staging]\nurl = \"postgres://u:{secret}@h/db\"\n[production]\nurl = \"host=b\"\n"
            ),
            format!(
                "[staging]\nurl = \"postgresql://u@h/db?password={secret}\"\n[production]\nurl = \"host=b\"\n"
            ),
        ];
        for case in cases {
            let text = error_text(parse(&format!("{case}{ONE_TABLE}")));
            assert!(
                text.contains(
                    "passwords are never read from the config file: set password_env or password_file in [staging]"
                ),
                "{text}"
            );
            assert!(!text.contains(secret), "password leaked: {text}");
        }
        // The production section is named when it is production's.
        let text = error_text(parse(&format!(
            "[staging]\nurl = \"host=a\"\n[production]\nurl = \"host=b\"\npassword = 5\n{ONE_TABLE}"
        )));
        assert!(text.contains("in [production]"), "{text}");
        // A syntax error on a line holding a password does not print the line.
        let text = error_text(parse(&format!(
            "[staging]\nurl = \"host=a\"\npassword = \"{secret}\n"
        )));
        assert!(text.contains("line 3"), "{text}");
        assert!(!text.contains(secret), "password leaked: {text}");
    }

    #[test]
    fn both_password_sources_is_an_error() {
        assert_error(
            parse(&format!(
                "[staging]\nurl = \"host=a\"\npassword_env = \"P\"\npassword_file = \"/p\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
            )),
            &["[staging]", "password_env", "password_file", "only one"],
        );
        assert_error(
            parse(&format!(
                "[staging]\nurl = \"host=a\"\npassword_env = \"\"\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
            )),
            &["staging.password_env"],
        );
    }

    #[test]
    fn duplicate_tables_are_named() {
        assert_error(
            with_dbs(
                "[[tables]]\nname = \"catentry\"\n[[tables]]\nname = \"x\"\n[[tables]]\nname = \"public.CATENTRY\"\n",
            ),
            &["public.catentry", "listed twice", "tables[2]"],
        );
    }

    #[test]
    fn tables_are_required_and_named() {
        assert_error(with_dbs(""), &["no managed tables", "[[tables]]"]);
        assert_error(
            with_dbs("[[tables]]\ncopy = false\n"),
            &["tables[0]", "has no name"],
        );
        assert_error(
            with_dbs("[[tables]]\nname = \"a.b.c\"\n"),
            &["a.b.c", "schema.table"],
        );
    }

    #[test]
    fn references_must_point_at_managed_tables() {
        assert_error(
            with_tables(
                "[[references]]\ncolumn = \"public.attrval.catentry_id\"\ntable = \"public.orders\"\n",
            ),
            &[
                "references[0].table",
                "public.orders",
                "not a managed table",
            ],
        );
        assert_error(
            with_tables(
                "[[references]]\ncolumn = \"attrval.catentry_id\"\ntable = \"public.catentry\"\n",
            ),
            &["schema.table.column"],
        );
        assert_error(
            with_tables("[[references]]\ncolumn = \"catentry_id\"\ntable = \"public.catentry\"\n"),
            &["schema.table.column"],
        );
        assert_error(
            with_tables("[[references]]\ntable = \"public.catentry\"\n"),
            &["references[0]", "has no column"],
        );
        assert_error(
            with_tables("[[references]]\ncolumn = \"public.attrval.catentry_id\"\n"),
            &["references[0]", "has no table"],
        );
        assert_error(
            with_tables(
                "[[references]]\ncolumn = \"public.attrval.catentry_id\"\ntable = \"catentry\"\n\
                 [[references]]\ncolumn = \"public.ATTRVAL.catentry_id\"\ntable = \"catentry\"\n",
            ),
            &["references[1].column", "listed twice"],
        );
    }

    #[test]
    fn slot_and_publication_names() {
        for good in ["stagingprop", "s_1", "_", &"a".repeat(63)] {
            assert!(check_slot_name(good).is_ok(), "{good}");
        }
        assert_error(
            with_tables("[sync]\nslot = \"Staging\"\n"),
            &["sync.slot", "\"Staging\""],
        );
        assert_error(with_tables("[sync]\nslot = \"a-b\"\n"), &["sync.slot"]);
        assert_error(
            with_tables("[sync]\nslot = \"\"\n"),
            &["sync.slot", "empty"],
        );
        assert_error(
            with_tables(&format!("[sync]\nslot = \"{}\"\n", "a".repeat(64))),
            &["sync.slot", "63 bytes"],
        );
        assert_error(
            with_tables("[sync]\npublication = \"my pub\"\n"),
            &["sync.publication"],
        );
    }

    #[test]
    fn sync_limits() {
        assert_error(
            with_tables("[sync]\nbatch_max_rows = 0\n"),
            &["sync.batch_max_rows", "at least 1"],
        );
        assert_error(
            with_tables("[sync]\nbatch_max_bytes = 0\n"),
            &["sync.batch_max_bytes"],
        );
        assert_error(
            with_tables("[sync]\nheartbeat_interval_secs = 0\n"),
            &["sync.heartbeat_interval_secs"],
        );
        assert_error(
            with_tables("[sync]\nstatus_interval_secs = 0\n"),
            &["sync.status_interval_secs"],
        );
        assert_error(
            with_tables("[sync]\nbatch_max_rows = -1\n"),
            &["batch_max_rows"],
        );
    }

    fn key(spec: &str) -> Result<Config, ConfigError> {
        with_dbs(&format!("[[tables]]\nname = \"public.t\"\nkey = {spec}\n"))
    }

    #[test]
    fn key_rule_combinations() {
        let rule = |spec: &str| key(spec).unwrap().tables[0].key.clone();
        assert_eq!(rule("{ rule = \"identity\" }"), KeyRule::Identity);
        assert_eq!(
            rule("{ rule = \"remap-on-conflict\", keys_table = \"keys\", keys_name = \"t\" }"),
            KeyRule::RemapOnConflict {
                source: KeySource::KeysTable {
                    table: TableName::new("public", "keys"),
                    name: "t".into()
                }
            }
        );
        assert_eq!(
            rule("{ rule = \"allocate\", sequence = \"public.x_seq\" }"),
            KeyRule::Allocate {
                source: KeySource::Sequence(TableName::new("public", "x_seq"))
            }
        );
        assert_eq!(
            rule("{ rule = \"offset\", offset = 5 }"),
            KeyRule::Offset { offset: 5 }
        );

        for (spec, needles) in [
            (
                "{ rule = \"identity\", sequence = \"s\" }",
                &["identity", "takes no sequence"][..],
            ),
            ("{ rule = \"identity\", offset = 3 }", &["takes no offset"]),
            (
                "{ rule = \"identity\", columns = [\"a\"] }",
                &["takes no columns"],
            ),
            ("{ rule = \"allocate\" }", &["allocate", "needs a source"]),
            (
                "{ rule = \"remap-on-conflict\" }",
                &["remap-on-conflict", "needs a source"],
            ),
            (
                "{ rule = \"natural\", columns = [\"a\"] }",
                &["natural", "needs a source"],
            ),
            (
                "{ rule = \"allocate\", sequence = \"s\", keys_table = \"k\", keys_name = \"n\" }",
                &["not both"],
            ),
            (
                "{ rule = \"allocate\", keys_table = \"k\" }",
                &["needs keys_name"],
            ),
            (
                "{ rule = \"allocate\", keys_name = \"n\" }",
                &["needs keys_table"],
            ),
            (
                "{ rule = \"allocate\", keys_table = \"k\", keys_name = \"\" }",
                &["keys_name is empty"],
            ),
            (
                "{ rule = \"allocate\", sequence = \"s\", offset = 1 }",
                &["takes no offset"],
            ),
            (
                "{ rule = \"allocate\", sequence = \"s\", columns = [\"a\"] }",
                &["takes no columns"],
            ),
            ("{ rule = \"offset\" }", &["needs offset"]),
            ("{ rule = \"offset\", offset = 0 }", &["identity"]),
            (
                "{ rule = \"offset\", offset = 1, sequence = \"s\" }",
                &["takes no sequence"],
            ),
            (
                "{ rule = \"natural\", sequence = \"s\" }",
                &["needs columns"],
            ),
            (
                "{ rule = \"natural\", sequence = \"s\", columns = [] }",
                &["needs columns"],
            ),
            (
                "{ rule = \"natural\", sequence = \"s\", columns = [\"a\", \"A\"] }",
                &["listed twice"],
            ),
            (
                "{ rule = \"natural\", sequence = \"s\", columns = [\"a.b\"] }",
                &["single column"],
            ),
            (
                "{ rule = \"natural\", sequence = \"s\", columns = [\"a\"], offset = 1 }",
                &["takes no offset"],
            ),
            ("{ sequence = \"s\" }", &["has no rule"]),
        ] {
            let text = error_text(key(spec));
            assert!(text.contains("tables[0].key (public.t)"), "{spec}: {text}");
            for needle in needles {
                assert!(text.contains(needle), "{spec}: {needle:?} not in {text}");
            }
        }
    }

    #[test]
    fn files_tables() {
        let files = |spec: &str| {
            with_dbs(&format!(
                "[[tables]]\nname = \"public.f\"\nfiles = {spec}\n"
            ))
        };
        assert_error(
            files("{ path_column = \"p\", content_column = \"c\" }"),
            &["needs dir"],
        );
        assert_error(
            files("{ dir = \"/d\", content_column = \"c\" }"),
            &["needs path_column"],
        );
        assert_error(
            files("{ dir = \"/d\", path_column = \"p\" }"),
            &["needs content_column"],
        );
        assert_error(
            files("{ dir = \"/d\", path_column = \"p\", content_column = \"P\" }"),
            &["the same column"],
        );
    }

    fn db(url_and_more: &str) -> Result<Config, ConfigError> {
        parse(&format!(
            "[staging]\n{url_and_more}\n[production]\nurl = \"host=b\"\n{ONE_TABLE}"
        ))
    }

    #[test]
    fn urls_must_parse_and_name_a_host() {
        assert_error(
            db("url = \"host=a port=notaport\""),
            &["staging.url", "does not parse"],
        );
        assert_error(
            db("url = \"host=a bogus=1\""),
            &["staging.url", "does not parse"],
        );
        assert_error(db("url = \"host a\""), &["staging.url"]);
        assert_error(db("url = \"host='a\""), &["staging.url", "unterminated"]);
        assert_error(db("url = \"dbname=x\""), &["staging.url", "no host"]);
        assert_error(db("url = \"postgres:///x\""), &["staging.url", "no host"]);
        assert_error(
            parse(&format!(
                "[staging]\nurl = \"host=a\"\n[production]\nurl = \"postgres://h:99999/x\"\n{ONE_TABLE}"
            )),
            &["production.url"],
        );
        assert!(db("url = \"postgresql://u@h1:5432,h2:5433/db?connect_timeout=3\"").is_ok());
    }

    #[test]
    fn sslmode_in_field_or_url() {
        let staging = |s: &str| db(s).map(|c| c.staging);
        assert_eq!(
            staging("url = \"host=a\"\nsslmode = \"require\"")
                .unwrap()
                .sslmode,
            SslMode::Require
        );
        assert_eq!(
            staging("url = \"host=a sslmode=disable\"").unwrap().sslmode,
            SslMode::Disable
        );
        let verified =
            staging("url = \"postgres://u@h/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem\"")
                .unwrap();
        assert_eq!(verified.sslmode, SslMode::VerifyFull);
        assert_eq!(verified.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        let verified = staging(
            "url = \"host=a sslmode=verify-ca\"\nsslrootcert = \"ca.pem\"\nsslmode = \"verify-ca\"",
        )
        .unwrap();
        assert_eq!(verified.sslmode, SslMode::VerifyCa);

        assert_error(
            db("url = \"host=a sslmode=disable\"\nsslmode = \"require\""),
            &["staging.sslmode", "conflicts", "one place"],
        );
        assert_error(
            db("url = \"host=a\"\nsslmode = \"verify-full\""),
            &["staging.sslmode", "sslrootcert"],
        );
        assert_error(db("url = \"host=a sslmode=verify-ca\""), &["sslrootcert"]);
        assert_error(
            db("url = \"host=a\"\nsslmode = \"require\"\nsslrootcert = \"/ca.pem\""),
            &["staging.sslrootcert", "verify-full"],
        );
        assert_error(
            db(
                "url = \"host=a sslrootcert=/x.pem\"\nsslmode = \"verify-full\"\nsslrootcert = \"/y.pem\"",
            ),
            &["staging.sslrootcert", "conflicts"],
        );
        assert_error(
            db("url = \"host=a sslmode=allow\""),
            &["allow", "not supported"],
        );
        assert_error(
            db("url = \"host=a\"\nsslmode = \"strict\""),
            &["strict", "verify-full"],
        );
    }

    #[test]
    fn connect_timeout_in_field_or_url() {
        let timeout = |s: &str| db(s).map(|c| c.staging.connect_timeout_secs);
        assert_eq!(timeout("url = \"host=a\"").unwrap(), 10);
        assert_eq!(timeout("url = \"host=a connect_timeout=4\"").unwrap(), 4);
        assert_eq!(
            timeout("url = \"host=a\"\nconnect_timeout_secs = 0").unwrap(),
            0
        );
        assert_error(
            db("url = \"host=a connect_timeout=4\"\nconnect_timeout_secs = 5"),
            &["staging.connect_timeout_secs", "conflicts"],
        );
    }

    fn db_config(url: &str, password: PasswordSource) -> DbConfig {
        DbConfig {
            section: "staging".into(),
            url: url.into(),
            password,
            sslmode: SslMode::VerifyFull,
            sslrootcert: Some("/ca.pem".into()),
            connect_timeout_secs: 7,
        }
    }

    #[test]
    fn pg_config_and_describe() {
        let db = db_config(
            "host=db.example port=6543 dbname=shop user=sp sslmode=verify-full sslrootcert=/ca.pem",
            PasswordSource::None,
        );
        let pg = db.pg_config().unwrap();
        assert_eq!(pg.get_dbname(), Some("shop"));
        assert_eq!(pg.get_user(), Some("sp"));
        assert_eq!(pg.get_ports(), &[6543]);
        assert_eq!(pg.get_password(), None);
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(pg.get_application_name(), Some("stagingprop"));
        assert_eq!(
            db.describe(),
            "host=db.example port=6543 dbname=shop user=sp sslmode=verify-full"
        );

        let url_db = DbConfig {
            sslmode: SslMode::Disable,
            sslrootcert: None,
            connect_timeout_secs: 0,
            ..db_config(
                "postgres://sp@h1:5432,h2:5433/shop?application_name=mine",
                PasswordSource::None,
            )
        };
        let pg = url_db.pg_config().unwrap();
        assert_eq!(pg.get_application_name(), Some("mine"));
        assert_eq!(pg.get_connect_timeout(), None);
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Disable);
        assert_eq!(
            url_db.describe(),
            "host=h1,h2 port=5432,5433 dbname=shop user=sp sslmode=disable"
        );

        let quoted = db_config(r"host=a dbname='my shop' user='o\'k'", PasswordSource::None);
        let pg = quoted.pg_config().unwrap();
        assert_eq!(pg.get_user(), Some("o'k"));
        assert_eq!(pg.get_dbname(), Some("my shop"));

        let leaky = db_config("postgres://u:topsecret@h/db", PasswordSource::None);
        let text = leaky.pg_config().unwrap_err().to_string();
        assert!(!text.contains("topsecret"), "{text}");
        assert!(!leaky.describe().contains("topsecret"));
    }

    #[test]
    fn passwords_from_env() {
        // A variable name no other test uses, so parallel tests cannot race on it.
        let var = "STAGINGPROP_CONFIG_TEST_PASSWORD_ENV";
        let db = db_config("host=a", PasswordSource::Env(var.into()));
        // SAFETY: no other code in the test binary reads or writes this variable.
        unsafe { std::env::remove_var(var) };
        let text = db.resolve_password().unwrap_err().to_string();
        assert!(text.contains(var) && text.contains("not set"), "{text}");
        unsafe { std::env::set_var(var, "") };
        let text = db.resolve_password().unwrap_err().to_string();
        assert!(text.contains(var) && text.contains("empty"), "{text}");
        unsafe { std::env::set_var(var, "s3cret\n") };
        assert_eq!(db.resolve_password().unwrap().as_deref(), Some("s3cret\n"));
        assert_eq!(
            db.pg_config().unwrap().get_password(),
            Some(&b"s3cret\n"[..])
        );
        unsafe { std::env::remove_var(var) };
        assert_eq!(
            db_config("host=a", PasswordSource::None)
                .resolve_password()
                .unwrap(),
            None
        );
    }

    #[test]
    fn passwords_from_files() {
        let dir =
            std::env::temp_dir().join(format!("stagingprop-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        };
        let read =
            |path: PathBuf| db_config("host=a", PasswordSource::File(path)).resolve_password();

        assert_eq!(read(write("lf", "pw\n")).unwrap().as_deref(), Some("pw"));
        assert_eq!(
            read(write("crlf", "pw\r\n")).unwrap().as_deref(),
            Some("pw")
        );
        assert_eq!(
            read(write("two", "pw\n\n")).unwrap().as_deref(),
            Some("pw\n")
        );
        assert_eq!(
            read(write("bare", " pw ")).unwrap().as_deref(),
            Some(" pw ")
        );
        let text = read(write("empty", "\n")).unwrap_err().to_string();
        assert!(
            text.contains("empty") && text.contains("password_file"),
            "{text}"
        );
        let missing = dir.join("missing");
        let text = read(missing.clone()).unwrap_err().to_string();
        assert!(text.contains(&missing.display().to_string()), "{text}");
        assert!(text.contains("[staging] password_file"), "{text}");

        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_reads_files_and_rebases_relative_paths() {
        let dir =
            std::env::temp_dir().join(format!("stagingprop-config-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("stagingprop.toml");
        std::fs::write(
            &path,
            "[staging]\nurl = \"host=a\"\npassword_file = \"secrets/staging\"\n\
             [production]\nurl = \"host=b\"\nsslmode = \"verify-full\"\nsslrootcert = \"/abs/ca.pem\"\n\
             [[tables]]\nname = \"f\"\nfiles = { dir = \"assets\", path_column = \"p\", content_column = \"c\" }\n",
        )
        .unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(
            config.staging.password,
            PasswordSource::File(dir.join("secrets/staging"))
        );
        assert_eq!(
            config.production.sslrootcert,
            Some(PathBuf::from("/abs/ca.pem"))
        );
        assert_eq!(
            config.tables[0].files.as_ref().unwrap().dir,
            dir.join("assets")
        );

        let missing = dir.join("nope.toml");
        let text = Config::load(&missing).unwrap_err().to_string();
        assert!(
            text.contains("cannot read config file") && text.contains("nope.toml"),
            "{text}"
        );

        std::fs::write(&path, "[staging\n").unwrap();
        let text = Config::load(&path).unwrap_err().to_string();
        assert!(
            text.contains("stagingprop.toml") && text.contains("line 1"),
            "{text}"
        );

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
