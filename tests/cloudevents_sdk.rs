//! The CloudEvents SDK for Python (PyPI `cloudevents`, its Kafka binding) with confluent-kafka
//! produces to the real broker in both content modes, as producer platforms do: structured
//! (`content-type: application/cloudevents+json`, the event as JSON) and binary (attributes
//! in `ce_*` headers, `data` as the value). The ledger debits both, treats an event sent in
//! one mode and retried in the other as the same event (same `source` + `id`), and
//! dead-letters bad binary records with the same reasons and fields as structured ones, their
//! headers kept for replay. Expected credits by hand from tests/fixtures/prices.toml.
//!
//! The SDK comes from TALLY_TEST_CLOUDEVENTS_PYTHON (a Python that imports `cloudevents` and
//! `confluent_kafka`; `scripts/test` installs both into `.services/cloudevents-venv` and sets
//! it). Without it the test says why and passes without running, except in CI (`CI` set and
//! not `false`/`0`), where it fails.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rust_decimal_macros::dec;
use serde_json::json;

use common::{ev, repo_path, RunningTally, TestEnv};
use tally::app::Role;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A Python with the SDK and confluent-kafka, or why there is none.
fn sdk_python() -> Result<PathBuf, String> {
    let python = std::env::var("TALLY_TEST_CLOUDEVENTS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_path(".services/cloudevents-venv/bin/python"));
    let imports = Command::new(&python)
        .args([
            "-c",
            "import cloudevents.core.bindings.kafka, confluent_kafka",
        ])
        .output();
    match imports {
        Ok(out) if out.status.success() => Ok(python),
        Ok(out) => Err(format!(
            "{} cannot import the SDK: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("{}: {e}", python.display())),
    }
}

/// Runs tests/sdk/cloudevents_produce.py: every record acknowledged by the broker.
fn produce_with_sdk(python: &PathBuf, brokers: &str, events: &serde_json::Value) -> String {
    let mut child = Command::new(python)
        .arg(repo_path("tests/sdk/cloudevents_produce.py"))
        .arg(brokers)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the SDK producer");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(events.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SDK producer failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_events_in_both_content_modes_are_debited() {
    let python = match sdk_python() {
        Ok(p) => p,
        Err(why) if in_ci() => panic!("CI: the CloudEvents SDK is needed: {why}"),
        Err(why) => {
            eprintln!("skipped: {why} (scripts/test installs it)");
            return;
        }
    };
    let env = TestEnv::new("ce_sdk").await;
    let topics = env.cfg.kafka.topics.clone();
    let tally = RunningTally::start_role(&env, Role::Ledger);

    let day = Utc::now() - chrono::Duration::days(1);
    let at = |secs: i64| {
        (day + chrono::Duration::seconds(secs)).to_rfc3339_opts(SecondsFormat::Secs, true)
    };
    env.send(&[(
        topics.grants.clone(),
        "acct-sdk".into(),
        ev::grant("g-1", "acct-sdk", &at(0), "pkg-1", "package", "100"),
    )])
    .await;

    let attrs = |id: &str, ty: &str, time: &str| {
        json!({"type": ty, "source": "//sdk.test", "id": id, "subject": "acct-sdk",
               "time": time, "datacontenttype": "application/json", "partitionkey": "acct-sdk"})
    };
    let chat = "tally.usage.chat_response.v1";
    let chat_data = |conv: &str, tier: &str, responses: u32| {
        json!({"conversation_id": conv, "model": "gpt-4o-mini", "voice_tier": tier,
               "channel": "text", "responses": responses})
    };
    let mut no_subject = attrs("b-4", chat, &at(140));
    no_subject.as_object_mut().unwrap().remove("subject");
    let events = json!([
        // structured: 2 premium responses x 1.5 = 3
        {"mode": "structured", "topic": topics.chat_responses,
         "attributes": attrs("s-1", chat, &at(100)), "data": chat_data("conv-1", "premium", 2)},
        // binary: 3 standard responses x 1 = 3
        {"mode": "binary", "topic": topics.chat_responses,
         "attributes": attrs("b-1", chat, &at(110)), "data": chat_data("conv-2", "standard", 3)},
        // the same event (source + id) again in the other mode: a producer retry, debited once
        {"mode": "structured", "topic": topics.chat_responses,
         "attributes": attrs("b-1", chat, &at(110)), "data": chat_data("conv-2", "standard", 3)},
        // binary instance hours: 90 min of gpu.a10, per started hour at 10 = 2 h x 10 = 20
        {"mode": "binary", "topic": topics.instance_hours,
         "attributes": attrs("b-2", "tally.usage.instance_hours.v1", &at(5400)),
         "data": {"instance_id": "i-1", "instance_type": "gpu.a10",
                  "started_at": at(0), "ended_at": at(5400)}},
        // bad binary records: a data field missing, an attribute missing
        {"mode": "binary", "topic": topics.chat_responses,
         "attributes": attrs("b-3", chat, &at(130)),
         "data": {"model": "gpt-4o-mini", "responses": 1}},
        {"mode": "binary", "topic": topics.chat_responses,
         "attributes": no_subject, "data": chat_data("conv-4", "standard", 1)},
    ]);
    let sent = produce_with_sdk(&python, &env.cfg.kafka.brokers, &events);
    // What the SDK wrote, as the binding says: headers in binary mode, the media type in
    // structured mode, the account as the key.
    let lines: Vec<serde_json::Value> = sent
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(
        lines[0]["headers"],
        json!({"content-type": "application/cloudevents+json"})
    );
    assert_eq!(lines[1]["headers"]["ce_id"], "b-1");
    assert_eq!(lines[1]["headers"]["content-type"], "application/json");
    assert_eq!(lines[1]["key"], "acct-sdk");

    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    tally.stop().await;

    let store = env.store().await;
    // 100 - 3 - 3 - 20 = 74
    let balance = store.balance("acct-sdk").await.unwrap().unwrap();
    assert_eq!(balance.spendable, dec!(74));
    assert_eq!(balance.overage, dec!(0));
    let mut debits: Vec<_> = store
        .entries("acct-sdk", 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.kind == "debit")
        .map(|l| (l.event_id.unwrap_or_default(), l.amount, l.rule_id))
        .collect();
    debits.sort();
    assert_eq!(
        debits,
        vec![
            ("b-1".into(), dec!(-3), Some("chat.std".into())),
            ("b-2".into(), dec!(-20), Some("gpu.a10".into())),
            ("s-1".into(), dec!(-3), Some("chat.premium".into())),
        ]
    );

    let mut letters = env.dead_letters();
    letters.sort_by(|a, b| a.field.cmp(&b.field));
    let seen: Vec<_> = letters
        .iter()
        .map(|l| (l.reason.as_str(), l.field.as_deref(), l.pipeline.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("missing_field", Some("data.conversation_id"), "ledger"),
            ("missing_field", Some("subject"), "ledger"),
        ]
    );
    // A binary dead letter is the record as it came: data as the value, the attributes
    // still in its ce_* headers (so `tally replay` re-submits it whole).
    let header = |l: &common::DeadLetterSeen, name: &str| {
        l.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&letters[0].payload).unwrap(),
        json!({"model": "gpt-4o-mini", "responses": 1})
    );
    assert_eq!(header(&letters[0], "ce_id").as_deref(), Some("b-3"));
    assert_eq!(
        header(&letters[0], "ce_specversion").as_deref(),
        Some("1.0")
    );
    assert_eq!(
        header(&letters[0], "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(&letters[1], "ce_id").as_deref(), Some("b-4"));
    assert_eq!(header(&letters[1], "ce_subject"), None);
}
