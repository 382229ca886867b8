//! The pipeline's decisions, against a recorder standing in for production.

use std::sync::Mutex;

use super::*;
use crate::catalog::{ColumnMeta, TableMeta};
use crate::model::{Column, PgTimestamp, ReplicaIdentity};
use crate::model::{Tuple, Value};
use crate::pg::connect::TlsPolicy;
use crate::sync::dry_run::{DryRun, Log, Wal};
use crate::sync::feed::Scripted;
use bytes::Bytes;

const OID: Oid = 16384;

fn metas() -> Vec<TableMeta> {
    let column = |name: &str, type_sql: &str| ColumnMeta::new(name, type_sql);
    vec![TableMeta {
        schema: "public".into(),
        name: "t".into(),
        columns: vec![column("id", "bigint"), column("v", "text")],
        key: vec![0],
        identity_full: false,
        partitioned: false,
    }]
}

fn relation() -> LogicalMessage {
    relation_typed(25, -1)
}

/// The Relation of `public.t` with `v` of the type `v_type` (OID) and `v_modifier`.
fn relation_typed(v_type: Oid, v_modifier: i32) -> LogicalMessage {
    let column = |name: &str, is_key: bool, type_oid: Oid, type_modifier: i32| Column {
        name: name.into(),
        is_key,
        type_oid,
        type_modifier,
    };
    LogicalMessage::Relation {
        xid: None,
        relation: Relation {
            oid: OID,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", true, 20, -1),
                column("v", false, v_type, v_modifier),
            ],
        },
    }
}

/// Staging's types as a session learns them from its tables: `t`'s, a wider varchar and
/// `numeric(12,4)` (OID 1700, modifier (12 << 16 | 4) + 4).
fn staging_types() -> catalog::types::TypeNames {
    let mut types = catalog::types::TypeNames::default();
    types.learn(20, -1, "bigint");
    types.learn(25, -1, "text");
    types.learn(1043, 14, "character varying(10)");
    types.learn(1700, (12 << 16 | 4) + 4, "numeric(12,4)");
    types
}

fn row(id: u32) -> Tuple {
    vec![
        Value::Text(Bytes::from(id.to_string())),
        Value::Text(Bytes::from(format!("v{id}"))),
    ]
}

/// A script of messages, each at the next position.
#[derive(Default)]
struct Script {
    messages: VecDeque<Scripted>,
    at: u64,
    /// How long after staging committed them its transactions arrive (their commit
    /// timestamps are that far in the past).
    late: Duration,
}

impl Script {
    fn push(&mut self, message: LogicalMessage) -> &mut Self {
        self.at += 8;
        self.messages
            .push_back(Scripted::Message(Lsn(self.at), message));
        self
    }

    /// Staging sends nothing for a while (sync is caught up): as many polls as a pipeline
    /// that waits for nothing makes to close its batch and then commit it.
    fn idle(&mut self) -> &mut Self {
        self.messages.push_back(Scripted::Idle(4));
        self
    }

    /// Staging sends nothing for `millis` (tokio's clock).
    fn pause(&mut self, millis: u64) -> &mut Self {
        self.messages
            .push_back(Scripted::Pause(Duration::from_millis(millis)));
        self
    }

    /// A whole transaction `xid` inserting `ids`, committing at `commit` (its end 8 later).
    fn transaction(&mut self, xid: Xid, commit: u64, ids: &[u32]) -> &mut Self {
        self.push(LogicalMessage::Begin {
            final_lsn: Lsn(commit),
            commit_time: PgTimestamp(0),
            xid,
        });
        for &id in ids {
            self.push(LogicalMessage::Insert {
                xid: None,
                relation: OID,
                new: row(id),
            });
        }
        let stamp = PgTimestamp::now().0 - i64::try_from(self.late.as_micros()).unwrap();
        self.push(commit_message(commit, PgTimestamp(stamp)))
    }

