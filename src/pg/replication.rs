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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::ServerError;
use super::auth::{AuthError, AuthStep, Authenticator};
use super::backend::{self, AuthRequest, Frame};
use super::connect::{Endpoint, TlsPolicy};
use super::frames::{self, FrameError, ServerCopyData, StandbyStatus};
use crate::model::{Lsn, PgTimestamp};
use crate::pgoutput::{DecodeError, Decoder, LogicalMessage};
use crate::quote::{ident_list, quote_ident, quote_literal};

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

/// A connection in replication mode, between commands.
pub struct ReplicationClient {
    io: Box<dyn Io>,
    inbuf: BytesMut,
    outbuf: BytesMut,
    target: String,
    server_version_num: u32,
    /// The server said `in_hot_standby = on` (PostgreSQL 14+ reports it at startup).
    hot_standby: bool,
}

/// Session settings for unambiguous text output, as PostgreSQL's own apply worker asks for.
const SESSION_OPTIONS: &str =
    "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c timezone=UTC";

impl ReplicationClient {
    /// Connects, trying each configured host in turn, each within the connect timeout.
    pub async fn connect(endpoint: &Endpoint) -> Result<ReplicationClient, ReplicationError> {
        let timeout = endpoint.connect_timeout();
        let wants_writable = endpoint.pg.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite;
        let mut last_error = None;
        for (host, port) in endpoint.addresses() {
            let attempt = Self::connect_one(endpoint, &host, port);
            match tokio::time::timeout(timeout, attempt).await {
                // libpq's target_session_attrs=read-write: a standby is passed over (logical
                // decoding works on a 16+ standby, but its slots are not the primary's).
                Ok(Ok(client)) if wants_writable && client.hot_standby => {
                    let _ = client.close().await;
                    last_error = Some(ReplicationError::NotWritable {
                        target: endpoint.describe(),
                        host,
                        port,
                    });
                }
                Ok(Ok(client)) => return Ok(client),
                // A server that answered and said no: trying the next host will not help.
                Ok(Err(e @ ReplicationError::AuthFailed { .. }))
                | Ok(Err(e @ ReplicationError::PasswordMissing { .. })) => return Err(e),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => {
                    last_error = Some(ReplicationError::ConnectTimeout {
                        target: endpoint.describe(),
                        secs: timeout.as_secs(),
                    })
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ReplicationError::Protocol {
            target: endpoint.describe(),
            detail: "no host to connect to".into(),
        }))
    }

    async fn connect_one(
        endpoint: &Endpoint,
        host: &str,
        port: u16,
    ) -> Result<ReplicationClient, ReplicationError> {
        let target = endpoint.describe();
        let io_err = |source| ReplicationError::Connect {
            target: target.clone(),
            source,
        };
        let io: Box<dyn Io> = if host.starts_with('/') {
            // libpq does not use TLS over Unix-domain sockets either.
            Box::new(
                UnixStream::connect(format!("{host}/.s.PGSQL.{port}"))
                    .await
                    .map_err(io_err)?,
            )
        } else {
            let mut tcp = TcpStream::connect((host, port)).await.map_err(io_err)?;
            tcp.set_nodelay(true).map_err(io_err)?;
            match &endpoint.tls {
                TlsPolicy::Disable => Box::new(tcp),
                TlsPolicy::Prefer(config) | TlsPolicy::Require(config) => {
                    let mut request = BytesMut::new();
                    frontend::ssl_request(&mut request);
                    tcp.write_all(&request).await.map_err(io_err)?;
                    let answer = tcp.read_u8().await.map_err(io_err)?;
                    match (answer, &endpoint.tls) {
                        (b'S', _) => Box::new(
                            super::tls::handshake(config.clone(), host, tcp)
                                .await
                                .map_err(|source| ReplicationError::Tls {
                                    target: target.clone(),
                                    source,
                                })?,
                        ),
                        (b'N', TlsPolicy::Prefer(_)) => Box::new(tcp),
                        (b'N', _) => return Err(ReplicationError::TlsRefused { target }),
                        (other, _) => {
                            return Err(ReplicationError::Protocol {
                                target,
                                detail: format!("unexpected answer {other:#04x} to SSLRequest"),
                            });
                        }
                    }
                }
            }
        };
        let mut client = ReplicationClient {
            io,
            inbuf: BytesMut::with_capacity(64 * 1024),
            outbuf: BytesMut::with_capacity(1024),
            target,
            server_version_num: 0,
            hot_standby: false,
        };
        client.startup(endpoint).await?;
        Ok(client)
    }

    async fn startup(&mut self, endpoint: &Endpoint) -> Result<(), ReplicationError> {
        let user = endpoint.user();
        let dbname = endpoint.dbname();
        let application_name = endpoint
            .pg
            .get_application_name()
            .unwrap_or("stagingprop")
            .to_owned();
        let params = [
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("options", SESSION_OPTIONS),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.outbuf)
            .map_err(|e| self.protocol(e.to_string()))?;
        self.flush().await?;

        let mut authenticator = Authenticator::new(&user, endpoint.pg.get_password());
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {
                    let request =
                        AuthRequest::parse(frame.body).map_err(|e| self.protocol(e.to_string()))?;
                    let step = authenticator
                        .step(request, &mut self.outbuf)
                        .map_err(|e| self.auth_error(&user, e))?;
                    match step {
                        AuthStep::Done => break,
                        AuthStep::Wait => {}
                        AuthStep::Answer => self.flush().await?,
                    }
                }
                b'E' => {
                    return Err(ReplicationError::AuthFailed {
                        target: self.target.clone(),
                        user,
                        source: Box::new(ServerError::parse(&frame.body)),
                    });
                }
                b'N' | b'v' => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )));
                }
            }
        }
        // After AuthenticationOk: parameters, key data, then ReadyForQuery (or a startup error).
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(()),
                b'S' => match backend::parameter_status(frame.body) {
                    Some((name, value)) if name == "server_version" => {
                        self.server_version_num = backend::server_version_num(&value);
                    }
                    Some((name, value)) if name == "in_hot_standby" => {
                        self.hot_standby = value == "on";
                    }
                    _ => {}
                },
                b'E' => {
                    return Err(ReplicationError::AuthFailed {
                        target: self.target.clone(),
                        user,
                        source: Box::new(ServerError::parse(&frame.body)),
                    });
                }
                b'K' | b'N' => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} during startup",
                        other as char
                    )));
                }
            }
        }
    }

    /// The server's version as `server_version_num` spells it (150008 for 15.8).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Runs one replication command or SQL statement and collects its text rows.
    pub async fn simple_query(&mut self, command: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(command, &mut self.outbuf).map_err(|e| self.protocol(e.to_string()))?;
        self.flush().await?;
        let mut result = QueryResult::default();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'T' => result.columns = backend::row_description(frame.body),
                b'D' => result.rows.push(
                    backend::data_row(frame.body)
                        .ok_or_else(|| self.protocol("malformed DataRow".into()))?,
                ),
                b'E' => error = Some(Box::new(ServerError::parse(&frame.body))),
                b'C' | b'I' | b'N' | b'S' => {}
                b'Z' => break,
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} in reply to {command}",
                        other as char
                    )));
                }
            }
        }
        match error {
            Some(source) => Err(ReplicationError::Server {
                target: self.target.clone(),
                command: first_word(command),
                source,
            }),
            None => Ok(result),
        }
    }

    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let result = self.simple_query("IDENTIFY_SYSTEM").await?;
        let field = |name: &str| result.first(name).map(str::to_owned);
        let missing = |name: &str| self.protocol(format!("IDENTIFY_SYSTEM lacks {name}"));
        Ok(SystemIdentity {
            system_id: field("systemid").ok_or_else(|| missing("systemid"))?,
            timeline: field("timeline")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| missing("timeline"))?,
            xlogpos: field("xlogpos")
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| missing("xlogpos"))?,
            dbname: field("dbname"),
        })
    }

    /// Creates a pgoutput slot. With [`SnapshotAction::Export`] the snapshot stays usable by other
    /// sessions until this connection runs its next command or closes.
    /// With `failover` (PostgreSQL 17+), standbys that synchronize slots keep this one.
    pub async fn create_logical_slot(
        &mut self,
        slot: &str,
        temporary: bool,
        snapshot: SnapshotAction,
        failover: bool,
    ) -> Result<CreatedSlot, ReplicationError> {
        let temporary = if temporary { " TEMPORARY" } else { "" };
        // PostgreSQL 15 introduced the parenthesized option list; 14 knows only the keywords.
        let failover = if failover { ", FAILOVER true" } else { "" };
        let snapshot_clause = match (self.server_version_num >= 150000, snapshot) {
            (true, SnapshotAction::Export) => format!(" (SNAPSHOT 'export'{failover})"),
            (true, SnapshotAction::Use) => format!(" (SNAPSHOT 'use'{failover})"),
            (true, SnapshotAction::Nothing) => format!(" (SNAPSHOT 'nothing'{failover})"),
            (false, SnapshotAction::Export) => " EXPORT_SNAPSHOT".into(),
            (false, SnapshotAction::Use) => " USE_SNAPSHOT".into(),
            (false, SnapshotAction::Nothing) => " NOEXPORT_SNAPSHOT".into(),
        };
        let command = format!(
            "CREATE_REPLICATION_SLOT {}{temporary} LOGICAL pgoutput{snapshot_clause}",
            quote_ident(slot)
        );
        let result = self.simple_query(&command).await?;
        let consistent_point = result
            .first("consistent_point")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                self.protocol("CREATE_REPLICATION_SLOT gave no consistent_point".into())
            })?;
        Ok(CreatedSlot {
            slot_name: result.first("slot_name").unwrap_or(slot).to_owned(),
            consistent_point,
            snapshot_name: result.first("snapshot_name").map(str::to_owned),
            output_plugin: result
                .first("output_plugin")
                .unwrap_or("pgoutput")
                .to_owned(),
        })
    }

    /// Drops a slot; with `wait`, waits for another session using it to let go instead of failing.
    pub async fn drop_slot(&mut self, slot: &str, wait: bool) -> Result<(), ReplicationError> {
        let wait = if wait { " WAIT" } else { "" };
        self.simple_query(&format!(
            "DROP_REPLICATION_SLOT {}{wait}",
            quote_ident(slot)
        ))
        .await?;
        Ok(())
    }

    /// Starts streaming from `slot` at `start` (the server starts at the later of `start` and the
    /// slot's confirmed position) and hands the socket to a driver task.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &PgOutputOptions,
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut plugin_options = vec![
            format!(
                "proto_version {}",
                quote_literal(&options.proto_version.to_string())
            ),
            format!(
                "publication_names {}",
                quote_literal(&ident_list(options.publications.iter().map(String::as_str)))
            ),
        ];
        if options.binary {
            plugin_options.push("binary 'true'".into());
        }
        if options.messages {
            plugin_options.push("messages 'true'".into());
        }
        match options.streaming {
            Streaming::Off => {}
            Streaming::On => plugin_options.push("streaming 'on'".into()),
            Streaming::Parallel => plugin_options.push("streaming 'parallel'".into()),
        }
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            plugin_options.join(", ")
        );
        frontend::query(&command, &mut self.outbuf).map_err(|e| self.protocol(e.to_string()))?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => break,
                b'E' => {
                    let source = Box::new(ServerError::parse(&frame.body));
                    return Err(ReplicationError::Server {
                        target: self.target.clone(),
                        command: "START_REPLICATION".into(),
                        source,
                    });
                }
                b'N' => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} in reply to START_REPLICATION",
                        other as char
                    )));
                }
            }
        }

        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (flush_tx, flush_rx) = watch::channel(Lsn::INVALID);
        let shared = Arc::new(StreamShared {
            server_wal_end: AtomicU64::new(0),
            stop: Notify::new(),
        });
        let target = self.target.clone();
        let driver = Driver {
            client: self,
            events: events_tx,
            flushed: flush_rx,
            shared: shared.clone(),
            received: Lsn::INVALID,
            status_interval: options.status_interval,
            receive_timeout: options.receive_timeout,
            last_heard: tokio::time::Instant::now(),
            pinged: false,
        };
        let driver = tokio::spawn(driver.run());
        Ok(ReplicationStream {
            events: events_rx,
            pending: Vec::new().into_iter(),
            decoder: Decoder::new(),
            flush: FlushHandle {
                tx: Arc::new(flush_tx),
            },
            shared,
            driver: Some(driver),
            target,
        })
    }

    /// Ends the session politely.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.outbuf);
        self.flush().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }

    /// An authentication step's error, with the server and user it concerns.
    fn auth_error(&self, user: &str, error: AuthError) -> ReplicationError {
        let target = self.target.clone();
        match error {
            AuthError::PasswordMissing => ReplicationError::PasswordMissing {
                target,
                user: user.to_owned(),
            },
            AuthError::Unsupported(method) => ReplicationError::UnsupportedAuth { target, method },
            AuthError::Scram(source) => ReplicationError::Scram { target, source },
            AuthError::Protocol(detail) => self.protocol(detail),
        }
    }

    fn protocol(&self, detail: String) -> ReplicationError {
        ReplicationError::Protocol {
            target: self.target.clone(),
            detail,
        }
    }

    fn io_error(&self, source: std::io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            source,
        }
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        let out = self.outbuf.split();
        self.io
            .write_all(&out)
            .await
            .map_err(|e| self.io_error(e))?;
        self.io.flush().await.map_err(|e| self.io_error(e))
    }

    /// Reads until one whole message is buffered.
    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        backend::take_frame(&mut self.inbuf).map_err(|e| self.protocol(e.to_string()))
    }

    async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.inbuf.capacity() - self.inbuf.len() < 8 * 1024 {
            self.inbuf.reserve(64 * 1024);
        }
        let n = self
            .io
            .read_buf(&mut self.inbuf)
            .await
            .map_err(|e| self.io_error(e))?;
        if n == 0 {
            return Err(ReplicationError::Closed {
                target: self.target.clone(),
            });
        }
        Ok(())
    }
}

