//! Hold latency under load, against the real services (not a test: it asserts nothing, it
//! prints). The load tool is this program: an open-loop HTTP/1.1 client over keep-alive
//! connections.
//!
//! 1. Grants and plans of a demo stream (TALLY_BENCH_ACCOUNTS accounts, default 200) are
//!    applied by the ledger pipeline; on Tansu, or with TALLY_BENCH_BROKER=mock on
//!    librdkafka's in-process mock cluster (see `TestEnv::for_bench`).
//! 2. The ledger pipeline (with its scheduler and alert relay: `tally run --role ledger`) and
//!    the API run in this process; demo usage is produced at TALLY_BENCH_RATE events/s
//!    (default 10000) for the whole measurement, for those same accounts.
//! 3. Meanwhile hold requests go to the API at TALLY_BENCH_HOLD_RATE requests/s (default
//!    1000) for TALLY_BENCH_SECONDS (default 20), over TALLY_BENCH_CONNECTIONS keep-alive
//!    connections (default 32): 60% new holds (an inbound call, 120 s, TTL 30 s), 20%
//!    heartbeats and 20% releases of earlier holds, accounts at random.
//!
//! TALLY_BENCH_LEDGER_BATCH and TALLY_BENCH_LEDGER_WORKERS set the ledger's
//! `pipeline.batch_max_events` and `pipeline.ledger_workers`.
//!
//! Latency is measured from each request's scheduled start (so a request queued behind a
//! slow one counts its wait: no coordinated omission) to its full answer. Prints requests/s,
//! statuses, p50/p90/p99/max by kind and overall, the produce rate reached, the ledger's
//! lag at the end, and how long its batches kept the hold locks
//! (`tally_ledger_hold_lock_seconds`: batches, mean, share within 5/10/25/50/100 ms).
//!
//! Run: `scripts/services up && cargo bench --bench holds`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{header, Method, Request};
use hyper_util::rt::TokioIo;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::FutureRecord;
use tokio::sync::{mpsc, Mutex};

