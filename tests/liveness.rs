//! Liveness through the real services, with `tally run` as a child process (as an operator
//! runs it): a restarted process takes its partitions back, with and without
//! `kafka.instance_id`, and applies what arrives next; a consumer group without partitions
//! makes `/readyz` answer 503 naming it (and idle exit wait); SIGTERM ends the process within
//! `pipeline.shutdown_timeout_ms` while PostgreSQL refuses connections or never answers.
//! Expected balances are computed by hand from tests/fixtures/prices.toml (chat.std: 1 credit
//! per response). Time bounds are generous: they catch "never", not "slow".

mod common;

use std::io::{BufRead, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rust_decimal_macros::dec;
use serde_json::Value;

use common::{ev, test_config, TestEnv};
use tally::config::{Config, Secret};

/// Bound for a restarted process to hold partitions again (it takes seconds; see the README).
const ASSIGNED_WITHIN: Duration = Duration::from_secs(30);
/// Bound for an event produced to a running process to show in the ledger.
const APPLIED_WITHIN: Duration = Duration::from_secs(60);

fn hour_ago() -> String {
    (Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A `tally run` child process; its stderr is collected line by line.
struct Tally {
    child: Child,
    log: Arc<Mutex<String>>,
    lines: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Tally {
    fn start(cfg: &Config, args: &[&str]) -> Tally {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tally.toml");
        std::fs::write(&config, toml::to_string(cfg).unwrap()).unwrap();
        Self::start_with(&config, args, dir)
    }

    fn start_with(config: &Path, args: &[&str], dir: tempfile::TempDir) -> Tally {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info,rdkafka=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                    let _ = tx.send(line);
                }
            })
        };
        Tally {
            child,
            log,
            lines,
            reader: Some(reader),
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a log line containing `needle`; returns it.
    fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no log line with `{needle}` within {timeout:?}:\n{}",
                    self.log()
                ),
            }
        }
    }

    /// The API's address, from the `API listening addr=...` line.
    fn api_addr(&self) -> String {
        let line = self.wait_line("API listening", Duration::from_secs(60));
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("addr= in the API listening line")
            .to_owned()
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit: (exit status, time waited, whole log).
    fn wait_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration, String) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(r) = self.reader.take() {
                    r.join().unwrap();
                }
                return (status, started.elapsed(), self.log());
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("tally run did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// GET on the API: (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("an HTTP status line: {raw}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn readyz(addr: &str) -> (u16, Value) {
    let (status, body) = get(addr, "/readyz");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Partitions held per pipeline, as `/readyz` reports them.
fn held(ready: &Value, pipeline: &str) -> Option<u64> {
    ready["consumer_groups"]
        .as_array()?
        .iter()
        .find(|g| g["pipeline"] == pipeline)?["assigned_partitions"]
        .as_u64()
}

/// Polls `/readyz` until `ok` holds; returns the last answer.
fn wait_ready(
    tally: &Tally,
    addr: &str,
    timeout: Duration,
    what: &str,
    ok: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let started = Instant::now();
    loop {
        let (status, body) = readyz(addr);
        if ok(status, &body) {
            return (status, body);
        }
        assert!(
            started.elapsed() < timeout,
            "{what}: not within {timeout:?}; last /readyz {status} {body:#}\n{}",
            tally.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn wait_spendable(env: &TestEnv, account: &str, expected: rust_decimal::Decimal) {
    let store = env.store().await;
    let started = Instant::now();
    loop {
        let spendable = store
            .balance_view(account, Utc::now())
            .await
            .unwrap()
            .map(|b| b.spendable);
        if spendable == Some(expected) {
            return;
        }
        assert!(
            started.elapsed() < APPLIED_WITHIN,
            "{account}: spendable {spendable:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `tally run --idle-exit-secs 2` to its idle exit, then `tally run` again: the second
/// process holds ledger and analytics partitions within seconds and applies a new event.
async fn restart_takes_partitions_back(name: &str, instance_id: Option<&str>) {
    let mut cfg = test_config(name);
    cfg.kafka.instance_id = instance_id.map(str::to_owned);
    let env = TestEnv::with_config(cfg).await;
    let topics = env.cfg.kafka.topics.clone();
    let account = format!("{name}-acct");
    env.send(&[(
        topics.grants.clone(),
        account.clone(),
        ev::grant("g1", &account, &hour_ago(), "g1", "top_up", "100"),
    )])
    .await;

    // First run: applies the grant, holds partitions, is caught up, exits by itself.
    let mut first = Tally::start(&env.cfg, &["--idle-exit-secs", "2"]);
    let (status, _, log) = first.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "first run: {status}\n{log}");
    assert!(log.contains("idle exit"), "{log}");
    wait_spendable(&env, &account, dec!(100)).await;

    // Second run, right after the first exited cleanly.
    let second = Tally::start(&env.cfg, &[]);
    let addr = second.api_addr();
    let (_, ready) = wait_ready(
        &second,
        &addr,
        ASSIGNED_WITHIN,
        "restarted process holds ledger and analytics partitions",
        |_, r| held(r, "ledger").unwrap_or(0) > 0 && held(r, "analytics").unwrap_or(0) > 0,
    );
    // 6 input topics of 3 partitions, one member per group.
    assert_eq!(held(&ready, "ledger"), Some(18), "{ready:#}");
    assert_eq!(held(&ready, "analytics"), Some(18), "{ready:#}");

    // 3 standard chat responses at 1 credit each: 100 - 3 = 97.
    env.send(&[(
        topics.chat_responses.clone(),
        account.clone(),
        ev::chat(
            "chat-1",
            &account,
            &hour_ago(),
            "gpt-4o-mini",
            "standard",
            3,
        ),
    )])
    .await;
    wait_spendable(&env, &account, dec!(97)).await;
    env.wait_analytics_caught_up(APPLIED_WITHIN).await;

    let mut second = second;
    second.terminate();
    let (status, _, log) = second.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "second run stops gracefully: {status}\n{log}"
    );
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_instance_id_takes_partitions_back() {
    let id = common::unique("host");
    restart_takes_partitions_back("live_static", Some(&id)).await;
}

#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_instance_id_takes_partitions_back() {
    restart_takes_partitions_back("live_dynamic", None).await;
}

/// Two ledger processes in one group whose topics have one partition each. With the range
/// assignor every partition goes to the member whose id sorts first, and member ids start with
/// the client id: "a-holder" holds all six, "z-idle" none. The idle one's `/readyz` answers 503
/// naming the group, its log warns, its gauge says 0, and its idle exit waits; once the holder
/// stops, it takes the partitions, applies what is left and idle-exits by itself.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_partitions_is_not_ready_and_never_idle() {
    let mut cfg = test_config("live_unassigned");
    cfg.kafka.topic_partitions = 1;
    cfg.kafka.unassigned_alert_ms = 2_000;
    cfg.kafka
        .properties
        .insert("partition.assignment.strategy".into(), "range".into());
    let env = TestEnv::with_config(cfg).await;
    let group = env.cfg.kafka.ledger_group.clone();
    let account = "live-unassigned-acct";
    env.send(&[(
        env.cfg.kafka.topics.grants.clone(),
        account.to_owned(),
        ev::grant("g1", account, &hour_ago(), "g1", "top_up", "10"),
    )])
    .await;
    let with_client = |id: &str| {
        let mut cfg = (*env.cfg).clone();
        cfg.kafka.properties.insert("client.id".into(), id.into());
        cfg
    };

    let mut holder = Tally::start(&with_client("a-holder"), &["--role", "ledger"]);
    let holder_addr = holder.api_addr();
    wait_ready(
        &holder,
        &holder_addr,
        ASSIGNED_WITHIN,
        "holder holds all",
        |s, r| s == 200 && held(r, "ledger") == Some(6),
    );
    wait_spendable(&env, account, dec!(10)).await;

    let mut idle = Tally::start(
        &with_client("z-idle"),
        &["--role", "ledger", "--idle-exit-secs", "1"],
    );
    let idle_addr = idle.api_addr();
    let (_, ready) = wait_ready(
        &idle,
        &idle_addr,
        Duration::from_secs(90),
        "the second member reports its group without partitions",
        |s, r| s == 503 && r["consumer_groups"][0]["status"] == "no_partitions",
    );
    let reasons = ready["reasons"].to_string();
    assert!(reasons.contains(&group), "names the group: {ready:#}");
    assert!(reasons.contains("no partitions"), "{ready:#}");
    assert!(
        ready["consumer_groups"][0]["unassigned_since"].is_string(),
        "says since when: {ready:#}"
    );
    assert_eq!(ready["dependencies"]["postgresql"]["status"], "up");
    let (_, metrics) = get(&idle_addr, "/metrics");
    let gauge =
        format!("tally_consumer_assigned_partitions{{group=\"{group}\",pipeline=\"ledger\"}} 0");
    assert!(metrics.contains(&gauge), "{gauge} in:\n{metrics}");
    idle.wait_line(
        "consumer group has no partitions assigned",
        Duration::from_secs(30),
    );
    wait_ready(
        &holder,
        &holder_addr,
        ASSIGNED_WITHIN,
        "holder still holds all",
        |s, r| s == 200 && held(r, "ledger") == Some(6),
    );
    // Caught up for far longer than --idle-exit-secs 1, yet without partitions: still running.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        idle.child.try_wait().unwrap().is_none(),
        "no idle exit without partitions:\n{}",
        idle.log()
    );

    // 3 standard chat responses at 1 credit each: 10 - 3 = 7, applied by whichever member
    // holds the partition when it is read.
    env.send(&[(
        env.cfg.kafka.topics.chat_responses.clone(),
        account.to_owned(),
        ev::chat("chat-1", account, &hour_ago(), "gpt-4o-mini", "standard", 3),
    )])
    .await;
    holder.terminate();
    let (status, _, log) = holder.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "holder stops gracefully: {status}\n{log}");
    // The idle member takes the partitions over, catches up and exits by itself.
    let (status, _, log) = idle.wait_exit(Duration::from_secs(120));
    assert!(
        status.success(),
        "idle exit once assigned and caught up: {status}\n{log}"
    );
    assert!(log.contains("consumer group has partitions again"), "{log}");
    assert!(log.contains("idle exit"), "{log}");
    wait_spendable(&env, account, dec!(7)).await;
}

/// A PostgreSQL address that accepts connections and never answers; the receiver hears of
/// each connection.
fn stuck_postgres() -> (String, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().map_while(Result::ok) {
            // Accept, never answer: a server that hangs.
            held.push(conn);
            let _ = tx.send(());
        }
    });
    (
        format!("host=127.0.0.1 port={port} user=postgres dbname=tally"),
        rx,
    )
}

/// A port nothing listens on: every connection is refused at once.
fn closed_port() -> u16 {
    common::servers::free_port()
}

/// SIGTERM while PostgreSQL refuses connections (the retry loop stops at once, exit 0), then
/// while it accepts and never answers (the shutdown bound ends the process, non-zero): either
/// way within `shutdown_timeout_ms` plus a margin, naming what was stuck and why.
#[cfg_attr(
    not(feature = "integration"),
    ignore = "needs the services: scripts/test runs it"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_postgresql_outage_exits_within_the_timeout() {
    let mut cfg = test_config("live_pg_down");
    cfg.pipeline.shutdown_timeout_ms = 3_000;
    let env = TestEnv::with_config(cfg).await;
    let margin = Duration::from_secs(20);
    let bound = Duration::from_millis(env.cfg.pipeline.shutdown_timeout_ms) + margin;

    // Refused: the pipelines retry with back-off.
    let mut cfg = (*env.cfg).clone();
    cfg.postgres.url = Secret::new(format!(
        "host=127.0.0.1 port={} user=postgres dbname=tally",
        closed_port()
    ));
    let mut refused = Tally::start(&cfg, &["--role", "ledger"]);
    refused.wait_line("retrying", Duration::from_secs(60));
    refused.terminate();
    let (status, waited, log) = refused.wait_exit(bound + Duration::from_secs(30));
    // The retry loop honours shutdown: the ledger stops at once, saying what it was waiting
    // for (a graceful stop: exit status 0, nothing was applied, nothing is lost).
    assert!(waited < bound, "exited after {waited:?}:\n{log}");
    assert!(status.success(), "{status}\n{log}");
    assert!(
        log.contains("shutdown while PostgreSQL is unreachable"),
        "says why:\n{log}"
    );
    assert!(log.contains("ledger"), "names the pipeline:\n{log}");

    // Stuck: connections are accepted and never answered.
    let (url, accepted) = stuck_postgres();
    cfg.postgres.url = Secret::new(url);
    let mut stuck = Tally::start(&cfg, &["--role", "ledger"]);
    accepted
        .recv_timeout(Duration::from_secs(60))
        .expect("tally connects to the stuck PostgreSQL");
    std::thread::sleep(Duration::from_millis(500));
    stuck.terminate();
    let (status, waited, log) = stuck.wait_exit(bound + Duration::from_secs(30));
    assert!(waited < bound, "exited after {waited:?}:\n{log}");
    assert!(!status.success(), "non-zero: {status}\n{log}");
    assert!(
        log.contains("shutdown timed out") || log.contains("PostgreSQL"),
        "says why:\n{log}"
    );
    assert!(log.contains("ledger"), "names the pipeline:\n{log}");
}
