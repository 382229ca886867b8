//! A target's way through the stream: a durable pull consumer (named in the config, so an
//! operator sees each target's position in NATS's own tools) positioned right after the
//! sequence the target's progress row records, its chunks turned back into staging's messages.
//! The progress row is the truth; the consumer is re-made there at every start and acknowledges
//! nothing. A transaction that does not follow what the target has (retention removed some,
//! or the stream was recreated) is a gap error, never skipped.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

use super::chunk::{self, ChunkHeaders};
use super::{StreamError, open_stream, server_error};
use crate::config::StreamConfig;
use crate::model::Lsn;
use crate::pgoutput::LogicalMessage;

/// How often the server tells an idle consumer it is still there.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long opening the consumer may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The transaction being read: its commit LSN and the chunk expected next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Reading {
    commit_lsn: Lsn,
    next_index: u32,
}

/// The order checks of the chunks a target reads (sans-IO).
#[derive(Debug)]
pub struct ChunkOrder {
    /// Everything committed up to here was read or is on the target.
    covered: Lsn,
    reading: Option<Reading>,
    /// Chunks of a transaction whose start lies before where reading began: skipped, since
    /// the target has it (else it is a gap).
    skipping: Option<Lsn>,
}

/// What to do with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Apply,
    /// The rest of a transaction the target already has.
    Skip,
}

/// A chunk out of order: where it breaks the chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Broken {
    pub covered: Lsn,
    pub previous_end: Lsn,
}

impl ChunkOrder {
    /// Checks starting after `covered` (what the target has; invalid: nothing yet, so the
    /// first transaction read starts the chain).
    pub fn new(covered: Lsn) -> ChunkOrder {
        ChunkOrder {
            covered,
            reading: None,
            skipping: None,
        }
    }

    pub fn take(&mut self, h: &ChunkHeaders) -> Result<Verdict, Broken> {
        let broken = Broken {
            covered: self.covered,
            previous_end: h.previous_end,
        };
        if self.skipping == Some(h.commit_lsn) {
            if h.last {
                self.skipping = None;
                self.covered = self.covered.max(h.end_lsn);
            }
            return Ok(Verdict::Skip);
        }
        match self.reading {
            Some(r) if r.commit_lsn == h.commit_lsn && r.next_index == h.index => {}
            Some(_) => return Err(broken),
            None if h.index == 0 => {
                if self.covered.is_valid() && h.previous_end > self.covered {
                    return Err(broken);
                }
            }
            None => {
                // The middle of a transaction: fine only if the target already has it.
                if self.covered.is_valid() && h.commit_lsn < self.covered {
                    self.skipping = (!h.last).then_some(h.commit_lsn);
                    return Ok(Verdict::Skip);
                }
                return Err(broken);
            }
        }
        if h.last {
            self.reading = None;
            self.covered = self.covered.max(h.end_lsn);
        } else {
            self.reading = Some(Reading {
                commit_lsn: h.commit_lsn,
                next_index: h.index + 1,
            });
        }
        Ok(Verdict::Apply)
    }
}

pub struct StreamReader {
    config: StreamConfig,
    messages: consumer::pull::Stream,
    order: ChunkOrder,
    /// Messages of the chunk read last, not yet handed out.
    buffered: VecDeque<(Lsn, LogicalMessage)>,
    /// The stream sequence of the chunk the buffered messages come from.
    buffered_sequence: u64,
    /// The stream sequence of the chunk the message handed out last came from.
    sequence: u64,
}

impl StreamReader {
    /// Opens the stream at the first message after `after_sequence` (the target's progress;
    /// `None`: the stream's first message), for a target that has staging's transactions up to
    /// `covered`.
    pub async fn open(
        js: &jetstream::Context,
        config: &StreamConfig,
        after_sequence: Option<u64>,
        covered: Lsn,
    ) -> Result<StreamReader, StreamError> {
        // A cluster that lost its leader may not answer at all: a retry, not a hang.
        tokio::time::timeout(
            OPEN_TIMEOUT,
            Self::open_now(js, config, after_sequence, covered),
        )
        .await
        .unwrap_or_else(|_| {
            Err(server_error(config, "opening this target's consumer")(
                format!("no answer within {} s", OPEN_TIMEOUT.as_secs()),
            ))
        })
    }

