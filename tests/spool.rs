//! The spool against a real server: a staging stream written to the spool and read back gives
//! the same messages, and `tail --spool` prints the same JSON lines `tail` prints from staging.

mod support;

use stagingprop::model::Lsn;
use stagingprop::ops::tail::{TailOptions, tail, tail_spool};
use stagingprop::pg::replication::{PgOutputOptions, ReplicationClient, SnapshotAction};
use stagingprop::pgoutput::LogicalMessage;
use stagingprop::spool::store::{SpoolReader, SpoolWriter, segments};
use support::{clusters, endpoint, fresh_db, psql, wait_for_tail_slot};

const SCHEMA: &str = "
CREATE TABLE item (id bigint PRIMARY KEY, name text, body text, data bytea, price numeric(10,2));
ALTER TABLE item ALTER body SET STORAGE EXTERNAL;
CREATE TABLE tag (item_id bigint, tag text, PRIMARY KEY (item_id, tag));
ALTER TABLE tag REPLICA IDENTITY FULL;
CREATE PUBLICATION pub FOR TABLE item, tag;
";

const WORKLOAD: &str = "
INSERT INTO item SELECT g, 'item ' || g, CASE WHEN g % 3 = 0 THEN repeat('long', 3000) END, '\\x0102'::bytea, g * 1.5 FROM generate_series(1, 40) g;
INSERT INTO tag SELECT g, 't' || g FROM generate_series(1, 40) g;
UPDATE item SET name = NULL WHERE id % 4 = 0;
UPDATE item SET id = id + 1000 WHERE id = 5;
DELETE FROM tag WHERE item_id % 5 = 0;
TRUNCATE tag;
BEGIN; INSERT INTO item VALUES (500, 'x', NULL, NULL, 1); DELETE FROM item WHERE id = 500; COMMIT;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_stream_reads_back_and_tails_like_staging() {
    let c = clusters();
    let db = fresh_db(&c.staging, "spooled");
    psql(&c.staging, &db, SCHEMA);
    let staging = endpoint(&c.staging, &db, "postgres");

    // Two temporary slots see the same changes: one is spooled, one is tailed.
    let mut repl = ReplicationClient::connect(&staging).await.expect("connect");
    repl.create_logical_slot("spooled", true, SnapshotAction::Nothing, false)
        .await
        .expect("slot");
    let mut stream = repl
        .start_logical(
            "spooled",
            Lsn::INVALID,
            &PgOutputOptions::new(vec!["pub".into()]),
        )
        .await
        .expect("stream");
    let options = TailOptions {
        publication: "pub".into(),
        idle_exit: Some(std::time::Duration::from_secs(3)),
        ..TailOptions::default()
    };
    let tail_endpoint = staging.clone();
    let tailing = tokio::spawn(async move {
        let mut out = Vec::new();
        tail(&tail_endpoint, &options, &mut out, std::future::pending())
            .await
            .map(|_| String::from_utf8(out).unwrap())
    });
    wait_for_tail_slot(&c.staging, &db).await;
    // One transaction per line.
    for statement in WORKLOAD.trim().split(";\n") {
        psql(&c.staging, &db, statement);
    }
    let end: Lsn = psql(&c.staging, &db, "SELECT pg_current_wal_lsn()")
        .trim()
        .parse()
        .unwrap();

    // Spool everything up to the last commit, in small segments.
    let dir = std::env::temp_dir().join(format!("stagingprop-spool-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut writer, recovered) = SpoolWriter::open(&dir, 4096).expect("spool");
    assert_eq!(recovered.durable_end, Lsn::INVALID);
    let mut received = Vec::new();
    let mut spooled_end = Lsn::INVALID;
    while spooled_end < end {
        let message = tokio::time::timeout(std::time::Duration::from_secs(30), stream.next())
            .await
            .expect("the stream delivers")
            .expect("no stream error")
            .expect("stream open");
        writer
            .append(message.wal_start, &message.message)
            .expect("append");
        if let LogicalMessage::Commit { end_lsn, .. } = &message.message {
            spooled_end = writer.flush().expect("flush");
            assert_eq!(spooled_end, *end_lsn);
        }
        received.push(message.message);
    }
    stream.close().await.expect("close");
    assert!(segments(&dir).unwrap().len() > 2, "several segments");

    // Read back: the same messages in the same order (Relation records repeated at segment
    // starts aside).
    let mut reader = SpoolReader::open(&dir, Lsn::INVALID).expect("reader");
    let mut read = Vec::new();
    while let Some((_, message)) = reader.next_message().expect("read") {
        read.push(message);
    }
    let without_relations = |v: &[LogicalMessage]| -> Vec<LogicalMessage> {
        v.iter()
            .filter(|m| {
                !matches!(
                    m,
                    LogicalMessage::Relation { .. }
                        | LogicalMessage::Type { .. }
                        | LogicalMessage::Origin { .. }
                        | LogicalMessage::Message { .. }
                )
            })
            .cloned()
            .collect()
    };
    assert_eq!(without_relations(&read), without_relations(&received));

    let mut spooled_lines = Vec::new();
    let summary = tail_spool(&dir, None, &mut spooled_lines).expect("tail --spool");
    let tailed = tailing.await.unwrap().expect("tail");
    assert_eq!(String::from_utf8(spooled_lines).unwrap(), tailed);
    assert!(summary.changes > 100, "{summary:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
