//! Holds in PostgreSQL: create (idempotent by hold id), heartbeat, release, read, the
//! scheduler's expiry and purge, and the batch's part (settle the holds its usage names,
//! alert on live holds left without credits).
//!
//! The hold lock. Every write to a hold happens in a transaction holding the advisory lock
//! of the account's bucket ([`lock_key`]). The ledger's batch transaction takes the same
//! locks, for every account it touches, at its end — after its writes, just before COMMIT
//! ([`hold_phase`]) — and holds them through COMMIT. So a hold decided under the lock saw
//! either none of a batch's debits (then the batch, locking after the hold committed, sees
//! the hold and alerts when the debits leave it without credits) or all of them (committed):
//! a hold and a debit never both count the same credit as free, and a hold request waits at
//! most for a batch's last round trip and commit, never for its whole transaction (the
//! account row locks the batch takes at its start are not the hold's). Holds read the
//! committed book without a row lock.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use tokio::sync::Semaphore;
use tokio_postgres::types::Json;
use tokio_postgres::{Client, Row, Statement, Transaction};

use crate::alerts::{self, Alert, HoldExhaustion};
use crate::ledger::book::{Book, LivePart};
use crate::ledger::buckets::Account;
use crate::ledger::holds::{
    self, decide, lock_key, Ask, Hold, HoldRequest, HoldState, HOLD_PURGE_CHUNK_ROWS,
    HOLD_RETENTION, MAX_LIVE_HOLDS,
};
use crate::rating::PriceTable;

use super::*;

/// The first half of every hold lock key (the second is [`lock_key`]).
pub const HOLD_LOCK_CLASS: i32 = 7_421_003;

/// The columns [`hold_from_row`] reads, in its order (a macro: statements are built from
/// it with `concat!`).
macro_rules! hold_columns {
    () => {
        "account_id, hold_id, usage_kind, attributes, price_version, rule_id, unit, \
         requested_credits, requested_seconds, partial, credits, covers_seconds, covers_units, \
         ttl_seconds, created_at, expires_at, heartbeats, state, ended_at, settled_by_source, \
         settled_by_id, exhausted_fired, exhausted_active"
    };
}

const LOCK_ONE: &str = "SELECT pg_advisory_xact_lock(7421003, $1::int)";

/// Locks buckets in key order (every multi-lock taker does), so lockers never deadlock.
pub(super) const LOCK_HOLD_BUCKETS: &str =
    "SELECT count(pg_advisory_xact_lock(7421003, k)) FROM (SELECT k FROM unnest($1::int[]) AS k ORDER BY k OFFSET 0) s";

const READ_BOOK: &str = "SELECT book, spendable FROM accounts WHERE account_id = $1";

const READ_HOLDS: &str = concat!(
    "SELECT ",
    hold_columns!(),
    " FROM holds WHERE account_id = $1 AND ((state = 'live' AND expires_at > $3) OR hold_id = $2)"
);

const INSERT_HOLD: &str = "INSERT INTO holds (account_id, hold_id, usage_kind, attributes,
         price_version, rule_id, unit, requested_credits, requested_seconds, partial, credits,
         covers_seconds, covers_units, ttl_seconds, created_at, expires_at, exhausted_fired,
         exhausted_active)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";

/// A hold's alert, written with the hold.
const INSERT_OUTBOX_ONE: &str = "INSERT INTO alert_outbox (alert_id, kind, account_id, payload)
     VALUES ($1, $2, $3, $4) ON CONFLICT (alert_id) DO NOTHING";

const HEARTBEAT: &str = concat!(
    "UPDATE holds SET ttl_seconds = COALESCE($4, ttl_seconds),
         expires_at = $3 + make_interval(secs => COALESCE($4, ttl_seconds)),
         heartbeats = heartbeats + 1
     WHERE account_id = $1 AND hold_id = $2 AND state = 'live' AND expires_at > $3
     RETURNING ",
    hold_columns!()
);

const RELEASE: &str = concat!(
    "UPDATE holds SET state = 'released', ended_at = $3
     WHERE account_id = $1 AND hold_id = $2 AND state = 'live' AND expires_at > $3
     RETURNING ",
    hold_columns!()
);

const ONE_HOLD: &str = concat!(
    "SELECT ",
    hold_columns!(),
    " FROM holds WHERE account_id = $1 AND hold_id = $2"
);

