//! Applying staging's changes to production: the production session and its open transaction
//! ([`Applier`]), consolidated per table ([`crate::change`]) and sent as set-based statements
//! ([`statements`]) that run while the next are built ([`in_flight`]); conflicts with their
//! per-table policy and the quarantine ([`conflict`]); the batch's end, with the progress row
//! written in the same transaction as the changes, which makes apply exactly-once ([`commit`]).
//! Around a batch: managed files ([`managed_files`]), cache invalidation ([`invalidate`]) and
//! the statistics production's planner needs after large loads ([`statistics`]).

mod commit;
mod conflict;
mod error;
mod in_flight;
pub mod index_builds;
pub(crate) mod invalidate;
mod keyless;
pub mod managed_files;
mod one_trip;
mod production_edit;
mod repair;
mod schema_change;
mod shape;
pub(crate) mod statements;
pub(crate) mod statistics;
mod target;

use std::collections::HashMap;

use bytes::Bytes;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

pub use self::commit::{Committed, Savepoint, flush_wal};
use self::error::query_error;
pub use self::error::{ApplyError, ConflictKind, SchemaChangeRefused};
use self::in_flight::{InFlight, Purpose, QueryFuture, Reported, TextArray};
use self::invalidate::{Invalidations, NotifiedTable};
use self::managed_files::{FileStats, Publisher};
pub(crate) use self::schema_change::describe as describe_plan;
pub(crate) use self::shape::{RowChange, Shapes, key_of};
pub use self::target::Target;
use crate::catalog::{self as schema, TableMeta};
use crate::change::{Entry, Key, NetChange, RowOp, Source, TableChanges};
use crate::config::{ColumnList, ConflictPolicy, EditPolicy, GuardMode, TableName};
use crate::model::{Lsn, Tuple, Value};
use crate::remap::{MapWrites, Remapper};
use crate::state::{Progress, key_map};

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
    /// Batches sent together with their COMMIT (see `one_trip`), and how many of those
    /// production refused (applied again the careful way).
    pub batches_one_trip: u64,
    pub batches_refused: u64,
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
        self.batches_one_trip += other.batches_one_trip;
        self.batches_refused += other.batches_refused;
        self.keys_remapped += other.keys_remapped;
        self.files.add(other.files);
    }
}

struct TableState {
    meta: TableMeta,
    policy: ConflictPolicy,
    changes: TableChanges,
    /// The config's column list: which of staging's columns (present and future) are managed.
    columns: ColumnList,
    /// Set when production's own edits of the table are recorded (`guard = "record"`): sync
    /// leaves an edited row to the table's edit policy.
    edits: Option<EditWatch>,
    /// Being seeded online: its conflicts are the seed's to settle.
    seeding: bool,
    /// Not on production (yet, or any more): created on staging and on its way, or dropped with
    /// staging's; `meta` is what its creation will make of it.
    absent: bool,
    /// Dropped on production when staging's is dropped.
    drop_with_staging: bool,
    /// Managed by a `[[table_patterns]]` entry: a rename on staging is followed.
    from_pattern: bool,
    /// The table's config when production guards it: sync installs the guard on a table it
    /// creates, and again when the table's key changes (the guard records edits by key).
    guarded: Option<crate::config::TableConfig>,
}

/// A table whose production edits sync watches.
struct EditWatch {
    /// The table as the guard records it (`production_edits.table_name`).
    name: String,
    /// The same, as a SQL literal.
    literal: String,
    policy: EditPolicy,
}

