//! Dedupe identity against the real PostgreSQL (issue 9, item 7), through the store and
//! `prepare()` without Kafka: claims are scoped, so a usage event and a grant with the same
//! (source, id) both apply; the purge keys on event time with Tally's clock and stores a
//! horizon, so an event whose claim was purged is refused as too_late even after the window
//! is enlarged. Expected values are computed by hand from tests/fixtures/prices.toml (a
//! standard chat response costs 1 credit).

mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal_macros::dec;

use tally::event::Reason;
use tally::fault::{Classify, Fault};
use tally::kafka::{Positions, Record};
use tally::ledger::{PurgeOutcome, Store, StoreError};
use tally::pipeline::{ledger::to_item, prepare, Admission, Prepared};
use tally::rating::PriceTable;

const GROUP: &str = "dedupe-identity";

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn record(payload: Vec<u8>) -> Record {
    Record {
        topic: Arc::from("t"),
        partition: 0,
        offset: 0,
        key: None,
        payload,
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn admission(window_days: i64, purged_before: Option<DateTime<Utc>>) -> Admission {
    Admission {
        dedupe_window: TimeDelta::days(window_days),
        purged_before,
        ..Admission::default()
    }
}

/// A fresh schema, migrated, and the test price table.
async fn setup(name: &str) -> (tally::config::Config, Store, PriceTable) {
    let cfg = common::test_config(name);
    let mut store = Store::connect(&cfg.postgres)
        .await
        .expect("PostgreSQL is up (run scripts/services up)");
    store.migrate().await.expect("PostgreSQL migrations");
    let prices = PriceTable::load(&cfg.prices.path).expect("price table");
    (cfg, store, prices)
}

async fn drop_schema(store: &Store) {
    store
        .client()
        .batch_execute(&format!("DROP SCHEMA {} CASCADE", store.schema()))
        .await
        .unwrap();
}

fn prepared<'r, 'p>(
    records: &'r [Record],
    prices: &'p PriceTable,
    now: DateTime<Utc>,
    admission: &Admission,
) -> Vec<Prepared<'r, 'p>> {
    records
        .iter()
        .map(|r| prepare(r, prices, now, admission).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

async fn claims(store: &Store) -> Vec<(String, String, String)> {
    store
        .client()
        .query(
            "SELECT scope, event_source, event_id FROM processed_events ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// `expired` usage claims of `account` dated 2026-01-01 (`e-1`, `e-2`, ...), before every
/// horizon these tests reach, and one, `kept`, dated 2026-01-19.
async fn store_claims(store: &Store, account: &str, expired: i32) {
    store
        .client()
        .execute(
            "INSERT INTO processed_events (event_source, event_id, account_id, event_time)
             SELECT '//load.test', 'e-' || n, $1, '2026-01-01T00:00:00Z'::timestamptz
             FROM generate_series(1, $2) n
             UNION ALL
             SELECT '//load.test', 'kept', $1, '2026-01-19T00:00:00Z'::timestamptz",
            &[&account, &expired],
        )
        .await
        .unwrap();
}

async fn claim_count(store: &Store) -> u64 {
    let n: i64 = store
        .client()
        .query_one("SELECT count(*) FROM processed_events", &[])
        .await
        .unwrap()
        .get(0);
    n as u64
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn usage_grant_and_plan_with_one_identity_all_apply_once() {
    let (_cfg, mut store, prices) = setup("dedupe_scope").await;
    let now = at("2026-03-10T12:00:00Z");
    // One producer, one (source, id) for a package grant of 100, 3 chat responses and a plan
    // without allowance: three events, each claimed in its own scope.
    let records = [
        record(common::ev::grant(
            "e-1",
            "acct-a",
            "2026-03-10T10:00:00Z",
            "pkg-1",
            "package",
            "100",
        )),
        record(common::ev::envelope(
            "tally.usage.chat_response.v1",
            "//billing.test",
            "e-1",
            "acct-a",
            "2026-03-10T11:00:00Z",
            serde_json::json!({"conversation_id": "conv-1", "model": "gpt-4o-mini",
                               "voice_tier": "standard", "channel": "text", "responses": 3}),
        )),
        record(common::ev::envelope(
            "tally.account.plan.v1",
            "//billing.test",
            "e-1",
            "acct-a",
            "2026-03-10T11:30:00Z",
            serde_json::json!({"plan_id": "payg", "monthly_allowance": "0", "billing_day": 1,
                               "overage_policy": "settle_from_next_grant"}),
        )),
    ];
    let p = prepared(&records, &prices, now, &admission(35, None));
    let items: Vec<_> = p.iter().map(to_item).collect();

    let first = store
        .apply_batch(GROUP, &items, &Positions::new())
        .await
        .unwrap();
    assert_eq!((first.applied, first.duplicates), (3, 0));
    // Delivered again, in one batch and one by one: all three are duplicates.
    let again = store
        .apply_batch(GROUP, &items, &Positions::new())
        .await
        .unwrap();
    assert_eq!((again.applied, again.duplicates), (0, 3));
    for item in &items {
        let o = store
            .apply_batch(GROUP, std::slice::from_ref(item), &Positions::new())
            .await
            .unwrap();
        assert_eq!((o.applied, o.duplicates), (0, 1));
    }
    // 100 granted - 3 responses x 1 credit = 97.
    let balance = store.balance("acct-a").await.unwrap().unwrap();
    assert_eq!((balance.spendable, balance.overage), (dec!(97), dec!(0)));
    let source = "//billing.test".to_owned();
    assert_eq!(
        claims(&store).await,
        [
            ("grant".to_owned(), source.clone(), "e-1".to_owned()),
            ("plan".to_owned(), source.clone(), "e-1".to_owned()),
            ("usage".to_owned(), source, "e-1".to_owned()),
        ]
    );
    drop_schema(&store).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_purged_event_stays_too_late_when_the_window_grows() {
    let (_cfg, mut store, prices) = setup("dedupe_horizon").await;
    // A package of 100 on 2026-01-01, then u-old (2 responses) on 01-10 and u-new (5) on
    // 01-15, applied at 01-15T12:00 with a 7-day window (both inside it).
    let chat = |id: &str, time: &str, n: u32| {
        record(common::ev::chat(
            id,
            "acct-b",
            time,
            "gpt-4o-mini",
            "standard",
            n,
        ))
    };
    let grant = record(common::ev::grant(
        "g-1",
        "acct-b",
        "2026-01-01T00:00:00Z",
        "pkg-1",
        "package",
        "100",
    ));
    let old = chat("u-old", "2026-01-10T00:00:00Z", 2);
    let new = chat("u-new", "2026-01-15T00:00:00Z", 5);
    let usage = [old.clone(), new.clone()];
    let applied_at = at("2026-01-15T12:00:00Z");
    let (g, u) = (
        prepared(
            std::slice::from_ref(&grant),
            &prices,
            applied_at,
            &admission(30, None),
        ),
        prepared(&usage, &prices, applied_at, &admission(7, None)),
    );
    let items: Vec<_> = g.iter().chain(&u).map(to_item).collect();
    let o = store
        .apply_batch(GROUP, &items, &Positions::new())
        .await
        .unwrap();
    assert_eq!(o.applied, 3);
    assert_eq!(store.dedupe_horizon().await.unwrap(), None);

    // Purge at 01-20T00:00 with the 7-day window: horizon 01-20 - 7 d - 1 h = 01-12T23:00.
    // The grant's claim (01-01) and u-old's (01-10) go; u-new's (01-15) stays.
    let purge_at = at("2026-01-20T00:00:00Z");
    let horizon = at("2026-01-12T23:00:00Z");
    assert_eq!(
        store
            .purge_dedupe(purge_at, TimeDelta::days(7), 100_000)
            .await
            .unwrap(),
        PurgeOutcome {
            deleted: 2,
            horizon,
            done: true
        }
    );
    assert_eq!(store.dedupe_horizon().await.unwrap(), Some(horizon));
    // A purge with a larger window never moves the horizon back (01-20 - 35 d - 1 h is
    // 2025-12-15T23:00).
    assert_eq!(
        store
            .purge_dedupe(purge_at, TimeDelta::days(35), 100_000)
            .await
            .unwrap(),
        PurgeOutcome {
            deleted: 0,
            horizon,
            done: true
        }
    );

    // The window is now 35 days: u-old (01-10) is inside it, but before the horizon the
    // ledger loads: too_late, naming the horizon.
    let now = at("2026-01-20T00:05:00Z");
    let grown = admission(35, store.dedupe_horizon().await.unwrap());
    let rejection = prepare(&old, &prices, now, &grown).unwrap_err();
    assert_eq!(rejection.reason, Reason::TooLate);
    assert_eq!(rejection.field.as_deref(), Some("time"));
    assert!(
        rejection
            .detail
            .contains("before the dedupe horizon 2026-01-12T23:00:00+00:00"),
        "{}",
        rejection.detail
    );
    // u-new is after the horizon and its claim was kept: admitted, and a duplicate.
    let kept = prepared(std::slice::from_ref(&new), &prices, now, &grown);
    let o = store
        .apply_batch(GROUP, &[to_item(&kept[0])], &Positions::new())
        .await
        .unwrap();
    assert_eq!((o.applied, o.duplicates), (0, 1));

    // A pipeline that has not seen the horizon yet admits u-old; the store refuses it when
    // claiming (the input's fault: the ledger dead-letters it as too_late).
    let stale = prepared(
        std::slice::from_ref(&old),
        &prices,
        now,
        &admission(35, None),
    );
    let err = store
        .apply_batch(GROUP, &[to_item(&stale[0])], &Positions::new())
        .await
        .unwrap_err();
    assert_eq!(err.fault(), Fault::Input);
    match &err {
        StoreError::BeforeHorizon {
            id,
            time,
            horizon: h,
            ..
        } => {
            assert_eq!(
                (id.as_str(), *time, *h),
                ("u-old", at("2026-01-10T00:00:00Z"), horizon)
            );
        }
        other => panic!("expected BeforeHorizon, got {other}"),
    }
    // u-old was debited once: 100 - 2 - 5 = 93.
    let balance = store.balance("acct-b").await.unwrap().unwrap();
    assert_eq!(balance.spendable, dec!(93));
    drop_schema(&store).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_large_purge_runs_in_bounded_chunks() {
    let (_cfg, mut store, _prices) = setup("dedupe_chunks").await;
    // 25,000 claims dated 2026-01-01 and one dated 2026-01-19.
    store_claims(&store, "acct-c", 25_000).await;
    let purge_at = at("2026-01-20T00:00:00Z");
    let horizon = at("2026-01-12T23:00:00Z");
    // At most 10,000 rows this call: one chunk of 10,000, more left.
    assert_eq!(
        store
            .purge_dedupe(purge_at, TimeDelta::days(7), 10_000)
            .await
            .unwrap(),
        PurgeOutcome {
            deleted: 10_000,
            horizon,
            done: false
        }
    );
    // The rest: a chunk of 10,000 and one of 5,000 (short: done).
    assert_eq!(
        store
            .purge_dedupe(purge_at, TimeDelta::days(7), 100_000)
            .await
            .unwrap(),
        PurgeOutcome {
            deleted: 15_000,
            horizon,
            done: true
        }
    );
    assert_eq!(
        claims(&store).await,
        [(
            "usage".to_owned(),
            "//load.test".to_owned(),
            "kept".to_owned()
        )]
    );
    drop_schema(&store).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_task_deletes_beside_the_ledger_and_batches_bring_its_horizon() {
    let (mut cfg, mut store, prices) = setup("dedupe_task").await;
    // 25,000 claims dated 2026-01-01 and one dated 2026-01-19; a 7-day window on a clock at
    // 01-20T00:00: the horizon is 01-20 - 7 d - 1 h = 01-12T23:00, 25,000 claims before it.
    store_claims(&store, "acct-t", 25_000).await;
    let now = at("2026-01-20T00:00:00Z");
    let horizon = at("2026-01-12T23:00:00Z");
    cfg.pipeline.dedupe_window_days = 7;
    cfg.pipeline.dedupe_purge_interval_ms = 86_400_000;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let purge = tokio::spawn(tally::pipeline::purge::run(
        Arc::new(cfg),
        Arc::new(tally::clock::ManualClock::new(now)),
        stopped,
    ));

    // The ledger goes on meanwhile: a package of 10 and a response (1 credit) on 01-19.
    let records = [
        record(common::ev::grant(
            "g-t",
            "acct-t",
            "2026-01-19T00:00:00Z",
            "pkg-t",
            "package",
            "10",
        )),
        record(common::ev::chat(
            "u-t",
            "acct-t",
            "2026-01-19T01:00:00Z",
            "gpt-4o-mini",
            "standard",
            1,
        )),
    ];
    let ready = prepared(&records, &prices, now, &admission(7, None));
    let items: Vec<_> = ready.iter().map(to_item).collect();
    let o = store
        .apply_batch(GROUP, &items, &Positions::new())
        .await
        .unwrap();
    assert_eq!(o.applied, 2);

    // The purge ends by itself with every expired claim deleted, the rest kept.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while claims(&store).await.len() != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge did not finish within 60 s: {} claims left",
            claims(&store).await.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    let stats = common::stopped(purge).await.unwrap();
    assert_eq!((stats.purges, stats.deleted), (1, 25_000));
    assert!(stats.first_done.is_some());
    assert_eq!(
        claims(&store).await,
        [
            (
                "grant".to_owned(),
                "//billing.test".to_owned(),
                "g-t".to_owned()
            ),
            (
                "usage".to_owned(),
                "//chat.test".to_owned(),
                "u-t".to_owned()
            ),
            (
                "usage".to_owned(),
                "//load.test".to_owned(),
                "kept".to_owned()
            ),
        ]
    );
    assert_eq!(store.dedupe_horizon().await.unwrap(), Some(horizon));

    // The next batch's claims read the stored horizon: the ledger loop's admission takes it
    // from there (a re-sent response is a duplicate; 10 - 1 = 9 left).
    let o = store
        .apply_batch(GROUP, &items[1..], &Positions::new())
        .await
        .unwrap();
    assert_eq!((o.applied, o.duplicates, o.horizon), (0, 1, Some(horizon)));
    let balance = store.balance("acct-t").await.unwrap().unwrap();
    assert_eq!(balance.spendable, dec!(9));
    drop_schema(&store).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_purge_ends_the_purge_task() {
    let (mut cfg, store, _prices) = setup("dedupe_task_stop").await;
    // 300,000 expired claims (and one kept): thirty statements and their pauses, a few
    // seconds of purge.
    store_claims(&store, "acct-s", 300_000).await;
    cfg.pipeline.dedupe_window_days = 7;
    cfg.pipeline.dedupe_purge_interval_ms = 86_400_000;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let purge = tokio::spawn(tally::pipeline::purge::run(
        Arc::new(cfg),
        Arc::new(tally::clock::ManualClock::new(at("2026-01-20T00:00:00Z"))),
        stopped,
    ));
    // Stop once it has started deleting: it ends (within common::STOP_WITHIN, not after
    // its day-long interval), with claims left for the next start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while claim_count(&store).await == 300_001 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    let stats = common::stopped(purge).await.unwrap();
    let left = claim_count(&store).await;
    assert_eq!(stats.purges, 0, "stopped before it was done");
    assert_eq!(stats.deleted + left, 300_001);
    assert!(left > 1, "expired claims are left for the next start");
    drop_schema(&store).await;
}
