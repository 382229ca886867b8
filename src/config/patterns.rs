//! `[[table_patterns]]`: tables managed by the schema they live in rather than by name, so that a
//! table created on staging in a managed schema is managed from its creation on, without editing
//! the file. A pattern is a schema and the table names it leaves out (globs, `*` standing for any
//! run of characters); a table listed in `[[tables]]` keeps its own entry.

use super::TableName;
use super::{ColumnList, Config, ConflictPolicy, EditPolicy, GuardMode, KeyRule, TableConfig};
use crate::quote::quote_literal;

/// One `[[table_patterns]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    pub schema: String,
    /// Globs over table names that the pattern leaves out.
    pub exclude: Vec<String>,
    pub on_conflict: ConflictPolicy,
    pub guard: GuardMode,
    pub on_production_edit: EditPolicy,
    /// `on_staging_drop = "drop"`: a table dropped on staging is dropped on production too (by
    /// default production's is kept, and sync says so).
    pub drop_with_staging: bool,
}

impl TablePattern {
    pub fn matches(&self, table: &TableName) -> bool {
        table.schema == self.schema && !self.exclude.iter().any(|g| glob_matches(g, &table.name))
    }

    /// The entry a table the pattern matches is managed by: every column, its keys kept.
    pub fn table_config(&self, name: TableName) -> TableConfig {
        TableConfig {
            name,
            key: KeyRule::Identity,
            on_conflict: self.on_conflict,
            copy: true,
            files: None,
            notify: false,
            filter: None,
            columns: ColumnList::All,
            guard: self.guard,
            on_production_edit: self.on_production_edit,
            from_pattern: true,
            drop_with_staging: self.drop_with_staging,
        }
    }

    /// The pattern as a SQL condition over a schema name and a table name (SQL expressions of
    /// type `name` or `text`), for staging's capture trigger.
    pub fn sql_condition(&self, schema: &str, table: &str) -> String {
        let mut condition = format!("({schema} = {}", quote_literal(&self.schema));
        for glob in &self.exclude {
            condition.push_str(&format!(
                " AND {table} NOT LIKE {}",
                quote_literal(&glob_to_like(glob))
            ));
        }
        condition.push(')');
        condition
    }
}

/// Whether `text` matches `glob`, whose `*` stands for any run of characters (none included).
pub fn glob_matches(glob: &str, text: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// `glob` as a LIKE pattern (backslash escapes LIKE's own wildcards).
fn glob_to_like(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len());
    for ch in glob.chars() {
        match ch {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            _ => out.push(ch),
        }
    }
    out
}

impl Config {
    /// The pattern that manages `table`, when no `[[tables]]` entry names it.
    pub fn pattern_of(&self, table: &TableName) -> Option<&TablePattern> {
        if self.tables.iter().any(|t| &t.name == table) {
            return None;
        }
        self.table_patterns.iter().find(|p| p.matches(table))
    }

    /// This configuration with a `[[tables]]` entry for each table of `found` that a pattern
    /// manages (in name order, after the listed ones).
    pub fn with_found(&self, found: &[TableName]) -> Config {
        let mut config = self.clone();
        let mut added: Vec<&TableName> = found
            .iter()
            .filter(|name| self.pattern_of(name).is_some())
            .collect();
        added.sort();
        added.dedup();
        for name in added {
            let pattern = self.pattern_of(name).expect("filtered above");
            config.tables.push(pattern.table_config(name.clone()));
        }
        config
    }

    /// The schemas the patterns look in.
    pub fn pattern_schemas(&self) -> Vec<String> {
        let mut schemas: Vec<String> = self
            .table_patterns
            .iter()
            .map(|p| p.schema.clone())
            .collect();
        schemas.sort();
        schemas.dedup();
        schemas
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob_matches("*", ""));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("audit_*", "audit_log"));
        assert!(!glob_matches("audit_*", "xaudit_log"));
        assert!(glob_matches("*_tmp", "orders_tmp"));
        assert!(!glob_matches("*_tmp", "orders_tmpx"));
        assert!(glob_matches("a*b*c", "aXbYc"));
        assert!(glob_matches("a*b*c", "abc"));
        assert!(!glob_matches("a*b*c", "acb"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
        // The last part may not overlap what the middle ones took.
        assert!(!glob_matches("ab*ba", "aba"));
    }

    #[test]
    fn like_patterns_escape_like_s_own_wildcards() {
        assert_eq!(glob_to_like("audit_*"), "audit\\_%");
        assert_eq!(glob_to_like("100%"), "100\\%");
        let pattern = TablePattern {
            schema: "cat".into(),
            exclude: vec!["tmp_*".into()],
            on_conflict: ConflictPolicy::default(),
            guard: GuardMode::Off,
            on_production_edit: EditPolicy::default(),
            drop_with_staging: false,
        };
        assert_eq!(
            pattern.sql_condition("n.nspname", "c.relname"),
            "(n.nspname = 'cat' AND c.relname NOT LIKE E'tmp\\\\_%')"
        );
        assert!(pattern.matches(&TableName::new("cat", "product")));
        assert!(!pattern.matches(&TableName::new("cat", "tmp_1")));
        assert!(!pattern.matches(&TableName::new("public", "product")));
    }
}
