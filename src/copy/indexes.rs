//! Secondary indexes of empty target tables are dropped before loading and built again once a
//! table is complete, by the workers in parallel: building an index from a whole table sorts
//! once, where loading with it inserts every row into it (measured in docs/copy.md, "Seeding with
//! copy"). Only plain indexes go: primary keys, unique and exclusion constraints and unique
//! indexes stay, so every constraint holds exactly as before. Each dropped index is recorded
//! ([`state::copy_indexes`]) in the dropping transaction and forgotten in the building one, so
//! what a failed copy left dropped is built by the next copy into the database.

use std::collections::HashMap;
use std::time::Instant;

use tokio_postgres::Client;

use super::{CopyError, db_error};
use crate::catalog::TableMeta;
use crate::pg::connect::Endpoint;
use crate::quote::qualified;
use crate::state::{self, copy_indexes::SetAside};

/// The plain secondary indexes of a table: not backing a constraint, not unique, valid.
async fn secondary(t: &Client, meta: &TableMeta) -> Result<Vec<SetAside>, tokio_postgres::Error> {
    let rows = t
        .query(
            "SELECT c.relname::text, pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1::text::regclass
                AND NOT i.indisprimary AND NOT i.indisunique AND NOT i.indisexclusion
                AND i.indisvalid AND i.indisready
                AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
              ORDER BY 1",
            &[&meta.qualified()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SetAside {
            table: meta.table_name(),
            name: r.get(0),
            definition: r.get(1),
        })
        .collect())
}

/// Builds, before loading, what an earlier copy left dropped on tables this copy does not load
/// piece by piece; drops (recording them) the secondary indexes of the tables it does. Returns
/// per loaded table the indexes to build once it is complete.
pub(super) async fn prepare(
    t: &Client,
    target: &Endpoint,
    metas: &[TableMeta],
    loaded_alone: &[usize],
) -> Result<HashMap<usize, Vec<SetAside>>, CopyError> {
    let leftovers = state::copy_indexes::read(t)
        .await
        .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
    let position = |index: &SetAside| metas.iter().position(|m| m.table_name() == index.table);
    for index in &leftovers {
        if position(index).is_some_and(|i| loaded_alone.contains(&i)) {
            continue;
        }
        tracing::info!(table = %index.table, index = %index.name, "building an index an interrupted copy left dropped");
        build(t, target, index).await?;
    }
    let mut aside: HashMap<usize, Vec<SetAside>> = HashMap::new();
    for index in leftovers {
        if let Some(i) = position(&index).filter(|i| loaded_alone.contains(i)) {
            aside.entry(i).or_default().push(index);
        }
    }
    let mut to_drop = Vec::new();
    for &i in loaded_alone {
        let found = secondary(t, &metas[i])
            .await
            .map_err(db_error(target, "reading the target's indexes"))?;
        to_drop.extend(found.into_iter().map(|index| (i, index)));
    }
    if to_drop.is_empty() {
        return Ok(aside);
    }
    state::ensure(t)
        .await
        .map_err(|e| CopyError::Refused(format!("on {}: {e}", target.describe())))?;
    let drop_error = || db_error(target, "setting secondary indexes aside");
    t.batch_execute("BEGIN").await.map_err(drop_error())?;
    for (i, index) in &to_drop {
        state::copy_indexes::record(t, index)
            .await
            .map_err(drop_error())?;
        t.batch_execute(&format!(
            "DROP INDEX {}",
            qualified(&metas[*i].schema, &index.name)
        ))
        .await
        .map_err(drop_error())?;
    }
    t.batch_execute("COMMIT").await.map_err(drop_error())?;
    tracing::info!(
        indexes = %to_drop.iter().map(|(_, x)| format!("{}.{}", x.table, x.name)).collect::<Vec<_>>().join(", "),
        "dropped secondary indexes of the empty target tables: they are built again once their table is loaded"
    );
    for (i, index) in to_drop {
        aside.entry(i).or_default().push(index);
    }
    Ok(aside)
}

/// Builds a set-aside index again and forgets it, in one transaction.
pub(super) async fn build(
    t: &Client,
    target: &Endpoint,
    index: &SetAside,
) -> Result<(), CopyError> {
    let started = Instant::now();
    let error = || db_error(target, "building a secondary index again");
    // pg_get_indexdef's "CREATE INDEX name ON ...": an index made by hand meanwhile stays.
    let definition = match index.definition.strip_prefix("CREATE INDEX ") {
        Some(rest) => format!("CREATE INDEX IF NOT EXISTS {rest}"),
        None => index.definition.clone(),
    };
    t.batch_execute("BEGIN").await.map_err(error())?;
    t.batch_execute(&definition).await.map_err(error())?;
    state::copy_indexes::forget(t, index)
        .await
        .map_err(error())?;
    t.batch_execute("COMMIT").await.map_err(error())?;
    tracing::info!(
        table = %index.table,
        index = %index.name,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "built index"
    );
    Ok(())
}
