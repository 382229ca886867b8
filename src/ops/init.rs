//! `stagingprop init`: checks that staging can feed logical replication for the managed tables
//! and that production can receive them, then creates what is missing (the publication, the
//! slot, stagingprop's schema on production). Every failed check is one line saying what to
//! change; nothing is created unless every check passed. Running it again changes nothing.

use tokio_postgres::Client;

use super::{OpsError, connect, query_error, state_error};
use crate::catalog::{self, publication};
use crate::config::{Config, TableName};
use crate::ddl;
use crate::guard;
use crate::pg::connect::Endpoint;
use crate::quote::{qualified, quote_ident};
use crate::state::{self, SCHEMA as STATE_SCHEMA};

#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Create the slot if missing. Off when `copy` will create it to export its snapshot.
    pub create_slot: bool,
    /// Change an existing publication's row filters and column lists to the config's (else a
    /// difference is reported and nothing is changed).
    pub apply_changes: bool,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            create_slot: true,
            apply_changes: false,
        }
    }
}

/// What init found and did, one line each, for the operator.
#[derive(Debug, Default)]
pub struct InitReport {
    pub lines: Vec<String>,
}

struct StagingFacts {
    wal_level: String,
    max_slots: i32,
    used_slots: i32,
    max_wal_senders: i32,
    may_replicate: bool,
    user: String,
    database: String,
}

