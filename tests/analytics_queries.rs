//! The usage reports end to end: a known stream of ~100 days of usage (every kind, two
//! accounts, events sent out of order) goes through the real pipelines (Kafka -> analytics
//! loop -> ClickHouse roll-ups; the ledger for the spendable balance), with a producer
//! duplicate inside a batch, another across batches, late events for days already reported, and
//! a full replay of the topics by the analytics consumer after its positions are lost. Every
//! query's result is compared with values computed here from the events themselves, by hand
//! from tests/fixtures/prices.toml; `tally report --json` must print the same report.
//!
//! The stream is sent once ([`fixture`]), and each query is a named case reading it.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, SecondsFormat, Timelike, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rust_decimal::{Decimal, RoundingStrategy};
use rust_decimal_macros::dec;
use serde_json::json;

use common::{ev, test_config, TestEnv};
use tally::analytics::queries::{
    Cycle, DateRange, DayTotal, HourTotal, ReportRequest, UsageQueries, DEFAULT_TOP,
};

const ACCOUNT: &str = "acct-q";
const OTHER: &str = "acct-z";

/// What an event is, in the terms the test prices it in.
#[derive(Debug, Clone)]
enum What {
    Call {
        call_id: String,
        inbound: bool,
        answered: bool,
        talk_seconds: u32,
        hold_seconds: u32,
        model: &'static str,
    },
    Chat {
        conversation_id: String,
        premium: bool,
        responses: u32,
    },
    Instance {
        seconds: u32,
    },
    Analysis {
        quantity: &'static str,
    },
}

/// One usage event and what it must cost (tests/fixtures/prices.toml, by hand).
#[derive(Debug, Clone)]
struct Ev {
    id: String,
    account: &'static str,
    time: DateTime<Utc>,
    what: What,
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Ev {
    fn kind(&self) -> &'static str {
        match self.what {
            What::Call { .. } => "call",
            What::Chat { .. } => "chat_response",
            What::Instance { .. } => "instance_hours",
            What::Analysis { .. } => "ai_analysis",
        }
    }

    fn model(&self) -> &'static str {
        match self.what {
            What::Call { model, .. } => model,
            What::Chat { .. } => "gpt-4o-mini",
            What::Instance { .. } => "",
            What::Analysis { .. } => "gemini-3-flash",
        }
    }

    /// (credits, quantity, billable seconds)
    fn priced(&self) -> (Decimal, Decimal, u64) {
        let minutes_up = |s: u32| u64::from(s).div_ceil(60);
        match &self.what {
            What::Call {
                answered: false, ..
            } => (Decimal::ZERO, Decimal::ZERO, 0),
            // Outbound: the built-in free rule (talk time measured, nothing billed).
            What::Call {
                inbound: false,
                talk_seconds,
                ..
            } => (Decimal::ZERO, Decimal::from(*talk_seconds), 0),
            // call.in: 1 credit per started minute.
            What::Call { talk_seconds, .. } => (
                Decimal::from(minutes_up(*talk_seconds)),
                Decimal::from(*talk_seconds),
                minutes_up(*talk_seconds) * 60,
            ),
            // chat.std 1, chat.premium 1.5 per response.
            What::Chat {
                premium, responses, ..
            } => {
                let each = if *premium { dec!(1.5) } else { dec!(1) };
                (
                    each * Decimal::from(*responses),
                    Decimal::from(*responses),
                    0,
                )
            }
            // gpu.a10: 10 credits per started hour.
            What::Instance { seconds } => {
                let hours = u64::from(*seconds).div_ceil(3600);
                (
                    Decimal::from(hours * 10),
                    Decimal::from(*seconds),
                    hours * 3600,
                )
            }
            // analysis: 0.25 per started unit (the default increment is one unit).
            What::Analysis { quantity } => {
                let q: Decimal = quantity.parse().unwrap();
                (q.ceil() * dec!(0.25), q, 0)
            }
        }
    }

    fn credits(&self) -> Decimal {
        self.priced().0
    }

    fn day(&self) -> NaiveDate {
        self.time.date_naive()
    }

    fn topic(&self, t: &tally::config::Topics) -> String {
        match self.what {
            What::Call { .. } => t.calls.clone(),
            What::Chat { .. } => t.chat_responses.clone(),
            What::Instance { .. } => t.instance_hours.clone(),
            What::Analysis { .. } => t.metered.clone(),
        }
    }

    fn payload(&self) -> Vec<u8> {
        let t = self.time;
        let (ty, source, data) = match &self.what {
            What::Call {
                call_id,
                inbound,
                answered,
                talk_seconds,
                hold_seconds,
                model,
            } => {
                let answered_at =
                    t - chrono::Duration::seconds(i64::from(talk_seconds + hold_seconds));
                let started = answered_at - chrono::Duration::seconds(7);
                (
                    "tally.usage.call.v1",
                    "//voice.test/calls",
                    json!({"call_id": call_id,
                           "direction": if *inbound { "inbound" } else { "outbound" },
                           "channel": "phone", "model": model,
                           "started_at": ts(started),
                           "answered_at": answered.then(|| ts(answered_at)),
                           "ended_at": ts(t),
                           "hold_seconds": if *answered { *hold_seconds } else { 0 }}),
                )
            }
            What::Chat {
                conversation_id,
                premium,
                responses,
            } => (
                "tally.usage.chat_response.v1",
                "//chat.test",
                json!({"conversation_id": conversation_id, "model": "gpt-4o-mini",
                       "voice_tier": if *premium { "premium" } else { "standard" },
                       "channel": "text", "responses": responses}),
            ),
            What::Instance { seconds } => (
                "tally.usage.instance_hours.v1",
                "//compute.test",
                json!({"instance_id": format!("i-{}", self.id), "instance_type": "gpu.a10",
                       "started_at": ts(t - chrono::Duration::seconds(i64::from(*seconds))),
                       "ended_at": ts(t)}),
            ),
            What::Analysis { quantity } => (
                "tally.usage.metered.v1",
                "//analysis.test",
                json!({"kind": "ai_analysis", "quantity": quantity,
                       "attributes": {"model": "gemini-3-flash"}}),
            ),
        };
        ev::envelope(ty, source, &self.id, self.account, &ts(t), data)
    }
}

