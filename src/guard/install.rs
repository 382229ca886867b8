//! Putting the guard in place on production: what each managed table's guard should be, what is
//! there now, and the changes between them, each table's in one transaction (so a table is never
//! left half-guarded). A guard already as configured is left untouched, so `init` can be re-run.

use tokio_postgres::Client;

use super::{FUNCTION_PREFIX, GuardedTable, TRIGGER_PREFIX, install_statements};
use crate::config::{GuardMode, TableConfig, TableName};
use crate::quote::{qualified, quote_ident};
use crate::state::SCHEMA;

/// What `init` will change: found by [`plan`], done by [`apply`].
#[derive(Debug, Default)]
pub struct GuardPlan {
    /// The role stagingprop logs in to production as: the one the triggers let through.
    pub writer: String,
    /// Tables whose guard is (re)installed: the table, its mode, the statements.
    installs: Vec<(TableName, GuardMode, Vec<String>)>,
    /// Tables guarded as configured already.
    unchanged: Vec<(TableName, GuardMode)>,
    /// Tables whose guard triggers go (guard off, or no longer managed), qualified.
    removals: Vec<String>,
    /// Guard functions no table uses any more, qualified.
    stale_functions: Vec<String>,
}

/// One guard trigger as production has it.
struct Existing {
    table: String,
    oid: u32,
    trigger: String,
}

/// Reads production's guard triggers and functions and the guarded tables' keys. A table the
/// guard cannot be installed on adds a line to `problems` (nothing is changed then).
pub async fn plan(
    p: &Client,
    tables: &[TableConfig],
    problems: &mut Vec<String>,
) -> Result<GuardPlan, tokio_postgres::Error> {
    let writer: String = p.query_one("SELECT session_user::text", &[]).await?.get(0);
    let existing: Vec<Existing> = p
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname), c.oid, t.tgname::text
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND starts_with(t.tgname, $1)",
            &[&TRIGGER_PREFIX],
        )
        .await?
        .iter()
        .map(|r| Existing {
            table: r.get(0),
            oid: r.get(1),
            trigger: r.get(2),
        })
        .collect();
    let functions: Vec<(String, Option<String>)> = p
        .query(
            "SELECT p.proname::text, obj_description(p.oid, 'pg_proc')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND starts_with(p.proname, $2)",
            &[&SCHEMA, &FUNCTION_PREFIX],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();

    let mut plan = GuardPlan {
        writer: writer.clone(),
        ..GuardPlan::default()
    };
    let mut kept_oids = Vec::new();
    for table in tables.iter().filter(|t| t.guard != GuardMode::Off) {
        let qualified_name = qualified(&table.name.schema, &table.name.name);
        let (guarded, statements, fingerprint) = match wanted(p, table, &writer).await? {
            // init's table checks report the missing table.
            None => continue,
            Some(Err(problem)) => {
                problems.push(problem);
                continue;
            }
            Some(Ok(wanted)) => wanted,
        };
        let oid = guarded.oid;
        kept_oids.push(oid);
        let function = format!("{FUNCTION_PREFIX}{oid}");
        let same_function = functions
            .iter()
            .any(|(name, comment)| *name == function && comment.as_deref() == Some(&fingerprint));
        let triggers_there = existing.iter().filter(|e| e.oid == oid).count();
        if same_function && triggers_there == 4 {
            plan.unchanged.push((table.name.clone(), table.guard));
        } else {
            let mut statements = statements;
            // A guard installed before (another mode, another version) goes in the same
            // transaction.
            let drops = existing.iter().filter(|e| e.oid == oid).map(|e| {
                format!(
                    "DROP TRIGGER {} ON {qualified_name}",
                    quote_ident(&e.trigger)
                )
            });
            statements.splice(0..0, drops);
            plan.installs
                .push((table.name.clone(), table.guard, statements));
        }
    }
    let mut removals: Vec<String> = existing
        .iter()
        .filter(|e| !kept_oids.contains(&e.oid))
        .map(|e| e.table.clone())
        .collect();
    removals.sort();
    removals.dedup();
    plan.removals = removals;
    plan.stale_functions = functions
        .iter()
        .filter(|(name, _)| {
            name.strip_prefix(FUNCTION_PREFIX)
                .and_then(|oid| oid.parse::<u32>().ok())
                .is_none_or(|oid| !kept_oids.contains(&oid))
        })
        .map(|(name, _)| qualified(SCHEMA, name))
        .collect();
    Ok(plan)
}

