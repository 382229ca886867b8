//! How a copy is cut into worker transactions: which tables load together, alone or in
//! prepared parts, what the target allows, and in which order pieces may start.

use std::sync::{Arc, Mutex};

use tokio_postgres::Client;

use super::split::Piece;
use super::{CopyError, CopyOptions, TableReport, db_error, prepared, schedule};
use crate::catalog::TableMeta;
use crate::pg::QueryError;
use crate::pg::connect::Endpoint;
use crate::state;

/// Which part of a table is copied, and how it lands.
#[derive(Clone, Debug)]
pub(super) struct TablePart {
    /// The table's row filter: only the rows it selects are copied.
    pub(super) filter: Option<String>,
    /// The target table has rows and production owns some columns: the managed columns are
    /// merged by key (insert or update) instead of loaded.
    pub(super) merge: bool,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct TableSize {
    /// Heap and TOAST bytes on disk.
    pub(super) bytes: u64,
    /// Heap blocks.
    pub(super) blocks: u64,
}

/// Tables linked by foreign keys, and how they reach the target.
pub(super) struct GroupJob {
    pub(super) tables: Vec<usize>,
    pub(super) loading: Loading,
}

pub(super) enum Loading {
    /// The whole group in one transaction, visible at once; emptied first with `truncate`.
    Together { truncate: bool },
    /// Several prepared transactions committed together, visible at once (the tables are empty).
    Prepared(SplitGroup),
    /// Each table or block range in a transaction of its own, committed when it is in: empty
    /// target tables, seeded by every worker whatever the target's prepared-transaction limit.
    Alone,
}

pub(super) struct SplitGroup {
    /// What the parts' global ids and the commit decision are named by.
    pub(super) id: String,
    pub(super) parts: usize,
    pub(super) state: Mutex<SplitState>,
}

#[derive(Default)]
pub(super) struct SplitState {
    pub(super) prepared: Vec<String>,
    pub(super) reports: Vec<TableReport>,
    pub(super) failed: bool,
}

impl SplitGroup {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, SplitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What one worker transaction loads: a whole group, one part of a split group, or one piece
/// loaded alone.
pub(super) struct Job {
    pub(super) group: Arc<GroupJob>,
    pub(super) part: usize,
    pub(super) pieces: Vec<Piece>,
    /// Tables every piece of which must have committed first (foreign keys checked on load).
    pub(super) needs: Vec<usize>,
    /// How many pieces its table was cut into (loaded alone: one piece per job).
    pub(super) table_pieces: usize,
}

impl Job {
    pub(super) fn bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.bytes).sum()
    }
}

/// What the target allows that decides how groups load.
pub(super) struct TargetAbilities {
    /// `Err(why)` when the target role may not set `session_replication_role`: foreign keys
    /// are then checked as rows arrive.
    pub(super) replica: Result<(), String>,
    /// Per table: it has a foreign key to itself (its ranges could not load apart unchecked).
    pub(super) self_referencing: Vec<bool>,
}

