//! How staging's relations land on a target's tables: each Relation message is mapped onto the
//! target's table by column name (and refused when a column is missing or its type is one the
//! target's column cannot store), and every row change of it is rearranged into the target's
//! column order. Every target keeps its own, so the pipeline never asks a target for its schema.

use std::collections::HashMap;

use bytes::Bytes;

use super::ApplyError;
use crate::catalog::{self, ColumnMap, TableMeta};
use crate::change::{Key, StagingChange};
use crate::model::{Oid, Relation, Tuple, Value};

/// One relation as a target applies it.
struct Shape {
    table: usize,
    map: ColumnMap,
    width: usize,
    /// Staging's columns are the target's, in the same order: rows need no rearranging.
    same: bool,
}

/// A row change in the target's column order; columns staging did not send are
/// `Value::UnchangedToast`, so they are never written.
pub enum RowChange {
    Insert(Tuple),
    /// The old key or row when staging sent one, and the new row.
    Update(Option<Tuple>, Tuple),
    Delete(Tuple),
}

/// The relations a target has been told about.
#[derive(Default)]
pub struct Shapes {
    relations: HashMap<Oid, Shape>,
}

impl Shapes {
    /// Takes `relation` as staging's shape of managed table `table` (`meta` on the target),
    /// its columns' types named `column_types` on staging.
    pub fn learn(
        &mut self,
        relation: &Relation,
        table: usize,
        meta: &TableMeta,
        column_types: &[String],
    ) -> Result<(), ApplyError> {
        let map = catalog::map_relation(relation, meta).map_err(ApplyError::Schema)?;
        let problems: Vec<String> = relation
            .columns
            .iter()
            .zip(&map.to_production)
            .zip(column_types)
            .filter(|&((_, &p), staging_type)| {
                !catalog::compare::compatible(staging_type, &meta.columns[p].type_sql)
            })
            .map(|((column, &p), staging_type)| {
                let target_type = &meta.columns[p].type_sql;
                format!(
                    "staging's column {}.{} is now {staging_type}, but production's is \
                     {target_type}: production would store its values as {target_type}, so sync \
                     stops before the first change of the new type (nothing of it was applied). \
                     Change production's column (ALTER TABLE {} ALTER COLUMN {} TYPE \
                     {staging_type}) and start sync again",
                    relation.qualified_name(),
                    column.name,
                    meta.qualified(),
                    crate::quote::quote_ident(&column.name),
                )
            })
            .collect();
        if !problems.is_empty() {
            return Err(ApplyError::Types(problems));
        }
        let width = meta.columns.len();
        let same = map.to_production.len() == width
            && map.to_production.iter().enumerate().all(|(i, &p)| i == p);
        self.relations.insert(
            relation.oid,
            Shape {
                table,
                map,
                width,
                same,
            },
        );
        Ok(())
    }

    /// A change of `relation` in the target's column order, and the managed table it is of.
    pub fn rearrange(
        &self,
        relation: Oid,
        change: StagingChange,
    ) -> Result<(usize, RowChange), ApplyError> {
        let shape = self.relations.get(&relation).ok_or_else(|| {
            ApplyError::Schema(format!(
                "a change of relation {relation} reached the target before its Relation message"
            ))
        })?;
        let rearrange = |tuple: Tuple| -> Result<Tuple, ApplyError> {
            if tuple.len() != shape.map.to_production.len() {
                return Err(ApplyError::Schema(format!(
                    "a change of relation {relation} has {} columns, its Relation message {}",
                    tuple.len(),
                    shape.map.to_production.len()
                )));
            }
            if shape.same {
                return Ok(tuple);
            }
            let mut row = vec![Value::UnchangedToast; shape.width];
            for (value, &p) in tuple.into_iter().zip(&shape.map.to_production) {
                row[p] = value;
            }
            Ok(row)
        };
        let change = match change {
            StagingChange::Insert { new } => RowChange::Insert(rearrange(new)?),
            StagingChange::Update { old, new } => {
                RowChange::Update(old.map(rearrange).transpose()?, rearrange(new)?)
            }
            StagingChange::Delete { old } => RowChange::Delete(rearrange(old)?),
        };
        Ok((shape.table, change))
    }
}

/// The key of a row in the target's column order.
pub fn key_of(meta: &TableMeta, row: &Tuple) -> Result<Key, ApplyError> {
    meta.key
        .iter()
        .map(|&k| match &row[k] {
            Value::Text(b) | Value::Binary(b) => Ok(Some(b.clone())),
            _ => Err(ApplyError::Schema(format!(
                "staging did not send key column {} of {} (its replica identity must cover production's primary key)",
                meta.columns[k].name,
                meta.table_name()
            ))),
        })
        .collect::<Result<Vec<Option<Bytes>>, _>>()
}
