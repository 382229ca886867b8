//! `verify --repair`: makes production's differing chunks equal to staging's while sync runs.
//!
//! A verify pass finds the chunks whose summaries differ and writes them down as a plan on
//! production (`stagingprop.repairs`, `repair_chunks`). Then, chunk by chunk: a low watermark
//! goes into staging's WAL; in one snapshot the chunk's rows are read on staging, production's
//! are compared with them, and the rows production must take (missing or different there) and
//! the keys it must lose go into staging's WAL as the high watermark, in the same transaction.
//! Sync applies the chunk at the high watermark, minus what the stream changed between the two
//! (see `crate::repair`), and writes its outcome beside the rows. The repair waits for that
//! outcome before the next chunk; an interrupted (or lost) chunk is read again. Rows the guard
//! recorded as production's own edits are kept, never repaired. A repair run again first waits
//! until sync has answered everything an earlier run emitted, then resumes at the chunks not
//! done, so each chunk is applied exactly once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use super::{
    Bounds, OpsError, TableSql, Translation, VerifyOptions, connect, edited_keys, exact_boundaries,
    integer_type, query_error, remapping, staging_meta, state_error, summarize_table, translation,
};
use crate::catalog::TableMeta;
use crate::config::{Config, TableConfig};
use crate::model::Lsn;
use crate::pg::connect::Endpoint;
use crate::repair::{Chunk, ChunkId, KeyText, PREFIX, Watermark};
use crate::state::{self, repairs};

#[derive(Clone, Debug)]
pub struct RepairOptions {
    pub verify: VerifyOptions,
    /// Say what would be written, write nothing.
    pub dry_run: bool,
    /// How long to wait for sync to answer one chunk.
    pub wait: Duration,
    /// Seed the tables (`resync`, a table added): while it runs, their conflicts in the stream
    /// are the seed's to settle.
    pub seed: bool,
}

/// What the repair did (or, in a dry run, would do) to one table.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TableRepair {
    pub table: String,
    /// Chunks that differed, and of them those applied (or found equal by the time they were
    /// read again).
    pub chunks: usize,
    pub chunks_done: usize,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    /// Rows production's users edited (recorded by the guard): kept as they are.
    pub kept: i64,
    pub kept_keys: Vec<String>,
    /// Rows the stream changed while their chunk was read: left to the stream.
    pub left_to_stream: i64,
    /// Chunks read again (sync restarted inside their window, or lost them).
    pub retries: i64,
    /// Chunks production refused, with why.
    pub failed: Vec<String>,
    /// Why the table was not repaired at all.
    pub not_repaired: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    pub repair: Option<i64>,
    pub resumed: bool,
    pub dry_run: bool,
    pub tables: Vec<TableRepair>,
    /// What the operator should know besides (child tables of re-seeded ones, say).
    pub notes: Vec<String>,
}

impl RepairReport {
    pub fn failed(&self) -> bool {
        self.tables.iter().any(|t| !t.failed.is_empty())
    }
}

/// How many times a chunk is sent before the repair gives it up.
const MAX_ATTEMPTS: i32 = 10;

/// How many chunks may wait for sync's answer at once.
const IN_FLIGHT: usize = 16;

/// How many rows (in chunks of `chunk_rows`) may wait for sync's answer at once: sync applies
/// them in the stream's order, so every other table's changes wait behind them (measured:
/// 16 chunks of 10,000 rows in flight held the other tables 1.5 s behind).
const IN_FLIGHT_CHUNK_ROWS: i64 = 2;

/// How often production is asked for a chunk's outcome.
const POLL: Duration = Duration::from_millis(20);

/// One table to repair.
struct Repairable<'c> {
    config: &'c TableConfig,
    meta: TableMeta,
    /// How production's rows read in staging's keys, when key remapping touches the table.
    tr: Option<Translation>,
}

struct Sides<'a> {
    s: &'a Client,
    p: &'a Client,
    staging: &'a Endpoint,
    production: &'a Endpoint,
    slot: &'a str,
    /// What this target's sync answers to ([`Config::repair_target`]).
    target: &'a str,
}