/// The batch's settlements: each usage event naming a hold of its account ends it (a hold
/// the scheduler already marked expired too: the usage came).
pub(super) const SETTLE_HOLDS: &str = "UPDATE holds h SET state = 'settled', ended_at = $5,
         settled_by_source = u.src, settled_by_id = u.id
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(account_id, hold_id, src, id)
     WHERE h.account_id = u.account_id AND h.hold_id = u.hold_id
       AND h.state IN ('live', 'expired')";

/// The live holds of the batch's accounts, summed by account (read after the settlements):
/// the credits held, how many, and how many have their `credits_exhausted` alert fired now.
pub(super) const HELD_BY_ACCOUNT: &str =
    "SELECT account_id, sum(credits), count(*)::int, (count(*) FILTER (WHERE exhausted_active))::int
     FROM holds WHERE account_id = ANY($1) AND state = 'live' AND expires_at > $2
     GROUP BY account_id";

/// The live holds whose alert turns: of each account named, those whose `exhausted_active`
/// is the one given (not fired, of an account with nothing available; fired, of an account
/// with credits available again).
pub(super) const TURNING_HOLDS: &str =
    "SELECT h.account_id, h.hold_id, h.credits, h.exhausted_fired, h.exhausted_active
     FROM holds h JOIN unnest($1::text[], $2::bool[]) AS u(account_id, active)
       ON h.account_id = u.account_id AND h.exhausted_active = u.active
     WHERE h.state = 'live' AND h.expires_at > $3
     ORDER BY h.account_id, h.hold_id";

/// Whether any live hold of an account has its alert fired now (read without the lock: a
/// hint that a release may resolve something, decided again under the lock).
const ANY_ALERTED: &str = "SELECT count(*) FROM holds
     WHERE account_id = $1 AND state = 'live' AND expires_at > $2 AND exhausted_active";

/// An account's live holds: id, credits, times alerted, alerted now.
const ACCOUNT_LIVE_HOLDS: &str = "SELECT hold_id, credits, exhausted_fired, exhausted_active
     FROM holds WHERE account_id = $1 AND state = 'live' AND expires_at > $2
     ORDER BY hold_id";

pub(super) const WRITE_HOLD_ALERTS: &str =
    "UPDATE holds h SET exhausted_fired = u.fired, exhausted_active = u.active
     FROM unnest($1::text[], $2::text[], $3::int[], $4::bool[]) AS u(account_id, hold_id, fired, active)
     WHERE h.account_id = u.account_id AND h.hold_id = u.hold_id";

/// A hold with the account's figures at the time of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldFigures {
    pub hold: Hold,
    /// Spendable credits now.
    pub spendable: Decimal,
    /// Credits of the live holds now (this one included when live).
    pub held: Decimal,
    /// spendable - held.
    pub available: Decimal,
}

/// What a hold request got.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldAnswer {
    /// A new hold.
    Created(HoldFigures),
    /// A hold with this id and the same terms exists (a retry): as it is now.
    Existing(HoldFigures),
}

/// Why a hold was not made.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldRefused {
    /// Nothing available, or less than asked without `partial`, or too little to pay for
    /// any usage (the first increment, the minimum).
    Insufficient {
        available: Decimal,
        spendable: Decimal,
        held: Decimal,
    },
    /// The id names a hold with other terms.
    Conflict(Box<Hold>),
    /// The account has [`MAX_LIVE_HOLDS`] live holds.
    TooMany(usize),
    /// No rule prices the usage (or not in the measure asked: seconds of a count unit).
    Unpriced(String),
    /// The usage costs nothing: it needs no hold.
    Free,
}

/// What a hold request's transaction does once it has read.
enum Step {
    Insert(Box<Hold>, Option<Alert>),
    Answer(Box<HoldAnswer>),
    Refuse(HoldRefused),
}

/// Why a heartbeat or a release found no live hold.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldMissing {
    /// No hold with this id (or purged).
    Unknown,
    /// The hold has ended (settled, released, expired): as it is.
    Ended(Box<Hold>),
}

/// Connections for hold transactions (each needs one of its own while it runs; the API's
/// shared connection pipelines unrelated queries). At most `size` at once; opened on
/// demand, kept while healthy.
pub struct HoldPool {
    cfg: PostgresConfig,
    idle: Mutex<Vec<HoldConn>>,
    slots: Semaphore,
}