    /// Inserts of `ids` inside a streamed block of `xid` (changes of subtransaction `sub`).
    fn streamed(&mut self, xid: Xid, sub: Xid, ids: &[u32]) -> &mut Self {
        self.push(LogicalMessage::StreamStart {
            xid,
            first_segment: false,
        });
        for &id in ids {
            self.push(LogicalMessage::Insert {
                xid: Some(sub),
                relation: OID,
                new: row(id),
            });
        }
        self.push(LogicalMessage::StreamStop)
    }
}

fn commit_message(commit: u64, commit_time: PgTimestamp) -> LogicalMessage {
    LogicalMessage::Commit {
        flags: 0,
        commit_lsn: Lsn(commit),
        end_lsn: Lsn(commit + 8),
        commit_time,
    }
}

fn stream_commit(xid: Xid, commit: u64) -> LogicalMessage {
    LogicalMessage::StreamCommit {
        xid,
        flags: 0,
        commit_lsn: Lsn(commit),
        end_lsn: Lsn(commit + 8),
        commit_time: PgTimestamp::now(),
    }
}

fn stream_abort(xid: Xid, subxact_xid: Xid) -> LogicalMessage {
    LogicalMessage::StreamAbort {
        xid,
        subxact_xid,
        abort_lsn: None,
        abort_time: None,
    }
}

/// What one run of the pipeline over a script did.
struct Run {
    result: Result<(), SyncError>,
    log: Vec<String>,
    confirmed: Vec<Lsn>,
    /// Staging's inserts the run counts as applied.
    inserted: u64,
}

/// Runs a pipeline over `script` to its end, production having everything up to
/// `applied_end`, with `[sync]` settings `sync_conf` (batches close only on their limits
/// unless it says otherwise).
async fn apply_script(script: Script, applied_end: Lsn, sync_conf: &str) -> Run {
    apply_until(script, applied_end, sync_conf, None).await
}

/// [`apply_script`] with a cutoff.
async fn apply_until(
    script: Script,
    applied_end: Lsn,
    sync_conf: &str,
    until: Option<Until>,
) -> Run {
    let config = Config::from_toml_str(
        &format!(
            "[staging]\nurl = \"host=127.0.0.1 dbname=s user=u\"\n\
             [production]\nurl = \"host=127.0.0.1 dbname=p user=u\"\n\
             [sync]\nbatch_max_delay_ms = 3600000\n{sync_conf}\n\
             [[tables]]\nname = \"public.t\"\n"
        ),
        "test.toml",
    )
    .unwrap();
    let staging = Endpoint::new(
        "staging",
        "host=127.0.0.1 dbname=s user=u".parse().unwrap(),
        TlsPolicy::Disable,
    );
    let (log, wal) = (Log::default(), Arc::new(Wal::default()));
    let max_rows = config.sync.batch_max_rows;
    let mut main = DryRun::recording("main", &log, &wal, metas(), max_rows);
    main.set_progress_at(applied_end);
    let sessions = StreamSessions::new({
        let (log, wal) = (log.clone(), wal.clone());
        let mut opened = 0;
        Box::new(move || {
            opened += 1;
            let session = DryRun::recording(&format!("s{opened}"), &log, &wal, metas(), max_rows);
            Box::pin(async move { Ok(session) })
        })
    });
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let mut state = RunState {
        stats: apply::ApplyStats::default(),
        one_by_one_until: None,
        last_applied: None,
        last_received: Lsn::INVALID,
        stop_lsn: None,
        staging_schema: None,
        changes: ChangeCounts::default(),
        lag: None,
        last_commit_time: None,
        feed_start: Lsn::INVALID,
        created: Vec::new(),
    };
    let mut pipeline = Pipeline::new(
        &config,
        &staging,
        main,
        applied_end,
        Confirm::Record(confirmed.clone()),
        &state,
        Some(sessions),
    );
    pipeline.until = until;
    pipeline.types = staging_types();
    let mut feed = Feed::Script(script.messages);
    let mut shutdown = std::pin::pin!(std::future::pending::<()>());
    let result = pipeline
        .run(&mut feed, None, &mut state, shutdown.as_mut())
        .await
        .map(|_| ());
    Run {
        result,
        log: log.lines(),
        confirmed: confirmed.lock().unwrap().clone(),
        inserted: pipeline.committed_counts.total().inserted,
    }
}

