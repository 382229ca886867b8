//! The `stagingprop` command line: parses arguments, loads the config, runs one command and turns
//! its outcome into a message and a documented exit code (docs/exit-codes.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use stagingprop::config::{Config, DbConfig, TableName};
use stagingprop::copy::{CopyError, CopyOptions, Side};
use stagingprop::ops::OpsError;
use stagingprop::ops::demo::{DemoOptions, demo};
use stagingprop::ops::discover::{DiscoverOptions, discover};
use stagingprop::ops::init::{InitOptions, init};
use stagingprop::ops::status::{Thresholds, render, status};
use stagingprop::ops::tail::{TailOptions, tail};
use stagingprop::ops::verify::repair::{RepairOptions, render as render_repair, repair};
use stagingprop::ops::verify::{VerifyOptions, render as render_diffs, verify};
use stagingprop::pg::connect::{Endpoint, EndpointError};
use stagingprop::state::quarantine::Selection;
use stagingprop::sync::{self, ReplayOptions, ReplayTo, StopAt, SyncError, SyncOptions};

/// Exit codes, documented in docs/exit-codes.md.
mod exit {
    pub const FAILED: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const CHECKS: u8 = 4;
    pub const REPLICATION: u8 = 5;
    pub const SCHEMA: u8 = 6;
    pub const CONFLICT: u8 = 7;
    pub const UNHEALTHY: u8 = 8;
    pub const DIFFERENT: u8 = 9;
    pub const SPOOL: u8 = 10;
}

#[derive(Parser, Debug)]
#[command(
    name = "stagingprop",
    version,
    about = "Carries committed changes of staging-managed tables from a staging PostgreSQL \
             database to production, from staging's write-ahead log (logical replication).",
    after_help = "Passwords come from password_env or password_file in the config, never from \
                  the command line. Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "stagingprop.toml",
        env = "STAGINGPROP_CONFIG"
    )]
    config: PathBuf,
    /// Work on this named scope ([scopes.NAME] in the config): its publication, slot and row
    /// filters instead of the table-level ones.
    #[arg(long, global = true, value_name = "NAME")]
    scope: Option<String>,
    /// Serve Prometheus metrics on this address (sync and copy); 127.0.0.1:9187 when given
    /// without a value. Off by default.
    #[arg(long, global = true, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = stagingprop::ops::metrics::DEFAULT_LISTEN)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SideArg {
    Staging,
    Production,
}