struct HoldConn {
    client: Client,
    stmts: HoldStmts,
}

struct HoldStmts {
    lock: Statement,
    book: Statement,
    holds: Statement,
    insert: Statement,
    outbox: Statement,
    heartbeat: Statement,
    release: Statement,
    one: Statement,
}

impl HoldStmts {
    async fn prepare(c: &Client) -> Result<HoldStmts, StoreError> {
        let (lock, book, holds, insert, outbox, heartbeat, release, one) = futures::join!(
            c.prepare(LOCK_ONE),
            c.prepare(READ_BOOK),
            c.prepare(READ_HOLDS),
            c.prepare(INSERT_HOLD),
            c.prepare(INSERT_OUTBOX_ONE),
            c.prepare(HEARTBEAT),
            c.prepare(RELEASE),
            c.prepare(ONE_HOLD),
        );
        Ok(HoldStmts {
            lock: lock?,
            book: book?,
            holds: holds?,
            insert: insert?,
            outbox: outbox?,
            heartbeat: heartbeat?,
            release: release?,
            one: one?,
        })
    }
}

/// A connection taken from the pool; given back by [`HoldPool::put`] when it ended well.
struct Taken<'p> {
    conn: HoldConn,
    _permit: tokio::sync::SemaphorePermit<'p>,
}

impl HoldPool {
    pub fn new(cfg: PostgresConfig, size: usize) -> HoldPool {
        HoldPool {
            cfg,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(size.max(1)),
        }
    }

    /// Opens the pool's connections (all at once) before any request needs one: opening a
    /// connection (a PostgreSQL backend, authentication, the prepared statements) costs far
    /// more than a hold, so requests should not wait for it.
    pub async fn warm(&self) -> Result<usize, StoreError> {
        let size = self.slots.available_permits();
        let opened = futures::future::join_all((0..size).map(|_| async {
            let client = connect(&self.cfg).await?;
            let stmts = HoldStmts::prepare(&client).await?;
            Ok::<_, StoreError>(HoldConn { client, stmts })
        }))
        .await;
        let mut n = 0;
        let mut idle = self.idle.lock().expect("hold pool lock");
        for conn in opened {
            if idle.len() < size {
                idle.push(conn?);
                n += 1;
            }
        }
        Ok(n)
    }

    fn schema(&self) -> &str {
        &self.cfg.schema
    }