/// ~100 days of usage for two accounts, some days empty; ids e-0, e-1, ...
fn generate(now: DateTime<Utc>, first_day: NaiveDate, last_day: NaiveDate) -> Vec<Ev> {
    let mut rng = SmallRng::seed_from_u64(5);
    let mut out = Vec::new();
    let mut n = 0;
    let mut day = first_day;
    while day <= last_day {
        for account in [ACCOUNT, OTHER] {
            let per_day = if account == ACCOUNT {
                rng.gen_range(0..5)
            } else {
                rng.gen_range(0..2)
            };
            for _ in 0..per_day {
                let time = day.and_hms_opt(0, 0, 0).unwrap().and_utc()
                    + chrono::Duration::seconds(rng.gen_range(0..86_400));
                if time > now - chrono::Duration::seconds(30) {
                    continue;
                }
                out.push(Ev {
                    id: format!("e-{n}"),
                    account,
                    time,
                    what: random_what(&mut rng, n),
                });
                n += 1;
            }
        }
        day = day.succ_opt().unwrap();
    }
    out
}

fn random_what(rng: &mut SmallRng, n: usize) -> What {
    match rng.gen_range(0..10) {
        0..=3 => What::Call {
            call_id: format!("call-{n}"),
            inbound: rng.gen_range(0..5) > 0,
            answered: rng.gen_range(0..6) > 0,
            talk_seconds: rng.gen_range(1..900),
            hold_seconds: rng.gen_range(0..60),
            model: if rng.gen_bool(0.5) {
                "voice-a"
            } else {
                "voice-b"
            },
        },
        4..=6 => What::Chat {
            // Several events per conversation: distinct conversations < chat events.
            conversation_id: format!("conv-{}", n / 3),
            premium: rng.gen_bool(0.3),
            responses: rng.gen_range(1..6),
        },
        7 => What::Instance {
            seconds: rng.gen_range(60..4 * 3600),
        },
        _ => What::Analysis {
            quantity: ["4", "2.5", "0.000004", "1.2", "0.01"][rng.gen_range(0..5)],
        },
    }
}

