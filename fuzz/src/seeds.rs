//! Writes the seed inputs the corpus in fuzz/corpus/ grew from: well-formed examples of what each
//! target parses, built with stagingprop's own encoders, so the fuzzer starts past the checksums
//! and length words instead of having to guess them. `scripts/fuzz.sh seeds` runs it.

use std::collections::HashMap;
use std::path::Path;

use bytes::{BufMut, Bytes, BytesMut};
use stagingprop::model::{Column, Lsn, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Value};
use stagingprop::pgoutput::{LogicalMessage, encode};
use stagingprop::spool::{record, segment};

fn relation() -> Relation {
    Relation {
        oid: 16384,
        namespace: "public".into(),
        name: "catentry".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "catentry_id".into(),
                is_key: true,
                type_oid: 20,
                type_modifier: -1,
            },
            Column {
                name: "descr".into(),
                is_key: false,
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    }
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One transaction as pgoutput sends it, LSNs included.
fn transaction() -> Vec<(Lsn, LogicalMessage)> {
    let time = PgTimestamp(800_000_000_000_000);
    let key = OldTuple::Key(vec![text("7"), Value::Null]);
    [
        LogicalMessage::Begin {
            final_lsn: Lsn(0x1_6B37_4D48),
            commit_time: time,
            xid: 740,
        },
        LogicalMessage::Relation {
            xid: None,
            relation: relation(),
        },
        LogicalMessage::Insert {
            xid: None,
            relation: 16384,
            new: vec![text("7"), text("a red chair")],
        },
        LogicalMessage::Update {
            xid: None,
            relation: 16384,
            old: Some(key.clone()),
            new: vec![text("8"), Value::UnchangedToast],
        },
        LogicalMessage::Delete {
            xid: None,
            relation: 16384,
            old: key,
        },
        LogicalMessage::Truncate {
            xid: None,
            relations: vec![16384],
            cascade: false,
            restart_identity: true,
        },
        LogicalMessage::Commit {
            flags: 0,
            commit_lsn: Lsn(0x1_6B37_4D48),
            end_lsn: Lsn(0x1_6B37_4D78),
            commit_time: time,
        },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, m)| (Lsn(0x1_6B37_4000 + 0x40 * i as u64), m))
    .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed written");
}

fn pgoutput(dir: &Path) {
    let mut sequence = Vec::new();
    for (i, (_, message)) in transaction().iter().enumerate() {
        let payload = encode::logical_message(message);
        write(dir, &format!("message-{i}"), &payload);
        sequence.push(payload.len() as u8);
        sequence.extend_from_slice(&payload);
    }
    let streamed = [
        encode::stream_start(741, true),
        encode::insert(Some(741), 16384, &[text("9"), Value::Null]),
        encode::stream_stop(),
        encode::stream_abort(741, 742, None),
        encode::stream_commit(741, 0, Lsn(0x2000), Lsn(0x2030), PgTimestamp(5)),
        encode::message(Some(741), true, Lsn(0x2010), "stagingprop", b"heartbeat"),
        encode::type_(None, 90001, "public", "mood"),
        encode::origin(Lsn(0x2000), "pg_16399"),
    ];
    for (i, payload) in streamed.iter().enumerate() {
        write(dir, &format!("streamed-{i}"), payload);
        sequence.push(payload.len() as u8);
        sequence.extend_from_slice(payload);
    }
    write(dir, "sequence", &sequence);
}

