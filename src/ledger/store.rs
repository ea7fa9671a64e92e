//! The PostgreSQL store: applies a batch in ONE transaction — dedupe claims, account locks
//! (in account_id order, so instances never deadlock on accounts), grant and debit effects,
//! ledger entries, and the consumed offsets — and reads balances back.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use postgres_native_tls::MakeTlsConnector;
use rust_decimal::Decimal;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, Statement, Transaction};

use crate::config::conninfo::{self, SslMode, TlsSettings};

use super::book::{self, Book, Event, LivePart, Placed};
use super::buckets::{Account, ClosedCycle, Cycle, Entry, Grant, NewGrant, Plan};
use crate::alerts::{self, Alert, AlertDefaults, AlertState, KeyState};
use crate::config::PostgresConfig;
use crate::event::{GrantKind, OveragePolicy};
use crate::fault::{Classify, Fault};
use crate::kafka::{LoadError, OffsetStore, Positions, TopicPartition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("PostgreSQL: {}", describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("PostgreSQL data: {0}")]
    Data(String),
    /// The connection settings cannot be used (a connection string libpq would not read, a
    /// root certificate file missing...): the deployment's fault, never retried.
    #[error("PostgreSQL settings: {0}")]
    Config(String),
    /// An event dated before the dedupe horizon reached the store (its pipeline had not yet
    /// seen the horizon move): its claim may have been purged, so it is refused.
    #[error(
        "event time {time} is before the dedupe horizon {horizon}: claims of earlier events may have been purged, so it could be applied twice (source {event_source:?}, id {id:?})"
    )]
    BeforeHorizon {
        event_source: String,
        id: String,
        time: DateTime<Utc>,
        horizon: DateTime<Utc>,
    },
}

impl StoreError {
    /// Worth retrying the same batch (connection trouble, deadlock, serialization).
    pub fn is_transient(&self) -> bool {
        Classify::fault(self) == Fault::Transient
    }

    pub fn is_closed(&self) -> bool {
        matches!(self, StoreError::Db(e) if e.is_closed())
    }
}

impl Classify for StoreError {
    /// Whose fault the error is, by SQLSTATE class: connection trouble (08), a deadlock or
    /// serialization failure (40), too many connections, out of memory or disk (53), a
    /// server shutting down or restarting (57P01-57P03), a cancelled statement (57014) or a
    /// lock timeout (55P03) are transient; data the database refuses — a data exception (22:
    /// a value out of range, a NUL in text), an integrity violation (23: a CHECK, a
    /// duplicate key) or a program limit (54: an index row too large) — is the input's
    /// fault; anything else (an unknown table or column, bad credentials, a broken invariant
    /// of Tally's) is a bug or a broken deployment.
    fn fault(&self) -> Fault {
        match self {
            StoreError::Db(e) => match e.code() {
                _ if e.is_closed() => Fault::Transient,
                // No SQLSTATE: the socket, TLS or the protocol failed, not the statement.
                None => Fault::Transient,
                Some(code) => sqlstate_fault(code.code()),
            },
            StoreError::Data(_) | StoreError::Config(_) => Fault::Bug,
            StoreError::BeforeHorizon { .. } => Fault::Input,
        }
    }
}

/// The server's own words for a database error (SQLSTATE, message, detail), else the
/// client's (`db error` alone says nothing; the cause does).
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                text.push_str(" (");
                text.push_str(detail);
                text.push(')');
            }
            text
        }
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// [`StoreError::fault`] for a SQLSTATE code.
fn sqlstate_fault(code: &str) -> Fault {
    match code {
        "57P01" | "57P02" | "57P03" | "57014" | "55P03" => Fault::Transient,
        _ => match code.get(..2) {
            Some("08" | "40" | "53") => Fault::Transient,
            Some("22" | "23" | "54") => Fault::Input,
            _ => Fault::Bug,
        },
    }
}

/// What a rated usage event takes from the account.
#[derive(Debug, Clone, PartialEq)]
pub struct DebitInfo<'a> {
    pub credits: Decimal,
    pub usage_kind: &'a str,
    pub price_version: &'a str,
    pub rule_id: &'a str,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action<'a> {
    Debit(DebitInfo<'a>),
    Grant(NewGrant),
    /// The account's plan (allowance, billing day, thresholds), policy and top-up validity.
    Plan {
        plan: Plan,
        overage_policy: OveragePolicy,
        top_up_validity_months: u32,
    },
}

impl Action<'_> {
    /// The dedupe scope of the event's identity: a usage event, a grant and a plan with the
    /// same (source, id) are three events, so usage can never claim a grant's or a plan's
    /// identity.
    pub fn scope(&self) -> ClaimScope {
        match self {
            Action::Debit(_) => ClaimScope::Usage,
            Action::Grant(_) => ClaimScope::Grant,
            Action::Plan { .. } => ClaimScope::Plan,
        }
    }
}

/// Where a dedupe claim lives (`processed_events.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClaimScope {
    Usage,
    Grant,
    Plan,
}

impl ClaimScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimScope::Usage => "usage",
            ClaimScope::Grant => "grant",
            ClaimScope::Plan => "plan",
        }
    }
}

/// How far the dedupe purge stays behind admission: claims are kept for the dedupe window
/// plus this margin, so an instance whose clock runs up to this much behind the purging
/// instance's still admits only events whose claims are kept. (A larger skew, or a window
/// enlarged after a purge, is caught by the stored horizon: see [`Store::purge_dedupe`].)
pub const DEDUPE_PURGE_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Claims deleted per purge statement: each is its own short transaction.
pub const DEDUPE_PURGE_CHUNK_ROWS: i64 = 10_000;

/// The claims older than `window` + [`DEDUPE_PURGE_MARGIN`] at `now`: the horizon a purge
/// at `now` moves to (an event dated before it is too late).
pub fn dedupe_cutoff(now: DateTime<Utc>, window: chrono::TimeDelta) -> DateTime<Utc> {
    now - window - DEDUPE_PURGE_MARGIN
}

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeOutcome {
    /// Claims deleted by this call.
    pub deleted: u64,
    /// The stored horizon after it (never earlier than before).
    pub horizon: DateTime<Utc>,
    /// False when `max_rows` stopped it with claims still to delete: call again.
    pub done: bool,
}

/// One event ready for the ledger: its identity, account, time and effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Item<'a> {
    pub source: &'a str,
    pub id: &'a str,
    pub account_id: &'a str,
    pub time: DateTime<Utc>,
    pub action: Action<'a>,
}

impl Item<'_> {
    /// The event as the ledger's core sees it.
    pub fn to_event(&self) -> Event {
        Event {
            time: self.time,
            source: self.source.to_owned(),
            id: self.id.to_owned(),
            action: match &self.action {
                Action::Debit(d) => book::Action::Debit { credits: d.credits },
                Action::Grant(g) => book::Action::Grant(g.clone()),
                Action::Plan {
                    plan,
                    overage_policy,
                    top_up_validity_months,
                } => book::Action::Plan {
                    plan: plan.clone(),
                    overage_policy: *overage_policy,
                    top_up_validity_months: *top_up_validity_months,
                },
            },
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Events applied now.
    pub applied: usize,
    /// Events already claimed before (producer retries, redeliveries).
    pub duplicates: usize,
    pub entries: usize,
    pub accounts: usize,
    /// Alerts written to the outbox.
    pub alerts: usize,
    /// Accounts whose open window was replayed (an event arrived out of event-time order).
    pub replayed: usize,
}

/// What the ledger charged one account on one UTC day of event time for one usage kind: the
/// debit and overage entries of its usage events (each event's own charge; corrections move
/// credits between grants and overage, never change what an event was charged).
#[derive(Debug, Clone, PartialEq)]
pub struct ChargedDay {
    pub account_id: String,
    pub day: NaiveDate,
    pub usage_kind: String,
    /// Credits charged (positive).
    pub credits: Decimal,
    /// Distinct usage events charged (an event that cost nothing has no entry).
    pub events: u64,
    /// The part of it that arrived after the grace (`late`), charged at the account's time.
    pub late_credits: Decimal,
    pub late_events: u64,
}

/// A ledger line as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerLine {
    pub entry_id: i64,
    pub kind: String,
    /// For a correction: the kind of entry it corrects.
    pub corrects: Option<String>,
    /// Usage that arrived after the grace, charged at the account's time.
    pub late: bool,
    pub grant_id: Option<String>,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub overage_after: Decimal,
    pub effective_at: DateTime<Utc>,
    pub event_id: Option<String>,
    pub rule_id: Option<String>,
}

/// What an account's billing page shows: spendable credits by grant, overage, next expiry,
/// cycle, allowance used and days until reset — at a given time.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceView {
    pub account_id: String,
    /// Credits spendable at the view's time (live grants only).
    pub spendable: Decimal,
    pub overage: Decimal,
    /// Grants with credits left and not expired at the view's time, in consumption order.
    pub grants: Vec<Grant>,
    /// The soonest expiry among grants with credits left: (when, credits, grant id).
    pub next_expiry: Option<(DateTime<Utc>, Decimal, String)>,
    pub plan: Option<Plan>,
    pub cycle: Option<Cycle>,
    /// The current cycle's allowance: (granted, used).
    pub allowance: Option<(Decimal, Decimal)>,
    /// Whole days until the next reset (rounded up).
    pub days_until_reset: Option<i64>,
    /// Total purchased: the original credits (`granted`) of every grant active at the view's
    /// time, spent out or not ([`active_grants_total`]). `spendable` is what is left of it.
    pub total_granted: Decimal,
    /// How many grants `total_granted` adds up.
    pub active_grants: usize,
}

