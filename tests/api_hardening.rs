//! The API server's limits, against the server started as `tally run` starts it
//! (`tally::api::serve`): a client that sends its header too slowly is cut off, a request
//! not answered in time gets 503, connections beyond `api.max_connections` wait until one
//! closes, a flood of `/readyz` and `/metrics` runs one dependency probe, and metric labels
//! stay bounded whatever methods and paths clients send.
//!
//! Needs no service: the probes may find PostgreSQL, ClickHouse and Kafka up or down, and
//! the tests count probe rounds, not their outcome. Raw TCP clients, so every byte sent and
//! its timing are the test's own.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use tally::config::Config;
use tally::rating::PriceTable;

/// Bounds every wait of these tests, so a broken server fails a test rather than hangs it.
const PATIENCE: Duration = Duration::from_secs(30);

struct Running {
    addr: std::net::SocketAddr,
    api: tally::api::AppState,
    _stop: watch::Sender<bool>,
}

async fn start(configure: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = common::api::with_tokens(Config::default());
    configure(&mut cfg);
    cfg.validate().expect("valid test config");
    let prices = Arc::new(PriceTable::load(&cfg.prices.path).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = tally::api::Api::new(Arc::new(cfg), prices).unwrap();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(tally::api::serve(listener, api.clone(), rx));
    Running {
        addr,
        api,
        _stop: stop,
    }
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// Reads one response: `Some((status, body))`, or `None` if the server closed the
/// connection first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[header_end..header_end + length]).to_string();
    Some((status, body))
}

/// One request on a fresh connection.
async fn request(addr: std::net::SocketAddr, raw: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    tokio::time::timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("an answer")
        .expect("an answer before the connection closed")
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_client_sending_its_header_slowly_is_cut_off() {
    let server = start(|c| c.api.header_read_timeout_ms = 300).await;
    // A complete header in time is served.
    assert_eq!(request(server.addr, &get("/healthz")).await.0, 200);

    // One byte of header every 50 ms: 6 of them fit in the timeout, never the whole header.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .unwrap();
    let (mut sent, mut answer) = (0, Vec::new());
    let closed = loop {
        if sent == 400 {
            break false; // 20 s of drip without being cut off
        }
        if stream.write_all(b"a").await.is_err() {
            break true;
        }
        sent += 1;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    };
    assert!(closed, "still connected after {sent} bytes of header");
    assert!(sent < 400);
    // Whatever the server said before closing, it served no request.
    let answer = String::from_utf8_lossy(&answer);
    assert!(!answer.contains("200 OK"), "{answer}");
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_request_not_answered_in_time_gets_503() {
    let server = start(|c| c.api.request_timeout_ms = 300).await;
    // The body is announced as 100 bytes; 10 come, then nothing: reading it never ends.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/accounts/acme/grants HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"grant_id",
        common::api::ADMIN
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let (status, _) = tokio::time::timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("an answer")
        .expect("an answer before the connection closed");
    assert_eq!(status, 503);
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let server = start(|c| {
        c.api.max_connections = 2;
        c.api.header_read_timeout_ms = 120_000;
    })
    .await;
    // Two keep-alive connections, each served once and kept open.
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(get("/healthz").as_bytes()).await.unwrap();
        let reply = tokio::time::timeout(PATIENCE, read_response(stream)).await;
        assert_eq!(reply.unwrap().unwrap().0, 200);
    }
    // The third connects (the kernel's backlog takes it) but is not served...
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(get("/healthz").as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the connection over the cap was served: {early:?}"
    );
    // ...the two served still are...
    first.write_all(get("/healthz").as_bytes()).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut first)).await;
    assert_eq!(reply.unwrap().unwrap().0, 200);
    // ...and once one closes, the waiting one is answered.
    drop(second);
    let reply = tokio::time::timeout(PATIENCE, read_response(&mut third)).await;
    assert_eq!(reply.unwrap().unwrap().0, 200);
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_flood_of_readyz_and_metrics_runs_one_probe() {
    // A minute of cache: the whole flood falls inside it.
    let server = start(|c| c.api.probe_cache_ms = 60_000).await;
    assert_eq!(server.api.probe_rounds(), 0);
    let flood = |path: &'static str| {
        let addr = server.addr;
        futures::future::join_all(
            (0..100).map(move |_| async move { request(addr, &get(path)).await }),
        )
    };
    let answers = flood("/readyz").await;
    assert_eq!(server.api.probe_rounds(), 1);
    // One probe, one answer: every body is the same, latencies included.
    let (status, body) = &answers[0];
    assert!(*status == 200 || *status == 503, "{status}");
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert!(body.contains("\"dependencies\""), "{body}");

    let answers = flood("/metrics").await;
    assert!(answers.iter().all(|(status, _)| *status == 200));
    assert_eq!(
        server.api.probe_rounds(),
        2,
        "one lag refresh for 100 scrapes"
    );
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn without_a_cache_each_readyz_probes() {
    let server = start(|c| c.api.probe_cache_ms = 0).await;
    for expected in 1..=3 {
        request(server.addr, &get("/readyz")).await;
        assert_eq!(server.api.probe_rounds(), expected);
    }
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn metric_labels_stay_bounded() {
    let server = start(|_| {}).await;
    for raw in [
        "FOOBAR /healthz HTTP/1.1\r\nHost: test\r\n\r\n",
        "BREW /healthz HTTP/1.1\r\nHost: test\r\n\r\n",
        "GET /no/such/path-x1 HTTP/1.1\r\nHost: test\r\n\r\n",
        "GET /no/such/path-x2 HTTP/1.1\r\nHost: test\r\n\r\n",
        "PROPFIND /unmatched-y3 HTTP/1.1\r\nHost: test\r\n\r\n",
    ] {
        let (status, _) = request(server.addr, raw).await;
        assert!(status == 404 || status == 405, "{raw:?}: {status}");
    }
    let (status, text) = request(server.addr, &get("/metrics")).await;
    assert_eq!(status, 200);
    for absent in [
        "FOOBAR",
        "BREW",
        "PROPFIND",
        "path-x1",
        "path-x2",
        "unmatched-y3",
    ] {
        assert!(!text.contains(absent), "label {absent} in\n{text}");
    }
    assert!(
        text.contains(
            r#"tally_http_requests_total{method="other",route="/healthz",status="405"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"tally_http_requests_total{method="GET",route="unmatched",status="404"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"tally_http_requests_total{method="other",route="unmatched",status="404"} 1"#
        ),
        "{text}"
    );
}
