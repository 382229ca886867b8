//! Decoder throughput over a catalogue-shaped replication stream: bytes per second and messages
//! per second. The stream is recorded from a real PostgreSQL server (a throwaway cluster running
//! a catalogue workload) on first use and cached in `target/`; only when no server can be started
//! does it fall back to a synthetic stream built with `pgoutput::encode`.

use std::hint::black_box;
use std::path::PathBuf;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use stagingprop::model::{Column, Lsn, OldTuple, PgTimestamp, Relation, ReplicaIdentity, Value};
use stagingprop::pgoutput::{Decoder, encode};

/// The payloads of a replication stream, in order. Reads a recording (repeated
/// `[u32 big-endian length][payload]`) from `$STAGINGPROP_BENCH_STREAM` or
/// `target/pgoutput-catalogue.bin`; without one, synthesises a catalogue-shaped stream.
fn recorded_stream() -> Vec<Bytes> {
    let path = std::env::var_os("STAGINGPROP_BENCH_STREAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/pgoutput-catalogue.bin"));
    match std::fs::read(&path) {
        Ok(recording) => {
            let stream = split_frames(Bytes::from(recording));
            eprintln!(
                "decode bench: using the recorded stream {} ({} messages)",
                path.display(),
                stream.len()
            );
            stream
        }
        Err(_) if std::env::var_os("STAGINGPROP_BENCH_STREAM").is_none() => {
            match record_from_server(&path) {
                Ok(()) => recorded_stream(),
                Err(err) => {
                    let stream = split_frames(synthetic_catalogue_stream());
                    eprintln!(
                        "decode bench: cannot record a real stream ({err}); using a synthetic catalogue stream ({} messages)",
                        stream.len()
                    );
                    stream
                }
            }
        }
        Err(err) => {
            let stream = split_frames(synthetic_catalogue_stream());
            eprintln!(
                "decode bench: no recording at {} ({err}); using a synthetic catalogue stream ({} messages)",
                path.display(),
                stream.len()
            );
            stream
        }
    }
}

/// The catalogue the recording workload edits: products, descriptions with TOASTed long texts,
/// offer prices, and attachments with bytea content and jsonb attributes.
const RECORD_SCHEMA: &str = "
CREATE TABLE catentry (catentry_id bigint PRIMARY KEY, member_id bigint NOT NULL,
  partnumber varchar(64) NOT NULL, catenttype_id char(16), buyable int, published int,
  lastupdate timestamptz, markfordelete int, url varchar(254), field1 varchar(254),
  field2 integer, attrs jsonb);
CREATE TABLE catentdesc (catentry_id bigint, language_id int, name varchar(128),
  shortdescription varchar(254), longdescription text, thumbnail varchar(254),
  fullimage varchar(254), published int, keyword varchar(254), PRIMARY KEY (catentry_id, language_id));
CREATE TABLE offerprice (offer_id bigint, currency char(3), price numeric(20,5),
  minimumquantity numeric(20,5), PRIMARY KEY (offer_id, currency));
CREATE TABLE attachment (attachment_id bigint PRIMARY KEY, catentry_id bigint,
  mimetype varchar(64), content bytea);
CREATE PUBLICATION bench FOR TABLE catentry, catentdesc, offerprice, attachment;
";

/// One transaction of the recording workload: a batch of new products with their
/// descriptions, prices and attachments, then price updates and a few deletes.
fn record_workload_batch(batch: u64) -> String {
    let lo = batch * 500 + 1;
    let hi = lo + 499;
    format!(
        "BEGIN;
INSERT INTO catentry SELECT g, 7000000000000000001, 'PN-' || g, 'ItemBean', 1, 1,
  now(), 0, '/p/' || g, md5(g::text), g % 97,
  jsonb_build_object('color', (ARRAY['red','green','blue'])[1 + g % 3], 'size', g % 50, 'tags', jsonb_build_array('new', 'sale'))
  FROM generate_series({lo}, {hi}) g;
INSERT INTO catentdesc SELECT g, l, 'Product ' || g || ' in ' || l, left(repeat(md5(g::text || l), 4), 200),
  repeat(md5(g::text) || ' lorem ipsum dolor sit amet ', 1 + (g * 7 + l) % 100),
  '/img/t/' || g || '.jpg', '/img/f/' || g || '.jpg', 1, 'kw' || g
  FROM generate_series({lo}, {hi}) g, generate_series(-2, -1) l;
INSERT INTO offerprice SELECT g, c, (g % 1000) + 0.99, 1 FROM generate_series({lo}, {hi}) g, unnest(ARRAY['USD','EUR']) c;
INSERT INTO attachment SELECT g, g, 'image/png', decode(repeat(md5(g::text), 64 + g % 128), 'hex')
  FROM generate_series({lo}, {hi}, 10) g;
UPDATE offerprice SET price = price * 0.9 WHERE offer_id BETWEEN {lo} AND {lo} + 199;
UPDATE catentry SET published = 0, lastupdate = now() WHERE catentry_id BETWEEN {lo} AND {lo} + 49;
DELETE FROM catentdesc WHERE catentry_id BETWEEN {lo} AND {lo} + 9 AND language_id = -2;
COMMIT;"
    )
}

