//! The HTTP API against the real services (each test in its own topics, schema and
//! database): every route, the token rules (missing, wrong, another account's), malformed
//! parameters and bodies, idempotent grants, readiness and metrics; the route list against
//! `schemas/openapi.yaml`; and `tally run` serving the API and stopping gracefully.
//! Every status a test sees must be declared in the OpenAPI document for its route.
//!
//! The routes' data is written once ([`fixture`]: a plan, grants and usage, Tally and the API
//! left running), and each route is a named case reading it.

mod common;

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, Days, NaiveDate, SecondsFormat, Utc};
use hyper::Method;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use common::api::{with_tokens, Client, Server, ACME, ADMIN, GLOBEX, OPENAPI};
use common::{ev, test_config, TestEnv};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A decimal string of an answer.
fn d(v: &Value) -> Decimal {
    Decimal::from_str(
        v.as_str()
            .unwrap_or_else(|| panic!("not a decimal string: {v}")),
    )
    .unwrap()
}

/// 10:00 UTC `days` ago.
fn at_ten(days: u64) -> DateTime<Utc> {
    (Utc::now().date_naive() - Days::new(days))
        .and_hms_opt(10, 0, 0)
        .unwrap()
        .and_utc()
}

/// What the cases read: the services' data after the writes and the usage below, Tally
/// and its API still running (on the set-up's runtime, for the whole test process).
struct Fixture {
    env: TestEnv,
    c: Client,
    /// The days of the usage: two days ago, yesterday, and today just after midnight.
    d1: DateTime<Utc>,
    d2: DateTime<Utc>,
    d3: DateTime<Utc>,
    /// The top-up as written.
    topup: Value,
}

/// The shared data, set up once by the first case that asks ([`common::set_up_once`]), Tally
/// and the API kept running while the cases read it.
fn fixture() -> &'static Fixture {
    static FIXTURE: std::sync::OnceLock<Option<Fixture>> = std::sync::OnceLock::new();
    common::set_up_once(&FIXTURE, set_up)
}

