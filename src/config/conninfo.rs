//! Connection strings: libpq `key=value` strings and `postgres://` URLs, with the settings
//! stagingprop handles itself (passwords refused, TLS files, `service`) lifted out before
//! tokio-postgres parses the rest.

/// A connection string with the settings stagingprop handles itself taken out.
#[derive(Debug, Default)]
pub(crate) struct ConnectionParts {
    /// What tokio-postgres parses (it knows neither `verify-*` nor `sslrootcert`).
    pub(crate) rest: String,
    pub(crate) sslmode: Option<String>,
    pub(crate) sslrootcert: Option<String>,
    /// The client certificate and its key (libpq's `sslcert`, `sslkey`).
    pub(crate) sslcert: Option<String>,
    pub(crate) sslkey: Option<String>,
    /// libpq's `service`: defaults from the connection service file.
    pub(crate) service: Option<String>,
    /// libpq's `passfile`: the password file to use instead of `~/.pgpass`.
    pub(crate) passfile: Option<String>,
    /// Whether a password was seen (its value is dropped on the spot).
    pub(crate) has_password: bool,
}

impl ConnectionParts {
    /// Takes `key`'s value if it is one of the settings stagingprop handles itself; false when
    /// tokio-postgres should see it.
    fn lift(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "password" => {
                self.has_password = true;
                return true;
            }
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "service" => &mut self.service,
            "passfile" => &mut self.passfile,
            _ => return false,
        };
        *slot = Some(value);
        true
    }

    /// Fills what this string does not set from `defaults` (a service's settings).
    fn default_from(&mut self, defaults: ConnectionParts) {
        self.sslmode = self.sslmode.take().or(defaults.sslmode);
        self.sslrootcert = self.sslrootcert.take().or(defaults.sslrootcert);
        self.sslcert = self.sslcert.take().or(defaults.sslcert);
        self.sslkey = self.sslkey.take().or(defaults.sslkey);
        self.passfile = self.passfile.take().or(defaults.passfile);
    }
}

/// Why a connection string cannot be used. Never quotes a value.
#[derive(Debug)]
pub(crate) enum ConnError {
    /// A password was found in `found_in` (the url, or a service file).
    Password {
        found_in: String,
    },
    Invalid(String),
}

/// Splits `url` ([`split_connection_string`]), applies its `service` (the service file's
/// settings are defaults the string overrides, as in libpq) and parses what tokio-postgres
/// takes.
pub(crate) fn resolve(url: &str) -> Result<(ConnectionParts, tokio_postgres::Config), ConnError> {
    let mut parts = split_connection_string(url).map_err(ConnError::Invalid)?;
    if parts.has_password {
        return Err(ConnError::Password {
            found_in: "url".into(),
        });
    }
    let parse = |rest: &str| {
        rest.parse::<tokio_postgres::Config>().map_err(|err| {
            ConnError::Invalid(format!(
                "does not parse as a libpq connection string or postgres:// URL: {}",
                super::with_causes(&err)
            ))
        })
    };
    let mut pg = parse(&parts.rest)?;
    if pg.get_password().is_some() {
        return Err(ConnError::Password {
            found_in: "url".into(),
        });
    }
    if let Some(name) = parts.service.clone() {
        let (file, settings) = super::libpq::service(&name).map_err(ConnError::Invalid)?;
        let service = split_key_value(&settings).map_err(|m| {
            ConnError::Invalid(format!("service {name:?} in {}: {m}", file.display()))
        })?;
        if service.has_password {
            return Err(ConnError::Password {
                found_in: format!("service {name:?} in {}", file.display()),
            });
        }
        let defaults = parse(&service.rest)?;
        overlay(&mut pg, &defaults);
        parts.default_from(service);
    }
    Ok((parts, pg))
}

/// Sets what `pg` does not from `defaults`.
fn overlay(pg: &mut tokio_postgres::Config, defaults: &tokio_postgres::Config) {
    use tokio_postgres::config::{Host, TargetSessionAttrs};
    if pg.get_hosts().is_empty() && pg.get_hostaddrs().is_empty() {
        for host in defaults.get_hosts() {
            match host {
                Host::Tcp(name) => pg.host(name),
                #[cfg(unix)]
                Host::Unix(path) => pg.host_path(path),
            };
        }
        for addr in defaults.get_hostaddrs() {
            pg.hostaddr(*addr);
        }
    }
    if pg.get_ports().is_empty() {
        for &port in defaults.get_ports() {
            pg.port(port);
        }
    }
    if let (None, Some(v)) = (pg.get_dbname(), defaults.get_dbname()) {
        pg.dbname(v);
    }
    if let (None, Some(v)) = (pg.get_user(), defaults.get_user()) {
        pg.user(v);
    }
    if let (None, Some(v)) = (pg.get_options(), defaults.get_options()) {
        pg.options(v);
    }
    if let (None, Some(v)) = (pg.get_application_name(), defaults.get_application_name()) {
        pg.application_name(v);
    }
    if let (None, Some(v)) = (pg.get_connect_timeout(), defaults.get_connect_timeout()) {
        pg.connect_timeout(*v);
    }
    if pg.get_target_session_attrs() == TargetSessionAttrs::Any {
        pg.target_session_attrs(defaults.get_target_session_attrs());
    }
}

/// Lifts `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `service` and `passfile` out of a libpq key=value string or postgres:// URL and
/// notes whether it carries a password. Errors never quote values.
pub(crate) fn split_connection_string(url: &str) -> Result<ConnectionParts, String> {
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
        if !parts.lift(&percent_decode(key)?, percent_decode(value)?) {
            kept.push(param);
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
        if !parts.lift(&key, value.clone()) {
            kept.push((key, value));
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
