//! `stagingprop.repairs` and `stagingprop.repair_chunks`: the online repairs `verify --repair`
//! planned on this target, chunk by chunk. The repair writes the plan (each differing chunk's
//! bounds, `planned`); sync writes each chunk's outcome (`applied` with its row counts, or
//! `interrupted`) in the production transaction that applies its high watermark, so a chunk's
//! rows and its outcome commit together, exactly once.

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::model::Lsn;

pub(super) fn create_tables() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {repairs} (
             id bigserial PRIMARY KEY,
             slot text NOT NULL,
             tables text[] NOT NULL,
             condition text,
             seeding boolean NOT NULL DEFAULT false,
             seeded_lsn pg_lsn,
             started_at timestamptz NOT NULL DEFAULT now(),
             finished_at timestamptz,
             outcome text);
         CREATE TABLE IF NOT EXISTS {chunks} (
             repair_id bigint NOT NULL,
             chunk integer NOT NULL,
             table_name text NOT NULL,
             bounds jsonb NOT NULL DEFAULT '{{}}',
             state text NOT NULL DEFAULT 'planned',
             attempts integer NOT NULL DEFAULT 0,
             lsn pg_lsn,
             inserted bigint NOT NULL DEFAULT 0,
             updated bigint NOT NULL DEFAULT 0,
             deleted bigint NOT NULL DEFAULT 0,
             left_out bigint NOT NULL DEFAULT 0,
             kept bigint NOT NULL DEFAULT 0,
             reason text,
             done_at timestamptz,
             PRIMARY KEY (repair_id, chunk));",
        repairs = table("repairs"),
        chunks = table("repair_chunks"),
    )
}

/// What happened to a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkState {
    /// Planned (or planned again), its watermarks not yet applied.
    Planned,
    /// Its rows applied at its high watermark.
    Applied,
    /// Sync did not see its window whole: to be read again.
    Interrupted,
    /// Equal on both sides when the repair read it: nothing was written.
    Unchanged,
    /// Production could not take it (`reason` says why).
    Failed,
}

impl ChunkState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkState::Planned => "planned",
            ChunkState::Applied => "applied",
            ChunkState::Interrupted => "interrupted",
            ChunkState::Unchanged => "unchanged",
            ChunkState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<ChunkState, StateError> {
        Ok(match text {
            "planned" => ChunkState::Planned,
            "applied" => ChunkState::Applied,
            "interrupted" => ChunkState::Interrupted,
            "unchanged" => ChunkState::Unchanged,
            "failed" => ChunkState::Failed,
            other => {
                return Err(StateError::Corrupt(format!("repair chunk state {other:?}")));
            }
        })
    }

    /// Whether the chunk is settled (nothing more happens to it).
    pub fn is_done(self) -> bool {
        matches!(self, ChunkState::Applied | ChunkState::Unchanged)
    }
}

/// A chunk's outcome as sync writes it.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    /// Rows and keys the stream changed inside the window, left to it.
    pub left_out: i64,
}

/// The statement sync writes a chunk's outcome with, in the transaction of its high
/// watermark. Parameters: repair, chunk, table, state, staging position (text), inserted,
/// updated, deleted, left out, reason.
pub fn record_outcome() -> String {
    format!(
        "INSERT INTO {} AS c (repair_id, chunk, table_name, state, lsn, inserted, updated, deleted,
                              left_out, reason, done_at)
         VALUES ($1, $2, $3, $4, $5::text::pg_lsn, $6, $7, $8, $9, $10, now())
         ON CONFLICT (repair_id, chunk) DO UPDATE SET state = EXCLUDED.state, lsn = EXCLUDED.lsn,
             inserted = EXCLUDED.inserted, updated = EXCLUDED.updated,
             deleted = EXCLUDED.deleted, left_out = EXCLUDED.left_out,
             reason = EXCLUDED.reason, done_at = now()",
        table("repair_chunks")
    )
}

