//! The ledger's pure core: a deterministic state machine (events + book + now -> new book +
//! entries) that makes an account's ledger a function of the SET of its events, whatever
//! their delivery order or batching. No IO: the PostgreSQL store loads a [`Book`] and the
//! account's open window, calls [`Book::apply`] or [`Book::finalize`], and saves the result.
//!
//! A book holds two states of the account ([`Account`]):
//! - the checkpoint: every event before the final point applied in event-time order, and
//!   time brought to the final point (`now - grace`): nothing before it changes any more;
//! - the live state: the checkpoint plus the open window's events (at or after the final
//!   point, kept by the store) in event-time order, ties broken by (time, source, id).
//!
//! An event later than the last one applied is applied to the live state directly (the
//! common, cheap path). An earlier one inside the window is first charged at the live
//! state's time (its own entries), then the window is replayed from the checkpoint in order
//! and the difference, per grant and per kind, is written as correction entries: the ledger
//! stays append-only and every balance is explainable line by line. An event dated before
//! the final point (it arrived after the grace) is never dropped: it is charged at the live
//! state's time and marked late.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::buckets::{allowance_grant_id, Account, ClosedCycle, Entry, EntryKind, NewGrant, Plan};
use crate::event::OveragePolicy;

/// What an event does to its account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Debit {
        credits: Decimal,
    },
    Grant(NewGrant),
    /// The account's plan (allowance, billing day, thresholds), policy and top-up validity.
    Plan {
        plan: Plan,
        overage_policy: OveragePolicy,
        top_up_validity_months: u32,
    },
    /// A grant voided: its remaining credits removed ([`Account::void_grant`]).
    VoidGrant {
        grant_id: String,
    },
    /// A manual adjustment, plus or minus ([`Account::adjust`]).
    Adjust {
        adjustment_id: String,
        credits: Decimal,
    },
    /// A usage event voided: the `credits` it was charged (resolved by the store from its
    /// own ledger lines, or from the usage itself when the void waited for it) given back
    /// ([`Account::reverse_usage`]).
    VoidUsage {
        event_source: String,
        event_id: String,
        credits: Decimal,
    },
}

/// One event for the ledger: its identity, its own time and its effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    pub source: String,
    pub id: String,
    pub action: Action,
}

/// An event placed in the account's event-time order: at its own time, or — when it arrived
/// after the grace (`late`) — at the account's time when it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placed {
    pub at: DateTime<Utc>,
    pub late: bool,
    pub event: Event,
}

/// The total order of an account's events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    pub at: DateTime<Utc>,
    pub source: String,
    pub id: String,
}

impl Placed {
    pub fn key(&self) -> Key {
        Key {
            at: self.at,
            source: self.event.source.clone(),
            id: self.event.id.clone(),
        }
    }

    fn order(&self) -> (DateTime<Utc>, &str, &str) {
        (self.at, &self.event.source, &self.event.id)
    }

    /// Applies the event to `account` at `at` (its place, or later for a provisional charge).
    fn apply_at(&self, account: &mut Account, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        match &self.event.action {
            Action::Debit { credits } => account.debit(*credits, at, self.late, out),
            Action::Grant(g) => account.grant(g, at, out),
            Action::Plan {
                plan,
                overage_policy,
                top_up_validity_months,
            } => account.set_plan(
                plan.clone(),
                *overage_policy,
                *top_up_validity_months,
                self.event.time,
                at,
                out,
            ),
            Action::VoidGrant { grant_id } => account.void_grant(grant_id, at, out),
            Action::Adjust {
                adjustment_id,
                credits,
            } => account.adjust(adjustment_id, *credits, at, out),
            Action::VoidUsage {
                event_source,
                event_id,
                credits,
            } => account.reverse_usage(event_source, event_id, *credits, at, out),
        }
    }
}

/// A ledger entry and the event that caused it: an index into the events given to
/// [`Book::apply`] (None: time passing, from [`Book::finalize`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub entry: Entry,
    pub cause: Option<usize>,
}

/// What [`Book::apply`] did with a batch of the account's events.
#[derive(Debug, Default)]
pub struct Applied {
    pub lines: Vec<Line>,
    /// The events as placed, for the store's open window (same order as given).
    pub placed: Vec<Placed>,
    /// The window was replayed (an event arrived out of order).
    pub replayed: bool,
}

/// An account's checkpoint, live state and the last event applied.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Book {
    pub checkpoint: Account,
    pub live: Account,
    pub last: Option<Key>,
    /// The earliest place in the open window before the first final point (what the
    /// scheduler must finalize first).
    #[serde(default)]
    pub earliest: Option<DateTime<Utc>>,
    /// Counts the changes to the book ([`Book::apply`], [`Book::finalize`]): a cache of the
    /// book's [`Mark`]s is valid for the version it was taken at only.
    #[serde(default)]
    pub version: u64,
    /// States inside the open window a replay may start from (oldest first; never stored:
    /// a book without marks replays from the checkpoint, with the same result).
    #[serde(skip)]
    pub marks: Vec<Mark>,
}

/// Two books are equal when they hold the same ledger: `version` and `marks` only count
/// and cache the way there.
impl PartialEq for Book {
    fn eq(&self, other: &Book) -> bool {
        (&self.checkpoint, &self.live, &self.last, &self.earliest)
            == (&other.checkpoint, &other.live, &other.last, &other.earliest)
    }
}

/// The live state at a point of the open window: the checkpoint and every window event up
/// to `last` applied in order. An event out of order that comes after `last` is replayed
/// from here, with only the window's events after `last`, instead of from the checkpoint
/// with the whole window: what bounds a replay's cost when an account's events arrive a
/// little out of order all day (its topics consumed at slightly different paces).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub last: Key,
    pub state: Account,
}

/// Marks are at least `MARK_SPACING` apart in event time, and thinned to one per doubling
/// of the distance from the newest ([`mark`]), at most `MARKS_KEPT`: an event out of order
/// by `d` replays about `2d` to `4d` of the window (from 5 s up to 5 s x 2^10, about 85
/// minutes; beyond that, from the checkpoint).
pub const MARK_SPACING: chrono::Duration = chrono::Duration::seconds(5);
pub const MARKS_KEPT: usize = 12;

/// What the store rewrites with every batch: the live state and the order's bookkeeping.
/// The checkpoint is stored apart and changes only when the final point moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivePart {
    pub live: Account,
    pub last: Option<Key>,
    #[serde(default)]
    pub earliest: Option<DateTime<Utc>>,
    #[serde(default)]
    pub version: u64,
}

/// [`LivePart`] borrowed from a book, to serialize without copying.
#[derive(Debug, Serialize)]
pub struct LivePartRef<'a> {
    live: &'a Account,
    last: &'a Option<Key>,
    earliest: &'a Option<DateTime<Utc>>,
    version: u64,
}

impl Book {
    /// A book from its two stored parts.
    pub fn from_parts(checkpoint: Account, part: LivePart) -> Book {
        Book {
            checkpoint,
            live: part.live,
            last: part.last,
            earliest: part.earliest,
            version: part.version,
            marks: Vec::new(),
        }
    }

