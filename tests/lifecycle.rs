//! Credit lifecycle and threshold alerts against the real services, with a clock the test
//! controls (the pipeline's "now" and the scheduler's ticks; nothing sleeps for time to pass):
//!
//! - acct-p: a plan (allowance 100, billing day 31, 25 % low-balance threshold) with a package
//!   on top; cycle resets on Jan 31, on Feb 28 (billing day 31 in February) and Mar 31 with the
//!   unused allowance expiring; allowance-used 50/80/100 %, low balance (percent) and projected
//!   exhaustion alerts.
//! - acct-q: three top-ups, each renewing the validity of the remaining top-up credits, then
//!   expiring together; credits-expiring alerts, then low balance and credits exhausted.
//! - acct-r: prepaid overage settled by the next top-up; low balance and credits exhausted fire
//!   once, are resolved by the top-up, and low balance fires again.
//! - every fired alert whose condition stopped holding is closed by its `resolved` message.
//!
//! Every ledger entry and every alert message (read back from the alert topics by a Kafka
//! consumer) is asserted exactly.
//!
//! The story runs once ([`fixture`]); each account's ledger, the billing view and the alerts
//! are named cases reading it.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rdkafka::message::Message;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use tokio::sync::watch;

use common::{ev, test_config, TestEnv};
use tally::clock::ManualClock;

fn day(m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2027, m, d, h, 0, 0).unwrap()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn plan_event(id: &str, account: &str, at: DateTime<Utc>) -> Vec<u8> {
    ev::envelope(
        "tally.account.plan.v1",
        "//billing.test/plans",
        id,
        account,
        &ts(at),
        json!({"plan_id": "pro", "monthly_allowance": "100", "billing_day": 31,
               "overage_policy": "bill_overage", "low_balance_percent": "25",
               "allowance_alert_percents": [50, 80, 100]}),
    )
}

/// (topic, key, payload) records sent together.
type Records = Vec<(String, String, Vec<u8>)>;

type Line = (
    String,
    Option<String>,
    Decimal,
    Decimal,
    Decimal,
    DateTime<Utc>,
);

fn line(
    kind: &str,
    grant: Option<&str>,
    amount: Decimal,
    balance: Decimal,
    overage: Decimal,
    at: DateTime<Utc>,
) -> Line {
    (
        kind.into(),
        grant.map(str::to_owned),
        amount,
        balance,
        overage,
        at,
    )
}

async fn lines(env: &TestEnv, account: &str) -> Vec<Line> {
    env.store()
        .await
        .entries(account, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.kind,
                e.grant_id,
                e.amount,
                e.balance_after,
                e.overage_after,
                e.effective_at,
            )
        })
        .collect()
}

