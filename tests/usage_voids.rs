//! A voided usage event (issue 14, item 2: `tally.usage.void.v1`), against the real services:
//! voids from the HTTP API, a producer and the CLI, through Kafka, the ledger and analytics as
//! `tally run` runs them. The final balance is explained line by line with figures worked out
//! by hand below (never by Tally's rating or ledger code), the ClickHouse report leaves the
//! voided usage out, a repeat changes nothing, and `tally reconcile` stays clean.
//!
//! Account `voidco`, prepaid, no plan; events at T + n seconds, each applied before the next
//! is sent. A standard `gpt-4o-mini` chat response costs 1 credit
//! (tests/fixtures/prices.toml). Usage source `//chat.test`; reversal buckets are grant
//! `reversal://chat.test:{id}` (kind manual).
//!
//! | # | event (time)                       | line                                  | balance | overage |
//! |---|------------------------------------|---------------------------------------|---------|---------|
//! | 1 | grant pkg-1 package 50 (T)         | grant pkg-1 +50                       | 50      | 0       |
//! | 2 | chat u1, 30 responses (T+60)       | debit pkg-1 -30                       | 20      | 0       |
//! | 3 | chat u2, 40 responses (T+120)      | debit pkg-1 -20                       | 0       | 0       |
//! |   |                                    | overage -20                           | 0       | 20      |
//! | 4 | chat u3, 5 responses (T+180)       | overage -5                            | 0       | 25      |
//! | 5 | void u2 (T+240, API)               | reversal +25 (pays the overage)       | 0       | 0       |
//! |   |                                    | reversal reversal://chat.test:u2 +15  | 15      | 0       |
//! | 6 | chat u4, 8 responses (T+300)       | debit reversal://chat.test:u2 -8      | 7       | 0       |
//! | 7 | void u3 (T+360, a producer)        | reversal reversal://chat.test:u3 +5   | 12      | 0       |
//!
//! u2 was charged 40 (20 from the package, 20 overage): all 40 come back at the void's time,
//! first paying the 25 of overage then outstanding (u2's 20 and u3's 5), the other 15 into a
//! bucket of their own. u3 was charged 5 (all overage, paid back by line 5): its void gives
//! the 5 back as credits. Usage charged and counted in ClickHouse: u1 30 + u4 8 = 38 over 2
//! events; u2 and u3 count nowhere. Then, on account `lateco`, a void that arrives before
//! its usage: it waits in the ledger (no line, no dead letter) and analytics records it at
//! once; when the usage arrives, the ledger charges it and gives it back in the same
//! transaction, at the void's time, and both stores agree. Last, on account `clico`, a void from the CLI (`tally accounts void-usage`) paying
//! back the overage its usage left.

mod common;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::json;

use common::api::{with_tokens, Server, ACME, ADMIN};
use common::{ev, test_config, RunningTally, TestEnv};
use tally::analytics::{DateRange, UsageQueries};