fn lines(expected: &[&str]) -> Vec<String> {
    expected.iter().map(|l| (*l).to_owned()).collect()
}

#[tokio::test]
async fn what_production_has_is_skipped_and_the_rest_committed_in_one_batch() {
    let mut script = Script::default();
    script.push(relation());
    script.transaction(700, 100, &[1]); // production has it (its commit is before 0/C8)
    script.transaction(701, 300, &[2, 3]);
    script.transaction(702, 400, &[4]);
    let run = apply_script(script, Lsn(200), "").await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 2",
            "main insert 3",
            "main insert 4",
            "main flush 3 rows",
            "main COMMIT 0/198 (progress from 0/C8)",
        ])
    );
    // Confirmed once production flushed past the commit (the stop flushes it).
    assert_eq!(run.confirmed, vec![Lsn(408)]);
}

#[tokio::test]
async fn a_batch_closes_at_the_first_commit_past_its_row_limit() {
    let mut script = Script::default();
    script.push(relation());
    script.transaction(701, 100, &[1]);
    // Its second row reaches the limit: sent at once (memory stays bounded), and the
    // batch closes at its commit, however many rows were sent before.
    script.transaction(702, 200, &[2, 3, 4]);
    script.transaction(703, 300, &[5]);
    let run = apply_script(script, Lsn::INVALID, "batch_max_rows = 2").await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 1",
            "main insert 2",
            "main flush 2 rows",
            "main insert 3",
            "main insert 4",
            "main flush 2 rows",
            // The closed batch commits when the next one first needs production.
            "main insert 5",
            "main COMMIT 0/D0 (progress from 0/0)",
            "main BEGIN",
            "main flush 1 rows",
            "main COMMIT 0/134 (progress from 0/D0)",
        ])
    );
    // The first batch is confirmed once the second commit shows it flushed, the second
    // when the stop flushes production's WAL.
    assert_eq!(run.confirmed, vec![Lsn(208), Lsn(308)]);
    assert_eq!(run.inserted, 5);
}

#[tokio::test(start_paused = true)]
async fn late_batches_linger_and_timely_or_quiet_ones_do_not() {
    // One transaction, then two back to back, then one more 2 ms later.
    let script = |late: Duration| {
        let mut script = Script {
            late,
            ..Script::default()
        };
        script.push(relation());
        script.transaction(700, 50, &[0]);
        script.idle();
        script.transaction(701, 100, &[1]);
        script.transaction(702, 200, &[2]);
        script.pause(2);
        script.transaction(703, 300, &[3]);
        script.idle();
        script
    };
    let commits = |log: &[String]| log.iter().filter(|l| l.contains("COMMIT")).count();
    let late = Duration::from_secs(1);
    // Without a linger the batch of the two close transactions is applied when nothing is
    // ready, however late.
    let run = apply_script(script(late), Lsn::INVALID, "batch_linger_ms = 0").await;
    run.result.unwrap();
    assert_eq!(commits(&run.log), 3, "{:?}", run.log);
    // With 5 ms, once a batch committed a second after staging, the next one waits and
    // takes the last transaction too.
    let run = apply_script(script(late), Lsn::INVALID, "batch_linger_ms = 5").await;
    run.result.unwrap();
    assert_eq!(commits(&run.log), 2, "{:?}", run.log);
    assert_eq!(run.inserted, 4);
    // Transactions that arrive on time are applied at once.
    let run = apply_script(script(Duration::ZERO), Lsn::INVALID, "batch_linger_ms = 5").await;
    run.result.unwrap();
    assert_eq!(commits(&run.log), 3, "{:?}", run.log);
    // A transaction after a quiet spell does not wait for one that may never come.
    let mut quiet = Script {
        late,
        ..Script::default()
    };
    quiet.push(relation());
    quiet.transaction(701, 100, &[1]);
    quiet.idle();
    let started = tokio::time::Instant::now();
    let run = apply_script(quiet, Lsn::INVALID, "batch_linger_ms = 60000").await;
    run.result.unwrap();
    assert_eq!(commits(&run.log), 1);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the lone batch lingered"
    );
}