    async fn take(&self) -> Result<Taken<'_>, StoreError> {
        let permit = self
            .slots
            .acquire()
            .await
            .map_err(|_| StoreError::Data("hold pool closed".into()))?;
        loop {
            let idle = self.idle.lock().expect("hold pool lock").pop();
            match idle {
                Some(conn) if conn.client.is_closed() => continue,
                Some(conn) => {
                    return Ok(Taken {
                        conn,
                        _permit: permit,
                    })
                }
                None => break,
            }
        }
        let client = connect(&self.cfg).await?;
        let stmts = HoldStmts::prepare(&client).await?;
        Ok(Taken {
            conn: HoldConn { client, stmts },
            _permit: permit,
        })
    }

    fn put(&self, taken: Taken<'_>) {
        if !taken.conn.client.is_closed() {
            self.idle.lock().expect("hold pool lock").push(taken.conn);
        }
    }

    /// Runs `f` on a pooled connection; a connection whose call failed is closed (it may be
    /// inside a transaction), one that succeeded is kept.
    async fn with<T>(
        &self,
        f: impl for<'c> AsyncFnOnce(&'c HoldConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let taken = self.take().await?;
        let result = f(&taken.conn).await;
        if result.is_ok() {
            self.put(taken);
        }
        result
    }

    /// Places a hold for `account_id` at `now` (see the module's lock), or answers the hold
    /// this id already names (same terms), or refuses. One round trip (BEGIN, the lock, the
    /// book, the live holds and this id's), the decision, another (the hold, its alert,
    /// COMMIT).
    pub async fn create(
        &self,
        prices: &PriceTable,
        account_id: &str,
        req: &HoldRequest,
        now: DateTime<Utc>,
    ) -> Result<Result<HoldAnswer, HoldRefused>, StoreError> {
        // Whole microseconds, as PostgreSQL stores times (a retry answers the stored hold).
        let now = now.trunc_subsecs(6);
        let attrs: Vec<(&str, &str)> = req
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let requested = match req.ask {
            Ask::Credits(c) => c,
            Ask::Seconds(s) => match prices.charge_seconds(&req.usage_kind, &attrs, now, s) {
                Ok(c) => c,
                Err(e) => return Ok(Err(HoldRefused::Unpriced(e.to_string()))),
            },
        };
        // The rule must price this usage now whatever was asked (credits of an unpriced
        // usage would cover nothing).
        if let Err(e) = prices.cover(&req.usage_kind, &attrs, now, Decimal::ZERO) {
            return Ok(Err(HoldRefused::Unpriced(e.to_string())));
        }
        if requested <= Decimal::ZERO {
            return Ok(Err(HoldRefused::Free));
        }
        let key = lock_key(self.schema(), account_id);
        self.with(async |c| {
            let st = &c.stmts;
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
            let book_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&account_id];
            let holds_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&account_id, &req.hold_id, &now];
            let (begin, lock, book, rows) = futures::join!(
                c.client.simple_query("BEGIN"),
                c.client.query(&st.lock, &lock_params),
                c.client.query_opt(&st.book, &book_params),
                c.client.query(&st.holds, &holds_params),
            );
            begin?;
            lock?;
            let book = book?;
            let rows = rows?;
            let mut live = Vec::new();
            let mut existing = None;
            for r in &rows {
                let h = hold_from_row(r)?;
                if h.hold_id == req.hold_id {
                    existing = Some(h.clone());
                }
                if h.is_live(now) {
                    live.push(h);
                }
            }
            let view = account_now(account_id, book.as_ref(), now);
            let spendable = crate::credits::fixed(view.spendable(now));
            let (held, count) = holds::held(&live, now);
            let available = crate::credits::fixed(spendable - held);
            let figures = |hold: Hold, held: Decimal| HoldFigures {
                hold,
                spendable,
                held: crate::credits::fixed(held),
                available: crate::credits::fixed(spendable - held),
            };
            let answer = if let Some(h) = existing {
                if req.same_terms(&h) {
                    Step::Answer(Box::new(HoldAnswer::Existing(figures(h, held))))
                } else {
                    Step::Refuse(HoldRefused::Conflict(Box::new(h)))
                }
            } else if count >= MAX_LIVE_HOLDS {
                Step::Refuse(HoldRefused::TooMany(count))
            } else {
                let insufficient = HoldRefused::Insufficient {
                    available,
                    spendable,
                    held: crate::credits::fixed(held),
                };
                let cover = decide(requested, available, req.partial).and_then(|credits| {
                    let credits = crate::credits::fixed(credits);
                    prices
                        .cover(&req.usage_kind, &attrs, now, credits)
                        .ok()
                        .filter(|c| !c.is_nothing())
                        .map(|c| (credits, c))
                });
                match cover {
                    None => Step::Refuse(insufficient),
                    Some((credits, cover)) => {
                        let mut hold = Hold {
                            account_id: account_id.to_owned(),
                            hold_id: req.hold_id.clone(),
                            usage_kind: req.usage_kind.clone(),
                            attributes: req.attributes.clone(),
                            price_version: cover.price_version.to_owned(),
                            rule_id: cover.rule_id.to_owned(),
                            unit: cover.unit.as_str().to_owned(),
                            requested_credits: crate::credits::fixed(requested),
                            requested_seconds: match req.ask {
                                Ask::Seconds(s) => Some(s),
                                Ask::Credits(_) => None,
                            },
                            partial: req.partial,
                            credits,
                            covers_seconds: cover.seconds,
                            covers_units: cover.units,
                            ttl_seconds: req.ttl_seconds,
                            created_at: now,
                            expires_at: now + TimeDelta::seconds(i64::from(req.ttl_seconds)),
                            heartbeats: 0,
                            state: HoldState::Live,
                            ended_at: None,
                            settled_by: None,
                            exhausted_fired: 0,
                            exhausted_active: false,
                        };
                        let alert = alerts::hold_exhausted(
                            &view,
                            now,
                            HoldExhaustion {
                                hold_id: &hold.hold_id,
                                hold_credits: credits,
                                held: held + credits,
                                fired: 0,
                                active: false,
                            },
                        );
                        if let Some((_, fired, active)) = &alert {
                            hold.exhausted_fired = *fired;
                            hold.exhausted_active = *active;
                        }
                        Step::Insert(Box::new(hold), alert.map(|(a, _, _)| a))
                    }
                }
            };
            match answer {
                Step::Insert(hold, alert) => {
                    insert_hold(c, &hold, alert.as_ref()).await?;
                    let held = held + hold.credits;
                    Ok(Ok(HoldAnswer::Created(figures(*hold, held))))
                }
                Step::Answer(a) => {
                    c.client.simple_query("COMMIT").await?;
                    Ok(Ok(*a))
                }
                Step::Refuse(refused) => {
                    c.client.simple_query("COMMIT").await?;
                    Ok(Err(refused))
                }
            }
        })
        .await
    }

    /// Extends a live hold: it now expires `ttl_seconds` (else its own TTL) after `now`.
    pub async fn heartbeat(
        &self,
        account_id: &str,
        hold_id: &str,
        ttl_seconds: Option<u32>,
        now: DateTime<Utc>,
    ) -> Result<Result<Hold, HoldMissing>, StoreError> {
        let ttl = ttl_seconds.map(|t| t as i32);
        self.end_or_extend(account_id, hold_id, now, Some(ttl))
            .await
    }

    /// Releases a live hold now (its credits are available again at once). When the account
    /// has live holds whose `credits_exhausted` alert is fired, and the credits released make
    /// some available again, those alerts are resolved ([`HoldPool::resolve_available`]).
    pub async fn release(
        &self,
        account_id: &str,
        hold_id: &str,
        now: DateTime<Utc>,
    ) -> Result<Result<Hold, HoldMissing>, StoreError> {
        let released = self.end_or_extend(account_id, hold_id, now, None).await?;
        if let Ok(hold) = &released {
            // The release has committed: a failure here must not answer it as failed (a retry
            // would find it ended). The account's next batch resolves the alerts then.
            if let Err(error) = self
                .resolve_available(account_id, hold.ended_at.unwrap_or(now))
                .await
            {
                tracing::warn!(%error, account_id, "resolving hold alerts after a release failed; the account's next batch resolves them");
            }
        }
        Ok(released)
    }

    /// Resolves the `credits_exhausted` alerts of `account_id`'s live holds when credits are
    /// available at `now`: under the hold lock, the book and the live holds are read, and
    /// each alerted hold gets its resolution (same key, in the outbox) and is re-armed.
    /// Returns the alerts resolved. Nothing is read beyond one query when no live hold of
    /// the account is alerted (the common case).
    pub async fn resolve_available(
        &self,
        account_id: &str,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let now = now.trunc_subsecs(6);
        let key = lock_key(self.schema(), account_id);
        self.with(async |c| {
            let alerted: i64 = c
                .client
                .query_one(ANY_ALERTED, &[&account_id, &now])
                .await?
                .get(0);
            if alerted == 0 {
                return Ok(0);
            }
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
            let book_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&account_id];
            let live_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&account_id, &now];
            let (begin, lock, book, live) = futures::join!(
                c.client.simple_query("BEGIN"),
                c.client.query(&c.stmts.lock, &lock_params),
                c.client.query_opt(&c.stmts.book, &book_params),
                c.client.query(ACCOUNT_LIVE_HOLDS, &live_params),
            );
            begin?;
            lock?;
            let view = account_now(account_id, book?.as_ref(), now);
            let live = live?;
            let held: Decimal = live.iter().map(|r| r.get::<_, Decimal>(1)).sum();
            let mut resolved = Vec::new();
            let (mut h, mut f, mut act) = (Vec::new(), Vec::new(), Vec::new());
            for r in &live {
                let input = HoldExhaustion {
                    hold_id: r.get(0),
                    hold_credits: r.get(1),
                    held,
                    fired: r.get(2),
                    active: r.get(3),
                };
                if !input.active {
                    // Only resolutions: a release never leaves less available.
                    continue;
                }
                if let Some((alert, n, active)) = alerts::hold_exhausted(&view, now, input) {
                    h.push(input.hold_id);
                    f.push(n);
                    act.push(active);
                    resolved.push(alert);
                }
            }
            let a = vec![account_id; h.len()];
            let states = async {
                if h.is_empty() {
                    return Ok(0);
                }
                c.client
                    .execute(WRITE_HOLD_ALERTS, &[&a, &h, &f, &act])
                    .await
            };
            let payloads: Vec<String> = resolved
                .iter()
                .map(|a| a.to_cloud_event().to_string())
                .collect();
            let outbox = futures::future::try_join_all(resolved.iter().zip(&payloads).map(
                |(alert, payload)| async move {
                    let kind = alert.kind.as_str();
                    c.client
                        .execute(
                            &c.stmts.outbox,
                            &[&alert.alert_id, &kind, &alert.account_id, payload],
                        )
                        .await
                },
            ));
            let (states, outbox, commit) =
                futures::join!(states, outbox, c.client.simple_query("COMMIT"));
            states?;
            outbox?;
            commit?;
            Ok(resolved.len())
        })
        .await
    }

    /// One round trip: BEGIN, the lock, the update of the live hold, COMMIT; then, when no
    /// live hold was updated, the hold as it is. `heartbeat`: Some(the new TTL, if any) to
    /// extend, None to release.
    async fn end_or_extend(
        &self,
        account_id: &str,
        hold_id: &str,
        now: DateTime<Utc>,
        heartbeat: Option<Option<i32>>,
    ) -> Result<Result<Hold, HoldMissing>, StoreError> {
        let now = now.trunc_subsecs(6);
        let key = lock_key(self.schema(), account_id);
        self.with(async |c| {
            let update = async {
                match &heartbeat {
                    Some(ttl) => {
                        c.client
                            .query_opt(&c.stmts.heartbeat, &[&account_id, &hold_id, &now, ttl])
                            .await
                    }
                    None => {
                        c.client
                            .query_opt(&c.stmts.release, &[&account_id, &hold_id, &now])
                            .await
                    }
                }
            };
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
            let (begin, lock, row, commit) = futures::join!(
                c.client.simple_query("BEGIN"),
                c.client.query(&c.stmts.lock, &lock_params),
                update,
                c.client.simple_query("COMMIT"),
            );
            begin?;
            lock?;
            let row = row?;
            commit?;
            if let Some(r) = row {
                return Ok(Ok(hold_from_row(&r)?));
            }
            match c
                .client
                .query_opt(&c.stmts.one, &[&account_id, &hold_id])
                .await?
            {
                None => Ok(Err(HoldMissing::Unknown)),
                Some(r) => Ok(Err(HoldMissing::Ended(Box::new(hold_from_row(&r)?)))),
            }
        })
        .await
    }

    /// A hold as it is (None: unknown or purged).
    pub async fn get(&self, account_id: &str, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        self.with(async |c| {
            c.client
                .query_opt(&c.stmts.one, &[&account_id, &hold_id])
                .await?
                .as_ref()
                .map(hold_from_row)
                .transpose()
        })
        .await
    }
}

