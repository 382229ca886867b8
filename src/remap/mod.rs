//! Key remapping between staging's and production's key spaces (docs/design.md, "Key remapping").
//!
//! Per table a rule says how a staging key becomes a production key: `identity` keeps it,
//! `offset` adds a constant, and the mapping rules (`remap-on-conflict`, `allocate`, `natural`)
//! decide a production key when a row is inserted and record it in the key map
//! (`stagingprop.key_map`), written in the same production transaction as the rows. Every
//! column holding a key of a remapped table (found from staging's foreign keys and
//! `[[references]]`) is translated with it.
//!
//! Translation happens when apply sends what is pending, table by table, parents first: a
//! parent's new keys are decided before its children's references to them are translated. Each
//! step asks production once per table for everything it does not know yet (stored mappings,
//! whether keys are taken, natural-key matches, fresh keys), so the cost is per batch, not per
//! row; what it learns is cached ([`cache`]) until the production transaction rolls back.

pub(crate) mod cache;
mod reshape;
pub(crate) mod store;

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use tokio_postgres::Client;

use self::cache::{KeyCache, Known, format_key, offset_key, parse_key};
use self::store::{Statements, StoreError};
use crate::catalog::{ColumnReference, TableMeta};
use crate::change::{Entry, Key, NetChange, Source};
use crate::config::{Config, KeyRule, TableName};
use crate::model::{Lsn, Tuple, Value, Xid};

/// Staging keys remembered per table before the cache starts over.
const CACHE_CAPACITY: usize = 1 << 20;

/// A reference to a key that has neither a mapping nor a row on production.
#[derive(Debug)]
pub struct UnmappedReference {
    pub table: TableName,
    pub column: String,
    pub parent: TableName,
    pub key: i64,
    pub lsn: Lsn,
    pub xid: Xid,
}

impl std::fmt::Display for UnmappedReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{} refers to {} key {}, which has no key mapping and no row on production \
             (staging transaction {} at {}). Nothing of this batch was applied: copy the missing {} row \
             to production (or seed it with `stagingprop copy`), then start sync again",
            self.table, self.column, self.parent, self.key, self.xid, self.lsn, self.parent
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    #[error("{0}")]
    UnmappedReference(Box<UnmappedReference>),
    #[error(
        "{table}.{column} holds {value:?}, which is not an integer key; remapped keys must be integers"
    )]
    NotAnInteger {
        table: TableName,
        column: String,
        value: String,
    },
    #[error("{table}: key {key} + offset {offset} does not fit in a bigint")]
    OffsetOverflow {
        table: TableName,
        key: i64,
        offset: i64,
    },
    #[error(
        "{table}: the fresh keys its key source hands out keep colliding with staging keys kept in the same batch; give production's key source a range of its own"
    )]
    KeysCollide { table: TableName },
    #[error(transparent)]
    Store(Box<StoreError>),
}

impl From<StoreError> for RemapError {
    fn from(e: StoreError) -> Self {
        RemapError::Store(Box::new(e))
    }
}

/// A column of a table that holds keys of a remapped table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Production column index in the referencing table.
    pub column: usize,
    /// Index (in config order) of the remapped table it refers to.
    pub parent: usize,
}

struct TableRemap {
    name: TableName,
    /// `name` as the key map stores it.
    name_text: Bytes,
    rule: KeyRule,
    columns: Vec<String>,
    /// Production key columns, in key order.
    key: Vec<usize>,
    /// The single integer key column, for every rule but identity.
    key_column: Option<usize>,
    /// Natural-key columns (index, SQL type) for the natural rule.
    natural: Vec<(usize, String)>,
    references: Vec<Reference>,
    /// `[[references]]` columns of the table (name, parent), found again after a schema change.
    configured: Vec<(String, usize)>,
    cache: KeyCache,
    /// Whether loading the whole key map into the cache was tried since the last rollback.
    loaded: bool,
}

impl TableRemap {
    fn maps(&self) -> bool {
        matches!(
            self.rule,
            KeyRule::RemapOnConflict { .. } | KeyRule::Allocate { .. } | KeyRule::Natural { .. }
        )
    }
}

