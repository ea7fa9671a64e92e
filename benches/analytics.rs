//! Analytics benchmark against the real ClickHouse (not a test: it asserts nothing, it prints).
//!
//! The sink's write path as the analytics pipeline runs it, at its default batch (50,000
//! events), with a growing table, everything dated today (the day's volume is what must not
//! slow a batch): each batch written (`AnalyticsSink::write`: rows, identities, the touched
//! roll-up blocks recomputed), then the identities of several batches resolved at once
//! (`AnalyticsSink::resolve`, the lookup whose time grows with the table):
//!
//! 1. 100,000 events stored today (12 partitions, one heavy account holding half of them,
//!    the rest over TALLY_BENCH_ANALYTICS_ACCOUNTS accounts, default 1,000): then 6 batches
//!    of 50,000 new events of today written, timed (median and max per batch, events/s), and
//!    one resolve of the 300,000; then 6 more batches each written and resolved alone (the
//!    write path before resolves were grouped), for comparison in the same run.
//! 2. The table grown to TALLY_BENCH_ANALYTICS_EVENTS (default 10,000,000) stored today, in
//!    batches of TALLY_BENCH_ANALYTICS_BATCH (default 500,000) written and resolved: prints
//!    the load rate; then the same timed phases again, and the ratios (10M / 100k) of the
//!    per-batch write medians, of the resolves, of a batch with its share of the resolve,
//!    and of batches each resolved alone.
//! 3. A batch written and resolved again (a replay).
//! 4. The report queries' latency for the heavy account (half of the stored events): first
//!    run, then median and max of 20 (goal: under 100 ms each); TALLY_BENCH_ANALYTICS_REPORTS=0
//!    skips them.
//!
//! Each timed phase prints the median time of each statement of the write path
//! (`InsertOutcome::timings`) and the database's active parts and running merges before it.
//! Event ids are random UUIDs, as producers send them (a batch's ids are spread over the whole
//! identity key); TALLY_BENCH_ANALYTICS_IDS=sequential gives `ev-{i}` ids instead, which sort
//! together by batch.
//!
//! The database is dropped at the end unless TALLY_BENCH_KEEP=1.
//!
//! Run: `scripts/services up && cargo bench --bench analytics`
//! (ClickHouse from TALLY_TEST_CLICKHOUSE_URL, default http://127.0.0.1:8123.)

use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal_macros::dec;

use tally::analytics::queries::{Cycle, DateRange, ReportRequest, UsageQueries};
use tally::analytics::{migrate, AnalyticsSink, OffsetRange, RatedRow, StatementTimes};
use tally::config::ClickHouseConfig;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("analytics: a benchmark; run it with `cargo bench --bench analytics`");
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

const PARTITIONS: u64 = 12;
const HEAVY: &str = "acct-heavy";

/// Events `start..start + n` of the stream, all dated `today`: event i is read at partition
/// i % 12, offset i / 12; even events belong to the heavy account, odd ones to one of
/// `accounts` others.
fn batch(start: u64, n: u64, accounts: u64, today: NaiveDate, seed: u64) -> Vec<RatedRow> {
    let mut rng = SmallRng::seed_from_u64(seed ^ start);
    let days = u16::try_from((today - NaiveDate::default()).num_days()).unwrap();
    (start..start + n)
        .map(|i| {
            let second = rng.gen_range(0..86_400u32);
            let mut r = row(i, accounts, days, second, &mut rng);
            if i % 2 == 0 {
                r.account_id = HEAVY.into();
            }
            r.partition = u32::try_from(i % PARTITIONS).unwrap();
            r.offset = i / PARTITIONS;
            r.admission = tally::analytics::admission_rank(
                1_750_000_000_000 + i64::try_from(i).unwrap(),
                i64::try_from(r.offset).unwrap(),
            );
            r
        })
        .collect()
}

