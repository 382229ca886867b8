//! How copy applies the tables' key rules: one rewrite plan per table, the key-map entries it
//! writes, and the reset of production's key map after a copy back to staging.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::Client;

use super::rewrite::{ColumnRewrite, Translate};
use super::{CopyError, CopyOptions, Side, db_error};
use crate::catalog::{self, TableMeta};
use crate::config::{Config, KeyRule};
use crate::pg::connect::Endpoint;
use crate::quote::quote_ident;
use crate::remap::Remapper;
use crate::remap::store::{self as key_map, Statements};
use crate::state;

/// How copy changes one table's keys on the way.
#[derive(Clone, Debug, Default)]
pub(super) struct KeyPlan {
    pub(super) rewrites: Vec<ColumnRewrite>,
    /// Tables with a mapping rule: the key-map entries (staging key, production key) that
    /// replace the table's, written in the transaction that loads it.
    pub(super) key_map: Option<Arc<Vec<(i64, i64)>>>,
}

/// The key rules of the copied tables (`metas`, the source's): one plan per table, and (copies
/// to staging) the config indexes of tables whose key map on production is reset afterwards.
#[allow(clippy::too_many_arguments)]
pub(super) async fn plan_keys(
    config: &Config,
    options: &CopyOptions,
    metas: &[TableMeta],
    source: &Endpoint,
    s: &Client,
    target: &Endpoint,
    t: &Client,
    snapshot: &str,
) -> Result<(Vec<KeyPlan>, Vec<usize>), CopyError> {
    let mut plans = vec![KeyPlan::default(); metas.len()];
    if config.tables.iter().all(|t| t.key == KeyRule::Identity) {
        return Ok((plans, Vec::new()));
    }
    let forward = options.to == Side::Production;
    let (production, p) = if forward { (target, t) } else { (source, s) };
    let (staging, st) = if forward { (source, s) } else { (target, t) };
    let mut production_metas = Vec::with_capacity(config.tables.len());
    for table in &config.tables {
        match catalog::load_table(p, &table.name)
            .await
            .map_err(db_error(production, "reading table definitions"))?
        {
            Some(meta) => production_metas.push(meta),
            None => {
                return Err(CopyError::Schema(vec![format!(
                    "production: table {} does not exist; key remapping needs every managed table",
                    table.name
                )]));
            }
        }
    }
    let declared = catalog::column_references(st)
        .await
        .map_err(db_error(staging, "reading foreign keys"))?;
    let remapper = Remapper::new(config, &production_metas, &declared).map_err(CopyError::Rules)?;
    let Some(remapper) = remapper else {
        return Ok((plans, Vec::new()));
    };
    let config_index: Vec<usize> = metas
        .iter()
        .map(|m| {
            config
                .tables
                .iter()
                .position(|t| t.name == m.table_name())
                .expect("copied tables are managed tables")
        })
        .collect();
    let copied: HashMap<usize, usize> = config_index
        .iter()
        .enumerate()
        .map(|(i, &ci)| (ci, i))
        .collect();
    // The copy column list is the source's column order.
    let position = |i: usize, ci: usize, c: usize| -> Result<usize, CopyError> {
        let name = remapper.column_name(ci, c);
        metas[i].column_index(name).ok_or_else(|| {
            CopyError::Rules(vec![format!(
                "{}.{name} holds remapped keys on production but does not exist on the source; add it there or remove it from [[references]]",
                config.tables[ci].name
            )])
        })
    };

    if !forward {
        // Production's keys become staging's: only offsets are undone.
        let mut reset = Vec::new();
        for (i, &ci) in config_index.iter().enumerate() {
            let rule = remapper.rule(ci);
            if let (KeyRule::Offset { offset }, Some(k)) = (rule, remapper.key_column(ci)) {
                plans[i].rewrites.push(ColumnRewrite {
                    column: position(i, ci, k)?,
                    translate: Translate::Offset(-offset),
                });
            }
            for reference in remapper.references(ci) {
                if let KeyRule::Offset { offset } = remapper.rule(reference.parent) {
                    plans[i].rewrites.push(ColumnRewrite {
                        column: position(i, ci, reference.column)?,
                        translate: Translate::Offset(-offset),
                    });
                }
            }
            if !matches!(rule, KeyRule::Identity | KeyRule::Offset { .. }) {
                reset.push(ci);
            }
        }
        return Ok((plans, reset));
    }

    // Fresh production keys for every row of the copied allocate/natural tables, in key order.
    let mut maps: HashMap<usize, Arc<HashMap<i64, i64>>> = HashMap::new();
    let keys_error = |e: key_map::StoreError| CopyError::Keys {
        target: production.describe(),
        message: e.to_string(),
    };
    let mut statements = Statements::default();
    let mut planner: Option<Client> = None;
    for (i, &ci) in config_index.iter().enumerate() {
        let (KeyRule::Allocate { source: keys } | KeyRule::Natural { source: keys, .. }) =
            remapper.rule(ci)
        else {
            continue;
        };
        if planner.is_none() {
            let c = source
                .connect()
                .await
                .map_err(db_error(source, "connect"))?;
            c.batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::quote::quote_literal(snapshot)
            ))
            .await
            .map_err(db_error(source, "importing the snapshot"))?;
            planner = Some(c);
        }
        let key = remapper.key_column(ci).expect("mapping rules have a key");
        let key_name = quote_ident(remapper.column_name(ci, key));
        let sources: Vec<i64> = planner
            .as_ref()
            .expect("opened above")
            .query(
                &format!(
                    "SELECT {key_name}::bigint FROM {} ORDER BY 1",
                    metas[i].own_rows()
                ),
                &[],
            )
            .await
            .map_err(db_error(source, "reading keys"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let targets = statements
            .allocate(p, &config.tables[ci].name, keys, sources.len())
            .await
            .map_err(keys_error)?;
        let pairs: Vec<(i64, i64)> = sources.into_iter().zip(targets).collect();
        maps.insert(ci, Arc::new(pairs.iter().copied().collect()));
        plans[i].key_map = Some(Arc::new(pairs));
        plans[i].rewrites.push(ColumnRewrite {
            column: position(i, ci, key)?,
            translate: Translate::Map(maps[&ci].clone()),
        });
    }
    for (i, &ci) in config_index.iter().enumerate() {
        match remapper.rule(ci) {
            KeyRule::RemapOnConflict { .. } => plans[i].key_map = Some(Arc::new(Vec::new())),
            KeyRule::Offset { offset } => {
                let key = remapper.key_column(ci).expect("offset tables have a key");
                plans[i].rewrites.push(ColumnRewrite {
                    column: position(i, ci, key)?,
                    translate: Translate::Offset(*offset),
                });
            }
            _ => {}
        }
        for reference in remapper.references(ci) {
            let parent = reference.parent;
            let translate = match remapper.rule(parent) {
                KeyRule::Identity => continue,
                KeyRule::Offset { offset } => Translate::Offset(*offset),
                // Copied now: its keys are kept.
                KeyRule::RemapOnConflict { .. } if copied.contains_key(&parent) => continue,
                _ => match maps.get(&parent) {
                    Some(map) => Translate::Map(map.clone()),
                    None => {
                        // Not copied now: production's key map says where its rows are.
                        let stored = state::key_map::read_table(p, &config.tables[parent].name)
                            .await
                            .map_err(db_error(production, "reading the key map"))?;
                        let map = Arc::new(stored);
                        maps.insert(parent, map.clone());
                        Translate::Map(map)
                    }
                },
            };
            plans[i].rewrites.push(ColumnRewrite {
                column: position(i, ci, reference.column)?,
                translate,
            });
        }
    }
    if let Some(planner) = planner {
        let _ = planner.batch_execute("COMMIT").await;
    }
    Ok((plans, Vec::new()))
}

