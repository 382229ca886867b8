//! Schema changes made on staging, carried to production in order with the rows (sans-IO).
//!
//! An event trigger on staging ([`capture`]) turns every DDL command that changes a managed
//! table into a transactional logical message (prefix [`PREFIX`]) holding the table's shape
//! before and after the command, its columns identified by `attnum`, so a rename is a rename and
//! never a drop and an add. The message travels in its transaction's place in the stream (and
//! through the spool, replay and JetStream like any other), ahead of every row that needs the new
//! shape. Here it becomes a plan for production's table: the `ALTER TABLE` statements that make
//! production's columns follow staging's, which the applier runs in the same production
//! transaction as the surrounding rows and the progress row, so it is applied exactly once.

pub mod capture;

use serde::Deserialize;

use crate::catalog::{ColumnMeta, TableMeta};
use crate::config::{ColumnList, TableName};
use crate::quote::{qualified, quote_ident, quote_literal};

/// The tables of `captured` (each table's last captured change) whose change is not among
/// `applied`: on its way to production.
pub fn not_applied(captured: Vec<(TableName, i64)>, applied: &[i64]) -> Vec<TableName> {
    captured
        .into_iter()
        .filter(|(_, id)| !applied.contains(id))
        .map(|(table, _)| table)
        .collect()
}

/// The logical message prefix of a captured schema change.
pub const PREFIX: &str = "stagingprop.ddl";

/// One column of a table's shape on staging.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ColumnShape {
    pub attnum: i16,
    pub name: String,
    /// `format_type` of its type and modifier, e.g. `numeric(12,4)`.
    #[serde(rename = "type")]
    pub type_sql: String,
    pub not_null: bool,
    /// Its default expression, or for a generated column its generation expression.
    pub default: Option<String>,
    /// `attidentity`: `a` (ALWAYS), `d` (BY DEFAULT), or empty.
    #[serde(default)]
    pub identity: String,
    /// `attgenerated`: `s` (stored), or empty.
    #[serde(default)]
    pub generated: String,
}

/// A secondary index of a table (not one that backs a constraint).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct IndexShape {
    pub name: String,
    /// `pg_get_indexdef`: `CREATE [UNIQUE] INDEX name ON [ONLY] schema.table USING ...`.
    pub definition: String,
    /// The columns it indexes (an expression has none).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Whether it has expressions or a predicate (columns it reads are not all listed).
    #[serde(default)]
    pub expressions: bool,
}

/// A check, unique, foreign-key or exclusion constraint of a table (the primary key is the
/// table's key, not carried as a change).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ConstraintShape {
    pub name: String,
    /// `contype`: `c`, `u`, `f` or `x`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `pg_get_constraintdef`: `CHECK (...)`, `UNIQUE (...)`, `FOREIGN KEY (...) REFERENCES ...`.
    pub definition: String,
    /// The table's columns it constrains.
    #[serde(default)]
    pub columns: Vec<String>,
    /// A foreign key's referenced table (none for other kinds, and for a foreign key captured
    /// by a trigger installed before this was recorded).
    #[serde(default)]
    pub references: Option<ReferencedKey>,
}

/// What a foreign key refers to.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ReferencedKey {
    pub schema: String,
    pub name: String,
    /// The referenced columns, pairwise with `own`.
    pub columns: Vec<String>,
    /// The table's own columns, in the key's order.
    pub own: Vec<String>,
}

/// One column of a table that a foreign key points at a column of another table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeReference {
    pub column: String,
    pub parent: TableName,
    pub parent_column: String,
}

/// A table's primary key.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct KeyShape {
    pub name: String,
    pub columns: Vec<String>,
}

/// A managed table's shape on staging.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TableShape {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnShape>,
    #[serde(default)]
    pub indexes: Vec<IndexShape>,
    #[serde(default)]
    pub constraints: Vec<ConstraintShape>,
    /// Its primary key (none without one, and in shapes captured by a trigger installed before
    /// it was recorded).
    #[serde(default)]
    pub primary_key: Option<KeyShape>,
    #[serde(default)]
    pub partitioned: bool,
}

impl TableShape {
    pub fn table_name(&self) -> TableName {
        TableName::new(self.schema.clone(), self.name.clone())
    }

    fn column(&self, attnum: i16) -> Option<&ColumnShape> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }

    /// The table as it will be on production once created from this shape.
    pub fn meta(&self) -> TableMeta {
        let columns: Vec<ColumnMeta> = self
            .columns
            .iter()
            .map(|c| ColumnMeta {
                name: c.name.clone(),
                type_sql: c.type_sql.clone(),
                required: c.not_null
                    && c.default.is_none()
                    && c.identity.is_empty()
                    && c.generated.is_empty(),
                identity_always: c.identity == "a",
                type_oid: 0,
                type_modifier: -1,
            })
            .collect();
        let key = self.primary_key.as_ref().map_or_else(Vec::new, |k| {
            k.columns
                .iter()
                .filter_map(|name| columns.iter().position(|c| &c.name == name))
                .collect()
        });
        TableMeta {
            schema: self.schema.clone(),
            name: self.name.clone(),
            columns,
            key,
            identity_full: false,
            partitioned: self.partitioned,
        }
    }

    pub fn column_named(&self, name: &str) -> Option<&ColumnShape> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The column references of the table's foreign keys, or `None` when a foreign key does not
    /// say what it refers to (captured by a trigger `init` installed before it recorded that).
    pub fn foreign_keys(&self) -> Option<Vec<ShapeReference>> {
        let mut out = Vec::new();
        for constraint in self.constraints.iter().filter(|c| c.kind == "f") {
            let key = constraint.references.as_ref()?;
            let parent = TableName::new(key.schema.clone(), key.name.clone());
            for (column, parent_column) in key.own.iter().zip(&key.columns) {
                out.push(ShapeReference {
                    column: column.clone(),
                    parent: parent.clone(),
                    parent_column: parent_column.clone(),
                });
            }
        }
        Some(out)
    }
}

