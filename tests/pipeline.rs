//! End-to-end through the real services: a known stream (every usage kind, grants,
//! duplicates, malformed and unpriced events) gives exact balances and ledger entries in
//! PostgreSQL, exact totals in ClickHouse, and each rejected message in the dead-letter topic
//! with its reason. Expected credits are computed by hand from tests/fixtures/prices.toml.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use common::{ev, TestEnv};

fn ts(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_stream_gives_exact_ledger_analytics_and_dead_letters() {
    let env = TestEnv::new("known").await;
    let topics = env.cfg.kafka.topics.clone();
    let tally = common::RunningTally::start(&env);

    let day = Utc::now() - chrono::Duration::days(1);
    let at = |secs: i64| ts(day + chrono::Duration::seconds(secs));

    // Phase 1: grants (acct-a: top-up 50 consumed before package 100, by priority).
    env.send(&[
        (
            topics.grants.clone(),
            "acct-a".into(),
            ev::grant("g-1", "acct-a", &at(0), "pkg-1", "package", "100"),
        ),
        (
            topics.grants.clone(),
            "acct-a".into(),
            ev::grant("g-2", "acct-a", &at(1), "top-1", "top_up", "50"),
        ),
        // the same purchase delivered twice under another event id credits once
        (
            topics.grants.clone(),
            "acct-a".into(),
            ev::grant("g-1-again", "acct-a", &at(2), "pkg-1", "package", "100"),
        ),
    ])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;

    // Phase 2: usage, duplicates and bad input.
    let call = ev::call(
        "call-1",
        "acct-a",
        "inbound",
        &at(100),
        Some(&at(105)),
        &at(230),
        5,
    ); // 125 s talk - 5 hold = 120 s -> 2 min -> 2
    env.send(&[
        (topics.calls.clone(), "acct-a".into(), call.clone()),
        (topics.calls.clone(), "acct-a".into(), call), // producer retry: same source+id
        (
            topics.calls.clone(),
            "acct-a".into(),
            ev::call(
                "call-2",
                "acct-a",
                "outbound",
                &at(300),
                Some(&at(301)),
                &at(900),
                0,
            ),
        ), // free
        (
            topics.calls.clone(),
            "acct-a".into(),
            ev::call("call-3", "acct-a", "inbound", &at(400), None, &at(430), 0),
        ), // unanswered: 0
        (
            topics.chat_responses.clone(),
            "acct-a".into(),
            ev::chat("chat-1", "acct-a", &at(500), "gpt-4o-mini", "premium", 1),
        ), // 1.5
        (
            topics.chat_responses.clone(),
            "acct-a".into(),
            ev::chat("chat-2", "acct-a", &at(510), "gpt-4o-mini", "standard", 3),
        ), // 3
        (
            topics.instance_hours.clone(),
            "acct-a".into(),
            ev::instance("inst-1", "acct-a", "gpu.a10", &at(0), &at(5400)),
        ), // 90 min -> 2 h -> 20
        (
            topics.metered.clone(),
            "acct-a".into(),
            ev::analysis("an-1", "acct-a", &at(600), "gemini-3-flash", "4"),
        ), // 1
        (
            topics.chat_responses.clone(),
            "acct-b".into(),
            ev::chat("chat-b1", "acct-b", &at(700), "gpt-4o-mini", "standard", 2),
        ), // 2, no grants: overage
        // bad input: oversized, invalid UTF-8, empty (a tombstone), hostile nesting
        (topics.metered.clone(), "acct-a".into(), {
            let mut big = ev::analysis("an-big", "acct-a", &at(601), "gemini-3-flash", "1");
            big.splice(
                1..1,
                format!("\"pad\":\"{}\",", "x".repeat(100_000)).into_bytes(),
            );
            big
        }),
        (
            topics.calls.clone(),
            "acct-a".into(),
            b"{\"specversion\":\"1.0\",\"id\":\"\xff\xfe\"}".to_vec(),
        ),
        (topics.calls.clone(), "acct-a".into(), Vec::new()),
        (
            topics.grants.clone(),
            "acct-a".into(),
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            topics.calls.clone(),
            "acct-a".into(),
            b"{\"specversion\":\"1.0\",\"id\":".to_vec(),
        ),
        (
            topics.chat_responses.clone(),
            "acct-a".into(),
            ev::chat("chat-x", "acct-a", &at(800), "no-such-model", "standard", 1),
        ),
        (
            topics.calls.clone(),
            "acct-a".into(),
            ev::call(
                "call-bad",
                "acct-a",
                "inbound",
                &at(100),
                Some(&at(200)),
                &at(150),
                0,
            ),
        ),
    ])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;

    // Phase 3: a top-up settles acct-b's overage first.
    env.send(&[(
        topics.grants.clone(),
        "acct-b".into(),
        ev::grant("g-b1", "acct-b", &at(900), "top-b1", "top_up", "10"),
    )])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    env.wait_analytics_caught_up(Duration::from_secs(60)).await;

    let store = env.store().await;
    let a = store.balance("acct-a").await.unwrap().unwrap();
    // 2 + 1.5 + 3 + 20 + 1 = 27.5, all from the top-up (priority 30 before package 40).
    assert_eq!(a.spendable, dec!(122.5));
    assert_eq!(a.overage, Decimal::ZERO);
    let remaining: BTreeMap<_, _> = a
        .grants
        .iter()
        .map(|g| (g.grant_id.as_str(), g.remaining))
        .collect();
    assert_eq!(
        remaining,
        BTreeMap::from([("pkg-1", dec!(100)), ("top-1", dec!(22.5))])
    );

    let entries = store.entries("acct-a", 100).await.unwrap();
    let mut lines: Vec<(String, Option<String>, Decimal, Option<String>)> = entries
        .iter()
        .map(|e| {
            (
                e.kind.clone(),
                e.grant_id.clone(),
                e.amount,
                e.event_id.clone(),
            )
        })
        .collect();
    lines.sort();
    let expect = |k: &str, g: &str, amount: Decimal, id: &str| {
        (
            k.to_owned(),
            Some(g.to_owned()),
            amount,
            Some(id.to_owned()),
        )
    };
    assert_eq!(
        lines,
        vec![
            expect("debit", "top-1", dec!(-20), "inst-1"),
            expect("debit", "top-1", dec!(-3), "chat-2"),
            expect("debit", "top-1", dec!(-2), "call-1"),
            expect("debit", "top-1", dec!(-1.5), "chat-1"),
            expect("debit", "top-1", dec!(-1), "an-1"),
            expect("grant", "pkg-1", dec!(100), "g-1"),
            expect("grant", "top-1", dec!(50), "g-2"),
        ]
    );
    // Every balance is explained line by line.
    let mut balance = Decimal::ZERO;
    for e in &entries {
        balance += e.amount;
        assert_eq!(e.balance_after, balance, "{e:?}");
    }
    assert_eq!(balance, dec!(122.5));

    let b = store.balance("acct-b").await.unwrap().unwrap();
    assert_eq!((b.spendable, b.overage), (dec!(8), Decimal::ZERO));
    let b_lines: Vec<(String, Decimal, Decimal, Decimal)> = store
        .entries("acct-b", 10)
        .await
        .unwrap()
        .iter()
        .map(|e| (e.kind.clone(), e.amount, e.balance_after, e.overage_after))
        .collect();
    assert_eq!(
        b_lines,
        vec![
            ("overage".into(), dec!(-2), dec!(0), dec!(2)),
            ("grant".into(), dec!(10), dec!(10), dec!(2)),
            ("settle".into(), dec!(-2), dec!(8), dec!(0)),
        ]
    );

    // ClickHouse: every rated usage event once (the duplicate call counted once).
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    assert_eq!(
        sink.totals_by_account("acct-a").await.unwrap(),
        (7, dec!(27.5))
    );
    assert_eq!(
        sink.totals_by_account("acct-b").await.unwrap(),
        (1, dec!(2))
    );

    // Dead letters: each rejected message once, with its reason and origin.
    let letters = env.dead_letters();
    // The original bytes travel unchanged, whatever they are.
    assert!(letters
        .iter()
        .any(|d| d.payload == b"{\"specversion\":\"1.0\",\"id\":\"\xff\xfe\"}"));
    assert!(letters
        .iter()
        .any(|d| d.reason == "too_large" && d.payload.len() > 100_000));
    assert!(letters.iter().any(|d| d.payload.is_empty()));
    let mut dead: Vec<(String, Option<String>, String)> = letters
        .into_iter()
        .map(|d| (d.reason, d.field, d.source_topic))
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        vec![
            (
                "invalid_value".into(),
                Some("data.ended_at".into()),
                topics.calls.clone()
            ),
            ("malformed_json".into(), None, topics.grants.clone()),
            ("malformed_json".into(), None, topics.calls.clone()),
            ("malformed_json".into(), None, topics.calls.clone()),
            ("malformed_json".into(), None, topics.calls.clone()),
            ("too_large".into(), None, topics.metered.clone()),
            ("unpriced".into(), None, topics.chat_responses.clone()),
        ]
    );

    let report = tally.stop_report().await;
    let ledger_stats = report.ledger.expect("the ledger ran");
    assert_eq!(ledger_stats.dead_letters, 7);
    // The resent call is a dedupe duplicate; the grant delivered under another event id is
    // claimed but changes nothing (no entry above).
    assert_eq!(ledger_stats.duplicates, 1);
    assert!(report.analytics.is_some(), "the analytics pipeline ran");
}
