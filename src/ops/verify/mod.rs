//! `stagingprop verify`: compares every managed table on staging and production, each side read
//! in one snapshot and both at the same time. When the first key column is an integer (the usual
//! case), its range of values on staging and the estimated row count cut the table into
//! buckets of about `chunk_rows` rows, and each side summarizes every bucket in one sequential
//! scan with a hash aggregate: row count and the XOR of the rows' 64-bit hashes (made by the
//! values' own hash functions), which does not depend on order, so nothing is sorted. Other keys are cut into ranges of whole keys that both
//! sides summarize by index range scans. Only the parts whose summaries differ are read row by
//! row to name the rows missing on production, extra on production, or different.
//!
//! Tables that key remapping touches (a rule other than identity, or columns referring to a
//! remapped table) are compared through the key map instead: production's rows are read with
//! their remapped columns translated back into staging's keys (joined with the key map on
//! production, or the offset undone), both sides stream (key, row hash) in the same order, and
//! the streams are merged. Rows production made itself are left out where the key map proves
//! it: a row of an allocating table without a mapping, or a row under a key staging's row of the
//! same key was moved away from (and the rows referring to such rows).

mod keyless;
pub mod repair;

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{OpsError, connect, query_error, state_error};
use crate::catalog::{self, TableMeta};
use crate::config::{Config, KeyRule, TableConfig, TableName};
use crate::pg::connect::Endpoint;
use crate::quote::quote_ident;
use crate::remap::Remapper;
use crate::state::key_map;

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub chunk_rows: i64,
    /// How many keys of each kind to report per table.
    pub max_examples: usize,
    /// Only these managed tables (all when empty).
    pub tables: Vec<TableName>,
    /// Only rows meeting this SQL condition, on both sides.
    pub condition: Option<String>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            chunk_rows: 10_000,
            max_examples: 10,
            tables: Vec::new(),
            condition: None,
        }
    }
}

impl VerifyOptions {
    /// The config's tables these options select, with their indexes; names one not managed.
    fn selected<'c>(&self, config: &'c Config) -> Result<Vec<(usize, &'c TableConfig)>, OpsError> {
        for name in &self.tables {
            if !config.tables.iter().any(|t| &t.name == name) {
                return Err(OpsError::Refused(format!(
                    "--table {name}: not a managed table of this config ([[tables]])"
                )));
            }
        }
        Ok(config
            .tables
            .iter()
            .enumerate()
            .filter(|(_, t)| self.tables.is_empty() || self.tables.contains(&t.name))
            .collect())
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
    /// Of the rows missing, extra or different: those production's users edited (recorded by
    /// the guard, and not overwritten by staging since). Not counted above.
    pub edited: u64,
    pub edited_keys: Vec<String>,
    pub chunks: usize,
    pub chunks_differing: usize,
    /// Production rows the table's row filter leaves out: not compared (they are production's,
    /// or were in scope under an earlier filter).
    pub outside_scope: i64,
}

/// A row filter and the operator's `--where` as a condition over the row (`true` without
/// either); a NULL result is outside.
fn scope_condition(filter: Option<&str>, condition: Option<&str>) -> String {
    let parts: Vec<String> = [filter, condition]
        .into_iter()
        .flatten()
        .map(|c| format!("coalesce(({c}), false)"))
        .collect();
    if parts.is_empty() {
        "true".to_owned()
    } else {
        parts.join(" AND ")
    }
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
    /// The table's row filter: only the rows it selects are compared.
    filter: Option<&'a str>,
    /// The operator's `--where`.
    condition: Option<&'a str>,
}

