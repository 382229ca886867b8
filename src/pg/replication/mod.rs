//! The replication connection (`replication=database`), which tokio-postgres does not support:
//! startup, TLS, trust/cleartext/md5/SCRAM-SHA-256 authentication, replication commands, and the
//! CopyBoth stream of WAL data.
//!
//! [`ReplicationClient::start_logical`] splits the connection the way tokio-postgres splits a
//! client: a [`ReplicationStream`] of WAL messages for the pipeline, and a driver task that owns
//! the socket, answers keepalives and sends standby status updates. The flushed position it
//! reports only moves when the pipeline hands it a [`DurablePosition`], which only the code that
//! committed the changes on the target can create; until then the server is told nothing
//! (position 0), so the slot never moves past what was durably applied.
//!
//! Three parts: [`startup`] connects and authenticates, [`commands`] runs replication commands,
//! and [`stream`] drives the CopyBoth stream once streaming starts.

mod commands;
mod startup;
mod stream;

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::ServerError;
use super::frames::FrameError;
use crate::model::Lsn;
use crate::pgoutput::DecodeError;

pub use startup::ReplicationClient;
pub use stream::{DurablePosition, FlushHandle, RawWal, ReplicationStream, WalMessage};

/// Everything that can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot reach {target}: {source}; check host and port, and that PostgreSQL is running")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("connecting to {target} timed out after {secs} s")]
    ConnectTimeout { target: String, secs: u64 },
    #[error(
        "{target}: {host}:{port} is a standby (in hot standby), and target_session_attrs asks for a server that accepts writes; no host listed is one"
    )]
    NotWritable {
        target: String,
        host: String,
        port: u16,
    },
    #[error(
        "{target} does not accept TLS, but sslmode requires it; enable ssl on the server or relax sslmode"
    )]
    TlsRefused { target: String },
    #[error("TLS handshake with {target} failed: {source}")]
    Tls {
        target: String,
        source: std::io::Error,
    },
    #[error(
        "{target} asks for a password for user {user:?}, but none is configured; set password_env or password_file"
    )]
    PasswordMissing { target: String, user: String },
    #[error(
        "{target} asks for authentication method {method}, which stagingprop does not support; use scram-sha-256, md5, password or trust in pg_hba.conf"
    )]
    UnsupportedAuth { target: String, method: String },
    #[error("authentication as user {user:?} at {target} failed: {source}")]
    AuthFailed {
        target: String,
        user: String,
        source: Box<ServerError>,
    },
    #[error("SCRAM authentication with {target} failed: {source}")]
    Scram {
        target: String,
        source: std::io::Error,
    },
    #[error("{target} refused {command}: {source}")]
    Server {
        target: String,
        command: String,
        source: Box<ServerError>,
    },
    #[error("replication stream from {target} failed: {source}")]
    Stream {
        target: String,
        source: Box<ServerError>,
    },
    #[error("protocol error talking to {target}: {detail}")]
    Protocol { target: String, detail: String },
    #[error("malformed replication message from {target}: {source}")]
    Frame { target: String, source: FrameError },
    #[error("malformed pgoutput message from {target} at WAL {lsn}: {source}")]
    Decode {
        target: String,
        lsn: Lsn,
        source: DecodeError,
    },
    #[error("connection to {target} lost: {source}")]
    Io {
        target: String,
        source: std::io::Error,
    },
    #[error("{target} closed the connection")]
    Closed { target: String },
    #[error(
        "{target} sent nothing for {secs} s, not even the keepalive asked for; the server or the \
         network is stuck (raise [sync] receive_timeout_secs if it is only slow)"
    )]
    Silent { target: String, secs: f64 },
}