const ACCOUNT: &str = "voidco";
/// The admin token's name (`common::api::with_tokens`): the actor of the API's corrections.
const ADMIN_NAME: &str = "test-Admin";
const CHAT: &str = "//chat.test";

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voided_usage_gives_its_credits_back_and_counts_nowhere() {
    let env = TestEnv::with_config(with_tokens(test_config("usage_voids"))).await;
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
    let chat = |id: &str, s: i64, responses: u32| {
        (
            t.chat_responses.clone(),
            ACCOUNT.to_owned(),
            ev::chat(
                id,
                ACCOUNT,
                &ts(at(s)),
                "gpt-4o-mini",
                "standard",
                responses,
            ),
        )
    };

    // 1-4: a package, then 75 credits of usage (25 of it overage).
    env.send(&[(
        t.grants.clone(),
        ACCOUNT.into(),
        ev::grant("g-pkg-1", ACCOUNT, &ts(at(0)), "pkg-1", "package", "50"),
    )])
    .await;
    caught_up().await;
    for (id, s, n) in [("u1", 60, 30), ("u2", 120, 40), ("u3", 180, 5)] {
        env.send(&[chat(id, s, n)]).await;
        caught_up().await;
    }

    // Refusals first: nothing is published.
    let void_u2 = json!({"event_source": CHAT, "event_id": "u2",
                         "reason": "test traffic billed by mistake", "effective_at": ts(at(240))});
    let mut unknown = void_u2.clone();
    unknown["event_id"] = json!("nope");
    let r = api.post(&path("/usage/void"), Some(ADMIN), &unknown).await;
    assert_eq!(
        (r.status, r.code(), r.field()),
        (404, "usage_not_found".into(), "event_id".into()),
        "{}",
        r.text()
    );
    // A token of another account sees no such account.
    let r = api.post(&path("/usage/void"), Some(ACME), &void_u2).await;
    assert_eq!(
        (r.status, r.code()),
        (404, "account_not_found".into()),
        "{}",
        r.text()
    );
    // An account's own token reads, and does not write corrections.
    let r = api
        .post("/v1/accounts/acme/usage/void", Some(ACME), &void_u2)
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let mut no_reason = void_u2.clone();
    no_reason["reason"] = json!("");
    let r = api
        .post(&path("/usage/void"), Some(ADMIN), &no_reason)
        .await;
    assert_eq!(
        (r.status, r.field()),
        (400, "reason".into()),
        "{}",
        r.text()
    );
    // Another account's usage is not this account's to void.
    let r = api
        .post("/v1/accounts/other/usage/void", Some(ADMIN), &void_u2)
        .await;
    assert_eq!(r.status, 404, "{}", r.text());

    // 5: u2 voided from the API.
    let r = api.post(&path("/usage/void"), Some(ADMIN), &void_u2).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let void_id = tally::event::encode::usage_void_event_id(ACCOUNT, CHAT, "u2");
    assert_eq!(r.json()["event"]["id"], json!(void_id));
    caught_up().await;
    // Idempotent: the API answers at once; the same event again through Kafka, and another
    // void of u2 under another id (a producer's), change nothing: u2 is voided once.
    let r = api.post(&path("/usage/void"), Some(ADMIN), &void_u2).await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("applied")),
        "{}",
        r.text()
    );
    let again = tally::event::encode::usage_void(
        &tally::event::api_source(ACCOUNT),
        ACCOUNT,
        &tally::event::UsageVoidEvent {
            event_source: CHAT.into(),
            event_id: "u2".into(),
            reason: "test traffic billed by mistake".into(),
            actor: Some(ADMIN_NAME.into()),
        },
        at(240),
    );
    let other_id = ev::envelope(
        "tally.usage.void.v1",
        "//support.test/desk",
        "evt-void-u2-again",
        ACCOUNT,
        &ts(at(250)),
        json!({"event_source": CHAT, "event_id": "u2", "reason": "ticket 12"}),
    );
    env.send(&[
        (t.grants.clone(), ACCOUNT.into(), again),
        (t.grants.clone(), ACCOUNT.into(), other_id),
    ])
    .await;
    caught_up().await;

    // 6: 8 credits of usage, paid by u2's bucket (the package is spent).
    env.send(&[chat("u4", 300, 8)]).await;
    caught_up().await;
    // 7: u3 voided by a producer (no actor: its source is).
    env.send(&[(
        t.grants.clone(),
        ACCOUNT.into(),
        ev::envelope(
            "tally.usage.void.v1",
            "//support.test/desk",
            "evt-void-u3",
            ACCOUNT,
            &ts(at(360)),
            json!({"event_source": CHAT, "event_id": "u3", "reason": "duplicate of u2"}),
        ),
    )])
    .await;
    caught_up().await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;

    // The ledger, line by line: (kind, grant, amount, balance after, overage after, event,
    // actor, reason, reverses).
    let store = env.store().await;
    let lines = store.entries(ACCOUNT, 100).await.unwrap();
    type Row<'a> = (
        &'a str,
        Option<&'a str>,
        Decimal,
        Decimal,
        Decimal,
        Option<&'a str>,
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
                l.overage_after,
                l.event_id.as_deref(),
                l.actor.as_deref(),
                l.reason.as_deref(),
                l.reverses_id.as_deref(),
            )
        })
        .collect();
    let admin = Some(ADMIN_NAME);
    let why_u2 = Some("test traffic billed by mistake");
    let (desk, why_u3) = (Some("//support.test/desk"), Some("duplicate of u2"));
    let expected: Vec<Row<'_>> = vec![
        (
            "grant",
            Some("pkg-1"),
            dec!(50),
            dec!(50),
            dec!(0),
            Some("g-pkg-1"),
            None,
            None,
            None,
        ),
        (
            "debit",
            Some("pkg-1"),
            dec!(-30),
            dec!(20),
            dec!(0),
            Some("u1"),
            None,
            None,
            None,
        ),
        (
            "debit",
            Some("pkg-1"),
            dec!(-20),
            dec!(0),
            dec!(0),
            Some("u2"),
            None,
            None,
            None,
        ),
        (
            "overage",
            None,
            dec!(-20),
            dec!(0),
            dec!(20),
            Some("u2"),
            None,
            None,
            None,
        ),
        (
            "overage",
            None,
            dec!(-5),
            dec!(0),
            dec!(25),
            Some("u3"),
            None,
            None,
            None,
        ),
        (
            "reversal",
            None,
            dec!(25),
            dec!(0),
            dec!(0),
            Some(&void_id),
            admin,
            why_u2,
            Some("u2"),
        ),
        (
            "reversal",
            Some("reversal://chat.test:u2"),
            dec!(15),
            dec!(15),
            dec!(0),
            Some(&void_id),
            admin,
            why_u2,
            Some("u2"),
        ),
        (
            "debit",
            Some("reversal://chat.test:u2"),
            dec!(-8),
            dec!(7),
            dec!(0),
            Some("u4"),
            None,
            None,
            None,
        ),
        (
            "reversal",
            Some("reversal://chat.test:u3"),
            dec!(5),
            dec!(12),
            dec!(0),
            Some("evt-void-u3"),
            desk,
            why_u3,
            Some("u3"),
        ),
    ];
    assert_eq!(got, expected);
    // Every running figure follows the documented rules (docs/billing.md, "Reading the
    // ledger"): a reversal without a grant lowers the overage, with one it adds credits.
    let (mut balance, mut overage) = (Decimal::ZERO, Decimal::ZERO);
    for l in &lines {
        match (l.kind.as_str(), l.grant_id.is_some()) {
            ("overage", _) | ("reversal", false) => overage -= l.amount,
            _ => balance += l.amount,
        }
        assert_eq!(
            (l.balance_after, l.overage_after),
            (balance, overage),
            "{l:?}"
        );
        if l.kind == "reversal" {
            assert_eq!(l.reverses_source.as_deref(), Some(CHAT), "{l:?}");
        }
    }
    let view = store
        .balance_view(ACCOUNT, Utc::now())
        .await
        .unwrap()
        .unwrap();
    // Total purchased: pkg-1 50 + the two buckets (15 + 5) = 70 over 3 grants.
    assert_eq!(
        (
            view.spendable,
            view.overage,
            view.total_granted,
            view.active_grants
        ),
        (dec!(12), dec!(0), dec!(70), 3)
    );

    // The same lines over HTTP: a reversal says what it reverses.
    let r = api.get(&path("/ledger?limit=1"), Some(ADMIN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let newest = &r.json()["entries"][0];
    assert_eq!(
        (
            newest["kind"].clone(),
            newest["reverses"].clone(),
            newest["actor"].clone()
        ),
        (
            json!("reversal"),
            json!({"event_source": CHAT, "event_id": "u3"}),
            json!("//support.test/desk")
        )
    );

    // ClickHouse: the report counts u1 and u4 only (38 credits, 2 events).
    let day = base.date_naive();
    let range = DateRange::new(day.pred_opt().unwrap(), day.succ_opt().unwrap()).unwrap();
    let queries = UsageQueries::new(&env.cfg.clickhouse);
    let wait_total = |want: (Decimal, u64)| {
        let queries = &queries;
        let range = &range;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let got = queries.total(ACCOUNT, range).await.unwrap();
                if got == want || std::time::Instant::now() > deadline {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(wait_total((dec!(38), 2)).await, (dec!(38), 2));
    // The ledger's charges agree, and `tally reconcile` is clean.
    let charged = store
        .charged_by_day(range.from, range.to, Some(ACCOUNT))
        .await
        .unwrap();
    let credits: Decimal = charged.iter().map(|c| c.credits).sum();
    let events: u64 = charged.iter().map(|c| c.events).sum();
    assert_eq!((credits, events), (dec!(38), 2));
    let r = tally::reconcile::reconcile(&env.cfg, &range, Some(ACCOUNT))
        .await
        .unwrap();
    assert!(r.is_clean(), "{r:#?}");

    // Re-sending every void changes nothing: the same lines, the same report.
    let r = api.post(&path("/usage/void"), Some(ADMIN), &void_u2).await;
    assert_eq!(r.status, 200, "{}", r.text());
    env.send(&[(
        t.grants.clone(),
        ACCOUNT.into(),
        ev::envelope(
            "tally.usage.void.v1",
            "//support.test/desk",
            "evt-void-u3",
            ACCOUNT,
            &ts(at(360)),
            json!({"event_source": CHAT, "event_id": "u3", "reason": "duplicate of u2"}),
        ),
    )])
    .await;
    caught_up().await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;
    assert_eq!(
        store.entries(ACCOUNT, 100).await.unwrap().len(),
        lines.len()
    );
    assert_eq!(wait_total((dec!(38), 2)).await, (dec!(38), 2));

    // A void that arrives before its usage (account `lateco`): the ledger has not charged u9
    // yet, so the void waits (no line, no dead letter; sent twice, it is claimed once);
    // analytics records it at once.
    const LATE: &str = "lateco";
    let void_u9 = ev::envelope(
        "tally.usage.void.v1",
        "//support.test/desk",
        "evt-void-u9",
        LATE,
        &ts(at(200)),
        json!({"event_source": CHAT, "event_id": "u9", "reason": "never happened"}),
    );
    env.send(&[
        (
            t.grants.clone(),
            LATE.into(),
            ev::grant("g-late", LATE, &ts(at(0)), "pkg-9", "package", "10"),
        ),
        (t.grants.clone(), LATE.into(), void_u9.clone()),
    ])
    .await;
    caught_up().await;
    env.send(&[(t.grants.clone(), LATE.into(), void_u9)]).await;
    caught_up().await;
    assert_eq!(store.entries(LATE, 100).await.unwrap().len(), 1);
    // The usage arrives (dated before the void): the ledger charges it and, in the same
    // transaction, applies the waiting void at its own time; analytics leaves it out.
    env.send(&[(
        t.chat_responses.clone(),
        LATE.into(),
        ev::chat("u9", LATE, &ts(at(100)), "gpt-4o-mini", "standard", 4),
    )])
    .await;
    caught_up().await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;
    let dead = env.dead_letters();
    assert!(dead.is_empty(), "{dead:?}");
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_file(&env, dir.path());
    type LateRow = (String, Option<String>, Decimal, Decimal, Option<String>);
    let late: Vec<LateRow> = store
        .entries(LATE, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.kind, l.grant_id, l.amount, l.balance_after, l.event_id))
        .collect();
    let pkg = Some("pkg-9".to_owned());
    assert_eq!(
        late,
        vec![
            (
                "grant".into(),
                pkg.clone(),
                dec!(10),
                dec!(10),
                Some("g-late".into())
            ),
            ("debit".into(), pkg, dec!(-4), dec!(6), Some("u9".into())),
            (
                "reversal".into(),
                Some("reversal://chat.test:u9".into()),
                dec!(4),
                dec!(10),
                Some("evt-void-u9".into())
            ),
        ]
    );
    // From the CLI (account `clico`, no grant): u7 (5) is all overage; its void pays the
    // overage back (a reversal line without a grant), by the CLI's source.
    const CLI: &str = "clico";
    env.send(&[(
        t.chat_responses.clone(),
        CLI.into(),
        ev::chat("u7", CLI, &ts(at(100)), "gpt-4o-mini", "standard", 5),
    )])
    .await;
    caught_up().await;
    let sent = common::tally_cli(
        &config,
        &[
            "accounts",
            "void-usage",
            CLI,
            "--event-source",
            CHAT,
            "--event-id",
            "u7",
            "--reason",
            "load test",
        ],
    );
    let cli_void_id = tally::event::encode::usage_void_event_id(CLI, CHAT, "u7");
    assert!(sent.contains(&format!(r#""id":"{cli_void_id}""#)), "{sent}");
    caught_up().await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;
    let cli: Vec<(String, Decimal, Decimal, Decimal, Option<String>)> = store
        .entries(CLI, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.kind, l.amount, l.balance_after, l.overage_after, l.actor))
        .collect();
    assert_eq!(
        cli,
        vec![
            ("overage".into(), dec!(-5), dec!(0), dec!(5), None),
            (
                "reversal".into(),
                dec!(5),
                dec!(0),
                dec!(0),
                Some("//tally/cli".into())
            ),
        ]
    );
    let r = tally::reconcile::reconcile(&env.cfg, &range, None)
        .await
        .unwrap();
    assert!(r.is_clean(), "{r:#?}");

    server.stop().await;
    running.stop().await;
}

/// The store alone (PostgreSQL, no broker): the same events — a package of 20, usage u of 50
/// (20 from the package, 30 overage), a promo of 10 (settles 10 of the overage) and the void
/// of u — give the same account in every arrival order the store can see: the void after the
/// usage (resolved from the ledger's lines), in the same batch, or before it (it waits, and
/// the usage's transaction applies it). By hand, in event-time order (T + minutes):
///
/// | event (time)         | effect                                           | balance | overage |
/// |----------------------|--------------------------------------------------|---------|---------|
/// | grant pkg 20 (T)     | +20                                              | 20      | 0       |
/// | usage u 50 (T+1)     | pkg −20, overage 30                              | 0       | 30      |
/// | grant promo 10 (T+2) | settles 10 of the overage                        | 0       | 20      |
/// | void of u (T+3)      | 50 back: 20 pay the overage, 30 into reversal:…  | 30      | 0       |
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test]
async fn the_store_gives_the_same_account_whichever_arrives_first() {
    use tally::event::GrantKind;
    use tally::ledger::store::{Action, Correction, DebitInfo};
    use tally::ledger::{Item, NewGrant, Store};

    let cfg = test_config("usage_voids_store");
    let mut store = Store::connect(&cfg.postgres).await.unwrap();
    store.migrate().await.unwrap();
    let now = Utc::now();
    let base = DateTime::from_timestamp(now.timestamp() - 3600, 0).unwrap();
    let at = |m: i64| base + chrono::Duration::minutes(m);
    // Each order on its own account.
    let orders: [(&str, &[&[usize]]); 4] = [
        ("in-order", &[&[0], &[1], &[2], &[3]]),
        ("void-with-usage", &[&[0], &[2], &[3, 1]]),
        ("void-first", &[&[3], &[0], &[2], &[1]]),
        ("void-twice-first", &[&[3, 3], &[0, 2], &[3], &[1], &[3]]),
    ];
    for (account, batches) in orders {
        // Identities are global (claims): each account's events have their own.
        let own =
            |id: &str| -> &'static str { Box::leak(format!("{account}-{id}").into_boxed_str()) };
        let usage_id = own("u");
        let grant = |id: &'static str, kind, credits, m| Item {
            source: "//billing.test",
            id,
            account_id: account,
            time: at(m),
            action: Action::Grant(NewGrant {
                grant_id: id.to_owned(),
                kind,
                credits,
                expires_at: None,
                priority: None,
            }),
        };
        let events = [
            grant(own("pkg"), GrantKind::Package, dec!(20), 0),
            Item {
                source: CHAT,
                id: usage_id,
                account_id: account,
                time: at(1),
                action: Action::Debit(DebitInfo {
                    credits: dec!(50),
                    usage_kind: "chat_response",
                    price_version: "v1",
                    rule_id: "r",
                    hold_id: None,
                }),
            },
            grant(own("promo"), GrantKind::Promo, dec!(10), 2),
            Item {
                source: "//support.test",
                id: own("v"),
                account_id: account,
                time: at(3),
                action: Action::VoidUsage {
                    event_source: CHAT,
                    event_id: usage_id,
                    why: Correction {
                        actor: "ops",
                        reason: "test traffic",
                    },
                },
            },
        ];
        let none = Default::default();
        for batch in batches {
            let items: Vec<Item<'_>> = batch.iter().map(|&i| events[i].clone()).collect();
            store.apply_batch("g", &items, &none).await.unwrap();
        }
        let view = store.balance_view(account, now).await.unwrap().unwrap();
        let grants: Vec<(String, Decimal)> = view
            .grants
            .iter()
            .map(|g| (g.grant_id.clone(), g.remaining))
            .collect();
        assert_eq!(
            (view.spendable, view.overage),
            (dec!(30), dec!(0)),
            "{account}"
        );
        assert_eq!(
            grants,
            vec![(format!("reversal://chat.test:{usage_id}"), dec!(30))],
            "{account}"
        );
        // The lines explain it, and the reversal lines carry the void's author and what
        // they reverse.
        let lines = store.entries(account, 100).await.unwrap();
        let last = lines.last().unwrap();
        assert_eq!(
            (last.balance_after, last.overage_after),
            (dec!(30), dec!(0)),
            "{account}: {lines:#?}"
        );
        let reversed: Decimal = lines
            .iter()
            .filter(|l| l.kind == "reversal")
            .inspect(|l| {
                assert_eq!(
                    (
                        l.actor.as_deref(),
                        l.reverses_source.as_deref(),
                        l.reverses_id.as_deref()
                    ),
                    (Some("ops"), Some(CHAT), Some(usage_id)),
                    "{account}"
                )
            })
            .map(|l| l.amount)
            .sum();
        assert_eq!(reversed, dec!(50), "{account}: {lines:#?}");
        // What `tally reconcile` reads from the ledger: u left out.
        let day = base.date_naive();
        let charged = store
            .charged_by_day(
                day.pred_opt().unwrap(),
                day.succ_opt().unwrap(),
                Some(account),
            )
            .await
            .unwrap();
        assert!(charged.is_empty(), "{account}: {charged:?}");
    }
}