    async fn open_now(
        js: &jetstream::Context,
        config: &StreamConfig,
        after_sequence: Option<u64>,
        covered: Lsn,
    ) -> Result<StreamReader, StreamError> {
        let stream = open_stream(js, config).await?;
        let deliver_policy = match after_sequence {
            Some(sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
            None => consumer::DeliverPolicy::All,
        };
        // The consumer starts where the target's progress says: one left by an earlier run
        // may point elsewhere.
        match stream.delete_consumer(&config.consumer).await {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::ConsumerErrorKind::JetStream(ref js)
                        if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
                ) => {}
            Err(e) => {
                return Err(server_error(config, "replacing this target's consumer")(
                    e.to_string(),
                ));
            }
        }
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                description: Some("stagingprop sync --from-stream (position only)".into()),
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                filter_subject: config.subject.clone(),
                // Its state is only a position for monitoring: one replica, so a target keeps
                // reading while a server of a replicated stream is down.
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| server_error(config, "creating this target's consumer")(e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(HEARTBEAT)
            .messages()
            .await
            .map_err(|e| server_error(config, "reading")(e.to_string()))?;
        Ok(StreamReader {
            config: config.clone(),
            messages,
            order: ChunkOrder::new(covered),
            buffered: VecDeque::new(),
            buffered_sequence: after_sequence.unwrap_or(0),
            sequence: after_sequence.unwrap_or(0),
        })
    }

    /// The next staging message and its position. Cancel-safe: a chunk is taken whole between
    /// two awaits.
    pub async fn next(&mut self) -> Result<Option<(Lsn, LogicalMessage)>, StreamError> {
        loop {
            if let Some(message) = self.buffered.pop_front() {
                self.sequence = self.buffered_sequence;
                return Ok(Some(message));
            }
            let Some(received) = self.messages.next().await else {
                return Ok(None);
            };
            let received =
                received.map_err(|e| server_error(&self.config, "reading")(e.to_string()))?;
            let info = received.info().map_err(|e| {
                server_error(&self.config, "reading a message's metadata")(e.to_string())
            })?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let chunk_error = |source| StreamError::Chunk {
                stream: self.config.name.clone(),
                sequence,
                source,
            };
            let headers = received.message.headers.as_ref();
            let h =
                ChunkHeaders::parse(|name| headers.and_then(|h| h.get(name)).map(|v| v.as_str()))
                    .map_err(chunk_error)?;
            match self.order.take(&h) {
                Ok(Verdict::Skip) => {}
                Ok(Verdict::Apply) => {
                    self.buffered = chunk::decode(&received.message.payload)
                        .map_err(chunk_error)?
                        .into();
                }
                Err(broken) => {
                    return Err(StreamError::Gap {
                        stream: self.config.name.clone(),
                        covered: broken.covered,
                        previous_end: broken.previous_end,
                        sequence,
                    });
                }
            }
            self.buffered_sequence = sequence;
            metrics::gauge!("stagingprop_stream_pending_messages").set(pending as f64);
            if self.buffered.is_empty() {
                // A skipped chunk still moves the position.
                self.sequence = sequence;
            }
        }
    }

    /// The stream sequence of the chunk the last message handed out came from.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(commit: u64, previous_end: u64, index: u32, last: bool) -> ChunkHeaders {
        ChunkHeaders {
            commit_lsn: Lsn(commit),
            previous_end: Lsn(previous_end),
            index,
            last,
            end_lsn: if last { Lsn(commit + 8) } else { Lsn::INVALID },
        }
    }

    #[test]
    fn chunks_that_follow_each_other_are_applied() {
        let mut order = ChunkOrder::new(Lsn(100));
        assert_eq!(order.take(&chunk(150, 100, 0, false)), Ok(Verdict::Apply));
        assert_eq!(order.take(&chunk(150, 100, 1, true)), Ok(Verdict::Apply));
        assert_eq!(order.take(&chunk(200, 158, 0, true)), Ok(Verdict::Apply));
    }

    #[test]
    fn a_transaction_after_a_hole_is_a_gap() {
        let mut order = ChunkOrder::new(Lsn(100));
        assert_eq!(
            order.take(&chunk(300, 250, 0, true)),
            Err(Broken {
                covered: Lsn(100),
                previous_end: Lsn(250)
            })
        );
    }

    #[test]
    fn a_missing_or_repeated_chunk_is_a_gap() {
        let mut order = ChunkOrder::new(Lsn(100));
        order.take(&chunk(150, 100, 0, false)).unwrap();
        assert!(order.take(&chunk(150, 100, 2, true)).is_err());
        let mut order = ChunkOrder::new(Lsn(100));
        order.take(&chunk(150, 100, 0, false)).unwrap();
        assert!(order.take(&chunk(150, 100, 0, false)).is_err());
        let mut order = ChunkOrder::new(Lsn(100));
        order.take(&chunk(150, 100, 0, false)).unwrap();
        assert!(order.take(&chunk(200, 158, 0, true)).is_err());
    }

    #[test]
    fn the_rest_of_a_transaction_the_target_has_is_skipped_and_one_it_lacks_is_a_gap() {
        // A copy's hand-off at 500: the stream starts in the middle of a transaction at 400.
        let mut order = ChunkOrder::new(Lsn(500));
        assert_eq!(order.take(&chunk(400, 300, 3, false)), Ok(Verdict::Skip));
        assert_eq!(order.take(&chunk(400, 300, 4, true)), Ok(Verdict::Skip));
        assert_eq!(order.take(&chunk(600, 408, 0, true)), Ok(Verdict::Apply));
        let mut order = ChunkOrder::new(Lsn(500));
        assert!(order.take(&chunk(700, 650, 2, true)).is_err());
    }

    #[test]
    fn a_target_with_nothing_starts_at_the_first_whole_transaction() {
        let mut order = ChunkOrder::new(Lsn::INVALID);
        assert!(order.take(&chunk(400, 300, 1, true)).is_err());
        let mut order = ChunkOrder::new(Lsn::INVALID);
        assert_eq!(order.take(&chunk(400, 300, 0, true)), Ok(Verdict::Apply));
    }
}
