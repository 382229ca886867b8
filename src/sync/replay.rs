//! `stagingprop replay`: applies spooled transactions to a target from the position its own
//! progress table holds, e.g. a production restored from a backup taken before an outage.
//! Exactly once as sync is: the target's progress row moves in the same transaction as the
//! rows, so a replay that stops part way (or is run twice) goes on where it stopped.

use std::future::Future;
use std::path::PathBuf;

use super::until::parse_until;
use super::{Feeding, StopAt, StreamFeeding, SyncError, SyncOptions, SyncSummary, apply_loop};
use crate::config::{Config, DbConfig};
use crate::pg::connect::Endpoint;
use crate::spool::store::{self, SpoolError};

/// The target of a replay.
#[derive(Clone, Debug)]
pub enum ReplayTo {
    Production,
    Database(DbConfig),
}

#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub to: ReplayTo,
    /// `--until`: an LSN (`0/1A2B3C4`) or a time PostgreSQL reads as a `timestamptz`.
    pub until: Option<String>,
    /// `--from-stream`: read the `[stream]` JetStream stream instead of the spool.
    pub from_stream: bool,
}

pub(super) struct ReplayPlan {
    pub dir: PathBuf,
    pub target: Endpoint,
    pub end: store::SpoolMark,
}

/// Applies the spool to the target until its end (or `--until`).
pub async fn replay<S>(
    config: &Config,
    options: &ReplayOptions,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    if options.from_stream {
        return replay_stream(config, options, shutdown).await;
    }
    let Some(spool) = &config.spool else {
        return Err(SyncError::Replay(
            "replay reads the spool, and the config has no [spool] section: set [spool] dir to \
             the directory sync spools into"
                .into(),
        ));
    };
    let (target, _lock) = match &options.to {
        // A sync applying the same spool to production would apply what replay applies.
        ReplayTo::Production => (
            Endpoint::from_db_config(&config.production)?,
            Some(store::SpoolLock::acquire(&spool.dir)?),
        ),
        ReplayTo::Database(db) => (Endpoint::from_db_config(db)?, None),
    };
    let held = store::summary(&spool.dir)?;
    let (Some(oldest), Some(end)) = (held.oldest, store::complete_mark(&spool.dir)?) else {
        return Err(SyncError::Replay(format!(
            "the spool in {} holds no complete transaction: nothing to replay",
            spool.dir.display()
        )));
    };
    let newest = end.end;
    let until = match &options.until {
        None => None,
        Some(text) => Some(parse_until(text, &target).await?),
    };
    let plan = ReplayPlan {
        dir: spool.dir.clone(),
        target,
        end,
    };
    let sync_options = SyncOptions {
        until,
        max_attempts: Some(5),
        ..SyncOptions::default()
    };
    match apply_loop(
        config,
        &sync_options,
        &Feeding::Replay(Box::new(plan)),
        shutdown,
    )
    .await
    {
        Err(SyncError::Spool(SpoolError::Gap {
            covered,
            previous_end,
            ..
        })) => Err(SyncError::Replay(format!(
            "the spool in {} lacks staging's transactions between {covered} and {previous_end}, \
             which the target needs (it holds transactions committing from {oldest}, complete up \
             to {newest}): they were removed after production applied them (spool.retain_secs), \
             or committed before this spool started. Nothing more was applied; restore a newer \
             backup, or re-seed the target with `stagingprop copy`",
            spool.dir.display()
        ))),
        other => other,
    }
}

/// `replay --from-stream`: the target applies the stream from its own progress row to where
/// the stream ended when the replay started (or `--until`), through a consumer of its own (the
/// target's running consumer, if any, is left alone).
async fn replay_stream<S>(
    config: &Config,
    options: &ReplayOptions,
    shutdown: S,
) -> Result<SyncSummary, SyncError>
where
    S: Future<Output = ()>,
{
    let mut stream = super::stream_config(config, "replay --from-stream")?.clone();
    stream.consumer = format!("{}_replay", stream.consumer);
    let target = match &options.to {
        ReplayTo::Production => Endpoint::from_db_config(&config.production)?,
        ReplayTo::Database(db) => Endpoint::from_db_config(db)?,
    };
    let until = match &options.until {
        None => None,
        Some(text) => Some(parse_until(text, &target).await?),
    };
    let sync_options = SyncOptions {
        stop_at: Some(StopAt::CaughtUp),
        until,
        max_attempts: Some(5),
        ..SyncOptions::default()
    };
    let feeding = Feeding::Stream(Box::new(StreamFeeding {
        stream,
        replay_to: Some(target),
    }));
    apply_loop(config, &sync_options, &feeding, shutdown).await
}
