//! `stagingprop publish`: the only reader of staging's slot when several targets are fed
//! through a JetStream stream. A receiver (the spool's own, `receiver.rs`) writes staging's
//! stream to the spool and confirms to staging what is fsynced there; a publisher publishes the
//! spool to the stream in commit order. The spool is the outbox: a NATS outage stops
//! publishing, not receiving (up to the spool's `max_bytes`, past which staging keeps the WAL),
//! and a spool segment is removed only once the stream acknowledged all of it and `retain_secs`
//! passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::handover::{Downstream, SpoolShared};
use super::receiver::{both, receive_loop};
use super::retry::{Latch, pause_before_retry};
use super::{SyncError, SyncOptions};
use crate::config::{Config, SpoolConfig, StreamConfig};
use crate::model::Lsn;
use crate::spool::store::SpoolLock;
use crate::stream::publisher::{Published, Publisher};
use crate::stream::{self, StreamError};

/// What a publish run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublishSummary {
    /// The end of the last transaction the stream acknowledged.
    pub published: Lsn,
}

/// Runs the receiver and the publisher until `shutdown`; the first fatal error of either stops
/// the other.
pub async fn publish<S>(config: &Config, shutdown: S) -> Result<PublishSummary, SyncError>
where
    S: Future<Output = ()>,
{
    let stream_config = super::stream_config(config, "publish")?;
    let Some(spool) = &config.spool else {
        return Err(super::config_refused(
            "publish",
            "[spool]",
            "publish needs [spool] with dir = \"...\": the spool is the outbox in front of the stream",
        ));
    };
    let _lock = SpoolLock::acquire(&spool.dir)?;
    let shared = Arc::new(SpoolShared::new(spool.dir.clone(), Downstream::Stream));
    let options = SyncOptions::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    tokio::pin!(shutdown);
    // The receiver needs to know what the stream holds before it trusts a spool that lacks
    // what the slot released.
    let known = tokio::select! {
        known = stream_position(stream_config, &options, stopped(stop_rx.clone())) => known?,
        _ = &mut shutdown => None,
    };
    let Some(known) = known else {
        return Ok(PublishSummary::default());
    };
    shared.applied.send_replace(known.end);

    let receiver = tokio::spawn({
        let (config, spool, options) = (config.clone(), spool.clone(), options.clone());
        let (shared, stop) = (shared.clone(), stopped(stop_rx.clone()));
        async move { receive_loop(&config, &spool, &shared, &options, stop).await }
    });
    let publisher = tokio::spawn({
        let (config, spool, stream) = (config.clone(), spool.clone(), stream_config.clone());
        let (shared, stop) = (shared.clone(), stopped(stop_rx));
        async move { publish_loop(&config, &stream, &spool, &shared, stop).await }
    });
    both(receiver, publisher, stop_tx, shutdown).await?;
    Ok(PublishSummary {
        published: *shared.applied.borrow(),
    })
}

/// What the stream holds, retried until NATS answers (`None`: stopped first).
async fn stream_position<S>(
    config: &StreamConfig,
    options: &SyncOptions,
    stop: S,
) -> Result<Option<Published>, SyncError>
where
    S: Future<Output = ()>,
{
    let mut stop = Latch::new(stop);
    let mut stop = Pin::new(&mut stop);
    let mut attempt = 0;
    loop {
        let read = async {
            let js = stream::connect(config).await?;
            let opened = stream::ensure_stream(&js, config).await?;
            let last = stream::last_published(&opened, config).await?;
            Ok::<_, StreamError>(Published::after(last, 0))
        };
        match read.await {
            Ok(published) => return Ok(Some(published)),
            Err(e) if e.is_transient() => {
                let what = "nothing is published until NATS answers";
                if pause_before_retry(
                    e.into(),
                    &mut attempt,
                    options,
                    "publisher: ",
                    what,
                    stop.as_mut(),
                )
                .await?
                {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The publisher's retry loop: publishes the spool from where the stream ends.
async fn publish_loop<S>(
    config: &Config,
    stream_config: &StreamConfig,
    spool: &SpoolConfig,
    shared: &SpoolShared,
    stop: S,
) -> Result<(), SyncError>
where
    S: Future<Output = ()>,
{
    let options = SyncOptions::default();
    let mut stop = Latch::new(stop);
    let mut stop = Pin::new(&mut stop);
    let mut attempt: u32 = 0;
    // Message ids name staging: wait until the receiver has heard from it.
    let mut system_id = shared.system_id.subscribe();
    let system_id = tokio::select! {
        id = system_id.wait_for(Option::is_some) => match id {
            Ok(id) => id.clone().unwrap_or_default(),
            Err(_) => return Ok(()),
        },
        _ = stop.as_mut() => return Ok(()),
    };
    loop {
        let acked_before = *shared.applied.borrow();
        let session = async {
            let js = stream::connect(stream_config).await?;
            let publisher = Publisher {
                js: &js,
                config: stream_config,
                slot: &config.sync.slot,
                system_id: &system_id,
            };
            publisher
                .run(
                    &spool.dir,
                    shared.mark.subscribe(),
                    &shared.applied,
                    stop.as_mut(),
                )
                .await
        };
        let result = session.await;
        if *shared.applied.borrow() > acked_before {
            attempt = 0;
        }
        match result {
            Ok(()) => {
                tracing::info!(
                    published = %*shared.applied.borrow(),
                    "publisher stopping: the stream acknowledged everything up to here"
                );
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                let what = "nothing is lost: the spool keeps what the stream has not acknowledged";
                if pause_before_retry(
                    e.into(),
                    &mut attempt,
                    &options,
                    "publisher: ",
                    what,
                    stop.as_mut(),
                )
                .await?
                {
                    return Ok(());
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
