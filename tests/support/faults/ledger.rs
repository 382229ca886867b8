//! The ledger workload: every change shows if it is lost or applied twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use super::Db;

pub const LEDGER: &str = "
CREATE TABLE ledger (id bigint PRIMARY KEY, txn bigint NOT NULL, note text, blob text);
ALTER TABLE ledger ALTER blob SET STORAGE EXTERNAL;
CREATE TABLE counter (id int PRIMARY KEY, value bigint NOT NULL, last_txn bigint NOT NULL);
INSERT INTO counter VALUES (1, 0, 0);
CREATE TABLE auditlog (a int, b text);
";

pub const LEDGER_TABLES: &[(&str, &str)] = &[("ledger", "id"), ("counter", "id")];

/// One ledger transaction: a new row, the counter +1, an update of a recent row (its TOAST value
/// unchanged) and, every third time, a delete of an older row. Under `on_conflict = "error"` a
/// duplicated insert or delete is a conflict; a lost or duplicated one changes the counter.
pub fn ledger_txn(i: u64) -> String {
    let blob = if i.is_multiple_of(7) {
        format!("repeat('blob{i}', 2000)")
    } else {
        "NULL".to_owned()
    };
    let delete = if i.is_multiple_of(3) && i > 20 {
        format!("DELETE FROM ledger WHERE id = {};", i - 20)
    } else {
        String::new()
    };
    // Now and then a larger one: past a small logical_decoding_work_mem staging streams it.
    let bulk = if i.is_multiple_of(50) {
        format!(
            "UPDATE ledger SET txn = txn + 1 WHERE id BETWEEN {} AND {};",
            i.saturating_sub(45),
            i.saturating_sub(6)
        )
    } else {
        String::new()
    };
    format!(
        "BEGIN; INSERT INTO ledger VALUES ({i}, {i}, 'note {i}', {blob});
         UPDATE counter SET value = value + 1, last_txn = {i} WHERE id = 1;
         UPDATE ledger SET note = note || '+' WHERE id = {};
         {bulk} {delete} COMMIT;\n",
        i.saturating_sub(5)
    )
}

/// Writes ledger transactions to staging, 5 per psql call, until `stop`. Returns how many
/// committed. With `tolerate_errors` (staging restarts), a failed call is skipped.
pub fn ledger_workload(
    staging: Db,
    stop: Arc<AtomicBool>,
    tolerate_errors: bool,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut next = 1;
        let mut committed = 0;
        while !stop.load(Ordering::Relaxed) {
            let sql: String = (next..next + 5).map(ledger_txn).collect();
            match staging.try_sql(&sql) {
                Ok(_) => committed += 5,
                Err(e) if tolerate_errors => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("ledger workload: {e}"),
            }
            next += 5;
            thread::sleep(Duration::from_millis(10));
        }
        committed
    })
}
