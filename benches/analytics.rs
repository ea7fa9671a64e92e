//! Analytics benchmark against the real ClickHouse (not a test: it asserts nothing, it prints).
//!
//! 1. Inserts TALLY_BENCH_ANALYTICS_EVENTS rated events (default 10,000,000) over
//!    TALLY_BENCH_ANALYTICS_ACCOUNTS accounts (default 1,000) and 90 days straight into
//!    `rated_events` of a fresh database, in batches of TALLY_BENCH_ANALYTICS_BATCH rows
//!    (default 500,000), with the roll-up views running: prints the insert rate.
//! 2. Prints the latency (first run, then median and max of 20) of each report query for one
//!    account (goal: under 100 ms each), and of the whole report.
//! 3. Prints the cost of the sink's write path (`AnalyticsSink::insert`: the stored-identities
//!    check, then the insert) on the full table: 5,000 new events of today over all accounts,
//!    the same batch again (all already stored: nothing written), 5,000 stored events spread
//!    over the 90 days, then the rate over 20 batches of 5,000 (the pipeline's default batch).
//!
//! The database is dropped at the end unless TALLY_BENCH_KEEP=1. TALLY_BENCH_ANALYTICS_DATABASE
//! names a database kept by an earlier run: the insert is skipped and 2-3 measured on it.
//!
//! Run: `scripts/services up && cargo bench --bench analytics`
//! (ClickHouse from TALLY_TEST_CLICKHOUSE_URL, default http://127.0.0.1:8123.)

use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal_macros::dec;

use tally::analytics::queries::{Cycle, DateRange, ReportRequest, UsageQueries};
use tally::analytics::{migrate, AnalyticsSink, RatedRow};
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

const DAYS: u64 = 90;

/// Rows `start..start + n` of the data set: event i belongs to account i % accounts, on a
/// day and second drawn from a generator seeded by i (so any batch can be made alone).
fn batch(start: u64, n: u64, accounts: u64, first_day: NaiveDate, seed: u64) -> Vec<RatedRow> {
    let mut rng = SmallRng::seed_from_u64(seed ^ start);
    let epoch = NaiveDate::default();
    (start..start + n)
        .map(|i| {
            let day = first_day + chrono::Days::new(rng.gen_range(0..DAYS));
            let second = rng.gen_range(0..86_400u32);
            let days = u16::try_from((day - epoch).num_days()).unwrap();
            row(i, accounts, days, second, &mut rng)
        })
        .collect()
}

