//! A broken or hostile staging server: a relay on loopback between `stagingprop sync` and a real
//! staging passes everything through, except that on the first replication stream it damages
//! one message (truncated, unknown, absurdly long, out of order, about a relation never
//! announced) or stalls. Each must end as a clear error (exit 5) with no panic, nothing applied
//! past the last good commit and nothing confirmed past it; a stall makes sync give up the
//! silent connection and reconnect. A second run, straight to staging, then ends exactly equal.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stagingprop::model::Lsn;
use stagingprop::pgoutput::encode;
use support::{PairBuilder, Scratch, clusters, stagingprop};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The third transaction's Insert cut in half.
    Truncated,
    /// The third transaction's Insert with a message type pgoutput does not have.
    UnknownMessage,
    /// A CopyData announcing nearly 2 GiB, in place of the third transaction's Insert.
    Oversized,
    /// The third transaction's Begin left out.
    CommitWithoutBegin,
    /// A Stream Stop before the third transaction, with no Stream Start.
    StopWithoutStart,
    /// The first Relation message left out, so the Insert names a relation never announced.
    UnannouncedRelation,
    /// Nothing more from the server once the third transaction begins.
    Stall,
}

/// Which transaction the faults (but the Relation one) hit.
const BROKEN_TXN: usize = 3;
const TXNS: usize = 6;

/// Bytes of an XLogData message before its pgoutput payload: 'w', start, end, send time.
const XLOG_HEADER: usize = 1 + 8 + 8 + 8;

enum Action {
    Forward,
    Replace(Vec<u8>),
    Drop,
    InjectBefore(Vec<u8>),
    Raw(Vec<u8>),
    Stall,
}

/// Decides, message by message, what the relay does to the replication stream.
struct Tamper {
    fault: Fault,
    begins: usize,
}

impl Tamper {
    fn step(&mut self, payload: &[u8]) -> Action {
        let tag = payload.first().copied().unwrap_or(0);
        if tag == b'B' {
            self.begins += 1;
        }
        let at_begin = tag == b'B' && self.begins == BROKEN_TXN;
        let at_insert = tag == b'I' && self.begins == BROKEN_TXN;
        match self.fault {
            Fault::Truncated if at_insert => Action::Replace(payload[..payload.len() / 2].to_vec()),
            Fault::UnknownMessage if at_insert => {
                let mut damaged = payload.to_vec();
                damaged[0] = b'q';
                Action::Replace(damaged)
            }
            Fault::Oversized if at_insert => {
                let mut raw = vec![b'd'];
                raw.extend_from_slice(&0x7fff_fff0_u32.to_be_bytes());
                raw.push(b'w');
                Action::Raw(raw)
            }
            Fault::CommitWithoutBegin if at_begin => Action::Drop,
            Fault::StopWithoutStart if at_begin => {
                Action::InjectBefore(encode::stream_stop().to_vec())
            }
            Fault::UnannouncedRelation if tag == b'R' => Action::Drop,
            Fault::Stall if at_begin => Action::Stall,
            _ => Action::Forward,
        }
    }
}

/// The relay: listens on a loopback port and forwards each connection to staging.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(upstream: u16, fault: Fault) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("relay port");
        let port = listener.local_addr().unwrap().port();
        // The fault happens once: later connections (sync's reconnect) pass through untouched.
        let armed = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, fault, armed.clone()));
            }
        });
        Relay { port, task }
    }
}

async fn write_message(to: &mut (impl AsyncWriteExt + Unpin), tag: u8, body: &[u8]) {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    let _ = to.write_all(&out).await;
}

async fn relay(mut client: TcpStream, upstream: u16, fault: Fault, armed: Arc<AtomicBool>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    // The startup message (sslmode=disable: no SSLRequest first): length, version, key/values.
    let Ok(len) = client.read_u32().await else {
        return;
    };
    let mut startup = vec![0; len as usize - 4];
    if client.read_exact(&mut startup).await.is_err() {
        return;
    }
    let replication = startup
        .split(|&b| b == 0)
        .collect::<Vec<_>>()
        .windows(2)
        .any(|kv| kv[0] == b"replication" && kv[1] == b"database");
    let _ = server.write_u32(len).await;
    let _ = server.write_all(&startup).await;

    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    if !replication || !armed.load(Ordering::SeqCst) {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = upward.await;
        return;
    }

    let mut tamper = Tamper { fault, begins: 0 };
    let mut streaming = false;
    while let Ok(tag) = server_read.read_u8().await {
        let Ok(len) = server_read.read_u32().await else {
            break;
        };
        let mut body = vec![0; len as usize - 4];
        if server_read.read_exact(&mut body).await.is_err() {
            break;
        }
        streaming |= tag == b'W';
        let is_wal = streaming && tag == b'd' && body.first() == Some(&b'w');
        if !is_wal || !armed.load(Ordering::SeqCst) {
            write_message(&mut client_write, tag, &body).await;
            continue;
        }
        let (header, payload) = body.split_at(XLOG_HEADER);
        match tamper.step(payload) {
            Action::Forward => write_message(&mut client_write, tag, &body).await,
            Action::Replace(damaged) => {
                armed.store(false, Ordering::SeqCst);
                write_message(&mut client_write, tag, &[header, &damaged].concat()).await;
            }
            Action::Drop => armed.store(false, Ordering::SeqCst),
            Action::InjectBefore(extra) => {
                armed.store(false, Ordering::SeqCst);
                write_message(&mut client_write, tag, &[header, &extra].concat()).await;
                write_message(&mut client_write, tag, &body).await;
            }
            Action::Raw(bytes) => {
                armed.store(false, Ordering::SeqCst);
                let _ = client_write.write_all(&bytes).await;
                // Then silence: the length alone must end it.
                tokio::time::sleep(Duration::from_secs(120)).await;
                break;
            }
            Action::Stall => {
                armed.store(false, Ordering::SeqCst);
                // Hold both sockets open and say nothing.
                tokio::time::sleep(Duration::from_secs(120)).await;
                break;
            }
        }
    }
    upward.abort();
}