/// Micro-credit truncation toward zero, as the reports define divisions.
fn cut(v: Decimal, places: u32) -> Decimal {
    v.round_dp_with_strategy(places, RoundingStrategy::ToZero)
}

/// The figures every query must return, computed from the (deduplicated) events.
struct Model<'a> {
    events: Vec<&'a Ev>,
}

impl<'a> Model<'a> {
    fn new(all: &'a [Ev], account: &str) -> Model<'a> {
        let mut seen = HashSet::new();
        Model {
            events: all
                .iter()
                .filter(|e| e.account == account && seen.insert(e.id.clone()))
                .collect(),
        }
    }

    fn in_range(&self, from: NaiveDate, to: NaiveDate) -> impl Iterator<Item = &&'a Ev> {
        self.events
            .iter()
            .filter(move |e| e.day() >= from && e.day() <= to)
    }

    fn used(&self, from: NaiveDate, to: NaiveDate) -> Decimal {
        self.in_range(from, to).map(|e| e.credits()).sum()
    }

    fn day_credits(&self) -> BTreeMap<NaiveDate, Decimal> {
        let mut m = BTreeMap::new();
        for e in &self.events {
            *m.entry(e.day()).or_default() += e.credits();
        }
        m
    }
}

fn monday_of(d: NaiveDate) -> NaiveDate {
    let mut d = d;
    while d.weekday() != chrono::Weekday::Mon {
        d = d.pred_opt().unwrap();
    }
    d
}

async fn run_analytics_until_caught_up(
    env: &TestEnv,
) -> tally::pipeline::analytics::AnalyticsStats {
    let tally = common::RunningTally::start_role(env, tally::app::Role::Analytics);
    env.wait_analytics_caught_up(Duration::from_secs(90)).await;
    tally
        .stop_report()
        .await
        .analytics
        .expect("the analytics pipeline ran")
}

/// The stream every case reads, sent once through the real pipelines, with the analytics
/// loop's statistics for its first run and for the replay from the beginning.
struct Fixture {
    env: TestEnv,
    events: Vec<Ev>,
    today: NaiveDate,
    first_day: NaiveDate,
    first_run: tally::pipeline::analytics::AnalyticsStats,
    replay: tally::pipeline::analytics::AnalyticsStats,
}

/// The fixture, built once by the first case that asks ([`common::set_up_once`]).
fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Option<Fixture>> = std::sync::OnceLock::new();
    common::set_up_once(&FIXTURE, || async { (set_up().await, ()) })
}

