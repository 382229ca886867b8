//! The spool's hand-over between the receiver (staging's stream into the spool) and what reads
//! the spool in the same process (the applier, or the publisher): where the durable part ends,
//! what was applied, staging's WAL end.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use tokio::sync::watch;

use crate::model::Lsn;
use crate::spool::store::SpoolMark;

/// What the receiver and the applier tell each other.
pub(super) struct SpoolShared {
    pub dir: PathBuf,
    /// Where the spool's durable part ends (receiver -> applier).
    pub mark: watch::Sender<SpoolMark>,
    /// The end of the last transaction production committed (applier -> receiver).
    pub applied: watch::Sender<Lsn>,
    /// Staging's WAL end as last heard (for the applier's lag).
    pub server_wal_end: AtomicU64,
    /// Staging's system identifier, once the receiver connected (names published messages).
    pub system_id: watch::Sender<Option<String>>,
    /// Who reads the spool and reports `applied`.
    pub downstream: Downstream,
}

/// What the spool feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Downstream {
    /// Production, through the applier of this process.
    Production,
    /// A JetStream stream, through the publisher of this process: `applied` is what the
    /// stream acknowledged, and the publisher learns what it holds before the receiver starts.
    Stream,
}

impl SpoolShared {
    pub(super) fn new(dir: PathBuf, downstream: Downstream) -> SpoolShared {
        SpoolShared {
            dir,
            mark: watch::Sender::new(SpoolMark::default()),
            applied: watch::Sender::new(Lsn::INVALID),
            server_wal_end: AtomicU64::new(0),
            system_id: watch::Sender::new(None),
            downstream,
        }
    }
}
