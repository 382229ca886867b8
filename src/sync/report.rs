//! The run report: what a sync (or replay, or dry run) applied, per table and operation, counted
//! from staging's changes as their production transaction commits (a batch rolled back counts
//! nothing), printed when the run stops, as a table for people or as JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::SyncSummary;
use crate::config::{Config, KeyRule};
use crate::model::Lag;

/// The name of a dry run's report.
pub const DRY_RUN: &str = "dry run";

fn allocates(rule: &KeyRule) -> bool {
    matches!(
        rule,
        KeyRule::RemapOnConflict { .. } | KeyRule::Allocate { .. } | KeyRule::Natural { .. }
    )
}

/// Staging's changes of one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OpCounts {
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    pub truncated: u64,
}

impl OpCounts {
    fn add(&mut self, other: &OpCounts) {
        self.inserted += other.inserted;
        self.updated += other.updated;
        self.deleted += other.deleted;
        self.truncated += other.truncated;
    }

    pub fn rows(&self) -> u64 {
        self.inserted + self.updated + self.deleted
    }
}

/// What kind of change a count is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// Counts per managed table (by its index in `[[tables]]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeCounts(BTreeMap<usize, OpCounts>);

impl ChangeCounts {
    pub fn count(&mut self, table: usize, op: Op) {
        let c = self.0.entry(table).or_default();
        match op {
            Op::Insert => c.inserted += 1,
            Op::Update => c.updated += 1,
            Op::Delete => c.deleted += 1,
            Op::Truncate => c.truncated += 1,
        }
    }

    pub fn add(&mut self, other: &ChangeCounts) {
        for (table, counts) in &other.0 {
            self.0.entry(*table).or_default().add(counts);
        }
    }

    pub fn table(&self, table: usize) -> OpCounts {
        self.0.get(&table).copied().unwrap_or_default()
    }

    pub fn total(&self) -> OpCounts {
        let mut total = OpCounts::default();
        for counts in self.0.values() {
            total.add(counts);
        }
        total
    }
}

/// One table's line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableLine {
    pub table: String,
    #[serde(flatten)]
    pub counts: OpCounts,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunReport {
    /// `sync`, `replay` or `dry run`.
    pub run: String,
    pub tables: Vec<TableLine>,
    pub total: OpCounts,
    pub transactions: u64,
    /// Changes written to the quarantine by `skip` policies.
    pub quarantined: u64,
    /// Key mappings written by remapping rules.
    pub keys_remapped: u64,
    /// With remapping, during a dry run: inserts into tables whose rule allocates keys (the
    /// most keys a real run would allocate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_to_allocate: Option<u64>,
    pub elapsed_secs: f64,
    pub rows_per_sec: f64,
    /// The end of the last staging transaction applied (or, in a dry run, read).
    pub applied: Option<String>,
    /// How far production was behind staging when the run stopped, when known.
    pub lag: Option<Lag>,
}

