//! `stagingprop quarantine list | retry | discard | resolve`: the changes a `skip` policy set
//! aside on production, and those an `on_production_edit = "park"` policy parked. `retry`
//! applies skipped ones now, in staging's order, each in a production transaction that also
//! removes its entry, so a crash part way neither loses nor repeats one; a change that still
//! conflicts stays, with the new reason. `resolve` decides a parked change (and the later
//! parked changes of its row) for staging, for production, or with merged values.

use bytes::Bytes;

use super::{OpsError, connect, query_error, state_error};
use crate::apply::{Applier, ApplyError, Target};
use crate::catalog::{self, TableMeta};
use crate::change::{Key, RowOp, Source};
use crate::config::{Config, TableName};
use crate::model::{Lsn, Tuple, Value, Xid};
use crate::pg::connect::Endpoint;
use crate::state::quarantine::{self, Selection, Stored};
use crate::state::{self, Progress};

/// The selected quarantined changes of this config's slot, oldest first.
pub async fn list(config: &Config, selection: &Selection) -> Result<Vec<Stored>, OpsError> {
    let production = Endpoint::from_db_config(&config.production)?;
    let p = connect(&production).await?;
    state::ensure(&p).await.map_err(state_error(&production))?;
    quarantine::list(&p, &config.sync.slot, selection)
        .await
        .map_err(state_error(&production))
}

/// Deletes the selected changes; how many.
pub async fn discard(config: &Config, selection: &Selection) -> Result<u64, OpsError> {
    let production = Endpoint::from_db_config(&config.production)?;
    let p = connect(&production).await?;
    quarantine::discard(&p, &config.sync.slot, selection)
        .await
        .map_err(state_error(&production))
}

/// What a retry did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RetryReport {
    /// Entries applied (and removed).
    pub applied: Vec<i64>,
    /// Entries that still cannot be applied, with the reason now recorded.
    pub kept: Vec<(i64, String)>,
}

/// Applies the selected changes now, oldest first, under each table's conflict policy (where
/// it is `skip`, a change that still conflicts is kept rather than quarantined again).
pub async fn retry(config: &Config, selection: &Selection) -> Result<RetryReport, OpsError> {
    let production = Endpoint::from_db_config(&config.production)?;
    let p = connect(&production).await?;
    state::ensure(&p).await.map_err(state_error(&production))?;
    let entries = quarantine::list(&p, &config.sync.slot, selection)
        .await
        .map_err(state_error(&production))?;
    let mut report = RetryReport::default();
    if entries.is_empty() {
        return Ok(report);
    }
    let mut applier = applier_for(config, p, &production).await?;
    for entry in entries {
        if entry.parked {
            let reason = format!(
                "parked at a production edit: decide it with `stagingprop quarantine resolve --id {} --take staging|production`",
                entry.id
            );
            report.kept.push((entry.id, reason));
            continue;
        }
        let change = decode(config, &applier, &entry).map_err(OpsError::Refused)?;
        match apply_one(&mut applier, &entry, change).await {
            Ok(()) => report.applied.push(entry.id),
            // A conflict with the key, or with another unique or foreign key.
            Err(e) if matches!(e, ApplyError::Conflict { .. }) || e.may_be_ordering() => {
                let _ = applier.rollback().await;
                let reason = format!("retried: {e}");
                quarantine::set_reason(applier.client(), entry.id, &reason)
                    .await
                    .map_err(state_error(&production))?;
                tracing::warn!(id = entry.id, "still conflicts: {e}");
                report.kept.push((entry.id, reason));
            }
            Err(e) => {
                let _ = applier.rollback().await;
                return Err(apply_error(&production, e));
            }
        }
    }
    Ok(report)
}

