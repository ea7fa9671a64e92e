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

/// A grant of account `a` from source "grants", its event id the grant id.
fn grant_item(
    id: &'static str,
    time: DateTime<Utc>,
    kind: GrantKind,
    credits: Decimal,
    expires_at: Option<DateTime<Utc>>,
    priority: Option<i32>,
) -> Item<'static> {
    Item {
        source: "grants",
        id,
        account_id: "a",
        time,
        action: Action::Grant(NewGrant {
            grant_id: id.into(),
            kind,
            credits,
            expires_at,
            priority,
        }),
    }
}

/// Each grant's remaining credits, by grant id.
fn remaining(b: &tally::ledger::AccountBalance) -> Vec<(String, Decimal)> {
    let rows: std::collections::BTreeMap<String, Decimal> = b
        .grants
        .iter()
        .map(|g| (g.grant_id.clone(), g.remaining))
        .collect();
    rows.into_iter().collect()
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
    assert_eq!(
        remaining(&b),
        vec![
            ("allowance:2029-12-15".to_owned(), dec!(100)),
            ("allowance:2030-01-01".to_owned(), dec!(0)),
        ]
    );
    assert_eq!(b.spendable, dec!(100));
}

/// An account whose two usage topics are consumed about a minute apart for an hour (one
/// event a second, the chat topic's minute always applied after the calls topic's next
/// one), so every chat batch is out of order: each replay starts at the book's newest mark
/// before its earliest event and reads back a few minutes of the window, not the hour; and
/// the ledger, line by line, is the one a store without marks writes (every replay from the
/// checkpoint, a new connection per batch).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn replays_start_at_a_mark_and_write_the_ledger_a_replay_from_the_checkpoint_writes() {
    let start = Utc::now() - Duration::hours(3);
    let ids: Vec<String> = (0..3600).map(|i| format!("e{i:04}")).collect();
    // Calls on even seconds (2 credits), chat on odd ones (1 credit).
    let usage: Vec<Item<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Item {
            source: if i % 2 == 0 { "calls" } else { "chat" },
            id,
            account_id: "a",
            time: start + Duration::seconds(i as i64),
            action: debit(if i % 2 == 0 { dec!(2) } else { dec!(1) }),
        })
        .collect();
    let grants = [
        // Spent first (priority 1) until it expires after 20 minutes (1,800 of its 3,000
        // credits): a chat minute before the expiry that arrives after it is charged to the
        // package at first, then corrected by the replay.
        grant_item(
            "promo",
            start - Duration::minutes(1),
            GrantKind::Promo,
            dec!(3000),
            Some(start + Duration::minutes(20)),
            Some(1),
        ),
        grant_item(
            "package",
            start - Duration::minutes(1),
            GrantKind::Package,
            dec!(100000),
            None,
            Some(2),
        ),
    ];
    // Arrival: the grants; then calls minute m, chat minute m - 1, calls m + 1, ...
    let minute = |source: &str, m: i64| -> Vec<Item<'_>> {
        usage
            .iter()
            .filter(|u| u.source == source && (u.time - start).num_seconds() / 60 == m)
            .cloned()
            .collect()
    };
    let mut batches = vec![grants.to_vec()];
    for m in 0..=60 {
        batches.push(minute("calls", m));
        batches.push(minute("chat", m - 1));
    }
    batches.retain(|b| !b.is_empty());
    let none = Default::default();

    let mut hot = fresh_store("etmarks_hot").await;
    let (mut replays, mut read_back, mut worst) = (0, 0, 0);
    for b in &batches {
        let o = hot.apply_batch("g", b, &none).await.unwrap();
        replays += o.replayed;
        read_back += o.window_events;
        worst = worst.max(o.window_events);
    }
    let cfg = common::test_config("etmarks_cold");
    let mut cold_read_back = 0;
    for (i, b) in batches.iter().enumerate() {
        let mut cold = Store::connect(&cfg.postgres).await.unwrap();
        if i == 0 {
            cold.migrate().await.unwrap();
        }
        cold_read_back += cold.apply_batch("g", b, &none).await.unwrap().window_events;
    }
    let cold = Store::connect(&cfg.postgres).await.unwrap();

    // Every chat minute but the last arrived after the next calls minute: 60 replays. A
    // chat minute's earliest event is at most 119 s behind the newest applied, so its
    // replay starts at most 4 x 119 s back (one mark per doubling of the distance): at most
    // 476 of the window's events, against up to the whole hour from the checkpoint.
    eprintln!("window events read back: {read_back} from marks (worst replay {worst}), {cold_read_back} from the checkpoint");
    assert_eq!(replays, 60);
    assert!(worst <= 476, "a replay read back {worst} window events");
    assert!(
        cold_read_back >= 3 * read_back,
        "from the checkpoint: {cold_read_back}; from marks: {read_back}"
    );

    // The documented rules, in event time: the promo (priority 1) pays everything until it
    // expires at 1,200 s (3 credits every 2 s: 1,800; its other 1,200 expire), the package
    // the rest of the hour's 1,800 x 2 + 1,800 x 1 = 5,400: 100,000 - 3,600.
    let b = hot.balance("a").await.unwrap().unwrap();
    assert_eq!(
        remaining(&b),
        vec![
            ("package".to_owned(), dec!(96400)),
            ("promo".to_owned(), dec!(0))
        ]
    );
    assert_eq!(b.spendable, dec!(96400));
    let line = |l: &tally::ledger::store::LedgerLine| {
        (
            l.kind.clone(),
            l.corrects.clone(),
            l.grant_id.clone(),
            l.amount,
            l.balance_after,
            l.event_id.clone(),
        )
    };
    let hot_lines: Vec<_> = hot
        .entries("a", 100_000)
        .await
        .unwrap()
        .iter()
        .map(line)
        .collect();
    let cold_lines: Vec<_> = cold
        .entries("a", 100_000)
        .await
        .unwrap()
        .iter()
        .map(line)
        .collect();
    assert!(
        hot_lines.iter().any(|l| l.0 == "correction"),
        "the replays corrected charges"
    );
    assert_eq!(hot_lines, cold_lines);
}

