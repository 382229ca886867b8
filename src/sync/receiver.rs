//! Sync with the spool on: a receiver writes staging's stream to the spool and tells staging
//! each position once it is fsynced there, whatever production is doing, while the applier
//! applies the spool to production. Each has its own retry loop, so an outage of production
//! does not stop staging's WAL from being released (up to `max_bytes`), and one of staging does
//! not stop production from catching up on what is spooled. (A receiver that starts with less
//! in the spool than the slot released needs production once, to learn that it has the rest.)
//!
//! When the spool grows past `max_bytes` with production behind, the receiver stops reading
//! (and confirming) ahead of production: staging keeps the WAL again instead of our disk
//! filling up.

use std::future::Future;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::handover::{Downstream, SpoolShared};
use super::heartbeat::emit_heartbeat;
use super::retry::{Latch, apply_loop, pause_before_retry};
use super::session::check_slot;
use super::{Feeding, SyncError, SyncOptions, SyncSummary, database_error};
use crate::apply::ApplyError;
use crate::config::{Config, SpoolConfig};
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::pg::replication::{
    DurablePosition, FlushHandle, PgOutputOptions, ReplicationClient, ReplicationError,
};
use crate::pgoutput::LogicalMessage;
use crate::spool::store::{SpoolLock, SpoolWriter};

/// The spool is made durable when a transaction ends and this long has passed since the last
/// time, or when the stream pauses this long: fsyncs at most this often, and an idle stream's
/// last transaction waits no longer than this to be applied.
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Buffered bytes written out (and fsynced) even inside a transaction: memory stays bounded.
const FLUSH_BYTES: usize = 4 << 20;

/// Messages received between two rounds of confirming and cleaning up during a backlog.
const HOUSEKEEPING_MESSAGES: u32 = 1024;

/// How often applied segments past retention (or over `max_bytes`) are removed.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the receiver and the applier until `shutdown` (or the applier reaching its stop),
/// then stops both; the first fatal error of either stops the other.
pub(super) async fn spooled<S>(
    config: &Config,
    spool: &SpoolConfig,
    options: &SyncOptions,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    let _lock = SpoolLock::acquire(&spool.dir)?;
    let shared = Arc::new(SpoolShared::new(spool.dir.clone(), Downstream::Production));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    // Two tasks, so that spooling and applying use two cores.
    let receiver = tokio::spawn({
        let (config, spool, options) = (config.clone(), spool.clone(), options.clone());
        let (shared, stop) = (shared.clone(), stopped(stop_rx.clone()));
        async move { receive_loop(&config, &spool, &shared, &options, stop).await }
    });
    let applier = tokio::spawn({
        let (config, options) = (config.clone(), options.clone());
        let (feeding, stop) = (Feeding::Spool(shared), stopped(stop_rx));
        async move { apply_loop(&config, &options, &feeding, stop).await }
    });
    both(receiver, applier, stop_tx, shutdown).await
}

