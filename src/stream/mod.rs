//! Fan-out through NATS JetStream (docs/design.md, "Outages and replay"): `publish` writes
//! staging's transactions, read from the spool, to a JetStream stream; each target's
//! `sync --from-stream` reads them back. This module owns the JetStream side: the connection,
//! the stream, the message format ([`chunk`], sans-IO), publishing with bounded in-flight acks
//! ([`publisher`]) and reading a target's way through the stream ([`reader`]).

pub mod chunk;
pub(crate) mod publisher;
pub(crate) mod reader;

pub use self::publisher::Published;
pub use self::reader::StreamReader;

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::{ConfigError, StreamConfig};
use crate::model::Lsn;
use chunk::ChunkError;

/// How long a JetStream request (or a publish's ack) may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "cannot connect to NATS at {url}: {message}. Check [stream] url, that nats-server runs \
         with JetStream enabled (-js) and reachable, and the credentials"
    )]
    Connect { url: String, message: String },
    #[error("JetStream stream {stream}: {what}: {message}")]
    Server {
        stream: String,
        what: String,
        message: String,
    },
    #[error(
        "the JetStream stream {stream} does not exist: `stagingprop publish` creates it, or \
         create it with the settings docs/fanout.md gives"
    )]
    Missing { stream: String },
    #[error(
        "the JetStream stream {stream} does not take subject {subject} (it takes {subjects}): \
         set [stream] subject to one of them, or add it to the stream"
    )]
    Subject {
        stream: String,
        subject: String,
        subjects: String,
    },
    #[error(
        "the stream {stream} refused a message out of order ({message}): another publisher \
         wrote to it meanwhile; publishing resumes after what the stream holds"
    )]
    OutOfOrder { stream: String, message: String },
    #[error(
        "the stream {stream} no longer holds what this target needs: the target has staging's \
         transactions up to {covered}, but the next one the stream holds (at stream sequence \
         {sequence}) follows transactions up to {previous_end} (retention removed them, or the \
         stream was recreated). Nothing was skipped or applied past it: re-seed this target with \
         `stagingprop copy`, then start `sync --from-stream` again"
    )]
    Gap {
        stream: String,
        covered: Lsn,
        previous_end: Lsn,
        sequence: u64,
    },
    #[error("the stream {stream} at sequence {sequence}: {source}")]
    Chunk {
        stream: String,
        sequence: u64,
        source: ChunkError,
    },
    #[error(
        "a record of {0} bytes does not fit in one NATS message (the server's max_payload is \
         smaller): raise max_payload in nats-server's configuration"
    )]
    TooLarge(usize),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Spool(#[from] crate::spool::store::SpoolError),
}

impl StreamError {
    /// Worth retrying after a pause: the server went away, restarts, or answered late.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StreamError::Connect { .. }
                | StreamError::Server { .. }
                | StreamError::OutOfOrder { .. }
        )
    }
}

pub(crate) fn server_error(
    config: &StreamConfig,
    what: &str,
) -> impl FnOnce(String) -> StreamError + use<> {
    let (stream, what) = (config.name.clone(), what.to_owned());
    move |message| StreamError::Server {
        stream,
        what,
        message,
    }
}

/// Connects to the configured NATS servers (credentials from env or file, never inline).
pub async fn connect(config: &StreamConfig) -> Result<jetstream::Context, StreamError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("stagingprop")
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT));
    match (&config.user, config.password.resolve("stream")?) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password);
        }
        (None, Some(token)) => options = options.token(token),
        (Some(_), None) => {
            return Err(StreamError::Connect {
                url: config.url.clone(),
                message: "[stream] user is set without password_env or password_file".into(),
            });
        }
        (None, None) => {}
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let servers: Vec<async_nats::ServerAddr> = config
        .url
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| StreamError::Connect {
            url: config.url.clone(),
            message: e.to_string(),
        })?;
    let client = options
        .connect(servers)
        .await
        .map_err(|e| StreamError::Connect {
            url: config.url.clone(),
            message: e.to_string(),
        })?;
    let mut context = jetstream::new(client);
    context.set_timeout(REQUEST_TIMEOUT);
    Ok(context)
}

/// The configured stream, which must take the configured subject.
pub async fn open_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
) -> Result<stream::Stream, StreamError> {
    let mut stream = match js.get_stream(&config.name).await {
        Ok(stream) => stream,
        Err(e) if is_not_found(&e) => {
            return Err(StreamError::Missing {
                stream: config.name.clone(),
            });
        }
        Err(e) => return Err(server_error(config, "looking it up")(e.to_string())),
    };
    let info = stream
        .info()
        .await
        .map_err(|e| server_error(config, "reading its state")(e.to_string()))?;
    let subjects = &info.config.subjects;
    if !subjects.iter().any(|s| subject_matches(s, &config.subject)) {
        return Err(StreamError::Subject {
            stream: config.name.clone(),
            subject: config.subject.clone(),
            subjects: subjects.join(", "),
        });
    }
    Ok(stream)
}