/// A repair as planned.
#[derive(Clone, Debug)]
pub struct Repair {
    pub id: i64,
    pub tables: Vec<String>,
    pub condition: Option<String>,
    pub started_at: String,
    pub seeding: bool,
}

/// A planned chunk and what happened to it so far.
#[derive(Clone, Debug)]
pub struct ChunkRow {
    pub chunk: i32,
    pub table: String,
    pub bounds: serde_json::Value,
    pub state: ChunkState,
    pub attempts: i32,
    pub lsn: Option<Lsn>,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    pub left_out: i64,
    pub kept: i64,
    pub reason: Option<String>,
}

/// A new repair (`seeding`: of tables being seeded online); its id.
pub async fn begin(
    client: &Client,
    slot: &str,
    tables: &[String],
    condition: Option<&str>,
    seeding: bool,
) -> Result<i64, StateError> {
    Ok(client
        .query_one(
            &format!(
                "INSERT INTO {} (slot, tables, condition, seeding) VALUES ($1, $2, $3, $4) \
                 RETURNING id",
                table("repairs")
            ),
            &[&slot, &tables, &condition, &seeding],
        )
        .await
        .map_err(query_error("planning a repair"))?
        .get(0))
}

/// Writes repair `id`'s chunks (`table`, bounds, rows kept), numbered from 0, in one
/// transaction.
pub async fn plan(
    client: &Client,
    id: i64,
    chunks: &[(String, serde_json::Value, i64)],
) -> Result<(), StateError> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(query_error("BEGIN"))?;
    let planned = insert_chunks(client, id, chunks).await;
    let end = if planned.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client.batch_execute(end).await.map_err(query_error(end));
    planned?;
    ended
}

async fn insert_chunks(
    client: &Client,
    id: i64,
    chunks: &[(String, serde_json::Value, i64)],
) -> Result<(), StateError> {
    let insert = format!(
        "INSERT INTO {} (repair_id, chunk, table_name, bounds, kept) VALUES ($1, $2, $3, $4, $5)",
        table("repair_chunks")
    );
    for (n, (table_name, bounds, kept)) in chunks.iter().enumerate() {
        let n = i32::try_from(n).unwrap_or(i32::MAX);
        client
            .execute(&insert, &[&id, &n, table_name, bounds, kept])
            .await
            .map_err(query_error("planning a repair"))?;
    }
    Ok(())
}

/// The tables of `slot`'s seeding repairs whose end sync has not applied yet: their conflicts
/// are the seed's to settle.
pub async fn seeding_tables(client: &Client, slot: &str) -> Result<Vec<String>, StateError> {
    if !super::exists(client, "repairs")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT unnest(tables) FROM {} \
                 WHERE slot = $1 AND seeding AND seeded_lsn IS NULL",
                table("repairs")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading repairs"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The statement sync notes a seeding's end with, in the transaction that applies it.
/// Parameters: repair, staging position (text).
pub fn record_seeded() -> String {
    format!(
        "UPDATE {} SET seeded_lsn = $2::text::pg_lsn WHERE id = $1",
        table("repairs")
    )
}

/// The newest repair of `slot` not finished, if any.
pub async fn unfinished(client: &Client, slot: &str) -> Result<Option<Repair>, StateError> {
    if !super::exists(client, "repairs")
        .await
        .map_err(query_error("looking for stagingprop's tables"))?
    {
        return Ok(None);
    }
    let row = client
        .query_opt(
            &format!(
                "SELECT id, tables, condition, started_at::text, seeding FROM {}
                  WHERE slot = $1 AND finished_at IS NULL ORDER BY id DESC LIMIT 1",
                table("repairs")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading repairs"))?;
    Ok(row.map(|r| Repair {
        id: r.get(0),
        tables: r.get(1),
        condition: r.get(2),
        started_at: r.get(3),
        seeding: r.get(4),
    }))
}

/// Every chunk of repair `id`, in order.
pub async fn chunks(client: &Client, id: i64) -> Result<Vec<ChunkRow>, StateError> {
    read_chunks(client, id, None).await
}

/// Chunk `chunk` of repair `id`, if planned.
pub async fn chunk(client: &Client, id: i64, chunk: i32) -> Result<Option<ChunkRow>, StateError> {
    Ok(read_chunks(client, id, Some(chunk)).await?.pop())
}

async fn read_chunks(
    client: &Client,
    id: i64,
    chunk: Option<i32>,
) -> Result<Vec<ChunkRow>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT chunk, table_name, bounds, state, attempts, lsn::text, inserted, updated,
                        deleted, left_out, kept, reason
                   FROM {} WHERE repair_id = $1 AND ($2::integer IS NULL OR chunk = $2)
                  ORDER BY chunk",
                table("repair_chunks")
            ),
            &[&id, &chunk],
        )
        .await
        .map_err(query_error("reading repair chunks"))?;
    rows.iter()
        .map(|r| {
            let lsn: Option<String> = r.get(5);
            Ok(ChunkRow {
                chunk: r.get(0),
                table: r.get(1),
                bounds: r.get(2),
                state: ChunkState::parse(r.get(3))?,
                attempts: r.get(4),
                lsn: lsn.and_then(|l| l.parse().ok()),
                inserted: r.get(6),
                updated: r.get(7),
                deleted: r.get(8),
                left_out: r.get(9),
                kept: r.get(10),
                reason: r.get(11),
            })
        })
        .collect()
}