fn slot_confirmed(pair_staging: &str, slot: &str) -> Lsn {
    support::psql(
        &clusters().staging,
        pair_staging,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
    .trim()
    .parse()
    .expect("the slot's confirmed position")
}

/// Runs sync through a relay doing `fault`, then straight to staging; returns sync's stderr of
/// the first run after checking everything else.
async fn broken_stream(name: &str, fault: Fault) -> String {
    let pair = PairBuilder::new(
        &format!("hostile_{name}"),
        "CREATE TABLE t (id int PRIMARY KEY, note text);",
    )
    .table("public.t", "")
    .sync("receive_timeout_secs = 2")
    .init()
    .await;
    let mut last_good = Lsn::INVALID;
    for id in 1..=TXNS {
        pair.on_staging(&format!("INSERT INTO t VALUES ({id}, 'row {id}')"));
        if id == BROKEN_TXN - 1 {
            last_good = pair
                .on_staging("SELECT pg_current_wal_insert_lsn()")
                .trim()
                .parse()
                .unwrap();
        }
    }

    let staging_port = clusters().staging.port;
    let relay = Relay::start(staging_port, fault).await;
    let scratch = Scratch::new(&format!("hostile-{name}"));
    let relayed = pair.text.replacen(
        &format!("port={staging_port} "),
        &format!("port={} ", relay.port),
        1,
    );
    assert_ne!(relayed, pair.text, "the config points at the relay");
    let config = scratch.0.join("relayed.toml");
    std::fs::write(&config, relayed).unwrap();
    let run =
        tokio::task::spawn_blocking(move || stagingprop(&config, &["sync", "--until-caught-up"]));
    let (code, _, stderr) = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .unwrap_or_else(|_| panic!("{name}: sync did not end within 90 s"))
        .unwrap();
    drop(relay);

    assert!(
        !stderr.contains("panicked"),
        "{name}: sync panicked:\n{stderr}"
    );
    let slot = name_of_slot(&pair);
    if fault == Fault::Stall {
        assert_eq!(code, 0, "{name}: sync reconnects after a stall:\n{stderr}");
        assert!(
            stderr.contains("sent nothing for 2 s"),
            "{name}: the stall is named:\n{stderr}"
        );
    } else {
        assert_eq!(code, 5, "{name}: a broken stream is exit 5:\n{stderr}");
        let applied: Vec<i32> = pair
            .on_production("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let limit = if fault == Fault::UnannouncedRelation {
            0
        } else {
            BROKEN_TXN as i32 - 1
        };
        assert!(
            applied.iter().all(|&id| id <= limit),
            "{name}: rows past the last good commit were applied: {applied:?}"
        );
        let confirmed = slot_confirmed(&pair.staging, &slot);
        assert!(
            confirmed <= last_good,
            "{name}: the slot was confirmed at {confirmed}, past the last good commit ({last_good})"
        );
    }

    // Straight to staging, the rest arrives exactly once.
    let direct = pair.write_config(&scratch.0);
    let (code, _, stderr_again) = stagingprop(&direct, &["sync", "--until-caught-up"]);
    assert_eq!(code, 0, "{name}: the second run completes:\n{stderr_again}");
    assert_eq!(
        pair.on_production("SELECT count(*), sum(id) FROM t").trim(),
        format!("{TXNS}|{}", TXNS * (TXNS + 1) / 2),
        "{name}: production ends with every row once"
    );
    stderr
}

fn name_of_slot(pair: &support::Pair) -> String {
    pair.config.sync.slot.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_message_is_a_clear_error() {
    let stderr = broken_stream("truncated", Fault::Truncated).await;
    assert!(stderr.contains("malformed pgoutput message"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_type_is_a_clear_error() {
    let stderr = broken_stream("unknown", Fault::UnknownMessage).await;
    assert!(stderr.contains("malformed pgoutput message"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_message_length_is_refused_at_once() {
    let stderr = broken_stream("oversized", Fault::Oversized).await;
    assert!(stderr.contains("more than the"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_begin_is_a_clear_error() {
    let stderr = broken_stream("nobegin", Fault::CommitWithoutBegin).await;
    assert!(stderr.contains("Begin"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stop_without_start_is_a_clear_error() {
    let stderr = broken_stream("nostart", Fault::StopWithoutStart).await;
    assert!(stderr.contains("Stream Stop"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relation_never_announced_is_a_clear_error() {
    let stderr = broken_stream("norelation", Fault::UnannouncedRelation).await;
    assert!(stderr.contains("relation"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_is_given_up_and_sync_reconnects() {
    broken_stream("stall", Fault::Stall).await;
}