pub async fn init(config: &Config, options: &InitOptions) -> Result<InitReport, OpsError> {
    let staging = Endpoint::from_db_config(&config.staging)?;
    let production = Endpoint::from_db_config(&config.production)?;
    let s = connect(&staging).await?;
    let p = connect(&production).await?;
    let config = &catalog::expand_patterns(config, &[&s])
        .await
        .map_err(query_error(
            &staging,
            "listing the tables of [[table_patterns]]",
        ))?;
    let mut report = InitReport::default();
    let mut problems = Vec::new();

    let facts = staging_facts(&s, &staging).await?;
    if facts.wal_level != "logical" {
        problems.push(format!(
            "staging: wal_level is '{}'; set wal_level = logical in postgresql.conf and restart PostgreSQL",
            facts.wal_level
        ));
    }
    if facts.max_wal_senders < 1 {
        problems.push(
            "staging: max_wal_senders is 0; set it to at least 2 and restart PostgreSQL".into(),
        );
    }
    if !facts.may_replicate {
        problems.push(format!(
            "staging: role {user} may not replicate; as a superuser run: ALTER ROLE {user} REPLICATION",
            user = quote_ident(&facts.user)
        ));
    }

    if config.sync.failover {
        check_failover(&s, &staging, &config.sync.slot, &mut problems).await?;
    }

    let slot = &config.sync.slot;
    let slot_row = s
        .query_opt(
            "SELECT plugin, slot_type, database, wal_status FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(query_error(&staging, "reading pg_replication_slots"))?;
    let slot_exists = match &slot_row {
        None => {
            if options.create_slot && facts.used_slots >= facts.max_slots {
                problems.push(format!(
                    "staging: all {} replication slots are in use (max_replication_slots = {}); raise max_replication_slots and restart, or drop an unused slot",
                    facts.used_slots, facts.max_slots
                ));
            }
            false
        }
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let slot_type: Option<String> = row.get(1);
            let database: Option<String> = row.get(2);
            let wal_status: Option<String> = row.get(3);
            if slot_type.as_deref() != Some("logical") || plugin.as_deref() != Some("pgoutput") {
                problems.push(format!(
                    "staging: slot {slot} exists but is a {} slot with plugin {}; choose another [sync] slot name or drop that slot",
                    slot_type.unwrap_or_default(),
                    plugin.unwrap_or_else(|| "none".into())
                ));
            } else if database.as_deref() != Some(facts.database.as_str()) {
                problems.push(format!(
                    "staging: slot {slot} belongs to database {}, not {}; choose another [sync] slot name",
                    database.unwrap_or_default(),
                    facts.database
                ));
            } else if wal_status.as_deref() == Some("lost") {
                problems.push(format!(
                    "staging: slot {slot} was invalidated (the WAL it needed was removed); changes since its last position are lost: drop it with pg_drop_replication_slot('{slot}') and re-seed production with `stagingprop copy`"
                ));
            }
            true
        }
    };

    for table in &config.tables {
        let files = table.files.is_some();
        check_staging_table(&s, &staging, &table.name, files, &mut problems).await?;
        check_production_table(&p, &production, &table.name, &mut problems).await?;
    }
    if let Some(spool) = &config.spool
        && let Err(e) = check_spool_dir(&spool.dir)
    {
        problems.push(format!(
            "spool: cannot write to {} ({e}); create it, writable by the user sync runs as, on a local disk with room for spool.max_bytes",
            spool.dir.display()
        ));
    }

    let entries = publication_entries(&s, &staging, config, &mut problems).await?;

    let publication = &config.sync.publication;
    let pub_row = s
        .query_opt(
            "SELECT puballtables, pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(query_error(&staging, "reading pg_publication"))?;
    let mut changes = Vec::new();
    if let Some(row) = &pub_row {
        let all_tables: bool = row.get(0);
        if all_tables {
            problems.push(format!(
                "staging: publication {publication} is FOR ALL TABLES; stagingprop needs one listing the managed tables: choose another [sync] publication name"
            ));
        }
        let current = publication::published(&s, publication)
            .await
            .map_err(query_error(&staging, "reading the publication"))?;
        for entry in entries.iter().flatten() {
            if let Some(now) = current.iter().find(|c| c.table == entry.wanted.table) {
                changes.extend(publication::differences(now, &entry.wanted));
            }
        }
        if !changes.is_empty() && !options.apply_changes {
            problems.push(format!(
                "staging: publication {publication} differs from the config:\n    {}\n  run `stagingprop init --apply-changes` to change it. Rows already on production that a narrower filter leaves out stay there (verify counts them as outside the scope); re-seed a table with `stagingprop copy --tables NAME --truncate` to remove them",
                changes.join("\n    ")
            ));
        }
    }

    let can_create_schema: bool = p
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) OR has_database_privilege(current_database(), 'CREATE')",
            &[&STATE_SCHEMA],
        )
        .await
        .map_err(query_error(&production, "checking privileges"))?
        .get(0);
    if !can_create_schema {
        problems.push(format!(
            "production: the role may not create schema {STATE_SCHEMA}; as the database owner run: GRANT CREATE ON DATABASE {} TO {}",
            quote_ident(&production.dbname()),
            quote_ident(&production.user())
        ));
    }

    let guard_plan = guard::install::plan(&p, &config.tables, &mut problems)
        .await
        .map_err(query_error(&production, "reading the guard's triggers"))?;

    if !problems.is_empty() {
        return Err(OpsError::ChecksFailed { problems });
    }
    report.lines.push(format!(
        "staging: wal_level = logical, {} of {} replication slots in use, role {} may replicate",
        facts.used_slots, facts.max_slots, facts.user
    ));
    report.lines.push(format!(
        "checked {} managed table(s) on staging (key or replica identity) and production (present)",
        config.tables.len()
    ));
    report
        .lines
        .extend(production_speed_notes(&p, &production).await?);

    let specs: Vec<String> = entries
        .into_iter()
        .zip(&config.tables)
        .map(|(entry, table)| match entry {
            Some(entry) => entry.spec,
            None => qualified(&table.name.schema, &table.name.name),
        })
        .collect();
    let added = sync_publication(
        &s,
        &staging,
        config,
        &specs,
        pub_row.is_some(),
        &changes,
        &mut report,
    )
    .await?;
    capture_schema_changes(&s, &staging, config, &mut report).await?;

    if slot_exists {
        report
            .lines
            .push(format!("staging: slot {slot} exists (kept as it is)"));
    } else if options.create_slot {
        let create = if config.sync.failover {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
        } else {
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        let lsn: String = s
            .query_one(create, &[slot])
            .await
            .map_err(query_error(&staging, "creating the replication slot"))?
            .get(0);
        report.lines.push(format!(
            "staging: created slot {slot} at {lsn}; staging now keeps WAL for it until sync confirms changes"
        ));
    } else {
        report.lines.push(format!(
            "staging: slot {slot} not created (copy will create it)"
        ));
    }

    state::ensure(&p).await.map_err(state_error(&production))?;
    report.lines.push(format!(
        "production: schema {STATE_SCHEMA} is ready (layout version {})",
        state::LAYOUT_VERSION
    ));
    register_seeding(&p, &production, config, &added, &mut report).await?;
    report.lines.extend(
        guard::install::apply(&p, &guard_plan)
            .await
            .map_err(query_error(&production, "installing the guard"))?,
    );
    Ok(report)
}

