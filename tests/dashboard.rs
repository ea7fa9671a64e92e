//! The usage dashboard in a real browser: Debian's headless Chromium loads
//! /dashboard/acme#token=<acme's token> from the API served on 127.0.0.1:0, against the real
//! services fed with 3 months of usage; the rendered DOM must show the balance pill, the
//! allowance gauge, the graph, the peak days and the projection with the figures the ledger
//! and ClickHouse hold. The DOM and a screenshot are saved under target/artifacts/.
//!
//! Chromium: /usr/bin/chromium (scripts/test installs Debian's `chromium` when it is missing)
//! or TALLY_TEST_CHROMIUM.

mod common;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Days, SecondsFormat, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use rust_decimal_macros::dec;
use serde_json::json;

use common::api::{with_tokens, Server, ACME, ADMIN};
use common::{ev, test_config, TestEnv};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn chromium() -> PathBuf {
    let path = std::env::var_os("TALLY_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: run scripts/test (it installs Debian's chromium) or set TALLY_TEST_CHROMIUM",
        path.display()
    );
    path
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::repo_path("target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium on `url` with `extra` arguments; returns stdout.
async fn run_chromium(url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,1500",
        // Virtual time does not advance while fetches are pending: the page's API calls and
        // its rendering finish within this budget.
        "--virtual-time-budget=30000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finished within 120 s")
        .expect("chromium started");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The opening tag and the text right after it, of the element whose opening tag contains
/// `needle` (e.g. `id="balance-pill"`).
fn element<'a>(dom: &'a str, needle: &str) -> (&'a str, &'a str) {
    let at = dom
        .find(needle)
        .unwrap_or_else(|| panic!("{needle} not in the page"));
    let start = dom[..=at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    let text_end = end + 1 + dom[end + 1..].find('<').unwrap();
    (&dom[start..=end], &dom[end + 1..text_end])
}

fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {tag}"))
        + key.len();
    &tag[at..at + tag[at..].find('"').unwrap()]
}

/// The page's number format: cut to `places`, trailing zeros dropped, thousands grouped.
fn shown(value: Decimal, places: u32) -> String {
    let cut = value
        .round_dp_with_strategy(places, RoundingStrategy::ToZero)
        .normalize();
    let s = cut.abs().to_string();
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if cut.is_sign_negative() && !cut.is_zero() {
        "-"
    } else {
        ""
    };
    if frac.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{frac}")
    }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_the_accounts_figures_in_chromium() {
    let mut cfg = with_tokens(test_config("dashboard"));
    cfg.pipeline.dedupe_window_days = 120; // three months of history are admitted
    let env = TestEnv::with_config(cfg).await;
    let tally = common::RunningTally::start(&env);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let c = server.client();

    // A plan and a top-up through the API.
    let r = c
        .put(
            "/v1/accounts/acme/plan",
            Some(ADMIN),
            &json!({"plan_id": "team", "monthly_allowance": "1000", "billing_day": 1,
                    "overage_policy": "bill_overage"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let r = c
        .post(
            "/v1/accounts/acme/grants",
            Some(ADMIN),
            &json!({"grant_id": "topup-2025", "kind": "top_up", "credits": "500"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;

    // 85 days of chat usage (1 credit a response), three peak days.
    let today = Utc::now().date_naive();
    let peaks = [(10u64, 40u32), (45, 35), (70, 30)];
    let mut records = Vec::new();
    let mut total = Decimal::ZERO;
    let mut chats = 0u64;
    for k in 1..=85u64 {
        let responses = match peaks.iter().find(|(day, _)| *day == k) {
            Some((_, r)) => *r,
            None if k % 3 == 0 => (k % 7 + 1) as u32,
            None => continue,
        };
        let at = (today - Days::new(k))
            .and_hms_opt(14, 30, 0)
            .unwrap()
            .and_utc();
        records.push((
            env.cfg.kafka.topics.chat_responses.clone(),
            "acme".to_owned(),
            ev::chat(
                &format!("chat-{k}"),
                "acme",
                &ts(at),
                "gpt-4o-mini",
                "standard",
                responses,
            ),
        ));
        total += Decimal::from(responses);
        chats += 1;
    }
    env.send(&records).await;
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    env.wait_analytics_caught_up(Duration::from_secs(60)).await;

    // What the API says (the page must show the same).
    let balance = c.get("/v1/accounts/acme/balance", Some(ACME)).await.json();
    let spendable = d(balance["spendable"].as_str().unwrap());
    // Event time: every chat is dated before the plan and the top-up (published now), so
    // none of it is this cycle's or the top-up's: it is overage, billed with the first cycle
    // (docs/billing.md). The allowance and the top-up are untouched.
    assert_eq!(spendable, dec!(1500));
    assert_eq!(d(balance["overage"].as_str().unwrap()), total);
    // Total purchased: the original credits of the active grants, by hand: this cycle's
    // allowance 1,000 + the top-up 500 (both untouched, so all of it remains).
    assert_eq!(
        balance["purchased"],
        json!({"remaining": "1500.000000", "total": "1500.000000", "grants": 2})
    );
    let used_percent = d(balance["allowance"]["used_percent"].as_str().unwrap());
    assert_eq!(used_percent, dec!(0));
    let summary = c.get("/v1/accounts/acme/summary", Some(ACME)).await.json();

    // The page in Chromium, with acme's own token in the fragment.
    let url = server.url(&format!("/dashboard/acme#token={ACME}"));
    let dom = run_chromium(&url, &["--dump-dom".to_owned()]).await;
    let out = artifacts();
    std::fs::write(out.join("dashboard.html"), &dom).unwrap();
    let (body, _) = element(&dom, "<body");
    assert_eq!(
        attr(body, "data-state"),
        "ready",
        "page state; DOM in {}",
        out.join("dashboard.html").display()
    );
    assert!(!dom.contains(ACME), "the token is not left in the page");

    let (pill, pill_text) = element(&dom, "id=\"balance-pill\"");
    assert_eq!(d(attr(pill, "data-value")), spendable);
    assert_eq!(attr(pill, "data-total"), "1500.000000");
    assert_eq!(
        pill_text,
        format!(
            "1,500 / 1,500 credits remaining · overage {}",
            shown(total, 2)
        )
    );

    // The price of each model, from tests/fixtures/prices.toml (version t-2020), by model.
    let (prices, _) = element(&dom, "id=\"prices\"");
    assert_eq!(attr(prices, "data-version"), "t-2020");
    let list = &dom[dom.find("id=\"prices\"").unwrap()..];
    let list = &list[..list.find("</ul>").unwrap()];
    let items: Vec<&str> = list
        .split("<li")
        .skip(1)
        .map(|li| &li[li.find('>').unwrap() + 1..li.find("</li>").unwrap()])
        .collect();
    assert_eq!(
        items,
        [
            "gemini-3-flash (ai_analysis): 0.25 credits per analysis",
            "gpt-4o-mini (chat_response): 1 credit per response",
            "gpt-4o-mini (chat_response, voice_tier=premium): 1.5 credits per response",
        ]
    );
    assert_eq!(attr(pill, "data-status"), "overage");

    let (gauge, gauge_text) = element(&dom, "id=\"gauge-label\"");
    assert_eq!(d(attr(gauge, "data-value")), used_percent);
    assert_eq!(gauge_text, format!("{}%", shown(used_percent, 1)));
    let (_, allowance_text) = element(&dom, "id=\"allowance-text\"");
    assert_eq!(
        allowance_text,
        "0 of 1,000 credits used (1,000 left)".to_owned()
    );
    let (reset, _) = element(&dom, "id=\"reset-text\"");
    assert_eq!(
        attr(reset, "data-days"),
        balance["days_until_reset"].to_string()
    );

    // The graph: one bar per day of the trend's 3 months, and every credit of them.
    let (chart, _) = element(&dom, "id=\"chart\"");
    assert_eq!(
        attr(chart, "data-from"),
        summary["trend"]["from"].as_str().unwrap()
    );
    assert_eq!(attr(chart, "data-to"), today.to_string());
    let from: chrono::NaiveDate = summary["trend"]["from"].as_str().unwrap().parse().unwrap();
    let days = (today - from).num_days() + 1;
    assert_eq!(attr(chart, "data-days"), days.to_string());
    assert_eq!(d(attr(chart, "data-total")), total);
    let chart_html = &dom[dom.find("id=\"chart\"").unwrap()..];
    assert!(chart_html.contains("class=\"uplot"), "uPlot drew the graph");
    assert!(chart_html.contains("<canvas"), "with a canvas");

    // Peak days, largest first.
    let peaks_html = &dom[dom.find("id=\"peaks\"").unwrap()..];
    let peaks_html = &peaks_html[..peaks_html.find("</table>").unwrap()];
    let rows: Vec<(String, Decimal)> = peaks_html
        .match_indices("<tr data-day=")
        .map(|(i, _)| {
            let (tag, _) = element(&peaks_html[i..], "data-day=");
            (
                attr(tag, "data-day").to_owned(),
                d(attr(tag, "data-credits")),
            )
        })
        .collect();
    assert_eq!(rows.len(), 5, "{peaks_html}");
    let expected: Vec<(String, Decimal)> = peaks
        .iter()
        .map(|(k, r)| ((today - Days::new(*k)).to_string(), Decimal::from(*r)))
        .collect();
    assert_eq!(rows[..3], expected[..]);

    // Projection and the counts.
    let (projection, projection_text) = element(&dom, "id=\"projection-total\"");
    let projected = d(summary["projection"]["projected_total"].as_str().unwrap());
    assert_eq!(d(attr(projection, "data-value")), projected);
    assert_eq!(projection_text, format!("{} credits", shown(projected, 2)));
    let (average, _) = element(&dom, "id=\"average-text\"");
    assert_eq!(
        attr(average, "data-value"),
        summary["average_daily"].as_str().unwrap()
    );
    let (chats_dd, chats_text) = element(&dom, "data-testid=\"chats\"");
    assert_eq!(attr(chats_dd, "data-value"), chats.to_string());
    assert_eq!(chats_text, chats.to_string());
    let (credits_dd, _) = element(&dom, "data-testid=\"credits\"");
    assert_eq!(d(attr(credits_dd, "data-value")), total);

    // A screenshot for people.
    let png = out.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(&url, &[format!("--screenshot={}", png.display())]).await;
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "screenshot {} is {size} bytes",
        png.display()
    );
    assert!(png_is(&png));

    // Another account's token sees nothing of acme: the page says so.
    let other = server.url(&format!("/dashboard/acme#token={}", common::api::GLOBEX));
    let dom = run_chromium(&other, &["--dump-dom".to_owned()]).await;
    let (body, _) = element(&dom, "<body");
    assert_eq!(attr(body, "data-state"), "error");
    assert!(dom.contains("Account acme not found."));
    let (pill, _) = element(&dom, "id=\"balance-pill\"");
    assert!(!pill.contains("data-value"), "no figure shown");

    server.stop().await;
    tally.stop().await;
}

fn png_is(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
}
