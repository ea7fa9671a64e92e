//! The roll-ups converge, against a real ClickHouse (TALLY_TEST_CLICKHOUSE_URL): whatever
//! happens to a write — half done and retried, timed out but completed on the server (so
//! written twice, also concurrently), written by two instances with different batch cuts in
//! any order, an identity re-sent with another time and account, a later-read copy that was
//! admitted first — `usage_daily` and `usage_hourly` (read with FINAL) end equal to the
//! aggregates of the events that count, computed here by a small model of the rows (one copy
//! per identity: the earliest record timestamp, then the lowest offset), never by the code
//! under test. `tally reconcile`'s two ClickHouse sides agree too.

mod common;

use std::collections::BTreeMap;

use chrono::NaiveDate;
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use common::analytics::clickhouse_config;
use tally::analytics::{admission_rank, migrate, AnalyticsSink, DateRange, RatedRow, UsageQueries};
use tally::config::ClickHouseConfig;

const T0_MS: i64 = 1_750_000_000_000; // 2025-06-15T15:06:40Z

fn day(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

fn unix_days(d: NaiveDate) -> u16 {
    u16::try_from((d - NaiveDate::default()).num_days()).unwrap()
}

/// A chat row: `credits_e6` micro-credits, at `hour` of `date`, read at (topic, partition,
/// offset), its record produced `produced_ms` after T0.
#[allow(clippy::too_many_arguments)]
fn row(
    id: &str,
    account: &str,
    date: &str,
    hour: u32,
    credits_e6: i64,
    partition: u32,
    offset: u64,
    produced_ms: i64,
) -> RatedRow {
    let d = day(date);
    let time = d.and_hms_opt(hour, 0, 0).unwrap().and_utc();
    RatedRow {
        event_source: "//converge.test".into(),
        event_id: id.into(),
        account_id: account.into(),
        kind: "chat_response".into(),
        event_time_unix_seconds: u32::try_from(time.timestamp()).unwrap(),
        event_date_unix_days: unix_days(d),
        model: "m".into(),
        conversation_id: format!("conv-{id}"),
        responses: 1,
        quantity_e6: 1_000_000,
        billable_quantity_e6: 1_000_000,
        unit: "response".into(),
        credits_e6,
        // The record's time after T0, kept where the model can read it (chats have no use
        // for a price version here).
        price_version: produced_ms.to_string(),
        rule_id: "r".into(),
        topic: "usage.converge".into(),
        partition,
        offset,
        inserted_at_unix_seconds: 1_750_000_000,
        admission: admission_rank(T0_MS + produced_ms, i64::try_from(offset).unwrap()),
        ..Default::default()
    }
}

/// (account, day, hour) -> (events, credits) of the counting copies, by hand: per identity
/// the copy with the earliest record time, then the lowest offset.
type Model = BTreeMap<(String, NaiveDate, u8), (u64, Decimal)>;

fn model(all: &[RatedRow]) -> Model {
    let mut first: BTreeMap<(&str, &str), &RatedRow> = BTreeMap::new();
    for r in all {
        let key = (r.event_source.as_str(), r.event_id.as_str());
        let earlier = |a: &RatedRow, b: &RatedRow| {
            let produced = |r: &RatedRow| r.price_version.parse::<i64>().unwrap();
            (produced(a), a.offset) < (produced(b), b.offset)
        };
        match first.get(&key) {
            Some(f) if !earlier(r, f) => {}
            _ => {
                first.insert(key, r);
            }
        }
    }
    let mut out = Model::new();
    for r in first.values() {
        let hour = u8::try_from((r.event_time_unix_seconds % 86_400) / 3600).unwrap();
        let e = out
            .entry((r.account_id.clone(), r.event_date(), hour))
            .or_default();
        e.0 += 1;
        e.1 += r.credits();
    }
    out
}

fn by_day(m: &Model) -> BTreeMap<(String, NaiveDate), (u64, Decimal)> {
    let mut out: BTreeMap<(String, NaiveDate), (u64, Decimal)> = BTreeMap::new();
    for ((a, d, _), (n, c)) in m {
        let e = out.entry((a.clone(), *d)).or_default();
        e.0 += n;
        e.1 += c;
    }
    out
}

#[derive(Debug, Row, Deserialize)]
struct HourRow {
    account_id: String,
    day: u16,
    hour_of_day: u8,
    events: u64,
    credits: i128,
}

/// The hourly and daily roll-ups as stored (FINAL), zero rows left out.
async fn rollups(cfg: &ClickHouseConfig) -> (Model, BTreeMap<(String, NaiveDate), (u64, Decimal)>) {
    let ch = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_validation(false);
    let hours: Vec<HourRow> = ch
        .query(
            "SELECT account_id, day, hour_of_day, countMerge(event_count) AS events, \
             sumMerge(credits_total) AS credits FROM usage_hourly FINAL \
             GROUP BY account_id, day, hour_of_day HAVING events > 0",
        )
        .fetch_all()
        .await
        .unwrap();
    let hourly = hours
        .into_iter()
        .map(|h| {
            (
                (
                    h.account_id,
                    tally::analytics::sql::date_from_unix_days(h.day),
                    h.hour_of_day,
                ),
                (h.events, Decimal::from_i128_with_scale(h.credits, 6)),
            )
        })
        .collect();
    #[derive(Debug, Row, Deserialize)]
    struct DayRow {
        account_id: String,
        day: u16,
        events: u64,
        credits: i128,
    }
    let days: Vec<DayRow> = ch
        .query(
            "SELECT account_id, day, countMerge(event_count) AS events, \
             sumMerge(credits_total) AS credits FROM usage_daily FINAL \
             GROUP BY account_id, day HAVING events > 0",
        )
        .fetch_all()
        .await
        .unwrap();
    let daily = days
        .into_iter()
        .map(|d| {
            (
                (
                    d.account_id,
                    tally::analytics::sql::date_from_unix_days(d.day),
                ),
                (d.events, Decimal::from_i128_with_scale(d.credits, 6)),
            )
        })
        .collect();
    (hourly, daily)
}

async fn assert_converged(cfg: &ClickHouseConfig, all: &[RatedRow], what: &str) {
    let expected = model(all);
    let (hourly, daily) = rollups(cfg).await;
    assert_eq!(hourly, expected, "{what}: usage_hourly");
    assert_eq!(daily, by_day(&expected), "{what}: usage_daily");
    // reconcile's two ClickHouse sides: the roll-up and the distinct rated events agree.
    let q = UsageQueries::new(cfg);
    let range = DateRange::new(day("2025-06-01"), day("2025-06-30")).unwrap();
    let rollup = q.rollup_days(&range, None).await.unwrap();
    let rated = q.rated_days(&range, None).await.unwrap();
    let strip = |v: Vec<tally::analytics::reconcile::KindDay>| {
        v.into_iter()
            .filter(|k| k.events > 0)
            .map(|k| (k.account_id, k.day, k.kind, k.events, k.credits))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(rollup), strip(rated), "{what}: reconcile's sides");
}

async fn fresh(name: &str) -> (ClickHouseConfig, AnalyticsSink) {
    let cfg = clickhouse_config(name);
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let sink = AnalyticsSink::new(&cfg);
    (cfg, sink)
}

async fn drop_database(cfg: &ClickHouseConfig) {
    clickhouse::Client::default()
        .with_url(&cfg.url)
        .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
        .execute()
        .await
        .unwrap();
}

/// Offsets `from..to` of `partition`: one chat each, 3 accounts, 2 days, credits 1..=7.
fn stream(partition: u32, from: u64, to: u64) -> Vec<RatedRow> {
    (from..to)
        .map(|o| {
            let account = ["a1", "a2", "a3"][(o % 3) as usize];
            let date = if o % 5 == 0 {
                "2025-06-11"
            } else {
                "2025-06-10"
            };
            row(
                &format!("e-{partition}-{o}"),
                account,
                date,
                u32::try_from(o % 24).unwrap(),
                i64::try_from(o % 7 + 1).unwrap() * 1_000_000,
                partition,
                o,
                i64::try_from(o).unwrap(),
            )
        })
        .collect()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn half_done_doubled_and_concurrent_writes_converge() {
    let (cfg, sink) = fresh("conv_writes").await;
    let raw = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database)
        .with_validation(false);
    // Partition 0 spans blocks 0 and 1 (8192 offsets each).
    let p0 = stream(0, 8_000, 8_400);
    let p1 = stream(1, 0, 300);

    // A write that failed after the rows were stored and before identities and roll-ups
    // (the insert "failed midway"): the rows alone are in; then the retry.
    let mut insert = raw.insert::<RatedRow>("usage_events").await.unwrap();
    for r in &p0[..200] {
        insert.write(r).await.unwrap();
    }
    insert.end().await.unwrap();
    sink.insert(&p0[..200]).await.unwrap();
    assert_converged(&cfg, &p0[..200], "after a half-done write and its retry").await;

    // A timed-out insert that completed on the server, and its retry, at the same moment;
    // then once more.
    let (a, b) = tokio::join!(sink.insert(&p0[200..]), sink.insert(&p0[200..]));
    a.unwrap();
    b.unwrap();
    sink.insert(&p0[150..300]).await.unwrap();
    assert_converged(&cfg, &p0, "after doubled writes").await;

    // Two instances in a rebalance: the new owner reads 0..150 then 150..300 of partition 1,
    // the revoked member writes the batch it held (0..220) last, and a stale cut once more.
    let new_owner = AnalyticsSink::new(&cfg);
    new_owner.insert(&p1[..150]).await.unwrap();
    new_owner.insert(&p1[150..]).await.unwrap();
    sink.insert(&p1[..220]).await.unwrap();
    let all: Vec<RatedRow> = p0.iter().chain(&p1).cloned().collect();
    assert_converged(&cfg, &all, "after a rebalance, the revoked member last").await;
    let (a, b) = tokio::join!(sink.insert(&p1[100..250]), new_owner.insert(&p1[..120]));
    a.unwrap();
    b.unwrap();
    assert_converged(&cfg, &all, "after both instances at once").await;
    drop_database(&cfg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn one_identity_counts_once_whatever_its_time_account_or_arrival() {
    let (cfg, sink) = fresh("conv_identity").await;
    let mut all = Vec::new();
    // x: sent on 06-10 at offset 5, re-sent with a corrected time (06-12) and account at
    // offset 40, 10 s later: the first copy counts, on 06-10, for a1.
    let x1 = row("x", "a1", "2025-06-10", 9, 5_000_000, 0, 5, 0);
    let x2 = row("x", "a2", "2025-06-12", 9, 7_000_000, 0, 40, 10_000);
    // y: the copy read first (partition 1, offset 3, produced at +20 s) was admitted after
    // the one read later (partition 0, offset 9000 in block 1, produced at +1 s): the later
    // read copy counts, and the first one's block is recomputed without it.
    let y_late = row("y", "a1", "2025-06-11", 10, 3_000_000, 1, 3, 20_000);
    let y_first = row("y", "a3", "2025-06-13", 11, 2_000_000, 0, 9_000, 1_000);
    // z: a producer retry inside one batch (offsets 6 and 7): the lower offset counts.
    let z1 = row("z", "a1", "2025-06-10", 12, 1_500_000, 0, 6, 2);
    let z2 = row("z", "a1", "2025-06-10", 12, 1_500_000, 0, 7, 2);
    let other = row("w", "a2", "2025-06-11", 8, 4_000_000, 1, 4, 21_000);

    let o = sink
        .insert(&[x1.clone(), z1.clone(), z2.clone()])
        .await
        .unwrap();
    assert_eq!((o.written, o.duplicates), (3, 1));
    all.extend([x1, z1, z2]);
    let o = sink.insert(std::slice::from_ref(&x2)).await.unwrap();
    assert_eq!(
        (o.written, o.duplicates),
        (1, 1),
        "the re-send does not count"
    );
    all.push(x2);
    let o = sink.insert(&[y_late.clone(), other.clone()]).await.unwrap();
    assert_eq!(o.duplicates, 0);
    all.extend([y_late, other]);
    assert_converged(&cfg, &all, "before y's earlier copy").await;
    let o = sink.insert(std::slice::from_ref(&y_first)).await.unwrap();
    assert_eq!(
        (o.written, o.duplicates, o.blocks),
        (1, 0, 2),
        "y's earlier copy counts; its block and the dethroned copy's are recomputed"
    );
    all.push(y_first);
    assert_converged(&cfg, &all, "after y's earlier copy").await;

    // By hand: a1 has x (5) and z (1.5) on 06-10; a2 has w (4) on 06-11; a3 has y (2) on
    // 06-13; nothing on 06-12, and a1 nothing on 06-11.
    let (_, daily) = rollups(&cfg).await;
    let d = |a: &str, s: &str, n: u64, c: i64| ((a.to_owned(), day(s)), (n, Decimal::new(c, 1)));
    assert_eq!(
        daily,
        BTreeMap::from([
            d("a1", "2025-06-10", 2, 65),
            d("a2", "2025-06-11", 1, 40),
            d("a3", "2025-06-13", 1, 20),
        ])
    );
    // Reports list no day for a copy that does not count: a2's only event on 06-12 is x's
    // re-send.
    let q = UsageQueries::new(&cfg);
    let june = DateRange::new(day("2025-06-01"), day("2025-06-30")).unwrap();
    let a2_days: Vec<(NaiveDate, u64)> = q
        .day_totals("a2", &june)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.day, d.events))
        .collect();
    assert_eq!(a2_days, [(day("2025-06-11"), 1)]);
    // Replaying everything in reverse order changes nothing.
    for r in all.iter().rev() {
        sink.insert(std::slice::from_ref(r)).await.unwrap();
    }
    assert_eq!(rollups(&cfg).await.1, daily);
    drop_database(&cfg).await;
}