/// A plan and grants through the API (accepted, retried, the same grant id for another
/// account, then 200 once applied and 409 with other terms), then usage of every kind
/// through Kafka and a malformed record; waits until both pipelines caught up.
async fn set_up() -> (Fixture, (common::RunningTally, Server)) {
    let mut cfg = with_tokens(test_config("api"));
    // The plan and grants below take effect two days back (effective_at, within the grace).
    cfg.billing.grace = Duration::from_secs(3 * 86_400);
    let env = TestEnv::with_config(cfg).await;
    let topics = env.cfg.kafka.topics.clone();
    let tally = common::RunningTally::start(&env);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let c = server.client();
    let wait = Duration::from_secs(60);

    // --- Phase 1: plan and grants through the API -------------------------------------
    // Effective before the usage below (event time: usage before its plan is overage), on
    // a billing day that puts all of it in one cycle.
    let effective = at_ten(2) - chrono::Duration::hours(1);
    let day = effective.day().min(28);
    let r = c
        .put(
            "/v1/accounts/acme/plan",
            Some(ADMIN),
            &json!({"plan_id": "pro", "monthly_allowance": "100", "billing_day": day,
                    "overage_policy": "bill_overage", "allowance_alert_percents": [50, 100],
                    "effective_at": ts(effective)}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["event"]["type"], "tally.account.plan.v1");
    let promo_expiry = ts(Utc::now() + chrono::Duration::days(40));
    let promo = json!({"grant_id": "promo-1", "kind": "promo", "credits": "10",
                       "expires_at": promo_expiry, "effective_at": ts(effective)});
    let topup = json!({"grant_id": "topup-1", "kind": "top_up", "credits": "50.000",
                       "effective_at": ts(effective)});
    for body in [&promo, &topup] {
        let r = c.post("/v1/accounts/acme/grants", Some(ADMIN), body).await;
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.json()["status"], "accepted");
    }
    // A retry before the ledger applied it: published again, the same event identity.
    let r = c
        .post("/v1/accounts/acme/grants", Some(ADMIN), &promo)
        .await;
    assert!([200, 202].contains(&r.status), "{}", r.text());
    assert_eq!(r.json()["event"]["id"], "grant:acme:promo-1");
    // Another account may use the same grant id.
    let r = c
        .post(
            "/v1/accounts/globex/grants",
            Some(ADMIN),
            &json!({"grant_id": "topup-1", "kind": "package", "credits": "20"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.wait_ledger_caught_up(wait).await;

    // Applied: the same grant answers 200 at once, other terms 409.
    let r = c
        .post("/v1/accounts/acme/grants", Some(ADMIN), &topup)
        .await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("applied"))
    );
    let r = c
        .post(
            "/v1/accounts/acme/grants",
            Some(ADMIN),
            &json!({"grant_id": "topup-1", "kind": "top_up", "credits": "60"}),
        )
        .await;
    assert_eq!(
        (r.status, r.field()),
        (409, "grant_id".to_owned()),
        "{}",
        r.text()
    );

    // --- Phase 2: usage through Kafka -----------------------------------------------------
    let (d1, d2) = (at_ten(2), at_ten(1));
    let d3 = (Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 30)
        .unwrap()
        .and_utc())
    .min(Utc::now() - chrono::Duration::seconds(1));
    let s = |t: DateTime<Utc>, secs: i64| ts(t + chrono::Duration::seconds(secs));
    let usage = vec![
        (
            topics.chat_responses.clone(),
            ev::chat("u1", "acme", &s(d1, 0), "gpt-4o-mini", "standard", 4),
        ), // 4
        (
            topics.calls.clone(),
            ev::call(
                "u2",
                "acme",
                "inbound",
                &s(d1, 0),
                Some(&s(d1, 5)),
                &s(d1, 130),
                5,
            ),
        ), // 120 s: 2
        (
            topics.chat_responses.clone(),
            ev::chat("u3", "acme", &s(d2, 0), "gpt-4o-mini", "premium", 2),
        ), // 3
        (
            topics.metered.clone(),
            ev::analysis("u4", "acme", &s(d2, 60), "gemini-3-flash", "3"),
        ), // 0.75
        (
            topics.instance_hours.clone(),
            ev::instance("u5", "acme", "gpu.a10", &s(d2, 0), &s(d2, 5400)),
        ), // 2 h: 20
        (
            topics.chat_responses.clone(),
            ev::chat("u6", "acme", &ts(d3), "gpt-4o-mini", "standard", 1),
        ), // 1
        (topics.calls.clone(), b"{not json".to_vec()), // dead letter
    ];
    env.send(
        &usage
            .into_iter()
            .map(|(t, p)| (t, "acme".to_owned(), p))
            .collect::<Vec<_>>(),
    )
    .await;
    env.wait_ledger_caught_up(wait).await;
    env.wait_analytics_caught_up(wait).await;

    (
        Fixture {
            env,
            c,
            d1,
            d2,
            d3,
            topup,
        },
        (tally, server),
    )
}

/// Credits per day of acme's usage, from its first day to today (by hand, from the prices of
/// tests/fixtures/prices.toml).
fn expected_days(f: &Fixture) -> Vec<(String, Decimal)> {
    let (day1, today) = (f.d1.date_naive(), Utc::now().date_naive());
    let mut expected_days = vec![
        (day1.to_string(), dec!(6)),
        (f.d2.date_naive().to_string(), dec!(23.75)),
    ];
    if f.d3.date_naive() == today {
        expected_days.push((today.to_string(), dec!(1)));
    } else {
        expected_days[1].1 += dec!(1); // just after midnight: the last chat is yesterday's
        expected_days.push((today.to_string(), dec!(0)));
    }
    expected_days
}

