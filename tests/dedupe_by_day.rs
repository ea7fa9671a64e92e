//! Dedupe claims by day (issue 12): a day of claims whose every event is before the dedupe
//! horizon is dropped whole; the ledger still refuses a duplicate at the edge of the window
//! and admits nothing twice across a drop. Through the real PostgreSQL store.
//!
//! Expected values by hand: a package of 100, debits of 1, 2, 4 and 8 credits.

mod common;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tally::event::GrantKind;
use tally::kafka::Positions;
use tally::ledger::store::{Action, DebitInfo};
use tally::ledger::{Item, NewGrant, PurgeOutcome, Store, StoreError};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn debit(id: &'static str, time: &str, credits: Decimal) -> Item<'static> {
    Item {
        source: "//chat.test",
        id,
        account_id: "a",
        time: at(time),
        action: Action::Debit(DebitInfo {
            credits,
            usage_kind: "chat_response",
            price_version: "v1",
            rule_id: "r",
        }),
    }
}

/// The day partitions of the claims table, oldest first.
async fn days(store: &Store) -> Vec<String> {
    store
        .client()
        .query(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'processed_events'::regclass ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn spendable(store: &Store) -> Decimal {
    store.balance("a").await.unwrap().unwrap().spendable
}

/// Applying `item` again is refused: it was dated before the horizon.
async fn refused_as_too_late(store: &mut Store, item: &Item<'_>) {
    let err = store
        .apply_batch("g", std::slice::from_ref(item), &Positions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::BeforeHorizon { ref id, .. } if id == item.id),
        "{}: expected BeforeHorizon, got {err}",
        item.id
    );
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_dropped_day_admits_nothing_twice_and_the_edge_stays_a_duplicate() {
    let cfg = common::test_config("dedupe_days");
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();

    // A 7-day window purged at 03-20T00:00 puts the horizon at 03-12T23:00 (7 d and the 1 h
    // margin before). `edge` is at the horizon itself (still inside the window), `old` a
    // second before it on the same day, `older` on the day before.
    let grant = Item {
        source: "//billing.test",
        id: "g1",
        account_id: "a",
        time: at("2026-03-01T00:00:00Z"),
        action: Action::Grant(NewGrant {
            grant_id: "pkg".into(),
            kind: GrantKind::Package,
            credits: dec!(100),
            expires_at: None,
            priority: None,
        }),
    };
    let older = debit("older", "2026-03-11T12:00:00Z", dec!(1));
    let old = debit("old", "2026-03-12T22:59:59Z", dec!(2));
    let edge = debit("edge", "2026-03-12T23:00:00Z", dec!(4));
    let fresh = debit("fresh", "2026-03-19T08:00:00Z", dec!(8));
    let all = [
        grant.clone(),
        older.clone(),
        old.clone(),
        edge.clone(),
        fresh.clone(),
    ];
    let o = store
        .apply_batch("g", &all, &Positions::new())
        .await
        .unwrap();
    assert_eq!((o.applied, o.duplicates), (5, 0));
    // 100 - 1 - 2 - 4 - 8.
    assert_eq!(spendable(&store).await, dec!(85));
    // Each claim sits in the partition of its UTC day (and none in the default one).
    assert_eq!(
        days(&store).await,
        [
            "processed_events_d20260301",
            "processed_events_d20260311",
            "processed_events_d20260312",
            "processed_events_d20260319",
            "processed_events_default",
        ]
    );

    let horizon = at("2026-03-12T23:00:00Z");
    let purged = store
        .purge_dedupe(at("2026-03-20T00:00:00Z"), TimeDelta::days(7), 100_000)
        .await
        .unwrap();
    // The days before the horizon whole (03-01: the grant; 03-11: `older`) are dropped;
    // 03-12 ends after it and stays, with `old` and `edge`. The days from yesterday (03-19)
    // to the day after tomorrow (03-22) are made ahead.
    assert_eq!(
        purged,
        PurgeOutcome {
            deleted: 2,
            horizon,
            done: true
        }
    );
    assert_eq!(
        days(&store).await,
        [
            "processed_events_d20260312",
            "processed_events_d20260319",
            "processed_events_d20260320",
            "processed_events_d20260321",
            "processed_events_d20260322",
            "processed_events_default",
        ]
    );

    // At the edge of the window: `edge` again is a duplicate (its claim was kept).
    let o = store
        .apply_batch("g", std::slice::from_ref(&edge), &Positions::new())
        .await
        .unwrap();
    assert_eq!((o.applied, o.duplicates), (0, 1));
    // Before the horizon, whether its claim was dropped (`older`, the grant) or kept (`old`),
    // an event is refused, never applied again.
    for item in [&older, &grant, &old] {
        refused_as_too_late(&mut store, item).await;
    }
    // `fresh`, far inside the window, is a duplicate.
    let o = store
        .apply_batch("g", std::slice::from_ref(&fresh), &Positions::new())
        .await
        .unwrap();
    assert_eq!((o.applied, o.duplicates), (0, 1));
    assert_eq!(spendable(&store).await, dec!(85));

    // A day later the horizon passes 03-12: that day is dropped too, and `edge` is refused.
    let purged = store
        .purge_dedupe(at("2026-03-21T00:00:00Z"), TimeDelta::days(7), 100_000)
        .await
        .unwrap();
    assert_eq!(
        purged,
        PurgeOutcome {
            deleted: 2,
            horizon: at("2026-03-13T23:00:00Z"),
            done: true
        }
    );
    assert!(!days(&store)
        .await
        .contains(&"processed_events_d20260312".to_owned()));
    refused_as_too_late(&mut store, &edge).await;
    // Nothing was charged twice: 100 - 1 - 2 - 4 - 8, as before.
    assert_eq!(spendable(&store).await, dec!(85));

    store
        .client()
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", cfg.postgres.schema))
        .await
        .unwrap();
}