impl From<SideArg> for Side {
    fn from(side: SideArg) -> Side {
        match side {
            SideArg::Staging => Side::Staging,
            SideArg::Production => Side::Production,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// Which quarantined changes a command takes: exactly one of --id, --table, --all.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct QuarantineSelection {
    /// One change, by the id `quarantine list` shows.
    #[arg(long)]
    id: Option<i64>,
    /// Every change of one managed table (schema.table).
    #[arg(long)]
    table: Option<TableName>,
    /// Every change.
    #[arg(long)]
    all: bool,
}

impl QuarantineSelection {
    fn selection(&self) -> Selection {
        match (&self.id, &self.table) {
            (Some(id), _) => Selection::Id(*id),
            (None, Some(table)) => Selection::Table(table.to_string()),
            (None, None) => Selection::All,
        }
    }
}

#[derive(Subcommand, Debug)]
enum QuarantineAction {
    /// List the quarantined changes, oldest first.
    List {
        /// Only this table's (schema.table).
        #[arg(long)]
        table: Option<TableName>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Apply quarantined changes now, in staging's order, under each table's conflict policy;
    /// each leaves the quarantine in the transaction that applies it. A change that still
    /// conflicts stays with the new reason (exit 7).
    Retry {
        #[command(flatten)]
        which: QuarantineSelection,
    },
    /// Delete quarantined changes without applying them.
    Discard {
        #[command(flatten)]
        which: QuarantineSelection,
    },
    /// Decide a change parked at a production edit (on_production_edit = "park"), with every
    /// later parked change of the same row, in one production transaction: `--take staging`
    /// applies staging's changes over production's edit, `--take production` keeps
    /// production's row and drops them, `--take merged` applies staging's and then sets the
    /// `--set` columns.
    Resolve {
        /// The parked change, by the id `quarantine list` shows (the row's oldest).
        #[arg(long)]
        id: i64,
        #[arg(long, value_enum)]
        take: TakeSide,
        /// With `--take merged`: COLUMN=VALUE (the value as PostgreSQL reads it), repeatable.
        #[arg(long = "set", value_name = "COLUMN=VALUE")]
        set: Vec<String>,
        /// With `--take merged`: a column to set to NULL, repeatable.
        #[arg(long = "set-null", value_name = "COLUMN")]
        set_null: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum TakeSide {
    Staging,
    Production,
    Merged,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Try the whole product on this machine: two throwaway clusters, a sample catalogue, copy,
    /// live sync under a small workload, verify. Needs only the PostgreSQL server binaries.
    Demo {
        /// How long the live workload runs, in seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
    /// Read staging's catalog and write a commented config for it: tables parents first, what
    /// to do about tables without a primary key, references and file stores suggested. Needs no
    /// config file.
    Discover {
        /// Staging: a libpq URL without a password.
        #[arg(long, value_name = "URL")]
        staging: String,
        /// An environment variable holding staging's password.
        #[arg(long, value_name = "VAR")]
        staging_password_env: Option<String>,
        /// A file holding staging's password.
        #[arg(long, value_name = "PATH", conflicts_with = "staging_password_env")]
        staging_password_file: Option<PathBuf>,
        /// Production, written into the config (a placeholder to fill in without it).
        #[arg(long, value_name = "URL")]
        production: Option<String>,
        /// An environment variable holding production's password.
        #[arg(long, value_name = "VAR", requires = "production")]
        production_password_env: Option<String>,
        /// A file holding production's password.
        #[arg(
            long,
            value_name = "PATH",
            requires = "production",
            conflicts_with = "production_password_env"
        )]
        production_password_file: Option<PathBuf>,
        /// A schema to read (repeatable; default public).
        #[arg(long = "schema", value_name = "NAME")]
        schemas: Vec<String>,
        /// Only tables matching this pattern (`*`, `?`; `schema.table` or the table's name;
        /// repeatable).
        #[arg(long, value_name = "PATTERN")]
        include: Vec<String>,
        /// Leave out tables matching this pattern (repeatable).
        #[arg(long, value_name = "PATTERN")]
        exclude: Vec<String>,
        /// Write the config to this file (which must not exist yet) instead of stdout.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Check both databases and create the publication, the slot and stagingprop's schema on
    /// production. Safe to run again.
    Init {
        /// Do not create the replication slot (let `copy` create it with its snapshot).
        #[arg(long)]
        no_slot: bool,
        /// Bring an existing publication's row filters and column lists in line with the config
        /// (without it, init shows the differences and changes nothing).
        #[arg(long)]
        apply_changes: bool,
    },
    /// Apply every committed change of the managed tables from staging to production, in commit
    /// order and exactly once, until stopped (SIGINT/SIGTERM finish the current batch first).
    Sync {
        /// Stop once production has everything staging had written when sync started.
        #[arg(long)]
        until_caught_up: bool,
        /// Apply every transaction committed on staging up to this LSN (0/1A2B3C4) or time
        /// ('2026-11-25 18:00:00+00', any form PostgreSQL reads), then stop, the slot confirmed
        /// exactly there. With --until-caught-up, whichever comes first.
        #[arg(long, value_name = "LSN|TIME")]
        until: Option<String>,
        /// Print the run report (rows per table and operation) as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Read staging's slot up to where staging is now (or --until) and report what would be
        /// applied; nothing is written to production and the slot does not move.
        #[arg(long, conflicts_with = "from_stream")]
        dry_run: bool,
        /// Read staging's transactions from the [stream] JetStream stream that `publish`
        /// writes, instead of staging's slot (one of several targets; staging is only asked for
        /// its table definitions). --until-caught-up then means: everything the stream held.
        #[arg(long)]
        from_stream: bool,
        /// Apply schema changes staging captured even under `[ddl] mode = "stop"`: the one that
        /// stopped the last run, and any after it.
        #[arg(long)]
        apply_schema_change: bool,
    },
    /// Read staging's slot once for several targets: spool each committed transaction (fsync)
    /// and publish it to the [stream] JetStream stream, in commit order, exactly once; staging
    /// is told a position once it is spooled. Each target runs `sync --from-stream`.
    Publish,
    /// Apply spooled staging transactions to a target, from the position its own progress table
    /// holds: e.g. production restored from a backup taken before an outage. Stop sync first
    /// when the target is production.
    Replay {
        /// The target: `production` (the default), or a libpq URL without a password (the
        /// password comes from --to-password-env or --to-password-file).
        #[arg(long, value_name = "production|URL", default_value = "production")]
        to: String,
        /// An environment variable holding the target's password.
        #[arg(long, value_name = "VAR", requires = "to")]
        to_password_env: Option<String>,
        /// A file holding the target's password.
        #[arg(
            long,
            value_name = "PATH",
            requires = "to",
            conflicts_with = "to_password_env"
        )]
        to_password_file: Option<PathBuf>,
        /// Stop before the first transaction committed after this LSN (0/1A2B3C4) or time
        /// ('2026-11-25 04:00:00+00').
        #[arg(long, value_name = "LSN|TIME")]
        until: Option<String>,
        /// Read the [stream] JetStream stream instead of the spool, up to where it ends when
        /// the replay starts.
        #[arg(long)]
        from_stream: bool,
    },
    /// Seed one database's managed tables from the other's, from one consistent snapshot, in
    /// parallel. From staging to production it creates the sync slot with that snapshot and
    /// records where sync starts, so nothing is lost or applied twice.
    Copy {
        /// The database to read.
        #[arg(long, value_enum)]
        from: SideArg,
        /// The database to write.
        #[arg(long, value_enum)]
        to: SideArg,
        /// Copy only these managed tables (comma-separated schema.table).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Leave these managed tables out (comma-separated).
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Empty each target table in the transaction that loads it (else non-empty targets are an error).
        #[arg(long)]
        truncate: bool,
        /// With --truncate: also empty tables with a column list (their production-owned
        /// columns are lost).
        #[arg(long, requires = "truncate")]
        force: bool,
        /// Parallel workers (default: the number of cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Tables of at least this many MB are copied in block ranges by several workers at once
        /// (with --atomic or --truncate of tables with rows: committed together, which needs
        /// max_prepared_transactions >= --jobs on the target).
        #[arg(long, value_name = "MB", default_value_t = 256)]
        split_mb: u64,
        /// Make each group of tables linked by foreign keys appear on the target at once (one
        /// transaction, or parts committed together), as --truncate of tables with rows does.
        /// Without it, empty target tables load by table and block range, each committed alone.
        #[arg(long)]
        atomic: bool,
        /// A shell command to run after a successful copy (e.g. a search-index rebuild).
        #[arg(long, value_name = "CMD")]
        after: Option<String>,
        /// Print the summary (rows and bytes per table, totals, rows/s) as one JSON object.
        #[arg(long)]
        json: bool,
        /// Seed a target of `sync --from-stream` while `publish` runs: the snapshot comes from a
        /// temporary slot (the publisher's slot is left alone) and the hand-off recorded is its
        /// position, where the target's `sync --from-stream` continues.
        #[arg(long)]
        for_stream: bool,
    },
    /// Report on replication: the slot, lag, the last applied transaction, quarantined
    /// conflicts. Exits 8 when unhealthy (slot missing, invalidated or unused, lag past a
    /// threshold), so monitoring can call it.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Unhealthy when production is more than this many bytes of staging WAL behind.
        #[arg(long, default_value_t = 1 << 30)]
        max_lag_bytes: u64,
        /// Unhealthy when production is more than this many seconds behind.
        #[arg(long, default_value_t = 300.0)]
        max_lag_seconds: f64,
    },
    /// The changes `on_conflict = "skip"` set aside on production: list them, apply them again
    /// (after fixing what they conflicted with), or discard them.
    Quarantine {
        #[command(subcommand)]
        action: QuarantineAction,
    },
    /// Compare every managed table on staging and production (chunked hashes over key ranges,
    /// drilling into differing chunks). Exits 9 when they differ.
    ///
    /// With --repair, make production's differing chunks equal to staging's while sync runs:
    /// each chunk is read on staging between two watermarks written into staging's WAL and
    /// applied by sync in its place in the stream, exactly once. Rows production's users edited
    /// (recorded by the guard) are kept. Run again, a repair resumes where it stopped.
    Verify {
        /// Rows per hashed chunk.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: i64,
        /// Only this managed table (schema.table); repeat for several.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Only rows meeting this SQL condition (on both sides).
        #[arg(long = "where", value_name = "COND")]
        condition: Option<String>,
        /// Repair the differing chunks online (sync must be running).
        #[arg(long)]
        repair: bool,
        /// With --repair: say what would be inserted, updated, deleted and kept; write nothing.
        #[arg(long, requires = "repair")]
        dry_run: bool,
        /// With --repair: how long to wait for sync to apply one chunk before giving up.
        #[arg(long, default_value_t = 300, requires = "repair")]
        wait_seconds: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Re-seed managed tables online, chunk by chunk, while sync runs: each chunk is read on
    /// staging between two watermarks in its WAL and applied by sync in its place, exactly once
    /// (rows production's users edited are kept). Until it ends, the stream's changes of these
    /// tables that meet a row the seed has not brought yet are the seed's to settle. Seeds a
    /// table just added to the config (after `init --apply-changes`), or one to start over.
    Resync {
        /// The managed table (schema.table); repeat for several.
        #[arg(long = "table", required = true)]
        tables: Vec<String>,
        /// Rows per chunk.
        #[arg(long, default_value_t = 10_000)]
        chunk_rows: i64,
        /// How long to wait for sync to apply one chunk before giving up.
        #[arg(long, default_value_t = 300)]
        wait_seconds: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print staging's decoded changes as JSON lines (one per row change) on stdout.
    ///
    /// Reads a temporary slot by default, so the real slot never moves and only changes made
    /// after tail started are shown. With --slot it reads that slot from its confirmed position
    /// and confirms nothing.
    Tail {
        /// Read this existing slot instead of a temporary one (it is not advanced).
        #[arg(long)]
        slot: Option<String>,
        /// Publication to read (default: [sync] publication from the config).
        #[arg(long)]
        publication: Option<String>,
        /// Exit after this many changes.
        #[arg(long)]
        limit: Option<u64>,
        /// Exit when no message arrived for this many seconds.
        #[arg(long, value_name = "SECONDS")]
        idle_exit: Option<u64>,
        /// Also record the raw pgoutput stream to FILE (input for the decode benchmark).
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Also print each change's key on production (mapped_key), translated by the key
        /// rules through production's key map.
        #[arg(long)]
        mapped: bool,
        /// Print the records of the spool (DIR, default: [spool] dir from the config) instead
        /// of reading staging, oldest first, and exit at its end.
        #[arg(long, value_name = "DIR", num_args = 0..=1, conflicts_with_all = ["slot", "mapped", "record"])]
        spool: Option<Option<PathBuf>>,
    },
}

/// A failure as the operator sees it.
struct Failure {
    code: u8,
    message: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; its logs would only repeat it.
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn,tokio_postgres=error",
        _ => "info,tokio_postgres=warn",
    };
    init_logging(cli.log_format, default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging(format: LogFormat, default_filter: &str) {
    // Server notices (NOTICE: ... already exists, skipping) are not news to an operator.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        // Log lines erase copy's progress bars first instead of landing inside them.
        .with_writer(|| stagingprop::LogWriter);
    match format {
        LogFormat::Human => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Demo { duration } => return run_demo(duration).await,
        Command::Discover {
            staging,
            staging_password_env,
            staging_password_file,
            production,
            production_password_env,
            production_password_file,
            schemas,
            include,
            exclude,
            output,
        } => {
            let db = |origin: &str, url: &str, env, file| {
                DbConfig::from_command_line(origin, url, env, file).map_err(|e| Failure {
                    code: exit::CONFIG,
                    message: e.to_string(),
                })
            };
            let options = DiscoverOptions {
                staging: db(
                    "--staging",
                    &staging,
                    staging_password_env,
                    staging_password_file,
                )?,
                production: production
                    .map(|url| {
                        db(
                            "--production",
                            &url,
                            production_password_env,
                            production_password_file,
                        )
                    })
                    .transpose()?,
                schemas,
                include,
                exclude,
            };
            return run_discover(&options, output).await;
        }
        _ => {}
    }
    if let Some(listen) = cli.metrics_listen {
        let bound = stagingprop::ops::metrics::serve(listen)
            .await
            .map_err(|e| Failure {
                code: exit::CONFIG,
                message: format!("cannot serve metrics on {listen}: {e}"),
            })?;
        tracing::info!("metrics on http://{bound}/metrics");
    }
    let config = load_config(&cli)?;
    match cli.command {
        Command::Demo { .. } | Command::Discover { .. } => {
            unreachable!("handled before the config is loaded")
        }
        Command::Init {
            no_slot,
            apply_changes,
        } => {
            let options = InitOptions {
                create_slot: !no_slot,
                apply_changes,
            };
            let report = init(&config, &options).await.map_err(ops_failure)?;
            for line in report.lines {
                println!("{line}");
            }
            println!("init: both databases are ready");
            Ok(())
        }
        Command::Sync {
            until_caught_up,
            until,
            json,
            dry_run,
            from_stream,
            apply_schema_change,
        } => {
            let until = match until {
                None => None,
                Some(text) => Some(parse_cutoff(&config, &text).await?),
            };
            let options = SyncOptions {
                stop_at: until_caught_up.then_some(StopAt::CaughtUp),
                max_attempts: None,
                until,
                dry_run,
                from_stream,
                apply_schema_change,
            };
            run_sync(&config, &options, json).await
        }
        Command::Publish => {
            let summary = sync::publish(&config, shutdown_signal())
                .await
                .map_err(sync_failure)?;
            println!(
                "publish: the stream holds staging's transactions up to {}",
                summary.published
            );
            Ok(())
        }
        Command::Replay {
            to,
            to_password_env,
            to_password_file,
            until,
            from_stream,
        } => {
            let to = if to == "production" {
                ReplayTo::Production
            } else {
                let db =
                    DbConfig::from_command_line("--to", &to, to_password_env, to_password_file)
                        .map_err(|e| Failure {
                            code: exit::CONFIG,
                            message: e.to_string(),
                        })?;
                ReplayTo::Database(db)
            };
            let options = ReplayOptions {
                to,
                until,
                from_stream,
            };
            run_replay(&config, &options).await
        }
        Command::Copy {
            from,
            to,
            tables,
            exclude,
            truncate,
            force,
            jobs,
            split_mb,
            atomic,
            after,
            json,
            for_stream,
        } => {
            let options = CopyOptions {
                from: from.into(),
                to: to.into(),
                tables: table_names(tables)?,
                exclude: table_names(exclude)?,
                truncate,
                jobs: jobs
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                split_bytes: split_mb.saturating_mul(1 << 20),
                after,
                force,
                for_stream,
                atomic,
            };
            run_copy(&config, &options, json).await
        }
        Command::Quarantine { action } => run_quarantine(&config, action).await,
        Command::Status {
            json,
            max_lag_bytes,
            max_lag_seconds,
        } => {
            let thresholds = Thresholds {
                max_lag_bytes,
                max_lag_seconds,
            };
            run_status(&config, &thresholds, json).await
        }
        Command::Verify {
            chunk_rows,
            tables,
            condition,
            repair,
            dry_run,
            wait_seconds,
            json,
        } => {
            let options = VerifyOptions {
                chunk_rows,
                tables: table_names(tables)?,
                condition,
                ..VerifyOptions::default()
            };
            if repair {
                let options = RepairOptions {
                    verify: options,
                    dry_run,
                    wait: std::time::Duration::from_secs(wait_seconds),
                    seed: false,
                };
                run_repair(&config, &options, json).await
            } else {
                run_verify(&config, &options, json).await
            }
        }
        Command::Resync {
            tables,
            chunk_rows,
            wait_seconds,
            json,
        } => {
            let options = RepairOptions {
                verify: VerifyOptions {
                    chunk_rows,
                    tables: table_names(tables)?,
                    ..VerifyOptions::default()
                },
                dry_run: false,
                wait: std::time::Duration::from_secs(wait_seconds),
                seed: true,
            };
            run_repair(&config, &options, json).await
        }
        Command::Tail {
            slot,
            publication,
            limit,
            idle_exit,
            record,
            mapped,
            spool,
        } => match spool {
            Some(dir) => run_tail_spool(&config, dir, limit),
            None => {
                let options = TailOptions {
                    slot,
                    publication: publication.unwrap_or_else(|| config.sync.publication.clone()),
                    limit,
                    idle_exit: idle_exit.map(Duration::from_secs),
                    record,
                    mapped: mapped.then(|| config.clone()),
                };
                run_tail(&config, &options).await
            }
        },
    }
}

async fn run_discover(options: &DiscoverOptions, output: Option<PathBuf>) -> Result<(), Failure> {
    let discovered = discover(options).await.map_err(ops_failure)?;
    match output {
        None => print!("{}", discovered.config),
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, discovered.config.as_bytes()));
            written.map_err(|e| Failure {
                code: exit::FAILED,
                message: format!(
                    "cannot write {} ({e}); discover never overwrites a file: give a new name",
                    path.display()
                ),
            })?;
        }
    }
    eprintln!(
        "discover: {} table(s) ({} without a primary key or replica identity, written commented \
         out with what to do), {} reference(s) and {} file store(s) suggested",
        discovered.tables,
        discovered.without_identity,
        discovered.references,
        discovered.file_tables
    );
    Ok(())
}

async fn run_demo(duration: u64) -> Result<(), Failure> {
    let options = DemoOptions {
        duration: Duration::from_secs(duration),
    };
    let outcome = demo(&options, shutdown_signal())
        .await
        .map_err(ops_failure)?;
    if outcome.verified {
        Ok(())
    } else {
        Err(Failure {
            code: exit::DIFFERENT,
            message: "the demo ended with differences between staging and production".into(),
        })
    }
}

/// The config file, narrowed to `--scope` when one is given.
fn load_config(cli: &Cli) -> Result<Config, Failure> {
    let config = Config::load(&cli.config).map_err(|e| Failure {
        code: exit::CONFIG,
        message: e.to_string(),
    })?;
    match &cli.scope {
        None => Ok(config),
        Some(scope) => config.scoped(scope).map_err(|e| Failure {
            code: exit::CONFIG,
            message: e.to_string(),
        }),
    }
}

fn table_names(names: Vec<String>) -> Result<Vec<TableName>, Failure> {
    names
        .iter()
        .map(|n| {
            n.parse().map_err(|e: String| Failure {
                code: exit::CONFIG,
                message: e,
            })
        })
        .collect()
}

async fn run_sync(config: &Config, options: &SyncOptions, json: bool) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let summary = sync::run(config, options, shutdown_signal())
        .await
        .map_err(sync_failure)?;
    let st = summary.stats;
    tracing::info!(
        transactions = st.transactions,
        inserted = st.rows_inserted,
        updated = st.rows_updated,
        deleted = st.rows_deleted,
        conflicts_skipped = st.conflicts_skipped,
        files_written = st.files.written,
        files_removed = st.files.removed,
        applied = %summary.last_applied.unwrap_or_default(),
        "sync stopped"
    );
    let run = if options.dry_run {
        sync::DRY_RUN
    } else {
        "sync"
    };
    let report = sync::RunReport::of(config, &summary, run, started.elapsed().as_secs_f64());
    print_report(&report, json)
}

async fn run_replay(config: &Config, options: &ReplayOptions) -> Result<(), Failure> {
    let summary = sync::replay(config, options, shutdown_signal())
        .await
        .map_err(sync_failure)?;
    let st = summary.stats;
    println!(
        "replay: {} transactions applied ({} rows inserted, {} updated, {} deleted); the target is at {}",
        st.transactions,
        st.rows_inserted,
        st.rows_updated,
        st.rows_deleted,
        summary.last_applied.unwrap_or_default()
    );
    Ok(())
}

async fn run_copy(config: &Config, options: &CopyOptions, json: bool) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let report = stagingprop::copy::copy(config, options)
        .await
        .map_err(copy_failure)?;
    print_copy_report(&report, started.elapsed().as_secs_f64(), json);
    if let Some(status) = report.after_status {
        println!("--after command exited with {status}");
        if status != 0 {
            return Err(Failure {
                code: exit::FAILED,
                message: format!("the copy succeeded but the --after command exited with {status}"),
            });
        }
    }
    Ok(())
}

