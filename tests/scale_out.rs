//! N instances never wait on each other's scheduler: a tick skips the accounts another
//! transaction holds (a ledger batch elsewhere, another instance's tick) and takes them at
//! the next tick. Through the real PostgreSQL store, two connections.

mod common;

use chrono::{Duration, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tally::event::GrantKind;
use tally::ledger::store::{Action, DebitInfo};
use tally::ledger::{Item, NewGrant, Store};

fn grant(account: &'static str, time: chrono::DateTime<Utc>) -> Item<'static> {
    Item {
        source: "grants",
        id: account,
        account_id: account,
        time,
        action: Action::Grant(NewGrant {
            grant_id: "g1".into(),
            kind: GrantKind::Package,
            credits: dec!(100),
            expires_at: None,
            priority: None,
        }),
    }
}

fn debit(account: &'static str, credits: Decimal, time: chrono::DateTime<Utc>) -> Item<'static> {
    Item {
        source: "chat",
        id: account,
        account_id: account,
        time,
        action: Action::Debit(DebitInfo {
            credits,
            usage_kind: "chat_response",
            price_version: "v1",
            rule_id: "r",
            hold_id: None,
        }),
    }
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_tick_skips_an_account_another_transaction_holds() {
    let cfg = common::test_config("scaleout");
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();
    // Two accounts, each a grant of 100 and a debit of 10, two days ago: both are due once
    // the final point (now - 24 h of grace) passes them.
    let now = Utc::now();
    let then = now - Duration::days(2);
    let items = [
        grant("held", then),
        grant("free", then),
        debit("held", dec!(10), then + Duration::minutes(1)),
        debit("free", dec!(7), then + Duration::minutes(1)),
    ];
    store
        .apply_batch("g", &items, &Default::default())
        .await
        .unwrap();

    // Another instance's transaction holds `held` (as a ledger batch does while it runs).
    let other = Store::connect(&cfg.postgres).await.unwrap();
    other
        .client()
        .batch_execute("BEGIN; SELECT 1 FROM accounts WHERE account_id = 'held' FOR UPDATE")
        .await
        .unwrap();

    // The tick does not wait for it (the timeout only guards against a hang): it finalizes
    // `free` alone.
    let touched = tokio::time::timeout(std::time::Duration::from_secs(60), store.tick(now))
        .await
        .expect("a tick waited for a lock another transaction holds")
        .unwrap();
    assert_eq!(touched, 1);

    // Released, the next tick takes `held`, and nothing is left after it.
    other.client().batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.tick(now).await.unwrap(), 1);
    assert_eq!(store.tick(now).await.unwrap(), 0);

    // Each account was finalized once: 100 - 10 and 100 - 7.
    for (account, spendable) in [("held", dec!(90)), ("free", dec!(93))] {
        let b = store.balance(account).await.unwrap().unwrap();
        assert_eq!(
            (account, b.spendable, b.overage),
            (account, spendable, dec!(0))
        );
    }
    store
        .client()
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", cfg.postgres.schema))
        .await
        .unwrap();
}
