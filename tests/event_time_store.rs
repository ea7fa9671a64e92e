//! The event-time ledger through the real PostgreSQL store: the same events applied in
//! different orders, batchings and with scheduler ticks between them give the same books.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tally::event::GrantKind;
use tally::ledger::store::{Action, DebitInfo};
use tally::ledger::{Item, NewGrant, Store};

fn debit(credits: Decimal) -> Action<'static> {
    Action::Debit(DebitInfo {
        credits,
        usage_kind: "chat_response",
        price_version: "v1",
        rule_id: "r",
        hold_id: None,
    })
}

async fn fresh_store(name: &str) -> Store {
    let cfg = common::test_config(name);
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn late_and_out_of_order_usage_through_ticks_is_charged_once() {
    let mut store = fresh_store("etstore").await;
    let now = Utc::now();
    let start = now - Duration::days(5);
    let ids: Vec<String> = (0..240).map(|i| format!("u{i:03}")).collect();
    let mut items = vec![Item {
        source: "grants",
        id: "g1",
        account_id: "a",
        time: start,
        action: Action::Grant(NewGrant {
            grant_id: "g1".into(),
            kind: GrantKind::Package,
            credits: dec!(1000),
            expires_at: None,
            priority: None,
        }),
    }];
    for (i, id) in ids.iter().enumerate() {
        items.push(Item {
            source: if i % 2 == 0 { "calls" } else { "chat" },
            id,
            account_id: "a",
            time: start + Duration::minutes(30 * i as i64),
            action: debit(dec!(10)),
        });
    }
    // Two topics drift apart, interleaved in chunks; ticks between.
    let (calls, chat): (Vec<_>, Vec<_>) = items[1..]
        .iter()
        .cloned()
        .partition(|i| i.source == "calls");
    store
        .apply_batch("g", &items[..1], &Default::default())
        .await
        .unwrap();
    let mut a = calls.chunks(7);
    let mut c = chat.chunks(3);
    let mut n = 0;
    loop {
        let x = a.next();
        let y = c.next();
        if x.is_none() && y.is_none() {
            break;
        }
        for chunk in [x, y].into_iter().flatten() {
            store
                .apply_batch("g", chunk, &Default::default())
                .await
                .unwrap();
        }
        n += 1;
        if n % 4 == 0 {
            store.tick(Utc::now()).await.unwrap();
        }
    }
    store.tick(now + Duration::seconds(1)).await.unwrap();
    let b = store.balance("a").await.unwrap().unwrap();
    // 240 x 10 = 2400 used: 1000 from the package, 1400 overage.
    assert_eq!((b.spendable, b.overage), (dec!(0), dec!(1400)));
}

/// Midnight UTC of a day in 2030.
fn d(month: u32, day: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, month, day, 0, 0, 0).unwrap()
}

/// An event of account `a` from source `s`.
fn item(id: &'static str, time: DateTime<Utc>, action: Action<'static>) -> Item<'static> {
    Item {
        source: "s",
        id,
        account_id: "a",
        time,
        action,
    }
}

fn plan(allowance: Decimal, day: u8) -> Action<'static> {
    Action::Plan {
        plan: tally::ledger::buckets::Plan {
            plan_id: format!("day{day}"),
            monthly_allowance: allowance,
            billing_day: day,
            low_balance_credits: None,
            low_balance_percent: None,
            allowance_alert_percents: vec![],
            recharge_threshold_credits: None,
            recharge_credits: None,
        },
        overage_policy: tally::event::OveragePolicy::BillOverage,
        top_up_validity_months: 3,
    }
}

/// A plan dated before the one in force arrives after a cycle closed: replayed in event-time
/// order, the account's cycles are cut differently, and the closed cycle of the first order
/// is gone from `cycles` (only final cycles are never rewritten).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_replay_rewrites_the_closed_cycles_that_are_not_final() {
    let mut store = fresh_store("etcycles").await;
    let none = Default::default();
    store
        .apply_batch("g", &[item("p1", d(1, 5), plan(dec!(300), 1))], &none)
        .await
        .unwrap();
    store
        .apply_batch("g", &[item("u1", d(2, 2), debit(dec!(10)))], &none)
        .await
        .unwrap();
    let first: Vec<_> = store
        .cycles("a")
        .await
        .unwrap()
        .iter()
        .map(|c| (c.start, c.end))
        .collect();
    assert_eq!(first, vec![(d(1, 1), d(2, 1))]);
    // The older plan (day 15, 100 a month): its cycle Dec 15 - Jan 15 with 100, then p1's day
    // 1 from that boundary: Jan 15 - Feb 1 (17 days) with 300 x 17 / 31 = 164.516129.
    store
        .apply_batch("g", &[item("p0", d(1, 3), plan(dec!(100), 15))], &none)
        .await
        .unwrap();
    let cycles: Vec<_> = store
        .cycles("a")
        .await
        .unwrap()
        .iter()
        .map(|c| (c.start, c.end, c.allowance, c.allowance_expired))
        .collect();
    assert_eq!(
        cycles,
        vec![
            (
                Utc.with_ymd_and_hms(2029, 12, 15, 0, 0, 0).unwrap(),
                d(1, 15),
                dec!(100),
                dec!(100)
            ),
            (d(1, 15), d(2, 1), dec!(164.516129), dec!(164.516129)),
        ]
    );
    let (plan, cycle) = store.plan("a").await.unwrap().unwrap();
    assert_eq!(
        (plan.billing_day, cycle.start, cycle.end),
        (1, d(2, 1), d(3, 1))
    );
    let b = store.balance("a").await.unwrap().unwrap();
    assert_eq!(b.spendable, dec!(290)); // February's 300 less u1's 10
}

/// The same late older plan before any boundary: the newer plan's allowance (300, its
/// cycle from Jan 1) gives way to the older plan's (100, Dec 15 - Jan 15), and the grant row
/// of the allowance that no longer exists keeps nothing.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_replay_empties_the_row_of_a_grant_it_no_longer_has() {
    let mut store = fresh_store("etgone").await;
    let none = Default::default();
    store
        .apply_batch("g", &[item("p1", d(1, 5), plan(dec!(300), 1))], &none)
        .await
        .unwrap();
    store
        .apply_batch("g", &[item("p0", d(1, 3), plan(dec!(100), 15))], &none)
        .await
        .unwrap();
    let b = store.balance("a").await.unwrap().unwrap();
    let rows: std::collections::BTreeMap<String, Decimal> = b
        .grants
        .iter()
        .map(|g| (g.grant_id.clone(), g.remaining))
        .collect();
    assert_eq!(
        rows.into_iter().collect::<Vec<_>>(),
        vec![
            ("allowance:2029-12-15".to_owned(), dec!(100)),
            ("allowance:2030-01-01".to_owned(), dec!(0)),
        ]
    );
    assert_eq!(b.spendable, dec!(100));
}