/// A grant as [`active_grants_total`] needs it: id, kind, original credits, granted at,
/// expiry.
pub type GrantTerms = (
    String,
    GrantKind,
    Decimal,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// The "total purchased" of an account at `now`: the sum of the original credits of its
/// active grants — granted at or before `now`, not expired at `now` (no expiry, or one
/// after `now`), of any kind, whether credits are left or not — where an allowance counts
/// only for the current cycle (`current_allowance`: other cycles' allowances are over).
/// `grants` may name a grant twice (the book's and the table's copy): it counts once.
/// Returns (total, number of grants counted).
pub fn active_grants_total(
    grants: &[GrantTerms],
    current_allowance: Option<&str>,
    now: DateTime<Utc>,
) -> (Decimal, usize) {
    let mut seen = BTreeSet::new();
    let mut total = Decimal::ZERO;
    for (grant_id, kind, granted, granted_at, expires_at) in grants {
        let active = *granted_at <= now
            && expires_at.is_none_or(|e| e > now)
            && (*kind != GrantKind::Allowance || current_allowance == Some(grant_id.as_str()));
        if active && seen.insert(grant_id.as_str()) {
            total += *granted;
        }
    }
    total.rescale(6);
    (total, seen.len())
}

/// An account's balance by grant.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountBalance {
    pub account_id: String,
    pub spendable: Decimal,
    pub overage: Decimal,
    pub grants: Vec<Grant>,
}

pub struct Store {
    client: Client,
    /// The ledger's statements, prepared on this connection at its first batch or tick.
    stmts: Option<Stmts>,
    schema: String,
    /// Alert thresholds for accounts whose plan does not set them.
    pub alert_defaults: AlertDefaults,
    /// How long after its event time an event may still arrive and be billed in order
    /// (`billing.grace`): the final point is `now - grace`.
    pub grace: chrono::Duration,
}

/// The default `billing.grace`.
pub const DEFAULT_GRACE: chrono::Duration = chrono::Duration::hours(24);

/// How far a final point may lag behind `now - grace` before the scheduler moves it.
pub const FINALIZE_STEP: chrono::Duration = chrono::Duration::hours(1);

/// Connects and sets the search path to Tally's schema. The connection task is spawned.
/// TLS as the connection string's `sslmode` says ([`tls_connector`]).
pub async fn connect(cfg: &PostgresConfig) -> Result<Client, StoreError> {
    let info = conninfo::parse(cfg.url.expose()).map_err(|e| StoreError::Config(e.to_string()))?;
    let pg: tokio_postgres::Config = info.postgres.parse()?;
    let (client, connection) = pg.connect(tls_connector(&info.tls)?).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    client
        .batch_execute(&format!("SET search_path TO {}", cfg.schema))
        .await?;
    Ok(client)
}

/// The TLS connector for libpq's `sslmode` (native-tls, i.e. the system's OpenSSL):
/// `prefer` and `require` encrypt without checking the certificate (as libpq does),
/// `verify-ca` checks the chain against `sslrootcert` (else the system's roots),
/// `verify-full` also the server's name. `sslcert` + `sslkey`: a client certificate.
pub fn tls_connector(tls: &TlsSettings) -> Result<MakeTlsConnector, StoreError> {
    let read = |path: &str, what: &str| {
        std::fs::read(path).map_err(|e| StoreError::Config(format!("{what} {path}: {e}")))
    };
    let mut builder = native_tls::TlsConnector::builder();
    match tls.mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => {
            builder.danger_accept_invalid_certs(true);
        }
        SslMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        SslMode::VerifyFull => {}
    }
    if let Some(path) = tls.root_cert.as_deref().filter(|p| *p != "system") {
        let pem = read(path, "sslrootcert")?;
        let certs = native_tls::Certificate::stack_from_pem(&pem)
            .map_err(|e| StoreError::Config(format!("sslrootcert {path}: {e}")))?;
        if certs.is_empty() {
            return Err(StoreError::Config(format!(
                "sslrootcert {path}: no PEM certificate in it"
            )));
        }
        builder.disable_built_in_roots(true);
        for cert in certs {
            builder.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let identity =
            native_tls::Identity::from_pkcs8(&read(cert, "sslcert")?, &read(key, "sslkey")?)
                .map_err(|e| StoreError::Config(format!("sslcert/sslkey: {e}")))?;
        builder.identity(identity);
    }
    let connector = builder
        .build()
        .map_err(|e| StoreError::Config(format!("TLS: {e}")))?;
    Ok(MakeTlsConnector::new(connector))
}

