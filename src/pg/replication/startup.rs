//! Connecting in replication mode: the socket (TCP or Unix, TLS when asked), the startup
//! message, authentication, and reading and writing whole protocol messages.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{Io, ReplicationError};
use crate::pg::ServerError;
use crate::pg::auth::{AuthError, AuthStep, Authenticator};
use crate::pg::backend::{self, AuthRequest, Frame};
use crate::pg::connect::{Endpoint, TlsPolicy};

/// A connection in replication mode, between commands.
pub struct ReplicationClient {
    pub(super) io: Box<dyn Io>,
    pub(super) inbuf: BytesMut,
    pub(super) outbuf: BytesMut,
    pub(super) target: String,
    pub(super) server_version_num: u32,
    /// The server said `in_hot_standby = on` (PostgreSQL 14+ reports it at startup).
    pub(super) hot_standby: bool,
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
                            crate::pg::tls::handshake(config.clone(), host, tcp)
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

    /// Ends the session politely.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.outbuf);
        self.flush().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }

    /// An authentication step's error, with the server and user it concerns.
    pub(super) fn auth_error(&self, user: &str, error: AuthError) -> ReplicationError {
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

    pub(super) fn protocol(&self, detail: String) -> ReplicationError {
        ReplicationError::Protocol {
            target: self.target.clone(),
            detail,
        }
    }

    pub(super) fn io_error(&self, source: std::io::Error) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            source,
        }
    }

    pub(super) async fn flush(&mut self) -> Result<(), ReplicationError> {
        let out = self.outbuf.split();
        self.io
            .write_all(&out)
            .await
            .map_err(|e| self.io_error(e))?;
        self.io.flush().await.map_err(|e| self.io_error(e))
    }

    /// Reads until one whole message is buffered.
    pub(super) async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    pub(super) fn try_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        backend::take_frame(&mut self.inbuf).map_err(|e| self.protocol(e.to_string()))
    }

    pub(super) async fn fill(&mut self) -> Result<(), ReplicationError> {
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