/// A copy's summary per table, as a table for people or as JSON for scripts.
fn print_copy_report(report: &stagingprop::copy::CopyReport, elapsed: f64, json: bool) {
    let rows: u64 = report.tables.iter().map(|t| t.rows).sum();
    let bytes: u64 = report.tables.iter().map(|t| t.bytes).sum();
    if json {
        let tables: Vec<serde_json::Value> = report
            .tables
            .iter()
            .map(|t| {
                serde_json::json!({
                    "table": t.table.to_string(),
                    "rows": t.rows,
                    "bytes": t.bytes,
                    "seconds": t.seconds,
                    "ranges": t.ranges,
                })
            })
            .collect();
        let out = serde_json::json!({
            "run": "copy",
            "tables": tables,
            "rows": rows,
            "bytes": bytes,
            "elapsed_secs": elapsed,
            "rows_per_sec": rows as f64 / elapsed.max(0.001),
            "handoff": report.handoff.map(|l| l.to_string()),
            "after_status": report.after_status,
        });
        println!("{out}");
        return;
    }
    println!(
        "{:<40} {:>12} {:>10} {:>8} {:>7}",
        "table", "rows", "MB", "seconds", "ranges"
    );
    for t in &report.tables {
        println!(
            "{:<40} {:>12} {:>10.1} {:>8.1} {:>7}",
            t.table.to_string(),
            t.rows,
            t.bytes as f64 / 1e6,
            t.seconds,
            t.ranges
        );
    }
    println!(
        "copy: {} rows, {:.1} MB in {elapsed:.1} s ({:.0} rows/s)",
        rows,
        bytes as f64 / 1e6,
        rows as f64 / elapsed.max(0.001)
    );
    if let Some(lsn) = report.handoff {
        println!("sync will start at {lsn}, right after the copied snapshot");
    }
}

