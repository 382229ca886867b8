//! `stagingprop discover`: reads staging's catalog and writes a commented config for it, so a
//! schema of hundreds of tables is not typed in by hand. Tables come parents first (by their
//! declared foreign keys); a table without a primary key or replica identity is written out
//! commented, with what to do; columns that look like keys of a managed table without a declared
//! foreign key are suggested as `[[references]]`; tables that look like file stores are shown
//! with the `files = { ... }` line that would publish them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use tokio_postgres::Client;

use super::{OpsError, connect, query_error};
use crate::catalog;
use crate::config::{DbConfig, TableName};
use crate::pg::connect::Endpoint;

/// What to read and how to write the connections.
#[derive(Clone, Debug)]
pub struct DiscoverOptions {
    pub staging: DbConfig,
    /// Written as `[production]`; without it, a placeholder to fill in.
    pub production: Option<DbConfig>,
    /// Schemas to read (default: `public`).
    pub schemas: Vec<String>,
    /// Table name patterns (`*` any run of characters, `?` one), matched against
    /// `schema.table` or the bare table name: only matching tables (default: all), minus
    /// `exclude`.
    pub include: Vec<String>,
    pub exclude: Vec<String>,
}

/// One table as discovery sees it.
#[derive(Clone, Debug)]
struct Found {
    name: TableName,
    has_key: bool,
    /// The key's single column and its type, when it has exactly one.
    single_key: Option<(String, String)>,
    replica_identity: String,
    columns: Vec<(String, String)>,
}

/// What `discover` found, as the config's text and counts for the operator.
#[derive(Clone, Debug, Default)]
pub struct Discovered {
    pub config: String,
    pub tables: usize,
    pub without_identity: usize,
    pub references: usize,
    pub file_tables: usize,
}

/// `*` and `?` glob match.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

fn selected(options: &DiscoverOptions, name: &TableName) -> bool {
    let matches = |pattern: &String| {
        glob(pattern, &name.to_string()) || glob(pattern, &name.name) || {
            let plain = format!("{}.{}", name.schema, name.name);
            glob(pattern, &plain)
        }
    };
    (options.include.is_empty() || options.include.iter().any(matches))
        && !options.exclude.iter().any(matches)
}

async fn read_tables(
    s: &Client,
    staging: &Endpoint,
    options: &DiscoverOptions,
) -> Result<Vec<Found>, OpsError> {
    let schemas = if options.schemas.is_empty() {
        vec!["public".to_owned()]
    } else {
        options.schemas.clone()
    };
    let rows = s
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                             AND (i.indisprimary OR i.indisreplident)),
                    (SELECT array_agg(a.attname::text || ' ' || format_type(a.atttypid, a.atttypmod)
                                      ORDER BY a.attnum)
                       FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname = ANY($1)
              ORDER BY 1, 2",
            &[&schemas],
        )
        .await
        .map_err(query_error(staging, "reading the catalog"))?;
    let mut found = Vec::new();
    for row in rows {
        let name = TableName::new(row.get::<_, String>(0), row.get::<_, String>(1));
        if !selected(options, &name) {
            continue;
        }
        let columns: Vec<(String, String)> = row
            .get::<_, Option<Vec<String>>>(4)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.split_once(' ').map(|(n, t)| (n.to_owned(), t.to_owned())))
            .collect();
        let meta = catalog::load_table(s, &name)
            .await
            .map_err(query_error(staging, "reading a table"))?;
        let single_key = meta.as_ref().and_then(|m| match m.key.as_slice() {
            [k] => Some((m.columns[*k].name.clone(), m.columns[*k].type_sql.clone())),
            _ => None,
        });
        found.push(Found {
            name,
            has_key: row.get(3),
            single_key,
            replica_identity: row.get(2),
            columns,
        });
    }
    Ok(found)
}

/// A table without a key whose UPDATEs and DELETEs staging would refuse to publish, or publish
/// without saying which row.
fn needs_identity(t: &Found) -> bool {
    !t.has_key && t.replica_identity != "f"
}

/// Columns holding paths and contents, when a table looks like a file store.
fn file_columns(t: &Found) -> Option<(String, String)> {
    let path = t.columns.iter().find(|(n, ty)| {
        matches!(
            n.as_str(),
            "path" | "filepath" | "file_path" | "filename" | "url" | "uri"
        ) && (ty == "text" || ty.starts_with("character varying"))
    })?;
    let content = t.columns.iter().find(|(n, ty)| {
        matches!(
            n.as_str(),
            "content" | "data" | "body" | "contents" | "bytes"
        ) && (ty == "bytea" || ty == "text")
    })?;
    Some((path.0.clone(), content.0.clone()))
}

fn integer(ty: &str) -> bool {
    matches!(ty, "smallint" | "integer" | "bigint")
}