fn first_word(command: &str) -> String {
    command.split_whitespace().next().unwrap_or("").to_owned()
}

/// One XLogData message as received: where it is in the WAL and its undecoded payload.
#[derive(Clone, Debug)]
pub struct RawWal {
    pub wal_start: Lsn,
    pub wal_end: Lsn,
    pub send_time: PgTimestamp,
    pub payload: Bytes,
}

/// One decoded pgoutput message and where it is in the WAL.
#[derive(Clone, Debug)]
pub struct WalMessage {
    pub wal_start: Lsn,
    pub wal_end: Lsn,
    pub send_time: PgTimestamp,
    pub message: LogicalMessage,
}

/// Proof that the changes up to `lsn` are durably committed on the target: the only thing the
/// replication connection accepts as a flushed position. Only the code that commits on the
/// target (and checks durability) may create one, hence the crate-private constructor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DurablePosition(Lsn);

impl DurablePosition {
    /// Call only after the target's commit covering everything up to `lsn` is durable.
    pub(crate) fn after_durable_commit(lsn: Lsn) -> Self {
        DurablePosition(lsn)
    }

    /// Call only after every transaction up to `lsn` is in the spool and fsynced: the spool,
    /// not the target, then holds what staging may release.
    pub(crate) fn after_spool_fsync(lsn: Lsn) -> Self {
        DurablePosition(lsn)
    }