/// Records the stream of a real server running the catalogue workload into `path`.
fn record_from_server(path: &std::path::Path) -> Result<(), String> {
    use stagingprop::cluster::{ClusterOptions, LocalCluster};
    use stagingprop::pg::connect::{Endpoint, TlsPolicy};
    use stagingprop::pg::replication::{PgOutputOptions, ReplicationClient, SnapshotAction};
    use stagingprop::pgoutput::LogicalMessage;

    const BATCHES: u64 = 40;
    eprintln!(
        "decode bench: recording a real pgoutput stream into {}",
        path.display()
    );
    let cluster = LocalCluster::start(&ClusterOptions::new("bench")).map_err(|e| e.to_string())?;
    cluster
        .psql("postgres", RECORD_SCHEMA)
        .map_err(|e| e.to_string())?;
    let pg = cluster
        .conninfo("postgres", "postgres")
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    let endpoint = Endpoint::new("bench", pg, TlsPolicy::Disable);
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let recording = runtime.block_on(async {
        let mut repl = ReplicationClient::connect(&endpoint)
            .await
            .map_err(|e| e.to_string())?;
        repl.create_logical_slot("bench", true, SnapshotAction::Nothing, false)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = repl
            .start_logical(
                "bench",
                Lsn::INVALID,
                &PgOutputOptions::new(vec!["bench".into()]),
            )
            .await
            .map_err(|e| e.to_string())?;
        let client = endpoint.connect().await.map_err(|e| e.to_string())?;
        for batch in 0..BATCHES {
            client
                .batch_execute(&record_workload_batch(batch))
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut out = BytesMut::new();
        let mut decoder = Decoder::new();
        let mut commits = 0;
        while commits < BATCHES {
            let raw = stream
                .next_raw()
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the stream ended early")?;
            if let Ok(LogicalMessage::Commit { .. }) = decoder.decode(raw.payload.clone()) {
                commits += 1;
            }
            out.put_u32(raw.payload.len() as u32);
            out.put_slice(&raw.payload);
        }
        stream.close().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(out)
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::write(path, &recording).map_err(|e| e.to_string())
}

/// Zero-copy payload slices of one buffer, as a network reader would hand them over.
fn split_frames(mut buf: Bytes) -> Vec<Bytes> {
    let mut payloads = Vec::new();
    while buf.len() >= 4 {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        assert!(buf.len() >= 4 + len, "recording ends inside a frame");
        let _ = buf.split_to(4);
        payloads.push(buf.split_to(len));
    }
    assert!(buf.is_empty(), "recording ends inside a frame header");
    payloads
}

/// Deterministic xorshift64* so every run measures the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const ADJECTIVES: &[&str] = &[
    "Ergonomic",
    "Rustic",
    "Sleek",
    "Handcrafted",
    "Refined",
    "Recycled",
    "Compact",
    "Deluxe",
    "Organic",
    "Lightweight",
    "Heavy-Duty",
    "Vintage",
];
const MATERIALS: &[&str] = &[
    "Steel",
    "Oak",
    "Cotton",
    "Granite",
    "Bamboo",
    "Leather",
    "Aluminium",
    "Wool",
    "Glass",
];
const NOUNS: &[&str] = &[
    "Chair",
    "Desk Lamp",
    "Backpack",
    "Kettle",
    "Bookshelf",
    "Water Bottle",
    "Throw Blanket",
    "Monitor Stand",
    "Cutting Board",
    "Headphones",
    "Planter",
];
const BRANDS: &[&str] = &[
    "Nordhaus",
    "Acme",
    "Bellweather",
    "Kobalt & Finch",
    "Umbra",
    "Tessera",
    "Lumio",
];
const COLOURS: &[&str] = &[
    "black",
    "white",
    "sage",
    "walnut",
    "slate",
    "terracotta",
    "navy",
];
const LOCALES: &[&str] = &["en_GB", "en_US", "de_DE", "fr_FR", "nl_NL", "sv_SE"];
const WORDS: &[&str] = &[
    "designed",
    "for",
    "everyday",
    "use",
    "the",
    "with",
    "a",
    "durable",
    "finish",
    "that",
    "ages",
    "beautifully",
    "and",
    "is",
    "easy",
    "to",
    "clean",
    "our",
    "craftspeople",
    "select",
    "each",
    "piece",
    "by",
    "hand",
    "so",
    "no",
    "two",
    "are",
    "exactly",
    "alike",
    "dimensions",
    "care",
    "instructions",
    "warranty",
    "included",
    "sustainably",
    "sourced",
    "materials",
    "comfortable",
    "ergonomic",
    "support",
    "all",
    "day",
    "long",
];

fn text(s: impl Into<String>) -> Value {
    Value::Text(Bytes::from(s.into()))
}

fn timestamp(rng: &mut Rng) -> Value {
    text(format!(
        "2024-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        1 + rng.below(12),
        1 + rng.below(28),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1_000_000)
    ))
}

fn price(rng: &mut Rng) -> Value {
    text(format!("{}.{:02}", 1 + rng.below(2_000), rng.below(100)))
}

fn prose(rng: &mut Rng, bytes: usize) -> Value {
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        out.push_str(rng.pick(WORDS));
        out.push(if rng.below(12) == 0 { '.' } else { ' ' });
    }
    text(out)
}