fn row(i: u64, accounts: u64, days: u16, second: u32, rng: &mut SmallRng) -> RatedRow {
    let mut r = RatedRow {
        event_source: "//bench/usage".into(),
        event_id: format!("ev-{i}"),
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

async fn run() {
    let events = env_or("TALLY_BENCH_ANALYTICS_EVENTS", 10_000_000);
    let accounts = env_or("TALLY_BENCH_ANALYTICS_ACCOUNTS", 1_000);
    let batch_rows = env_or("TALLY_BENCH_ANALYTICS_BATCH", 500_000);
    let reuse = std::env::var("TALLY_BENCH_ANALYTICS_DATABASE").ok();
    let cfg = ClickHouseConfig {
        url: std::env::var("TALLY_TEST_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: reuse
            .clone()
            .unwrap_or_else(|| format!("bench_analytics_{}", std::process::id())),
        ..ClickHouseConfig::default()
    };
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let client = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_compression(clickhouse::Compression::Lz4)
        .with_validation(false);
    // The data set's days end on the day it was inserted.
    let today = match &reuse {
        None => Utc::now().date_naive(),
        Some(_) => {
            let last: u16 = client
                .query(
                    "SELECT max(event_date) FROM rated_events WHERE event_source = '//bench/usage'",
                )
                .fetch_one()
                .await
                .unwrap();
            NaiveDate::default() + chrono::Days::new(u64::from(last))
        }
    };
    let first_day = today - chrono::Days::new(DAYS - 1);
    println!(
        "analytics bench: {events} rated events, {accounts} accounts, {DAYS} days ({first_day} .. {today}), database {} at {}",
        cfg.database, cfg.url
    );

    // 1. Straight inserts, views running.
    let (mut generating, mut inserting) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    let mut done = if reuse.is_some() { events } else { 0 };
    while done < events {
        let n = batch_rows.min(events - done);
        let t = Instant::now();
        let rows = tokio::task::spawn_blocking(move || batch(done, n, accounts, first_day, 7))
            .await
            .unwrap();
        generating += t.elapsed();
        let t = Instant::now();
        let mut insert = client.insert::<RatedRow>("rated_events").await.unwrap();
        for r in &rows {
            insert.write(r).await.unwrap();
        }
        insert.end().await.unwrap();
        inserting += t.elapsed();
        done += n;
        eprint!(
            "\r  inserted {done}/{events} ({:.0} rows/s)   ",
            done as f64 / inserting.as_secs_f64()
        );
    }
    if reuse.is_none() {
        eprintln!();
        println!(
            "insert: {events} rows in {:.1} s of INSERT ({:.0} rows/s with the roll-up views), \
         {:.1} s generating rows, {:.1} s overall",
            inserting.as_secs_f64(),
            events as f64 / inserting.as_secs_f64(),
            generating.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
    }
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

    // 2. Report queries for one account.
    let account = "acct-0042";
    let q = UsageQueries::new(&cfg);
    let range = DateRange::new(first_day, today).unwrap();
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
        "report queries for {account} ({} events, {} credits over {DAYS} days):",
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

    // 3. The sink's write path on the full table.
    let sink = AnalyticsSink::new(&cfg);
    let today_days = u16::try_from((today - NaiveDate::default()).num_days()).unwrap();
    let mut rng = SmallRng::seed_from_u64(99);
    let fresh: Vec<RatedRow> = (0..5_000u64)
        .map(|k| {
            let i = events + k;
            let mut r = row(i, accounts, today_days, rng.gen_range(0..86_400), &mut rng);
            r.event_id = format!("new-{}-{k}", std::process::id());
            r
        })
        .collect();
    let (outcome, d) = time(sink.insert(&fresh)).await;
    println!(
        "sink insert of 5000 new events of today over {accounts} accounts: {:.1} ms ({:?})",
        ms(d),
        outcome.unwrap()
    );
    let (outcome, d) = time(sink.insert(&fresh)).await;
    println!(
        "the same 5000 again (a replay: stored-identities check only): {:.1} ms ({:?})",
        ms(d),
        outcome.unwrap()
    );
    let old: Vec<RatedRow> = batch(0, batch_rows.min(events), accounts, first_day, 7)
        .into_iter()
        .step_by((batch_rows.min(events) / 5_000).max(1) as usize)
        .take(5_000)
        .collect();
    let (outcome, d) = time(sink.insert(&old)).await;
    println!(
        "5000 stored events spread over 90 days again: {:.1} ms ({:?})",
        ms(d),
        outcome.unwrap()
    );
    // The analytics pipeline's write path at its default batch size: 20 batches.
    let mut spent = Duration::ZERO;
    for b in 0..20u64 {
        let rows: Vec<RatedRow> = (0..5_000u64)
            .map(|k| {
                let mut r = row(k, accounts, today_days, rng.gen_range(0..86_400), &mut rng);
                r.event_id = format!("path-{}-{b}-{k}", std::process::id());
                r
            })
            .collect();
        let (outcome, d) = time(sink.insert(&rows)).await;
        outcome.unwrap();
        spent += d;
    }
    println!(
        "sink write path (check + insert), 20 batches of 5000 new events: {:.0} rows/s ({:.1} ms per batch)",
        100_000.0 / spent.as_secs_f64(),
        ms(spent) / 20.0
    );

    if reuse.is_some() || std::env::var("TALLY_BENCH_KEEP").as_deref() == Ok("1") {
        println!("kept database {}", cfg.database);
    } else {
        client
            .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
            .execute()
            .await
            .unwrap();
    }
}
