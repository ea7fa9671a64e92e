//! The event-time ledger against the real services: the same stream of plans, grants and
//! usage delivered in three orders — setup first; usage first; shuffled across topics with
//! the ledger stopped and restarted between deliveries — into three schemas gives identical
//! balance documents, grants and closed cycles, field by field, and identical ClickHouse
//! totals. Every event arrives within the grace (`billing.grace`, 12 days here).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use rand::{seq::SliceRandom, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;

use common::{ev, test_config, TestEnv};
use tally::app::Role;
use tally::ledger::buckets::ClosedCycle;
use tally::ledger::store::{AccountBalance, BalanceView};

const ACCOUNTS: [&str; 4] = ["acct-a", "acct-b", "acct-c", "acct-d"];

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// (topic, key, payload)
type Record = (Topic, String, Vec<u8>);

#[derive(Clone, Copy, PartialEq)]
enum Topic {
    Plans,
    Grants,
    Chat,
}

/// (topic, account, payload): two `bill_overage` plans with a billing day five days ago (so a
/// cycle closes inside the stream), a package, a promo that expires mid-stream and two
/// top-ups, then 150 chats of 1-4 credits dated after the setup.
fn stream(now: DateTime<Utc>) -> (Vec<Record>, Vec<Record>) {
    let start = now - chrono::Duration::days(10);
    let day = (now - chrono::Duration::days(5)).day().min(28);
    let plan = |id: &str, account: &str, allowance: &str| {
        ev::envelope(
            "tally.account.plan.v1",
            "//billing.test/plans",
            id,
            account,
            &ts(start),
            json!({"plan_id": "pro", "monthly_allowance": allowance, "billing_day": day,
                   "overage_policy": "bill_overage"}),
        )
    };
    let promo = ev::envelope(
        "tally.credit.grant.v1",
        "//billing.test",
        "g-b-promo",
        "acct-b",
        &ts(start),
        json!({"grant_id": "promo", "kind": "promo", "credits": "40",
               "expires_at": ts(now - chrono::Duration::days(3))}),
    );
    let setup = vec![
        (Topic::Plans, "acct-a".into(), plan("p-a", "acct-a", "100")),
        (Topic::Plans, "acct-b".into(), plan("p-b", "acct-b", "150")),
        (
            Topic::Grants,
            "acct-a".into(),
            ev::grant("g-a", "acct-a", &ts(start), "pkg", "package", "50"),
        ),
        (Topic::Grants, "acct-b".into(), promo),
        (
            Topic::Grants,
            "acct-c".into(),
            ev::grant("g-c", "acct-c", &ts(start), "top", "top_up", "60"),
        ),
        (
            Topic::Grants,
            "acct-d".into(),
            ev::grant("g-d1", "acct-d", &ts(start), "top1", "top_up", "20"),
        ),
        (
            Topic::Grants,
            "acct-d".into(),
            ev::grant(
                "g-d2",
                "acct-d",
                &ts(start + chrono::Duration::days(4)),
                "top2",
                "top_up",
                "30",
            ),
        ),
    ];
    let span = chrono::Duration::days(9).num_seconds();
    let usage = (0..150)
        .map(|i: i64| {
            let account = ACCOUNTS[(i % 4) as usize];
            let at = start + chrono::Duration::hours(1) + chrono::Duration::seconds(span * i / 150);
            let responses = (i % 4 + 1) as u32;
            (
                Topic::Chat,
                account.to_owned(),
                ev::chat(
                    &format!("u{i}"),
                    account,
                    &ts(at),
                    "gpt-4o-mini",
                    "standard",
                    responses,
                ),
            )
        })
        .collect();
    (setup, usage)
}

struct Delivery {
    env: TestEnv,
    /// `tally run --role ledger`, stopped and started again mid-stream.
    ledger: Option<common::RunningTally>,
    /// `tally run --role analytics`, throughout.
    analytics: common::RunningTally,
}

impl Delivery {
    async fn new(name: &str) -> Delivery {
        let mut cfg = test_config(name);
        cfg.billing.grace = Duration::from_secs(12 * 86_400);
        let env = TestEnv::with_config(cfg).await;
        let analytics = common::RunningTally::start_role(&env, Role::Analytics);
        let mut d = Delivery {
            env,
            ledger: None,
            analytics,
        };
        d.start_ledger();
        d
    }

    fn start_ledger(&mut self) {
        self.ledger = Some(common::RunningTally::start_role(&self.env, Role::Ledger));
    }

    async fn stop_ledger(&mut self) {
        self.ledger.take().expect("running").stop().await;
    }