use common::api::{with_tokens, Server, ADMIN};
use common::{test_config, RunningTally, TestEnv};
use tally::demo::{self, DemoConfig};
use tally::event::EventKind;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("holds: a benchmark; run it with `cargo bench --bench holds`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// One request to send: what, and when it was due.
struct Job {
    kind: &'static str,
    method: Method,
    path: String,
    body: Option<String>,
    due: Instant,
}

async fn run() {
    let rate = env_or("TALLY_BENCH_RATE", 10_000);
    let hold_rate = env_or("TALLY_BENCH_HOLD_RATE", 1_000);
    let seconds = env_or("TALLY_BENCH_SECONDS", 20);
    let connections = env_or("TALLY_BENCH_CONNECTIONS", 32) as usize;
    let mut cfg = with_tokens(test_config("bench_holds"));
    cfg.prices.path = common::repo_path("prices/default.toml");
    // The ledger's batch size and workers, to see what the hold locks wait for.
    cfg.pipeline.batch_max_events = env_or(
        "TALLY_BENCH_LEDGER_BATCH",
        cfg.pipeline.batch_max_events as u64,
    ) as usize;
    cfg.pipeline.ledger_workers = env_or(
        "TALLY_BENCH_LEDGER_WORKERS",
        cfg.pipeline.ledger_workers as u64,
    ) as usize;
    println!(
        "ledger: batches of at most {} events, {} worker(s)",
        cfg.pipeline.batch_max_events, cfg.pipeline.ledger_workers
    );
    let (env, _broker) = TestEnv::for_bench(cfg).await;
    let topics = env.cfg.kafka.topics.clone();
    let end = Utc::now() - chrono::Duration::minutes(2);
    let accounts = env_or("TALLY_BENCH_ACCOUNTS", 200) as usize;
    // Grants and plans first, applied before the measurement.
    let setup = demo::generate(&DemoConfig {
        seed: 1,
        accounts,
        events: 20_000,
        start: end - chrono::Duration::hours(20),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    });
    let grants: Vec<(String, String, Vec<u8>)> = setup
        .iter()
        .filter(|r| matches!(r.topic, EventKind::Grant | EventKind::Plan))
        .map(|r| {
            (
                r.topic.topic(&topics).to_owned(),
                r.key.clone(),
                r.payload.clone(),
            )
        })
        .collect();
    let account_ids: Vec<String> = {
        let mut ids: Vec<String> = grants.iter().map(|(_, k, _)| k.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    };
    env.send(&grants).await;
    let tally = RunningTally::start_role(&env, tally::app::Role::Ledger);
    env.wait_ledger_caught_up(Duration::from_secs(600)).await;
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    println!(
        "set-up: {} grants and plans for {} accounts applied",
        grants.len(),
        account_ids.len()
    );

    // Usage at `rate` events/s, from now until the holds are done (+1 s).
    let live = demo::generate(&DemoConfig {
        seed: 2,
        accounts,
        events: (rate * (seconds + 4)) as usize,
        start: end - chrono::Duration::hours(1),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    });
    let live: Vec<(String, String, Vec<u8>)> = live
        .into_iter()
        .filter(|r| !matches!(r.topic, EventKind::Grant | EventKind::Plan))
        .map(|r| (r.topic.topic(&topics).to_owned(), r.key, r.payload))
        .collect();
    let producer = env.producer.clone();
    let produce_for = Duration::from_secs(seconds + 3);
    let produced = tokio::spawn(async move {
        let t = Instant::now();
        let mut pending = Vec::new();
        let mut sent = 0u64;
        for (i, (topic, key, payload)) in live.iter().enumerate() {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if due > produce_for {
                break;
            }
            let elapsed = t.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
            let record = FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(&payload[..]);
            pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            sent += 1;
            if pending.len() >= 2_000 {
                for d in pending.drain(..) {
                    d.await.unwrap().unwrap();
                }
            }
        }
        for d in pending.drain(..) {
            d.await.unwrap().unwrap();
        }
        (sent, t.elapsed().as_secs_f64())
    });
    // The ledger takes the stream up before the holds start.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The hold load, on a thread and runtime of its own (the load tool is not slowed by the
    // producer and the pipeline sharing this process's runtime; the machine's cores it
    // shares).
    let addr = server.addr;
    let ids = account_ids.clone();
    let (results, elapsed) = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(load(addr, ids, hold_rate, seconds, connections))
    })
    .await
    .unwrap();
    let (sent, produce_secs) = produced.await.unwrap();
    let lag_started = Instant::now();
    env.wait_ledger_caught_up(Duration::from_secs(600)).await;
    let lag_secs = lag_started.elapsed().as_secs_f64();
    server.stop().await;
    tally.stop().await;
    // Leave no ledger behind (the topics stay: a sqlite Tansu deletes every topic at once).
    env.store()
        .await
        .client()
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", env.cfg.postgres.schema))
        .await
        .unwrap();

    println!(
        "usage produced: {sent} events in {produce_secs:.1} s = {:.0} events/s (ledger caught up {lag_secs:.1} s after the last)",
        sent as f64 / produce_secs
    );
    let mut statuses: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    for (kind, status, _, _) in &results {
        *statuses.entry((kind, *status)).or_default() += 1;
    }
    println!(
        "hold requests: {} in {elapsed:.1} s = {:.0} requests/s over {connections} connections; statuses {statuses:?}",
        results.len(),
        results.len() as f64 / elapsed
    );
    let report = |label: &str, mut ms: Vec<f64>| {
        if ms.is_empty() {
            return;
        }
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |q: f64| ms[((ms.len() as f64 - 1.0) * q) as usize];
        println!(
            "  {label:<10} n={:<6} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms.len(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            pct(1.0)
        );
    };
    // How long the ledger's batches held the hold locks (what a hold request may wait for),
    // from the process's own metric: batches, mean, and the share within each bucket bound.
    let metrics = tally::metrics::render();
    let value = |name: &str| -> Vec<(String, f64)> {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect()
    };
    let count = value("tally_ledger_hold_lock_seconds_count")
        .first()
        .map_or(0.0, |v| v.1);
    let sum = value("tally_ledger_hold_lock_seconds_sum")
        .first()
        .map_or(0.0, |v| v.1);
    if count > 0.0 {
        let within: Vec<String> = value("tally_ledger_hold_lock_seconds_bucket")
            .iter()
            .filter(|(k, _)| {
                ["0.005", "0.01", "0.025", "0.05", "0.1"]
                    .iter()
                    .any(|b| k.contains(&format!("le=\"{b}\"")))
            })
            .map(|(k, v)| {
                let le = k
                    .split("le=\"")
                    .nth(1)
                    .unwrap_or("")
                    .trim_end_matches("\"}");
                format!(
                    "<= {} ms: {:.1} %",
                    le.parse::<f64>().unwrap_or(0.0) * 1000.0,
                    v / count * 100.0
                )
            })
            .collect();
        println!(
            "ledger batches holding the hold locks: {count} batches, mean {:.1} ms; {}",
            sum / count * 1000.0,
            within.join(", ")
        );
    }
    report("all", results.iter().map(|r| r.2).collect());
    // From the request's actual send (the wait for a free connection left out).
    report("sent->ans", results.iter().map(|r| r.3).collect());
    for kind in ["create", "heartbeat", "release"] {
        report(
            kind,
            results
                .iter()
                .filter(|r| r.0 == kind)
                .map(|r| r.2)
                .collect(),
        );
    }
}

