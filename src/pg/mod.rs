//! Talking to PostgreSQL: where a database is and how to reach it ([`connect`]), TLS ([`tls`]),
//! the replication connection ([`replication`]) and its sans-IO parts: backend messages
//! ([`backend`]), the authentication steps ([`auth`]) and the CopyData frames of the stream
//! ([`frames`]).

pub(crate) mod auth;
pub mod backend;
pub mod connect;
pub mod frames;
pub mod replication;
pub(crate) mod tls;

use std::fmt;

/// An error the server reported (ErrorResponse), with its SQLSTATE kept for logs and exit codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    /// Parses an ErrorResponse or NoticeResponse body: (Byte1 field type, String value)* then NUL.
    /// Lenient by design: a malformed body still yields an error to report.
    pub fn parse(mut body: &[u8]) -> ServerError {
        let mut err = ServerError {
            severity: "ERROR".into(),
            code: "XX000".into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            body = rest.get(end + 1..).unwrap_or_default();
            match kind {
                b'V' => err.severity = value,
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        err
    }
}

impl From<&tokio_postgres::error::DbError> for ServerError {
    fn from(db: &tokio_postgres::error::DbError) -> Self {
        ServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    }
}

/// The one classification of server errors that every retry loop uses: worth trying again on a
/// new connection. 08: connection exception; 57P01-57P03: shutdown, crash, starting up; 53300:
/// too many connections; 40001/40P01: serialization failure, deadlock; 55006: object in use (a
/// slot still held by a session that is ending).
pub fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "55006"
        )
}

/// An error from an ordinary (tokio-postgres) connection, with the server's SQLSTATE, message,
/// detail and hint when the server sent them; otherwise the client's own words and cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct QueryError {
    pub what: String,
    pub reason: String,
    pub server: Option<Box<ServerError>>,
    /// The connection broke or the server is shutting down or restarting: trying again later,
    /// on a new connection, may succeed.
    pub transient: bool,
    /// The server would not let us in: authentication failed (SQLSTATE class 28), TLS could not
    /// be set up, or it asked for a password none is configured for. Not transient: trying again
    /// with the same settings fails the same way.
    pub refused: bool,
}

impl QueryError {
    pub fn new(what: impl Into<String>, err: &tokio_postgres::Error) -> Self {
        let server = err.as_db_error().map(|db| Box::new(ServerError::from(db)));
        let reason = match &server {
            Some(s) => s.to_string(),
            None => {
                let mut text = err.to_string();
                let mut source = std::error::Error::source(err);
                while let Some(cause) = source {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    source = cause.source();
                }
                text
            }
        };
        // tokio-postgres has no public error kind; these are its words for a failed TLS
        // set-up and for a password the server asks for but the config lacks.
        let client_refused = server.is_none()
            && ["error performing TLS handshake", "password missing"]
                .iter()
                .any(|words| reason.contains(words));
        let refused = client_refused || server.as_ref().is_some_and(|s| s.code.starts_with("28"));
        let transient = !refused
            && match &server {
                Some(s) => transient_sqlstate(&s.code),
                None => true,
            };
        QueryError {
            what: what.into(),
            reason,
            server,
            transient,
            refused,
        }
    }

    pub fn sqlstate(&self) -> Option<&str> {
        self.server.as_ref().map(|s| s.code.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_error_fields() {
        let body =
            b"SERROR\0VERROR\0C42704\0Mreplication slot \"x\" does not exist\0Hcreate it\0\0";
        let err = ServerError::parse(body);
        assert_eq!(err.code, "42704");
        assert_eq!(err.message, "replication slot \"x\" does not exist");
        assert_eq!(err.hint.as_deref(), Some("create it"));
        assert_eq!(
            err.to_string(),
            "ERROR 42704: replication slot \"x\" does not exist (hint: create it)"
        );
        // Truncated input still gives something to report.
        assert_eq!(ServerError::parse(b"C4").code, "4");
    }
}
