//! Production's table statistics, as sync's statements need them. Every apply statement joins
//! an `unnest` of keys to a managed table; the planner sizes the table from its current pages
//! times `reltuples / relpages`. When those were taken while most rows sat in an uncommitted
//! bulk load (a VACUUM or ANALYZE during a reload or a native subscription's initial copy),
//! the table looks nearly empty, and with column statistics left from earlier the planner
//! scans the whole table once and rescans the keys for every row: minutes per statement
//! instead of milliseconds (issue 21). A table whose statistics say that, or that was never
//! analyzed, is analyzed before sync applies to it.

use tokio_postgres::Client;

use crate::catalog::TableMeta;

/// Tables smaller than this many pages are planned well whatever their statistics say.
const SMALL_PAGES: i64 = 64;

/// What production's catalog says of one table's size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// `pg_class.relpages` and `reltuples` (-1: never vacuumed or analyzed).
    pub relpages: i64,
    pub reltuples: f64,
    /// The pages the table has now.
    pub pages: i64,
}

impl Estimate {
    /// Whether the planner would misjudge the table: fewer than one row per page where the
    /// table holds rows, or no statistics at all on a table of some size.
    pub fn misleads(&self) -> bool {
        if self.pages < SMALL_PAGES {
            return false;
        }
        self.reltuples < 0.0 || (self.relpages > 0 && self.reltuples < self.relpages as f64)
    }
}

/// Analyzes every table of `metas` whose statistics mislead the planner; returns those it
/// analyzed, with what their statistics said before.
pub async fn analyze_misleading(
    client: &Client,
    metas: &[TableMeta],
) -> Result<Vec<(String, Estimate)>, tokio_postgres::Error> {
    let names: Vec<String> = metas.iter().map(TableMeta::qualified).collect();
    let rows = client
        .query(
            "SELECT n.name, c.relpages::int8, c.reltuples::float8, \
                    (pg_relation_size(c.oid) / current_setting('block_size')::int8)::int8 \
               FROM unnest($1::text[]) AS n(name) JOIN pg_class c ON c.oid = n.name::regclass",
            &[&names],
        )
        .await?;
    let mut analyzed = Vec::new();
    for row in rows {
        let name: String = row.get(0);
        let estimate = Estimate {
            relpages: row.get(1),
            reltuples: row.get(2),
            pages: row.get(3),
        };
        if estimate.misleads() {
            // `name` is one of `metas`' qualified (quoted) names.
            client.batch_execute(&format!("ANALYZE {name}")).await?;
            analyzed.push((name, estimate));
        }
    }
    Ok(analyzed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimate(relpages: i64, reltuples: f64, pages: i64) -> Estimate {
        Estimate {
            relpages,
            reltuples,
            pages,
        }
    }

    #[test]
    fn statistics_taken_during_a_bulk_load_mislead() {
        // 4,123 pages said to hold one row: the issue 21 state.
        assert!(estimate(4123, 1.0, 4123).misleads());
        // Never analyzed.
        assert!(estimate(0, -1.0, 5000).misleads());
        // Plausible statistics, or a table too small to matter.
        assert!(!estimate(4123, 400_000.0, 4200).misleads());
        assert!(!estimate(10, 1.0, 10).misleads());
        assert!(!estimate(0, -1.0, 3).misleads());
        // Grown since, with a plausible density: the planner scales by current pages.
        assert!(!estimate(100, 5_000.0, 9_000).misleads());
    }
}