/// Every message on the alert topics: (topic, parsed CloudEvent).
fn read_alerts(env: &TestEnv) -> Vec<(String, Value)> {
    let topics = env.cfg.alerts.topics.all();
    let (messages, _) = common::read_topics(&env.cfg, &topics, Duration::from_secs(30));
    messages
        .iter()
        .map(|m| {
            assert_eq!(
                m.key(),
                Some(
                    serde_json::from_slice::<Value>(m.payload().unwrap()).unwrap()["subject"]
                        .as_str()
                        .unwrap()
                        .as_bytes()
                )
            );
            (
                m.topic().to_owned(),
                serde_json::from_slice(m.payload().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// The story every case reads: the events of all three accounts sent in phases with the
/// pipeline's clock at each phase's time, the scheduler's ticks at chosen times, and every
/// alert relayed once; with the number of alerts relayed.
struct Fixture {
    env: TestEnv,
    published: usize,
}

/// The fixture, built once by the first case that asks ([`common::set_up_once`]).
fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Option<Fixture>> = std::sync::OnceLock::new();
    common::set_up_once(&FIXTURE, || async { (set_up().await, ()) })
}

async fn set_up() -> Fixture {
    let mut cfg = test_config("life");
    cfg.alerts.low_balance_credits = Some(dec!(10));
    let env = TestEnv::with_config(cfg).await;
    let t = env.cfg.kafka.topics.clone();
    let clock = Arc::new(ManualClock::new(day(1, 10, 1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ledger = tokio::spawn(tally::pipeline::ledger::run_with_clock(
        env.cfg.clone(),
        env.prices.clone(),
        clock.clone(),
        stop_rx,
    ));
    // Phases keep each account's events in order across topics.
    let phases: Vec<(DateTime<Utc>, Records)> = vec![
        (
            day(1, 10, 1),
            vec![
                (
                    t.plans.clone(),
                    "acct-p".into(),
                    plan_event("p-plan", "acct-p", day(1, 10, 0)),
                ),
                (
                    t.grants.clone(),
                    "acct-q".into(),
                    ev::grant("q-1", "acct-q", &ts(day(1, 10, 0)), "q1", "top_up", "20"),
                ),
            ],
        ),
        (
            day(1, 25, 0),
            vec![
                (
                    t.grants.clone(),
                    "acct-p".into(),
                    ev::grant(
                        "p-pkg",
                        "acct-p",
                        &ts(day(1, 10, 1)),
                        "pkg-1",
                        "package",
                        "50",
                    ),
                ),
                (
                    t.grants.clone(),
                    "acct-q".into(),
                    ev::grant("q-2", "acct-q", &ts(day(1, 20, 0)), "q2", "top_up", "10"),
                ),
                (
                    t.grants.clone(),
                    "acct-q".into(),
                    ev::grant("q-3", "acct-q", &ts(day(1, 25, 0)), "q3", "top_up", "5"),
                ),
            ],
        ),
        (
            day(2, 1, 0),
            vec![
                (
                    t.chat_responses.clone(),
                    "acct-p".into(),
                    ev::chat(
                        "p-c1",
                        "acct-p",
                        &ts(day(1, 11, 0)),
                        "gpt-4o-mini",
                        "standard",
                        60,
                    ),
                ),
                (
                    t.chat_responses.clone(),
                    "acct-p".into(),
                    ev::chat(
                        "p-c2",
                        "acct-p",
                        &ts(day(1, 12, 0)),
                        "gpt-4o-mini",
                        "standard",
                        25,
                    ),
                ),
                (
                    t.chat_responses.clone(),
                    "acct-p".into(),
                    ev::chat(
                        "p-c3",
                        "acct-p",
                        &ts(day(1, 13, 0)),
                        "gpt-4o-mini",
                        "standard",
                        45,
                    ),
                ),
                (
                    t.chat_responses.clone(),
                    "acct-q".into(),
                    ev::chat(
                        "q-c1",
                        "acct-q",
                        &ts(day(2, 1, 0)),
                        "gpt-4o-mini",
                        "standard",
                        5,
                    ),
                ),
                (
                    t.grants.clone(),
                    "acct-r".into(),
                    ev::grant("r-1", "acct-r", &ts(day(2, 1, 0)), "r1", "top_up", "20"),
                ),
            ],
        ),
        (
            day(2, 3, 0),
            vec![
                (
                    t.chat_responses.clone(),
                    "acct-r".into(),
                    ev::chat(
                        "r-c1",
                        "acct-r",
                        &ts(day(2, 2, 0)),
                        "gpt-4o-mini",
                        "standard",
                        12,
                    ),
                ),
                (
                    t.chat_responses.clone(),
                    "acct-r".into(),
                    ev::chat(
                        "r-c2",
                        "acct-r",
                        &ts(day(2, 3, 0)),
                        "gpt-4o-mini",
                        "standard",
                        10,
                    ),
                ),
            ],
        ),
        (
            day(2, 4, 0),
            vec![(
                t.grants.clone(),
                "acct-r".into(),
                ev::grant("r-2", "acct-r", &ts(day(2, 4, 0)), "r2", "top_up", "30"),
            )],
        ),
        (
            day(2, 5, 0),
            vec![(
                t.chat_responses.clone(),
                "acct-r".into(),
                ev::chat(
                    "r-c3",
                    "acct-r",
                    &ts(day(2, 5, 0)),
                    "gpt-4o-mini",
                    "standard",
                    20,
                ),
            )],
        ),
    ];
    for (now, records) in phases {
        clock.set(now);
        // Produced "now": admission is decided at the record's timestamp.
        env.send_at(&records, now).await;
        env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    }
    stop_tx.send(true).unwrap();
    common::stopped(ledger).await.unwrap();

    // The scheduler's ticks, at times the test chooses.
    let mut store = env.store().await;
    store.alert_defaults = env.cfg.alerts.defaults();
    // No grace for these ticks: each makes final what happened up to its own time (the
    // grace itself is tested in tests/event_time.rs and the ledger's core).
    store.grace = chrono::Duration::zero();
    for now in [day(1, 31, 0), day(2, 28, 0), day(4, 18, 0), day(4, 25, 0)] {
        store.tick(now).await.unwrap();
    }
    assert_eq!(
        store.tick(day(4, 25, 0)).await.unwrap(),
        0,
        "a repeated tick finds nothing to do"
    );
    let producer = tally::kafka::producer_config(&env.cfg.kafka)
        .create()
        .unwrap();
    let published =
        tally::pipeline::alerts::relay_once(&mut store, &producer, &env.cfg.alerts.topics, 500)
            .await
            .unwrap();
    assert_eq!(
        tally::pipeline::alerts::relay_once(&mut store, &producer, &env.cfg.alerts.topics, 500)
            .await
            .unwrap(),
        0
    );

    Fixture { env, published }
}

/// acct-p: plan, package, usage, three resets (Jan 31, Feb 28 — billing day 31 — Mar 31).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_package_usage_and_three_resets() {
    let f = fixture();
    let env = &f.env;
    let store = env.store().await;
    // acct-p: plan, package, usage, three resets (Jan 31, Feb 28 — billing day 31 — Mar 31).
    let (a1, a2, a3, a4) = (
        "allowance:2026-12-31",
        "allowance:2027-01-31",
        "allowance:2027-02-28",
        "allowance:2027-03-31",
    );
    let z = Decimal::ZERO;
    assert_eq!(
        lines(env, "acct-p").await,
        vec![
            line("grant", Some(a1), dec!(100), dec!(100), z, day(1, 10, 0)),
            line(
                "grant",
                Some("pkg-1"),
                dec!(50),
                dec!(150),
                z,
                day(1, 10, 1)
            ),
            line("debit", Some(a1), dec!(-60), dec!(90), z, day(1, 11, 0)),
            line("debit", Some(a1), dec!(-25), dec!(65), z, day(1, 12, 0)),
            line("debit", Some(a1), dec!(-15), dec!(50), z, day(1, 13, 0)),
            line(
                "debit",
                Some("pkg-1"),
                dec!(-30),
                dec!(20),
                z,
                day(1, 13, 0)
            ),
            line("grant", Some(a2), dec!(100), dec!(120), z, day(1, 31, 0)),
            line("expiry", Some(a2), dec!(-100), dec!(20), z, day(2, 28, 0)),
            line("grant", Some(a3), dec!(100), dec!(120), z, day(2, 28, 0)),
            line("expiry", Some(a3), dec!(-100), dec!(20), z, day(3, 31, 0)),
            line("grant", Some(a4), dec!(100), dec!(120), z, day(3, 31, 0)),
        ]
    );
    let cycles: Vec<_> = store
        .cycles("acct-p")
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            (
                c.start,
                c.end,
                c.allowance,
                c.used,
                c.overage,
                c.allowance_expired,
            )
        })
        .collect();
    assert_eq!(
        cycles,
        vec![
            (
                Utc.with_ymd_and_hms(2026, 12, 31, 0, 0, 0).unwrap(),
                day(1, 31, 0),
                dec!(100),
                dec!(130),
                z,
                z
            ),
            (day(1, 31, 0), day(2, 28, 0), dec!(100), z, z, dec!(100)),
            (day(2, 28, 0), day(3, 31, 0), dec!(100), z, z, dec!(100)),
        ]
    );
    let (_, cycle) = store.plan("acct-p").await.unwrap().unwrap();
    assert_eq!((cycle.start, cycle.end), (day(3, 31, 0), day(4, 30, 0)));
}

/// acct-q: three top-ups renewing each other's validity, then expiring together.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_renew_each_other_then_expire_together() {
    let f = fixture();
    let env = &f.env;
    let z = Decimal::ZERO;
    // acct-q: three top-ups renewing each other's validity, then expiring together.
    let q_exp = day(4, 25, 0);
    assert_eq!(
        lines(env, "acct-q").await,
        vec![
            line("grant", Some("q1"), dec!(20), dec!(20), z, day(1, 10, 0)),
            line("grant", Some("q2"), dec!(10), dec!(30), z, day(1, 20, 0)),
            line("renewal", Some("q1"), z, dec!(30), z, day(1, 20, 0)),
            line("grant", Some("q3"), dec!(5), dec!(35), z, day(1, 25, 0)),
            line("renewal", Some("q1"), z, dec!(35), z, day(1, 25, 0)),
            line("renewal", Some("q2"), z, dec!(35), z, day(1, 25, 0)),
            line("debit", Some("q1"), dec!(-5), dec!(30), z, day(2, 1, 0)),
            line("expiry", Some("q1"), dec!(-15), dec!(15), z, q_exp),
            line("expiry", Some("q2"), dec!(-10), dec!(5), z, q_exp),
            line("expiry", Some("q3"), dec!(-5), dec!(0), z, q_exp),
        ]
    );
}

/// acct-r: overage settled from the next top-up first.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_settled_from_the_next_top_up() {
    let f = fixture();
    let env = &f.env;
    let z = Decimal::ZERO;
    // acct-r: overage settled from the next top-up first.
    assert_eq!(
        lines(env, "acct-r").await,
        vec![
            line("grant", Some("r1"), dec!(20), dec!(20), z, day(2, 1, 0)),
            line("debit", Some("r1"), dec!(-12), dec!(8), z, day(2, 2, 0)),
            line("debit", Some("r1"), dec!(-8), dec!(0), z, day(2, 3, 0)),
            line("overage", None, dec!(-2), dec!(0), dec!(2), day(2, 3, 0)),
            line(
                "grant",
                Some("r2"),
                dec!(30),
                dec!(30),
                dec!(2),
                day(2, 4, 0)
            ),
            line("settle", Some("r2"), dec!(-2), dec!(28), z, day(2, 4, 0)),
            line("debit", Some("r2"), dec!(-20), dec!(8), z, day(2, 5, 0)),
        ]
    );
}

/// The billing view of acct-p at the last tick.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_view_at_the_last_tick() {
    let f = fixture();
    let env = &f.env;
    let store = env.store().await;
    let a4 = "allowance:2027-03-31";
    let z = Decimal::ZERO;
    // The billing view at the last tick.
    let view = store
        .balance_view("acct-p", day(4, 25, 0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((view.spendable, view.overage), (dec!(120), z));
    assert_eq!(view.allowance, Some((dec!(100), z)));
    assert_eq!(view.days_until_reset, Some(5));
    assert_eq!(
        view.next_expiry,
        Some((day(4, 30, 0), dec!(100), a4.to_owned()))
    );
    let order: Vec<&str> = view.grants.iter().map(|g| g.grant_id.as_str()).collect();
    assert_eq!(order, vec![a4, "pkg-1"], "consumption order");
}

/// Every alert, once per crossing, on its topic, keyed by account, valid by its schema; each resolved once its condition stopped holding.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_once_per_crossing_then_resolved() {
    let f = fixture();
    let env = &f.env;
    let published = f.published;
    // Every alert, once per crossing, on its topic, keyed by account, valid by its schema.
    let alerts = read_alerts(env);
    assert_eq!(alerts.len(), published);
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_path("schemas/alerts/alert.schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    for (_, alert) in &alerts {
        let errors: Vec<String> = validator
            .iter_errors(alert)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{alert}: {errors:?}");
    }
    let topics = &env.cfg.alerts.topics;
    let by_id: BTreeMap<String, (String, Value)> = alerts
        .into_iter()
        .map(|(topic, v)| (v["id"].as_str().unwrap().to_owned(), (topic, v)))
        .collect();
    let q_exp = day(4, 25, 0);
    let q_key = q_exp.timestamp();
    let expected_ids: Vec<(String, &str)> = vec![
        (
            "acct-p/allowance_used:100:2026-12-31/1".into(),
            topics.allowance_used.as_str(),
        ),
        (
            "acct-p/allowance_used:100:2026-12-31/1/resolved".into(),
            &topics.allowance_used,
        ),
        (
            "acct-p/allowance_used:50:2026-12-31/1".into(),
            &topics.allowance_used,
        ),
        (
            "acct-p/allowance_used:50:2026-12-31/1/resolved".into(),
            &topics.allowance_used,
        ),
        (
            "acct-p/allowance_used:80:2026-12-31/1".into(),
            &topics.allowance_used,
        ),
        (
            "acct-p/allowance_used:80:2026-12-31/1/resolved".into(),
            &topics.allowance_used,
        ),
        (
            "acct-p/low_balance:percent:25/1".into(),
            &topics.low_balance,
        ),
        (
            "acct-p/low_balance:percent:25/1/resolved".into(),
            &topics.low_balance,
        ),
        (
            "acct-p/projected_exhaustion:2026-12-31/1".into(),
            &topics.projected_exhaustion,
        ),
        (
            "acct-p/projected_exhaustion:2026-12-31/1/resolved".into(),
            &topics.projected_exhaustion,
        ),
        (
            "acct-q/credits_exhausted/1".into(),
            &topics.credits_exhausted,
        ),
        (
            format!("acct-q/credits_expiring:q1:{q_key}/1"),
            &topics.credits_expiring,
        ),
        (
            format!("acct-q/credits_expiring:q1:{q_key}/1/resolved"),
            &topics.credits_expiring,
        ),
        (
            format!("acct-q/credits_expiring:q2:{q_key}/1"),
            &topics.credits_expiring,
        ),
        (
            format!("acct-q/credits_expiring:q2:{q_key}/1/resolved"),
            &topics.credits_expiring,
        ),
        (
            format!("acct-q/credits_expiring:q3:{q_key}/1"),
            &topics.credits_expiring,
        ),
        (
            format!("acct-q/credits_expiring:q3:{q_key}/1/resolved"),
            &topics.credits_expiring,
        ),
        (
            "acct-q/low_balance:credits:10/1".into(),
            &topics.low_balance,
        ),
        (
            "acct-r/credits_exhausted/1".into(),
            &topics.credits_exhausted,
        ),
        (
            "acct-r/credits_exhausted/1/resolved".into(),
            &topics.credits_exhausted,
        ),
        (
            "acct-r/low_balance:credits:10/1".into(),
            &topics.low_balance,
        ),
        (
            "acct-r/low_balance:credits:10/1/resolved".into(),
            &topics.low_balance,
        ),
        (
            "acct-r/low_balance:credits:10/2".into(),
            &topics.low_balance,
        ),
    ];
    let got_ids: Vec<(String, &str)> = by_id
        .iter()
        .map(|(id, (topic, _))| (id.clone(), topic.as_str()))
        .collect();
    assert_eq!(got_ids, expected_ids);

    let msg = |id: &str| by_id[id].1.clone();
    let envelope = |ty: &str, id: &str, subject: &str, at: DateTime<Utc>, data: Value| {
        json!({"specversion": "1.0", "type": ty, "source": "tally", "id": id, "subject": subject,
               "time": ts(at), "datacontenttype": "application/json", "data": data})
    };
    let p_cycle =
        json!({"cycle_start": "2026-12-31T00:00:00Z", "cycle_end": "2027-01-31T00:00:00Z"});
    let with = |base: &Value, extra: Value| {
        let mut v = base.clone();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    assert_eq!(
        msg("acct-p/projected_exhaustion:2026-12-31/1"),
        envelope(
            "tally.alert.projected_exhaustion.v1",
            "acct-p/projected_exhaustion:2026-12-31/1",
            "acct-p",
            day(1, 11, 0),
            with(
                &p_cycle,
                json!({"account_id": "acct-p", "spendable": "90.000000", "overage": "0.000000",
                "daily_pace": "5.454545", "projected_exhaustion_at": "2027-01-27T12:00:00Z"})
            )
        )
    );
    assert_eq!(
        msg("acct-p/low_balance:percent:25/1"),
        envelope(
            "tally.alert.low_balance.v1",
            "acct-p/low_balance:percent:25/1",
            "acct-p",
            day(1, 13, 0),
            with(
                &p_cycle,
                json!({"account_id": "acct-p", "spendable": "20.000000", "overage": "0.000000",
                "threshold": "25", "threshold_unit": "percent_of_allowance", "threshold_credits": "25.000000"})
            )
        )
    );
    assert_eq!(
        msg("acct-p/allowance_used:100:2026-12-31/1"),
        envelope(
            "tally.alert.allowance_used.v1",
            "acct-p/allowance_used:100:2026-12-31/1",
            "acct-p",
            day(1, 13, 0),
            with(
                &p_cycle,
                json!({"account_id": "acct-p", "spendable": "20.000000", "overage": "0.000000",
                "threshold": "100", "threshold_unit": "percent_of_allowance",
                "allowance": "100.000000", "allowance_used": "100.000000"})
            )
        )
    );
    assert_eq!(
        msg(&format!("acct-q/credits_expiring:q2:{q_key}/1")),
        envelope(
            "tally.alert.credits_expiring.v1",
            &format!("acct-q/credits_expiring:q2:{q_key}/1"),
            "acct-q",
            day(4, 18, 0),
            json!({"account_id": "acct-q", "spendable": "30.000000", "overage": "0.000000",
                "grant_id": "q2", "grant_kind": "top_up", "credits": "10.000000", "expires_at": "2027-04-25T00:00:00Z"})
        )
    );
    assert_eq!(
        msg("acct-r/credits_exhausted/1"),
        envelope(
            "tally.alert.credits_exhausted.v1",
            "acct-r/credits_exhausted/1",
            "acct-r",
            day(2, 3, 0),
            json!({"account_id": "acct-r", "spendable": "0.000000", "overage": "2.000000"})
        )
    );
    assert_eq!(
        msg("acct-r/low_balance:credits:10/2"),
        envelope(
            "tally.alert.low_balance.v1",
            "acct-r/low_balance:credits:10/2",
            "acct-r",
            day(2, 5, 0),
            json!({"account_id": "acct-r", "spendable": "8.000000", "overage": "0.000000",
                "threshold": "10.000000", "threshold_unit": "credits"})
        )
    );
    assert_eq!(
        msg("acct-q/credits_exhausted/1")["time"],
        "2027-04-25T00:00:00Z"
    );

    // Resolutions: the top-up of Feb 4 lifts acct-r to 20 - 12 - 10 + 30 - 2 (overage settled)
    // = 28; the reset of Jan 31 gives acct-p a new cycle (100 new allowance + 20 of the
    // package = 120) where none of the old cycle's conditions hold; acct-q's expiring credits
    // are gone on Apr 25.
    assert_eq!(
        msg("acct-r/low_balance:credits:10/1/resolved"),
        envelope(
            "tally.alert.low_balance.resolved.v1",
            "acct-r/low_balance:credits:10/1/resolved",
            "acct-r",
            day(2, 4, 0),
            json!({"account_id": "acct-r", "spendable": "28.000000", "overage": "0.000000",
                "resolves": "acct-r/low_balance:credits:10/1"})
        )
    );
    assert_eq!(
        msg("acct-p/low_balance:percent:25/1/resolved"),
        envelope(
            "tally.alert.low_balance.resolved.v1",
            "acct-p/low_balance:percent:25/1/resolved",
            "acct-p",
            day(1, 31, 0),
            json!({"account_id": "acct-p", "spendable": "120.000000", "overage": "0.000000",
                "cycle_start": "2027-01-31T00:00:00Z", "cycle_end": "2027-02-28T00:00:00Z",
                "resolves": "acct-p/low_balance:percent:25/1"})
        )
    );
    assert_eq!(
        msg(&format!("acct-q/credits_expiring:q2:{q_key}/1/resolved"))["time"],
        "2027-04-25T00:00:00Z"
    );
}