/// Cuts the copy into worker transactions, largest first. Empty target tables load piece by
/// piece (a table, or a block range of one of at least `split_bytes`), each committed alone;
/// groups that must appear at once (`--atomic`, `--truncate` of tables with rows, merges, or
/// foreign-key cycles the target would check) load in one transaction per group, or in parts
/// prepared and committed together when the target can.
#[allow(clippy::too_many_arguments)]
pub(super) async fn plan_jobs(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
    parts_of: &[TablePart],
    groups: Vec<Vec<usize>>,
    edges: &[(usize, usize)],
    abilities: &TargetAbilities,
    sizes: &[TableSize],
    options: &CopyOptions,
) -> Result<Vec<Job>, CopyError> {
    let workers = options.jobs.max(1);
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let large = |tables: &[usize]| -> Vec<usize> {
        tables
            .iter()
            .copied()
            .filter(|&i| sizes[i].bytes >= options.split_bytes && sizes[i].blocks > 1)
            .collect()
    };
    let checked = abilities.replica.is_err();
    let cyclic = schedule::on_cycle(metas.len(), edges);
    let ranges_of = |table: usize| -> Vec<Option<super::split::BlockRange>> {
        if workers > 1 && !large(&[table]).is_empty() {
            super::split::block_ranges(sizes[table].blocks, workers)
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        }
    };
    // Whether the target can take prepared parts at all: free slots, or why not.
    let mut capacity = None;
    let mut jobs = Vec::new();
    let mut ordered_for_checks = Vec::new();
    for (g, tables) in groups.into_iter().enumerate() {
        let whole = |tables: Vec<usize>, truncate: bool| Job {
            pieces: tables
                .iter()
                .map(|&table| Piece {
                    table,
                    range: None,
                    bytes: sizes[table].bytes,
                })
                .collect(),
            group: Arc::new(GroupJob {
                tables,
                loading: Loading::Together { truncate },
            }),
            part: 0,
            needs: Vec::new(),
            table_pieces: 1,
        };
        let names = |tables: &[usize]| {
            tables
                .iter()
                .map(|&i| metas[i].table_name().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let merges = tables.iter().any(|&i| parts_of[i].merge);
        // TRUNCATE of tables with rows: the group is replaced in one transaction.
        let replaces = options.truncate && !merges && !all_empty(t, target, metas, &tables).await?;
        let cycle = checked && tables.iter().any(|&i| cyclic[i]);
        if !options.atomic && !merges && !replaces && !cycle {
            let group = Arc::new(GroupJob {
                tables: tables.clone(),
                loading: Loading::Alone,
            });
            for &table in &tables {
                // Checked foreign keys: a table's rows may refer to rows of its other ranges.
                let ranges = if checked && abilities.self_referencing[table] {
                    vec![None]
                } else {
                    ranges_of(table)
                };
                let needs: Vec<usize> = if checked {
                    edges
                        .iter()
                        .filter(|&&(child, _)| child == table)
                        .map(|&(_, parent)| parent)
                        .collect()
                } else {
                    Vec::new()
                };
                if !needs.is_empty() {
                    ordered_for_checks.push(metas[table].table_name().to_string());
                }
                let bytes = sizes[table].bytes / ranges.len() as u64;
                let table_pieces = ranges.len();
                for range in ranges {
                    jobs.push(Job {
                        group: group.clone(),
                        part: 0,
                        pieces: vec![Piece {
                            table,
                            range,
                            bytes,
                        }],
                        needs: needs.clone(),
                        table_pieces,
                    });
                }
            }
            continue;
        }
        let why_together = if merges {
            "a table with rows and a column list is merged by key in one transaction"
        } else if replaces {
            "--truncate on tables with rows empties and loads them in one transaction"
        } else if cycle {
            "their foreign keys form a cycle and the target checks them on load"
        } else {
            "--atomic"
        };
        let large = large(&tables);
        // A merge goes through a temporary table, which a prepared transaction cannot hold.
        if workers < 2 || large.is_empty() || merges {
            tracing::info!(tables = %names(&tables), "copying the group in one transaction: {why_together}");
            jobs.push(whole(tables, options.truncate));
            continue;
        }
        let mut pieces = Vec::new();
        for &table in &tables {
            let ranges = ranges_of(table);
            let bytes = sizes[table].bytes / ranges.len() as u64;
            pieces.extend(ranges.into_iter().map(|range| Piece {
                table,
                range,
                bytes,
            }));
        }
        let parts = super::split::pack(pieces, workers);
        if capacity.is_none() {
            capacity = Some(split_capacity(t, &abilities.replica).await);
        }
        let refusal = match capacity.as_mut().expect("set above") {
            Err(why) => Some(why.clone()),
            Ok(free) if *free < parts.len() => Some(format!(
                "the target has {free} free prepared-transaction slot(s) and {} are needed; raise max_prepared_transactions (a restart) to at least --jobs",
                parts.len()
            )),
            _ if replaces => Some(why_together.into()),
            Ok(free) => {
                *free -= parts.len();
                None
            }
        };
        if let Some(why) = refusal {
            tracing::info!(tables = %names(&large), "copying with one worker ({why_together}): {why}");
            jobs.push(whole(tables, options.truncate));
            continue;
        }
        tracing::info!(tables = %names(&large), parts = parts.len(), "copying in block ranges by several workers, committed together ({why_together})");
        let group = Arc::new(GroupJob {
            tables,
            loading: Loading::Prepared(SplitGroup {
                id: super::split::group_id(&run, g),
                parts: parts.len(),
                state: Mutex::default(),
            }),
        });
        for (part, pieces) in parts.into_iter().enumerate() {
            jobs.push(Job {
                group: group.clone(),
                part,
                pieces,
                needs: Vec::new(),
                table_pieces: 0,
            });
        }
    }
    if let (Err(why), false) = (&abilities.replica, ordered_for_checks.is_empty()) {
        tracing::warn!(
            tables = %ordered_for_checks.join(", "),
            "these tables load only after their parent tables are complete, since {why}; run copy as a role that may set session_replication_role (a superuser) to load every table at once"
        );
    }
    jobs.sort_by_key(|job| std::cmp::Reverse(job.bytes()));
    Ok(jobs)
}

/// Whether the target role may set `session_replication_role` (foreign keys and triggers off
/// while loading), or why not.
pub(super) async fn replica_role(t: &Client) -> Result<(), String> {
    t.batch_execute("SET session_replication_role = replica; RESET session_replication_role")
        .await
        .map_err(|e| {
            format!(
                "the target role may not set session_replication_role ({})",
                QueryError::new("SET", &e)
            )
        })
}

/// How many parts the target can hold prepared, or why it cannot take split groups.
pub(super) async fn split_capacity(
    t: &Client,
    replica: &Result<(), String>,
) -> Result<usize, String> {
    // Parts see neither each other's rows nor the other tables' of their group: foreign keys
    // must not be checked while loading.
    if let Err(why) = replica {
        return Err(format!(
            "{why}, so foreign keys would be checked against rows other workers have not committed"
        ));
    }
    let free = prepared::free_slots(t)
        .await
        .map_err(|e| QueryError::new("reading max_prepared_transactions", &e).to_string())?;
    if free < 2 {
        return Err(format!(
            "max_prepared_transactions leaves {free} free slot(s) on the target; set it to at least --jobs (a restart) to let several workers load one group"
        ));
    }
    state::ensure(t).await.map_err(|e| {
        format!("cannot create the copy's commit-decision table on the target ({e})")
    })?;
    Ok(free as usize)
}

pub(super) async fn all_empty(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
    tables: &[usize],
) -> Result<bool, CopyError> {
    for &i in tables {
        let has_rows: bool = t
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", metas[i].qualified()),
                &[],
            )
            .await
            .map_err(db_error(target, "checking target tables"))?
            .get(0);
        if has_rows {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Job {
    pub(super) fn loads_alone(&self) -> bool {
        matches!(self.group.loading, Loading::Alone)
    }

    /// The tables of its pieces when they load alone (the board tracks only those).
    pub(super) fn alone_tables(&self) -> Vec<usize> {
        if self.loads_alone() {
            self.pieces.iter().map(|p| p.table).collect()
        } else {
            Vec::new()
        }
    }
}
