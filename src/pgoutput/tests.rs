//! The decoder against byte fixtures, every message kind, malformed input and properties.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::model::{Column, OldTuple, ReplicaIdentity, Value};

const REL: Oid = 16385;
const XID: Xid = 1000;

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn binary(b: &[u8]) -> Value {
    Value::Binary(Bytes::copy_from_slice(b))
}

/// A decoder inside the streamed block of `XID`.
fn streaming() -> Decoder {
    let mut decoder = Decoder::new();
    decoder.decode(encode::stream_start(XID, true)).unwrap();
    decoder
}

fn decoder_for(streamed: bool) -> Decoder {
    if streamed {
        streaming()
    } else {
        Decoder::new()
    }
}

fn decode(streamed: bool, bytes: &[u8]) -> Result<LogicalMessage, DecodeError> {
    decoder_for(streamed).decode(Bytes::copy_from_slice(bytes))
}

fn products() -> Relation {
    Relation {
        oid: REL,
        namespace: "shop".into(),
        name: "products".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                is_key: true,
                type_oid: 20,
                type_modifier: -1,
            },
            Column {
                name: "name".into(),
                is_key: false,
                type_oid: 25,
                type_modifier: -1,
            },
            Column {
                name: "price".into(),
                is_key: false,
                type_oid: 1700,
                type_modifier: 655366,
            },
        ],
    }
}

// ---- Hand-written fixtures: the bytes come from the protocol documentation, not the encoder.

const BEGIN: &[u8] = &[
    b'B', //
    0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x48, // final LSN 1/6B374D48
    0, 2, 0x9D, 0x3A, 0x1B, 0x2C, 0x3D, 0x4E, // commit time
    0, 0, 2, 0xE9, // xid 745
];

const COMMIT: &[u8] = &[
    b'C', 0, // flags
    0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x48, // commit LSN
    0, 0, 0, 1, 0x6B, 0x37, 0x4D, 0x78, // end LSN
    0, 2, 0x9D, 0x3A, 0x1B, 0x2C, 0x3D, 0x4E, // commit time
];

/// Protocol 1 Relation in pg_catalog (namespace sent as ""), REPLICA IDENTITY FULL.
const RELATION_PG_CATALOG: &[u8] = &[
    b'R', 0, 0, 0x40, 0x01, // OID 16385
    0,    // namespace ""
    b't', b'a', b'g', b's', 0,    // name
    b'f', // replica identity full
    0, 2, // columns
    1, b'i', b'd', 0, 0, 0, 0, 23, 0xFF, 0xFF, 0xFF, 0xFF, // key int4, typmod -1
    0, b'n', b'a', b'm', b'e', 0, 0, 0, 0, 25, 0xFF, 0xFF, 0xFF, 0xFF, // text
];

/// Protocol 2 streamed Insert with every tuple kind.
const INSERT_STREAMED: &[u8] = &[
    b'I', 0, 0, 0x03, 0xE8, // xid 1000
    0, 0, 0x40, 0x01, // relation
    b'N', 0, 4, // 4 columns
    b'n', b'u', //
    b't', 0, 0, 0, 2, b'h', b'i', //
    b'b', 0, 0, 0, 3, 1, 2, 3,
];

const UPDATE_KEY: &[u8] = &[
    b'U', 0, 0, 0x40, 0x01, //
    b'K', 0, 2, b't', 0, 0, 0, 1, b'7', b'n', //
    b'N', 0, 2, b't', 0, 0, 0, 1, b'8', b't', 0, 0, 0, 3, b'a', b'b', b'c',
];

const TRUNCATE: &[u8] = &[
    b'T', 0, 0, 0, 2, // two relations
    3, // CASCADE | RESTART IDENTITY
    0, 0, 0x40, 0x01, 0, 0, 0x40, 0x02,
];

