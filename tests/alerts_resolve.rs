//! Issue 14, items 3 and 4, against the real services (Kafka, PostgreSQL, ClickHouse), with
//! Tally running as `tally run --role all` runs it:
//! - an alert closes: usage drains a balance (low balance, then credits exhausted), a top-up
//!   lifts it, and each alert's `resolved` message follows on the same topic with the same
//!   key, read back from the topics;
//! - the recharge request: a plan set from the CLI (`tally accounts set-plan
//!   --recharge-...`) asks for 500 credits below 100; the balance crosses the threshold twice
//!   with a top-up between, and exactly two `recharge_requested` messages reach their topic;
//! - the purchased-credits view: remaining of total purchased and the model prices in the
//!   balance document (API) and in `tally balance` (binary), figures by hand.
//!
//! Prices (tests/fixtures/prices.toml): a standard `gpt-4o-mini` chat response costs 1 credit.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, SecondsFormat, TimeZone, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use common::api::{with_tokens, Server, ACME, ADMIN};
use common::{ev, test_config, RunningTally, TestEnv};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A whole second, some minutes ago: events dated from it are admitted and in order.
fn minutes_ago(m: i64) -> DateTime<Utc> {
    let t = Utc::now() - chrono::Duration::minutes(m);
    Utc.timestamp_opt(t.timestamp(), 0).unwrap()
}

/// Every message on `topic`: (Kafka key, CloudEvent). Waits until `want` are there (the relay
/// publishes after the ledger's commit), then 3 s more so that an extra one is seen too.
fn read_topic(env: &TestEnv, topic: &str, want: usize) -> Vec<(String, Value)> {
    let mut cc = tally::kafka::client_config(&env.cfg.kafka);
    cc.set("group.id", common::unique("alert-reader"));
    let consumer: BaseConsumer = cc.create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..env.cfg.kafka.topic_partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    let mut enough_at: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(60) {
        if out.len() >= want
            && enough_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(3)
        {
            break;
        }
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            out.push((
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                serde_json::from_slice(m.payload().unwrap()).unwrap(),
            ));
        }
    }
    // One account, so one partition: the topic's order is the order they were written.
    out
}

fn alert(ty: &str, id: &str, account: &str, at: DateTime<Utc>, data: Value) -> Value {
    json!({"specversion": "1.0", "type": ty, "source": "tally", "id": id, "subject": account,
           "time": ts(at), "datacontenttype": "application/json", "data": data})
}

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_path("schemas/alerts/alert.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap()
}