/// Tables added to the publication of a target sync already applies to are seeded online: the
/// seeding is registered on production now, so that sync, started with the new config, leaves
/// their changes that find no row to the seed (`resync`) until it is done.
async fn register_seeding(
    p: &Client,
    production: &Endpoint,
    config: &Config,
    added: &[TableName],
    report: &mut InitReport,
) -> Result<(), OpsError> {
    let slot = &config.sync.slot;
    if added.is_empty()
        || state::progress::read(p, slot)
            .await
            .map_err(state_error(production))?
            .is_none()
    {
        return Ok(());
    }
    let names: Vec<String> = added.iter().map(|t| t.to_string()).collect();
    let id = state::repairs::begin(p, slot, &names, None, true)
        .await
        .map_err(state_error(production))?;
    let tables = names.join(" --table ");
    report.lines.push(format!(
        "production: {} added to a running target: restart sync with this config, then seed \
         them online with `stagingprop resync --table {tables}` (repair {id}); until it is \
         done their changes that find no row are left to it",
        names.join(", ")
    ));
    Ok(())
}

/// Installs (or refreshes) staging's capture of schema changes, or removes it when `[ddl] mode`
/// is `off`. It needs a superuser: without one, init says what is lost and goes on.
async fn capture_schema_changes(
    s: &Client,
    staging: &Endpoint,
    config: &Config,
    report: &mut InitReport,
) -> Result<(), OpsError> {
    let publication = &config.sync.publication;
    let superuser: bool = s
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(query_error(staging, "reading the role"))?
        .get(0);
    if !config.ddl.mode.captures() {
        if superuser {
            ddl::capture::remove(s, publication)
                .await
                .map_err(query_error(staging, "removing the schema-change capture"))?;
        }
        report.lines.push(
            "staging: schema changes are not captured ([ddl] mode = \"off\"): a change production lacks stops sync at the first row that needs it".into(),
        );
        return Ok(());
    }
    if !superuser {
        report.lines.push(format!(
            "staging: schema changes are NOT captured: the event trigger that captures them needs \
             a superuser, and {} is not one. Without it sync follows only what staging's Relation \
             messages show (a column production lacks, or cannot hold, stops it with exit 6 until \
             production is altered by hand). Run `stagingprop init` once as a superuser to install it",
            staging.describe()
        ));
        return Ok(());
    }
    ddl::capture::install(s, publication, &config.table_patterns)
        .await
        .map_err(query_error(staging, "installing the schema-change capture"))?;
    report.lines.push(format!(
        "staging: schema changes to the managed tables are captured into the stream \
         ([ddl] mode = \"{}\"; event trigger {} on the publication's tables)",
        config.ddl.mode.as_str(),
        format_args!("stagingprop_ddl_{publication}")
    ));
    Ok(())
}

/// What the publication should hold for a partial table, as checked by the server.
struct PartialEntry {
    /// The entry as `CREATE PUBLICATION` takes it.
    spec: String,
    /// The entry as the server prints it back.
    wanted: publication::PublishedTable,
}

/// For each managed table, its partial entry (`None` for a whole table), after checking what
/// PostgreSQL requires: version 15 or later, a filter and column list the server accepts, a
/// filter over replica-identity columns only.
async fn publication_entries(
    s: &Client,
    staging: &Endpoint,
    config: &Config,
    problems: &mut Vec<String>,
) -> Result<Vec<Option<PartialEntry>>, OpsError> {
    let mut entries = Vec::with_capacity(config.tables.len());
    let partial = config.tables.iter().any(|t| t.is_partial());
    let version = if partial {
        publication::server_version(s)
            .await
            .map_err(query_error(staging, "reading server_version_num"))?
    } else {
        0
    };
    for table in &config.tables {
        if !table.is_partial() {
            entries.push(None);
            continue;
        }
        if version < publication::PARTIAL_TABLES_VERSION {
            problems.push(format!(
                "staging: {} has a row filter or column list, which needs PostgreSQL 15 or later on staging (it runs {version}): upgrade staging or manage the whole table",
                table.name
            ));
            entries.push(None);
            continue;
        }
        let Some(meta) = catalog::load_table(s, &table.name)
            .await
            .map_err(query_error(staging, "reading table definitions"))?
        else {
            entries.push(None); // named by check_staging_table
            continue;
        };
        let probed = publication::probe(s, table, &meta)
            .await
            .map_err(query_error(staging, "checking the row filter"))?;
        let probed = match probed {
            Ok(probed) => probed,
            Err(problem) => {
                problems.push(problem);
                entries.push(None);
                continue;
            }
        };
        let identity = publication::replica_identity(s, &table.name)
            .await
            .map_err(query_error(staging, "reading the replica identity"))?;
        problems.extend(publication::identity_problems(
            table,
            identity.as_deref(),
            &probed.filter_columns,
        ));
        let spec =
            publication::table_spec(table, &meta).map_err(|problem| OpsError::ChecksFailed {
                problems: vec![problem],
            })?;
        entries.push(Some(PartialEntry {
            spec,
            wanted: probed.published,
        }));
    }
    Ok(entries)
}

