//! Outages survived with nothing lost, against real services: each test starts a private
//! instance of one service (PostgreSQL cluster, Tansu broker or ClickHouse server, on a free
//! port, in a temporary directory; the other two are the shared ones), runs `tally run` as a
//! child process, and during the run stops that service for real (PostgreSQL: `pg_ctl stop
//! -m immediate`, a crash; the broker and ClickHouse: SIGKILL), keeps it down for a few
//! seconds and starts it again on the same data. Afterwards balances and ClickHouse totals
//! are exact (computed by hand: every account gets a 5,000-credit package, a standard chat
//! response costs 1 credit and a premium one 1.5, tests/fixtures/prices.toml), and the process
//! never exited. Then the service goes down once more and SIGTERM must end the process within
//! its shutdown bound.
//!
//! Private instances keep the shared services (and every other test) untouched.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use common::servers::{free_port, run, wait_port, ClickHouseFiles, PrivatePostgres};
use common::{ev, test_config, TestEnv};

const ACCOUNTS: usize = 4;
/// Chats per account and phase (two phases: before and after the outage begins).
const CHATS: usize = 1_500;
/// How long each service stays down.
const DOWN: Duration = Duration::from_secs(6);
/// The process must exit within this after SIGTERM (tally's shutdown bound plus a margin).
const EXIT_BOUND: Duration = Duration::from_secs(45);

/// A private process-based service (the broker, ClickHouse) that can be killed and restarted
/// on the same data.
struct PrivateProcess {
    name: &'static str,
    command: Box<dyn Fn() -> Command + Send>,
    port: u16,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl PrivateProcess {
    fn up(&mut self) {
        assert!(self.child.is_none(), "{} is already up", self.name);
        let child = (self.command)()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(60), self.name);
    }

    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn tansu() -> PrivateProcess {
        let bin = std::env::var("TALLY_TANSU_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo/bin/tansu")
            });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cwd = dir.path().to_owned();
        let mut p = PrivateProcess {
            name: "tansu",
            command: Box::new(move || {
                let mut c = Command::new(&bin);
                let url = format!("tcp://127.0.0.1:{port}");
                c.current_dir(&cwd)
                    .env("RUST_LOG", "warn")
                    .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .env_remove("SCHEMA_REGISTRY")
                    .args(["broker", "--cluster-id", "tally-outage"])
                    .args(["--listener-url", &url, "--advertised-listener-url", &url])
                    .args(["--storage-engine", "sqlite://tansu.db"]);
                c
            }),
            port,
            child: None,
            _dir: Some(dir),
        };
        p.up();
        p
    }

    fn clickhouse() -> PrivateProcess {
        let files = ClickHouseFiles::new(false);
        let mut p = PrivateProcess {
            name: "clickhouse-server",
            port: files.port,
            // The closure keeps the server's directory.
            command: Box::new(move || files.command()),
            child: None,
            _dir: None,
        };
        p.up();
        p
    }
}

impl Drop for PrivateProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `tally run` child process, killed when dropped.
struct Tally(Child);

impl Tally {
    fn spawn(config: &Path) -> Tally {
        Tally(
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["--config", config.to_str().unwrap(), "run", "--role", "all"])
                .env(
                    "RUST_LOG",
                    std::env::var("TALLY_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start tally"),
        )
    }

    fn assert_running(&mut self) {
        assert!(
            self.0.try_wait().unwrap().is_none(),
            "tally exited during the outage"
        );
    }