/// One table a DDL command changed: its shape before (none: created) and after (none: dropped).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TableChange {
    pub before: Option<TableShape>,
    pub after: Option<TableShape>,
}

/// A DDL command as staging captured it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SchemaChange {
    /// The capture's number for the change (none for a dropped table's).
    #[serde(default)]
    pub id: Option<i64>,
    /// The command tag (`ALTER TABLE`, ...).
    pub tag: String,
    /// The statement as the client sent it (the whole query string).
    pub statement: String,
    pub tables: Vec<TableChange>,
}

impl SchemaChange {
    /// The message's content, or what is wrong with it.
    pub fn parse(content: &[u8]) -> Result<SchemaChange, String> {
        serde_json::from_slice(content)
            .map_err(|e| format!("a schema-change message ({PREFIX}) that cannot be read: {e}"))
    }
}

/// What production does for one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub table: TableName,
    /// Run in order, in the apply transaction.
    pub statements: Vec<String>,
    /// Run in order once that transaction committed, each on its own (index builds and drops,
    /// `CONCURRENTLY` so that production's own writes go on meanwhile).
    pub after_commit: Vec<IndexWork>,
    /// Staging's changes left to production (columns outside the table's column list).
    pub left_alone: Vec<String>,
}

/// An index built or dropped concurrently, outside the apply transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexWork {
    /// The index, schema-qualified and quoted.
    pub index: String,
    pub statement: String,
    /// The same without `CONCURRENTLY`, for when it must run inside a transaction (a later
    /// change of the table in the same production transaction needs it done first).
    pub in_transaction: String,
}

/// What production's column is, as a definition clause after its name.
fn definition(column: &ColumnShape) -> String {
    let mut out = column.type_sql.clone();
    match (column.generated.as_str(), column.identity.as_str()) {
        ("s", _) => {
            if let Some(expression) = &column.default {
                out.push_str(&format!(" GENERATED ALWAYS AS ({expression}) STORED"));
            }
        }
        (_, "a" | "d") => out.push_str(&format!(
            " GENERATED {} AS IDENTITY",
            identity_kind(&column.identity)
        )),
        _ => {
            if let Some(default) = &column.default {
                out.push_str(&format!(" DEFAULT {default}"));
            }
        }
    }
    if column.not_null && column.identity.is_empty() {
        out.push_str(" NOT NULL");
    }
    out
}

/// `attidentity` as `GENERATED ... AS IDENTITY` spells it.
fn identity_kind(attidentity: &str) -> &'static str {
    if attidentity == "a" {
        "ALWAYS"
    } else {
        "BY DEFAULT"
    }
}