    async fn send(&self, records: &[Record]) {
        let t = &self.env.cfg.kafka.topics;
        let records: Vec<(String, String, Vec<u8>)> = records
            .iter()
            .map(|(topic, key, payload)| {
                let topic = match topic {
                    Topic::Plans => t.plans.clone(),
                    Topic::Grants => t.grants.clone(),
                    Topic::Chat => t.chat_responses.clone(),
                };
                (topic, key.clone(), payload.clone())
            })
            .collect();
        self.env.send(&records).await;
    }

    async fn caught_up(&self) {
        self.env
            .wait_ledger_caught_up(Duration::from_secs(120))
            .await;
    }

    async fn finish(mut self, now: DateTime<Utc>) -> Seen {
        self.caught_up().await;
        self.env
            .wait_analytics_caught_up(Duration::from_secs(120))
            .await;
        self.stop_ledger().await;
        self.analytics.stop().await;
        let store = self.env.store().await;
        let sink = tally::analytics::AnalyticsSink::new(&self.env.cfg.clickhouse);
        let mut seen = Seen::default();
        for a in ACCOUNTS {
            let view = store.balance_view(a, now).await.unwrap().expect("account");
            let balance = store.balance(a).await.unwrap().expect("account");
            let cycles = store.cycles(a).await.unwrap();
            let totals = sink.totals_by_account(a).await.unwrap();
            // Every credit the ledger charged (debits and overage, corrections included).
            let charged: Decimal = store
                .client()
                .query_one(
                    "SELECT COALESCE(-sum(amount), 0) FROM ledger_entries WHERE account_id = $1
                       AND coalesce(corrects, kind) IN ('debit', 'overage')",
                    &[&a],
                )
                .await
                .unwrap()
                .get(0);
            let range = tally::analytics::DateRange::new(
                (now - chrono::Duration::days(11)).date_naive(),
                now.date_naive(),
            )
            .unwrap();
            let daily = tally::analytics::UsageQueries::new(&self.env.cfg.clickhouse)
                .daily(a, &range)
                .await
                .unwrap();
            seen.accounts.insert(
                a.to_owned(),
                (view, balance, cycles, totals, charged, daily),
            );
        }
        seen
    }
}

type PerAccount = (
    BalanceView,
    AccountBalance,
    Vec<ClosedCycle>,
    (u64, Decimal),
    Decimal,
    Vec<tally::analytics::queries::DailyUsage>,
);

#[derive(Default, Debug, PartialEq)]
struct Seen {
    accounts: BTreeMap<String, PerAccount>,
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_stream_in_three_orders_gives_the_same_ledger() {
    let now = Utc::now();
    let (setup, usage) = stream(now);

    // 1. Plans and grants first, then usage.
    let a = Delivery::new("etsetup").await;
    a.send(&setup).await;
    a.caught_up().await;
    a.send(&usage).await;

    // 2. Usage first, then plans and grants.
    let b = Delivery::new("etusage").await;
    b.send(&usage).await;
    b.caught_up().await;
    b.send(&setup).await;

    // 3. Everything shuffled across topics, in three deliveries, the ledger stopped and
    //    restarted between them.
    let mut c = Delivery::new("etshuffled").await;
    let mut all: Vec<_> = setup.iter().chain(usage.iter()).cloned().collect();
    all.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(9));
    for part in all.chunks(all.len() / 3 + 1) {
        c.send(part).await;
        c.caught_up().await;
        c.stop_ledger().await;
        c.start_ledger();
    }

    let (a, b, c) = (
        a.finish(now).await,
        b.finish(now).await,
        c.finish(now).await,
    );
    for (name, other) in [("usage first", &b), ("shuffled", &c)] {
        for acct in ACCOUNTS {
            let (x, y) = (&a.accounts[acct], &other.accounts[acct]);
            assert_eq!(x.0, y.0, "{acct}: balance document, setup first vs {name}");
            assert_eq!(x.1, y.1, "{acct}: grants, setup first vs {name}");
            assert_eq!(x.2, y.2, "{acct}: closed cycles, setup first vs {name}");
            assert_eq!(x.3, y.3, "{acct}: ClickHouse totals, setup first vs {name}");
            assert_eq!(
                x.5, y.5,
                "{acct}: ClickHouse per-day usage, setup first vs {name}"
            );
        }
    }
    for acct in ACCOUNTS {
        let (view, _, cycles, (events, credits), charged, daily) = &a.accounts[acct];
        let per_day: Decimal = daily.iter().map(|d| d.credits).sum();
        assert_eq!(per_day, *credits, "{acct}: the days add up to the total");
        // Every chat was rated once in ClickHouse and charged once in the ledger.
        assert_eq!(
            *charged, *credits,
            "{acct}: ledger charges vs ClickHouse credits"
        );
        match acct {
            // Prepaid with one 60-credit top-up (valid 3 months): chats 2, 6, ..., 146 of
            // 3 responses each at 1 credit = 37 x 3 = 111 credits: 60 from the top-up, 51
            // overage.
            "acct-c" => {
                assert_eq!((*events, *credits), (37, Decimal::from(111)));
                assert_eq!(view.spendable, Decimal::ZERO);
                assert_eq!(view.overage, Decimal::from(51));
            }
            // The plans closed one cycle inside the stream.
            "acct-a" | "acct-b" => assert_eq!(cycles.len(), 1, "{acct}: {cycles:?}"),
            _ => {}
        }
    }
}

