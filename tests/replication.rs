//! The replication connection and the pgoutput decoder against a real PostgreSQL server.

mod support;

use std::time::Duration;

use stagingprop::model::{Lsn, OldTuple, ReplicaIdentity, Value};
use stagingprop::pg::replication::{
    PgOutputOptions, ReplicationClient, ReplicationError, ReplicationStream, SnapshotAction,
    Streaming, WalMessage,
};
use stagingprop::pgoutput::LogicalMessage;
use support::{clusters, endpoint, fresh_db, psql};

const SCHEMA: &str = "
CREATE TABLE product (
    id bigint PRIMARY KEY, price numeric(12,2), name text, code varchar(32), image bytea,
    attrs jsonb, updated timestamptz, active bool, uid uuid, tags text[], scores int[],
    ratio double precision, note text);
ALTER TABLE product ALTER note SET STORAGE EXTERNAL;
CREATE TABLE offer_price (offer_id bigint, currency char(3), price numeric, PRIMARY KEY (offer_id, currency));
CREATE TABLE audit (a int, b text);
ALTER TABLE audit REPLICA IDENTITY FULL;
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE mood_log (id int PRIMARY KEY, feeling mood);
CREATE PUBLICATION pub FOR TABLE product, offer_price, audit, mood_log;
";