pub async fn repair(config: &Config, options: &RepairOptions) -> Result<RepairReport, OpsError> {
    let selected = options.verify.selected(config)?;
    let staging = Endpoint::from_db_config(&config.staging)?;
    let production = Endpoint::from_db_config(&config.production)?;
    let s = connect(&staging).await?;
    let p = connect(&production).await?;
    let slot = config.sync.slot.as_str();
    // A watermark or a plan row lost in a crash is a chunk sent again: no flush waited for.
    for (client, endpoint) in [(&s, &staging), (&p, &production)] {
        client
            .batch_execute("SET synchronous_commit = off")
            .await
            .map_err(query_error(endpoint, "setting up the session"))?;
    }
    if !options.dry_run {
        state::ensure(&p).await.map_err(state_error(&production))?;
        let locked: bool = p
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('stagingprop.repair:' || $1))",
                &[&slot],
            )
            .await
            .map_err(query_error(&production, "taking the repair lock"))?
            .get(0);
        if !locked {
            return Err(OpsError::Refused(format!(
                "another verify --repair is running against this production for slot {slot}; \
                 wait for it to finish"
            )));
        }
    }
    let remapper = remapping(config, &s, &p, &staging, &production).await?;
    let mut report = RepairReport {
        dry_run: options.dry_run,
        ..RepairReport::default()
    };
    let mut tables: Vec<Repairable<'_>> = Vec::new();
    for (t, table) in selected {
        let meta = staging_meta(&s, &staging, table).await?;
        let tr = remapper.as_ref().and_then(|r| translation(config, r, t));
        let why_not = if meta.key.is_empty() {
            Some(
                "it has no primary key: repair finds rows by key; re-seed it with `copy --tables NAME \
                 --truncate` (sync stopped)",
            )
        } else if tr.is_some() && !integer_type(&meta.columns[meta.key[0]].type_sql) {
            Some(
                "key remapping touches it and its first key column is not an integer, which \
                 online repair cuts remapped tables by; re-seed it with `copy --tables NAME \
                 --truncate` (sync stopped)",
            )
        } else {
            None
        };
        match why_not {
            Some(why) if !options.verify.tables.is_empty() => {
                return Err(OpsError::Refused(format!(
                    "cannot repair {}: {why}",
                    table.name
                )));
            }
            Some(why) => report.tables.push(TableRepair {
                table: table.name.to_string(),
                not_repaired: Some(why.to_owned()),
                ..TableRepair::default()
            }),
            None => tables.push(Repairable {
                config: table,
                meta,
                tr,
            }),
        }
    }
    let sides = Sides {
        s: &s,
        p: &p,
        staging: &staging,
        production: &production,
        slot,
        target: config.repair_target(),
    };
    let names: Vec<String> = tables.iter().map(|t| t.config.name.to_string()).collect();
    let condition = options.verify.condition.clone();
    // An earlier run's chunks in staging's WAL are answered before anything else is decided.
    // The unfinished repair resumed, and whether it has its chunks planned already (a
    // seeding `init` registered has none yet).
    let mut resume: Option<(i64, bool)> = None;
    if !options.dry_run
        && let Some(earlier) = repairs::unfinished(&p, slot)
            .await
            .map_err(state_error(&production))?
    {
        wait_for_sync_past(&sides, current_wal(&sides).await?, options.wait).await?;
        if earlier.tables == names
            && earlier.condition == condition
            && earlier.seeding == options.seed
        {
            let planned = !repairs::chunks(&p, earlier.id)
                .await
                .map_err(state_error(&production))?
                .is_empty();
            tracing::info!(
                repair = earlier.id,
                started_at = %earlier.started_at,
                "resuming an unfinished repair"
            );
            resume = Some((earlier.id, planned));
        } else {
            if earlier.seeding {
                end_seeding(&sides, earlier.id, &earlier.tables, options.wait).await?;
            }
            repairs::finish(&p, earlier.id, "abandoned")
                .await
                .map_err(state_error(&production))?;
            tracing::info!(
                repair = earlier.id,
                "an unfinished repair of other tables is abandoned: this one replaces it"
            );
        }
    }
    if options.seed {
        report.notes = children_to_follow(config, &p, &production, &names).await?;
    }
    let by_name: HashMap<String, &Repairable<'_>> = tables
        .iter()
        .map(|t| (t.config.name.to_string(), t))
        .collect();
    for t in &tables {
        report.tables.push(TableRepair {
            table: t.config.name.to_string(),
            ..TableRepair::default()
        });
    }
    // The plan: (table, bounds, chunk number) of every differing chunk.
    let plan: Vec<(String, Bounds, Option<i32>)> = match resume {
        Some((id, true)) => {
            report.resumed = true;
            let chunks = repairs::chunks(&p, id)
                .await
                .map_err(state_error(&production))?;
            for c in &chunks {
                let entry = table_entry(&mut report, &c.table);
                entry.chunks += 1;
                if c.state.is_done() {
                    entry.chunks_done += 1;
                    entry.inserted += c.inserted;
                    entry.updated += c.updated;
                    entry.deleted += c.deleted;
                    entry.left_to_stream += c.left_out;
                }
                entry.kept += c.kept;
            }
            chunks
                .into_iter()
                .filter(|c| !c.state.is_done())
                .map(|c| {
                    let bounds = serde_json::from_value(c.bounds).map_err(|e| {
                        OpsError::Refused(format!(
                            "repair {id} chunk {} has bounds this release cannot read ({e}); \
                             finish it with the release that planned it",
                            c.chunk
                        ))
                    })?;
                    Ok((c.table, bounds, Some(c.chunk)))
                })
                .collect::<Result<_, OpsError>>()?
        }
        Some((_, false)) | None => {
            report.resumed = resume.is_some();
            let mut plan = Vec::new();
            for t in &tables {
                let sql = t.sql(condition.as_deref());
                let parts = summarize_table(
                    &s,
                    &p,
                    &sql,
                    t.tr.as_ref(),
                    options.verify.chunk_rows,
                    (&staging, &production),
                )
                .await?;
                // A differing bucket uneven keys made large is cut into chunks of about
                // `chunk_rows` rows.
                let mut differing: Vec<Bounds> = Vec::new();
                for (bounds, on_staging, on_production) in parts {
                    if on_staging == on_production {
                        continue;
                    }
                    match bounds {
                        Bounds::FirstColumn(lower, upper)
                            if on_staging.rows > 4 * options.verify.chunk_rows =>
                        {
                            let cuts = exact_boundaries(
                                &s,
                                &sql,
                                options.verify.chunk_rows,
                                (lower, upper),
                            )
                            .await
                            .map_err(query_error(&staging, "reading key ranges"))?;
                            let mut from = lower;
                            for cut in cuts {
                                differing.push(Bounds::FirstColumn(from, Some(cut)));
                                from = Some(cut);
                            }
                            differing.push(Bounds::FirstColumn(from, upper));
                        }
                        other => differing.push(other),
                    }
                }
                table_entry(&mut report, &t.config.name.to_string()).chunks += differing.len();
                plan.extend(
                    differing
                        .into_iter()
                        .map(|b| (t.config.name.to_string(), b, None)),
                );
            }
            if !options.dry_run {
                let rows: Vec<(String, serde_json::Value, i64)> = plan
                    .iter()
                    .map(|(table, bounds, _)| {
                        (
                            table.clone(),
                            serde_json::to_value(bounds).expect("bounds serialize"),
                            0,
                        )
                    })
                    .collect();
                let id = match resume {
                    Some((id, _)) => id,
                    None => repairs::begin(&p, slot, &names, condition.as_deref(), options.seed)
                        .await
                        .map_err(state_error(&production))?,
                };
                repairs::plan(&p, id, &rows)
                    .await
                    .map_err(state_error(&production))?;
                report.repair = Some(id);
                plan = plan
                    .into_iter()
                    .enumerate()
                    .map(|(n, (table, bounds, _))| (table, bounds, Some(n as i32)))
                    .collect();
            }
            plan
        }
    };
    if let Some((id, _)) = resume {
        report.repair = Some(id);
    }
    // Keys (production's) of rows production's users edited, per table.
    let mut edited: HashMap<String, HashSet<Vec<String>>> = HashMap::new();
    for t in &tables {
        let keys = edited_keys(&p, &production, &t.config.name).await?;
        edited.insert(t.config.name.to_string(), keys);
    }
    let entry_of = |report: &RepairReport, table: &str| {
        report
            .tables
            .iter()
            .position(|e| e.table == table)
            .expect("every table has an entry")
    };
    let Some(id) = report.repair.filter(|_| !options.dry_run) else {
        // Dry run: what each chunk would take, read now.
        for (table, bounds, _) in &plan {
            let t = by_name[table];
            let sql = t.sql(condition.as_deref());
            let diff = chunk_diff(&sides, &sql, t.tr.as_ref(), bounds, &edited[table]).await?;
            let index = entry_of(&report, table);
            let entry = &mut report.tables[index];
            entry.inserted += diff.missing as i64;
            entry.updated += (diff.upserts.len() - diff.missing) as i64;
            entry.deleted += diff.deletes.len() as i64;
            entry.kept += diff.kept.len() as i64;
            note_kept(entry, &sql, diff.kept);
        }
        return Ok(report);
    };
    if options.seed {
        let seeding = Watermark::Seeding {
            repair: id,
            target: sides.target.to_owned(),
            tables: names.clone(),
        };
        emit(sides.s, &seeding)
            .await
            .map_err(query_error(sides.staging, "writing a seeding's start"))?;
    }
    // Chunks go out back to back (a high watermark always precedes the next low one, so their
    // windows never overlap) with at most IN_FLIGHT unanswered; an answer is awaited oldest
    // first, and a chunk sync could not apply whole goes out again.
    let total = plan.len();
    let mut attempts = vec![0_i32; total];
    let mut queue: VecDeque<usize> = (0..total).collect();
    let mut in_flight: VecDeque<(usize, Lsn, Vec<KeyText>, usize)> = VecDeque::new();
    let row_budget = (IN_FLIGHT_CHUNK_ROWS * options.verify.chunk_rows).max(1) as usize;
    let mut rows_in_flight = 0;
    let mut finished = 0;
    while !queue.is_empty() || !in_flight.is_empty() {
        let room =
            in_flight.is_empty() || (in_flight.len() < IN_FLIGHT && rows_in_flight < row_budget);
        if room && let Some(i) = queue.pop_front() {
            let (table, bounds, chunk) = &plan[i];
            let t = by_name[table];
            let sql = t.sql(condition.as_deref());
            let n = chunk.expect("planned chunks are numbered");
            attempts[i] += 1;
            let (past_high, kept, rows) =
                send_chunk(&sides, &sql, t.tr.as_ref(), bounds, &edited[table], (id, n)).await?;
            rows_in_flight += rows;
            in_flight.push_back((i, past_high, kept, rows));
            continue;
        }
        let (i, past_high, kept, rows) = in_flight.pop_front().expect("one is in flight");
        rows_in_flight -= rows;
        let (table, _, chunk) = &plan[i];
        let n = chunk.expect("planned chunks are numbered");
        let row = wait_for_outcome(&sides, (id, n), past_high, options.wait).await?;
        let entry_index = entry_of(&report, table);
        let again = row
            .as_ref()
            .is_none_or(|r| r.state == repairs::ChunkState::Interrupted);
        if again && attempts[i] < MAX_ATTEMPTS {
            report.tables[entry_index].retries += 1;
            tracing::info!(repair = id, chunk = n, table = %table, "sync could not apply the chunk whole; reading it again");
            queue.push_back(i);
            continue;
        }
        finished += 1;
        let entry = &mut report.tables[entry_index];
        match row {
            Some(row) if row.state.is_done() => {
                entry.chunks_done += 1;
                entry.inserted += row.inserted;
                entry.updated += row.updated;
                entry.deleted += row.deleted;
                entry.left_to_stream += row.left_out;
                entry.kept += kept.len() as i64;
                note_kept(entry, &by_name[table].sql(None), kept);
            }
            Some(row) => entry.failed.push(format!(
                "chunk {n}: {}",
                row.reason.unwrap_or_else(|| row.state.as_str().to_owned())
            )),
            None => entry.failed.push(format!(
                "chunk {n}: sync went past it {MAX_ATTEMPTS} times without applying it"
            )),
        }
        tracing::info!(repair = id, chunk = n, table = %table, "repair chunk {finished} of {total} done");
    }
    if options.seed {
        end_seeding(&sides, id, &names, options.wait).await?;
    }
    let outcome = if report.failed() { "failed" } else { "done" };
    repairs::finish(&p, id, outcome)
        .await
        .map_err(state_error(&production))?;
    Ok(report)
}

