//! `stagingprop verify`: compares every managed table on staging and production. Staging's keys
//! are read once (an index-only pass) to cut the table into chunks of `chunk_rows` rows; then
//! both sides summarize each chunk's key range at the same time (row count and a hash of the
//! rows' hashes, by index range scans), so each side is read once and the two reads overlap.
//! Only chunks whose summaries differ are fetched row by row to name the rows missing on
//! production, extra on production, or different.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{OpsError, connect, query_error};
use crate::apply::schema::{self, TableMeta};
use crate::config::Config;
use crate::pg::connect::Endpoint;
use crate::sql::quote_ident;

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub chunk_rows: i64,
    /// How many keys of each kind to report per table.
    pub max_examples: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 10_000,
            max_examples: 10,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TableDiff {
    pub table: String,
    pub staging_rows: i64,
    pub production_rows: i64,
    pub missing: u64,
    pub extra: u64,
    pub different: u64,
    /// The first keys of each kind, as `column=value` lists.
    pub missing_keys: Vec<String>,
    pub extra_keys: Vec<String>,
    pub different_keys: Vec<String>,
    pub chunks: usize,
    pub chunks_differing: usize,
}

impl TableDiff {
    pub fn matches(&self) -> bool {
        self.missing == 0 && self.extra == 0 && self.different == 0
    }
}

/// Summary of one key range on one side.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ChunkSummary {
    rows: i64,
    hash: Option<String>,
}

/// The SQL pieces for one table: key list, row hash, and a key-range predicate.
struct TableSql<'a> {
    meta: &'a TableMeta,
}