/// After a copy to staging, staging's keys are production's: production's key map is reset to
/// say so (no entries for remap-on-conflict tables, `key = key` for allocating ones).
pub(super) async fn reset_production_key_map(
    config: &Config,
    p: &Client,
    production: &Endpoint,
    tables: &[usize],
) -> Result<(), CopyError> {
    state::ensure(p)
        .await
        .map_err(|e| CopyError::Refused(format!("on {}: {e}", production.describe())))?;
    let mut sql = String::from("BEGIN;");
    for &ci in tables {
        let table = &config.tables[ci];
        let mut identity_key = None;
        if matches!(
            table.key,
            KeyRule::Allocate { .. } | KeyRule::Natural { .. }
        ) {
            let meta = catalog::load_table(p, &table.name)
                .await
                .map_err(db_error(production, "reading table definitions"))?
                .ok_or_else(|| {
                    CopyError::Refused(format!("production: no table {}", table.name))
                })?;
            identity_key = meta.key.first().map(|&k| meta.columns[k].name.clone());
        }
        sql.push_str(&state::key_map::reset_table(
            &table.name,
            identity_key.as_deref(),
        ));
    }
    sql.push_str("COMMIT;");
    p.batch_execute(&sql)
        .await
        .map_err(db_error(production, "resetting the key map"))?;
    tracing::info!(
        tables = tables.len(),
        "production's key map reset: staging now has production's keys"
    );
    Ok(())
}