/// Late usage across a reset, through the real services (grace 30 h here): usage dated an
/// hour before today's boundary arrives after the boundary and still uses the old cycle's
/// allowance; usage dated 40 h ago arrives after the final point moved past it and is charged
/// to the open cycle, marked late in the ledger and in ClickHouse.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_usage_inside_and_beyond_the_grace() {
    let now = Utc::now();
    let boundary = now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let mut cfg = test_config("etlate");
    cfg.billing.grace = Duration::from_secs(30 * 3600);
    let env = TestEnv::with_config(cfg).await;
    let t = env.cfg.kafka.topics.clone();
    let tally = common::RunningTally::start(&env);
    let wait = Duration::from_secs(120);
    let plan = ev::envelope(
        "tally.account.plan.v1",
        "//billing.test/plans",
        "plan-l",
        "acct-l",
        &ts(now - chrono::Duration::hours(45)),
        json!({"plan_id": "pro", "monthly_allowance": "100", "billing_day": now.day(),
               "overage_policy": "bill_overage"}),
    );
    let chat = |id: &str, at: DateTime<Utc>, n: u32| {
        (
            t.chat_responses.clone(),
            "acct-l".to_owned(),
            ev::chat(id, "acct-l", &ts(at), "gpt-4o-mini", "standard", n),
        )
    };
    // The plan, and 10 credits today after the boundary.
    let u1 = boundary + (now - boundary) / 2;
    env.send(&[(t.plans.clone(), "acct-l".into(), plan), chat("u1", u1, 10)])
        .await;
    env.wait_ledger_caught_up(wait).await;
    // The scheduler moves the final point to now - 30 h.
    let mut store = env.store().await;
    store.grace = env.cfg.billing.grace();
    store.tick(now).await.unwrap();
    // 25 credits an hour before the boundary (inside the grace), 10 credits 40 h ago (after it).
    env.send(&[
        chat("u2", boundary - chrono::Duration::hours(1), 25),
        chat("u3", now - chrono::Duration::hours(40), 10),
    ])
    .await;
    env.wait_ledger_caught_up(wait).await;
    env.wait_analytics_caught_up(wait).await;
    tally.stop().await;

    // The closed cycle: u2 used 25 of its 100; 75 expired at the boundary (not 100).
    let cycles = store.cycles("acct-l").await.unwrap();
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    let c = &cycles[0];
    let n = |v: i64| Decimal::from(v);
    assert_eq!(c.end, boundary);
    assert_eq!(
        (c.allowance, c.used, c.allowance_expired, c.late_used),
        (n(100), n(25), n(75), n(0))
    );
    // Today's cycle: u1 and the late u3, 10 + 10 of its 100.
    let view = store.balance_view("acct-l", now).await.unwrap().unwrap();
    let cycle = view.cycle.unwrap();
    assert_eq!(
        (cycle.start, cycle.used, cycle.late_used),
        (boundary, n(20), n(10))
    );
    assert_eq!((view.spendable, view.overage), (n(80), n(0)));
    // The ledger marks u3's debit late, and only it.
    let late: Vec<(String, Decimal)> = store
        .client()
        .query(
            "SELECT event_id, amount FROM ledger_entries WHERE account_id = 'acct-l' AND late",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(late, vec![("u3".to_owned(), n(-10))]);
    // ClickHouse keeps every event on its own day, and marks u3 late.
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    assert_eq!(sink.totals_by_account("acct-l").await.unwrap(), (3, n(45)));
    assert_eq!(sink.late_totals("acct-l").await.unwrap(), (1, n(10)));
    // The usage report counts it apart, on its own day.
    let day = (now - chrono::Duration::hours(40)).date_naive();
    let range = tally::analytics::DateRange::new(day, now.date_naive()).unwrap();
    let late = tally::analytics::UsageQueries::new(&env.cfg.clickhouse)
        .late("acct-l", &range)
        .await
        .unwrap();
    assert_eq!((late.events, late.credits), (1, n(10)));
}
