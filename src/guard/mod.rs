//! The production guard: triggers `init` installs on production's staging-managed tables so that
//! a write by anyone but stagingprop is refused (`guard = "refuse"`) or recorded in
//! `stagingprop.production_edits` (`guard = "record"`). This module builds the SQL (sans-IO);
//! [`install`] reads production's catalog and puts it in place.
//!
//! stagingprop's sessions are told apart by `session_user`, the role the session logged in as:
//! `SET ROLE`, `SET SESSION AUTHORIZATION` (superusers only) and settings such as
//! `application_name` leave it alone, so a role that cannot log in as stagingprop's role
//! cannot pass. The check sits in each trigger's `WHEN` clause, so stagingprop's own writes
//! never call the trigger function at all.
//!
//! Only managed data is guarded: rows outside the table's `filter`, and for a table with a
//! column list the columns production owns, stay free to edit. Columns are read from the row
//! images (`to_jsonb`) rather than named, so a schema change applied to the table later does
//! not break the triggers.

pub mod install;

use crate::config::{ColumnList, GuardMode, TableName};
use crate::quote::{qualified, quote_ident, quote_literal};
use crate::state::{SCHEMA, production_edits};

/// The prefix of every guard trigger's name (`stagingprop_guard_insert`, ...).
pub const TRIGGER_PREFIX: &str = "stagingprop_guard_";

/// The prefix of every guard function's name in stagingprop's schema (`guard_<table oid>`).
pub const FUNCTION_PREFIX: &str = "guard_";

/// The settings a recorded key is printed under: those of sync's production session, so that
/// sync finds an edit by its key whatever the editing session's own settings.
const KEY_TEXT_SETTINGS: &str =
    "SET datestyle = 'ISO, YMD' SET intervalstyle = 'postgres' SET timezone = 'UTC'";

/// The dollar-quote tag around a guard function's body.
const BODY_TAG: &str = "$stagingprop_guard$";

/// A guarded table as production has it.
#[derive(Clone, Debug)]
pub struct GuardedTable {
    pub name: TableName,
    /// The table's oid on production: guard functions are named after it.
    pub oid: u32,
    /// `Record` or `Refuse` (an `Off` table has no triggers).
    pub mode: GuardMode,
    /// The primary key's (or replica identity index's) columns; empty for a table without one.
    pub key: Vec<String>,
    pub columns: ColumnList,
    pub filter: Option<String>,
}

/// Why a table cannot be guarded as configured.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "table {table}: its filter contains {BODY_TAG}, which the guard's trigger function uses \
         to quote its body; rewrite the filter without it"
    )]
    FilterHoldsTag { table: TableName },
}

/// The guard function of the table with oid `oid`, qualified.
pub fn function_name(oid: u32) -> String {
    qualified(SCHEMA, &format!("{FUNCTION_PREFIX}{oid}"))
}

/// The statements that install (or replace) `table`'s guard for sessions of `writer`, the role
/// stagingprop logs in to production as. Run them in one transaction, after dropping the
/// table's previous guard triggers.
pub fn install_statements(table: &GuardedTable, writer: &str) -> Result<Vec<String>, GuardError> {
    if table
        .filter
        .as_deref()
        .is_some_and(|f| f.contains(BODY_TAG))
    {
        return Err(GuardError::FilterHoldsTag {
            table: table.name.clone(),
        });
    }
    let target = qualified(&table.name.schema, &table.name.name);
    let function = function_name(table.oid);
    let not_stagingprop = format!("session_user <> {}", quote_literal(writer));
    let timing = match table.mode {
        GuardMode::Refuse => "BEFORE",
        GuardMode::Record | GuardMode::Off => "AFTER",
    };
    // A whole-table guard skips an UPDATE that changes nothing without calling the function;
    // for a column list the function looks at the managed columns itself.
    let update_when = if table.columns.is_all() {
        format!("{not_stagingprop} AND NOT record_image_eq(OLD, NEW)")
    } else {
        not_stagingprop.clone()
    };
    let trigger = |event: &str, level: &str, when: &str| {
        format!(
            "CREATE TRIGGER {name} {timing} {upper} ON {target} FOR EACH {level} WHEN ({when}) \
             EXECUTE FUNCTION {function}()",
            name = quote_ident(&format!("{TRIGGER_PREFIX}{event}")),
            upper = event.to_uppercase(),
        )
    };
    Ok(vec![
        function_sql(table, &function),
        trigger("insert", "ROW", &not_stagingprop),
        trigger("update", "ROW", &update_when),
        trigger("delete", "ROW", &not_stagingprop),
        trigger("truncate", "STATEMENT", &not_stagingprop),
    ])
}

