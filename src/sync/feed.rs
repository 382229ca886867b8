//! What the applier reads staging's transactions from: the slot, the spool a receiver of this
//! process writes, or a spool on disk being replayed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::SyncError;
use super::handover::SpoolShared;
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::pg::replication::ReplicationStream;
use crate::pgoutput::LogicalMessage;
use crate::spool::store::{SpoolMark, SpoolReader};
use crate::stream::reader::StreamReader;

/// One step of a test script: a message, staging sending nothing for this many polls, or
/// staging sending nothing for a while (tokio's clock; fixed at the first poll, so a poll that
/// is dropped does not restart it).
#[cfg(test)]
pub(super) enum Scripted {
    Message(Lsn, LogicalMessage),
    Idle(u8),
    Pause(std::time::Duration),
    PauseUntil(tokio::time::Instant),
}

pub(super) enum Feed {
    Slot(ReplicationStream),
    Spool {
        reader: SpoolReader,
        shared: Arc<SpoolShared>,
        /// The receiver's durable mark: nothing past it is read.
        mark: watch::Receiver<SpoolMark>,
    },
    Replay {
        reader: SpoolReader,
        /// The last complete transaction when the replay started: a transaction a running
        /// sync is still writing is not part of it.
        end: SpoolMark,
    },
    /// A JetStream stream `publish` writes (`sync --from-stream`).
    Stream(Box<StreamReader>),
    /// The pipeline's unit tests: recorded messages, then the end.
    #[cfg(test)]
    Script(std::collections::VecDeque<Scripted>),
}

impl Feed {
    /// The next message and its position. `None`: the stream ended (an error for the slot), or
    /// the replay is complete.
    pub(super) async fn next(&mut self) -> Result<Option<(Lsn, LogicalMessage)>, SyncError> {
        match self {
            Feed::Slot(stream) => Ok(stream.next().await?.map(|m| (m.wal_start, m.message))),
            Feed::Spool { reader, mark, .. } => loop {
                let limit = *mark.borrow_and_update();
                if let Some(message) = reader.next_message_within(Some(limit))? {
                    return Ok(Some(message));
                }
                // Cancel-safe: nothing was taken from the reader.
                if mark.changed().await.is_err() {
                    return Ok(None);
                }
            },
            Feed::Replay { reader, end } => Ok(reader.next_message_within(Some(*end))?),
            Feed::Stream(reader) => Ok(reader.next().await?),
            #[cfg(test)]
            Feed::Script(script) => loop {
                match script.front_mut() {
                    Some(Scripted::Idle(polls)) => {
                        *polls -= 1;
                        if *polls == 0 {
                            script.pop_front();
                        }
                        return std::future::pending().await;
                    }
                    Some(step @ Scripted::Pause(_)) => {
                        let Scripted::Pause(pause) = *step else {
                            unreachable!("matched above")
                        };
                        *step = Scripted::PauseUntil(tokio::time::Instant::now() + pause);
                    }
                    Some(Scripted::PauseUntil(until)) => {
                        tokio::time::sleep_until(*until).await;
                        script.pop_front();
                    }
                    _ => {
                        return Ok(script.pop_front().map(|item| match item {
                            Scripted::Message(lsn, message) => (lsn, message),
                            _ => unreachable!("handled above"),
                        }));
                    }
                }
            },
        }
    }

    /// The next message if it can be had without waiting; `None` otherwise (nothing is lost:
    /// [`Feed::next`] is cancel-safe).
    pub(super) async fn next_ready(
        &mut self,
    ) -> Option<Result<Option<(Lsn, LogicalMessage)>, SyncError>> {
        let mut next = std::pin::pin!(self.next());
        std::future::poll_fn(|cx| match next.as_mut().poll(cx) {
            std::task::Poll::Ready(result) => std::task::Poll::Ready(Some(result)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    /// Whether transactions arrive one by one as staging's walsender sends them, so that an
    /// open batch may linger for the next (`batch_linger_ms`). The spool and the stream hand
    /// them over in bursts, each as late as its fsync or publish made it: lateness there is
    /// their cadence, not a staging too busy for batches of one.
    pub(super) fn arrives_as_sent(&self) -> bool {
        match self {
            Feed::Slot(_) => true,
            #[cfg(test)]
            Feed::Script(_) => true,
            _ => false,
        }
    }

    /// Whether running out is the end of the work rather than a lost connection.
    pub(super) fn ends(&self) -> bool {
        match self {
            Feed::Replay { .. } => true,
            #[cfg(test)]
            Feed::Script(_) => true,
            _ => false,
        }
    }

    /// Staging's WAL end as last heard (for lag); invalid when replaying.
    pub(super) fn server_wal_end(&self) -> Lsn {
        match self {
            Feed::Slot(stream) => stream.server_wal_end(),
            Feed::Spool { shared, .. } => Lsn(shared.server_wal_end.load(Ordering::Relaxed)),
            Feed::Replay { .. } | Feed::Stream(_) => Lsn::INVALID,
            #[cfg(test)]
            Feed::Script(_) => Lsn::INVALID,
        }
    }

    /// Fed from a stream: the sequence of the message the last one handed out came from.
    pub(super) fn stream_sequence(&self) -> Option<u64> {
        match self {
            Feed::Stream(reader) => Some(reader.sequence()),
            _ => None,
        }
    }

    pub(super) fn describe(&self, staging: &Endpoint) -> String {
        match self {
            Feed::Slot(_) => format!("staging's stream from {}", staging.describe()),
            Feed::Spool { shared, .. } => {
                format!("the spool in {}", shared.dir.display())
            }
            Feed::Replay { .. } => "the spool".into(),
            Feed::Stream(_) => "the JetStream stream".into(),
            #[cfg(test)]
            Feed::Script(_) => "a recorded message sequence".into(),
        }
    }

    pub(super) async fn close(self) -> Result<(), SyncError> {
        match self {
            Feed::Slot(stream) => Ok(stream.close().await?),
            _ => Ok(()),
        }
    }
}
