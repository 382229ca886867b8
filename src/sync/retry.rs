//! Sync's retry loop: one session after another until stopped, with backoff on transient
//! failures, and the one-change-at-a-time replay of a stretch whose set-based apply tripped a
//! constraint.

use std::future::Future;
use std::time::Duration;

use super::report::ChangeCounts;
use super::run_state::{RunState, SessionEnd};
use super::session::session;
use super::{Feeding, StopAt, SyncError, SyncOptions, SyncSummary};
use crate::apply;
use crate::config::Config;
use crate::model::Lsn;

/// The applier's retry loop: sessions until stopped, with backoff on transient failures.
pub(super) async fn apply_loop<S>(
    config: &Config,
    options: &SyncOptions,
    feeding: &Feeding,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    // Latched: a session that fails while stopping (production down during the last commit)
    // leads back here, and the backoff must see the request again rather than poll a future
    // that already completed.
    let mut shutdown = Latch::new(shutdown);
    let mut shutdown = std::pin::Pin::new(&mut shutdown);
    let mut state = RunState {
        stats: apply::ApplyStats::default(),
        one_by_one_until: None,
        last_applied: None,
        last_received: Lsn::INVALID,
        stop_lsn: match options.stop_at {
            Some(StopAt::Lsn(lsn)) => Some(lsn),
            _ => None,
        },
        staging_schema: None,
        changes: ChangeCounts::default(),
        lag: None,
        last_commit_time: None,
        feed_start: Lsn::INVALID,
        created: Vec::new(),
    };
    let mut attempt: u32 = 0;
    // A series from the start, so that `increase()` over it sees the first retry.
    metrics::counter!("stagingprop_retries_total").increment(0);
    loop {
        let batches_before = state.stats.batches;
        let result = session(config, options, &mut state, feeding, shutdown.as_mut()).await;
        if state.stats.batches > batches_before {
            // This session committed on production: a failure now starts the backoff afresh.
            attempt = 0;
        }
        match result {
            Ok(SessionEnd::Stopped) => {
                return Ok(state.summary());
            }
            Err(e) if e.is_transient() => {
                super::lag::measure_between_attempts(config, &mut state).await;
                let what = format!("nothing is lost: {}", feeding.holder());
                if pause_before_retry(e, &mut attempt, options, "", &what, shutdown.as_mut())
                    .await?
                {
                    return Ok(state.summary());
                }
            }
            Err(SyncError::TableCreated(shapes)) => {
                // The next session manages the new tables: it creates them on production in
                // their place in the stream, and applies their rows.
                for shape in shapes {
                    let name = shape.table_name();
                    if state.created.iter().any(|c| c.table_name() == name) {
                        return Err(SyncError::Schema(vec![format!(
                            "staging created {name} (managed by [[table_patterns]]), but the \
                             session started to manage it does not find it: run `stagingprop \
                             init`, then start sync again"
                        )]));
                    }
                    tracing::info!(
                        table = %name,
                        "staging created {name}, which [[table_patterns]] manages: starting a new session that creates it on production"
                    );
                    state.created.push(shape);
                }
            }
            Err(SyncError::SchemaMoved) => {
                tracing::info!(
                    "staging's schema changed while the session started: starting again"
                );
            }
            Err(SyncError::Apply(e)) if e.may_be_ordering() && state.one_by_one_until.is_none() => {
                // Set-based apply can trip a unique or foreign-key check that applying the
                // changes in staging's order would not: replay this stretch one change at a time.
                let from = state.last_applied.unwrap_or_default();
                let until = state.last_received;
                tracing::warn!(
                    "{e}; replaying {from} to {until} one change at a time to see whether the error is real"
                );
                state.one_by_one_until = Some(until);
            }
            Err(e) => return Err(e),
        }
    }
}

/// After a transient failure `error`: counts the attempt, says what happened and waits before
/// the next one (1 s doubling up to 30 s). `Err(error)` when attempts are used up; `Ok(true)`
/// when `stop` came first.
pub(super) async fn pause_before_retry<S>(
    error: SyncError,
    attempt: &mut u32,
    options: &SyncOptions,
    who: &str,
    why_nothing_is_lost: &str,
    stop: std::pin::Pin<&mut S>,
) -> Result<bool, SyncError>
where
    S: Future<Output = ()>,
{
    *attempt += 1;
    metrics::counter!("stagingprop_retries_total").increment(1);
    if options.max_attempts.is_some_and(|max| *attempt >= max) {
        return Err(error);
    }
    let delay = Duration::from_millis((500u64 << (*attempt).min(6)).min(30_000));
    tracing::warn!(
        attempt = *attempt,
        "{who}{error}; retrying in {:.1} s ({why_nothing_is_lost})",
        delay.as_secs_f64()
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(false),
        _ = stop => Ok(true),
    }
}

/// A future that, once resolved, stays resolved: polling it again returns `Ready` at once.
pub(super) struct Latch<F> {
    inner: Option<std::pin::Pin<Box<F>>>,
}

impl<F: Future<Output = ()>> Latch<F> {
    pub(super) fn new(inner: F) -> Self {
        Latch {
            inner: Some(Box::pin(inner)),
        }
    }
}

impl<F: Future<Output = ()>> Future for Latch<F> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(());
        };
        match inner.as_mut().poll(cx) {
            std::task::Poll::Ready(()) => {
                self.inner = None;
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shutdown request seen once is seen again: `run` polls it after a session that failed
    /// while stopping, and an `async` block polled after completion panics.
    #[tokio::test]
    async fn a_latched_shutdown_stays_resolved() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut latch = Latch::new(async move {
            let _ = rx.await;
        });
        let mut latch = std::pin::Pin::new(&mut latch);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(latch.as_mut().poll(&mut cx).is_pending());
        drop(tx);
        latch.as_mut().await;
        latch.as_mut().await;
        assert!(latch.as_mut().poll(&mut cx).is_ready());
    }
}