/// The trigger function: decides whether the write touched managed data and, if it did,
/// refuses or records it. The managed columns' images (`to_jsonb`, less production's columns)
/// tell: an update whose images are equal touched only production's columns.
fn function_sql(table: &GuardedTable, function: &str) -> String {
    let display = quote_literal(&table.name.to_string());
    let out_of_scope = match &table.filter {
        None => String::new(),
        Some(filter) => format!(
            "IF NOT ((TG_OP <> 'INSERT' AND EXISTS (SELECT 1 FROM (SELECT OLD.*) AS t WHERE ({filter}))) \
             OR (TG_OP <> 'DELETE' AND EXISTS (SELECT 1 FROM (SELECT NEW.*) AS t WHERE ({filter})))) THEN
        IF TG_OP = 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END IF;"
        ),
    };
    let (action, settings) = match table.mode {
        GuardMode::Refuse => (refuse_action(&display), ""),
        // Only a recorded key needs the settings it is printed under.
        GuardMode::Record | GuardMode::Off => (record_action(table, &display), KEY_TEXT_SETTINGS),
    };
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER \
         SET search_path = pg_catalog, pg_temp {settings} AS {BODY_TAG}
#variable_conflict use_column
DECLARE
    old_image jsonb;
    new_image jsonb;
    changed text[] := '{{}}';
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        {action}
        RETURN NULL;
    END IF;
    {out_of_scope}
    IF TG_OP <> 'INSERT' THEN
        old_image := {old};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_image := {new};
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF old_image = new_image THEN
            RETURN NEW;
        END IF;
        changed := ARRAY(SELECT n.key FROM jsonb_each(new_image) AS n
                          WHERE n.value IS DISTINCT FROM old_image -> n.key ORDER BY 1);
    ELSE
        changed := ARRAY(SELECT jsonb_object_keys(coalesce(new_image, old_image)) ORDER BY 1);
    END IF;
    {action}
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
{BODY_TAG}",
        old = image(&table.columns, &table.key, "OLD"),
        new = image(&table.columns, &table.key, "NEW"),
    )
}

/// The image of `row` (`OLD` or `NEW`): its managed columns as JSON.
fn image(columns: &ColumnList, key: &[String], row: &str) -> String {
    let list = |names: &[String]| {
        let items: Vec<String> = names.iter().map(|n| quote_literal(n)).collect();
        format!("ARRAY[{}]::text[]", items.join(", "))
    };
    match columns {
        ColumnList::All => format!("to_jsonb({row})"),
        ColumnList::Except(names) => format!("to_jsonb({row}) - {}", list(names)),
        // Named ones only: a column added later is production's.
        ColumnList::Only(names) => {
            let mut managed = key.to_vec();
            managed.extend(names.iter().filter(|n| !key.contains(n)).cloned());
            format!(
                "(SELECT jsonb_object_agg(j.key, j.value) FROM jsonb_each(to_jsonb({row})) AS j \
                 WHERE j.key = ANY({}))",
                list(&managed)
            )
        }
    }
}

fn refuse_action(display: &str) -> String {
    format!(
        "RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege', \
            MESSAGE = format('table %s is managed from staging: stagingprop''s guard refuses this %s by role %s', {display}, lower(TG_OP), session_user), \
            DETAIL = CASE WHEN TG_OP = 'TRUNCATE' THEN 'Truncating would remove staging-managed rows.' \
                ELSE format('Managed columns it changes: %s. stagingprop carries staging''s version of these rows here, so a change made on production would be overwritten or lost.', array_to_string(changed, ', ')) END, \
            HINT = format('Make the change on staging. To let production edit the table, set guard = \"record\" (or \"off\") for %s in stagingprop''s config and run stagingprop init.', {display});"
    )
}

