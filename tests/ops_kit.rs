//! The operations kit under deploy/ names only metrics Tally exports: every `tally_*` metric
//! in the Grafana dashboard's queries and in the Prometheus alert rules appears in a running
//! Tally's `/metrics` (pipelines and API against the real services, after a few events, a
//! dead letter, an ingested event and a scrape), and every label they group or filter by
//! (`job`, `instance` and `le` aside) is a label of that metric.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use hyper::Method;

use common::api::{with_tokens, Server, INGEST};
use common::{ev, repo_path, test_config, RunningTally, TestEnv};
use tally::app::Role;

/// Every PromQL expression of the dashboard and the rules, with where it comes from.
fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("deploy/grafana/tally-dashboard.json")).unwrap(),
    )
    .unwrap();
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(e)) => {
                            out.push(("dashboard".into(), e.clone()))
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut out);
    let rules = std::fs::read_to_string(repo_path("deploy/prometheus/tally-alerts.yml")).unwrap();
    let docs = yaml_rust2::YamlLoader::load_from_str(&rules).unwrap();
    for group in docs[0]["groups"].as_vec().unwrap() {
        for rule in group["rules"].as_vec().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            out.push((name.into(), rule["expr"].as_str().unwrap().into()));
        }
    }
    out
}

/// The `tally_*` metric names (histogram series reduced to their family) and the label names
/// an expression uses in `by (...)` / `without (...)` and in matchers.
fn names_and_labels(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let word: String = bytes[start..i].iter().collect();
        if word.starts_with("tally_") {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(&word);
            names.insert(family.to_owned());
        }
        // by (a, b) / without (a)
        let rest: String = bytes[i..].iter().collect();
        if matches!(word.as_str(), "by" | "without") {
            if let Some(inner) = rest.trim_start().strip_prefix('(') {
                for l in inner[..inner.find(')').unwrap()].split(',') {
                    labels.insert(l.trim().to_owned());
                }
            }
        }
        // name{a="x", b=~"y"}
        if word.starts_with("tally_") || word == "up" {
            if let Some(inner) = rest.strip_prefix('{') {
                for m in inner[..inner.find('}').unwrap()].split(',') {
                    let key: String = m.trim().chars().take_while(|c| ident(*c)).collect();
                    labels.insert(key);
                }
            }
        }
    }
    for skip in ["job", "instance", "le", ""] {
        labels.remove(skip);
    }
    (names, labels)
}

/// Metric family -> every label name its series carry, from the text exposition.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            out.entry(name.to_owned()).or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, labels) = match line.split_once('{') {
            Some((s, l)) => (s, l.split_once('}').unwrap().0),
            None => (line.split(' ').next().unwrap(), ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| series.strip_suffix(s))
            .filter(|f| out.contains_key(*f))
            .unwrap_or(series);
        let entry = out.entry(family.to_owned()).or_default();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            entry.insert(pair.split('=').next().unwrap().trim().to_owned());
        }
    }
    out
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[test]
fn expressions_are_read() {
    let (names, labels) = names_and_labels(
        r#"histogram_quantile(0.99, sum by (le, pipeline) (rate(tally_batch_duration_seconds_bucket{job=~"$job", kind="x"}[5m])))"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["tally_batch_duration_seconds".to_owned()])
    );
    assert_eq!(
        labels,
        BTreeSet::from(["kind".to_owned(), "pipeline".to_owned()])
    );
    let all = expressions();
    assert!(all.len() >= 30, "{}", all.len());
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_kit_names_is_exported() {
    let env = TestEnv::with_config(with_tokens(test_config("ops_kit"))).await;
    let topics = env.cfg.kafka.topics.clone();
    let tally = RunningTally::start_role(&env, Role::Ledger);
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let at = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    env.send(&[
        (
            topics.grants.clone(),
            "acme".into(),
            ev::grant("g-1", "acme", &at, "pkg-1", "package", "10"),
        ),
        (
            topics.chat_responses.clone(),
            "acme".into(),
            b"{not json".to_vec(),
        ),
    ])
    .await;
    let chat = ev::chat("c-1", "acme", &at, "gpt-4o-mini", "standard", 1);
    let r = server
        .client()
        .send(
            Method::POST,
            "/v1/events",
            Some(INGEST),
            Some("application/cloudevents+json"),
            chat,
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    // A retry needs an outage; the counter is recorded directly (the name is what is checked).
    tally::metrics::retry("ops-kit-test");
    let text = server.client().get("/metrics", None).await.text();
    tally.stop().await;
    server.stop().await;

    let exported = exported(&text);
    let mut missing = Vec::new();
    for (origin, expr) in expressions() {
        let (names, labels) = names_and_labels(&expr);
        for name in &names {
            if !exported.contains_key(name) {
                missing.push(format!("{origin}: {name} is not exported"));
            }
        }
        for label in &labels {
            let carried = names
                .iter()
                .any(|n| exported.get(n).is_some_and(|l| l.contains(label)));
            if !names.is_empty() && !carried {
                missing.push(format!(
                    "{origin}: no metric of {names:?} carries label {label}"
                ));
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}\n{text}");
}
