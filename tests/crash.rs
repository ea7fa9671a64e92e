//! Crash safety and scale-out, against the real services.
//!
//! - `sigkill_restarts_change_nothing`: 100,000+ usage events; the `tally` process (both
//!   pipelines) is killed with SIGKILL at several points and restarted each time; balances,
//!   grants and ClickHouse totals end exactly equal to the values computed independently.
//! - `two_instances_split_partitions_with_same_results`: two ledger + analytics instances in
//!   one consumer group give the same exact results as one.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;

use common::{actual, expected_from_demo, test_config, TestEnv};
use tally::demo::{self, DemoConfig, DemoRecord, TopicKind};

/// The demo stream without its plan events: plans bring billing-cycle resets whose effect on
/// each grant depends on how the usage topics interleave, so the exact expected balances are
/// computed for prepaid accounts here (tests/lifecycle.rs covers plans and resets).
fn demo_stream(accounts: usize, events: usize, seed: u64) -> Vec<DemoRecord> {
    let end = Utc::now() - chrono::Duration::hours(1);
    let mut records = demo::generate(&DemoConfig {
        seed,
        accounts,
        events,
        start: end - chrono::Duration::days(5),
        end,
        duplicate_every: 50,
        malformed_every: 200,
    });
    records.retain(|r| r.topic != TopicKind::Plans);
    records
}

fn split(records: &[DemoRecord]) -> (Vec<&DemoRecord>, Vec<&DemoRecord>) {
    records
        .iter()
        .partition(|r| matches!(r.topic, TopicKind::Grants | TopicKind::Plans))
}

async fn send(env: &TestEnv, records: &[&DemoRecord]) {
    let batch: Vec<(String, String, Vec<u8>)> = records
        .iter()
        .map(|r| {
            (
                tally::cli::topic_for(&env.cfg.kafka.topics, r.topic).to_owned(),
                r.key.clone(),
                r.payload.clone(),
            )
        })
        .collect();
    env.send(&batch).await;
}

fn accounts_of(records: &[DemoRecord]) -> Vec<String> {
    let mut ids: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Sum of the ledger group's stored offsets over every input partition.
async fn ledger_progress(env: &TestEnv) -> i64 {
    let keys: Vec<_> = env.ends().into_keys().collect();
    env.store()
        .await
        .load_offsets(&env.cfg.kafka.ledger_group, &keys)
        .await
        .unwrap()
        .values()
        .sum()
}

/// A `tally run` child process, killed when dropped (a failing test leaves none behind).
struct Tally(Child);

impl std::ops::Deref for Tally {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Tally {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_tally(config: &std::path::Path) -> Tally {
    Tally(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["--config", config.to_str().unwrap(), "run", "--role", "all"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tally"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restarts_change_nothing() {
    let mut cfg = test_config("crash");
    cfg.prices.path = common::repo_path("prices/default.toml");
    // Static membership: each restarted process takes its partitions back at once.
    cfg.kafka.instance_id = Some(common::unique("crash-instance"));
    let env = TestEnv::with_config(cfg).await;
    let records = demo_stream(20, 100_000, 7);
    let (grants, usage) = split(&records);
    let expected = expected_from_demo(&records, &env.prices);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(&config, toml::to_string(&*env.cfg).unwrap()).unwrap();

    // Grants first, applied, so the expected balances do not depend on topic interleaving.
    send(&env, &grants).await;
    let mut child = spawn_tally(&config);
    env.wait_ledger_caught_up(Duration::from_secs(120)).await;

    send(&env, &usage).await;
    let total: i64 = env.ends().values().sum();
    let start = ledger_progress(&env).await;
    let mut kills = 0;
    for fraction in [0.15, 0.35, 0.55, 0.75] {
        let target = start + ((total - start) as f64 * fraction) as i64;
        let started = Instant::now();
        while ledger_progress(&env).await < target {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "no progress towards {target}"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "tally exited on its own"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        child = spawn_tally(&config);
    }
    env.wait_ledger_caught_up(Duration::from_secs(300)).await;
    env.wait_analytics_caught_up(Duration::from_secs(300)).await;
    // A graceful stop at the end: SIGTERM finishes the batch in hand and exits 0.
    sigterm(&child);
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful shutdown: {status}");
    assert_eq!(kills, 4);

    let got = actual(&env, &accounts_of(&records)).await;
    assert_eq!(got, expected);
}

fn sigterm(child: &Tally) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_partitions_with_same_results() {
    let mut cfg = test_config("pair");
    cfg.prices.path = common::repo_path("prices/default.toml");
    let env = TestEnv::with_config(cfg).await;
    let records = demo_stream(12, 20_000, 11);
    let (grants, usage) = split(&records);
    let expected = expected_from_demo(&records, &env.prices);

    let (stop_tx, stop_rx) = watch::channel(false);
    let spawn_ledger = || {
        tokio::spawn(tally::pipeline::ledger::run(
            env.cfg.clone(),
            env.prices.clone(),
            stop_rx.clone(),
        ))
    };
    let spawn_analytics = || {
        tokio::spawn(tally::pipeline::analytics::run(
            env.cfg.clone(),
            env.prices.clone(),
            stop_rx.clone(),
        ))
    };
    let ledgers = [spawn_ledger(), spawn_ledger()];
    let analytics = [spawn_analytics(), spawn_analytics()];

    send(&env, &grants).await;
    env.wait_ledger_caught_up(Duration::from_secs(120)).await;
    send(&env, &usage).await;
    env.wait_ledger_caught_up(Duration::from_secs(300)).await;
    env.wait_analytics_caught_up(Duration::from_secs(300)).await;
    stop_tx.send(true).unwrap();

    let mut per_instance = Vec::new();
    for l in ledgers {
        per_instance.push(l.await.unwrap().unwrap().records);
    }
    for a in analytics {
        a.await.unwrap().unwrap();
    }
    assert!(
        per_instance.iter().all(|&n| n > 0),
        "both instances consumed a share of the partitions: {per_instance:?}"
    );
    let got = actual(&env, &accounts_of(&records)).await;
    assert_eq!(got, expected);
}