/// Opens the configured stream, creating it when missing with the settings docs/fanout.md
/// recommends (file storage, the configured replicas, max age and duplicate window, deletes
/// and purges denied).
pub async fn ensure_stream(
    js: &jetstream::Context,
    config: &StreamConfig,
) -> Result<stream::Stream, StreamError> {
    match open_stream(js, config).await {
        Err(StreamError::Missing { .. }) => {}
        other => return other,
    }
    let settings = stream::Config {
        name: config.name.clone(),
        subjects: vec![config.subject.clone()],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_age: Duration::from_secs(config.max_age_secs),
        duplicate_window: Duration::from_secs(config.duplicate_window_secs),
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    tracing::info!(
        stream = %config.name,
        subject = %config.subject,
        replicas = config.replicas,
        "creating the JetStream stream"
    );
    js.create_stream(settings)
        .await
        .map_err(|e| server_error(config, "creating it")(e.to_string()))
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Whether a stream subject (which may hold wildcards) takes a literal subject.
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for p in pattern.split('.') {
        match (p, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

/// The stream's last message on the configured subject: its sequence and what its headers say
/// (`None` for an empty subject).
pub async fn last_published(
    stream: &stream::Stream,
    config: &StreamConfig,
) -> Result<Option<(u64, chunk::ChunkHeaders)>, StreamError> {
    let message = match stream
        .get_last_raw_message_by_subject(&config.subject)
        .await
    {
        Ok(message) => message,
        Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => {
            return Ok(None);
        }
        Err(e) => {
            return Err(server_error(config, "reading its last message")(
                e.to_string(),
            ));
        }
    };
    let headers = chunk::ChunkHeaders::parse(|name| message.headers.get(name).map(|v| v.as_str()))
        .map_err(|source| StreamError::Chunk {
            stream: config.name.clone(),
            sequence: message.sequence,
            source,
        })?;
    Ok(Some((message.sequence, headers)))
}

/// Where a target stands in the stream, for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TargetPosition {
    pub stream: String,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub messages: u64,
    pub bytes: u64,
    /// The stream sequence the target's progress row records.
    pub applied_sequence: Option<u64>,
    /// Messages the stream holds past it.
    pub behind_messages: u64,
    /// Seconds since the next message the target needs was stored (0: it needs none).
    pub behind_seconds: f64,
    /// The share of the stream's retention (age or message count, whichever is tighter) left
    /// before the stream removes the next message the target needs: 1 when it needs none, 0
    /// when it is gone already.
    pub retention_headroom: f64,
}

/// The stream's state and a target's place in it (`applied`: its progress row's sequence).
pub async fn target_position(
    config: &StreamConfig,
    applied: Option<u64>,
) -> Result<TargetPosition, StreamError> {
    let js = connect(config).await?;
    let mut stream = open_stream(&js, config).await?;
    let info = stream
        .info()
        .await
        .map_err(|e| server_error(config, "reading its state")(e.to_string()))?
        .clone();
    let state = &info.state;
    let next = applied.map_or(state.first_sequence, |s| s + 1);
    let mut position = TargetPosition {
        stream: config.name.clone(),
        first_sequence: state.first_sequence,
        last_sequence: state.last_sequence,
        messages: state.messages,
        bytes: state.bytes,
        applied_sequence: applied,
        behind_messages: state.last_sequence.saturating_sub(next.saturating_sub(1)),
        behind_seconds: 0.0,
        retention_headroom: 1.0,
    };
    if state.messages == 0 || next > state.last_sequence {
        position.behind_messages = 0;
        return Ok(position);
    }
    if next < state.first_sequence {
        position.retention_headroom = 0.0;
        return Ok(position);
    }
    let mut headroom: f64 = 1.0;
    let max_messages = info.config.max_messages;
    if max_messages > 0 {
        let held = (state.last_sequence - next + 1) as f64;
        headroom = headroom.min(1.0 - held / max_messages as f64);
    }
    if let Ok(message) = stream.get_raw_message(next).await {
        let stored = message.time.unix_timestamp_nanos() as f64 / 1e9;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        position.behind_seconds = (now - stored).max(0.0);
        let max_age = info.config.max_age.as_secs_f64();
        if max_age > 0.0 {
            headroom = headroom.min(1.0 - position.behind_seconds / max_age);
        }
    }
    position.retention_headroom = headroom.clamp(0.0, 1.0);
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn stream_subjects_match_like_nats() {
        assert!(subject_matches("stagingprop.main", "stagingprop.main"));
        assert!(subject_matches("stagingprop.*", "stagingprop.main"));
        assert!(subject_matches("stagingprop.>", "stagingprop.a.b"));
        assert!(!subject_matches("stagingprop.*", "stagingprop.a.b"));
        assert!(!subject_matches("stagingprop.main", "stagingprop"));
        assert!(!subject_matches("other.>", "stagingprop.main"));
    }
}
