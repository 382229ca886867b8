//! Where a database is and how to reach it: an [`Endpoint`] holds the parsed connection settings
//! (password already resolved, never printed) and the TLS policy, and opens ordinary
//! (tokio-postgres) connections. The replication connection uses the same endpoint.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio_postgres::config::{Host, SslMode as PgSslMode};

use super::tls::{CertCheck, ClientCert, MakeRustls, TlsSetupError, client_config};
use crate::config::libpq::{self, PasswordFor, PgpassSkipped};
use crate::config::{
    APPLICATION_NAME, ConfigError, ConnError, DbConfig, SslMode, resolve_connection_string,
};

/// The password for `pg`'s first host from the password file (libpq's rules: the connection's
/// `passfile`, `PGPASSFILE` or `~/.pgpass`; a file others may read is ignored, with a warning).
fn password_from_file(db: &DbConfig, pg: &tokio_postgres::Config) -> Option<String> {
    let path = libpq::pgpass_file(db.passfile.as_deref())?;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => {
            // libpq: the default socket directory is looked up as "localhost".
            let dir = path.display().to_string();
            if dir == "/var/run/postgresql" || dir == "/run/postgresql" || dir == "/tmp" {
                "localhost".to_owned()
            } else {
                dir
            }
        }
        None => pg
            .get_hostaddrs()
            .first()
            .map_or_else(|| "localhost".to_owned(), |a| a.to_string()),
    };
    let user = pg
        .get_user()
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    let dbname = pg.get_dbname().map_or_else(|| user.clone(), str::to_owned);
    let want = PasswordFor {
        host: &host,
        port: pg.get_ports().first().copied().unwrap_or(5432),
        dbname: &dbname,
        user: &user,
    };
    match libpq::read_pgpass(&path, &want) {
        Ok(password) => password,
        Err(PgpassSkipped::Missing) => None,
        Err(PgpassSkipped::Exposed { path, mode }) => {
            tracing::warn!(
                "[{}]: the password file {} has group or world access (mode {mode:04o}), so it is \
                 ignored (as libpq does): chmod 0600 {}",
                db.section,
                path.display(),
                path.display()
            );
            None
        }
        Err(PgpassSkipped::NotAFile { path }) => {
            tracing::warn!(
                "[{}]: the password file {} is not a plain file; it is ignored",
                db.section,
                path.display()
            );
            None
        }
        Err(PgpassSkipped::Unreadable { path, problem }) => {
            tracing::warn!(
                "[{}]: cannot read the password file {} ({problem}); it is ignored",
                db.section,
                path.display()
            );
            None
        }
    }
}

/// The tokio-postgres connection settings of a config section: the url, the resolved password,
/// the connect timeout and `application_name = stagingprop` (unless the url names one).
/// `sslmode` is the section's: `verify-ca` and `verify-full` map to tokio-postgres's `Require`,
/// and the TLS connector does the verification with `sslrootcert`.
pub fn driver_config(db: &DbConfig) -> Result<tokio_postgres::Config, ConfigError> {
    let url_error = |message: String| ConfigError::Url {
        section: db.section.clone(),
        message,
    };
    let (_, mut pg) = resolve_connection_string(&db.url).map_err(|e| {
        url_error(match e {
            ConnError::Password { found_in } => format!(
                "holds a password ({found_in}): remove it and use password_env, password_file or the password file (~/.pgpass)"
            ),
            ConnError::Invalid(m) => m,
        })
    })?;
    match db.resolve_password()? {
        Some(password) => {
            pg.password(password);
        }
        None => {
            if let Some(password) = password_from_file(db, &pg) {
                pg.password(password);
            }
        }
    }
    pg.ssl_mode(match db.sslmode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
    });
    if db.connect_timeout_secs > 0 {
        pg.connect_timeout(Duration::from_secs(db.connect_timeout_secs));
    }
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    Ok(pg)
}

/// A database section that cannot be turned into connection settings.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("[{section}]: {source}")]
    Tls {
        section: String,
        source: TlsSetupError,
    },
}

/// Whether TLS is used.
#[derive(Clone)]
pub enum TlsPolicy {
    Disable,
    /// Try TLS, fall back to plain when the server does not offer it (libpq's `prefer`).
    Prefer(Arc<ClientConfig>),
    /// TLS or nothing.
    Require(Arc<ClientConfig>),
}

impl TlsPolicy {
    pub fn client_config(&self) -> Option<&Arc<ClientConfig>> {
        match self {
            TlsPolicy::Disable => None,
            TlsPolicy::Prefer(c) | TlsPolicy::Require(c) => Some(c),
        }
    }
}

/// One database to connect to.
#[derive(Clone)]
pub struct Endpoint {
    /// What the operator calls it in messages: "staging", "production", "target".
    pub role: String,
    pub pg: tokio_postgres::Config,
    pub tls: TlsPolicy,
}

