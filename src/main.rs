//! The `tally` binary: parses arguments and hands over to the library (`tally::app` for
//! `run` and `migrate`, `tally::cli` for the operator commands). See `tally --help`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand, ValueEnum};

use tally::config::Config;

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
        /// Recharge request below this many spendable credits (once per crossing, on
        /// `alerts.topics.recharge_requested`); with --recharge-credits.
        #[arg(long, requires = "recharge_credits")]
        recharge_threshold_credits: Option<rust_decimal::Decimal>,
        /// Credits the recharge request asks the payment system for.
        #[arg(long, requires = "recharge_threshold_credits")]
        recharge_credits: Option<rust_decimal::Decimal>,
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
    /// Void a grant: its remaining credits are removed by a `void` entry (what it paid
    /// stays paid); it no longer counts as purchased. Idempotent: a grant is voided once.
    VoidGrant {
        account: String,
        #[arg(long)]
        grant_id: String,
        /// Why (written on the ledger line).
        #[arg(long)]
        reason: String,
        /// Who asks (written on the ledger line); default: the CLI's source, //tally/cli.
        #[arg(long)]
        by: Option<String>,
    },
    /// A manual adjustment, plus or minus, with a reason (idempotent by adjustment id).
    Adjust {
        account: String,
        #[arg(long)]
        adjustment_id: String,
        /// Credits added (e.g. 25) or taken (e.g. -25).
        #[arg(long, allow_hyphen_values = true)]
        credits: rust_decimal::Decimal,
        /// Why (written on the ledger lines).
        #[arg(long)]
        reason: String,
        /// Who asks (written on the ledger lines); default: the CLI's source, //tally/cli.
        #[arg(long)]
        by: Option<String>,
    },
    /// Void a usage event: the credits the ledger charged it come back (unsettled overage
    /// first, the rest into a bucket of their own), and analytics leaves it out. Idempotent:
    /// a usage event is voided once. A void of usage the ledger has not charged yet waits
    /// for it.
    VoidUsage {
        account: String,
        /// The usage event's CloudEvents source.
        #[arg(long)]
        event_source: String,
        /// The usage event's CloudEvents id.
        #[arg(long)]
        event_id: String,
        /// Why (written on the ledger lines).
        #[arg(long)]
        reason: String,
        /// Who asks (written on the ledger lines); default: the CLI's source, //tally/cli.
        #[arg(long)]
        by: Option<String>,
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

impl From<Role> for tally::app::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Ledger => tally::app::Role::Ledger,
            Role::Analytics => tally::app::Role::Analytics,
            Role::All => tally::app::Role::All,
        }
    }
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
        Command::Migrate => {
            println!("{}", tally::app::migrate(&cfg).await?);
            Ok(())
        }
        Command::Dev {
            demo_accounts,
            demo_events,
            idle_exit_secs,
        } => {
            let options = tally::app::DevOptions {
                demo_accounts,
                demo_events,
                idle_exit: idle_exit_secs.map(Duration::from_secs),
            };
            Ok(tally::app::dev(&cfg, options, shutdown_signal()?).await?)
        }
        Command::Run {
            role,
            idle_exit_secs,
        } => {
            let options = tally::app::RunOptions {
                role: role.into(),
                idle_exit: idle_exit_secs.map(Duration::from_secs),
                create_topics: true,
            };
            tally::app::run(cfg, options, shutdown_signal()?).await?;
            Ok(())
        }
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
    use tally::cli::accounts;
    use tally::event::{GrantKind, OveragePolicy};
    let now = Utc::now();
    match command {
        AccountsCommand::Show { account, entries } => {
            tally::cli::show_account(cfg, &account, entries, now).await
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
            recharge_threshold_credits,
            recharge_credits,
        } => {
            let overage_policy = match overage_policy {
                Policy::SettleFromNextGrant => OveragePolicy::SettleFromNextGrant,
                Policy::BillOverage => OveragePolicy::BillOverage,
            };
            let plan = tally::commands::PlanCommand {
                account,
                plan: tally::event::PlanEvent {
                    plan_id: plan_id.into(),
                    monthly_allowance: allowance,
                    billing_day,
                    overage_policy,
                    top_up_validity_months,
                    low_balance_credits,
                    low_balance_percent,
                    allowance_alert_percents,
                    recharge: recharge_threshold_credits.zip(recharge_credits).map(
                        |(threshold_credits, credits)| tally::event::Recharge {
                            threshold_credits,
                            credits,
                        },
                    ),
                },
            };
            accounts::set_plan(cfg, plan, now).await
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
            let grant = tally::commands::GrantCommand {
                account,
                grant: tally::event::GrantEvent {
                    grant_id: grant_id.into(),
                    kind,
                    credits,
                    expires_at,
                    priority,
                },
            };
            accounts::grant(cfg, grant, now).await
        }
        AccountsCommand::VoidGrant {
            account,
            grant_id,
            reason,
            by,
        } => {
            let void = tally::commands::VoidGrantCommand {
                account,
                void: tally::event::VoidGrantEvent {
                    grant_id: grant_id.into(),
                    reason: reason.into(),
                    actor: by.map(Into::into),
                },
            };
            accounts::void_grant(cfg, void, now).await
        }
        AccountsCommand::Adjust {
            account,
            adjustment_id,
            credits,
            reason,
            by,
        } => {
            let adjustment = tally::commands::AdjustmentCommand {
                account,
                adjustment: tally::event::AdjustmentEvent {
                    adjustment_id: adjustment_id.into(),
                    credits,
                    reason: reason.into(),
                    actor: by.map(Into::into),
                },
            };
            accounts::adjust(cfg, adjustment, now).await
        }
        AccountsCommand::VoidUsage {
            account,
            event_source,
            event_id,
            reason,
            by,
        } => {
            let void = tally::commands::UsageVoidCommand {
                account,
                void: tally::event::UsageVoidEvent {
                    event_source: event_source.into(),
                    event_id: event_id.into(),
                    reason: reason.into(),
                    actor: by.map(Into::into),
                },
            };
            accounts::void_usage(cfg, void, now).await
        }
    }
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
