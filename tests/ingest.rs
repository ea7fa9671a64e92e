//! `POST /v1/events` against the real services: one event and batches, published to their
//! usage topics keyed by account and answered after the broker's acknowledgement; invalid
//! events refused with the pipelines' reasons (nothing of them reaches Kafka); the token
//! rules (ingest role, its sources, account tokens refused); the limits; and the ledger
//! debiting exactly what was accepted. Expected credits by hand from
//! tests/fixtures/prices.toml. Every status is checked against `schemas/openapi.yaml`.

mod common;

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use hyper::Method;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use common::api::{with_tokens, Server, ACME, ADMIN, INGEST, INGEST_CHAT};
use common::{ev, test_config, RunningTally, TestEnv};
use tally::app::Role;

const SINGLE: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

fn event(bytes: Vec<u8>) -> Value {
    serde_json::from_slice(&bytes).unwrap()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_after_the_ack_and_debited() {
    let mut cfg = with_tokens(test_config("ingest"));
    cfg.api.ingest_max_events = 4;
    cfg.api.ingest_max_bytes = 4096;
    let env = TestEnv::with_config(cfg).await;
    let topics = env.cfg.kafka.topics.clone();
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let client = server.client();
    let post = |token: &'static str, content_type: &'static str, body: Vec<u8>| async move {
        client
            .send(
                Method::POST,
                "/v1/events",
                Some(token),
                Some(content_type),
                body,
            )
            .await
    };

    let day = Utc::now() - chrono::Duration::days(1);
    let at = |secs: i64| {
        (day + chrono::Duration::seconds(secs)).to_rfc3339_opts(SecondsFormat::Secs, true)
    };
    env.send(&[(
        topics.grants.clone(),
        "acme".into(),
        ev::grant("g-1", "acme", &at(0), "pkg-1", "package", "100"),
    )])
    .await;

    // One event: 202 once acknowledged, with where it was written.
    let chat = ev::chat("h-1", "acme", &at(100), "gpt-4o-mini", "premium", 2); // 2 x 1.5 = 3
    let r = post(INGEST, SINGLE, chat.clone()).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let doc = r.json();
    assert_eq!(
        (doc["accepted"].as_u64(), doc["rejected"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(doc["events"][0]["status"], "accepted");
    assert_eq!(doc["events"][0]["id"], "h-1");
    assert_eq!(doc["events"][0]["source"], "//chat.test");
    assert_eq!(doc["events"][0]["topic"], topics.chat_responses.as_str());

    // A batch: valid events published, invalid ones refused with their reasons.
    let call = ev::call(
        "h-2",
        "acme",
        "inbound",
        &at(200),
        Some(&at(200)),
        &at(290),
        0,
    ); // 90 s -> 2 min -> 2
    let mut no_subject = event(ev::chat(
        "h-3",
        "acme",
        &at(300),
        "gpt-4o-mini",
        "standard",
        1,
    ));
    no_subject.as_object_mut().unwrap().remove("subject");
    let unpriced = ev::chat("h-4", "acme", &at(310), "no-such-model", "standard", 1);
    let batch = json!([
        event(call.clone()),
        no_subject,
        event(unpriced),
        event(ev::grant(
            "h-5",
            "acme",
            &at(320),
            "pkg-2",
            "package",
            "1000"
        )),
    ]);
    let r = post(INGEST, BATCH, serde_json::to_vec(&batch).unwrap()).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let doc = r.json();
    assert_eq!(
        (doc["accepted"].as_u64(), doc["rejected"].as_u64()),
        (Some(1), Some(3))
    );
    let outcomes: Vec<(&str, Option<&str>, Option<&str>)> = doc["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["status"].as_str().unwrap(),
                e["reason"].as_str(),
                e["field"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("accepted", None, None),
            ("rejected", Some("missing_field"), Some("subject")),
            ("rejected", Some("unpriced"), None),
            ("rejected", Some("not_usage"), Some("type")),
        ]
    );
    assert_eq!(doc["events"][0]["topic"], topics.calls.as_str());

    // One invalid event: 202 with its outcome, the reason and field; nothing published.
    let mut bad = event(ev::chat(
        "h-6",
        "acme",
        &at(400),
        "gpt-4o-mini",
        "standard",
        1,
    ));
    bad["data"]["responses"] = json!("two");
    let r = post(INGEST, SINGLE, serde_json::to_vec(&bad).unwrap()).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let doc = r.json();
    assert_eq!(
        (doc["accepted"].as_u64(), doc["rejected"].as_u64()),
        (Some(0), Some(1))
    );
    let e = &doc["events"][0];
    assert_eq!(
        (e["status"].as_str(), e["reason"].as_str()),
        (Some("rejected"), Some("wrong_type"))
    );
    assert_eq!(e["field"], "data.responses");

    // Tokens: an ingest token limited to //chat.test publishes its source only; an account
    // token may not publish; an admin may.
    let r = post(INGEST_CHAT, SINGLE, call.clone()).await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["events"][0]["reason"], "forbidden_source");
    let r = post(
        INGEST_CHAT,
        BATCH,
        serde_json::to_vec(&json!([
            event(ev::chat(
                "h-7",
                "acme",
                &at(500),
                "gpt-4o-mini",
                "standard",
                3
            )), // 3
            event(ev::call(
                "h-8",
                "acme",
                "inbound",
                &at(510),
                Some(&at(510)),
                &at(600),
                0
            )),
        ]))
        .unwrap(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["events"][1]["reason"], "forbidden_source");
    let r = post(ACME, SINGLE, chat.clone()).await;
    assert_eq!((r.status, r.code()), (403, "forbidden".into()));
    // The same event again (a client retry): published again, debited once.
    let r = post(ADMIN, SINGLE, chat.clone()).await;
    assert_eq!(r.status, 202, "{}", r.text());

    // The request's own faults.
    let r = post(INGEST, "application/json", chat.clone()).await;
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type".into()));
    let r = post(INGEST, BATCH, b"[]".to_vec()).await;
    assert_eq!(r.status, 400);
    let r = post(INGEST, BATCH, chat.clone()).await; // an object, not an array
    assert_eq!(r.status, 400);
    let r = post(INGEST, BATCH, b"[1]".to_vec()).await; // not an object
    assert_eq!((r.status, r.field()), (400, "body[0]".into()));
    let r = post(INGEST, SINGLE, b"[]".to_vec()).await;
    assert_eq!((r.status, r.field()), (400, "body".into()));
    let five = json!([
        event(chat.clone()),
        event(chat.clone()),
        event(chat.clone()),
        event(chat.clone()),
        event(chat.clone())
    ]);
    let r = post(INGEST, BATCH, serde_json::to_vec(&five).unwrap()).await;
    assert_eq!((r.status, r.field()), (400, "body".into()), "{}", r.text());
    let r = post(INGEST, BATCH, vec![b' '; 4097]).await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".into()));
    let r = client
        .send(Method::POST, "/v1/events", None, Some(SINGLE), chat.clone())
        .await;
    assert_eq!(r.status, 401);

    // Only the accepted events reached Kafka: h-1 twice, h-2, h-7.
    let published: i64 = env.ends().values().sum();
    assert_eq!(published, 1 + 4, "the grant, then h-1, h-2, h-7, h-1 again");

    let tally = RunningTally::start_role(&env, Role::Ledger);
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    tally.stop().await;
    server.stop().await;

    // 100 - 3 (h-1, once) - 2 (h-2) - 3 (h-7) = 92
    let store = env.store().await;
    let balance = store.balance("acme").await.unwrap().unwrap();
    assert_eq!(balance.spendable, dec!(92));
    assert!(env.dead_letters().is_empty());
}