impl TableSql<'_> {
    fn keys(&self) -> String {
        self.meta
            .key
            .iter()
            .map(|&k| quote_ident(&self.meta.columns[k].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_texts(&self) -> String {
        self.meta
            .key
            .iter()
            .map(|&k| format!("{}::text", quote_ident(&self.meta.columns[k].name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// md5 of the row's replicated columns in staging's order, so production-only columns and a
    /// different column order do not count as differences.
    fn row_hash(&self) -> String {
        let columns = self
            .meta
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        format!("md5(ROW({columns})::text)")
    }

    /// `(k1, k2) >= ($a::t1, $b::t2) [AND (k1, k2) < ($c::t1, $d::t2)]` with parameters from
    /// `first_param`.
    fn range(&self, lower: bool, upper: bool, first_param: usize) -> String {
        let mut n = first_param;
        let mut tuple = || {
            let parts: Vec<String> = self
                .meta
                .key
                .iter()
                .map(|&k| {
                    let p = format!("${n}::text::{}", self.meta.columns[k].type_sql);
                    n += 1;
                    p
                })
                .collect();
            format!("({})", parts.join(", "))
        };
        let keys = format!("({})", self.keys());
        let mut conditions = Vec::new();
        if lower {
            conditions.push(format!("{keys} >= {}", tuple()));
        }
        if upper {
            conditions.push(format!("{keys} < {}", tuple()));
        }
        if conditions.is_empty() {
            "true".into()
        } else {
            conditions.join(" AND ")
        }
    }
}

/// A key range: lower bound (inclusive; none for the first), upper bound (exclusive; none for
/// the last).
type Range<'a> = (Option<&'a Vec<String>>, Option<&'a Vec<String>>);

/// The first key of every chunk of `chunk_rows` rows on staging but the first: the ranges both
/// sides summarize. An index-only pass when the key is indexed, as primary keys are.
async fn chunk_boundaries(
    s: &Client,
    sql: &TableSql<'_>,
    chunk_rows: i64,
) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    let query = format!(
        "SELECT ARRAY[{key_texts}] FROM (SELECT {keys}, row_number() OVER (ORDER BY {keys}) AS rn
           FROM {table}) r WHERE rn > 1 AND (rn - 1) % $1 = 0 ORDER BY rn",
        key_texts = sql.key_texts(),
        keys = sql.keys(),
        table = sql.meta.qualified(),
    );
    let rows = s.query(&query, &[&chunk_rows]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            r.get::<_, Vec<Option<String>>>(0)
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect()
        })
        .collect())
}

fn params(keys: &[&Vec<String>]) -> Vec<String> {
    keys.iter().flat_map(|k| k.iter().cloned()).collect()
}

async fn summarize_range(
    client: &Client,
    sql: &TableSql<'_>,
    lower: Option<&Vec<String>>,
    upper: Option<&Vec<String>>,
) -> Result<ChunkSummary, tokio_postgres::Error> {
    let bounds: Vec<&Vec<String>> = lower.iter().chain(upper.iter()).copied().collect();
    let query = format!(
        "SELECT count(*)::bigint, md5(string_agg({hash}, '' ORDER BY {keys})) FROM {table} WHERE {range}",
        hash = sql.row_hash(),
        keys = sql.keys(),
        table = sql.meta.qualified(),
        range = sql.range(lower.is_some(), upper.is_some(), 1),
    );
    let values = params(&bounds);
    let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let row = client.query_one(&query, &refs).await?;
    Ok(ChunkSummary {
        rows: row.get(0),
        hash: row.get(1),
    })
}

/// Key (as `col=value` text) to row hash, for one range on one side.
async fn rows_in_range(
    client: &Client,
    sql: &TableSql<'_>,
    lower: Option<&Vec<String>>,
    upper: Option<&Vec<String>>,
) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    let bounds: Vec<&Vec<String>> = lower.iter().chain(upper.iter()).copied().collect();
    let query = format!(
        "SELECT ARRAY[{key_texts}], {hash} FROM {table} WHERE {range}",
        key_texts = sql.key_texts(),
        hash = sql.row_hash(),
        table = sql.meta.qualified(),
        range = sql.range(lower.is_some(), upper.is_some(), 1),
    );
    let values = params(&bounds);
    let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let names: Vec<&str> = sql
        .meta
        .key
        .iter()
        .map(|&k| sql.meta.columns[k].name.as_str())
        .collect();
    Ok(client
        .query(&query, &refs)
        .await?
        .iter()
        .map(|r| {
            let key: Vec<Option<String>> = r.get(0);
            let text = names
                .iter()
                .zip(key)
                .map(|(n, v)| format!("{n}={}", v.unwrap_or_else(|| "NULL".into())))
                .collect::<Vec<_>>()
                .join(",");
            (text, r.get(1))
        })
        .collect())
}

pub async fn verify(config: &Config, options: &VerifyOptions) -> Result<Vec<TableDiff>, OpsError> {
    let staging = Endpoint::from_db_config(&config.staging)?;
    let production = Endpoint::from_db_config(&config.production)?;
    let s = connect(&staging).await?;
    let p = connect(&production).await?;
    // Both sides read in one snapshot each, so a running sync shows as a consistent difference.
    for (client, endpoint) in [(&s, &staging), (&p, &production)] {
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(query_error(endpoint, "starting a snapshot"))?;
    }
    let mut diffs = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        let meta = schema::load_table(&s, &table.name)
            .await
            .map_err(query_error(&staging, "reading table definitions"))?
            .ok_or_else(|| {
                OpsError::Refused(format!("staging: table {} does not exist", table.name))
            })?;
        if meta.key.is_empty() {
            return Err(OpsError::Refused(format!(
                "staging: table {} has no primary key; verify compares rows by key",
                table.name
            )));
        }
        let sql = TableSql { meta: &meta };
        let boundaries = chunk_boundaries(&s, &sql, options.chunk_rows.max(1))
            .await
            .map_err(query_error(&staging, "reading key ranges"))?;
        let mut bounds: Vec<Range<'_>> = Vec::with_capacity(boundaries.len() + 1);
        let mut lower = None;
        for b in &boundaries {
            bounds.push((lower, Some(b)));
            lower = Some(b);
        }
        bounds.push((lower, None));
        let mut diff = TableDiff {
            table: table.name.to_string(),
            chunks: bounds.len(),
            ..TableDiff::default()
        };
        for (lower, upper) in bounds {
            // Both sides summarize the same range at the same time.
            let (staging_summary, production_summary) = tokio::join!(
                summarize_range(&s, &sql, lower, upper),
                summarize_range(&p, &sql, lower, upper)
            );
            let staging_summary =
                staging_summary.map_err(query_error(&staging, "hashing a table"))?;
            let production_summary =
                production_summary.map_err(query_error(&production, "hashing a table"))?;
            diff.staging_rows += staging_summary.rows;
            diff.production_rows += production_summary.rows;
            if staging_summary == production_summary {
                continue;
            }
            diff.chunks_differing += 1;
            let on_staging = rows_in_range(&s, &sql, lower, upper)
                .await
                .map_err(query_error(&staging, "reading differing rows"))?;
            let on_production = rows_in_range(&p, &sql, lower, upper)
                .await
                .map_err(query_error(&production, "reading differing rows"))?;
            let mut missing: Vec<&String> = Vec::new();
            let mut different: Vec<&String> = Vec::new();
            for (key, hash) in &on_staging {
                match on_production.get(key) {
                    None => missing.push(key),
                    Some(h) if h != hash => different.push(key),
                    Some(_) => {}
                }
            }
            let mut extra: Vec<&String> = on_production
                .keys()
                .filter(|k| !on_staging.contains_key(*k))
                .collect();
            for (list, count, examples) in [
                (&mut missing, &mut diff.missing, &mut diff.missing_keys),
                (
                    &mut different,
                    &mut diff.different,
                    &mut diff.different_keys,
                ),
                (&mut extra, &mut diff.extra, &mut diff.extra_keys),
            ] {
                list.sort();
                *count += list.len() as u64;
                for key in list
                    .iter()
                    .take(options.max_examples.saturating_sub(examples.len()))
                {
                    examples.push((*key).clone());
                }
            }
        }
        diffs.push(diff);
    }
    Ok(diffs)
}

/// One line per table, then the first keys of each difference.
pub fn render(diffs: &[TableDiff]) -> String {
    let mut out = String::new();
    for d in diffs {
        if d.matches() {
            out.push_str(&format!(
                "{}: match ({} rows, {} chunks)\n",
                d.table, d.staging_rows, d.chunks
            ));
            continue;
        }
        out.push_str(&format!(
            "{}: DIFFERS: {} rows on staging, {} on production; {} missing on production, {} extra on production, {} different ({} of {} chunks differ)\n",
            d.table, d.staging_rows, d.production_rows, d.missing, d.extra, d.different, d.chunks_differing, d.chunks
        ));
        for (label, keys) in [
            ("missing", &d.missing_keys),
            ("extra", &d.extra_keys),
            ("different", &d.different_keys),
        ] {
            if !keys.is_empty() {
                out.push_str(&format!("  {label}: {}\n", keys.join("; ")));
            }
        }
    }
    out
}