fn column(name: &str, is_key: bool, type_oid: u32) -> Column {
    Column {
        name: name.into(),
        is_key,
        type_oid,
        type_modifier: -1,
    }
}

const PRODUCTS: u32 = 16_400;
const DESCRIPTIONS: u32 = 16_410;
const PRICES: u32 = 16_420;

fn relations() -> Vec<Relation> {
    let (int8, text_t, numeric, bool_t, int4, ts, uuid) = (20, 25, 1700, 16, 23, 1184, 2950);
    vec![
        Relation {
            oid: PRODUCTS,
            namespace: "catalogue".into(),
            name: "products".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("id", true, int8),
                column("uuid", false, uuid),
                column("sku", false, text_t),
                column("name", false, text_t),
                column("slug", false, text_t),
                column("brand", false, text_t),
                column("category_id", false, int8),
                column("colour", false, text_t),
                column("price", false, numeric),
                column("currency", false, text_t),
                column("stock", false, int4),
                column("weight_grams", false, int4),
                column("active", false, bool_t),
                column("created_at", false, ts),
                column("updated_at", false, ts),
                column("summary", false, text_t),
            ],
        },
        Relation {
            oid: DESCRIPTIONS,
            namespace: "catalogue".into(),
            name: "product_descriptions".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("product_id", true, int8),
                column("locale", true, text_t),
                column("title", false, text_t),
                column("body", false, text_t),
                column("version", false, int4),
                column("updated_at", false, ts),
            ],
        },
        Relation {
            oid: PRICES,
            namespace: "catalogue".into(),
            name: "prices".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("product_id", true, int8),
                column("price_list", true, text_t),
                column("amount", false, numeric),
                column("currency", false, text_t),
                column("valid_from", false, ts),
                column("valid_to", false, ts),
                column("updated_at", false, ts),
            ],
        },
    ]
}

fn product_row(rng: &mut Rng, id: u64) -> Vec<Value> {
    let name = format!(
        "{} {} {}",
        rng.pick(ADJECTIVES),
        rng.pick(MATERIALS),
        rng.pick(NOUNS)
    );
    let slug = name.to_lowercase().replace(' ', "-");
    let colour = rng.pick(COLOURS);
    vec![
        text(id.to_string()),
        text(format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            rng.next() as u32,
            rng.below(0x1_0000),
            rng.below(0x1000),
            rng.below(0x1000),
            rng.next() & 0xFFFF_FFFF_FFFF
        )),
        text(format!("SKU-{id:06}-{}", &colour[..3].to_uppercase())),
        text(name),
        text(format!("{slug}-{id}")),
        text(rng.pick(BRANDS)),
        text((100 + rng.below(400)).to_string()),
        text(colour),
        price(rng),
        text("EUR"),
        text(rng.below(500).to_string()),
        text((50 + rng.below(20_000)).to_string()),
        text(if rng.below(10) == 0 { "f" } else { "t" }),
        timestamp(rng),
        timestamp(rng),
        if rng.below(4) == 0 {
            Value::Null
        } else {
            {
                let len = 60 + rng.below(140) as usize;
                prose(rng, len)
            }
        },
    ]
}

fn description_row(rng: &mut Rng, id: u64) -> Vec<Value> {
    let title = format!(
        "{} {} {}",
        rng.pick(ADJECTIVES),
        rng.pick(MATERIALS),
        rng.pick(NOUNS)
    );
    let body_len = 2_048 + rng.below(6_144) as usize;
    vec![
        text(id.to_string()),
        text(rng.pick(LOCALES)),
        text(title),
        prose(rng, body_len),
        text((1 + rng.below(20)).to_string()),
        timestamp(rng),
    ]
}

