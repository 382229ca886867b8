//! What stagingprop knows of a managed table, read from a database's catalogs: its columns with
//! their SQL types and its primary key, the foreign keys among the managed tables, the columns
//! that reference others, and sequences ([`sequences`]). Sync, copy, verify, tail and remap all
//! read tables through here; [`compare`] holds the one comparison of two sides' tables.

pub mod compare;
pub mod publication;
pub mod sequences;
pub mod types;

use tokio_postgres::Client;

use crate::config::{ColumnList, TableName};
use crate::model::Relation;
use crate::quote::qualified;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMeta {
    pub name: String,
    /// `format_type(atttypid, atttypmod)`: the type as SQL spells it, schema-qualified when
    /// needed, e.g. `numeric(12,2)` or `public.mood`.
    pub type_sql: String,
    /// NOT NULL with no default (nor identity): an INSERT must give it a value.
    pub required: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: an INSERT gives it a value only with `OVERRIDING SYSTEM
    /// VALUE`, and an UPDATE can set it only to DEFAULT.
    pub identity_always: bool,
    /// The type's OID and modifier on the database it was read from, as pgoutput's Relation
    /// messages name a column's type (0 and -1 when not read from a database).
    pub type_oid: u32,
    pub type_modifier: i32,
}

impl ColumnMeta {
    #[cfg(test)]
    pub fn new(name: impl Into<String>, type_sql: impl Into<String>) -> ColumnMeta {
        ColumnMeta {
            name: name.into(),
            type_sql: type_sql.into(),
            required: false,
            identity_always: false,
            type_oid: 0,
            type_modifier: -1,
        }
    }
}

/// A table's replicated columns (generated and dropped columns left out) and primary key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableMeta {
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnMeta>,
    /// Indexes into `columns` of the primary key (or, without one, of the replica identity
    /// index), in key order; empty when there is none: rows are then found by all their
    /// columns, as `REPLICA IDENTITY FULL` sends them.
    pub key: Vec<usize>,
    /// `REPLICA IDENTITY FULL`: UPDATE and DELETE carry the whole old row.
    pub identity_full: bool,
    /// A partitioned table: its rows live in its partitions, read through it (never `ONLY`).
    pub partitioned: bool,
}

impl TableMeta {
    pub fn table_name(&self) -> TableName {
        TableName::new(self.schema.clone(), self.name.clone())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    pub fn qualified(&self) -> String {
        qualified(&self.schema, &self.name)
    }

    /// The table's own rows in a FROM clause: `ONLY` the table (not the rows of tables that
    /// inherit from it), or for a partitioned table, it with every partition.
    pub fn own_rows(&self) -> String {
        if self.partitioned {
            self.qualified()
        } else {
            format!("ONLY {}", self.qualified())
        }
    }

    /// What an INSERT of `columns` needs after its column list: ` OVERRIDING SYSTEM VALUE` when
    /// one of them is `GENERATED ALWAYS AS IDENTITY` (staging's value is kept, as PostgreSQL's
    /// own apply worker keeps it), else nothing.
    pub fn overriding(&self, mut columns: impl Iterator<Item = usize>) -> &'static str {
        if columns.any(|c| self.columns[c].identity_always) {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        }
    }

    /// Whether an UPDATE may assign the column a value (`GENERATED ALWAYS AS IDENTITY` columns
    /// only take DEFAULT).
    pub fn assignable(&self, column: usize) -> bool {
        !self.columns[column].identity_always
    }

    /// The columns that identify a row: the key, or every column of a table without one
    /// (`REPLICA IDENTITY FULL`, where two rows may be identical and either is the one).
    pub fn identifying_columns(&self) -> Vec<usize> {
        if self.key.is_empty() {
            (0..self.columns.len()).collect()
        } else {
            self.key.clone()
        }
    }

    /// The part of the table stagingprop manages: only the columns of `list` (the key
    /// columns always among them), in table order. Names a listed column the table lacks.
    pub fn managed_part(&self, list: &ColumnList, side: &str) -> Result<TableMeta, String> {
        if !list.is_all() && self.key.is_empty() {
            return Err(format!(
                "{side}: table {} has a column list but no primary key or replica identity \
                 index, and a partial row can only be found by its key; add a primary key (or \
                 a unique index and REPLICA IDENTITY USING INDEX), or manage every column",
                self.table_name()
            ));
        }
        for name in list.named() {
            if self.column_index(name).is_none() {
                return Err(format!(
                    "{side}: table {} has no column {name}, which its column list names; fix the list",
                    self.table_name()
                ));
            }
            if let ColumnList::Except(_) = list
                && self.key.iter().any(|&k| &self.columns[k].name == name)
            {
                return Err(format!(
                    "{side}: exclude_columns of {} names key column {name}; key columns are always managed",
                    self.table_name()
                ));
            }
        }
        let mut part = self.clone();
        let keep: Vec<usize> = (0..self.columns.len())
            .filter(|&i| list.includes(&self.columns[i].name, self.key.contains(&i)))
            .collect();
        part.columns = keep.iter().map(|&i| self.columns[i].clone()).collect();
        part.key = self
            .key
            .iter()
            .filter_map(|k| keep.iter().position(|i| i == k))
            .collect();
        Ok(part)
    }
}

