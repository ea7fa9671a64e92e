//! A batch applied in ONE transaction: dedupe claims, account locks (in account_id order, so
//! instances never deadlock on accounts), the books' effects, entries, grants, cycles, alerts
//! to the outbox, usage voids waiting for their usage, and the consumed offsets.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use tokio_postgres::types::Json;
use tokio_postgres::Transaction;

use crate::alerts::{self, Alert, AlertState, KeyState};
use crate::event::OveragePolicy;
use crate::kafka::Positions;
use crate::ledger::book::{self, Book, Event, Placed};
use crate::ledger::buckets::{Account, ClosedCycle, Entry, Grant, Plan};

use super::*;

impl Store {
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
        // The pending voids are read after the locks (same connection, in order): a void
        // made pending by another transaction on the account has committed.
        let (fresh, locked, known, waiting) = futures::join!(
            claim(&tx, st, items),
            lock_accounts(&tx, st, &ids),
            known_grants(&tx, st, items),
            pending_voids(&tx, st, &ids),
        );
        let (fresh, horizon) = fresh?;
        outcome.horizon = horizon;
        let mut locked = locked?;
        let known = known?;
        let waiting = waiting?;
        let charged = charged_usage(&tx, &fresh).await?;
        // Voids that waited for usage charged now: applied with it, at their own time.
        let woken: Vec<(Item<'_>, Decimal)> = waiting
            .iter()
            .filter_map(|w| {
                let credits = fresh.iter().find_map(|u| match &u.action {
                    Action::Debit(d)
                        if u.account_id == w.account_id
                            && u.source == w.event_source
                            && u.id == w.event_id =>
                    {
                        Some(d.credits.max(Decimal::ZERO))
                    }
                    _ => None,
                })?;
                Some((w.item(), credits))
            })
            .collect();
        let mut waits = PendingRows::default();
        outcome.applied = fresh.len();
        outcome.duplicates = items.len() - fresh.len();
        if !fresh.is_empty() {
            let touched: BTreeSet<&str> = fresh.iter().map(|i| i.account_id).collect();
            locked.retain(&touched);
            self.marks.lend(&mut locked.books);
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
                let credits = match &item.action {
                    Action::VoidUsage {
                        event_source,
                        event_id,
                        ..
                    } => match charged.get(&(item.account_id, *event_source, *event_id)) {
                        Some(c) => *c,
                        None => {
                            // Not charged yet: it waits for its usage.
                            waits.push(item);
                            continue;
                        }
                    },
                    _ => Decimal::ZERO,
                };
                let (items, events) = batches.entry(item.account_id).or_default();
                items.push(item);
                events.push(item.to_event_with(credits));
            }
            for (item, credits) in &woken {
                let (items, events) = batches.entry(item.account_id).or_default();
                items.push(item);
                events.push(item.to_event_with(*credits));
            }
            // The accounts with an event out of order, and where their replay starts.
            let need: Vec<(&str, Option<DateTime<Utc>>)> = batches
                .iter()
                .filter_map(|(id, (_, events))| {
                    let book = locked.books.get(*id)?;
                    book.needs_window(events)
                        .then(|| (*id, book.window_from(events)))
                })
                .collect();
            let mut windows = load_windows(&tx, st, &need, &locked.books).await?;
            outcome.window_events = windows.values().map(Vec::len).sum();
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
            let (a, b, c, d, e) = futures::join!(
                open.insert(&tx, st),
                delete_cycles,
                write_back(&tx, st, &locked, &rows, &fired, &[]),
                waits.write(&tx, st, &woken),
                store_offsets(&tx, st, group_id, next_offsets),
            );
            a?;
            b?;
            c?;
            d?;
            e?;
            // Last, just before COMMIT: the hold locks (held through COMMIT only), the holds
            // this usage settles, alerts on live holds left without credits.
            let settles: Vec<holds::Settle<'_>> = fresh
                .iter()
                .filter_map(|i| match &i.action {
                    Action::Debit(DebitInfo {
                        hold_id: Some(hold_id),
                        ..
                    }) => Some(holds::Settle {
                        account_id: i.account_id,
                        hold_id,
                        source: i.source,
                        id: i.id,
                    }),
                    _ => None,
                })
                .collect();
            let locking = std::time::Instant::now();
            outcome.alerts +=
                holds::hold_phase(&tx, st, &self.schema, &locked.books, &settles, Utc::now())
                    .await?;
            tx.commit().await?;
            crate::metrics::hold_lock_seconds(locking.elapsed().as_secs_f64());
            self.marks.keep(&mut locked.books);
            return Ok(outcome);
        }
        store_offsets(&tx, st, group_id, next_offsets).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Claims the identities, each in its scope ([`Action::scope`]), in (scope, source, id)
/// order (a fixed lock order across instances) and returns the items claimed now, first
/// occurrence only, in batch order, with the horizon read.
///
/// First reads the dedupe horizon under the shared purge lock
/// ([`Store::advance_dedupe_horizon`]): an item dated before it is refused
/// ([`StoreError::BeforeHorizon`], the input's fault), as its claim may have been purged.
pub(super) async fn claim<'i, 'a>(
    tx: &Transaction<'_>,
    st: &Stmts,
    items: &'i [Item<'a>],
) -> Result<(Vec<&'i Item<'a>>, Option<DateTime<Utc>>), StoreError> {
    if items.is_empty() {
        return Ok((Vec::new(), None));
    }
    let keys: Vec<(ClaimScope, &str, &str)> = items.iter().map(Item::claim_key).collect();
    let scopes: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let sources: Vec<&str> = keys.iter().map(|k| k.1).collect();
    let ids: Vec<&str> = keys.iter().map(|k| k.2).collect();
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
    let fresh = items
        .iter()
        .filter(|i| {
            let (scope, source, id) = i.claim_key();
            claimed.remove(&(scope.as_str().to_owned(), source.to_owned(), id.to_owned()))
        })
        .collect();
    Ok((fresh, horizon))
}

