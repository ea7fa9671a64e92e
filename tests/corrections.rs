//! Corrections as entries, never edits (issue 14, item 2), against the real services: a
//! voided grant and manual adjustments (plus and minus) from the HTTP API, the CLI and a
//! producer, through Kafka and the ledger as `tally run` runs it. The final balance is
//! explained line by line with figures worked out by hand below (never by Tally's own
//! ledger code), each correction line names who made it and why, a repeat changes nothing,
//! and `tally reconcile` stays clean.
//!
//! Account `acme`, prepaid, no plan; events at T + n seconds, each applied before the next is
//! sent (so the ledger applies them in event-time order: no correction lines). Chat prices
//! (tests/fixtures/prices.toml): a standard `gpt-4o-mini` response costs 1 credit.
//! Consumption order: promo (priority 20), package (40), manual (50: adjustment buckets).
//!
//! | # | event (time)                     | line                                    | balance |
//! |---|----------------------------------|-----------------------------------------|---------|
//! | 1 | grant pkg-1 package 100 (T)      | grant pkg-1 +100                        | 100     |
//! | 2 | grant promo-1 promo 50 (T+1)     | grant promo-1 +50                       | 150     |
//! | 3 | chat u1, 20 responses (T+60)     | debit promo-1 -20                       | 130     |
//! | 4 | void promo-1 (T+120, API)        | void promo-1 -30 (the 30 left)          | 100     |
//! | 5 | adjust adj-1 +25 (T+180, API)    | adjustment adjustment:adj-1 +25         | 125     |
//! | 6 | chat u2, 10 responses (T+240)    | debit pkg-1 -10                         | 115     |
//! | 7 | adjust adj-2 -95 (T+300, API)    | adjustment pkg-1 -90                    | 25      |
//! |   |                                  | adjustment adjustment:adj-1 -5          | 20      |
//! | 8 | adjust ticket-9 +5 (T+360, prod.)| adjustment adjustment:ticket-9 +5       | 25      |
//! | 9 | adjust cli-1 -30 (now, CLI)      | adjustment adjustment:adj-1 -20         | 5       |
//! |   |                                  | adjustment adjustment:ticket-9 -5       | 0       |
//!
//! Line 9 asks for 30 but only 25 are spendable: a deduction takes at most what the live
//! grants hold (it never creates overage). Total purchased after it: pkg-1 100 + adj-1 25 +
//! ticket-9 5 = 130 over 3 grants (the voided promo-1 no longer counts), remaining 0.

mod common;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::json;

use common::api::{with_tokens, Server, ACME, ADMIN};
use common::{ev, test_config, RunningTally, TestEnv};
use tally::analytics::DateRange;