    /// SIGTERM, then the time until the process exited, and its status.
    fn terminate(mut self) -> (Duration, std::process::ExitStatus) {
        let started = Instant::now();
        run(Command::new("kill").args(["-TERM", &self.0.id().to_string()]));
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return (started.elapsed(), status);
            }
            assert!(
                started.elapsed() < EXIT_BOUND,
                "tally did not exit within {EXIT_BOUND:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn account(i: usize) -> String {
    format!("acct-{i}")
}

/// Phase `phase`'s chats: per account, CHATS responses, every fifth premium (1.5 credits).
fn chats(env: &TestEnv, phase: usize) -> Vec<(String, String, Vec<u8>)> {
    let base = Utc::now() - chrono::Duration::hours(3);
    let mut out = Vec::new();
    for n in 0..CHATS {
        for a in 0..ACCOUNTS {
            let id = format!("p{phase}-{a}-{n}");
            let t = (base + chrono::Duration::milliseconds((phase * CHATS + n) as i64 * 100))
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            let tier = if n % 5 == 0 { "premium" } else { "standard" };
            out.push((
                env.cfg.kafka.topics.chat_responses.clone(),
                account(a),
                ev::chat(&id, &account(a), &t, "gpt-4o-mini", tier, 1),
            ));
        }
    }
    out
}

/// Credits one phase costs each account: CHATS/5 premium at 1.5, the rest at 1.
fn phase_credits() -> Decimal {
    let premium = CHATS.div_ceil(5);
    Decimal::from(premium) * dec!(1.5) + Decimal::from(CHATS - premium)
}

fn grants(env: &TestEnv) -> Vec<(String, String, Vec<u8>)> {
    let t = (Utc::now() - chrono::Duration::hours(4)).to_rfc3339_opts(SecondsFormat::Secs, true);
    (0..ACCOUNTS)
        .map(|a| {
            (
                env.cfg.kafka.topics.grants.clone(),
                account(a),
                ev::grant(&format!("g-{a}"), &account(a), &t, "pkg", "package", "5000"),
            )
        })
        .collect()
}

async fn ledger_offsets(env: &TestEnv) -> i64 {
    let keys: Vec<_> = env.ends().into_keys().collect();
    match tally::ledger::Store::connect(&env.cfg.postgres).await {
        Ok(store) => store
            .load_offsets(&env.cfg.kafka.ledger_group, &keys)
            .await
            .map(|o| o.values().sum())
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// Waits until the ledger has applied some of phase 1 (so the outage hits a running pipeline).
async fn wait_some_progress(env: &TestEnv, tally: &mut Tally) {
    let started = Instant::now();
    while ledger_offsets(env).await < (ACCOUNTS + 100) as i64 {
        tally.assert_running();
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Exact balances and ClickHouse totals after both phases.
async fn assert_exact(env: &TestEnv) {
    env.wait_ledger_caught_up(Duration::from_secs(180)).await;
    env.wait_analytics_caught_up(Duration::from_secs(180)).await;
    let spent = phase_credits() * dec!(2);
    let store = env.store().await;
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    for a in 0..ACCOUNTS {
        let b = store.balance(&account(a)).await.unwrap().unwrap();
        assert_eq!(b.spendable, dec!(5000) - spent, "{} spendable", account(a));
        assert_eq!(b.overage, dec!(0));
        let (events, credits) = sink.totals_by_account(&account(a)).await.unwrap();
        assert_eq!(
            events,
            2 * CHATS as u64,
            "{} events in ClickHouse",
            account(a)
        );
        assert_eq!(credits, spent, "{} credits in ClickHouse", account(a));
    }
}

fn write_config(env: &TestEnv, dir: &Path) -> PathBuf {
    let config = dir.join("tally.toml");
    std::fs::write(&config, toml::to_string(&*env.cfg).unwrap()).unwrap();
    config
}

fn base_config(name: &str) -> tally::config::Config {
    let mut cfg = test_config(name);
    cfg.pipeline.retry_initial_ms = 100;
    cfg.pipeline.retry_max_ms = 1_000;
    cfg.api.listen = format!("127.0.0.1:{}", free_port());
    cfg
}

/// A service a test can take down for real and bring back on the same data.
trait Outage {
    /// What the service is called in messages.
    fn name(&self) -> &'static str;
    fn down(&mut self);
    fn up(&mut self);
    /// Whether records can be produced while it is down (not while the broker is).
    fn producible_while_down(&self) -> bool {
        true
    }
}

impl Outage for PrivatePostgres {
    fn name(&self) -> &'static str {
        "PostgreSQL"
    }
    fn down(&mut self) {
        self.crash();
    }
    fn up(&mut self) {
        PrivatePostgres::up(self);
    }
}

impl Outage for PrivateProcess {
    fn name(&self) -> &'static str {
        self.name
    }
    fn down(&mut self) {
        self.kill();
    }
    fn up(&mut self) {
        PrivateProcess::up(self);
    }
    fn producible_while_down(&self) -> bool {
        self.name != "tansu"
    }
}

/// Phase 1 is being applied when `service` goes down for [`DOWN`]; phase 2 is produced
/// during the outage (or right after it, for the broker). Afterwards the figures are exact
/// and the process never exited; then the service goes down again and SIGTERM must end the
/// process within [`EXIT_BOUND`].
async fn survive(env: &TestEnv, service: &mut dyn Outage) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(env, dir.path());
    env.send(&grants(env)).await;
    env.send(&chats(env, 1)).await;
    let mut tally = Tally::spawn(&config);
    wait_some_progress(env, &mut tally).await;

    service.down();
    if service.producible_while_down() {
        env.send(&chats(env, 2)).await;
    }
    tokio::time::sleep(DOWN).await;
    tally.assert_running();
    service.up();
    if !service.producible_while_down() {
        env.send(&chats(env, 2)).await;
    }

    assert_exact(env).await;
    tally.assert_running();

    service.down();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (took, status) = tally.terminate();
    eprintln!(
        "SIGTERM during a {} outage: exited in {took:?} with {status}",
        service.name()
    );
    service.up();
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart_loses_nothing() {
    let mut pg = PrivatePostgres::start();
    let mut cfg = base_config("outage_pg");
    cfg.postgres.url = tally::config::Secret::new(pg.url());
    let env = TestEnv::with_config(cfg).await;
    survive(&env, &mut pg).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kill_and_restart_loses_nothing() {
    let mut broker = PrivateProcess::tansu();
    let mut cfg = base_config("outage_kafka");
    cfg.kafka.brokers = format!("127.0.0.1:{}", broker.port);
    let env = TestEnv::with_config(cfg).await;
    survive(&env, &mut broker).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_kill_and_restart_loses_nothing() {
    let mut clickhouse = PrivateProcess::clickhouse();
    let mut cfg = base_config("outage_ch");
    cfg.clickhouse.url = format!("http://127.0.0.1:{}", clickhouse.port);
    let env = TestEnv::with_config(cfg).await;
    survive(&env, &mut clickhouse).await;
}