const MESSAGE: &[u8] = &[
    b'M', 1, // transactional
    0, 0, 0, 0, 0, 0, 0x10, 0x00, // LSN
    b'p', b'f', b'x', 0, // prefix
    0, 0, 0, 3, b'a', b'b', b'c',
];

/// Protocol 4 Stream Abort with the abort LSN and time.
const STREAM_ABORT_V4: &[u8] = &[
    b'A', 0, 0, 0x03, 0xE8, 0, 0, 0x03, 0xE9, //
    0, 0, 0, 0, 0, 0, 0x20, 0x00, // abort LSN
    0, 0, 0, 0, 0, 0, 0, 42, // abort time
];

#[test]
fn hand_written_fixtures_decode_and_the_encoder_matches_them() {
    let cases: Vec<(&[u8], bool, LogicalMessage, Bytes)> = vec![
        (
            BEGIN,
            false,
            LogicalMessage::Begin {
                final_lsn: Lsn(0x1_6B37_4D48),
                commit_time: PgTimestamp(0x0002_9D3A_1B2C_3D4E),
                xid: 745,
            },
            encode::begin(Lsn(0x1_6B37_4D48), PgTimestamp(0x0002_9D3A_1B2C_3D4E), 745),
        ),
        (
            COMMIT,
            false,
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(0x1_6B37_4D48),
                end_lsn: Lsn(0x1_6B37_4D78),
                commit_time: PgTimestamp(0x0002_9D3A_1B2C_3D4E),
            },
            encode::commit(
                0,
                Lsn(0x1_6B37_4D48),
                Lsn(0x1_6B37_4D78),
                PgTimestamp(0x0002_9D3A_1B2C_3D4E),
            ),
        ),
        {
            let relation = Relation {
                oid: REL,
                namespace: "pg_catalog".into(),
                name: "tags".into(),
                replica_identity: ReplicaIdentity::Full,
                columns: vec![
                    Column {
                        name: "id".into(),
                        is_key: true,
                        type_oid: 23,
                        type_modifier: -1,
                    },
                    Column {
                        name: "name".into(),
                        is_key: false,
                        type_oid: 25,
                        type_modifier: -1,
                    },
                ],
            };
            let bytes = encode::relation(None, &relation);
            (
                RELATION_PG_CATALOG,
                false,
                LogicalMessage::Relation {
                    xid: None,
                    relation,
                },
                bytes,
            )
        },
        {
            let new = vec![
                Value::Null,
                Value::UnchangedToast,
                text("hi"),
                binary(&[1, 2, 3]),
            ];
            let bytes = encode::insert(Some(XID), REL, &new);
            (
                INSERT_STREAMED,
                true,
                LogicalMessage::Insert {
                    xid: Some(XID),
                    relation: REL,
                    new,
                },
                bytes,
            )
        },
        {
            let old = OldTuple::Key(vec![text("7"), Value::Null]);
            let new = vec![text("8"), text("abc")];
            let bytes = encode::update(None, REL, Some(&old), &new);
            (
                UPDATE_KEY,
                false,
                LogicalMessage::Update {
                    xid: None,
                    relation: REL,
                    old: Some(old),
                    new,
                },
                bytes,
            )
        },
        (
            TRUNCATE,
            false,
            LogicalMessage::Truncate {
                xid: None,
                relations: vec![REL, REL + 1],
                cascade: true,
                restart_identity: true,
            },
            encode::truncate(None, &[REL, REL + 1], true, true),
        ),
        (
            MESSAGE,
            false,
            LogicalMessage::Message {
                xid: None,
                transactional: true,
                lsn: Lsn(0x1000),
                prefix: "pfx".into(),
                content: Bytes::from_static(b"abc"),
            },
            encode::message(None, true, Lsn(0x1000), "pfx", b"abc"),
        ),
        (
            STREAM_ABORT_V4,
            false,
            LogicalMessage::StreamAbort {
                xid: 1000,
                subxact_xid: 1001,
                abort_lsn: Some(Lsn(0x2000)),
                abort_time: Some(PgTimestamp(42)),
            },
            encode::stream_abort(1000, 1001, Some((Lsn(0x2000), PgTimestamp(42)))),
        ),
    ];
    for (bytes, streamed, expected, encoded) in cases {
        assert_eq!(decode(streamed, bytes).unwrap(), expected, "{bytes:?}");
        assert_eq!(
            &encoded[..],
            bytes,
            "encoder disagrees with the fixture for {}",
            expected.name()
        );
    }
}