/// Key-map writes that belong to the production transaction of the rows they map, as text
/// arrays for [`key_map::insert_mappings`](crate::state::key_map::insert_mappings) and [`key_map::delete_mappings`](crate::state::key_map::delete_mappings).
#[derive(Debug, Default)]
pub struct MapWrites {
    pub mapped: [Vec<Option<Bytes>>; 3],
    pub unmapped: [Vec<Option<Bytes>>; 2],
    /// Keys production's own rows hold, to note ([`key_map::production_keys`]), and noted keys
    /// staging's rows hold now, to forget (table names, keys).
    pub noted: [Vec<Option<Bytes>>; 2],
    pub forgotten: [Vec<Option<Bytes>>; 2],
}

impl MapWrites {
    fn map(&mut self, table: &Bytes, source: i64, target: i64) {
        self.mapped[0].push(Some(table.clone()));
        self.mapped[1].push(Some(format_key(source)));
        self.mapped[2].push(Some(format_key(target)));
    }

    fn unmap(&mut self, table: &Bytes, source: i64) {
        self.unmapped[0].push(Some(table.clone()));
        self.unmapped[1].push(Some(format_key(source)));
    }

    fn note_production_key(&mut self, table: &Bytes, key: i64) {
        self.noted[0].push(Some(table.clone()));
        self.noted[1].push(Some(format_key(key)));
    }

    fn forget_production_key(&mut self, table: &Bytes, key: i64) {
        self.forgotten[0].push(Some(table.clone()));
        self.forgotten[1].push(Some(format_key(key)));
    }
}

/// A change whose own key cannot be translated: an update or delete of a row an allocating
/// rule never mapped (production has no row for it).
#[derive(Debug)]
pub struct Unresolved {
    pub table: usize,
    pub entry: Entry,
}

/// What translating a flush produced besides the rewritten changes.
#[derive(Debug, Default)]
pub struct Translated {
    pub writes: MapWrites,
    pub unresolved: Vec<Unresolved>,
}

/// The remapping state of one production session.
pub struct Remapper {
    tables: Vec<TableRemap>,
    statements: Statements,
}

fn integer_type(type_sql: &str) -> bool {
    matches!(type_sql, "smallint" | "integer" | "bigint")
}

/// A column found to hold keys of a remapped table (`why`: a foreign key, `[[references]]`).
struct ReferenceFound<'a> {
    column: &'a str,
    parent: &'a TableName,
    why: &'a str,
}

impl ReferenceFound<'_> {
    /// The column's position in `meta` (the referencing table on production, whose remapped key
    /// column is `key_column`), or what keeps its values from being translated.
    fn position(
        &self,
        meta: &TableMeta,
        key_column: Option<usize>,
        same_table: bool,
    ) -> Result<usize, String> {
        let (child, column, parent, why) = (meta.table_name(), self.column, self.parent, self.why);
        if meta.key.is_empty() {
            return Err(format!(
                "{child}.{column} ({why}) refers to the remapped {parent}, but {child} has no \
                 primary key: rows without a key are applied as staging sent them, never \
                 translated; add a primary key to it"
            ));
        }
        let Some(c) = meta.column_index(column) else {
            return Err(format!(
                "{child}.{column} ({why}) does not exist on production"
            ));
        };
        if !integer_type(&meta.columns[c].type_sql) {
            return Err(format!(
                "{child}.{column} ({why}) is {}; keys of the remapped {parent} are integers",
                meta.columns[c].type_sql
            ));
        }
        if key_column == Some(c) && !same_table {
            return Err(format!(
                "{child}.{column} is both the remapped key of {child} and a reference to \
                 {parent}: give {child} rule \"identity\" so its key follows {parent}"
            ));
        }
        Ok(c)
    }
}