impl Store {
    pub async fn connect(cfg: &PostgresConfig) -> Result<Store, StoreError> {
        Ok(Store {
            client: connect(cfg).await?,
            stmts: None,
            schema: cfg.schema.clone(),
            alert_defaults: AlertDefaults::default(),
            grace: DEFAULT_GRACE,
        })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    pub async fn migrate(&mut self) -> Result<Vec<i32>, StoreError> {
        Ok(super::migrate::migrate(&mut self.client, &self.schema).await?)
    }

    /// Prepares the ledger's statements on this connection, once.
    async fn prepare(&mut self) -> Result<(), StoreError> {
        if self.stmts.is_none() {
            self.stmts = Some(Stmts::prepare(&self.client).await?);
        }
        Ok(())
    }

    /// Applies a batch atomically. `next_offsets` is stored with the effects, never ahead of
    /// them (a stored offset only ever grows). Each account's events go through its book
    /// ([`Book::apply`]): in event-time order, with corrections for an event out of order.
    ///
    /// Round trips: BEGIN; the claims, the accounts' locks and everything read (pipelined);
    /// the open windows, only when an event arrived out of order; every write and the
    /// offsets (pipelined); COMMIT.
    pub async fn apply_batch(
        &mut self,
        group_id: &str,
        items: &[Item<'_>],
        next_offsets: &Positions,
    ) -> Result<BatchOutcome, StoreError> {
        self.prepare().await?;
        let st = self.stmts.as_ref().expect("prepared above");
        let tx = self.client.transaction().await?;
        let mut outcome = BatchOutcome::default();
        if items.is_empty() {
            store_offsets(&tx, st, group_id, next_offsets).await?;
            tx.commit().await?;
            return Ok(outcome);
        }
        // Every account of the batch is created and locked with the claims, in the same
        // round trip (a batch of duplicates only locks accounts it then leaves unchanged).
        let ids: Vec<&str> = items.iter().map(|i| i.account_id).collect();
        let (fresh, locked, known) = futures::join!(
            claim(&tx, st, items),
            lock_accounts(&tx, st, &ids),
            known_grants(&tx, st, items),
        );
        let fresh = fresh?;
        let mut locked = locked?;
        let known = known?;
        outcome.applied = fresh.len();
        outcome.duplicates = items.len() - fresh.len();
        if !fresh.is_empty() {
            let touched: BTreeSet<&str> = fresh.iter().map(|i| i.account_id).collect();
            locked.retain(&touched);
            outcome.accounts = locked.books.len();
            // Each account's new events (a grant id the account already has is claimed and
            // changes nothing: a purchase delivered twice credits once).
            let mut batches: BTreeMap<&str, (Vec<&Item<'_>>, Vec<Event>)> = BTreeMap::new();
            for item in &fresh {
                if let Action::Grant(g) = &item.action {
                    if known.contains(&(item.account_id.to_owned(), g.grant_id.clone())) {
                        continue;
                    }
                }
                let (items, events) = batches.entry(item.account_id).or_default();
                items.push(item);
                events.push(item.to_event());
            }
            let need: Vec<&str> = batches
                .iter()
                .filter(|(id, (_, events))| {
                    locked
                        .books
                        .get(**id)
                        .is_some_and(|b| b.needs_window(events))
                })
                .map(|(id, _)| *id)
                .collect();
            let mut windows = load_windows(&tx, st, &need, &locked.books).await?;
            let mut rows = EntryRows::default();
            let mut open = OpenRows::default();
            let mut fired = Vec::new();
            let mut replayed: Vec<&str> = Vec::new();
            for (account_id, (items, events)) in &batches {
                let book = locked
                    .books
                    .get_mut(*account_id)
                    .ok_or_else(|| StoreError::Data(format!("account {account_id} not locked")))?;
                let state = locked.alerts.entry((*account_id).to_owned()).or_default();
                let defaults = &self.alert_defaults;
                let applied =
                    book.apply_observed(events, windows.remove(*account_id), |live, at| {
                        fired.extend(alerts::evaluate(live, at, defaults, state));
                    });
                if applied.replayed {
                    outcome.replayed += 1;
                    replayed.push(account_id);
                }
                for line in &applied.lines {
                    let cause = line.cause.map(|i| items[i]);
                    rows.push(account_id, cause, &line.entry);
                }
                for p in applied.placed {
                    open.push(account_id, p)?;
                }
            }
            outcome.entries = rows.len();
            outcome.alerts = fired.len();
            // Every write in one round trip, in this order; the first error (in this order)
            // is the one returned.
            let delete_cycles = async {
                if !replayed.is_empty() {
                    // A replay may drop a cycle an earlier order closed (a late plan moving
                    // the billing day): the revisable cycles are rewritten from the books.
                    tx.execute(st.get(DELETE_REVISABLE_CYCLES), &[&replayed])
                        .await?;
                }
                Ok::<(), StoreError>(())
            };
            let (a, b, c, d) = futures::join!(
                open.insert(&tx, st),
                delete_cycles,
                write_back(&tx, st, &locked, &rows, &fired, &[]),
                store_offsets(&tx, st, group_id, next_offsets),
            );
            a?;
            b?;
            c?;
            d?;
        } else {
            store_offsets(&tx, st, group_id, next_offsets).await?;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// The scheduler's step at `now`: every account whose final point lags (`now - grace`),
    /// whose cycle ended or whose grant expired by then is finalized there ([`Book::finalize`]:
    /// resets and expiries as entries, closed cycles made final), and accounts whose grants
    /// expire within the alert window get their alerts, even without traffic. Returns the
    /// accounts touched.
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        self.prepare().await?;
        let st = self.stmts.as_ref().expect("prepared above");
        let tx = self.client.transaction().await?;
        // Whole microseconds, as PostgreSQL stores times: `at < until` means the same in SQL
        // and in the book.
        let until = (now - self.grace).trunc_subsecs(6);
        let horizon = now + self.alert_defaults.expiring_within;
        let rows = tx
            .query(
                "(SELECT account_id FROM accounts WHERE due_at <= $1 ORDER BY due_at LIMIT 1000)
                 UNION
                 SELECT g.account_id FROM grants g
                 WHERE g.remaining > 0 AND g.expires_at <= $3 AND g.expires_at > $2
                   AND g.kind <> 'allowance' AND NOT EXISTS (
                        SELECT 1 FROM alert_state s WHERE s.account_id = g.account_id
                          AND s.alert_key = 'credits_expiring:' || g.grant_id || ':'
                                            || extract(epoch FROM g.expires_at)::bigint)
                 ORDER BY 1",
                &[&until, &now, &horizon],
            )
            .await?;
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut locked = lock_accounts(&tx, st, &ids).await?;
        let folded = load_folded(&tx, &ids, until).await?;
        let mut rows = EntryRows::default();
        let mut fired = Vec::new();
        let mut finals = Vec::new();
        let locked_ids: Vec<String> = locked.books.keys().cloned().collect();
        for id in &locked_ids {
            let book = locked.books.get_mut(id).expect("locked above");
            let window = folded.get(id).cloned().unwrap_or_default();
            let (lines, closed) = book.finalize(until, window);
            if book.final_at() == Some(until) {
                locked.checkpoints.insert(id.clone());
            }
            for line in &lines {
                rows.push(id, None, &line.entry);
            }
            finals.extend(closed.into_iter().map(|c| (id.clone(), c)));
            let state = locked.alerts.entry(id.clone()).or_default();
            let view = book.view(now);
            fired.extend(alerts::evaluate(&view, now, &self.alert_defaults, state));
        }
        let touched = locked.books.len();
        tx.execute(
            "DELETE FROM open_events WHERE account_id = ANY($1) AND at < $2",
            &[&ids, &until],
        )
        .await?;
        write_back(&tx, st, &locked, &rows, &fired, &finals).await?;
        fail::fail_point!("tick-before-commit", |_| std::process::abort());
        tx.commit().await?;
        if touched > 0 {
            tracing::info!(accounts = touched, entries = rows.len(), alerts = fired.len(), %now, %until, "scheduler tick");
        }
        Ok(touched)
    }

    /// Claims up to `limit` unpublished outbox alerts, oldest first, for `lease`: other relays
    /// skip them until the lease passes. One statement, no transaction left open: the caller
    /// publishes, then calls [`Store::mark_published`]. A relay that dies in between leaves
    /// the lease to expire and the alerts are claimed again (at-least-once, same alert id).
    pub async fn claim_outbox(
        &self,
        limit: i64,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxAlert>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(
                "UPDATE alert_outbox o SET lease_until = now() + $2 * interval '1 millisecond'
                 FROM (SELECT seq FROM alert_outbox
                       WHERE published_at IS NULL AND (lease_until IS NULL OR lease_until < now())
                       ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) c
                 WHERE o.seq = c.seq
                 RETURNING o.seq, o.alert_id, o.kind, o.account_id, o.payload",
                &[&limit, &(lease_ms as f64)],
            )
            .await?;
        let mut alerts: Vec<OutboxAlert> = rows
            .iter()
            .map(|r| OutboxAlert {
                seq: r.get(0),
                alert_id: r.get(1),
                kind: r.get(2),
                account_id: r.get(3),
                payload: r.get(4),
            })
            .collect();
        alerts.sort_by_key(|a| a.seq);
        Ok(alerts)
    }

    /// Marks claimed alerts published (after the broker acknowledged them).
    pub async fn mark_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.client
            .execute(
                "UPDATE alert_outbox SET published_at = now(), lease_until = NULL
                 WHERE seq = ANY($1) AND published_at IS NULL",
                &[&seqs],
            )
            .await?;
        Ok(())
    }

    /// The account's plan and current cycle, if it has a plan.
    pub async fn plan(&self, account_id: &str) -> Result<Option<(Plan, Cycle)>, StoreError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"),
                &[&account_id],
            )
            .await?;
        Ok(row
            .map(|r| account_from_row(&r))
            .transpose()?
            .and_then(|a| a.plan.zip(a.cycle)))
    }

    /// Closed cycles of an account, oldest first.
    pub async fn cycles(&self, account_id: &str) -> Result<Vec<ClosedCycle>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT cycle_start, cycle_end, allowance, used, overage, allowance_expired,
                        overage_billed, late_used
                 FROM cycles WHERE account_id = $1 ORDER BY cycle_start",
                &[&account_id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ClosedCycle {
                start: r.get(0),
                end: r.get(1),
                allowance: r.get(2),
                used: r.get(3),
                overage: r.get(4),
                allowance_expired: r.get(5),
                overage_billed: r.get(6),
                late_used: r.get(7),
            })
            .collect())
    }

    /// Stored next offsets of a group for the given partitions.
    pub async fn load_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Positions, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        let parts: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        let rows = self
            .client
            .query(
                "SELECT o.topic, o.partition, o.next_offset FROM consumer_offsets o
                 JOIN unnest($2::text[], $3::int[]) AS w(topic, partition)
                   ON o.topic = w.topic AND o.partition = w.partition
                 WHERE o.group_id = $1",
                &[&group_id, &topics, &parts],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    (r.get::<_, String>(0), r.get::<_, i32>(1)),
                    r.get::<_, i64>(2),
                )
            })
            .collect())
    }

    /// Purges dedupe claims by event time, with Tally's clock (`now`, the clock admission
    /// uses): the stored horizon moves to `now - window - margin` ([`dedupe_cutoff`]; never
    /// backwards), then claims of events dated before the stored horizon are deleted, in
    /// statements of [`DEDUPE_PURGE_CHUNK_ROWS`] each, at most about `max_rows` per call.
    ///
    /// The horizon is committed first, under the advisory lock every claiming transaction
    /// holds shared ([`claim`]): transactions that read the old horizon have committed when
    /// the deletes start, and every later one refuses events dated before the new horizon.
    /// So no event whose claim is deleted can be claimed again, whatever the window is later.
    pub async fn purge_dedupe(
        &mut self,
        now: DateTime<Utc>,
        window: chrono::TimeDelta,
        max_rows: u64,
    ) -> Result<PurgeOutcome, StoreError> {
        let tx = self.client.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(7421002, hashtext(current_schema()))",
            &[],
        )
        .await?;
        let horizon: DateTime<Utc> = tx
            .query_one(
                "INSERT INTO dedupe_horizon (singleton, purged_before) VALUES (true, $1)
                 ON CONFLICT (singleton) DO UPDATE
                 SET purged_before = GREATEST(dedupe_horizon.purged_before, EXCLUDED.purged_before),
                     updated_at = now()
                 RETURNING purged_before",
                &[&dedupe_cutoff(now, window)],
            )
            .await?
            .get(0);
        tx.commit().await?;
        let mut deleted = 0;
        loop {
            let n = self
                .client
                .execute(
                    "DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
                         SELECT ctid FROM processed_events WHERE event_time < $1 LIMIT $2))",
                    &[&horizon, &DEDUPE_PURGE_CHUNK_ROWS],
                )
                .await?;
            deleted += n;
            if n < DEDUPE_PURGE_CHUNK_ROWS as u64 {
                return Ok(PurgeOutcome {
                    deleted,
                    horizon,
                    done: true,
                });
            }
            if deleted >= max_rows {
                return Ok(PurgeOutcome {
                    deleted,
                    horizon,
                    done: false,
                });
            }
        }
    }

    /// The stored dedupe horizon (None: nothing purged by event time yet).
    pub async fn dedupe_horizon(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self
            .client
            .query_opt("SELECT purged_before FROM dedupe_horizon", &[])
            .await?
            .map(|r| r.get(0)))
    }

    pub async fn balance(&self, account_id: &str) -> Result<Option<AccountBalance>, StoreError> {
        let Some(acct) = self
            .client
            .query_opt(
                "SELECT spendable, overage FROM accounts WHERE account_id = $1",
                &[&account_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let grants = self
            .client
            .query(
                &format!("{GRANT_COLUMNS} WHERE account_id = $1 ORDER BY seq"),
                &[&account_id],
            )
            .await?
            .iter()
            .map(grant_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(AccountBalance {
            account_id: account_id.to_owned(),
            spendable: acct.get(0),
            overage: acct.get(1),
            grants,
        }))
    }

    /// The billing-page view of an account at `now` (None: unknown account): its book
    /// brought to `now` ([`Book::view`]), grants in the same consumption order debits use.
    pub async fn balance_view(
        &self,
        account_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<BalanceView>, StoreError> {
        let Some(book) = self.book(account_id).await? else {
            return Ok(None);
        };
        let account = book.view(now);
        let allowance = account
            .allowance_status()
            .map(|(granted, remaining)| (granted, granted - remaining));
        let grants: Vec<Grant> = account
            .consumption_order(now)
            .into_iter()
            .cloned()
            .collect();
        let mut spendable = account.spendable(now);
        spendable.rescale(6); // as stored, also when no grant is left
        let next_expiry = grants
            .iter()
            .filter_map(|g| {
                g.expires_at
                    .map(|e| (e, g.seq, g.remaining, g.grant_id.clone()))
            })
            .min_by_key(|(e, seq, _, _)| (*e, *seq))
            .map(|(e, _, credits, grant_id)| (e, credits, grant_id));
        let days_until_reset = account.cycle.as_ref().map(|c| {
            let secs = (c.end - now).num_seconds().max(0);
            (secs + 86_399) / 86_400
        });
        let mut overage = account.overage;
        overage.rescale(6);
        // The book's grants first (live terms), then the table's rows: spent-out grants leave
        // the book but keep their row, and still count until they expire.
        let mut terms: Vec<GrantTerms> = account
            .grants
            .iter()
            .map(|g| {
                (
                    g.grant_id.clone(),
                    g.kind,
                    g.granted,
                    g.granted_at,
                    g.expires_at,
                )
            })
            .collect();
        let rows = self
            .client
            .query(
                "SELECT grant_id, kind, granted, granted_at, expires_at FROM grants
                 WHERE account_id = $1 AND granted_at <= $2
                   AND (expires_at IS NULL OR expires_at > $2)",
                &[&account_id, &now],
            )
            .await?;
        for r in &rows {
            let kind: String = r.get(1);
            let kind = GrantKind::parse(&kind)
                .ok_or_else(|| StoreError::Data(format!("grant kind {kind}")))?;
            terms.push((r.get(0), kind, r.get(2), r.get(3), r.get(4)));
        }
        let current_allowance = account
            .cycle
            .as_ref()
            .map(|c| super::buckets::allowance_grant_id(c.start));
        let (total_granted, active_grants) =
            active_grants_total(&terms, current_allowance.as_deref(), now);
        Ok(Some(BalanceView {
            account_id: account.account_id,
            spendable,
            overage,
            grants,
            next_expiry,
            plan: account.plan,
            cycle: account.cycle,
            allowance,
            days_until_reset,
            total_granted,
            active_grants,
        }))
    }

    /// An account's book (None: unknown account).
    pub async fn book(&self, account_id: &str) -> Result<Option<Book>, StoreError> {
        let Some(row) = self
            .client
            .query_opt(
                &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"),
                &[&account_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let book = match book_from_row(&row) {
            Some(book) => book,
            None => {
                // An account written before books: its columns and grant rows.
                let mut account = account_from_row(&row)?;
                account.grants = self
                    .client
                    .query(
                        &format!(
                            "{GRANT_COLUMNS} WHERE account_id = $1 AND remaining > 0 ORDER BY seq"
                        ),
                        &[&account_id],
                    )
                    .await?
                    .iter()
                    .map(grant_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                Book::from_state(account)
            }
        };
        Ok(Some(book))
    }

    /// The last `limit` ledger lines of an account, newest last.
    pub async fn entries(
        &self,
        account_id: &str,
        limit: i64,
    ) -> Result<Vec<LedgerLine>, StoreError> {
        let mut lines = self.entries_before(account_id, None, limit).await?;
        lines.reverse();
        Ok(lines)
    }

    /// A page of an account's ledger, newest first: up to `limit` lines with `entry_id`
    /// below `before` (all when None). The last line's id is the cursor of the next page.
    pub async fn entries_before(
        &self,
        account_id: &str,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<LedgerLine>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT entry_id, kind, grant_id, amount, balance_after, overage_after,
                        effective_at, event_id, rule_id, corrects, late
                 FROM ledger_entries WHERE account_id = $1 AND entry_id < $2
                 ORDER BY entry_id DESC LIMIT $3",
                &[&account_id, &before.unwrap_or(i64::MAX), &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| LedgerLine {
                entry_id: r.get(0),
                kind: r.get(1),
                grant_id: r.get(2),
                amount: r.get(3),
                balance_after: r.get(4),
                overage_after: r.get(5),
                effective_at: r.get(6),
                event_id: r.get(7),
                rule_id: r.get(8),
                corrects: r.get(9),
                late: r.get(10),
            })
            .collect())
    }

    /// The usage charged per account x UTC day of event time x usage kind, over the days
    /// `from..=to` (one account, or all): see [`ChargedDay`]. Entries written before
    /// migration 0006 without a known event time are left out.
    pub async fn charged_by_day(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        account_id: Option<&str>,
    ) -> Result<Vec<ChargedDay>, StoreError> {
        let (start, end) = day_bounds(from, to);
        let rows = self
            .client
            .query(
                "SELECT account_id, (event_time AT TIME ZONE 'UTC')::date AS day, usage_kind,
                        -sum(amount),
                        count(DISTINCT (event_source, event_id)),
                        -COALESCE(sum(amount) FILTER (WHERE late), 0),
                        count(DISTINCT (event_source, event_id)) FILTER (WHERE late)
                 FROM ledger_entries
                 WHERE kind IN ('debit', 'overage') AND usage_kind IS NOT NULL
                   AND event_time >= $1 AND event_time < $2
                   AND ($3::text IS NULL OR account_id = $3)
                 GROUP BY 1, 2, 3
                 ORDER BY 1, 2, 3",
                &[&start, &end, &account_id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let count = |i: usize| {
                    u64::try_from(r.get::<_, i64>(i))
                        .map_err(|_| StoreError::Data("a negative count".into()))
                };
                Ok(ChargedDay {
                    account_id: r.get(0),
                    day: r.get(1),
                    usage_kind: r.get(2),
                    credits: r.get(3),
                    events: count(4)?,
                    late_credits: r.get(5),
                    late_events: count(6)?,
                })
            })
            .collect()
    }

    /// Per account, the sum of the corrections of debits and overage caused by events of the
    /// days `from..=to`: zero for every account when each replay conserved the usage it
    /// re-allocated (see `book::corrections`). Only accounts with a non-zero sum are returned.
    pub async fn uneven_corrections(
        &self,
        from: NaiveDate,
        to: NaiveDate,
        account_id: Option<&str>,
    ) -> Result<Vec<(String, Decimal)>, StoreError> {
        let (start, end) = day_bounds(from, to);
        let rows = self
            .client
            .query(
                "SELECT account_id, -sum(amount) FROM ledger_entries
                 WHERE kind = 'correction' AND corrects IN ('debit', 'overage')
                   AND event_time >= $1 AND event_time < $2
                   AND ($3::text IS NULL OR account_id = $3)
                 GROUP BY 1 HAVING sum(amount) <> 0
                 ORDER BY 1",
                &[&start, &end, &account_id],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// One grant of an account, whatever its remaining credits (None: never granted).
    pub async fn grant(
        &self,
        account_id: &str,
        grant_id: &str,
    ) -> Result<Option<Grant>, StoreError> {
        self.client
            .query_opt(
                &format!("{GRANT_COLUMNS} WHERE account_id = $1 AND grant_id = $2"),
                &[&account_id, &grant_id],
            )
            .await?
            .as_ref()
            .map(grant_from_row)
            .transpose()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The grant columns [`grant_from_row`] reads (a macro: statements are built from it with
/// `concat!`).
macro_rules! grant_columns {
    () => {
        "SELECT account_id, grant_id, kind, priority, granted, remaining, expires_at, granted_at, \
         seq FROM grants"
    };
}

/// The account columns [`account_from_row`] and [`book_from_row`] read (a macro: statements
/// are built from it with `concat!`).
macro_rules! account_columns {
    () => {
        "account_id, overage, overage_policy, top_up_validity_months, last_grant_seq, plan_id, \
         monthly_allowance, billing_day, low_balance_credits, low_balance_percent, \
         allowance_alert_percents, cycle_start, cycle_end, cycle_used, cycle_overage, book, \
         checkpoint"
    };
}

/// The statements a batch (and the scheduler's tick) sends, prepared once per connection:
/// PostgreSQL parses and plans each once, and sending one costs no Parse/Describe round
/// trip, so independent statements go out together (pipelined).
struct Stmts(HashMap<&'static str, Statement>);

impl Stmts {
    async fn prepare(client: &Client) -> Result<Stmts, StoreError> {
        let prepared =
            futures::future::join_all(PREPARED.iter().map(|sql| client.prepare(sql))).await;
        let mut map = HashMap::with_capacity(PREPARED.len());
        for (sql, st) in PREPARED.iter().zip(prepared) {
            map.insert(*sql, st?);
        }
        Ok(Stmts(map))
    }

    fn get(&self, sql: &'static str) -> &Statement {
        self.0
            .get(sql)
            .expect("every statement of PREPARED is prepared")
    }
}

/// Every statement [`Stmts`] prepares.
const PREPARED: [&str; 17] = [
    CLAIM_HORIZON,
    CLAIM,
    CREATE_ACCOUNTS,
    LOCK_ACCOUNTS,
    ALERT_STATES,
    LEGACY_GRANTS,
    KNOWN_GRANTS,
    LOAD_WINDOWS,
    INSERT_OPEN_EVENTS,
    DELETE_REVISABLE_CYCLES,
    WRITE_GRANTS,
    COPY_ENTRIES,
    WRITE_ACCOUNTS,
    WRITE_CYCLES,
    WRITE_ALERT_STATES,
    WRITE_OUTBOX,
    STORE_OFFSETS,
];

const CLAIM_HORIZON: &str = "SELECT dedupe_claim_horizon()";

const CLAIM: &str =
    "INSERT INTO processed_events (scope, event_source, event_id, account_id, event_time)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     ORDER BY 1, 2, 3
     ON CONFLICT DO NOTHING
     RETURNING scope, event_source, event_id";

const CREATE_ACCOUNTS: &str =
    "INSERT INTO accounts (account_id) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING";

const LOCK_ACCOUNTS: &str = concat!(
    "SELECT ",
    account_columns!(),
    " FROM accounts WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE"
);

const ALERT_STATES: &str =
    "SELECT account_id, alert_key, fired_count, active FROM alert_state WHERE account_id = ANY($1)";

const LEGACY_GRANTS: &str = concat!(
    grant_columns!(),
    " WHERE account_id = ANY($1) AND remaining > 0 ORDER BY account_id, seq"
);

const KNOWN_GRANTS: &str = "SELECT g.account_id, g.grant_id FROM grants g
     JOIN unnest($1::text[], $2::text[]) AS w(account_id, grant_id)
       ON g.account_id = w.account_id AND g.grant_id = w.grant_id";

const LOAD_WINDOWS: &str =
    "SELECT account_id, at, at_nanos, event_source, event_id, late, credits, placed \
     FROM open_events WHERE account_id = ANY($1)";

const INSERT_OPEN_EVENTS: &str = "INSERT INTO open_events (account_id, at, at_nanos, event_source, event_id, late, credits, placed)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::text[], $5::text[],
                          $6::bool[], $7::numeric[], $8::jsonb[])";

const DELETE_REVISABLE_CYCLES: &str = "DELETE FROM cycles WHERE account_id = ANY($1) AND NOT final";

const WRITE_GRANTS: &str = "INSERT INTO grants (account_id, grant_id, kind, priority, granted, remaining, expires_at, granted_at, seq)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::numeric[], $6::numeric[],
                          $7::timestamptz[], $8::timestamptz[], $9::bigint[])
     ON CONFLICT (account_id, grant_id) DO UPDATE
       SET remaining = EXCLUDED.remaining, expires_at = EXCLUDED.expires_at,
           granted = EXCLUDED.granted, granted_at = EXCLUDED.granted_at, seq = EXCLUDED.seq";

const COPY_ENTRIES: &str = "COPY ledger_entries (account_id, kind, corrects, grant_id, amount,
         balance_after, overage_after, effective_at, late, event_source, event_id, usage_kind,
         price_version, rule_id, event_time)
     FROM STDIN (FORMAT binary)";

const WRITE_ACCOUNTS: &str = "UPDATE accounts a SET spendable = u.spendable, overage = u.overage,
        overage_policy = u.policy, top_up_validity_months = u.validity,
        last_grant_seq = u.seq, plan_id = u.plan_id, monthly_allowance = u.allowance,
        billing_day = u.billing_day, low_balance_credits = u.low_credits,
        low_balance_percent = u.low_percent, allowance_alert_percents = u.percents::int[],
        cycle_start = u.cycle_start, cycle_end = u.cycle_end, cycle_used = u.cycle_used,
        cycle_overage = u.cycle_overage, book = u.book,
        checkpoint = COALESCE(u.checkpoint, a.checkpoint), final_at = u.final_at,
        due_at = u.due_at, updated_at = $21
     FROM unnest($1::text[], $2::numeric[], $3::numeric[], $4::text[], $5::int[], $6::bigint[],
                 $7::text[], $8::numeric[], $9::int[], $10::numeric[], $11::numeric[], $12::text[],
                 $13::timestamptz[], $14::timestamptz[], $15::numeric[], $16::numeric[],
                 $17::json[], $18::json[], $19::timestamptz[], $20::timestamptz[])
          AS u(account_id, spendable, overage, policy, validity, seq, plan_id, allowance,
               billing_day, low_credits, low_percent, percents, cycle_start, cycle_end,
               cycle_used, cycle_overage, book, checkpoint, final_at, due_at)
     WHERE a.account_id = u.account_id";

const WRITE_CYCLES: &str =
    "INSERT INTO cycles (account_id, cycle_start, cycle_end, allowance, used, overage,
                         allowance_expired, overage_billed, late_used, final)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::numeric[],
                          $5::numeric[], $6::numeric[], $7::numeric[], $8::numeric[],
                          $9::numeric[], $10::bool[])
     ON CONFLICT (account_id, cycle_start) DO UPDATE
       SET cycle_end = EXCLUDED.cycle_end, allowance = EXCLUDED.allowance,
           used = EXCLUDED.used, overage = EXCLUDED.overage,
           allowance_expired = EXCLUDED.allowance_expired,
           overage_billed = EXCLUDED.overage_billed, late_used = EXCLUDED.late_used,
           final = EXCLUDED.final, closed_at = now()
       WHERE NOT cycles.final";

const WRITE_ALERT_STATES: &str =
    "INSERT INTO alert_state (account_id, alert_key, fired_count, active)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bool[])
     ON CONFLICT (account_id, alert_key) DO UPDATE
       SET fired_count = EXCLUDED.fired_count, active = EXCLUDED.active, updated_at = now()";

const WRITE_OUTBOX: &str = "INSERT INTO alert_outbox (alert_id, kind, account_id, payload)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
     ON CONFLICT (alert_id) DO NOTHING";

const STORE_OFFSETS: &str = "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
     SELECT $1, * FROM unnest($2::text[], $3::int[], $4::bigint[]) ORDER BY 1, 2
     ON CONFLICT (group_id, topic, partition) DO UPDATE
       SET next_offset = GREATEST(consumer_offsets.next_offset, EXCLUDED.next_offset),
           updated_at = now()";

/// Claims the identities, each in its scope ([`Action::scope`]), in (scope, source, id)
/// order (a fixed lock order across instances) and returns the items claimed now, first
/// occurrence only, in batch order.
///
/// First reads the dedupe horizon under the shared purge lock ([`Store::purge_dedupe`]): an
/// item dated before it is refused ([`StoreError::BeforeHorizon`], the input's fault), as
/// its claim may have been purged.
async fn claim<'i, 'a>(
    tx: &Transaction<'_>,
    st: &Stmts,
    items: &'i [Item<'a>],
) -> Result<Vec<&'i Item<'a>>, StoreError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let scopes: Vec<&str> = items.iter().map(|i| i.action.scope().as_str()).collect();
    let sources: Vec<&str> = items.iter().map(|i| i.source).collect();
    let ids: Vec<&str> = items.iter().map(|i| i.id).collect();
    let accounts: Vec<&str> = items.iter().map(|i| i.account_id).collect();
    let times: Vec<DateTime<Utc>> = items.iter().map(|i| i.time).collect();
    // Both sent at once: the horizon is read (under the shared purge lock) before the
    // claims are inserted; a batch with an item before it is rolled back.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&scopes, &sources, &ids, &accounts, &times];
    let (horizon, rows) = futures::join!(
        tx.query_one(st.get(CLAIM_HORIZON), &[]),
        tx.query(st.get(CLAIM), &params),
    );
    let horizon: Option<DateTime<Utc>> = horizon?.get(0);
    if let Some(item) = before_horizon(items, horizon) {
        return Err(StoreError::BeforeHorizon {
            event_source: item.source.to_owned(),
            id: item.id.to_owned(),
            time: item.time,
            horizon: horizon.expect("an item is before it"),
        });
    }
    let rows = rows?;
    let mut claimed: HashSet<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(items
        .iter()
        .filter(|i| {
            claimed.remove(&(
                i.action.scope().as_str().to_owned(),
                i.source.to_owned(),
                i.id.to_owned(),
            ))
        })
        .collect())
}

/// The first item dated before the dedupe horizon, if any.
fn before_horizon<'i, 'a>(
    items: &'i [Item<'a>],
    horizon: Option<DateTime<Utc>>,
) -> Option<&'i Item<'a>> {
    let horizon = horizon?;
    items.iter().find(|i| i.time < horizon)
}

const GRANT_COLUMNS: &str = grant_columns!();

fn grant_from_row(r: &tokio_postgres::Row) -> Result<Grant, StoreError> {
    let kind: String = r.get(2);
    Ok(Grant {
        grant_id: r.get(1),
        kind: GrantKind::parse(&kind)
            .ok_or_else(|| StoreError::Data(format!("grant kind {kind}")))?,
        priority: r.get(3),
        granted: r.get(4),
        remaining: r.get(5),
        expires_at: r.get(6),
        granted_at: r.get(7),
        seq: r.get(8),
        // A row from before books: what left it counts as debited.
        debited: r.get::<_, Decimal>(4) - r.get::<_, Decimal>(5),
        settled: Decimal::ZERO,
        expired: Decimal::ZERO,
    })
}

const ACCOUNT_COLUMNS: &str = account_columns!();

/// The index of `book` in [`ACCOUNT_COLUMNS`] (`checkpoint` follows it).
const BOOK_COLUMN: usize = 15;

/// The book of an account row, when it has one (accounts written before books have none).
fn book_from_row(r: &tokio_postgres::Row) -> Option<Book> {
    match (
        r.get::<_, Option<Json<LivePart>>>(BOOK_COLUMN),
        r.get::<_, Option<Json<Account>>>(BOOK_COLUMN + 1),
    ) {
        (Some(Json(part)), Some(Json(checkpoint))) => Some(Book::from_parts(checkpoint, part)),
        _ => None,
    }
}

fn account_from_row(r: &tokio_postgres::Row) -> Result<Account, StoreError> {
    let policy: String = r.get(2);
    let mut a = Account::new(r.get::<_, String>(0));
    a.overage = r.get(1);
    a.policy = match policy.as_str() {
        "bill_overage" => OveragePolicy::BillOverage,
        "settle_from_next_grant" => OveragePolicy::SettleFromNextGrant,
        other => return Err(StoreError::Data(format!("overage policy {other}"))),
    };
    a.top_up_validity_months = r.get::<_, i32>(3) as u32;
    a.last_seq = r.get(4);
    if let Some(plan_id) = r.get::<_, Option<String>>(5) {
        a.plan = Some(Plan {
            plan_id,
            monthly_allowance: r.get::<_, Option<Decimal>>(6).unwrap_or_default(),
            billing_day: r.get::<_, Option<i32>>(7).unwrap_or(1) as u8,
            low_balance_credits: r.get(8),
            low_balance_percent: r.get(9),
            allowance_alert_percents: r
                .get::<_, Option<Vec<i32>>>(10)
                .unwrap_or_default()
                .into_iter()
                .map(|p| p as u32)
                .collect(),
            // Not in the legacy columns: only books carry them.
            recharge_threshold_credits: None,
            recharge_credits: None,
        });
    }
    if let (Some(start), Some(end)) = (r.get(11), r.get(12)) {
        a.cycle = Some(Cycle {
            start,
            end,
            used: r.get(13),
            overage: r.get(14),
            late_used: Decimal::ZERO,
            billing_day: a.plan.as_ref().map_or(1, |p| p.billing_day),
        });
    }
    a.overage_incurred = a.overage;
    Ok(a)
}

/// Accounts locked for one transaction: their books, the grants as loaded (only changed
/// grants are written back) and their alert states.
struct Locked {
    books: BTreeMap<String, Book>,
    loaded: BTreeMap<String, Vec<Grant>>,
    alerts: BTreeMap<String, AlertState>,
    /// Accounts whose checkpoint is written back (it changes only when the final point
    /// moves, or when the book is new).
    checkpoints: std::collections::BTreeSet<String>,
}

impl Locked {
    /// Keeps the accounts in `ids` only.
    fn retain(&mut self, ids: &BTreeSet<&str>) {
        self.books.retain(|id, _| ids.contains(id.as_str()));
        self.loaded.retain(|id, _| ids.contains(id.as_str()));
        self.alerts.retain(|id, _| ids.contains(id.as_str()));
        self.checkpoints.retain(|id| ids.contains(id.as_str()));
    }
}

/// Creates missing accounts, locks them in account_id order (so instances never deadlock),
/// and loads their books and alert state (the three statements in one round trip).
async fn lock_accounts(
    tx: &Transaction<'_>,
    st: &Stmts,
    ids: &[&str],
) -> Result<Locked, StoreError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    let (created, rows, alert_rows) = futures::join!(
        tx.execute(st.get(CREATE_ACCOUNTS), &params),
        tx.query(st.get(LOCK_ACCOUNTS), &params),
        tx.query(st.get(ALERT_STATES), &params),
    );
    created?;
    let rows = rows?;
    let alert_rows = alert_rows?;
    let mut books = BTreeMap::new();
    let mut legacy = Vec::new();
    for r in &rows {
        let id: String = r.get(0);
        match book_from_row(r) {
            Some(book) => {
                books.insert(id, book);
            }
            None => {
                legacy.push(id.clone());
                books.insert(id, Book::from_state(account_from_row(r)?));
            }
        }
    }
    if !legacy.is_empty() {
        // Accounts written before books: their live grants become the book's.
        let grants = tx.query(st.get(LEGACY_GRANTS), &[&legacy]).await?;
        for r in &grants {
            let id: String = r.get(0);
            if let Some(b) = books.get_mut(&id) {
                let g = grant_from_row(r)?;
                b.checkpoint.grants.push(g.clone());
                b.live.grants.push(g);
            }
        }
    }
    let loaded = books
        .iter()
        .map(|(id, b)| (id.clone(), b.live.grants.clone()))
        .collect();
    // New accounts, and those written before books, get their checkpoint stored.
    let checkpoints = legacy.into_iter().collect();
    let mut alerts: BTreeMap<String, AlertState> = BTreeMap::new();
    for r in &alert_rows {
        alerts.entry(r.get(0)).or_default().insert(
            r.get(1),
            KeyState {
                fired_count: r.get(2),
                active: r.get(3),
                dirty: false,
            },
        );
    }
    Ok(Locked {
        books,
        loaded,
        alerts,
        checkpoints,
    })
}

/// The open windows of the given accounts: every event placed at or after the final point.
async fn load_windows(
    tx: &Transaction<'_>,
    st: &Stmts,
    ids: &[&str],
    books: &BTreeMap<String, Book>,
) -> Result<BTreeMap<String, Vec<Placed>>, StoreError> {
    let mut windows: BTreeMap<String, Vec<Placed>> = ids
        .iter()
        .map(|id| ((*id).to_owned(), Vec::new()))
        .collect();
    if ids.is_empty() {
        return Ok(windows);
    }
    let rows = tx.query(st.get(LOAD_WINDOWS), &[&ids]).await?;
    for r in &rows {
        let id: String = r.get(0);
        // The placed event as the book saw it (`at` to the nanosecond; the column is
        // PostgreSQL's microseconds, for filtering).
        let placed = placed_from_row(r);
        let final_at = books.get(&id).and_then(Book::final_at);
        if let Some(f) = final_at.filter(|f| placed.at < *f) {
            return Err(StoreError::Data(format!(
                "account {id}: an open-window event at {} is before the final point {f}",
                placed.at
            )));
        }
        windows.entry(id).or_default().push(placed);
    }
    Ok(windows)
}

/// The open-window events of the given accounts placed before `until` (to fold).
async fn load_folded(
    tx: &Transaction<'_>,
    ids: &[&str],
    until: DateTime<Utc>,
) -> Result<BTreeMap<String, Vec<Placed>>, StoreError> {
    let rows = tx
        .query(
            &format!(
                "SELECT {OPEN_COLUMNS} FROM open_events WHERE account_id = ANY($1) AND at < $2"
            ),
            &[&ids, &until],
        )
        .await?;
    let mut folded: BTreeMap<String, Vec<Placed>> = BTreeMap::new();
    for r in &rows {
        folded.entry(r.get(0)).or_default().push(placed_from_row(r));
    }
    Ok(folded)
}

/// Open-window rows, gathered for one multi-row insert: a usage debit placed at its own time
/// as columns (its credits, and the nanoseconds below the `at` column's microsecond), any
/// other event as the JSON of its placement (`placed`).
#[derive(Default)]
struct OpenRows<'a> {
    account_id: Vec<&'a str>,
    at: Vec<DateTime<Utc>>,
    at_nanos: Vec<i32>,
    source: Vec<String>,
    id: Vec<String>,
    late: Vec<bool>,
    credits: Vec<Option<Decimal>>,
    placed: Vec<Option<Json<Placed>>>,
}

