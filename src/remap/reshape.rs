//! Following staging's schema changes of the tables remapping reads: what remapping cannot
//! follow is named before production's table changes (a column the config names, of a natural
//! key or in `[[references]]`, renamed or dropped; a remapped key or reference no longer an
//! integer), and once the change is applied the columns are found again (the key by `attnum`,
//! so a rename of it is followed) and the table's references again from its foreign keys on
//! staging, so a column added with a foreign key to a remapped table is translated from its
//! first row on.

use super::{Reference, ReferenceFound, Remapper, integer_type};
use crate::catalog::TableMeta;
use crate::config::KeyRule;
use crate::ddl::TableChange;

/// What a column of a table is to remapping.
enum Role {
    /// The remapped key: a rename is followed, it must stay an integer.
    Key,
    /// Named by the config (`key.columns` of a natural rule): kept as it is.
    Natural,
    /// Named by the config (`[[references]]`): kept as it is, and an integer.
    Configured,
}

impl Role {
    fn describe(&self, rule: &KeyRule) -> String {
        match self {
            Role::Key => format!("the key that rule \"{}\" remaps", rule.as_str()),
            Role::Natural => "a column of its natural key (key.columns)".to_owned(),
            Role::Configured => "a reference to a remapped key in [[references]]".to_owned(),
        }
    }
}

impl Remapper {
    /// The columns of table `t` remapping reads and a change must leave in place, by name.
    /// (References found from foreign keys are found again after the change.)
    fn roles(&self, t: usize) -> Vec<(String, Role)> {
        let table = &self.tables[t];
        let mut roles = Vec::new();
        if let Some(k) = table.key_column {
            roles.push((table.columns[k].clone(), Role::Key));
        }
        for &(c, _) in &table.natural {
            roles.push((table.columns[c].clone(), Role::Natural));
        }
        for (column, _) in &table.configured {
            roles.push((column.clone(), Role::Configured));
        }
        roles
    }

    /// Whether remapping can follow `change` of table `t`: the columns the config names keep
    /// their names (columns are matched by `attnum`), and the remapped key and the configured
    /// references stay integers. The error names the column and what to do.
    pub fn check_change(&self, t: usize, change: &TableChange) -> Result<(), String> {
        let (Some(before), Some(after)) = (&change.before, &change.after) else {
            return Ok(());
        };
        let table = &self.tables[t];
        let key_columns =
            |shape: &crate::ddl::TableShape| shape.primary_key.as_ref().map(|k| k.columns.clone());
        if table.key_column.is_some()
            && before.primary_key.is_some()
            && key_columns(before) != key_columns(after)
        {
            return Err(format!(
                "{} has its key remapped (rule \"{}\"), and staging changed its primary key: \
                 remapping cannot follow that change. Stop sync, re-seed the table and the tables \
                 that refer to it from staging (`stagingprop copy --tables NAME --truncate`, with \
                 the config's key rule changed to match), then start sync again",
                table.name,
                table.rule.as_str()
            ));
        }
        for (name, role) in self.roles(t) {
            let Some(old) = before.column_named(&name) else {
                continue;
            };
            let what = role.describe(&table.rule);
            let done = match (after.columns.iter().find(|c| c.attnum == old.attnum), &role) {
                (None, _) => "dropped it".to_owned(),
                (Some(new), Role::Natural | Role::Configured) if new.name != old.name => {
                    format!("renamed it to {}", new.name)
                }
                (Some(new), Role::Key | Role::Configured) if !integer_type(&new.type_sql) => {
                    format!("changed its type to {}", new.type_sql)
                }
                (Some(_), _) => continue,
            };
            return Err(format!(
                "{}.{name} is {what}, and staging {done}: remapping cannot follow that change. \
                 Stop sync, re-seed the table and the tables that refer to it from staging \
                 (`stagingprop copy --tables NAME --truncate`, with the config's key rule and \
                 [[references]] changed to match), then start sync again",
                table.name
            ));
        }
        Ok(())
    }

