//! Tables without a key (`REPLICA IDENTITY FULL`) are compared as multisets of rows: two
//! identical rows are two rows. Each side sums row hashes per bucket of a second hash in one
//! scan, and only the buckets that differ are read row by row, counted per distinct row. A row
//! changed on one side counts as one missing and one extra: nothing pairs it with its old self.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{ChunkSummary, TableDiff, TableSql, VerifyOptions};
use crate::ops::{OpsError, query_error};
use crate::pg::connect::Endpoint;

/// The bucket of a row (its text `row`) among `$1` buckets.
const BUCKET: &str = "((hashtextextended(row, 1) % $1::bigint) + $1::bigint) % $1::bigint";

/// Per bucket: how many rows, and the sum of their hashes.
async fn summarize(
    client: &Client,
    sql: &TableSql<'_>,
    buckets: i64,
) -> Result<HashMap<i64, ChunkSummary>, tokio_postgres::Error> {
    let query = format!(
        "SELECT {BUCKET}, count(*)::bigint, sum(hashtextextended(row, 0)::numeric)::text
           FROM (SELECT {row} AS row FROM {table} WHERE {scope}) r GROUP BY 1",
        row = sql.row_text(),
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
    );
    Ok(client
        .query(&query, &[&buckets])
        .await?
        .iter()
        .map(|r| {
            (
                r.get(0),
                ChunkSummary {
                    rows: r.get(1),
                    hash: r.get(2),
                },
            )
        })
        .collect())
}

/// The rows of one bucket, each distinct row with how many times it is there.
async fn rows_of_bucket(
    client: &Client,
    sql: &TableSql<'_>,
    buckets: i64,
    bucket: i64,
) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
    let query = format!(
        "SELECT row, count(*)::bigint
           FROM (SELECT {row} AS row FROM {table} WHERE {scope}) r
          WHERE {BUCKET} = $2 GROUP BY 1",
        row = sql.row_text(),
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
    );
    Ok(client
        .query(&query, &[&buckets, &bucket])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub(super) async fn verify_keyless(
    s: &Client,
    p: &Client,
    sql: &TableSql<'_>,
    options: &VerifyOptions,
    (staging, production): (&Endpoint, &Endpoint),
) -> Result<TableDiff, OpsError> {
    let rows: i64 = s
        .query_one(
            &format!(
                "SELECT count(*)::bigint FROM {} WHERE {}",
                sql.meta.qualified(),
                sql.in_scope()
            ),
            &[],
        )
        .await
        .map_err(query_error(staging, "counting rows"))?
        .get(0);
    let chunk_rows = options.chunk_rows.max(1);
    let buckets = ((rows + chunk_rows - 1) / chunk_rows).max(1);
    let (on_staging, on_production) =
        tokio::join!(summarize(s, sql, buckets), summarize(p, sql, buckets));
    let on_staging = on_staging.map_err(query_error(staging, "hashing a table"))?;
    let on_production = on_production.map_err(query_error(production, "hashing a table"))?;
    let mut diff = TableDiff {
        table: sql.meta.table_name().to_string(),
        chunks: buckets as usize,
        staging_rows: on_staging.values().map(|c| c.rows).sum(),
        production_rows: on_production.values().map(|c| c.rows).sum(),
        ..TableDiff::default()
    };
    for bucket in 0..buckets {
        if on_staging.get(&bucket) == on_production.get(&bucket) {
            continue;
        }
        diff.chunks_differing += 1;
        let staging_rows = rows_of_bucket(s, sql, buckets, bucket)
            .await
            .map_err(query_error(staging, "reading differing rows"))?;
        let production_rows = rows_of_bucket(p, sql, buckets, bucket)
            .await
            .map_err(query_error(production, "reading differing rows"))?;
        let mut missing: Vec<(&String, i64)> = Vec::new();
        let mut extra: Vec<(&String, i64)> = Vec::new();
        for (row, &n) in &staging_rows {
            let there = production_rows.get(row).copied().unwrap_or(0);
            if n > there {
                missing.push((row, n - there));
            }
        }
        for (row, &n) in &production_rows {
            let here = staging_rows.get(row).copied().unwrap_or(0);
            if n > here {
                extra.push((row, n - here));
            }
        }
        for (list, count, examples) in [
            (&mut missing, &mut diff.missing, &mut diff.missing_keys),
            (&mut extra, &mut diff.extra, &mut diff.extra_keys),
        ] {
            list.sort();
            *count += list.iter().map(|(_, n)| *n as u64).sum::<u64>();
            for (row, n) in list
                .iter()
                .take(options.max_examples.saturating_sub(examples.len()))
            {
                examples.push(if *n > 1 {
                    format!("{row} (x{n})")
                } else {
                    (*row).clone()
                });
            }
        }
    }
    Ok(diff)
}
