//! Publishing the spool to the stream: one session reads the spool from where the stream ends,
//! cuts each transaction into chunks and publishes them in order, without waiting for each
//! acknowledgement (at most `max_in_flight` outstanding). Every message carries its
//! deterministic id and the stream sequence it must follow, so a retry, a restart or a second
//! publisher is refused by the server instead of duplicating or reordering anything. A
//! transaction counts as published when the server acknowledged its last chunk.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;

use super::chunk::{Chunk, ChunkHeaders, Chunker};
use super::{StreamError, ensure_stream, last_published, server_error};
use crate::config::StreamConfig;
use crate::model::Lsn;
use crate::spool::store::{SpoolError, SpoolMark, SpoolReader};

/// How long a stopping publisher waits for the acknowledgements of what it sent.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Where the stream ends, and so where publishing resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Published {
    /// The stream's last sequence (0: empty).
    pub sequence: u64,
    /// The end of the last transaction published whole.
    pub end: Lsn,
    /// A transaction published in part (a publisher stopped between its chunks): its commit
    /// LSN and the index of its last chunk in the stream.
    pub partial: Option<(Lsn, u32)>,
    /// What the spool must be read from to continue.
    pub read_from: Lsn,
}

impl Published {
    /// From the stream's last message on the subject (`None`: nothing published yet).
    pub fn after(last: Option<(u64, ChunkHeaders)>, stream_last_sequence: u64) -> Published {
        match last {
            None => Published {
                sequence: stream_last_sequence,
                ..Published::default()
            },
            Some((_, h)) if h.last => Published {
                sequence: stream_last_sequence,
                end: h.end_lsn,
                partial: None,
                read_from: h.end_lsn,
            },
            Some((_, h)) => Published {
                sequence: stream_last_sequence,
                end: h.previous_end,
                partial: Some((h.commit_lsn, h.index)),
                read_from: h.previous_end,
            },
        }
    }

    /// Whether the stream already holds this chunk.
    pub fn holds(&self, chunk: &ChunkHeaders) -> bool {
        if self.end.is_valid() && chunk.commit_lsn < self.end {
            return true;
        }
        self.partial
            .is_some_and(|(commit, index)| chunk.commit_lsn == commit && chunk.index <= index)
    }
}

/// A message waiting for its acknowledgement.
struct Pending {
    /// The stream sequence it must get.
    sequence: u64,
    /// The end of its transaction when it is the last chunk.
    end: Option<Lsn>,
    bytes: usize,
}

type Acked = (Result<jetstream::publish::PublishAck, StreamError>, Pending);

pub struct Publisher<'a> {
    pub js: &'a jetstream::Context,
    pub config: &'a StreamConfig,
    pub slot: &'a str,
    pub system_id: &'a str,
}

