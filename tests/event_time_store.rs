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
    })
}

async fn fresh_store(name: &str) -> Store {
    let cfg = common::test_config(name);
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();
    store
}

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
    let _ = DateTime::<Utc>::MIN_UTC;
    let _ = Utc.timestamp_opt(0, 0);
}