async fn run_status(config: &Config, thresholds: &Thresholds, json: bool) -> Result<(), Failure> {
    let report = status(config, thresholds).await.map_err(ops_failure)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_else(|e| e.to_string())
        );
    } else {
        print!("{}", render(&report));
    }
    if report.healthy {
        Ok(())
    } else {
        Err(Failure {
            code: exit::UNHEALTHY,
            message: format!("unhealthy: {}", report.problems.join("; ")),
        })
    }
}

async fn run_verify(config: &Config, options: &VerifyOptions, json: bool) -> Result<(), Failure> {
    let diffs = verify(config, options).await.map_err(ops_failure)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&diffs).unwrap_or_else(|e| e.to_string())
        );
    } else {
        print!("{}", render_diffs(&diffs));
    }
    let differing: Vec<&str> = diffs
        .iter()
        .filter(|d| !d.matches())
        .map(|d| d.table.as_str())
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: exit::DIFFERENT,
            message: format!("staging and production differ in {}", differing.join(", ")),
        })
    }
}

async fn run_repair(config: &Config, options: &RepairOptions, json: bool) -> Result<(), Failure> {
    let report = repair(config, options).await.map_err(ops_failure)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_else(|e| e.to_string())
        );
    } else {
        print!("{}", render_repair(&report));
    }
    if report.failed() {
        return Err(Failure {
            code: exit::DIFFERENT,
            message: "production refused part of the repair (see FAILED above); the rest is \
                      repaired"
                .into(),
        });
    }
    Ok(())
}