/// An applier on `p` for old changes: the progress row stays where sync left it, and each
/// table's conflict policy is its retry policy.
async fn applier_for(
    config: &Config,
    p: tokio_postgres::Client,
    production: &Endpoint,
) -> Result<Applier, OpsError> {
    let names: Vec<&TableName> = config.tables.iter().map(|t| &t.name).collect();
    let metas = catalog::load_tables(&p, &names)
        .await
        .map_err(query_error(production, "reading table definitions"))?;
    let mut tables = Vec::with_capacity(metas.len());
    for (meta, table) in metas.into_iter().zip(&config.tables) {
        let meta = meta.ok_or_else(|| {
            OpsError::Refused(format!(
                "production: table {} does not exist; create it before retrying",
                table.name
            ))
        })?;
        tables.push((meta, table.on_conflict.on_retry()));
    }
    // The progress row stays where sync left it: these are old changes applied late.
    let progress_at = state::progress::read(&p, &config.sync.slot)
        .await
        .map_err(state_error(production))?
        .map_or(Lsn::INVALID, |p| p.end_lsn);
    let mut applier = Applier::new(p, &config.sync.slot, tables, None, progress_at)
        .await
        .map_err(|e| apply_error(production, e))?;
    applier.leave_progress_alone();
    applier.watch_production_edits(config);
    applier
        .publish_files(config)
        .map_err(|e| apply_error(production, e))?;
    applier.set_hooks(config);
    Ok(applier)
}

/// An operator's decision on a change parked at a production edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Take {
    /// Apply staging's parked changes of the row over production's edits.
    Staging,
    /// Keep production's row; drop staging's parked changes of it.
    Production,
    /// Apply staging's changes, then set these columns (name, text value or NULL).
    Merged(Vec<(String, Option<String>)>),
}

/// What a resolution did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ResolveReport {
    /// The parked changes decided (the row's, oldest first), now gone from the quarantine.
    pub changes: Vec<i64>,
    /// The production edits settled.
    pub edits: Vec<i64>,
    pub took: String,
}

/// Decides parked change `id` and every later parked change of the same row, in one
/// production transaction (with the row and its edits locked, as sync locks them), so the
/// decision is applied exactly once: a crash before its commit leaves everything parked.
pub async fn resolve(config: &Config, id: i64, take: &Take) -> Result<ResolveReport, OpsError> {
    let production = Endpoint::from_db_config(&config.production)?;
    let p = connect(&production).await?;
    state::ensure(&p).await.map_err(state_error(&production))?;
    let slot = config.sync.slot.clone();
    let Some(entry) = quarantine::list(&p, &slot, &Selection::Id(id))
        .await
        .map_err(state_error(&production))?
        .into_iter()
        .next()
    else {
        return Err(OpsError::Refused(format!(
            "no quarantined change {id} for slot {slot}: `stagingprop quarantine list` shows them"
        )));
    };
    if !entry.parked {
        return Err(OpsError::Refused(format!(
            "change {id} was not parked at a production edit ({}): `quarantine retry --id {id}` applies it, `quarantine discard --id {id}` drops it",
            entry.reason
        )));
    }
    let mut applier = applier_for(config, p, &production).await?;
    let result = resolve_in_transaction(config, &mut applier, &entry, take).await;
    if result.is_err() {
        let _ = applier.rollback().await;
    }
    result.map_err(|e| match e {
        Resolved::Refused(why) => OpsError::Refused(why),
        Resolved::Apply(e) => apply_error(&production, e),
    })
}

/// Why a resolution stopped (its transaction then rolls back).
enum Resolved {
    Refused(String),
    Apply(ApplyError),
}

impl From<ApplyError> for Resolved {
    fn from(e: ApplyError) -> Self {
        Resolved::Apply(e)
    }
}

impl From<state::StateError> for Resolved {
    fn from(e: state::StateError) -> Self {
        Resolved::Apply(e.into())
    }
}