impl TableSql<'_> {
    /// The row filter and `--where` as a condition (`true` without either).
    fn in_scope(&self) -> String {
        scope_condition(self.filter, self.condition)
    }

    fn keys(&self) -> String {
        self.meta
            .key
            .iter()
            .map(|&k| quote_ident(&self.meta.columns[k].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The first key column, quoted.
    fn first_key(&self) -> String {
        quote_ident(&self.meta.columns[self.meta.key[0]].name)
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
        format!("md5({})", self.row_text())
    }

    /// The row's replicated columns in staging's order, as text.
    fn row_text(&self) -> String {
        let columns = self
            .meta
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        format!("ROW({columns})::text")
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

/// How one side's rows of a table read in staging's terms, for the bucketed summaries and the
/// chunk reads: staging's rows as they are, production's through the key map when remapping
/// touches the table (its own rows, which the key map proves, left out).
struct SideSql {
    /// FROM clause: the table as `t`, with the key map's joins.
    from: String,
    /// The rows compared: in scope, and not production's own.
    condition: String,
    /// The first key column, in staging's keys.
    first_key: String,
    /// The key columns as text, in staging's keys.
    key_texts: String,
    /// A 64-bit hash of the replicated columns' values, in staging's keys: each type's own
    /// hash function where it has one (no text output), the text's hash otherwise.
    row_hash64: String,
}

impl TableSql<'_> {
    fn side(&self, tr: Option<&Translation>) -> SideSql {
        let column = |name: &str| match tr {
            Some(tr) => tr.column(name),
            None => format!("t.{}", quote_ident(name)),
        };
        let meta = self.meta;
        let born = tr
            .filter(|tr| !tr.production_born.is_empty())
            .map(|tr| format!(" AND NOT ({})", tr.production_born.join(" OR ")))
            .unwrap_or_default();
        SideSql {
            from: format!(
                "{} t {}",
                meta.qualified(),
                tr.map(|tr| tr.joins.join(" ")).unwrap_or_default()
            ),
            condition: format!("{}{born}", self.in_scope()),
            first_key: column(&meta.columns[meta.key[0]].name),
            key_texts: meta
                .key
                .iter()
                .map(|&k| format!("({})::text", column(&meta.columns[k].name)))
                .collect::<Vec<_>>()
                .join(", "),
            row_hash64: format!(
                "hash_record_extended(ROW({}), 0)",
                meta.columns
                    .iter()
                    .map(|c| if hashable(&c.type_sql) {
                        column(&c.name)
                    } else {
                        format!("({})::text", column(&c.name))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
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
           FROM {table} WHERE {scope}) r WHERE rn > 1 AND (rn - 1) % $1 = 0 ORDER BY rn",
        key_texts = sql.key_texts(),
        keys = sql.keys(),
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
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
        "SELECT count(*)::bigint, md5(string_agg({hash}, '' ORDER BY {keys})) FROM {table} WHERE {range} AND {scope}",
        hash = sql.row_hash(),
        keys = sql.keys(),
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
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

/// A part of a table both sides summarized: a range of whole keys (as text), or a range of
/// the first key column's values (lower inclusive, upper exclusive; none: unbounded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bounds {
    Keys(Option<Vec<String>>, Option<Vec<String>>),
    FirstColumn(Option<i64>, Option<i64>),
}

impl Bounds {
    /// The condition selecting the part's rows (`first_key`: the first key column's
    /// expression, for buckets of it), and its parameters (text, then bigint).
    fn condition(&self, sql: &TableSql<'_>, first_key: &str) -> (String, Vec<String>, Vec<i64>) {
        match self {
            Bounds::Keys(lower, upper) => {
                let bounds: Vec<&Vec<String>> = lower.iter().chain(upper.iter()).collect();
                (
                    sql.range(lower.is_some(), upper.is_some(), 1),
                    params(&bounds),
                    Vec::new(),
                )
            }
            Bounds::FirstColumn(lower, upper) => {
                let first = first_key;
                let mut numbers = Vec::new();
                let mut conditions = vec!["true".to_owned()];
                for (bound, op) in [(lower, ">="), (upper, "<")] {
                    if let Some(value) = bound {
                        numbers.push(*value);
                        conditions.push(format!("{first} {op} ${}::bigint", numbers.len()));
                    }
                }
                (conditions.join(" AND "), Vec::new(), numbers)
            }
        }
    }
}

/// Key (as `col=value` text) to row hash, for one part on one side.
async fn rows_in(
    client: &Client,
    sql: &TableSql<'_>,
    part: &Bounds,
) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    let (condition, texts, numbers) = part.condition(sql, &sql.first_key());
    let query = format!(
        "SELECT ARRAY[{key_texts}], {hash} FROM {table} WHERE {condition} AND {scope}",
        key_texts = sql.key_texts(),
        hash = sql.row_hash(),
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
    );
    let refs: Vec<&(dyn ToSql + Sync)> = texts
        .iter()
        .map(|v| v as &(dyn ToSql + Sync))
        .chain(numbers.iter().map(|v| v as &(dyn ToSql + Sync)))
        .collect();
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

/// Bucket boundaries of the first key column (an integer) on staging, ascending: values
/// `width` apart from its smallest, `width` chosen so that a bucket holds about `chunk_rows`
/// rows were the values spread evenly (the rows as the planner estimates them; counted when
/// never analyzed). Two index probes instead of reading the whole index in order to cut it by
/// exact row counts (2.7 s of a 10M-row table); a bucket uneven keys make large is cut again
/// where it matters ([`exact_boundaries`]).
async fn first_column_boundaries(
    s: &Client,
    sql: &TableSql<'_>,
    chunk_rows: i64,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let first = sql.first_key();
    let table = sql.meta.qualified();
    let scope = sql.in_scope();
    let row = s
        .query_one(
            &format!(
                "SELECT min({first})::bigint, max({first})::bigint FROM {table} WHERE {scope}"
            ),
            &[],
        )
        .await?;
    let (Some(min), Some(max)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Ok(Vec::new());
    };
    let estimated: f64 = s
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::text::regclass",
            &[&table],
        )
        .await?
        .get(0);
    let rows = if estimated >= 1.0 {
        estimated as i128
    } else {
        s.query_one(&format!("SELECT count(*) FROM {table} WHERE {scope}"), &[])
            .await?
            .get::<_, i64>(0) as i128
    };
    Ok(value_boundaries(min, max, rows, chunk_rows))
}

/// Boundaries `width` apart from `min`, for about `chunk_rows` of `rows` rows per bucket over
/// the values `min..=max` (at most a million buckets).
fn value_boundaries(min: i64, max: i64, rows: i128, chunk_rows: i64) -> Vec<i64> {
    let span = i128::from(max) - i128::from(min) + 1;
    let buckets = (rows.max(1) + i128::from(chunk_rows) - 1) / i128::from(chunk_rows.max(1));
    let buckets = buckets.clamp(1, 1_000_000);
    let width = ((span + buckets - 1) / buckets).max(1);
    (1..)
        .map(|i| i128::from(min) + width * i)
        .take_while(|&b| b <= i128::from(max))
        .map(|b| b as i64)
        .collect()
}

/// Values of the first key column at every `chunk_rows`-th row of staging within `lower..upper`
/// (an index range in order): a bucket cut into parts of exactly that many rows.
async fn exact_boundaries(
    s: &Client,
    sql: &TableSql<'_>,
    chunk_rows: i64,
    (lower, upper): (Option<i64>, Option<i64>),
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let first = sql.first_key();
    let (range, _, numbers) = Bounds::FirstColumn(lower, upper).condition(sql, &first);
    let n = numbers.len() + 1;
    let query = format!(
        "SELECT DISTINCT k FROM (SELECT {first}::bigint AS k, row_number() OVER (ORDER BY {first}) AS rn
           FROM {table} WHERE {range} AND {scope}) r WHERE rn % ${n} = 0 ORDER BY k",
        table = sql.meta.qualified(),
        scope = sql.in_scope(),
    );
    let mut params: Vec<&(dyn ToSql + Sync)> =
        numbers.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    params.push(&chunk_rows);
    Ok(s.query(&query, &params)
        .await?
        .iter()
        .map(|r| r.get(0))
        .filter(|&k: &i64| Some(k) != lower)
        .collect())
}

/// Per bucket of the first key column: row count and the sum of 64-bit row hashes, from one
/// sequential scan with a hash aggregate (the sum does not depend on order, so nothing sorts).
async fn summarize_buckets(
    client: &Client,
    side: &SideSql,
    bounds: &[i64],
) -> Result<HashMap<i32, ChunkSummary>, tokio_postgres::Error> {
    let bucket = if bounds.is_empty() {
        "0".to_owned()
    } else {
        format!("width_bucket(({})::bigint, $1::bigint[])", side.first_key)
    };
    // The rows' 64-bit hashes combined by XOR (order-free, and cheaper than a numeric sum),
    // each from the values' own hash functions: no text output, which dominated.
    let query = format!(
        "SELECT {bucket}, count(*)::bigint, bit_xor({row})::text
           FROM {from} WHERE {condition} GROUP BY 1",
        row = side.row_hash64,
        from = side.from,
        condition = side.condition,
    );
    let bounds = bounds.to_vec();
    let rows = if bounds.is_empty() {
        client.query(&query, &[]).await?
    } else {
        client.query(&query, &[&bounds]).await?
    };
    Ok(rows
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

/// How production's rows of a remapped or referring table read in staging's keys.
#[derive(Debug, Default)]
struct Translation {
    /// Per column (by name): the SQL expression of its staging value over production's row `t`.
    exprs: HashMap<String, String>,
    joins: Vec<String>,
    /// Conditions that prove a row production's own.
    production_born: Vec<String>,
}

impl Translation {
    fn column(&self, name: &str) -> String {
        self.exprs
            .get(name)
            .cloned()
            .unwrap_or_else(|| format!("t.{}", quote_ident(name)))
    }
}

/// The translation of config table `t`, or `None` when key remapping does not touch it.
fn translation(config: &Config, remapper: &Remapper, t: usize) -> Option<Translation> {
    let mut columns: Vec<(usize, usize)> = remapper
        .references(t)
        .iter()
        .map(|r| (r.column, r.parent))
        .collect();
    if let Some(k) = remapper.key_column(t) {
        columns.push((k, t));
    }
    if columns.is_empty() {
        return None;
    }
    let mut tr = Translation::default();
    for (i, (column, parent)) in columns.into_iter().enumerate() {
        let name = remapper.column_name(t, column);
        let value = format!("t.{}", quote_ident(name));
        let parent_name = &config.tables[parent].name;
        let expr = match remapper.rule(parent) {
            KeyRule::Identity => continue,
            KeyRule::Offset { offset } => format!("({value} - ({offset})::bigint)"),
            rule => {
                let alias = format!("m{i}");
                tr.joins
                    .push(key_map::join_to_source(&alias, parent_name, &value));
                tr.production_born.push(match rule {
                    KeyRule::RemapOnConflict { .. } => format!(
                        "({alias}.source_key IS NULL AND ({} OR {}))",
                        key_map::is_mapped(parent_name, &value),
                        key_map::is_production_key(parent_name, &value)
                    ),
                    _ => format!("({value} IS NOT NULL AND {alias}.source_key IS NULL)"),
                });
                format!("coalesce({alias}.source_key, {value})")
            }
        };
        tr.exprs.insert(name.to_owned(), expr);
    }
    Some(tr)
}

/// Whether values of the type (as `format_type` spells it) hash by the type's own hash
/// function, equal on both sides for equal values (an integer of another width, a varchar
/// for a text, a numeric of another scale included); other types are hashed as text.
fn hashable(type_sql: &str) -> bool {
    let base = type_sql.split('(').next().unwrap_or(type_sql).trim();
    matches!(
        base,
        "smallint"
            | "integer"
            | "bigint"
            | "numeric"
            | "text"
            | "character varying"
            | "boolean"
            | "date"
            | "timestamp without time zone"
            | "timestamp with time zone"
            | "uuid"
            | "bytea"
            | "jsonb"
    )
}

fn integer_type(type_sql: &str) -> bool {
    matches!(type_sql, "smallint" | "integer" | "bigint")
}

/// Key parts in merge order: integers by value, anything else by its text in byte order (the
/// queries sort the same way: integer columns as such, others as text COLLATE "C").
fn compare_keys(
    a: &[Option<String>],
    b: &[Option<String>],
    integer: &[bool],
) -> std::cmp::Ordering {
    for ((x, y), &int) in a.iter().zip(b).zip(integer) {
        let order = match (x, y, int) {
            (Some(x), Some(y), true) => match (x.parse::<i64>(), y.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => x.as_bytes().cmp(y.as_bytes()),
            },
            (Some(x), Some(y), false) => x.as_bytes().cmp(y.as_bytes()),
            (x, y, _) => x.is_some().cmp(&y.is_some()),
        };
        if order.is_ne() {
            return order;
        }
    }
    std::cmp::Ordering::Equal
}

/// Compares one table through the key map: both sides stream (staging key, row hash) sorted
/// the same way and are merged.
async fn verify_translated(
    s: &Client,
    p: &Client,
    sql: &TableSql<'_>,
    tr: &Translation,
    options: &VerifyOptions,
    endpoints: (&Endpoint, &Endpoint),
) -> Result<TableDiff, OpsError> {
    let meta = sql.meta;
    let integer: Vec<bool> = meta
        .key
        .iter()
        .map(|&k| integer_type(&meta.columns[k].type_sql))
        .collect();
    let order = |expr: &dyn Fn(&str) -> String| -> String {
        meta.key
            .iter()
            .zip(&integer)
            .map(|(&k, &int)| {
                let e = expr(&meta.columns[k].name);
                if int {
                    e
                } else {
                    format!("({e})::text COLLATE \"C\"")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let plain = |name: &str| format!("t.{}", quote_ident(name));
    let translated = |name: &str| tr.column(name);
    let select = |expr: &dyn Fn(&str) -> String| -> (String, String) {
        let keys = meta
            .key
            .iter()
            .map(|&k| format!("({})::text", expr(&meta.columns[k].name)))
            .collect::<Vec<_>>()
            .join(", ");
        let columns = meta
            .columns
            .iter()
            .map(|c| expr(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        (keys, columns)
    };
    let (keys, columns) = select(&plain);
    let staging_sql = format!(
        "SELECT ARRAY[{keys}], md5(ROW({columns})::text) FROM {} t WHERE {} ORDER BY {}",
        meta.qualified(),
        sql.in_scope(),
        order(&plain)
    );
    let (keys, columns) = select(&translated);
    let born = if tr.production_born.is_empty() {
        "false".to_owned()
    } else {
        tr.production_born.join(" OR ")
    };
    let production_sql = format!(
        "SELECT ARRAY[{keys}], md5(ROW({columns})::text) FROM {} t {} WHERE NOT ({born}) AND {} ORDER BY {}",
        meta.qualified(),
        tr.joins.join(" "),
        sql.in_scope(),
        order(&translated)
    );
    let (staging, production) = endpoints;
    let no_params: [&(dyn ToSql + Sync); 0] = [];
    let (on_staging, on_production) = tokio::join!(
        s.query_raw(&staging_sql, no_params),
        p.query_raw(&production_sql, no_params)
    );
    let on_staging = on_staging.map_err(query_error(staging, "reading a table"))?;
    let on_production = on_production.map_err(query_error(production, "reading a table"))?;
    futures_util::pin_mut!(on_staging);
    futures_util::pin_mut!(on_production);
    let names: Vec<&str> = meta
        .key
        .iter()
        .map(|&k| meta.columns[k].name.as_str())
        .collect();
    let key_text = |key: &[Option<String>]| {
        names
            .iter()
            .zip(key)
            .map(|(n, v)| format!("{n}={}", v.as_deref().unwrap_or("NULL")))
            .collect::<Vec<_>>()
            .join(",")
    };
    type Head = Option<(Vec<Option<String>>, Option<String>)>;
    let read = |row: Option<Result<tokio_postgres::Row, tokio_postgres::Error>>| -> Result<Head, tokio_postgres::Error> {
        Ok(match row {
            None => None,
            Some(row) => {
                let row = row?;
                Some((row.get(0), row.get(1)))
            }
        })
    };
    use futures_util::StreamExt;
    let mut diff = TableDiff {
        table: meta.table_name().to_string(),
        chunks: 1,
        ..TableDiff::default()
    };
    let mut a = read(on_staging.next().await).map_err(query_error(staging, "reading a table"))?;
    let mut b =
        read(on_production.next().await).map_err(query_error(production, "reading a table"))?;
    let (mut staging_done, mut production_done) = (a.is_none(), b.is_none());
    let note = |examples: &mut Vec<String>, key: &[Option<String>]| {
        if examples.len() < options.max_examples {
            examples.push(key_text(key));
        }
    };
    loop {
        let order = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((x, _)), Some((y, _))) => compare_keys(x, y, &integer),
        };
        match order {
            std::cmp::Ordering::Less => {
                let (key, _) = a.take().expect("compared");
                diff.staging_rows += 1;
                diff.missing += 1;
                note(&mut diff.missing_keys, &key);
            }
            std::cmp::Ordering::Greater => {
                let (key, _) = b.take().expect("compared");
                diff.production_rows += 1;
                diff.extra += 1;
                note(&mut diff.extra_keys, &key);
            }
            std::cmp::Ordering::Equal => {
                let (key, x) = a.take().expect("compared");
                let (_, y) = b.take().expect("compared");
                diff.staging_rows += 1;
                diff.production_rows += 1;
                if x != y {
                    diff.different += 1;
                    note(&mut diff.different_keys, &key);
                }
            }
        }
        // A finished stream is not polled again (it would report a closed connection).
        if a.is_none() && !staging_done {
            a = read(on_staging.next().await).map_err(query_error(staging, "reading a table"))?;
            staging_done = a.is_none();
        }
        if b.is_none() && !production_done {
            b = read(on_production.next().await)
                .map_err(query_error(production, "reading a table"))?;
            production_done = b.is_none();
        }
    }
    diff.chunks_differing = usize::from(!diff.matches());
    Ok(diff)
}

/// Key remapping of the managed tables as sync applies it (`None`: every table keeps its keys).
async fn remapping(
    config: &Config,
    s: &Client,
    p: &Client,
    staging: &Endpoint,
    production: &Endpoint,
) -> Result<Option<Remapper>, OpsError> {
    if config.tables.iter().all(|t| t.key == KeyRule::Identity) {
        return Ok(None);
    }
    let mut metas = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        let meta = catalog::load_table(p, &table.name)
            .await
            .map_err(query_error(production, "reading table definitions"))?
            .ok_or_else(|| {
                OpsError::Refused(format!("production: table {} does not exist", table.name))
            })?;
        metas.push(meta);
    }
    let declared = catalog::column_references(s)
        .await
        .map_err(query_error(staging, "reading foreign keys"))?;
    Remapper::new(config, &metas, &declared).map_err(|problems| {
        OpsError::Refused(format!(
            "key remapping cannot work with these tables:\n  - {}",
            problems.join("\n  - ")
        ))
    })
}

/// Every part of a keyed table with both sides' summaries (`None`: no rows there). When the
/// first key column is an integer, one scan per side, both at once, bucketed by it (production's
/// rows read through the key map with `tr`); otherwise ranges of whole keys, both sides at the
/// same time (never with `tr`).
async fn summarize_table(
    s: &Client,
    p: &Client,
    sql: &TableSql<'_>,
    tr: Option<&Translation>,
    chunk_rows: i64,
    endpoints: (&Endpoint, &Endpoint),
) -> Result<Vec<(Bounds, ChunkSummary, ChunkSummary)>, OpsError> {
    let (staging, production) = endpoints;
    let empty = || ChunkSummary {
        rows: 0,
        hash: None,
    };
    let mut parts = Vec::new();
    if integer_type(&sql.meta.columns[sql.meta.key[0]].type_sql) {
        let bounds = first_column_boundaries(s, sql, chunk_rows.max(1))
            .await
            .map_err(query_error(staging, "reading key ranges"))?;
        let (staging_side, production_side) = (sql.side(None), sql.side(tr));
        let (on_staging, on_production) = tokio::join!(
            summarize_buckets(s, &staging_side, &bounds),
            summarize_buckets(p, &production_side, &bounds)
        );
        let mut on_staging = on_staging.map_err(query_error(staging, "hashing a table"))?;
        let mut on_production =
            on_production.map_err(query_error(production, "hashing a table"))?;
        for bucket in 0..=bounds.len() {
            let lower = bucket.checked_sub(1).map(|i| bounds[i]);
            let upper = bounds.get(bucket).copied();
            parts.push((
                Bounds::FirstColumn(lower, upper),
                on_staging.remove(&(bucket as i32)).unwrap_or_else(empty),
                on_production.remove(&(bucket as i32)).unwrap_or_else(empty),
            ));
        }
        return Ok(parts);
    }
    let boundaries = chunk_boundaries(s, sql, chunk_rows.max(1))
        .await
        .map_err(query_error(staging, "reading key ranges"))?;
    let mut lower: Option<&Vec<String>> = None;
    let mut ranges: Vec<Range<'_>> = Vec::with_capacity(boundaries.len() + 1);
    for b in &boundaries {
        ranges.push((lower, Some(b)));
        lower = Some(b);
    }
    ranges.push((lower, None));
    for (lower, upper) in ranges {
        let (staging_summary, production_summary) = tokio::join!(
            summarize_range(s, sql, lower, upper),
            summarize_range(p, sql, lower, upper)
        );
        parts.push((
            Bounds::Keys(lower.cloned(), upper.cloned()),
            staging_summary.map_err(query_error(staging, "hashing a table"))?,
            production_summary.map_err(query_error(production, "hashing a table"))?,
        ));
    }
    Ok(parts)
}

/// Loads staging's managed part of `table`.
async fn staging_meta(
    s: &Client,
    staging: &Endpoint,
    table: &TableConfig,
) -> Result<TableMeta, OpsError> {
    catalog::load_table(s, &table.name)
        .await
        .map_err(query_error(staging, "reading table definitions"))?
        .ok_or_else(|| OpsError::Refused(format!("staging: table {} does not exist", table.name)))?
        .managed_part(&table.columns, "staging")
        .map_err(OpsError::Refused)
}

/// Keys of `table`'s rows production's users edited (recorded by the guard, not overwritten
/// since), as key text values.
async fn edited_keys(
    p: &Client,
    production: &Endpoint,
    table: &TableName,
) -> Result<std::collections::HashSet<Vec<String>>, OpsError> {
    Ok(
        crate::state::production_edits::kept_keys(p, &table.to_string())
            .await
            .map_err(state_error(production))?
            .into_iter()
            .collect(),
    )
}

pub async fn verify(config: &Config, options: &VerifyOptions) -> Result<Vec<TableDiff>, OpsError> {
    let staging = Endpoint::from_db_config(&config.staging)?;
    let production = Endpoint::from_db_config(&config.production)?;
    let s = connect(&staging).await?;
    let p = connect(&production).await?;
    let config = &crate::catalog::expand_patterns(config, &[&s])
        .await
        .map_err(query_error(
            &staging,
            "listing the tables of [[table_patterns]]",
        ))?;
    let selected = options.selected(config)?;
    // Both sides read in one snapshot each, so a running sync shows as a consistent difference.
    for (client, endpoint) in [(&s, &staging), (&p, &production)] {
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(query_error(endpoint, "starting a snapshot"))?;
    }
    let remapper = remapping(config, &s, &p, &staging, &production).await?;
    let condition = options.condition.as_deref();
    let mut diffs = Vec::with_capacity(selected.len());
    for (t, table) in selected {
        let meta = staging_meta(&s, &staging, table).await?;
        let filter = table.filter.as_deref();
        let outside_scope = match filter {
            None => 0,
            Some(filter) => p
                .query_one(
                    &format!(
                        "SELECT count(*)::bigint FROM {} WHERE NOT coalesce(({filter}), false)",
                        meta.qualified()
                    ),
                    &[],
                )
                .await
                .map_err(query_error(&production, "counting rows outside the filter"))?
                .get(0),
        };
        let sql = TableSql {
            meta: &meta,
            filter,
            condition,
        };
        if meta.key.is_empty() {
            let mut diff =
                keyless::verify_keyless(&s, &p, &sql, options, (&staging, &production)).await?;
            diff.outside_scope = outside_scope;
            diffs.push(diff);
            continue;
        }
        if let Some(tr) = remapper.as_ref().and_then(|r| translation(config, r, t)) {
            let mut diff =
                verify_translated(&s, &p, &sql, &tr, options, (&staging, &production)).await?;
            diff.outside_scope = outside_scope;
            diffs.push(diff);
            continue;
        }
        let mut diff = TableDiff {
            table: table.name.to_string(),
            outside_scope,
            ..TableDiff::default()
        };
        // Rows production's users edited, as `rows_in` labels keys.
        let key_names: Vec<&str> = meta
            .key
            .iter()
            .map(|&k| meta.columns[k].name.as_str())
            .collect();
        let edited: std::collections::HashSet<String> = edited_keys(&p, &production, &table.name)
            .await?
            .into_iter()
            .map(|key| {
                key_names
                    .iter()
                    .zip(key)
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect();
        let parts = summarize_table(
            &s,
            &p,
            &sql,
            None,
            options.chunk_rows,
            (&staging, &production),
        )
        .await?;
        diff.chunks = parts.len();
        for (part, staging_summary, production_summary) in parts {
            diff.staging_rows += staging_summary.rows;
            diff.production_rows += production_summary.rows;
            if staging_summary == production_summary {
                continue;
            }
            diff.chunks_differing += 1;
            let on_staging = rows_in(&s, &sql, &part)
                .await
                .map_err(query_error(&staging, "reading differing rows"))?;
            let on_production = rows_in(&p, &sql, &part)
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
            let mut edited_here: Vec<&String> = Vec::new();
            for list in [&mut missing, &mut different, &mut extra] {
                list.retain(|key| {
                    let kept = edited.contains(*key);
                    if kept {
                        edited_here.push(key);
                    }
                    !kept
                });
            }
            for (list, count, examples) in [
                (&mut edited_here, &mut diff.edited, &mut diff.edited_keys),
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
        let outside = if d.outside_scope > 0 {
            format!(
                "; {} production row(s) outside the filter, not compared",
                d.outside_scope
            )
        } else {
            String::new()
        };
        let edited = if d.edited > 0 {
            format!(
                "; {} row(s) differ where production's users edited them (recorded by the guard): {}",
                d.edited,
                d.edited_keys.join("; ")
            )
        } else {
            String::new()
        };
        if d.matches() {
            out.push_str(&format!(
                "{}: match ({} rows, {} chunks{outside}{edited})\n",
                d.table, d.staging_rows, d.chunks
            ));
            continue;
        }
        out.push_str(&format!(
            "{}: DIFFERS: {} rows on staging, {} on production; {} missing on production, {} extra on production, {} different, for no recorded reason ({} of {} chunks differ{outside}{edited})\n",
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

#[cfg(test)]
mod tests {
    use super::value_boundaries;

    #[test]
    fn buckets_of_an_integer_key_are_cut_by_value_for_about_the_rows_asked() {
        // 1000 dense keys, 64 rows a bucket: 16 buckets 63 values wide.
        let bounds = value_boundaries(1, 1000, 1000, 64);
        assert_eq!(bounds.len(), 15);
        assert_eq!(&bounds[..2], &[64, 127]);
        // Sparse keys: as many buckets as the rows need, wider.
        assert_eq!(value_boundaries(0, 999_999, 100, 50), vec![500_000]);
        // One value, or fewer rows than a bucket: one bucket.
        assert!(value_boundaries(7, 7, 1, 10).is_empty());
        assert!(value_boundaries(1, 10, 5, 10).is_empty());
        // The whole bigint range does not overflow.
        let wide = value_boundaries(i64::MIN, i64::MAX, 4, 1);
        assert_eq!(wide.len(), 3);
        assert!(wide.windows(2).all(|w| w[0] < w[1]));
    }
}
