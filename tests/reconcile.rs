//! `tally reconcile` against the real services: a small stream of every usage kind through
//! the ledger and analytics pipelines — a duplicate, an unanswered call (no charge), a grant
//! arriving after the usage it pays (corrections), a late chat — reconciles with no
//! difference; then each side is corrupted on purpose and the exact differences are reported,
//! by the library and by the `tally reconcile` command (exit status 1, then 0 for a clean
//! account).

mod common;

use std::time::Duration;

use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use rust_decimal_macros::dec;

use common::{ev, test_config, TestEnv};
use tally::analytics::DateRange;
use tally::reconcile::{reconcile, DayFigures, Difference, Figures};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn at(day: NaiveDate, hour: u32) -> DateTime<Utc> {
    day.and_time(NaiveTime::from_hms_opt(hour, 0, 0).unwrap())
        .and_utc()
}

fn figures(credits: rust_decimal::Decimal, events: u64) -> Figures {
    Figures { credits, events }
}

async fn sql(env: &TestEnv, statement: &str) {
    clickhouse::Client::default()
        .with_url(&env.cfg.clickhouse.url)
        .with_database(&env.cfg.clickhouse.database)
        .query(statement)
        .execute()
        .await
        .unwrap();
}

fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("reconcile")
        .args(args)
        .env("TALLY_CLICKHOUSE__URL", &env.cfg.clickhouse.url)
        .env("TALLY_CLICKHOUSE__DATABASE", &env.cfg.clickhouse.database)
        .env("TALLY_POSTGRES__URL", env.cfg.postgres.url.expose())
        .env("TALLY_POSTGRES__SCHEMA", &env.cfg.postgres.schema)
        .env("TALLY_PRICES__PATH", &env.cfg.prices.path)
        .output()
        .unwrap()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_no_difference_then_exactly_the_corruptions() {
    let mut cfg = test_config("reconcile");
    cfg.billing.grace = Duration::from_secs(12 * 86_400);
    let env = TestEnv::with_config(cfg).await;
    let t = env.cfg.kafka.topics.clone();
    let now = Utc::now();
    let d1 = (now - chrono::Duration::days(4)).date_naive();
    let d2 = d1 + Days::new(1);

    let tally = common::RunningTally::start(&env);

    // Usage first. acct-r1 on d1: a 90 s inbound call (2 started minutes: 2 credits), chats of
    // 3 standard responses (3) and 2 premium (3); on d2: an unanswered call (0 credits, still
    // an event), an analysis of 2 units (0.5) and 1.5 GPU hours (2 started hours: 20).
    // acct-r2 on d2: 4 chat responses (4). The first chat is sent twice.
    let r1 = "acct-r1";
    let r2 = "acct-r2";
    let u1 = ev::chat("u1", r1, &ts(at(d1, 9)), "gpt-4o-mini", "standard", 3);
    let usage = vec![
        (
            t.calls.clone(),
            r1.into(),
            ev::call(
                "c1",
                r1,
                "inbound",
                &ts(at(d1, 8)),
                Some(&ts(at(d1, 8))),
                &ts(at(d1, 8) + chrono::Duration::seconds(90)),
                0,
            ),
        ),
        (t.chat_responses.clone(), r1.into(), u1.clone()),
        (
            t.chat_responses.clone(),
            r1.into(),
            ev::chat("u2", r1, &ts(at(d1, 11)), "gpt-4o-mini", "premium", 2),
        ),
        (
            t.calls.clone(),
            r1.into(),
            ev::call(
                "c2",
                r1,
                "inbound",
                &ts(at(d2, 7)),
                None,
                &ts(at(d2, 7) + chrono::Duration::seconds(20)),
                0,
            ),
        ),
        (
            t.metered.clone(),
            r1.into(),
            ev::analysis("a1", r1, &ts(at(d2, 9)), "gemini-3-flash", "2"),
        ),
        (
            t.instance_hours.clone(),
            r1.into(),
            ev::instance(
                "i1",
                r1,
                "gpu.a10",
                &ts(at(d2, 10)),
                &ts(at(d2, 11) + chrono::Duration::minutes(30)),
            ),
        ),
        (
            t.chat_responses.clone(),
            r2.into(),
            ev::chat("u3", r2, &ts(at(d2, 12)), "gpt-4o-mini", "standard", 4),
        ),
        (t.chat_responses.clone(), r1.into(), u1),
    ];
    env.send(&usage).await;
    env.wait_ledger_caught_up(Duration::from_secs(120)).await;
    // Then a 10-credit package dated before all of it: the window is replayed and the charges
    // move from overage to the package as corrections.
    env.send(&[(
        t.grants.clone(),
        r1.into(),
        ev::grant("g1", r1, &ts(at(d1, 1)), "pkg", "package", "10"),
    )])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(120)).await;
    // The scheduler with a one-hour grace: d1 and d2 become final, so a chat dated d1 sent
    // now is late (charged at the account's time, marked late, placed on d1 by event time).
    let mut store = env.store().await;
    store.grace = chrono::Duration::hours(1);
    store.tick(Utc::now()).await.unwrap();
    env.send(&[(
        t.chat_responses.clone(),
        r1.into(),
        ev::chat("u4", r1, &ts(at(d1, 12)), "gpt-4o-mini", "standard", 1),
    )])
    .await;
    env.wait_ledger_caught_up(Duration::from_secs(120)).await;
    env.wait_analytics_caught_up(Duration::from_secs(120)).await;
    tally.stop().await;

    let count = |q: &'static str| {
        let store = &store;
        async move {
            let n: i64 = store.client().query_one(q, &[]).await.unwrap().get(0);
            n
        }
    };
    assert!(
        count("SELECT count(*) FROM ledger_entries WHERE kind = 'correction' AND corrects IN ('debit', 'overage')").await > 0,
        "the grant arriving late re-allocated the charges"
    );
    assert_eq!(
        count("SELECT count(*) FROM ledger_entries WHERE late AND event_id = 'u4'").await,
        1,
        "u4 is late"
    );

    // Everything agrees.
    let range = DateRange::new(d1 - Days::new(1), d2 + Days::new(1)).unwrap();
    let r = reconcile(&env.cfg, &range, None).await.unwrap();
    assert!(r.is_clean(), "{r:#?}");
    // r1: d1 call, d1 chat, d2 call, d2 ai_analysis, d2 instance_hours; r2: d2 chat.
    assert_eq!((r.compared, r.late), (6, 1), "{r:#?}");
    let text = tally::metrics::render();
    assert!(text.contains("tally_reconcile_differences 0"), "{text}");

    // Corruptions: the roll-up counts u3 twice (a roll-up row written by hand); an extra
    // ledger overage of 2.5 on r1's d2 analyses; a correction of 0.25 that does not net to
    // zero on r2.
    sql(
        &env,
        "INSERT INTO usage_daily SELECT account_id, event_date AS day, kind, model, voice_tier, \
         instance_type, 'corrupt' AS topic, toUInt32(0) AS p, toUInt64(0) AS b, \
         toUInt64(0) AS covered, sumState(credits), sumState(quantity), sumState(billable_seconds), \
         sumState(billable_quantity), countState(), sumState(answered), sumState(responses), \
         uniqExactIfState(call_id, call_id != ''), \
         uniqExactIfState(conversation_id, conversation_id != '') \
         FROM usage_events FINAL WHERE event_id = 'u3' \
         GROUP BY account_id, day, kind, model, voice_tier, instance_type",
    )
    .await;
    let d2_noon = at(d2, 12);
    store
        .client()
        .execute(
            "INSERT INTO ledger_entries (account_id, kind, amount, balance_after, overage_after,
                 effective_at, event_time, event_source, event_id, usage_kind)
             VALUES ('acct-r1', 'overage', -2.5, 0, 0, $1, $1, '//manual', 'x1', 'ai_analysis')",
            &[&d2_noon],
        )
        .await
        .unwrap();
    store
        .client()
        .execute(
            "INSERT INTO ledger_entries (account_id, kind, corrects, grant_id, amount,
                 balance_after, overage_after, effective_at, event_time, event_source, event_id)
             VALUES ('acct-r2', 'correction', 'debit', 'x', -0.25, 0, 0, $1, $1, '//manual', 'x2')",
            &[&d2_noon],
        )
        .await
        .unwrap();

    let r = reconcile(&env.cfg, &range, None).await.unwrap();
    let day = |account: &str, kind: &str| DayFigures {
        account_id: account.into(),
        day: d2,
        kind: kind.into(),
        ledger: Figures::default(),
        late: Figures::default(),
        rollup: Figures::default(),
        rated: Figures::default(),
        rated_charged_events: 0,
    };
    let expected = vec![
        Difference::Day(DayFigures {
            ledger: figures(dec!(3.0), 2),
            rollup: figures(dec!(0.5), 1),
            rated: figures(dec!(0.5), 1),
            rated_charged_events: 1,
            ..day(r1, "ai_analysis")
        }),
        Difference::Day(DayFigures {
            ledger: figures(dec!(4), 1),
            rollup: figures(dec!(8), 2),
            rated: figures(dec!(4), 1),
            rated_charged_events: 1,
            ..day(r2, "chat_response")
        }),
        Difference::Corrections {
            account_id: r2.into(),
            credits: dec!(0.25),
        },
    ];
    assert_eq!(r.differences, expected, "{r:#?}");
    assert_eq!((r.compared, r.late), (6, 1));
    let text = tally::metrics::render();
    assert!(text.contains("tally_reconcile_differences 3"), "{text}");

    // The command: the same differences, exit 1; one clean account and day, exit 0.
    let (from, to) = (range.from.to_string(), range.to.to_string());
    let out = cli(&env, &["--from", &from, "--to", &to]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(
        lines[2].starts_with(&format!("acct-r1          {d2}  ai_analysis")),
        "{stdout}"
    );
    assert!(
        lines[2].contains(" 3.000000 (2) ") && lines[2].contains(" 0.500000 (1) "),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with(&format!("acct-r2          {d2}  chat_response")),
        "{stdout}"
    );
    assert!(
        lines[4].starts_with("acct-r2          corrections of debits and overage net to 0.25"),
        "{stdout}"
    );
    assert_eq!(
        lines[5],
        "3 difference(s); 6 account x day x kind compared, 1 with late usage"
    );
    let d1s = d1.to_string();
    let out = cli(&env, &["--from", &d1s, "--to", &d1s, "--account", r1]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.ends_with("0 difference(s); 2 account x day x kind compared, 1 with late usage\n"),
        "{stdout}"
    );
    // JSON: the late chat of d1 is in the ledger's late figures.
    let out = cli(
        &env,
        &["--from", &d1s, "--to", &d1s, "--account", r1, "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["late"], 1, "{json}");
    // A store that cannot be read: exit 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["reconcile", "--from", &d1s, "--to", &d1s])
        .env("TALLY_CLICKHOUSE__URL", "http://127.0.0.1:9")
        .env("TALLY_CLICKHOUSE__DATABASE", &env.cfg.clickhouse.database)
        .env("TALLY_POSTGRES__URL", env.cfg.postgres.url.expose())
        .env("TALLY_POSTGRES__SCHEMA", &env.cfg.postgres.schema)
        .env("TALLY_PRICES__PATH", &env.cfg.prices.path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    sql(
        &env,
        &format!("DROP DATABASE IF EXISTS {}", env.cfg.clickhouse.database),
    )
    .await;
}