fn db_section(out: &mut String, section: &str, db: Option<&DbConfig>, env: &str) {
    let _ = writeln!(out, "[{section}]");
    match db {
        Some(db) => {
            let _ = writeln!(out, "url = {}", toml_string(&db.url));
            match &db.password {
                crate::config::PasswordSource::Env(var) => {
                    let _ = writeln!(out, "password_env = {}", toml_string(var));
                }
                crate::config::PasswordSource::File(path) => {
                    let _ = writeln!(
                        out,
                        "password_file = {}",
                        toml_string(&path.display().to_string())
                    );
                }
                crate::config::PasswordSource::None => {
                    let _ = writeln!(
                        out,
                        "# password_env = \"{env}\"   # or password_file; none for trust, peer, certificates or ~/.pgpass"
                    );
                }
            }
            let _ = writeln!(out, "sslmode = \"{}\"", db.sslmode.as_str());
        }
        None => {
            let _ = writeln!(
                out,
                "url = \"host=CHANGE-ME port=5432 dbname=CHANGE-ME user=stagingprop\"   # fill in\n\
                 password_env = \"{env}\""
            );
        }
    }
    out.push('\n');
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads staging and writes the config.
pub async fn discover(options: &DiscoverOptions) -> Result<Discovered, OpsError> {
    let staging = Endpoint::from_db_config(&options.staging)?;
    let s = connect(&staging).await?;
    let tables = read_tables(&s, &staging, options).await?;
    let index: HashMap<TableName, usize> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let references = catalog::column_references(&s)
        .await
        .map_err(query_error(&staging, "reading foreign keys"))?;
    let edges: Vec<(usize, usize)> = references
        .iter()
        .filter_map(|r| Some((*index.get(&r.child)?, *index.get(&r.parent)?)))
        .filter(|(c, p)| c != p)
        .collect();
    let order = catalog::parents_first(tables.len(), &edges);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `stagingprop discover` from {} ({} table(s)). Read it through before `init`:\n\
         # every table below is staging-managed (edited on staging only, carried to production).\n\
         # docs/configuration.md describes every key.\n",
        staging.describe(),
        tables.len()
    );
    db_section(
        &mut out,
        "staging",
        Some(&options.staging),
        "STAGING_PASSWORD",
    );
    db_section(
        &mut out,
        "production",
        options.production.as_ref(),
        "PRODUCTION_PASSWORD",
    );
    out.push_str(
        "[sync]\n# slot = \"stagingprop\"\n# publication = \"stagingprop\"\n\n\
         # The staging-managed tables, parents before the tables that refer to them.\n",
    );
    let mut discovered = Discovered {
        tables: tables.len(),
        ..Discovered::default()
    };
    for &i in &order {
        let t = &tables[i];
        let name = toml_string(&t.name.to_string());
        if needs_identity(t) {
            discovered.without_identity += 1;
            let _ = writeln!(
                out,
                "\n# {} has no primary key: staging cannot say which row an UPDATE or DELETE\n\
                 # changes. Add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL on\n\
                 # staging, then uncomment it.\n# [[tables]]\n# name = {name}",
                t.name, t.name
            );
            continue;
        }
        let _ = writeln!(out, "\n[[tables]]\nname = {name}");
        if let Some((path, content)) = file_columns(t) {
            discovered.file_tables += 1;
            let _ = writeln!(
                out,
                "# Looks like a file store: to publish its rows as files (it then needs REPLICA\n\
                 # IDENTITY FULL on staging), set a directory and uncomment:\n\
                 # files = {{ dir = \"/srv/files\", path_column = {}, content_column = {} }}",
                toml_string(&path),
                toml_string(&content)
            );
        }
    }
    // Columns named after another table's single integer key (`<table>_id`, or the key's own
    // name), integer-typed, with no declared foreign key.
    let declared: std::collections::HashSet<(TableName, String)> = references
        .iter()
        .map(|r| (r.child.clone(), r.column.clone()))
        .collect();
    let mut keys: BTreeMap<String, &Found> = BTreeMap::new();
    for t in &tables {
        if let Some((column, ty)) = &t.single_key
            && integer(ty)
        {
            keys.insert(column.clone(), t);
            keys.insert(format!("{}_id", t.name.name), t);
        }
    }
    let mut suggestions = String::new();
    for t in &tables {
        for (column, ty) in &t.columns {
            let Some(parent) = keys.get(column) else {
                continue;
            };
            if parent.name == t.name
                || !integer(ty)
                || declared.contains(&(t.name.clone(), column.clone()))
                || t.single_key.as_ref().is_some_and(|(k, _)| k == column)
            {
                continue;
            }
            discovered.references += 1;
            let _ = writeln!(
                suggestions,
                "\n# [[references]]\n# column = {}\n# table = {}",
                toml_string(
                    &crate::config::ColumnName {
                        table: t.name.clone(),
                        column: column.clone(),
                    }
                    .to_string()
                ),
                toml_string(&parent.name.to_string())
            );
        }
    }
    if !suggestions.is_empty() {
        out.push_str(
            "\n# Columns that look like keys of a managed table but have no declared foreign key.\n\
             # When that table's keys are remapped (key = { rule = ... }), uncomment the ones that\n\
             # are references, so they are translated with it.\n",
        );
        out.push_str(&suggestions);
    }
    discovered.config = out;
    Ok(discovered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_names() {
        assert!(glob("cat*", "catentry"));
        assert!(glob("public.cat?ntry", "public.catentry"));
        assert!(!glob("cat*", "offer"));
        assert!(glob("*", ""));
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }
}
