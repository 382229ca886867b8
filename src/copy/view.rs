//! The operator's view of a running copy: counters the workers bump, drawn as progress bars on
//! a terminal (the whole copy, then each table or range in flight) or logged every 10 s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared counters for the operator's view of a running copy.
#[derive(Default)]
pub(super) struct CopyProgress {
    /// The source tables' on-disk size: the denominator of the estimate.
    estimate: u64,
    tables: usize,
    pub bytes: AtomicU64,
    pub rows: AtomicU64,
    pub tables_done: AtomicUsize,
    /// Tables (or ranges) being copied right now.
    active: Mutex<Vec<Arc<PieceProgress>>>,
}

/// One table or range in flight.
pub(super) struct PieceProgress {
    label: String,
    /// Its share of the source's on-disk size.
    estimate: u64,
    pub bytes: AtomicU64,
    pub rows: AtomicU64,
}

impl CopyProgress {
    /// Counters for a copy of `tables` tables, `estimate` bytes on the source's disk.
    pub fn new(tables: usize, estimate: u64) -> CopyProgress {
        CopyProgress {
            estimate,
            tables,
            ..CopyProgress::default()
        }
    }

    fn start(&self, label: String, estimate: u64) -> Arc<PieceProgress> {
        let piece = Arc::new(PieceProgress {
            label,
            estimate,
            bytes: AtomicU64::new(0),
            rows: AtomicU64::new(0),
        });
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(piece.clone());
        piece
    }
}

/// A table or range on the board while it is copied, however its copy ends.
pub(super) struct OnBoard<'a> {
    progress: &'a CopyProgress,
    pub piece: Arc<PieceProgress>,
}

impl Drop for OnBoard<'_> {
    fn drop(&mut self) {
        self.progress
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| !Arc::ptr_eq(p, &self.piece));
    }
}

impl CopyProgress {
    pub fn show(&self, label: String, estimate: u64) -> OnBoard<'_> {
        OnBoard {
            progress: self,
            piece: self.start(label, estimate),
        }
    }

    /// The overall line, then a line per table or range in flight.
    fn lines(&self, elapsed: f64, bars: bool) -> Vec<String> {
        let bar = |fraction: f64, width: usize| {
            if bars {
                crate::bars::bar(fraction, width) + " "
            } else {
                String::new()
            }
        };
        let bytes = self.bytes.load(Ordering::Relaxed);
        let rate = bytes as f64 / elapsed.max(0.001);
        // COPY's binary size differs from the on-disk size: never claim to be done early.
        let fraction = |done: u64, of: u64| (done as f64 / of.max(1) as f64).min(0.99);
        let eta = if rate > 0.0 {
            self.estimate.saturating_sub(bytes) as f64 / rate
        } else {
            0.0
        };
        let mut lines = vec![format!(
            "copy {}{:>3.0}%  {:.0} MB at {:.1} MB/s  {} rows  {}/{} tables  ETA {:.0} s",
            bar(fraction(bytes, self.estimate), 30),
            fraction(bytes, self.estimate) * 100.0,
            bytes as f64 / 1e6,
            rate / 1e6,
            crate::bars::thousands(self.rows.load(Ordering::Relaxed)),
            self.tables_done.load(Ordering::Relaxed),
            self.tables,
            eta
        )];
        for piece in self.active.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let bytes = piece.bytes.load(Ordering::Relaxed);
            lines.push(format!(
                "  {}{:>3.0}%  {:.1} MB  {} rows  {}",
                bar(fraction(bytes, piece.estimate), 20),
                fraction(bytes, piece.estimate) * 100.0,
                bytes as f64 / 1e6,
                crate::bars::thousands(piece.rows.load(Ordering::Relaxed)),
                piece.label
            ));
        }
        lines
    }
}

/// Progress bars redrawn every second on a terminal; log lines every 10 s otherwise.
pub(super) async fn report_progress(progress: Arc<CopyProgress>) {
    let started = Instant::now();
    let terminal = crate::bars::on_terminal();
    let every = if terminal { 1 } else { 10 };
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.tick().await;
    loop {
        tick.tick().await;
        let lines = progress.lines(started.elapsed().as_secs_f64(), terminal);
        if terminal {
            crate::bars::draw(&lines);
        } else {
            for line in lines {
                tracing::info!("{}", line.trim_start());
            }
        }
    }
}