/// Waits for two tasks that stop together: `shutdown` or the end of either tells both to stop
/// (through `stop`); the first error wins, else the second task's result.
pub(super) async fn both<T, S>(
    first: tokio::task::JoinHandle<Result<(), SyncError>>,
    second: tokio::task::JoinHandle<Result<T, SyncError>>,
    stop: watch::Sender<bool>,
    shutdown: S,
) -> Result<T, SyncError>
where
    S: Future<Output = ()>,
{
    tokio::pin!(first, second, shutdown);
    let (mut first_ended, mut second_ended) = (None, None);
    while first_ended.is_none() || second_ended.is_none() {
        tokio::select! {
            _ = &mut shutdown, if !*stop.borrow() => {
                stop.send_replace(true);
            }
            r = &mut first, if first_ended.is_none() => {
                first_ended = Some(joined(r));
                stop.send_replace(true);
            }
            r = &mut second, if second_ended.is_none() => {
                second_ended = Some(joined(r));
                stop.send_replace(true);
            }
        }
    }
    match (first_ended, second_ended) {
        (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
        (_, Some(Ok(value))) => Ok(value),
        _ => unreachable!("the loop ends when both ended"),
    }
}

/// A task's result; a panic in it goes on in the caller.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The receiver's retry loop.
pub(super) async fn receive_loop<S>(
    config: &Config,
    spool: &SpoolConfig,
    shared: &SpoolShared,
    options: &SyncOptions,
    stop: S,
) -> Result<(), SyncError>
where
    S: Future<Output = ()>,
{
    let mut stop = Latch::new(stop);
    let mut stop = Pin::new(&mut stop);
    let mut attempt: u32 = 0;
    // Known from the start, so that alerts on them have a series before anything happens.
    metrics::gauge!("stagingprop_spool_full").set(0.0);
    metrics::gauge!("stagingprop_spool_max_bytes").set(spool.max_bytes as f64);
    loop {
        // Opened afresh after a failure: it cuts a transaction received only in part, which
        // staging sends again (the applier never saw it: it reads up to the durable mark).
        let (mut writer, recovered) =
            blocking(|| SpoolWriter::open(&spool.dir, spool.segment_bytes))?;
        if recovered.cut_bytes > 0 {
            tracing::warn!(
                cut_bytes = recovered.cut_bytes,
                "the spool ended inside a record or a transaction (a crash while writing): cut \
                 back to the last complete transaction; staging sends the rest again"
            );
        }
        shared.mark.send_replace(writer.durable_mark());
        let mut received = false;
        let result = receive(
            config,
            spool,
            &mut writer,
            shared,
            stop.as_mut(),
            &mut received,
        )
        .await;
        if received {
            attempt = 0;
        }
        match result {
            Ok(Received::Stopped) => return Ok(()),
            Ok(Received::Full) => {
                // Over the limit with production behind: no stream until there is room, so
                // staging keeps the WAL (an open stream left unread would also keep staging
                // from shutting down).
                metrics::gauge!("stagingprop_spool_full").set(1.0);
                tracing::warn!(
                    bytes = writer.bytes(),
                    max_bytes = spool.max_bytes,
                    applied = %*shared.applied.borrow(),
                    spooled = %writer.durable_end(),
                    "the spool is full (over spool.max_bytes) while production is behind it: \
                     not reading staging's stream until production catches up, so staging \
                     keeps WAL from here on; nothing is lost"
                );
                if wait_for_room(&mut writer, spool, shared, stop.as_mut()).await? {
                    return Ok(());
                }
                metrics::gauge!("stagingprop_spool_full").set(0.0);
                tracing::info!(
                    bytes = writer.bytes(),
                    "the spool has room again: reading staging's stream"
                );
            }
            Err(e) if e.is_transient() => {
                let what = "nothing is lost: staging keeps what the spool has not confirmed";
                if pause_before_retry(
                    e,
                    &mut attempt,
                    options,
                    "spool receiver: ",
                    what,
                    stop.as_mut(),
                )
                .await?
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Production's progress, asked when the spool lacks part of what the slot released: only
/// production can say whether it has it.
async fn production_progress(config: &Config) -> Result<Option<Lsn>, SyncError> {
    let production = Endpoint::from_db_config(&config.production)?;
    let p = production
        .connect()
        .await
        .map_err(database_error(&production, "connect"))?;
    // No progress table yet (the applier creates it): production has nothing.
    match crate::state::progress::read(&p, &config.sync.slot).await {
        Ok(progress) => Ok(progress.map(|p| p.end_lsn)),
        Err(e) if e.sqlstate() == Some("42P01") => Ok(None),
        Err(e) => Err(ApplyError::from(e).into()),
    }
}

/// One receiving session: staging's stream into the spool until stopped or failed.
async fn receive<S>(
    config: &Config,
    spool: &SpoolConfig,
    writer: &mut SpoolWriter,
    shared: &SpoolShared,
    mut stop: Pin<&mut S>,
    received: &mut bool,
) -> Result<Received, SyncError>
where
    S: Future<Output = ()>,
{
    let staging = Endpoint::from_db_config(&config.staging)?;
    let s = staging
        .connect()
        .await
        .map_err(database_error(&staging, "connect"))?;
    let slot = &config.sync.slot;
    let confirmed = check_slot(config, &staging, &s).await?;
    let spooled = writer.durable_end();
    if confirmed > spooled {
        // The slot released more than the spool holds: fine only if production (or the
        // stream) has it (the spool is new, or was emptied).
        let downstream = match shared.downstream {
            Downstream::Production => production_progress(config).await?,
            Downstream::Stream => Some(*shared.applied.borrow()),
        };
        match downstream {
            Some(applied) if applied.is_valid() && applied < confirmed => {
                return Err(SyncError::Slot(format!(
                    "the spool in {} ends at {spooled} and {} has up to {applied}, \
                     but the slot {slot} already released everything up to {confirmed}: the \
                     transactions in between are lost (was the spool deleted?). Re-seed \
                     production with `stagingprop copy`",
                    spool.dir.display(),
                    match shared.downstream {
                        Downstream::Production => "production",
                        Downstream::Stream => "the stream",
                    }
                )));
            }
            _ => writer.resume_from(confirmed),
        }
    }
    let mut replication = ReplicationClient::connect(&staging).await?;
    let identity = replication.identify_system().await?;
    shared.system_id.send_replace(Some(identity.system_id));
    let mut pgoutput = PgOutputOptions::new(vec![config.sync.publication.clone()]);
    pgoutput.status_interval = Duration::from_secs(config.sync.status_interval_secs);
    pgoutput.receive_timeout = Duration::from_secs(config.sync.receive_timeout_secs);
    let mut stream = replication.start_logical(slot, spooled, &pgoutput).await?;
    let flush = stream.flush_handle();
    tracing::info!(
        slot = %slot,
        from = %spooled.max(confirmed),
        bytes = writer.bytes(),
        "spooling {} into {}",
        staging.describe(),
        spool.dir.display()
    );

    let heartbeat = Duration::from_secs(config.sync.heartbeat_interval_secs);
    let retain = Duration::from_secs(spool.retain_secs);
    let mut applied_rx = shared.applied.subscribe();
    let mut skip = false;
    let mut last_flush = Instant::now();
    let mut last_activity = Instant::now();
    let mut last_cleanup: Option<Instant> = None;
    // Confirming, cleaning up and the full check run after a flush, when the stream pauses,
    // and every HOUSEKEEPING_MESSAGES messages: not for every message of a large backlog.
    let mut due = true;
    let mut messages = 0u32;
    let result: Result<Received, SyncError> = loop {
        if due || messages >= HOUSEKEEPING_MESSAGES {
            (due, messages) = (false, 0);
            shared
                .server_wal_end
                .store(stream.server_wal_end().0, Ordering::Relaxed);
            let applied = *applied_rx.borrow_and_update();
            if last_cleanup.is_none_or(|t| t.elapsed() >= CLEANUP_INTERVAL) && applied.is_valid() {
                last_cleanup = Some(Instant::now());
                let removed = blocking(|| writer.remove_applied(applied, retain, spool.max_bytes))?;
                if removed > 0 {
                    tracing::debug!(removed, "removed applied spool segments");
                }
            }
            metrics::gauge!("stagingprop_spool_bytes").set(writer.bytes() as f64);
            let over = writer.bytes() > spool.max_bytes;
            confirm(&flush, writer, over, applied);
            if spool_full(writer, spool, applied) {
                break Ok(Received::Full);
            }
        }
        let wait = if writer.unflushed() {
            FLUSH_INTERVAL.saturating_sub(last_flush.elapsed())
        } else {
            heartbeat.saturating_sub(last_activity.elapsed())
        };
        let next = tokio::select! {
            next = tokio::time::timeout(wait, stream.next()) => next,
            _ = stop.as_mut() => break Ok(Received::Stopped),
        };
        match next {
            Err(_) => {
                due = true;
                if writer.unflushed() {
                    flush_durably(writer, shared, &mut last_flush)?;
                } else if last_activity.elapsed() >= heartbeat {
                    // Idle: a transaction to spool and confirm, so the slot advances.
                    if let Err(e) = emit_heartbeat(&staging, &s).await {
                        tracing::warn!("cannot emit a heartbeat on staging: {e}");
                    }
                    last_activity = Instant::now();
                }
            }
            Ok(Err(e)) => break Err(e.into()),
            Ok(Ok(None)) => {
                break Err(SyncError::Replication(ReplicationError::Closed {
                    target: "staging".into(),
                }));
            }
            Ok(Ok(Some(m))) => {
                messages += 1;
                if let LogicalMessage::Begin { final_lsn, .. } = &m.message {
                    // Already spooled by an earlier session (confirmed or not).
                    skip = spooled.is_valid() && *final_lsn < writer.durable_end();
                }
                let relation = matches!(m.message, LogicalMessage::Relation { .. });
                if !skip || relation {
                    writer.append(m.wal_start, &m.message)?;
                }
                if let LogicalMessage::Commit { .. } = m.message {
                    *received = true;
                    skip = false;
                    // Idleness is measured from the last transaction.
                    last_activity = Instant::now();
                    if last_activity.duration_since(last_flush) >= FLUSH_INTERVAL {
                        flush_durably(writer, shared, &mut last_flush)?;
                        due = true;
                    }
                } else if writer.buffered_bytes() >= FLUSH_BYTES {
                    flush_durably(writer, shared, &mut last_flush)?;
                    due = true;
                }
            }
        }
    };
    if let Ok(received) = &result {
        flush_durably(writer, shared, &mut last_flush)?;
        let applied = *shared.applied.borrow();
        confirm(&flush, writer, writer.bytes() > spool.max_bytes, applied);
        if let Received::Stopped = received {
            tracing::info!(
                spooled = %writer.durable_end(),
                confirmed = %flush.confirmed(),
                "spool receiver stopping: staging was told what it may release"
            );
        }
    }
    let closed = stream.close().await;
    let received = result?;
    closed?;
    Ok(received)
}

/// How a receiving session ended without an error.
enum Received {
    Stopped,
    /// The spool is over `max_bytes` with production behind it.
    Full,
}

fn spool_full(writer: &SpoolWriter, spool: &SpoolConfig, applied: Lsn) -> bool {
    writer.bytes() > spool.max_bytes && applied < writer.durable_end()
}

/// Waits until production applied enough for applied segments to go and the spool to be under
/// `max_bytes` again (or production caught up). Returns whether a stop came first.
async fn wait_for_room<S>(
    writer: &mut SpoolWriter,
    spool: &SpoolConfig,
    shared: &SpoolShared,
    mut stop: Pin<&mut S>,
) -> Result<bool, SyncError>
where
    S: Future<Output = ()>,
{
    let retain = Duration::from_secs(spool.retain_secs);
    let mut applied_rx = shared.applied.subscribe();
    loop {
        let applied = *applied_rx.borrow_and_update();
        if applied.is_valid() {
            blocking(|| writer.remove_applied(applied, retain, spool.max_bytes))?;
        }
        metrics::gauge!("stagingprop_spool_bytes").set(writer.bytes() as f64);
        if !spool_full(writer, spool, applied) {
            return Ok(false);
        }
        tokio::select! {
            _ = applied_rx.changed() => {}
            _ = tokio::time::sleep(CLEANUP_INTERVAL) => {}
            _ = stop.as_mut() => return Ok(true),
        }
    }
}

/// Runs file-system work that may wait on the disk (fsync, reading a whole segment) without
/// holding up the runtime's other tasks (the replication stream, the applier), where the
/// runtime allows it.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Writes and fsyncs what was received, and lets the applier read it.
fn flush_durably(
    writer: &mut SpoolWriter,
    shared: &SpoolShared,
    last_flush: &mut Instant,
) -> Result<(), SyncError> {
    blocking(|| writer.flush())?;
    // Wake the applier only when there is more to read (not for a part of a transaction).
    let mark = writer.durable_mark();
    shared.mark.send_if_modified(|current| {
        let moved = *current != mark;
        *current = mark;
        moved
    });
    *last_flush = Instant::now();
    Ok(())
}

/// Tells staging what it may release: what the spool holds durably, or, when the spool is over
/// its limit, no more than production applied.
fn confirm(flush: &FlushHandle, writer: &SpoolWriter, over_limit: bool, applied: Lsn) {
    let spooled = writer.durable_end();
    let position = if over_limit {
        spooled.min(applied)
    } else {
        spooled
    };
    if position.is_valid() {
        flush.confirm(DurablePosition::after_spool_fsync(position));
    }
}