fn assert_valid(messages: &[(String, Value)]) {
    let v = validator();
    for (_, m) in messages {
        let errors: Vec<String> = v.iter_errors(m).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{m}: {errors:?}");
    }
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_resolves_the_alerts_the_usage_fired() {
    let mut cfg = test_config("resolve");
    cfg.alerts.low_balance_credits = Some(dec!(10));
    let env = TestEnv::with_config(cfg).await;
    let tally = RunningTally::start(&env);
    let t = env.cfg.kafka.topics.clone();
    let acct = "acct-lo";
    let t0 = minutes_ago(10);
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    // One phase at a time, each applied before the next is sent: alerts follow the balance
    // as Tally sees it event by event.
    let phases: Vec<(String, Vec<u8>)> = vec![
        // 20 credits.
        (
            t.grants.clone(),
            ev::grant("g-1", acct, &ts(at(0)), "top-1", "top_up", "20"),
        ),
        // 12 responses: 20 - 12 = 8 < 10: low balance fires.
        (
            t.chat_responses.clone(),
            ev::chat("chat-1", acct, &ts(at(60)), "gpt-4o-mini", "standard", 12),
        ),
        // 8 responses: 8 - 8 = 0: credits exhausted fires (low balance holds: said once).
        (
            t.chat_responses.clone(),
            ev::chat("chat-2", acct, &ts(at(120)), "gpt-4o-mini", "standard", 8),
        ),
        // A top-up of 50: 0 + 50 = 50, neither holds: both resolve.
        (
            t.grants.clone(),
            ev::grant("g-2", acct, &ts(at(180)), "top-2", "top_up", "50"),
        ),
        // 45 responses: 50 - 45 = 5 < 10: low balance fires again, as number 2.
        (
            t.chat_responses.clone(),
            ev::chat("chat-3", acct, &ts(at(240)), "gpt-4o-mini", "standard", 45),
        ),
    ];
    for (topic, payload) in phases {
        env.send(&[(topic, acct.to_owned(), payload)]).await;
        env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    }

    let topics = &env.cfg.alerts.topics;
    let low = read_topic(&env, &topics.low_balance, 3);
    let exhausted = read_topic(&env, &topics.credits_exhausted, 2);
    assert_valid(&low);
    assert_valid(&exhausted);
    let data = |spendable: &str, extra: Value| {
        let mut d = json!({"account_id": acct, "spendable": spendable, "overage": "0.000000"});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d
    };
    let threshold = json!({"threshold": "10.000000", "threshold_unit": "credits"});
    assert_eq!(
        low,
        vec![
            (
                acct.to_owned(),
                alert(
                    "tally.alert.low_balance.v1",
                    "acct-lo/low_balance:credits:10/1",
                    acct,
                    at(60),
                    data("8.000000", threshold.clone())
                )
            ),
            (
                acct.to_owned(),
                alert(
                    "tally.alert.low_balance.resolved.v1",
                    "acct-lo/low_balance:credits:10/1/resolved",
                    acct,
                    at(180),
                    data(
                        "50.000000",
                        json!({"resolves": "acct-lo/low_balance:credits:10/1"})
                    )
                )
            ),
            (
                acct.to_owned(),
                alert(
                    "tally.alert.low_balance.v1",
                    "acct-lo/low_balance:credits:10/2",
                    acct,
                    at(240),
                    data("5.000000", threshold)
                )
            ),
        ]
    );
    assert_eq!(
        exhausted,
        vec![
            (
                acct.to_owned(),
                alert(
                    "tally.alert.credits_exhausted.v1",
                    "acct-lo/credits_exhausted/1",
                    acct,
                    at(120),
                    data("0.000000", json!({}))
                )
            ),
            (
                acct.to_owned(),
                alert(
                    "tally.alert.credits_exhausted.resolved.v1",
                    "acct-lo/credits_exhausted/1/resolved",
                    acct,
                    at(180),
                    data(
                        "50.000000",
                        json!({"resolves": "acct-lo/credits_exhausted/1"})
                    )
                )
            ),
        ]
    );
    // No plan, no expiry within 7 days, no recharge settings: nothing else.
    for topic in [
        &topics.allowance_used,
        &topics.projected_exhaustion,
        &topics.credits_expiring,
        &topics.recharge_requested,
    ] {
        assert_eq!(read_topic(&env, topic, 0), vec![], "{topic}");
    }
    tally.stop().await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recharge_is_requested_once_per_crossing() {
    let env = TestEnv::new("recharge").await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(&env, dir.path());
    let tally = RunningTally::start(&env);
    let acct = "acct-rc";
    let t = env.cfg.kafka.topics.clone();

    // 300 credits first: a plan set while the balance is already below its threshold asks
    // for a recharge at once (the condition holds from the plan on).
    env.send(&[(
        t.grants.clone(),
        acct.to_owned(),
        ev::grant("g-1", acct, &ts(minutes_ago(1)), "top-1", "top_up", "300"),
    )])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    // A prepaid account (no allowance) asking for 500 credits whenever it falls below 100.
    let sent = common::tally_cli(
        &config,
        &[
            "accounts",
            "set-plan",
            acct,
            "--plan-id",
            "prepaid",
            "--allowance",
            "0",
            "--billing-day",
            "1",
            "--overage-policy",
            "settle-from-next-grant",
            "--recharge-threshold-credits",
            "100",
            "--recharge-credits",
            "500",
        ],
    );
    assert!(
        sent.contains(r#""recharge_threshold_credits":"100","recharge_credits":"500""#)
            || (sent.contains(r#""recharge_threshold_credits":"100""#)
                && sent.contains(r#""recharge_credits":"500""#)),
        "{sent}"
    );
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    // The plan is dated when it was sent: everything after it, a second apart.
    let p = Utc.timestamp_opt(Utc::now().timestamp() + 1, 0).unwrap();
    let at = |s: i64| p + chrono::Duration::seconds(s);
    let phases: Vec<(String, Vec<u8>)> = vec![
        // 300 - 150 = 150: above 100.
        (
            t.chat_responses.clone(),
            ev::chat("chat-1", acct, &ts(at(1)), "gpt-4o-mini", "standard", 150),
        ),
        // 150 - 60 = 90: below: the first request.
        (
            t.chat_responses.clone(),
            ev::chat("chat-2", acct, &ts(at(2)), "gpt-4o-mini", "standard", 60),
        ),
        // 90 - 80 = 10: still below: nothing.
        (
            t.chat_responses.clone(),
            ev::chat("chat-3", acct, &ts(at(3)), "gpt-4o-mini", "standard", 80),
        ),
        // The payment system's answer, 500: 510, above again (re-armed, no message).
        (
            t.grants.clone(),
            ev::grant("g-2", acct, &ts(at(4)), "recharge-1", "top_up", "500"),
        ),
        // 510 - 420 = 90: below: the second request.
        (
            t.chat_responses.clone(),
            ev::chat("chat-4", acct, &ts(at(5)), "gpt-4o-mini", "standard", 420),
        ),
    ];
    for (topic, payload) in phases {
        env.send(&[(topic, acct.to_owned(), payload)]).await;
        env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    }

    let got = read_topic(&env, &env.cfg.alerts.topics.recharge_requested, 2);
    assert_valid(&got);
    // The plan's cycle (billing day 1): the month the plan was sent in.
    let cycle_start = Utc
        .with_ymd_and_hms(p.year(), p.month(), 1, 0, 0, 0)
        .unwrap();
    let cycle_end = if p.month() == 12 {
        Utc.with_ymd_and_hms(p.year() + 1, 1, 1, 0, 0, 0).unwrap()
    } else {
        Utc.with_ymd_and_hms(p.year(), p.month() + 1, 1, 0, 0, 0)
            .unwrap()
    };
    let request = |n: u32, at: DateTime<Utc>| {
        (
            acct.to_owned(),
            alert(
                "tally.alert.recharge_requested.v1",
                &format!("acct-rc/recharge_requested:100/{n}"),
                acct,
                at,
                json!({"account_id": acct, "spendable": "90.000000", "overage": "0.000000",
                       "cycle_start": ts(cycle_start), "cycle_end": ts(cycle_end),
                       "threshold": "100.000000", "threshold_unit": "credits",
                       "recharge_credits": "500.000000"}),
            ),
        )
    };
    assert_eq!(got, vec![request(1, at(2)), request(2, at(5))]);
    // The balance below is read as of now (the API's and the CLI's "now"): wait until every
    // event above, dated up to 6 s after the plan, is in the past, or the top-up of at(4)
    // would not be granted yet.
    while Utc::now() <= at(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Tally granted nothing itself: 300 + 500 - 150 - 60 - 80 - 420 = 90.
    let balance = env
        .store()
        .await
        .balance_view(acct, Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(balance.spendable, dec!(90));
    assert_eq!(balance.total_granted, dec!(800));
    // The settings are shown with the plan.
    let doc: Value =
        serde_json::from_str(&common::tally_cli(&config, &["balance", acct, "--json"])).unwrap();
    assert_eq!(
        (
            &doc["plan"]["recharge_threshold_credits"],
            &doc["plan"]["recharge_credits"]
        ),
        (&json!("100"), &json!("500"))
    );
    assert_eq!(
        doc["purchased"],
        json!({"remaining": "90.000000", "total": "800.000000", "grants": 2})
    );
    let text = common::tally_cli(&config, &["balance", acct]);
    assert!(
        text.contains("\n  recharge request below 100 credits: 500 credits\n"),
        "{text}"
    );
    tally.stop().await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_of_total_purchased_and_model_prices() {
    let env = TestEnv::with_config(with_tokens(test_config("purchased"))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(&env, dir.path());
    let tally = RunningTally::start(&env);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let c = server.client();
    let acct = "acme";
    let t0 = minutes_ago(10);
    let at = |s: i64| t0 + chrono::Duration::seconds(s);
    let t = env.cfg.kafka.topics.clone();
    let promo = ev::envelope(
        "tally.credit.grant.v1",
        "//billing.test",
        "g-promo",
        acct,
        &ts(at(0)),
        json!({"grant_id": "promo-1", "kind": "promo", "credits": "20",
               "expires_at": ts(at(90))}),
    );
    let phases: Vec<(String, Vec<u8>)> = vec![
        // A promo of 20 that expires unused at t0 + 90 s.
        (t.grants.clone(), promo),
        // A package of 1,000 (never expires) and a top-up of 500 (valid 3 months).
        (
            t.grants.clone(),
            ev::grant("g-pkg", acct, &ts(at(1)), "pkg-1", "package", "1000"),
        ),
        (
            t.grants.clone(),
            ev::grant("g-top", acct, &ts(at(60)), "top-1", "top_up", "500"),
        ),
        // 700 responses at t0 + 120 s: the promo is gone; the top-up (priority 30) pays 500
        // and is spent out, the package (40) the other 200.
        (
            t.chat_responses.clone(),
            ev::chat("chat-1", acct, &ts(at(120)), "gpt-4o-mini", "standard", 700),
        ),
    ];
    for (topic, payload) in phases {
        env.send(&[(topic, acct.to_owned(), payload)]).await;
        env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    }

    // Remaining 1,000 - 200 = 800 of total purchased 1,000 + 500 = 1,500 (the spent-out top-up
    // counts, the expired promo does not), over 2 grants.
    let doc = c.get("/v1/accounts/acme/balance", Some(ACME)).await.json();
    assert_eq!(doc["spendable"], "800.000000");
    assert_eq!(
        doc["purchased"],
        json!({"remaining": "800.000000", "total": "1500.000000", "grants": 2})
    );
    // tests/fixtures/prices.toml's only version, each rule that names a model.
    assert_eq!(
        doc["prices"],
        json!({"version": "t-2020", "models": [
            {"model": "gemini-3-flash", "kind": "ai_analysis", "match": {}, "unit": "analysis",
             "credits_per_unit": "0.25", "rule_id": "analysis"},
            {"model": "gpt-4o-mini", "kind": "chat_response", "match": {}, "unit": "response",
             "credits_per_unit": "1", "rule_id": "chat.std"},
            {"model": "gpt-4o-mini", "kind": "chat_response", "match": {"voice_tier": "premium"},
             "unit": "response", "credits_per_unit": "1.5", "rule_id": "chat.premium"},
        ]})
    );

    // `tally balance`: the same figures as text.
    let text = common::tally_cli(&config, &["balance", acct]);
    assert!(
        text.contains("\n  800 / 1,500 credits remaining\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "  prices in force (version t-2020):\n    gemini-3-flash (ai_analysis): 0.25 credits per analysis\n    gpt-4o-mini (chat_response): 1 credit per response\n    gpt-4o-mini (chat_response, voice_tier=premium): 1.5 credits per response\n"
        ),
        "{text}"
    );
    // `tally balance --json` is the API's document.
    let json_doc: Value =
        serde_json::from_str(&common::tally_cli(&config, &["balance", acct, "--json"])).unwrap();
    assert_eq!(json_doc["purchased"], doc["purchased"]);
    assert_eq!(json_doc["prices"], doc["prices"]);

    // The recharge settings come in pairs: the API names the missing one.
    let r = c
        .put(
            "/v1/accounts/acme/plan",
            Some(ADMIN),
            &json!({"plan_id": "p", "monthly_allowance": "0", "billing_day": 1,
                    "overage_policy": "settle_from_next_grant",
                    "recharge_threshold_credits": "100"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "recharge_credits".to_owned()),
        "{}",
        r.text()
    );

    server.stop().await;
    tally.stop().await;
}
