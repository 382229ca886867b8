//! SQL text for applying changes to production. Every statement is set-based: rows travel as one
//! `text[]` parameter per column, are expanded with `unnest ... WITH ORDINALITY`, cast to the
//! production column types by the types' own input functions (the inverse of the text output
//! pgoutput sent), and the statements report, by ordinal, which rows met a conflict.
//!
//! Why unnest of text arrays: one round trip and one plan per (table, column set) whatever the
//! row count, no per-row parsing or planning, and parameters need no per-type encoding on our
//! side. Measured against pipelined per-row statements it is several times faster at batch sizes
//! above a few hundred rows, and equal below.

use std::fmt::Write;

use crate::catalog::TableMeta;
use crate::quote::{qualified, quote_ident};
use crate::state::production_edits;

/// `unnest($1::text[], ..., $n::text[]) WITH ORDINALITY AS u(a0, ..., ord)` for `n` arrays
/// whose aliases are `names`.
fn unnest_from(names: &[String]) -> String {
    let mut out = String::from("unnest(");
    for i in 0..names.len() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "${}::text[]", i + 1);
    }
    out.push_str(") WITH ORDINALITY AS u(");
    for name in names {
        out.push_str(name);
        out.push_str(", ");
    }
    out.push_str("ord)");
    out
}