/// Every message shape: (streamed decoder?, message). Used for the round trip and for the
/// truncation sweep.
fn all_fixtures() -> Vec<(bool, LogicalMessage)> {
    let row = vec![
        text("42"),
        text("Widget"),
        Value::Null,
        Value::UnchangedToast,
        binary(b"\x00\x01"),
    ];
    let key = OldTuple::Key(vec![
        text("42"),
        Value::Null,
        Value::Null,
        Value::Null,
        Value::Null,
    ]);
    let full = OldTuple::Full(row.clone());
    let mut fixtures = vec![
        (
            false,
            LogicalMessage::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time: PgTimestamp(1),
                xid: 7,
            },
        ),
        (
            false,
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time: PgTimestamp(-5),
            },
        ),
        (
            false,
            LogicalMessage::Origin {
                commit_lsn: Lsn(99),
                name: "node_a".into(),
            },
        ),
        (
            false,
            LogicalMessage::StreamStart {
                xid: 5,
                first_segment: true,
            },
        ),
        (
            false,
            LogicalMessage::StreamStart {
                xid: 5,
                first_segment: false,
            },
        ),
        (true, LogicalMessage::StreamStop),
        (
            false,
            LogicalMessage::StreamCommit {
                xid: 5,
                flags: 0,
                commit_lsn: Lsn(30),
                end_lsn: Lsn(40),
                commit_time: PgTimestamp(50),
            },
        ),
        (
            false,
            LogicalMessage::StreamAbort {
                xid: 5,
                subxact_xid: 6,
                abort_lsn: None,
                abort_time: None,
            },
        ),
        (
            false,
            LogicalMessage::StreamAbort {
                xid: 5,
                subxact_xid: 6,
                abort_lsn: Some(Lsn(60)),
                abort_time: Some(PgTimestamp(70)),
            },
        ),
    ];
    for (streamed, xid) in [(false, None), (true, Some(XID))] {
        fixtures.extend([
            (
                streamed,
                LogicalMessage::Relation {
                    xid,
                    relation: products(),
                },
            ),
            (
                streamed,
                LogicalMessage::Relation {
                    xid,
                    relation: Relation {
                        namespace: "pg_catalog".into(),
                        replica_identity: ReplicaIdentity::Nothing,
                        columns: vec![],
                        ..products()
                    },
                },
            ),
            (
                streamed,
                LogicalMessage::Relation {
                    xid,
                    relation: Relation {
                        replica_identity: ReplicaIdentity::Index,
                        ..products()
                    },
                },
            ),
            (
                streamed,
                LogicalMessage::Type {
                    xid,
                    oid: 90001,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
            ),
            (
                streamed,
                LogicalMessage::Type {
                    xid,
                    oid: 90002,
                    namespace: "pg_catalog".into(),
                    name: "x".into(),
                },
            ),
            (
                streamed,
                LogicalMessage::Insert {
                    xid,
                    relation: REL,
                    new: row.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Insert {
                    xid,
                    relation: REL,
                    new: vec![],
                },
            ),
            (
                streamed,
                LogicalMessage::Update {
                    xid,
                    relation: REL,
                    old: None,
                    new: row.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Update {
                    xid,
                    relation: REL,
                    old: Some(key.clone()),
                    new: row.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Update {
                    xid,
                    relation: REL,
                    old: Some(full.clone()),
                    new: row.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Delete {
                    xid,
                    relation: REL,
                    old: key.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Delete {
                    xid,
                    relation: REL,
                    old: full.clone(),
                },
            ),
            (
                streamed,
                LogicalMessage::Message {
                    xid,
                    transactional: true,
                    lsn: Lsn(1),
                    prefix: "app".into(),
                    content: Bytes::from_static(b"payload"),
                },
            ),
            (
                streamed,
                LogicalMessage::Message {
                    xid,
                    transactional: false,
                    lsn: Lsn(2),
                    prefix: "".into(),
                    content: Bytes::new(),
                },
            ),
        ]);
        for (cascade, restart_identity) in
            [(false, false), (true, false), (false, true), (true, true)]
        {
            fixtures.push((
                streamed,
                LogicalMessage::Truncate {
                    xid,
                    relations: vec![REL, REL + 7],
                    cascade,
                    restart_identity,
                },
            ));
        }
    }
    fixtures
}

#[test]
fn every_message_round_trips() {
    for (streamed, message) in all_fixtures() {
        let bytes = encode::logical_message(&message);
        assert_eq!(decoder_for(streamed).decode(bytes).unwrap(), message);
    }
}

#[test]
fn every_truncated_prefix_is_an_error() {
    let mut fixtures: Vec<(bool, Bytes)> = all_fixtures()
        .iter()
        .map(|(s, m)| (*s, encode::logical_message(m)))
        .collect();
    for hand in [
        BEGIN,
        COMMIT,
        RELATION_PG_CATALOG,
        UPDATE_KEY,
        TRUNCATE,
        MESSAGE,
        STREAM_ABORT_V4,
    ] {
        fixtures.push((false, Bytes::from_static(hand)));
    }
    fixtures.push((true, Bytes::from_static(INSERT_STREAMED)));
    for (streamed, bytes) in fixtures {
        for len in 0..bytes.len() {
            let result = decoder_for(streamed).decode(bytes.slice(..len));
            // The only valid prefix: a protocol 4 Stream Abort cut before its optional fields.
            if bytes[0] == b'A' && len == 9 {
                assert!(matches!(
                    result,
                    Ok(LogicalMessage::StreamAbort {
                        abort_lsn: None,
                        ..
                    })
                ));
            } else {
                assert!(
                    result.is_err(),
                    "prefix {len} of {bytes:?} decoded as {result:?}"
                );
            }
        }
    }
}

#[test]
fn column_values_are_slices_of_the_payload() {
    let payload = Bytes::from_static(INSERT_STREAMED);
    let LogicalMessage::Insert { new, .. } = streaming().decode(payload.clone()).unwrap() else {
        panic!("not an insert");
    };
    let range = payload.as_ptr_range();
    for value in new {
        if let Value::Text(b) | Value::Binary(b) = value {
            assert!(range.contains(&b.as_ptr()), "column bytes were copied");
        }
    }
}

#[test]
fn streamed_block_state() {
    let mut decoder = Decoder::new();
    assert!(!decoder.in_streamed_block());
    assert_eq!(
        decoder.decode(encode::stream_stop()),
        Err(DecodeError::StreamStopOutsideStream)
    );
    decoder.decode(encode::stream_start(5, true)).unwrap();
    assert!(decoder.in_streamed_block());
    assert_eq!(
        decoder.decode(encode::stream_start(6, true)),
        Err(DecodeError::StreamStartInsideStream {
            xid: 6,
            open_xid: 5
        })
    );
    for boundary in [
        encode::begin(Lsn(1), PgTimestamp(1), 9),
        encode::commit(0, Lsn(1), Lsn(2), PgTimestamp(1)),
        encode::stream_commit(5, 0, Lsn(1), Lsn(2), PgTimestamp(1)),
        encode::stream_abort(5, 5, None),
    ] {
        assert!(matches!(
            decoder.decode(boundary),
            Err(DecodeError::NotAllowedInStream { open_xid: 5, .. })
        ));
    }
    // A failed Stream Stop leaves the block open.
    assert!(decoder.decode(Bytes::from_static(b"Ex")).is_err());
    assert!(decoder.in_streamed_block());
    // Inside the block changes carry the xid.
    assert_eq!(
        decoder
            .decode(encode::insert(Some(5), REL, &[text("a")]))
            .unwrap(),
        LogicalMessage::Insert {
            xid: Some(5),
            relation: REL,
            new: vec![text("a")]
        }
    );
    assert_eq!(
        decoder.decode(encode::stream_stop()),
        Ok(LogicalMessage::StreamStop)
    );
    assert!(!decoder.in_streamed_block());
    // A truncated Stream Start does not open a block.
    assert!(decoder.decode(Bytes::from_static(b"S\0\0\0")).is_err());
    assert!(!decoder.in_streamed_block());
}

#[test]
fn errors_name_what_was_wrong() {
    assert_eq!(decode(false, b""), Err(DecodeError::Empty));
    assert_eq!(
        decode(false, b"Z"),
        Err(DecodeError::UnknownTag { tag: b'Z' })
    );
    assert_eq!(
        DecodeError::UnknownTag { tag: b'Z' }.to_string(),
        "unknown pgoutput message tag 'Z' (0x5a)"
    );
    assert!(matches!(
        decode(false, b"P"),
        Err(DecodeError::TwoPhaseUnsupported { tag: b'P', .. })
    ));

    // Unknown tuple kind 'x' in column 1 at offset 9.
    let bad_kind = [b'I', 0, 0, 0x40, 1, b'N', 0, 2, b'n', b'x'];
    assert_eq!(
        decode(false, &bad_kind),
        Err(DecodeError::UnknownTupleKind {
            message: "Insert",
            column: 1,
            kind: b'x',
            offset: 9
        })
    );

    let mut trailing = INSERT_STREAMED.to_vec();
    trailing.extend_from_slice(b"zz");
    assert_eq!(
        decode(true, &trailing),
        Err(DecodeError::TrailingBytes {
            message: "Insert",
            count: 2,
            offset: INSERT_STREAMED.len()
        })
    );
    let mut trailing_abort = STREAM_ABORT_V4.to_vec();
    trailing_abort.push(0);
    assert!(matches!(
        decode(false, &trailing_abort),
        Err(DecodeError::TrailingBytes { count: 1, .. })
    ));

    let mut bad_identity = RELATION_PG_CATALOG.to_vec();
    bad_identity[11] = b'q';
    assert_eq!(
        decode(false, &bad_identity),
        Err(DecodeError::BadReplicaIdentity {
            relation: REL,
            byte: b'q',
            offset: 11
        })
    );

    let mut bad_utf8 = RELATION_PG_CATALOG.to_vec();
    bad_utf8[6] = 0xFF;
    assert_eq!(
        decode(false, &bad_utf8),
        Err(DecodeError::InvalidUtf8 {
            message: "Relation",
            field: "relation name",
            offset: 6
        })
    );

    let negative = [
        b'I', 0, 0, 0x40, 1, b'N', 0, 1, b't', 0xFF, 0xFF, 0xFF, 0xFE,
    ];
    assert_eq!(
        decode(false, &negative),
        Err(DecodeError::NegativeLength {
            message: "Insert",
            field: "column length",
            length: -2,
            offset: 9
        })
    );
    let negative_truncate = [b'T', 0x80, 0, 0, 0, 0];
    assert!(matches!(
        decode(false, &negative_truncate),
        Err(DecodeError::NegativeLength { .. })
    ));

    assert_eq!(
        decode(true, &INSERT_STREAMED[..11]),
        Err(DecodeError::Truncated {
            message: "Insert",
            field: "column count",
            offset: 10,
            needed: 2,
            available: 1
        })
    );
    assert!(matches!(
        decode(false, &[b'O', 0, 0, 0, 0, 0, 0, 0, 1, b'a']),
        Err(DecodeError::UnterminatedString { .. })
    ));

    let wrong_marker = [b'I', 0, 0, 0x40, 1, b'K', 0, 0];
    assert!(matches!(
        decode(false, &wrong_marker),
        Err(DecodeError::UnexpectedTupleMarker {
            found: b'K',
            offset: 5,
            ..
        })
    ));
    let wrong_update = [b'U', 0, 0, 0x40, 1, b'X', 0, 0];
    assert!(matches!(
        decode(false, &wrong_update),
        Err(DecodeError::UnexpectedTupleMarker { .. })
    ));
    let wrong_delete = [b'D', 0, 0, 0x40, 1, b'N', 0, 0];
    assert!(matches!(
        decode(false, &wrong_delete),
        Err(DecodeError::UnexpectedTupleMarker { .. })
    ));
    // Update whose old tuple is not followed by 'N'.
    let update_no_new = [b'U', 0, 0, 0x40, 1, b'K', 0, 0, b'K', 0, 0];
    assert!(matches!(
        decode(false, &update_no_new),
        Err(DecodeError::UnexpectedTupleMarker { .. })
    ));
}

#[test]
fn hostile_counts_do_not_allocate_up_front() {
    // 65535 columns announced, none present.
    let insert = [b'I', 0, 0, 0x40, 1, b'N', 0xFF, 0xFF];
    assert!(matches!(
        decode(false, &insert),
        Err(DecodeError::Truncated {
            field: "column kind",
            ..
        })
    ));
    let relation = [b'R', 0, 0, 0x40, 1, 0, b't', 0, b'd', 0xFF, 0xFF];
    assert!(matches!(
        decode(false, &relation),
        Err(DecodeError::Truncated { .. })
    ));
    let truncate = [b'T', 0x7F, 0xFF, 0xFF, 0xFF, 0];
    assert!(matches!(
        decode(false, &truncate),
        Err(DecodeError::Truncated { .. })
    ));
    let message = [b'M', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF];
    assert!(matches!(
        decode(false, &message),
        Err(DecodeError::Truncated {
            field: "content",
            ..
        })
    ));
}

// ---- Properties.

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(Value::UnchangedToast),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| Value::Text(Bytes::from(v))),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| Value::Binary(Bytes::from(v))),
    ]
}

fn arb_tuple() -> impl Strategy<Value = Tuple> {
    proptest::collection::vec(arb_value(), 0..12)
}

fn arb_old() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        arb_tuple().prop_map(OldTuple::Key),
        arb_tuple().prop_map(OldTuple::Full)
    ]
}

