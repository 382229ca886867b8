//! Streaming: the driver task that owns the socket (answers keepalives, sends standby status
//! updates, hands WAL messages over in chunks) and the consumer's [`ReplicationStream`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::{PgOutputOptions, ReplicationClient, ReplicationError};
use crate::model::{Lsn, PgTimestamp};
use crate::pg::ServerError;
use crate::pg::frames::{self, ServerCopyData, StandbyStatus};
use crate::pgoutput::{Decoder, LogicalMessage};

/// Hands a connection that START_REPLICATION just switched to streaming to a driver task.
pub(super) fn spawn(client: ReplicationClient, options: &PgOutputOptions) -> ReplicationStream {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let (flush_tx, flush_rx) = watch::channel(Lsn::INVALID);
    let shared = Arc::new(StreamShared {
        server_wal_end: AtomicU64::new(0),
        stop: Notify::new(),
    });
    let target = client.target.clone();
    let driver = Driver {
        client,
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
    ReplicationStream {
        events: events_rx,
        pending: Vec::new().into_iter(),
        decoder: Decoder::new(),
        flush: FlushHandle {
            tx: Arc::new(flush_tx),
        },
        shared,
        driver: Some(driver),
        target,
    }
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
    use crate::pg::connect::{Endpoint, TlsPolicy};

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
