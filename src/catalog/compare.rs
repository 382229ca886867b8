//! The comparison of one side's managed tables with another's (staging's with production's for
//! sync, a copy's source with its target): every difference that would stop the target from
//! receiving the source's rows is one line naming the table, the column and what to change.

use super::TableMeta;
use crate::config::TableName;

/// Whether `target` can store every value of a `source` column's type: the same type, or a
/// wider one (`varchar(n)` into `varchar(m >= n)` or `text`, `numeric(p,s)` into `numeric`).
pub fn compatible(source: &str, target: &str) -> bool {
    if source == target {
        return true;
    }
    let length = |t: &str, prefix: &str| -> Option<Option<u32>> {
        let rest = t.strip_prefix(prefix)?;
        if rest.is_empty() {
            return Some(None);
        }
        rest.strip_prefix('(')?
            .strip_suffix(')')?
            .parse()
            .ok()
            .map(Some)
    };
    const VARCHAR: &str = "character varying";
    match (length(source, VARCHAR), length(target, VARCHAR)) {
        (Some(_), Some(None)) => return true,
        (Some(Some(s)), Some(Some(t))) => return t >= s,
        _ => {}
    }
    if target == "text" && (source == "text" || source.starts_with(VARCHAR)) {
        return true;
    }
    target == "numeric" && source.starts_with("numeric")
}

/// The two sides being compared, by the names the operator knows them by.
#[derive(Clone, Copy, Debug)]
pub struct Sides<'a> {
    pub source: &'a str,
    pub target: &'a str,
}

impl Sides<'_> {
    #[cfg(test)]
    const SYNC: Sides<'static> = Sides {
        source: "staging",
        target: "production",
    };
}

/// One difference, in words for the operator, and what could account for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub cause: Cause,
}

/// Whether a schema change made on the source, still on its way to the target, could be what
/// makes the two differ (a column added or retyped, or one dropped, on the source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A table or key: no captured schema change brings it.
    Structure,
    /// A column the target lacks, or has with another type.
    Column(TableName),
    /// A required target column the source does not send: a drop on the source on its way,
    /// unless the column is one the configuration leaves to the target.
    Unsent { table: TableName, column: String },
}

