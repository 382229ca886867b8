//! The publication on staging as PostgreSQL holds it (tables, row filters, column lists), the
//! one the config asks for, and the comparison of the two: `init` creates or changes it from
//! here, and sync checks at start that staging sends no column the config leaves to
//! production.

use tokio_postgres::Client;

use super::TableMeta;
use crate::config::{TableConfig, TableName};
use crate::quote::{qualified, quote_ident, quote_literal};

/// One table of a publication: its column list (`None`: every column) and row filter, the
/// filter as the server prints it back (`pg_get_expr`), so two spellings compare equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedTable {
    pub table: TableName,
    pub columns: Option<Vec<String>>,
    pub filter: Option<String>,
}

/// The first version with row filters and column lists.
pub const PARTIAL_TABLES_VERSION: i32 = 150000;

pub async fn server_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    Ok(row.get(0))
}

/// The tables of publication `name`, in name order (empty when it does not exist).
pub async fn published(
    client: &Client,
    name: &str,
) -> Result<Vec<PublishedTable>, tokio_postgres::Error> {
    let partial = server_version(client).await? >= PARTIAL_TABLES_VERSION;
    let sql = if partial {
        "SELECT n.nspname::text, c.relname::text, pr.prattrs IS NOT NULL,
                ARRAY(SELECT a.attname::text FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attnum = ANY (pr.prattrs) ORDER BY a.attnum),
                pg_get_expr(pr.prqual, pr.prrelid)
           FROM pg_publication p
           JOIN pg_publication_rel pr ON pr.prpubid = p.oid
           JOIN pg_class c ON c.oid = pr.prrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE p.pubname = $1 ORDER BY 1, 2"
    } else {
        "SELECT n.nspname::text, c.relname::text, false, ARRAY[]::text[], NULL::text
           FROM pg_publication p
           JOIN pg_publication_rel pr ON pr.prpubid = p.oid
           JOIN pg_class c ON c.oid = pr.prrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE p.pubname = $1 ORDER BY 1, 2"
    };
    Ok(client
        .query(sql, &[&name])
        .await?
        .iter()
        .map(|r| PublishedTable {
            table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            columns: r.get::<_, bool>(2).then(|| r.get(3)),
            filter: r.get(4),
        })
        .collect())
}

/// The publication's entry for a table: `"s"."t" ("a", "b") WHERE (...)`. `meta` is staging's
/// whole table (the column list keeps its column order).
pub fn table_spec(table: &TableConfig, meta: &TableMeta) -> Result<String, String> {
    let mut spec = qualified(&table.name.schema, &table.name.name);
    if !table.columns.is_all() {
        let part = meta.managed_part(&table.columns, "staging")?;
        let names: Vec<String> = part.columns.iter().map(|c| quote_ident(&c.name)).collect();
        spec.push_str(&format!(" ({})", names.join(", ")));
    }
    if let Some(filter) = &table.filter {
        spec.push_str(&format!(" WHERE ({filter})"));
    }
    Ok(spec)
}

/// What the server makes of a partial table's entry, read from a publication created for the
/// purpose inside a transaction that is rolled back: the filter as the server prints it and the
/// columns it uses. An error is the server's, about this table's filter or column list.
pub struct Probed {
    pub published: PublishedTable,
    /// The columns the row filter reads.
    pub filter_columns: Vec<String>,
}

pub async fn probe(
    client: &Client,
    table: &TableConfig,
    meta: &TableMeta,
) -> Result<Result<Probed, String>, tokio_postgres::Error> {
    let spec = match table_spec(table, meta) {
        Ok(spec) => spec,
        Err(problem) => return Ok(Err(problem)),
    };
    let name = format!("stagingprop_probe_{}", std::process::id());
    client.batch_execute("BEGIN").await?;
    let created = client
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {spec}",
            quote_ident(&name)
        ))
        .await;
    let outcome = match created {
        Err(e) => Err(match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        }),
        Ok(()) => {
            let found = published(client, &name).await?;
            let qual: Option<String> = client
                .query_one(
                    "SELECT pr.prqual::text FROM pg_publication_rel pr
                       JOIN pg_publication p ON p.oid = pr.prpubid WHERE p.pubname = $1",
                    &[&name],
                )
                .await?
                .get(0);
            let attnums = qual.as_deref().map(var_attnos).unwrap_or_default();
            let mut filter_columns = Vec::new();
            for attnum in attnums {
                let row = client
                    .query_one(
                        &format!(
                            "SELECT attname::text FROM pg_attribute WHERE attrelid = {}::regclass AND attnum = $1",
                            quote_literal(&qualified(&table.name.schema, &table.name.name))
                        ),
                        &[&attnum],
                    )
                    .await?;
                filter_columns.push(row.get(0));
            }
            match found.into_iter().next() {
                Some(published) => Ok(Probed {
                    published,
                    filter_columns,
                }),
                None => Err("the server kept no entry for the table".into()),
            }
        }
    };
    client.batch_execute("ROLLBACK").await?;
    Ok(outcome.map_err(|message| {
        format!(
            "staging: the row filter or column list of {} is refused by PostgreSQL: {message}; fix it in the config",
            table.name
        )
    }))
}

