//! Shared harness for the integration tests: each test gets its own topics, consumer groups,
//! PostgreSQL schema and ClickHouse database, against the services `scripts/services up`
//! started (URLs from TALLY_TEST_* variables, defaults on 127.0.0.1).
#![allow(dead_code)]

pub mod analytics;
pub mod api;
pub mod servers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use tally::config::{Config, Secret};
use tally::ledger::Store;
use tally::rating::PriceTable;

pub struct TestEnv {
    pub cfg: Arc<Config>,
    pub prices: Arc<PriceTable>,
    pub producer: FutureProducer,
    /// The broker's topics were made before (a broker without CreateTopics): Tally started
    /// by [`RunningTally::start_role`] does not create them.
    pub premade_topics: bool,
}

/// The in-process broker a bench runs on when `TALLY_BENCH_BROKER=mock`.
pub type MockBroker =
    rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

/// Tally running in this process the way `tally run --role R` runs it
/// ([`tally::app::run_with_prices`]: the ledger pipeline, the scheduler and the alert relay
/// for `ledger`, the analytics pipeline for `analytics`), without its HTTP API (tests that
/// call the API serve it themselves, to know its address).
pub struct RunningTally {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<tally::app::RunReport, tally::app::RunError>>,
}

impl RunningTally {
    /// Every role, with the test's configuration and prices.
    pub fn start(env: &TestEnv) -> RunningTally {
        Self::start_role(env, tally::app::Role::All)
    }

    /// One role (or all), with the test's configuration and prices.
    pub fn start_role(env: &TestEnv, role: tally::app::Role) -> RunningTally {
        let options = tally::app::RunOptions {
            role,
            create_topics: !env.premade_topics,
            ..tally::app::RunOptions::all()
        };
        Self::start_with_options(env.cfg.clone(), env.prices.clone(), options)
    }

    /// One role (or all), with this configuration and price table.
    pub fn start_with(
        cfg: Arc<Config>,
        prices: Arc<PriceTable>,
        role: tally::app::Role,
    ) -> RunningTally {
        let options = tally::app::RunOptions {
            role,
            ..tally::app::RunOptions::all()
        };
        Self::start_with_options(cfg, prices, options)
    }