#[tokio::test]
async fn a_caught_up_batch_is_applied_at_once_and_a_backlog_is_batched() {
    let mut script = Script::default();
    script.push(relation());
    // A backlog: both transactions are ready at once and share a batch.
    script.transaction(701, 100, &[1]);
    script.transaction(702, 200, &[2]);
    // Caught up: the batch does not wait (the test's batch_max_delay_ms is an hour).
    script.idle();
    script.transaction(703, 300, &[3]);
    // A pipeline that waited for more would sit on the first batch past this.
    let run = tokio::time::timeout(
        Duration::from_secs(5),
        apply_script(script, Lsn::INVALID, ""),
    )
    .await
    .expect("the caught-up batch was applied without waiting for more");
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 1",
            "main insert 2",
            "main flush 2 rows",
            "main COMMIT 0/D0 (progress from 0/0)",
            "main BEGIN",
            "main insert 3",
            "main flush 1 rows",
            "main COMMIT 0/134 (progress from 0/D0)",
        ])
    );
}

#[tokio::test]
async fn a_transaction_received_in_part_is_rolled_back_and_nothing_confirmed() {
    let mut script = Script::default();
    script.push(relation());
    script.push(LogicalMessage::Begin {
        final_lsn: Lsn(100),
        commit_time: PgTimestamp(0),
        xid: 700,
    });
    script.push(LogicalMessage::Insert {
        xid: None,
        relation: OID,
        new: row(1),
    });
    let run = apply_script(script, Lsn::INVALID, "").await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&["main BEGIN", "main insert 1", "main ROLLBACK"])
    );
    assert!(run.confirmed.is_empty());
    assert_eq!(run.inserted, 0);
}

#[tokio::test]
async fn messages_out_of_order_are_protocol_errors_and_nothing_is_committed() {
    let mut commit_alone = Script::default();
    commit_alone.push(relation());
    commit_alone.push(commit_message(100, PgTimestamp::now()));
    let run = apply_script(commit_alone, Lsn::INVALID, "").await;
    assert!(
        matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("without Begin")),
        "{:?}",
        run.result
    );
    assert!(run.log.is_empty() && run.confirmed.is_empty());

    let mut unannounced = Script::default();
    unannounced.transaction(700, 100, &[1]);
    let run = apply_script(unannounced, Lsn::INVALID, "").await;
    assert!(
        matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("before its Relation")),
        "{:?}",
        run.result
    );
    assert!(run.confirmed.is_empty());

    let mut never_streamed = Script::default();
    never_streamed.push(relation());
    never_streamed.push(stream_commit(900, 100));
    let run = apply_script(never_streamed, Lsn::INVALID, "").await;
    assert!(
        matches!(&run.result, Err(SyncError::Protocol(m)) if m.contains("never streamed")),
        "{:?}",
        run.result
    );
    assert!(
        !run.log.iter().any(|l| l.contains("COMMIT")),
        "{:#?}",
        run.log
    );
}

