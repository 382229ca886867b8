//! The column types pgoutput's Relation messages name by OID and modifier, spelled as
//! `format_type` spells them on staging, so that every Relation is checked against production's
//! columns before the first change that uses it (a type changed on staging while sync runs
//! would otherwise be stored with production's old type, rounded or truncated).

use std::collections::HashMap;

use tokio_postgres::Client;

use super::TableMeta;

/// Type names by (OID, modifier), learned from staging's table definitions as read when the
/// session started and asked of staging for any other.
#[derive(Clone, Debug, Default)]
pub struct TypeNames {
    known: HashMap<(u32, i32), String>,
}

impl TypeNames {
    /// What staging's managed tables showed when they were read.
    pub fn of_tables<'a>(tables: impl IntoIterator<Item = &'a TableMeta>) -> TypeNames {
        let mut names = TypeNames::default();
        for column in tables.into_iter().flat_map(|t| &t.columns) {
            if column.type_oid != 0 {
                names.learn(column.type_oid, column.type_modifier, &column.type_sql);
            }
        }
        names
    }

    pub fn learn(&mut self, oid: u32, modifier: i32, name: &str) {
        self.known.insert((oid, modifier), name.to_owned());
    }

    /// The name of a type, from what is known or else from staging; `None` when it is new and
    /// staging cannot be asked.
    pub async fn name(
        &mut self,
        oid: u32,
        modifier: i32,
        staging: Option<&Client>,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        if let Some(name) = self.known.get(&(oid, modifier)) {
            return Ok(Some(name.clone()));
        }
        let Some(staging) = staging else {
            return Ok(None);
        };
        let name: String = staging
            .query_one("SELECT format_type($1, $2)", &[&oid, &modifier])
            .await?
            .get(0);
        self.learn(oid, modifier, &name);
        Ok(Some(name))
    }
}