/// The hold, and its alert in the outbox when it fired, then COMMIT: one round trip.
async fn insert_hold(c: &HoldConn, h: &Hold, alert: Option<&Alert>) -> Result<(), StoreError> {
    let attributes = Json(&h.attributes);
    let requested_seconds = h.requested_seconds.map(|s| s as i64);
    let covers_seconds = h.covers_seconds.map(|s| s as i64);
    let covers_units = h.covers_units.map(|s| s as i64);
    let ttl = h.ttl_seconds as i32;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 18] = [
        &h.account_id,
        &h.hold_id,
        &h.usage_kind,
        &attributes,
        &h.price_version,
        &h.rule_id,
        &h.unit,
        &h.requested_credits,
        &requested_seconds,
        &h.partial,
        &h.credits,
        &covers_seconds,
        &covers_units,
        &ttl,
        &h.created_at,
        &h.expires_at,
        &h.exhausted_fired,
        &h.exhausted_active,
    ];
    let insert = c.client.execute(&c.stmts.insert, &params);
    let payload = alert.map(|a| a.to_cloud_event().to_string());
    let outbox = async {
        match (alert, &payload) {
            (Some(a), Some(p)) => c
                .client
                .execute(
                    &c.stmts.outbox,
                    &[&a.alert_id, &a.kind.as_str(), &a.account_id, p],
                )
                .await
                .map(drop),
            _ => Ok(()),
        }
    };
    let (insert, outbox, commit) = futures::join!(insert, outbox, c.client.simple_query("COMMIT"));
    insert?;
    outbox?;
    // After a failed statement COMMIT ends the transaction as a rollback: the errors above
    // come first.
    commit?;
    Ok(())
}