/// The production side of sync: one session, at most one open transaction.
pub struct Applier {
    client: std::sync::Arc<Client>,
    in_flight: Vec<InFlight>,
    slot: String,
    tables: Vec<TableState>,
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
    one_by_one: bool,
    stats: ApplyStats,
    /// Whether foreign-key triggers are off for this session (`session_replication_role`).
    replica_role: bool,
    /// Translates keys when some table does not keep staging's keys.
    remap: Option<Remapper>,
    /// The progress row as this applier last saw it: a commit moves it only from there, so two
    /// appliers never both apply the same transactions.
    progress_at: Lsn,
    /// A closed batch ([`Applier::close`]): every statement sent, its COMMIT not yet.
    closing: Option<Progress>,
    /// The closed batch went with its COMMIT ([`one_trip`]): its changes, to apply again the
    /// careful way should production refuse them, and the COMMIT's response.
    one_trip: Option<one_trip::OneTrip>,
    /// Batches committed that the caller has not taken yet ([`Applier::take_committed`]).
    committed: Vec<Committed>,
    /// Publishes the managed-file tables' rows as files, batch by batch.
    files: Publisher,
    /// Cache invalidation (`notify`, `after_batch_sql`): what to run before each COMMIT, and
    /// the keys the open batch changed. `None` when the config asks for neither.
    hooks: Option<Hooks>,
    invalidations: Invalidations,
    /// The progress row's guarded write, prepared once per session.
    progress_statement: Option<Statement>,
    /// Whether a commit moves the progress row (off for `quarantine retry`, which applies
    /// old changes and leaves the position alone).
    record_progress: bool,
    /// Index builds schema changes of the open batch recorded, to run once it commits.
    builds_waiting: Vec<index_builds::WaitingBuild>,
    /// How staging's relations land on this session's tables.
    shapes: shape::Shapes,
    /// `batch_max_rows` and `batch_max_bytes`: a batch this large is full, and what is pending
    /// is sent on once it is this large (memory stays bounded).
    limits: (usize, usize),
}

