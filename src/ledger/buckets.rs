//! Pure credit-bucket logic at event time: an account's grants, plan and cycles, how a debit
//! consumes the grants live at its time, how time passing (a billing boundary, a grant's
//! expiry) changes them, and the ledger entries each change produces. No IO, no clock: every
//! operation takes the time it happens at, and the account only ever moves forward in event
//! time ([`Account::clock`]). Ordering, the open window and corrections are [`super::book`]'s.

use chrono::{DateTime, Duration, Months, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::cycle;
use crate::event::{GrantKind, OveragePolicy};

/// Default top-up validity.
pub const DEFAULT_TOP_UP_VALIDITY_MONTHS: u32 = 3;

/// Default consumption priority per grant kind (lower is consumed first): allowance first
/// (it is lost at the reset), then promotions, top-ups, packages, manual credits.
pub fn default_priority(kind: GrantKind) -> i32 {
    match kind {
        GrantKind::Allowance => 10,
        GrantKind::Promo => 20,
        GrantKind::TopUp => 30,
        GrantKind::Package => 40,
        GrantKind::Manual => 50,
    }
}

/// A credit bucket. Its credits are always accounted for:
/// `granted = debited + settled + expired + voided + adjusted + remaining`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grant {
    pub grant_id: String,
    pub kind: GrantKind,
    pub priority: i32,
    pub granted: Decimal,
    pub remaining: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    pub granted_at: DateTime<Utc>,
    /// Creation order within the account: among equals, the oldest is consumed first.
    pub seq: i64,
    /// Credits taken by usage.
    #[serde(default)]
    pub debited: Decimal,
    /// Credits that paid earlier overage.
    #[serde(default)]
    pub settled: Decimal,
    /// Credits lost at the expiry.
    #[serde(default)]
    pub expired: Decimal,
    /// Credits removed when the grant was voided (a `void` entry).
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub voided: Decimal,
    /// Credits taken by negative manual adjustments (`adjustment` entries).
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub adjusted: Decimal,
    /// When the grant was voided (event time): it is no longer spendable, and no longer
    /// counts in the total purchased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voided_at: Option<DateTime<Utc>>,
}

impl Grant {
    /// The consumption order: priority, then soonest expiry (never-expiring last), then oldest.
    pub fn order_key(&self) -> (i32, bool, Option<DateTime<Utc>>, i64) {
        (
            self.priority,
            self.expires_at.is_none(),
            self.expires_at,
            self.seq,
        )
    }

    /// Has credits that usage at `at` may spend.
    pub fn live_at(&self, at: DateTime<Utc>) -> bool {
        self.remaining > Decimal::ZERO && self.expires_at.is_none_or(|e| e > at)
    }

    fn conserved(&self) -> bool {
        self.granted
            == self.debited
                + self.settled
                + self.expired
                + self.voided
                + self.adjusted
                + self.remaining
            && self.remaining >= Decimal::ZERO
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// Credits added by a grant.
    Grant,
    /// Credits taken from a grant by usage.
    Debit,
    /// Usage no grant could pay for (recorded, never dropped).
    Overage,
    /// Earlier overage paid from a new grant.
    Settle,
    /// A grant's unused credits lost at its expiry.
    Expiry,
    /// A top-up renewed the validity of a remaining top-up (amount 0).
    Renewal,
    /// A cycle closed: under `bill_overage` the unsettled overage (the amount) is billed with
    /// that cycle (see the cycles table) and the account's overage starts again at zero.
    Reset,
    /// An event arrived out of event-time order: the difference between what the ledger
    /// wrote and what the events give in event-time order, for one kind (`corrects`) of
    /// one grant (or of the overage). Nothing is ever edited in place.
    Correction,
    /// A grant was voided: its remaining credits removed (a mistake corrected by an entry).
    Void,
    /// A manual adjustment: credits added (a bucket of their own, `adjustment:{id}`) or taken
    /// from the live grants in consumption order, with a reason.
    Adjustment,
    /// A voided usage event's credits given back: without a grant, unsettled overage paid
    /// (amount positive: the overage shrinks by it); with one, the rest into a bucket of its
    /// own (`reversal:{source}:{id}` of the original).
    Reversal,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Grant => "grant",
            EntryKind::Debit => "debit",
            EntryKind::Overage => "overage",
            EntryKind::Settle => "settle",
            EntryKind::Expiry => "expiry",
            EntryKind::Renewal => "renewal",
            EntryKind::Reset => "reset",
            EntryKind::Correction => "correction",
            EntryKind::Void => "void",
            EntryKind::Adjustment => "adjustment",
            EntryKind::Reversal => "reversal",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        [
            EntryKind::Grant,
            EntryKind::Debit,
            EntryKind::Overage,
            EntryKind::Settle,
            EntryKind::Expiry,
            EntryKind::Renewal,
            EntryKind::Reset,
            EntryKind::Correction,
            EntryKind::Void,
            EntryKind::Adjustment,
            EntryKind::Reversal,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One line of the ledger. `amount` is signed. How a line moves the two running figures
/// (`balance_after`: the spendable balance, `overage_after`: the unsettled overage), by the
/// kind it has or, for a correction, the kind it corrects:
/// - grant, debit, expiry, renewal, void, adjustment, reversal with a grant: balance += amount;
/// - settle: balance += amount and overage += amount (a negative amount pays overage);
/// - overage, reset, reversal without a grant: overage -= amount (overage is recorded
///   negative, a reset bills it, a reversal pays it back).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: EntryKind,
    /// For a correction: the kind of entry it corrects.
    pub corrects: Option<EntryKind>,
    pub grant_id: Option<String>,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub overage_after: Decimal,
    pub effective_at: DateTime<Utc>,
    /// Usage that arrived after the grace and was charged at the account's current time.
    pub late: bool,
}

impl Entry {
    /// The kind whose rule moves the running figures (a correction moves them as its kind).
    pub fn effect(&self) -> EntryKind {
        self.corrects.unwrap_or(self.kind)
    }

    /// Whether the line moves the overage only (`overage_after -= amount`): an overage, a
    /// reset, or a reversal without a grant (or a correction of one of those).
    pub fn moves_overage(&self) -> bool {
        moves_overage(self.effect(), self.grant_id.is_some())
    }
}

/// [`Entry::moves_overage`] for a line's effect and whether it names a grant.
pub fn moves_overage(effect: EntryKind, has_grant: bool) -> bool {
    match effect {
        EntryKind::Overage | EntryKind::Reset => true,
        EntryKind::Reversal => !has_grant,
        _ => false,
    }
}

/// A grant to add (from a grant event, a plan reset, the API...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewGrant {
    pub grant_id: String,
    pub kind: GrantKind,
    pub credits: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Option<i32>,
}

/// An account's plan: a monthly allowance on a billing day, and its alert thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub plan_id: String,
    pub monthly_allowance: Decimal,
    /// 1..=31 (29–31 fall on the last day of shorter months).
    pub billing_day: u8,
    pub low_balance_credits: Option<Decimal>,
    pub low_balance_percent: Option<Decimal>,
    /// Allowance-used alert thresholds in percent.
    pub allowance_alert_percents: Vec<u32>,
    /// A recharge request is published when spendable credits fall below this (once per
    /// crossing), asking the payment system for `recharge_credits`. Both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recharge_threshold_credits: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recharge_credits: Option<Decimal>,
}