/// The account as it stands at `now` (its book brought to `now`: expiries and resets by
/// time), from its stored book; an unknown account has nothing. An account stored before
/// books keeps its stored spendable balance until its next event gives it a book.
fn account_now(account_id: &str, row: Option<&Row>, now: DateTime<Utc>) -> Account {
    let mut account = Account::new(account_id);
    if let Some(r) = row {
        match r.get::<_, Option<Json<LivePart>>>(0) {
            Some(Json(part)) => {
                account = part.live;
                account.advance(now, &mut Vec::new());
            }
            None => {
                let spendable: Decimal = r.get(1);
                account.grants.push(crate::ledger::buckets::Grant {
                    grant_id: "legacy".into(),
                    kind: crate::event::GrantKind::Manual,
                    priority: 0,
                    granted: spendable,
                    remaining: spendable,
                    expires_at: None,
                    granted_at: now,
                    seq: 0,
                    debited: Decimal::ZERO,
                    settled: Decimal::ZERO,
                    expired: Decimal::ZERO,
                    voided: Decimal::ZERO,
                    adjusted: Decimal::ZERO,
                    voided_at: None,
                });
            }
        }
    }
    account
}

pub(super) fn hold_from_row(r: &Row) -> Result<Hold, StoreError> {
    let state: String = r.get(17);
    let Json(attributes): Json<BTreeMap<String, String>> = r.get(3);
    let unsigned = |i: usize| r.get::<_, Option<i64>>(i).map(|v| v.max(0) as u64);
    Ok(Hold {
        account_id: r.get(0),
        hold_id: r.get(1),
        usage_kind: r.get(2),
        attributes,
        price_version: r.get(4),
        rule_id: r.get(5),
        unit: r.get(6),
        requested_credits: r.get(7),
        requested_seconds: unsigned(8),
        partial: r.get(9),
        credits: r.get(10),
        covers_seconds: unsigned(11),
        covers_units: unsigned(12),
        ttl_seconds: r.get::<_, i32>(13).max(0) as u32,
        created_at: r.get(14),
        expires_at: r.get(15),
        heartbeats: r.get(16),
        state: HoldState::parse(&state)
            .ok_or_else(|| StoreError::Data(format!("hold state {state}")))?,
        ended_at: r.get(18),
        settled_by: r
            .get::<_, Option<String>>(19)
            .zip(r.get::<_, Option<String>>(20)),
        exhausted_fired: r.get(21),
        exhausted_active: r.get(22),
    })
}