/// Balance: spendable, grants in consumption order, the plan's allowance and the next expiry.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_of_each_account() {
    let f = fixture();
    let c = f.c;
    let b = c.get("/v1/accounts/acme/balance", Some(ADMIN)).await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(b.headers["cache-control"], "no-store");
    let b = b.json();
    assert_eq!(d(&b["spendable"]), dec!(129.25), "{b:#}"); // 100 - 30.75 + 10 + 50
    assert_eq!(d(&b["overage"]), dec!(0));
    let grants: Vec<(&str, Decimal)> = b["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["kind"].as_str().unwrap(), d(&g["remaining"])))
        .collect();
    assert_eq!(
        grants,
        vec![
            ("allowance", dec!(69.25)),
            ("promo", dec!(10)),
            ("top_up", dec!(50))
        ]
    );
    assert_eq!(b["plan"]["plan_id"], "pro");
    assert_eq!(d(&b["allowance"]["used"]), dec!(30.75));
    assert_eq!(d(&b["allowance"]["granted"]), dec!(100));
    assert_eq!(b["allowance"]["used_percent"], "30.75");
    // The allowance expires at the cycle end (the 1st), before the promo (40 days).
    assert!(b["next_expiry"]["grant_id"]
        .as_str()
        .unwrap()
        .starts_with("allowance:"));
    assert_eq!(b["next_expiry"]["at"], b["cycle"]["end"]);
    let days = b["days_until_reset"].as_i64().unwrap();
    assert!((1..=31).contains(&days), "{days}");
    let g = c
        .get("/v1/accounts/globex/balance", Some(GLOBEX))
        .await
        .json();
    assert_eq!(d(&g["spendable"]), dec!(20));
    assert_eq!(g["plan"], Value::Null);
}