    pub fn lsn(self) -> Lsn {
        self.0
    }
}

/// Reports durable positions to the driver; cheap to clone and to call often.
#[derive(Clone)]
pub struct FlushHandle {
    tx: Arc<watch::Sender<Lsn>>,
}

impl FlushHandle {
    /// Lets the server release WAL up to `position`. Positions never go backwards.
    pub fn confirm(&self, position: DurablePosition) {
        self.tx.send_if_modified(|current| {
            if position.0 > *current {
                *current = position.0;
                true
            } else {
                false
            }
        });
    }

    /// The last position confirmed through this handle (0 if none).
    pub fn confirmed(&self) -> Lsn {
        *self.tx.borrow()
    }
}

struct StreamShared {
    server_wal_end: AtomicU64,
    stop: Notify,
}

/// Chunks of messages in flight from the driver to the consumer. Bounded so that a slow consumer
/// stops the driver from reading the socket (backpressure), while the driver keeps sending
/// status updates so the server does not time out. Large enough (up to 256 socket reads) that
/// the server keeps decoding while the pipeline applies a batch, instead of the two taking turns.
const EVENT_QUEUE: usize = 256;

/// Messages handed over at once: one wake-up of the consumer per chunk, not per message.
const CHUNK_MESSAGES: usize = 1024;

