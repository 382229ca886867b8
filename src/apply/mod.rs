//! Applying staging's changes to production: the production session, the open transaction,
//! set-based statements per table ([`sql`]), consolidation of pending changes ([`batch`]),
//! conflicts with their per-table policy and the quarantine table, and the progress table that
//! makes apply exactly-once (it is updated in the same transaction as the changes).

pub mod invalidate;
pub mod managed_files;
pub mod statements;
pub mod statistics;

use std::collections::{HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use self::invalidate::{Invalidations, NotifiedTable};
use self::managed_files::{FileError, FileStats, Publisher};
use crate::catalog::{self as schema, TableMeta};
use crate::change::{Entry, Key, NetChange, RowOp, Source, TableChanges};
use crate::config::{ConflictPolicy, TableName};
use crate::model::{Lsn, Tuple, Value, Xid};
use crate::pg::QueryError;
use crate::quote::quote_ident;
use crate::remap::store::StoreError;
use crate::remap::{MapWrites, RemapError, Remapper};
use crate::state::{self, Progress, StateError, key_map, quarantine};

/// What production must not be left with: a change that cannot be applied as the policy says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictKind {
    /// An INSERT whose key already exists on production.
    InsertExists,
    /// An UPDATE of a row production lacks.
    UpdateMissing,
    /// A DELETE of a row production lacks.
    DeleteMissing,
    /// An UPDATE of a row that has no key mapping (an allocating rule never saw it).
    UpdateUnmapped,
    /// A DELETE of a row that has no key mapping.
    DeleteUnmapped,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConflictKind::InsertExists => "insert of a key that already exists on production",
            ConflictKind::UpdateMissing => "update of a row production lacks",
            ConflictKind::DeleteMissing => "delete of a row production lacks",
            ConflictKind::UpdateUnmapped => {
                "update of a row that has no key mapping, so production has no row for it"
            }
            ConflictKind::DeleteUnmapped => {
                "delete of a row that has no key mapping, so production has no row for it"
            }
        })
    }
}

impl ConflictKind {
    fn operation(self) -> &'static str {
        match self {
            ConflictKind::InsertExists => "insert",
            ConflictKind::UpdateMissing | ConflictKind::UpdateUnmapped => "update",
            ConflictKind::DeleteMissing | ConflictKind::DeleteUnmapped => "delete",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(
        "conflict in {table} (on_conflict = error): {kind}, key {key}, staging transaction {xid} at {lsn}. \
         Nothing of this batch was applied and staging was not told to release it. Fix the row on \
         production, or set on_conflict = \"skip\" (quarantine) or \"overwrite\" for the table, then start sync again"
    )]
    Conflict {
        table: TableName,
        kind: ConflictKind,
        key: String,
        lsn: Lsn,
        xid: Xid,
    },
    #[error("{0}")]
    Schema(String),
    #[error("on production: {0}")]
    Query(QueryError),
    #[error("on production: {0}")]
    State(#[from] StateError),
    #[error("key remapping: {0}")]
    Remap(#[from] RemapError),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error(
        "staging sent a value that is not UTF-8 text in {table}; check staging's server_encoding"
    )]
    NotUtf8 { table: TableName },
    #[error(
        "the progress row of slot {slot} moved from {expected} while this batch was applied: \
         another stagingprop (a second sync, or a replay) is applying to the same database. \
         This batch was rolled back; stop the other one, then start sync again"
    )]
    ProgressMoved { slot: String, expected: Lsn },
}

impl ApplyError {
    /// Worth retrying on a new connection (production restarting, network lost).
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::Query(q) => q.transient,
            ApplyError::State(e) => e.is_transient(),
            ApplyError::Remap(RemapError::Store(e)) => match e.as_ref() {
                StoreError::Query { source, .. } => QueryError::new("", source).transient,
                _ => false,
            },
            _ => false,
        }
    }

    /// A statement failed for a reason the set-based fast path can cause on its own (a unique or
    /// foreign-key check seeing rows in a different order than staging applied them): applying
    /// the same changes one by one decides whether it is real.
    pub fn may_be_ordering(&self) -> bool {
        matches!(self, ApplyError::Query(q)
            if q.server.as_ref().is_some_and(|s| s.code.starts_with("23")))
    }

    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ApplyError::Query(q) => q.sqlstate(),
            ApplyError::State(e) => e.sqlstate(),
            _ => None,
        }
    }
}

fn query_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError + '_ {
    move |e| ApplyError::Query(QueryError::new(what, &e))
}

/// Counters for logs, status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub rows_inserted: u64,
    pub rows_updated: u64,
    pub rows_deleted: u64,
    pub truncates: u64,
    pub conflicts_skipped: u64,
    pub conflicts_overwritten: u64,
    pub transactions: u64,
    pub batches: u64,
    /// Key mappings written (remapping rules).
    pub keys_remapped: u64,
    /// Managed files published, as of the last committed batch.
    pub files: FileStats,
}

impl ApplyStats {
    /// Adds what another session applied.
    pub fn add(&mut self, other: &ApplyStats) {
        self.rows_inserted += other.rows_inserted;
        self.rows_updated += other.rows_updated;
        self.rows_deleted += other.rows_deleted;
        self.truncates += other.truncates;
        self.conflicts_skipped += other.conflicts_skipped;
        self.conflicts_overwritten += other.conflicts_overwritten;
        self.transactions += other.transactions;
        self.batches += other.batches;
        self.keys_remapped += other.keys_remapped;
        self.files.add(other.files);
    }
}

/// Where a savepoint was set ([`Applier::savepoint`]): what rolling back to it restores.
#[derive(Clone, Copy, Debug)]
pub struct Savepoint {
    stats: ApplyStats,
    files: usize,
    invalidations: usize,
}

struct TableState {
    meta: TableMeta,
    policy: ConflictPolicy,
    changes: TableChanges,
}

/// A text[] parameter made of the bytes staging sent, without copying them (binary array
/// format; the server checks the text's encoding as it receives it).
#[derive(Debug)]
struct TextArray(Vec<Option<Bytes>>);