/// The spool directory exists (or can be made) and takes a durable write.
/// `[sync] failover`: the server must know failover slots (17+), hold back logical decoding for
/// a standby (`synchronized_standby_slots`, or a promoted standby could lack what production
/// already has), and an existing slot must be one.
async fn check_failover(
    s: &tokio_postgres::Client,
    staging: &Endpoint,
    slot: &str,
    problems: &mut Vec<String>,
) -> Result<(), OpsError> {
    let row = s
        .query_one(
            "SELECT current_setting('server_version_num')::int,
                    coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(query_error(staging, "reading the failover settings"))?;
    let version: i32 = row.get(0);
    let standby_slots: String = row.get(1);
    if version < 170000 {
        problems.push(format!(
            "staging: [sync] failover needs PostgreSQL 17 or later (staging is {}); set failover = false or upgrade staging",
            version / 10000
        ));
        return Ok(());
    }
    if standby_slots.trim().is_empty() {
        problems.push(
            "staging: [sync] failover is on but synchronized_standby_slots is empty, so sync could apply changes a standby has not received and a promoted standby would lack them; set synchronized_standby_slots to the standby's physical slot (ALTER SYSTEM SET synchronized_standby_slots = 'standby1'; SELECT pg_reload_conf())".into(),
        );
    }
    let failover: Option<bool> = s
        .query_opt(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_error(staging, "reading pg_replication_slots"))?
        .map(|row| row.get(0));
    if failover == Some(false) {
        problems.push(format!(
            "staging: slot {slot} exists but is not a failover slot; on a replication connection run ALTER_REPLICATION_SLOT {} (FAILOVER true), or drop it and run init again",
            quote_ident(slot)
        ));
    }
    Ok(())
}

fn check_spool_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(".init-probe");
    let mut file = std::fs::File::create(&probe)?;
    file.write_all(b"stagingprop")?;
    file.sync_all()?;
    std::fs::remove_file(&probe)
}

async fn staging_facts(s: &Client, staging: &Endpoint) -> Result<StagingFacts, OpsError> {
    let row = s
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_user::text,
                    current_database()::text",
            &[],
        )
        .await
        .map_err(query_error(staging, "reading server settings"))?;
    Ok(StagingFacts {
        wal_level: row.get(0),
        max_slots: row.get(1),
        used_slots: row.get(2),
        max_wal_senders: row.get(3),
        may_replicate: row.get::<_, Option<bool>>(4).unwrap_or(false),
        user: row.get(5),
        database: row.get(6),
    })
}