fn price_row(rng: &mut Rng, id: u64) -> Vec<Value> {
    vec![
        text(id.to_string()),
        text(if rng.below(3) == 0 {
            "wholesale"
        } else {
            "retail"
        }),
        price(rng),
        text("EUR"),
        timestamp(rng),
        if rng.below(3) == 0 {
            timestamp(rng)
        } else {
            Value::Null
        },
        timestamp(rng),
    ]
}

/// Transactions as a catalogue import produces them: Begin, the Relation messages the session has
/// not sent yet (all of them in the first transaction, again now and then as if after DDL), tens
/// of inserts and updates of products, prices and descriptions (some 2-8 KB), Commit.
fn synthetic_catalogue_stream() -> Bytes {
    let mut rng = Rng(0x5eed_cafe_f00d_1234);
    let relations = relations();
    let mut out = BytesMut::new();
    let mut frame = |payload: Bytes| {
        out.put_u32(payload.len() as u32);
        out.put_slice(&payload);
    };
    let mut lsn = 0x16_B374_D848u64;
    let mut next_id = 1u64;
    for txn in 0..1_000u32 {
        let xid = 10_000 + txn;
        let commit_time = PgTimestamp(800_000_000_000_000 + i64::from(txn) * 1_000);
        let changes = 20 + rng.below(60);
        frame(encode::begin(Lsn(lsn + changes * 400), commit_time, xid));
        if txn % 500 == 0 {
            for relation in &relations {
                frame(encode::relation(None, relation));
            }
        }
        for _ in 0..changes {
            let roll = rng.below(100);
            let payload = if roll < 52 || next_id < 100 {
                next_id += 1;
                let row = product_row(&mut rng, next_id);
                encode::insert(None, PRODUCTS, &row)
            } else if roll < 72 {
                // Product update: the TOASTed summary is unchanged and not sent.
                let mut row = {
                    let id = 1 + rng.below(next_id);
                    product_row(&mut rng, id)
                };
                row[15] = Value::UnchangedToast;
                encode::update(None, PRODUCTS, None, &row)
            } else if roll < 96 {
                let row = {
                    let id = 1 + rng.below(next_id);
                    price_row(&mut rng, id)
                };
                if roll < 84 {
                    encode::insert(None, PRICES, &row)
                } else {
                    // The key changed: the old key comes along.
                    let mut old = vec![Value::Null; row.len()];
                    old[0] = row[0].clone();
                    old[1] = text("retail");
                    encode::update(None, PRICES, Some(&OldTuple::Key(old)), &row)
                }
            } else {
                let row = {
                    let id = 1 + rng.below(next_id);
                    description_row(&mut rng, id)
                };
                encode::insert(None, DESCRIPTIONS, &row)
            };
            lsn += payload.len() as u64 + 24;
            frame(payload);
        }
        frame(encode::commit(0, Lsn(lsn), Lsn(lsn + 48), commit_time));
        lsn += 64;
    }
    out.freeze()
}

/// Decodes the whole stream with a fresh decoder; what the apply stage would see.
fn decode_stream(stream: &[Bytes]) {
    let mut decoder = Decoder::new();
    for payload in stream {
        match decoder.decode(payload.clone()) {
            Ok(message) => {
                black_box(message);
            }
            Err(err) => panic!("the benchmark stream does not decode: {err}"),
        }
    }
}

fn bench_decode(c: &mut Criterion) {
    let stream = recorded_stream();
    // The same stream without its large values: the per-column cost dominates here, so this is
    // the harder figure to keep up.
    let small: Vec<Bytes> = stream.iter().filter(|p| p.len() < 1024).cloned().collect();
    let bytes = |s: &[Bytes]| s.iter().map(Bytes::len).sum::<usize>();
    for (name, s) in [("whole stream", &stream), ("messages under 1 KiB", &small)] {
        eprintln!(
            "decode bench: {name}: {} messages, {:.1} MB, {:.0} bytes/message on average",
            s.len(),
            bytes(s) as f64 / 1e6,
            bytes(s) as f64 / s.len() as f64
        );
    }

    let mut group = c.benchmark_group("decode_bytes");
    group.throughput(Throughput::Bytes(bytes(&stream) as u64));
    group.bench_function("catalogue_stream", |b| b.iter(|| decode_stream(&stream)));
    group.throughput(Throughput::Bytes(bytes(&small) as u64));
    group.bench_function("messages_under_1kib", |b| b.iter(|| decode_stream(&small)));
    group.finish();

    let mut group = c.benchmark_group("decode_messages");
    group.throughput(Throughput::Elements(stream.len() as u64));
    group.bench_function("catalogue_stream", |b| b.iter(|| decode_stream(&stream)));
    group.throughput(Throughput::Elements(small.len() as u64));
    group.bench_function("messages_under_1kib", |b| b.iter(|| decode_stream(&small)));
    group.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
