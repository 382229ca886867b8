//! A schema change from staging, applied to production in the open transaction, after
//! everything before it and before every row after it: the plan's `ALTER TABLE` statements,
//! then the table's shape read again (the Relation message staging sends next maps onto it),
//! and a row in `stagingprop.schema_changes`, all committed with the batch's progress row.

use super::error::query_error;
use super::index_builds::WaitingBuild;
use super::{Applier, ApplyError, SchemaChangeRefused};
use crate::catalog;
use crate::change::Source;
use crate::ddl::{self, Plan, SchemaChange};
use crate::state::schema_changes;

/// A plan written for people: one statement a line.
pub fn describe(plan: &Plan) -> String {
    let mut lines = plan.statements.clone();
    lines.extend(
        plan.after_commit
            .iter()
            .map(|w| format!("{} (after the transaction)", w.statement)),
    );
    lines.extend(
        plan.left_alone
            .iter()
            .map(|l| format!("(left to production: {l})")),
    );
    if lines.is_empty() {
        "nothing to change on production".to_owned()
    } else {
        lines.join("\n    ")
    }
}

impl Applier {
    /// The plans for `change`, one per managed table of this session it touches; an error
    /// names a change production cannot be made to follow.
    pub(super) fn plan_schema_change(
        &self,
        change: &SchemaChange,
        source: Source,
    ) -> Result<Vec<Plan>, ApplyError> {
        let mut plans = Vec::new();
        for table_change in &change.tables {
            let Some(shape) = table_change.before.as_ref().or(table_change.after.as_ref()) else {
                continue;
            };
            let name = shape.table_name();
            let Some(t) = self.tables.iter().position(|t| t.meta.table_name() == name) else {
                // Not managed by this configuration (another scope's table).
                continue;
            };
            let state = &self.tables[t];
            let refused = |obstacle: String| {
                SchemaChangeRefused::error(
                    name.clone(),
                    &change.statement,
                    String::new(),
                    obstacle,
                    source,
                )
            };
            match (&table_change.before, &table_change.after) {
                (Some(before), None) => {
                    // Dropped on staging: production's goes too only where the config says so.
                    plans.push(ddl::drop_plan(
                        before,
                        state.drop_with_staging && !state.absent,
                    ));
                    continue;
                }
                (None, Some(after)) => {
                    plans.push(if state.absent {
                        ddl::create_plan(after).map_err(refused)?
                    } else {
                        Plan {
                            table: name.clone(),
                            statements: Vec::new(),
                            after_commit: Vec::new(),
                            left_alone: vec![
                                "the table was created on staging; production has it already"
                                    .into(),
                            ],
                        }
                    });
                    continue;
                }
                _ => {}
            }
            if let (Some(before), Some(after)) = (&table_change.before, &table_change.after)
                && before.table_name() != after.table_name()
            {
                // Followed between tables the patterns manage (this session manages the new
                // name too), without remapping (its rules are the old name's).
                let renamed = self
                    .tables
                    .iter()
                    .any(|s| s.from_pattern && s.meta.table_name() == after.table_name());
                if state.from_pattern && renamed && self.remap.is_none() {
                    plans.push(ddl::rename_plan(before, after).map_err(refused)?);
                    continue;
                }
            }
            if let Some(remap) = &self.remap {
                remap.check_change(t, table_change).map_err(refused)?;
            }
            plans.push(ddl::plan(table_change, &state.meta, &state.columns).map_err(refused)?);
        }
        Ok(plans)
    }