fn record_action(table: &GuardedTable, display: &str) -> String {
    let key = if table.key.is_empty() {
        "NULL".to_owned()
    } else {
        let of = |row: &str| {
            let parts: Vec<String> = table
                .key
                .iter()
                .map(|c| format!("{row}.{}::text", quote_ident(c)))
                .collect();
            format!("ARRAY[{}]", parts.join(", "))
        };
        format!(
            "CASE WHEN TG_OP = 'INSERT' THEN {} ELSE {} END",
            of("NEW"),
            of("OLD")
        )
    };
    format!(
        "INSERT INTO {edits} (table_name, operation, key, columns, before, after, role, application, xid) \
            VALUES ({display}, TG_OP, CASE WHEN TG_OP = 'TRUNCATE' THEN NULL ELSE {key} END, changed, \
            old_image, new_image, \
            session_user, current_setting('application_name'), txid_current());",
        edits = production_edits::qualified_name(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(mode: GuardMode, columns: ColumnList, filter: Option<&str>) -> GuardedTable {
        GuardedTable {
            name: TableName::new("public", "offer"),
            oid: 16_384,
            mode,
            key: vec!["offer_id".into()],
            columns,
            filter: filter.map(str::to_owned),
        }
    }

    #[test]
    fn stagingprop_role_is_passed_in_every_triggers_when_clause() {
        let statements =
            install_statements(&offer(GuardMode::Refuse, ColumnList::All, None), "sp'x").unwrap();
        let triggers: Vec<&String> = statements
            .iter()
            .filter(|s| s.starts_with("CREATE TRIGGER"))
            .collect();
        assert_eq!(triggers.len(), 4);
        for t in &triggers {
            assert!(t.contains("WHEN (session_user <> 'sp''x'"), "{t}");
            assert!(t.contains(" BEFORE "), "{t}");
        }
        assert!(triggers[1].contains("record_image_eq(OLD, NEW)"));
    }

    #[test]
    fn record_mode_fires_after_the_write_and_inserts_the_edit() {
        let statements =
            install_statements(&offer(GuardMode::Record, ColumnList::All, None), "sp").unwrap();
        assert!(statements[1].contains(" AFTER INSERT "));
        assert!(statements[0].contains("INSERT INTO \"stagingprop\".\"production_edits\""));
        assert!(statements[0].contains("ARRAY[OLD.\"offer_id\"::text]"));
        assert!(statements[0].contains("SECURITY DEFINER"));
    }

    #[test]
    fn a_column_list_limits_what_counts_as_managed_and_keeps_the_key() {
        let columns = ColumnList::Only(vec!["price".into()]);
        let statements =
            install_statements(&offer(GuardMode::Record, columns, None), "sp").unwrap();
        assert!(
            statements[0].contains("j.key = ANY(ARRAY['offer_id', 'price']::text[])"),
            "{}",
            statements[0]
        );
        // The update trigger cannot skip by whole-row image: unmanaged columns may differ.
        assert!(!statements[2].contains("record_image_eq"));
        let except = ColumnList::Except(vec!["note".into()]);
        let statements = install_statements(&offer(GuardMode::Refuse, except, None), "sp").unwrap();
        assert!(statements[0].contains("to_jsonb(OLD) - ARRAY['note']::text[]"));
        // Refusing records no key: the key's print settings are not needed.
        assert!(!statements[0].contains("datestyle"));
    }

    #[test]
    fn a_filter_is_checked_against_both_images() {
        let statements = install_statements(
            &offer(GuardMode::Refuse, ColumnList::All, Some("store_id = 1")),
            "sp",
        )
        .unwrap();
        assert!(
            statements[0].contains("(SELECT OLD.*) AS t WHERE (store_id = 1)")
                && statements[0].contains("(SELECT NEW.*) AS t WHERE (store_id = 1)")
        );
        let bad = offer(
            GuardMode::Refuse,
            ColumnList::All,
            Some("note <> $stagingprop_guard$x$stagingprop_guard$"),
        );
        assert!(matches!(
            install_statements(&bad, "sp"),
            Err(GuardError::FilterHoldsTag { .. })
        ));
    }
}
