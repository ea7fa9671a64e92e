//! Issue 14, item 1: holds for live usage, against the real services (Kafka, PostgreSQL,
//! ClickHouse), with Tally running as `tally run --role all` runs it and its API served:
//! - two concurrent holds that together exceed the balance: one is refused with 402 and the
//!   available credits; a partial hold takes what is left, the next finds nothing;
//! - a hold settled by its usage event (`data.hold_id`): the balance exact, the hold gone;
//! - a hold expiring (TTL): its credits available again, the scheduler marks it expired;
//! - heartbeat extension; explicit release; idempotent re-POST (and 409 with other terms);
//! - usage debited while a hold is live leaves it without credits: `credits_exhausted`
//!   naming the hold, in the alert outbox.
//!
//! Each case has an account of its own, granted its credits once by the shared set-up.
//! Prices (tests/fixtures/prices.toml): an inbound call costs 1 credit per started minute
//! (rule `call.in`, increment 60 s); a standard `gpt-4o-mini` chat response 1 credit. Every
//! expected figure is worked out by hand in the comments.

mod common;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use hyper::Method;
use serde_json::{json, Value};

use common::api::{with_tokens, Client, Server, ACME, ADMIN, INGEST};
use common::{ev, test_config, RunningTally, TestEnv};

struct Fixture {
    env: TestEnv,
    client: Client,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Option<Fixture>> = std::sync::OnceLock::new();
    common::set_up_once(&FIXTURE, set_up)
}

/// The accounts of the cases and the credits granted to each (top-ups, dated a minute ago).
const ACCOUNTS: &[(&str, &str)] = &[
    ("hold-race", "100"),
    ("hold-settle", "100"),
    ("hold-ttl", "100"),
    ("hold-beat", "100"),
    ("hold-release", "100"),
    ("hold-retry", "100"),
    ("hold-drain", "10"),
    ("hold-release-alert", "10"),
];