/// Reads each of `names` ([`load_table`]), in order.
pub async fn load_tables(
    client: &Client,
    names: &[&TableName],
) -> Result<Vec<Option<TableMeta>>, tokio_postgres::Error> {
    let mut tables = Vec::with_capacity(names.len());
    for name in names {
        tables.push(load_table(client, name).await?);
    }
    Ok(tables)
}

/// The tables of `schemas` (ordinary and partitioned, not partitions), in name order: what the
/// config's `[[table_patterns]]` may manage.
pub async fn tables_in_schemas(
    client: &Client,
    schemas: &[String],
) -> Result<Vec<TableName>, tokio_postgres::Error> {
    if schemas.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              ORDER BY 1, 2",
            &[&schemas],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// `config` with the tables its `[[table_patterns]]` manage among those of `clients` (each
/// side's, so that a table one side lacks is still managed: created on staging and on its way,
/// or dropped on staging and kept on production).
pub async fn expand_patterns(
    config: &crate::config::Config,
    clients: &[&Client],
) -> Result<crate::config::Config, tokio_postgres::Error> {
    let schemas = config.pattern_schemas();
    let mut found = Vec::new();
    for client in clients {
        found.extend(tables_in_schemas(client, &schemas).await?);
    }
    Ok(config.with_found(&found))
}

/// Narrows each loaded table to its managed part ([`TableMeta::managed_part`]), with every
/// problem named.
pub fn managed_parts(
    tables: &[&crate::config::TableConfig],
    loaded: Vec<Option<TableMeta>>,
    side: &str,
) -> Result<Vec<Option<TableMeta>>, Vec<String>> {
    let mut problems = Vec::new();
    let parts = tables
        .iter()
        .zip(loaded)
        .map(|(config, meta)| {
            let meta = meta?;
            match meta.managed_part(&config.columns, side) {
                Ok(part) => Some(part),
                Err(problem) => {
                    problems.push(problem);
                    Some(meta)
                }
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(parts)
    } else {
        Err(problems)
    }
}

/// Reads a table's columns and primary key; `None` when there is no such table.
pub async fn load_table(
    client: &Client,
    table: &TableName,
) -> Result<Option<TableMeta>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relkind = 'p', c.relreplident = 'f'
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let partitioned: bool = row.get(1);
    let identity_full: bool = row.get(2);
    let columns = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod),
                    attnotnull AND NOT atthasdef AND attidentity = '', attidentity = 'a',
                    atttypid, atttypmod
               FROM pg_attribute
              WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
              ORDER BY attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| ColumnMeta {
            name: r.get(0),
            type_sql: r.get(1),
            required: r.get(2),
            identity_always: r.get(3),
            type_oid: r.get(4),
            type_modifier: r.get(5),
        })
        .collect::<Vec<_>>();
    // The primary key, else the replica identity index (unique, on NOT NULL columns).
    let key_names: Vec<String> = client
        .query(
            "SELECT a.attname::text FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indexrelid = (SELECT indexrelid FROM pg_index
                                     WHERE indrelid = $1 AND (indisprimary OR indisreplident)
                                     ORDER BY indisprimary DESC LIMIT 1)
              ORDER BY k.n",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let key = key_names
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect();
    Ok(Some(TableMeta {
        schema: table.schema.clone(),
        name: table.name.clone(),
        columns,
        key,
        identity_full,
        partitioned,
    }))
}

/// How a staging Relation's columns land on production: for each staging column, its index in
/// the production table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnMap {
    pub to_production: Vec<usize>,
    /// For each production key column (in key order), its index in the staging tuple.
    pub key_in_tuple: Vec<usize>,
}