impl ReplicationError {
    /// The server would not let us in (authentication or TLS); trying again will not help.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            ReplicationError::TlsRefused { .. }
                | ReplicationError::Tls { .. }
                | ReplicationError::PasswordMissing { .. }
                | ReplicationError::UnsupportedAuth { .. }
                | ReplicationError::AuthFailed { .. }
                | ReplicationError::Scram { .. }
        )
    }

    /// Worth retrying on a new connection: the server went away, is restarting, is silent, is
    /// not (yet) the primary, or the slot is still held by a session that is ending.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::Io { .. }
            | ReplicationError::Closed { .. }
            | ReplicationError::Silent { .. }
            | ReplicationError::NotWritable { .. } => true,
            ReplicationError::Stream { source, .. }
            | ReplicationError::Server { source, .. }
            | ReplicationError::AuthFailed { source, .. } => {
                super::transient_sqlstate(&source.code)
            }
            _ => false,
        }
    }

    /// The server could not be reached, or would not let us in.
    pub fn is_unreachable(&self) -> bool {
        self.is_refused()
            || matches!(
                self,
                ReplicationError::Connect { .. }
                    | ReplicationError::ConnectTimeout { .. }
                    | ReplicationError::NotWritable { .. }
            )
    }

    /// The server's SQLSTATE, when the server reported the error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::AuthFailed { source, .. }
            | ReplicationError::Server { source, .. }
            | ReplicationError::Stream { source, .. } => Some(&source.code),
            _ => None,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Result of a simple query on the replication connection: column names and text rows.
#[derive(Debug, Default, Clone)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    /// The value of `column` in the first row.
    pub fn first(&self, column: &str) -> Option<&str> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.rows.first()?.get(index)?.as_deref()
    }
}

/// The answer to IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    pub system_id: String,
    pub timeline: u32,
    pub xlogpos: Lsn,
    pub dbname: Option<String>,
}

/// What CREATE_REPLICATION_SLOT does with the slot's initial snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Export it for other sessions (`SET TRANSACTION SNAPSHOT`) until this connection's next command.
    Export,
    /// Use it in this connection's own transaction.
    Use,
    /// No snapshot.
    Nothing,
}

/// A slot just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The LSN from which the slot streams: everything before it is in the snapshot.
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// pgoutput options for START_REPLICATION.
#[derive(Clone, Debug)]
pub struct PgOutputOptions {
    pub proto_version: u32,
    pub publications: Vec<String>,
    pub binary: bool,
    /// Also deliver `pg_logical_emit_message` messages (heartbeats use them).
    pub messages: bool,
    /// Whether large in-progress transactions are streamed (see [`Streaming`]).
    pub streaming: Streaming,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
    /// Silence after which the stream is given up (see `[sync] receive_timeout_secs`).
    pub receive_timeout: Duration,
}

/// pgoutput's `streaming` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streaming {
    /// A transaction is sent after its commit (the walsender spills large ones to disk).
    Off,
    /// Large transactions are sent while in progress (protocol 2+).
    On,
    /// As `On`, and a Stream Abort carries the abort's LSN and time (protocol 4, PostgreSQL 16+).
    /// The walsender sends the same changes either way; `parallel` names what PostgreSQL's
    /// own subscriber does with them, which sync already does: apply each in a session of its own.
    Parallel,
}

impl PgOutputOptions {
    /// Streams large in-progress transactions with the newest protocol the server speaks:
    /// 4 with `streaming 'parallel'` on 16+ (server_version_num 160000), else 2 with `on`.
    pub fn stream_in_progress(&mut self, server_version_num: u32) {
        if server_version_num >= 160000 {
            self.proto_version = self.proto_version.max(4);
            self.streaming = Streaming::Parallel;
        } else {
            self.proto_version = self.proto_version.max(2);
            self.streaming = Streaming::On;
        }
    }

    pub fn new(publications: Vec<String>) -> Self {
        PgOutputOptions {
            proto_version: 1,
            publications,
            binary: false,
            messages: true,
            streaming: Streaming::Off,
            status_interval: Duration::from_secs(10),
            receive_timeout: Duration::from_secs(60),
        }
    }
}
