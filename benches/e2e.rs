//! End-to-end benchmark against the real services (not a test: it asserts nothing, it prints).
//!
//! 1. Preloads N demo events (TALLY_BENCH_EVENTS, default 100000) for TALLY_BENCH_ACCOUNTS
//!    accounts (default 200) into fresh topics.
//! 2. Measures the broker's raw consume rate over those topics (plain rdkafka consumer).
//! 3. Runs the ledger role alone over the backlog (as `tally run --role ledger` does, through
//!    `tally::app`): events/s to committed balances.
//! 4. Runs the analytics role alone over the backlog: events/s to ClickHouse.
//! 5. Produces at a fixed rate (TALLY_BENCH_RATE, default 10000 events/s, for
//!    TALLY_BENCH_SECONDS, default 15) with a fresh ledger role running, and reports
//!    p50/p90/p99/max latency from produce (send) to committed balance (offset stored in
//!    PostgreSQL) — the balance's freshness — over every 10th event, overall and by 10-second
//!    window of sending (the worst window against the median one).
//! 6. A purge inside that window: TALLY_BENCH_PURGE_CLAIMS (default 1,000,000) dedupe claims
//!    dated 40 days ago (past the 35-day window) are stored once the ledger has started, and
//!    its purge interval (`pipeline.dedupe_purge_interval_ms`) is half the run, so the ledger
//!    role's purge task deletes them beside the batches half-way through, as it does hourly
//!    in production. The bench prints when the purge started and ended, and the windows it
//!    overlapped.
//! 7. The process's peak RSS (VmHWM), reset after the preload and the raw consume (the
//!    bench's own), so it covers the pipelines' runs; the producer and the samples are
//!    still in it, so it is an upper bound of Tally's.
//!
//! TALLY_BENCH_LEDGER_WORKERS (default 1) sets the ledger's `pipeline.ledger_workers`.
//!
//! TALLY_BENCH_BROKER=mock runs everything on librdkafka's in-process mock cluster instead of
//! Tansu (see `TestEnv::for_bench`).
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
    let purge_claims = env_or("TALLY_BENCH_PURGE_CLAIMS", 1_000_000) as i64;
    let accounts = env_or("TALLY_BENCH_ACCOUNTS", 200) as usize;
    let mut cfg = test_config("bench");
    cfg.prices.path = common::repo_path("prices/default.toml");
    cfg.pipeline.dedupe_purge_interval_ms = (seconds * 1000 / 2).max(1000);
    cfg.pipeline.ledger_workers = env_or("TALLY_BENCH_LEDGER_WORKERS", 1) as usize;
    let (env, _broker) = TestEnv::for_bench(cfg).await;
    // The preload covers the three days before the run's own events, which come after it in
    // event time (the 20 hours before `end`), as a live stream's would.
    let end = Utc::now() - chrono::Duration::minutes(5);
    let base = end - chrono::Duration::hours(20);
    let records = demo::generate(&DemoConfig {
        seed: 1,
        accounts,
        events,
        start: base - chrono::Duration::days(3),
        end: base,
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
    // The preload and the raw consume are the bench's own: the peak RSS from here on is
    // the pipelines' run (Linux resets VmHWM to the current RSS on "5" in clear_refs).
    let before = vm("VmHWM:");
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    println!(
        "peak RSS (VmHWM) of the preload and raw consume: {before}; {}",
        if reset {
            format!("reset to the current RSS, {}", vm("VmRSS:"))
        } else {
            "not reset (no /proc/self/clear_refs): the figure at the end includes them".into()
        }
    );

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

    ledger.stop().await;

    // Freshness at a fixed produce rate, a fresh ledger role running (its purge interval
    // half the run), with expired claims stored after its start-up purge.
    let ledger = RunningTally::start_role(&env, Role::Ledger);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let store = env.store().await;
    let old_cutoff = Utc::now() - chrono::Duration::days(36);
    if purge_claims > 0 {
        let t = Instant::now();
        store
            .client()
            .execute(
                "INSERT INTO processed_events (scope, event_source, event_id, account_id, event_time)
                 SELECT 'usage', '//bench/expired', gen_random_uuid()::text,
                        'expired-' || (g % 1000)::text,
                        now() - interval '40 days' + g * interval '1 millisecond'
                 FROM generate_series(1::bigint, $1::bigint) AS g",
                &[&purge_claims],
            )
            .await
            .unwrap();
        store
            .client()
            .batch_execute("ANALYZE processed_events")
            .await
            .unwrap();
        println!(
            "stored {purge_claims} expired claims in {:.1} s; the ledger purges them {} s into the run",
            t.elapsed().as_secs_f64(),
            seconds / 2
        );
    }
    let (done_tx, done_rx) = watch::channel(false);
    let poller = tokio::spawn(poll_offsets(
        env.store().await,
        env.cfg.kafka.ledger_group.clone(),
        done_rx.clone(),
    ));
    let live_started = Instant::now();
    let purge_watch = tokio::spawn(watch_purge(
        env.store().await,
        old_cutoff,
        purge_claims > 0,
        done_rx,
    ));
    // Generated a second at a time (the whole run would be gigabytes), every 10th event's
    // send kept for the latency.
    let mut sends: Vec<(String, i32, i64, Instant)> = Vec::new();
    let mut pending: InFlight<'_> = Vec::new();
    let mut produced = 0u64;
    let t = Instant::now();
    // Event times over the 20 hours before `end` (inside the 24-hour grace), in order.
    for second in 0..seconds {
        let slice = demo::generate(&DemoConfig {
            seed: 2 + second,
            accounts,
            events: rate as usize,
            start: base + chrono::Duration::hours(20) * second as i32 / seconds as i32,
            end: base + chrono::Duration::hours(20) * (second + 1) as i32 / seconds as i32,
            duplicate_every: 0,
            malformed_every: 0,
        });
        for r in slice
            .iter()
            .filter(|r| !matches!(r.topic, EventKind::Grant | EventKind::Plan))
        {
            let due = Duration::from_secs_f64(produced as f64 / rate as f64);
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
            pending.push((topic, sent_at, delivery, produced.is_multiple_of(10)));
            produced += 1;
            if pending.len() >= 2_000 {
                acknowledged(&mut pending, &mut sends).await;
            }
        }
    }
    acknowledged(&mut pending, &mut sends).await;
    let produce_secs = t.elapsed().as_secs_f64();
    env.wait_ledger_caught_up(Duration::from_secs(600)).await;
    done_tx.send(true).unwrap();
    let snapshots = poller.await.unwrap();
    let purge = purge_watch.await.unwrap();
    ledger.stop().await;

    // Per partition: (next_offset, first time seen), both increasing.
    let mut timeline: HashMap<(String, i32), Vec<(i64, Instant)>> = HashMap::new();
    for (at, k, next) in snapshots {
        timeline.entry(k).or_default().push((next, at));
    }
    // (seconds into the run it was sent, ms to its committed balance)
    let samples: Vec<(f64, f64)> = sends
        .iter()
        .filter_map(|(topic, p, offset, sent_at)| {
            let line = timeline.get(&(topic.clone(), *p))?;
            let i = line.partition_point(|(next, _)| *next <= *offset);
            line.get(i).map(|(_, at)| {
                (
                    sent_at
                        .saturating_duration_since(live_started)
                        .as_secs_f64(),
                    at.saturating_duration_since(*sent_at).as_secs_f64() * 1000.0,
                )
            })
        })
        .collect();
    let pct = |mut ms: Vec<f64>, q: f64| {
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        ms[((ms.len() as f64 - 1.0) * q) as usize]
    };
    let all: Vec<f64> = samples.iter().map(|s| s.1).collect();
    println!(
        "freshness, produce -> committed balance at {:.0} events/s ({produced} events over {produce_secs:.1} s, every 10th measured): p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        produced as f64 / produce_secs,
        pct(all.clone(), 0.5),
        pct(all.clone(), 0.9),
        pct(all.clone(), 0.99),
        pct(all, 1.0)
    );
    // By 10-second window of sending: the p99 of each.
    let mut windows: Vec<(u64, f64)> = Vec::new();
    for w in 0..seconds.div_ceil(10) {
        let ms: Vec<f64> = samples
            .iter()
            .filter(|s| (s.0 / 10.0) as u64 == w)
            .map(|s| s.1)
            .collect();
        if !ms.is_empty() {
            windows.push((w * 10, pct(ms, 0.99)));
        }
    }
    let mut p99s: Vec<f64> = windows.iter().map(|w| w.1).collect();
    p99s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = p99s[p99s.len() / 2];
    let worst = windows
        .iter()
        .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap())
        .unwrap();
    println!(
        "  p99 by 10-s window: median {median:.0} ms, worst {:.0} ms (from {} s) = {:.2} x the median",
        worst.1,
        worst.0,
        worst.1 / median
    );
    match purge {
        Some((started, ended)) => {
            let during: Vec<String> = windows
                .iter()
                .filter(|(w, _)| (*w as f64) < ended && (*w as f64 + 10.0) > started)
                .map(|(w, p)| format!("{w} s: {p:.0} ms"))
                .collect();
            println!(
                "  purge of {purge_claims} expired claims by the ledger: from {started:.1} s to {ended:.1} s into the run; p99 of the windows it overlapped: {}",
                during.join(", ")
            );
        }
        None if purge_claims > 0 => println!("  the purge did not finish within the run"),
        None => {}
    }
    let metrics = tally::metrics::render();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    let replays = metric("tally_ledger_replays_total");
    let read_back = metric("tally_ledger_replayed_events_total");
    println!(
        "accounts replayed (an event out of event-time order), over the whole bench: {replays} ({read_back} open-window events read back, {:.0} per replay)",
        read_back / replays.max(1.0)
    );
    // The ledger's batches: how long each took in all (read, prepare, transaction) and in
    // its PostgreSQL transaction.
    for (what, name) in [
        ("batch", "tally_batch_duration_seconds"),
        ("transaction", "tally_transaction_duration_seconds"),
    ] {
        let sum = metric(&format!("{name}_sum{{pipeline=\"ledger\"}}"));
        let count = metric(&format!("{name}_count{{pipeline=\"ledger\"}}"));
        println!(
            "ledger {what}: {count} of them, {:.1} s in all, mean {:.1} ms",
            sum,
            1000.0 * sum / count.max(1.0)
        );
    }
    println!(
        "peak RSS (VmHWM) of the bench process since the raw consume (Tally's pipelines, the \
         producer, the samples): {}",
        vm("VmHWM:")
    );
}