/// Sends the stream (shuffled, with a producer retry in one batch and one across batches,
/// then late events, today's and a plan for the other account) through the ledger and the
/// analytics loop, then replays it from the beginning in analytics.
async fn set_up() -> Fixture {
    let mut cfg = test_config("aq");
    // Events up to ~100 days old are admitted (the trend covers 3 months).
    cfg.pipeline.dedupe_window_days = 120;
    let env = TestEnv::with_config(cfg).await;
    let topics = env.cfg.kafka.topics.clone();
    let now = Utc::now();
    let today = now.date_naive();
    let first_day = today - chrono::Days::new(100);

    // The stream: everything up to 3 days ago, then late events and today's.
    let mut events = generate(now, first_day, today - chrono::Days::new(3));
    let n = events.len();
    let late_at = |days: u64, hour: u32| {
        (today - chrono::Days::new(days))
            .and_hms_opt(hour, 17, 0)
            .unwrap()
            .and_utc()
    };
    let mut late = [
        // Late: days that were already reported.
        Ev {
            id: format!("e-{n}"),
            account: ACCOUNT,
            time: late_at(40, 3),
            what: What::Instance { seconds: 5400 },
        },
        Ev {
            id: format!("e-{}", n + 1),
            account: ACCOUNT,
            time: late_at(10, 23),
            what: What::Chat {
                conversation_id: "conv-late".into(),
                premium: true,
                responses: 4,
            },
        },
        Ev {
            id: format!("e-{}", n + 2),
            account: ACCOUNT,
            time: late_at(2, 14),
            what: What::Analysis {
                quantity: "0.000004",
            },
        },
        // Today's, a minute ago (lands on yesterday right after midnight: the model agrees).
        Ev {
            id: format!("e-{}", n + 3),
            account: ACCOUNT,
            time: now - chrono::Duration::seconds(60),
            what: What::Call {
                call_id: "call-today".into(),
                inbound: true,
                answered: true,
                talk_seconds: 61,
                hold_seconds: 5,
                model: "voice-a",
            },
        },
    ];
    // Out of order: the late ones come newest first.
    late.reverse();
    events.extend(late.iter().cloned());
    assert!(n > 150, "{n} events");
    // Every generated event is admitted and priced (the stream has no bad input).
    for e in &events {
        let record = tally::kafka::Record {
            topic: std::sync::Arc::from(e.topic(&topics).as_str()),
            partition: 0,
            offset: 0,
            key: None,
            payload: e.payload(),
            headers: Vec::new(),
            timestamp_ms: None,
        };
        let admission = tally::pipeline::limits(&env.cfg.pipeline).1;
        if let Err(r) = tally::pipeline::prepare(&record, &env.prices, now, &admission) {
            panic!("{e:?} is rejected: {r}");
        }
    }

    let tally = common::RunningTally::start(&env);

    // A package that never expires, older than any usage: the spendable balance.
    let grant_time = ts(first_day.and_hms_opt(0, 0, 1).unwrap().and_utc());
    env.send(&[(
        topics.grants.clone(),
        ACCOUNT.into(),
        ev::grant("g-q", ACCOUNT, &grant_time, "pkg-q", "package", "100000"),
    )])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;

    // Phase 1: the main stream, shuffled (out of order), with a producer retry right after
    // its original (same batch).
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SmallRng::seed_from_u64(9);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let mut phase1 = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let e = &events[i];
        let record = (e.topic(&topics), e.account.to_string(), e.payload());
        if k == 7 {
            phase1.push(record.clone());
        }
        phase1.push(record);
    }
    env.send(&phase1).await;
    env.wait_ledger_caught_up(Duration::from_secs(90)).await;
    env.wait_analytics_caught_up(Duration::from_secs(90)).await;

    // Phase 2: late events, today's, and a producer retry of an event stored long ago.
    let retried = &events[order[20]];
    let mut phase2: Vec<_> = late
        .iter()
        .map(|e| (e.topic(&topics), e.account.to_string(), e.payload()))
        .collect();
    phase2.insert(
        2,
        (
            retried.topic(&topics),
            retried.account.to_string(),
            retried.payload(),
        ),
    );
    // A plan for the other account: `tally report` then uses its billing cycle.
    phase2.push((
        topics.plans.clone(),
        OTHER.into(),
        ev::envelope(
            "tally.account.plan.v1",
            "//billing.test",
            "plan-z",
            OTHER,
            &ts(now - chrono::Duration::days(2)),
            json!({"plan_id": "pro", "monthly_allowance": "500", "billing_day": 15,
                   "overage_policy": "bill_overage"}),
        ),
    ));
    env.send(&phase2).await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    env.wait_analytics_caught_up(Duration::from_secs(60)).await;
    let first_run = tally
        .stop_report()
        .await
        .analytics
        .expect("the analytics pipeline ran");

    // Replay: the analytics positions are lost, so the consumer reads every topic again from
    // the beginning. The rows are written again and collapse; nothing counts twice.
    let ch = clickhouse::Client::default()
        .with_url(&env.cfg.clickhouse.url)
        .with_database(&env.cfg.clickhouse.database);
    for table in ["consumer_offsets"] {
        ch.query(&format!("TRUNCATE TABLE {table}"))
            .execute()
            .await
            .unwrap();
    }
    let replay = run_analytics_until_caught_up(&env).await;

    Fixture {
        env,
        events,
        today,
        first_day,
        first_run,
        replay,
    }
}

/// Every record is a row, in the first run and in the replay from the beginning (two are
/// producer retries, which do not count).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_runs_count_each_event_once() {
    let f = fixture();
    for run in [&f.first_run, &f.replay] {
        assert_eq!(run.rows, f.events.len() as u64 + 2, "{run:?}");
        assert_eq!(run.duplicates, 2, "{run:?}");
    }
}