/// `tail --spool [DIR]`: the spool's records, oldest first, to its end.
fn run_tail_spool(
    config: &Config,
    dir: Option<PathBuf>,
    limit: Option<u64>,
) -> Result<(), Failure> {
    let dir = dir
        .or_else(|| config.spool.as_ref().map(|s| s.dir.clone()))
        .ok_or_else(|| Failure {
            code: exit::CONFIG,
            message: "tail --spool needs a directory: give one, or set [spool] dir in the config"
                .into(),
        })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = stagingprop::ops::tail::tail_spool(&dir, limit, &mut out).map_err(ops_failure)?;
    tracing::info!(
        changes = summary.changes,
        transactions = summary.transactions,
        "spool read to its end"
    );
    Ok(())
}

async fn run_tail(config: &Config, options: &TailOptions) -> Result<(), Failure> {
    let staging =
        Endpoint::from_db_config(&config.staging).map_err(|e| ops_failure(OpsError::from(e)))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = tail(&staging, options, &mut out, shutdown_signal())
        .await
        .map_err(ops_failure)?;
    tracing::info!(
        changes = summary.changes,
        transactions = summary.transactions,
        "tail finished"
    );
    Ok(())
}

async fn run_quarantine(config: &Config, action: QuarantineAction) -> Result<(), Failure> {
    use stagingprop::ops::quarantine;
    match action {
        QuarantineAction::List { table, json } => {
            let selection = table.map_or(Selection::All, |t| Selection::Table(t.to_string()));
            let entries = quarantine::list(config, &selection)
                .await
                .map_err(ops_failure)?;
            for e in &entries {
                if json {
                    println!("{}", serde_json::to_string(e).unwrap_or_default());
                } else {
                    println!(
                        "{:>6}  {}  {:<10} {:<6} {}  key {}  ({})",
                        e.id, e.lsn, e.table, e.operation, e.quarantined_at, e.key, e.reason
                    );
                }
            }
            if !json {
                println!("{} quarantined change(s)", entries.len());
            }
            Ok(())
        }
        QuarantineAction::Retry { which } => {
            let report = quarantine::retry(config, &which.selection())
                .await
                .map_err(ops_failure)?;
            println!(
                "quarantine retry: {} applied and removed, {} still conflicting",
                report.applied.len(),
                report.kept.len()
            );
            for (id, reason) in &report.kept {
                println!("{id:>6}  {reason}");
            }
            if report.kept.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: exit::CONFLICT,
                    message: format!(
                        "{} quarantined change(s) still conflict; they stay in the quarantine with the new reason",
                        report.kept.len()
                    ),
                })
            }
        }
        QuarantineAction::Discard { which } => {
            let removed = quarantine::discard(config, &which.selection())
                .await
                .map_err(ops_failure)?;
            println!("quarantine discard: {removed} change(s) removed");
            Ok(())
        }
        QuarantineAction::Resolve {
            id,
            take,
            set,
            set_null,
        } => {
            let usage = |message: String| Failure {
                code: exit::CONFIG,
                message,
            };
            let take = match take {
                TakeSide::Staging | TakeSide::Production
                    if !set.is_empty() || !set_null.is_empty() =>
                {
                    return Err(usage("--set and --set-null go with --take merged".into()));
                }
                TakeSide::Staging => quarantine::Take::Staging,
                TakeSide::Production => quarantine::Take::Production,
                TakeSide::Merged => {
                    let mut values = Vec::new();
                    for pair in &set {
                        let Some((column, value)) = pair.split_once('=') else {
                            return Err(usage(format!("--set {pair}: write COLUMN=VALUE")));
                        };
                        values.push((column.to_owned(), Some(value.to_owned())));
                    }
                    values.extend(set_null.iter().map(|c| (c.clone(), None)));
                    if values.is_empty() {
                        return Err(usage(
                            "--take merged needs the merged values: --set COLUMN=VALUE (or --set-null COLUMN)".into(),
                        ));
                    }
                    quarantine::Take::Merged(values)
                }
            };
            let report = quarantine::resolve(config, id, &take)
                .await
                .map_err(ops_failure)?;
            println!(
                "quarantine resolve: took {} for change(s) {:?}; production edit(s) {:?} settled",
                report.took, report.changes, report.edits
            );
            Ok(())
        }
    }
}

