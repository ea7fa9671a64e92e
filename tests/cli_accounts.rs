//! `tally accounts grant` and `tally accounts set-plan`, the binary against the real broker:
//! each publishes one event (a grant's id is fixed by account and grant id, so a repeat is
//! the same event), a command the pipeline would refuse is refused at the prompt with the
//! field named and nothing published, and the ledger, run as `tally run` runs it, applies
//! what was sent. Figures by hand: a 250-credit package, a 40.5-credit top-up sent twice,
//! a first plan of 100 credits (the full allowance at once, docs/billing.md), and a chat of
//! 3 standard `gpt-4o-mini` responses at 1 credit each (tests/fixtures/prices.toml):
//! 250 + 40.5 + 100 - 3 = 387.5 spendable.

mod common;

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rust_decimal_macros::dec;

use common::{ev, RunningTally, TestEnv};

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_plans_from_the_cli_are_applied_once() {
    let env = TestEnv::new("cli_accounts").await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(&env, dir.path());

    let sent = common::tally_cli(
        &config,
        &[
            "accounts",
            "grant",
            "acct-c",
            "--grant-id",
            "pkg-1",
            "--kind",
            "package",
            "--credits",
            "250",
        ],
    );
    assert!(
        sent.starts_with(&format!("sent to {}: ", env.cfg.kafka.topics.grants)),
        "{sent}"
    );
    assert!(sent.contains(r#""id":"grant:acct-c:pkg-1""#), "{sent}");
    for _ in 0..2 {
        common::tally_cli(
            &config,
            &[
                "accounts",
                "grant",
                "acct-c",
                "--grant-id",
                "top-1",
                "--kind",
                "top-up",
                "--credits",
                "40.5",
            ],
        );
    }
    let sent = common::tally_cli(
        &config,
        &[
            "accounts",
            "set-plan",
            "acct-c",
            "--plan-id",
            "starter",
            "--allowance",
            "100",
            "--billing-day",
            "1",
        ],
    );
    assert!(
        sent.starts_with(&format!("sent to {}: ", env.cfg.kafka.topics.plans)),
        "{sent}"
    );

    // Refused before anything is sent: the decoder's reason, naming the field.
    let refused = common::tally_cli_output(
        &config,
        &[
            "accounts",
            "grant",
            "acct-c",
            "--grant-id",
            "zero",
            "--kind",
            "package",
            "--credits",
            "0",
        ],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("credits"),
        "{stderr}"
    );

    // After the grants and the plan in event time (theirs carry microseconds; this is cut to
    // the second), so the chat is paid from them.
    let now =
        (Utc::now() + chrono::Duration::seconds(2)).to_rfc3339_opts(SecondsFormat::Secs, true);
    env.send(&[(
        env.cfg.kafka.topics.chat_responses.clone(),
        "acct-c".into(),
        ev::chat("c-1", "acct-c", &now, "gpt-4o-mini", "standard", 3),
    )])
    .await;

    let running = RunningTally::start(&env);
    env.wait_ledger_caught_up(Duration::from_secs(90)).await;
    running.stop().await;

    let store = env.store().await;
    let balance = store.balance("acct-c").await.unwrap().unwrap();
    assert_eq!(balance.spendable, dec!(387.5), "{balance:?}");
    assert!(store.grant("acct-c", "zero").await.unwrap().is_none());
    let top_up = store.grant("acct-c", "top-1").await.unwrap().unwrap();
    assert_eq!(top_up.granted, dec!(40.5));
}
