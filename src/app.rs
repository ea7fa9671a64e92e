//! The application: `tally run`'s supervisor, and `tally migrate`. The binary (`src/main.rs`)
//! parses arguments and calls in here; tests and benches start Tally the same way, with
//! [`run`] and a shutdown future of their own.
//!
//! Owns: which tasks a role starts, how they stop (a shared stop signal, then
//! `pipeline.shutdown_timeout_ms` for the batch in hand), and what a failed task does to the
//! others. Does not touch the stores or Kafka itself: each task does.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::rating::PriceTable;

/// Which pipelines a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The ledger pipeline, the scheduler and the alert relay.
    Ledger,
    /// The analytics pipeline.
    Analytics,
    /// Both.
    All,
}

impl Role {
    /// Whether this role runs the ledger (with its scheduler and alert relay).
    pub fn ledger(self) -> bool {
        self != Role::Analytics
    }

    /// Whether this role runs the analytics pipeline.
    pub fn analytics(self) -> bool {
        self != Role::Ledger
    }
}

/// How `tally run` runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub role: Role,
    /// Stop once every consumer group of this process has held partitions and been caught up
    /// with the topics' ends for this long (demo and tests).
    pub idle_exit: Option<Duration>,
    /// Create missing topics at start (false for `tally dev`, whose broker has its topics
    /// made directly: librdkafka's mock cluster has no CreateTopics).
    pub create_topics: bool,
}

impl RunOptions {
    /// Every role, until shutdown.
    pub fn all() -> Self {
        RunOptions {
            role: Role::All,
            idle_exit: None,
            create_topics: true,
        }
    }
}

/// What a clean run did: the totals of the pipelines it ran (None for a role it did not).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The ledger's totals over its workers (`pipeline.ledger_workers`)...
    pub ledger: Option<crate::pipeline::ledger::LedgerStats>,
    /// ... and each worker's, in the order they ended.
    pub ledger_workers: Vec<crate::pipeline::ledger::LedgerStats>,
    pub analytics: Option<crate::pipeline::analytics::AnalyticsStats>,
}

/// How a task of a run ended.
enum TaskEnd {
    Ledger(crate::pipeline::ledger::LedgerStats),
    Analytics(crate::pipeline::analytics::AnalyticsStats),
    /// Any other task: what it did, for the log.
    Done(String),
}

impl TaskEnd {
    fn summary(&self) -> String {
        match self {
            TaskEnd::Ledger(s) => format!("ledger: {s:?}"),
            TaskEnd::Analytics(s) => format!("analytics: {s:?}"),
            TaskEnd::Done(s) => s.clone(),
        }
    }
}

/// How a run ended when it did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A task failed (the first failure; the others were stopped).
    #[error(transparent)]
    Failed(anyhow::Error),
    /// Tasks still running `pipeline.shutdown_timeout_ms` after the stop was asked; what they
    /// had not committed is read again at the next start.
    #[error("shutdown timed out after {timeout_ms} ms; still running: {}", stuck.join(", "))]
    ShutdownTimedOut {
        timeout_ms: u64,
        stuck: Vec<&'static str>,
    },
}

/// The ledger consumers' task names, one per `pipeline.ledger_workers`.
const LEDGER_TASKS: [&str; crate::config::MAX_LEDGER_WORKERS] = [
    "ledger pipeline",
    "ledger pipeline 2",
    "ledger pipeline 3",
    "ledger pipeline 4",
    "ledger pipeline 5",
    "ledger pipeline 6",
    "ledger pipeline 7",
    "ledger pipeline 8",
];