/// A usage event of the batch that names a hold.
pub(super) struct Settle<'a> {
    pub(super) account_id: &'a str,
    pub(super) hold_id: &'a str,
    pub(super) source: &'a str,
    pub(super) id: &'a str,
}

/// The batch's hold part, its last round trips before COMMIT: the hold locks of every
/// account it touched (in key order), the holds its usage settles, and the live holds left,
/// summed by account; then, only for an account whose live holds' alert turns (nothing
/// available and some hold not alerted yet, or credits available again and some hold
/// alerted), those holds, each one's `credits_exhausted` alert (or its resolution) and the
/// holds' alert state. Returns the alerts written.
///
/// Everything here runs under the hold locks, which hold requests wait for: it reads one row
/// per account, not one per live hold, and builds a payload only for an alert that turns.
pub(super) async fn hold_phase(
    tx: &Transaction<'_>,
    st: &Stmts,
    schema: &str,
    books: &BTreeMap<String, Book>,
    settles: &[Settle<'_>],
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    if books.is_empty() {
        return Ok(0);
    }
    let mut keys: Vec<i32> = books.keys().map(|a| lock_key(schema, a)).collect();
    keys.sort_unstable();
    keys.dedup();
    let ids: Vec<&str> = books.keys().map(String::as_str).collect();
    let settle = async {
        if settles.is_empty() {
            return Ok(0);
        }
        let a: Vec<&str> = settles.iter().map(|s| s.account_id).collect();
        let h: Vec<&str> = settles.iter().map(|s| s.hold_id).collect();
        let src: Vec<&str> = settles.iter().map(|s| s.source).collect();
        let id: Vec<&str> = settles.iter().map(|s| s.id).collect();
        tx.execute(st.get(SETTLE_HOLDS), &[&a, &h, &src, &id, &now])
            .await
    };
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&keys];
    let live_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ids, &now];
    let (lock, settled, held) = futures::join!(
        tx.query_one(st.get(LOCK_HOLD_BUCKETS), &lock_params),
        settle,
        tx.query(st.get(HELD_BY_ACCOUNT), &live_params),
    );
    lock?;
    settled?;
    // Each account whose holds' alert may turn: its view, the credits held, and the state
    // of the holds that turn.
    let mut turning: BTreeMap<String, (Account, Decimal)> = BTreeMap::new();
    let (mut turn_ids, mut turn_active): (Vec<String>, Vec<bool>) = (Vec::new(), Vec::new());
    for r in &held? {
        let account_id: String = r.get(0);
        let Some(book) = books.get(&account_id) else {
            continue;
        };
        let (held, live, alerted): (Decimal, i32, i32) = (r.get(1), r.get(2), r.get(3));
        let view = book.view(now);
        let exhausted = view.spendable(now) - held <= Decimal::ZERO;
        let turns = if exhausted {
            alerted < live
        } else {
            alerted > 0
        };
        if turns {
            turn_ids.push(account_id.clone());
            // The holds whose state is not the account's yet.
            turn_active.push(!exhausted);
            turning.insert(account_id, (view, held));
        }
    }
    if turning.is_empty() {
        return Ok(0);
    }
    let rows = tx
        .query(st.get(TURNING_HOLDS), &[&turn_ids, &turn_active, &now])
        .await?;
    let mut fired: Vec<Alert> = Vec::new();
    let (mut a, mut h, mut f, mut act) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in &rows {
        let account_id: &str = r.get(0);
        let hold_id: &str = r.get(1);
        let Some((view, held)) = turning.get(account_id) else {
            continue;
        };
        let input = HoldExhaustion {
            hold_id,
            hold_credits: r.get(2),
            held: *held,
            fired: r.get(3),
            active: r.get(4),
        };
        if let Some((alert, n, now_active)) = alerts::hold_exhausted(view, now, input) {
            fired.push(alert);
            a.push(account_id);
            h.push(hold_id);
            f.push(n);
            act.push(now_active);
        }
    }
    if fired.is_empty() {
        return Ok(0);
    }
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&a, &h, &f, &act];
    let no_states = BTreeMap::new();
    let states = tx.execute(st.get(WRITE_HOLD_ALERTS), &params);
    let outbox = write_alerts(tx, st, &no_states, &fired);
    let (states, outbox) = futures::join!(states, outbox);
    states?;
    outbox?;
    Ok(fired.len())
}