async fn set_up() -> (Fixture, (RunningTally, Server)) {
    let mut cfg = with_tokens(test_config("holds"));
    // The scheduler marks expired holds within a few hundred milliseconds.
    cfg.pipeline.scheduler_interval_ms = 200;
    let env = TestEnv::with_config(cfg).await;
    let tally = RunningTally::start(&env);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let grants: Vec<(String, String, Vec<u8>)> = ACCOUNTS
        .iter()
        .map(|(acct, credits)| {
            (
                env.cfg.kafka.topics.grants.clone(),
                (*acct).to_owned(),
                ev::grant(
                    &format!("g-{acct}"),
                    acct,
                    &ts(minutes_ago(1)),
                    &format!("top-{acct}"),
                    "top_up",
                    credits,
                ),
            )
        })
        .collect();
    env.send(&grants).await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    let client = server.client();
    (Fixture { env, client }, (tally, server))
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn minutes_ago(m: i64) -> DateTime<Utc> {
    let t = Utc::now() - chrono::Duration::minutes(m);
    Utc.timestamp_opt(t.timestamp(), 0).unwrap()
}

async fn hold(c: &Client, acct: &str, body: Value) -> common::api::Reply {
    c.post(&format!("/v1/accounts/{acct}/holds"), Some(INGEST), &body)
        .await
}

async fn balance(c: &Client, acct: &str) -> Value {
    let r = c
        .get(&format!("/v1/accounts/{acct}/balance"), Some(ADMIN))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn get_hold(c: &Client, acct: &str, hold_id: &str) -> common::api::Reply {
    c.get(&format!("/v1/accounts/{acct}/holds/{hold_id}"), Some(ADMIN))
        .await
}

/// (spendable, held, available) of the balance document.
fn figures(b: &Value) -> (String, String, String) {
    let s = |k: &str| {
        b[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {b}"))
            .to_owned()
    };
    (s("spendable"), s("held"), s("available"))
}

fn strings(a: &str, b: &str, c: &str) -> (String, String, String) {
    (a.to_owned(), b.to_owned(), c.to_owned())
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn two_concurrent_holds_that_exceed_the_balance_one_is_refused() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-race";
    // 100 credits; two holds of 60, all or nothing, at once: 60 + 60 > 100.
    let body = |id: &str| {
        json!({"hold_id": id, "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "60", "partial": false})
    };
    let (a, b) = tokio::join!(
        hold(&c, acct, body("race-a")),
        hold(&c, acct, body("race-b"))
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 402], "{} / {}", a.text(), b.text());
    let (won, lost) = if a.status == 201 { (a, b) } else { (b, a) };
    let h = won.json();
    // 60 credits at 1 credit per started minute pay for 60 minutes = 3,600 s.
    assert_eq!(h["credits"], "60.000000");
    assert_eq!(h["seconds"], 3600);
    assert_eq!(h["units"], Value::Null);
    assert_eq!(h["unit"], "minute");
    assert_eq!(h["rule_id"], "call.in");
    assert_eq!(h["status"], "live");
    assert_eq!(
        (
            h["spendable"].clone(),
            h["held"].clone(),
            h["available"].clone()
        ),
        (json!("100.000000"), json!("60.000000"), json!("40.000000"))
    );
    // The refused one: 100 - 60 = 40 available.
    assert_eq!(lost.code(), "insufficient_credits");
    let e = &lost.json()["error"];
    assert_eq!(e["available"], "40.000000", "{e}");
    assert_eq!(e["held"], "60.000000");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "60.000000", "40.000000")
    );

    // Partial (the default): a hold for 10 minutes (10 credits) fits; one for 60 credits takes
    // the 30 left, which cover 30 minutes; then nothing is left: 402 with 0 available.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "ten-min", "kind": "call", "attributes": {"direction": "inbound"},
               "seconds": 600}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        (r.json()["credits"].clone(), r.json()["seconds"].clone()),
        (json!("10.000000"), json!(600))
    );
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "rest", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "60"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["credits"], "30.000000");
    assert_eq!(r.json()["seconds"], 1800);
    assert_eq!(r.json()["available"], "0.000000");
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "none-left", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "1"}),
    )
    .await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["error"]["available"], "0.000000");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "100.000000", "0.000000")
    );
    // The hold that took the last credits fired credits_exhausted naming it.
    let store = f.env.store().await;
    let payload: String = store
        .client()
        .query_one(
            "SELECT payload FROM alert_outbox WHERE alert_id = $1",
            &[&"hold-race/credits_exhausted:hold:rest/1"],
        )
        .await
        .unwrap()
        .get(0);
    let alert: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(alert["type"], "tally.alert.credits_exhausted.v1");
    assert_eq!(alert["data"]["hold_id"], "rest");
    assert_eq!(alert["data"]["available"], "0.000000");
    assert_eq!(alert["data"]["held"], "100.000000");
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_hold_is_settled_by_the_usage_event_that_names_it() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-settle";
    // 10 minutes of an inbound call: 10 credits held of 100.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "call-77", "kind": "call", "attributes": {"direction": "inbound"},
               "seconds": 600, "ttl_seconds": 300}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["credits"], "10.000000");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "10.000000", "90.000000")
    );
    // The call: answered 5 min 30 s, so 6 started minutes = 6 credits, naming the hold.
    let end = minutes_ago(0) - chrono::Duration::seconds(5);
    let answered = end - chrono::Duration::seconds(330);
    let call = ev::envelope(
        "tally.usage.call.v1",
        "//voice.test/calls",
        "call-77-usage",
        acct,
        &ts(end),
        json!({"call_id": "call-77", "direction": "inbound", "channel": "phone",
               "started_at": ts(answered - chrono::Duration::seconds(10)),
               "answered_at": ts(answered), "ended_at": ts(end), "hold_id": "call-77"}),
    );
    f.env
        .send(&[(f.env.cfg.kafka.topics.calls.clone(), acct.to_owned(), call)])
        .await;
    f.env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    // 100 - 6 = 94 spendable, nothing held: the hold is released in the debit's transaction.
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("94.000000", "0.000000", "94.000000")
    );
    let h = get_hold(&c, acct, "call-77").await.json();
    assert_eq!(h["status"], "settled");
    assert_eq!(
        h["settled_by"],
        json!({"source": "//voice.test/calls", "id": "call-77-usage"})
    );
    // Settled: it can no longer be extended.
    let r = c
        .post(
            &format!("/v1/accounts/{acct}/holds/call-77/heartbeat"),
            Some(INGEST),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_hold_expires_at_its_ttl_and_its_credits_are_available_again() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-ttl";
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "short", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "70", "ttl_seconds": 3}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "70.000000", "30.000000")
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Past its TTL it no longer counts, whether or not the scheduler has written it.
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "0.000000", "100.000000")
    );
    assert_eq!(
        get_hold(&c, acct, "short").await.json()["status"],
        "expired"
    );
    // The whole 100 can be held again, all or nothing.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "all", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "100", "partial": false}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // The scheduler (every 200 ms here) writes the expiry.
    let store = f.env.store().await;
    let mut state = String::new();
    for _ in 0..50 {
        state = store
            .client()
            .query_one(
                "SELECT state FROM holds WHERE account_id = $1 AND hold_id = 'short'",
                &[&acct],
            )
            .await
            .unwrap()
            .get(0);
        if state == "expired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state, "expired");
    // An expired hold cannot be extended.
    let r = c
        .post(
            &format!("/v1/accounts/{acct}/holds/short/heartbeat"),
            Some(INGEST),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_heartbeat_extends_a_live_hold() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-beat";
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "beating", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "25", "ttl_seconds": 2}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let first_expiry: DateTime<Utc> = r.json()["expires_at"].as_str().unwrap().parse().unwrap();
    let before = Utc::now();
    // No body: the hold's own TTL (2 s) from now; then 60 s.
    let path = format!("/v1/accounts/{acct}/holds/beating/heartbeat");
    let r = c
        .send(Method::POST, &path, Some(INGEST), None, Vec::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["heartbeats"], 1);
    let r = c
        .post(&path, Some(INGEST), &json!({"ttl_seconds": 60}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.json();
    assert_eq!(h["heartbeats"], 2);
    assert_eq!(h["ttl_seconds"], 60);
    let expiry: DateTime<Utc> = h["expires_at"].as_str().unwrap().parse().unwrap();
    assert!(
        expiry >= before + chrono::Duration::seconds(60),
        "{expiry} {before}"
    );
    assert!(expiry > first_expiry);
    // Past its first TTL it is still live and held.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get_hold(&c, acct, "beating").await.json()["status"], "live");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "25.000000", "75.000000")
    );
    // Unknown hold: 404; an account token may read its own holds only, and place none.
    let r = c
        .post(
            &format!("/v1/accounts/{acct}/holds/nope/heartbeat"),
            Some(INGEST),
            &json!({}),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "hold_not_found".to_owned()));
    let r = c
        .post(
            &format!("/v1/accounts/{acct}/holds"),
            Some(ACME),
            &json!({"hold_id": "x", "kind": "call", "credits": "1"}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = c
        .post(
            "/v1/accounts/acme/holds",
            Some(ACME),
            &json!({"hold_id": "x", "kind": "call", "credits": "1"}),
        )
        .await;
    assert_eq!(r.status, 403);
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_released_hold_gives_its_credits_back() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-release";
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "cancel-me", "kind": "chat_response",
               "attributes": {"model": "gpt-4o-mini"}, "credits": "40.5"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // 1 credit per response: 40.5 credits pay for 40 whole responses; no seconds.
    assert_eq!(r.json()["units"], 40);
    assert_eq!(r.json()["seconds"], Value::Null);
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "40.500000", "59.500000")
    );
    let path = format!("/v1/accounts/{acct}/holds/cancel-me");
    let r = c
        .send(Method::DELETE, &path, Some(INGEST), None, Vec::new())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "released");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "0.000000", "100.000000")
    );
    // Releasing again answers the hold as it is; a heartbeat finds it ended.
    let r = c
        .send(Method::DELETE, &path, Some(INGEST), None, Vec::new())
        .await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("released"))
    );
    let r = c
        .post(&format!("{path}/heartbeat"), Some(INGEST), &json!({}))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_hold_posted_again_is_the_same_hold() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-retry";
    let body = json!({"hold_id": "retry-1", "kind": "call",
                      "attributes": {"direction": "inbound"}, "seconds": 120});
    let first = hold(&c, acct, body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.text());
    let again = hold(&c, acct, body.clone()).await;
    assert_eq!(again.status, 200, "{}", again.text());
    let (a, b) = (first.json(), again.json());
    for k in ["credits", "seconds", "created_at", "expires_at", "status"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    // 2 minutes = 2 credits, held once.
    assert_eq!(a["credits"], "2.000000");
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("100.000000", "2.000000", "98.000000")
    );
    // The same id with other terms: 409.
    let mut other = body;
    other["seconds"] = json!(180);
    let r = hold(&c, acct, other).await;
    assert_eq!((r.status, r.field()), (409, "hold_id".to_owned()));
    // Exactly one of credits and seconds.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "both", "kind": "call", "credits": "1", "seconds": 60}),
    )
    .await;
    assert_eq!(r.status, 400);
    // A usage no rule prices.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "u", "kind": "teleport", "credits": "1"}),
    )
    .await;
    assert_eq!((r.status, r.field()), (400, "kind".to_owned()));
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn usage_that_leaves_a_live_hold_without_credits_alerts_naming_it() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-drain";
    // 10 credits; a hold of 8 leaves 2 available.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "live-call", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "8", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["available"], "2.000000");
    // 5 chat responses elsewhere (5 credits, no hold): spendable 5, held 8, available -3.
    let chat = ev::chat(
        "drain-chat",
        acct,
        &ts(minutes_ago(0)),
        "gpt-4o-mini",
        "standard",
        5,
    );
    f.env
        .send(&[(
            f.env.cfg.kafka.topics.chat_responses.clone(),
            acct.to_owned(),
            chat,
        )])
        .await;
    f.env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("5.000000", "8.000000", "-3.000000")
    );
    let store = f.env.store().await;
    let payload: String = store
        .client()
        .query_one(
            "SELECT payload FROM alert_outbox WHERE alert_id = $1",
            &[&"hold-drain/credits_exhausted:hold:live-call/1"],
        )
        .await
        .unwrap()
        .get(0);
    let alert: Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(alert["type"], "tally.alert.credits_exhausted.v1");
    assert_eq!(
        (
            alert["data"]["hold_id"].clone(),
            alert["data"]["credits"].clone(),
            alert["data"]["spendable"].clone(),
            alert["data"]["held"].clone(),
            alert["data"]["available"].clone()
        ),
        (
            json!("live-call"),
            json!("8.000000"),
            json!("5.000000"),
            json!("8.000000"),
            json!("-3.000000")
        )
    );
    // Now nothing is available: a new hold is refused with the (negative) figure.
    let r = hold(
        &c,
        acct,
        json!({"hold_id": "another", "kind": "call", "attributes": {"direction": "inbound"},
               "credits": "1"}),
    )
    .await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["error"]["available"], "-3.000000");
    // A top-up of 10: spendable 15, held 8, available 7 — the hold's alert is resolved, by
    // the batch that brought the credits, under the same key.
    f.env
        .send(&[(
            f.env.cfg.kafka.topics.grants.clone(),
            acct.to_owned(),
            ev::grant(
                "drain-top-up",
                acct,
                &ts(minutes_ago(0)),
                "top-up-2",
                "top_up",
                "10",
            ),
        )])
        .await;
    f.env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("15.000000", "8.000000", "7.000000")
    );
    // The hold's alerts, exactly: fired once, then resolved (the account's own low-balance
    // alerts are not this test's).
    let alerts = hold_alerts(&f.env, acct).await;
    let ids: Vec<&str> = alerts.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "hold-drain/credits_exhausted:hold:live-call/1",
            "hold-drain/credits_exhausted:hold:live-call/1/resolved"
        ]
    );
    let resolved = &alerts[1].1;
    assert_eq!(
        resolved["type"],
        "tally.alert.credits_exhausted.resolved.v1"
    );
    assert_eq!(
        (
            resolved["data"]["resolves"].clone(),
            resolved["data"]["hold_id"].clone(),
            resolved["data"]["held"].clone(),
            resolved["data"]["available"].clone()
        ),
        (
            json!("hold-drain/credits_exhausted:hold:live-call/1"),
            json!("live-call"),
            json!("8.000000"),
            json!("7.000000")
        )
    );
}

