//! Every query of docs/analytics.md runs against the real ClickHouse (TALLY_TEST_CLICKHOUSE_URL)
//! on a known data set, and gives the figures `tally::analytics::UsageQueries` computes from
//! the same rows; the repair steps (check, rebuild a month) leave the roll-ups exact.

mod common;

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rust_decimal::{Decimal, RoundingStrategy};
use rust_decimal_macros::dec;

use common::analytics::{
    clickhouse_config, day, doc_examples, docs_dataset, rows_of, tsv, DOC_ACCOUNT,
};
use tally::analytics::queries::{Cycle, DateRange, Projection, UsageQueries};
use tally::analytics::{migrate, AnalyticsSink};

fn dec(s: &str) -> Decimal {
    s.parse().unwrap_or_else(|_| panic!("not a decimal: {s:?}"))
}

fn cut(v: Decimal, places: u32) -> Decimal {
    v.round_dp_with_strategy(places, RoundingStrategy::ToZero)
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn every_documented_query_runs_and_agrees_with_the_api() {
    let cfg = clickhouse_config("docs");
    migrate(&cfg)
        .await
        .expect("ClickHouse is up (run scripts/services up)");
    let sink = AnalyticsSink::new(&cfg);
    let rows = docs_dataset();
    // In two batches, the second overlapping the first (a replay): counted once.
    let half = rows.len() / 2;
    sink.insert(&rows[..half + 10]).await.unwrap();
    let outcome = sink.insert(&rows[half..]).await.unwrap();
    assert_eq!(
        (outcome.written, outcome.duplicates),
        (rows.len() - half, 0)
    );

    let client = clickhouse::Client::default()
        .with_url(&cfg.url)
        .with_database(&cfg.database);
    let examples = doc_examples();
    let names: Vec<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "daily_series",
            "cycle",
            "peak_days",
            "busiest_hours",
            "weekly_trend",
            "moving_average",
            "projection",
            "counts",
            "by_model",
            "check_rollups",
            "rebuild_month"
        ]
    );
    let mut results: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for e in &examples {
        let mut last = String::new();
        for statement in &e.statements {
            last = tsv(&client, statement)
                .await
                .unwrap_or_else(|err| panic!("example {}: {err}\n{statement}", e.name));
        }
        results.insert(e.name.clone(), rows_of(&last));
    }

    let q = UsageQueries::new(&cfg);
    let today = day("2025-06-20");
    let range = DateRange::new(day("2025-06-01"), today).unwrap();
    let cycle = Cycle {
        start: day("2025-06-01"),
        reset: day("2025-07-01"),
        allowance: Some(dec!(1000)),
    };

    // Daily series: one row per day and kind/model, zeros on empty days.
    let daily = q.daily(DOC_ACCOUNT, &range).await.unwrap();
    let mut per_day: BTreeMap<NaiveDate, (Decimal, u64)> = BTreeMap::new();
    for r in &results["daily_series"] {
        let e = per_day.entry(day(&r[0])).or_default();
        e.0 += dec(&r[3]);
        e.1 += r[4].parse::<u64>().unwrap();
    }
    assert_eq!(per_day.len(), 20);
    for d in &daily {
        assert_eq!(per_day[&d.day], (d.credits, d.events), "{}", d.day);
    }
    assert!(
        daily.iter().any(|d| d.events == 0),
        "the data set has empty days"
    );

    // This cycle.
    let c = q.cycle(DOC_ACCOUNT, &cycle, today).await.unwrap();
    let r = &results["cycle"][0];
    assert_eq!(dec(&r[0]), c.used);
    assert_eq!(dec(&r[2]), c.allowance_left.unwrap());
    assert_eq!(cut(dec(&r[3]), 2), c.allowance_used_percent.unwrap());
    assert_eq!(r[4].parse::<u32>().unwrap(), c.days_elapsed);
    assert_eq!(dec(&r[5]), c.average_daily);
    assert_eq!(r[6].parse::<u32>().unwrap(), c.days_until_reset);

    // Peak days and busiest hours.
    let peaks = q.peak_days(DOC_ACCOUNT, &range, 5).await.unwrap();
    let got: Vec<(NaiveDate, Decimal, u64)> = results["peak_days"]
        .iter()
        .map(|r| (day(&r[0]), dec(&r[1]), r[2].parse().unwrap()))
        .collect();
    let want: Vec<_> = peaks.iter().map(|p| (p.day, p.credits, p.events)).collect();
    assert_eq!(got, want);
    let hours = q.busiest_hours(DOC_ACCOUNT, &range, 5).await.unwrap();
    let got: Vec<(u8, u64, Decimal)> = results["busiest_hours"]
        .iter()
        .map(|r| (r[0].parse().unwrap(), r[1].parse().unwrap(), dec(&r[2])))
        .collect();
    let want: Vec<_> = hours
        .iter()
        .map(|h| (h.hour_of_day, h.events, h.credits))
        .collect();
    assert_eq!(got, want);

    // Trend: the weeks the query lists are the API's, with the same change.
    let trend = q.trend(DOC_ACCOUNT, today).await.unwrap();
    let weeks = &results["weekly_trend"];
    assert!(weeks.len() >= 12, "{weeks:?}");
    for r in weeks {
        let w = trend
            .weeks
            .iter()
            .find(|w| w.week_start == day(&r[0]))
            .unwrap_or_else(|| panic!("week {r:?} not in the API's trend"));
        assert_eq!(dec(&r[1]), w.credits, "{r:?}");
        assert_eq!(dec(&r[3]), w.change, "{r:?}");
        let pct = (r[4] != "\\N").then(|| cut(dec(&r[4]), 2));
        assert_eq!(pct, w.change_percent, "{r:?}");
    }
    let listed = weeks.len();
    let nonzero = trend
        .weeks
        .iter()
        .filter(|w| !w.credits.is_zero() || !(w.credits - w.change).is_zero())
        .count();
    assert_eq!(listed, nonzero);
    let averages: BTreeMap<NaiveDate, Decimal> = results["moving_average"]
        .iter()
        .map(|r| (day(&r[0]), dec(&r[2])))
        .collect();
    for d in trend.days.iter().filter(|d| d.day >= range.from) {
        assert_eq!(
            averages.get(&d.day).copied().unwrap_or_default(),
            d.moving_average_7d,
            "{}",
            d.day
        );
    }

    // Projection with a spendable balance of 500.
    let p = Projection::compute(&cycle, today, c.used, Some(dec!(500)));
    let r = &results["projection"][0];
    assert_eq!(dec(&r[0]), p.used_so_far);
    assert_eq!(dec(&r[2]), p.pace_per_day);
    assert_eq!(r[3].parse::<u32>().unwrap(), p.days_left);
    assert_eq!(dec(&r[4]), p.projected_total);
    assert_eq!(Some(day(&r[6])), p.runs_out_on);
    assert_eq!(
        q.projection(DOC_ACCOUNT, &cycle, today, Some(dec!(500)))
            .await
            .unwrap(),
        p
    );

    // Counts.
    let n = q.counts(DOC_ACCOUNT, &range).await.unwrap();
    let r = &results["counts"][0];
    let ints: Vec<u64> = [0, 1, 2, 3, 6]
        .iter()
        .map(|&i| r[i].parse().unwrap())
        .collect();
    assert_eq!(
        ints,
        [n.calls, n.answered_calls, n.chats, n.ai_responses, n.events]
    );
    assert_eq!(dec(&r[4]), n.call_minutes);
    assert_eq!(dec(&r[5]), n.instance_hours);
    assert_eq!(dec(&r[7]), n.credits);
    assert!(n.calls > 0 && n.chats > 0 && n.chats < n.ai_responses);
    let by_model: Decimal = results["by_model"].iter().map(|r| dec(&r[2])).sum();
    assert_eq!(by_model, n.credits);

    // The check agrees, before and after the rebuild; the reports are unchanged by it.
    let r = &results["check_rollups"];
    assert_eq!(r.len(), 2);
    assert_eq!(r[0][1..], r[1][1..], "{r:?}");
    assert_eq!(r[1][0], "usage_daily");
    let check = &examples
        .iter()
        .find(|e| e.name == "check_rollups")
        .unwrap()
        .statements[0];
    let after = rows_of(&tsv(&client, check).await.unwrap());
    assert_eq!(after, results["check_rollups"]);
    assert_eq!(q.daily(DOC_ACCOUNT, &range).await.unwrap(), daily);
    assert_eq!(q.counts(DOC_ACCOUNT, &range).await.unwrap(), n);

    clickhouse::Client::default()
        .with_url(&cfg.url)
        .query(&format!("DROP DATABASE IF EXISTS {}", cfg.database))
        .execute()
        .await
        .unwrap();
}