/// Usage: the daily series, totals by kind and model, counts, other granularities and the default range.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_day_week_and_month() {
    let f = fixture();
    let c = f.c;
    let d1 = f.d1;
    let (day1, today) = (d1.date_naive(), Utc::now().date_naive());
    let r = c
        .get(
            &format!("/v1/accounts/acme/usage?from={day1}&to={today}&granularity=day"),
            Some(ACME),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = r.json();
    let series: Vec<(String, Decimal)> = u["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_str().unwrap().to_owned(), d(&p["credits"])))
        .collect();
    let expected_days = expected_days(f);
    assert_eq!(series, expected_days);
    assert_eq!(d(&u["totals"]["credits"]), dec!(30.75));
    assert_eq!(u["totals"]["events"], 6);
    let by_kind: Vec<(&str, Decimal)> = u["totals"]["by_kind"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["kind"].as_str().unwrap(), d(&k["credits"])))
        .collect();
    assert_eq!(
        by_kind,
        vec![
            ("ai_analysis", dec!(0.75)),
            ("call", dec!(2)),
            ("chat_response", dec!(8)),
            ("instance_hours", dec!(20))
        ]
    );
    assert!(u["totals"]["by_kind_model"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["model"] == "gemini-3-flash" && d(&k["credits"]) == dec!(0.75)));
    let counts = &u["counts"];
    assert_eq!(
        (counts["calls"].as_u64(), counts["chats"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(counts["ai_responses"], 7);
    assert_eq!(d(&counts["call_minutes"]), dec!(2));
    assert_eq!(d(&counts["instance_hours"]), dec!(1.5));
    for granularity in ["week", "month"] {
        let u = c
            .get(
                &format!("/v1/accounts/acme/usage?granularity={granularity}&from={day1}"),
                Some(ADMIN),
            )
            .await
            .json();
        let sum: Decimal = u["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| d(&p["credits"]))
            .sum();
        assert_eq!(sum, dec!(30.75), "{granularity}");
        assert_eq!(
            u["series"][0]["start"],
            day1.to_string(),
            "clipped to the range"
        );
    }
    let default = c.get("/v1/accounts/acme/usage", Some(ADMIN)).await.json();
    assert_eq!(default["to"], today.to_string());
    assert_eq!(default["series"].as_array().unwrap().len(), 30);
    assert_eq!(d(&default["totals"]["credits"]), dec!(30.75));
}

/// Summary: peak days, the cycle, the average, the projection and the trend.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_of_the_cycle() {
    let f = fixture();
    let c = f.c;
    let d2 = f.d2;
    let today = Utc::now().date_naive();
    let expected_days = expected_days(f);
    let r = c.get("/v1/accounts/acme/summary", Some(ACME)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let s = r.json();
    assert_eq!(s["as_of"], today.to_string());
    assert_eq!(d(&s["spendable"]), dec!(129.25));
    let peaks: Vec<Decimal> = s["peak_days"]["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| d(&p["credits"]))
        .collect();
    let mut expected_peaks: Vec<Decimal> = expected_days
        .iter()
        .map(|(_, c)| *c)
        .filter(|c| !c.is_zero())
        .collect();
    expected_peaks.sort_by(|a, b| b.cmp(a));
    assert_eq!(peaks, expected_peaks);
    assert_eq!(
        s["peak_days"]["days"][0]["day"],
        d2.date_naive().to_string()
    );
    let cycle_start: NaiveDate = s["cycle"]["start"].as_str().unwrap().parse().unwrap();
    let used: Decimal = expected_days
        .iter()
        .filter(|(day, _)| day.parse::<NaiveDate>().unwrap() >= cycle_start)
        .map(|(_, c)| *c)
        .sum();
    assert_eq!(d(&s["cycle"]["used"]), used);
    assert_eq!(d(&s["cycle"]["allowance"]), dec!(100));
    assert_eq!(s["average_daily"], s["cycle"]["average_daily"]);
    let elapsed = Decimal::from(s["cycle"]["days_elapsed"].as_u64().unwrap());
    assert_eq!(d(&s["average_daily"]), (used / elapsed).trunc_with_scale(6));
    assert_eq!(d(&s["projection"]["spendable"]), dec!(129.25));
    assert_eq!(s["projection"]["used_so_far"], s["cycle"]["used"]);
    assert_eq!(s["trend"]["to"], today.to_string());
    let trend_total: Decimal = s["trend"]["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| d(&t["credits"]))
        .sum();
    assert_eq!(trend_total, dec!(30.75));
    let r = c.get("/v1/accounts/acme/summary?top=1", Some(ADMIN)).await;
    assert_eq!(r.json()["peak_days"]["days"].as_array().unwrap().len(), 1);
}

/// Ledger: every line newest first, the same through pages of 4.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_newest_first_in_pages() {
    let f = fixture();
    let c = f.c;
    let all = c
        .get("/v1/accounts/acme/ledger?limit=500", Some(ACME))
        .await
        .json();
    let all = all["entries"].as_array().unwrap().clone();
    // allowance, promo, top-up grants + 6 debits (the duplicate promo credits once).
    assert_eq!(all.len(), 9, "{all:#?}");
    assert_eq!(
        all.iter().filter(|e| e["grant_id"] == "promo-1").count(),
        1,
        "the promo was applied once"
    );
    assert_eq!(d(&all[0]["balance_after"]), dec!(129.25), "newest first");
    let (mut cursor, mut paged) = (None::<i64>, Vec::new());
    loop {
        let path = match cursor {
            Some(c) => format!("/v1/accounts/acme/ledger?limit=4&cursor={c}"),
            None => "/v1/accounts/acme/ledger?limit=4".to_owned(),
        };
        let page = c.get(&path, Some(ADMIN)).await.json();
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 4);
        paged.extend(entries.iter().cloned());
        match page["next_cursor"].as_i64() {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, all);
    let ids: Vec<i64> = all
        .iter()
        .map(|e| e["entry_id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
}

/// Prices: the version in force and its rules.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_of_the_current_version() {
    let f = fixture();
    let c = f.c;
    let p = c.get("/v1/prices", Some(GLOBEX)).await;
    assert_eq!(p.status, 200);
    let p = p.json();
    assert_eq!(p["current_version"], "t-2020");
    let premium = p["versions"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "chat.premium")
        .unwrap()
        .clone();
    assert_eq!(premium["credits_per_unit"], "1.5");
    assert_eq!(premium["match"]["voice_tier"], "premium");
    assert_eq!(premium["unit"], "response");
}

/// Tokens and scopes: 401 without a valid bearer token; another account's id answers as an unknown one; account tokens never write.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes() {
    let f = fixture();
    let c = f.c;
    let topup = &f.topup;
    let routes = [
        "/v1/prices",
        "/v1/accounts/acme/balance",
        "/v1/accounts/acme/usage",
        "/v1/accounts/acme/summary",
        "/v1/accounts/acme/ledger",
    ];
    for path in routes {
        for auth in [
            None,
            Some("Bearer nope".to_owned()),
            Some(format!("Basic {ADMIN}")),
            Some(format!("Bearer {ADMIN}x")),
        ] {
            let r = c
                .raw(Method::GET, path, auth.clone(), None, Vec::new())
                .await;
            OPENAPI.assert_declared("GET", path, r.status);
            assert_eq!(
                (r.status, r.code()),
                (401, "unauthorized".to_owned()),
                "{path} {auth:?}"
            );
            assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"tally\"");
        }
    }
    for token in [None, Some("wrong")] {
        let r = c.post("/v1/accounts/acme/grants", token, topup).await;
        assert_eq!(r.status, 401);
        let r = c.put("/v1/accounts/acme/plan", token, &json!({})).await;
        assert_eq!(r.status, 401);
    }
    // Another account's id answers exactly as an unknown account does.
    let unknown = c.get("/v1/accounts/nobody/balance", Some(ADMIN)).await;
    assert_eq!(unknown.status, 404);
    for path in [
        "/v1/accounts/globex/balance",
        "/v1/accounts/globex/usage",
        "/v1/accounts/globex/summary",
        "/v1/accounts/globex/ledger",
        "/v1/accounts/nobody/balance",
        "/v1/accounts/bad%2Fid/balance",
    ] {
        let r = c.get(path, Some(ACME)).await;
        assert_eq!((r.status, r.json()), (404, unknown.json()), "{path}");
    }
    for path in [
        "/v1/accounts/nobody/usage",
        "/v1/accounts/nobody/summary",
        "/v1/accounts/nobody/ledger",
    ] {
        assert_eq!(c.get(path, Some(ADMIN)).await.status, 404, "{path}");
    }
    assert_eq!(
        c.get("/v1/accounts/globex/balance", Some(GLOBEX))
            .await
            .status,
        200
    );
    // Account tokens never write: their own account 403, another 404.
    let r = c.post("/v1/accounts/acme/grants", Some(ACME), topup).await;
    assert_eq!((r.status, r.code()), (403, "forbidden".to_owned()));
    let r = c
        .post("/v1/accounts/globex/grants", Some(ACME), topup)
        .await;
    assert_eq!(r.status, 404);
    let plan = json!({"plan_id": "x", "monthly_allowance": "1", "billing_day": 1,
                      "overage_policy": "bill_overage"});
    assert_eq!(
        c.put("/v1/accounts/acme/plan", Some(ACME), &plan)
            .await
            .status,
        403
    );
    assert_eq!(
        c.put("/v1/accounts/globex/plan", Some(ACME), &plan)
            .await
            .status,
        404
    );
}

/// Operations: health, readiness of each dependency, and the metrics (no secret in them).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let f = fixture();
    let c = f.c;
    let topics = &f.env.cfg.kafka.topics;
    let r = c.get("/v1/accounts/acme/balance", Some(ADMIN)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = c.get("/healthz", None).await;
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = c.get("/readyz", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for dep in ["postgresql", "clickhouse", "kafka"] {
        assert_eq!(r.json()["dependencies"][dep]["status"], "up", "{dep}");
    }
    let m = c.get("/metrics", None).await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = m.text();
    for line in [
        format!(
            "tally_consumer_lag{{partition=\"0\",pipeline=\"ledger\",topic=\"{}\"}} 0",
            topics.calls
        ),
        format!(
            "tally_consumer_lag{{partition=\"0\",pipeline=\"analytics\",topic=\"{}\"}} 0",
            topics.calls
        ),
    ] {
        assert!(m.contains(&line), "{line} not in\n{m}");
    }
    let value = |prefix: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} not in\n{m}"))
    };
    assert!(value("tally_events_total{kind=\"chat_response\",pipeline=\"ledger\"}") >= 3.0);
    assert!(value("tally_events_total{kind=\"chat_response\",pipeline=\"analytics\"}") >= 3.0);
    assert!(value("tally_events_total{kind=\"grant\",pipeline=\"ledger\"}") >= 3.0);
    assert!(value("tally_dead_letters_total{reason=\"malformed_json\"}") >= 1.0);
    assert!(value("tally_batch_duration_seconds_count{pipeline=\"ledger\"}") >= 1.0);
    assert!(value("tally_transaction_duration_seconds_count{pipeline=\"analytics\"}") >= 1.0);
    assert!(m.contains("tally_http_requests_total{method=\"GET\",route=\"/v1/accounts/{id}/balance\",status=\"200\"}"));
    // Secrets and tokens never reach the metrics.
    assert!(!m.contains(ADMIN) && !m.contains(ACME));
}

/// Parameters and bodies are checked before any store is read: each mistake answers 400
/// (or 413/415) naming the field.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_parameters_and_bodies_are_refused() {
    let cfg = Arc::new(with_tokens(test_config("api_input")));
    let prices = Arc::new(tally::rating::PriceTable::load(&cfg.prices.path).unwrap());
    let server = Server::start(cfg, prices).await;
    let c = server.client();
    let bad = |status: u16, field: &'static str| (status, field.to_owned());

    for (query, field) in [
        ("from=2025-13-01", "from"),
        ("from=2025-6-1", "from"),
        ("to=tomorrow", "to"),
        ("from=2025-06-10&to=2025-06-01", "from"),
        ("from=2000-01-01&to=2025-01-01", "to"),
        ("granularity=hour", "granularity"),
        ("form=2025-06-01", "form"),
        ("from=2025-06-01&from=2025-06-02", "from"),
    ] {
        let r = c
            .get(&format!("/v1/accounts/acme/usage?{query}"), Some(ADMIN))
            .await;
        assert_eq!(
            (r.status, r.field()),
            bad(400, field),
            "{query}: {}",
            r.text()
        );
        assert_eq!(r.code(), "invalid_request");
    }
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=-1", "cursor"),
        ("cursor=1.5", "cursor"),
        ("page=2", "page"),
    ] {
        let r = c
            .get(&format!("/v1/accounts/acme/ledger?{query}"), Some(ADMIN))
            .await;
        assert_eq!(
            (r.status, r.field()),
            bad(400, field),
            "{query}: {}",
            r.text()
        );
    }
    for query in ["top=0", "top=32", "top=x"] {
        let r = c
            .get(&format!("/v1/accounts/acme/summary?{query}"), Some(ADMIN))
            .await;
        assert_eq!((r.status, r.field()), bad(400, "top"), "{query}");
    }
    for path in [
        "/v1/accounts/bad%2Fid/balance",
        "/v1/accounts/a%20b/usage",
        &format!("/v1/accounts/{}/ledger", "x".repeat(129)),
    ] {
        let r = c.get(path, Some(ADMIN)).await;
        assert_eq!((r.status, r.field()), bad(400, "account_id"), "{path}");
    }

    let grant =
        |body: Value| async move { c.post("/v1/accounts/acme/grants", Some(ADMIN), &body).await };
    let ok = json!({"grant_id": "g-1", "kind": "top_up", "credits": "10"});
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b
    };
    let without = |key: &str| {
        let mut b = ok.clone();
        b.as_object_mut().unwrap().remove(key);
        b
    };
    let past = ts(Utc::now() - chrono::Duration::days(1));
    for (body, field) in [
        (with("colour", json!("red")), "colour"),
        (with("credits", json!(10)), "credits"),
        (with("credits", json!(1.5)), "credits"),
        (with("credits", json!("0")), "credits"),
        (with("credits", json!("-5")), "credits"),
        (with("credits", json!("1.1234567")), "credits"),
        (with("credits", json!("1e3")), "credits"),
        (with("credits", json!("007")), "credits"),
        (with("kind", json!("allowance")), "kind"),
        (with("kind", json!("manual")), "kind"),
        (with("expires_at", json!("next week")), "expires_at"),
        (with("expires_at", json!(past)), "expires_at"),
        (with("priority", json!("high")), "priority"),
        (with("grant_id", json!("")), "grant_id"),
        (with("grant_id", json!("g".repeat(251))), "grant_id"),
        (without("grant_id"), "grant_id"),
        (without("credits"), "credits"),
        (json!([1, 2]), "body"),
    ] {
        let r = grant(body.clone()).await;
        assert_eq!(
            (r.status, r.field()),
            bad(400, field),
            "{body}: {}",
            r.text()
        );
    }
    let post = |ct: Option<&'static str>, body: &'static [u8]| async move {
        c.send(
            Method::POST,
            "/v1/accounts/acme/grants",
            Some(ADMIN),
            ct,
            body.to_vec(),
        )
        .await
    };
    let r = post(Some("application/json"), br#"{"grant_id": "g-1", "#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = post(
        Some("application/json"),
        br#"{"grant_id": "g-1", "kind": "top_up", "credits": "10"} {}"#,
    )
    .await;
    assert_eq!((r.status, r.field()), bad(400, "body"));
    let r = post(
        Some("text/plain"),
        br#"{"grant_id": "g-1", "kind": "top_up", "credits": "10"}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.code()),
        (415, "unsupported_media_type".to_owned())
    );
    let r = post(
        None,
        br#"{"grant_id": "g-1", "kind": "top_up", "credits": "10"}"#,
    )
    .await;
    assert_eq!(r.status, 415);
    let big = serde_json::to_vec(&with("grant_id", json!("g".repeat(2000)))).unwrap();
    let r = c
        .send(
            Method::POST,
            "/v1/accounts/acme/grants",
            Some(ADMIN),
            Some("application/json"),
            big,
        )
        .await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".to_owned()));

    let plan = json!({"plan_id": "pro", "monthly_allowance": "100", "billing_day": 15,
                      "overage_policy": "bill_overage"});
    let plan_with = |key: &str, value: Value| {
        let mut b = plan.clone();
        b[key] = value;
        b
    };
    for (body, field) in [
        (plan_with("billing_day", json!(0)), "billing_day"),
        (plan_with("billing_day", json!(32)), "billing_day"),
        (plan_with("billing_day", json!("15")), "billing_day"),
        (
            plan_with("monthly_allowance", json!("-1")),
            "monthly_allowance",
        ),
        (
            plan_with("overage_policy", json!("forgive")),
            "overage_policy",
        ),
        (
            plan_with("top_up_validity_months", json!(0)),
            "top_up_validity_months",
        ),
        (
            plan_with("low_balance_percent", json!("101")),
            "low_balance_percent",
        ),
        (
            plan_with("allowance_alert_percents", json!([50, 101])),
            "allowance_alert_percents[1]",
        ),
        (
            plan_with("allowance_alert_percents", json!([50, "80"])),
            "allowance_alert_percents[1]",
        ),
        (plan_with("allowance", json!("100")), "allowance"),
    ] {
        let r = c.put("/v1/accounts/acme/plan", Some(ADMIN), &body).await;
        assert_eq!(
            (r.status, r.field()),
            bad(400, field),
            "{body}: {}",
            r.text()
        );
    }

    // Unknown routes and assets.
    let r = c.get("/v2/nothing", Some(ADMIN)).await;
    assert_eq!((r.status, r.code()), (404, "not_found".to_owned()));
    assert_eq!(
        c.get("/dashboard/assets/secret.txt", None).await.status,
        404
    );
    assert_eq!(
        c.get("/dashboard/assets/uPlot.iife.min.js", None)
            .await
            .status,
        200
    );
    server.stop().await;
}