impl ToSql for TextArray {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        let len = i32::try_from(self.0.len())?;
        out.put_i32(1); // dimensions
        out.put_i32(i32::from(self.0.iter().any(Option::is_none)));
        out.put_u32(Type::TEXT.oid());
        out.put_i32(len);
        out.put_i32(1); // lower bound
        for value in &self.0 {
            match value {
                None => out.put_i32(-1),
                Some(bytes) => {
                    out.put_i32(i32::try_from(bytes.len())?);
                    out.put_slice(bytes);
                }
            }
        }
        Ok(tokio_postgres::types::IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    tokio_postgres::types::to_sql_checked!();
}

/// What a sent statement reports: the ordinals it returned, or only its row count.
enum Reported {
    Ordinals(Vec<i64>),
    Count(u64),
}

type QueryFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Reported, tokio_postgres::Error>> + Send>,
>;

/// What a sent statement's reported ordinals mean.
enum Purpose {
    /// Per ordinal: the key and source of a plain delete (a conflict if not deleted), or `None`
    /// for a replaced row.
    Deletes {
        table: usize,
        targets: Vec<Option<(Key, Source)>>,
    },
    /// Ordinals are rows not inserted (key taken), for `entries` in order.
    Inserts { table: usize, entries: Vec<Entry> },
    /// A row count; when short, the rows of `entries` production lacks are conflicts.
    Updates { table: usize, entries: Vec<Entry> },
    /// Key-map writes: nothing to check beyond success.
    KeyMap,
    /// The batch's BEGIN, sent ahead of its first statement.
    Begin,
}

/// SQLSTATE of a statement sent after another failed in the same transaction.
const IN_FAILED_TRANSACTION: &str = "25P02";

impl Purpose {
    /// What the statement does, for errors.
    fn what(&self) -> &'static str {
        match self {
            Purpose::Deletes { .. } => "applying deletes",
            Purpose::Inserts { .. } => "applying inserts",
            Purpose::Updates { .. } => "applying updates",
            Purpose::KeyMap => "writing the key map",
            Purpose::Begin => "BEGIN",
        }
    }
}

/// A statement's response, unless the task reading it was lost.
fn lost_response<T>(
    joined: Result<Result<T, tokio_postgres::Error>, tokio::task::JoinError>,
) -> Result<Result<T, tokio_postgres::Error>, ApplyError> {
    joined.map_err(|e| ApplyError::Schema(format!("a statement's response was lost: {e}")))
}

/// A statement sent and not yet settled. Its response is read by a task of its own: the
/// connection hands responses over through small channels, so a response nobody reads would
/// stall every later one (the next prepare included).
struct InFlight {
    result: tokio::task::JoinHandle<Result<Reported, tokio_postgres::Error>>,
    purpose: Purpose,
}

/// The production side of sync: one session, at most one open transaction.
pub struct Applier {
    client: std::sync::Arc<Client>,
    in_flight: Vec<InFlight>,
    slot: String,
    tables: Vec<TableState>,
    by_name: HashMap<TableName, usize>,
    /// Parents before children (by production's foreign keys among managed tables).
    order: Vec<usize>,
    statements: HashMap<String, Statement>,
    in_transaction: bool,
    pending_rows: usize,
    pending_bytes: isize,
    /// Rows and bytes sent in the open batch before what is pending: the batch limits count
    /// them too.
    sent_rows: usize,
    sent_bytes: usize,
    /// Apply every change on its own (no consolidation), to decide whether an error the
    /// set-based path met is real.
    pub one_by_one: bool,
    pub stats: ApplyStats,
    /// Whether foreign-key triggers are off for this session (`session_replication_role`).
    pub replica_role: bool,
    /// Translates keys when some table does not keep staging's keys.
    remap: Option<Remapper>,
    /// The progress row as this applier last saw it: a commit moves it only from there, so two
    /// appliers never both apply the same transactions.
    progress_at: Lsn,
    /// A closed batch ([`Applier::close`]): every statement sent, its COMMIT not yet.
    closing: Option<Progress>,
    /// Batches committed that the caller has not taken yet ([`Applier::take_committed`]).
    committed: Vec<Committed>,
    /// Publishes the managed-file tables' rows as files, batch by batch.
    pub files: Publisher,
    /// Cache invalidation (`notify`, `after_batch_sql`): what to run before each COMMIT, and
    /// the keys the open batch changed. `None` when the config asks for neither.
    hooks: Option<Hooks>,
    invalidations: Invalidations,
    /// The progress row's guarded write, prepared once per session.
    progress_statement: Option<Statement>,
    /// Whether a commit moves the progress row (off for `quarantine retry`, which applies
    /// old changes and leaves the position alone).
    pub record_progress: bool,
}

/// What runs in every batch's transaction before its COMMIT.
struct Hooks {
    channel: String,
    tables: Vec<NotifiedTable>,
    any_notify: bool,
    after_batch_sql: Option<String>,
    after_batch: Option<Statement>,
}

/// A batch committed on production, not necessarily flushed yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// End of the last staging transaction in it.
    pub end: Lsn,
    /// Production's WAL position at or past its commit record: durable once flushed this far.
    pub durable_at: Lsn,
    /// Production's WAL flush position right after the commit.
    pub flushed: Lsn,
}