/// Issue 33: a Relation whose column type production cannot store stops sync with a schema
/// error before the first change of that shape, and the open batch is not committed; a type
/// production's column can hold goes on.
#[tokio::test]
async fn a_relation_whose_type_production_cannot_hold_stops_before_its_changes() {
    let mut script = Script::default();
    script.push(relation());
    script.transaction(700, 100, &[1]);
    script.push(relation_typed(1700, (12 << 16 | 4) + 4));
    script.transaction(701, 100, &[2]);
    let run = apply_script(script, Lsn::INVALID, "").await;
    match &run.result {
        Err(SyncError::Schema(problems)) => assert!(
            problems[0].contains("public.t.v is now numeric(12,4), but production's is text"),
            "{problems:?}"
        ),
        other => panic!("expected a schema error, got {other:?}"),
    }
    assert!(
        !run.log.iter().any(|l| l.contains("COMMIT")),
        "{:#?}",
        run.log
    );
    assert!(run.confirmed.is_empty());

    let mut wider = Script::default();
    wider.push(relation_typed(1043, 14));
    wider.transaction(700, 100, &[1]);
    wider.idle();
    let run = apply_script(wider, Lsn::INVALID, "").await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert_eq!(run.confirmed.len(), 1);
}

#[tokio::test]
async fn streamed_transactions_commit_in_staging_order_in_sessions_of_their_own() {
    let mut script = Script::default();
    script.push(relation());
    script.transaction(701, 100, &[1]);
    // A large transaction starts streaming: what committed before it commits first.
    script.streamed(900, 900, &[2]);
    script.transaction(702, 200, &[3]);
    // A subtransaction of it, rolled back.
    script.streamed(900, 901, &[4]);
    script.push(stream_abort(900, 901));
    script.streamed(900, 900, &[5]);
    script.push(stream_commit(900, 300));
    // Reuses the first session; aborted whole.
    script.streamed(950, 950, &[6]);
    script.push(stream_abort(950, 950));
    script.transaction(703, 400, &[7]);
    let run = apply_script(script, Lsn::INVALID, "").await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 1",
            "main flush 1 rows",
            "main COMMIT 0/6C (progress from 0/0)",
            "s1 BEGIN",
            "s1 insert 2",
            "main BEGIN",
            "main insert 3",
            "main flush 1 rows",
            "main COMMIT 0/D0 (progress from 0/6C)",
            "s1 flush 1 rows",
            "s1 SAVEPOINT stagingprop_subxact_901",
            "s1 insert 4",
            "s1 ROLLBACK TO stagingprop_subxact_901",
            "s1 insert 5",
            "s1 flush 1 rows",
            "s1 COMMIT 0/134 (progress from 0/D0)",
            "s1 BEGIN",
            "s1 insert 6",
            "s1 ROLLBACK",
            "main BEGIN",
            "main insert 7",
            "main flush 1 rows",
            "main COMMIT 0/198 (progress from 0/134)",
        ])
    );
    assert_eq!(run.confirmed, vec![Lsn(108), Lsn(208), Lsn(308), Lsn(408)]);
}

#[tokio::test]
async fn a_cutoff_applies_what_committed_up_to_it_and_nothing_after() {
    let mut script = Script::default();
    script.push(relation());
    script.transaction(701, 100, &[1]);
    script.transaction(702, 200, &[2]);
    script.transaction(703, 300, &[3]);
    script.transaction(704, 400, &[4]);
    let run = apply_until(script, Lsn::INVALID, "", Some(Until::Lsn(Lsn(200)))).await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 1",
            "main insert 2",
            "main flush 2 rows",
            "main COMMIT 0/D0 (progress from 0/0)",
        ])
    );
    assert_eq!(run.confirmed, vec![Lsn(208)]);
    assert_eq!(run.inserted, 2);

    // A streamed transaction committing past the cutoff is rolled back; what committed
    // before it stays applied.
    let mut script = Script::default();
    script.push(relation());
    script.streamed(900, 900, &[1]);
    script.transaction(701, 100, &[2]);
    script.push(stream_commit(900, 300));
    script.transaction(702, 400, &[3]);
    let run = apply_until(script, Lsn::INVALID, "", Some(Until::Lsn(Lsn(250)))).await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "s1 BEGIN",
            "s1 insert 1",
            "main BEGIN",
            "main insert 2",
            "main flush 1 rows",
            "main COMMIT 0/6C (progress from 0/0)",
            "s1 ROLLBACK",
        ])
    );
    assert_eq!(run.confirmed, vec![Lsn(108)]);
}