impl RunReport {
    /// The report of `run` (`sync`, `replay`, ...) that took `elapsed_secs`.
    pub fn of(config: &Config, summary: &SyncSummary, run: &str, elapsed_secs: f64) -> RunReport {
        let tables: Vec<TableLine> = config
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| TableLine {
                table: t.name.to_string(),
                counts: summary.changes.table(i),
            })
            .collect();
        let total = summary.changes.total();
        // A dry run allocates nothing; what a real run would is at most one key per insert into
        // a table whose rule allocates.
        let keys_to_allocate = (run == DRY_RUN && config.tables.iter().any(|t| allocates(&t.key)))
            .then(|| {
                config
                    .tables
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| allocates(&t.key))
                    .map(|(i, _)| summary.changes.table(i).inserted)
                    .sum()
            });
        RunReport {
            run: run.to_owned(),
            tables,
            total,
            transactions: summary.stats.transactions,
            quarantined: summary.stats.conflicts_skipped,
            keys_remapped: summary.stats.keys_remapped,
            keys_to_allocate,
            elapsed_secs,
            rows_per_sec: total.rows() as f64 / elapsed_secs.max(0.001),
            applied: summary.last_applied.map(|l| l.to_string()),
            lag: summary.lag,
        }
    }

    /// A table with a line per managed table, a total, and the run's figures.
    pub fn render(&self) -> String {
        let width = self
            .tables
            .iter()
            .map(|t| t.table.len())
            .chain([5])
            .max()
            .unwrap_or(5);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>10}  {:>9}",
            "table", "inserted", "updated", "deleted", "truncated"
        );
        let line = |out: &mut String, name: &str, c: &OpCounts| {
            let _ = writeln!(
                out,
                "{name:<width$}  {:>10}  {:>10}  {:>10}  {:>9}",
                c.inserted, c.updated, c.deleted, c.truncated
            );
        };
        for t in &self.tables {
            line(&mut out, &t.table, &t.counts);
        }
        line(&mut out, "total", &self.total);
        let _ = write!(
            out,
            "{}: {} transactions, {} rows in {:.1} s ({:.0} rows/s); {} quarantined, {} keys remapped",
            self.run,
            self.transactions,
            self.total.rows(),
            self.elapsed_secs,
            self.rows_per_sec,
            self.quarantined,
            self.keys_remapped
        );
        if let Some(keys) = self.keys_to_allocate {
            let _ = write!(out, ", at most {keys} keys to allocate");
        }
        if let Some(at) = &self.applied {
            let _ = write!(out, "; up to {at}");
        }
        if let Some(lag) = self.lag {
            let _ = write!(out, "; {} bytes of staging WAL behind", lag.bytes);
            if let Some(seconds) = lag.seconds.filter(|s| *s > 0.0) {
                let _ = write!(out, " ({seconds:.1} s)");
            }
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_table_and_in_total() {
        let mut batch = ChangeCounts::default();
        batch.count(0, Op::Insert);
        batch.count(0, Op::Insert);
        batch.count(1, Op::Delete);
        let mut run = ChangeCounts::default();
        run.add(&batch);
        run.add(&batch);
        run.count(1, Op::Truncate);
        assert_eq!(run.table(0).inserted, 4);
        assert_eq!(run.table(1).deleted, 2);
        assert_eq!(run.table(2), OpCounts::default());
        assert_eq!(run.total().rows(), 6);
        assert_eq!(run.total().truncated, 1);
    }

    #[test]
    fn a_dry_run_reports_the_keys_a_real_run_could_allocate() {
        let config = Config::from_toml_str(
            "[staging]\nurl = \"host=h dbname=s user=u\"\n[production]\nurl = \"host=h dbname=p user=u\"\n\
             [[tables]]\nname = \"public.a\"\nkey = { rule = \"allocate\", sequence = \"public.a_seq\" }\n\
             [[tables]]\nname = \"public.b\"\n",
            "test.toml",
        )
        .unwrap();
        let mut summary = SyncSummary::default();
        for _ in 0..3 {
            summary.changes.count(0, Op::Insert);
        }
        summary.changes.count(1, Op::Insert);
        summary.changes.count(0, Op::Update);
        let dry = RunReport::of(&config, &summary, DRY_RUN, 1.0);
        assert_eq!(dry.keys_to_allocate, Some(3));
        assert!(dry.render().contains("at most 3 keys to allocate"));
        assert_eq!(
            RunReport::of(&config, &summary, "sync", 1.0).keys_to_allocate,
            None
        );
    }

    #[test]
    fn the_report_reads_like_a_table() {
        let report = RunReport {
            run: "sync".into(),
            tables: vec![TableLine {
                table: "public.catentry".into(),
                counts: OpCounts {
                    inserted: 2,
                    updated: 1,
                    deleted: 0,
                    truncated: 0,
                },
            }],
            total: OpCounts {
                inserted: 2,
                updated: 1,
                deleted: 0,
                truncated: 0,
            },
            transactions: 2,
            quarantined: 0,
            keys_remapped: 0,
            keys_to_allocate: None,
            elapsed_secs: 1.5,
            rows_per_sec: 2.0,
            applied: Some("0/1A2B3C4".into()),
            lag: Some(Lag {
                bytes: 0,
                seconds: Some(0.0),
            }),
        };
        let text = report.render();
        assert!(text.starts_with("table              inserted"), "{text}");
        assert!(
            text.contains("public.catentry           2           1           0          0"),
            "{text}"
        );
        assert!(
            text.contains("sync: 2 transactions, 3 rows in 1.5 s (2 rows/s)"),
            "{text}"
        );
        assert!(
            text.trim_end()
                .ends_with("up to 0/1A2B3C4; 0 bytes of staging WAL behind"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["tables"][0]["inserted"], 2);
        assert_eq!(json["total"]["updated"], 1);
    }
}
