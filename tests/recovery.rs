//! Recovery paths against the real services:
//! - dead letters re-submitted with `replay` after the cause is fixed are applied exactly once;
//! - a JSON-lines backfill goes to the topics of its event types;
//! - while ClickHouse is unreachable the analytics pipeline holds back (nothing stored, nothing
//!   committed) and, once it is back, stores every row exactly once.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rust_decimal_macros::dec;
use tokio::net::{TcpListener, TcpStream};

use common::{ev, test_config, RunningTally, TestEnv};
use tally::app::Role;
use tally::event::Reason;

fn at(secs: i64) -> String {
    (Utc::now() - chrono::Duration::hours(2) + chrono::Duration::seconds(secs))
        .to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_dead_letters_apply_once_after_the_fix() {
    let env = TestEnv::new("replay").await;
    let t = env.cfg.kafka.topics.clone();
    let tally = RunningTally::start_role(&env, Role::Ledger);
    env.send(&[(
        t.grants.clone(),
        "acct-r".into(),
        ev::grant("rg-1", "acct-r", &at(0), "pkg", "package", "10"),
    )])
    .await;
    // The grant first: usage on another topic could otherwise be read before it.
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    env.send(&[
        (
            t.chat_responses.clone(),
            "acct-r".into(),
            ev::chat("rc-1", "acct-r", &at(10), "claude-sonnet", "standard", 2),
        ),
        (
            t.chat_responses.clone(),
            "acct-r".into(),
            ev::chat("rc-2", "acct-r", &at(20), "gpt-4o-mini", "standard", 1),
        ),
    ])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    tally.stop().await;
    let store = env.store().await;
    assert_eq!(
        store.balance("acct-r").await.unwrap().unwrap().spendable,
        dec!(9)
    );
    let dead = env.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "unpriced");

    // The fix: a price table that prices claude-sonnet at 2 credits per response.
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("prices.toml");
    let mut table = std::fs::read_to_string(&env.cfg.prices.path).unwrap();
    table.push_str(
        "\n[[version.rule]]\nid = \"chat.claude\"\nkind = \"chat_response\"\nmatch = { model = \"claude-sonnet\" }\nunit = \"response\"\ncredits_per_unit = \"2\"\n",
    );
    std::fs::write(&fixed, table).unwrap();
    let prices = Arc::new(tally::rating::PriceTable::load(&fixed).unwrap());

    let tally = RunningTally::start_with(env.cfg.clone(), prices, Role::Ledger);
    // Replaying twice (or replaying a reason with nothing to do) changes nothing more.
    tally::cli::replay_dead_letters(&env.cfg, Some(Reason::MalformedJson), false)
        .await
        .unwrap();
    tally::cli::replay_dead_letters(&env.cfg, Some(Reason::Unpriced), false)
        .await
        .unwrap();
    tally::cli::replay_dead_letters(&env.cfg, Some(Reason::Unpriced), false)
        .await
        .unwrap();
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;

    // Backfill from a JSON-lines file: one more chat response.
    let file = dir.path().join("backfill.jsonl");
    let line = String::from_utf8(ev::chat(
        "rc-3",
        "acct-r",
        &at(30),
        "gpt-4o-mini",
        "premium",
        2,
    ))
    .unwrap();
    std::fs::write(&file, format!("{line}\n\n{line}\n")).unwrap();
    tally::cli::replay_file(&env.cfg, &file).await.unwrap();
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    tally.stop().await;

    // 10 - 1 (rc-2) - 4 (rc-1, replayed twice, applied once) - 3 (rc-3, sent twice) = 2
    let b = store.balance("acct-r").await.unwrap().unwrap();
    assert_eq!((b.spendable, b.overage), (dec!(2), dec!(0)));
    let debits: Vec<(Option<String>, rust_decimal::Decimal)> = store
        .entries("acct-r", 50)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "debit")
        .map(|e| (e.event_id, e.amount))
        .collect();
    assert_eq!(debits.len(), 3, "{debits:?}");
    assert!(debits.contains(&(Some("rc-1".into()), dec!(-4))));
    assert!(debits.contains(&(Some("rc-3".into()), dec!(-3))));
}

/// A TCP proxy to ClickHouse that can refuse service, standing in for an outage.
async fn proxy(target: String, down: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            if down.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_holds_back_while_clickhouse_is_down() {
    let direct = test_config("chdown");
    let env = TestEnv::with_config(direct.clone()).await; // migrated through the direct URL
    let target = direct
        .clickhouse
        .url
        .trim_start_matches("http://")
        .to_owned();
    let down = Arc::new(AtomicBool::new(true));
    let mut via_proxy = direct.clone();
    via_proxy.clickhouse.url = proxy(target, down.clone()).await;
    let via_proxy = Arc::new(via_proxy);

    let tally = RunningTally::start_with(via_proxy.clone(), env.prices.clone(), Role::Analytics);
    let t = &env.cfg.kafka.topics;
    env.send(&[
        (
            t.chat_responses.clone(),
            "acct-d".into(),
            ev::chat("dc-1", "acct-d", &at(1), "gpt-4o-mini", "standard", 3),
        ),
        (
            t.metered.clone(),
            "acct-d".into(),
            ev::analysis("da-1", "acct-d", &at(2), "gemini-3-flash", "2"),
        ),
    ])
    .await;
    // Give the loop time to fetch the batch and fail against the "outage" a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    assert_eq!(
        sink.totals_by_account("acct-d").await.unwrap(),
        (0, dec!(0))
    );
    let keys: Vec<_> = env.ends().into_keys().collect();
    assert!(
        sink.load_positions(&env.cfg.kafka.analytics_group, &keys)
            .await
            .unwrap()
            .is_empty(),
        "no position may be stored while the rows are not"
    );

    down.store(false, Ordering::SeqCst);
    env.wait_analytics_caught_up(Duration::from_secs(60)).await;
    assert_eq!(
        sink.totals_by_account("acct-d").await.unwrap(),
        (2, dec!(3.5))
    );
    tally.stop().await;
}