fn table_entry<'r>(report: &'r mut RepairReport, table: &str) -> &'r mut TableRepair {
    let i = match report.tables.iter().position(|e| e.table == table) {
        Some(i) => i,
        None => {
            report.tables.push(TableRepair {
                table: table.to_owned(),
                ..TableRepair::default()
            });
            report.tables.len() - 1
        }
    };
    &mut report.tables[i]
}

/// Lists the first kept keys as `col=value` text.
fn note_kept(entry: &mut TableRepair, sql: &TableSql<'_>, kept: Vec<KeyText>) {
    for key in kept {
        if entry.kept_keys.len() >= 10 {
            break;
        }
        let text = sql
            .meta
            .key
            .iter()
            .zip(key)
            .map(|(&k, v)| {
                format!(
                    "{}={}",
                    sql.meta.columns[k].name,
                    v.unwrap_or_else(|| "NULL".into())
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        entry.kept_keys.push(text);
    }
}

impl Repairable<'_> {
    fn sql<'a>(&'a self, condition: Option<&'a str>) -> TableSql<'a> {
        TableSql {
            meta: &self.meta,
            filter: self.config.filter.as_deref(),
            condition,
        }
    }
}

/// What one chunk differs by, as read now.
struct ChunkDiff {
    /// Staging's rows production lacks or has otherwise (text values, staging's managed
    /// columns); the first `missing` of them are lacking.
    upserts: Vec<Vec<Option<String>>>,
    missing: usize,
    deletes: Vec<KeyText>,
    /// Keys left alone because production's users edited them.
    kept: Vec<KeyText>,
}

/// Reads the chunk on both sides (staging in its open transaction, if any) and compares;
/// production's rows through the key map with `tr`. A row production's users edited (recorded
/// by the guard, kept since; `edited` holds their production keys) is kept: found on
/// production by its edit, or for a row they deleted, by its key where remapping keeps keys.
async fn chunk_diff(
    sides: &Sides<'_>,
    sql: &TableSql<'_>,
    tr: Option<&Translation>,
    bounds: &Bounds,
    edited: &HashSet<Vec<String>>,
) -> Result<ChunkDiff, OpsError> {
    let quoted = |name: &str| format!("t.{}::text", crate::quote::quote_ident(name));
    let values = sql
        .meta
        .columns
        .iter()
        .map(|c| quoted(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let read = |side: &super::SideSql, extra: &str| {
        let (condition, texts, numbers) = bounds.condition(sql, &side.first_key);
        let query = format!(
            "SELECT ARRAY[{keys}], {row}{extra} FROM {from} WHERE {condition} AND {scope}",
            keys = side.key_texts,
            row = side.row_hash64,
            from = side.from,
            scope = side.condition,
        );
        (query, texts, numbers)
    };
    let (staging_sql, texts, numbers) = read(&sql.side(None), "");
    let production_keys: Vec<String> = sql
        .meta
        .key
        .iter()
        .map(|&k| quoted(&sql.meta.columns[k].name))
        .collect();
    let kept = crate::state::production_edits::kept_exists(
        &crate::quote::quote_literal(&sql.meta.table_name().to_string()),
        &production_keys,
    );
    let kept = if edited.is_empty() {
        "false".to_owned()
    } else {
        kept
    };
    let (production_sql, _, _) = read(&sql.side(tr), &format!(", {kept}"));
    let refs: Vec<&(dyn ToSql + Sync)> = texts
        .iter()
        .map(|v| v as &(dyn ToSql + Sync))
        .chain(numbers.iter().map(|v| v as &(dyn ToSql + Sync)))
        .collect();
    let on_staging = sides
        .s
        .query(&staging_sql, &refs)
        .await
        .map_err(query_error(sides.staging, "reading a chunk to repair"))?;
    // Staging's key -> (row hash, an edit production keeps).
    let on_production: HashMap<KeyText, (i64, bool)> = sides
        .p
        .query(&production_sql, &refs)
        .await
        .map_err(query_error(sides.production, "reading a chunk to repair"))?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let deleted_by_users = |key: &KeyText| {
        tr.is_none()
            && key
                .iter()
                .cloned()
                .collect::<Option<Vec<String>>>()
                .is_some_and(|k| edited.contains(&k))
    };
    let mut diff = ChunkDiff {
        upserts: Vec::new(),
        missing: 0,
        deletes: Vec::new(),
        kept: Vec::new(),
    };
    let (mut missing, mut different) = (Vec::new(), Vec::new());
    let mut seen: HashSet<KeyText> = HashSet::with_capacity(on_staging.len());
    for row in &on_staging {
        let key: KeyText = row.get(0);
        let hash: i64 = row.get(1);
        match on_production.get(&key) {
            Some((h, _)) if *h == hash => {}
            Some((_, true)) => diff.kept.push(key.clone()),
            Some((_, false)) => different.push(key.clone()),
            None if deleted_by_users(&key) => diff.kept.push(key.clone()),
            None => missing.push(key.clone()),
        }
        seen.insert(key);
    }
    // Only the rows to write are read whole (in the same snapshot).
    diff.missing = missing.len();
    missing.extend(different);
    if !missing.is_empty() {
        let key_columns: Vec<&crate::catalog::ColumnMeta> =
            sql.meta.key.iter().map(|&k| &sql.meta.columns[k]).collect();
        let matched = key_columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "t.{} = u.k{i}::{}",
                    crate::quote::quote_ident(&c.name),
                    c.type_sql
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let unnest = (1..=key_columns.len())
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let aliases = (0..key_columns.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let arrays: Vec<Vec<Option<String>>> = (0..key_columns.len())
            .map(|i| missing.iter().map(|k| k[i].clone()).collect())
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            arrays.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let mut rows: HashMap<KeyText, Vec<Option<String>>> = sides
            .s
            .query(
                &format!(
                    "SELECT ARRAY[{keys}], ARRAY[{values}]::text[] FROM {table} t \
                     JOIN unnest({unnest}) AS u({aliases}) ON {matched}",
                    keys = sql.side(None).key_texts,
                    table = sql.meta.own_rows(),
                ),
                &refs,
            )
            .await
            .map_err(query_error(sides.staging, "reading rows to repair"))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        diff.upserts = missing.iter().filter_map(|key| rows.remove(key)).collect();
    }
    for (key, (_, kept)) in on_production {
        if seen.contains(&key) {
            continue;
        }
        if kept || deleted_by_users(&key) {
            diff.kept.push(key);
        } else {
            diff.deletes.push(key);
        }
    }
    Ok(diff)
}

/// Writes `mark` into staging's WAL as a transactional logical message.
async fn emit(client: &Client, mark: &Watermark) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&PREFIX, &mark.to_json()],
        )
        .await?;
    Ok(())
}

/// Sends one chunk through the watermarks (planned again on production first): a position in
/// staging's WAL past its high watermark's commit, the rows it kept for production's users, and
/// how many rows and keys it carries.
async fn send_chunk(
    sides: &Sides<'_>,
    sql: &TableSql<'_>,
    tr: Option<&Translation>,
    bounds: &Bounds,
    edited: &HashSet<Vec<String>>,
    (repair, chunk): (i64, i32),
) -> Result<(Lsn, Vec<KeyText>, usize), OpsError> {
    let table = sql.meta.table_name().to_string();
    let id = ChunkId {
        repair,
        chunk,
        target: sides.target.to_owned(),
    };
    repairs::attempt(sides.p, repair, chunk)
        .await
        .map_err(state_error(sides.production))?;
    let key_names: Vec<String> = sql
        .meta
        .key
        .iter()
        .map(|&k| sql.meta.columns[k].name.clone())
        .collect();
    let low = Watermark::Low {
        id: id.clone(),
        table: table.clone(),
        key: key_names,
    };
    emit(sides.s, &low).await.map_err(query_error(
        sides.staging,
        "writing a repair's low watermark",
    ))?;
    // The snapshot the chunk is read in starts after the low watermark committed; the high
    // watermark commits with it, its table locked against schema changes meanwhile.
    sides
        .s
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(query_error(sides.staging, "starting a snapshot"))?;
    let diff = match chunk_diff(sides, sql, tr, bounds, edited).await {
        Ok(diff) => diff,
        Err(e) => {
            let _ = sides.s.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    let rows = diff.upserts.len() + diff.deletes.len();
    let high = Watermark::High(Chunk {
        id,
        table,
        columns: sql.meta.columns.iter().map(|c| c.name.clone()).collect(),
        key: sql.meta.key.clone(),
        upserts: diff.upserts,
        deletes: diff.deletes,
    });
    let emitted = emit(sides.s, &high).await;
    let committed = sides.s.batch_execute("COMMIT").await;
    emitted.map_err(query_error(
        sides.staging,
        "writing a repair's high watermark",
    ))?;
    committed.map_err(query_error(sides.staging, "COMMIT"))?;
    Ok((current_wal(sides).await?, diff.kept, rows))
}

/// Waits until sync wrote the chunk's outcome; `None` when sync applied staging's WAL up to
/// `past_high` (a position after the high watermark's commit) without one (a batch applied
/// again without it): the chunk is read again. (The message's own position would not do:
/// transactions that committed between it and its transaction's commit come first.)
async fn wait_for_outcome(
    sides: &Sides<'_>,
    (repair, chunk): (i64, i32),
    past_high: Lsn,
    wait: Duration,
) -> Result<Option<repairs::ChunkRow>, OpsError> {
    let started = tokio::time::Instant::now();
    loop {
        let row = repairs::chunk(sides.p, repair, chunk)
            .await
            .map_err(state_error(sides.production))?;
        if let Some(row) = &row
            && row.state != repairs::ChunkState::Planned
        {
            return Ok(Some(row.clone()));
        }
        let applied = applied_position(sides).await?;
        if applied >= past_high {
            // The answer may have committed just after the read above.
            let row = repairs::chunk(sides.p, repair, chunk)
                .await
                .map_err(state_error(sides.production))?;
            return Ok(row.filter(|r| r.state != repairs::ChunkState::Planned));
        }
        if started.elapsed() > wait {
            return Err(not_answering(sides, past_high, applied, wait));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn not_answering(sides: &Sides<'_>, waiting_for: Lsn, applied: Lsn, wait: Duration) -> OpsError {
    OpsError::Refused(format!(
        "sync has not applied staging's WAL up to {waiting_for} within {}s (production's \
         progress row for slot {} is at {applied}): is sync running? What the repair wrote \
         into staging's WAL is applied when sync gets there; run verify --repair again \
         afterwards to finish the repair",
        wait.as_secs(),
        sides.slot
    ))
}

/// Where production's progress row for the slot stands (invalid without one).
async fn applied_position(sides: &Sides<'_>) -> Result<Lsn, OpsError> {
    Ok(state::progress::read(sides.p, sides.slot)
        .await
        .map_err(state_error(sides.production))?
        .map_or(Lsn::INVALID, |p| p.end_lsn))
}

/// Staging's WAL insert position now.
async fn current_wal(sides: &Sides<'_>) -> Result<Lsn, OpsError> {
    let lsn: String = sides
        .s
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(query_error(sides.staging, "reading staging's WAL position"))?
        .get(0);
    Ok(lsn.parse().unwrap_or(Lsn::INVALID))
}

/// Where production checks foreign keys for sync (its login role cannot turn them off), the
/// managed tables referring to a re-seeded one and not re-seeded with it: a row the seed
/// removes takes theirs along (ON DELETE CASCADE) or is refused; a row it brings back does not
/// bring theirs.
async fn children_to_follow(
    config: &Config,
    p: &Client,
    production: &Endpoint,
    seeded: &[String],
) -> Result<Vec<String>, OpsError> {
    if p.batch_execute("SET session_replication_role = replica; RESET session_replication_role")
        .await
        .is_ok()
    {
        return Ok(Vec::new());
    }
    let mut metas = Vec::new();
    for table in &config.tables {
        if let Some(meta) = crate::catalog::load_table(p, &table.name)
            .await
            .map_err(query_error(production, "reading table definitions"))?
        {
            metas.push(meta);
        }
    }
    let refs: Vec<&TableMeta> = metas.iter().collect();
    let edges = crate::catalog::foreign_keys(p, &refs)
        .await
        .map_err(query_error(production, "reading foreign keys"))?;
    let name = |i: usize| metas[i].table_name().to_string();
    let mut notes: Vec<String> = edges
        .into_iter()
        .filter(|&(child, parent)| seeded.contains(&name(parent)) && !seeded.contains(&name(child)))
        .map(|(child, parent)| {
            format!(
                "{} refers to {} on production, which checks it: rows the seed removes from {} \
                 take their {} rows along or are refused, and rows it brings back do not bring \
                 theirs; resync {} too if it drifted (--table {})",
                name(child),
                name(parent),
                name(parent),
                name(child),
                name(child),
                name(child)
            )
        })
        .collect();
    notes.sort();
    notes.dedup();
    Ok(notes)
}

/// Ends seeding repair `repair` of `tables` in the stream, and waits until sync has applied
/// that end: its tables conflict as usual again.
async fn end_seeding(
    sides: &Sides<'_>,
    repair: i64,
    tables: &[String],
    wait: Duration,
) -> Result<(), OpsError> {
    let seeded = Watermark::Seeded {
        repair,
        target: sides.target.to_owned(),
        tables: tables.to_vec(),
    };
    emit(sides.s, &seeded)
        .await
        .map_err(query_error(sides.staging, "writing a seeding's end"))?;
    // Past its commit (not the message's own position: see `wait_for_outcome`).
    wait_for_sync_past(sides, current_wal(sides).await?, wait).await
}

/// Waits until sync has applied staging's WAL past `at`.
async fn wait_for_sync_past(sides: &Sides<'_>, at: Lsn, wait: Duration) -> Result<(), OpsError> {
    let started = tokio::time::Instant::now();
    loop {
        let applied = applied_position(sides).await?;
        if applied >= at {
            return Ok(());
        }
        if started.elapsed() > wait {
            return Err(not_answering(sides, at, applied, wait));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The report, one line per table.
pub fn render(report: &RepairReport) -> String {
    let mut out = String::new();
    let verb = if report.dry_run { "would" } else { "did" };
    if let Some(id) = report.repair {
        let how = if report.resumed { "resumed" } else { "planned" };
        out.push_str(&format!("repair {id} ({how})\n"));
    }
    for t in &report.tables {
        if let Some(why) = &t.not_repaired {
            out.push_str(&format!("{}: not repaired: {why}\n", t.table));
            continue;
        }
        if t.chunks == 0 {
            out.push_str(&format!("{}: match, nothing to repair\n", t.table));
            continue;
        }
        let mut line = format!(
            "{}: {} differing chunk(s); {verb} insert {}, update {}, delete {} row(s)",
            t.table, t.chunks, t.inserted, t.updated, t.deleted
        );
        if !report.dry_run {
            line.push_str(&format!(
                "; {} chunk(s) done, {} left to the stream, {} read again",
                t.chunks_done, t.left_to_stream, t.retries
            ));
        }
        out.push_str(&line);
        out.push('\n');
        if t.kept > 0 {
            out.push_str(&format!(
                "  kept {} row(s) production's users edited (recorded by the guard): {}\n",
                t.kept,
                t.kept_keys.join("; ")
            ));
        }
        for failure in &t.failed {
            out.push_str(&format!("  FAILED {failure}\n"));
        }
    }
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    out
}
