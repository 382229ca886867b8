//! `stagingprop.copy_tables`: what a copy loading piece by piece has committed on the target,
//! one row per table or block range, written in the transaction that loads it. A copy that
//! failed is resumed from it (tables complete in the earlier run stay, the rest load again from
//! a newer snapshot), and sync reads each table's snapshot position from it, so a table loaded
//! from a later snapshot than the hand-off skips the changes that snapshot already holds.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{StateError, query_error, table};
use crate::config::TableName;
use crate::model::Lsn;

/// One committed piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedPiece {
    pub table: TableName,
    /// `""` for a whole table, else the block range (`"blocks 0-1200"`).
    pub piece: String,
    /// How many pieces the table was cut into by the run that loaded this one.
    pub of_pieces: i32,
    /// The position of the snapshot the piece was read in (0/0 for copies without a hand-off).
    pub snapshot_lsn: Lsn,
}

/// Records a committed piece; call inside the transaction that loads it.
pub async fn record(
    client: &Client,
    slot: &str,
    loaded: &LoadedPiece,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            &format!(
                "INSERT INTO {} (slot, table_name, piece, of_pieces, snapshot_lsn) \
                 VALUES ($1, $2, $3, $4, $5::text::pg_lsn)",
                table("copy_tables")
            ),
            &[
                &slot,
                &loaded.table.to_string(),
                &loaded.piece,
                &loaded.of_pieces,
                &loaded.snapshot_lsn.to_string(),
            ],
        )
        .await
        .map(drop)
}

/// Every piece recorded for `slot`.
pub async fn read(client: &Client, slot: &str) -> Result<Vec<LoadedPiece>, StateError> {
    let rows = client
        .query(
            &format!(
                "SELECT table_name, piece, of_pieces, snapshot_lsn::text FROM {} WHERE slot = $1 \
                 ORDER BY table_name, piece",
                table("copy_tables")
            ),
            &[&slot],
        )
        .await
        .map_err(query_error("reading the copy's loaded tables"))?;
    rows.iter()
        .map(|r| {
            let name: String = r.get(0);
            let lsn: String = r.get(3);
            Ok(LoadedPiece {
                table: name.parse().map_err(|e: String| {
                    StateError::Corrupt(format!("copy_tables names table {name:?}: {e}"))
                })?,
                piece: r.get(1),
                of_pieces: r.get(2),
                snapshot_lsn: lsn.parse().map_err(|_| {
                    StateError::Corrupt(format!("copy_tables holds snapshot_lsn {lsn:?}"))
                })?,
            })
        })
        .collect()
}

/// Tables every piece of which is recorded, with their snapshot position.
pub fn complete(pieces: &[LoadedPiece]) -> HashMap<TableName, Lsn> {
    let mut counted: HashMap<&TableName, (i32, i32, Lsn)> = HashMap::new();
    for p in pieces {
        let entry = counted
            .entry(&p.table)
            .or_insert((0, p.of_pieces, p.snapshot_lsn));
        entry.0 += 1;
        // Pieces of one table always come from one run; a mix is never complete.
        if entry.1 != p.of_pieces || entry.2 != p.snapshot_lsn {
            entry.1 = -1;
        }
    }
    counted
        .into_iter()
        .filter(|(_, (n, of, _))| *of > 0 && n == of)
        .map(|(t, (_, _, lsn))| (t.clone(), lsn))
        .collect()
}

/// Forgets `slot`'s pieces (a copy starting afresh), or only those of `tables`.
pub async fn forget(
    client: &Client,
    slot: &str,
    tables: Option<&[TableName]>,
) -> Result<(), StateError> {
    match tables {
        None => {
            client
                .execute(
                    &format!("DELETE FROM {} WHERE slot = $1", table("copy_tables")),
                    &[&slot],
                )
                .await
        }
        Some(tables) => {
            let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
            client
                .execute(
                    &format!(
                        "DELETE FROM {} WHERE slot = $1 AND table_name = ANY($2)",
                        table("copy_tables")
                    ),
                    &[&slot, &names],
                )
                .await
        }
    }
    .map(drop)
    .map_err(query_error("forgetting the copy's loaded tables"))
}

/// Tables every piece of which a copy into `slot`'s target recorded, with their snapshot
/// positions (none on a layout before `copy_tables`).
pub async fn complete_tables(
    client: &Client,
    slot: &str,
) -> Result<HashMap<TableName, Lsn>, StateError> {
    let exists = super::exists(client, "copy_tables")
        .await
        .map_err(query_error("looking for the copy's loaded tables"))?;
    if !exists {
        return Ok(HashMap::new());
    }
    Ok(complete(&read(client, slot).await?))
}

/// Tables whose snapshot is later than `handoff`: sync skips their changes in transactions
/// that committed before that snapshot (their rows already hold them).
pub async fn ahead_of(
    client: &Client,
    slot: &str,
    handoff: Lsn,
) -> Result<HashMap<TableName, Lsn>, StateError> {
    let mut complete = complete_tables(client, slot).await?;
    complete.retain(|_, lsn| *lsn > handoff);
    Ok(complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(table: &str, piece: &str, of: i32, lsn: u64) -> LoadedPiece {
        LoadedPiece {
            table: table.parse().unwrap(),
            piece: piece.into(),
            of_pieces: of,
            snapshot_lsn: Lsn(lsn),
        }
    }

    #[test]
    fn a_table_is_complete_when_every_piece_of_one_run_is_in() {
        let pieces = [
            piece("public.a", "", 1, 10),
            piece("public.b", "blocks 0-5", 2, 10),
            piece("public.c", "blocks 0-5", 2, 10),
            piece("public.c", "blocks 5-end", 2, 10),
            // Two pieces of different runs are not a whole table.
            piece("public.d", "blocks 0-5", 2, 10),
            piece("public.d", "blocks 5-end", 2, 20),
        ];
        let complete = complete(&pieces);
        assert_eq!(complete.len(), 2, "{complete:?}");
        assert_eq!(complete[&"public.a".parse().unwrap()], Lsn(10));
        assert_eq!(complete[&"public.c".parse().unwrap()], Lsn(10));
    }
}
