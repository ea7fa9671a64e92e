//! The PostgreSQL store: applies a batch in ONE transaction — dedupe claims, account locks
//! (in account_id order, so instances never deadlock on accounts), grant and debit effects,
//! ledger entries, and the consumed offsets — and reads balances back.
//!
//! Here: the store's errors and their faults, the batch's input and outcome types, the
//! connection (TLS included) and the prepared statements. The rest by job: `apply` (a
//! batch), `tick` (the scheduler's tick, the dedupe purge), `outbox` (the alert outbox),
//! `read` (read models and row mappers), `offsets` (the consumed offsets).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use postgres_native_tls::MakeTlsConnector;
use rust_decimal::Decimal;
use tokio_postgres::{Client, Statement};

use super::conninfo::{self, SslMode, TlsSettings};

use super::book::{self, Event};
use super::buckets::{NewGrant, Plan};
use super::PostgresConfig;
use crate::alerts::AlertDefaults;
use crate::event::OveragePolicy;
use crate::fault::{Classify, Fault};

mod apply;
mod holds;
mod marks;
mod offsets;
mod outbox;
mod read;
mod tick;

use apply::*;
pub use holds::{HoldAnswer, HoldFigures, HoldMissing, HoldPool, HoldRefused, HOLD_LOCK_CLASS};
pub use offsets::*;
pub use outbox::*;
pub use read::*;

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
    /// The hold the usage settles (`data.hold_id`): released in the same transaction.
    pub hold_id: Option<&'a str>,
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
    /// A grant voided: its remaining credits removed.
    VoidGrant {
        grant_id: String,
        why: Correction<'a>,
    },
    /// A manual adjustment (credits signed).
    Adjust {
        adjustment_id: String,
        credits: Decimal,
        why: Correction<'a>,
    },
    /// A usage event voided: the store looks up the credits its own ledger charged it and
    /// gives them back; when it has not charged it yet, the void waits (`pending_usage_voids`)
    /// for the usage and is applied, at its own time, with it.
    VoidUsage {
        event_source: &'a str,
        event_id: &'a str,
        why: Correction<'a>,
    },
}

/// Who made a correction and why: written on every ledger line it causes.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction<'a> {
    /// The API token's name, or the producer's CloudEvents `source`.
    pub actor: &'a str,
    pub reason: &'a str,
}

impl<'a> Action<'a> {
    /// Who made it and why, for a correction.
    pub fn correction(&self) -> Option<&Correction<'a>> {
        match self {
            Action::VoidGrant { why, .. }
            | Action::Adjust { why, .. }
            | Action::VoidUsage { why, .. } => Some(why),
            _ => None,
        }
    }
}

impl Action<'_> {
    /// The dedupe scope of the event's identity: a usage event, a grant and a plan with the
    /// same (source, id) are three events, so usage can never claim a grant's or a plan's
    /// identity. Voids and adjustments are claimed with the grants (they travel on the
    /// grants topic; the API's ids, `void:`/`adjustment:`, never meet a grant's `grant:`).
    pub fn scope(&self) -> ClaimScope {
        match self {
            Action::Debit(_) => ClaimScope::Usage,
            Action::Grant(_) | Action::VoidGrant { .. } | Action::Adjust { .. } => {
                ClaimScope::Grant
            }
            Action::Plan { .. } => ClaimScope::Plan,
            Action::VoidUsage { .. } => ClaimScope::UsageVoid,
        }
    }
}

/// Where a dedupe claim lives (`processed_events.scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClaimScope {
    Usage,
    Grant,
    Plan,
    /// A usage event's void, claimed by the ORIGINAL's identity: a usage event is voided
    /// once, whatever the void's own id.
    UsageVoid,
}

impl ClaimScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimScope::Usage => "usage",
            ClaimScope::Grant => "grant",
            ClaimScope::Plan => "plan",
            ClaimScope::UsageVoid => "usage_void",
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

impl<'a> Item<'a> {
    /// The identity the event is claimed by, in its scope ([`Action::scope`]): its own, or
    /// for a usage void the original's.
    pub fn claim_key(&self) -> (ClaimScope, &'a str, &'a str) {
        match &self.action {
            Action::VoidUsage {
                event_source,
                event_id,
                ..
            } => (ClaimScope::UsageVoid, event_source, event_id),
            action => (action.scope(), self.source, self.id),
        }
    }
}