/// The current billing cycle [start, end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cycle {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Credits used in this cycle (debited from grants or recorded as overage).
    pub used: Decimal,
    /// Overage incurred in this cycle.
    pub overage: Decimal,
    /// Of `used`: usage that arrived after the grace and was charged to this cycle.
    #[serde(default)]
    pub late_used: Decimal,
    /// The billing day the cycle was cut with (a change applies from the next boundary).
    #[serde(default = "default_day")]
    pub billing_day: u8,
}

fn default_day() -> u8 {
    1
}

/// A cycle that ended: what the account's billing page reports for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClosedCycle {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub allowance: Decimal,
    pub used: Decimal,
    /// Overage incurred in the cycle.
    pub overage: Decimal,
    /// Unused allowance that expired at the reset (no carry-over).
    pub allowance_expired: Decimal,
    /// Unsettled overage billed with this cycle (`bill_overage` plans), including overage
    /// carried in from before the cycle: no credit of overage disappears.
    #[serde(default)]
    pub overage_billed: Decimal,
    /// Of `used`: usage that arrived after the grace (see [`Cycle::late_used`]).
    #[serde(default)]
    pub late_used: Decimal,
}

/// The grant id of a cycle's allowance: deterministic, so a reset is idempotent.
pub fn allowance_grant_id(cycle_start: DateTime<Utc>) -> String {
    format!(
        "{}{}",
        crate::event::RESERVED_GRANT_PREFIX,
        cycle_start.format("%Y-%m-%d")
    )
}

/// The grant id of a positive manual adjustment's bucket: deterministic, so an adjustment
/// is credited once.
pub fn adjustment_grant_id(adjustment_id: &str) -> String {
    format!("{}{adjustment_id}", crate::event::ADJUSTMENT_GRANT_PREFIX)
}

/// The grant id of the bucket a voided usage event's credits come back into (what paid no
/// overage): deterministic, so a usage event is given back once.
pub fn reversal_grant_id(event_source: &str, event_id: &str) -> String {
    format!(
        "{}{event_source}:{event_id}",
        crate::event::REVERSAL_GRANT_PREFIX
    )
}

/// The shortest cycle a billing-day change may cut.
pub const MIN_IRREGULAR_CYCLE_DAYS: i64 = 14;

/// The end of the cycle that starts at boundary `start`: one month on `new_day` when the
/// billing day stays, else the first boundary of `new_day` at least
/// [`MIN_IRREGULAR_CYCLE_DAYS`] after `start` (so 14 to 44 days), with the allowance share of
/// that irregular cycle (its days over the days of the regular new-day cycle ending with it).
pub fn cycle_after(
    start: DateTime<Utc>,
    old_day: u8,
    new_day: u8,
    allowance: Decimal,
) -> (DateTime<Utc>, Decimal) {
    if old_day == new_day {
        return (cycle::next_boundary(start, new_day), allowance);
    }
    let mut end = cycle::containing(start, new_day).1;
    if end - start < Duration::days(MIN_IRREGULAR_CYCLE_DAYS) {
        end = cycle::next_boundary(end, new_day);
    }
    let regular_start = cycle::containing(end - Duration::seconds(1), new_day).0;
    let days = Decimal::from((end - start).num_days());
    let regular = Decimal::from((end - regular_start).num_days());
    (end, crate::credits::fixed(allowance * days / regular))
}