/// The roll-ups agree with the counting events, for both accounts.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_agree_with_the_counting_events() {
    let f = fixture();
    let env = &f.env;
    let events = &f.events;
    let today = f.today;
    let first_day = f.first_day;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // The roll-ups agree with the counting events.
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    for (account, m) in [(ACCOUNT, &model), (OTHER, &Model::new(events, OTHER))] {
        let expected = (m.events.len() as u64, m.used(first_day, today));
        assert_eq!(sink.totals_by_account(account).await.unwrap(), expected);
        assert_eq!(
            q.total(account, &range).await.unwrap(),
            (expected.1, expected.0)
        );
    }
}

/// Daily series: every day, zero when empty, split by kind and model.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_series_has_every_day_by_kind_and_model() {
    let f = fixture();
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // Daily series: every day, zero when empty, split by kind and model.
    let daily = q.daily(ACCOUNT, &range).await.unwrap();
    assert_eq!(daily.len() as u32, range.len_days());
    let mut empty_days = 0;
    for (d, day) in daily.iter().zip(range.days()) {
        assert_eq!(d.day, day);
        let mut split: BTreeMap<(&str, &str), (Decimal, Decimal, u64, u64)> = BTreeMap::new();
        for e in model.in_range(day, day) {
            let (c, qty, bs) = e.priced();
            let s = split.entry((e.kind(), e.model())).or_default();
            s.0 += c;
            s.1 += qty;
            s.2 += bs;
            s.3 += 1;
        }
        let got: BTreeMap<(&str, &str), (Decimal, Decimal, u64, u64)> = d
            .by_kind_model
            .iter()
            .map(|u| {
                (
                    (u.kind.as_str(), u.model.as_str()),
                    (u.credits, u.quantity, u.billable_seconds, u.events),
                )
            })
            .collect();
        assert_eq!(got, split, "{day}");
        assert_eq!(d.credits, model.used(day, day), "{day}");
        assert_eq!(d.events, model.in_range(day, day).count() as u64);
        empty_days += usize::from(d.events == 0);
    }
    assert!(empty_days > 5, "the stream has empty days: {empty_days}");
}

/// This cycle: the calendar month, and a plan-like cycle with an allowance.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_of_the_month_and_of_a_plan() {
    let f = fixture();
    let today = f.today;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let month = Cycle::calendar_month(f.today);
    let elapsed = (f.today - month.start).num_days() + 1;
    let next_month = month.start.checked_add_months(Months::new(1)).unwrap();
    // This cycle: the calendar month, and a plan-like cycle with an allowance.
    let c = q.cycle(ACCOUNT, &month, today).await.unwrap();
    let used = model.used(month.start, today);
    assert_eq!(c.used, used);
    assert_eq!(c.days_elapsed as i64, elapsed);
    assert_eq!(c.average_daily, cut(used / Decimal::from(elapsed), 6));
    assert_eq!(c.days_until_reset as i64, (next_month - today).num_days());
    assert_eq!(c.allowance, None);
    let plan = Cycle {
        start: today - chrono::Days::new(20),
        reset: today + chrono::Days::new(10),
        allowance: Some(dec!(150)),
    };
    let c = q.cycle(ACCOUNT, &plan, today).await.unwrap();
    let used = model.used(plan.start, today);
    assert_eq!(c.used, used);
    assert_eq!(c.allowance_left, Some(dec!(150) - used));
    assert_eq!(
        c.allowance_used_percent,
        Some(cut(used * dec!(100) / dec!(150), 2))
    );
    assert_eq!(c.average_daily, cut(used / dec!(21), 6));
    assert_eq!(c.days_until_reset, 10);
}

/// Peak days: most credits first, ties by the earlier day.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_days_most_credits_first() {
    let f = fixture();
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // Peak days: most credits first, ties by the earlier day.
    let mut by_day: Vec<(NaiveDate, Decimal, u64)> = range
        .days()
        .map(|d| (d, model.used(d, d), model.in_range(d, d).count() as u64))
        .filter(|t| t.2 > 0)
        .collect();
    by_day.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let expected_peaks: Vec<DayTotal> = by_day
        .iter()
        .take(DEFAULT_TOP as usize)
        .map(|&(day, credits, events)| DayTotal {
            day,
            credits,
            events,
        })
        .collect();
    assert_eq!(
        q.peak_days(ACCOUNT, &range, DEFAULT_TOP).await.unwrap(),
        expected_peaks
    );
}