/// `publishes_files`: a managed-file table, whose UPDATEs and DELETEs must carry the whole old
/// row (the file's path and content).
async fn check_staging_table(
    s: &Client,
    staging: &Endpoint,
    table: &TableName,
    publishes_files: bool,
    problems: &mut Vec<String>,
) -> Result<(), OpsError> {
    let row = s
        .query_opt(
            "SELECT c.relkind::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_error(staging, "reading pg_class"))?;
    let Some(row) = row else {
        problems.push(format!(
            "staging: table {table} does not exist; create it or remove it from [[tables]]"
        ));
        return Ok(());
    };
    let relkind: String = row.get(0);
    let identity: String = row.get(1);
    let has_pk: bool = row.get(2);
    if publishes_files && identity != "f" {
        problems.push(format!(
            "staging: table {table} publishes files, so its UPDATEs and DELETEs must carry the \
             whole old row (which file to remove, what a moved file holds); run ALTER TABLE {} \
             REPLICA IDENTITY FULL",
            qualified(&table.schema, &table.name)
        ));
    }
    if relkind != "r" && relkind != "p" {
        problems.push(format!(
            "staging: {table} is not a table (relkind {relkind}); only tables can be replicated"
        ));
    } else if identity == "n" || (identity == "d" && !has_pk) {
        problems.push(format!(
            "staging: table {table} has no primary key; add one, or run ALTER TABLE {} REPLICA IDENTITY FULL",
            qualified(&table.schema, &table.name)
        ));
    }
    Ok(())
}

async fn check_production_table(
    p: &Client,
    production: &Endpoint,
    table: &TableName,
    problems: &mut Vec<String>,
) -> Result<(), OpsError> {
    let exists: bool = p
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p'))",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(query_error(production, "reading pg_class"))?
        .get(0);
    if !exists {
        problems.push(format!(
            "production: table {table} does not exist; create it with the same columns as on staging (e.g. pg_dump --schema-only --table={table} from staging)"
        ));
    }
    Ok(())
}

/// Every action is published; a partitioned table's changes as the partitioned table's (its
/// partitions are not managed tables of their own, and ones attached later follow it).
const PUBLICATION_OPTIONS: &str =
    "publish = 'insert, update, delete, truncate', publish_via_partition_root = true";

/// Creates the publication, or brings its table list, row filters, column lists and published
/// actions in line with the config (`changes`: the filter and column-list differences found,
/// already allowed by `--apply-changes`). The tables it added to an existing publication.
async fn sync_publication(
    s: &Client,
    staging: &Endpoint,
    config: &Config,
    specs: &[String],
    exists: bool,
    changes: &[String],
    report: &mut InitReport,
) -> Result<Vec<TableName>, OpsError> {
    let name = &config.sync.publication;
    let wanted: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
    if !exists {
        s.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH ({PUBLICATION_OPTIONS})",
            quote_ident(name),
            specs.join(", ")
        ))
        .await
        .map_err(query_error(staging, "creating the publication"))?;
        report.lines.push(format!(
            "staging: created publication {name} for {} table(s){}",
            wanted.len(),
            partial_note(config)
        ));
        return Ok(Vec::new());
    }
    let rows = s
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[name],
        )
        .await
        .map_err(query_error(staging, "reading pg_publication_tables"))?;
    let present: Vec<TableName> = rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let missing: Vec<&TableName> = wanted
        .iter()
        .copied()
        .filter(|t| !present.contains(t))
        .collect();
    let extra: Vec<&TableName> = present.iter().filter(|t| !wanted.contains(t)).collect();
    let mut statements = vec![format!(
        "ALTER PUBLICATION {} SET ({PUBLICATION_OPTIONS})",
        quote_ident(name)
    )];
    // SET TABLE replaces the whole list (with filters and column lists) in one statement.
    if !missing.is_empty() || !extra.is_empty() || !changes.is_empty() {
        statements.push(format!(
            "ALTER PUBLICATION {} SET TABLE {}",
            quote_ident(name),
            specs.join(", ")
        ));
    }
    s.batch_execute(&statements.join("; "))
        .await
        .map_err(query_error(staging, "updating the publication"))?;
    if missing.is_empty() && extra.is_empty() && changes.is_empty() {
        report.lines.push(format!(
            "staging: publication {name} already lists the {} managed table(s){}",
            wanted.len(),
            partial_note(config)
        ));
        return Ok(Vec::new());
    }
    let names = |ts: &[&TableName]| {
        if ts.is_empty() {
            return "none".to_owned();
        }
        ts.iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.lines.push(format!(
        "staging: publication {name} updated (added: {}; removed: {}; changed: {})",
        names(&missing),
        names(&extra),
        if changes.is_empty() {
            "none".to_owned()
        } else {
            changes.join("; ")
        }
    ));
    if !extra.is_empty() {
        report.lines.push(format!(
            "staging: sync no longer applies {}; their rows stay on production as they are",
            names(&extra)
        ));
    }
    Ok(missing.into_iter().cloned().collect())
}

/// ", 2 of them in part (row filter or column list)", or nothing.
/// Production settings that cost copy or sync speed, each with what to change (not problems:
/// everything works without them).
async fn production_speed_notes(
    p: &Client,
    production: &Endpoint,
) -> Result<Vec<String>, OpsError> {
    let mut notes = Vec::new();
    if p.batch_execute("SET session_replication_role = replica; RESET session_replication_role")
        .await
        .is_err()
    {
        notes.push(format!(
            "production (speed): role {} may not set session_replication_role, so production checks every foreign key as rows arrive: copy loads a table only after its parent tables are complete, and sync orders each batch for the checks. For full speed run stagingprop as a superuser on production, as PostgreSQL's own apply worker runs",
            quote_ident(&production.user())
        ));
    }
    let max_prepared: i32 = p
        .query_one(
            "SELECT current_setting('max_prepared_transactions')::int",
            &[],
        )
        .await
        .map_err(query_error(production, "reading max_prepared_transactions"))?
        .get(0);
    if max_prepared < 2 {
        notes.push(format!(
            "production (speed): max_prepared_transactions = {max_prepared}, so `copy --atomic` (and --truncate of tables with rows) loads each group of linked tables with one worker; empty tables load with every worker regardless. Set it to at least copy's --jobs (a restart) if you use those"
        ));
    }
    Ok(notes)
}

fn partial_note(config: &Config) -> String {
    match config.tables.iter().filter(|t| t.is_partial()).count() {
        0 => String::new(),
        n => format!(", {n} of them in part (row filter or column list)"),
    }
}