    /// Takes production's table `t` as `meta` after `change` was applied to it: columns found
    /// again by name, references again from the table's foreign keys on staging (to remapped
    /// tables) and its `[[references]]`.
    pub fn reshape(
        &mut self,
        t: usize,
        meta: &TableMeta,
        change: &TableChange,
    ) -> Result<(), String> {
        let Some(after) = &change.after else {
            return Ok(());
        };
        let name = self.tables[t].name.clone();
        let old_columns = self.tables[t].columns.clone();
        let position = |column: &str| {
            meta.column_index(column).ok_or_else(|| {
                format!(
                    "{name}.{column}, which remapping reads, is not on production after the change"
                )
            })
        };
        let key_column = match self.tables[t].key_column {
            Some(k) => {
                // By attnum: a renamed key keeps its place.
                let old = &old_columns[k];
                let now = change
                    .before
                    .as_ref()
                    .and_then(|b| b.column_named(old))
                    .and_then(|o| after.columns.iter().find(|c| c.attnum == o.attnum))
                    .map_or(old.as_str(), |c| c.name.as_str());
                let c = position(now)?;
                if !integer_type(&meta.columns[c].type_sql) {
                    return Err(format!(
                        "{name}.{} is {} on production after the change; remapped keys are integers",
                        meta.columns[c].name, meta.columns[c].type_sql
                    ));
                }
                Some(c)
            }
            None => None,
        };
        let mut natural = Vec::new();
        for &(c, _) in &self.tables[t].natural {
            let c = position(&old_columns[c])?;
            natural.push((c, meta.columns[c].type_sql.clone()));
        }
        // Staging's foreign keys of the table now, to remapped tables of this configuration.
        let declared = match after.foreign_keys() {
            Some(declared) => declared,
            None => {
                let new_key = after.constraints.iter().any(|c| {
                    c.kind == "f"
                        && !change
                            .before
                            .as_ref()
                            .is_some_and(|b| b.constraints.iter().any(|o| o.name == c.name))
                });
                if new_key || !self.tables[t].references.is_empty() {
                    return Err(format!(
                        "staging's capture of schema changes does not say what {name}'s foreign \
                         keys refer to (its trigger predates that): run `stagingprop init` again \
                         to update it, then start sync again"
                    ));
                }
                // Nothing remapped is referenced: the references stay none.
                Vec::new()
            }
        };
        let mut found: Vec<(String, usize, String)> = Vec::new();
        for fk in declared {
            let Some(parent) = self.tables.iter().position(|p| p.name == fk.parent) else {
                continue;
            };
            // Only remapped tables have a key column.
            let Some(parent_key) = self.tables[parent].key_column else {
                continue;
            };
            let parent_columns = if parent == t {
                &old_columns
            } else {
                &self.tables[parent].columns
            };
            if parent_columns[parent_key] != fk.parent_column {
                return Err(format!(
                    "{name}.{} refers to {}.{}, which is not the remapped key of {}; only \
                     references to a remapped table's primary key can be translated",
                    fk.column, fk.parent, fk.parent_column, fk.parent
                ));
            }
            let why = format!(
                "foreign key on staging to {}.{}",
                fk.parent, fk.parent_column
            );
            found.push((fk.column, parent, why));
        }
        for (column, parent) in &self.tables[t].configured {
            if !found.iter().any(|(c, _, _)| c == column) {
                found.push((column.clone(), *parent, "[[references]]".into()));
            }
        }
        let mut references = Vec::new();
        for (column, parent, why) in &found {
            let reference = ReferenceFound {
                column,
                parent: &self.tables[*parent].name,
                why,
            };
            let c = reference.position(meta, key_column, *parent == t)?;
            references.push(Reference {
                column: c,
                parent: *parent,
            });
        }
        let table = &mut self.tables[t];
        table.columns = meta.columns.iter().map(|c| c.name.clone()).collect();
        table.key = meta.key.clone();
        table.key_column = key_column;
        table.natural = natural;
        table.references = references;
        Ok(())
    }
}