impl<'a> OpenRows<'a> {
    fn push(&mut self, account_id: &'a str, p: Placed) -> Result<(), StoreError> {
        let micros = p.at.trunc_subsecs(6);
        let nanos = (p.at - micros)
            .num_nanoseconds()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| StoreError::Data(format!("placement {} in nanoseconds", p.at)))?;
        self.account_id.push(account_id);
        self.at.push(micros);
        self.at_nanos.push(nanos);
        self.late.push(p.late);
        self.source.push(p.event.source.clone());
        self.id.push(p.event.id.clone());
        match p.event.action {
            book::Action::Debit { credits } if !p.late && p.event.time == p.at => {
                self.credits.push(Some(credits));
                self.placed.push(None);
            }
            _ => {
                self.credits.push(None);
                self.placed.push(Some(Json(p)));
            }
        }
        Ok(())
    }

    async fn insert(&self, tx: &Transaction<'_>, st: &Stmts) -> Result<(), StoreError> {
        if self.account_id.is_empty() {
            return Ok(());
        }
        tx.execute(
            st.get(INSERT_OPEN_EVENTS),
            &[
                &self.account_id,
                &self.at,
                &self.at_nanos,
                &self.source,
                &self.id,
                &self.late,
                &self.credits,
                &self.placed,
            ],
        )
        .await?;
        Ok(())
    }
}