/// Maps a Relation message onto the production table, or says which staging column production
/// lacks.
pub fn map_relation(relation: &Relation, production: &TableMeta) -> Result<ColumnMap, String> {
    let mut to_production = Vec::with_capacity(relation.columns.len());
    for column in &relation.columns {
        match production.column_index(&column.name) {
            Some(i) => to_production.push(i),
            None => {
                return Err(format!(
                    "staging table {} has column {} which production lacks; add it on production (ALTER TABLE {} ADD COLUMN ...) and start sync again: nothing was applied past this point, nothing is lost",
                    relation.qualified_name(),
                    column.name,
                    production.qualified()
                ));
            }
        }
    }
    let mut key_in_tuple = Vec::with_capacity(production.key.len());
    for &k in &production.key {
        match to_production.iter().position(|&p| p == k) {
            Some(i) => key_in_tuple.push(i),
            None => {
                return Err(format!(
                    "staging table {} does not send primary key column {} of production",
                    relation.qualified_name(),
                    production.columns[k].name
                ));
            }
        }
    }
    Ok(ColumnMap {
        to_production,
        key_in_tuple,
    })
}

/// Foreign keys among `tables` on one database, as (child, parent) index pairs.
pub async fn foreign_keys(
    client: &Client,
    tables: &[&TableMeta],
) -> Result<Vec<(usize, usize)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT cn.nspname::text, c.relname::text, pn.nspname::text, p.relname::text
               FROM pg_constraint k
               JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
               JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE k.contype = 'f'",
            &[],
        )
        .await?;
    let index = |schema: String, name: String| {
        tables
            .iter()
            .position(|t| t.schema == schema && t.name == name)
    };
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let child = index(r.get(0), r.get(1))?;
            let parent = index(r.get(2), r.get(3))?;
            (child != parent).then_some((child, parent))
        })
        .collect())
}

/// One column of a declared foreign key: `child.column` refers to `parent.parent_column`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnReference {
    pub child: TableName,
    pub column: String,
    pub parent: TableName,
    pub parent_column: String,
}

/// Every foreign-key column declared on a database, column by column (a composite foreign key
/// gives one entry per column).
pub async fn column_references(
    client: &Client,
) -> Result<Vec<ColumnReference>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT cn.nspname::text, c.relname::text, a.attname::text,
                    pn.nspname::text, p.relname::text, pa.attname::text
               FROM pg_constraint k
               JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
               JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
               CROSS JOIN LATERAL unnest(k.conkey, k.confkey) AS u(child_att, parent_att)
               JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.child_att
               JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = u.parent_att
              WHERE k.contype = 'f'
              ORDER BY 1, 2, 3",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ColumnReference {
            child: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            column: r.get(2),
            parent: TableName::new(r.get::<_, String>(3), r.get::<_, String>(4)),
            parent_column: r.get(5),
        })
        .collect())
}

/// Table indexes, parents before children; tables in a cycle keep their given order.
pub fn parents_first(count: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut order = Vec::with_capacity(count);
    let mut placed = vec![false; count];
    while order.len() < count {
        let ready: Vec<usize> = (0..count)
            .filter(|&t| {
                !placed[t]
                    && edges
                        .iter()
                        .all(|&(child, parent)| child != t || placed[parent])
            })
            .collect();
        let next = if ready.is_empty() {
            (0..count).filter(|&t| !placed[t]).collect()
        } else {
            ready
        };
        for t in next {
            placed[t] = true;
            order.push(t);
        }
    }
    order
}

/// Groups of tables linked by foreign keys (each group parents first), in first-table order.
pub fn linked_groups(count: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut group: Vec<usize> = (0..count).collect();
    fn root(group: &mut [usize], mut t: usize) -> usize {
        while group[t] != t {
            group[t] = group[group[t]];
            t = group[t];
        }
        t
    }
    for &(a, b) in edges {
        let (ra, rb) = (root(&mut group, a), root(&mut group, b));
        if ra != rb {
            group[ra.max(rb)] = ra.min(rb);
        }
    }
    let order = parents_first(count, edges);
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for t in order {
        let r = root(&mut group, t);
        match groups.iter_mut().find(|(g, _)| *g == r) {
            Some((_, members)) => members.push(t),
            None => groups.push((r, vec![t])),
        }
    }
    groups.sort_by_key(|(r, _)| *r);
    groups.into_iter().map(|(_, members)| members).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first() {
        // 0 is a child of 1, 1 a child of 2.
        assert_eq!(parents_first(3, &[(0, 1), (1, 2)]), vec![2, 1, 0]);
        assert_eq!(parents_first(3, &[]), vec![0, 1, 2]);
        // A cycle does not hang: the rest keeps the given order.
        assert_eq!(parents_first(3, &[(0, 1), (1, 0)]), vec![2, 0, 1]);
    }

    #[test]
    fn linked_tables_form_groups() {
        // 0 <- 2 (2 references 0), 1 alone, 3 references 2.
        assert_eq!(
            linked_groups(4, &[(2, 0), (3, 2)]),
            vec![vec![0, 2, 3], vec![1]]
        );
        assert_eq!(linked_groups(2, &[]), vec![vec![0], vec![1]]);
    }
}