#[tokio::test]
async fn a_release_that_frees_credits_resolves_the_other_holds_alerts() {
    let f = fixture();
    let c = f.client;
    let acct = "hold-release-alert";
    let place = |hold_id: &'static str, credits: &'static str| {
        hold(
            &c,
            acct,
            json!({"hold_id": hold_id, "kind": "call", "attributes": {"direction": "inbound"},
                   "credits": credits, "ttl_seconds": 600}),
        )
    };
    // 10 credits: a hold of 6 leaves 4; a hold of 4 takes them all (available 0), and its
    // own credits_exhausted fires with it.
    let r = place("first", "6").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = place("second", "4").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["available"], "0.000000");
    // Releasing the first gives 6 back: spendable 10, held 4, available 6, and the second
    // hold's alert is resolved at once (no usage batch needed).
    let r = c
        .send(
            Method::DELETE,
            &format!("/v1/accounts/{acct}/holds/first"),
            Some(INGEST),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        figures(&balance(&c, acct).await),
        strings("10.000000", "4.000000", "6.000000")
    );
    let alerts = hold_alerts(&f.env, acct).await;
    let ids: Vec<&str> = alerts.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "hold-release-alert/credits_exhausted:hold:second/1",
            "hold-release-alert/credits_exhausted:hold:second/1/resolved"
        ]
    );
    let resolved = &alerts[1].1;
    assert_eq!(
        (
            resolved["type"].clone(),
            resolved["data"]["resolves"].clone(),
            resolved["data"]["held"].clone(),
            resolved["data"]["available"].clone()
        ),
        (
            json!("tally.alert.credits_exhausted.resolved.v1"),
            json!("hold-release-alert/credits_exhausted:hold:second/1"),
            json!("4.000000"),
            json!("6.000000")
        )
    );
    // Releasing it again resolves nothing more.
    let count_before: i64 = f
        .env
        .store()
        .await
        .client()
        .query_one(
            "SELECT count(*) FROM alert_outbox WHERE account_id = $1",
            &[&acct],
        )
        .await
        .unwrap()
        .get(0);
    let r = c
        .send(
            Method::DELETE,
            &format!("/v1/accounts/{acct}/holds/first"),
            Some(INGEST),
            None,
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let n: i64 = f
        .env
        .store()
        .await
        .client()
        .query_one(
            "SELECT count(*) FROM alert_outbox WHERE account_id = $1",
            &[&acct],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, count_before);
}

/// The account's hold alerts in the outbox (id, payload), in id order: the account's own
/// balance alerts left out.
async fn hold_alerts(env: &TestEnv, acct: &str) -> Vec<(String, Value)> {
    env.store()
        .await
        .client()
        .query(
            "SELECT alert_id, payload FROM alert_outbox WHERE account_id = $1 ORDER BY alert_id",
            &[&acct],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(id, _)| id.contains(":hold:"))
        .map(|(id, p)| (id, serde_json::from_str(&p).unwrap()))
        .collect()
}