/// The columns [`placed_from_row`] reads, in its order.
const OPEN_COLUMNS: &str =
    "account_id, at, at_nanos, event_source, event_id, late, credits, placed";

/// An open-window event from its row ([`OPEN_COLUMNS`]): the JSON of its placement, or a
/// usage debit at its own time from its columns.
fn placed_from_row(r: &tokio_postgres::Row) -> Placed {
    if let Some(Json(placed)) = r.get::<_, Option<Json<Placed>>>(7) {
        return placed;
    }
    let at =
        r.get::<_, DateTime<Utc>>(1) + chrono::Duration::nanoseconds(i64::from(r.get::<_, i32>(2)));
    Placed {
        at,
        late: r.get(5),
        event: Event {
            time: at,
            source: r.get(3),
            id: r.get(4),
            action: book::Action::Debit { credits: r.get(6) },
        },
    }
}

/// Writes everything a transaction changed: grants, entries, accounts and their books,
/// closed cycles (revisable ones and those made `finals`), alert state and the outbox.
async fn write_back(
    tx: &Transaction<'_>,
    st: &Stmts,
    locked: &Locked,
    rows: &EntryRows<'_>,
    fired: &[Alert],
    finals: &[(String, ClosedCycle)],
) -> Result<(), StoreError> {
    // Sent together, executed in this order; the first error in this order is returned.
    let (a, b, c, d, e) = futures::join!(
        write_grants(tx, st, locked),
        rows.insert(tx, st),
        write_accounts(tx, st, &locked.books, &locked.checkpoints),
        write_cycles(tx, st, &locked.books, finals),
        write_alerts(tx, st, &locked.alerts, fired),
    );
    a?;
    b?;
    c?;
    d?;
    e
}