    /// As [`RunningTally::start_with`], with the run's options (`create_topics: false` on a
    /// broker without CreateTopics).
    pub fn start_with_options(
        cfg: Arc<Config>,
        prices: Arc<PriceTable>,
        options: tally::app::RunOptions,
    ) -> RunningTally {
        let mut cfg = (*cfg).clone();
        cfg.api.enabled = false;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tally::app::run_with_prices(
            Arc::new(cfg),
            prices,
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        RunningTally { stop, task }
    }

    /// Asks it to stop and waits (within [`STOP_WITHIN`]) until it has, cleanly.
    pub async fn stop(self) {
        self.stop_report().await;
    }

    /// Whether it has ended (it runs until asked to stop, unless a task fails).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// [`stop`](Self::stop), and what its pipelines did.
    pub async fn stop_report(self) -> tally::app::RunReport {
        let _ = self.stop.send(());
        match stopped(self.task).await {
            Ok(report) => report,
            Err(e) => panic!("tally did not stop cleanly: {e:#}"),
        }
    }
}

/// How long a test waits for a pipeline task it asked to stop (or expects to die) before it
/// fails. The pipelines stop within `pipeline.shutdown_timeout_ms`; without this bound a task
/// that never stops would hold its test binary, and CI, until CI's own deadline.
pub const STOP_WITHIN: Duration = Duration::from_secs(120);

/// Awaits a spawned task within [`STOP_WITHIN`]: its join result (an `Err` when it panicked).
pub async fn joined<T>(task: tokio::task::JoinHandle<T>) -> Result<T, tokio::task::JoinError> {
    match tokio::time::timeout(STOP_WITHIN, task).await {
        Ok(joined) => joined,
        Err(_) => panic!("a spawned pipeline task did not end within {STOP_WITHIN:?}"),
    }
}

/// Awaits a spawned task within [`STOP_WITHIN`], failing the test if it panicked.
pub async fn stopped<T>(task: tokio::task::JoinHandle<T>) -> T {
    joined(task)
        .await
        .unwrap_or_else(|e| panic!("a spawned pipeline task panicked: {e}"))
}

/// The Kafka-protocol broker the tests use: TALLY_TEST_KAFKA_BROKERS (`scripts/test` sets it
/// from what `scripts/services up` recorded), else the default 127.0.0.1:9092. Every
/// TALLY_TEST_* address is read here and nowhere else.
pub fn kafka_brokers() -> String {
    std::env::var("TALLY_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The PostgreSQL the tests use: TALLY_TEST_POSTGRES_URL, else the machine's on 127.0.0.1.
pub fn postgres_url() -> String {
    std::env::var("TALLY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=tally".into())
}

/// The ClickHouse (HTTP) the tests use: TALLY_TEST_CLICKHOUSE_URL, else 127.0.0.1:8123.
pub fn clickhouse_url() -> String {
    std::env::var("TALLY_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{name}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A configuration isolated to one test.
pub fn test_config(name: &str) -> Config {
    let id = unique(name);
    let mut cfg = Config::default();
    cfg.kafka.brokers = kafka_brokers();
    // Three, not the production default of 64: every test makes its own topics on the local
    // broker (Tansu with SQLite), where each partition costs; three still spread accounts.
    cfg.kafka.topic_partitions = 3;
    cfg.kafka.ledger_group = format!("{id}-ledger");
    cfg.kafka.analytics_group = format!("{id}-analytics");
    let t = &mut cfg.kafka.topics;
    for topic in [
        &mut t.calls,
        &mut t.chat_responses,
        &mut t.instance_hours,
        &mut t.metered,
        &mut t.grants,
        &mut t.plans,
        &mut t.dead_letter,
    ] {
        *topic = format!("{id}.{topic}");
    }
    let a = &mut cfg.alerts.topics;
    for topic in [
        &mut a.low_balance,
        &mut a.allowance_used,
        &mut a.credits_exhausted,
        &mut a.projected_exhaustion,
        &mut a.credits_expiring,
        &mut a.recharge_requested,
    ] {
        *topic = format!("{id}.{topic}");
    }
    cfg.postgres.url = Secret::new(postgres_url());
    cfg.postgres.schema = id.to_lowercase();
    cfg.clickhouse.url = clickhouse_url();
    cfg.clickhouse.database = id.to_lowercase();
    cfg.pipeline.batch_max_wait_ms = 50;
    cfg.pipeline.analytics_batch_max_wait_ms = 50;
    cfg.pipeline.retry_initial_ms = 50;
    cfg.pipeline.retry_max_ms = 1000;
    cfg.prices.path = repo_path("tests/fixtures/prices.toml");
    cfg.api.listen = "127.0.0.1:0".into();
    cfg.validate().expect("test config is valid");
    cfg
}

impl TestEnv {
    /// Creates the topics, the PostgreSQL schema and the ClickHouse database.
    pub async fn new(name: &str) -> TestEnv {
        Self::with_config(test_config(name)).await
    }

    pub async fn with_config(cfg: Config) -> TestEnv {
        tally::kafka::ensure_topics(&cfg.kafka, &cfg.all_topics(), cfg.kafka.topic_partitions)
            .await
            .expect("Kafka is up (run scripts/services up)");
        TestEnv {
            premade_topics: false,
            ..Self::on_existing_topics(cfg).await
        }
    }

    /// [`TestEnv::with_config`] on a broker whose topics exist already (librdkafka's mock
    /// cluster has no CreateTopics: its topics are made with `MockCluster::create_topic`).
    pub async fn on_existing_topics(cfg: Config) -> TestEnv {
        let mut store = Store::connect(&cfg.postgres)
            .await
            .expect("PostgreSQL is up (run scripts/services up)");
        store.migrate().await.expect("PostgreSQL migrations");
        tally::analytics::migrate(&cfg.clickhouse)
            .await
            .expect("ClickHouse is up (run scripts/services up)");
        let prices = Arc::new(PriceTable::load(&cfg.prices.path).expect("price table"));
        let producer = tally::kafka::producer_config(&cfg.kafka).create().unwrap();
        TestEnv {
            cfg: Arc::new(cfg),
            prices,
            producer,
            premade_topics: true,
        }
    }

    /// A bench's environment: on the configured broker (Tansu), or with
    /// `TALLY_BENCH_BROKER=mock` on librdkafka's in-process mock cluster (what `tally dev`
    /// runs), made here with every topic, so that the broker's own CPU (Tansu with SQLite
    /// takes most of a core at 10,000 events/s here) does not share the cores PostgreSQL and
    /// Tally are measured on. Keep the broker alive as long as the environment.
    pub async fn for_bench(mut cfg: Config) -> (TestEnv, Option<MockBroker>) {
        if std::env::var("TALLY_BENCH_BROKER").as_deref() != Ok("mock") {
            println!("broker: {}", cfg.kafka.brokers);
            return (TestEnv::with_config(cfg).await, None);
        }
        let broker = rdkafka::mocking::MockCluster::new(1).expect("the mock broker starts");
        cfg.kafka.brokers = broker.bootstrap_servers();
        cfg.kafka.replication_factor = 1;
        for topic in cfg.all_topics() {
            broker
                .create_topic(topic, cfg.kafka.topic_partitions, 1)
                .expect("a topic on the mock broker");
        }
        println!(
            "broker: librdkafka's in-process mock cluster {}",
            cfg.kafka.brokers
        );
        (TestEnv::on_existing_topics(cfg).await, Some(broker))
    }

    pub async fn store(&self) -> Store {
        Store::connect(&self.cfg.postgres).await.unwrap()
    }

    /// Sends (topic, key, payload) and waits for every acknowledgement.
    pub async fn send(&self, records: &[(String, String, Vec<u8>)]) {
        tally::cli::send_all(
            &self.producer,
            records
                .iter()
                .map(|(t, k, p)| (t.as_str(), Some(k.as_bytes()), p.as_slice(), None)),
            records.len() as u64,
            0,
            false,
        )
        .await
        .unwrap();
    }

    /// Sends (topic, key, payload) as records produced at `at` (their Kafka timestamp, which
    /// admission is decided at) and waits for every acknowledgement.
    pub async fn send_at(
        &self,
        records: &[(String, String, Vec<u8>)],
        at: chrono::DateTime<chrono::Utc>,
    ) {
        use rdkafka::producer::FutureRecord;
        for (topic, key, payload) in records {
            self.producer
                .send(
                    FutureRecord::to(topic)
                        .key(key.as_bytes())
                        .payload(payload.as_slice())
                        .timestamp(at.timestamp_millis()),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    /// High watermark of every input partition.
    pub fn ends(&self) -> HashMap<(String, i32), i64> {
        let consumer: BaseConsumer = tally::kafka::client_config(&self.cfg.kafka)
            .create()
            .unwrap();
        tally::kafka::watermarks(
            &consumer,
            &self.cfg.kafka.topics.inputs(),
            Duration::from_secs(10),
        )
        .unwrap()
        .into_iter()
        .map(|(tp, (_, high))| (tp, high))
        .collect()
    }

    /// Waits until the ledger group's stored offsets reach every input partition's end.
    pub async fn wait_ledger_caught_up(&self, timeout: Duration) {
        let store = self.store().await;
        let group = &self.cfg.kafka.ledger_group;
        let store = &store;
        self.wait_caught_up("ledger", timeout, |keys| async move {
            store.load_offsets(group, &keys).await.unwrap()
        })
        .await
    }

    /// Waits until the analytics group's positions reach every input partition's end: the
    /// committed positions (stored once a batch's rows and roll-ups are written), or — after a
    /// crash between an insert and its position, where nothing is left to read that would
    /// store it — the resume positions, once they have held for a second.
    pub async fn wait_analytics_caught_up(&self, timeout: Duration) {
        let sink = tally::analytics::AnalyticsSink::new(&self.cfg.clickhouse);
        let group = &self.cfg.kafka.analytics_group;
        let sink = &sink;
        let ends = &self.ends();
        let resumed_since: &std::sync::Mutex<Option<Instant>> = &Default::default();
        self.wait_caught_up("analytics", timeout, |keys| async move {
            let committed = sink
                .committed_positions(group, &keys)
                .await
                .unwrap_or_default();
            let resume = sink.load_positions(group, &keys).await.unwrap_or_default();
            let mut since = resumed_since.lock().unwrap();
            if !tally::kafka::reached(ends, &resume) {
                *since = None;
                return committed;
            }
            match *since.get_or_insert_with(Instant::now) {
                t if t.elapsed() >= Duration::from_secs(1) => resume,
                _ => committed,
            }
        })
        .await
    }

    async fn wait_caught_up<F, Fut>(&self, what: &str, timeout: Duration, load: F)
    where
        F: Fn(Vec<(String, i32)>) -> Fut,
        Fut: std::future::Future<Output = tally::kafka::Positions>,
    {
        let ends = self.ends();
        let started = Instant::now();
        loop {
            let stored = load(ends.keys().cloned().collect()).await;
            if tally::kafka::reached(&ends, &stored) {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{what} did not catch up within {timeout:?}: ends {ends:?}, stored {stored:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every record of the dead-letter topic: (reason header, source topic header, payload).
    pub fn dead_letters(&self) -> Vec<DeadLetterSeen> {
        let topic = &self.cfg.kafka.topics.dead_letter;
        read_topics(&self.cfg, &[topic], Duration::from_secs(30))
            .0
            .iter()
            .map(|m| {
                let header = |name: &str| {
                    m.headers()
                        .and_then(|hs| hs.iter().find(|h| h.key == name).and_then(|h| h.value))
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                DeadLetterSeen {
                    reason: header(tally::kafka::HEADER_REASON).unwrap_or_default(),
                    field: header(tally::kafka::HEADER_FIELD),
                    detail: header(tally::kafka::HEADER_DETAIL).unwrap_or_default(),
                    pipeline: header(tally::kafka::HEADER_PIPELINE).unwrap_or_default(),
                    source_topic: header(tally::kafka::HEADER_TOPIC).unwrap_or_default(),
                    source_offset: header(tally::kafka::HEADER_OFFSET).unwrap_or_default(),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }
}

/// Every message on `topics` from the low watermark to the high one at the call
/// (`tally::kafka::watermarks`), read by a fresh consumer outside any group's positions; and
/// whether all of them were read within `timeout`.
pub fn read_topics(
    cfg: &Config,
    topics: &[&str],
    timeout: Duration,
) -> (Vec<rdkafka::message::OwnedMessage>, bool) {
    let mut cc = tally::kafka::client_config(&cfg.kafka);
    cc.set("group.id", unique("topic-reader"));
    let consumer: BaseConsumer = cc.create().unwrap();
    let marks = tally::kafka::watermarks(&consumer, topics, Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for ((topic, p), (low, high)) in &marks {
        remaining += high - low;
        tpl.add_partition_offset(topic, *p, Offset::Offset(*low))
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let started = Instant::now();
    while remaining > 0 && started.elapsed() < timeout {
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            out.push(m.unwrap().detach());
            remaining -= 1;
        }
    }
    (out, remaining == 0)
}

#[derive(Debug, Clone)]
pub struct DeadLetterSeen {
    pub reason: String,
    pub field: Option<String>,
    pub detail: String,
    pub pipeline: String,
    pub source_topic: String,
    pub source_offset: String,
    pub payload: Vec<u8>,
    /// Every header: the source record's, then Tally's (`tally.*`).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// CloudEvents builders for hand-written test streams.
pub mod ev {
    use serde_json::{json, Value};

    pub fn envelope(
        ty: &str,
        source: &str,
        id: &str,
        account: &str,
        time: &str,
        data: Value,
    ) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "specversion": "1.0", "type": ty, "source": source, "id": id,
            "subject": account, "time": time, "datacontenttype": "application/json", "data": data,
        }))
        .unwrap()
    }

    pub fn grant(
        id: &str,
        account: &str,
        time: &str,
        grant_id: &str,
        kind: &str,
        credits: &str,
    ) -> Vec<u8> {
        envelope(
            "tally.credit.grant.v1",
            "//billing.test",
            id,
            account,
            time,
            json!({"grant_id": grant_id, "kind": kind, "credits": credits}),
        )
    }

    pub fn call(
        id: &str,
        account: &str,
        direction: &str,
        started: &str,
        answered: Option<&str>,
        ended: &str,
        hold: u32,
    ) -> Vec<u8> {
        envelope(
            "tally.usage.call.v1",
            "//voice.test/calls",
            id,
            account,
            ended,
            json!({"call_id": format!("c-{id}"), "direction": direction, "channel": "phone",
                   "started_at": started, "answered_at": answered, "ended_at": ended,
                   "hold_seconds": hold}),
        )
    }

    pub fn chat(
        id: &str,
        account: &str,
        time: &str,
        model: &str,
        tier: &str,
        responses: u32,
    ) -> Vec<u8> {
        envelope(
            "tally.usage.chat_response.v1",
            "//chat.test",
            id,
            account,
            time,
            json!({"conversation_id": format!("conv-{id}"), "model": model, "voice_tier": tier,
                   "channel": "text", "responses": responses}),
        )
    }

    pub fn instance(id: &str, account: &str, kind: &str, started: &str, ended: &str) -> Vec<u8> {
        envelope(
            "tally.usage.instance_hours.v1",
            "//compute.test",
            id,
            account,
            ended,
            json!({"instance_id": format!("i-{id}"), "instance_type": kind,
                   "started_at": started, "ended_at": ended}),
        )
    }

    pub fn analysis(id: &str, account: &str, time: &str, model: &str, quantity: &str) -> Vec<u8> {
        envelope(
            "tally.usage.metered.v1",
            "//analysis.test",
            id,
            account,
            time,
            json!({"kind": "ai_analysis", "quantity": quantity, "attributes": {"model": model}}),
        )
    }
}

/// What the ledger and ClickHouse must hold for a demo stream whose grants and plans were
/// applied before any usage: computed here with the pure pieces (decoder, rating, buckets),
/// independently of the pipeline, Kafka and the stores.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Expected {
    pub spendable: rust_decimal::Decimal,
    pub overage: rust_decimal::Decimal,
    pub remaining_by_grant: std::collections::BTreeMap<String, rust_decimal::Decimal>,
    pub usage_events: u64,
    pub credits: rust_decimal::Decimal,
}

pub fn expected_from_demo(
    records: &[tally::demo::DemoRecord],
    prices: &PriceTable,
) -> std::collections::BTreeMap<String, Expected> {
    use std::collections::{BTreeMap, HashSet};
    use tally::demo::Expect;
    use tally::event::{decode, DecodeLimits, Payload};
    use tally::ledger::{Account, NewGrant};

    let now = chrono::Utc::now();
    let limits = DecodeLimits::default();
    let mut seen = HashSet::new();
    let mut accounts: BTreeMap<String, Account> = BTreeMap::new();
    let mut debits: BTreeMap<String, (u64, rust_decimal::Decimal)> = BTreeMap::new();
    let mut out = Vec::new();
    // Grants and plans first (the tests deliver them first), then usage.
    for pass in 0..2 {
        for r in records.iter().filter(|r| r.expect == Expect::Valid) {
            let e = decode(&r.payload, now, &limits).expect("valid demo record decodes");
            let is_usage = e.usage().is_some();
            if (pass == 0) == is_usage {
                continue;
            }
            if !seen.insert((e.envelope.source.to_string(), e.envelope.id.to_string())) {
                continue;
            }
            let account_id = e.envelope.account_id.to_string();
            let acct = accounts
                .entry(account_id.clone())
                .or_insert_with(|| Account::new(account_id.clone()));
            match &e.payload {
                Payload::Grant(g) => acct.grant(
                    &NewGrant {
                        grant_id: g.grant_id.to_string(),
                        kind: g.kind,
                        credits: g.credits,
                        expires_at: g.expires_at,
                        priority: g.priority,
                    },
                    e.envelope.time,
                    &mut out,
                ),
                Payload::Plan(p) => {
                    acct.policy = p.overage_policy;
                    if let Some(m) = p.top_up_validity_months {
                        acct.top_up_validity_months = m;
                    }
                }
                _ => {
                    let charge = prices
                        .rate(&e.usage().unwrap())
                        .expect("valid demo usage is priced");
                    let d = debits.entry(account_id).or_default();
                    d.0 += 1;
                    d.1 += charge.credits;
                }
            }
        }
    }
    let latest = records
        .iter()
        .filter_map(|r| {
            decode(&r.payload, now, &limits)
                .ok()
                .map(|e| e.envelope.time)
        })
        .max()
        .unwrap_or(now);
    accounts
        .into_iter()
        .map(|(id, mut acct)| {
            let (usage_events, credits) = debits.get(&id).copied().unwrap_or_default();
            acct.debit(credits, latest, false, &mut out);
            let expected = Expected {
                spendable: acct.spendable(latest),
                overage: acct.overage,
                remaining_by_grant: acct
                    .grants
                    .iter()
                    .map(|g| (g.grant_id.clone(), g.remaining))
                    .collect(),
                usage_events,
                credits,
            };
            (id, expected)
        })
        .collect()
}

/// What the ledger and ClickHouse hold, in the shape of [`Expected`].
pub async fn actual(
    env: &TestEnv,
    accounts: &[String],
) -> std::collections::BTreeMap<String, Expected> {
    let store = env.store().await;
    let sink = tally::analytics::AnalyticsSink::new(&env.cfg.clickhouse);
    let mut out = std::collections::BTreeMap::new();
    for id in accounts {
        let b = store.balance(id).await.unwrap().expect("account exists");
        let (usage_events, credits) = sink.totals_by_account(id).await.unwrap();
        out.insert(
            id.clone(),
            Expected {
                spendable: b.spendable,
                overage: b.overage,
                remaining_by_grant: b
                    .grants
                    .iter()
                    .map(|g| (g.grant_id.clone(), g.remaining))
                    .collect(),
                usage_events,
                credits,
            },
        );
    }
    out
}

/// A value a test binary's cases share, set up once by the first case that asks on a runtime
/// of its own: `set_up` returns the value and what must keep running while the cases read it
/// (Tally, an API server, or `()`), and that runtime lives as long as the test process. A
/// set-up that panics fails every case that asks (its panic is printed above).
pub fn set_up_once<T, K, F, S>(
    cell: &'static std::sync::OnceLock<Option<T>>,
    set_up: S,
) -> &'static T
where
    T: Send + Sync + 'static,
    K: 'static,
    F: std::future::Future<Output = (T, K)> + 'static,
    S: FnOnce() -> F + Send + 'static,
{
    cell.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (value, running) = set_up().await;
                let _ = tx.send(value);
                let _running = running;
                std::future::pending::<()>().await
            })
        });
        rx.recv().ok()
    })
    .as_ref()
    .expect("the shared set-up failed: see its panic above")
}

/// `env`'s configuration as a TOML file in `dir`, for the `tally` binary (`--config`).
pub fn config_file(env: &TestEnv, dir: &std::path::Path) -> PathBuf {
    let path = dir.join("tally.toml");
    std::fs::write(&path, toml::to_string(&*env.cfg).unwrap()).unwrap();
    path
}

/// The `tally` binary run with `--config config` and `args` (logs at warn).
pub fn tally_cli_output(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tally")
}

/// [`tally_cli_output`] that must succeed: its standard output.
pub fn tally_cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = tally_cli_output(config, args);
    assert!(
        out.status.success(),
        "tally {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