/// What runs in every batch's transaction before its COMMIT.
struct Hooks {
    channel: String,
    tables: Vec<NotifiedTable>,
    any_notify: bool,
    after_batch_sql: Option<String>,
    after_batch: Option<Statement>,
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
                columns: ColumnList::All,
                edits: None,
                seeding: false,
                absent: false,
                drop_with_staging: false,
                from_pattern: false,
                guarded: None,
            })
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
            one_trip: None,
            committed: Vec::new(),
            files: Publisher::default(),
            record_progress: true,
            builds_waiting: Vec::new(),
            hooks: None,
            invalidations: Invalidations::default(),
            progress_statement: None,
            shapes: shape::Shapes::default(),
            limits: (usize::MAX, usize::MAX),
        })
    }

    /// Limits the size of batches: `max_rows` rows and `max_bytes` bytes (what is pending is
    /// sent on at those sizes too).
    pub fn limit_batches(&mut self, max_rows: usize, max_bytes: usize) {
        self.limits = (max_rows, max_bytes);
    }

    /// Bytes consolidated but not yet sent.
    fn pending_bytes(&self) -> usize {
        self.pending_bytes.max(0) as usize
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

    /// Takes each table's column list from `config` (which of staging's columns a schema change
    /// may touch on production).
    pub fn set_column_lists(&mut self, config: &crate::config::Config) {
        for (state, table) in self.tables.iter_mut().zip(&config.tables) {
            state.columns = table.columns.clone();
        }
    }

    /// Takes which tables production lacks (`absent`: created on staging, their creation on its
    /// way), which are dropped with staging's (`config`'s patterns) and which are guarded.
    pub fn set_lifecycles(&mut self, config: &crate::config::Config, absent: &[bool]) {
        for ((state, table), &absent) in self.tables.iter_mut().zip(&config.tables).zip(absent) {
            state.absent = absent;
            state.drop_with_staging = table.drop_with_staging;
            state.from_pattern = table.from_pattern;
            state.guarded = (table.guard != GuardMode::Off).then(|| table.clone());
        }
    }

    /// Watches production's own edits of the tables `config` guards with `guard = "record"`
    /// (those with a key: the guard records an edit by it), under each one's
    /// `on_production_edit`.
    pub fn watch_production_edits(&mut self, config: &crate::config::Config) {
        for (state, table) in self.tables.iter_mut().zip(&config.tables) {
            state.edits =
                (table.guard == GuardMode::Record && !state.meta.key.is_empty()).then(|| {
                    let name = table.name.to_string();
                    EditWatch {
                        literal: crate::quote::quote_literal(&name),
                        name,
                        policy: table.on_production_edit,
                    }
                });
        }
    }

    /// The SQL literal naming table `t` in production's edits, when sync watches them.
    fn watched(&self, t: usize) -> Option<&str> {
        self.tables[t].edits.as_ref().map(|w| w.literal.as_str())
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

    /// Whether foreign-key triggers are off for this session (`session_replication_role`).
    pub fn replica_role(&self) -> bool {
        self.replica_role
    }

    /// Commits leave the progress row where it is (`quarantine retry` applies old changes).
    pub fn leave_progress_alone(&mut self) {
        self.record_progress = false;
    }

    /// The managed-file publisher of this session.
    pub fn files(&self) -> &Publisher {
        &self.files
    }

    pub fn meta(&self, table: usize) -> &TableMeta {
        &self.tables[table].meta
    }

    pub fn client(&self) -> &Client {
        &self.client
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
        if self.tables[table].edits.is_some() {
            self.lock_row(table, &old_key).await?;
            if let Some(edits) = self.open_edits(table, &old_key).await? {
                let entry = Entry {
                    key: old_key.clone(),
                    change: NetChange::Update(new.clone()),
                    source,
                };
                if self.production_edit(table, &entry, edits, true).await?
                    == production_edit::Decided::Done
                {
                    return Ok(());
                }
            }
        }
        let meta = &self.tables[table].meta;
        // A `GENERATED ALWAYS AS IDENTITY` key column that staging moved (UPDATE ... SET id =
        // DEFAULT) takes the new value only while it is BY DEFAULT, within this transaction;
        // one that kept its value is not assigned at all.
        let moved_identity: Vec<usize> = meta
            .key
            .iter()
            .zip(&old_key)
            .filter(|&(&k, old)| {
                !meta.assignable(k)
                    && match &new[k] {
                        Value::Text(b) | Value::Binary(b) => old.as_ref() != Some(b),
                        _ => false,
                    }
            })
            .map(|(&k, _)| k)
            .collect();
        let set: Vec<usize> = (0..new.len())
            .filter(|&c| {
                !matches!(new[c], Value::UnchangedToast)
                    && (meta.assignable(c) || moved_identity.contains(&c))
            })
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
        if !moved_identity.is_empty() {
            self.client
                .batch_execute(&statements::identity_generated(
                    meta,
                    &moved_identity,
                    false,
                ))
                .await
                .map_err(query_error(
                    "letting an identity column take staging's new value",
                ))?;
        }
        let updated = self
            .client
            .execute(&sql, &refs)
            .await
            .map_err(query_error("applying a key change"))?;
        if !moved_identity.is_empty() {
            self.client
                .batch_execute(&statements::identity_generated(meta, &moved_identity, true))
                .await
                .map_err(query_error("restoring GENERATED ALWAYS"))?;
        }
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
        let drained = self.drain_pending();
        self.send_drained(drained).await
    }

    /// Takes every pending change out of memory, counting it as sent; per table.
    fn drain_pending(&mut self) -> Vec<Vec<Entry>> {
        let drained = self.tables.iter_mut().map(|t| t.changes.drain()).collect();
        self.sent_rows += self.pending_rows;
        self.sent_bytes += self.pending_bytes();
        self.pending_rows = 0;
        self.pending_bytes = 0;
        drained
    }

    /// Sends drained changes (per table) in the open transaction: key translation and the
    /// key map, invalidations noted, then the statements.
    async fn send_drained(&mut self, mut drained: Vec<Vec<Entry>>) -> Result<(), ApplyError> {
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
        self.send_statements(drained, false).await
    }

    /// The statements for drained changes, `checked` ones (failing on the server at a
    /// conflict) or not. Children's deletes before parents', parents' inserts and updates
    /// before children's.
    async fn send_statements(
        &mut self,
        mut drained: Vec<Vec<Entry>>,
        checked: bool,
    ) -> Result<(), ApplyError> {
        let order = self.order.clone();
        let watched_keys = self.watched_keys(&drained);
        if !watched_keys.is_empty() {
            self.note_edit_snapshot().await?;
        }
        for &t in order.iter().rev() {
            self.send_deletes(t, &drained[t], checked).await?;
        }
        for &t in &order {
            let entries = std::mem::take(&mut drained[t]);
            self.send_upserts(t, entries, checked).await?;
        }
        for (t, keys) in watched_keys {
            self.check_edit_race(t, keys, checked).await?;
        }
        Ok(())
    }

    /// Sends the key-map writes that go with the rows being applied.
    async fn send_key_map(&mut self, writes: MapWrites) -> Result<(), ApplyError> {
        let MapWrites {
            mapped,
            unmapped,
            noted,
            forgotten,
        } = writes;
        for (sql, columns) in [
            (key_map::insert_production_keys(), noted),
            (key_map::delete_production_keys(), forgotten),
        ] {
            if !columns[0].is_empty() {
                let columns = columns.into_iter().map(TextArray).collect();
                self.send(sql, columns, Purpose::KeyMap).await?;
            }
        }
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

    /// Deletes of `Delete` and `Replace` entries; only a plain delete of a missing row is a
    /// conflict (a replaced row is inserted right after either way).
    async fn send_deletes(
        &mut self,
        t: usize,
        entries: &[Entry],
        checked: bool,
    ) -> Result<(), ApplyError> {
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
        let sql = if checked {
            statements::delete_rows_checked(meta, self.watched(t))
        } else {
            statements::delete_rows(meta, self.watched(t))
        };
        let columns = columns.into_iter().map(TextArray).collect();
        self.send(sql, columns, Purpose::Deletes { table: t, targets })
            .await
    }

    /// Inserts grouped by the columns they carry (production-only columns are left to their
    /// defaults), updates grouped by the columns they set.
    async fn send_upserts(
        &mut self,
        t: usize,
        entries: Vec<Entry>,
        checked: bool,
    ) -> Result<(), ApplyError> {
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
                        .filter(|&c| {
                            !key_columns.contains(&c)
                                && self.tables[t].meta.assignable(c)
                                && !matches!(row[c], Value::UnchangedToast)
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
        // In a table whose production edits sync watches, a key taken is judged row by row
        // (the edit policy first), never overwritten in bulk.
        let overwrite = self.tables[t].policy.inserts_overwrite() && self.tables[t].edits.is_none();
        for (present, group) in inserts {
            let meta = &self.tables[t].meta;
            // An overwriting insert has no conflict to check: it logs what it overwrote.
            let sql = if overwrite {
                statements::overwrite_rows(
                    meta,
                    &present,
                    &crate::quote::quote_literal(&self.slot),
                    &crate::quote::quote_literal(&meta.table_name().to_string()),
                )
            } else if checked {
                statements::insert_rows_checked(meta, &present)
            } else {
                statements::insert_rows(meta, &present, false)
            };
            let extra = if overwrite { 2 } else { 0 };
            let mut columns: Vec<Vec<Option<Bytes>>> =
                vec![Vec::with_capacity(group.len()); present.len() + extra];
            for entry in &group {
                let (NetChange::Insert(row) | NetChange::Replace(row)) = &entry.change else {
                    unreachable!("grouped inserts only")
                };
                for (slot, &c) in present.iter().enumerate() {
                    columns[slot].push(value_bytes(&row[c], &self.tables[t].meta)?);
                }
                if overwrite {
                    let source = entry.source;
                    columns[present.len()].push(Some(Bytes::from(source.lsn.to_string())));
                    columns[present.len() + 1].push(Some(Bytes::from(source.xid.to_string())));
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
            let sql = if checked {
                statements::update_rows_checked(&self.tables[t].meta, &set, self.watched(t))
            } else {
                statements::update_rows(&self.tables[t].meta, &set, self.watched(t))
            };
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