impl Problem {
    fn new(cause: Cause, message: String) -> Problem {
        Problem { message, cause }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The problems' messages, for an error that lists them.
pub fn messages(problems: Vec<Problem>) -> Vec<String> {
    problems.into_iter().map(|p| p.message).collect()
}

/// Every difference that would stop `target` from receiving `source`'s rows of this table.
pub fn compare(source: &TableMeta, target: &TableMeta, sides: Sides<'_>) -> Vec<Problem> {
    let Sides {
        source: from,
        target: to,
    } = sides;
    let table = source.table_name();
    let mut problems = Vec::new();
    // Without a key on either side, rows are found by all their values (the source's
    // REPLICA IDENTITY FULL sends them); a key on one side only must be on the other too.
    if target.key.is_empty() && !source.key.is_empty() {
        let columns: Vec<&str> = source
            .key
            .iter()
            .map(|&k| source.columns[k].name.as_str())
            .collect();
        problems.push(Problem::new(Cause::Structure, format!(
            "{to}: table {table} has no primary key (nor a replica identity index), but {from} finds its rows by ({}); add the same primary key (or a unique index on those columns with REPLICA IDENTITY USING INDEX)",
            columns.join(", ")
        )));
    }

    for column in &source.columns {
        match target.columns.iter().find(|c| c.name == column.name) {
            None => problems.push(Problem::new(Cause::Column(table.clone()), format!(
                "{to}: table {table} lacks column {} ({} on {from}); add it: ALTER TABLE {} ADD COLUMN {} {}",
                column.name,
                column.type_sql,
                target.qualified(),
                crate::quote::quote_ident(&column.name),
                column.type_sql
            ))),
            Some(t) if !compatible(&column.type_sql, &t.type_sql) => problems.push(Problem::new(Cause::Column(table.clone()), format!(
                "{to}: column {table}.{} is {} but {} on {from}; change it to {}",
                column.name, t.type_sql, column.type_sql, column.type_sql
            ))),
            Some(_) => {}
        }
    }
    // Columns the source does not send (production-owned, outside a column list) are left
    // to their defaults on insert: one that must have a value cannot be.
    for column in &target.columns {
        if column.required && source.column_index(&column.name).is_none() {
            problems.push(Problem::new(Cause::Unsent { table: table.clone(), column: column.name.clone() }, format!(
                "{to}: column {table}.{} is NOT NULL without a default and {from} does not send it (it is outside the table's column list): give it a default, make it nullable, or add it to the column list",
                column.name
            )));
        }
    }
    for &k in &target.key {
        let name = &target.columns[k].name;
        if source.column_index(name).is_none() {
            problems.push(Problem::new(Cause::Structure, format!(
                "{to}: primary key column {table}.{name} does not exist on {from}; the keys must match"
            )));
        }
    }
    problems
}

/// Compares every table of `names` as each side has it (`None`: no such table), and returns
/// the pairs (source's, target's) when nothing differs, else every problem.
pub fn compare_all(
    names: &[&TableName],
    source: &[Option<TableMeta>],
    target: Vec<Option<TableMeta>>,
    sides: Sides<'_>,
) -> Result<Vec<(TableMeta, TableMeta)>, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut pairs = Vec::with_capacity(names.len());
    for ((name, on_source), on_target) in names.iter().zip(source).zip(target) {
        match (on_source, on_target) {
            (None, _) => problems.push(Problem::new(
                Cause::Structure,
                format!("{}: table {name} does not exist", sides.source),
            )),
            (Some(_), None) => problems.push(Problem::new(
                Cause::Structure,
                format!(
                    "{}: table {name} does not exist; create it with the same columns as on {}",
                    sides.target, sides.source
                ),
            )),
            (Some(s), Some(t)) => {
                problems.extend(compare(s, &t, sides));
                pairs.push((s.clone(), t));
            }
        }
    }
    if problems.is_empty() {
        Ok(pairs)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnMeta;

    fn table(columns: &[(&str, &str)], key: Vec<usize>) -> TableMeta {
        TableMeta {
            schema: "public".into(),
            name: "t".into(),
            columns: columns
                .iter()
                .map(|(n, t)| ColumnMeta::new(*n, *t))
                .collect(),
            key,
            identity_full: false,
            partitioned: false,
        }
    }

    #[test]
    fn compatible_types() {
        assert!(compatible("bigint", "bigint"));
        assert!(compatible("character varying(10)", "character varying(20)"));
        assert!(!compatible(
            "character varying(20)",
            "character varying(10)"
        ));
        assert!(compatible("character varying(20)", "character varying"));
        assert!(compatible("character varying(20)", "text"));
        assert!(compatible("numeric(12,2)", "numeric"));
        assert!(!compatible("bigint", "integer"));
        assert!(!compatible("text", "character varying(5)"));
    }

    #[test]
    fn compare_names_every_problem() {
        let staging = table(
            &[
                ("id", "bigint"),
                ("name", "text"),
                ("price", "numeric(12,2)"),
            ],
            vec![0],
        );
        let production = table(&[("id", "integer"), ("name", "text")], vec![]);
        let problems = messages(compare(&staging, &production, Sides::SYNC));
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems[0].contains("no primary key"));
        assert!(problems[1].contains("column public.t.id is integer but bigint on staging"));
        assert!(problems[2].contains("lacks column price"));
        assert!(problems[2].contains("ADD COLUMN \"price\" numeric(12,2)"));
        assert!(compare(&staging, &staging, Sides::SYNC).is_empty());
        // Without a key on either side rows are found by their values.
        let keyless = table(&[("id", "bigint")], vec![]);
        assert!(compare(&keyless, &keyless, Sides::SYNC).is_empty());
        // A copy into staging names the sides the other way round.
        let into_staging = Sides {
            source: "production",
            target: "staging",
        };
        assert!(
            compare(&staging, &production, into_staging)[0]
                .message
                .starts_with("staging: table")
        );
    }

    #[test]
    fn every_table_is_compared_and_missing_ones_named_by_side() {
        let a = TableName::new("public", "a");
        let b = TableName::new("public", "b");
        let c = TableName::new("public", "c");
        let t = table(&[("id", "bigint")], vec![0]);
        let problems = compare_all(
            &[&a, &b, &c],
            &[None, Some(t.clone()), Some(t.clone())],
            vec![Some(t.clone()), None, Some(t.clone())],
            Sides::SYNC,
        )
        .unwrap_err();
        assert_eq!(
            messages(problems),
            vec![
                "staging: table public.a does not exist".to_owned(),
                "production: table public.b does not exist; create it with the same columns as on staging".to_owned(),
            ]
        );
        let pairs = compare_all(
            &[&c],
            &[Some(t.clone())],
            vec![Some(t.clone())],
            Sides::SYNC,
        )
        .unwrap();
        assert_eq!(pairs, vec![(t.clone(), t)]);
    }
}
