//! The Prometheus endpoint: a `metrics` recorder rendered in the text exposition format by a
//! minimal HTTP responder (GET /metrics), bound to loopback unless configured otherwise.
//!
//! The metrics recorded elsewhere are listed, with their labels, in docs/monitoring.md (a test
//! keeps that list complete).

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Where the endpoint listens when enabled without an address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9187";

/// Installs the global recorder and serves it on `listen`. Returns the bound address.
pub async fn serve(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("stagingprop_batch_rows".into()),
            &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
        )
        .map_err(std::io::Error::other)?
        .set_buckets_for_metric(
            Matcher::Full("stagingprop_batch_seconds".into()),
            &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0],
        )
        .map_err(std::io::Error::other)?
        .install_recorder()
        .map_err(std::io::Error::other)?;
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(accept_loop(listener, handle));
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            // Read the request head (bounded), then answer and close.
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let response = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
                handle.run_upkeep();
                let body = handle.render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