#[tokio::test]
async fn a_streamed_transaction_production_already_has_is_rolled_back() {
    let mut script = Script::default();
    script.push(relation());
    script.streamed(900, 900, &[1]);
    script.push(stream_commit(900, 300));
    let run = apply_script(script, Lsn(500), "").await;
    run.result.unwrap();
    assert_eq!(run.log, lines(&["s1 BEGIN", "s1 insert 1", "s1 ROLLBACK"]));
    assert!(run.confirmed.is_empty());
}

#[test]
fn a_batch_is_confirmed_only_once_production_flushed_past_its_commit() {
    let mut unflushed = Unflushed::default();
    unflushed.committed(Lsn(1000), Lsn(10));
    unflushed.committed(Lsn(2000), Lsn(20));
    unflushed.committed(Lsn(3000), Lsn(30));
    assert_eq!(unflushed.flushed(Lsn(999)), None);
    assert_eq!(unflushed.flushed(Lsn(2500)), Some(Lsn(20)));
    assert!(!unflushed.is_empty());
    assert_eq!(unflushed.flushed(Lsn(2500)), None);
    assert_eq!(unflushed.flushed(Lsn(3000)), Some(Lsn(30)));
    assert!(unflushed.is_empty());
}

/// A transaction at `commit` holding one repair watermark.
fn watermark(script: &mut Script, xid: Xid, commit: u64, mark: &crate::repair::Watermark) {
    script.push(LogicalMessage::Begin {
        final_lsn: Lsn(commit),
        commit_time: PgTimestamp(0),
        xid,
    });
    script.push(LogicalMessage::Message {
        xid: None,
        transactional: true,
        lsn: Lsn(commit),
        prefix: crate::repair::PREFIX.into(),
        content: Bytes::from(mark.to_json()),
    });
    script.push(commit_message(commit, PgTimestamp(0)));
}

#[tokio::test]
async fn a_repair_chunk_applies_at_its_high_watermark_minus_what_the_stream_changed_in_its_window()
{
    use crate::repair::{Chunk, ChunkId, Watermark};
    let id = |chunk, target: &str| ChunkId {
        repair: 1,
        chunk,
        target: target.into(),
    };
    let low = |chunk, target| Watermark::Low {
        id: id(chunk, target),
        table: "public.t".into(),
        key: vec!["id".into()],
    };
    let high = |chunk, target| {
        Watermark::High(Chunk {
            id: id(chunk, target),
            table: "public.t".into(),
            columns: vec!["id".into(), "v".into()],
            key: vec![0],
            upserts: vec![
                vec![Some("1".into()), Some("one".into())],
                vec![Some("2".into()), None],
            ],
            deletes: vec![vec![Some("3".into())]],
        })
    };
    let mut script = Script::default();
    script.push(relation());
    script.transaction(700, 100, &[5]);
    watermark(&mut script, 701, 200, &low(0, "stagingprop"));
    // Inside the window the stream changes row 2: its version wins over the chunk's.
    script.transaction(702, 300, &[2]);
    watermark(&mut script, 703, 400, &high(0, "stagingprop"));
    // A high watermark whose low one this session never saw: interrupted.
    watermark(&mut script, 704, 500, &high(1, "stagingprop"));
    // Another target's watermarks are not this one's business.
    watermark(&mut script, 705, 600, &low(2, "elsewhere"));
    script.transaction(706, 700, &[1]);
    watermark(&mut script, 707, 800, &high(2, "elsewhere"));
    let run = apply_script(script, Lsn::INVALID, "").await;
    run.result.unwrap();
    assert_eq!(
        run.log,
        lines(&[
            "main BEGIN",
            "main insert 5",
            "main insert 2",
            "main flush 2 rows",
            "main repair chunk 0: 1 rows, 1 deletes, 1 left to the stream",
            "main repair chunk 1 interrupted",
            "main insert 1",
            "main flush 1 rows",
            "main COMMIT 0/328 (progress from 0/0)",
        ])
    );
}