impl Applier {
    /// Prepares the production session for `tables` (metadata already loaded and validated).
    /// `progress_at` is the slot's progress row as read (invalid when there is none).
    pub async fn new(
        client: Client,
        slot: &str,
        tables: Vec<(TableMeta, ConflictPolicy)>,
        remap: Option<Remapper>,
        progress_at: Lsn,
    ) -> Result<Applier, ApplyError> {
        let tables: Vec<TableState> = tables
            .into_iter()
            .map(|(meta, policy)| TableState {
                meta,
                policy,
                changes: TableChanges::default(),
            })
            .collect();
        let by_name = tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.meta.table_name(), i))
            .collect();
        let metas: Vec<&TableMeta> = tables.iter().map(|t| &t.meta).collect();
        let edges = schema::foreign_keys(&client, &metas)
            .await
            .map_err(query_error("reading foreign keys"))?;
        let order = schema::parents_first(tables.len(), &edges);
        // Like PostgreSQL's own apply worker: foreign keys are not re-checked row by row on
        // production (staging checked them, and a batch is consistent at its end). Needs a
        // superuser; otherwise production checks them and tables are applied parents first.
        let replica_role = client
            .batch_execute("SET session_replication_role = replica")
            .await
            .is_ok();
        // Commits do not wait for production's WAL flush (as PostgreSQL's own apply worker): the
        // caller confirms a staging position only once production reports its WAL flushed past
        // the commit ([`Committed`]), so a production crash loses nothing staging released.
        // Every statement of this session finds rows by key. Costed for uncached pages, a
        // statement of a few thousand keys would hash the whole table instead of probing its
        // key index (measured: 90 of 125 ms hashing offerprice's 200,000 rows to update 2,210).
        client
            .batch_execute(
                "SET datestyle = ISO; SET intervalstyle = postgres; SET timezone = UTC; \
                 SET synchronous_commit = off; SET enable_seqscan = off",
            )
            .await
            .map_err(query_error("setting up the session"))?;
        Ok(Applier {
            client: std::sync::Arc::new(client),
            in_flight: Vec::new(),
            slot: slot.to_owned(),
            tables,
            by_name,
            order,
            statements: HashMap::new(),
            in_transaction: false,
            pending_rows: 0,
            pending_bytes: 0,
            sent_rows: 0,
            sent_bytes: 0,
            one_by_one: false,
            stats: ApplyStats::default(),
            replica_role,
            remap,
            progress_at,
            closing: None,
            committed: Vec::new(),
            files: Publisher::default(),
            record_progress: true,
            hooks: None,
            invalidations: Invalidations::default(),
            progress_statement: None,
        })
    }

    /// Publishes the managed-file tables of `config` (`files = {...}`) from this session's
    /// batches.
    pub fn publish_files(&mut self, config: &crate::config::Config) -> Result<(), ApplyError> {
        let file_tables = config.tables.iter().enumerate().filter_map(|(i, t)| {
            t.files
                .as_ref()
                .map(|files| (i, files, &self.tables[i].meta))
        });
        self.files = Publisher::new(file_tables.collect())?;
        Ok(())
    }

    /// Sends cache invalidations with each batch as `config` asks (`notify` tables,
    /// `[sync] after_batch_sql`).
    pub fn set_hooks(&mut self, config: &crate::config::Config) {
        let tables: Vec<NotifiedTable> = config
            .tables
            .iter()
            .zip(&self.tables)
            .map(|(t, state)| NotifiedTable {
                name: t.name.to_string(),
                key_columns: state
                    .meta
                    .key
                    .iter()
                    .map(|&k| state.meta.columns[k].name.clone())
                    .collect(),
                notify: t.notify,
            })
            .collect();
        let any_notify = tables.iter().any(|t| t.notify);
        let after_batch_sql = config.sync.after_batch_sql.clone();
        self.hooks = (any_notify || after_batch_sql.is_some()).then(|| Hooks {
            channel: config.sync.notify_channel.clone(),
            tables,
            any_notify,
            after_batch_sql,
            after_batch: None,
        });
    }

    /// Notifies listeners and runs `after_batch_sql`, in the batch's transaction.
    async fn run_hooks(&mut self) -> Result<(), ApplyError> {
        let Some(hooks) = &mut self.hooks else {
            return Ok(());
        };
        if self.invalidations.is_empty() {
            return Ok(());
        }
        if hooks.any_notify {
            for payload in self.invalidations.payloads(&hooks.tables) {
                self.client
                    .execute("SELECT pg_notify($1, $2)", &[&hooks.channel, &payload])
                    .await
                    .map_err(query_error("notifying listeners (notify = true)"))?;
            }
        }
        if let Some(sql) = &hooks.after_batch_sql {
            let statement = match &hooks.after_batch {
                Some(statement) => statement.clone(),
                None => {
                    let statement = self
                        .client
                        .prepare_typed(sql, &[Type::TEXT])
                        .await
                        .map_err(query_error("preparing [sync] after_batch_sql"))?;
                    hooks.after_batch = Some(statement.clone());
                    statement
                }
            };
            let changes = self.invalidations.as_json(&hooks.tables).to_string();
            self.client
                .execute(&statement, &[&changes])
                .await
                .map_err(query_error("running [sync] after_batch_sql"))?;
        }
        self.invalidations.clear();
        Ok(())
    }

    pub fn table_id(&self, name: &TableName) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn meta(&self, table: usize) -> &TableMeta {
        &self.tables[table].meta
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Whether a closed batch waits for its COMMIT ([`Applier::complete`]).
    pub fn closing(&self) -> bool {
        self.closing.is_some()
    }

    /// Rows consolidated but not yet sent.
    pub fn pending_rows(&self) -> usize {
        self.pending_rows
    }

    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes.max(0) as usize
    }

    /// Rows of the open batch, sent and pending: what `batch_max_rows` limits.
    pub fn batch_rows(&self) -> usize {
        self.sent_rows + self.pending_rows
    }

    /// Bytes of the open batch, sent and pending: what `batch_max_bytes` limits.
    pub fn batch_bytes(&self) -> usize {
        self.sent_bytes + self.pending_bytes()
    }

    /// Makes sure a transaction of the current batch is open: a closed batch commits first.
    async fn begin(&mut self) -> Result<(), ApplyError> {
        self.complete().await?;
        if !self.in_transaction {
            // Not awaited: BEGIN travels with the batch's first statement (one round trip less
            // per batch, which a caught-up sync pays on every transaction).
            let client = self.client.clone();
            let begin: QueryFuture = Box::pin(async move {
                client
                    .batch_execute("BEGIN")
                    .await
                    .map(|()| Reported::Count(0))
            });
            self.launch(begin, Purpose::Begin).await;
            self.in_transaction = true;
        }
        Ok(())
    }

    /// Takes one row change (production column order; `UnchangedToast` for columns not to be
    /// touched). Applies what is pending first when the change cannot be consolidated with it.
    /// Only consolidates in memory otherwise: a closed batch keeps running on production.
    pub async fn row_change(
        &mut self,
        table: usize,
        key: Key,
        op: RowOp,
        source: Source,
    ) -> Result<(), ApplyError> {
        let rows_before = self.tables[table].changes.len();
        match self.tables[table].changes.absorb(key, op, source) {
            Ok(delta) => self.account(table, rows_before, delta),
            Err(crate::change::NeedsFlush { key, op }) => {
                self.flush().await?;
                // After a flush nothing is pending, and an empty table takes any change.
                if let Ok(delta) = self.tables[table].changes.absorb(key, op, source) {
                    self.account(table, 0, delta);
                }
            }
        }
        if self.one_by_one {
            self.flush().await?;
            self.settle().await?;
        }
        Ok(())
    }

    /// Pending totals after `table` went from `rows_before` rows and changed by `delta` bytes.
    fn account(&mut self, table: usize, rows_before: usize, delta: isize) {
        self.pending_bytes += delta;
        self.pending_rows = self.pending_rows + self.tables[table].changes.len() - rows_before;
    }

    /// An UPDATE that changed the key: applied on its own, after everything pending.
    pub async fn key_change(
        &mut self,
        table: usize,
        old_key: Key,
        new: Tuple,
        source: Source,
    ) -> Result<(), ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        let (mut old_key, mut new) = (old_key, new);
        if let Some(remap) = &mut self.remap {
            let mut writes = MapWrites::default();
            let mapped = remap
                .translate_key_change(
                    &self.client,
                    table,
                    &mut old_key,
                    &mut new,
                    source,
                    &mut writes,
                )
                .await?;
            if !mapped {
                let entry = Entry {
                    key: old_key,
                    change: NetChange::Update(new),
                    source,
                };
                return self
                    .conflict(table, ConflictKind::UpdateUnmapped, &entry)
                    .await;
            }
            self.send_key_map(writes).await?;
            self.settle().await?;
        }
        let meta = &self.tables[table].meta;
        let set: Vec<usize> = (0..new.len())
            .filter(|&c| !matches!(new[c], Value::UnchangedToast))
            .collect();
        let sql = statements::update_key(meta, &set);
        let mut params: Vec<Option<&str>> = Vec::with_capacity(old_key.len() + set.len());
        let name = meta.table_name();
        for k in &old_key {
            params.push(as_str(k.as_ref(), &name)?);
        }
        for &c in &set {
            params.push(value_str(&new[c], &name)?);
        }
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let updated = self
            .client
            .execute(&sql, &refs)
            .await
            .map_err(query_error("applying a key change"))?;
        if updated == 0 {
            let entry = Entry {
                key: old_key,
                change: NetChange::Update(new),
                source,
            };
            self.conflict(table, ConflictKind::UpdateMissing, &entry)
                .await?;
        } else {
            self.stats.rows_updated += 1;
            if self.hooks.is_some() {
                let meta = &self.tables[table].meta;
                let new_key: Key = meta
                    .key
                    .iter()
                    .map(|&k| match &new[k] {
                        Value::Text(b) | Value::Binary(b) => Some(b.clone()),
                        _ => None,
                    })
                    .collect();
                self.invalidations.record(table, "update", old_key);
                self.invalidations.record(table, "update", new_key);
            }
        }
        Ok(())
    }

    /// TRUNCATE of managed tables, after everything pending.
    pub async fn truncate(
        &mut self,
        tables: &[usize],
        restart_identity: bool,
    ) -> Result<(), ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        let metas: Vec<&TableMeta> = tables.iter().map(|&t| &self.tables[t].meta).collect();
        self.client
            .batch_execute(&statements::truncate(&metas, restart_identity))
            .await
            .map_err(query_error("applying TRUNCATE"))?;
        for &t in tables {
            self.files.clear(t);
            if self.hooks.is_some() {
                self.invalidations.truncated(t);
            }
        }
        let mapped = self
            .remap
            .as_mut()
            .map(|r| r.truncated(tables))
            .unwrap_or_default();
        if !mapped.is_empty() {
            self.send(
                key_map::delete_table_mappings(),
                vec![TextArray(mapped)],
                Purpose::KeyMap,
            )
            .await?;
            self.settle().await?;
        }
        self.stats.truncates += 1;
        Ok(())
    }

    /// Sends every pending change to production (inside the open transaction) without waiting
    /// for the statements to finish: they run on production while the pipeline gathers more.
    /// Their results (and conflicts) are settled by the next flush, a key change, a truncate,
    /// or the commit. A closed batch commits first.
    pub async fn flush(&mut self) -> Result<(), ApplyError> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        self.begin().await?;
        // One statement group in flight at a time: a conflict is judged (an update's missing
        // row looked up) before anything later in the batch could change the answer. A BEGIN
        // alone in flight has nothing to judge: the statements follow it on the wire.
        if self
            .in_flight
            .iter()
            .any(|f| !matches!(f.purpose, Purpose::Begin))
        {
            self.settle().await?;
        }
        let mut drained: Vec<Vec<Entry>> =
            self.tables.iter_mut().map(|t| t.changes.drain()).collect();
        self.sent_rows += self.pending_rows;
        self.sent_bytes += self.pending_bytes();
        self.pending_rows = 0;
        self.pending_bytes = 0;
        if let Some(remap) = &mut self.remap {
            let translated = remap
                .translate(&self.client, &self.order, &mut drained)
                .await?;
            for unresolved in translated.unresolved {
                let kind = match unresolved.entry.change {
                    NetChange::Delete => ConflictKind::DeleteUnmapped,
                    _ => ConflictKind::UpdateUnmapped,
                };
                self.conflict(unresolved.table, kind, &unresolved.entry)
                    .await?;
            }
            self.send_key_map(translated.writes).await?;
        }
        if self.hooks.is_some() {
            for (t, entries) in drained.iter().enumerate() {
                for entry in entries {
                    let op = match entry.change {
                        NetChange::Insert(_) => "insert",
                        NetChange::Update(_) | NetChange::Replace(_) => "update",
                        NetChange::Delete => "delete",
                    };
                    self.invalidations.record(t, op, entry.key.clone());
                }
            }
        }
        // Children's deletes before parents', parents' inserts and updates before children's.
        let order = self.order.clone();
        for &t in order.iter().rev() {
            self.send_deletes(t, &drained[t]).await?;
        }
        for &t in &order {
            let entries = std::mem::take(&mut drained[t]);
            self.send_upserts(t, entries).await?;
        }
        Ok(())
    }

    /// Sends the key-map writes that go with the rows being applied.
    async fn send_key_map(&mut self, writes: MapWrites) -> Result<(), ApplyError> {
        let MapWrites { mapped, unmapped } = writes;
        if !unmapped[0].is_empty() {
            let columns = unmapped.into_iter().map(TextArray).collect();
            self.send(key_map::delete_mappings(), columns, Purpose::KeyMap)
                .await?;
        }
        if !mapped[0].is_empty() {
            self.stats.keys_remapped += mapped[0].len() as u64;
            let columns = mapped.into_iter().map(TextArray).collect();
            self.send(key_map::insert_mappings(), columns, Purpose::KeyMap)
                .await?;
        }
        Ok(())
    }

    async fn statement(&mut self, sql: String, params: usize) -> Result<Statement, ApplyError> {
        if let Some(statement) = self.statements.get(&sql) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT_ARRAY; params];
        let statement = match self.client.prepare_typed(&sql, &types).await {
            Ok(statement) => statement,
            Err(e) => {
                // A statement sent before may have failed and aborted the transaction, and the
                // prepare failed only because of that: that statement's error is the one to
                // report (a unique violation there may be an ordering artefact to replay).
                Box::pin(self.settle()).await?;
                return Err(query_error("preparing a statement")(e));
            }
        };
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Sends a set-based statement (parameters: text arrays) and returns at once; the request is
    /// on the wire, in order after everything sent before it.
    async fn send(
        &mut self,
        sql: String,
        columns: Vec<TextArray>,
        purpose: Purpose,
    ) -> Result<(), ApplyError> {
        let statement = self.statement(sql, columns.len()).await?;
        let client = self.client.clone();
        let count_only = matches!(purpose, Purpose::Updates { .. } | Purpose::KeyMap);
        let future: QueryFuture = Box::pin(async move {
            let refs: Vec<&(dyn ToSql + Sync)> =
                columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            if count_only {
                client.execute(&statement, &refs).await.map(Reported::Count)
            } else {
                let rows = client.query(&statement, &refs).await?;
                Ok(Reported::Ordinals(
                    rows.iter().map(|r| r.get::<_, i64>(0)).collect(),
                ))
            }
        });
        self.launch(future, purpose).await;
        Ok(())
    }

    /// Puts a request on the wire now, in order after everything sent before it, and leaves
    /// its response to [`Applier::settle`].
    async fn launch(&mut self, mut future: QueryFuture, purpose: Purpose) {
        // The first poll, here, encodes the request and hands it to the connection, so requests
        // reach production in the order they were sent; a task reads the response.
        let mut done = None;
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(result) = future.as_mut().poll(cx) {
                done = Some(result);
            }
            std::task::Poll::Ready(())
        })
        .await;
        let result = match done {
            Some(result) => tokio::spawn(async move { result }),
            None => tokio::spawn(future),
        };
        self.in_flight.push(InFlight { result, purpose });
    }

    /// Waits for every statement sent and applies the conflict policy to what they reported.
    /// The first error is the root cause: statements are awaited in the order they ran.
    async fn settle(&mut self) -> Result<(), ApplyError> {
        let mut in_flight = std::mem::take(&mut self.in_flight).into_iter();
        while let Some(flight) = in_flight.next() {
            let what = flight.purpose.what();
            let reported = lost_response(flight.result.await)?.map_err(query_error(what))?;
            if let Err(e) = self.settle_one(flight.purpose, reported).await {
                // A conflict lookup fails with "transaction is aborted" when a later statement,
                // already run, failed: that statement's error is the one to report (a unique
                // violation there may be an ordering artefact to replay one by one).
                if e.sqlstate() == Some(IN_FAILED_TRANSACTION) {
                    for later in in_flight {
                        let what = later.purpose.what();
                        if let Err(source) = lost_response(later.result.await)? {
                            let root = query_error(what)(source);
                            if root.sqlstate() != Some(IN_FAILED_TRANSACTION) {
                                return Err(root);
                            }
                        }
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    async fn settle_one(&mut self, purpose: Purpose, reported: Reported) -> Result<(), ApplyError> {
        let (ordinals, count) = match reported {
            Reported::Ordinals(ordinals) => (ordinals, 0),
            Reported::Count(count) => (Vec::new(), count),
        };
        match purpose {
            Purpose::Deletes { table, targets } => {
                let deleted: HashSet<i64> = ordinals.into_iter().collect();
                let mut count = 0;
                for (i, target) in targets.into_iter().enumerate() {
                    let Some((key, source)) = target else {
                        continue;
                    };
                    if deleted.contains(&(i as i64 + 1)) {
                        count += 1;
                    } else {
                        let entry = Entry {
                            key,
                            change: NetChange::Delete,
                            source,
                        };
                        self.conflict(table, ConflictKind::DeleteMissing, &entry)
                            .await?;
                    }
                }
                self.stats.rows_deleted += count;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "delete")
                    .increment(count);
            }
            Purpose::Inserts { table, entries } => {
                let inserted = (entries.len() - ordinals.len()) as u64;
                self.stats.rows_inserted += inserted;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "insert")
                    .increment(inserted);
                for ordinal in ordinals {
                    let entry = &entries[ordinal as usize - 1];
                    self.conflict(table, ConflictKind::InsertExists, entry)
                        .await?;
                }
            }
            Purpose::KeyMap | Purpose::Begin => {}
            Purpose::Updates { table, entries } => {
                self.stats.rows_updated += count;
                metrics::counter!("stagingprop_rows_applied_total", "table" => self.tables[table].meta.table_name().to_string(), "op" => "update")
                    .increment(count);
                if (count as usize) < entries.len() {
                    for i in self.missing_rows(table, &entries).await? {
                        self.conflict(table, ConflictKind::UpdateMissing, &entries[i])
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Which of `entries` (by index) have no row on production.
    async fn missing_rows(
        &mut self,
        table: usize,
        entries: &[Entry],
    ) -> Result<Vec<usize>, ApplyError> {
        let meta = &self.tables[table].meta;
        let mut columns: Vec<Vec<Option<Bytes>>> = vec![Vec::new(); meta.key.len()];
        for entry in entries {
            for (k, value) in entry.key.iter().enumerate() {
                columns[k].push(value.clone());
            }
        }
        let sql = statements::missing_keys(meta);
        let columns: Vec<TextArray> = columns.into_iter().map(TextArray).collect();
        let statement = self.statement(sql, columns.len()).await?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
        let rows = self
            .client
            .query(&statement, &refs)
            .await
            .map_err(query_error("finding rows production lacks"))?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, i64>(0) as usize - 1)
            .collect())
    }

    /// Deletes of `Delete` and `Replace` entries; only a plain delete of a missing row is a
    /// conflict (a replaced row is inserted right after either way).
    async fn send_deletes(&mut self, t: usize, entries: &[Entry]) -> Result<(), ApplyError> {
        let meta = &self.tables[t].meta;
        let mut columns: Vec<Vec<Option<Bytes>>> = vec![Vec::new(); meta.key.len()];
        let mut targets = Vec::new();
        for entry in entries {
            let is_delete = match entry.change {
                NetChange::Delete => true,
                NetChange::Replace(_) => false,
                _ => continue,
            };
            for (k, value) in entry.key.iter().enumerate() {
                columns[k].push(value.clone());
            }
            targets.push(is_delete.then(|| (entry.key.clone(), entry.source)));
        }
        if targets.is_empty() {
            return Ok(());
        }
        let sql = statements::delete_rows(meta);
        let columns = columns.into_iter().map(TextArray).collect();
        self.send(sql, columns, Purpose::Deletes { table: t, targets })
            .await
    }

    /// Inserts grouped by the columns they carry (production-only columns are left to their
    /// defaults), updates grouped by the columns they set.
    async fn send_upserts(&mut self, t: usize, entries: Vec<Entry>) -> Result<(), ApplyError> {
        let key_columns = self.tables[t].meta.key.clone();
        let mut inserts: Vec<(Vec<usize>, Vec<Entry>)> = Vec::new();
        let mut updates: Vec<(Vec<usize>, Vec<Entry>)> = Vec::new();
        for entry in entries {
            let (groups, columns) = match &entry.change {
                NetChange::Insert(row) | NetChange::Replace(row) => (
                    &mut inserts,
                    (0..row.len())
                        .filter(|&c| !matches!(row[c], Value::UnchangedToast))
                        .collect::<Vec<usize>>(),
                ),
                NetChange::Update(row) => (
                    &mut updates,
                    (0..row.len())
                        .filter(|c| {
                            !key_columns.contains(c) && !matches!(row[*c], Value::UnchangedToast)
                        })
                        .collect(),
                ),
                NetChange::Delete => continue,
            };
            match groups.iter_mut().find(|(cols, _)| *cols == columns) {
                Some((_, list)) => list.push(entry),
                None => groups.push((columns, vec![entry])),
            }
        }
        let overwrite = self.tables[t].policy == ConflictPolicy::Overwrite;
        for (present, group) in inserts {
            let sql = statements::insert_rows(&self.tables[t].meta, &present, overwrite);
            let mut columns: Vec<Vec<Option<Bytes>>> =
                vec![Vec::with_capacity(group.len()); present.len()];
            for entry in &group {
                let (NetChange::Insert(row) | NetChange::Replace(row)) = &entry.change else {
                    unreachable!("grouped inserts only")
                };
                for (slot, &c) in present.iter().enumerate() {
                    columns[slot].push(value_bytes(&row[c], &self.tables[t].meta)?);
                }
            }
            let columns = columns.into_iter().map(TextArray).collect();
            self.send(
                sql,
                columns,
                Purpose::Inserts {
                    table: t,
                    entries: group,
                },
            )
            .await?;
        }
        for (set, group) in updates {
            let sql = statements::update_rows(&self.tables[t].meta, &set);
            let mut columns: Vec<Vec<Option<Bytes>>> =
                vec![Vec::with_capacity(group.len()); key_columns.len() + set.len()];
            for entry in &group {
                let NetChange::Update(row) = &entry.change else {
                    unreachable!("grouped updates only")
                };
                for (k, value) in entry.key.iter().enumerate() {
                    columns[k].push(value.clone());
                }
                for (slot, &c) in set.iter().enumerate() {
                    columns[key_columns.len() + slot]
                        .push(value_bytes(&row[c], &self.tables[t].meta)?);
                }
            }
            let columns = columns.into_iter().map(TextArray).collect();
            self.send(
                sql,
                columns,
                Purpose::Updates {
                    table: t,
                    entries: group,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Applies the table's conflict policy to one conflicting change.
    async fn conflict(
        &mut self,
        t: usize,
        kind: ConflictKind,
        entry: &Entry,
    ) -> Result<(), ApplyError> {
        let meta = &self.tables[t].meta;
        let policy = self.tables[t].policy;
        let key_json = key_json(meta, &entry.key);
        let policy_label = match policy {
            ConflictPolicy::Error => "error",
            ConflictPolicy::Skip => "skip",
            ConflictPolicy::Overwrite => "overwrite",
        };
        metrics::counter!("stagingprop_conflicts_total", "table" => meta.table_name().to_string(), "policy" => policy_label)
            .increment(1);
        match (policy, kind) {
            (ConflictPolicy::Error, _) => Err(ApplyError::Conflict {
                table: meta.table_name(),
                kind,
                key: key_json.to_string(),
                lsn: entry.source.lsn,
                xid: entry.source.xid,
            }),
            // Overwrite: the row is already gone; production ends as staging wants it.
            (ConflictPolicy::Overwrite, ConflictKind::DeleteMissing) => {
                self.stats.conflicts_overwritten += 1;
                Ok(())
            }
            // Overwrite an update of a missing row by inserting it, when every column was sent.
            (ConflictPolicy::Overwrite, ConflictKind::UpdateMissing)
                if matches!(&entry.change, NetChange::Update(row)
                    if row.iter().all(|v| !matches!(v, Value::UnchangedToast))) =>
            {
                let NetChange::Update(row) = &entry.change else {
                    unreachable!()
                };
                let all: Vec<usize> = (0..row.len()).collect();
                let sql = statements::insert_rows(meta, &all, true);
                let columns = row
                    .iter()
                    .map(|v| value_bytes(v, meta).map(|b| TextArray(vec![b])))
                    .collect::<Result<Vec<_>, _>>()?;
                let statement = self.statement(sql, columns.len()).await?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                self.client
                    .execute(&statement, &refs)
                    .await
                    .map_err(query_error("inserting an overwritten row"))?;
                self.stats.conflicts_overwritten += 1;
                Ok(())
            }
            _ => {
                let unmapped = matches!(
                    kind,
                    ConflictKind::UpdateUnmapped | ConflictKind::DeleteUnmapped
                );
                let reason = if policy == ConflictPolicy::Overwrite && !unmapped {
                    format!(
                        "{kind}; not every column was sent (unchanged TOAST values), so it cannot be inserted"
                    )
                } else {
                    kind.to_string()
                };
                let row_json = match &entry.change {
                    NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) => {
                        Some(row_json(meta, row))
                    }
                    NetChange::Delete => None,
                };
                let table = meta.table_name().to_string();
                quarantine::insert(
                    &self.client,
                    &quarantine::Entry {
                        slot: &self.slot,
                        lsn: entry.source.lsn,
                        xid: entry.source.xid,
                        table: &table,
                        operation: kind.operation(),
                        reason: &reason,
                        key: &key_json,
                        row: row_json.as_ref(),
                    },
                )
                .await?;
                self.stats.conflicts_skipped += 1;
                tracing::warn!(
                    table = %table, key = %key_json, lsn = %entry.source.lsn, xid = entry.source.xid,
                    "conflict: {reason}; the change was written to {}.quarantine and skipped",
                    state::SCHEMA
                );
                Ok(())
            }
        }
    }

    /// Production's WAL flush position now.
    pub async fn wal_flushed(&self) -> Result<Lsn, ApplyError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(query_error("reading production's WAL flush position"))?;
        Ok(row.get::<_, &str>(0).parse().unwrap_or_default())
    }

    /// Makes production flush its WAL as far as it goes now and returns the flush position: a
    /// transaction that writes (this slot's progress row, unchanged) commits synchronously, and
    /// the flush of its commit record covers every asynchronous commit before it.
    pub async fn flush_wal(&self) -> Result<Lsn, ApplyError> {
        let flush = async {
            self.client
                .batch_execute("BEGIN; SET LOCAL synchronous_commit = on")
                .await?;
            state::progress::touch(&self.client, &self.slot).await?;
            self.client.batch_execute("COMMIT").await
        };
        if let Err(e) = flush.await {
            let _ = self.client.batch_execute("ROLLBACK").await;
            return Err(query_error("flushing production's WAL")(e));
        }
        self.wal_flushed().await
    }

    /// Ends the batch whose last staging transaction is `last`: sends what is pending and
    /// returns without waiting for production. The batch commits ([`Applier::complete`]) when
    /// the next batch first needs the session, so production runs one batch's statements while
    /// the pipeline reads and consolidates the next.
    pub async fn close(&mut self, last: &Progress) -> Result<(), ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.closing = Some(*last);
        self.sent_rows = 0;
        self.sent_bytes = 0;
        self.files.close();
        Ok(())
    }

    /// Commits the closed batch, if there is one: settles its statements (conflict policy),
    /// records its last staging transaction in the progress table, and commits (asynchronously:
    /// see [`Committed`]). The caller takes the result from [`Applier::take_committed`].
    pub async fn complete(&mut self) -> Result<(), ApplyError> {
        let Some(last) = self.closing.take() else {
            return Ok(());
        };
        self.settle().await?;
        if let Err(e) = self.run_hooks().await {
            let _ = self.rollback().await;
            return Err(e);
        }
        // Files go into place before the COMMIT: a crash between the two leaves them ahead of
        // production, and applying the batch again rewrites the same content.
        if let Err(e) = self.files.publish() {
            let _ = self.rollback().await;
            return Err(e.into());
        }
        let files = std::mem::take(&mut self.files.stats);
        if files != FileStats::default() {
            metrics::counter!("stagingprop_files_total", "op" => "written")
                .increment(files.written);
            metrics::counter!("stagingprop_files_total", "op" => "removed")
                .increment(files.removed);
            metrics::counter!("stagingprop_files_total", "op" => "refused")
                .increment(files.refused);
        }
        self.stats.files.add(files);
        let statement = match (&self.progress_statement, self.record_progress) {
            (_, false) => None,
            (Some(statement), true) => Some(statement.clone()),
            (None, true) => {
                let statement = state::progress::prepare_advance(&self.client).await?;
                self.progress_statement = Some(statement.clone());
                Some(statement)
            }
        };
        // The progress row's guarded write and the COMMIT travel together (one round trip): a
        // write that finds the row moved fails, so the COMMIT behind it rolls back. With the
        // COMMIT: where production's WAL ends after the commit record (durable once flushed
        // that far) and how far it is flushed already.
        let advance = async {
            match &statement {
                Some(statement) => {
                    state::progress::advance_prepared(
                        &self.client,
                        statement,
                        &self.slot,
                        &last,
                        self.progress_at,
                    )
                    .await
                }
                None => Ok(true),
            }
        };
        let commit = self.client.simple_query(
            "COMMIT; SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
        );
        let (written, replies) = tokio::join!(advance, commit);
        if !matches!(written, Ok(true)) {
            // The transaction is over (the COMMIT rolled it back, or the session is gone).
            self.in_transaction = false;
            let _ = self.rollback().await;
            return Err(match written {
                Err(e) => e.into(),
                // The error to report is the moved row, whatever the rollback says.
                _ => ApplyError::ProgressMoved {
                    slot: self.slot.clone(),
                    expected: self.progress_at,
                },
            });
        }
        let replies = replies.map_err(query_error("COMMIT"))?;
        self.in_transaction = false;
        self.stats.batches += 1;
        self.progress_at = last.end_lsn;
        let row = replies.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        let lsn = |i: usize| -> Result<Lsn, ApplyError> {
            row.and_then(|r| r.get(i))
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    ApplyError::Schema(
                        "production did not report its WAL position after COMMIT".into(),
                    )
                })
        };
        self.committed.push(Committed {
            end: last.end_lsn,
            durable_at: lsn(0)?,
            flushed: lsn(1)?,
        });
        Ok(())
    }

    /// What this session takes the progress row to hold; a commit moves it only from there.
    pub fn progress_at(&self) -> Lsn {
        self.progress_at
    }

    /// Another session of the same sync committed and moved the progress row to `lsn`.
    pub fn set_progress_at(&mut self, lsn: Lsn) {
        self.progress_at = lsn;
    }

    /// Sends and settles everything pending, then sets savepoint `name` in the open
    /// transaction (a staging subtransaction starts: it may be rolled back alone).
    pub async fn savepoint(&mut self, name: &str) -> Result<Savepoint, ApplyError> {
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        self.client
            .batch_execute(&format!("SAVEPOINT {}", quote_ident(name)))
            .await
            .map_err(query_error("SAVEPOINT"))?;
        Ok(Savepoint {
            stats: self.stats,
            files: self.files.mark(),
            invalidations: self.invalidations.mark(),
        })
    }

    /// Undoes everything since savepoint `name`, what is pending in memory included.
    pub async fn rollback_to(&mut self, name: &str, at: Savepoint) -> Result<(), ApplyError> {
        self.settle().await?;
        for t in &mut self.tables {
            t.changes.drain();
        }
        self.pending_rows = 0;
        self.pending_bytes = 0;
        self.files.rewind(at.files);
        self.invalidations.rewind(at.invalidations);
        self.stats = at.stats;
        self.client
            .batch_execute(&format!("ROLLBACK TO SAVEPOINT {}", quote_ident(name)))
            .await
            .map_err(query_error("ROLLBACK TO SAVEPOINT"))
    }

    /// The batches committed since the last call, oldest first.
    pub fn take_committed(&mut self) -> Vec<Committed> {
        std::mem::take(&mut self.committed)
    }

    /// Abandons the open transaction (a closed batch included) and everything pending.
    pub async fn rollback(&mut self) -> Result<(), ApplyError> {
        self.closing = None;
        self.files.discard();
        self.invalidations.clear();
        for flight in self.in_flight.drain(..) {
            flight.result.abort();
        }
        for t in &mut self.tables {
            t.changes.drain();
        }
        if let Some(remap) = &mut self.remap {
            remap.rolled_back();
        }
        self.pending_rows = 0;
        self.pending_bytes = 0;
        self.sent_rows = 0;
        self.sent_bytes = 0;
        if self.in_transaction {
            self.in_transaction = false;
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(query_error("ROLLBACK"))?;
        }
        Ok(())
    }
}

fn as_str<'a>(value: Option<&'a Bytes>, table: &TableName) -> Result<Option<&'a str>, ApplyError> {
    match value {
        None => Ok(None),
        Some(b) => std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| ApplyError::NotUtf8 {
                table: table.clone(),
            }),
    }
}

/// A value as a text array element: NULL, or the text bytes staging sent.
fn value_bytes(value: &Value, meta: &TableMeta) -> Result<Option<Bytes>, ApplyError> {
    match value {
        Value::Text(b) => Ok(Some(b.clone())),
        Value::Null | Value::UnchangedToast => Ok(None),
        Value::Binary(_) => Err(ApplyError::Schema(format!(
            "binary values are not applied (table {}); stagingprop streams in text mode",
            meta.table_name()
        ))),
    }
}

fn value_str<'a>(value: &'a Value, table: &TableName) -> Result<Option<&'a str>, ApplyError> {
    match value {
        Value::Text(b) => as_str(Some(b), table),
        Value::Null | Value::UnchangedToast => Ok(None),
        Value::Binary(_) => Err(ApplyError::Schema(format!(
            "binary values are not applied (table {table}); stagingprop streams in text mode"
        ))),
    }
}

fn key_json(meta: &TableMeta, key: &Key) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (&k, value) in meta.key.iter().zip(key) {
        let v = value
            .as_ref()
            .map(|b| serde_json::Value::String(String::from_utf8_lossy(b).into_owned()))
            .unwrap_or(serde_json::Value::Null);
        map.insert(meta.columns[k].name.clone(), v);
    }
    serde_json::Value::Object(map)
}

fn row_json(meta: &TableMeta, row: &Tuple) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (column, value) in meta.columns.iter().zip(row) {
        let v = match value {
            Value::Text(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
            Value::Null => serde_json::Value::Null,
            Value::UnchangedToast => serde_json::json!({"unchanged_toast": true}),
            Value::Binary(b) => serde_json::json!({"binary_len": b.len()}),
        };
        map.insert(column.name.clone(), v);
    }
    serde_json::Value::Object(map)
}