/// Closed cycles: a final one never changes again; one not yet final is revised.
async fn write_cycles(
    tx: &Transaction<'_>,
    st: &Stmts,
    books: &BTreeMap<String, Book>,
    finals: &[(String, ClosedCycle)],
) -> Result<(), StoreError> {
    let mut id = Vec::new();
    let (mut start, mut end) = (Vec::new(), Vec::new());
    let (mut allowance, mut used, mut overage, mut expired) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut billed, mut late, mut is_final) = (Vec::new(), Vec::new(), Vec::new());
    let open = books
        .iter()
        .flat_map(|(a, b)| b.live.closed.iter().map(move |c| (a.as_str(), c, false)));
    let done = finals.iter().map(|(a, c)| (a.as_str(), c, true));
    for (account_id, c, f) in open.chain(done) {
        id.push(account_id);
        start.push(c.start);
        end.push(c.end);
        allowance.push(c.allowance);
        used.push(c.used);
        overage.push(c.overage);
        expired.push(c.allowance_expired);
        billed.push(c.overage_billed);
        late.push(c.late_used);
        is_final.push(f);
    }
    if id.is_empty() {
        return Ok(());
    }
    tx.execute(
        st.get(WRITE_CYCLES),
        &[
            &id, &start, &end, &allowance, &used, &overage, &expired, &billed, &late, &is_final,
        ],
    )
    .await?;
    Ok(())
}

