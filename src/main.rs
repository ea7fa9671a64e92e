//! The `tally` binary: parses arguments and hands over to the library. See `tally --help`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use tally::config::Config;
use tally::rating::PriceTable;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Usage aggregator and credit ledger: rates usage events from Kafka, debits credit grants in PostgreSQL, writes rated usage to ClickHouse.",
    long_about = None
)]
struct Cli {
    /// Configuration file (TOML). Every key can be overridden with TALLY_<SECTION>__<KEY>.
    #[arg(long, short, global = true, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// Log format: text for people, json for log pipelines. Level via RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "TALLY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines until SIGTERM/Ctrl-C: consume usage and grants, rate, debit the
    /// ledger (PostgreSQL), write rated usage (ClickHouse). On a signal: stop polling, finish
    /// the batch in hand, commit, exit 0; tasks still running after
    /// `pipeline.shutdown_timeout_ms` are named in the log and the process exits 1.
    Run {
        /// Which pipelines this process runs.
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
        /// Exit once every consumer group of this process has held partitions and been caught
        /// up with the topics' ends for this many seconds (demo and tests; default: never).
        #[arg(long)]
        idle_exit_secs: Option<u64>,
    },
    /// Create Kafka topics, apply PostgreSQL migrations and ClickHouse DDL. Idempotent.
    Migrate,
    /// Try Tally without installing Kafka: start an in-process Kafka-protocol broker
    /// (librdkafka's mock cluster) on 127.0.0.1, create the topics, migrate PostgreSQL and
    /// ClickHouse, optionally send the demo stream, then run the pipelines, the API and the
    /// dashboard against it until Ctrl-C. Outside producers connect to the address printed.
    /// The broker keeps everything in memory (nothing survives the process): not for
    /// production.
    Dev {
        /// Send the demo stream (`tally produce` with its defaults) for this many accounts
        /// once the broker is up (0: none).
        #[arg(long, default_value_t = 0)]
        demo_accounts: usize,
        /// Usage events of that demo stream.
        #[arg(long, default_value_t = 2_000)]
        demo_events: usize,
        /// Exit once the pipelines are idle this many seconds (as `tally run`).
        #[arg(long)]
        idle_exit_secs: Option<u64>,
    },
    /// Price tables.
    Prices {
        #[command(subcommand)]
        command: PricesCommand,
    },
    /// Send a realistic demo stream (several accounts, all usage kinds, grants, a few
    /// duplicates and malformed events) to the input topics at a chosen rate.
    Produce(ProduceArgs),
    /// Print an account's balance by grant and its last ledger entries.
    Balance {
        account: String,
        /// How many ledger entries to show.
        #[arg(long, default_value_t = 10)]
        entries: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Usage report of an account (ClickHouse roll-ups, balance from the ledger): daily usage,
    /// this cycle, projection, counts, peak days, busiest hours, 3-month weekly trend.
    Report {
        account: String,
        /// First day (UTC, YYYY-MM-DD) of the daily series, peaks, hours and counts
        /// (default: the start of this cycle).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day, included (default: today, UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Print JSON (every figure, decimals as strings) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare the ledger's charges with the ClickHouse roll-ups and rated events, per account
    /// x UTC day of event time x usage kind; print every difference (late usage flagged).
    /// Exit status: 0 when everything agrees, 1 when there is a difference, 2 when a store
    /// cannot be read.
    Reconcile {
        /// First day (UTC, YYYY-MM-DD); default: 30 days before --to.
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day, included; default: today (UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
        /// Print JSON (every figure, decimals as strings) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Manage accounts: plans and grants (published as events, so the ledger applies them
    /// exactly once, in order with usage), and the billing view.
    Accounts {
        #[command(subcommand)]
        command: AccountsCommand,
    },
    /// Re-submit dead letters to their source topics (after the cause is fixed), or re-read
    /// events from a JSON-lines file (backfills).
    Replay {
        #[command(subcommand)]
        command: ReplayCommand,
    },
}

#[derive(Subcommand)]
enum AccountsCommand {
    /// Give an account a plan (monthly allowance on a billing day) or change it; a change takes
    /// effect from the next reset.
    SetPlan {
        account: String,
        #[arg(long, default_value = "default")]
        plan_id: String,
        /// Credits granted each cycle (unused allowance expires at the reset).
        #[arg(long)]
        allowance: rust_decimal::Decimal,
        /// 1..=31; 29–31 fall on the last day of shorter months.
        #[arg(long)]
        billing_day: u8,
        #[arg(long, value_enum, default_value_t = Policy::BillOverage)]
        overage_policy: Policy,
        #[arg(long)]
        top_up_validity_months: Option<u32>,
        /// Low-balance alert below this many credits.
        #[arg(long)]
        low_balance_credits: Option<rust_decimal::Decimal>,
        /// Low-balance alert below this percent of the allowance.
        #[arg(long)]
        low_balance_percent: Option<rust_decimal::Decimal>,
        /// Allowance-used alert thresholds, e.g. 50,80,100.
        #[arg(long, value_delimiter = ',')]
        allowance_alert_percents: Option<Vec<u32>>,
    },
    /// Add credits: a top-up, package, promo or manual grant (idempotent by grant id).
    Grant {
        account: String,
        #[arg(long)]
        grant_id: String,
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        credits: rust_decimal::Decimal,
        /// RFC 3339; default: top-ups valid for the account's validity, others never expire.
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
        #[arg(long)]
        priority: Option<i32>,
    },
    /// The billing view: balance by grant, cycle, allowance used, days until reset, closed
    /// cycles and last entries.
    Show {
        account: String,
        #[arg(long, default_value_t = 10)]
        entries: i64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    SettleFromNextGrant,
    BillOverage,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    TopUp,
    Package,
    Promo,
    Manual,
    Allowance,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Role {
    Ledger,
    Analytics,
    All,
}

#[derive(Subcommand)]
enum PricesCommand {
    /// Validate a price table; prints FILE:LINE: message for every problem.
    Check { file: PathBuf },
}

#[derive(clap::Args)]
struct ProduceArgs {
    /// Number of accounts.
    #[arg(long, default_value_t = 5)]
    accounts: usize,
    /// Number of usage events (grants and plans come on top).
    #[arg(long, default_value_t = 2_000)]
    events: usize,
    /// Events per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Random seed: the same seed gives the same stream.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Every Nth record is an exact resend (0 = none).
    #[arg(long, default_value_t = 97)]
    duplicate_every: usize,
    /// Every Nth record is malformed (0 = none).
    #[arg(long, default_value_t = 101)]
    malformed_every: usize,
    /// Event times span the last N days up to now.
    #[arg(long, default_value_t = 7)]
    days: i64,
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Re-submit dead letters from the dead-letter topic (all, or one reason).
    DeadLetters {
        /// Only this reason (malformed_json, missing_field, wrong_type, unknown_type,
        /// invalid_value, too_large, unpriced, too_late, refused_by_store).
        #[arg(long)]
        reason: Option<String>,
        /// Print what would be re-submitted without sending.
        #[arg(long)]
        dry_run: bool,
    },
    /// Send events from a JSON-lines file (one CloudEvent per line) to the topic of their type.
    File { path: PathBuf },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    // Test builds only: failpoints named in the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(cli));
    // Tasks that did not stop (run has already logged them) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Prices {
        command: PricesCommand::Check { file },
    } = &cli.command
    {
        return prices_check(file);
    }
    let cfg = Arc::new(Config::load(cli.config.as_deref())?);
    match cli.command {
        Command::Prices { .. } => unreachable!("handled above"),
        Command::Migrate => migrate(&cfg, true).await,
        Command::Dev {
            demo_accounts,
            demo_events,
            idle_exit_secs,
        } => dev(&cfg, demo_accounts, demo_events, idle_exit_secs).await,
        Command::Run {
            role,
            idle_exit_secs,
        } => run_pipelines(cfg, role, idle_exit_secs, true).await,
        Command::Produce(args) => tally::cli::produce(&cfg, &args.into()).await,
        Command::Balance {
            account,
            entries,
            json,
        } => tally::cli::balance(&cfg, &account, entries, json).await,
        Command::Report {
            account,
            from,
            to,
            json,
        } => tally::cli::report(&cfg, &account, from, to, json).await,
        Command::Reconcile {
            from,
            to,
            account,
            json,
        } => {
            let outcome = tally::cli::reconcile(&cfg, from, to, account.as_deref(), json).await;
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            match outcome {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    std::process::exit(2)
                }
            }
        }
        Command::Accounts { command } => accounts(&cfg, command).await,
        Command::Replay { command } => match command {
            ReplayCommand::DeadLetters { reason, dry_run } => {
                let reason = match reason {
                    None => None,
                    Some(r) => Some(
                        tally::event::Reason::parse(&r)
                            .with_context(|| format!("unknown reason `{r}`"))?,
                    ),
                };
                tally::cli::replay_dead_letters(&cfg, reason, dry_run).await
            }
            ReplayCommand::File { path } => tally::cli::replay_file(&cfg, &path).await,
        },
    }
}

impl From<ProduceArgs> for tally::cli::ProduceOptions {
    fn from(a: ProduceArgs) -> Self {
        let end: DateTime<Utc> = Utc::now();
        tally::cli::ProduceOptions {
            accounts: a.accounts,
            events: a.events,
            rate_per_second: a.rate,
            seed: a.seed,
            duplicate_every: a.duplicate_every,
            malformed_every: a.malformed_every,
            start: end - chrono::Duration::days(a.days),
            end,
        }
    }
}

async fn accounts(cfg: &Config, command: AccountsCommand) -> anyhow::Result<()> {
    use tally::event::{encode, GrantKind, OveragePolicy};
    let now = Utc::now();
    let (account, payload, topic) = match command {
        AccountsCommand::Show { account, entries } => {
            return tally::cli::show_account(cfg, &account, entries, now).await;
        }
        AccountsCommand::SetPlan {
            account,
            plan_id,
            allowance,
            billing_day,
            overage_policy,
            top_up_validity_months,
            low_balance_credits,
            low_balance_percent,
            allowance_alert_percents,
        } => {
            let policy = match overage_policy {
                Policy::SettleFromNextGrant => OveragePolicy::SettleFromNextGrant,
                Policy::BillOverage => OveragePolicy::BillOverage,
            };
            let event_id = format!(
                "plan:{account}:{}",
                now.timestamp_nanos_opt().unwrap_or_default()
            );
            let payload = encode::plan(
                "//tally/cli",
                &event_id,
                &account,
                &plan_id,
                allowance,
                billing_day,
                policy,
                top_up_validity_months,
                low_balance_credits,
                low_balance_percent,
                allowance_alert_percents.as_deref(),
                now,
            );
            (account, payload, cfg.kafka.topics.plans.clone())
        }
        AccountsCommand::Grant {
            account,
            grant_id,
            kind,
            credits,
            expires_at,
            priority,
        } => {
            let kind = match kind {
                Kind::TopUp => GrantKind::TopUp,
                Kind::Package => GrantKind::Package,
                Kind::Promo => GrantKind::Promo,
                Kind::Manual => GrantKind::Manual,
                Kind::Allowance => GrantKind::Allowance,
            };
            let payload = encode::grant(
                "//tally/cli",
                &account,
                &grant_id,
                kind,
                credits,
                expires_at,
                priority,
                now,
            );
            (account, payload, cfg.kafka.topics.grants.clone())
        }
    };
    // Validate exactly as the pipeline will, so a mistake is reported here, not dead-lettered.
    tally::event::decode(&payload, now, &tally::event::DecodeLimits::default())
        .map_err(|r| anyhow::anyhow!("refused: {r}"))?;
    let producer: rdkafka::producer::FutureProducer =
        tally::kafka::producer_config(&cfg.kafka).create()?;
    tally::cli::send_all(
        &producer,
        [(
            topic.as_str(),
            Some(account.as_bytes()),
            payload.as_slice(),
            None,
        )],
        1,
        0,
        false,
    )
    .await?;
    println!("sent to {topic}: {}", String::from_utf8_lossy(&payload));
    Ok(())
}

fn prices_check(file: &std::path::Path) -> anyhow::Result<()> {
    match tally::rating::check_file(file) {
        Ok(table) => {
            let rules: usize = table.versions().iter().map(|v| v.rules().len()).sum();
            println!(
                "{}: ok ({} versions, {} rules)",
                file.display(),
                table.versions().len(),
                rules
            );
            Ok(())
        }
        Err(report) => {
            eprintln!("{report}");
            bail!(
                "{}: {} problem(s)",
                file.display(),
                report.errors().len().max(1)
            )
        }
    }
}

/// `create_topics`: false for `tally dev`, whose broker has its topics made directly (the mock
/// cluster has no CreateTopics).
async fn migrate(cfg: &Config, create_topics: bool) -> anyhow::Result<()> {
    if create_topics {
        tally::kafka::ensure_topics(&cfg.kafka, &cfg.all_topics(), cfg.kafka.topic_partitions)
            .await
            .context("creating Kafka topics")?;
    }
    let mut store = tally::ledger::Store::connect(&cfg.postgres)
        .await
        .context("connecting to PostgreSQL")?;
    let applied = store.migrate().await.context("PostgreSQL migrations")?;
    println!(
        "PostgreSQL schema {}: applied {:?}",
        cfg.postgres.schema, applied
    );
    let applied = tally::analytics::migrate(&cfg.clickhouse)
        .await
        .context("ClickHouse DDL")?;
    println!(
        "ClickHouse database {}: applied {:?}",
        cfg.clickhouse.database, applied
    );
    Ok(())
}

/// `tally dev`: the in-process broker, then migrate, demo stream and `tally run` against it.
async fn dev(
    cfg: &Config,
    demo_accounts: usize,
    demo_events: usize,
    idle_exit_secs: Option<u64>,
) -> anyhow::Result<()> {
    let broker = rdkafka::mocking::MockCluster::new(1).context("starting the dev broker")?;
    let mut cfg = cfg.clone();
    cfg.kafka.brokers = broker.bootstrap_servers();
    cfg.kafka.replication_factor = 1;
    for topic in cfg.all_topics() {
        broker
            .create_topic(topic, cfg.kafka.topic_partitions, 1)
            .with_context(|| format!("creating topic {topic} on the dev broker"))?;
    }
    println!(
        "dev broker (in-process, in memory: keeps nothing, not for production): {}",
        cfg.kafka.brokers
    );
    migrate(&cfg, false).await?;
    if demo_accounts > 0 {
        let end = Utc::now();
        tally::cli::produce_to_existing_topics(
            &cfg,
            &tally::cli::ProduceOptions {
                accounts: demo_accounts,
                events: demo_events,
                rate_per_second: 0,
                seed: 42,
                duplicate_every: 97,
                malformed_every: 101,
                start: end - chrono::Duration::days(7),
                end,
            },
        )
        .await?;
    }
    let result = run_pipelines(Arc::new(cfg), Role::All, idle_exit_secs, false).await;
    drop(broker);
    result
}

async fn run_pipelines(
    cfg: Arc<Config>,
    role: Role,
    idle_exit_secs: Option<u64>,
    create_topics: bool,
) -> anyhow::Result<()> {
    let signal = shutdown_signal()?;
    let prices = Arc::new(
        PriceTable::load(&cfg.prices.path)
            .map_err(|r| anyhow::anyhow!("{r}"))
            .with_context(|| format!("loading price table {}", cfg.prices.path.display()))?,
    );
    tokio::pin!(signal);
    // Nothing is in hand yet: a signal while the broker is slow to answer stops at once.
    let topics = cfg.all_topics();
    tokio::select! {
        created = async {
            if create_topics {
                tally::kafka::ensure_topics(&cfg.kafka, &topics, cfg.kafka.topic_partitions).await
            } else {
                Ok(())
            }
        } => {
            created.context("creating Kafka topics")?;
        }
        _ = &mut signal => {
            tracing::info!("shutdown requested during start-up");
            return Ok(());
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Tasks::default();
    if role != Role::Analytics {
        let (cfg, prices, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
        tasks.spawn("ledger pipeline", async move {
            tally::pipeline::ledger::run(cfg, prices, stop)
                .await
                .map(|s| format!("ledger: {s:?}"))
        });
    }
    if role != Role::Analytics {
        let (c, stop) = (cfg.clone(), stop_rx.clone());
        tasks.spawn("scheduler", async move {
            tally::pipeline::scheduler::run(c, Arc::new(tally::clock::SystemClock), stop)
                .await
                .map(|ticks| format!("scheduler: {ticks} ticks"))
        });
        let (c, stop) = (cfg.clone(), stop_rx.clone());
        tasks.spawn("alert relay", async move {
            tally::pipeline::alerts::run(c, stop)
                .await
                .map(|n| format!("alert relay: {n} alerts published"))
        });
    }
    if role != Role::Ledger {
        let (cfg, prices, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
        tasks.spawn("analytics pipeline", async move {
            tally::pipeline::analytics::run(cfg, prices, stop)
                .await
                .map(|s| format!("analytics: {s:?}"))
        });
    }
    if cfg.api.enabled {
        let (c, p, stop) = (cfg.clone(), prices.clone(), stop_rx.clone());
        tasks.spawn("HTTP API", async move { tally::api::run(c, p, stop).await });
    }
    if let Some(secs) = idle_exit_secs {
        let stop = stop_tx.clone();
        let mut stopped = stop_rx.clone();
        let cfg = cfg.clone();
        tasks.spawn("idle watch", async move {
            let idle = tally::cli::wait_until_idle(
                &cfg,
                role != Role::Analytics,
                role != Role::Ledger,
                Duration::from_secs(secs),
            );
            tokio::select! {
                idle = idle => {
                    idle?;
                    tracing::info!(quiet_s = secs, "idle: every group holds partitions and is caught up");
                    let _ = stop.send(true);
                    Ok("idle exit".to_owned())
                }
                _ = stopped.wait_for(|&s| s) => Ok("idle watch stopped".to_owned()),
            }
        });
    }
    let started = Instant::now();
    let shutdown_timeout = Duration::from_millis(cfg.pipeline.shutdown_timeout_ms);
    let mut stopping = stop_tx.subscribe();
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut failure: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            _ = &mut signal, if !*stop_tx.borrow() => {
                tracing::info!(
                    shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms,
                    "shutdown requested: finishing the batch in hand"
                );
                let _ = stop_tx.send(true);
            }
            // Whatever asked for the stop (a signal, idle exit, a failed task), the tasks get
            // shutdown_timeout to finish from now.
            _ = stopping.wait_for(|&s| s), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + shutdown_timeout);
            }
            _ = sleep_until_some(deadline) => {
                let stuck = tasks.running();
                tracing::error!(
                    shutdown_timeout_ms = cfg.pipeline.shutdown_timeout_ms,
                    stuck = %stuck.join(", "),
                    "shutdown timed out: these tasks did not finish in time (see the warnings above for what they wait on); exiting without them, what they had not committed is read again at the next start"
                );
                if let Some(e) = &failure {
                    tracing::error!(error = format!("{e:#}"), "a task had failed");
                }
                std::process::exit(1);
            }
            done = tasks.join_next() => match done {
                None => break,
                Some((_, Ok(Ok(summary)))) => tracing::info!(summary, "task finished"),
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
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The tasks of `tally run`, each with a name for the log when it fails or does not stop.
#[derive(Default)]
struct Tasks {
    set: tokio::task::JoinSet<anyhow::Result<String>>,
    names: std::collections::BTreeMap<tokio::task::Id, &'static str>,
}

impl Tasks {
    fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: std::future::Future<Output = anyhow::Result<String>> + Send + 'static,
    {
        let id = self.set.spawn(task).id();
        self.names.insert(id, name);
    }

    /// The next task to end, with its name; None when none is left.
    async fn join_next(
        &mut self,
    ) -> Option<(
        &'static str,
        Result<anyhow::Result<String>, tokio::task::JoinError>,
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
}

/// Sleeps until the deadline, or forever when there is none.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Installs the SIGTERM/SIGINT handlers now (a signal that arrives during start-up is not
/// lost and does not kill the process) and returns the future that resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
