//! The HTTP contract is exact: schemathesis (PyPI), from `schemas/openapi.yaml`, sends
//! generated requests — valid ones, which the server must accept, and invalid ones, which it
//! must refuse — with an admin token to a Tally API running against the real services, and
//! checks every answer against the document (status, content type, body schema, headers).
//! Zero failures. The rules OpenAPI cannot state (against the clock, between two parameters)
//! are in the document's descriptions and applied to generated values by
//! tests/schemathesis/hooks.py.
//!
//! schemathesis comes from TALLY_TEST_SCHEMATHESIS (its command; `scripts/test` installs it
//! into `.services/schemathesis-venv` and sets it). Without it the test says why and passes
//! without running, except in CI (`CI` set and not `false`/`0`), where it fails.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};

use common::api::{with_tokens, Server, ADMIN};
use common::{ev, repo_path, test_config, TestEnv};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn schemathesis() -> Result<PathBuf, String> {
    let command = std::env::var("TALLY_TEST_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_path(".services/schemathesis-venv/bin/schemathesis"));
    match Command::new(&command).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(command),
        Ok(out) => Err(format!(
            "{}: {}",
            command.display(),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => Err(format!("{}: {e}", command.display())),
    }
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_exact() {
    let command = match schemathesis() {
        Ok(c) => c,
        Err(why) if in_ci() => panic!("CI: schemathesis is needed: {why}"),
        Err(why) => {
            eprintln!("skipped: {why} (scripts/test installs it)");
            return;
        }
    };
    let env = TestEnv::with_config(with_tokens(test_config("schemathesis"))).await;
    // "acme" exists, with a grant and a chat response debited, so reads of it answer 200
    // (tests/schemathesis/schemathesis.toml names it in half the requests).
    let topics = env.cfg.kafka.topics.clone();
    let at = (Utc::now() - chrono::Duration::hours(2)).to_rfc3339_opts(SecondsFormat::Secs, true);
    env.send(&[
        (
            topics.grants.clone(),
            "acme".into(),
            ev::grant("g-1", "acme", &at, "pkg-1", "package", "100"),
        ),
        (
            topics.chat_responses.clone(),
            "acme".into(),
            ev::chat("c-1", "acme", &at, "gpt-4o-mini", "standard", 2),
        ),
    ])
    .await;
    let tally = common::RunningTally::start(&env);
    env.wait_ledger_caught_up(Duration::from_secs(60)).await;
    env.wait_analytics_caught_up(Duration::from_secs(60)).await;
    let server = Server::start(env.cfg.clone(), env.prices.clone()).await;
    let examples =
        std::env::var("TALLY_TEST_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into());
    let report = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let url = format!("http://{}", server.addr);
        let report = report.path().to_owned();
        move || {
            Command::new(&command)
                .current_dir(repo_path(""))
                .env("SCHEMATHESIS_HOOKS", "hooks")
                .env("PYTHONPATH", repo_path("tests/schemathesis"))
                .env("NO_COLOR", "1")
                .args(["--config-file", "tests/schemathesis/schemathesis.toml"])
                .args(["run", "schemas/openapi.yaml", "--url", &url])
                .args(["--header", &format!("Authorization: Bearer {ADMIN}")])
                .args([
                    "--checks",
                    "all",
                    "--max-examples",
                    &examples,
                    "--seed",
                    "13",
                ])
                .args(["--phases", "examples,coverage,fuzzing"])
                .arg("--report-dir")
                .arg(&report)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    server.stop().await;
    tally.stop().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