async fn resolve_in_transaction(
    config: &Config,
    applier: &mut Applier,
    entry: &Stored,
    take: &Take,
) -> Result<ResolveReport, Resolved> {
    let (Change::Row { table, key, .. }
    | Change::KeyChange {
        table,
        old_key: key,
        ..
    }) = decode(config, applier, entry).map_err(Resolved::Refused)?;
    applier.begin_now().await?;
    let edits = applier.lock_row_and_edits(table, &key).await?;
    let chain = quarantine::parked_of_row(
        applier.client(),
        &config.sync.slot,
        &entry.table,
        &entry.key,
    )
    .await?;
    if let Some(first) = chain.first()
        && first.id != entry.id
    {
        return Err(Resolved::Refused(format!(
            "change {} is parked behind change {} of the same row: resolve {} (the decision covers every parked change of the row, in order)",
            entry.id, first.id, first.id
        )));
    }
    let (took, outcome) = match take {
        Take::Staging => ("staging", "staging-wins (resolved)"),
        Take::Production => ("production", "production-wins (resolved)"),
        Take::Merged(_) => ("merged", "merged (resolved)"),
    };
    state::production_edits::settle(applier.client(), &edits, outcome).await?;
    let mut last_key = key.clone();
    for parked in &chain {
        if *take != Take::Production {
            let change = decode(config, applier, parked).map_err(Resolved::Refused)?;
            let source = Source {
                lsn: parked.lsn.parse().unwrap_or_default(),
                xid: parked.xid as Xid,
            };
            match change {
                Change::Row { table, key, op } => {
                    last_key = if matches!(op, RowOp::Delete) {
                        Vec::new()
                    } else {
                        key.clone()
                    };
                    applier.row_change(table, key, op, source).await?;
                }
                Change::KeyChange {
                    table,
                    old_key,
                    new,
                } => {
                    let meta = applier.meta(table);
                    last_key = meta
                        .key
                        .iter()
                        .map(|&k| match &new[k] {
                            Value::Text(b) => Some(b.clone()),
                            _ => None,
                        })
                        .collect();
                    applier.key_change(table, old_key, new, source).await?;
                }
            }
            applier.flush().await?;
        }
        quarantine::remove(applier.client(), parked.id).await?;
    }
    if let Take::Merged(values) = take {
        let meta = applier.meta(table);
        let mut columns = Vec::with_capacity(values.len());
        for (name, value) in values {
            let Some(c) = meta.column_index(name) else {
                return Err(Resolved::Refused(format!(
                    "table {} has no column {name}",
                    meta.table_name()
                )));
            };
            columns.push((c, value.as_ref().map(|v| Bytes::from(v.clone()))));
        }
        if last_key.is_empty() || applier.write_values(table, &last_key, &columns).await? == 0 {
            return Err(Resolved::Refused(format!(
                "staging's parked changes leave no row of {} to set the merged values in: take staging or production instead",
                entry.table
            )));
        }
    }
    // The progress row stays where sync left it; the marker only closes the batch.
    let lsn: Lsn = entry.lsn.parse().unwrap_or_default();
    let marker = Progress {
        end_lsn: lsn,
        commit_lsn: lsn,
        xid: entry.xid as Xid,
        commit_time: crate::model::PgTimestamp::now(),
        stream_seq: None,
    };
    applier.close(&marker).await?;
    applier.complete().await?;
    applier.take_committed();
    Ok(ResolveReport {
        changes: chain.iter().map(|c| c.id).collect(),
        edits,
        took: took.to_owned(),
    })
}

fn apply_error(endpoint: &Endpoint, e: ApplyError) -> OpsError {
    OpsError::Refused(format!("on {}: {e}", endpoint.describe()))
}

/// A quarantined change as the applier takes it.
enum Change {
    Row {
        table: usize,
        key: Key,
        op: RowOp,
    },
    KeyChange {
        table: usize,
        old_key: Key,
        new: Tuple,
    },
}