impl Endpoint {
    pub fn new(role: impl Into<String>, mut pg: tokio_postgres::Config, tls: TlsPolicy) -> Self {
        pg.ssl_mode(match tls {
            TlsPolicy::Disable => PgSslMode::Disable,
            TlsPolicy::Prefer(_) => PgSslMode::Prefer,
            TlsPolicy::Require(_) => PgSslMode::Require,
        });
        if pg.get_application_name().is_none() {
            pg.application_name("stagingprop");
        }
        Endpoint {
            role: role.into(),
            pg,
            tls,
        }
    }

    /// The connection settings for a `[staging]` / `[production]` section: password resolved
    /// from its env var or file, TLS as its sslmode says.
    pub fn from_db_config(db: &DbConfig) -> Result<Endpoint, EndpointError> {
        let pg = driver_config(db)?;
        let tls_error = |source| EndpointError::Tls {
            section: db.section.clone(),
            source,
        };
        let root = db.sslrootcert.as_deref();
        let client = match (&db.sslcert, &db.sslkey) {
            (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
            _ => None,
        };
        let chain_if_root = root.map_or(CertCheck::None, |_| CertCheck::Chain);
        let config = |check| client_config(check, root, client).map_err(tls_error);
        let tls = match db.sslmode {
            SslMode::Disable => TlsPolicy::Disable,
            SslMode::Prefer => TlsPolicy::Prefer(config(chain_if_root)?),
            SslMode::Require => TlsPolicy::Require(config(chain_if_root)?),
            SslMode::VerifyCa => TlsPolicy::Require(config(CertCheck::Chain)?),
            SslMode::VerifyFull => TlsPolicy::Require(config(CertCheck::Full)?),
        };
        Ok(Endpoint::new(db.section.clone(), pg, tls))
    }

    /// The user name to log in as: the configured one, else the OS user (as libpq does).
    pub fn user(&self) -> String {
        self.pg
            .get_user()
            .map(str::to_owned)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_owned())
    }

    pub fn dbname(&self) -> String {
        self.pg
            .get_dbname()
            .map(str::to_owned)
            .unwrap_or_else(|| self.user())
    }

    /// Host and port pairs to try in order, as libpq pairs them.
    pub fn addresses(&self) -> Vec<(String, u16)> {
        let hosts: Vec<String> = if self.pg.get_hosts().is_empty() {
            vec!["localhost".to_owned()]
        } else {
            self.pg
                .get_hosts()
                .iter()
                .map(|h| match h {
                    Host::Tcp(name) => name.clone(),
                    Host::Unix(path) => path.display().to_string(),
                })
                .collect()
        };
        let ports = self.pg.get_ports();
        hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| {
                let port = match ports.len() {
                    0 => 5432,
                    1 => ports[0],
                    _ => ports.get(i).copied().unwrap_or(5432),
                };
                (host, port)
            })
            .collect()
    }

    pub fn connect_timeout(&self) -> Duration {
        self.pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10))
    }

    /// "staging (host=127.0.0.1 port=5432 dbname=staging user=stagingprop)"; never the password.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .addresses()
            .into_iter()
            .map(|(h, p)| format!("host={h} port={p}"))
            .collect();
        format!(
            "{} ({} dbname={} user={})",
            self.role,
            addrs.join(" "),
            self.dbname(),
            self.user()
        )
    }

    /// This endpoint narrowed to one of its hosts, whatever that server's role (for looking at
    /// each server of a primary/standby list in turn).
    pub fn only(&self, host: &str, port: u16) -> Endpoint {
        let mut pg = tokio_postgres::Config::new();
        if let Some(user) = self.pg.get_user() {
            pg.user(user);
        }
        if let Some(password) = self.pg.get_password() {
            pg.password(password);
        }
        if let Some(dbname) = self.pg.get_dbname() {
            pg.dbname(dbname);
        }
        if let Some(options) = self.pg.get_options() {
            pg.options(options);
        }
        if let Some(name) = self.pg.get_application_name() {
            pg.application_name(name);
        }
        if let Some(timeout) = self.pg.get_connect_timeout() {
            pg.connect_timeout(*timeout);
        }
        pg.keepalives(self.pg.get_keepalives())
            .keepalives_idle(self.pg.get_keepalives_idle())
            .host(host)
            .port(port);
        Endpoint::new(self.role.clone(), pg, self.tls.clone())
    }

    /// Opens an ordinary connection; its I/O runs on a spawned task that ends with the client.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let client = match self.tls.client_config() {
            None => {
                let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await?;
                spawn_connection(self.role.clone(), conn);
                client
            }
            Some(config) => {
                let (client, conn) = self.pg.connect(MakeRustls(config.clone())).await?;
                spawn_connection(self.role.clone(), conn);
                client
            }
        };
        Ok(client)
    }
}

fn spawn_connection<F>(role: String, conn: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(database = %role, error = %e, "connection closed with an error");
        }
    });
}