/// Two instances on one account (a rebalance): the marks one instance cached are not used
/// once the other has applied to the book, or the late event the other applied would be
/// missing from the replay that starts at one of them.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn marks_cached_by_one_instance_are_dropped_when_another_applies() {
    let start = Utc::now() - Duration::hours(2);
    let ids: Vec<String> = (0..100).map(|i| format!("e{i:03}")).collect();
    let cfg = common::test_config("etmarks_two");
    let mut first = Store::connect(&cfg.postgres).await.unwrap();
    first.migrate().await.unwrap();
    let mut second = Store::connect(&cfg.postgres).await.unwrap();
    let none = Default::default();
    let grant = grant_item(
        "g",
        start - Duration::minutes(1),
        GrantKind::Package,
        dec!(10000),
        None,
        None,
    );
    let usage: Vec<Item<'_>> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| Item {
            source: "calls",
            id,
            account_id: "a",
            time: start + Duration::seconds(i as i64),
            action: debit(dec!(1)),
        })
        .collect();
    first.apply_batch("g", &[grant], &none).await.unwrap();
    // In order: the first instance takes marks up to second 99.
    first.apply_batch("g", &usage, &none).await.unwrap();
    // The second instance applies a late event at 50.5 s (a replay of its own)...
    let x = Item {
        source: "chat",
        id: "x",
        account_id: "a",
        time: start + Duration::milliseconds(50_500),
        action: debit(dec!(7)),
    };
    let o = second.apply_batch("g", &[x], &none).await.unwrap();
    assert_eq!(o.replayed, 1);
    // ...and the first one a late event at 80.5 s: its marks after 50.5 s do not have x.
    let y = Item {
        source: "chat",
        id: "y",
        account_id: "a",
        time: start + Duration::milliseconds(80_500),
        action: debit(dec!(3)),
    };
    let o = first.apply_batch("g", &[y], &none).await.unwrap();
    assert_eq!(o.replayed, 1);
    let b = first.balance("a").await.unwrap().unwrap();
    assert_eq!(b.spendable, dec!(9890)); // 10,000 - 100 x 1 - 7 - 3
                                         // From the final point: the whole window (the grant, 100 calls and x) is read back.
    assert_eq!(o.window_events, 102);
}