/// Applies one change and removes its entry in one production transaction.
async fn apply_one(
    applier: &mut Applier,
    entry: &Stored,
    change: Change,
) -> Result<(), ApplyError> {
    let source = Source {
        lsn: entry.lsn.parse().unwrap_or_default(),
        xid: entry.xid as Xid,
    };
    match change {
        Change::Row { table, key, op } => applier.row_change(table, key, op, source).await?,
        Change::KeyChange {
            table,
            old_key,
            new,
        } => applier.key_change(table, old_key, new, source).await?,
    }
    applier.flush().await?;
    quarantine::remove(applier.client(), entry.id).await?;
    let marker = Progress {
        end_lsn: source.lsn,
        commit_lsn: source.lsn,
        xid: source.xid,
        commit_time: crate::model::PgTimestamp::now(),
        stream_seq: None,
    };
    applier.close(&marker).await?;
    applier.complete().await?;
    applier.take_committed();
    Ok(())
}

/// The change an entry records, in production's column order.
fn decode(config: &Config, applier: &Applier, entry: &Stored) -> Result<Change, String> {
    let table = config
        .tables
        .iter()
        .position(|t| t.name.to_string() == entry.table)
        .ok_or_else(|| {
            format!(
                "quarantined change {} is of {}, which is no longer in [[tables]]: discard it (`quarantine discard --id {}`)",
                entry.id, entry.table, entry.id
            )
        })?;
    let meta = applier.meta(table);
    let key = key_of(meta, &entry.key, entry.id)?;
    let row = match &entry.row {
        None => None,
        Some(row) => Some(row_of(meta, row, entry.id)?),
    };
    match (entry.operation.as_str(), row) {
        ("delete", _) => Ok(Change::Row {
            table,
            key,
            op: RowOp::Delete,
        }),
        ("insert", Some(row)) => Ok(Change::Row {
            table,
            key,
            op: RowOp::Insert(row),
        }),
        ("update", Some(row)) => {
            let new_key: Key = meta
                .key
                .iter()
                .map(|&k| match &row[k] {
                    Value::Text(b) => Some(b.clone()),
                    _ => None,
                })
                .collect();
            if new_key.iter().all(Option::is_some) && new_key != key {
                Ok(Change::KeyChange {
                    table,
                    old_key: key,
                    new: row,
                })
            } else {
                Ok(Change::Row {
                    table,
                    key,
                    op: RowOp::Update(row),
                })
            }
        }
        (op, _) => Err(format!(
            "quarantined change {} ({op} of {}) has no row to apply; discard it",
            entry.id, entry.table
        )),
    }
}

fn text(value: &serde_json::Value) -> Option<Bytes> {
    value.as_str().map(|s| Bytes::from(s.to_owned()))
}

fn key_of(meta: &TableMeta, key: &serde_json::Value, id: i64) -> Result<Key, String> {
    meta.key
        .iter()
        .map(|&k| {
            let name = &meta.columns[k].name;
            match key.get(name) {
                Some(v) if v.is_string() => Ok(text(v)),
                _ => Err(format!(
                    "quarantined change {id} lacks key column {name} of {}; discard it",
                    meta.table_name()
                )),
            }
        })
        .collect()
}

fn row_of(meta: &TableMeta, row: &serde_json::Value, id: i64) -> Result<Tuple, String> {
    meta.columns
        .iter()
        .map(|column| match row.get(&column.name) {
            // Not recorded (not sent, or a column added since): left as production has it.
            None => Ok(Value::UnchangedToast),
            Some(serde_json::Value::Null) => Ok(Value::Null),
            Some(v @ serde_json::Value::String(_)) => Ok(Value::Text(text(v).unwrap_or_default())),
            Some(v) if v.get("unchanged_toast").is_some() => Ok(Value::UnchangedToast),
            Some(_) => Err(format!(
                "quarantined change {id} holds no value of column {} of {} (binary values are not \
                 kept in the quarantine); apply it by hand and discard it",
                column.name,
                meta.table_name()
            )),
        })
        .collect()
}
