//! `stagingprop sync`: tails staging's slot and applies every committed transaction of the
//! managed tables to production, in commit order and exactly once.
//!
//! Exactly once: production's progress table holds the end LSN of the last applied staging
//! transaction, written in the same production transaction as its changes. A session starts the
//! slot there and skips every transaction whose commit record lies before it. Production commits
//! asynchronously; staging is told a position (through [`crate::pg::replication::DurablePosition`]) only once
//! production's WAL is flushed past the commit covering it.
//!
//! With `[spool]` (`receiver.rs`), staging's stream goes to the spool first and staging is told
//! what the spool holds durably; the applier reads the spool (`feed.rs`) and production's
//! progress table remains the truth of what production has. `replay` (`replay.rs`) is the same
//! applier reading a spool into any target until the spool's end.
//!
//! Batching: consecutive staging transactions share one production transaction until
//! `batch_max_rows` / `batch_max_bytes` are reached or `batch_max_delay_ms` passed; changes are
//! consolidated per row and sent set-based. A large staging transaction is sent in pieces inside
//! one production transaction, so memory stays bounded whatever its size. A closed batch's
//! statements run on production while the next batch is read and consolidated; it commits when
//! the next batch first needs production, or as soon as nothing more is ready to read (on a
//! staging so busy that batches commit late, once it is `batch_linger_ms` old: see `pace.rs`).

//! The rooms: `error.rs` (what can fail, what is retried), `retry.rs` (sessions until stopped),
//! `run_state.rs` (what a run keeps across sessions), `session.rs` (one session's set-up:
//! connecting, checking both sides, opening the feed and the target), `staging_schema.rs`,
//! `heartbeat.rs`, `pipeline/` (messages to transactions to batches; `streamed.rs` large
//! transactions applied while staging streams them), `feed.rs` (slot, spool or replay),
//! `handover.rs` (what the spool's receiver and its reader tell each other), `receiver.rs`
//! (staging's stream into the spool), `publish.rs` (the spool into a JetStream stream),
//! `replay.rs`, `dry_run.rs` (a target that writes nothing, which the pipeline's tests record).
//! The pipeline applies through [`crate::apply::Target`].

mod dry_run;
mod error;
mod feed;
mod handover;
mod heartbeat;
mod lag;
mod pace;
mod pipeline;
mod publish;
mod receiver;
mod replay;
mod report;
mod retry;
mod run_state;
mod session;
mod staging_schema;
mod until;

use std::future::Future;
use std::sync::Arc;

use crate::apply;
use crate::config::Config;
use crate::model::{Lag, Lsn};
pub use error::SyncError;
use error::database_error;
pub use publish::{PublishSummary, publish};
pub use replay::{ReplayOptions, ReplayTo, replay};
pub use report::{ChangeCounts, DRY_RUN, OpCounts, RunReport, TableLine};
use retry::apply_loop;
pub use until::{Until, parse_until};

/// The prefix of the heartbeat messages sync emits on an idle staging.
pub const HEARTBEAT_PREFIX: &str = "stagingprop-heartbeat";

/// How a sync run ends besides a signal (for tests and benchmarks).
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Stop once production has everything staging had written when sync started (or when the
    /// given LSN is reached), instead of following staging forever.
    pub stop_at: Option<StopAt>,
    /// Give up after this many consecutive failed attempts (None: keep trying).
    pub max_attempts: Option<u32>,
    /// `--until`: apply what committed up to this position or time, then stop (with
    /// `stop_at`, whichever comes first).
    pub until: Option<Until>,
    /// `--dry-run`: read staging's slot up to where staging is now (or `until`), apply and
    /// confirm nothing; the summary says what a real run would apply.
    pub dry_run: bool,
    /// `--from-stream`: read staging's transactions from the `[stream]` JetStream stream
    /// that `publish` writes, instead of staging's slot.
    pub from_stream: bool,
    /// `--apply-schema-change`: apply schema changes staging captured even under `[ddl] mode =
    /// "stop"` (the one that stopped the last run, and any after it).
    pub apply_schema_change: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum StopAt {
    /// Staging's current WAL position when the session starts.
    CaughtUp,
    Lsn(Lsn),
}

/// What a sync run did.
#[derive(Clone, Debug, Default)]
pub struct SyncSummary {
    pub stats: apply::ApplyStats,
    pub last_applied: Option<Lsn>,
    /// Staging's changes applied, per table and operation (committed batches only).
    pub changes: ChangeCounts,
    /// How far production was behind staging when the run stopped, when known.
    pub lag: Option<Lag>,
}

/// Runs sync until `shutdown` resolves (or `options.stop_at` is reached), retrying transient
/// failures of either database with backoff. With `[spool]`, a receiver writes staging's
/// stream to the spool and confirms it to staging, and the applier applies the spool.
pub async fn run<S>(
    config: &Config,
    options: &SyncOptions,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    if options.from_stream {
        let stream = stream_config(config, "--from-stream")?;
        return apply_loop(
            config,
            options,
            &Feeding::Stream(Box::new(StreamFeeding {
                stream: stream.clone(),
                replay_to: None,
            })),
            shutdown,
        )
        .await;
    }
    match &config.spool {
        // A dry run reads the slot itself: the spool's receiver would confirm what it spools.
        _ if options.dry_run => apply_loop(config, options, &Feeding::Slot, shutdown).await,
        None => apply_loop(config, options, &Feeding::Slot, shutdown).await,
        Some(spool) => receiver::spooled(config, spool, options, shutdown).await,
    }
}

/// The `[stream]` section, which `what` needs.
fn stream_config<'a>(
    config: &'a Config,
    what: &str,
) -> Result<&'a crate::config::StreamConfig, SyncError> {
    config.stream.as_ref().ok_or_else(|| {
        config_refused(
            what,
            "[stream]",
            "the config has no [stream] section: add one with url and name (see docs/fanout.md)",
        )
    })
}

/// A configuration `what` cannot run with.
fn config_refused(what: &str, key: &str, message: &str) -> SyncError {
    SyncError::Stream(crate::stream::StreamError::Config(
        crate::config::ConfigError::Invalid {
            origin: what.into(),
            key: key.into(),
            message: message.into(),
        },
    ))
}

/// Where the applier reads staging's transactions from.
enum Feeding {
    /// Staging's slot: what production committed is confirmed to it.
    Slot,
    /// The spool a receiver of this process writes; the receiver confirms to staging.
    Spool(Arc<handover::SpoolShared>),
    /// A spool on disk, applied to a target up to its end or a limit (`replay`).
    Replay(Box<replay::ReplayPlan>),
    /// The JetStream stream `publish` writes; the target's progress row says where to resume.
    Stream(Box<StreamFeeding>),
}

/// Reading the stream into production (`sync --from-stream`) or into any target up to the
/// stream's end (`replay --from-stream`).
struct StreamFeeding {
    stream: crate::config::StreamConfig,
    /// `replay --from-stream`: the target, which must have a progress row.
    replay_to: Option<crate::pg::connect::Endpoint>,
}

impl Feeding {
    fn holder(&self) -> &'static str {
        match self {
            Feeding::Slot => "staging keeps what production has not confirmed",
            Feeding::Spool(_) | Feeding::Replay(_) => {
                "the spool keeps what the target has not applied"
            }
            Feeding::Stream(_) => "the stream keeps what the target has not applied",
        }
    }
}