/// `table`'s guard as production should have it: the guarded table, the statements that
/// install it (the last one the function's comment) and the fingerprint that comment carries,
/// by which a re-run tells the guard is current; or the problem that keeps it from being
/// installed; `None` when production lacks the table.
async fn wanted(
    p: &Client,
    table: &TableConfig,
    writer: &str,
) -> Result<Option<Result<(GuardedTable, Vec<String>, String), String>>, tokio_postgres::Error> {
    let qualified_name = qualified(&table.name.schema, &table.name.name);
    let Some(row) = p
        .query_opt(
            "SELECT c.oid, pg_has_role(c.relowner, 'USAGE'),
                    (SELECT array_agg(a.attname::text ORDER BY k.n)
                       FROM (SELECT i.indkey FROM pg_index i
                              WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)
                              ORDER BY i.indisprimary DESC LIMIT 1) AS ix,
                            unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n)
                       JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum)
               FROM pg_class c WHERE c.oid = to_regclass($1)",
            &[&qualified_name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    if !row.get::<_, bool>(1) {
        return Ok(Some(Err(format!(
            "production: guard = \"{}\" for {}: role {} does not own the table, so it may not install the guard's triggers; as a superuser run: ALTER TABLE {qualified_name} OWNER TO {} (or grant {} the owner's role), or set guard = \"off\" for it",
            table.guard.as_str(),
            table.name,
            quote_ident(writer),
            quote_ident(writer),
            quote_ident(writer),
        ))));
    }
    let guarded = GuardedTable {
        name: table.name.clone(),
        oid,
        mode: table.guard,
        key: row.get::<_, Option<Vec<String>>>(2).unwrap_or_default(),
        columns: table.columns.clone(),
        filter: table.filter.clone(),
    };
    let mut statements = match install_statements(&guarded, writer) {
        Ok(statements) => statements,
        Err(e) => return Ok(Some(Err(format!("production: {e}")))),
    };
    let fingerprint = fingerprint(&guarded, &statements);
    statements.push(format!(
        "COMMENT ON FUNCTION {}() IS {}",
        super::function_name(oid),
        crate::quote::quote_literal(&fingerprint)
    ));
    Ok(Some(Ok((guarded, statements, fingerprint))))
}

/// Installs `table`'s guard, as `init` would, in the caller's open transaction (sync, for a
/// table it created or whose key changed): any guard triggers the table has go first.
/// The error names what keeps the guard from being installed.
pub async fn install_now(p: &Client, table: &TableConfig) -> Result<(), String> {
    let failed = |e: tokio_postgres::Error| format!("installing the guard of {}: {e}", table.name);
    let writer: String = p
        .query_one("SELECT session_user::text", &[])
        .await
        .map_err(failed)?
        .get(0);
    let (_, statements, _) = match wanted(p, table, &writer).await.map_err(failed)? {
        None => return Err(format!("{} is not on production to guard", table.name)),
        Some(wanted) => wanted?,
    };
    let target = qualified(&table.name.schema, &table.name.name);
    let triggers = p
        .query(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND tgparentid = 0
                AND starts_with(tgname, $2)",
            &[&target, &TRIGGER_PREFIX],
        )
        .await
        .map_err(failed)?;
    for trigger in &triggers {
        let name: String = trigger.get(0);
        p.batch_execute(&format!("DROP TRIGGER {} ON {target}", quote_ident(&name)))
            .await
            .map_err(failed)?;
    }
    for statement in &statements {
        p.batch_execute(statement).await.map_err(failed)?;
    }
    Ok(())
}

/// Makes the changes `plan` found; returns one line per table for init's report.
pub async fn apply(p: &Client, plan: &GuardPlan) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut lines = Vec::new();
    for (table, mode) in &plan.unchanged {
        lines.push(format!(
            "production: guard = \"{}\" on {table} (as configured already)",
            mode.as_str()
        ));
    }
    for (table, mode, statements) in &plan.installs {
        in_transaction(p, statements).await?;
        lines.push(format!(
            "production: guard = \"{}\" installed on {table}: {}",
            mode.as_str(),
            match mode {
                GuardMode::Refuse => "writes to its managed rows by other roles now fail",
                _ => "writes to its managed rows by other roles are recorded in stagingprop.production_edits",
            }
        ));
    }
    for target in &plan.removals {
        let triggers: Vec<String> = p
            .query(
                "SELECT tgname::text FROM pg_trigger
                  WHERE tgrelid = to_regclass($1) AND NOT tgisinternal AND tgparentid = 0
                    AND starts_with(tgname, $2)",
                &[target, &TRIGGER_PREFIX],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let drops: Vec<String> = triggers
            .iter()
            .map(|t| format!("DROP TRIGGER {} ON {target}", quote_ident(t)))
            .collect();
        in_transaction(p, &drops).await?;
        lines.push(format!(
            "production: guard removed from {target} (guard = \"off\" or no longer managed)"
        ));
    }
    for function in &plan.stale_functions {
        p.batch_execute(&format!("DROP FUNCTION IF EXISTS {function}()"))
            .await?;
    }
    if !plan.installs.is_empty() || !plan.unchanged.is_empty() {
        lines.push(format!(
            "production: the guard lets through only sessions logged in as role {}: no application or person should log in as it",
            quote_ident(&plan.writer)
        ));
    }
    Ok(lines)
}

async fn in_transaction(p: &Client, statements: &[String]) -> Result<(), tokio_postgres::Error> {
    let mut sql = String::from("BEGIN;\n");
    for statement in statements {
        sql.push_str(statement);
        sql.push_str(";\n");
    }
    sql.push_str("COMMIT;");
    let result = p.batch_execute(&sql).await;
    if result.is_err() {
        // The simple-query batch already ended the failed transaction; this only makes sure.
        let _ = p.batch_execute("ROLLBACK").await;
    }
    result
}

/// The guard function's comment: what it guards, and a digest of its statements by which a
/// re-run tells that the guard is current.
fn fingerprint(table: &GuardedTable, statements: &[String]) -> String {
    let mut all = String::new();
    for s in statements {
        all.push_str(s);
        all.push('\n');
    }
    format!(
        "stagingprop guard ({}) of {}, version {:08x}",
        table.mode.as_str(),
        table.name,
        crc32c::crc32c(all.as_bytes())
    )
}