/// Readiness names the dependency that is down.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_each_dependency() {
    let mut cfg = with_tokens(test_config("api_ready"));
    cfg.clickhouse.url = "http://127.0.0.1:9".into(); // nothing listens there
    let prices = Arc::new(tally::rating::PriceTable::load(&cfg.prices.path).unwrap());
    let server = Server::start(Arc::new(cfg), prices).await;
    let r = server.client().get("/readyz", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let deps = &r.json()["dependencies"];
    assert_eq!(
        (
            deps["postgresql"]["status"].as_str(),
            deps["clickhouse"]["status"].as_str(),
            deps["kafka"]["status"].as_str()
        ),
        (Some("up"), Some("down"), Some("up")),
        "{deps}"
    );
    assert_eq!(r.json()["status"], "not_ready");
    server.stop().await;
}

/// `schemas/openapi.yaml` lists exactly the router's routes, with exactly the statuses each
/// route answers with.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[test]
fn openapi_describes_every_route() {
    let routes = tally::api::route_specs();
    let from_router: BTreeSet<(String, String)> = routes
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    let documented: BTreeSet<(String, String)> = OPENAPI.routes.keys().cloned().collect();
    assert_eq!(
        from_router, documented,
        "routes in the router but not in openapi.yaml: {:?}; in openapi.yaml but not in the router: {:?}",
        from_router.difference(&documented).collect::<Vec<_>>(),
        documented.difference(&from_router).collect::<Vec<_>>()
    );
    for r in &routes {
        let declared = &OPENAPI.routes[&(r.method.to_owned(), r.path.to_owned())];
        let answered: BTreeSet<u16> = r.statuses.iter().copied().collect();
        assert_eq!(&answered, declared, "{} {}", r.method, r.path);
        // /v1 routes need a bearer token and say so; the others are open.
        let text = std::fs::read_to_string(common::repo_path("schemas/openapi.yaml")).unwrap();
        let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap();
        let op = &docs[0]["paths"][r.path][r.method.to_ascii_lowercase().as_str()];
        let open = op["security"].as_vec().is_some_and(|v| v.is_empty());
        assert_eq!(open, !r.bearer, "{} {}: security", r.method, r.path);
        assert_eq!(r.bearer, r.path.starts_with("/v1/"), "{}", r.path);
        if r.bearer {
            assert!(declared.contains(&401), "{} {}", r.method, r.path);
        }
    }
}