/// A void waiting for its usage (`pending_usage_voids`).
pub(super) struct PendingVoid {
    account_id: String,
    event_source: String,
    event_id: String,
    void_source: String,
    void_id: String,
    void_time: DateTime<Utc>,
    actor: String,
    reason: String,
}

impl PendingVoid {
    /// The void as the item it was when it arrived.
    fn item(&self) -> Item<'_> {
        Item {
            source: &self.void_source,
            id: &self.void_id,
            account_id: &self.account_id,
            time: self.void_time,
            action: Action::VoidUsage {
                event_source: &self.event_source,
                event_id: &self.event_id,
                why: super::Correction {
                    actor: &self.actor,
                    reason: &self.reason,
                },
            },
        }
    }
}

/// The pending voids of the batch's accounts (usually none; the caller matches them to
/// the batch's usage).
pub(super) async fn pending_voids(
    tx: &Transaction<'_>,
    st: &Stmts,
    ids: &[&str],
) -> Result<Vec<PendingVoid>, StoreError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let rows = tx.query(st.get(PENDING_VOIDS), &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|r| PendingVoid {
            account_id: r.get(0),
            event_source: r.get(1),
            event_id: r.get(2),
            void_source: r.get(3),
            void_id: r.get(4),
            void_time: r.get(5),
            actor: r.get(6),
            reason: r.get(7),
        })
        .collect())
}

/// Voids to keep until their usage is charged, gathered for one insert.
#[derive(Default)]
pub(super) struct PendingRows<'a> {
    account_id: Vec<&'a str>,
    event_source: Vec<&'a str>,
    event_id: Vec<&'a str>,
    void_source: Vec<&'a str>,
    void_id: Vec<&'a str>,
    void_time: Vec<DateTime<Utc>>,
    actor: Vec<&'a str>,
    reason: Vec<&'a str>,
}

impl<'a> PendingRows<'a> {
    fn push(&mut self, item: &Item<'a>) {
        if let Action::VoidUsage {
            event_source,
            event_id,
            why,
        } = &item.action
        {
            self.account_id.push(item.account_id);
            self.event_source.push(event_source);
            self.event_id.push(event_id);
            self.void_source.push(item.source);
            self.void_id.push(item.id);
            self.void_time.push(item.time);
            self.actor.push(why.actor);
            self.reason.push(why.reason);
        }
    }