    /// The part rewritten with every batch.
    pub fn live_part(&self) -> LivePartRef<'_> {
        LivePartRef {
            live: &self.live,
            last: &self.last,
            earliest: &self.earliest,
            version: self.version,
        }
    }

    pub fn new(account_id: &str) -> Book {
        Book {
            checkpoint: Account::new(account_id),
            live: Account::new(account_id),
            last: None,
            earliest: None,
            version: 0,
            marks: Vec::new(),
        }
    }

    /// A book for an account whose state predates event-time books: the state is both the
    /// checkpoint and the live state (nothing before it is replayed).
    pub fn from_state(state: Account) -> Book {
        Book {
            checkpoint: state.clone(),
            live: state,
            last: None,
            earliest: None,
            version: 0,
            marks: Vec::new(),
        }
    }

    /// The final point: events dated before it are late.
    pub fn final_at(&self) -> Option<DateTime<Utc>> {
        self.checkpoint.clock
    }

    /// When (in event time) the final point should next move: `step` after the current one,
    /// or — before the first — at the earliest event.
    pub fn next_final(&self, step: chrono::Duration) -> Option<DateTime<Utc>> {
        match self.final_at() {
            Some(f) => Some(f + step),
            None => self.earliest,
        }
    }

    /// Where an event dated `time` goes in the account's order: (its place, late).
    fn placement(&self, time: DateTime<Utc>) -> (DateTime<Utc>, bool) {
        match self.final_at() {
            Some(f) if time < f => (self.live.clock.map_or(f, |c| c.max(f)), true),
            _ => (time, false),
        }
    }

    /// The event placed in the account's order.
    pub fn place(&self, event: &Event) -> Placed {
        let (at, late) = self.placement(event.time);
        Placed {
            at,
            late,
            event: event.clone(),
        }
    }

    /// After everything applied so far: the cheap path applies it as it comes.
    fn in_order(&self, at: DateTime<Utc>, source: &str, id: &str) -> bool {
        self.live.clock.is_none_or(|c| at >= c)
            && self
                .last
                .as_ref()
                .is_none_or(|l| (at, source, id) > (l.at, l.source.as_str(), l.id.as_str()))
    }

    /// Whether applying these events needs the open window (an event out of order).
    pub fn needs_window(&self, events: &[Event]) -> bool {
        events
            .iter()
            .any(|e| !self.in_order(self.placement(e.time).0, &e.source, &e.id))
    }

    /// Where the window a replay of these events reads starts: `Some(t)` when it starts at
    /// a [`Mark`] (the window's events placed at or after `t` are enough), `None` for the
    /// whole open window. Asked only when [`Book::needs_window`] says so.
    pub fn window_from(&self, events: &[Event]) -> Option<DateTime<Utc>> {
        let earliest = events
            .iter()
            .map(|e| self.place(e))
            .min_by(|a, b| a.order().cmp(&b.order()))?;
        self.base(&earliest).map(|m| self.marks[m].last.at)
    }

    /// The newest mark before `earliest` (the earliest event of a replay), if any.
    fn base(&self, earliest: &Placed) -> Option<usize> {
        self.marks.iter().rposition(|m| {
            (m.last.at, m.last.source.as_str(), m.last.id.as_str()) < earliest.order()
        })
    }

    /// Applies the account's new events. `window`: the open window's events (every event
    /// placed at or after [`Book::final_at`], in any order; or only those at or after
    /// [`Book::window_from`], and any more), required when [`Book::needs_window`] says so.
    pub fn apply(&mut self, events: &[Event], window: Option<Vec<Placed>>) -> Applied {
        self.apply_observed(events, window, |_, _| {})
    }

    /// [`Book::apply`], calling `observe` with the live state after each event applied in
    /// order (and once after a replay), at the event's time: alerts are evaluated there.
    pub fn apply_observed(
        &mut self,
        events: &[Event],
        window: Option<Vec<Placed>>,
        mut observe: impl FnMut(&Account, DateTime<Utc>),
    ) -> Applied {
        self.version += 1;
        let placed: Vec<Placed> = events.iter().map(|e| self.place(e)).collect();
        if self.final_at().is_none() {
            let first = placed.iter().map(|p| p.at).min();
            self.earliest = match (self.earliest, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let mut order: Vec<usize> = (0..placed.len()).collect();
        order.sort_by(|&a, &b| placed[a].order().cmp(&placed[b].order()));
        let mut lines = Vec::new();
        let mut out = Vec::new();
        let replay = order.first().is_some_and(|&i| {
            let p = &placed[i];
            !self.in_order(p.at, &p.event.source, &p.event.id)
        });
        if !replay {
            for &i in &order {
                out.clear();
                placed[i].apply_at(&mut self.live, placed[i].at, &mut out);
                lines.extend(out.drain(..).map(|entry| Line {
                    entry,
                    cause: Some(i),
                }));
                let key = placed[i].key();
                mark(&mut self.marks, &self.live, &key);
                self.last = Some(key);
                observe(&self.live, placed[i].at);
            }
        } else {
            let mut window = window.expect("the caller loads the window when needs_window");
            // The replay starts at the newest mark before the earliest event out of order
            // (the marks after it are taken again on the way), or at the checkpoint.
            let base = self.base(&placed[order[0]]);
            self.marks.truncate(base.map_or(0, |m| m + 1));
            let mut canonical = match base {
                Some(m) => {
                    let from = &self.marks[m].last;
                    let from = (from.at, from.source.as_str(), from.id.as_str());
                    window.retain(|p| p.order() > from);
                    self.marks[m].state.clone()
                }
                None => self.checkpoint.clone(),
            };
            // First each event's own entries, charged at the account's time...
            let mut provisional = self.live.clone();
            for &i in &order {
                out.clear();
                let at = provisional
                    .clock
                    .map_or(placed[i].at, |c| c.max(placed[i].at));
                placed[i].apply_at(&mut provisional, at, &mut out);
                lines.extend(out.drain(..).map(|entry| Line {
                    entry,
                    cause: Some(i),
                }));
            }
            // ...then the window replayed in event-time order from the checkpoint...
            window.extend(placed.iter().cloned());
            window.sort_by(|a, b| a.order().cmp(&b.order()));
            window.dedup_by(|a, b| a.order() == b.order());
            for p in &window {
                p.apply_at(&mut canonical, p.at, &mut out);
                mark(&mut self.marks, &canonical, &p.key());
            }
            out.clear();
            if let Some(clock) = provisional.clock {
                canonical.advance(clock, &mut out);
                out.clear();
            }
            // ...and the difference as corrections, caused by the earliest event out of order.
            let at = provisional.clock.expect("events were applied");
            let cause = order[0];
            lines.extend(
                corrections(&provisional, &canonical, at)
                    .into_iter()
                    .map(|entry| Line {
                        entry,
                        cause: Some(cause),
                    }),
            );
            self.live = canonical;
            observe(&self.live, at);
            let newest = window.last().map(Placed::key);
            if newest > self.last {
                self.last = newest;
            }
        }
        self.check();
        Applied {
            lines,
            placed,
            replayed: replay,
        }
    }

    /// Moves the final point to `until` (now - grace): the window's events before it
    /// (`folded`, given by the store, any order) go into the checkpoint, which is brought to
    /// `until`; the live state is brought to `until` too when it is behind (entries for the
    /// resets and expiries that passed). Cycles that closed at or before `until` become final
    /// and are returned; spent grants leave both states. Returns nothing when `until` is not
    /// ahead of the final point.
    pub fn finalize(
        &mut self,
        until: DateTime<Utc>,
        mut folded: Vec<Placed>,
    ) -> (Vec<Line>, Vec<ClosedCycle>) {
        if self.final_at().is_some_and(|f| f >= until) {
            return (Vec::new(), Vec::new());
        }
        self.version += 1;
        // A mark before the new final point would replay without the events folded now.
        self.marks.retain(|m| m.last.at >= until);
        folded.retain(|p| p.at < until);
        folded.sort_by(|a, b| a.order().cmp(&b.order()));
        self.earliest = None; // the window now starts at the final point
        let mut sink = Vec::new();
        for p in &folded {
            p.apply_at(&mut self.checkpoint, p.at, &mut sink);
        }
        self.checkpoint.advance(until, &mut sink);
        let mut out = Vec::new();
        self.live.advance(until, &mut out);
        let lines = out
            .into_iter()
            .map(|entry| Line { entry, cause: None })
            .collect();
        let final_cycles: Vec<ClosedCycle> = self
            .checkpoint
            .closed
            .iter()
            .filter(|c| c.end <= until)
            .cloned()
            .collect();
        let marked = self.marks.iter_mut().map(|m| &mut m.state);
        for state in [&mut self.checkpoint, &mut self.live]
            .into_iter()
            .chain(marked)
        {
            state.closed.retain(|c| c.end > until);
        }
        // Spent grants never change again (nothing adds credits to a grant): both states
        // drop them, except the current allowance (its "used" is still reported).
        let keep_allowance = |a: &Account| a.cycle.as_ref().map(|c| allowance_grant_id(c.start));
        let spent: Vec<String> = self
            .checkpoint
            .grants
            .iter()
            .filter(|g| g.remaining.is_zero())
            .filter(|g| {
                Some(&g.grant_id) != keep_allowance(&self.checkpoint).as_ref()
                    && Some(&g.grant_id) != keep_allowance(&self.live).as_ref()
            })
            .map(|g| g.grant_id.clone())
            .collect();
        let marked = self.marks.iter_mut().map(|m| &mut m.state);
        for state in [&mut self.checkpoint, &mut self.live]
            .into_iter()
            .chain(marked)
        {
            state.grants.retain(|g| !spent.contains(&g.grant_id));
        }
        self.check();
        (lines, final_cycles)
    }

    /// The account as it stands at `now` (resets and expiries up to `now` applied to a copy):
    /// what balances, views and alerts show. Spendable never counts expired credits.
    pub fn view(&self, now: DateTime<Utc>) -> Account {
        let mut view = self.live.clone();
        view.advance(now, &mut Vec::new());
        view
    }

    /// Paired assertions (debug builds): the checkpoint is never ahead of the live state.
    fn check(&self) {
        debug_assert!(
            match (self.checkpoint.clock, self.live.clock) {
                (Some(c), Some(l)) => c <= l,
                (Some(_), None) => false,
                _ => true,
            },
            "the checkpoint is ahead of the live state"
        );
    }
}

/// Takes a mark of `state` (everything up to `last` applied) when the newest is at least
/// [`MARK_SPACING`] older; then keeps the oldest mark of each span [S, 2S), [2S, 4S), ... of
/// distance from the new one (S: the spacing), the newest [`MARKS_KEPT`] of those. As the
/// marks age, each span's oldest moves on to the next span, so every span keeps one.
fn mark(marks: &mut Vec<Mark>, state: &Account, last: &Key) {
    if marks
        .last()
        .is_some_and(|m| last.at - m.last.at < MARK_SPACING)
    {
        return;
    }
    marks.push(Mark {
        last: last.clone(),
        state: state.clone(),
    });
    let spacing = MARK_SPACING.num_milliseconds();
    let span = |m: &Mark| {
        let d = (last.at - m.last.at).num_milliseconds() / spacing;
        u64::BITS - (d.max(0) as u64).leading_zeros()
    };
    // Oldest first, so the first of each span is its oldest.
    let mut previous = None;
    marks.retain(|m| {
        let s = span(m);
        let keep = previous != Some(s);
        previous = Some(s);
        keep
    });
    if marks.len() > MARKS_KEPT {
        marks.drain(..marks.len() - MARKS_KEPT);
    }
}

/// The entries that take `from` to `to`, per grant and per kind: a new grant as a grant
/// entry, every other difference as a correction of the kind it corrects. Credits added
/// come first so no running balance dips below zero.
pub fn corrections(from: &Account, to: &Account, at: DateTime<Utc>) -> Vec<Entry> {
    let mut deltas: Vec<(EntryKind, Option<EntryKind>, Option<String>, Decimal)> = Vec::new();
    let zero = Decimal::ZERO;
    let mut ids: Vec<&str> = to.grants.iter().map(|g| g.grant_id.as_str()).collect();
    for g in &from.grants {
        if !ids.contains(&g.grant_id.as_str()) {
            ids.push(&g.grant_id);
        }
    }
    for id in ids {
        let f = from.grants.iter().find(|g| g.grant_id == id);
        let t = to.grants.iter().find(|g| g.grant_id == id);
        let get = |g: Option<&super::buckets::Grant>,
                   pick: fn(&super::buckets::Grant) -> Decimal| {
            g.map_or(zero, pick)
        };
        let granted = get(t, |g| g.granted) - get(f, |g| g.granted);
        if f.is_none() {
            // A positive adjustment's bucket is added by an adjustment entry.
            let added = if id.starts_with(crate::event::ADJUSTMENT_GRANT_PREFIX) {
                EntryKind::Adjustment
            } else if id.starts_with(crate::event::REVERSAL_GRANT_PREFIX) {
                EntryKind::Reversal
            } else {
                EntryKind::Grant
            };
            deltas.push((added, None, Some(id.to_owned()), granted));
        } else if !granted.is_zero() {
            deltas.push((
                EntryKind::Correction,
                Some(EntryKind::Grant),
                Some(id.to_owned()),
                granted,
            ));
        }
        for (kind, pick) in [
            (
                EntryKind::Debit,
                (|g: &super::buckets::Grant| g.debited) as fn(&super::buckets::Grant) -> Decimal,
            ),
            (EntryKind::Settle, |g| g.settled),
            (EntryKind::Expiry, |g| g.expired),
            (EntryKind::Void, |g| g.voided),
            (EntryKind::Adjustment, |g| g.adjusted),
        ] {
            let d = get(t, pick) - get(f, pick);
            if !d.is_zero() {
                deltas.push((EntryKind::Correction, Some(kind), Some(id.to_owned()), -d));
            }
        }
    }
    let incurred = to.overage_incurred - from.overage_incurred;
    if !incurred.is_zero() {
        deltas.push((
            EntryKind::Correction,
            Some(EntryKind::Overage),
            None,
            -incurred,
        ));
    }
    let reversed = to.overage_reversed - from.overage_reversed;
    if !reversed.is_zero() {
        deltas.push((
            EntryKind::Correction,
            Some(EntryKind::Reversal),
            None,
            reversed,
        ));
    }
    let billed = to.overage_billed - from.overage_billed;
    if !billed.is_zero() {
        deltas.push((EntryKind::Correction, Some(EntryKind::Reset), None, billed));
    }
    deltas.sort_by_key(|(_, _, _, amount)| std::cmp::Reverse(*amount));
    let (mut balance, mut overage) = (from.balance(), from.overage);
    let entries: Vec<Entry> = deltas
        .into_iter()
        .map(|(kind, corrects, grant_id, amount)| {
            let effect = corrects.unwrap_or(kind);
            match effect {
                EntryKind::Settle => {
                    balance += amount;
                    overage += amount;
                }
                _ if super::buckets::moves_overage(effect, grant_id.is_some()) => overage -= amount,
                _ => balance += amount,
            }
            Entry {
                kind,
                corrects,
                grant_id,
                amount,
                balance_after: balance,
                overage_after: overage,
                effective_at: at,
                late: false,
            }
        })
        .collect();
    debug_assert_eq!(
        (balance, overage),
        (to.balance(), to.overage),
        "corrections do not explain the new balance"
    );
    entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::GrantKind;
    use chrono::{Duration, TimeZone};
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    const GRACE: i64 = 24; // hours

    fn at(m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2027, m, d, h, 0, 0).unwrap()
    }

    fn ev(id: &str, time: DateTime<Utc>, action: Action) -> Event {
        Event {
            time,
            source: "s".into(),
            id: id.into(),
            action,
        }
    }

    fn debit(credits: Decimal) -> Action {
        Action::Debit { credits }
    }

    fn grant(
        id: &str,
        kind: GrantKind,
        credits: Decimal,
        expires: Option<DateTime<Utc>>,
    ) -> Action {
        Action::Grant(NewGrant {
            grant_id: id.into(),
            kind,
            credits,
            expires_at: expires,
            priority: None,
        })
    }

    fn plan(allowance: Decimal, day: u8, policy: OveragePolicy) -> Action {
        Action::Plan {
            plan: Plan {
                plan_id: format!("p{day}"),
                monthly_allowance: allowance,
                billing_day: day,
                low_balance_credits: None,
                low_balance_percent: None,
                allowance_alert_percents: vec![],
                recharge_threshold_credits: None,
                recharge_credits: None,
            },
            overage_policy: policy,
            top_up_validity_months: 3,
        }
    }

    /// The store's part, in memory: the open window, and the finals recorded.
    #[derive(Default)]
    struct Harness {
        book: Option<Book>,
        window: Vec<Placed>,
        lines: Vec<Entry>,
        finals: Vec<ClosedCycle>,
        /// Forgets the book's marks before every delivery (a store that lost its cache).
        cold: bool,
    }

    impl Harness {
        fn new() -> Self {
            Harness {
                book: Some(Book::new("a")),
                ..Default::default()
            }
        }

        fn book(&mut self) -> &mut Book {
            self.book.as_mut().unwrap()
        }

        fn deliver(&mut self, events: &[Event]) -> Applied {
            if self.cold {
                self.book().marks.clear();
            }
            let need = self.book().needs_window(events);
            // What the store reads: the window from the mark the replay starts at.
            let window = need.then(|| {
                let from = self.book().window_from(events);
                self.window
                    .iter()
                    .filter(|p| from.is_none_or(|f| p.at >= f))
                    .cloned()
                    .collect()
            });
            let applied = self.book().apply(events, window);
            // Each event's own debit and overage entries charge exactly its credits, and the
            // corrections of a replay only move charges between grants and overage: they net
            // to zero (`tally reconcile` relies on both).
            for (i, e) in events.iter().enumerate() {
                if let Action::Debit { credits } = e.action {
                    let own: Decimal = applied
                        .lines
                        .iter()
                        .filter(|l| l.cause == Some(i))
                        .filter(|l| matches!(l.entry.kind, EntryKind::Debit | EntryKind::Overage))
                        .map(|l| -l.entry.amount)
                        .sum();
                    assert_eq!(own, credits.max(Decimal::ZERO), "event {}", e.id);
                }
            }
            let corrected: Decimal = applied
                .lines
                .iter()
                .filter(|l| l.entry.kind == EntryKind::Correction)
                .filter(|l| {
                    matches!(
                        l.entry.corrects,
                        Some(EntryKind::Debit | EntryKind::Overage)
                    )
                })
                .map(|l| l.entry.amount)
                .sum();
            assert_eq!(corrected, Decimal::ZERO, "corrections changed a charge");
            self.window.extend(applied.placed.iter().cloned());
            self.lines
                .extend(applied.lines.iter().map(|l| l.entry.clone()));
            applied
        }

        fn tick(&mut self, now: DateTime<Utc>) {
            let until = now - Duration::hours(GRACE);
            let folded: Vec<Placed> = self
                .window
                .iter()
                .filter(|p| p.at < until)
                .cloned()
                .collect();
            let (lines, finals) = self.book().finalize(until, folded);
            if self.book().final_at() == Some(until) {
                self.window.retain(|p| p.at >= until);
            }
            self.lines.extend(lines.into_iter().map(|l| l.entry));
            self.finals.extend(finals);
        }
    }

    /// Replays the ledger lines with the documented rules: every running figure matches.
    fn explain(lines: &[Entry]) -> (Decimal, Decimal, BTreeMap<String, Decimal>) {
        let (mut balance, mut overage) = (Decimal::ZERO, Decimal::ZERO);
        let mut per_grant: BTreeMap<String, Decimal> = BTreeMap::new();
        for e in lines {
            match e.effect() {
                EntryKind::Settle => {
                    balance += e.amount;
                    overage += e.amount;
                }
                _ if e.moves_overage() => overage -= e.amount,
                _ => balance += e.amount,
            }
            if let Some(g) = &e.grant_id {
                *per_grant.entry(g.clone()).or_default() += e.amount;
            }
            assert_eq!(
                (e.balance_after, e.overage_after),
                (balance, overage),
                "{e:?}"
            );
        }
        (balance, overage, per_grant)
    }

    use std::collections::BTreeMap;

    fn void(grant_id: &str) -> Action {
        Action::VoidGrant {
            grant_id: grant_id.into(),
        }
    }

    fn adjust(id: &str, credits: Decimal) -> Action {
        Action::Adjust {
            adjustment_id: id.into(),
            credits,
        }
    }

    /// (kind, grant, amount, balance after) of each line.
    fn rows(lines: &[Entry]) -> Vec<(&'static str, Option<&str>, Decimal, Decimal)> {
        lines
            .iter()
            .map(|e| {
                (
                    e.kind.as_str(),
                    e.grant_id.as_deref(),
                    e.amount,
                    e.balance_after,
                )
            })
            .collect()
    }

    #[test]
    fn corrections_survive_the_open_window_as_json() {
        // The store keeps placed events as JSON (open_events.placed) and replays them.
        for action in [void("promo"), adjust("t-1", dec!(-12.5))] {
            let placed = Placed {
                at: at(1, 2, 0),
                late: false,
                event: ev("x", at(1, 2, 0), action),
            };
            let json = serde_json::to_string(&placed).unwrap();
            assert_eq!(
                serde_json::from_str::<Placed>(&json).unwrap(),
                placed,
                "{json}"
            );
        }
    }

    #[test]
    fn a_void_removes_what_is_left_and_what_it_paid_stays_paid() {
        // Package 100 and promo 50 (consumed first); 70 used; the promo voided; 40 used.
        let mut h = Harness::new();
        h.deliver(&[
            ev(
                "pkg",
                at(1, 1, 0),
                grant("pkg", GrantKind::Package, dec!(100), None),
            ),
            ev(
                "promo",
                at(1, 1, 1),
                grant("promo", GrantKind::Promo, dec!(50), None),
            ),
        ]);
        h.deliver(&[ev("u1", at(1, 2, 0), debit(dec!(30)))]);
        h.deliver(&[ev("v", at(1, 3, 0), void("promo"))]);
        // Voided again (another source): nothing more.
        h.deliver(&[Event {
            source: "other".into(),
            ..ev("v2", at(1, 3, 1), void("promo"))
        }]);
        h.deliver(&[ev("u2", at(1, 4, 0), debit(dec!(40)))]);
        assert_eq!(
            rows(&h.lines),
            vec![
                ("grant", Some("pkg"), dec!(100), dec!(100)),
                ("grant", Some("promo"), dec!(50), dec!(150)),
                ("debit", Some("promo"), dec!(-30), dec!(120)),
                ("void", Some("promo"), dec!(-20), dec!(100)),
                ("debit", Some("pkg"), dec!(-40), dec!(60)),
            ]
        );
        let promo = &h.book().live.grants[1];
        assert_eq!(
            (
                promo.remaining,
                promo.debited,
                promo.voided,
                promo.voided_at
            ),
            (dec!(0), dec!(30), dec!(20), Some(at(1, 3, 0)))
        );
        // A void of a grant the account does not hold changes nothing.
        let a = h.deliver(&[ev("v3", at(1, 5, 0), void("nope"))]);
        assert!(a.lines.is_empty());
        let (balance, _, per_grant) = explain(&h.lines);
        assert_eq!((balance, per_grant["promo"]), (dec!(60), dec!(0)));
    }

    #[test]
    fn adjustments_add_a_bucket_or_take_in_consumption_order_never_below_zero() {
        // Prepaid: 20 of overage; +50 settles it first (30 left in its bucket); -45 takes
        // the promo's 10 then 35 of the package (promo 20, package 40, manual 50); -500 takes
        // what is left and no more (a deduction creates no overage).
        let mut h = Harness::new();
        h.deliver(&[ev("u0", at(1, 1, 0), debit(dec!(20)))]);
        h.deliver(&[ev("plus", at(1, 1, 1), adjust("t-1", dec!(50)))]);
        h.deliver(&[
            ev(
                "promo",
                at(1, 1, 2),
                grant("promo", GrantKind::Promo, dec!(10), None),
            ),
            ev(
                "pkg",
                at(1, 1, 3),
                grant("pkg", GrantKind::Package, dec!(100), None),
            ),
        ]);
        h.deliver(&[ev("minus", at(1, 2, 0), adjust("t-2", dec!(-45)))]);
        assert_eq!(
            rows(&h.lines),
            vec![
                ("overage", None, dec!(-20), dec!(0)),
                ("adjustment", Some("adjustment:t-1"), dec!(50), dec!(50)),
                ("settle", Some("adjustment:t-1"), dec!(-20), dec!(30)),
                ("grant", Some("promo"), dec!(10), dec!(40)),
                ("grant", Some("pkg"), dec!(100), dec!(140)),
                ("adjustment", Some("promo"), dec!(-10), dec!(130)),
                ("adjustment", Some("pkg"), dec!(-35), dec!(95)),
            ]
        );
        h.lines.clear();
        h.deliver(&[ev("all", at(1, 3, 0), adjust("t-3", dec!(-500)))]);
        assert_eq!(
            rows(&h.lines),
            vec![
                ("adjustment", Some("pkg"), dec!(-65), dec!(30)),
                ("adjustment", Some("adjustment:t-1"), dec!(-30), dec!(0)),
            ]
        );
        let live = &h.book().live;
        assert_eq!((live.balance(), live.overage), (dec!(0), dec!(0)));
    }

    fn void_usage(id: &str, credits: Decimal) -> Action {
        Action::VoidUsage {
            event_source: "s".into(),
            event_id: id.into(),
            credits,
        }
    }

    #[test]
    fn a_voided_usage_pays_back_overage_first_then_into_a_bucket_of_its_own() {
        // Prepaid: package 100; u1 costs 130 (100 from the package, 30 overage); u1 voided:
        // its 130 come back, 30 pay the overage, 100 go into reversal:s:u1; u2 (10) is paid
        // from that bucket (the package is spent). Voided again: nothing more.
        let mut h = Harness::new();
        h.deliver(&[ev(
            "pkg",
            at(1, 1, 0),
            grant("pkg", GrantKind::Package, dec!(100), None),
        )]);
        h.deliver(&[ev("u1", at(1, 2, 0), debit(dec!(130)))]);
        h.deliver(&[ev("v1", at(1, 3, 0), void_usage("u1", dec!(130)))]);
        h.deliver(&[ev("v1-again", at(1, 3, 1), void_usage("u1", dec!(130)))]);
        h.deliver(&[ev("u2", at(1, 4, 0), debit(dec!(10)))]);
        let rows: Vec<(&str, Option<&str>, Decimal, Decimal, Decimal)> = h
            .lines
            .iter()
            .map(|e| {
                (
                    e.kind.as_str(),
                    e.grant_id.as_deref(),
                    e.amount,
                    e.balance_after,
                    e.overage_after,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("grant", Some("pkg"), dec!(100), dec!(100), dec!(0)),
                ("debit", Some("pkg"), dec!(-100), dec!(0), dec!(0)),
                ("overage", None, dec!(-30), dec!(0), dec!(30)),
                ("reversal", None, dec!(30), dec!(0), dec!(0)),
                (
                    "reversal",
                    Some("reversal:s:u1"),
                    dec!(100),
                    dec!(100),
                    dec!(0)
                ),
                ("debit", Some("reversal:s:u1"), dec!(-10), dec!(90), dec!(0)),
            ]
        );
        let (balance, overage, per_grant) = explain(&h.lines);
        assert_eq!((balance, overage), (dec!(90), dec!(0)));
        assert_eq!(per_grant["reversal:s:u1"], dec!(90));
        let live = &h.book().live;
        assert_eq!((live.overage_reversed, live.overage), (dec!(30), dec!(0)));
    }

    #[test]
    fn a_voided_usage_on_a_billed_overage_plan_lowers_the_overage_billed() {
        // bill_overage, no allowance: u1 (40) is all overage; voided before the cycle closes:
        // nothing is billed for it, and nothing is credited either.
        let mut h = Harness::new();
        h.deliver(&[ev(
            "plan",
            at(1, 1, 0),
            plan(dec!(0), 1, OveragePolicy::BillOverage),
        )]);
        h.deliver(&[ev("u1", at(1, 2, 0), debit(dec!(40)))]);
        h.deliver(&[ev("u2", at(1, 2, 1), debit(dec!(5)))]);
        h.deliver(&[ev("v1", at(1, 3, 0), void_usage("u1", dec!(40)))]);
        h.tick(at(2, 3, 0));
        let billed: Vec<Decimal> = h.finals.iter().map(|c| c.overage_billed).collect();
        assert_eq!(billed, vec![dec!(5)]);
        let (balance, overage, _) = explain(&h.lines);
        assert_eq!((balance, overage), (dec!(0), dec!(0)));
    }

    #[test]
    fn a_voided_usage_gives_the_same_ledger_in_any_arrival_order() {
        // The set: a package, a promo, two usages, the void of the first (its credits as the
        // store resolved them) and a promo dated between them. Every arrival order (the
        // void arriving before usage dated earlier, or before the original: the store keeps
        // such a void until the original is charged, then hands both to the book) gives the
        // same state, and every ledger explains itself line by line.
        let events = [
            ev(
                "pkg",
                at(1, 1, 0),
                grant("pkg", GrantKind::Package, dec!(50), None),
            ),
            ev("u1", at(1, 1, 2), debit(dec!(80))),
            ev(
                "promo",
                at(1, 1, 3),
                grant("promo", GrantKind::Promo, dec!(20), None),
            ),
            ev("u2", at(1, 1, 4), debit(dec!(15))),
            ev("v1", at(1, 1, 5), void_usage("u1", dec!(80))),
        ];
        let mut expected: Option<Account> = None;
        let mut orders: Vec<Vec<usize>> = Vec::new();
        // Every permutation (120).
        fn permute(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
            if k == a.len() {
                out.push(a.clone());
                return;
            }
            for i in k..a.len() {
                a.swap(k, i);
                permute(k + 1, a, out);
                a.swap(k, i);
            }
        }
        permute(0, &mut vec![0, 1, 2, 3, 4], &mut orders);
        for order in orders {
            let mut h = Harness::new();
            for i in &order {
                h.deliver(std::slice::from_ref(&events[*i]));
            }
            let (balance, overage, _) = explain(&h.lines);
            let live = h.book().live.clone();
            assert_eq!((balance, overage), (live.balance(), live.overage));
            match &expected {
                None => expected = Some(live),
                Some(e) => assert_eq!(&live, e, "order {order:?}"),
            }
        }
        // By hand, in event-time order: u1 (80) takes the package's 50, 30 are overage; the
        // promo (20) settles 20 of it (overage 10); u2 (15) is overage (25); v1 gives u1's
        // 80 back: 25 pay the overage, 55 go into reversal:s:u1.
        let live = expected.unwrap();
        assert_eq!((live.balance(), live.overage), (dec!(55), dec!(0)));
        let bucket = live
            .grants
            .iter()
            .find(|g| g.grant_id == "reversal:s:u1")
            .unwrap();
        assert_eq!((bucket.granted, bucket.remaining), (dec!(55), dec!(55)));
    }

    #[test]
    fn a_void_dated_before_usage_it_missed_corrects_as_if_in_order() {
        // The void (dated 03:00) arrives after usage dated 04:00: in event-time order the
        // promo had 50 left to void, and the usage is paid by the package.
        let events = [
            ev(
                "pkg",
                at(1, 1, 0),
                grant("pkg", GrantKind::Package, dec!(100), None),
            ),
            ev(
                "promo",
                at(1, 1, 1),
                grant("promo", GrantKind::Promo, dec!(50), None),
            ),
            ev("v", at(1, 1, 3), void("promo")),
            ev("u", at(1, 1, 4), debit(dec!(30))),
            ev("adj", at(1, 1, 2), adjust("a", dec!(-5))),
        ];
        let mut in_order = Harness::new();
        let mut sorted = events.to_vec();
        sorted.sort_by_key(|e| e.time);
        for e in &sorted {
            in_order.deliver(std::slice::from_ref(e));
        }
        let mut late = Harness::new();
        for i in [0, 1, 3, 2, 4] {
            late.deliver(std::slice::from_ref(&events[i]));
        }
        assert_eq!(in_order.book().live, late.book().live);
        let promo = &late.book().live.grants[1];
        assert_eq!(
            (promo.adjusted, promo.voided, promo.debited),
            (dec!(5), dec!(45), dec!(0))
        );
        let (balance, overage, per_grant) = explain(&late.lines);
        assert_eq!((balance, overage), (dec!(70), dec!(0)));
        assert_eq!((per_grant["pkg"], per_grant["promo"]), (dec!(70), dec!(0)));
        // The corrections name the kinds they correct.
        let corrected: Vec<(Option<EntryKind>, Option<&str>, Decimal)> = late
            .lines
            .iter()
            .filter(|e| e.kind == EntryKind::Correction)
            .map(|e| (e.corrects, e.grant_id.as_deref(), e.amount))
            .collect();
        assert!(
            corrected.contains(&(Some(EntryKind::Void), Some("promo"), dec!(-30))),
            "{corrected:?}"
        );
    }

    #[test]
    fn late_usage_inside_the_grace_uses_the_old_cycle_allowance() {
        // Plan 100/month on day 1; 30 used in January; a 50-credit call dated Jan 31 23:00
        // arrives Feb 1 03:00, after February's first usage (10 at 01:00).
        let mut h = Harness::new();
        h.deliver(&[ev(
            "plan",
            at(1, 1, 0),
            plan(dec!(100), 1, OveragePolicy::BillOverage),
        )]);
        h.deliver(&[ev("u1", at(1, 10, 0), debit(dec!(30)))]);
        h.deliver(&[ev("u2", at(2, 1, 1), debit(dec!(10)))]);
        let late = h.deliver(&[ev("u3", at(1, 31, 23), debit(dec!(50)))]);
        assert!(late.replayed);
        h.tick(at(2, 3, 0));
        // January: 30 + 50 used of 100, 20 expired at the reset; February: 10 of 100.
        assert_eq!(h.finals.len(), 1);
        let jan = &h.finals[0];
        assert_eq!(
            (jan.allowance, jan.used, jan.allowance_expired),
            (dec!(100), dec!(80), dec!(20))
        );
        assert_eq!(
            (jan.overage, jan.overage_billed, jan.late_used),
            (dec!(0), dec!(0), dec!(0))
        );
        let live = &h.book().live;
        assert_eq!(live.balance(), dec!(90));
        assert_eq!(live.cycle.as_ref().unwrap().used, dec!(10));
        let (balance, overage, _) = explain(&h.lines);
        assert_eq!((balance, overage), (dec!(90), dec!(0)));
        // The late call was first charged to February's allowance, then corrected.
        let corrections: Vec<(Option<EntryKind>, &str, Decimal)> = h
            .lines
            .iter()
            .filter(|e| e.kind == EntryKind::Correction)
            .map(|e| (e.corrects, e.grant_id.as_deref().unwrap_or(""), e.amount))
            .collect();
        assert_eq!(
            corrections,
            vec![
                (Some(EntryKind::Expiry), "allowance:2027-01-01", dec!(50)),
                (Some(EntryKind::Debit), "allowance:2027-02-01", dec!(50)),
                (Some(EntryKind::Debit), "allowance:2027-01-01", dec!(-50)),
            ]
        );
    }

    #[test]
    fn usage_after_the_grace_is_charged_now_and_marked_late() {
        let mut h = Harness::new();
        h.deliver(&[ev(
            "plan",
            at(1, 1, 0),
            plan(dec!(100), 1, OveragePolicy::BillOverage),
        )]);
        h.deliver(&[ev("u1", at(2, 1, 1), debit(dec!(10)))]);
        h.tick(at(2, 3, 0)); // January final
        let late = h.deliver(&[ev("u2", at(1, 20, 0), debit(dec!(25)))]);
        assert!(!late.replayed);
        assert!(late.placed[0].late);
        assert_eq!(late.placed[0].at, at(2, 2, 0), "charged at the final point");
        let d = &late.lines[0].entry;
        assert_eq!(
            (d.kind, d.amount, d.late),
            (EntryKind::Debit, dec!(-25), true)
        );
        assert_eq!(d.grant_id.as_deref(), Some("allowance:2027-02-01"));
        h.tick(at(3, 3, 0));
        let feb = h.finals.iter().find(|c| c.start == at(2, 1, 0)).unwrap();
        assert_eq!(
            (feb.used, feb.late_used, feb.allowance_expired),
            (dec!(35), dec!(25), dec!(65))
        );
        let jan = h.finals.iter().find(|c| c.start == at(1, 1, 0)).unwrap();
        assert_eq!((jan.used, jan.allowance_expired), (dec!(0), dec!(100)));
    }

    #[test]
    fn late_usage_across_an_expiry_uses_the_expiring_grant_only_inside_the_grace() {
        // A 30-credit promo expiring Jan 10 00:00 and a 100-credit package. Usage of 20
        // dated Jan 9 23:00 arrives Jan 10 05:00 (inside the grace): it takes the promo, 10
        // of the promo expire instead of 30. The same usage dated Jan 8 23:00 arriving Jan
        // 10 05:00 after the final point moved to Jan 9 00:00 still inside; one dated Jan 7
        // arriving Jan 10 is late: charged at the account's time, from the package.
        let promo_end = at(1, 10, 0);
        let mut h = Harness::new();
        h.deliver(&[
            ev(
                "promo",
                at(1, 1, 0),
                grant("promo", GrantKind::Promo, dec!(30), Some(promo_end)),
            ),
            ev(
                "pkg",
                at(1, 1, 0),
                grant("pkg", GrantKind::Package, dec!(100), None),
            ),
        ]);
        h.deliver(&[ev("u0", at(1, 10, 1), debit(dec!(1)))]); // passes the expiry
        h.tick(at(1, 9, 0) + Duration::hours(GRACE)); // final point Jan 9 00:00
        h.deliver(&[ev("u1", at(1, 9, 23), debit(dec!(20)))]);
        let late = h.deliver(&[ev("u2", at(1, 7, 0), debit(dec!(5)))]);
        assert!(late.placed[0].late);
        h.tick(at(1, 12, 0));
        let live = &h.book().live;
        let pkg = live.grants.iter().find(|g| g.grant_id == "pkg").unwrap();
        assert_eq!((pkg.debited, pkg.remaining), (dec!(6), dec!(94)));
        let (balance, _, per_grant) = explain(&h.lines);
        assert_eq!(balance, dec!(94));
        // The promo: 20 used, 10 expired (its lines sum to 0 left).
        let promo_lines: Decimal = h
            .lines
            .iter()
            .filter(|e| e.grant_id.as_deref() == Some("promo"))
            .filter(|e| e.effect() == EntryKind::Expiry)
            .map(|e| e.amount)
            .sum();
        assert_eq!(promo_lines, dec!(-10));
        assert_eq!(per_grant["promo"], dec!(0));
    }

    #[test]
    fn an_earlier_top_up_arriving_late_pays_the_usage_it_covered() {
        // Prepaid: a 100-credit package, a 150-credit call at 10:00 (100 from the package, 50
        // overage), then a 500-credit top-up dated 09:00 arrives: in event-time order the
        // call is paid from the top-up (priority 30 before the package's 40): top-up 350
        // left, package 100, no overage.
        let mut h = Harness::new();
        h.deliver(&[ev(
            "pkg",
            at(1, 1, 0),
            grant("pkg", GrantKind::Package, dec!(100), None),
        )]);
        h.deliver(&[ev("call", at(1, 5, 10), debit(dec!(150)))]);
        h.deliver(&[ev(
            "top",
            at(1, 5, 9),
            grant("top", GrantKind::TopUp, dec!(500), None),
        )]);
        let live = &h.book().live;
        let remaining: Vec<(&str, Decimal)> = live
            .grants
            .iter()
            .map(|g| (g.grant_id.as_str(), g.remaining))
            .collect();
        assert_eq!(remaining, vec![("pkg", dec!(100)), ("top", dec!(350))]);
        assert_eq!(live.overage, dec!(0));
        let (balance, overage, per_grant) = explain(&h.lines);
        assert_eq!((balance, overage), (dec!(450), dec!(0)));
        assert_eq!(per_grant["pkg"], dec!(100));
        assert_eq!(per_grant["top"], dec!(350));
    }

    /// Marks taken every 5 s for 3 hours: after each, an event out of order by any `d`
    /// from 5 s to an hour finds a mark at most `4d` back (the replay reads at most that),
    /// and never more than MARKS_KEPT are kept.
    #[test]
    fn marks_thin_to_one_per_doubling_of_the_distance() {
        let start = at(3, 1, 0);
        let state = Account::new("a");
        let mut marks = Vec::new();
        for i in 0..(3 * 3600 / 5) {
            let head = start + Duration::seconds(5 * i);
            let key = Key {
                at: head,
                source: "s".into(),
                id: format!("e{i}"),
            };
            mark(&mut marks, &state, &key);
            assert!(marks.len() <= MARKS_KEPT);
            assert_eq!(marks.last().unwrap().last.at, head);
            for d in [5, 7, 30, 61, 300, 999, 3600] {
                let late = head - Duration::seconds(d);
                if late - start < Duration::seconds(4 * d) {
                    continue; // the marks cannot go back before the first one
                }
                let base = marks.iter().rev().find(|m| m.last.at < late);
                let back = head - base.expect("a mark before").last.at;
                assert!(
                    back <= Duration::seconds(4 * d),
                    "{i}: {d} s late replays {back}"
                );
            }
        }
    }

    /// A replay that starts at a mark taken before the final point moved past a spent
    /// grant: the mark forgets the grant as the checkpoint and the live state do, so the
    /// replay writes what one from the checkpoint writes.
    #[test]
    fn a_replay_from_a_mark_matches_one_from_the_checkpoint_across_a_final_point() {
        let events = [
            // A plan whose cycle closes on 3-02 00:00, before the final point.
            ev(
                "p",
                at(2, 20, 0),
                plan(dec!(0), 2, OveragePolicy::BillOverage),
            ),
            ev(
                "g1",
                at(3, 1, 0),
                grant("g1", GrantKind::Package, dec!(100), None),
            ),
            ev("d1", at(3, 1, 1), debit(dec!(100))),
            ev(
                "g2",
                at(3, 2, 6),
                grant("g2", GrantKind::Package, dec!(50), None),
            ),
            ev("d2", at(3, 2, 7), debit(dec!(10))),
        ];
        let late = ev("d3", at(3, 2, 6) + Duration::minutes(30), debit(dec!(5)));
        let mut hot = Harness::new();
        let mut cold = Harness::new();
        cold.cold = true;
        for h in [&mut hot, &mut cold] {
            for e in &events {
                h.deliver(std::slice::from_ref(e));
            }
            h.tick(at(3, 3, 2)); // final point 3-02 02:00: g1 is spent before it
        }
        assert_eq!(
            hot.book()
                .marks
                .iter()
                .map(|m| m.last.id.as_str())
                .collect::<Vec<_>>(),
            ["g2", "d2"],
            "the marks after the final point stay"
        );
        assert_eq!(
            hot.book().window_from(std::slice::from_ref(&late)),
            Some(at(3, 2, 6))
        );
        for h in [&mut hot, &mut cold] {
            assert!(h.deliver(std::slice::from_ref(&late)).replayed);
        }
        assert_eq!(hot.lines, cold.lines);
        assert_eq!(hot.book, cold.book);
        let live = &hot.book.as_ref().unwrap().live;
        assert_eq!(live.balance(), dec!(35)); // 50 - 10 - 5
        assert!(live.closed.is_empty(), "{:?}", live.closed);
        assert!(!live.grants.iter().any(|g| g.grant_id == "g1"));
    }

    #[test]
    fn an_older_plan_does_not_revert_the_newer_one() {
        let mut h = Harness::new();
        h.deliver(&[ev(
            "p2",
            at(1, 10, 0),
            plan(dec!(200), 1, OveragePolicy::BillOverage),
        )]);
        h.tick(at(1, 20, 0));
        // Dated before the final point: late, recorded, and the plan in force stays.
        let a = h.deliver(&[ev(
            "p1",
            at(1, 5, 0),
            plan(dec!(50), 1, OveragePolicy::SettleFromNextGrant),
        )]);
        assert!(a.placed[0].late);
        let live = &h.book().live;
        assert_eq!(live.plan.as_ref().unwrap().monthly_allowance, dec!(200));
        assert_eq!(live.policy, OveragePolicy::BillOverage);
    }

    #[test]
    fn a_billing_day_change_cuts_one_prorated_cycle() {
        // Day 20 -> 5, changed Mar 1: the cycle Mar 20 - Apr 5 (16 days) gets 3000 x 16/31.
        let mut h = Harness::new();
        h.deliver(&[ev(
            "p",
            at(2, 25, 0),
            plan(dec!(3000), 20, OveragePolicy::BillOverage),
        )]);
        h.deliver(&[ev(
            "p2",
            at(3, 1, 0),
            plan(dec!(3000), 5, OveragePolicy::BillOverage),
        )]);
        h.tick(at(4, 10, 0));
        let c = h.book().live.cycle.clone().unwrap();
        assert_eq!((c.start, c.end), (at(4, 5, 0), at(5, 5, 0)));
        let mar = h.finals.iter().find(|c| c.start == at(3, 20, 0)).unwrap();
        assert_eq!((mar.end, mar.allowance), (at(4, 5, 0), dec!(1548.387097)));
        // Day 20 -> 25: 5 days is too short, the cycle runs to the next 25th (36 days).
        assert_eq!(
            buckets_cycle_after(at(3, 20, 0), 20, 25, dec!(3000)),
            (at(4, 25, 0), dec!(3483.870968))
        );
    }

    fn buckets_cycle_after(
        start: DateTime<Utc>,
        old: u8,
        new: u8,
        allowance: Decimal,
    ) -> (DateTime<Utc>, Decimal) {
        super::super::buckets::cycle_after(start, old, new, allowance)
    }

    proptest! {
        /// Any irregular cycle is 14 to 44 days long.
        #[test]
        fn billing_day_changes_cut_14_to_44_days(secs in 1_700_000_000i64..2_100_000_000, old in 1u8..=31, new in 1u8..=31) {
            let b = crate::ledger::cycle::containing(Utc.timestamp_opt(secs, 0).unwrap(), old).0;
            let (end, _) = buckets_cycle_after(b, old, new, dec!(100));
            let days = (end - b).num_days();
            prop_assert!((14..=44).contains(&days) || (old == new && (28..=31).contains(&days)), "{} days", days);
        }
    }

    #[derive(Debug, Clone)]
    enum Gen {
        Grant(u8, i64, Option<u16>),
        Debit(i64),
        Plan(i64, u8, bool),
        /// Voids the grant of the event with this index (if it is a grant).
        Void(u8),
        Adjust(i64),
        /// Voids a usage event (its own: the store voids an original once) with these
        /// credits (what the store would have resolved; any amount, the book does not check
        /// it against the original).
        VoidUsage(i64),
    }

    fn gen_event() -> impl Strategy<Value = (u32, Gen, u32)> {
        // (minutes after the start, what, arrival delay in minutes below the grace)
        let what = prop_oneof![
            3 => (0u8..5, 1i64..80_000_000, proptest::option::of(1u16..1_500))
                .prop_map(|(k, c, e)| Gen::Grant(k, c, e)),
            8 => (0i64..20_000_000).prop_map(Gen::Debit),
            1 => (0i64..60_000_000, 1u8..=31, any::<bool>()).prop_map(|(a, d, b)| Gen::Plan(a, d, b)),
            1 => (0u8..60).prop_map(Gen::Void),
            1 => (-30_000_000i64..30_000_000).prop_map(Gen::Adjust),
            1 => (0i64..20_000_000).prop_map(Gen::VoidUsage),
        ];
        // Dense (out-of-order arrivals are frequent) or spread over months (cycles close).
        let minute = prop_oneof![
            0u32..(3 * 24 * 60),
            0u32..(25 * 24 * 60),
            0u32..(80 * 24 * 60)
        ];
        (minute, what, 0u32..(GRACE as u32 * 60))
    }

    fn build(specs: &[(u32, Gen, u32)]) -> Vec<(Event, DateTime<Utc>)> {
        let kinds = [
            GrantKind::Allowance,
            GrantKind::Package,
            GrantKind::TopUp,
            GrantKind::Promo,
            GrantKind::Manual,
        ];
        let start = at(1, 1, 0);
        specs
            .iter()
            .enumerate()
            .map(|(i, (m, g, delay))| {
                let time = start + Duration::minutes((*m).into());
                let action = match g {
                    Gen::Grant(k, c, e) => grant(
                        &format!("g{i}"),
                        kinds[*k as usize],
                        Decimal::new(*c, 6),
                        e.map(|h| time + Duration::hours(h.into())),
                    ),
                    Gen::Debit(c) => debit(Decimal::new(*c, 6)),
                    Gen::Plan(a, d, b) => plan(
                        Decimal::new(*a, 6),
                        *d,
                        if *b {
                            OveragePolicy::BillOverage
                        } else {
                            OveragePolicy::SettleFromNextGrant
                        },
                    ),
                    Gen::Void(k) => void(&format!("g{k}")),
                    Gen::Adjust(c) => adjust(&format!("a{i}"), Decimal::new(*c, 6)),
                    Gen::VoidUsage(c) => Action::VoidUsage {
                        event_source: "y".into(),
                        event_id: format!("voided-{i}"),
                        credits: Decimal::new(*c, 6),
                    },
                };
                // Ids share their time's order only by chance: ties break by (source, id).
                let source = if i % 3 == 0 { "x" } else { "y" };
                let event = Event {
                    time,
                    source: source.into(),
                    id: format!("e{i}"),
                    action,
                };
                (event, time + Duration::minutes((*delay).into()))
            })
            .collect()
    }

    /// Delivers events in the given order, in batches of the given sizes, ticking at the
    /// arrival time of the last delivered event when asked; then brings both to `end`.
    fn run(
        events: &[(Event, DateTime<Utc>)],
        order: &[usize],
        batches: &[(usize, bool)],
        end: DateTime<Utc>,
    ) -> Harness {
        run_with(events, order, batches, end, false)
    }

    /// [`run`], `cold`: without the book's marks (every replay from the checkpoint).
    fn run_with(
        events: &[(Event, DateTime<Utc>)],
        order: &[usize],
        batches: &[(usize, bool)],
        end: DateTime<Utc>,
        cold: bool,
    ) -> Harness {
        let mut h = Harness::new();
        h.cold = cold;
        let mut i = 0;
        let mut b = 0;
        let mut now = at(1, 1, 0);
        while i < order.len() {
            let (size, tick) = batches.get(b).copied().unwrap_or((1, false));
            b += 1;
            let chunk: Vec<usize> = order[i..(i + size.max(1)).min(order.len())].to_vec();
            i += chunk.len();
            let batch: Vec<Event> = chunk.iter().map(|&k| events[k].0.clone()).collect();
            h.deliver(&batch);
            now = now.max(chunk.iter().map(|&k| events[k].1).max().unwrap());
            if tick {
                h.tick(now);
            }
        }
        h.tick(end);
        h
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        /// Events arriving up to three graces late: every usage credit is charged exactly
        /// once, grants conserve their credits and the lines explain every balance.
        #[test]
        fn late_arrivals_are_charged_exactly_once(
            specs in proptest::collection::vec(gen_event(), 1..60),
            extra in proptest::collection::vec(0u32..(3 * GRACE as u32 * 60), 60),
            batches in proptest::collection::vec((1usize..6, any::<bool>()), 0..40),
        ) {
            let mut events = build(&specs);
            for (e, x) in events.iter_mut().zip(extra) {
                e.1 += Duration::minutes(x.into());
            }
            let mut arrival: Vec<usize> = (0..events.len()).collect();
            arrival.sort_by_key(|&k| events[k].1);
            let h = run(&events, &arrival, &batches, at(6, 1, 0));
            let usage: Decimal = events
                .iter()
                .map(|(e, _)| match e.action { Action::Debit { credits } => credits, _ => Decimal::ZERO })
                .sum();
            let charged: Decimal = h
                .lines
                .iter()
                .filter(|e| matches!(e.effect(), EntryKind::Debit | EntryKind::Overage))
                .map(|e| e.amount)
                .sum();
            prop_assert_eq!(-charged, usage);
            let (balance, overage, per_grant) = explain(&h.lines);
            let live = &h.book.as_ref().unwrap().live;
            prop_assert_eq!(balance, live.balance());
            prop_assert_eq!(overage, live.overage);
            for g in &live.grants {
                prop_assert_eq!(per_grant.get(&g.grant_id).copied().unwrap_or_default(), g.remaining);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        /// The same events, every one arriving within the grace, give the same account in
        /// any delivery order and batching: grants, spendable, overage, closed cycles; credits
        /// are conserved; the lines explain every balance.
        #[test]
        fn same_events_same_bill_in_any_order(
            specs in proptest::collection::vec(gen_event(), 1..60),
            batches in proptest::collection::vec((1usize..6, any::<bool>()), 0..40),
            seed in any::<u64>(),
        ) {
            use rand::{seq::SliceRandom, SeedableRng};
            let events = build(&specs);
            let end = at(6, 1, 0);
            // Reference: event-time order, one event per batch, no tick until the end.
            let mut by_time: Vec<usize> = (0..events.len()).collect();
            by_time.sort_by(|&a, &b| {
                let (ea, eb) = (&events[a].0, &events[b].0);
                (ea.time, &ea.source, &ea.id).cmp(&(eb.time, &eb.source, &eb.id))
            });
            let reference = run(&events, &by_time, &[], end);
            // Arrival order (time + delay below the grace), ties shuffled.
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut arrival: Vec<usize> = (0..events.len()).collect();
            arrival.shuffle(&mut rng);
            arrival.sort_by_key(|&k| events[k].1);
            let other = run(&events, &arrival, &batches, end);
            // Replays from marks write the same lines as replays from the checkpoint.
            let cold = run_with(&events, &arrival, &batches, end, true);
            prop_assert_eq!(&other.lines, &cold.lines);
            prop_assert_eq!(&other.book, &cold.book);
            let usage: Decimal = events
                .iter()
                .map(|(e, _)| match e.action { Action::Debit { credits } => credits, _ => Decimal::ZERO })
                .sum();
            for h in [&reference, &other] {
                let charged: Decimal = h
                    .lines
                    .iter()
                    .filter(|e| matches!(e.effect(), EntryKind::Debit | EntryKind::Overage))
                    .map(|e| e.amount)
                    .sum();
                prop_assert_eq!(-charged, usage, "every usage credit is charged exactly once");
                let (balance, overage, per_grant) = explain(&h.lines);
                let live = &h.book.as_ref().unwrap().live;
                prop_assert_eq!(balance, live.balance());
                prop_assert_eq!(overage, live.overage);
                for g in &live.grants {
                    prop_assert_eq!(per_grant.get(&g.grant_id).copied().unwrap_or_default(), g.remaining, "{}", g.grant_id);
                }
                prop_assert_eq!(live.overage, live.overage_incurred - live.overage_settled - live.overage_billed - live.overage_reversed);
            }
            let (r, o) = (&reference.book.as_ref().unwrap().live, &other.book.as_ref().unwrap().live);
            prop_assert_eq!(&r.grants, &o.grants);
            prop_assert_eq!(r.spendable(end), o.spendable(end));
            prop_assert_eq!(r.overage, o.overage);
            prop_assert_eq!(&r.cycle, &o.cycle);
            prop_assert_eq!(&reference.finals, &other.finals);
            prop_assert_eq!(reference.book, other.book);
        }
    }
}

/// Two topics drifting apart, with the final point moving between their batches.
#[cfg(test)]
mod interleaving_tests {
    use super::*;
    use crate::event::GrantKind;
    use chrono::{Duration, TimeZone};
    use rust_decimal_macros::dec;

    #[test]
    fn two_topics_drifting_apart_with_ticks_charge_every_event_once() {
        let now = Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap();
        let start = now - Duration::days(5);
        let mut book = Book::new("a");
        let mut window: Vec<Placed> = vec![];
        let mut lines = vec![];
        let mut deliver = |book: &mut Book, window: &mut Vec<Placed>, evs: Vec<Event>| {
            let need = book.needs_window(&evs);
            let w = need.then(|| window.clone());
            let a = book.apply(&evs, w);
            window.extend(a.placed);
            lines.extend(a.lines.into_iter().map(|l| l.entry));
        };
        deliver(
            &mut book,
            &mut window,
            vec![Event {
                time: start,
                source: "grants".into(),
                id: "g1".into(),
                action: Action::Grant(NewGrant {
                    grant_id: "g1".into(),
                    kind: GrantKind::Package,
                    credits: dec!(1000),
                    expires_at: None,
                    priority: None,
                }),
            }],
        );
        let evs: Vec<Event> = (0..240)
            .map(|i| Event {
                time: start + Duration::minutes(30 * i),
                source: if i % 2 == 0 {
                    "calls".into()
                } else {
                    "chat".into()
                },
                id: format!("u{i:03}"),
                action: Action::Debit { credits: dec!(10) },
            })
            .collect();
        let (calls, chat): (Vec<_>, Vec<_>) = evs.into_iter().partition(|e| e.source == "calls");
        let mut a = calls.chunks(7);
        let mut c = chat.chunks(3);
        let mut n = 0;
        let mut t = now;
        loop {
            let x = a.next();
            let y = c.next();
            if x.is_none() && y.is_none() {
                break;
            }
            for chunk in [x, y].into_iter().flatten() {
                deliver(&mut book, &mut window, chunk.to_vec());
            }
            n += 1;
            if n % 4 == 0 {
                t += Duration::milliseconds(10);
                let until = t - Duration::hours(24);
                let folded: Vec<Placed> = window.iter().filter(|p| p.at < until).cloned().collect();
                book.finalize(until, folded);
                window.retain(|p| p.at >= until);
            }
        }
        assert_eq!(book.live.overage, dec!(1400));
    }
}