fn backend(dir: &Path) {
    let mut out = BytesMut::new();
    let mut message = |tag: u8, body: &[u8]| {
        out.put_u8(tag);
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(body);
    };
    message(
        b'R',
        &[
            0, 0, 0, 10, b'S', b'C', b'R', b'A', b'M', b'-', b'S', b'H', b'A', b'-', b'2', b'5',
            b'6', 0, 0,
        ],
    );
    message(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
    message(b'R', &[0, 0, 0, 0]);
    message(b'S', b"server_version\x0015.8 (Debian 15.8-1)\0");
    message(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]);
    message(b'Z', b"I");
    let mut row_description = vec![0, 2];
    for name in ["systemid", "xlogpos"] {
        row_description.extend_from_slice(name.as_bytes());
        row_description.extend_from_slice(&[0; 19]);
    }
    message(b'T', &row_description);
    let mut data_row = vec![0, 2, 0, 0, 0, 3];
    data_row.extend_from_slice(b"742");
    data_row.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    message(b'D', &data_row);
    message(b'C', b"IDENTIFY_SYSTEM\0");
    message(
        b'E',
        b"SERROR\0C42704\0Mreplication slot \"s\" does not exist\0\0",
    );
    message(b'W', &[0, 0, 0]);
    for (lsn, m) in transaction() {
        let mut xlog = BytesMut::new();
        xlog.put_u8(b'w');
        xlog.put_u64(lsn.0);
        xlog.put_u64(lsn.0 + 0x100);
        xlog.put_i64(800_000_000_000_000);
        xlog.put_slice(&encode::logical_message(&m));
        message(b'd', &xlog);
    }
    let mut keepalive = vec![b'k'];
    keepalive.extend_from_slice(&0x1_6B37_4D78u64.to_be_bytes());
    keepalive.extend_from_slice(&800_000_000_000_000i64.to_be_bytes());
    keepalive.push(1);
    message(b'd', &keepalive);
    message(b'c', &[]);
    // The first byte is the read size the target uses.
    let mut seed = vec![200];
    seed.extend_from_slice(&out);
    write(dir, "session", &seed);
    seed[0] = 0;
    write(dir, "session-bytewise", &seed);
}

fn spool(dir: &Path) {
    let relations = HashMap::from([(16384, relation())]);
    let mut framed = Vec::new();
    for (i, (lsn, m)) in transaction().iter().enumerate() {
        if let Some(r) = record::to_record(*lsn, m, &relations) {
            let mut payload = Vec::new();
            record::encode(&r, &mut payload);
            write(dir, &format!("record-{i}"), &payload);
            segment::encode_frame(&payload, &mut framed).expect("a small frame");
        }
    }
    write(dir, "segment", &framed);
}

fn copy(dir: &Path) {
    let mut stream = b"PGCOPY\n\xff\r\n\0".to_vec();
    stream.extend_from_slice(&[0; 8]);
    for (id, parent) in [(1i64, 5i32), (2, 63), (70, -1)] {
        stream.extend_from_slice(&3i16.to_be_bytes());
        stream.extend_from_slice(&8i32.to_be_bytes());
        stream.extend_from_slice(&id.to_be_bytes());
        if parent < 0 {
            stream.extend_from_slice(&(-1i32).to_be_bytes());
        } else {
            stream.extend_from_slice(&4i32.to_be_bytes());
            stream.extend_from_slice(&parent.to_be_bytes());
        }
        stream.extend_from_slice(&5i32.to_be_bytes());
        stream.extend_from_slice(b"chair");
    }
    stream.extend_from_slice(&(-1i16).to_be_bytes());
    // columns, rewritten-column mask, mode, piece size; then the stream.
    for (name, config) in [
        ("offset", [3, 0b011, 0, 7]),
        ("edge", [3, 0b001, 1, 0]),
        ("map", [3, 0b010, 2, 255]),
    ] {
        let mut seed = config.to_vec();
        seed.extend_from_slice(&stream);
        write(dir, name, &seed);
    }
}

fn config(dir: &Path, example: &Path) {
    let text = std::fs::read(example).expect("the example configuration");
    write(dir, "example", &text);
    write(
        dir,
        "small",
        br#"[staging]
url = "postgresql://sp@127.0.0.1:5432/staging?sslmode=disable"
[production]
url = "postgresql://sp@127.0.0.1:5433/production"
password_env = "PRODUCTION_PASSWORD"
[sync]
slot = "stagingprop"
batch_max_rows = 500
[spool]
dir = "spool"
[stream]
url = "nats://127.0.0.1:4222"
[[tables]]
name = "public.catentry"
key = { rule = "offset", offset = 1000000 }
[[tables]]
name = "public.catentdesc"
filter = "language_id = -1"
"#,
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    pgoutput(&corpus.join("pgoutput_decode"));
    backend(&corpus.join("backend_messages"));
    spool(&corpus.join("spool_records"));
    copy(&corpus.join("copy_rewrite"));
    config(
        &corpus.join("config_parse"),
        &root.join("../stagingprop.example.toml"),
    );
    println!("seeds written under {}", corpus.display());
}