/// A line of /proc/self/status (`VmHWM:`, `VmRSS:`), its value.
fn vm(key: &str) -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l[key.len()..].trim().to_owned())
        })
        .unwrap_or_default()
}

/// Sends in flight: topic, when sent, its delivery, and whether its latency is measured.
type InFlight<'t> = Vec<(&'t str, Instant, rdkafka::producer::DeliveryFuture, bool)>;

/// Waits for every send in flight; keeps (topic, partition, offset, when sent) of those measured.
async fn acknowledged(pending: &mut InFlight<'_>, sends: &mut Vec<(String, i32, i64, Instant)>) {
    for (topic, sent_at, d, keep) in pending.drain(..) {
        let delivered = d.await.unwrap().unwrap();
        if keep {
            sends.push((
                topic.to_owned(),
                delivered.partition,
                delivered.offset,
                sent_at,
            ));
        }
    }
}

/// When the stored dedupe horizon last moved (a purge started).
async fn purge_horizon(store: &tally::ledger::Store) -> Option<chrono::DateTime<Utc>> {
    store
        .client()
        .query_one("SELECT max(updated_at) FROM dedupe_horizon", &[])
        .await
        .unwrap()
        .get(0)
}

/// When the ledger's purge of the claims dated before `cutoff` started (the stored horizon
/// moved) and ended (none left), in seconds from this call; None when it did not end.
async fn watch_purge(
    store: tally::ledger::Store,
    cutoff: chrono::DateTime<Utc>,
    expected: bool,
    mut done: watch::Receiver<bool>,
) -> Option<(f64, f64)> {
    if !expected {
        return None;
    }
    let t = Instant::now();
    let before = purge_horizon(&store).await;
    let mut started = None;
    while !*done.borrow() {
        if started.is_none() && purge_horizon(&store).await != before {
            started = Some(t.elapsed().as_secs_f64());
        }
        let left: bool = store
            .client()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM processed_events WHERE event_time < $1)",
                &[&cutoff],
            )
            .await
            .unwrap()
            .get(0);
        if !left {
            return Some((started.unwrap_or(0.0), t.elapsed().as_secs_f64()));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = done.changed() => {}
        }
    }
    None
}

/// Samples the stored ledger offsets every 5 ms until told to stop; returns each change:
/// (when first seen, partition, next offset).
async fn poll_offsets(
    store: tally::ledger::Store,
    group: String,
    mut done: watch::Receiver<bool>,
) -> Vec<(Instant, (String, i32), i64)> {
    let mut out = Vec::new();
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
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
        for r in &rows {
            let key = (r.get::<_, String>(0), r.get::<_, i32>(1));
            let next: i64 = r.get(2);
            if last.get(&key).is_none_or(|n| *n < next) {
                last.insert(key.clone(), next);
                out.push((at, key, next));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = done.changed() => {}
        }
    }
    out
}