/// Runs the pipelines of `options.role` (and the HTTP API when `api.enabled`) until
/// `shutdown` resolves, idle exit, or a task fails. On a stop: every task finishes the batch
/// in hand and commits; tasks still running after `pipeline.shutdown_timeout_ms` are named in
/// the log and in [`RunError::ShutdownTimedOut`] (the caller exits non-zero; they are not
/// waited for).
pub async fn run(
    cfg: Arc<Config>,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, RunError> {
    let prices = Arc::new(
        PriceTable::load(&cfg.prices.path)
            .map_err(|r| anyhow::anyhow!("{r}"))
            .with_context(|| format!("loading price table {}", cfg.prices.path.display()))
            .map_err(RunError::Failed)?,
    );
    run_with_prices(cfg, prices, options, shutdown).await
}

/// [`run`] with a price table already loaded.
pub async fn run_with_prices(
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, RunError> {
    let role = options.role;
    tokio::pin!(shutdown);
    // Nothing is in hand yet: a signal while the broker is slow to answer stops at once.
    let topics = cfg.all_topics();
    let create = async {
        if options.create_topics {
            crate::kafka::ensure_topics(&cfg.kafka, &topics, cfg.kafka.topic_partitions).await
        } else {
            Ok(())
        }
    };
    tokio::select! {
        created = create => {
            created.context("creating Kafka topics").map_err(RunError::Failed)?;
        }
        _ = &mut shutdown => {
            tracing::info!("shutdown requested during start-up");
            return Ok(RunReport::default());
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Tasks::default();
    if role.ledger() {
        for name in &LEDGER_TASKS[..cfg.pipeline.ledger_workers] {
            let (c, p, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
            tasks.spawn(name, async move {
                crate::pipeline::ledger::run(c, p, stop)
                    .await
                    .map(TaskEnd::Ledger)
            });
        }
        let (c, stop) = (cfg.clone(), stop_rx.clone());
        tasks.spawn("dedupe purge", async move {
            crate::pipeline::purge::run(c, Arc::new(crate::clock::SystemClock), stop)
                .await
                .map(|s| TaskEnd::Done(format!("dedupe purge: {s:?}")))
        });
        let (c, stop) = (cfg.clone(), stop_rx.clone());
        tasks.spawn("scheduler", async move {
            crate::pipeline::scheduler::run(c, Arc::new(crate::clock::SystemClock), stop)
                .await
                .map(|ticks| TaskEnd::Done(format!("scheduler: {ticks} ticks")))
        });
        let (c, stop) = (cfg.clone(), stop_rx.clone());
        tasks.spawn("alert relay", async move {
            crate::pipeline::alerts::run(c, stop)
                .await
                .map(|n| TaskEnd::Done(format!("alert relay: {n} alerts published")))
        });
    }
    if role.analytics() {
        let (c, p, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
        tasks.spawn("analytics pipeline", async move {
            crate::pipeline::analytics::run(c, p, stop)
                .await
                .map(TaskEnd::Analytics)
        });
    }
    if cfg.api.enabled {
        let (c, p, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
        tasks.spawn("HTTP API", async move {
            crate::api::run(c, p, stop).await.map(TaskEnd::Done)
        });
    }
    if let Some(quiet) = options.idle_exit {
        let stop = stop_tx.clone();
        let mut stopped = stop_rx.clone();
        let c = cfg.clone();
        tasks.spawn("idle watch", async move {
            let idle = crate::cli::wait_until_idle(&c, role.ledger(), role.analytics(), quiet);
            tokio::select! {
                idle = idle => {
                    idle?;
                    tracing::info!(quiet_s = quiet.as_secs(), "idle: every group holds partitions and is caught up");
                    let _ = stop.send(true);
                    Ok(TaskEnd::Done("idle exit".to_owned()))
                }
                _ = stopped.wait_for(|&s| s) => Ok(TaskEnd::Done("idle watch stopped".to_owned())),
            }
        });
    }
    let started = Instant::now();
    let timeout_ms = cfg.pipeline.shutdown_timeout_ms;
    let mut stopping = stop_tx.subscribe();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut failure: Option<anyhow::Error> = None;
    let mut report = RunReport::default();
    loop {
        tokio::select! {
            _ = &mut shutdown, if !*stop_tx.borrow() => {
                tracing::info!(shutdown_timeout_ms = timeout_ms, "shutdown requested: finishing the batch in hand");
                let _ = stop_tx.send(true);
            }
            // Whatever asked for the stop (a signal, idle exit, a failed task), the tasks get
            // shutdown_timeout to finish from now.
            _ = stopping.wait_for(|&s| s), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + Duration::from_millis(timeout_ms));
            }
            _ = sleep_until_some(deadline) => {
                let stuck = tasks.running();
                tracing::error!(
                    shutdown_timeout_ms = timeout_ms,
                    stuck = %stuck.join(", "),
                    "shutdown timed out: these tasks did not finish in time (see the warnings above for what they wait on); exiting without them, what they had not committed is read again at the next start"
                );
                if let Some(e) = &failure {
                    tracing::error!(error = format!("{e:#}"), "a task had failed");
                }
                tasks.detach();
                return Err(RunError::ShutdownTimedOut { timeout_ms, stuck });
            }
            done = tasks.join_next() => match done {
                None => break,
                Some((_, Ok(Ok(end)))) => {
                    tracing::info!(summary = end.summary(), "task finished");
                    match end {
                        TaskEnd::Ledger(s) => {
                            report.ledger.get_or_insert_with(Default::default).add(&s);
                            report.ledger_workers.push(s);
                        }
                        TaskEnd::Analytics(s) => report.analytics = Some(s),
                        TaskEnd::Done(_) => {}
                    }
                }
                Some((name, Ok(Err(e)))) => {
                    tracing::error!(task = name, error = format!("{e:#}"), "task failed: stopping the others");
                    let _ = stop_tx.send(true);
                    failure.get_or_insert(e.context(format!("{name} failed")));
                }
                Some((name, Err(e))) => {
                    tracing::error!(task = name, error = %e, "task panicked: stopping the others");
                    let _ = stop_tx.send(true);
                    failure.get_or_insert(anyhow::anyhow!("{name} panicked: {e}"));
                }
            },
        }
    }
    tracing::info!(elapsed_s = started.elapsed().as_secs(), "stopped");
    match failure {
        Some(e) => Err(RunError::Failed(e)),
        None => Ok(report),
    }
}

/// `tally migrate`: the Kafka topics, the PostgreSQL migrations and the ClickHouse DDL, each
/// idempotent. Returns what was applied, for the operator.
pub async fn migrate(cfg: &Config) -> anyhow::Result<String> {
    crate::kafka::ensure_topics(&cfg.kafka, &cfg.all_topics(), cfg.kafka.topic_partitions)
        .await
        .context("creating Kafka topics")?;
    migrate_stores(cfg).await
}

/// [`migrate`] without the topics.
async fn migrate_stores(cfg: &Config) -> anyhow::Result<String> {
    let mut store = crate::ledger::Store::connect(&cfg.postgres)
        .await
        .context("connecting to PostgreSQL")?;
    let pg = store.migrate().await.context("PostgreSQL migrations")?;
    let ch = crate::analytics::migrate(&cfg.clickhouse)
        .await
        .context("ClickHouse DDL")?;
    Ok(format!(
        "PostgreSQL schema {}: applied {pg:?}\nClickHouse database {}: applied {ch:?}",
        cfg.postgres.schema, cfg.clickhouse.database
    ))
}

/// What `tally dev` sends and how long it runs.
#[derive(Debug, Clone, Copy)]
pub struct DevOptions {
    /// Send the demo stream for this many accounts once the broker is up (0: none).
    pub demo_accounts: usize,
    /// Usage events of that demo stream.
    pub demo_events: usize,
    /// As [`RunOptions::idle_exit`].
    pub idle_exit: Option<Duration>,
}

/// `tally dev`: an in-process Kafka-protocol broker (librdkafka's mock cluster, in memory:
/// keeps nothing, not for production) on 127.0.0.1, the topics, the migrations, the demo
/// stream if asked, then [`run`] with every role against it until `shutdown`.
pub async fn dev(
    cfg: &Config,
    options: DevOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let broker = rdkafka::mocking::MockCluster::new(1)
        .context("starting the dev broker")
        .map_err(RunError::Failed)?;
    let mut cfg = cfg.clone();
    cfg.kafka.brokers = broker.bootstrap_servers();
    cfg.kafka.replication_factor = 1;
    for topic in cfg.all_topics() {
        broker
            .create_topic(topic, cfg.kafka.topic_partitions, 1)
            .with_context(|| format!("creating topic {topic} on the dev broker"))
            .map_err(RunError::Failed)?;
    }
    println!(
        "dev broker (in-process, in memory: keeps nothing, not for production): {}",
        cfg.kafka.brokers
    );
    println!("{}", migrate_stores(&cfg).await.map_err(RunError::Failed)?);
    if options.demo_accounts > 0 {
        let end = chrono::Utc::now();
        let demo = crate::cli::ProduceOptions {
            accounts: options.demo_accounts,
            events: options.demo_events,
            rate_per_second: 0,
            seed: 42,
            duplicate_every: 97,
            malformed_every: 101,
            start: end - chrono::Duration::days(7),
            end,
        };
        crate::cli::produce_to_existing_topics(&cfg, &demo)
            .await
            .map_err(RunError::Failed)?;
    }
    let run_options = RunOptions {
        role: Role::All,
        idle_exit: options.idle_exit,
        create_topics: false,
    };
    let result = run(Arc::new(cfg), run_options, shutdown).await;
    drop(broker);
    result.map(|_| ())
}

/// The tasks of a run, each with a name for the log when it fails or does not stop.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<anyhow::Result<TaskEnd>>,
    names: std::collections::BTreeMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<TaskEnd>> + Send + 'static,
    {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    /// The next task to end, with its name; None when none is left.
    async fn join_next(
        &mut self,
    ) -> Option<(
        &'static str,
        Result<anyhow::Result<TaskEnd>, tokio::task::JoinError>,
    )> {
        let (id, result) = match self.set.join_next_with_id().await? {
            Ok((id, r)) => (id, Ok(r)),
            Err(e) => (e.id(), Err(e)),
        };
        Some((self.names.remove(&id).unwrap_or("task"), result))
    }

    /// Names of the tasks still running.
    fn running(&self) -> Vec<&'static str> {
        self.names.values().copied().collect()
    }

    /// Leaves the tasks still running to the runtime (its shutdown drops them) instead of
    /// aborting them here: a task stuck in a blocking call would not notice an abort.
    fn detach(mut self) {
        self.set.detach_all();
    }
}

/// Sleeps until the deadline, or forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