/// Busiest hours of the day: most events, then credits, then the earlier hour.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busiest_hours_most_events_first() {
    let f = fixture();
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // Busiest hours of the day: most events, then credits, then the earlier hour.
    let mut hours: BTreeMap<u8, (u64, Decimal)> = BTreeMap::new();
    for e in &model.events {
        let h = hours.entry(e.time.hour() as u8).or_default();
        h.0 += 1;
        h.1 += e.credits();
    }
    let mut hours: Vec<(u8, u64, Decimal)> =
        hours.into_iter().map(|(h, (n, c))| (h, n, c)).collect();
    hours.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    let expected_hours: Vec<HourTotal> = hours
        .iter()
        .take(8)
        .map(|&(hour_of_day, events, credits)| HourTotal {
            hour_of_day,
            credits,
            events,
        })
        .collect();
    assert_eq!(
        q.busiest_hours(ACCOUNT, &range, 8).await.unwrap(),
        expected_hours
    );
}

/// Trend: weeks from the Monday of the week 3 months ago, and the daily 7-day average.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trend_by_week_and_moving_average() {
    let f = fixture();
    let today = f.today;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    // Trend: weeks from the Monday of the week 3 months ago.
    let trend = q.trend(ACCOUNT, today).await.unwrap();
    let start = monday_of(today.checked_sub_months(Months::new(3)).unwrap());
    assert_eq!((trend.from, trend.to), (start, today));
    let credits_on = model.day_credits();
    let on = |d: NaiveDate| credits_on.get(&d).copied().unwrap_or_default();
    let week_sum = |monday: NaiveDate| -> Decimal {
        (0..7)
            .map(|k| monday + chrono::Days::new(k))
            .filter(|d| *d <= today)
            .map(on)
            .sum()
    };
    let mut monday = start;
    let mut weeks = 0;
    while monday <= today {
        let w = trend.weeks[weeks];
        let (this, prev) = (week_sum(monday), week_sum(monday - chrono::Days::new(7)));
        assert_eq!(w.week_start, monday);
        assert_eq!(w.credits, this, "{monday}");
        assert_eq!(w.change, this - prev, "{monday}");
        let pct = (prev != Decimal::ZERO).then(|| cut((this - prev) * dec!(100) / prev, 2));
        assert_eq!(w.change_percent, pct, "{monday}");
        assert_eq!(w.complete, monday + chrono::Days::new(6) <= today);
        monday = monday + chrono::Days::new(7);
        weeks += 1;
    }
    assert_eq!(trend.weeks.len(), weeks);
    assert_eq!(trend.days.len() as i64, (today - start).num_days() + 1);
    for d in &trend.days {
        let window: Decimal = (0..7).map(|k| on(d.day - chrono::Days::new(k))).sum();
        assert_eq!(d.credits, on(d.day));
        assert_eq!(d.moving_average_7d, cut(window / dec!(7), 6), "{}", d.day);
    }
}

/// Projection for the month, with the ledger's spendable balance.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_with_the_ledgers_balance() {
    let f = fixture();
    let env = &f.env;
    let today = f.today;
    let first_day = f.first_day;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let month = Cycle::calendar_month(f.today);
    let elapsed = (f.today - month.start).num_days() + 1;
    let next_month = month.start.checked_add_months(Months::new(1)).unwrap();
    // Projection for the month, with the ledger's spendable balance.
    let store = env.store().await;
    let spendable = store.balance(ACCOUNT).await.unwrap().unwrap().spendable;
    assert_eq!(
        spendable,
        dec!(100000) - model.used(first_day, today),
        "the ledger debited the same events"
    );
    let p = q
        .projection(ACCOUNT, &month, today, Some(spendable))
        .await
        .unwrap();
    let used = model.used(month.start, today);
    let pace = cut(used / Decimal::from(elapsed), 6);
    let days_left = (next_month - today).num_days() - 1;
    assert_eq!(p.used_so_far, used);
    assert_eq!(p.pace_per_day, pace);
    assert_eq!(p.days_left as i64, days_left);
    assert_eq!(p.projected_total, used + pace * Decimal::from(days_left));
    let runs_out = (pace > Decimal::ZERO).then(|| {
        use rust_decimal::prelude::ToPrimitive;
        today + chrono::Days::new((spendable / pace).ceil().to_u64().unwrap())
    });
    assert_eq!(p.runs_out_on, runs_out);
    assert_eq!(
        p.runs_out_before_reset,
        runs_out.is_some_and(|d| d < next_month)
    );
    // A small balance runs out within the month.
    let p = q
        .projection(ACCOUNT, &month, today, Some(pace * dec!(2.5)))
        .await
        .unwrap();
    if pace > Decimal::ZERO {
        assert_eq!(p.runs_out_on, Some(today + chrono::Days::new(3)));
    }
}