/// The run report on stdout: a table, or one JSON object.
fn print_report(report: &sync::RunReport, json: bool) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string(report).map_err(|e| Failure {
            code: exit::FAILED,
            message: format!("cannot write the report: {e}"),
        })?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

/// `--until` of sync: an LSN, or a time staging's PostgreSQL reads (production's when staging
/// is unreachable).
async fn parse_cutoff(config: &Config, text: &str) -> Result<sync::Until, Failure> {
    let mut last = None;
    for db in [&config.staging, &config.production] {
        let endpoint = Endpoint::from_db_config(db).map_err(|e| Failure {
            code: exit::CONFIG,
            message: e.to_string(),
        })?;
        match sync::parse_until(text, &endpoint).await {
            Ok(until) => return Ok(until),
            Err(e @ SyncError::BadUntil(_)) => return Err(sync_failure(e)),
            Err(e) => last = Some(e),
        }
    }
    Err(sync_failure(last.expect("two servers were asked")))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn sync_failure(error: SyncError) -> Failure {
    use stagingprop::ApplyError;
    use stagingprop::FileError;
    use stagingprop::RemapError;
    use stagingprop::stream::StreamError;
    let code = match &error {
        SyncError::Endpoint(_) => exit::CONFIG,
        SyncError::Schema(_)
        | SyncError::UnknownTable(_)
        | SyncError::SchemaChangeWaiting { .. }
        | SyncError::Apply(
            ApplyError::Schema(_) | ApplyError::SchemaChange(_) | ApplyError::IndexBuild { .. },
        )
        | SyncError::Apply(ApplyError::Files(
            FileError::NoColumn { .. } | FileError::NotFullIdentity { .. },
        ))
        | SyncError::Rules(_) => exit::SCHEMA,
        SyncError::Apply(
            ApplyError::Conflict { .. } | ApplyError::Remap(RemapError::UnmappedReference(_)),
        ) => exit::CONFLICT,
        SyncError::Replication(e) if e.is_unreachable() => exit::UNREACHABLE,
        SyncError::Database { source, .. } if source.refused => exit::UNREACHABLE,
        SyncError::Slot(_) | SyncError::Replication(_) | SyncError::Protocol(_) => {
            exit::REPLICATION
        }
        SyncError::Database { .. } if error.is_transient() => exit::UNREACHABLE,
        SyncError::Spool(_) | SyncError::Replay(_) => exit::SPOOL,
        SyncError::BadUntil(_) => exit::CONFIG,
        SyncError::Stream(e) => match e {
            StreamError::Config(_) | StreamError::Subject { .. } | StreamError::Missing { .. } => {
                exit::CONFIG
            }
            StreamError::Connect { .. } | StreamError::Server { .. } => exit::UNREACHABLE,
            StreamError::Spool(_) => exit::SPOOL,
            _ => exit::REPLICATION,
        },
        _ => exit::FAILED,
    };
    with_sqlstate(code, error.to_string(), error.sqlstate())
}

fn copy_failure(error: CopyError) -> Failure {
    let code = match &error {
        CopyError::Endpoint(_) => exit::CONFIG,
        CopyError::Schema(_) | CopyError::Rules(_) => exit::SCHEMA,
        CopyError::Database { source, .. } if source.transient || source.refused => {
            exit::UNREACHABLE
        }
        CopyError::Replication(e) if e.is_unreachable() => exit::UNREACHABLE,
        CopyError::Replication(_) => exit::REPLICATION,
        _ => exit::FAILED,
    };
    let sqlstate = match &error {
        CopyError::Database { source, .. } => source.sqlstate(),
        CopyError::Replication(e) => e.sqlstate(),
        _ => None,
    };
    with_sqlstate(code, error.to_string(), sqlstate)
}

fn with_sqlstate(code: u8, mut message: String, sqlstate: Option<&str>) -> Failure {
    if let Some(sqlstate) = sqlstate
        && !message.contains(sqlstate)
    {
        message.push_str(&format!(" [SQLSTATE {sqlstate}]"));
    }
    Failure { code, message }
}

fn ops_failure(error: OpsError) -> Failure {
    let code = match &error {
        OpsError::Endpoint(EndpointError::Config(_)) | OpsError::Endpoint(_) => exit::CONFIG,
        OpsError::Connect { .. } => exit::UNREACHABLE,
        OpsError::ChecksFailed { .. } => exit::CHECKS,
        OpsError::Replication(e) if e.is_unreachable() => exit::UNREACHABLE,
        OpsError::Replication(_) => exit::REPLICATION,
        _ => exit::FAILED,
    };
    with_sqlstate(code, error.to_string(), error.sqlstate())
}
