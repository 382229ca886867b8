//! The file as serde sees it, and the validation that turns it into [`super::Config`]: every
//! error names the key (and for syntax errors the line) and says what to do.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use toml::Spanned;

use super::*;

// ---------------------------------------------------------------------------------------------
// The file as serde sees it; `Validator` turns it into the types above.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    staging: Option<RawDb>,
    production: Option<RawDb>,
    sync: Option<RawSync>,
    spool: Option<RawSpool>,
    stream: Option<RawStream>,
    #[serde(default)]
    tables: Vec<RawTable>,
    #[serde(default)]
    references: Vec<RawReference>,
    #[serde(default)]
    table_patterns: Vec<RawTablePattern>,
    #[serde(default)]
    scopes: std::collections::BTreeMap<String, RawScope>,
    ddl: Option<RawDdl>,
    guard: Option<RawGuard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    default: Option<GuardMode>,
    on_production_edit: Option<EditPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDdl {
    mode: Option<DdlMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScope {
    publication: Option<String>,
    slot: Option<String>,
    #[serde(default)]
    filters: std::collections::BTreeMap<String, String>,
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
    sslcert: Option<PathBuf>,
    sslkey: Option<PathBuf>,
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
    batch_linger_ms: Option<u64>,
    heartbeat_interval_secs: Option<u64>,
    status_interval_secs: Option<u64>,
    receive_timeout_secs: Option<u64>,
    streaming: Option<bool>,
    failover: Option<bool>,
    notify_channel: Option<String>,
    after_batch_sql: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    url: Option<String>,
    name: Option<String>,
    subject: Option<String>,
    consumer: Option<String>,
    user: Option<String>,
    /// Accepted only to be refused with a specific message; its value is never kept.
    password: Option<IgnoredAny>,
    token: Option<IgnoredAny>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    chunk_bytes: Option<usize>,
    max_in_flight: Option<usize>,
    replicas: Option<usize>,
    max_age_secs: Option<u64>,
    duplicate_window_secs: Option<u64>,
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
struct RawTablePattern {
    schema: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
    on_conflict: Option<ConflictPolicy>,
    guard: Option<GuardMode>,
    on_production_edit: Option<EditPolicy>,
    on_staging_drop: Option<RawOnDrop>,
}

#[derive(Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnDrop {
    Keep,
    Drop,
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
    filter: Option<String>,
    columns: Option<Vec<String>>,
    exclude_columns: Option<Vec<String>>,
    guard: Option<GuardMode>,
    on_production_edit: Option<EditPolicy>,
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
pub(super) fn syntax_message(text: &str, err: &toml::de::Error) -> String {
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
            sslcert: None,
            sslkey: None,
            connect_timeout_secs: None,
        };
        Validator { text: "", origin }.db("target", Some(raw))
    }
}

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
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

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let staging = self.db("staging", raw.staging)?;
        let production = self.db("production", raw.production)?;
        let sync = self.sync(raw.sync)?;
        let spool = match raw.spool {
            None => None,
            Some(raw_spool) => Some(self.spool(raw_spool)?),
        };
        let stream = match raw.stream {
            None => None,
            Some(raw_stream) => Some(self.stream(raw_stream, &sync)?),
        };
        if raw.tables.is_empty() && raw.table_patterns.is_empty() {
            return Err(self.invalid(
                "tables",
                "no managed tables: add a [[tables]] entry with name = \"schema.table\" for each staging-managed table (or a [[table_patterns]] entry with schema = \"...\")",
            ));
        }
        let guard_defaults = raw
            .guard
            .map_or((GuardMode::default(), EditPolicy::default()), |g| {
                (
                    g.default.unwrap_or_default(),
                    g.on_production_edit.unwrap_or_default(),
                )
            });
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
            tables.push(self.table(&key, name, raw_table, guard_defaults)?);
        }
        let references = self.references(raw.references, &tables)?;
        let table_patterns = self.table_patterns(raw.table_patterns, guard_defaults)?;
        let scopes = self.scopes(raw.scopes, &sync, &tables)?;
        let ddl = DdlConfig {
            mode: raw.ddl.and_then(|d| d.mode).unwrap_or_default(),
        };
        Ok(Config {
            staging,
            production,
            sync,
            spool,
            stream,
            tables,
            references,
            scopes,
            scope: None,
            ddl,
            table_patterns,
        })
    }

    fn table_patterns(
        &self,
        raw: Vec<RawTablePattern>,
        (guard_default, edit_default): (GuardMode, EditPolicy),
    ) -> Result<Vec<TablePattern>, ConfigError> {
        let mut patterns: Vec<TablePattern> = Vec::with_capacity(raw.len());
        for (index, raw) in raw.into_iter().enumerate() {
            let key = format!("table_patterns[{index}]");
            let Some(schema) = raw.schema.filter(|s| !s.is_empty()) else {
                return Err(self.invalid(
                    key,
                    "has no schema: add schema = \"name\" (every table of that schema is managed, but those exclude = [...] names)",
                ));
            };
            if schema == "stagingprop" || schema == "pg_catalog" || schema == "information_schema" {
                return Err(self.invalid(
                    format!("{key}.schema"),
                    format!("schema {schema} holds no staging-managed tables: name the schema of your tables"),
                ));
            }
            if let Some(glob) = raw.exclude.iter().find(|g| g.is_empty()) {
                return Err(self.invalid(
                    format!("{key}.exclude"),
                    format!(
                        "{glob:?} is empty: write a table name, or a glob with * (\"audit_*\")"
                    ),
                ));
            }
            if let Some(first) = patterns.iter().position(|p| p.schema == schema) {
                return Err(self.invalid(
                    format!("{key}.schema"),
                    format!(
                        "schema {schema} already has a pattern (table_patterns[{first}]): keep one, with every exclusion"
                    ),
                ));
            }
            patterns.push(TablePattern {
                schema,
                exclude: raw.exclude,
                on_conflict: raw.on_conflict.unwrap_or_default(),
                guard: raw.guard.unwrap_or(guard_default),
                on_production_edit: raw.on_production_edit.unwrap_or(edit_default),
                drop_with_staging: matches!(raw.on_staging_drop, Some(RawOnDrop::Drop)),
            });
        }
        Ok(patterns)
    }

    fn scopes(
        &self,
        raw: std::collections::BTreeMap<String, RawScope>,
        sync: &SyncConfig,
        tables: &[TableConfig],
    ) -> Result<Vec<ScopeConfig>, ConfigError> {
        let mut scopes = Vec::with_capacity(raw.len());
        let mut taken: HashMap<String, String> = HashMap::new();
        taken.insert(format!("slot {}", sync.slot), "[sync]".into());
        taken.insert(format!("publication {}", sync.publication), "[sync]".into());
        for (name, scope) in raw {
            let key = format!("scopes.{name}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(self.invalid(
                    key,
                    "a scope name uses only lower-case letters, digits, '-' and '_'",
                ));
            }
            // Slot and publication names derived from the scope's, unless given.
            let derived = |base: &str| format!("{base}_{}", name.replace('-', "_"));
            let publication = scope
                .publication
                .unwrap_or_else(|| derived(&sync.publication));
            let slot = scope.slot.unwrap_or_else(|| derived(&sync.slot));
            for (what, value) in [("publication", &publication), ("slot", &slot)] {
                if let Err(problem) = check_slot_name(value) {
                    return Err(self.invalid(
                        format!("{key}.{what}"),
                        format!("{value:?} is not a usable {what} name: {problem}"),
                    ));
                }
                if let Some(owner) = taken.insert(format!("{what} {value}"), key.clone()) {
                    return Err(self.invalid(
                        format!("{key}.{what}"),
                        format!(
                            "{what} {value} is also the one of {owner}: each scope needs its own {what} (set {what} = \"...\" in [{key}])"
                        ),
                    ));
                }
            }
            let mut filters = Vec::with_capacity(scope.filters.len());
            for (table, filter) in scope.filters {
                let filter_key = format!("{key}.filters.{table:?}");
                let table: TableName = table
                    .parse()
                    .map_err(|e: String| self.invalid(&filter_key, e))?;
                if !tables.iter().any(|t| t.name == table) {
                    return Err(self.invalid(
                        filter_key,
                        format!("{table} is not a managed table: add a [[tables]] entry for it or fix the name"),
                    ));
                }
                filters.push((table, self.filter(&filter_key, filter)?));
            }
            scopes.push(ScopeConfig {
                name,
                publication,
                slot,
                filters,
            });
        }
        Ok(scopes)
    }

    /// A row filter as written; the server checks its SQL (`init`), this only its shape.
    fn filter(&self, key: &str, filter: String) -> Result<String, ConfigError> {
        let trimmed = filter.trim();
        if trimmed.is_empty() {
            return Err(self.invalid(
                key,
                "the filter is empty: write a SQL condition over the table's columns, or remove it",
            ));
        }
        if trimmed.contains(';') {
            return Err(self.invalid(key, "a filter is one SQL condition; it cannot hold ';'"));
        }
        Ok(trimmed.to_owned())
    }

    fn column_list(
        &self,
        key: &str,
        columns: Option<Vec<String>>,
        exclude: Option<Vec<String>>,
    ) -> Result<ColumnList, ConfigError> {
        let check = |what: &str, names: &[String]| -> Result<(), ConfigError> {
            if names.is_empty() {
                return Err(self.invalid(
                    format!("{key}.{what}"),
                    "the list is empty: name columns, or remove it",
                ));
            }
            let mut seen = HashSet::new();
            for name in names {
                if name.is_empty() {
                    return Err(self.invalid(format!("{key}.{what}"), "a column name is empty"));
                }
                if !seen.insert(name) {
                    return Err(self.invalid(
                        format!("{key}.{what}"),
                        format!("column {name} is listed twice"),
                    ));
                }
            }
            Ok(())
        };
        match (columns, exclude) {
            (Some(_), Some(_)) => {
                Err(self.invalid(key, "has both columns and exclude_columns: keep one"))
            }
            (Some(names), None) => {
                check("columns", &names)?;
                Ok(ColumnList::Only(names))
            }
            (None, Some(names)) => {
                check("exclude_columns", &names)?;
                Ok(ColumnList::Except(names))
            }
            (None, None) => Ok(ColumnList::All),
        }
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
        let (parts, pg) = conninfo::resolve(&url).map_err(|e| match e {
            conninfo::ConnError::Password { found_in } if found_in == "url" => {
                inline_password(url_key.clone())
            }
            conninfo::ConnError::Password { found_in } => inline_password(found_in),
            conninfo::ConnError::Invalid(m) => self.invalid(&url_key, m),
        })?;
        if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
            return Err(self.invalid(
                url_key,
                "names no host: add host=... (or a host in the postgres:// URL, or service=NAME with a host)",
            ));
        }

        let password = self.password_source(section, raw.password_env, raw.password_file)?;

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

        let in_one_place = |key: &str, field: Option<PathBuf>, in_url: Option<String>| {
            let in_url = in_url.map(PathBuf::from);
            match (field, in_url) {
                (Some(field), Some(in_url)) if field != in_url => Err(self.invalid(
                    format!("{section}.{key}"),
                    format!(
                        "{key} = {:?} conflicts with {key}={} in {url_key}: give it in one place",
                        field.display().to_string(),
                        in_url.display()
                    ),
                )),
                (Some(p), _) | (None, Some(p)) if p.as_os_str().is_empty() => Err(self.invalid(
                    format!("{section}.{key}"),
                    "is empty: set it to a file, or remove it",
                )),
                (field, in_url) => Ok(field.or(in_url)),
            }
        };
        let sslcert = in_one_place("sslcert", raw.sslcert, parts.sslcert)?;
        let sslkey = in_one_place("sslkey", raw.sslkey, parts.sslkey)?;
        let passfile = in_one_place("passfile", None, parts.passfile)?;
        match (&sslcert, &sslkey) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(self.invalid(
                    format!("[{section}]"),
                    "a client certificate needs both sslcert (the certificate, PEM) and sslkey (its private key, PEM): set both",
                ));
            }
            (Some(_), Some(_)) if sslmode == SslMode::Disable => {
                return Err(self.invalid(
                    format!("{section}.sslcert"),
                    "is a TLS client certificate, but sslmode is \"disable\": set sslmode = \"require\" or stronger",
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
            sslcert,
            sslkey,
            passfile,
            connect_timeout_secs,
        })
    }

    /// `password_env` or `password_file` of `section`, at most one of them.
    fn password_source(
        &self,
        section: &str,
        env: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<PasswordSource, ConfigError> {
        Ok(match (env, file) {
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
        })
    }

    fn stream(&self, raw: RawStream, sync: &SyncConfig) -> Result<StreamConfig, ConfigError> {
        if raw.password.is_some() || raw.token.is_some() {
            return Err(ConfigError::InlinePassword {
                origin: self.origin.to_owned(),
                section: "stream".into(),
                found_in: if raw.password.is_some() {
                    "stream.password"
                } else {
                    "stream.token"
                }
                .into(),
            });
        }
        let url = raw.url.filter(|u| !u.trim().is_empty()).ok_or_else(|| {
            self.invalid(
                "stream.url",
                "is missing: set it to the NATS server(s), e.g. \"nats://127.0.0.1:4222\" (several separated by commas; tls:// requires TLS)",
            )
        })?;
        for server in url.split(',') {
            let server = server.trim();
            let scheme_ok = ["nats://", "tls://"].iter().any(|s| server.starts_with(s));
            if !scheme_ok || server.contains('@') {
                return Err(self.invalid(
                    "stream.url",
                    format!(
                        "{server:?} is not a NATS server address: write nats://host:port or tls://host:port, without credentials (use user and password_env / password_file)"
                    ),
                ));
            }
        }
        let name = raw.name.unwrap_or_else(|| "STAGINGPROP".into());
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(self.invalid(
                "stream.name",
                format!(
                    "{name:?} is not a JetStream stream name: use letters, digits, '-' and '_'"
                ),
            ));
        }
        let subject = raw
            .subject
            .unwrap_or_else(|| format!("stagingprop.{}", sync.slot));
        if subject.is_empty()
            || subject.contains(['*', '>', ' ', '\t'])
            || subject.split('.').any(str::is_empty)
        {
            return Err(self.invalid(
                "stream.subject",
                format!("{subject:?} is not a literal NATS subject: use dot-separated tokens without wildcards or spaces"),
            ));
        }
        let consumer = raw.consumer.unwrap_or_else(|| "stagingprop".into());
        if consumer.is_empty()
            || !consumer
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(self.invalid(
                "stream.consumer",
                format!("{consumer:?} is not a consumer name: use letters, digits, '-' and '_' (one name per target)"),
            ));
        }
        let password = self.password_source("stream", raw.password_env, raw.password_file)?;
        let positive = |key: &str, value: Option<usize>, default: usize| match value {
            Some(0) => Err(self.invalid(format!("stream.{key}"), "must be greater than 0")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let chunk_bytes = positive("chunk_bytes", raw.chunk_bytes, DEFAULT_STREAM_CHUNK_BYTES)?;
        if chunk_bytes < 1024 {
            return Err(self.invalid(
                "stream.chunk_bytes",
                "must be at least 1024: a chunk holds whole records",
            ));
        }
        let replicas = positive("replicas", raw.replicas, 1)?;
        if replicas > 5 {
            return Err(self.invalid("stream.replicas", "JetStream allows at most 5 replicas"));
        }
        Ok(StreamConfig {
            url,
            name,
            subject,
            consumer,
            user: raw.user,
            password,
            tls_ca: raw.tls_ca,
            chunk_bytes,
            max_in_flight: positive("max_in_flight", raw.max_in_flight, 256)?,
            replicas,
            max_age_secs: raw.max_age_secs.unwrap_or(7 * 24 * 3600),
            duplicate_window_secs: positive(
                "duplicate_window_secs",
                raw.duplicate_window_secs.map(|v| v as usize),
                120,
            )? as u64,
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
        let receive_timeout_secs = raw
            .receive_timeout_secs
            .unwrap_or(defaults.receive_timeout_secs);
        at_least_one("receive_timeout_secs", receive_timeout_secs)?;
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
            failover: raw.failover.unwrap_or(defaults.failover),
            notify_channel,
            after_batch_sql,
            slot,
            publication,
            batch_max_rows,
            batch_max_bytes,
            batch_max_delay_ms: raw
                .batch_max_delay_ms
                .unwrap_or(defaults.batch_max_delay_ms),
            batch_linger_ms: raw.batch_linger_ms.unwrap_or(defaults.batch_linger_ms),
            heartbeat_interval_secs,
            status_interval_secs,
            receive_timeout_secs,
        })
    }

    fn table(
        &self,
        key: &str,
        name: TableName,
        raw: RawTable,
        (guard_default, edit_default): (GuardMode, EditPolicy),
    ) -> Result<TableConfig, ConfigError> {
        let key_rule = match raw.key {
            None => KeyRule::Identity,
            Some(raw_key) => self.key_rule(&format!("{key}.key ({name})"), raw_key)?,
        };
        let files = match raw.files {
            None => None,
            Some(files) => Some(self.files(&format!("{key}.files ({name})"), files)?),
        };
        Ok(TableConfig {
            key: key_rule,
            on_conflict: raw.on_conflict.unwrap_or_default(),
            copy: raw.copy.unwrap_or(true),
            notify: raw.notify.unwrap_or(false),
            filter: match raw.filter {
                None => None,
                Some(filter) => Some(self.filter(&format!("{key}.filter ({name})"), filter)?),
            },
            columns: self.column_list(
                &format!("{key} ({name})"),
                raw.columns,
                raw.exclude_columns,
            )?,
            files,
            guard: raw.guard.unwrap_or(guard_default),
            on_production_edit: raw.on_production_edit.unwrap_or(edit_default),
            name,
            from_pattern: false,
            drop_with_staging: false,
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
pub(crate) fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