/// An account's credit state at event time [`Account::clock`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub account_id: String,
    /// Grants that may still be spent, expire or be corrected.
    pub grants: Vec<Grant>,
    /// Unsettled overage credits.
    pub overage: Decimal,
    /// All overage ever recorded, and the part billed at cycle closes.
    #[serde(default)]
    pub overage_incurred: Decimal,
    #[serde(default)]
    pub overage_billed: Decimal,
    /// All overage ever paid from grants (settle entries).
    #[serde(default)]
    pub overage_settled: Decimal,
    /// All overage ever paid back by voided usage (reversal entries without a grant).
    #[serde(default, skip_serializing_if = "Decimal::is_zero")]
    pub overage_reversed: Decimal,
    pub policy: OveragePolicy,
    pub top_up_validity_months: u32,
    /// Highest grant `seq` so far (0: the account never had a grant).
    pub last_seq: i64,
    pub plan: Option<Plan>,
    /// Event time of the plan in force (an older plan event does not revert it).
    #[serde(default)]
    pub plan_time: Option<DateTime<Utc>>,
    pub cycle: Option<Cycle>,
    /// Cycles closed and not yet final (the store records them; the book prunes final ones).
    pub closed: Vec<ClosedCycle>,
    /// Event time up to which the account has been brought (None: nothing yet).
    #[serde(default)]
    pub clock: Option<DateTime<Utc>>,
}

impl Account {
    pub fn new(account_id: impl Into<String>) -> Self {
        Account {
            account_id: account_id.into(),
            grants: Vec::new(),
            overage: Decimal::ZERO,
            overage_incurred: Decimal::ZERO,
            overage_billed: Decimal::ZERO,
            overage_settled: Decimal::ZERO,
            overage_reversed: Decimal::ZERO,
            policy: OveragePolicy::SettleFromNextGrant,
            top_up_validity_months: DEFAULT_TOP_UP_VALIDITY_MONTHS,
            last_seq: 0,
            plan: None,
            plan_time: None,
            cycle: None,
            closed: Vec::new(),
            clock: None,
        }
    }

    /// Applies a plan event dated `time`, at event time `at` (`at` > `time` only for an event
    /// that arrived after the grace). An event older than the plan in force is recorded by
    /// the caller and changes nothing. The first plan starts the cycle containing `at` with
    /// its full allowance; a later plan's allowance and billing day apply from the next
    /// boundary, its policy and thresholds at once.
    pub fn set_plan(
        &mut self,
        plan: Plan,
        policy: OveragePolicy,
        top_up_validity_months: u32,
        time: DateTime<Utc>,
        at: DateTime<Utc>,
        out: &mut Vec<Entry>,
    ) {
        self.advance(at, out);
        if self.plan_time.is_some_and(|p| time < p) {
            return;
        }
        self.plan_time = Some(time);
        self.policy = policy;
        self.top_up_validity_months = top_up_validity_months;
        let day = plan.billing_day;
        let allowance = plan.monthly_allowance;
        self.plan = Some(plan);
        if self.cycle.is_none() {
            let (start, end) = cycle::containing(at, day);
            self.cycle = Some(Cycle {
                start,
                end,
                used: Decimal::ZERO,
                overage: Decimal::ZERO,
                late_used: Decimal::ZERO,
                billing_day: day,
            });
            self.grant_allowance(allowance, at, out);
        }
        self.check();
    }

    /// Brings the account to event time `at`: every boundary passed closes its cycle (the
    /// unused allowance expires, no carry-over; `bill_overage` bills the unsettled overage)
    /// and starts the next with its allowance; every grant whose expiry passed expires. Each
    /// is an entry at the time it happened. Never moves the clock back.
    pub fn advance(&mut self, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        if self.clock.is_some_and(|c| c >= at) {
            return;
        }
        while let Some(c) = self.cycle.clone() {
            if at < c.end {
                break;
            }
            let allowance_id = allowance_grant_id(c.start);
            self.expire_due(c.end, out);
            let (granted, unused) = self
                .grants
                .iter()
                .find(|g| g.grant_id == allowance_id)
                .map_or((Decimal::ZERO, Decimal::ZERO), |g| (g.granted, g.expired));
            let mut billed = Decimal::ZERO;
            if self.policy == OveragePolicy::BillOverage && self.overage > Decimal::ZERO {
                billed = self.overage;
                self.overage = Decimal::ZERO;
                self.overage_billed += billed;
                out.push(self.entry(EntryKind::Reset, None, billed, c.end));
            }
            self.closed.push(ClosedCycle {
                start: c.start,
                end: c.end,
                allowance: granted,
                used: c.used,
                overage: c.overage,
                allowance_expired: unused,
                overage_billed: billed,
                late_used: c.late_used,
            });
            let (day, monthly) = self
                .plan
                .as_ref()
                .map_or((c.billing_day, Decimal::ZERO), |p| {
                    (p.billing_day, p.monthly_allowance)
                });
            let (end, allowance) = cycle_after(c.end, c.billing_day, day, monthly);
            self.cycle = Some(Cycle {
                start: c.end,
                end,
                used: Decimal::ZERO,
                overage: Decimal::ZERO,
                late_used: Decimal::ZERO,
                billing_day: day,
            });
            self.clock = Some(c.end);
            self.grant_allowance(allowance, c.end, out);
        }
        self.expire_due(at, out);
        self.clock = Some(at);
        self.check();
    }