    /// Inserts the new pending voids and deletes those `woken` (applied now).
    async fn write(
        &self,
        tx: &Transaction<'_>,
        st: &Stmts,
        woken: &[(Item<'_>, Decimal)],
    ) -> Result<(), StoreError> {
        let insert = async {
            if !self.account_id.is_empty() {
                tx.execute(
                    st.get(INSERT_PENDING_VOIDS),
                    &[
                        &self.account_id,
                        &self.event_source,
                        &self.event_id,
                        &self.void_source,
                        &self.void_id,
                        &self.void_time,
                        &self.actor,
                        &self.reason,
                    ],
                )
                .await?;
            }
            Ok::<(), StoreError>(())
        };
        let delete = async {
            let mut keys: (Vec<&str>, Vec<&str>, Vec<&str>) = Default::default();
            for (item, _) in woken {
                if let Action::VoidUsage {
                    event_source,
                    event_id,
                    ..
                } = &item.action
                {
                    keys.0.push(item.account_id);
                    keys.1.push(event_source);
                    keys.2.push(event_id);
                }
            }
            if !keys.0.is_empty() {
                tx.execute(st.get(DELETE_PENDING_VOIDS), &[&keys.0, &keys.1, &keys.2])
                    .await?;
            }
            Ok::<(), StoreError>(())
        };
        let (a, b) = futures::join!(insert, delete);
        a?;
        b
    }
}

/// The credits the ledger charged each usage event the batch's fresh voids name, by (account,
/// source, id): the original's own `debit` and `overage` lines (what it was charged,
/// whoever paid; corrections only move a charge), found through its usage claim (which says
/// its account and event time, the key of the entries' event-time index); or, for an
/// original in this same batch, its rated credits. An original not claimed for the void's
/// account is missing (the void then waits for it). Voids are rare: one statement each.
pub(super) async fn charged_usage<'a>(
    tx: &Transaction<'_>,
    fresh: &[&Item<'a>],
) -> Result<BTreeMap<(&'a str, &'a str, &'a str), Decimal>, StoreError> {
    let mut charged = BTreeMap::new();
    for item in fresh {
        let Action::VoidUsage {
            event_source,
            event_id,
            ..
        } = &item.action
        else {
            continue;
        };
        let key = (item.account_id, *event_source, *event_id);
        let in_batch = fresh.iter().find_map(|u| match &u.action {
            Action::Debit(d)
                if u.account_id == item.account_id
                    && u.source == *event_source
                    && u.id == *event_id =>
            {
                Some(d.credits.max(Decimal::ZERO))
            }
            _ => None,
        });
        if let Some(credits) = in_batch {
            charged.insert(key, credits);
            continue;
        }
        let row = tx
            .query_opt(
                "SELECT (SELECT COALESCE(-sum(e.amount), 0) FROM ledger_entries e
                          WHERE e.event_time = p.event_time AND e.account_id = p.account_id
                            AND e.event_source = p.event_source AND e.event_id = p.event_id
                            AND e.kind IN ('debit', 'overage'))
                 FROM processed_events p
                 WHERE p.scope = 'usage' AND p.event_source = $1 AND p.event_id = $2
                   AND p.account_id = $3",
                &[event_source, event_id, &item.account_id],
            )
            .await?;
        if let Some(r) = row {
            charged.insert(key, r.get::<_, Decimal>(0));
        }
    }
    Ok(charged)
}

/// The first item dated before the dedupe horizon, if any.
pub(super) fn before_horizon<'i, 'a>(
    items: &'i [Item<'a>],
    horizon: Option<DateTime<Utc>>,
) -> Option<&'i Item<'a>> {
    let horizon = horizon?;
    items.iter().find(|i| i.time < horizon)
}

/// Accounts locked for one transaction: their books, the grants as loaded (only changed
/// grants are written back) and their alert states.
pub(super) struct Locked {
    pub(super) books: BTreeMap<String, Book>,
    pub(super) loaded: BTreeMap<String, Vec<Grant>>,
    pub(super) alerts: BTreeMap<String, AlertState>,
    /// Accounts whose checkpoint is written back (it changes only when the final point
    /// moves, or when the book is new).
    pub(super) checkpoints: std::collections::BTreeSet<String>,
}

impl Locked {
    /// Keeps the accounts in `ids` only.
    pub(super) fn retain(&mut self, ids: &BTreeSet<&str>) {
        self.books.retain(|id, _| ids.contains(id.as_str()));
        self.loaded.retain(|id, _| ids.contains(id.as_str()));
        self.alerts.retain(|id, _| ids.contains(id.as_str()));
        self.checkpoints.retain(|id| ids.contains(id.as_str()));
    }
}