const ACCOUNT: &str = "acme";
/// The admin token's name (`common::api::with_tokens`): the actor of the API's corrections.
const ADMIN_NAME: &str = "test-Admin";

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voids_and_adjustments_are_entries_explained_line_by_line() {
    let env = TestEnv::with_config(with_tokens(test_config("corrections"))).await;
    let t = env.cfg.kafka.topics.clone();
    let running = RunningTally::start(&env);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let api = server.client();
    let caught_up = || env.wait_ledger_caught_up(Duration::from_secs(120));
    // Whole seconds, ten minutes ago: every event is inside the grace and in the past.
    let base = Utc::now() - chrono::Duration::minutes(10);
    let base = DateTime::from_timestamp(base.timestamp(), 0).unwrap();
    let at = |s: i64| base + chrono::Duration::seconds(s);
    let path = |p: &str| format!("/v1/accounts/{ACCOUNT}{p}");

    // 1, 2: the grants.
    for (grant_id, kind, credits, s) in [
        ("pkg-1", "package", "100", 0),
        ("promo-1", "promo", "50", 1),
    ] {
        let r = api
            .post(
                &path("/grants"),
                Some(ADMIN),
                &json!({"grant_id": grant_id, "kind": kind, "credits": credits,
                        "effective_at": ts(at(s))}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    caught_up().await;
    // 3: 20 credits of usage, from the promo.
    env.send(&[(
        t.chat_responses.clone(),
        ACCOUNT.into(),
        ev::chat("u1", ACCOUNT, &ts(at(60)), "gpt-4o-mini", "standard", 20),
    )])
    .await;
    caught_up().await;

    // Refusals first: nothing is published.
    let void_body = json!({"reason": "promo granted by mistake", "effective_at": ts(at(120))});
    let r = api
        .post(&path("/grants/nope/void"), Some(ADMIN), &void_body)
        .await;
    assert_eq!(
        (r.status, r.code()),
        (404, "grant_not_found".into()),
        "{}",
        r.text()
    );
    let r = api
        .post(&path("/grants/promo-1/void"), Some(ACME), &void_body)
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = api
        .post(
            &path("/grants/allowance:2026-01-01/void"),
            Some(ADMIN),
            &void_body,
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "grant_id".into()),
        "{}",
        r.text()
    );
    let r = api
        .post(
            &path("/adjustments"),
            Some(ADMIN),
            &json!({"adjustment_id": "zero", "credits": "0", "reason": "nothing"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "credits".into()),
        "{}",
        r.text()
    );
    let r = api
        .post(
            &path("/adjustments"),
            Some(ADMIN),
            &json!({"adjustment_id": "no-reason", "credits": "5", "reason": ""}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "reason".into()),
        "{}",
        r.text()
    );

    // 4: the promo voided (its 30 left removed).
    let r = api
        .post(&path("/grants/promo-1/void"), Some(ADMIN), &void_body)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["event"]["id"], "void:acme:promo-1");
    caught_up().await;
    // Idempotent: the API answers at once, and the same event sent again through Kafka is a
    // duplicate the ledger claims once.
    let r = api
        .post(&path("/grants/promo-1/void"), Some(ADMIN), &void_body)
        .await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("applied"))
    );
    let again = tally::event::encode::void_grant(
        &tally::event::api_source(ACCOUNT),
        ACCOUNT,
        &tally::event::VoidGrantEvent {
            grant_id: "promo-1".into(),
            reason: "promo granted by mistake".into(),
            actor: Some(ADMIN_NAME.into()),
        },
        at(120),
    );
    env.send(&[(t.grants.clone(), ACCOUNT.into(), again)]).await;
    caught_up().await;

    // 5: 25 credits of goodwill, a bucket of their own.
    let adj1 = json!({"adjustment_id": "adj-1", "credits": "25", "reason": "goodwill: outage",
                      "effective_at": ts(at(180))});
    let r = api.post(&path("/adjustments"), Some(ADMIN), &adj1).await;
    assert_eq!(r.status, 202, "{}", r.text());
    caught_up().await;
    let r = api.post(&path("/adjustments"), Some(ADMIN), &adj1).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut other = adj1.clone();
    other["credits"] = json!("26");
    let r = api.post(&path("/adjustments"), Some(ADMIN), &other).await;
    assert_eq!(
        (r.status, r.field()),
        (409, "adjustment_id".into()),
        "{}",
        r.text()
    );

    // 6: 10 credits of usage, from the package.
    env.send(&[(
        t.chat_responses.clone(),
        ACCOUNT.into(),
        ev::chat("u2", ACCOUNT, &ts(at(240)), "gpt-4o-mini", "standard", 10),
    )])
    .await;
    caught_up().await;
    // 7: 95 taken back: the package's 90, then 5 of the adjustment bucket.
    let r = api
        .post(
            &path("/adjustments"),
            Some(ADMIN),
            &json!({"adjustment_id": "adj-2", "credits": "-95", "reason": "double-counted order",
                    "effective_at": ts(at(300))}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    caught_up().await;
    // 8: a producer's adjustment (no actor: its source is).
    env.send(&[(
        t.grants.clone(),
        ACCOUNT.into(),
        ev::envelope(
            "tally.credit.adjustment.v1",
            "//support.test/desk",
            "evt-ticket-9",
            ACCOUNT,
            &ts(at(360)),
            json!({"adjustment_id": "ticket-9", "credits": "5", "reason": "ticket 9"}),
        ),
    )])
    .await;
    caught_up().await;
    // 9: the CLI asks for 30; 25 are spendable.
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(&env, dir.path());
    let sent = common::tally_cli(
        &config,
        &[
            "accounts",
            "adjust",
            ACCOUNT,
            "--adjustment-id",
            "cli-1",
            "--credits",
            "-30",
            "--reason",
            "closing the account",
        ],
    );
    assert!(sent.contains(r#""id":"adjustment:acme:cli-1""#), "{sent}");
    caught_up().await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;

    // The ledger, line by line: (kind, grant, amount, balance after, event, actor, reason).
    let store = env.store().await;
    let lines = store.entries(ACCOUNT, 100).await.unwrap();
    type Row<'a> = (
        &'a str,
        Option<&'a str>,
        Decimal,
        Decimal,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
    );
    let got: Vec<Row<'_>> = lines
        .iter()
        .map(|l| {
            (
                l.kind.as_str(),
                l.grant_id.as_deref(),
                l.amount,
                l.balance_after,
                l.event_id.as_deref(),
                l.actor.as_deref(),
                l.reason.as_deref(),
            )
        })
        .collect();
    let admin = Some(ADMIN_NAME);
    let expected: Vec<Row<'_>> = vec![
        (
            "grant",
            Some("pkg-1"),
            dec!(100),
            dec!(100),
            Some("grant:acme:pkg-1"),
            None,
            None,
        ),
        (
            "grant",
            Some("promo-1"),
            dec!(50),
            dec!(150),
            Some("grant:acme:promo-1"),
            None,
            None,
        ),
        (
            "debit",
            Some("promo-1"),
            dec!(-20),
            dec!(130),
            Some("u1"),
            None,
            None,
        ),
        (
            "void",
            Some("promo-1"),
            dec!(-30),
            dec!(100),
            Some("void:acme:promo-1"),
            admin,
            Some("promo granted by mistake"),
        ),
        (
            "adjustment",
            Some("adjustment:adj-1"),
            dec!(25),
            dec!(125),
            Some("adjustment:acme:adj-1"),
            admin,
            Some("goodwill: outage"),
        ),
        (
            "debit",
            Some("pkg-1"),
            dec!(-10),
            dec!(115),
            Some("u2"),
            None,
            None,
        ),
        (
            "adjustment",
            Some("pkg-1"),
            dec!(-90),
            dec!(25),
            Some("adjustment:acme:adj-2"),
            admin,
            Some("double-counted order"),
        ),
        (
            "adjustment",
            Some("adjustment:adj-1"),
            dec!(-5),
            dec!(20),
            Some("adjustment:acme:adj-2"),
            admin,
            Some("double-counted order"),
        ),
        (
            "adjustment",
            Some("adjustment:ticket-9"),
            dec!(5),
            dec!(25),
            Some("evt-ticket-9"),
            Some("//support.test/desk"),
            Some("ticket 9"),
        ),
        (
            "adjustment",
            Some("adjustment:adj-1"),
            dec!(-20),
            dec!(5),
            Some("adjustment:acme:cli-1"),
            Some("//tally/cli"),
            Some("closing the account"),
        ),
        (
            "adjustment",
            Some("adjustment:ticket-9"),
            dec!(-5),
            dec!(0),
            Some("adjustment:acme:cli-1"),
            Some("//tally/cli"),
            Some("closing the account"),
        ),
    ];
    assert_eq!(got, expected);
    // Every balance_after is the previous one plus the amount (docs/billing.md), and no
    // overage was ever recorded.
    let mut balance = Decimal::ZERO;
    for l in &lines {
        balance += l.amount;
        assert_eq!(
            (l.balance_after, l.overage_after),
            (balance, dec!(0)),
            "{l:?}"
        );
    }

    // The grants: the voided promo keeps what it paid and nothing else.
    let promo = store.grant(ACCOUNT, "promo-1").await.unwrap().unwrap();
    assert_eq!((promo.remaining, promo.voided_at), (dec!(0), Some(at(120))));
    let view = store
        .balance_view(ACCOUNT, Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            view.spendable,
            view.overage,
            view.total_granted,
            view.active_grants
        ),
        (dec!(0), dec!(0), dec!(130), 3)
    );

    // The same lines over HTTP, with who and why.
    let r = api.get(&path("/ledger?limit=3"), Some(ACME)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let newest = &r.json()["entries"][0];
    assert_eq!(
        (
            newest["kind"].clone(),
            newest["actor"].clone(),
            newest["reason"].clone(),
            newest["event_source"].clone()
        ),
        (
            json!("adjustment"),
            json!("//tally/cli"),
            json!("closing the account"),
            json!("//tally/cli")
        )
    );

    // Usage and corrections agree between the ledger and ClickHouse: 30 credits of chat.
    let day = base.date_naive();
    let range = DateRange::new(day.pred_opt().unwrap(), day.succ_opt().unwrap()).unwrap();
    let r = tally::reconcile::reconcile(&env.cfg, &range, Some(ACCOUNT))
        .await
        .unwrap();
    assert!(r.is_clean(), "{r:#?}");
    let charged = store
        .charged_by_day(range.from, range.to, Some(ACCOUNT))
        .await
        .unwrap();
    let credits: Decimal = charged.iter().map(|c| c.credits).sum();
    assert_eq!(credits, dec!(30));

    server.stop().await;
    running.stop().await;
}

/// The store alone (PostgreSQL, no broker): a void that arrives after usage it predates is
/// applied at its place in event time, the difference written as corrections caused by the
/// void (so they carry its author and reason); a repeat is claimed once; a deduction larger
/// than the balance takes the balance to zero. By hand, account `b`, times T + minutes:
///
/// | # | line (cause)                          | amount | balance |
/// |---|---------------------------------------|--------|---------|
/// | 1 | grant pkg (g1, T)                     | +100   | 100     |
/// | 2 | grant promo (g2, T+1)                 | +50    | 150     |
/// | 3 | debit promo (u, T+3: 30)              | -30    | 120     |
/// | 4 | void promo (v, T+2, arrives after u)  | -20    | 100     |
/// | 5 | correction of debit, promo (v)        | +30    | 130     |
/// | 6 | correction of debit, pkg (v)          | -30    | 100     |
/// | 7 | correction of void, promo (v)         | -30    | 70      |
/// | 8 | adjustment pkg (a, T+4: -100 asked)   | -70    | 0       |
///
/// Lines 4-7: in event-time order the promo had 50 left when voided at T+2 and u was paid by
/// the package; 4 is the void charged at the account's time (T+3), 5-7 the difference
/// (credits added first). Usage charged stays 30 and the debit corrections net to zero.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn a_void_arriving_after_usage_it_predates_is_corrected_in_the_store() {
    use tally::event::GrantKind;
    use tally::ledger::store::{Action, Correction, DebitInfo};
    use tally::ledger::{Item, NewGrant, Store};

    let cfg = test_config("corrections_store");
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();
    let now = Utc::now();
    let base = DateTime::from_timestamp(now.timestamp() - 3600, 0).unwrap();
    let at = |m: i64| base + chrono::Duration::minutes(m);
    let grant = |id: &'static str, kind, credits| Item {
        source: "//billing.test",
        id,
        account_id: "b",
        time: at(if id == "g1" { 0 } else { 1 }),
        action: Action::Grant(NewGrant {
            grant_id: id.replace("g1", "pkg").replace("g2", "promo"),
            kind,
            credits,
            expires_at: None,
            priority: None,
        }),
    };
    let why = Correction {
        actor: "ops",
        reason: "promo sent twice",
    };
    let void = Item {
        source: "//support.test",
        id: "v",
        account_id: "b",
        time: at(2),
        action: Action::VoidGrant {
            grant_id: "promo".into(),
            why: why.clone(),
        },
    };
    let usage = Item {
        source: "//chat.test",
        id: "u",
        account_id: "b",
        time: at(3),
        action: Action::Debit(DebitInfo {
            credits: dec!(30),
            usage_kind: "chat_response",
            price_version: "v1",
            rule_id: "r",
            hold_id: None,
        }),
    };
    let deduction = Item {
        source: "//support.test",
        id: "a",
        account_id: "b",
        time: at(4),
        action: Action::Adjust {
            adjustment_id: "a".into(),
            credits: dec!(-100),
            why: Correction {
                actor: "ops",
                reason: "closing",
            },
        },
    };
    let none = Default::default();
    for batch in [
        vec![
            grant("g1", GrantKind::Package, dec!(100)),
            grant("g2", GrantKind::Promo, dec!(50)),
        ],
        vec![usage],
        vec![void.clone(), void.clone()],
        vec![void, deduction],
    ] {
        store.apply_batch("g", &batch, &none).await.unwrap();
    }

    let lines = store.entries("b", 100).await.unwrap();
    /// (kind, corrects, grant, amount, balance after, actor) of a line.
    type Line<'a> = (
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        Decimal,
        Decimal,
        Option<&'a str>,
    );
    let got: Vec<Line<'_>> = lines
        .iter()
        .map(|l| {
            (
                l.kind.as_str(),
                l.corrects.as_deref(),
                l.grant_id.as_deref(),
                l.amount,
                l.balance_after,
                l.actor.as_deref(),
            )
        })
        .collect();
    let ops = Some("ops");
    assert_eq!(
        got,
        vec![
            ("grant", None, Some("pkg"), dec!(100), dec!(100), None),
            ("grant", None, Some("promo"), dec!(50), dec!(150), None),
            ("debit", None, Some("promo"), dec!(-30), dec!(120), None),
            ("void", None, Some("promo"), dec!(-20), dec!(100), ops),
            (
                "correction",
                Some("debit"),
                Some("promo"),
                dec!(30),
                dec!(130),
                ops
            ),
            (
                "correction",
                Some("debit"),
                Some("pkg"),
                dec!(-30),
                dec!(100),
                ops
            ),
            (
                "correction",
                Some("void"),
                Some("promo"),
                dec!(-30),
                dec!(70),
                ops
            ),
            ("adjustment", None, Some("pkg"), dec!(-70), dec!(0), ops),
        ]
    );
    assert!(lines[3..7]
        .iter()
        .all(|l| l.reason.as_deref() == Some("promo sent twice")));
    assert_eq!(lines[7].reason.as_deref(), Some("closing"));
    let promo = store.grant("b", "promo").await.unwrap().unwrap();
    assert_eq!((promo.remaining, promo.voided_at), (dec!(0), Some(at(2))));
    let view = store.balance_view("b", now).await.unwrap().unwrap();
    assert_eq!(
        (view.spendable, view.total_granted, view.active_grants),
        (dec!(0), dec!(100), 1)
    );
    // What `tally reconcile` reads from the ledger: 30 charged, corrections even.
    let day = base.date_naive();
    let (from, to) = (day.pred_opt().unwrap(), day.succ_opt().unwrap());
    let charged = store.charged_by_day(from, to, Some("b")).await.unwrap();
    assert_eq!(charged.iter().map(|c| c.credits).sum::<Decimal>(), dec!(30));
    assert!(store
        .uneven_corrections(from, to, Some("b"))
        .await
        .unwrap()
        .is_empty());
}