impl Store {
    /// The credits of an account's live holds at `now`, and how many they are.
    pub async fn held(
        &self,
        account_id: &str,
        now: DateTime<Utc>,
    ) -> Result<(Decimal, i64), StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT COALESCE(sum(credits), 0), count(*) FROM holds
                 WHERE account_id = $1 AND state = 'live' AND expires_at > $2",
                &[&account_id, &now],
            )
            .await?;
        Ok((crate::credits::fixed(row.get(0)), row.get(1)))
    }

    /// The scheduler's part for holds: live holds whose TTL passed by `now` are marked
    /// `expired` (they stopped counting at their `expires_at` already: this writes no
    /// figure, so it needs no hold lock), and ended holds older than [`HOLD_RETENTION`] are
    /// deleted. Bounded statements; returns (expired, purged).
    pub async fn expire_holds(&self, now: DateTime<Utc>) -> Result<(u64, u64), StoreError> {
        let expired = self
            .client
            .execute(
                "UPDATE holds SET state = 'expired', ended_at = expires_at
                 WHERE (account_id, hold_id) IN (
                     SELECT account_id, hold_id FROM holds
                     WHERE state = 'live' AND expires_at <= $1 LIMIT $2)
                   AND state = 'live' AND expires_at <= $1",
                &[&now, &HOLD_PURGE_CHUNK_ROWS],
            )
            .await?;
        let purged = self
            .client
            .execute(
                "DELETE FROM holds WHERE ctid = ANY(ARRAY(
                     SELECT ctid FROM holds WHERE state <> 'live' AND ended_at < $1 LIMIT $2))",
                &[&(now - HOLD_RETENTION), &HOLD_PURGE_CHUNK_ROWS],
            )
            .await?;
        Ok((expired, purged))
    }
}