/// Reads messages until `commits` transactions have ended, or fails after `limit`.
async fn read_commits(
    stream: &mut ReplicationStream,
    commits: usize,
    limit: Duration,
) -> Vec<WalMessage> {
    let mut out = Vec::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + limit;
    while seen < commits {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {seen} of {commits} commits; got {out:#?}"))
            .expect("stream error")
            .expect("stream ended early");
        if matches!(
            next.message,
            LogicalMessage::Commit { .. } | LogicalMessage::StreamCommit { .. }
        ) {
            seen += 1;
        }
        out.push(next);
    }
    out
}

/// One row of `table` in the text output format (the simple query protocol returns what each
/// type's output function prints, as pgoutput does), with the replication session's settings.
async fn row_as_text(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &[&str],
    key: &str,
) -> Vec<Option<String>> {
    let sql = format!("SELECT {} FROM {table} WHERE {key}", columns.join(", "));
    let rows = client.simple_query(&sql).await.expect("row query");
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("one row");
    (0..columns.len())
        .map(|i| row.get(i).map(str::to_owned))
        .collect()
}

/// Compares decoded values with the server's text, column by column, naming the column that
/// differs and shortening long values in the message.
fn assert_columns(columns: &[&str], got: &[Option<String>], want: &[Option<String>]) {
    assert_eq!(got.len(), want.len(), "column count");
    let short = |v: &Option<String>| {
        v.as_ref()
            .map(|s| s.chars().take(80).collect::<String>() + if s.len() > 80 { "..." } else { "" })
    };
    for ((name, g), w) in columns.iter().zip(got).zip(want) {
        assert!(
            g == w,
            "column {name}: decoded {:?}, server says {:?}",
            short(g),
            short(w)
        );
    }
}

fn text_values(tuple: &[Value]) -> Vec<Option<String>> {
    tuple
        .iter()
        .map(|v| match v {
            Value::Null => None,
            Value::Text(b) => Some(String::from_utf8(b.to_vec()).expect("utf8")),
            other => panic!("expected a text or null value, got {other:?}"),
        })
        .collect()
}

const PRODUCT_COLUMNS: [&str; 13] = [
    "id", "price", "name", "code", "image", "attrs", "updated", "active", "uid", "tags", "scores",
    "ratio", "note",
];

async fn start_stream(
    dbname: &str,
    slot: &str,
    options: &PgOutputOptions,
) -> (ReplicationStream, Lsn) {
    let c = clusters();
    let mut repl = ReplicationClient::connect(&endpoint(&c.staging, dbname, "postgres"))
        .await
        .expect("replication connect");
    let slot_info = repl
        .create_logical_slot(slot, true, SnapshotAction::Nothing, false)
        .await
        .expect("create slot");
    assert_eq!(slot_info.output_plugin, "pgoutput");
    assert!(slot_info.consistent_point.is_valid());
    let stream = repl
        .start_logical(slot, Lsn::INVALID, options)
        .await
        .expect("start replication");
    (stream, slot_info.consistent_point)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_every_change_shape_from_a_real_server() {
    let c = clusters();
    let db = fresh_db(&c.staging, "shapes");
    psql(&c.staging, &db, SCHEMA);
    let (mut stream, start) = start_stream(
        &db,
        "shapes_slot",
        &PgOutputOptions::new(vec!["pub".into()]),
    )
    .await;

    let client = endpoint(&c.staging, &db, "postgres")
        .connect()
        .await
        .expect("connect");
    client
        .batch_execute(
            "SET timezone = 'UTC'; SET datestyle = ISO; SET extra_float_digits = 3;
             SET intervalstyle = postgres",
        )
        .await
        .unwrap();
    let long_note = "n".repeat(20_000);
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO product VALUES (1, 12.50, 'Desk lamp', 'LMP-1', '\\x00ff10'::bytea,
               '{{\"color\": \"red\", \"sizes\": [1, 2]}}', '2026-11-25 10:00:00.123456+02', true,
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', ARRAY['a b', 'c\"d', NULL], ARRAY[1, 2, 3],
               0.1, '{long_note}');
             INSERT INTO product (id) VALUES (2);
             INSERT INTO offer_price VALUES (7, 'EUR', 9.99), (7, 'USD', 10.99);
             COMMIT;"
        ))
        .await
        .unwrap();
    let product1 = row_as_text(&client, "product", &PRODUCT_COLUMNS, "id = 1").await;
    client
        .batch_execute("UPDATE product SET price = 13.00 WHERE id = 1")
        .await
        .unwrap();
    let product1_after = row_as_text(&client, "product", &PRODUCT_COLUMNS, "id = 1").await;
    client
        .batch_execute("UPDATE product SET id = 10, name = 'moved' WHERE id = 2")
        .await
        .unwrap();
    client
        .batch_execute("DELETE FROM offer_price WHERE offer_id = 7 AND currency = 'USD'")
        .await
        .unwrap();
    client
        .batch_execute(
            "BEGIN; INSERT INTO audit VALUES (1, 'x'); UPDATE audit SET b = 'y' WHERE a = 1;
             DELETE FROM audit WHERE a = 1; COMMIT;",
        )
        .await
        .unwrap();
    client
        .batch_execute("TRUNCATE offer_price, audit RESTART IDENTITY CASCADE")
        .await
        .unwrap();
    client
        .batch_execute(
            "SELECT pg_logical_emit_message(true, 'stagingprop-test', 'hello');
             SELECT pg_logical_emit_message(false, 'stagingprop-test', 'outside');",
        )
        .await
        .unwrap();

    // A transaction replayed from another origin, touching a column of a user-defined type.
    client
        .batch_execute(
            "SELECT pg_replication_origin_create('shapes_origin');
             SELECT pg_replication_origin_session_setup('shapes_origin');
             BEGIN;
             SELECT pg_replication_origin_xact_setup('0/AABBCC', now());
             INSERT INTO mood_log VALUES (1, 'happy');
             COMMIT;
             SELECT pg_replication_origin_session_reset();",
        )
        .await
        .unwrap();

    // Eight transactions; the non-transactional message arrives on its own, outside any.
    let messages = read_commits(&mut stream, 8, Duration::from_secs(30)).await;

    // Transactions are well formed: Begin .. Commit with matching LSNs, in increasing order.
    let mut open_final = None;
    let mut last_end = start;
    for m in &messages {
        match &m.message {
            LogicalMessage::Begin { final_lsn, xid, .. } => {
                assert!(open_final.is_none(), "nested Begin");
                assert!(*xid > 0);
                open_final = Some(*final_lsn);
            }
            LogicalMessage::Commit {
                commit_lsn,
                end_lsn,
                ..
            } => {
                assert_eq!(Some(*commit_lsn), open_final.take());
                assert!(*end_lsn > *commit_lsn);
                assert!(*end_lsn > last_end);
                last_end = *end_lsn;
            }
            LogicalMessage::Message {
                transactional: false,
                ..
            } => {}
            _ => assert!(open_final.is_some(), "change outside a transaction: {m:?}"),
        }
    }

    // Relations: product keyed on id with default identity; audit with FULL.
    let relations: Vec<_> = messages
        .iter()
        .filter_map(|m| match &m.message {
            LogicalMessage::Relation { relation, .. } => Some(relation.clone()),
            _ => None,
        })
        .collect();
    let product_rel = relations.iter().find(|r| r.name == "product").unwrap();
    assert_eq!(product_rel.namespace, "public");
    assert_eq!(product_rel.replica_identity, ReplicaIdentity::Default);
    let names: Vec<&str> = product_rel
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, PRODUCT_COLUMNS);
    assert_eq!(product_rel.key_columns().collect::<Vec<_>>(), vec![0]);
    let offer_rel = relations.iter().find(|r| r.name == "offer_price").unwrap();
    assert_eq!(offer_rel.key_columns().collect::<Vec<_>>(), vec![0, 1]);
    let audit_rel = relations.iter().find(|r| r.name == "audit").unwrap();
    assert_eq!(audit_rel.replica_identity, ReplicaIdentity::Full);

    let changes: Vec<&LogicalMessage> = messages
        .iter()
        .map(|m| &m.message)
        .filter(|m| {
            !matches!(
                m,
                LogicalMessage::Begin { .. }
                    | LogicalMessage::Commit { .. }
                    | LogicalMessage::Relation { .. }
                    | LogicalMessage::Type { .. }
            )
        })
        .collect();

    // Inserts carry every value exactly as the server prints it.
    let LogicalMessage::Insert { relation, new, .. } = changes[0] else {
        panic!("expected insert, got {:?}", changes[0]);
    };
    assert_eq!(*relation, product_rel.oid);
    assert_columns(&PRODUCT_COLUMNS, &text_values(new), &product1);
    let LogicalMessage::Insert { new, .. } = changes[1] else {
        panic!("expected insert")
    };
    let mut nulls = vec![None; PRODUCT_COLUMNS.len()];
    nulls[0] = Some("2".to_owned());
    assert_eq!(text_values(new), nulls);
    let LogicalMessage::Insert { new, .. } = changes[2] else {
        panic!("expected insert")
    };
    assert_eq!(
        text_values(new),
        vec![Some("7".into()), Some("EUR".into()), Some("9.99".into())]
    );

    // The price update leaves the out-of-line note unsent ('u') and carries no old key.
    let LogicalMessage::Update { old, new, .. } = changes[4] else {
        panic!("expected update, got {:?}", changes[4]);
    };
    assert!(old.is_none());
    assert_eq!(new[12], Value::UnchangedToast);
    let mut expected = product1_after.clone();
    let sent: Vec<Option<String>> = text_values(&new[..12]);
    expected.truncate(12);
    assert_columns(&PRODUCT_COLUMNS[..12], &sent, &expected);

    // A key change carries the old key.
    let LogicalMessage::Update { old, new, .. } = changes[5] else {
        panic!("expected update")
    };
    let Some(OldTuple::Key(old)) = old else {
        panic!("expected old key, got {old:?}")
    };
    assert_eq!(old[0], Value::Text("2".into()));
    assert_eq!(new[0], Value::Text("10".into()));
    assert_eq!(new[2], Value::Text("moved".into()));

    // A delete on a composite key.
    let LogicalMessage::Delete { old, .. } = changes[6] else {
        panic!("expected delete, got {:?}", changes[6]);
    };
    let OldTuple::Key(old) = old else {
        panic!("expected key")
    };
    assert_eq!(old[0], Value::Text("7".into()));
    assert_eq!(old[1], Value::Text("USD".into()));

    // REPLICA IDENTITY FULL: whole old rows.
    assert!(matches!(changes[7], LogicalMessage::Insert { .. }));
    let LogicalMessage::Update { old, .. } = changes[8] else {
        panic!("expected update")
    };
    assert_eq!(
        old,
        &Some(OldTuple::Full(vec![
            Value::Text("1".into()),
            Value::Text("x".into())
        ]))
    );
    let LogicalMessage::Delete { old, .. } = changes[9] else {
        panic!("expected delete")
    };
    assert_eq!(
        old,
        &OldTuple::Full(vec![Value::Text("1".into()), Value::Text("y".into())])
    );

    // TRUNCATE of two tables with both flags.
    let LogicalMessage::Truncate {
        relations: truncated_oids,
        cascade,
        restart_identity,
        ..
    } = changes[10]
    else {
        panic!("expected truncate, got {:?}", changes[10]);
    };
    assert!(*cascade && *restart_identity);
    let mut truncated = truncated_oids.clone();
    truncated.sort();
    let mut wanted = vec![offer_rel.oid, audit_rel.oid];
    wanted.sort();
    assert_eq!(truncated, wanted);

    // Logical decoding messages, transactional and not.
    let emitted: Vec<(bool, String, Vec<u8>)> = changes
        .iter()
        .filter_map(|m| match m {
            LogicalMessage::Message {
                transactional,
                prefix,
                content,
                ..
            } => Some((*transactional, prefix.clone(), content.to_vec())),
            _ => None,
        })
        .collect();
    assert!(emitted.contains(&(true, "stagingprop-test".into(), b"hello".to_vec())));

    // Origin and Type messages, and the enum value as text. PostgreSQL 14's pgoutput sends no
    // Origin message for this transaction (seen with 14.23; 15 to 18 send it).
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    let origin = changes.iter().any(|m| {
        matches!(m, LogicalMessage::Origin { commit_lsn, name }
            if *commit_lsn == Lsn(0xAABBCC) && name == "shapes_origin")
    });
    assert!(
        origin || version < 150000,
        "no Origin message (server {version})"
    );
    assert!(
        messages.iter().any(
            |m| matches!(&m.message, LogicalMessage::Type { namespace, name, .. }
            if namespace == "public" && name == "mood")
        ),
        "no Type message for the enum"
    );
    let mood_rel = relations.iter().find(|r| r.name == "mood_log").unwrap();
    assert!(
        changes
            .iter()
            .any(|m| matches!(m, LogicalMessage::Insert { relation, new, .. }
        if *relation == mood_rel.oid && new[1] == Value::Text("happy".into())))
    );

    stream.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_100k_row_transaction() {
    let c = clusters();
    let db = fresh_db(&c.staging, "big");
    psql(&c.staging, &db, SCHEMA);
    let (mut stream, _) =
        start_stream(&db, "big_slot", &PgOutputOptions::new(vec!["pub".into()])).await;
    psql(
        &c.staging,
        &db,
        "INSERT INTO product (id, name, price) SELECT g, 'product ' || g, g / 100.0 FROM generate_series(1, 100000) g",
    );
    let messages = read_commits(&mut stream, 1, Duration::from_secs(120)).await;
    let inserts: Vec<_> = messages
        .iter()
        .filter_map(|m| match &m.message {
            LogicalMessage::Insert { new, .. } => Some(new),
            _ => None,
        })
        .collect();
    assert_eq!(inserts.len(), 100_000);
    assert_eq!(inserts[99_999][0], Value::Text("100000".into()));
    assert_eq!(inserts[99_999][2], Value::Text("product 100000".into()));
    stream.close().await.expect("close");
}