/// The chunk goes out (again): `planned`, one attempt more.
pub async fn attempt(client: &Client, id: i64, chunk: i32) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET state = 'planned', attempts = attempts + 1, reason = NULL
                  WHERE repair_id = $1 AND chunk = $2",
                table("repair_chunks")
            ),
            &[&id, &chunk],
        )
        .await
        .map_err(query_error("noting a repair chunk's attempt"))?;
    Ok(())
}

/// The repair found the chunk equal on both sides when it read it.
pub async fn unchanged(client: &Client, id: i64, chunk: i32) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET state = 'unchanged', done_at = now()
                  WHERE repair_id = $1 AND chunk = $2",
                table("repair_chunks")
            ),
            &[&id, &chunk],
        )
        .await
        .map_err(query_error("noting a repair chunk"))?;
    Ok(())
}

/// Repair `id` ends: `done`, `abandoned` or `failed`.
pub async fn finish(client: &Client, id: i64, outcome: &str) -> Result<(), StateError> {
    client
        .execute(
            &format!(
                "UPDATE {} SET finished_at = now(), outcome = $2 WHERE id = $1",
                table("repairs")
            ),
            &[&id, &outcome],
        )
        .await
        .map_err(query_error("finishing a repair"))?;
    Ok(())
}

/// For `status`: a repair of `slot` in progress, as (id, tables, chunks done, chunks, rows
/// inserted, updated, deleted).
#[derive(Clone, Debug, serde::Serialize)]
pub struct InProgress {
    pub id: i64,
    pub tables: Vec<String>,
    pub started_at: String,
    pub chunks_done: i64,
    pub chunks: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
}

pub async fn in_progress(client: &Client, slot: &str) -> Result<Option<InProgress>, StateError> {
    let Some(repair) = unfinished(client, slot).await? else {
        return Ok(None);
    };
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE state IN ('applied', 'unchanged')), count(*),
                        coalesce(sum(inserted), 0)::bigint, coalesce(sum(updated), 0)::bigint,
                        coalesce(sum(deleted), 0)::bigint
                   FROM {} WHERE repair_id = $1",
                table("repair_chunks")
            ),
            &[&repair.id],
        )
        .await
        .map_err(query_error("reading repair chunks"))?;
    Ok(Some(InProgress {
        id: repair.id,
        tables: repair.tables,
        started_at: repair.started_at,
        chunks_done: row.get(0),
        chunks: row.get(1),
        inserted: row.get(2),
        updated: row.get(3),
        deleted: row.get(4),
    }))
}