impl Remapper {
    /// Builds the remapping of the configured tables (`metas`: production's, in config order)
    /// with the references declared on staging. `None` when every table keeps its keys. Every
    /// problem is one line.
    pub fn new(
        config: &Config,
        metas: &[TableMeta],
        declared: &[ColumnReference],
    ) -> Result<Option<Remapper>, Vec<String>> {
        if config.tables.iter().all(|t| t.key == KeyRule::Identity) {
            return Ok(None);
        }
        let mut problems = Vec::new();
        let mut tables: Vec<TableRemap> = Vec::with_capacity(metas.len());
        for (table, meta) in config.tables.iter().zip(metas) {
            let mut remap = TableRemap {
                name: table.name.clone(),
                name_text: Bytes::from(table.name.to_string()),
                rule: table.key.clone(),
                columns: meta.columns.iter().map(|c| c.name.clone()).collect(),
                key: meta.key.clone(),
                key_column: None,
                natural: Vec::new(),
                references: Vec::new(),
                configured: Vec::new(),
                cache: KeyCache::new(CACHE_CAPACITY),
                loaded: false,
            };
            if table.key != KeyRule::Identity {
                match meta.key.as_slice() {
                    [k] if integer_type(&meta.columns[*k].type_sql) => remap.key_column = Some(*k),
                    _ => problems.push(format!(
                        "{}: key rule \"{}\" needs a primary key of one integer column (smallint, integer or bigint); production's is ({})",
                        table.name,
                        table.key.as_str(),
                        meta.key
                            .iter()
                            .map(|&k| format!("{} {}", meta.columns[k].name, meta.columns[k].type_sql))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
            if let KeyRule::Natural { columns, .. } = &table.key {
                for column in columns {
                    match meta.column_index(column) {
                        None => problems.push(format!(
                            "{}: natural key column {column} does not exist on production",
                            table.name
                        )),
                        Some(c) if remap.key_column == Some(c) => problems.push(format!(
                            "{}: natural key column {column} is the primary key itself; list the columns that identify a row on both sides",
                            table.name
                        )),
                        Some(c) => remap.natural.push((c, meta.columns[c].type_sql.clone())),
                    }
                }
            }
            tables.push(remap);
        }
        let index: HashMap<&TableName, usize> = config
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| (&t.name, i))
            .collect();
        // Declared foreign keys first, then the configured references for undeclared ones.
        let mut found: Vec<(usize, String, usize, String)> = Vec::new();
        for fk in declared {
            let (Some(&child), Some(&parent)) = (index.get(&fk.child), index.get(&fk.parent))
            else {
                continue;
            };
            if config.tables[parent].key == KeyRule::Identity {
                continue;
            }
            if metas[child].column_index(&fk.column).is_none() {
                // Staging's column is not on production yet: it comes with a schema change on
                // its way (sync starts only if one accounts for it), and the reference with it.
                tracing::debug!(table = %fk.child, column = %fk.column, "reference not on production yet");
                continue;
            }
            found.push((
                child,
                fk.column.clone(),
                parent,
                format!(
                    "foreign key on staging to {}.{}",
                    fk.parent, fk.parent_column
                ),
            ));
            let parent_key = tables[parent]
                .key_column
                .map(|k| tables[parent].columns[k].clone());
            if parent_key.as_deref().is_some_and(|k| k != fk.parent_column) {
                problems.push(format!(
                    "{}.{} refers to {}.{}, which is not the remapped key of {}; only references to a remapped table's primary key can be translated",
                    fk.child, fk.column, fk.parent, fk.parent_column, fk.parent
                ));
            }
        }
        for reference in &config.references {
            let child_name = reference.column.table.clone();
            let Some(&child) = index.get(&child_name) else {
                problems.push(format!(
                    "[[references]] column {} is in {child_name}, which is not a managed table: add a [[tables]] entry for it",
                    reference.column
                ));
                continue;
            };
            let parent = index[&reference.table];
            if config.tables[parent].key == KeyRule::Identity {
                continue;
            }
            let column = reference.column.column.clone();
            tables[child].configured.push((column.clone(), parent));
            if !found
                .iter()
                .any(|(c, col, _, _)| *c == child && *col == column)
            {
                found.push((child, column, parent, "[[references]]".into()));
            }
        }
        for (child, column, parent, why) in found {
            let found = ReferenceFound {
                column: &column,
                parent: &config.tables[parent].name,
                why: &why,
            };
            match found.position(&metas[child], tables[child].key_column, child == parent) {
                Ok(c) => tables[child]
                    .references
                    .push(Reference { column: c, parent }),
                Err(problem) => problems.push(problem),
            }
        }
        if problems.is_empty() {
            Ok(Some(Remapper {
                tables,
                statements: Statements::default(),
            }))
        } else {
            Err(problems)
        }
    }

    /// Whether key remapping reads or writes table `t` (its key is remapped, or it holds
    /// references to a remapped table).
    pub fn touches(&self, t: usize) -> bool {
        self.tables[t].key_column.is_some() || !self.tables[t].references.is_empty()
    }

    /// The columns of table `t` (config order) that hold keys of remapped tables.
    pub fn references(&self, t: usize) -> &[Reference] {
        &self.tables[t].references
    }

    pub fn rule(&self, t: usize) -> &KeyRule {
        &self.tables[t].rule
    }

    /// The name of column `c` of table `t` on production.
    pub fn column_name(&self, t: usize, c: usize) -> &str {
        &self.tables[t].columns[c]
    }

    /// The remapped key column of table `t` (every rule but identity).
    pub fn key_column(&self, t: usize) -> Option<usize> {
        self.tables[t].key_column
    }

    /// Forgets what was learned in a production transaction that rolled back.
    pub fn rolled_back(&mut self) {
        for table in &mut self.tables {
            table.cache.clear();
            table.loaded = false;
        }
    }

    /// Loads table `t`'s whole key map into its cache once (when it fits), so that keys without
    /// a mapping are known without asking production each time.
    async fn preload(&mut self, client: &Client, t: usize) -> Result<(), RemapError> {
        let table = &mut self.tables[t];
        if table.loaded || !table.maps() {
            return Ok(());
        }
        table.loaded = true;
        if let Some(mappings) = self
            .statements
            .whole_table(client, &table.name, CACHE_CAPACITY / 2)
            .await?
        {
            table.cache.load_complete(mappings.into_iter());
        }
        Ok(())
    }

    /// Translates pending changes (`drained[t]`: table `t`'s entries in staging keys) into
    /// production keys, deciding the keys of new rows. `order` lists tables parents first.
    pub async fn translate(
        &mut self,
        client: &Client,
        order: &[usize],
        drained: &mut [Vec<Entry>],
    ) -> Result<Translated, RemapError> {
        let mut out = Translated::default();
        let mut position = vec![0; order.len()];
        for (p, &t) in order.iter().enumerate() {
            position[t] = p;
        }
        // References to tables whose keys are decided earlier, then this table's own keys;
        // references to itself or to tables later in the order (cycles) once all are decided.
        for &t in order {
            let early: Vec<Reference> = self.tables[t]
                .references
                .iter()
                .filter(|r| position[r.parent] < position[t])
                .cloned()
                .collect();
            self.translate_references(client, t, &early, &mut drained[t])
                .await?;
            self.decide_keys(client, t, &mut drained[t], &mut out)
                .await?;
        }
        for &t in order {
            let late: Vec<Reference> = self.tables[t]
                .references
                .iter()
                .filter(|r| position[r.parent] >= position[t])
                .cloned()
                .collect();
            self.translate_references(client, t, &late, &mut drained[t])
                .await?;
        }
        Ok(out)
    }

    fn integer(&self, table: usize, column: usize, text: &[u8]) -> Result<i64, RemapError> {
        parse_key(text).ok_or_else(|| RemapError::NotAnInteger {
            table: self.tables[table].name.clone(),
            column: self.tables[table].columns[column].clone(),
            value: String::from_utf8_lossy(text).into_owned(),
        })
    }

    /// Rewrites `references` of table `t` in every entry (rows and keys).
    async fn translate_references(
        &mut self,
        client: &Client,
        t: usize,
        references: &[Reference],
        entries: &mut [Entry],
    ) -> Result<(), RemapError> {
        for reference in references {
            let key_slot = self.tables[t]
                .key
                .iter()
                .position(|&k| k == reference.column);
            let mut sources = Vec::new();
            let mut seen = HashSet::new();
            // A key that only finds the row to update or delete needs no check that its parent
            // exists: a wrong key finds no row, which is a conflict. A key a row will hold does.
            let mut held = HashSet::new();
            for entry in entries.iter() {
                let holds = match entry.change {
                    NetChange::Insert(_) | NetChange::Replace(_) => true,
                    NetChange::Update(_) => key_slot.is_none(),
                    NetChange::Delete => false,
                };
                for text in reference_values(entry, reference.column, key_slot) {
                    let source = self.integer(t, reference.column, text)?;
                    if seen.insert(source) {
                        sources.push(source);
                    }
                    if holds {
                        held.insert(source);
                    }
                }
            }
            if sources.is_empty() {
                continue;
            }
            let (targets, missing) = self
                .resolve_references(client, reference.parent, &sources, &held)
                .await?;
            if let Some(key) = missing {
                let source = entries
                    .iter()
                    .find(|e| {
                        reference_values(e, reference.column, key_slot)
                            .any(|text| parse_key(text) == Some(key))
                    })
                    .map(|e| e.source);
                return Err(RemapError::UnmappedReference(Box::new(UnmappedReference {
                    table: self.tables[t].name.clone(),
                    column: self.tables[t].columns[reference.column].clone(),
                    parent: self.tables[reference.parent].name.clone(),
                    key,
                    lsn: source.map(|s| s.lsn).unwrap_or_default(),
                    xid: source.map_or(0, |s| s.xid),
                })));
            }
            for entry in entries.iter_mut() {
                rewrite_reference(entry, reference.column, key_slot, &targets);
            }
        }
        Ok(())
    }

    /// Production keys of `sources` in the remapped table `parent`, and the first of `held`
    /// (keys rows will hold) that has neither a mapping nor a row on production. Other keys
    /// without a mapping are kept as they are.
    async fn resolve_references(
        &mut self,
        client: &Client,
        parent: usize,
        sources: &[i64],
        held: &HashSet<i64>,
    ) -> Result<(HashMap<i64, i64>, Option<i64>), RemapError> {
        let mut targets = HashMap::with_capacity(sources.len());
        if let KeyRule::Offset { offset } = self.tables[parent].rule {
            for &source in sources {
                targets.insert(source, self.offset(parent, source, offset)?);
            }
            return Ok((targets, None));
        }
        self.preload(client, parent).await?;
        let table = &mut self.tables[parent];
        let mut unknown = Vec::new();
        let mut unchecked = Vec::new();
        for &source in sources {
            match table.cache.get(source) {
                Some(Known::Mapped(target)) => {
                    targets.insert(source, target);
                }
                Some(Known::Same) => {
                    targets.insert(source, source);
                }
                Some(Known::Unmapped) => unchecked.push(source),
                None => unknown.push(source),
            }
        }
        if !unknown.is_empty() {
            let stored = self
                .statements
                .lookup(client, &table.name, &unknown)
                .await?;
            for (source, target) in stored {
                table.cache.set(source, Known::Mapped(target));
                targets.insert(source, target);
            }
            unchecked.extend(unknown.into_iter().filter(|s| !targets.contains_key(s)));
        }
        unchecked.retain(|source| {
            let check = held.contains(source);
            if !check {
                targets.insert(*source, *source);
            }
            check
        });
        if unchecked.is_empty() {
            return Ok((targets, None));
        }
        let key_column =
            table.columns[table.key_column.expect("remapped tables have a key")].clone();
        let existing: HashSet<i64> = self
            .statements
            .existing(client, &table.name, &key_column, &unchecked)
            .await?
            .into_iter()
            .collect();
        let mut missing = None;
        for source in unchecked {
            if existing.contains(&source) {
                table.cache.set(source, Known::Same);
                targets.insert(source, source);
            } else {
                table.cache.set(source, Known::Unmapped);
                missing.get_or_insert(source);
            }
        }
        Ok((targets, missing))
    }

    fn offset(&self, table: usize, source: i64, offset: i64) -> Result<i64, RemapError> {
        offset_key(source, offset).ok_or_else(|| RemapError::OffsetOverflow {
            table: self.tables[table].name.clone(),
            key: source,
            offset,
        })
    }

    /// Reads stored mappings of `sources` the cache does not know.
    async fn learn_mappings(
        &mut self,
        client: &Client,
        t: usize,
        sources: &[i64],
    ) -> Result<(), RemapError> {
        self.preload(client, t).await?;
        let table = &mut self.tables[t];
        let unknown: Vec<i64> = sources
            .iter()
            .copied()
            .filter(|&s| table.cache.get(s).is_none())
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let stored = self
            .statements
            .lookup(client, &table.name, &unknown)
            .await?;
        let stored: HashMap<i64, i64> = stored.into_iter().collect();
        for source in unknown {
            match stored.get(&source) {
                Some(&target) => table.cache.set(source, Known::Mapped(target)),
                None => table.cache.set(source, Known::Unmapped),
            }
        }
        Ok(())
    }

    /// Decides the production key of every entry of table `t` and rewrites it.
    async fn decide_keys(
        &mut self,
        client: &Client,
        t: usize,
        entries: &mut Vec<Entry>,
        out: &mut Translated,
    ) -> Result<(), RemapError> {
        let Some(key_column) = self.tables[t].key_column else {
            return Ok(());
        };
        let mut sources = Vec::with_capacity(entries.len());
        for entry in entries.iter() {
            let text = entry.key[0].as_deref().unwrap_or_default();
            sources.push(self.integer(t, key_column, text)?);
        }
        if let KeyRule::Offset { offset } = self.tables[t].rule {
            for (entry, &source) in entries.iter_mut().zip(&sources) {
                let target = self.offset(t, source, offset)?;
                set_key(entry, key_column, target);
            }
            return Ok(());
        }
        let existing_rows: Vec<i64> = entries
            .iter()
            .zip(&sources)
            .filter(|(e, _)| !matches!(e.change, NetChange::Insert(_)))
            .map(|(_, &s)| s)
            .collect();
        self.learn_mappings(client, t, &existing_rows).await?;

        let table = &mut self.tables[t];
        let remap_on_conflict = matches!(table.rule, KeyRule::RemapOnConflict { .. });
        let mut targets: Vec<Option<i64>> = vec![None; entries.len()];
        let mut taken: HashSet<i64> = HashSet::new();
        // Entries that need a key: kept unless taken (remap-on-conflict), matched on the
        // natural key, or fresh.
        let mut keep_if_free = Vec::new();
        let mut match_natural = Vec::new();
        let mut fresh = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let source = sources[i];
            let known = table.cache.get(source);
            let stored = match known {
                Some(Known::Mapped(target)) => Some(target),
                _ => None,
            };
            match (&entry.change, stored) {
                (NetChange::Insert(_), _) | (NetChange::Replace(_), None) => match table.rule {
                    KeyRule::RemapOnConflict { .. } => keep_if_free.push(i),
                    KeyRule::Natural { .. } => match_natural.push(i),
                    _ => fresh.push(i),
                },
                (_, Some(target)) => targets[i] = Some(target),
                (NetChange::Update(_) | NetChange::Delete, None) if remap_on_conflict => {
                    targets[i] = Some(source)
                }
                // Left without a target: the conflict policy decides.
                (NetChange::Update(_) | NetChange::Delete, None) => {}
            }
            if let Some(target) = targets[i] {
                taken.insert(target);
            }
            if matches!(entry.change, NetChange::Delete) {
                // The cache keeps the deleted row's key: deletes of its children may come in a
                // later flush of the same transaction (cascades follow their parent), after the
                // mapping or the row is gone from production.
                match stored {
                    Some(_) => out.writes.unmap(&table.name_text, source),
                    None if remap_on_conflict => table.cache.set(source, Known::Same),
                    None => {}
                }
            }
        }
        if !keep_if_free.is_empty() {
            let keys: Vec<i64> = keep_if_free.iter().map(|&i| sources[i]).collect();
            let key_name = table.columns[key_column].clone();
            let (existing, noted) = self
                .statements
                .taken_or_noted(client, &table.name, &key_name, &keys)
                .await?;
            let existing: HashSet<i64> = existing.into_iter().collect();
            let noted: HashSet<i64> = noted.into_iter().collect();
            for i in keep_if_free {
                let source = sources[i];
                if existing.contains(&source) {
                    // Production's own row holds the key: it stays proven production's after
                    // staging's row (and its mapping) is gone.
                    if !noted.contains(&source) {
                        out.writes.note_production_key(&table.name_text, source);
                    }
                    fresh.push(i);
                } else if taken.contains(&source) {
                    fresh.push(i);
                } else {
                    if noted.contains(&source) {
                        out.writes.forget_production_key(&table.name_text, source);
                    }
                    targets[i] = Some(source);
                    taken.insert(source);
                    table.cache.set(source, Known::Same);
                }
            }
        }
        if !match_natural.is_empty() {
            let columns: Vec<(String, String)> = table
                .natural
                .iter()
                .map(|(c, type_sql)| (table.columns[*c].clone(), type_sql.clone()))
                .collect();
            let mut values: Vec<Vec<Option<String>>> = vec![Vec::new(); columns.len()];
            for &i in &match_natural {
                let row = entry_row(&entries[i]).expect("inserts carry a row");
                for (slot, (c, _)) in table.natural.iter().enumerate() {
                    values[slot].push(match &row[*c] {
                        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
                        _ => None,
                    });
                }
            }
            let key_name = table.columns[key_column].clone();
            let matches = self
                .statements
                .natural_matches(client, &table.name, &key_name, &columns, values)
                .await?;
            let mut matched: HashMap<usize, i64> = HashMap::new();
            for (slot, target) in matches {
                matched.entry(slot).or_insert(target);
            }
            for (slot, i) in match_natural.into_iter().enumerate() {
                match matched.get(&slot) {
                    Some(&target) if !taken.contains(&target) => {
                        targets[i] = Some(target);
                        taken.insert(target);
                        out.writes.map(&table.name_text, sources[i], target);
                        table.cache.set(sources[i], Known::Mapped(target));
                        // The staging row becomes production's existing row: update it.
                        let entry = &mut entries[i];
                        if let NetChange::Insert(row) | NetChange::Replace(row) = &entry.change {
                            entry.change = NetChange::Update(row.clone());
                        }
                    }
                    _ => fresh.push(i),
                }
            }
        }
        if !fresh.is_empty() {
            let source_of_keys = table
                .rule
                .source()
                .expect("mapping rules have a key source");
            let mut keys = Vec::with_capacity(fresh.len());
            // A fresh key equal to one kept in this batch would collide: ask again for those.
            for _ in 0..8 {
                let wanted = fresh.len() - keys.len();
                let got = self
                    .statements
                    .allocate(client, &table.name, source_of_keys, wanted)
                    .await?;
                keys.extend(got.into_iter().filter(|k| !taken.contains(k)));
                if keys.len() == fresh.len() {
                    break;
                }
            }
            if keys.len() < fresh.len() {
                return Err(RemapError::KeysCollide {
                    table: table.name.clone(),
                });
            }
            for (&i, &target) in fresh.iter().zip(&keys) {
                targets[i] = Some(target);
                taken.insert(target);
                out.writes.map(&table.name_text, sources[i], target);
                table.cache.set(sources[i], Known::Mapped(target));
            }
        }
        // Unresolved changes leave the batch for the conflict policy; the rest get their keys.
        let mut kept = Vec::with_capacity(entries.len());
        for (i, mut entry) in std::mem::take(entries).into_iter().enumerate() {
            match targets[i] {
                Some(target) => {
                    if target != sources[i] {
                        set_key(&mut entry, key_column, target);
                    }
                    kept.push(entry);
                }
                None => out.unresolved.push(Unresolved { table: t, entry }),
            }
        }
        *entries = kept;
        Ok(())
    }

    /// Translates an UPDATE that changed the key of a row of table `t`: references in the old
    /// key and the new row, and the row's own key. A mapped row keeps its production key and its
    /// mapping moves to the new staging key. `Ok(false)`: the row has no mapping (an allocating
    /// rule never saw it), so there is nothing on production to update.
    pub async fn translate_key_change(
        &mut self,
        client: &Client,
        t: usize,
        old_key: &mut Key,
        new: &mut Tuple,
        source: Source,
        writes: &mut MapWrites,
    ) -> Result<bool, RemapError> {
        let mut entries = vec![
            Entry {
                key: old_key.clone(),
                change: NetChange::Delete,
                source,
            },
            // The new row's references are checked like an insert's.
            Entry {
                key: old_key.clone(),
                change: NetChange::Replace(std::mem::take(new)),
                source,
            },
        ];
        let references = self.tables[t].references.clone();
        self.translate_references(client, t, &references, &mut entries)
            .await?;
        let NetChange::Replace(row) = entries.pop().expect("two entries").change else {
            unreachable!("the second entry holds the new row")
        };
        *new = row;
        *old_key = entries.pop().expect("one entry").key;
        let Some(key_column) = self.tables[t].key_column else {
            return Ok(true);
        };
        let old_source = self.integer(t, key_column, old_key[0].as_deref().unwrap_or_default())?;
        let new_source = match &new[key_column] {
            Value::Text(b) => self.integer(t, key_column, b)?,
            _ => old_source,
        };
        if let KeyRule::Offset { offset } = self.tables[t].rule {
            let old_target = self.offset(t, old_source, offset)?;
            let new_target = self.offset(t, new_source, offset)?;
            old_key[0] = Some(format_key(old_target));
            new[key_column] = Value::Text(format_key(new_target));
            return Ok(true);
        }
        self.learn_mappings(client, t, &[old_source]).await?;
        let table = &mut self.tables[t];
        let target = match table.cache.get(old_source) {
            Some(Known::Mapped(target)) => {
                writes.unmap(&table.name_text, old_source);
                target
            }
            _ if matches!(table.rule, KeyRule::RemapOnConflict { .. }) => old_source,
            _ => return Ok(false),
        };
        // The old key stays cached: children's key changes that follow (ON UPDATE CASCADE) still
        // name it.
        if new_source == target && matches!(table.rule, KeyRule::RemapOnConflict { .. }) {
            table.cache.set(new_source, Known::Same);
        } else {
            writes.map(&table.name_text, new_source, target);
            table.cache.set(new_source, Known::Mapped(target));
        }
        old_key[0] = Some(format_key(target));
        new[key_column] = Value::Text(format_key(target));
        Ok(true)
    }

    /// The production value of column `c` of table `t` for staging's `value`: the row's own
    /// key or a reference translated by its rule; `None` when an allocating rule has no mapping
    /// for it (production has no such row). Other columns are returned as they are.
    pub async fn production_value(
        &mut self,
        client: &Client,
        t: usize,
        c: usize,
        value: i64,
    ) -> Result<Option<i64>, RemapError> {
        let owner = if self.tables[t].key_column == Some(c) {
            t
        } else {
            match self.tables[t].references.iter().find(|r| r.column == c) {
                Some(reference) => reference.parent,
                None => return Ok(Some(value)),
            }
        };
        match self.tables[owner].rule {
            KeyRule::Identity => return Ok(Some(value)),
            KeyRule::Offset { offset } => return self.offset(owner, value, offset).map(Some),
            _ => {}
        }
        self.learn_mappings(client, owner, &[value]).await?;
        let table = &self.tables[owner];
        Ok(match table.cache.get(value) {
            Some(Known::Mapped(target)) => Some(target),
            _ if matches!(table.rule, KeyRule::RemapOnConflict { .. }) => Some(value),
            _ => None,
        })
    }

    /// Names of the truncated tables whose mappings go with their rows (for
    /// [`key_map::delete_table_mappings`](crate::state::key_map::delete_table_mappings)); forgets what was cached of them.
    pub fn truncated(&mut self, tables: &[usize]) -> Vec<Option<Bytes>> {
        let mut names = Vec::new();
        for &t in tables {
            let table = &mut self.tables[t];
            if table.maps() {
                table.cache.clear();
                names.push(Some(table.name_text.clone()));
            }
        }
        names
    }
}

/// The row an entry carries, if any.
fn entry_row(entry: &Entry) -> Option<&Tuple> {
    match &entry.change {
        NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) => Some(row),
        NetChange::Delete => None,
    }
}

/// The texts of `column` in an entry: in its row, and in its key when the column is part of it.
fn reference_values(
    entry: &Entry,
    column: usize,
    key_slot: Option<usize>,
) -> impl Iterator<Item = &[u8]> {
    let in_row = entry_row(entry).and_then(|row| match &row[column] {
        Value::Text(b) => Some(&b[..]),
        _ => None,
    });
    let in_key = key_slot.and_then(|k| entry.key[k].as_deref());
    in_row.into_iter().chain(in_key)
}

fn rewrite_reference(
    entry: &mut Entry,
    column: usize,
    key_slot: Option<usize>,
    targets: &HashMap<i64, i64>,
) {
    // Only values that change are rewritten (a kept key keeps its bytes).
    let translate =
        |text: &[u8]| parse_key(text).and_then(|s| targets.get(&s).copied().filter(|&t| t != s));
    if let NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) =
        &mut entry.change
        && let Value::Text(b) = &row[column]
        && let Some(target) = translate(b)
    {
        row[column] = Value::Text(format_key(target));
    }
    if let Some(k) = key_slot
        && let Some(target) = entry.key[k].as_deref().and_then(translate)
    {
        entry.key[k] = Some(format_key(target));
    }
}