/// Protocol 2 (`streaming 'on'`) before 16, protocol 4 (`streaming 'parallel'`) on 16+: what
/// sync asks for. A large transaction that rolls back is streamed and then aborted (with its
/// abort LSN on 16+); one that commits arrives in several segments ending in Stream Commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_in_progress_transactions_stream_with_the_newest_protocol() {
    let c = clusters();
    let db = fresh_db(&c.staging, "streamed");
    psql(&c.staging, &db, SCHEMA);
    // Spill to the client early so a modest transaction is streamed in segments.
    psql(
        &c.staging,
        &db,
        &format!("ALTER DATABASE {db} SET logical_decoding_work_mem = '64kB'"),
    );
    let version: u32 = psql(&c.staging, &db, "SHOW server_version_num")
        .trim()
        .parse()
        .expect("server_version_num");
    let mut options = PgOutputOptions::new(vec!["pub".into()]);
    options.stream_in_progress(version);
    let expected = if version >= 160000 {
        (4, Streaming::Parallel)
    } else {
        (2, Streaming::On)
    };
    assert_eq!((options.proto_version, options.streaming), expected);
    let (mut stream, _) = start_stream(&db, "streamed_slot", &options).await;
    // The rollback comes only once part of the transaction has streamed: 18 skips decoding a
    // transaction it already knows aborted, so a rollback written earlier may send nothing.
    let open = endpoint(&c.staging, &db, "postgres")
        .connect()
        .await
        .expect("connect");
    open.batch_execute(
        "BEGIN; INSERT INTO product (id, name) SELECT -g, repeat('y', 200) FROM generate_series(1, 20000) g",
    )
    .await
    .expect("the transaction to roll back");
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !messages
        .iter()
        .any(|m: &WalMessage| matches!(m.message, LogicalMessage::StreamStop))
    {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("a streamed block of the open transaction within 60 s")
            .expect("stream error")
            .expect("stream ended early");
        messages.push(next);
    }
    open.batch_execute("ROLLBACK").await.expect("ROLLBACK");
    psql(
        &c.staging,
        &db,
        "INSERT INTO product (id, name) SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
    );
    messages.extend(read_commits(&mut stream, 1, Duration::from_secs(60)).await);
    let aborts: Vec<_> = messages
        .iter()
        .filter_map(|m| match &m.message {
            LogicalMessage::StreamAbort {
                xid,
                subxact_xid,
                abort_lsn,
                abort_time,
            } => Some((*xid, *subxact_xid, *abort_lsn, *abort_time)),
            _ => None,
        })
        .collect();
    assert_eq!(aborts.len(), 1, "one Stream Abort, got {aborts:?}");
    let (aborted_xid, subxact, abort_lsn, abort_time) = aborts[0];
    assert_eq!(aborted_xid, subxact, "the top-level transaction aborted");
    if version >= 160000 {
        let lsn = abort_lsn.expect("protocol 4 parallel streaming sends the abort LSN");
        assert!(lsn.is_valid());
        assert!(abort_time.is_some(), "and the abort time");
    } else {
        assert_eq!(abort_lsn, None, "protocol 2 has no abort LSN");
    }
    let starts = messages
        .iter()
        .filter(|m| matches!(m.message, LogicalMessage::StreamStart { .. }))
        .count();
    let stops = messages
        .iter()
        .filter(|m| matches!(m.message, LogicalMessage::StreamStop))
        .count();
    assert!(
        starts > 2,
        "expected several streamed segments of both transactions, got {starts}"
    );
    assert_eq!(starts, stops);
    let LogicalMessage::StreamCommit {
        xid: commit_xid, ..
    } = messages.last().unwrap().message
    else {
        panic!("expected Stream Commit last");
    };
    assert_ne!(commit_xid, aborted_xid);
    let mut inserts = 0;
    for m in &messages {
        if let LogicalMessage::Insert { xid, new, .. } = &m.message {
            let xid = xid.expect("a streamed change carries its xid");
            if xid == commit_xid {
                inserts += 1;
            } else {
                assert_eq!(xid, aborted_xid, "{new:?}");
            }
        }
    }
    assert_eq!(inserts, 20_000);
    stream.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_commands_report_server_errors_with_sqlstate() {
    let c = clusters();
    let db = fresh_db(&c.staging, "errors");
    let mut repl = ReplicationClient::connect(&endpoint(&c.staging, &db, "postgres"))
        .await
        .unwrap();
    let ident = repl.identify_system().await.unwrap();
    assert!(ident.xlogpos.is_valid());
    assert_eq!(ident.dbname.as_deref(), Some(db.as_str()));
    let err = repl.drop_slot("no_such_slot", false).await.unwrap_err();
    assert_eq!(err.sqlstate(), Some("42704"), "{err}");
    assert!(err.to_string().contains("no_such_slot"), "{err}");
    // The connection is still usable after an error.
    let created = repl
        .create_logical_slot("exported", false, SnapshotAction::Export, false)
        .await
        .unwrap();
    let snapshot = created.snapshot_name.expect("exported snapshot");
    // The exported snapshot is importable while the replication connection stays idle.
    let client = endpoint(&c.staging, &db, "postgres")
        .connect()
        .await
        .unwrap();
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'; COMMIT"
        ))
        .await
        .unwrap();
    repl.drop_slot("exported", true).await.unwrap();
    let slots = psql(
        &c.staging,
        &db,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'exported'",
    );
    assert_eq!(slots.trim(), "0");
    // Starting an unknown slot fails with the server's message.
    let err = match repl
        .start_logical(
            "missing_slot",
            Lsn::INVALID,
            &PgOutputOptions::new(vec!["pub".into()]),
        )
        .await
    {
        Err(e) => e,
        Ok(_) => panic!("START_REPLICATION of a missing slot succeeded"),
    };
    assert!(matches!(err, ReplicationError::Server { .. }), "{err}");
    assert_eq!(err.sqlstate(), Some("42704"));
}
