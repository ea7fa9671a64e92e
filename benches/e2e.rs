//! End-to-end benchmark against the real services (not a test: it asserts nothing, it prints).
//!
//! 1. Preloads N demo events (TALLY_BENCH_EVENTS, default 100000) into fresh topics.
//! 2. Measures the broker's raw consume rate over those topics (plain rdkafka consumer).
//! 3. Runs the ledger role alone over the backlog (as `tally run --role ledger` does, through
//!    `tally::app`): events/s to committed balances.
//! 4. Runs the analytics role alone over the backlog: events/s to ClickHouse.
//! 5. Produces at a fixed rate (TALLY_BENCH_RATE, default 10000 events/s, for
//!    TALLY_BENCH_SECONDS, default 15) with the ledger running, and reports p50/p90/p99/max
//!    latency from produce (send) to committed balance (offset stored in PostgreSQL).
//!
//! Run: `scripts/services up && cargo bench --bench e2e`

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use tokio::sync::watch;

use common::{test_config, RunningTally, TestEnv};
use tally::app::Role;
use tally::demo::{self, DemoConfig};
use tally::event::EventKind;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: a benchmark; run it with `cargo bench --bench e2e`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let events = env_or("TALLY_BENCH_EVENTS", 100_000) as usize;
    let rate = env_or("TALLY_BENCH_RATE", 10_000);
    let seconds = env_or("TALLY_BENCH_SECONDS", 15);
    let mut cfg = test_config("bench");
    cfg.prices.path = common::repo_path("prices/default.toml");
    let env = TestEnv::with_config(cfg).await;
    let end = Utc::now() - chrono::Duration::minutes(5);
    let records = demo::generate(&DemoConfig {
        seed: 1,
        accounts: 200,
        events,
        start: end - chrono::Duration::days(3),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    });
    let (grants, usage): (Vec<_>, Vec<_>) = records
        .iter()
        .partition(|r| matches!(r.topic, EventKind::Grant | EventKind::Plan));
    let topics = &env.cfg.kafka.topics;
    let to_send = |rs: &[&demo::DemoRecord]| -> Vec<(String, String, Vec<u8>)> {
        rs.iter()
            .map(|r| {
                (
                    r.topic.topic(topics).to_owned(),
                    r.key.clone(),
                    r.payload.clone(),
                )
            })
            .collect()
    };
    let t = Instant::now();
    env.send(&to_send(&grants)).await;
    env.send(&to_send(&usage)).await;
    let total = records.len();
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    println!(
        "preloaded {total} records ({} B avg) in {:.1} s: {:.0} records/s produced",
        bytes / total.max(1),
        t.elapsed().as_secs_f64(),
        total as f64 / t.elapsed().as_secs_f64()
    );

    // Raw consume rate of the broker over the same topics.
    let mut cc = tally::kafka::client_config(&env.cfg.kafka);
    cc.set("group.id", common::unique("bench-raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    let raw: StreamConsumer = cc.create().unwrap();
    raw.subscribe(&env.cfg.kafka.topics.inputs()).unwrap();
    let t = Instant::now();
    let mut n = 0;
    let mut first: Option<Instant> = None;
    while n < total {
        let _m = raw.recv().await.unwrap();
        first.get_or_insert_with(Instant::now);
        n += 1;
    }
    let raw_rate = n as f64 / first.unwrap().elapsed().as_secs_f64();
    println!(
        "raw consume: {n} records in {:.2} s ({:.2} s to first record): {raw_rate:.0} records/s",
        t.elapsed().as_secs_f64(),
        first.unwrap().duration_since(t).as_secs_f64()
    );
    drop(raw);

    // The ledger role alone over the backlog (`tally run --role ledger`: the ledger
    // pipeline, the scheduler and the alert relay).
    let t = Instant::now();
    let ledger = RunningTally::start_role(&env, Role::Ledger);
    env.wait_ledger_caught_up(Duration::from_secs(1800)).await;
    let ledger_rate = total as f64 / t.elapsed().as_secs_f64();
    println!(
        "ledger pipeline: {total} records in {:.2} s: {ledger_rate:.0} events/s ({:.0}% of raw consume)",
        t.elapsed().as_secs_f64(),
        100.0 * ledger_rate / raw_rate
    );

    // The analytics role alone over the backlog.
    let t = Instant::now();
    let analytics = RunningTally::start_role(&env, Role::Analytics);
    env.wait_analytics_caught_up(Duration::from_secs(1800))
        .await;
    let analytics_rate = total as f64 / t.elapsed().as_secs_f64();
    println!(
        "analytics pipeline: {total} records in {:.2} s: {analytics_rate:.0} events/s ({:.0}% of raw consume)",
        t.elapsed().as_secs_f64(),
        100.0 * analytics_rate / raw_rate
    );
    analytics.stop().await;

    // Latency at a fixed produce rate, ledger running.
    let live = demo::generate(&DemoConfig {
        seed: 2,
        accounts: 200,
        events: (rate * seconds) as usize,
        start: end - chrono::Duration::days(1),
        end,
        duplicate_every: 0,
        malformed_every: 0,
    });
    let live: Vec<_> = live
        .into_iter()
        .filter(|r| !matches!(r.topic, EventKind::Grant | EventKind::Plan))
        .collect();
    let (done_tx, done_rx) = watch::channel(false);
    let poller = tokio::spawn(poll_offsets(
        env.store().await,
        env.cfg.kafka.ledger_group.clone(),
        done_rx,
    ));
    let mut sends: Vec<(String, i32, i64, Instant)> = Vec::with_capacity(live.len());
    let mut pending = Vec::new();
    let t = Instant::now();
    for (i, r) in live.iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate as f64);
        let elapsed = t.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
        let topic = r.topic.topic(topics);
        let record = FutureRecord::to(topic)
            .key(r.key.as_bytes())
            .payload(&r.payload[..]);
        let sent_at = Instant::now();
        let delivery = env
            .producer
            .send_result(record)
            .map_err(|(e, _)| e)
            .unwrap();
        pending.push((topic.to_owned(), sent_at, delivery));
        if pending.len() >= 2_000 {
            for (topic, sent_at, d) in pending.drain(..) {
                let delivered = d.await.unwrap().unwrap();
                sends.push((topic, delivered.partition, delivered.offset, sent_at));
            }
        }
    }
    for (topic, sent_at, d) in pending.drain(..) {
        let delivered = d.await.unwrap().unwrap();
        sends.push((topic, delivered.partition, delivered.offset, sent_at));
    }
    let produce_secs = t.elapsed().as_secs_f64();
    env.wait_ledger_caught_up(Duration::from_secs(600)).await;
    done_tx.send(true).unwrap();
    let snapshots = poller.await.unwrap();
    ledger.stop().await;

    // Per partition: (next_offset, first time seen), both increasing.
    let mut timeline: HashMap<(String, i32), Vec<(i64, Instant)>> = HashMap::new();
    for (at, offsets) in &snapshots {
        for (k, &next) in offsets {
            let line = timeline.entry(k.clone()).or_default();
            if line.last().is_none_or(|(n, _)| *n < next) {
                line.push((next, *at));
            }
        }
    }
    let mut latencies_ms: Vec<f64> = sends
        .iter()
        .filter_map(|(topic, p, offset, sent_at)| {
            let line = timeline.get(&(topic.clone(), *p))?;
            let i = line.partition_point(|(next, _)| *next <= *offset);
            line.get(i)
                .map(|(_, at)| at.saturating_duration_since(*sent_at).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| latencies_ms[((latencies_ms.len() as f64 - 1.0) * q) as usize];
    println!(
        "latency produce -> committed balance at {:.0} events/s ({} events over {produce_secs:.1} s): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        live.len() as f64 / produce_secs,
        latencies_ms.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

type Snapshot = (Instant, HashMap<(String, i32), i64>);

/// Samples the stored ledger offsets every 5 ms until told to stop.
async fn poll_offsets(
    store: tally::ledger::Store,
    group: String,
    mut done: watch::Receiver<bool>,
) -> Vec<Snapshot> {
    let mut out = Vec::new();
    while !*done.borrow() {
        let rows = store
            .client()
            .query(
                "SELECT topic, partition, next_offset FROM consumer_offsets WHERE group_id = $1",
                &[&group],
            )
            .await
            .unwrap();
        let at = Instant::now();
        out.push((
            at,
            rows.iter()
                .map(|r| {
                    (
                        (r.get::<_, String>(0), r.get::<_, i32>(1)),
                        r.get::<_, i64>(2),
                    )
                })
                .collect(),
        ));
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = done.changed() => {}
        }
    }
    out
}