fn aliases(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `t."k" = u.k0::bigint AND ...` matching the table's key against the unnested key columns.
fn key_match(meta: &TableMeta, table_alias: &str, key_aliases: &[String]) -> String {
    meta.key
        .iter()
        .zip(key_aliases)
        .map(|(&k, alias)| {
            let column = &meta.columns[k];
            format!(
                "{table_alias}.{} = u.{alias}::{}",
                quote_ident(&column.name),
                column.type_sql
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The key columns of `alias`'s row as text, as the guard's triggers record them.
fn key_text(meta: &TableMeta, alias: &str) -> Vec<String> {
    meta.key
        .iter()
        .map(|&k| format!("{alias}.{}::text", quote_ident(&meta.columns[k].name)))
        .collect()
}

/// ` AND` no open production edit of the row `t`, for a table whose edits sync watches
/// (`watched`: its name as a SQL literal); nothing otherwise.
fn unedited(meta: &TableMeta, watched: Option<&str>) -> String {
    match watched {
        None => String::new(),
        Some(name) => format!(
            " AND NOT {}",
            production_edits::open_exists(name, &key_text(meta, "t"))
        ),
    }
}

/// Locks the rows of the keys (one array per key column) until the transaction ends: before a
/// key change or an operator's resolution reads a row's edits.
pub fn lock_rows(meta: &TableMeta) -> String {
    let keys = aliases("k", meta.key.len());
    format!(
        "SELECT count(*) FROM (SELECT 1 FROM {} AS t, {} WHERE {} ORDER BY u.ord FOR UPDATE OF t) AS l",
        qualified(&meta.schema, &meta.name),
        unnest_from(&keys),
        key_match(meta, "t", &keys)
    )
}

/// The open production edits of one row (`$1` the table's name, then its key columns as
/// text), oldest first, locked: `(id, before)`.
pub fn open_edits_of_row(meta: &TableMeta) -> String {
    let casts: Vec<String> = meta
        .key
        .iter()
        .enumerate()
        .map(|(i, &k)| format!("(${}::text::{})::text", i + 2, meta.columns[k].type_sql))
        .collect();
    production_edits::open_for_key(&casts)
}

/// The unnested keys as production prints them (as the guard records them).
fn unnested_key_text(meta: &TableMeta, keys: &[String]) -> Vec<String> {
    meta.key
        .iter()
        .zip(keys)
        .map(|(&k, alias)| format!("(u.{alias}::{})::text", meta.columns[k].type_sql))
        .collect()
}

/// The ordinals of keys (one array per key column) whose row has an open production edit
/// (`watched`: the table's name as a SQL literal).
pub fn edited_keys(meta: &TableMeta, watched: &str) -> String {
    let keys = aliases("k", meta.key.len());
    format!(
        "SELECT u.ord FROM {} WHERE {}",
        unnest_from(&keys),
        production_edits::open_exists(watched, &unnested_key_text(meta, &keys))
    )
}

/// The ordinals of keys (one array per key column) with an open production edit committed
/// after the batch's noted snapshot (see [`production_edits::NOTE_SNAPSHOT`]). `checked`:
/// fail on the server instead when there is one (a batch sent with its COMMIT must not
/// commit then).
pub fn raced_keys(meta: &TableMeta, watched: &str, checked: bool) -> String {
    let keys = aliases("k", meta.key.len());
    let raced = production_edits::made_after_snapshot(watched, &unnested_key_text(meta, &keys));
    // The CASE makes the failing cast run only for a raced row (its operand, the row's
    // ordinal, keeps the planner from folding it).
    let condition = if checked {
        format!(
            "CASE WHEN {raced} THEN ('stagingprop: row ' || u.ord || ' was edited on production meanwhile')::bigint > 0 ELSE false END"
        )
    } else {
        raced
    };
    format!("SELECT u.ord FROM {} WHERE {condition}", unnest_from(&keys))
}

/// Production's row of one key (parameters: the key columns as text), as JSON text.
pub fn row_as_json(meta: &TableMeta) -> String {
    let conditions: Vec<String> = meta
        .key
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let column = &meta.columns[k];
            format!(
                "t.{} = ${}::text::{}",
                quote_ident(&column.name),
                i + 1,
                column.type_sql
            )
        })
        .collect();
    format!(
        "SELECT to_jsonb(t)::text FROM {} AS t WHERE {}",
        meta.own_rows(),
        conditions.join(" AND ")
    )
}

/// Deletes rows by key. Parameters: one array per key column. Returns the ordinals deleted.
/// A row with an open production edit is left (for a `watched` table).
pub fn delete_rows(meta: &TableMeta, watched: Option<&str>) -> String {
    let keys = aliases("k", meta.key.len());
    format!(
        "DELETE FROM {} AS t USING {} WHERE {}{} RETURNING u.ord",
        qualified(&meta.schema, &meta.name),
        unnest_from(&keys),
        key_match(meta, "t", &keys),
        unedited(meta, watched)
    )
}

/// The key columns, quoted, comma-separated (an ON CONFLICT target).
fn key_list(meta: &TableMeta) -> String {
    meta.key
        .iter()
        .map(|&k| quote_ident(&meta.columns[k].name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An insert's column list and, for its SELECT, the unnested arrays `values` cast to the
/// columns' types.
fn insert_lists(meta: &TableMeta, columns: &[usize], values: &[String]) -> (String, String) {
    let column_list = columns
        .iter()
        .map(|&c| quote_ident(&meta.columns[c].name))
        .collect::<Vec<_>>()
        .join(", ");
    let select_list = columns
        .iter()
        .zip(values)
        .map(|(&c, alias)| format!("u.{alias}::{}", meta.columns[c].type_sql))
        .collect::<Vec<_>>()
        .join(", ");
    (column_list, select_list)
}

/// Inserts rows of the columns `columns` (production column indexes, including every key
/// column). Parameters: one array per column. Without `overwrite`, rows whose key exists are
/// left alone and their ordinals returned; with it, they replace the existing row's columns and
/// nothing is returned.
pub fn insert_rows(meta: &TableMeta, columns: &[usize], overwrite: bool) -> String {
    let values = aliases("c", columns.len());
    let table = qualified(&meta.schema, &meta.name);
    let (column_list, select_list) = insert_lists(meta, columns, &values);
    let key_list = key_list(meta);
    let overriding = meta.overriding(columns.iter().copied());
    if overwrite {
        let updates: Vec<String> = columns
            .iter()
            .filter(|&&c| !meta.key.contains(&c) && meta.assignable(c))
            .map(|&c| {
                let name = quote_ident(&meta.columns[c].name);
                format!("{name} = EXCLUDED.{name}")
            })
            .collect();
        let action = if updates.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        return format!(
            "INSERT INTO {table} ({column_list}){overriding} SELECT {select_list} FROM {} ORDER BY u.ord ON CONFLICT ({key_list}) {action}",
            unnest_from(&values)
        );
    }
    // The key columns' aliases among the inserted columns, to find rows that were not inserted.
    let key_aliases: Vec<String> = meta
        .key
        .iter()
        .map(|k| {
            let pos = columns
                .iter()
                .position(|c| c == k)
                .expect("insert columns include the key");
            values[pos].clone()
        })
        .collect();
    let not_inserted = meta
        .key
        .iter()
        .zip(&key_aliases)
        .map(|(&k, alias)| {
            let column = &meta.columns[k];
            format!(
                "ins.{} = u.{alias}::{}",
                quote_ident(&column.name),
                column.type_sql
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    // The count comparison is a one-time filter: when every row went in (the usual case) the
    // anti-join, which hashes every inserted row, is never run (8 % of one 5,000-row insert).
    format!(
        "WITH u AS (SELECT * FROM {}), \
         ins AS (INSERT INTO {table} ({column_list}){overriding} SELECT {select_list} FROM u ORDER BY u.ord \
                 ON CONFLICT ({key_list}) DO NOTHING RETURNING {key_list}) \
         SELECT u.ord FROM u WHERE (SELECT count(*) FROM ins) < (SELECT count(*) FROM u) \
         AND NOT EXISTS (SELECT 1 FROM ins WHERE {not_inserted})",
        unnest_from(&values)
    )
}

/// Makes production's rows of the keys given equal to the rows given (online repair): inserts
/// the missing, updates the different (only where a column differs, so an equal row is not
/// rewritten). Parameters: one array per column of `columns` (production column indexes, the
/// key among them). Returns one row: (inserted, updated).
pub fn repair_rows(meta: &TableMeta, columns: &[usize]) -> String {
    let values = aliases("c", columns.len());
    let table = qualified(&meta.schema, &meta.name);
    let (column_list, select_list) = insert_lists(meta, columns, &values);
    let key_list = key_list(meta);
    let set: Vec<String> = columns
        .iter()
        .filter(|&&c| !meta.key.contains(&c) && meta.assignable(c))
        .map(|&c| quote_ident(&meta.columns[c].name))
        .collect();
    let action = if set.is_empty() {
        "DO NOTHING".to_owned()
    } else {
        format!(
            // As text, as verify compares them (json and a few other types have no `=`).
            "DO UPDATE SET {} WHERE ROW({})::text IS DISTINCT FROM ROW({})::text",
            set.iter()
                .map(|n| format!("{n} = EXCLUDED.{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            set.iter()
                .map(|n| format!("t.{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            set.iter()
                .map(|n| format!("EXCLUDED.{n}"))
                .collect::<Vec<_>>()
                .join(", "),
        )
    };
    let overriding = meta.overriding(columns.iter().copied());
    format!(
        "WITH w AS (INSERT INTO {table} AS t ({column_list}){overriding} SELECT {select_list} FROM {} \
                    ORDER BY u.ord ON CONFLICT ({key_list}) {action} RETURNING xmax = 0 AS inserted) \
         SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM w",
        unnest_from(&values)
    )
}

/// Deletes the rows of the keys given (online repair); a key production lacks is no conflict.
/// Parameters: one array per key column. Its row count is the rows deleted.
pub fn repair_deletes(meta: &TableMeta) -> String {
    let keys = aliases("k", meta.key.len());
    format!(
        "DELETE FROM {} AS t USING {} WHERE {}",
        qualified(&meta.schema, &meta.name),
        unnest_from(&keys),
        key_match(meta, "t", &keys)
    )
}

/// [`insert_rows`] with `overwrite` for a table under `on_conflict = "overwrite"`, which also
/// logs each row it overwrote in the conflict log (`slot` and `table` as SQL literals) and
/// returns their ordinals. Parameters: one array per column, then each row's staging LSN and
/// xid.
pub fn overwrite_rows(meta: &TableMeta, columns: &[usize], slot: &str, table: &str) -> String {
    let values = aliases("c", columns.len());
    let mut all = values.clone();
    all.extend(["lsn".to_owned(), "xid".to_owned()]);
    let target = qualified(&meta.schema, &meta.name);
    let (column_list, select_list) = insert_lists(meta, columns, &values);
    let key_names: Vec<String> = meta
        .key
        .iter()
        .map(|&k| meta.columns[k].name.clone())
        .collect();
    let key_list = key_names
        .iter()
        .map(|n| quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    let key_alias = |k: usize| {
        let pos = columns
            .iter()
            .position(|&c| c == k)
            .expect("insert columns include the key");
        values[pos].clone()
    };
    let matched = meta
        .key
        .iter()
        .map(|&k| {
            let column = &meta.columns[k];
            format!(
                "ins.{} = u.{}::{}",
                quote_ident(&column.name),
                key_alias(k),
                column.type_sql
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ");
    let names = |cols: &mut dyn Iterator<Item = usize>| {
        cols.map(|c| crate::quote::quote_literal(&meta.columns[c].name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let key_json = format!(
        "json_object(ARRAY[{}]::text[], ARRAY[{}]::text[])::jsonb",
        names(&mut meta.key.iter().copied()),
        meta.key
            .iter()
            .map(|&k| format!("u.{}", key_alias(k)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let row_json = format!(
        "json_object(ARRAY[{}]::text[], ARRAY[{}]::text[])::jsonb",
        names(&mut columns.iter().copied()),
        values
            .iter()
            .map(|v| format!("u.{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let updates: Vec<String> = columns
        .iter()
        .filter(|&&c| !meta.key.contains(&c) && meta.assignable(c))
        .map(|&c| {
            let name = quote_ident(&meta.columns[c].name);
            format!("{name} = EXCLUDED.{name}")
        })
        .collect();
    let action = if !updates.is_empty() {
        format!("DO UPDATE SET {}", updates.join(", "))
    } else if let Some(c) = (0..meta.columns.len()).find(|&c| meta.assignable(c)) {
        // Nothing to set: still a write, so that the row is found (and logged) as overwritten.
        let name = quote_ident(&meta.columns[c].name);
        format!("DO UPDATE SET {name} = t.{name}")
    } else {
        "DO NOTHING".to_owned()
    };
    format!(
        "WITH u AS (SELECT * FROM {unnest}), \
         ins AS (INSERT INTO {target} AS t ({column_list}){overriding} SELECT {select_list} FROM u ORDER BY u.ord \
                 ON CONFLICT ({key_list}) {action} RETURNING {key_list}, t.xmax <> 0 AS existed), \
         hit AS (SELECT u.* FROM ins JOIN u ON {matched} WHERE ins.existed), \
         logged AS (INSERT INTO {log} (slot, lsn, xid, table_name, kind, key, staging_row, policy, action) \
                    SELECT {slot}, u.lsn::pg_lsn, u.xid::bigint, {table}, 'insert_exists', {key_json}, {row_json}, \
                    'overwrite', 'overwritten' FROM hit AS u) \
         SELECT ord FROM hit",
        unnest = unnest_from(&all),
        overriding = meta.overriding(columns.iter().copied()),
        log = crate::state::conflicts::qualified_name(),
    )
}

/// Updates the columns `set` of rows found by key. Parameters: one array per key column, then
/// one per set column. Reports only its row count (returning a row per update costs production
/// as much as a tenth of the update); [`missing_keys`] names the rows when the count falls short.
/// A row with an open production edit is left (for a `watched` table).
pub fn update_rows(meta: &TableMeta, set: &[usize], watched: Option<&str>) -> String {
    let keys = aliases("k", meta.key.len());
    let values = aliases("s", set.len());
    let mut all = keys.clone();
    all.extend(values.iter().cloned());
    let assignments = if set.is_empty() {
        // Nothing but unchanged columns: still find the row so a missing one is a conflict
        // (by a column that may be assigned: not a `GENERATED ALWAYS` identity).
        let c = (0..meta.columns.len())
            .find(|&c| meta.assignable(c))
            .unwrap_or(meta.key[0]);
        let k = &meta.columns[c].name;
        format!("{} = t.{}", quote_ident(k), quote_ident(k))
    } else {
        set.iter()
            .zip(&values)
            .map(|(&c, alias)| {
                let column = &meta.columns[c];
                format!(
                    "{} = u.{alias}::{}",
                    quote_ident(&column.name),
                    column.type_sql
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "UPDATE {} AS t SET {assignments} FROM {} WHERE {}{}",
        qualified(&meta.schema, &meta.name),
        unnest_from(&all),
        key_match(meta, "t", &keys),
        unedited(meta, watched)
    )
}

/// A number that is `count(*)` when it equals the rows sent (the first parameter's length), and
/// otherwise an error on the server ("invalid input syntax"): a batch sent together with its
/// COMMIT must fail there rather than commit with a row missing. The aggregate makes the
/// comparison run whatever the count, and its operand keeps the planner from folding the error
/// into every execution.
fn all_rows_found(array_type: &str) -> String {
    format!(
        "CASE WHEN count(*) = cardinality($1::text[]) THEN {ok} \
         ELSE ('stagingprop: ' || count(*) || ' of ' || cardinality($1::text[]) || ' rows found')::{array_type} END",
        ok = if array_type == "bigint[]" {
            "array_agg(ord)"
        } else {
            "count(*)"
        }
    )
}

/// [`delete_rows`] that fails on the server when a row is missing; reports the same ordinals.
pub fn delete_rows_checked(meta: &TableMeta, watched: Option<&str>) -> String {
    format!(
        "WITH d AS ({}) SELECT unnest({}) FROM d",
        delete_rows(meta, watched),
        all_rows_found("bigint[]")
    )
}

/// [`insert_rows`] that fails on the server when a key exists (a unique violation); reports
/// no rows, like an insert that left none out.
pub fn insert_rows_checked(meta: &TableMeta, columns: &[usize]) -> String {
    let values = aliases("c", columns.len());
    let (column_list, select_list) = insert_lists(meta, columns, &values);
    format!(
        "INSERT INTO {} ({column_list}){} SELECT {select_list} FROM {} ORDER BY u.ord",
        qualified(&meta.schema, &meta.name),
        meta.overriding(columns.iter().copied()),
        unnest_from(&values)
    )
}

/// [`update_rows`] that fails on the server when a row is missing; returns one row per row
/// updated, so its row count is the update's.
pub fn update_rows_checked(meta: &TableMeta, set: &[usize], watched: Option<&str>) -> String {
    format!(
        "WITH upd AS ({} RETURNING 1) SELECT generate_series(1, {}) FROM upd",
        update_rows(meta, set, watched),
        all_rows_found("bigint")
    )
}

/// The ordinals of keys with no row. Parameters: one array per key column.
pub fn missing_keys(meta: &TableMeta) -> String {
    let keys = aliases("k", meta.key.len());
    format!(
        "SELECT u.ord FROM {} WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
        unnest_from(&keys),
        qualified(&meta.schema, &meta.name),
        key_match(meta, "t", &keys)
    )
}

/// Updates one row whose key changed. Parameters: the old key columns, then the set columns
/// (which include the new key). Affects one row or none.
pub fn update_key(meta: &TableMeta, set: &[usize]) -> String {
    let mut n = 0;
    // `"column" = $n::text::type`, numbering parameters in the order they are asked for.
    let mut param = |c: usize| {
        n += 1;
        let column = &meta.columns[c];
        format!(
            "{} = ${n}::text::{}",
            quote_ident(&column.name),
            column.type_sql
        )
    };
    let conditions: Vec<String> = meta.key.iter().map(|&k| param(k)).collect();
    let assignments: Vec<String> = set.iter().map(|&c| param(c)).collect();
    format!(
        "UPDATE {} SET {} WHERE {}",
        qualified(&meta.schema, &meta.name),
        assignments.join(", "),
        conditions.join(" AND ")
    )
}

/// The one row of a table without a key whose columns `matched` equal parameters `$first`...
/// (NULL equal to NULL): `(tableoid, ctid)`, so exactly one of several identical rows is
/// changed, as PostgreSQL's own apply worker changes one, and a partitioned table's rows are
/// told apart. Values are compared as their types print them, which every type can do (json,
/// point and xml have no equality).
fn one_row_matching(meta: &TableMeta, matched: &[usize], first: usize) -> String {
    let conditions: Vec<String> = matched
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let column = &meta.columns[c];
            format!(
                "t.{}::text IS NOT DISTINCT FROM (${}::text::{})::text",
                quote_ident(&column.name),
                first + i,
                column.type_sql
            )
        })
        .collect();
    let condition = if conditions.is_empty() {
        "true".to_owned()
    } else {
        conditions.join(" AND ")
    };
    format!(
        "(tableoid, ctid) = (SELECT t.tableoid, t.ctid FROM {} AS t WHERE {condition} LIMIT 1)",
        qualified(&meta.schema, &meta.name)
    )
}

/// Inserts one row of the columns `columns` (parameters in that order).
pub fn insert_one(meta: &TableMeta, columns: &[usize]) -> String {
    let column_list = columns
        .iter()
        .map(|&c| quote_ident(&meta.columns[c].name))
        .collect::<Vec<_>>()
        .join(", ");
    let values = columns
        .iter()
        .enumerate()
        .map(|(i, &c)| format!("${}::text::{}", i + 1, meta.columns[c].type_sql))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {} ({column_list}){} VALUES ({values})",
        qualified(&meta.schema, &meta.name),
        meta.overriding(columns.iter().copied())
    )
}

/// Updates one row of a table without a key, found by its old values of `matched`.
/// Parameters: the set columns, then the matched ones. Affects one row or none.
pub fn update_one(meta: &TableMeta, set: &[usize], matched: &[usize]) -> String {
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let column = &meta.columns[c];
            format!(
                "{} = ${}::text::{}",
                quote_ident(&column.name),
                i + 1,
                column.type_sql
            )
        })
        .collect();
    format!(
        "UPDATE {} SET {} WHERE {}",
        qualified(&meta.schema, &meta.name),
        assignments.join(", "),
        one_row_matching(meta, matched, set.len() + 1)
    )
}

/// Deletes one row of a table without a key, found by its values of `matched` (parameters
/// in that order). Affects one row or none.
pub fn delete_one(meta: &TableMeta, matched: &[usize]) -> String {
    format!(
        "DELETE FROM {} WHERE {}",
        qualified(&meta.schema, &meta.name),
        one_row_matching(meta, matched, 1)
    )
}

/// Makes `GENERATED ALWAYS AS IDENTITY` columns `BY DEFAULT` (`always` false) or back: around
/// the one UPDATE that gives such a column staging's new value, inside the apply transaction,
/// so no other session sees the difference (it holds the table's lock until commit).
pub fn identity_generated(meta: &TableMeta, columns: &[usize], always: bool) -> String {
    let kind = if always { "ALWAYS" } else { "BY DEFAULT" };
    let alterations = columns
        .iter()
        .map(|&c| {
            format!(
                "ALTER COLUMN {} SET GENERATED {kind}",
                quote_ident(&meta.columns[c].name)
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "ALTER TABLE {} {alterations}",
        qualified(&meta.schema, &meta.name)
    )
}

/// TRUNCATE of managed tables only: never CASCADE, so production-only tables that reference
/// them are never emptied; a foreign key from such a table makes this fail instead.
pub fn truncate(tables: &[&TableMeta], restart_identity: bool) -> String {
    let list = tables
        .iter()
        .map(|m| qualified(&m.schema, &m.name))
        .collect::<Vec<_>>()
        .join(", ");
    let restart = if restart_identity {
        " RESTART IDENTITY"
    } else {
        ""
    };
    format!("TRUNCATE {list}{restart}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnMeta;

    fn meta() -> TableMeta {
        let col = |name: &str, ty: &str| ColumnMeta::new(name, ty);
        TableMeta {
            schema: "public".into(),
            name: "offer price".into(),
            columns: vec![
                col("offer_id", "bigint"),
                col("currency", "character(3)"),
                col("price", "numeric(20,5)"),
            ],
            key: vec![0, 1],
            identity_full: false,
            partitioned: false,
        }
    }

    #[test]
    fn delete_matches_on_every_key_column() {
        assert_eq!(
            delete_rows(&meta(), None),
            "DELETE FROM \"public\".\"offer price\" AS t USING unnest($1::text[], $2::text[]) \
             WITH ORDINALITY AS u(k0, k1, ord) WHERE t.\"offer_id\" = u.k0::bigint AND \
             t.\"currency\" = u.k1::character(3) RETURNING u.ord"
        );
    }

    #[test]
    fn identity_always_columns_are_overridden_on_insert_and_never_assigned() {
        let mut m = meta();
        m.columns[0].identity_always = true;
        for sql in [
            insert_rows(&m, &[0, 1, 2], false),
            insert_rows(&m, &[0, 1, 2], true),
            insert_rows_checked(&m, &[0, 1, 2]),
        ] {
            assert!(
                sql.contains(
                    "(\"offer_id\", \"currency\", \"price\") OVERRIDING SYSTEM VALUE SELECT"
                ),
                "{sql}"
            );
            assert!(!sql.contains("\"offer_id\" = EXCLUDED"), "{sql}");
        }
        assert!(!insert_rows(&meta(), &[0, 1, 2], false).contains("OVERRIDING"));
        // With nothing to set, the row is still found by assigning a column that may be.
        assert!(update_rows(&m, &[], None).contains("SET \"currency\" = t.\"currency\""));
        assert_eq!(
            identity_generated(&m, &[0], false),
            "ALTER TABLE \"public\".\"offer price\" ALTER COLUMN \"offer_id\" SET GENERATED BY DEFAULT"
        );
    }

    #[test]
    fn rows_without_a_key_are_found_one_at_a_time_by_every_value() {
        let mut m = meta();
        m.key.clear();
        assert_eq!(
            delete_one(&m, &[0, 2]),
            "DELETE FROM \"public\".\"offer price\" WHERE (tableoid, ctid) = (SELECT t.tableoid, \
             t.ctid FROM \"public\".\"offer price\" AS t WHERE t.\"offer_id\"::text IS NOT \
             DISTINCT FROM ($1::text::bigint)::text AND t.\"price\"::text IS NOT DISTINCT FROM \
             ($2::text::numeric(20,5))::text LIMIT 1)"
        );
        let update = update_one(&m, &[1], &[0]);
        assert!(
            update.starts_with(
                "UPDATE \"public\".\"offer price\" SET \"currency\" = $1::text::character(3) WHERE"
            ),
            "{update}"
        );
        assert!(update.contains("IS NOT DISTINCT FROM ($2::text::bigint)::text LIMIT 1)"));
    }

    #[test]
    fn insert_reports_rows_not_inserted() {
        let sql = insert_rows(&meta(), &[0, 1, 2], false);
        assert!(sql.starts_with(
            "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(c0, c1, c2, ord))"
        ));
        assert!(sql.contains("ON CONFLICT (\"offer_id\", \"currency\") DO NOTHING RETURNING \"offer_id\", \"currency\""));
        assert!(sql.ends_with(
            "WHERE ins.\"offer_id\" = u.c0::bigint AND ins.\"currency\" = u.c1::character(3))"
        ));
    }

    #[test]
    fn overwrite_insert_updates_non_key_columns() {
        let sql = insert_rows(&meta(), &[0, 1, 2], true);
        assert!(sql.ends_with(
            "ON CONFLICT (\"offer_id\", \"currency\") DO UPDATE SET \"price\" = EXCLUDED.\"price\""
        ));
        let only_keys = insert_rows(&meta(), &[0, 1], true);
        assert!(only_keys.ends_with("DO NOTHING"));
    }

    #[test]
    fn update_sets_only_sent_columns() {
        assert_eq!(
            update_rows(&meta(), &[2], None),
            "UPDATE \"public\".\"offer price\" AS t SET \"price\" = u.s0::numeric(20,5) FROM \
             unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(k0, k1, s0, ord) \
             WHERE t.\"offer_id\" = u.k0::bigint AND t.\"currency\" = u.k1::character(3)"
        );
        assert!(update_rows(&meta(), &[], None).contains("SET \"offer_id\" = t.\"offer_id\""));
    }

    #[test]
    fn checked_statements_fail_on_the_server_when_a_row_is_missing_or_taken() {
        let m = meta();
        let delete = delete_rows_checked(&m, None);
        assert!(delete.starts_with(&format!(
            "WITH d AS ({}) SELECT unnest(CASE",
            delete_rows(&m, None)
        )));
        assert!(delete.contains("THEN array_agg(ord) ELSE"));
        assert!(delete.ends_with(" rows found')::bigint[] END) FROM d"));
        let update = update_rows_checked(&m, &[2], None);
        assert!(update.starts_with(&format!(
            "WITH upd AS ({} RETURNING 1)",
            update_rows(&m, &[2], None)
        )));
        assert!(update.contains(
            "generate_series(1, CASE WHEN count(*) = cardinality($1::text[]) THEN count(*)"
        ));
        let insert = insert_rows_checked(&m, &[0, 1, 2]);
        assert!(!insert.contains("ON CONFLICT"), "{insert}");
        assert!(insert.ends_with("ORDER BY u.ord"));
    }

    #[test]
    fn a_watched_tables_updates_and_deletes_leave_rows_with_an_open_edit() {
        let m = meta();
        let unedited = " AND NOT EXISTS (SELECT 1 FROM \"stagingprop\".\"production_edits\" AS e \
             WHERE e.settled_at IS NULL AND e.table_name = 'public.\"offer price\"' \
             AND e.key = ARRAY[t.\"offer_id\"::text, t.\"currency\"::text])";
        let watched = Some("'public.\"offer price\"'");
        assert!(update_rows(&m, &[2], watched).ends_with(unedited));
        assert!(delete_rows(&m, watched).ends_with(&format!("{unedited} RETURNING u.ord")));
        assert!(update_rows_checked(&m, &[2], watched).contains(unedited));
        assert!(!update_rows(&m, &[2], None).contains("production_edits"));
        assert!(
            lock_rows(&m).ends_with("ORDER BY u.ord FOR UPDATE OF t) AS l"),
            "{}",
            lock_rows(&m)
        );
        let raced = raced_keys(&m, "'x'", false);
        assert!(
            raced.contains("NOT pg_visible_in_snapshot(e.xid::text::xid8, current_setting('stagingprop.edits_snapshot')::pg_snapshot)"),
            "{raced}"
        );
        assert!(raced_keys(&m, "'x'", true).contains("THEN ('stagingprop: row ' || u.ord"));
        assert!(edited_keys(&m, "'x'").contains(
            "WHERE EXISTS (SELECT 1 FROM \"stagingprop\".\"production_edits\" AS e WHERE e.settled_at IS NULL AND e.table_name = 'x' AND e.key = ARRAY[(u.k0::bigint)::text, (u.k1::character(3))::text])"
        ));
    }

    #[test]
    fn missing_keys_are_found_by_ordinal() {
        assert_eq!(
            missing_keys(&meta()),
            "SELECT u.ord FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(k0, k1, ord) \
             WHERE NOT EXISTS (SELECT 1 FROM \"public\".\"offer price\" AS t WHERE \
             t.\"offer_id\" = u.k0::bigint AND t.\"currency\" = u.k1::character(3))"
        );
    }

    #[test]
    fn key_update_and_truncate() {
        assert_eq!(
            update_key(&meta(), &[0, 2]),
            "UPDATE \"public\".\"offer price\" SET \"offer_id\" = $3::text::bigint, \"price\" = \
             $4::text::numeric(20,5) WHERE \"offer_id\" = $1::text::bigint AND \"currency\" = \
             $2::text::character(3)"
        );
        let m = meta();
        assert_eq!(
            truncate(&[&m], true),
            "TRUNCATE \"public\".\"offer price\" RESTART IDENTITY"
        );
    }
}
