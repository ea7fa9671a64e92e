//! Billing never stops on bad data, against the real services: poison records between valid
//! ones are dead-lettered with their reason while every valid record is applied and the
//! partition moves on; a fault that is nobody's input (a broken schema) stops the ledger
//! loudly, naming the record, instead of retrying forever. Expected balances are computed by
//! hand from tests/fixtures/prices.toml (a standard chat response costs 1 credit, a premium
//! one 1.5).

mod common;

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tokio::sync::watch;

use common::{ev, TestEnv};

fn ts(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

async fn spendable(env: &TestEnv, account: &str) -> Decimal {
    env.store()
        .await
        .balance(account)
        .await
        .unwrap()
        .map(|b| b.spendable)
        .unwrap_or_else(|| panic!("{account} has no balance"))
}

/// A plain connection to the test's schema (for what the store does not expose).
async fn client(env: &TestEnv) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(env.cfg.postgres.url.expose(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("SET search_path TO {}", env.cfg.postgres.schema))
        .await
        .unwrap();
    client
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    client(env).await.query_one(sql, &[]).await.unwrap().get(0)
}

async fn execute(env: &TestEnv, sql: &str) {
    client(env).await.batch_execute(sql).await.unwrap();
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_the_rest_applied() {
    let env = TestEnv::new("poison").await;
    let topics = env.cfg.kafka.topics.clone();
    // A constraint PostgreSQL enforces on the data itself (as a CHECK, a range or a unique
    // key would): claims of ids beginning "refuse-" are refused with SQLSTATE 23514.
    execute(
        &env,
        "ALTER TABLE processed_events ADD CONSTRAINT refuse_poison CHECK (event_id NOT LIKE 'refuse-%')",
    )
    .await;
    let day = Utc::now() - chrono::Duration::hours(6);
    let at = |secs: i64| ts(day + chrono::Duration::seconds(secs));
    let chat = |id: &str, account: &str, secs: i64, tier: &str, n: u32| {
        (
            topics.chat_responses.clone(),
            account.to_owned(),
            ev::chat(id, account, &at(secs), "gpt-4o-mini", tier, n),
        )
    };
    env.send(&[
        (
            topics.grants.clone(),
            "acct-a".into(),
            ev::grant("g-a", "acct-a", &at(0), "pkg-a", "package", "100"),
        ),
        (
            topics.grants.clone(),
            "acct-b".into(),
            ev::grant("g-b", "acct-b", &at(1), "pkg-b", "package", "100"),
        ),
        // A grant id that would collide with the allowance Tally generates at a reset.
        (
            topics.grants.clone(),
            "acct-a".into(),
            ev::grant(
                "g-collide",
                "acct-a",
                &at(2),
                "allowance:2026-12-20",
                "package",
                "7",
            ),
        ),
    ])
    .await;
    env.send(&[
        chat("a-1", "acct-a", 10, "standard", 2), // acct-a: 2
        // The NUL in the id is valid JSON (`\u0000`); PostgreSQL text cannot hold it.
        chat("p\u{0}oison", "acct-b", 11, "standard", 9),
        chat("refuse-1", "acct-a", 12, "standard", 3), // refused by PostgreSQL
        chat("b-1", "acct-b", 13, "standard", 4),      // acct-b: 4
        chat("refuse-2", "acct-b", 14, "premium", 1),  // refused by PostgreSQL
        chat("a-2", "acct-a", 15, "premium", 2),       // acct-a: 2 x 1.5 = 3
    ])
    .await;

    let ledger = common::RunningTally::start_role(&env, tally::app::Role::Ledger);
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    assert_eq!(spendable(&env, "acct-a").await, dec!(95)); // 100 - 2 - 3
    assert_eq!(spendable(&env, "acct-b").await, dec!(96)); // 100 - 4

    // The partition moved on: a record after the poison ones is applied too.
    env.send(&[chat("a-3", "acct-a", 20, "standard", 1)]).await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    assert_eq!(spendable(&env, "acct-a").await, dec!(94));
    assert!(!ledger.is_finished(), "the ledger keeps running");

    // Claimed: the 2 grants and 4 valid chats; nothing of the refused or rejected ones.
    assert_eq!(
        count(&env, "SELECT count(*) FROM processed_events").await,
        6
    );
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM processed_events WHERE event_id LIKE 'refuse-%'"
        )
        .await,
        0
    );

    let mut letters = env.dead_letters();
    letters.sort_by(|a, b| (&a.reason, &a.field, &a.detail).cmp(&(&b.reason, &b.field, &b.detail)));
    let seen: Vec<(&str, Option<&str>)> = letters
        .iter()
        .map(|l| (l.reason.as_str(), l.field.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("invalid_value", Some("data.grant_id")),
            ("invalid_value", Some("id")),
            ("refused_by_store", None),
            ("refused_by_store", None),
        ],
        "{letters:#?}"
    );
    for refused in &letters[2..] {
        assert!(
            refused.detail.contains("refuse_poison"),
            "the database's message names the constraint: {}",
            refused.detail
        );
        assert_eq!(refused.pipeline, "ledger");
        let payload = String::from_utf8_lossy(&refused.payload);
        assert!(
            payload.contains("\"refuse-"),
            "the original record, whole: {payload}"
        );
    }

    let stats = ledger
        .stop_report()
        .await
        .ledger
        .expect("the ledger pipeline ran");
    assert_eq!(stats.dead_letters, 4);
    assert_eq!(stats.applied, 6);
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_schema_stops_the_ledger_naming_the_record() {
    let env = TestEnv::new("poison_bug").await;
    let topics = env.cfg.kafka.topics.clone();
    // Not the input's fault: a table the ledger writes is gone (42P01).
    execute(
        &env,
        "ALTER TABLE ledger_entries RENAME TO ledger_entries_gone",
    )
    .await;
    let day = Utc::now() - chrono::Duration::hours(6);
    env.send(&[(
        topics.grants.clone(),
        "acct-a".into(),
        ev::grant("g-a", "acct-a", &ts(day), "pkg-a", "package", "100"),
    )])
    .await;

    let (_stop_tx, stop_rx) = watch::channel(false);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        tally::pipeline::ledger::run(env.cfg.clone(), env.prices.clone(), stop_rx),
    )
    .await
    .expect("a bug ends the loop instead of retrying forever");
    let error = result.expect_err("the ledger fails loudly").to_string();
    let at = format!("the record at {}/", topics.grants);
    assert!(error.contains(&at), "names the record: {error}");
    assert!(
        error.contains("(source //billing.test, id g-a)"),
        "names the record: {error}"
    );
    assert!(
        error.contains("ledger_entries"),
        "says what failed: {error}"
    );
    // Nothing was applied and no offset moved: the record is read again after the fix.
    assert_eq!(
        count(&env, "SELECT count(*) FROM processed_events").await,
        0
    );
    assert_eq!(
        count(&env, "SELECT count(*) FROM consumer_offsets").await,
        0
    );
}