/// Sets an entry's single key column (key and row) to `target`.
fn set_key(entry: &mut Entry, key_column: usize, target: i64) {
    let text = format_key(target);
    entry.key[0] = Some(text.clone());
    if let NetChange::Insert(row) | NetChange::Update(row) | NetChange::Replace(row) =
        &mut entry.change
    {
        row[key_column] = Value::Text(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Source;

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn references_are_rewritten_in_rows_and_keys() {
        let mut entry = Entry {
            key: vec![
                Some(Bytes::from_static(b"7")),
                Some(Bytes::from_static(b"1")),
            ],
            change: NetChange::Insert(vec![text("7"), text("1"), text("name")]),
            source: Source {
                lsn: Lsn(1),
                xid: 1,
            },
        };
        let values: Vec<Vec<u8>> = reference_values(&entry, 0, Some(0))
            .map(<[u8]>::to_vec)
            .collect();
        assert_eq!(values, vec![b"7".to_vec(), b"7".to_vec()]);
        let targets = HashMap::from([(7, 1007)]);
        rewrite_reference(&mut entry, 0, Some(0), &targets);
        assert_eq!(entry.key[0].as_deref(), Some(&b"1007"[..]));
        assert_eq!(
            entry.change,
            NetChange::Insert(vec![text("1007"), text("1"), text("name")])
        );
        // A key not in the map (NULL or unknown) is left alone.
        rewrite_reference(&mut entry, 1, Some(1), &targets);
        assert_eq!(entry.key[1].as_deref(), Some(&b"1"[..]));
        set_key(&mut entry, 0, 5);
        assert_eq!(entry.key[0].as_deref(), Some(&b"5"[..]));
    }
}