    /// Grants the current cycle's allowance (expiring at the cycle end).
    fn grant_allowance(&mut self, credits: Decimal, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        let Some(c) = &self.cycle else { return };
        if credits <= Decimal::ZERO {
            return;
        }
        let grant = NewGrant {
            grant_id: allowance_grant_id(c.start),
            kind: GrantKind::Allowance,
            credits,
            expires_at: Some(c.end),
            priority: None,
        };
        self.add_grant(&grant, at, out);
    }

    /// Credits of the current cycle's allowance: (granted, remaining).
    pub fn allowance_status(&self) -> Option<(Decimal, Decimal)> {
        let c = self.cycle.as_ref()?;
        let id = allowance_grant_id(c.start);
        let g = self.grants.iter().find(|g| g.grant_id == id)?;
        Some((g.granted, g.remaining))
    }

    /// Credits that usage at `at` can spend.
    pub fn spendable(&self, at: DateTime<Utc>) -> Decimal {
        self.grants
            .iter()
            .filter(|g| g.live_at(at))
            .map(|g| g.remaining)
            .sum()
    }

    /// Sum of remaining credits over all grants not yet expired by an entry.
    pub fn balance(&self) -> Decimal {
        self.grants.iter().map(|g| g.remaining).sum()
    }

    /// The live grants at `at`, in consumption order.
    pub fn consumption_order(&self, at: DateTime<Utc>) -> Vec<&Grant> {
        let mut live: Vec<&Grant> = self.grants.iter().filter(|g| g.live_at(at)).collect();
        live.sort_by_key(|g| g.order_key());
        live
    }

    fn entry(
        &self,
        kind: EntryKind,
        grant_id: Option<String>,
        amount: Decimal,
        at: DateTime<Utc>,
    ) -> Entry {
        Entry {
            kind,
            corrects: None,
            grant_id,
            amount,
            balance_after: self.balance(),
            overage_after: self.overage,
            effective_at: at,
            late: false,
        }
    }

    /// Expires every grant whose expiry is at or before `at`, in expiry order, each as an
    /// entry dated at its expiry time.
    fn expire_due(&mut self, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        loop {
            let due = self
                .grants
                .iter()
                .enumerate()
                .filter(|(_, g)| {
                    g.remaining > Decimal::ZERO && g.expires_at.is_some_and(|e| e <= at)
                })
                .min_by_key(|(_, g)| (g.expires_at, g.seq))
                .map(|(i, _)| i);
            let Some(i) = due else { return };
            let g = &mut self.grants[i];
            let amount = g.remaining;
            let expired_at = g.expires_at.expect("due grants expire");
            g.remaining = Decimal::ZERO;
            g.expired += amount;
            let grant_id = g.grant_id.clone();
            out.push(self.entry(EntryKind::Expiry, Some(grant_id), -amount, expired_at));
        }
    }

    /// Adds a grant at event time `at`. A grant id the account already has changes nothing
    /// (a purchase delivered twice credits once).
    pub fn grant(&mut self, new: &NewGrant, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        self.advance(at, out);
        self.add_grant(new, at, out);
        self.check();
    }

    /// Voids grant `grant_id` at event time `at`: its remaining credits are removed (a `void`
    /// entry, 0 when it is spent out) and it no longer counts as purchased. What it paid
    /// before stays paid. A grant the account does not hold at `at` (unknown, or spent out
    /// and final) or one already voided: nothing changes.
    pub fn void_grant(&mut self, grant_id: &str, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        self.advance(at, out);
        let Some(g) = self
            .grants
            .iter_mut()
            .find(|g| g.grant_id == grant_id && g.voided_at.is_none())
        else {
            return;
        };
        let amount = g.remaining;
        g.remaining = Decimal::ZERO;
        g.voided += amount;
        g.voided_at = Some(at);
        out.push(self.entry(EntryKind::Void, Some(grant_id.to_owned()), -amount, at));
        self.check();
    }