/// How production's primary key follows staging's: statements to run before the columns change
/// (the old key goes, or is renamed) and after (the new key, which may use a new column). Judged
/// against production's key (`meta`), so a key production already has as staging's is left be.
fn follow_primary_key(
    before: &TableShape,
    after: &TableShape,
    meta: &TableMeta,
) -> Result<(Vec<String>, Vec<String>), String> {
    let table = qualified(&meta.schema, &meta.name);
    let production: Vec<&str> = meta
        .key
        .iter()
        .map(|&k| meta.columns[k].name.as_str())
        .collect();
    let (mut first, mut last) = (Vec::new(), Vec::new());
    match (&before.primary_key, &after.primary_key) {
        (old, new) if old == new => {}
        (old, Some(new)) if new.columns == production => {
            // Renaming the key's index renames the constraint; IF EXISTS leaves a key production
            // named otherwise as it is.
            if let Some(old) = old.as_ref().filter(|o| o.name != new.name) {
                first.push(format!(
                    "ALTER INDEX IF EXISTS {} RENAME TO {}",
                    qualified(&meta.schema, &old.name),
                    quote_ident(&new.name)
                ));
            }
        }
        (Some(old), Some(new)) if !production.is_empty() => {
            first.push(format!(
                "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}",
                quote_ident(&old.name)
            ));
            last.push(format!(
                "ALTER TABLE {table} ADD CONSTRAINT {} PRIMARY KEY ({})",
                quote_ident(&new.name),
                new.columns
                    .iter()
                    .map(|c| quote_ident(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        (Some(_), None) if production.is_empty() => {}
        (_, new) => {
            let key = |columns: Vec<&str>| match columns.is_empty() {
                true => "none".to_owned(),
                false => format!("({})", columns.join(", ")),
            };
            return Err(format!(
                "the primary key of {table} is now {} on staging, production's is {}: a table \
                 gaining or losing its key changes how its rows are found (a table without one \
                 needs REPLICA IDENTITY FULL on both sides). Make production's key the same by \
                 hand, then start sync again",
                key(new.as_ref().map_or_else(Vec::new, |k| {
                    k.columns.iter().map(String::as_str).collect()
                })),
                key(production)
            ));
        }
    }
    Ok((first, last))
}

/// The statements that create on production a table staging created (`after`): its owned
/// sequences, the table with its columns, primary key and constraints, and its indexes (built in
/// the transaction: the table is empty). An error names what cannot be created this way.
pub fn create_plan(after: &TableShape) -> Result<Plan, String> {
    let name = after.table_name();
    if after.partitioned {
        return Err(format!(
            "{name} was created on staging as a partitioned table; sync does not create \
             partitioned tables: create it and its partitions on production by hand (the same \
             definition), then start sync again"
        ));
    }
    if after.primary_key.is_none() && after.constraints.is_empty() && after.columns.is_empty() {
        return Err(format!(
            "{name} was created on staging, but its capture says nothing of its columns (a \
             trigger installed by an older `stagingprop init`): run `stagingprop init` again, \
             create the table on production by hand, and start sync again"
        ));
    }
    let table = qualified(&after.schema, &after.name);
    // The first table of a schema made on staging after the config named it.
    let mut statements = vec![schema_if_missing(&after.schema)];
    let mut owned = Vec::new();
    for column in &after.columns {
        if let Some(sequence) = column.default.as_deref().and_then(sequence_of_default) {
            statements.push(format!("CREATE SEQUENCE IF NOT EXISTS {sequence}"));
            owned.push(format!(
                "ALTER SEQUENCE {sequence} OWNED BY {table}.{}",
                quote_ident(&column.name)
            ));
        }
    }
    let mut elements: Vec<String> = after
        .columns
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), definition(c)))
        .collect();
    if let Some(key) = &after.primary_key {
        elements.push(format!(
            "CONSTRAINT {} PRIMARY KEY ({})",
            quote_ident(&key.name),
            key.columns
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    elements.extend(
        after
            .constraints
            .iter()
            .map(|c| format!("CONSTRAINT {} {}", quote_ident(&c.name), c.definition)),
    );
    statements.push(format!("CREATE TABLE {table} ({})", elements.join(", ")));
    statements.extend(owned);
    statements.extend(after.indexes.iter().map(|i| i.definition.clone()));
    Ok(Plan {
        table: name,
        statements,
        after_commit: Vec::new(),
        left_alone: Vec::new(),
    })
}

/// Creates `schema` on production when it lacks it. Only then: `CREATE SCHEMA IF NOT EXISTS`
/// asks for CREATE on the database even when the schema exists.
fn schema_if_missing(schema: &str) -> String {
    let schema = quote_ident(schema);
    format!(
        "DO $stagingprop_schema$ BEGIN IF to_regnamespace({}) IS NULL THEN CREATE SCHEMA {schema}; \
         END IF; END $stagingprop_schema$",
        quote_literal(&schema)
    )
}

/// The statements that rename (or move to another schema) production's table as staging did
/// (`before` to `after`, both managed by `[[table_patterns]]`): its rows, indexes, constraints
/// and triggers go with it. `ALTER TABLE ... RENAME TO` and `SET SCHEMA` change nothing else,
/// so a shape that changed more than its name is refused rather than guessed at.
pub fn rename_plan(before: &TableShape, after: &TableShape) -> Result<Plan, String> {
    if before.columns != after.columns || before.primary_key != after.primary_key {
        return Err(format!(
            "table {} was renamed to {} on staging, and its columns or key changed in the same \
             command: rename and change production's table by hand, then start sync again",
            before.table_name(),
            after.table_name()
        ));
    }
    let mut statements = Vec::new();
    let mut current = qualified(&before.schema, &before.name);
    if before.schema != after.schema {
        statements.push(schema_if_missing(&after.schema));
        statements.push(format!(
            "ALTER TABLE {current} SET SCHEMA {}",
            quote_ident(&after.schema)
        ));
        current = qualified(&after.schema, &before.name);
    }
    if before.name != after.name {
        statements.push(format!(
            "ALTER TABLE {current} RENAME TO {}",
            quote_ident(&after.name)
        ));
    }
    Ok(Plan {
        table: after.table_name(),
        statements,
        after_commit: Vec::new(),
        left_alone: Vec::new(),
    })
}

/// The sequence a column default `nextval('name'::regclass)` draws from, as SQL names it.
fn sequence_of_default(default: &str) -> Option<&str> {
    default
        .strip_prefix("nextval('")?
        .strip_suffix("'::regclass)")
        .filter(|name| !name.contains('\''))
}

/// What production does with its table when staging's was dropped: dropped with it
/// (`on_staging_drop = "drop"`), or kept and said so.
pub fn drop_plan(before: &TableShape, drop: bool) -> Plan {
    let table = before.table_name();
    if drop {
        Plan {
            statements: vec![format!(
                "DROP TABLE {}",
                qualified(&before.schema, &before.name)
            )],
            table,
            after_commit: Vec::new(),
            left_alone: Vec::new(),
        }
    } else {
        Plan {
            table,
            statements: Vec::new(),
            after_commit: Vec::new(),
            left_alone: vec![
                "the table was dropped on staging; production's is kept (drop it by hand, and \
                 remove it from the config)"
                    .into(),
            ],
        }
    }
}

/// The statements that make production's table (`meta`, whose managed part is `columns`) follow
/// `change`; an error names what production cannot be made to follow.
pub fn plan(change: &TableChange, meta: &TableMeta, columns: &ColumnList) -> Result<Plan, String> {
    let (Some(before), Some(after)) = (&change.before, &change.after) else {
        let name = change
            .after
            .as_ref()
            .or(change.before.as_ref())
            .map_or_else(|| "a table".to_owned(), |t| t.table_name().to_string());
        return Err(format!(
            "{name} was created or dropped on staging; creating and dropping managed tables is \
             not carried yet: do it on production by hand, then start sync again"
        ));
    };
    if before.table_name() != after.table_name() {
        return Err(format!(
            "table {} was renamed to {} on staging, which sync follows only between tables \
             [[table_patterns]] manage: rename it on production and in the config ([[tables]] \
             name), then start sync again",
            before.table_name(),
            after.table_name()
        ));
    }
    let table = qualified(&meta.schema, &meta.name);
    let managed = |name: &str| match columns {
        ColumnList::All => true,
        ColumnList::Only(list) => {
            list.iter().any(|c| c == name) || meta.key.iter().any(|&k| meta.columns[k].name == name)
        }
        ColumnList::Except(list) => !list.iter().any(|c| c == name),
    };
    let mut plan = Plan {
        table: meta.table_name(),
        statements: Vec::new(),
        after_commit: Vec::new(),
        left_alone: Vec::new(),
    };
    let alter = |clause: String| format!("ALTER TABLE {table} {clause}");
    let constraints = Followed::of(&before.constraints, &after.constraints, |c| {
        c.columns.iter().all(|n| managed(n))
    });
    // Constraints go before the columns change (a dropped one may name a column that goes too)
    // and come back after (a new one may name a new column).
    for (old, new) in &constraints.renamed {
        plan.statements.push(alter(format!(
            "RENAME CONSTRAINT {} TO {}",
            quote_ident(&old.name),
            quote_ident(&new.name)
        )));
    }
    for old in &constraints.dropped {
        plan.statements.push(alter(format!(
            "DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&old.name)
        )));
    }
    let (key_first, key_last) = follow_primary_key(before, after, meta)?;
    plan.statements.extend(key_first);
    // Renames first, so that what follows names columns as they are now.
    for old in &before.columns {
        if let Some(new) = after.column(old.attnum)
            && new.name != old.name
        {
            if !managed(&old.name) {
                plan.left_alone
                    .push(format!("rename of {} to {}", old.name, new.name));
                continue;
            }
            if !columns.is_all() {
                return Err(format!(
                    "column {}.{} was renamed to {} on staging, and the table's column list \
                     names its columns: rename it in the config's columns or exclude_columns too, \
                     then start sync again",
                    plan.table, old.name, new.name
                ));
            }
            plan.statements.push(alter(format!(
                "RENAME COLUMN {} TO {}",
                quote_ident(&old.name),
                quote_ident(&new.name)
            )));
        }
    }
    for old in &before.columns {
        if after.column(old.attnum).is_none() {
            if managed(&old.name) {
                plan.statements
                    .push(alter(format!("DROP COLUMN {}", quote_ident(&old.name))));
            } else {
                plan.left_alone.push(format!("drop of {}", old.name));
            }
        }
    }
    for new in &after.columns {
        let Some(old) = before.column(new.attnum) else {
            // A new column of a table with a column list is outside the publication's list
            // (staging does not send it) unless the list names it.
            let published = match columns {
                ColumnList::All => true,
                ColumnList::Only(list) => list.iter().any(|c| c == &new.name),
                ColumnList::Except(_) => false,
            };
            if published {
                plan.statements.push(alter(format!(
                    "ADD COLUMN {} {}",
                    quote_ident(&new.name),
                    definition(new)
                )));
            } else {
                plan.left_alone.push(format!("new column {}", new.name));
            }
            continue;
        };
        if !managed(&new.name) {
            if (&old.type_sql, &old.default, old.not_null)
                != (&new.type_sql, &new.default, new.not_null)
            {
                plan.left_alone.push(format!("change of {}", new.name));
            }
            continue;
        }
        let name = quote_ident(&new.name);
        // An identity goes before its NOT NULL may be dropped; a generation expression goes
        // before the column's type changes as a plain column's.
        if !old.identity.is_empty() && new.identity.is_empty() {
            plan.statements.push(alter(format!(
                "ALTER COLUMN {name} DROP IDENTITY IF EXISTS"
            )));
        }
        match (old.generated.as_str(), new.generated.as_str()) {
            ("s", "") => plan.statements.push(alter(format!(
                "ALTER COLUMN {name} DROP EXPRESSION IF EXISTS"
            ))),
            ("", "s") => {
                return Err(format!(
                    "column {}.{} became a generated column on staging, which ALTER TABLE cannot \
                     do: make production's the same by hand, then start sync again",
                    plan.table, new.name
                ));
            }
            _ => {}
        }
        let generated = !new.generated.is_empty();
        if new.type_sql != old.type_sql {
            // A generated column's values come from its expression: no USING.
            plan.statements.push(alter(if generated {
                format!("ALTER COLUMN {name} TYPE {}", new.type_sql)
            } else {
                format!(
                    "ALTER COLUMN {name} TYPE {ty} USING {name}::{ty}",
                    ty = new.type_sql
                )
            }));
        }
        if new.default != old.default {
            match (&new.default, generated) {
                // PostgreSQL 17's SET EXPRESSION: staging ran it, so staging is 17 or later.
                (Some(expression), true) => plan.statements.push(alter(format!(
                    "ALTER COLUMN {name} SET EXPRESSION AS ({expression})"
                ))),
                (Some(default), false) => plan
                    .statements
                    .push(alter(format!("ALTER COLUMN {name} SET DEFAULT {default}"))),
                // An expression dropped above; an identity has no default.
                (None, _) if !old.generated.is_empty() => {}
                (None, _) => plan
                    .statements
                    .push(alter(format!("ALTER COLUMN {name} DROP DEFAULT"))),
            }
        }
        if new.not_null != old.not_null {
            plan.statements.push(alter(format!(
                "ALTER COLUMN {name} {} NOT NULL",
                if new.not_null { "SET" } else { "DROP" }
            )));
        }
        // An identity comes last: it needs NOT NULL and no default first.
        match (old.identity.as_str(), new.identity.as_str()) {
            (_, "") => {}
            ("", kind) => plan.statements.push(alter(format!(
                "ALTER COLUMN {name} ADD GENERATED {} AS IDENTITY",
                identity_kind(kind)
            ))),
            (was, kind) if was != kind => plan.statements.push(alter(format!(
                "ALTER COLUMN {name} SET GENERATED {}",
                identity_kind(kind)
            ))),
            _ => {}
        }
    }
    plan.statements.extend(key_last);
    for new in &constraints.added {
        plan.statements.push(alter(format!(
            "ADD CONSTRAINT {} {}",
            quote_ident(&new.name),
            new.definition
        )));
    }
    plan.left_alone.extend(
        constraints
            .left_alone
            .iter()
            .map(|c| format!("constraint {}", c.name)),
    );
    follow_indexes(&mut plan, before, after, meta, &|index: &IndexShape| {
        index.columns.iter().all(|n| managed(n)) && (!index.expressions || columns.is_all())
    })?;
    Ok(plan)
}

/// A constraint or an index: its name, and what it is apart from its name.
trait Named {
    fn name(&self) -> &str;
    /// Equal for two that differ only in name.
    fn body(&self) -> String;
}

impl Named for ConstraintShape {
    fn name(&self) -> &str {
        &self.name
    }

    fn body(&self) -> String {
        format!("{} {}", self.kind, self.definition)
    }
}

impl Named for IndexShape {
    fn name(&self) -> &str {
        &self.name
    }

    fn body(&self) -> String {
        IndexDefinition::parse(&self.definition)
            .map_or_else(|| self.definition.clone(), |d| d.body())
    }
}

/// How a table's constraints or indexes changed, by name: one whose definition changed is
/// dropped and added again; one that only changed its name is renamed.
struct Followed<'a, T> {
    renamed: Vec<(&'a T, &'a T)>,
    dropped: Vec<&'a T>,
    added: Vec<&'a T>,
    /// Changes of ones on columns production owns.
    left_alone: Vec<&'a T>,
}

impl<'a, T: Named> Followed<'a, T> {
    fn of(before: &'a [T], after: &'a [T], managed: impl Fn(&T) -> bool) -> Followed<'a, T> {
        let mut followed = Followed {
            renamed: Vec::new(),
            dropped: Vec::new(),
            added: Vec::new(),
            left_alone: Vec::new(),
        };
        let gone: Vec<&T> = before
            .iter()
            .filter(|old| {
                !after
                    .iter()
                    .any(|new| new.name() == old.name() && new.body() == old.body())
            })
            .collect();
        let mut came: Vec<&T> = after
            .iter()
            .filter(|new| {
                !before
                    .iter()
                    .any(|old| old.name() == new.name() && old.body() == new.body())
            })
            .collect();
        for old in gone {
            if !managed(old) {
                followed.left_alone.push(old);
                continue;
            }
            let renamed = came.iter().position(|new| {
                new.body() == old.body() && !before.iter().any(|b| b.name() == new.name())
            });
            match renamed {
                Some(i) if !after.iter().any(|a| a.name() == old.name()) => {
                    followed.renamed.push((old, came.remove(i)));
                }
                _ => followed.dropped.push(old),
            }
        }
        for new in came {
            if managed(new) {
                followed.added.push(new);
            } else {
                followed.left_alone.push(new);
            }
        }
        followed
    }
}

/// `pg_get_indexdef`'s text taken apart: `CREATE [UNIQUE] INDEX <name> ON [ONLY] <rest>`.
struct IndexDefinition<'a> {
    unique: bool,
    /// The name as written (quoted where it needs to be).
    name: &'a str,
    /// The table and the rest (`schema.table USING method (columns) ...`), without `ONLY`.
    rest: &'a str,
}

impl<'a> IndexDefinition<'a> {
    fn parse(definition: &'a str) -> Option<IndexDefinition<'a>> {
        let (unique, named) = match definition.strip_prefix("CREATE UNIQUE INDEX ") {
            Some(named) => (true, named),
            None => (false, definition.strip_prefix("CREATE INDEX ")?),
        };
        let name_end = if let Some(quoted) = named.strip_prefix('"') {
            // A doubled quote is a quote inside the name.
            let mut chars = quoted.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if chars.peek().is_some_and(|&(_, n)| n == '"') {
                        chars.next();
                    } else {
                        end = Some(i + 2);
                        break;
                    }
                }
            }
            end?
        } else {
            named.find(' ')?
        };
        let rest = named[name_end..].strip_prefix(" ON ")?;
        Some(IndexDefinition {
            unique,
            name: &named[..name_end],
            rest: rest.strip_prefix("ONLY ").unwrap_or(rest),
        })
    }

    fn body(&self) -> String {
        format!("{} {}", self.unique, self.rest)
    }

    /// The statement that builds it: concurrently when it can be (not on a partitioned table),
    /// and only if it is not there yet.
    fn create(&self, concurrently: bool) -> String {
        format!(
            "CREATE {}INDEX {}IF NOT EXISTS {} ON {}",
            if self.unique { "UNIQUE " } else { "" },
            if concurrently { "CONCURRENTLY " } else { "" },
            self.name,
            self.rest
        )
    }
}

/// Adds to `plan` what makes production's indexes of the table follow staging's: renames in the
/// transaction, builds and drops once it committed, concurrently (in the transaction for a
/// partitioned table, which cannot build concurrently).
fn follow_indexes(
    plan: &mut Plan,
    before: &TableShape,
    after: &TableShape,
    meta: &TableMeta,
    managed: &dyn Fn(&IndexShape) -> bool,
) -> Result<(), String> {
    let indexes = Followed::of(&before.indexes, &after.indexes, managed);
    let index_name = |name: &str| qualified(&meta.schema, name);
    for (old, new) in &indexes.renamed {
        plan.statements.push(format!(
            "ALTER INDEX IF EXISTS {} RENAME TO {}",
            index_name(&old.name),
            quote_ident(&new.name)
        ));
    }
    let concurrently = !meta.partitioned;
    for old in &indexes.dropped {
        let drop = |concurrently: bool| {
            format!(
                "DROP INDEX {}IF EXISTS {}",
                if concurrently { "CONCURRENTLY " } else { "" },
                index_name(&old.name)
            )
        };
        if concurrently {
            plan.after_commit.push(IndexWork {
                index: index_name(&old.name),
                statement: drop(true),
                in_transaction: drop(false),
            });
        } else {
            plan.statements.push(drop(false));
        }
    }
    for new in &indexes.added {
        let definition = IndexDefinition::parse(&new.definition).ok_or_else(|| {
            format!(
                "staging's index {} of {} reads `{}`, which stagingprop cannot take apart: \
                 create it on production by hand, then start sync again",
                new.name, plan.table, new.definition
            )
        })?;
        if concurrently {
            plan.after_commit.push(IndexWork {
                index: index_name(&new.name),
                statement: definition.create(true),
                in_transaction: definition.create(false),
            });
        } else {
            plan.statements.push(definition.create(false));
        }
    }
    plan.left_alone.extend(
        indexes
            .left_alone
            .iter()
            .map(|i| format!("index {}", i.name)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnMeta;

    fn column(attnum: i16, name: &str, ty: &str) -> ColumnShape {
        ColumnShape {
            attnum,
            name: name.into(),
            type_sql: ty.into(),
            not_null: false,
            default: None,
            identity: String::new(),
            generated: String::new(),
        }
    }

    fn shape(columns: Vec<ColumnShape>) -> TableShape {
        TableShape {
            schema: "public".into(),
            name: "price".into(),
            columns,
            indexes: Vec::new(),
            constraints: Vec::new(),
            primary_key: None,
            partitioned: false,
        }
    }

    fn index(name: &str, definition: &str, columns: &[&str]) -> IndexShape {
        IndexShape {
            name: name.into(),
            definition: definition.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            expressions: false,
        }
    }

    fn constraint(name: &str, kind: &str, definition: &str, columns: &[&str]) -> ConstraintShape {
        ConstraintShape {
            name: name.into(),
            kind: kind.into(),
            definition: definition.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            references: None,
        }
    }

    fn meta() -> TableMeta {
        TableMeta {
            schema: "public".into(),
            name: "price".into(),
            columns: vec![
                ColumnMeta::new("id", "integer"),
                ColumnMeta::new("amount", "numeric(10,2)"),
                ColumnMeta::new("note", "text"),
            ],
            key: vec![0],
            identity_full: false,
            partitioned: false,
        }
    }

    fn before() -> TableShape {
        let mut id = column(1, "id", "integer");
        id.not_null = true;
        shape(vec![
            id,
            column(2, "amount", "numeric(10,2)"),
            column(3, "note", "text"),
        ])
    }

    #[test]
    fn columns_follow_by_attnum_renames_first() {
        let mut after = before();
        after.columns[1].type_sql = "numeric(12,4)".into();
        after.columns[2].name = "remark".into();
        after.columns[2].default = Some("'none'::text".into());
        let mut added = column(4, "currency", "character(3)");
        added.not_null = true;
        added.default = Some("'EUR'::bpchar".into());
        after.columns.push(added);
        let change = TableChange {
            before: Some(before()),
            after: Some(after),
        };
        let plan = plan(&change, &meta(), &ColumnList::All).unwrap();
        assert_eq!(
            plan.statements,
            vec![
                "ALTER TABLE \"public\".\"price\" RENAME COLUMN \"note\" TO \"remark\"",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"amount\" TYPE numeric(12,4) USING \"amount\"::numeric(12,4)",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"remark\" SET DEFAULT 'none'::text",
                "ALTER TABLE \"public\".\"price\" ADD COLUMN \"currency\" character(3) DEFAULT 'EUR'::bpchar NOT NULL",
            ]
        );
    }

    #[test]
    fn a_dropped_column_is_dropped_and_a_column_list_keeps_production_s_own() {
        let mut after = before();
        after.columns.remove(2);
        after.columns.push(column(4, "merchant", "text"));
        let change = TableChange {
            before: Some(before()),
            after: Some(after),
        };
        let all = plan(&change, &meta(), &ColumnList::All).unwrap();
        assert_eq!(
            all.statements,
            vec![
                "ALTER TABLE \"public\".\"price\" DROP COLUMN \"note\"",
                "ALTER TABLE \"public\".\"price\" ADD COLUMN \"merchant\" text",
            ]
        );
        // Managing only id and amount: note and the new column are production's.
        let part = plan(&change, &meta(), &ColumnList::Only(vec!["amount".into()])).unwrap();
        assert!(part.statements.is_empty(), "{part:?}");
        assert_eq!(part.left_alone.len(), 2);
    }

    #[test]
    fn what_is_not_carried_is_named() {
        let created = TableChange {
            before: None,
            after: Some(before()),
        };
        assert!(
            plan(&created, &meta(), &ColumnList::All)
                .unwrap_err()
                .contains("created or dropped on staging")
        );
        let mut renamed = before();
        renamed.columns[1].name = "price".into();
        let change = TableChange {
            before: Some(before()),
            after: Some(renamed),
        };
        let listed = ColumnList::Only(vec!["amount".into()]);
        assert!(
            plan(&change, &meta(), &listed)
                .unwrap_err()
                .contains("rename it in the config's columns")
        );
    }

    fn statements(before: TableShape, after: TableShape, meta: &TableMeta) -> Vec<String> {
        let change = TableChange {
            before: Some(before),
            after: Some(after),
        };
        plan(&change, meta, &ColumnList::All).unwrap().statements
    }

    #[test]
    fn identities_and_generation_expressions_follow_in_an_order_postgres_takes() {
        // A serial column becomes an identity: its default goes, then NOT NULL, then identity.
        let mut old = before();
        old.columns[2].default = Some("nextval('price_note_seq'::regclass)".into());
        let mut new = before();
        new.columns[2].not_null = true;
        new.columns[2].identity = "a".into();
        assert_eq!(
            statements(old, new.clone(), &meta()),
            [
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" DROP DEFAULT",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" SET NOT NULL",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" ADD GENERATED ALWAYS AS IDENTITY",
            ]
        );
        // ALWAYS to BY DEFAULT; then no identity, and NULLs allowed again.
        let mut by_default = new.clone();
        by_default.columns[2].identity = "d".into();
        assert_eq!(
            statements(new, by_default.clone(), &meta()),
            ["ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" SET GENERATED BY DEFAULT"]
        );
        assert_eq!(
            statements(by_default, before(), &meta()),
            [
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" DROP IDENTITY IF EXISTS",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" DROP NOT NULL",
            ]
        );
        // A generated column: a new expression, a new type (no USING), then a plain column.
        let mut generated = before();
        generated.columns[2].generated = "s".into();
        generated.columns[2].default = Some("(amount * 2)".into());
        let mut changed = generated.clone();
        changed.columns[2].default = Some("(amount * 3)".into());
        changed.columns[2].type_sql = "numeric".into();
        assert_eq!(
            statements(generated, changed.clone(), &meta()),
            [
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" TYPE numeric",
                "ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" SET EXPRESSION AS ((amount * 3))",
            ]
        );
        let mut plain = changed.clone();
        plain.columns[2].generated = String::new();
        plain.columns[2].default = None;
        assert_eq!(
            statements(changed.clone(), plain.clone(), &meta()),
            ["ALTER TABLE \"public\".\"price\" ALTER COLUMN \"note\" DROP EXPRESSION IF EXISTS"]
        );
        let change = TableChange {
            before: Some(plain),
            after: Some(changed),
        };
        assert!(
            plan(&change, &meta(), &ColumnList::All)
                .unwrap_err()
                .contains("became a generated column")
        );
    }

    #[test]
    fn a_primary_key_follows_staging_s_unless_production_has_it_already() {
        let key = |name: &str, columns: &[&str]| {
            Some(KeyShape {
                name: name.into(),
                columns: columns.iter().map(|c| c.to_string()).collect(),
            })
        };
        let mut old = before();
        old.primary_key = key("price_pkey", &["id"]);
        let mut wider = old.clone();
        wider.primary_key = key("price_pkey2", &["id", "amount"]);
        assert_eq!(
            statements(old.clone(), wider.clone(), &meta()),
            [
                "ALTER TABLE \"public\".\"price\" DROP CONSTRAINT IF EXISTS \"price_pkey\"",
                "ALTER TABLE \"public\".\"price\" ADD CONSTRAINT \"price_pkey2\" PRIMARY KEY (\"id\", \"amount\")",
            ]
        );
        // Production has the new key already (sync stopped, the key made by hand): its name
        // follows if the old one is still there.
        let mut keyed_so = meta();
        keyed_so.key = vec![0, 1];
        assert_eq!(
            statements(old.clone(), wider, &keyed_so),
            ["ALTER INDEX IF EXISTS \"public\".\"price_pkey\" RENAME TO \"price_pkey2\""]
        );
        // Renamed only: through its index, which renames the constraint.
        let mut renamed = old.clone();
        renamed.primary_key = key("price_id_key", &["id"]);
        assert_eq!(
            statements(old.clone(), renamed, &meta()),
            ["ALTER INDEX IF EXISTS \"public\".\"price_pkey\" RENAME TO \"price_id_key\""]
        );
        // Losing the key stops, unless production has none either.
        let keyless = before();
        let change = TableChange {
            before: Some(old.clone()),
            after: Some(keyless.clone()),
        };
        let refused = plan(&change, &meta(), &ColumnList::All).unwrap_err();
        assert!(
            refused.contains("is now none on staging, production's is (id)"),
            "{refused}"
        );
        let mut no_key = meta();
        no_key.key.clear();
        assert!(statements(old, keyless, &no_key).is_empty());
    }

    #[test]
    fn a_renamed_or_moved_table_is_renamed_in_place() {
        let old = before();
        let mut after = before();
        after.name = "prices".into();
        assert_eq!(
            rename_plan(&old, &after).unwrap().statements,
            ["ALTER TABLE \"public\".\"price\" RENAME TO \"prices\""]
        );
        after.schema = "cat".into();
        let plan = rename_plan(&old, &after).unwrap();
        assert_eq!(plan.table, TableName::new("cat", "prices"));
        assert!(plan.statements[0].contains("CREATE SCHEMA \"cat\""));
        assert_eq!(
            plan.statements[1..],
            [
                "ALTER TABLE \"public\".\"price\" SET SCHEMA \"cat\"",
                "ALTER TABLE \"cat\".\"price\" RENAME TO \"prices\"",
            ]
        );
        after.columns[1].name = "cost".into();
        assert!(
            rename_plan(&old, &after)
                .unwrap_err()
                .contains("in the same command")
        );
    }

    #[test]
    fn indexes_build_after_commit_and_renames_stay_in_the_transaction() {
        let mut old = before();
        old.indexes = vec![
            index(
                "price_amount",
                "CREATE INDEX price_amount ON public.price USING btree (amount)",
                &["amount"],
            ),
            index(
                "price_note",
                "CREATE INDEX price_note ON public.price USING btree (note)",
                &["note"],
            ),
        ];
        let mut new = old.clone();
        // Renamed: same body, new name.
        new.indexes[0] = index(
            "price_by_amount",
            "CREATE INDEX price_by_amount ON public.price USING btree (amount)",
            &["amount"],
        );
        // Redefined under its name: dropped and built again.
        new.indexes[1] = index(
            "price_note",
            "CREATE UNIQUE INDEX price_note ON public.price USING btree (note)",
            &["note"],
        );
        new.indexes.push(index(
            "\"Odd \"\"name\"",
            "CREATE INDEX \"Odd \"\"name\" ON ONLY public.price USING btree (id)",
            &["id"],
        ));
        let change = TableChange {
            before: Some(old),
            after: Some(new),
        };
        let plan = plan(&change, &meta(), &ColumnList::All).unwrap();
        assert_eq!(
            plan.statements,
            vec!["ALTER INDEX IF EXISTS \"public\".\"price_amount\" RENAME TO \"price_by_amount\""]
        );
        let after: Vec<&str> = plan
            .after_commit
            .iter()
            .map(|w| w.statement.as_str())
            .collect();
        assert_eq!(
            after,
            vec![
                "DROP INDEX CONCURRENTLY IF EXISTS \"public\".\"price_note\"",
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS price_note ON public.price USING btree (note)",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS \"Odd \"\"name\" ON public.price USING btree (id)",
            ]
        );
        // A partitioned table cannot build concurrently: all of it in the transaction.
        let mut partitioned = meta();
        partitioned.partitioned = true;
        let in_txn = super::plan(&change, &partitioned, &ColumnList::All).unwrap();
        assert!(in_txn.after_commit.is_empty());
        assert_eq!(in_txn.statements.len(), 4, "{in_txn:?}");
        // Managing only id and amount: the index on note is production's.
        let part = super::plan(&change, &meta(), &ColumnList::Only(vec!["amount".into()])).unwrap();
        assert_eq!(part.after_commit.len(), 1, "{part:?}");
        assert_eq!(
            part.left_alone,
            vec!["index price_note", "index price_note"]
        );
    }

    #[test]
    fn constraints_drop_before_the_columns_and_come_back_after() {
        let mut old = before();
        old.constraints = vec![
            constraint("note_short", "c", "CHECK (length(note) < 100)", &["note"]),
            constraint("amount_positive", "c", "CHECK (amount > 0)", &["amount"]),
        ];
        let mut new = old.clone();
        new.columns.remove(2);
        new.constraints.remove(0);
        new.constraints[0].name = "amount_above_zero".into();
        new.columns.push(column(4, "currency", "text"));
        new.constraints.push(constraint(
            "currency_code",
            "c",
            "CHECK (length(currency) = 3)",
            &["currency"],
        ));
        let change = TableChange {
            before: Some(old),
            after: Some(new),
        };
        let plan = plan(&change, &meta(), &ColumnList::All).unwrap();
        assert_eq!(
            plan.statements,
            vec![
                "ALTER TABLE \"public\".\"price\" RENAME CONSTRAINT \"amount_positive\" TO \"amount_above_zero\"",
                "ALTER TABLE \"public\".\"price\" DROP CONSTRAINT IF EXISTS \"note_short\"",
                "ALTER TABLE \"public\".\"price\" DROP COLUMN \"note\"",
                "ALTER TABLE \"public\".\"price\" ADD COLUMN \"currency\" text",
                "ALTER TABLE \"public\".\"price\" ADD CONSTRAINT \"currency_code\" CHECK (length(currency) = 3)",
            ]
        );
    }

    #[test]
    fn messages_parse() {
        let change = SchemaChange::parse(
            br#"{"tag":"ALTER TABLE","statement":"ALTER TABLE t ADD c int","tables":[
                {"before":{"schema":"public","name":"t","columns":[{"attnum":1,"name":"a","type":"integer","not_null":true,"default":null}]},
                 "after":{"schema":"public","name":"t","columns":[{"attnum":1,"name":"a","type":"integer","not_null":true,"default":null,"identity":"","generated":""},
                                                                  {"attnum":2,"name":"c","type":"integer","not_null":false,"default":null}]}}]}"#,
        )
        .unwrap();
        assert_eq!(change.tables[0].after.as_ref().unwrap().columns.len(), 2);
        assert!(SchemaChange::parse(b"{").is_err());
    }

    #[test]
    fn foreign_keys_pair_columns_and_say_when_they_are_unknown() {
        let shape: TableShape = serde_json::from_str(
            r#"{"schema":"public","name":"rel","columns":[],"constraints":[
                {"name":"rel_fk","type":"f","definition":"FOREIGN KEY (b, a) REFERENCES public.p(y, x)",
                 "columns":["a","b"],
                 "references":{"schema":"public","name":"p","columns":["y","x"],"own":["b","a"]}},
                {"name":"rel_check","type":"c","definition":"CHECK (a > 0)","columns":["a"],"references":null}]}"#,
        )
        .unwrap();
        let parent = TableName::new("public", "p");
        let pair = |column: &str, parent_column: &str| ShapeReference {
            column: column.into(),
            parent: parent.clone(),
            parent_column: parent_column.into(),
        };
        assert_eq!(
            shape.foreign_keys(),
            Some(vec![pair("b", "y"), pair("a", "x")])
        );
        // Captured by an older trigger: what the key refers to is not known.
        let mut old = shape.clone();
        old.constraints[0].references = None;
        assert_eq!(old.foreign_keys(), None);
        old.constraints.remove(0);
        assert_eq!(old.foreign_keys(), Some(Vec::new()));
    }

    #[test]
    fn a_created_table_is_made_whole_with_its_sequence_key_constraints_and_indexes() {
        let mut id = column(1, "id", "integer");
        id.not_null = true;
        id.default = Some("nextval('cat.\"Offer_id_seq\"'::regclass)".into());
        let mut after = shape(vec![id, column(2, "price", "numeric(10,2)")]);
        after.schema = "cat".into();
        after.name = "Offer".into();
        after.primary_key = Some(KeyShape {
            name: "Offer_pkey".into(),
            columns: vec!["id".into()],
        });
        after.constraints = vec![ConstraintShape {
            name: "offer_price_check".into(),
            kind: "c".into(),
            definition: "CHECK ((price >= (0)::numeric))".into(),
            columns: vec!["price".into()],
            references: None,
        }];
        after.indexes = vec![index(
            "offer_price",
            "CREATE INDEX offer_price ON cat.\"Offer\" USING btree (price)",
            &["price"],
        )];
        let plan = create_plan(&after).expect("a plan");
        assert_eq!(
            plan.statements,
            vec![
                "DO $stagingprop_schema$ BEGIN IF to_regnamespace('\"cat\"') IS NULL THEN \
                 CREATE SCHEMA \"cat\"; END IF; END $stagingprop_schema$"
                    .to_owned(),
                "CREATE SEQUENCE IF NOT EXISTS cat.\"Offer_id_seq\"".to_owned(),
                "CREATE TABLE \"cat\".\"Offer\" (\"id\" integer DEFAULT \
                 nextval('cat.\"Offer_id_seq\"'::regclass) NOT NULL, \"price\" numeric(10,2), \
                 CONSTRAINT \"Offer_pkey\" PRIMARY KEY (\"id\"), \
                 CONSTRAINT \"offer_price_check\" CHECK ((price >= (0)::numeric)))"
                    .to_owned(),
                "ALTER SEQUENCE cat.\"Offer_id_seq\" OWNED BY \"cat\".\"Offer\".\"id\"".to_owned(),
                "CREATE INDEX offer_price ON cat.\"Offer\" USING btree (price)".to_owned(),
            ]
        );
        let meta = after.meta();
        assert_eq!(meta.key, vec![0]);
        assert!(!meta.columns[0].required, "a default gives it a value");

        after.partitioned = true;
        assert!(create_plan(&after).unwrap_err().contains("partitioned"));
        let before = shape(Vec::new());
        assert_eq!(
            drop_plan(&before, true).statements,
            vec!["DROP TABLE \"public\".\"price\""]
        );
        let kept = drop_plan(&before, false);
        assert!(kept.statements.is_empty() && kept.left_alone[0].contains("kept"));
    }
}