/// Names never contain NUL; "" is not a namespace pgoutput can mean (it stands for pg_catalog).
fn arb_name() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn arb_namespace() -> impl Strategy<Value = String> {
    prop_oneof![Just("pg_catalog".to_owned()), "\\PC{1,12}"]
}

fn arb_relation() -> impl Strategy<Value = Relation> {
    let column = (arb_name(), any::<bool>(), any::<u32>(), any::<i32>()).prop_map(
        |(name, is_key, type_oid, type_modifier)| Column {
            name,
            is_key,
            type_oid,
            type_modifier,
        },
    );
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index)
    ];
    (
        any::<u32>(),
        arb_namespace(),
        arb_name(),
        identity,
        proptest::collection::vec(column, 0..8),
    )
        .prop_map(
            |(oid, namespace, name, replica_identity, columns)| Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            },
        )
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn ts() -> impl Strategy<Value = PgTimestamp> {
    any::<i64>().prop_map(PgTimestamp)
}

/// A message that a change-carrying decoder state accepts: `xid` is `Some` for messages sent
/// inside a streamed block. Returns (decode inside a stream?, message).
fn arb_message() -> impl Strategy<Value = (bool, LogicalMessage)> {
    let xid = proptest::option::of(any::<u32>());
    let change = prop_oneof![
        (xid.clone(), arb_relation())
            .prop_map(|(xid, relation)| LogicalMessage::Relation { xid, relation }),
        (xid.clone(), any::<u32>(), arb_namespace(), arb_name()).prop_map(
            |(xid, oid, namespace, name)| LogicalMessage::Type {
                xid,
                oid,
                namespace,
                name
            }
        ),
        (xid.clone(), any::<u32>(), arb_tuple())
            .prop_map(|(xid, relation, new)| LogicalMessage::Insert { xid, relation, new }),
        (
            xid.clone(),
            any::<u32>(),
            proptest::option::of(arb_old()),
            arb_tuple()
        )
            .prop_map(|(xid, relation, old, new)| LogicalMessage::Update {
                xid,
                relation,
                old,
                new
            }),
        (xid.clone(), any::<u32>(), arb_old())
            .prop_map(|(xid, relation, old)| LogicalMessage::Delete { xid, relation, old }),
        (
            xid.clone(),
            proptest::collection::vec(any::<u32>(), 0..6),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(xid, relations, cascade, restart_identity)| {
                LogicalMessage::Truncate {
                    xid,
                    relations,
                    cascade,
                    restart_identity,
                }
            }),
        (
            xid,
            any::<bool>(),
            lsn(),
            arb_name(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(xid, transactional, lsn, prefix, content)| {
                LogicalMessage::Message {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content: content.into(),
                }
            }),
    ]
    .prop_map(|m| {
        let streamed = match &m {
            LogicalMessage::Relation { xid, .. }
            | LogicalMessage::Type { xid, .. }
            | LogicalMessage::Insert { xid, .. }
            | LogicalMessage::Update { xid, .. }
            | LogicalMessage::Delete { xid, .. }
            | LogicalMessage::Truncate { xid, .. }
            | LogicalMessage::Message { xid, .. } => xid.is_some(),
            _ => false,
        };
        (streamed, m)
    });
    let control = prop_oneof![
        (lsn(), ts(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            LogicalMessage::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }),
        (any::<u8>(), lsn(), lsn(), ts()).prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
            LogicalMessage::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            }
        }),
        (lsn(), arb_name())
            .prop_map(|(commit_lsn, name)| LogicalMessage::Origin { commit_lsn, name }),
        (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
            LogicalMessage::StreamStart { xid, first_segment }
        }),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), ts()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| LogicalMessage::StreamCommit {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                commit_time
            }
        ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((lsn(), ts()))
        )
            .prop_map(|(xid, subxact_xid, abort)| LogicalMessage::StreamAbort {
                xid,
                subxact_xid,
                abort_lsn: abort.map(|a| a.0),
                abort_time: abort.map(|a| a.1),
            }),
    ]
    .prop_map(|m| (false, m));
    prop_oneof![3 => change, 1 => control, 1 => Just((true, LogicalMessage::StreamStop))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn round_trip((streamed, message) in arb_message()) {
        let bytes = encode::logical_message(&message);
        prop_assert_eq!(decoder_for(streamed).decode(bytes.clone()).unwrap(), message.clone());
        // Every strict prefix is an error, except the protocol 2 form of a protocol 4 Stream
        // Abort.
        for len in 0..bytes.len() {
            let result = decoder_for(streamed).decode(bytes.slice(..len));
            if !(bytes[0] == b'A' && len == 9) {
                prop_assert!(result.is_err(), "prefix {} decoded as {:?}", len, result);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(false, &bytes);
        let _ = decode(true, &bytes);
    }

    #[test]
    fn mutated_messages_never_panic(
        (_, message) in arb_message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode::logical_message(&message).to_vec();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len() + 1);
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        let truncated = &bytes[..cut.index(bytes.len() + 1)];
        for input in [&bytes[..], truncated] {
            for streamed in [false, true] {
                if let Ok(decoded) = decode(streamed, input) {
                    // Whatever decodes re-encodes to something that decodes the same.
                    let again = decoder_for(streamed).decode(encode::logical_message(&decoded));
                    prop_assert_eq!(again, Ok(decoded));
                }
            }
        }
    }
}