/// Counts over the whole range.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_over_the_whole_range() {
    let f = fixture();
    let today = f.today;
    let first_day = f.first_day;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let model = Model::new(&f.events, ACCOUNT);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // Counts over the whole range.
    let counts = q.counts(ACCOUNT, &range).await.unwrap();
    let mut calls = BTreeSet::new();
    let mut conversations = BTreeSet::new();
    let (mut answered, mut responses) = (0u64, 0u64);
    let (mut call_seconds, mut instance_seconds) = (Decimal::ZERO, Decimal::ZERO);
    let (mut billable_call_seconds, mut billable_instance_seconds) = (0u64, 0u64);
    for e in &model.events {
        let (_, qty, bs) = e.priced();
        match &e.what {
            What::Call {
                call_id,
                answered: a,
                ..
            } => {
                calls.insert(call_id.clone());
                answered += u64::from(*a);
                call_seconds += qty;
                billable_call_seconds += bs;
            }
            What::Chat {
                conversation_id,
                responses: r,
                ..
            } => {
                conversations.insert(conversation_id.clone());
                responses += u64::from(*r);
            }
            What::Instance { .. } => {
                instance_seconds += qty;
                billable_instance_seconds += bs;
            }
            What::Analysis { .. } => {}
        }
    }
    assert_eq!(counts.events, model.events.len() as u64);
    assert_eq!(counts.credits, model.used(first_day, today));
    assert_eq!(counts.calls, calls.len() as u64);
    assert_eq!(counts.answered_calls, answered);
    assert_eq!(counts.call_seconds, call_seconds);
    assert_eq!(counts.call_minutes, cut(call_seconds / dec!(60), 6));
    assert_eq!(counts.billable_call_seconds, billable_call_seconds);
    assert_eq!(counts.chats, conversations.len() as u64);
    assert!(
        counts.chats
            < model
                .events
                .iter()
                .filter(|e| e.kind() == "chat_response")
                .count() as u64
    );
    assert_eq!(counts.ai_responses, responses);
    assert_eq!(counts.instance_seconds, instance_seconds);
    assert_eq!(counts.instance_hours, cut(instance_seconds / dec!(3600), 6));
    assert_eq!(
        counts.billable_instance_hours,
        cut(Decimal::from(billable_instance_seconds) / dec!(3600), 6)
    );
    let kinds: Vec<&str> = counts.by_kind.iter().map(|k| k.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["ai_analysis", "call", "chat_response", "instance_hours"]
    );
}