async fn write_alerts(
    tx: &Transaction<'_>,
    st: &Stmts,
    states: &BTreeMap<String, AlertState>,
    fired: &[Alert],
) -> Result<(), StoreError> {
    let mut id = Vec::new();
    let mut key = Vec::new();
    let mut count = Vec::new();
    let mut active = Vec::new();
    for (account_id, state) in states {
        for (k, s) in state.iter().filter(|(_, s)| s.dirty) {
            id.push(account_id.as_str());
            key.push(k.as_str());
            count.push(s.fired_count);
            active.push(s.active);
        }
    }
    if !id.is_empty() {
        tx.execute(st.get(WRITE_ALERT_STATES), &[&id, &key, &count, &active])
            .await?;
    }
    if !fired.is_empty() {
        let alert_id: Vec<&str> = fired.iter().map(|a| a.alert_id.as_str()).collect();
        let kind: Vec<&str> = fired.iter().map(|a| a.kind.as_str()).collect();
        let account: Vec<&str> = fired.iter().map(|a| a.account_id.as_str()).collect();
        let payload: Vec<String> = fired
            .iter()
            .map(|a| a.to_cloud_event().to_string())
            .collect();
        tx.execute(
            st.get(WRITE_OUTBOX),
            &[&alert_id, &kind, &account, &payload],
        )
        .await?;
    }
    Ok(())
}

/// An alert waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxAlert {
    pub seq: i64,
    pub alert_id: String,
    pub kind: String,
    pub account_id: String,
    pub payload: String,
}