    /// Applies `change` in the open transaction.
    pub(super) async fn apply_schema_change(
        &mut self,
        change: &SchemaChange,
        source: Source,
    ) -> Result<Vec<Plan>, ApplyError> {
        let plans = self.plan_schema_change(change, source)?;
        self.begin().await?;
        self.flush().await?;
        self.settle().await?;
        for plan in &plans {
            let refused = |obstacle: String| {
                SchemaChangeRefused::error(
                    plan.table.clone(),
                    &change.statement,
                    describe(plan),
                    obstacle,
                    source,
                )
            };
            self.run_waiting_builds(&plan.table).await?;
            for statement in &plan.statements {
                if let Err(e) = self.client.batch_execute(statement).await {
                    return Err(refused(match e.as_db_error() {
                        Some(db) => format!("production refused `{statement}`: {}", db.message()),
                        None => format!("production refused `{statement}`: {e}"),
                    }));
                }
            }
            let t = self
                .tables
                .iter()
                .position(|t| t.meta.table_name() == plan.table)
                .expect("planned for a managed table");
            let dropped = change.tables.iter().any(|c| {
                c.after.is_none()
                    && c.before
                        .as_ref()
                        .is_some_and(|b| b.table_name() == plan.table)
            });
            if dropped {
                // Dropped on staging: no rows of it come any more; production lacks it too
                // when the plan dropped it.
                self.tables[t].absent |= !plan.statements.is_empty();
            } else if !plan.statements.is_empty() {
                // A created table gets its guard now; a changed key or name, the guard that
                // records edits by them (a renamed table's old name is gone from production).
                let mut guard_again = false;
                for c in &change.tables {
                    if let (before, Some(after)) = (&c.before, &c.after)
                        && after.table_name() == plan.table
                    {
                        let Some(before) = before else {
                            guard_again = true;
                            continue;
                        };
                        guard_again |= before.primary_key != after.primary_key;
                        if before.table_name() != plan.table {
                            guard_again = true;
                            if let Some(old) = self
                                .tables
                                .iter()
                                .position(|s| s.meta.table_name() == before.table_name())
                            {
                                self.tables[old].absent = true;
                            }
                        }
                    }
                }
                if guard_again && let Some(table) = &self.tables[t].guarded {
                    crate::guard::install::install_now(&self.client, table)
                        .await
                        .map_err(refused)?;
                }
                let reloaded = catalog::load_table(&self.client, &plan.table)
                    .await
                    .map_err(query_error("reading a table after its schema change"))?
                    .ok_or_else(|| {
                        ApplyError::Schema(format!("{} is gone on production", plan.table))
                    })?;
                self.tables[t].meta = reloaded;
                self.tables[t].absent = false;
            }
            // Remapping finds the table's columns and references again (a new column with a
            // foreign key to a remapped table is translated from its first row on).
            if let Some(remap) = &mut self.remap
                && let Some(table_change) = change.tables.iter().find(|c| {
                    c.after
                        .as_ref()
                        .is_some_and(|a| a.table_name() == plan.table)
                })
            {
                remap
                    .reshape(t, &self.tables[t].meta, table_change)
                    .map_err(refused)?;
            }
            if self.record_progress {
                schema_changes::record(
                    &self.client,
                    &schema_changes::Entry {
                        slot: &self.slot,
                        lsn: source.lsn,
                        xid: source.xid,
                        change: change.id,
                        table: &plan.table.to_string(),
                        statement: &change.statement,
                        plan: &describe(plan),
                    },
                )
                .await?;
                for work in &plan.after_commit {
                    let id = schema_changes::record_build(
                        &self.client,
                        &self.slot,
                        change.id,
                        &work.index,
                        &work.statement,
                    )
                    .await?;
                    self.builds_waiting.push(WaitingBuild {
                        id,
                        index: work.index.clone(),
                        in_transaction: work.in_transaction.clone(),
                    });
                }
            }
            tracing::info!(
                table = %plan.table,
                lsn = %source.lsn,
                "applied staging's schema change of {}: {}",
                plan.table,
                describe(plan)
            );
        }
        if plans.iter().any(|p| !p.statements.is_empty()) {
            // A foreign key added or dropped changes which tables go first (a parent's keys
            // are decided before its children's references to them are translated).
            let metas: Vec<&crate::catalog::TableMeta> =
                self.tables.iter().map(|t| &t.meta).collect();
            let edges = catalog::foreign_keys(&self.client, &metas)
                .await
                .map_err(query_error("reading foreign keys after a schema change"))?;
            self.order = catalog::parents_first(self.tables.len(), &edges);
        }
        Ok(plans)
    }
}