/// Results of one request: kind, status, ms from its scheduled start, ms from its send.
type Sample = (&'static str, u16, f64, f64);

/// The hold load: a dispatcher schedules jobs at `hold_rate`; each connection task sends the
/// next due job, one at a time. Returns the samples and the seconds it took.
async fn load(
    addr: std::net::SocketAddr,
    account_ids: Vec<String>,
    hold_rate: u64,
    seconds: u64,
    connections: usize,
) -> (Vec<Sample>, f64) {
    let (tx, rx) = mpsc::channel::<Job>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(&'static str, u16, f64, f64)>();
    let mut workers = Vec::new();
    for _ in 0..connections {
        let rx = rx.clone();
        let done = done_tx.clone();
        workers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { break };
                let mut req = Request::builder()
                    .method(job.method)
                    .uri(&job.path)
                    .header(header::HOST, addr.to_string())
                    .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"));
                let body = match job.body {
                    Some(b) => {
                        req = req.header(header::CONTENT_TYPE, "application/json");
                        Bytes::from(b)
                    }
                    None => Bytes::new(),
                };
                sender.ready().await.unwrap();
                let sent = Instant::now();
                let response = sender
                    .send_request(req.body(Full::new(body)).unwrap())
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                response.into_body().collect().await.unwrap();
                let ms = job.due.elapsed().as_secs_f64() * 1000.0;
                let service_ms = sent.elapsed().as_secs_f64() * 1000.0;
                let _ = done.send((job.kind, status, ms, service_ms));
            }
        }));
    }
    drop(done_tx);
    let total = hold_rate * seconds;
    let t0 = Instant::now();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut placed: Vec<(String, String)> = Vec::new();
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / hold_rate as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let roll = rng.gen_range(0..10);
        let job = if roll < 6 || placed.is_empty() {
            let acct = &account_ids[rng.gen_range(0..account_ids.len())];
            let hold_id = format!("bench-{i}");
            placed.push((acct.clone(), hold_id.clone()));
            Job {
                kind: "create",
                method: Method::POST,
                path: format!("/v1/accounts/{acct}/holds"),
                body: Some(format!(
                    r#"{{"hold_id":"{hold_id}","kind":"call","attributes":{{"direction":"inbound"}},"seconds":120,"ttl_seconds":30}}"#
                )),
                due,
            }
        } else {
            let (acct, hold_id) = &placed[rng.gen_range(0..placed.len())];
            if roll < 8 {
                Job {
                    kind: "heartbeat",
                    method: Method::POST,
                    path: format!("/v1/accounts/{acct}/holds/{hold_id}/heartbeat"),
                    body: None,
                    due,
                }
            } else {
                Job {
                    kind: "release",
                    method: Method::DELETE,
                    path: format!("/v1/accounts/{acct}/holds/{hold_id}"),
                    body: None,
                    due,
                }
            }
        };
        tx.send(job).await.unwrap();
    }
    drop(tx);
    let mut results: Vec<(&'static str, u16, f64, f64)> = Vec::new();
    while let Some(r) = done_rx.recv().await {
        results.push(r);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for w in workers {
        w.await.unwrap();
    }
    (results, elapsed)
}