/// The whole report is the pieces; `tally report --json` prints it.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_is_its_pieces_and_the_cli_prints_it() {
    let f = fixture();
    let env = &f.env;
    let today = f.today;
    let first_day = f.first_day;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    let month = Cycle::calendar_month(f.today);
    let store = env.store().await;
    let spendable = store.balance(ACCOUNT).await.unwrap().unwrap().spendable;
    let trend = q.trend(ACCOUNT, today).await.unwrap();
    let counts = q.counts(ACCOUNT, &range).await.unwrap();
    // The whole report is the pieces above; `tally report --json` prints it.
    let request = ReportRequest::for_cycle(month, today, Some(spendable)).unwrap();
    let report = q.report(ACCOUNT, &request).await.unwrap();
    assert_eq!(report.range, DateRange::new(month.start, today).unwrap());
    assert_eq!(report.cycle, q.cycle(ACCOUNT, &month, today).await.unwrap());
    assert_eq!(
        report.counts,
        q.counts(ACCOUNT, &request.range).await.unwrap()
    );
    assert_eq!(report.trend, trend);
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["report", ACCOUNT, "--json"])
        .env("TALLY_CLICKHOUSE__URL", &env.cfg.clickhouse.url)
        .env("TALLY_CLICKHOUSE__DATABASE", &env.cfg.clickhouse.database)
        .env("TALLY_POSTGRES__URL", env.cfg.postgres.url.expose())
        .env("TALLY_POSTGRES__SCHEMA", &env.cfg.postgres.schema)
        .env("TALLY_PRICES__PATH", &env.cfg.prices.path)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    if Utc::now().date_naive() == today {
        assert_eq!(printed, serde_json::to_value(&report).unwrap());
    }
    assert_eq!(printed["account_id"], ACCOUNT);
    let text = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["report", ACCOUNT, "--from", &first_day.to_string()])
        .env("TALLY_CLICKHOUSE__URL", &env.cfg.clickhouse.url)
        .env("TALLY_CLICKHOUSE__DATABASE", &env.cfg.clickhouse.database)
        .env("TALLY_POSTGRES__URL", env.cfg.postgres.url.expose())
        .env("TALLY_POSTGRES__SCHEMA", &env.cfg.postgres.schema)
        .env("TALLY_PRICES__PATH", &env.cfg.prices.path)
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains(&format!("usage of {ACCOUNT}")), "{text}");
    assert!(
        text.contains(&format!("credits {}", counts.credits)),
        "{text}"
    );
}

/// With a plan: `tally report` uses its billing cycle (from the 15th) and allowance.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_of_a_plan_uses_its_billing_cycle() {
    let f = fixture();
    let env = &f.env;
    let events = &f.events;
    let today = f.today;
    // With a plan: its billing cycle (from the 15th) and allowance.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["report", OTHER, "--json"])
        .env("TALLY_CLICKHOUSE__URL", &env.cfg.clickhouse.url)
        .env("TALLY_CLICKHOUSE__DATABASE", &env.cfg.clickhouse.database)
        .env("TALLY_POSTGRES__URL", env.cfg.postgres.url.expose())
        .env("TALLY_POSTGRES__SCHEMA", &env.cfg.postgres.schema)
        .env("TALLY_PRICES__PATH", &env.cfg.prices.path)
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    let fifteenth = today.with_day(15).unwrap();
    let (start, reset) = if today >= fifteenth {
        (
            fifteenth,
            fifteenth.checked_add_months(Months::new(1)).unwrap(),
        )
    } else {
        (
            fifteenth.checked_sub_months(Months::new(1)).unwrap(),
            fifteenth,
        )
    };
    if Utc::now().date_naive() == today {
        let c = &printed["cycle"];
        assert_eq!(c["start"], start.to_string(), "{c}");
        assert_eq!(c["reset"], reset.to_string(), "{c}");
        assert_eq!(
            c["allowance"].as_str().unwrap().parse::<Decimal>().unwrap(),
            dec!(500)
        );
        let other = Model::new(events, OTHER);
        assert_eq!(
            c["used"].as_str().unwrap().parse::<Decimal>().unwrap(),
            other.used(start, today)
        );
    }
}

/// The other account is untouched by the first one's usage; an unknown account has nothing.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_account_is_untouched() {
    let f = fixture();
    let events = &f.events;
    let today = f.today;
    let first_day = f.first_day;
    let q = UsageQueries::new(&f.env.cfg.clickhouse);
    let range = DateRange::new(f.first_day, f.today).unwrap();
    // The other account is untouched by all of this.
    let other = Model::new(events, OTHER);
    let oc = q.counts(OTHER, &range).await.unwrap();
    assert_eq!(
        (oc.events, oc.credits),
        (other.events.len() as u64, other.used(first_day, today))
    );
    assert_eq!(
        q.counts("nobody", &range).await.unwrap().events,
        0,
        "an unknown account has nothing"
    );
}