/// Event i's id: a random-looking UUID (a fixed permutation of i), as producers send them,
/// so a batch's ids are spread over the whole identity key like in production;
/// `ev-{i}` (ids that sort together by batch) with TALLY_BENCH_ANALYTICS_IDS=sequential.
fn event_id(i: u64) -> String {
    static SEQUENTIAL: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("TALLY_BENCH_ANALYTICS_IDS").as_deref() == Ok("sequential")
    });
    if *SEQUENTIAL {
        return format!("ev-{i}");
    }
    let mix = |mut z: u64| {
        // splitmix64: a bijection on u64.
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let (hi, lo) = (mix(i), mix(i ^ 0x5555_5555_5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xfff,
        0x8000 | (lo >> 48) & 0x3fff,
        lo & 0xffff_ffff_ffff
    )
}

fn row(i: u64, accounts: u64, days: u16, second: u32, rng: &mut SmallRng) -> RatedRow {
    let mut r = RatedRow {
        event_source: "//bench/usage".into(),
        event_id: event_id(i),
        account_id: format!("acct-{:04}", i % accounts),
        event_time_unix_seconds: u32::from(days) * 86_400 + second,
        event_date_unix_days: days,
        credits_e6: rng.gen_range(0..5_000_000),
        price_version: "2025-01".into(),
        topic: "usage.bench".into(),
        partition: u32::try_from(i % 12).unwrap(),
        offset: i,
        inserted_at_unix_seconds: u32::try_from(Utc::now().timestamp()).unwrap(),
        ..Default::default()
    };
    match rng.gen_range(0..10) {
        0..=3 => {
            r.kind = "call".into();
            r.call_id = format!("call-{i}");
            r.direction = "inbound".into();
            r.channel = "phone".into();
            r.voice_tier = ["standard", "premium"][rng.gen_range(0..2)].into();
            r.answered = u8::from(rng.gen_range(0..6) > 0);
            let s: u64 = rng.gen_range(1..900);
            r.quantity_e6 = i128::from(s) * 1_000_000;
            r.billable_seconds = s.div_ceil(60) * 60;
            r.unit = "minute".into();
            r.rule_id = "call.in".into();
        }
        4..=7 => {
            r.kind = "chat_response".into();
            r.conversation_id = format!("conv-{}", i / 5);
            r.model = ["gpt-4o-mini", "gpt-4o", "claude-sonnet"][rng.gen_range(0..3)].into();
            r.voice_tier = ["standard", "premium"][rng.gen_range(0..2)].into();
            r.channel = "text".into();
            r.responses = rng.gen_range(1..4);
            r.quantity_e6 = i128::from(r.responses) * 1_000_000;
            r.unit = "response".into();
            r.rule_id = "chat".into();
        }
        8 => {
            r.kind = "instance_hours".into();
            r.instance_type = ["cpu.standard", "gpu.a10", "gpu.h100"][rng.gen_range(0..3)].into();
            r.instance_id = format!("i-{i}");
            let s: u64 = rng.gen_range(60..36_000);
            r.quantity_e6 = i128::from(s) * 1_000_000;
            r.billable_seconds = s.div_ceil(3600) * 3600;
            r.unit = "hour".into();
            r.rule_id = "instance".into();
        }
        _ => {
            r.kind = "ai_analysis".into();
            r.model = ["gemini-3-flash", "gpt-4o"][rng.gen_range(0..2)].into();
            r.quantity_e6 = rng.gen_range(1..10_000_000);
            r.unit = "analysis".into();
            r.rule_id = "analysis".into();
        }
    }
    r.billable_quantity_e6 = i64::try_from(r.quantity_e6).unwrap();
    r
}

async fn time<T, F: std::future::Future<Output = T>>(f: F) -> (T, Duration) {
    let t = Instant::now();
    let v = f.await;
    (v, t.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// First run, then median and max of 20 more.
macro_rules! measure {
    ($name:expr, $call:expr) => {{
        let (_, first) = time($call).await;
        let mut runs = Vec::with_capacity(20);
        for _ in 0..20 {
            let (r, d) = time($call).await;
            r.expect($name);
            runs.push(d);
        }
        runs.sort();
        let (median, max) = (runs[runs.len() / 2], runs[runs.len() - 1]);
        println!(
            "  {:<34} first {:>7.1} ms   median {:>7.1} ms   max {:>7.1} ms{}",
            $name,
            ms(first),
            ms(median),
            ms(max),
            if median > Duration::from_millis(100) {
                "   (over 100 ms)"
            } else {
                ""
            }
        );
    }};
}

/// Writes `n` new events from `start` in batches of `per_batch`, timing each batch: with
/// `resolve`, each batch is written and resolved (`insert`), else only written, as the
/// pipeline does before it resolves many batches at once ([`resolve_timed`]).
async fn write_path(
    sink: &AnalyticsSink,
    start: u64,
    n: u64,
    per_batch: u64,
    accounts: u64,
    today: NaiveDate,
    resolve: bool,
) -> Vec<(Duration, StatementTimes)> {
    let mut times = Vec::new();
    let mut done = 0;
    while done < n {
        let k = per_batch.min(n - done);
        let from = start + done;
        let rows = tokio::task::spawn_blocking(move || batch(from, k, accounts, today, 7))
            .await
            .unwrap();
        let (outcome, d) = if resolve {
            time(sink.insert(&rows)).await
        } else {
            time(sink.write(&rows)).await
        };
        times.push((d, outcome.expect("sink write").timings));
        done += k;
    }
    times
}

/// Resolves the identities of events `start..start + n` (written by [`write_path`]) in one
/// call, as the pipeline does for the batches written since its last resolve.
async fn resolve_timed(sink: &AnalyticsSink, start: u64, n: u64) -> Duration {
    let ranges: Vec<OffsetRange> = (0..PARTITIONS)
        .map(|p| {
            // Offsets of partition p in start..start + n (offset = i, partition = i % 12).
            let first = start + (p + PARTITIONS - start % PARTITIONS) % PARTITIONS;
            let last = start + n - 1 - (start + n - 1 + PARTITIONS - p) % PARTITIONS;
            OffsetRange {
                topic: "usage.bench".into(),
                partition: u32::try_from(p).unwrap(),
                first,
                last,
            }
        })
        .collect();
    let (outcome, d) = time(sink.resolve(&ranges)).await;
    let outcome = outcome.expect("resolve");
    println!(
        "    resolve of those {n} events: {:.0} ms (lookup {:.0} ms, {} duplicates, {} blocks)",
        ms(d),
        ms(outcome.timings.lookup),
        outcome.duplicates,
        outcome.blocks
    );
    d
}

/// Events per timed batch, and timed batches per phase.
const BATCH: u64 = 50_000;
const TIMED: u64 = 6;
/// Events a timed phase writes ([`timed_phases`]).
const PHASE_EVENTS: u64 = 2 * TIMED * BATCH;

/// The per-batch medians of one timed phase and its resolve.
struct Phase {
    /// A batch written (resolved later, with the others).
    write: Duration,
    /// One resolve of the phase's written batches.
    resolve: Duration,
    /// A batch written and resolved alone.
    each: Duration,
}

/// From `start`: TIMED batches written then resolved at once, then TIMED batches each written
/// and resolved alone ([`PHASE_EVENTS`] events in all).
async fn timed_phases(sink: &AnalyticsSink, start: u64, accounts: u64, today: NaiveDate) -> Phase {
    let n = TIMED * BATCH;
    let written = write_path(sink, start, n, BATCH, accounts, today, false).await;
    let write = summary(
        &format!("with {start}..{} stored", start + n - BATCH),
        &written,
        BATCH,
    );
    let resolve = resolve_timed(sink, start, n).await;
    let alone = write_path(sink, start + n, n, BATCH, accounts, today, true).await;
    let each = summary(
        "    the same, each batch resolved alone (the write path before resolves were grouped)",
        &alone,
        BATCH,
    );
    Phase {
        write,
        resolve,
        each,
    }
}

fn summary(label: &str, timed: &[(Duration, StatementTimes)], rows_per_batch: u64) -> Duration {
    let times: Vec<Duration> = timed.iter().map(|t| t.0).collect();
    let mut sorted = times.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let total: Duration = times.iter().sum();
    println!(
        "  {label}: {} batches of {rows_per_batch}: median {:.0} ms, max {:.0} ms per batch, {:.0} events/s",
        times.len(),
        ms(median),
        ms(sorted[sorted.len() - 1]),
        (rows_per_batch * times.len() as u64) as f64 / total.as_secs_f64()
    );
    let median_of = |f: fn(&StatementTimes) -> Duration| {
        let mut v: Vec<Duration> = timed.iter().map(|t| f(&t.1)).collect();
        v.sort();
        ms(v[v.len() / 2])
    };
    println!(
        "    per statement (median ms): events {:.0}, identities {:.0}, lookup {:.0}, losers {:.0}, \
         daily {:.0}, hourly {:.0}",
        median_of(|t| t.events),
        median_of(|t| t.identities),
        median_of(|t| t.lookup),
        median_of(|t| t.losers),
        median_of(|t| t.daily),
        median_of(|t| t.hourly),
    );
    median
}

/// Active parts and running merges of the database: background work the timed batches share
/// the machine with.
async fn print_background(client: &clickhouse::Client, database: &str) {
    let parts: u64 = client
        .query("SELECT count() FROM system.parts WHERE database = ? AND active")
        .bind(database)
        .fetch_one()
        .await
        .unwrap_or_default();
    let merges: u64 = client
        .query("SELECT count() FROM system.merges WHERE database = ?")
        .bind(database)
        .fetch_one()
        .await
        .unwrap_or_default();
    println!("  ({parts} active parts, {merges} merges running)");
}

/// The report queries' latency for the heavy account.
async fn reports(cfg: &ClickHouseConfig, today: NaiveDate) {
    let account = HEAVY;
    let q = UsageQueries::new(cfg);
    let range = DateRange::new(today - chrono::Days::new(89), today).unwrap();
    let month = Cycle::calendar_month(today);
    let cycle = Cycle {
        allowance: Some(dec!(10000)),
        ..month
    };
    let request = ReportRequest {
        range,
        ..ReportRequest::for_cycle(cycle, today, Some(dec!(5000))).unwrap()
    };
    let (counts, _) = time(q.counts(account, &range)).await;
    let counts = counts.unwrap();
    println!(
        "report queries for {account} ({} events, {} credits):",
        counts.events, counts.credits
    );
    measure!("daily (90 days, kind x model)", q.daily(account, &range));
    measure!("cycle (used vs allowance)", q.cycle(account, &cycle, today));
    measure!("peak days (top 5)", q.peak_days(account, &range, 5));
    measure!("busiest hours (top 5)", q.busiest_hours(account, &range, 5));
    measure!("trend (3 months)", q.trend(account, today));
    measure!(
        "projection",
        q.projection(account, &cycle, today, Some(dec!(5000)))
    );
    measure!("counts", q.counts(account, &range));
    measure!(
        "whole report (6 queries at once)",
        q.report(account, &request)
    );
}

async fn run() {
    let events = env_or("TALLY_BENCH_ANALYTICS_EVENTS", 10_000_000);
    let accounts = env_or("TALLY_BENCH_ANALYTICS_ACCOUNTS", 1_000);
    let load_batch = env_or("TALLY_BENCH_ANALYTICS_BATCH", 500_000);
    let small = 100_000u64.min(events);
    let cfg = ClickHouseConfig {
        url: std::env::var("TALLY_TEST_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: format!("bench_analytics_{}", std::process::id()),
        ..ClickHouseConfig::default()
    };
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let client = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_validation(false);
    let today = Utc::now().date_naive();
    let sink = AnalyticsSink::new(&cfg);
    println!(
        "analytics bench: write path at 50,000-event batches with {small} then {events} events stored today \
         ({PARTITIONS} partitions, {HEAVY} holding half, {accounts} other accounts), database {} at {}",
        cfg.database, cfg.url
    );

    // 1. 100k stored, then timed batches continuing the stream (so each reads the stored
    // part of the blocks it touches, as in production).
    let t = Instant::now();
    write_path(&sink, 0, small, BATCH, accounts, today, true).await;
    println!(
        "stored {small} events today in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    print_background(&client, &cfg.database).await;
    let small_phase = timed_phases(&sink, small, accounts, today).await;

    // 2. Grown to `events`, through the same write path.
    let t = Instant::now();
    let grown_from = small + PHASE_EVENTS;
    let loads = write_path(
        &sink,
        grown_from,
        events.saturating_sub(grown_from),
        load_batch,
        accounts,
        today,
        true,
    )
    .await;
    let loading = t.elapsed();
    println!(
        "stored {} more events in {:.1} s ({:.0} events/s at batches of {load_batch}; slowest batch {:.1} s)",
        events.saturating_sub(grown_from),
        loading.as_secs_f64(),
        events.saturating_sub(grown_from) as f64 / loading.as_secs_f64(),
        loads.iter().map(|t| t.0).max().unwrap_or_default().as_secs_f64()
    );
    print_background(&client, &cfg.database).await;
    let stored = events.max(grown_from);
    let large_phase = timed_phases(&sink, stored, accounts, today).await;
    println!(
        "  ratio of the per-batch medians when each batch is resolved alone: {:.2}",
        large_phase.each.as_secs_f64() / small_phase.each.as_secs_f64()
    );
    println!(
        "  ratio of the per-batch write medians ({events} / {small} stored): {:.2}",
        large_phase.write.as_secs_f64() / small_phase.write.as_secs_f64()
    );
    println!(
        "  ratio of the resolves of {} events: {:.2}",
        TIMED * BATCH,
        large_phase.resolve.as_secs_f64() / small_phase.resolve.as_secs_f64()
    );
    let per_batch = |p: &Phase| p.write + p.resolve / TIMED as u32;
    println!(
        "  per batch with its share of one resolve per {TIMED} batches: {:.0} ms then {:.0} ms, ratio {:.2}",
        ms(per_batch(&small_phase)),
        ms(per_batch(&large_phase)),
        per_batch(&large_phase).as_secs_f64() / per_batch(&small_phase).as_secs_f64()
    );

    // 3. A replay of the last timed batch.
    let last = batch(stored + PHASE_EVENTS - BATCH, BATCH, accounts, today, 7);
    let (outcome, d) = time(sink.insert(&last)).await;
    println!(
        "the last batch written again (a replay): {:.0} ms ({:?})",
        ms(d),
        outcome.unwrap()
    );
    let sizes: Vec<(String, u64, u64)> = client
        .query(
            "SELECT table, sum(rows) AS total_rows, sum(bytes) AS total_bytes FROM system.parts \
             WHERE database = ? AND active GROUP BY table ORDER BY table",
        )
        .bind(&cfg.database)
        .fetch_all()
        .await
        .unwrap();
    for (table, rows, bytes) in sizes {
        println!(
            "  {table:<18} {rows:>10} rows  {:>8.1} MiB on disk",
            bytes as f64 / 1048576.0
        );
    }

    // 4. Report queries for the heavy account (TALLY_BENCH_ANALYTICS_REPORTS=0 skips them).
    if std::env::var("TALLY_BENCH_ANALYTICS_REPORTS").as_deref() != Ok("0") {
        reports(&cfg, today).await;
    }

    if std::env::var("TALLY_BENCH_KEEP").as_deref() == Ok("1") {
        println!("kept database {}", cfg.database);
    } else {
        client
            .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
            .execute()
            .await
            .unwrap();
    }
}