/// The column numbers a node tree (`pg_node_tree` as text) reads: its `VAR` nodes' `varattno`.
fn var_attnos(tree: &str) -> Vec<i16> {
    let mut found: Vec<i16> = Vec::new();
    for node in tree.split("{VAR ").skip(1) {
        let Some(rest) = node.split(":varattno ").nth(1) else {
            continue;
        };
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(n) = digits.parse::<i16>()
            && n > 0
            && !found.contains(&n)
        {
            found.push(n);
        }
    }
    found
}

/// The columns of a table's replica identity (what UPDATE and DELETE carry of the old row):
/// `None` for REPLICA IDENTITY FULL (every column).
pub async fn replica_identity(
    client: &Client,
    table: &TableName,
) -> Result<Option<Vec<String>>, tokio_postgres::Error> {
    let relation = quote_literal(&qualified(&table.schema, &table.name));
    let identity: String = client
        .query_one(
            &format!("SELECT relreplident::text FROM pg_class WHERE oid = {relation}::regclass"),
            &[],
        )
        .await?
        .get(0);
    if identity == "f" {
        return Ok(None);
    }
    let index_test = if identity == "i" {
        "i.indisreplident"
    } else {
        "i.indisprimary"
    };
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                  WHERE i.indrelid = {relation}::regclass AND {index_test}"
            ),
            &[],
        )
        .await?;
    Ok(Some(rows.iter().map(|r| r.get(0)).collect()))
}

/// What PostgreSQL needs of a partial table before it replicates its UPDATEs and DELETEs: the
/// filter reads only replica-identity columns, and a column list covers the replica identity.
pub fn identity_problems(
    table: &TableConfig,
    identity: Option<&[String]>,
    filter_columns: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    let relation = qualified(&table.name.schema, &table.name.name);
    match identity {
        None if !table.columns.is_all() => problems.push(format!(
            "staging: table {} has REPLICA IDENTITY FULL and a column list; PostgreSQL then refuses its UPDATEs and DELETEs (the list does not cover the whole row): use its primary key as replica identity (ALTER TABLE {relation} REPLICA IDENTITY DEFAULT) or drop the column list",
            table.name
        )),
        None => {}
        Some(identity) => {
            for column in filter_columns {
                if !identity.contains(column) {
                    problems.push(format!(
                        "staging: the filter of {} uses column {column}, which is not part of its replica identity ({}); PostgreSQL cannot apply the filter to UPDATEs and DELETEs: filter on key columns only, or run ALTER TABLE {relation} REPLICA IDENTITY FULL",
                        table.name,
                        if identity.is_empty() {
                            "none".to_owned()
                        } else {
                            identity.join(", ")
                        }
                    ));
                }
            }
        }
    }
    problems
}

/// The differences between what a publication holds for a table and what the config asks for,
/// one line each.
pub fn differences(current: &PublishedTable, wanted: &PublishedTable) -> Vec<String> {
    let mut lines = Vec::new();
    let show_columns = |c: &Option<Vec<String>>| match c {
        None => "every column".to_owned(),
        Some(names) => names.join(", "),
    };
    if current.columns != wanted.columns {
        lines.push(format!(
            "{}: columns {} -> {}",
            wanted.table,
            show_columns(&current.columns),
            show_columns(&wanted.columns)
        ));
    }
    if current.filter != wanted.filter {
        lines.push(format!(
            "{}: filter {} -> {}",
            wanted.table,
            current.filter.as_deref().unwrap_or("none"),
            wanted.filter.as_deref().unwrap_or("none")
        ));
    }
    lines
}

/// Why the publication's entry for a table does not carry what the config manages: columns
/// the config leaves to production, a missing column list, or a row filter on one side only.
/// Sync refuses to start on any of them (`init --apply-changes` fixes them).
pub fn mismatch(
    table: &TableConfig,
    managed: &TableMeta,
    published: &PublishedTable,
) -> Option<String> {
    let fix = "run `stagingprop init --apply-changes`";
    match (&published.columns, table.columns.is_all()) {
        (None, false) => {
            return Some(format!(
                "staging: the publication sends every column of {}, whose config lists the columns it manages; {fix}",
                table.name
            ));
        }
        (Some(_), true) => {
            return Some(format!(
                "staging: the publication sends only some columns of {}, whose config manages all; {fix}",
                table.name
            ));
        }
        (Some(columns), false) => {
            let extra: Vec<&str> = columns
                .iter()
                .filter(|c| managed.column_index(c).is_none())
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Some(format!(
                    "staging: the publication sends columns of {} that the config leaves to production ({}); {fix}",
                    table.name,
                    extra.join(", ")
                ));
            }
        }
        (None, true) => {}
    }
    match (&table.filter, &published.filter) {
        (Some(_), None) => Some(format!(
            "staging: the publication has no row filter for {}, which the config filters; {fix}",
            table.name
        )),
        (None, Some(filter)) => Some(format!(
            "staging: the publication filters {} ({filter}) but the config does not; {fix}",
            table.name
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_columns_come_from_var_nodes() {
        let tree = "{OPEXPR :opno 96 :args ({VAR :varno 1 :varattno 3 :vartype 23} {CONST :consttype 23}) \
                    {VAR :varno 1 :varattno 12 :vartype 23} {VAR :varno 1 :varattno 3 :vartype 23}}";
        assert_eq!(var_attnos(tree), vec![3, 12]);
        assert!(var_attnos("{CONST :consttype 16}").is_empty());
    }
}