/// `tally run` serves the API on `api.listen` next to the pipelines, and SIGTERM stops both
/// gracefully (exit 0).
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_run_serves_the_api_and_stops_gracefully() {
    use std::io::BufRead;
    let env = TestEnv::with_config(with_tokens(test_config("api_run"))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(&config, toml::to_string(&*env.cfg).unwrap()).unwrap();
    assert!(
        !std::fs::read_to_string(&config).unwrap().contains(ADMIN),
        "only hashes are configured"
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("RUST_LOG", "info,rdkafka=warn")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("API listening") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_owned);
                let _ = tx.send(addr);
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("tally run logs `API listening`")
        .expect("with addr=");
    let c = Client {
        addr: addr.parse().unwrap(),
    };
    assert_eq!(c.get("/healthz", None).await.status, 200);
    assert_eq!(c.get("/v1/prices", Some(ADMIN)).await.status, 200);
    assert_eq!(c.get("/v1/prices", None).await.status, 401);
    let page = c.get("/dashboard/acme", None).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(exit.success(), "graceful shutdown: {exit}\n{log}");
    assert!(!log.contains(ADMIN), "tokens are never logged");
    let hash = tally::api::auth::sha256_hex(ADMIN);
    assert!(!log.contains(&hash), "token hashes are never logged");
}