/// Grant ids of the batch that already exist (a purchase delivered twice credits once).
async fn known_grants(
    tx: &Transaction<'_>,
    st: &Stmts,
    items: &[Item<'_>],
) -> Result<HashSet<(String, String)>, StoreError> {
    let (accts, gids): (Vec<&str>, Vec<&str>) = items
        .iter()
        .filter_map(|i| match &i.action {
            Action::Grant(g) => Some((i.account_id, g.grant_id.as_str())),
            _ => None,
        })
        .unzip();
    if accts.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = tx.query(st.get(KNOWN_GRANTS), &[&accts, &gids]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The instants bounding the UTC days `from..=to`: [from 00:00, to + 1 day 00:00).
fn day_bounds(from: NaiveDate, to: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let midnight = |d: NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc();
    (midnight(from), midnight(to.succ_opt().unwrap_or(to)))
}

/// Ledger entry columns, gathered for one multi-row insert.
#[derive(Default)]
struct EntryRows<'a> {
    account_id: Vec<&'a str>,
    kind: Vec<&'static str>,
    corrects: Vec<Option<&'static str>>,
    grant_id: Vec<Option<String>>,
    amount: Vec<Decimal>,
    balance_after: Vec<Decimal>,
    overage_after: Vec<Decimal>,
    effective_at: Vec<DateTime<Utc>>,
    late: Vec<bool>,
    event_time: Vec<Option<DateTime<Utc>>>,
    event_source: Vec<Option<&'a str>>,
    event_id: Vec<Option<&'a str>>,
    usage_kind: Vec<Option<&'a str>>,
    price_version: Vec<Option<&'a str>>,
    rule_id: Vec<Option<&'a str>>,
}

impl<'a> EntryRows<'a> {
    fn len(&self) -> usize {
        self.account_id.len()
    }

    /// `cause`: the event that led to the entry, if any (the scheduler's have none).
    fn push(&mut self, account_id: &'a str, cause: Option<&Item<'a>>, e: &Entry) {
        use super::buckets::EntryKind;
        // Expiries and resets happen because time passed, not because of the event.
        let caused = !matches!(e.kind, EntryKind::Expiry | EntryKind::Reset);
        let item = cause.filter(|_| caused);
        let debit = item.and_then(|i| match &i.action {
            Action::Debit(d) if matches!(e.kind, EntryKind::Debit | EntryKind::Overage) => Some(d),
            _ => None,
        });
        self.account_id.push(account_id);
        self.kind.push(e.kind.as_str());
        self.corrects.push(e.corrects.map(EntryKind::as_str));
        self.grant_id.push(e.grant_id.clone());
        self.amount.push(e.amount);
        self.balance_after.push(e.balance_after);
        self.overage_after.push(e.overage_after);
        self.effective_at.push(e.effective_at);
        self.late.push(e.late);
        self.event_time.push(item.map(|i| i.time));
        self.event_source.push(item.map(|i| i.source));
        self.event_id.push(item.map(|i| i.id));
        self.usage_kind.push(debit.map(|d| d.usage_kind));
        self.price_version.push(debit.map(|d| d.price_version));
        self.rule_id.push(debit.map(|d| d.rule_id));
    }

    /// The rows by binary COPY: no statement text or arrays to parse, rows inserted in
    /// groups.
    async fn insert(&self, tx: &Transaction<'_>, st: &Stmts) -> Result<(), StoreError> {
        use tokio_postgres::types::Type;
        if self.len() == 0 {
            return Ok(());
        }
        let sink = tx.copy_in(st.get(COPY_ENTRIES)).await?;
        let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
            sink,
            &[
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::NUMERIC,
                Type::NUMERIC,
                Type::NUMERIC,
                Type::TIMESTAMPTZ,
                Type::BOOL,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TIMESTAMPTZ,
            ],
        );
        futures::pin_mut!(writer);
        for i in 0..self.len() {
            writer
                .as_mut()
                .write(&[
                    &self.account_id[i],
                    &self.kind[i],
                    &self.corrects[i],
                    &self.grant_id[i],
                    &self.amount[i],
                    &self.balance_after[i],
                    &self.overage_after[i],
                    &self.effective_at[i],
                    &self.late[i],
                    &self.event_source[i],
                    &self.event_id[i],
                    &self.usage_kind[i],
                    &self.price_version[i],
                    &self.rule_id[i],
                    &self.event_time[i],
                ])
                .await?;
        }
        writer.finish().await?;
        Ok(())
    }
}

/// Writes the grants that differ from what was loaded (new, debited, renewed, corrected).
async fn write_grants(tx: &Transaction<'_>, st: &Stmts, locked: &Locked) -> Result<(), StoreError> {
    // A grant with credits that a replay no longer has (a late plan cut the cycles
    // differently: another cycle's allowance) keeps its row, with nothing left.
    let gone: BTreeMap<&str, Vec<Grant>> = locked
        .books
        .iter()
        .map(|(id, b)| {
            let gone = locked
                .loaded
                .get(id)
                .into_iter()
                .flatten()
                .filter(|g| g.remaining > Decimal::ZERO)
                .filter(|g| !b.live.grants.iter().any(|l| l.grant_id == g.grant_id))
                .map(|g| Grant {
                    remaining: Decimal::ZERO,
                    ..g.clone()
                })
                .collect();
            (id.as_str(), gone)
        })
        .collect();
    let mut account_id = Vec::new();
    let mut grant_id = Vec::new();
    let mut kind = Vec::new();
    let mut priority = Vec::new();
    let mut granted = Vec::new();
    let mut remaining = Vec::new();
    let mut expires_at = Vec::new();
    let mut granted_at = Vec::new();
    let mut seq = Vec::new();
    for (id, b) in &locked.books {
        let before = locked.loaded.get(id);
        let gone = gone.get(id.as_str()).into_iter().flatten();
        for g in b.live.grants.iter().chain(gone) {
            if before.is_some_and(|l| l.contains(g)) {
                continue;
            }
            account_id.push(id.as_str());
            grant_id.push(g.grant_id.as_str());
            kind.push(g.kind.as_str());
            priority.push(g.priority);
            granted.push(g.granted);
            remaining.push(g.remaining);
            expires_at.push(g.expires_at);
            granted_at.push(g.granted_at);
            seq.push(g.seq);
        }
    }
    if account_id.is_empty() {
        return Ok(());
    }
    tx.execute(
        st.get(WRITE_GRANTS),
        &[
            &account_id,
            &grant_id,
            &kind,
            &priority,
            &granted,
            &remaining,
            &expires_at,
            &granted_at,
            &seq,
        ],
    )
    .await?;
    Ok(())
}

/// When (in event time) the scheduler must next visit a book: its final point lags by a
/// step, its cycle ends, or a live grant expires. The scheduler visits it once `now - grace`
/// reaches that time.
fn due_at(book: &Book) -> Option<DateTime<Utc>> {
    let live = &book.live;
    let step = book.next_final(FINALIZE_STEP);
    let cycle = live.cycle.as_ref().map(|c| c.end);
    let expiry = live
        .grants
        .iter()
        .filter(|g| g.remaining > Decimal::ZERO)
        .filter_map(|g| g.expires_at)
        .min();
    [step, cycle, expiry].into_iter().flatten().min()
}

async fn write_accounts(
    tx: &Transaction<'_>,
    st: &Stmts,
    books: &BTreeMap<String, Book>,
    checkpoints: &std::collections::BTreeSet<String>,
) -> Result<(), StoreError> {
    let ids: Vec<&str> = books.keys().map(String::as_str).collect();
    let now = Utc::now();
    let a: Vec<&Account> = books.values().map(|b| &b.live).collect();
    // The stored spendable balance counts grants not yet expired by an entry.
    let spendable: Vec<Decimal> = a.iter().map(|a| a.balance()).collect();
    let overage: Vec<Decimal> = a.iter().map(|a| a.overage).collect();
    let policy: Vec<&str> = a
        .iter()
        .map(|a| match a.policy {
            OveragePolicy::BillOverage => "bill_overage",
            OveragePolicy::SettleFromNextGrant => "settle_from_next_grant",
        })
        .collect();
    let validity: Vec<i32> = a.iter().map(|a| a.top_up_validity_months as i32).collect();
    let seq: Vec<i64> = a.iter().map(|a| a.last_seq).collect();
    fn plan(a: &Account) -> Option<&Plan> {
        a.plan.as_ref()
    }
    let plan_id: Vec<Option<&str>> = a
        .iter()
        .map(|a| plan(a).map(|p| p.plan_id.as_str()))
        .collect();
    let allowance: Vec<Option<Decimal>> = a
        .iter()
        .map(|a| plan(a).map(|p| p.monthly_allowance))
        .collect();
    let billing_day: Vec<Option<i32>> = a
        .iter()
        .map(|a| plan(a).map(|p| i32::from(p.billing_day)))
        .collect();
    let low_credits: Vec<Option<Decimal>> = a
        .iter()
        .map(|a| plan(a).and_then(|p| p.low_balance_credits))
        .collect();
    let low_percent: Vec<Option<Decimal>> = a
        .iter()
        .map(|a| plan(a).and_then(|p| p.low_balance_percent))
        .collect();
    // Arrays of arrays cannot be unnested into rows; percents travel as text ("{50,80,100}").
    let percents: Vec<Option<String>> = a
        .iter()
        .map(|a| {
            plan(a).map(|p| {
                let v: Vec<String> = p
                    .allowance_alert_percents
                    .iter()
                    .map(u32::to_string)
                    .collect();
                format!("{{{}}}", v.join(","))
            })
        })
        .collect();
    let cycle_start: Vec<Option<DateTime<Utc>>> = a
        .iter()
        .map(|a| a.cycle.as_ref().map(|c| c.start))
        .collect();
    let cycle_end: Vec<Option<DateTime<Utc>>> =
        a.iter().map(|a| a.cycle.as_ref().map(|c| c.end)).collect();
    let cycle_used: Vec<Decimal> = a
        .iter()
        .map(|a| a.cycle.as_ref().map_or(Decimal::ZERO, |c| c.used))
        .collect();
    let cycle_overage: Vec<Decimal> = a
        .iter()
        .map(|a| a.cycle.as_ref().map_or(Decimal::ZERO, |c| c.overage))
        .collect();
    // Serialized straight into the statement's parameters (no JSON value in between).
    let book: Vec<Json<book::LivePartRef<'_>>> =
        books.values().map(|b| Json(b.live_part())).collect();
    let checkpoint: Vec<Option<Json<&Account>>> = books
        .iter()
        .map(|(id, b)| checkpoints.contains(id).then_some(Json(&b.checkpoint)))
        .collect();
    let final_at: Vec<Option<DateTime<Utc>>> = books.values().map(Book::final_at).collect();
    let due: Vec<Option<DateTime<Utc>>> = books.values().map(due_at).collect();
    tx.execute(
        st.get(WRITE_ACCOUNTS),
        &[
            &ids,
            &spendable,
            &overage,
            &policy,
            &validity,
            &seq,
            &plan_id,
            &allowance,
            &billing_day,
            &low_credits,
            &low_percent,
            &percents,
            &cycle_start,
            &cycle_end,
            &cycle_used,
            &cycle_overage,
            &book,
            &checkpoint,
            &final_at,
            &due,
            &now,
        ],
    )
    .await?;
    Ok(())
}

async fn store_offsets(
    tx: &Transaction<'_>,
    st: &Stmts,
    group_id: &str,
    next_offsets: &Positions,
) -> Result<(), StoreError> {
    if next_offsets.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = next_offsets.keys().map(|(t, _)| t.as_str()).collect();
    let parts: Vec<i32> = next_offsets.keys().map(|(_, p)| *p).collect();
    let offsets: Vec<i64> = next_offsets.values().copied().collect();
    tx.execute(
        st.get(STORE_OFFSETS),
        &[&group_id, &topics, &parts, &offsets],
    )
    .await?;
    Ok(())
}

/// Loads the ledger group's positions from PostgreSQL (own connection per call: it also runs
/// inside the rebalance callback).
pub struct PgOffsetStore {
    pub config: PostgresConfig,
    pub group_id: String,
}

impl OffsetStore for PgOffsetStore {
    fn load(
        &self,
        partitions: Vec<TopicPartition>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Positions, LoadError>> + Send>>
    {
        let config = self.config.clone();
        let group = self.group_id.clone();
        Box::pin(async move {
            let store = Store::connect(&config).await.map_err(LoadError::new)?;
            store
                .load_offsets(&group, &partitions)
                .await
                .map_err(LoadError::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_purchased_counts_the_original_credits_of_active_grants_once() {
        let t = |d: u32| -> DateTime<Utc> { format!("2027-01-{d:02}T00:00:00Z").parse().unwrap() };
        let g = |id: &str, kind, credits: i64, at, exp| -> GrantTerms {
            (id.to_owned(), kind, Decimal::from(credits), at, exp)
        };
        let now = t(15);
        let grants = vec![
            // Counted: a package that never expires (spent out or not, its original 2,000).
            g("pkg", GrantKind::Package, 2_000, t(1), None),
            // Counted: a top-up valid after now.
            g("tu-1", GrantKind::TopUp, 500, t(2), Some(t(20))),
            // The same top-up again (the table's copy of the book's): once.
            g("tu-1", GrantKind::TopUp, 500, t(2), Some(t(20))),
            // Expired at now exactly: over.
            g("promo", GrantKind::Promo, 300, t(1), Some(t(15))),
            // Granted after now: not yet.
            g("tu-2", GrantKind::TopUp, 70, t(16), None),
            // The current cycle's allowance counts, another cycle's does not.
            g(
                "allowance:2027-01-01",
                GrantKind::Allowance,
                1_000,
                t(1),
                Some(t(31)),
            ),
            g(
                "allowance:2026-12-20",
                GrantKind::Allowance,
                900,
                t(1),
                Some(t(31)),
            ),
        ];
        // 2,000 + 500 + 1,000 = 3,500 over three grants.
        assert_eq!(
            active_grants_total(&grants, Some("allowance:2027-01-01"), now),
            (Decimal::new(3_500_000_000, 6), 3)
        );
        assert_eq!(
            active_grants_total(&grants, None, now),
            (Decimal::new(2_500_000_000, 6), 2)
        );
        assert_eq!(active_grants_total(&[], None, now).1, 0);
    }

    #[test]
    fn sqlstates_are_classified_by_whose_fault_they_are() {
        for (code, fault) in [
            ("08006", Fault::Transient), // connection failure
            ("40001", Fault::Transient), // serialization failure
            ("40P01", Fault::Transient), // deadlock
            ("53300", Fault::Transient), // too many connections
            ("57P01", Fault::Transient), // admin shutdown (a restart)
            ("57P03", Fault::Transient), // cannot connect now (starting)
            ("57014", Fault::Transient), // statement timeout
            ("22021", Fault::Input),     // NUL byte in text
            ("22003", Fault::Input),     // numeric out of range
            ("23514", Fault::Input),     // CHECK violation
            ("23505", Fault::Input),     // unique violation
            ("54000", Fault::Input),     // index row too large
            ("42P01", Fault::Bug),       // undefined table
            ("28P01", Fault::Bug),       // bad password
            ("XX000", Fault::Bug),       // internal error
        ] {
            assert_eq!(sqlstate_fault(code), fault, "{code}");
        }
        assert_eq!(StoreError::Data("x".into()).fault(), Fault::Bug);
        let late = StoreError::BeforeHorizon {
            event_source: "s".into(),
            id: "i".into(),
            time: at("2026-03-01T00:00:00Z"),
            horizon: at("2026-03-02T00:00:00Z"),
        };
        assert_eq!(late.fault(), Fault::Input);
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn item(id: &str, time: &str, action: Action<'static>) -> Item<'static> {
        Item {
            source: "//producer",
            id: Box::leak(id.to_owned().into_boxed_str()),
            account_id: "acct",
            time: at(time),
            action,
        }
    }

    fn debit() -> Action<'static> {
        Action::Debit(DebitInfo {
            credits: Decimal::ONE,
            usage_kind: "chat",
            price_version: "v1",
            rule_id: "r1",
        })
    }

    fn grant() -> Action<'static> {
        Action::Grant(NewGrant {
            grant_id: "g".into(),
            kind: GrantKind::Package,
            credits: Decimal::TEN,
            expires_at: None,
            priority: None,
        })
    }

    fn plan() -> Action<'static> {
        Action::Plan {
            plan: Plan {
                plan_id: "pro".into(),
                monthly_allowance: Decimal::TEN,
                billing_day: 1,
                low_balance_credits: None,
                low_balance_percent: None,
                allowance_alert_percents: vec![],
                recharge_threshold_credits: None,
                recharge_credits: None,
            },
            overage_policy: OveragePolicy::BillOverage,
            top_up_validity_months: 3,
        }
    }

    #[test]
    fn usage_grants_and_plans_claim_in_scopes_of_their_own() {
        assert_eq!(debit().scope(), ClaimScope::Usage);
        assert_eq!(grant().scope(), ClaimScope::Grant);
        assert_eq!(plan().scope(), ClaimScope::Plan);
        // The values the CHECK on processed_events.scope allows.
        let names: Vec<&str> = [ClaimScope::Usage, ClaimScope::Grant, ClaimScope::Plan]
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(names, ["usage", "grant", "plan"]);
        let sql = include_str!("../../schemas/postgres/0005_dedupe_scope.sql");
        assert!(sql.contains("CHECK (scope IN ('usage', 'grant', 'plan'))"));
    }

    #[test]
    fn the_purge_cutoff_is_the_window_plus_the_margin_behind_now() {
        // 2026-03-10T12:00Z - 35 days - 1 hour = 2026-02-03T11:00Z (February has 28 days).
        assert_eq!(
            dedupe_cutoff(at("2026-03-10T12:00:00Z"), chrono::TimeDelta::days(35)),
            at("2026-02-03T11:00:00Z")
        );
        assert_eq!(DEDUPE_PURGE_MARGIN, chrono::TimeDelta::hours(1));
    }

    #[test]
    fn items_dated_before_the_horizon_are_found() {
        let items = [
            item("a", "2026-02-03T11:00:00Z", debit()),
            item("b", "2026-02-03T10:59:59Z", grant()),
            item("c", "2026-01-01T00:00:00Z", plan()),
        ];
        assert_eq!(before_horizon(&items, None), None);
        // The horizon itself is not before it.
        assert_eq!(
            before_horizon(&items, Some(at("2026-02-03T11:00:00Z"))).map(|i| i.id),
            Some("b")
        );
        assert_eq!(
            before_horizon(&items, Some(at("2025-12-31T00:00:00Z"))).map(|i| i.id),
            None
        );
    }
}