/// How long a closing stream waits for the server to acknowledge its end.
const FINISH_WAIT: Duration = Duration::from_secs(5);

type Chunk = Result<Vec<RawWal>, ReplicationError>;

/// The consumer's end of a streaming replication connection.
pub struct ReplicationStream {
    events: mpsc::Receiver<Chunk>,
    /// The rest of the chunk being consumed.
    pending: std::vec::IntoIter<RawWal>,
    decoder: Decoder,
    flush: FlushHandle,
    shared: Arc<StreamShared>,
    driver: Option<JoinHandle<Result<(), ReplicationError>>>,
    target: String,
}

impl ReplicationStream {
    /// The next XLogData message, undecoded; `None` when the server ended the stream.
    pub async fn next_raw(&mut self) -> Result<Option<RawWal>, ReplicationError> {
        loop {
            if let Some(raw) = self.pending.next() {
                return Ok(Some(raw));
            }
            match self.events.recv().await {
                Some(Ok(chunk)) => self.pending = chunk.into_iter(),
                Some(Err(e)) => return Err(e),
                None => return self.driver_end().await,
            }
        }
    }

    /// The driver ended: its error if it had one, else the end of the stream.
    async fn driver_end(&mut self) -> Result<Option<RawWal>, ReplicationError> {
        match self.driver.take() {
            Some(handle) => match handle.await {
                Ok(Err(e)) => Err(e),
                _ => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// The next decoded pgoutput message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<WalMessage>, ReplicationError> {
        let Some(raw) = self.next_raw().await? else {
            return Ok(None);
        };
        let message =
            self.decoder
                .decode(raw.payload)
                .map_err(|source| ReplicationError::Decode {
                    target: self.target.clone(),
                    lsn: raw.wal_start,
                    source,
                })?;
        Ok(Some(WalMessage {
            wal_start: raw.wal_start,
            wal_end: raw.wal_end,
            send_time: raw.send_time,
            message,
        }))
    }

    /// Where the pipeline reports what the target durably committed.
    pub fn flush_handle(&self) -> FlushHandle {
        self.flush.clone()
    }

    /// The server's WAL end as of the last message or keepalive (for lag).
    pub fn server_wal_end(&self) -> Lsn {
        Lsn(self.shared.server_wal_end.load(Ordering::Relaxed))
    }

    /// Sends a last status update with the confirmed position, ends the copy and the session.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        self.shared.stop.notify_one();
        // Drain so the driver is never stuck waiting for queue room.
        self.events.close();
        while self.events.recv().await.is_some() {}
        match self.driver.take() {
            Some(handle) => handle.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.shared.stop.notify_one();
    }
}

/// Owns the socket while streaming.
struct Driver {
    client: ReplicationClient,
    events: mpsc::Sender<Chunk>,
    flushed: watch::Receiver<Lsn>,
    shared: Arc<StreamShared>,
    received: Lsn,
    status_interval: Duration,
    receive_timeout: Duration,
    /// When the server last sent anything (or the driver last stopped reading to deliver).
    last_heard: tokio::time::Instant,
    /// Whether a keepalive was asked for since then.
    pinged: bool,
}

/// Why the driver's wait ended.
enum Wake {
    Read(Result<(), ReplicationError>),
    Tick,
    FlushChanged(bool),
    Silence,
    Stop,
}

impl Driver {
    async fn run(mut self) -> Result<(), ReplicationError> {
        let result = self.stream().await;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                // Hand the error to the consumer; if it is gone, report it from the task.
                match self.events.try_send(Err(e)) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(Err(e)))
                    | Err(mpsc::error::TrySendError::Closed(Err(e))) => Err(e),
                    Err(_) => Ok(()),
                }
            }
        }
    }

    async fn stream(&mut self) -> Result<(), ReplicationError> {
        let mut ticker = tokio::time::interval(self.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush_open = true;
        let mut chunk: Vec<RawWal> = Vec::new();
        loop {
            while let Some(frame) = self.client.try_frame()? {
                if chunk.len() >= CHUNK_MESSAGES
                    && !self
                        .deliver(std::mem::take(&mut chunk), &mut ticker)
                        .await?
                {
                    return self.finish().await;
                }
                match frame.tag {
                    b'd' => {
                        let message =
                            frames::parse_server_copy_data(frame.body).map_err(|source| {
                                ReplicationError::Frame {
                                    target: self.client.target.clone(),
                                    source,
                                }
                            })?;
                        match message {
                            ServerCopyData::XLogData {
                                wal_start,
                                wal_end,
                                send_time,
                                payload,
                            } => {
                                self.received = self.received.max(wal_start);
                                self.shared
                                    .server_wal_end
                                    .fetch_max(wal_end.0, Ordering::Relaxed);
                                chunk.push(RawWal {
                                    wal_start,
                                    wal_end,
                                    send_time,
                                    payload,
                                });
                            }
                            ServerCopyData::Keepalive {
                                wal_end,
                                reply_requested,
                                ..
                            } => {
                                self.shared
                                    .server_wal_end
                                    .fetch_max(wal_end.0, Ordering::Relaxed);
                                if reply_requested {
                                    self.send_status(false).await?;
                                }
                            }
                        }
                    }
                    // The server ended the stream: CopyDone, or CommandComplete without one,
                    // which is how a walsender says goodbye when its server shuts down
                    // (WalSndDone); either way the consumer sees the stream end.
                    b'c' | b'C' => {
                        if !chunk.is_empty() {
                            self.deliver(std::mem::take(&mut chunk), &mut ticker)
                                .await?;
                        }
                        return Ok(());
                    }
                    b'E' => {
                        if !chunk.is_empty() {
                            self.deliver(std::mem::take(&mut chunk), &mut ticker)
                                .await?;
                        }
                        return Err(ReplicationError::Stream {
                            target: self.client.target.clone(),
                            source: Box::new(ServerError::parse(&frame.body)),
                        });
                    }
                    b'N' => {
                        let notice = ServerError::parse(&frame.body);
                        tracing::info!(server = %self.client.target, "server notice: {notice}");
                    }
                    other => {
                        return Err(self.client.protocol(format!(
                            "unexpected message {:?} while streaming",
                            other as char
                        )));
                    }
                }
            }
            if !chunk.is_empty()
                && !self
                    .deliver(std::mem::take(&mut chunk), &mut ticker)
                    .await?
            {
                return self.finish().await;
            }
            // Half the timeout without a word: ask for a keepalive; the whole: give up.
            let silence = if self.pinged {
                self.receive_timeout
            } else {
                self.receive_timeout / 2
            };
            let wake = tokio::select! {
                r = self.client.fill() => Wake::Read(r),
                _ = tokio::time::sleep_until(self.last_heard + silence) => Wake::Silence,
                _ = ticker.tick() => Wake::Tick,
                r = self.flushed.changed(), if flush_open => Wake::FlushChanged(r.is_ok()),
                _ = self.shared.stop.notified() => Wake::Stop,
            };
            match wake {
                Wake::Read(r) => {
                    r?;
                    self.last_heard = tokio::time::Instant::now();
                    self.pinged = false;
                }
                Wake::Silence if self.pinged => {
                    return Err(ReplicationError::Silent {
                        target: self.client.target.clone(),
                        secs: self.receive_timeout.as_secs_f64(),
                    });
                }
                Wake::Silence => {
                    self.pinged = true;
                    self.send_status(true).await?;
                }
                Wake::Tick => self.send_status(false).await?,
                Wake::FlushChanged(open) => {
                    flush_open = open;
                    if open {
                        self.send_status(false).await?;
                    }
                }
                Wake::Stop => return self.finish().await,
            }
        }
    }

    /// Queues a chunk of messages for the consumer, sending status updates while the queue is
    /// full. Returns false when the consumer is gone or asked to stop.
    async fn deliver(
        &mut self,
        raw: Vec<RawWal>,
        ticker: &mut tokio::time::Interval,
    ) -> Result<bool, ReplicationError> {
        loop {
            let tick = tokio::select! {
                permit = self.events.reserve() => {
                    return match permit {
                        Ok(permit) => {
                            permit.send(Ok(raw));
                            // Time spent waiting on the consumer is not the server's silence.
                            self.last_heard = tokio::time::Instant::now();
                            Ok(true)
                        }
                        Err(_) => Ok(false),
                    };
                }
                _ = ticker.tick() => true,
                _ = self.shared.stop.notified() => false,
            };
            if !tick {
                return Ok(false);
            }
            self.send_status(false).await?;
        }
    }

    async fn send_status(&mut self, reply_requested: bool) -> Result<(), ReplicationError> {
        let flushed = *self.flushed.borrow_and_update();
        let status = StandbyStatus {
            written: self.received.max(flushed),
            flushed,
            applied: flushed,
            client_time: PgTimestamp::now(),
            reply_requested,
        };
        frames::encode_standby_status(&status, &mut self.client.outbuf);
        self.client.flush().await
    }

    /// Last status update and CopyDone, then waits (at most [`FINISH_WAIT`]) for the server to
    /// end the copy too. The walsender answers CopyDone only after it took in the status update
    /// sent before it, so the slot is confirmed by the time this returns; closing at once would
    /// leave unread data on our side, the kernel would reset the connection, and a walsender
    /// still sending would exit on the reset without reading the update.
    async fn finish(&mut self) -> Result<(), ReplicationError> {
        self.send_status(false).await?;
        frontend::copy_done(&mut self.client.outbuf);
        self.client.flush().await?;
        match tokio::time::timeout(FINISH_WAIT, self.skip_to_copy_end()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("while ending the stream: {e}"),
            Err(_) => tracing::warn!(
                server = %self.client.target,
                "the server did not end the stream within {} s; the last confirmation may be \
                 lost (staging then sends those changes again and they are skipped)",
                FINISH_WAIT.as_secs()
            ),
        }
        frontend::terminate(&mut self.client.outbuf);
        self.client.flush().await?;
        let _ = self.client.io.shutdown().await;
        Ok(())
    }

    /// Reads past what the server still sends until it ends the copy (or fails).
    async fn skip_to_copy_end(&mut self) -> Result<(), ReplicationError> {
        loop {
            let frame = self.client.read_frame().await?;
            if matches!(frame.tag, b'c' | b'C' | b'E') {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one path that moves a slot: a [`DurablePosition`] handed to the flush handle. Reading
    /// alone, for however long, leaves the slot where it was.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_a_durable_position_moves_the_slot() {
        use crate::cluster::{ClusterOptions, LocalCluster};
        use crate::pgoutput::LogicalMessage;

        let cluster = LocalCluster::start(&ClusterOptions::new("confirm")).expect("cluster");
        cluster
            .psql(
                "postgres",
                "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t",
            )
            .unwrap();
        cluster
            .psql(
                "postgres",
                "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            )
            .unwrap();
        let confirmed = || -> Lsn {
            cluster
                .psql(
                    "postgres",
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 's'",
                )
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = confirmed();
        cluster
            .psql("postgres", "INSERT INTO t SELECT generate_series(1, 10)")
            .unwrap();
        let pg = cluster.conninfo("postgres", "postgres").parse().unwrap();
        let endpoint = Endpoint::new("test", pg, TlsPolicy::Disable);
        let client = ReplicationClient::connect(&endpoint).await.unwrap();
        let mut options = PgOutputOptions::new(vec!["p".into()]);
        options.status_interval = Duration::from_millis(100);
        let mut stream = client
            .start_logical("s", Lsn::INVALID, &options)
            .await
            .unwrap();
        let end_lsn = loop {
            let m = stream.next().await.unwrap().unwrap();
            if let LogicalMessage::Commit { end_lsn, .. } = m.message {
                break end_lsn;
            }
        };
        // Several status updates go out while nothing is confirmed: the slot stays put.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(confirmed(), before);

        let flush = stream.flush_handle();
        flush.confirm(DurablePosition::after_durable_commit(end_lsn));
        flush.confirm(DurablePosition::after_durable_commit(before));
        assert_eq!(flush.confirmed(), end_lsn, "positions never go backwards");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while confirmed() != end_lsn {
            assert!(
                std::time::Instant::now() < deadline,
                "slot did not move to {end_lsn}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stream.close().await.unwrap();
        assert_eq!(confirmed(), end_lsn);
    }
}
