//! Whether an open batch should linger for more transactions ([`Pace::saturated`], for
//! `[sync] batch_linger_ms`), judged by how late production sees staging's commits.
//!
//! A caught-up sync applies each transaction on its own, as soon as nothing more is ready: the
//! lowest lag while the machines have room. When staging commits flat out that costs a round
//! trip and a commit per transaction, and the cores it takes are the ones staging's walsender
//! needs: sync falls behind, catches up in large batches, falls behind again, and production
//! sees changes in bursts. Once batches commit later than twice `batch_linger_ms` after staging
//! committed them, lingering (a batch waits until it is `batch_linger_ms` old) costs less lag
//! than it saves; once they are back under, batches are applied at once again. The lag is a
//! moving average per batch, so one late batch does not make the next ones wait.
//!
//! Only a pipeline reading staging's slot lingers (`Feed::arrives_as_sent`): the spool and a
//! stream deliver in bursts whose lateness is their own cadence.
//!
//! The lag compares staging's commit timestamps with this machine's clock: a clock ahead of
//! staging's by more than twice the linger makes batches linger all the time (each waits up to
//! `batch_linger_ms`), one behind makes them linger later.

use std::time::Duration;

/// Weight of a new batch's lag in the moving average (1/8: a few dozen batches to turn round).
const NEW_SAMPLE_SHARE: u32 = 8;

/// Lags longer than this count as this much, so that the end of a long catch-up is noticed
/// within a few dozen batches.
const LONGEST_LAG: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) struct Pace {
    linger: Duration,
    /// Moving average of the time from staging's commit to production's, per batch (its last
    /// transaction).
    lag: Option<Duration>,
}

impl Pace {
    /// Batches linger for `linger` when late (zero: never).
    pub(super) fn new(linger: Duration) -> Self {
        Pace { linger, lag: None }
    }

    /// A batch committed on production `lag` after staging committed its last transaction
    /// (zero when the clocks disagree the other way).
    pub(super) fn batch_committed(&mut self, lag: Duration) {
        let lag = lag.min(LONGEST_LAG);
        self.lag = Some(match self.lag {
            None => lag,
            Some(average) if lag >= average => average + (lag - average) / NEW_SAMPLE_SHARE,
            Some(average) => average - (average - lag) / NEW_SAMPLE_SHARE,
        });
        tracing::trace!(
            lag_us = lag.as_micros() as u64,
            average_us = self.lag.unwrap_or_default().as_micros() as u64,
            "batch committed"
        );
    }

    /// Batches commit later than twice the linger after staging: they should linger.
    pub(super) fn saturated(&self) -> bool {
        !self.linger.is_zero() && self.lag.is_some_and(|lag| lag > self.linger * 2)
    }

    /// How long an open batch waits, in all, for more transactions now.
    pub(super) fn linger(&self) -> Duration {
        if self.saturated() {
            self.linger
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nothing_lingers_before_a_batch_is_late_or_with_no_linger_set() {
        let mut pace = Pace::new(ms(3));
        assert!(!pace.saturated());
        assert_eq!(pace.linger(), Duration::ZERO);
        pace.batch_committed(ms(1));
        assert!(!pace.saturated(), "on time");
        let mut off = Pace::new(Duration::ZERO);
        off.batch_committed(Duration::from_secs(10));
        assert!(!off.saturated(), "batch_linger_ms = 0 never lingers");
    }

    #[test]
    fn late_batches_linger_until_they_are_back_on_time() {
        let mut pace = Pace::new(ms(3));
        for _ in 0..5 {
            pace.batch_committed(ms(1));
        }
        // One late batch is not enough to make the next ones wait.
        pace.batch_committed(ms(20));
        assert!(!pace.saturated());
        for _ in 0..10 {
            pace.batch_committed(ms(50));
        }
        assert!(pace.saturated());
        assert_eq!(pace.linger(), ms(3));
        // Caught up, lingering only (each batch 3 ms late, plus its commit): back to at once.
        for _ in 0..40 {
            pace.batch_committed(ms(4));
        }
        assert!(!pace.saturated());
    }

    #[test]
    fn a_long_catch_up_is_forgotten_within_a_few_dozen_batches() {
        let mut pace = Pace::new(ms(3));
        pace.batch_committed(Duration::from_secs(3600));
        assert!(pace.saturated());
        assert!(pace.lag.unwrap() <= LONGEST_LAG);
        for _ in 0..60 {
            pace.batch_committed(ms(1));
        }
        assert!(!pace.saturated());
    }
}