    /// A manual adjustment at event time `at`. Plus: a bucket of its own,
    /// `adjustment:{adjustment_id}` (kind manual, never expires; under
    /// `settle_from_next_grant` it pays unsettled overage first, like any grant). Minus:
    /// taken from the grants live at `at` in consumption order, at most what they hold: a
    /// deduction never creates overage (overage is usage no grant paid, and stays only that,
    /// so corrections of usage always net to zero). An adjustment bucket the account already
    /// holds: nothing changes.
    pub fn adjust(
        &mut self,
        adjustment_id: &str,
        credits: Decimal,
        at: DateTime<Utc>,
        out: &mut Vec<Entry>,
    ) {
        self.advance(at, out);
        if credits > Decimal::ZERO {
            let bucket = NewGrant {
                grant_id: adjustment_grant_id(adjustment_id),
                kind: GrantKind::Manual,
                credits,
                expires_at: None,
                priority: None,
            };
            self.add_grant_as(&bucket, EntryKind::Adjustment, at, out);
        } else if credits < Decimal::ZERO {
            let mut left = -credits;
            for i in self.live_in_order(at) {
                if left.is_zero() {
                    break;
                }
                let g = &mut self.grants[i];
                let take = left.min(g.remaining);
                g.remaining -= take;
                g.adjusted += take;
                left -= take;
                let grant_id = g.grant_id.clone();
                out.push(self.entry(EntryKind::Adjustment, Some(grant_id), -take, at));
            }
        }
        self.check();
    }

    /// Gives back, at event time `at`, the `credits` a voided usage event (`event_source`,
    /// `event_id`) was charged: unsettled overage is paid first (a `reversal` line without a
    /// grant), the rest goes into a bucket of its own (`reversal:{source}:{id}`, kind manual,
    /// never expiring; a `reversal` line). Whatever the policy: overage is what usage owes,
    /// and usage given back owes less. A bucket the account already holds: nothing more
    /// (the store gives a usage event back once; this keeps a replay from doing it twice).
    pub fn reverse_usage(
        &mut self,
        event_source: &str,
        event_id: &str,
        credits: Decimal,
        at: DateTime<Utc>,
        out: &mut Vec<Entry>,
    ) {
        self.advance(at, out);
        if credits <= Decimal::ZERO {
            return;
        }
        let bucket = reversal_grant_id(event_source, event_id);
        if self.grants.iter().any(|g| g.grant_id == bucket) {
            return;
        }
        let paid = self.overage.min(credits);
        if paid > Decimal::ZERO {
            self.overage -= paid;
            self.overage_reversed += paid;
            out.push(self.entry(EntryKind::Reversal, None, paid, at));
        }
        let rest = credits - paid;
        if rest > Decimal::ZERO {
            let new = NewGrant {
                grant_id: bucket,
                kind: GrantKind::Manual,
                credits: rest,
                expires_at: None,
                priority: None,
            };
            self.add_grant_as(&new, EntryKind::Reversal, at, out);
        }
        self.check();
    }