impl Publisher<'_> {
    /// Publishes the spool in `dir` (no further than its durable `mark`) until `stop`, an
    /// error, or the end of the spool when `mark` closes. `acked` learns the end of each
    /// transaction the server acknowledged whole.
    pub async fn run<S>(
        &self,
        dir: &Path,
        mut mark: watch::Receiver<SpoolMark>,
        acked: &watch::Sender<Lsn>,
        mut stop: Pin<&mut S>,
    ) -> Result<(), StreamError>
    where
        S: Future<Output = ()>,
    {
        let mut stream = ensure_stream(self.js, self.config).await?;
        let last = last_published(&stream, self.config).await?;
        let info = stream
            .info()
            .await
            .map_err(|e| server_error(self.config, "reading its state")(e.to_string()))?;
        let published = Published::after(last, info.state.last_sequence);
        raise(acked, published.end);
        tracing::info!(
            stream = %self.config.name,
            sequence = published.sequence,
            published = %published.end,
            partial = ?published.partial,
            "publishing the spool to the stream from where it ends"
        );
        let mut reader = SpoolReader::open(dir, published.read_from).map_err(spool_error)?;
        let mut chunker = Chunker::new(self.config.chunk_bytes);
        let mut sequence = published.sequence;
        let mut inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Acked> + Send>>> =
            FuturesOrdered::new();
        loop {
            while let Some(Some(done)) = inflight.next().now_or_never() {
                self.acked(done, acked)?;
            }
            let limit = *mark.borrow_and_update();
            let next = reader
                .next_message_within(Some(limit))
                .map_err(spool_error)?;
            let Some((lsn, message)) = next else {
                let stopped = if inflight.is_empty() {
                    tokio::select! {
                        changed = mark.changed() => changed.is_err(),
                        _ = stop.as_mut() => true,
                    }
                } else {
                    tokio::select! {
                        Some(done) = inflight.next() => { self.acked(done, acked)?; false }
                        _ = mark.changed() => false,
                        _ = stop.as_mut() => true,
                    }
                };
                if stopped {
                    return self.drain(inflight, acked).await;
                }
                continue;
            };
            let chunks = chunker
                .push(lsn, &message, reader.previous_end())
                .map_err(|source| StreamError::Chunk {
                    stream: self.config.name.clone(),
                    sequence: sequence + 1,
                    source,
                })?;
            for chunk in chunks {
                if published.holds(&chunk.headers) {
                    continue;
                }
                while inflight.len() >= self.config.max_in_flight {
                    if let Some(done) = inflight.next().await {
                        self.acked(done, acked)?;
                    }
                }
                inflight.push_back(self.send(chunk, sequence).await?);
                sequence += 1;
            }
        }
    }

    /// Sends one chunk, which must become stream sequence `after + 1`.
    async fn send(
        &self,
        chunk: Chunk,
        after: u64,
    ) -> Result<Pin<Box<dyn Future<Output = Acked> + Send>>, StreamError> {
        let bytes = chunk.payload.len();
        let mut message = PublishMessage::build()
            .payload(chunk.payload)
            .message_id(chunk.headers.message_id(self.system_id, self.slot))
            .expected_last_sequence(after);
        for (name, value) in chunk.headers.pairs() {
            message = message.header(name, value.as_str());
        }
        let pending = Pending {
            sequence: after + 1,
            end: chunk.headers.last.then_some(chunk.headers.end_lsn),
            bytes,
        };
        let ack = self
            .js
            .send_publish(self.config.subject.clone(), message)
            .await
            .map_err(|e| self.publish_error(e))?;
        let stream = self.config.name.clone();
        Ok(Box::pin(async move {
            let result = ack.await.map_err(|e| match e.kind() {
                PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId => {
                    StreamError::OutOfOrder {
                        stream,
                        message: e.to_string(),
                    }
                }
                _ => StreamError::Server {
                    stream,
                    what: "waiting for a publish acknowledgement".into(),
                    message: e.to_string(),
                },
            });
            (result, pending)
        }))
    }

    fn publish_error(&self, e: jetstream::context::PublishError) -> StreamError {
        if matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded) {
            return StreamError::TooLarge(self.config.chunk_bytes);
        }
        server_error(self.config, "publishing")(e.to_string())
    }

    /// Takes an acknowledgement: the message must have become the sequence it was sent for.
    fn acked(
        &self,
        (result, pending): Acked,
        acked: &watch::Sender<Lsn>,
    ) -> Result<(), StreamError> {
        let ack = result?;
        if ack.duplicate || ack.sequence != pending.sequence {
            return Err(StreamError::OutOfOrder {
                stream: self.config.name.clone(),
                message: format!(
                    "expected sequence {}, the server answered {}{}",
                    pending.sequence,
                    ack.sequence,
                    if ack.duplicate { " (a duplicate)" } else { "" }
                ),
            });
        }
        metrics::counter!("stagingprop_stream_published_messages_total").increment(1);
        metrics::counter!("stagingprop_stream_published_bytes_total")
            .increment(pending.bytes as u64);
        metrics::gauge!("stagingprop_stream_last_sequence").set(ack.sequence as f64);
        if let Some(end) = pending.end {
            raise(acked, end);
        }
        Ok(())
    }

    /// Waits (a while) for the acknowledgements of what was sent before stopping.
    async fn drain(
        &self,
        mut inflight: FuturesOrdered<Pin<Box<dyn Future<Output = Acked> + Send>>>,
        acked: &watch::Sender<Lsn>,
    ) -> Result<(), StreamError> {
        let waiting = async {
            while let Some(done) = inflight.next().await {
                self.acked(done, acked)?;
            }
            Ok(())
        };
        match tokio::time::timeout(STOP_WAIT, waiting).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    "stopping without every acknowledgement: the next start reads what the stream holds"
                );
                Ok(())
            }
        }
    }
}

/// Moves what the stream acknowledged forward (never back), waking whoever waits on it.
fn raise(acked: &watch::Sender<Lsn>, end: Lsn) {
    acked.send_if_modified(|a| {
        let newer = end > *a;
        *a = (*a).max(end);
        newer
    });
}

fn spool_error(e: SpoolError) -> StreamError {
    StreamError::Spool(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(commit: u64, index: u32, last: bool) -> ChunkHeaders {
        ChunkHeaders {
            commit_lsn: Lsn(commit),
            previous_end: Lsn(commit - 50),
            index,
            last,
            end_lsn: if last { Lsn(commit + 8) } else { Lsn::INVALID },
        }
    }

    #[test]
    fn publishing_resumes_after_the_last_whole_transaction() {
        let p = Published::after(Some((7, headers(1000, 2, true))), 7);
        assert_eq!(p.read_from, Lsn(1008));
        assert!(p.holds(&headers(1000, 0, false)));
        assert!(p.holds(&headers(900, 0, true)));
        assert!(!p.holds(&headers(2000, 0, false)));
    }

    #[test]
    fn a_transaction_published_in_part_is_completed_from_its_next_chunk() {
        let p = Published::after(Some((9, headers(1000, 1, false))), 9);
        assert_eq!(p.read_from, Lsn(950));
        assert_eq!(p.end, Lsn(950));
        assert!(p.holds(&headers(1000, 0, false)));
        assert!(p.holds(&headers(1000, 1, false)));
        assert!(!p.holds(&headers(1000, 2, true)));
        assert!(!p.holds(&headers(2000, 0, true)));
    }

    #[test]
    fn an_empty_stream_holds_nothing() {
        let p = Published::after(None, 0);
        assert_eq!(p.read_from, Lsn::INVALID);
        assert!(!p.holds(&headers(1000, 0, true)));
    }
}