/// Creates missing accounts, locks them in account_id order (so instances never deadlock),
/// and loads their books and alert state (the three statements in one round trip).
pub(super) async fn lock_accounts(
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

/// The open windows of the given accounts, each from where its replay starts
/// ([`Book::window_from`]; None: every event placed at or after the final point).
pub(super) async fn load_windows(
    tx: &Transaction<'_>,
    st: &Stmts,
    from: &[(&str, Option<DateTime<Utc>>)],
    books: &BTreeMap<String, Book>,
) -> Result<BTreeMap<String, Vec<Placed>>, StoreError> {
    let mut windows: BTreeMap<String, Vec<Placed>> = from
        .iter()
        .map(|(id, _)| ((*id).to_owned(), Vec::new()))
        .collect();
    if from.is_empty() {
        return Ok(windows);
    }
    let ids: Vec<&str> = from.iter().map(|(id, _)| *id).collect();
    // The `at` column is in microseconds (below them: `at_nanos`): from the microsecond
    // before, the book drops what is not after its mark.
    let at: Vec<Option<DateTime<Utc>>> = from
        .iter()
        .map(|(_, t)| t.map(|t| t - chrono::Duration::microseconds(1)))
        .collect();
    let rows = tx.query(st.get(LOAD_WINDOWS), &[&ids, &at]).await?;
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
pub(super) async fn load_folded(
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
pub(super) struct OpenRows<'a> {
    pub(super) account_id: Vec<&'a str>,
    pub(super) at: Vec<DateTime<Utc>>,
    pub(super) at_nanos: Vec<i32>,
    pub(super) source: Vec<String>,
    pub(super) id: Vec<String>,
    pub(super) late: Vec<bool>,
    pub(super) credits: Vec<Option<Decimal>>,
    pub(super) placed: Vec<Option<Json<Placed>>>,
}

impl<'a> OpenRows<'a> {
    pub(super) fn push(&mut self, account_id: &'a str, p: Placed) -> Result<(), StoreError> {
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

    pub(super) async fn insert(&self, tx: &Transaction<'_>, st: &Stmts) -> Result<(), StoreError> {
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

/// An open-window event from its row ([`OPEN_COLUMNS`]): the JSON of its placement, or a
/// usage debit at its own time from its columns.
pub(super) fn placed_from_row(r: &tokio_postgres::Row) -> Placed {
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
pub(super) async fn write_back(
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
pub(super) async fn write_cycles(
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

pub(super) async fn write_alerts(
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

/// Grant ids of the batch that already exist (a purchase delivered twice credits once).
pub(super) async fn known_grants(
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

/// Ledger entry columns, gathered for one multi-row insert.
#[derive(Default)]
pub(super) struct EntryRows<'a> {
    pub(super) account_id: Vec<&'a str>,
    pub(super) kind: Vec<&'static str>,
    pub(super) corrects: Vec<Option<&'static str>>,
    pub(super) grant_id: Vec<Option<String>>,
    pub(super) amount: Vec<Decimal>,
    pub(super) balance_after: Vec<Decimal>,
    pub(super) overage_after: Vec<Decimal>,
    pub(super) effective_at: Vec<DateTime<Utc>>,
    pub(super) late: Vec<bool>,
    pub(super) event_time: Vec<Option<DateTime<Utc>>>,
    pub(super) event_source: Vec<Option<&'a str>>,
    pub(super) event_id: Vec<Option<&'a str>>,
    pub(super) usage_kind: Vec<Option<&'a str>>,
    pub(super) price_version: Vec<Option<&'a str>>,
    pub(super) rule_id: Vec<Option<&'a str>>,
    /// Who made a correction (void, adjustment) and why.
    pub(super) actor: Vec<Option<&'a str>>,
    pub(super) reason: Vec<Option<&'a str>>,
    /// The usage event a reversal line gives back.
    pub(super) reverses_source: Vec<Option<&'a str>>,
    pub(super) reverses_id: Vec<Option<&'a str>>,
}

impl<'a> EntryRows<'a> {
    pub(super) fn len(&self) -> usize {
        self.account_id.len()
    }

    /// `cause`: the event that led to the entry, if any (the scheduler's have none).
    pub(super) fn push(&mut self, account_id: &'a str, cause: Option<&Item<'a>>, e: &Entry) {
        use crate::ledger::buckets::EntryKind;
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
        let why = item.and_then(|i| i.action.correction());
        self.actor.push(why.map(|w| w.actor));
        self.reason.push(why.map(|w| w.reason));
        let reverses = item.and_then(|i| match &i.action {
            Action::VoidUsage {
                event_source,
                event_id,
                ..
            } if e.kind == EntryKind::Reversal => Some((*event_source, *event_id)),
            _ => None,
        });
        self.reverses_source.push(reverses.map(|r| r.0));
        self.reverses_id.push(reverses.map(|r| r.1));
    }

    /// The rows by binary COPY: no statement text or arrays to parse, rows inserted in
    /// groups.
    pub(super) async fn insert(&self, tx: &Transaction<'_>, st: &Stmts) -> Result<(), StoreError> {
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
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
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
                    &self.actor[i],
                    &self.reason[i],
                    &self.reverses_source[i],
                    &self.reverses_id[i],
                ])
                .await?;
        }
        writer.finish().await?;
        Ok(())
    }
}

/// Writes the grants that differ from what was loaded (new, debited, renewed, corrected).
pub(super) async fn write_grants(
    tx: &Transaction<'_>,
    st: &Stmts,
    locked: &Locked,
) -> Result<(), StoreError> {
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
    let mut voided_at = Vec::new();
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
            voided_at.push(g.voided_at);
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
            &voided_at,
        ],
    )
    .await?;
    Ok(())
}

/// When (in event time) the scheduler must next visit a book: its final point lags by a
/// step, its cycle ends, or a live grant expires. The scheduler visits it once `now - grace`
/// reaches that time.
pub(super) fn due_at(book: &Book) -> Option<DateTime<Utc>> {
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

pub(super) async fn write_accounts(
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