impl Item<'_> {
    /// The event as the ledger's core sees it. A usage void's credits are not known here
    /// (0): the store resolves them ([`Item::to_event_with`]).
    pub fn to_event(&self) -> Event {
        self.to_event_with(Decimal::ZERO)
    }

    /// [`Item::to_event`], a usage void giving back `charged` credits.
    pub fn to_event_with(&self, charged: Decimal) -> Event {
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
                Action::VoidGrant { grant_id, .. } => book::Action::VoidGrant {
                    grant_id: grant_id.clone(),
                },
                Action::Adjust {
                    adjustment_id,
                    credits,
                    ..
                } => book::Action::Adjust {
                    adjustment_id: adjustment_id.clone(),
                    credits: *credits,
                },
                Action::VoidUsage {
                    event_source,
                    event_id,
                    ..
                } => book::Action::VoidUsage {
                    event_source: (*event_source).to_owned(),
                    event_id: (*event_id).to_owned(),
                    credits: charged,
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
    /// Open-window events read back for those replays (from each book's mark, or its
    /// final point).
    pub window_events: usize,
    /// The stored dedupe horizon the batch's claims were checked against (None: nothing
    /// purged yet, or no item): the ledger loop's admission takes it from here.
    pub horizon: Option<DateTime<Utc>>,
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
    /// The replay marks of the books this store applied to, between batches.
    marks: marks::MarkCache,
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
            marks: marks::MarkCache::default(),
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

    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// The grant columns [`grant_from_row`] reads (a macro: statements are built from it with
/// `concat!`).
macro_rules! grant_columns {
    () => {
        "SELECT account_id, grant_id, kind, priority, granted, remaining, expires_at, granted_at, \
         seq, voided_at FROM grants"
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
const PREPARED: [&str; 25] = [
    CLAIM_HORIZON,
    CLAIM,
    CREATE_ACCOUNTS,
    LOCK_ACCOUNTS,
    ALERT_STATES,
    LEGACY_GRANTS,
    KNOWN_GRANTS,
    PENDING_VOIDS,
    INSERT_PENDING_VOIDS,
    DELETE_PENDING_VOIDS,
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
    holds::LOCK_HOLD_BUCKETS,
    holds::SETTLE_HOLDS,
    holds::HELD_BY_ACCOUNT,
    holds::TURNING_HOLDS,
    holds::WRITE_HOLD_ALERTS,
];

const CLAIM_HORIZON: &str = "SELECT dedupe_claim_horizon()";

/// The pending voids of the batch's accounts: usually none (the caller matches them to the
/// batch's usage). By account, not by identity: a short array, and a table nearly empty.
const PENDING_VOIDS: &str = "SELECT account_id, event_source, event_id, void_source, void_id,
            void_time, actor, reason
     FROM pending_usage_voids WHERE account_id = ANY($1)";

const INSERT_PENDING_VOIDS: &str = "INSERT INTO pending_usage_voids (account_id, event_source,
            event_id, void_source, void_id, void_time, actor, reason)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                          $6::timestamptz[], $7::text[], $8::text[])
     ON CONFLICT DO NOTHING";

const DELETE_PENDING_VOIDS: &str = "DELETE FROM pending_usage_voids p
     USING unnest($1::text[], $2::text[], $3::text[]) AS u(account_id, event_source, event_id)
     WHERE p.account_id = u.account_id AND p.event_source = u.event_source
       AND p.event_id = u.event_id";

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

/// Each account's open window from a place on (`-infinity`: all of it), by the index on
/// (account_id, at).
const LOAD_WINDOWS: &str =
    "SELECT o.account_id, o.at, o.at_nanos, o.event_source, o.event_id, o.late, o.credits, o.placed \
     FROM unnest($1::text[], $2::timestamptz[]) AS w(account_id, from_at) \
     JOIN open_events o ON o.account_id = w.account_id \
      AND o.at >= COALESCE(w.from_at, '-infinity'::timestamptz)";

const INSERT_OPEN_EVENTS: &str = "INSERT INTO open_events (account_id, at, at_nanos, event_source, event_id, late, credits, placed)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::text[], $5::text[],
                          $6::bool[], $7::numeric[], $8::jsonb[])";

const DELETE_REVISABLE_CYCLES: &str = "DELETE FROM cycles WHERE account_id = ANY($1) AND NOT final";

const WRITE_GRANTS: &str = "INSERT INTO grants (account_id, grant_id, kind, priority, granted, remaining, expires_at, granted_at, seq, voided_at)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::numeric[], $6::numeric[],
                          $7::timestamptz[], $8::timestamptz[], $9::bigint[], $10::timestamptz[])
     ON CONFLICT (account_id, grant_id) DO UPDATE
       SET remaining = EXCLUDED.remaining, expires_at = EXCLUDED.expires_at,
           granted = EXCLUDED.granted, granted_at = EXCLUDED.granted_at, seq = EXCLUDED.seq,
           voided_at = EXCLUDED.voided_at";

const COPY_ENTRIES: &str = "COPY ledger_entries (account_id, kind, corrects, grant_id, amount,
         balance_after, overage_after, effective_at, late, event_source, event_id, usage_kind,
         price_version, rule_id, event_time, actor, reason, reverses_source, reverses_id)
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

const GRANT_COLUMNS: &str = grant_columns!();

const ACCOUNT_COLUMNS: &str = account_columns!();

/// The index of `book` in [`ACCOUNT_COLUMNS`] (`checkpoint` follows it).
const BOOK_COLUMN: usize = 15;

/// The columns [`placed_from_row`] reads, in its order.
const OPEN_COLUMNS: &str =
    "account_id, at, at_nanos, event_source, event_id, late, credits, placed";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::GrantKind;

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
            hold_id: None,
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
        let sql = include_str!("../../../schemas/postgres/0005_dedupe_scope.sql");
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