    /// Indices of the grants live at `at`, in consumption order.
    fn live_in_order(&self, at: DateTime<Utc>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| self.grants[i].live_at(at))
            .collect();
        order.sort_by_key(|&i| self.grants[i].order_key());
        order
    }

    /// Adds a grant without bringing the account to `at` first (the caller did).
    fn add_grant(&mut self, new: &NewGrant, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        self.add_grant_as(new, EntryKind::Grant, at, out)
    }

    /// [`Account::add_grant`], its first entry of kind `kind` (a grant, or a positive
    /// adjustment's bucket).
    fn add_grant_as(
        &mut self,
        new: &NewGrant,
        kind: EntryKind,
        at: DateTime<Utc>,
        out: &mut Vec<Entry>,
    ) {
        if self.grants.iter().any(|g| g.grant_id == new.grant_id) {
            return;
        }
        let expires_at = match (new.expires_at, new.kind) {
            (Some(e), _) => Some(e),
            (None, GrantKind::TopUp) => {
                at.checked_add_months(Months::new(self.top_up_validity_months))
            }
            (None, _) => None,
        };
        self.last_seq += 1;
        self.grants.push(Grant {
            grant_id: new.grant_id.clone(),
            kind: new.kind,
            priority: new.priority.unwrap_or_else(|| default_priority(new.kind)),
            granted: new.credits,
            remaining: new.credits,
            expires_at,
            granted_at: at,
            seq: self.last_seq,
            debited: Decimal::ZERO,
            settled: Decimal::ZERO,
            expired: Decimal::ZERO,
            voided: Decimal::ZERO,
            adjusted: Decimal::ZERO,
            voided_at: None,
        });
        out.push(self.entry(kind, Some(new.grant_id.clone()), new.credits, at));
        // Each new top-up renews the validity of every remaining live top-up credit.
        if new.kind == GrantKind::TopUp {
            if let Some(new_expiry) = expires_at {
                let renewed: Vec<String> = self
                    .grants
                    .iter_mut()
                    .filter(|g| {
                        g.kind == GrantKind::TopUp
                            && g.grant_id != new.grant_id
                            && g.live_at(at)
                            && g.expires_at.is_some_and(|e| e < new_expiry)
                    })
                    .map(|g| {
                        g.expires_at = Some(new_expiry);
                        g.grant_id.clone()
                    })
                    .collect();
                for id in renewed {
                    out.push(self.entry(EntryKind::Renewal, Some(id), Decimal::ZERO, at));
                }
            }
        }
        if self.policy == OveragePolicy::SettleFromNextGrant && self.overage > Decimal::ZERO {
            let idx = self.grants.len() - 1;
            let g = &mut self.grants[idx];
            let settled = self.overage.min(g.remaining);
            g.remaining -= settled;
            g.settled += settled;
            self.overage -= settled;
            self.overage_settled += settled;
            let grant_id = g.grant_id.clone();
            out.push(self.entry(EntryKind::Settle, Some(grant_id), -settled, at));
        }
    }

    /// Takes `credits` from the grants live at `at` in consumption order; what they cannot
    /// cover is recorded as overage. `late`: the usage arrived after the grace and is
    /// charged at `at`, the account's current time (it is counted as late usage).
    pub fn debit(&mut self, credits: Decimal, at: DateTime<Utc>, late: bool, out: &mut Vec<Entry>) {
        self.advance(at, out);
        if credits <= Decimal::ZERO {
            return;
        }
        if let Some(c) = &mut self.cycle {
            c.used += credits;
            if late {
                c.late_used += credits;
            }
        }
        let order = self.live_in_order(at);
        let mut left = credits;
        for i in order {
            if left.is_zero() {
                break;
            }
            let g = &mut self.grants[i];
            let take = left.min(g.remaining);
            g.remaining -= take;
            g.debited += take;
            left -= take;
            let grant_id = g.grant_id.clone();
            let mut e = self.entry(EntryKind::Debit, Some(grant_id), -take, at);
            e.late = late;
            out.push(e);
        }
        if left > Decimal::ZERO {
            self.overage += left;
            self.overage_incurred += left;
            if let Some(c) = &mut self.cycle {
                c.overage += left;
            }
            let mut e = self.entry(EntryKind::Overage, None, -left, at);
            e.late = late;
            out.push(e);
        }
        self.check();
    }

    /// The invariants every operation keeps (checked in debug builds): each grant conserves
    /// its credits (granted = debited + settled + expired + remaining, none below zero) and
    /// the overage is what was incurred less what was settled and billed.
    fn check(&self) {
        debug_assert!(
            self.grants.iter().all(Grant::conserved),
            "a grant does not conserve its credits: {:?}",
            self.grants
        );
        debug_assert_eq!(
            self.overage,
            self.overage_incurred
                - self.overage_settled
                - self.overage_billed
                - self.overage_reversed,
            "overage is not incurred - settled - billed - reversed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn t(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, day, 0, 0, 0).unwrap()
    }

    fn new_grant(
        id: &str,
        kind: GrantKind,
        credits: Decimal,
        expires_at: Option<DateTime<Utc>>,
    ) -> NewGrant {
        NewGrant {
            grant_id: id.into(),
            kind,
            credits,
            expires_at,
            priority: None,
        }
    }

    #[test]
    fn consumption_order_priority_expiry_age() {
        let mut a = Account::new("a");
        let mut out = vec![];
        a.grant(
            &new_grant("pkg", GrantKind::Package, dec!(10), None),
            t(1),
            &mut out,
        );
        a.grant(
            &new_grant("promo-late", GrantKind::Promo, dec!(5), Some(t(20))),
            t(1),
            &mut out,
        );
        a.grant(
            &new_grant("promo-soon", GrantKind::Promo, dec!(5), Some(t(10))),
            t(1),
            &mut out,
        );
        a.grant(
            &new_grant("allow", GrantKind::Allowance, dec!(3), Some(t(28))),
            t(1),
            &mut out,
        );
        out.clear();
        a.debit(dec!(12), t(2), false, &mut out);
        let touched: Vec<(&str, Decimal, Decimal)> = out
            .iter()
            .map(|e| (e.grant_id.as_deref().unwrap(), e.amount, e.balance_after))
            .collect();
        assert_eq!(
            touched,
            vec![
                ("allow", dec!(-3), dec!(20)),
                ("promo-soon", dec!(-5), dec!(15)),
                ("promo-late", dec!(-4), dec!(11)),
            ]
        );
        assert_eq!(a.spendable(t(2)), dec!(11));
    }

    #[test]
    fn overage_recorded_then_settled_by_next_grant() {
        let mut a = Account::new("a");
        let mut out = vec![];
        a.grant(
            &new_grant("g1", GrantKind::Package, dec!(2), None),
            t(1),
            &mut out,
        );
        out.clear();
        a.debit(dec!(5.5), t(2), false, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].kind, EntryKind::Overage);
        assert_eq!(out[1].amount, dec!(-3.5));
        assert_eq!(a.overage, dec!(3.5));
        out.clear();
        a.grant(
            &new_grant("g2", GrantKind::TopUp, dec!(10), None),
            t(3),
            &mut out,
        );
        assert_eq!(out.last().unwrap().kind, EntryKind::Settle);
        assert_eq!(out.last().unwrap().amount, dec!(-3.5));
        assert_eq!(out.last().unwrap().balance_after, dec!(6.5));
        assert_eq!(a.overage, Decimal::ZERO);
    }

    #[test]
    fn bill_overage_policy_keeps_overage() {
        let mut a = Account::new("a");
        a.policy = OveragePolicy::BillOverage;
        let mut out = vec![];
        a.debit(dec!(4), t(2), false, &mut out);
        a.grant(
            &new_grant("g", GrantKind::Package, dec!(10), None),
            t(3),
            &mut out,
        );
        assert_eq!(a.overage, dec!(4));
        assert_eq!(a.spendable(t(3)), dec!(10));
    }

    #[test]
    fn top_up_renews_remaining_top_ups_and_expires() {
        let mut a = Account::new("a");
        let mut out = vec![];
        a.grant(
            &new_grant("t1", GrantKind::TopUp, dec!(10), None),
            t(1),
            &mut out,
        );
        assert_eq!(
            a.grants[0].expires_at,
            Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap())
        );
        a.grant(
            &new_grant("t2", GrantKind::TopUp, dec!(5), None),
            t(15),
            &mut out,
        );
        let renewed = Utc.with_ymd_and_hms(2026, 4, 15, 0, 0, 0).unwrap();
        assert!(a.grants.iter().all(|g| g.expires_at == Some(renewed)));
        assert_eq!(out.last().unwrap().kind, EntryKind::Renewal);
        out.clear();
        a.debit(dec!(1), renewed, false, &mut out);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(out[..2]
            .iter()
            .all(|e| e.kind == EntryKind::Expiry && e.effective_at == renewed));
        assert_eq!(out[2].kind, EntryKind::Overage);
        assert_eq!(a.spendable(renewed), Decimal::ZERO);
    }

    #[test]
    fn known_grant_is_idempotent() {
        let mut a = Account::new("a");
        let mut out = vec![];
        let g = new_grant("g", GrantKind::Package, dec!(10), None);
        a.grant(&g, t(1), &mut out);
        a.grant(&g, t(1), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(a.spendable(t(1)), dec!(10));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Grant(u8, i64, Option<u32>),
        Debit(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..5, 1i64..5_000_000, proptest::option::of(1u32..60))
                .prop_map(|(k, c, e)| Op::Grant(k, c, e)),
            (0i64..3_000_000).prop_map(Op::Debit),
        ]
    }

    proptest! {
        /// granted = spent + expired + remaining + settled, no grant below zero, balances
        /// explained line by line, and replaying grants changes nothing.
        #[test]
        fn credits_conserved(ops in proptest::collection::vec(op(), 1..60)) {
            let kinds = [GrantKind::Allowance, GrantKind::Package, GrantKind::TopUp, GrantKind::Promo, GrantKind::Manual];
            let mut a = Account::new("p");
            let mut out = vec![];
            let mut debited = Decimal::ZERO;
            let mut grants = vec![];
            for (i, op) in ops.iter().enumerate() {
                let at = t(1) + chrono::Duration::hours(i as i64 * 13);
                match *op {
                    Op::Grant(k, c, e) => {
                        let g = new_grant(&format!("g{i}"), kinds[k as usize], Decimal::new(c, 6), e.map(|d| at + chrono::Duration::days(d.into())));
                        a.grant(&g, at, &mut out);
                        grants.push(g);
                    }
                    Op::Debit(c) => {
                        let before = out.len();
                        a.debit(Decimal::new(c, 6), at, false, &mut out);
                        debited += Decimal::new(c, 6);
                        // consumption order: no live grant with a smaller key was skipped
                        let touched: Vec<_> = out[before..].iter().filter(|e| e.kind == EntryKind::Debit).collect();
                        for pair in touched.windows(2) {
                            let g0 = a.grants.iter().find(|g| Some(&g.grant_id) == pair[0].grant_id.as_ref()).unwrap();
                            prop_assert_eq!(g0.remaining, Decimal::ZERO, "an earlier grant was left non-empty");
                        }
                    }
                }
                prop_assert!(a.grants.iter().all(|g| g.remaining >= Decimal::ZERO));
            }
            let granted: Decimal = grants.iter().map(|g| g.credits).sum();
            let sum = |k: EntryKind| -> Decimal { out.iter().filter(|e| e.kind == k).map(|e| -e.amount).sum() };
            let remaining: Decimal = a.grants.iter().map(|g| g.remaining).sum();
            prop_assert_eq!(granted, sum(EntryKind::Debit) + sum(EntryKind::Expiry) + remaining + sum(EntryKind::Settle));
            prop_assert_eq!(debited, sum(EntryKind::Debit) + sum(EntryKind::Overage));
            prop_assert_eq!(a.overage, sum(EntryKind::Overage) - sum(EntryKind::Settle));
            // line by line: each balance_after = previous balance_after + amount
            let mut balance = Decimal::ZERO;
            for e in &out {
                if !matches!(e.kind, EntryKind::Overage | EntryKind::Reset) {
                    balance += e.amount;
                }
                prop_assert_eq!(e.balance_after, balance, "{:?}", e);
            }
            // replaying every grant changes nothing
            let snapshot = a.clone();
            let mut replay_out = vec![];
            for g in &grants {
                a.grant(g, a.clock.unwrap(), &mut replay_out);
            }
            prop_assert!(replay_out.is_empty());
            prop_assert_eq!(a, snapshot);
        }
    }

    #[derive(Debug, Clone)]
    enum LifeOp {
        /// Hours to move forward, then an event.
        Grant(u32, u8, i64),
        Debit(u32, i64),
        Plan(u32, u8, i64),
        Tick(u32),
    }

    fn life_op() -> impl Strategy<Value = LifeOp> {
        prop_oneof![
            (0u32..400, 0u8..5, 1i64..50_000_000).prop_map(|(h, k, c)| LifeOp::Grant(h, k, c)),
            (0u32..200, 0i64..30_000_000).prop_map(|(h, c)| LifeOp::Debit(h, c)),
            (0u32..400, 1u8..=31, 0i64..100_000_000).prop_map(|(h, d, a)| LifeOp::Plan(h, d, a)),
            (0u32..2_000).prop_map(LifeOp::Tick),
        ]
    }

    proptest! {
        /// With plans, cycle resets and ticks: credits are conserved (granted = spent +
        /// expired + remaining + overage settled), no grant goes below zero, every reset grants
        /// exactly one allowance per cycle, balances chain line by line, and alerts fire once
        /// per crossing (a key fires again only after an evaluation where it did not hold).
        #[test]
        fn lifecycle_conserves_credits_and_alerts_fire_once_per_crossing(
            ops in proptest::collection::vec(life_op(), 1..50),
            bill_overage in any::<bool>(),
        ) {
            use crate::alerts::{evaluate, AlertDefaults, AlertState};
            let kinds = [GrantKind::Allowance, GrantKind::Package, GrantKind::TopUp, GrantKind::Promo, GrantKind::Manual];
            let mut a = Account::new("p");
            let mut out = vec![];
            let mut state = AlertState::new();
            let defaults = AlertDefaults { low_balance_credits: Some(Decimal::from(5)), ..Default::default() };
            let mut at = t(1);
            let mut debited = Decimal::ZERO;
            let mut held_before: std::collections::BTreeSet<String> = Default::default();
            for (i, op) in ops.iter().enumerate() {
                match *op {
                    LifeOp::Grant(h, k, c) => {
                        at += chrono::Duration::hours(h.into());
                        let kind = kinds[k as usize % kinds.len()];
                        let kind = if kind == GrantKind::Allowance { GrantKind::Package } else { kind };
                        a.grant(&new_grant(&format!("g{i}"), kind, Decimal::new(c, 6), None), at, &mut out);
                    }
                    LifeOp::Debit(h, c) => {
                        at += chrono::Duration::hours(h.into());
                        a.debit(Decimal::new(c, 6), at, false, &mut out);
                        debited += Decimal::new(c, 6);
                    }
                    LifeOp::Plan(h, d, amount) => {
                        at += chrono::Duration::hours(h.into());
                        let plan = Plan {
                            plan_id: format!("plan{i}"),
                            monthly_allowance: Decimal::new(amount, 6),
                            billing_day: d,
                            low_balance_credits: None,
                            low_balance_percent: Some(Decimal::from(25)),
                            allowance_alert_percents: vec![50, 100],
                            recharge_threshold_credits: None,
                            recharge_credits: None,
                        };
                        let policy = if bill_overage { OveragePolicy::BillOverage } else { OveragePolicy::SettleFromNextGrant };
                        a.set_plan(plan, policy, 3, at, at, &mut out);
                    }
                    LifeOp::Tick(h) => {
                        at += chrono::Duration::hours(h.into());
                        a.advance(at, &mut out);
                    }
                }
                prop_assert!(a.grants.iter().all(|g| g.remaining >= Decimal::ZERO && g.remaining <= g.granted));
                // Alerts: a key fires only if it did not hold at the previous evaluation.
                let fired = evaluate(&a, at, &defaults, &mut state);
                for alert in &fired {
                    let key = alert.alert_id.rsplit_once('/').unwrap().0.split_once('/').unwrap().1.to_owned();
                    prop_assert!(!held_before.contains(&key), "{} fired twice in a row", alert.alert_id);
                }
                held_before = state.iter().filter(|(_, s)| s.active).map(|(k, _)| k.clone()).collect();
            }
            let sum = |k: EntryKind| -> Decimal { out.iter().filter(|e| e.kind == k).map(|e| e.amount.abs()).sum() };
            let remaining: Decimal = a.grants.iter().map(|g| g.remaining).sum();
            prop_assert_eq!(sum(EntryKind::Grant), sum(EntryKind::Debit) + sum(EntryKind::Expiry) + remaining + sum(EntryKind::Settle));
            prop_assert_eq!(debited, sum(EntryKind::Debit) + sum(EntryKind::Overage));
            let mut balance = Decimal::ZERO;
            for e in &out {
                if !matches!(e.kind, EntryKind::Overage | EntryKind::Reset) {
                    balance += e.amount;
                }
                prop_assert_eq!(e.balance_after, balance, "{:?}", e);
            }
            // One allowance grant per cycle start, never two.
            let mut allowance_ids: Vec<&str> = out
                .iter()
                .filter(|e| e.kind == EntryKind::Grant)
                .filter_map(|e| e.grant_id.as_deref())
                .filter(|g| g.starts_with("allowance:"))
                .collect();
            let n = allowance_ids.len();
            allowance_ids.dedup();
            prop_assert_eq!(n, allowance_ids.len());
            // Closed cycles tile time: each starts where the previous ended.
            for w in a.closed.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
        }
    }
}
