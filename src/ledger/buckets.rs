//! Pure credit-bucket logic: an account's grants, how a debit consumes them, how grants
//! expire, and the ledger entries each change produces. No IO, no clock: every operation
//! takes the time it happens at. The store loads an [`Account`], applies events here, and
//! writes back the grants marked dirty and the entries returned.

use chrono::{DateTime, Months, Utc};
use rust_decimal::Decimal;

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

#[derive(Debug, Clone, PartialEq)]
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
    /// Changed since loaded: the store writes it back.
    pub dirty: bool,
}

impl Grant {
    /// The consumption order: priority, then soonest expiry (never-expiring last), then oldest.
    fn order_key(&self) -> (i32, bool, Option<DateTime<Utc>>, i64) {
        (
            self.priority,
            self.expires_at.is_none(),
            self.expires_at,
            self.seq,
        )
    }

    fn live_at(&self, at: DateTime<Utc>) -> bool {
        self.remaining > Decimal::ZERO && self.expires_at.is_none_or(|e| e > at)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// A cycle closed with billable overage (bill_overage plans): the overage is reported for
    /// that cycle (see the cycles table) and the new cycle starts at zero (amount 0).
    Reset,
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
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One line of the ledger. `amount` is signed (credits added to the spendable balance are
/// positive); `balance_after` is the spendable balance and `overage_after` the unsettled
/// overage once this line is applied, so a balance can be explained line by line.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: EntryKind,
    pub grant_id: Option<String>,
    pub amount: Decimal,
    pub balance_after: Decimal,
    pub overage_after: Decimal,
    pub effective_at: DateTime<Utc>,
}

/// A grant to add (from a grant event, a plan reset, the API...).
#[derive(Debug, Clone, PartialEq)]
pub struct NewGrant {
    pub grant_id: String,
    pub kind: GrantKind,
    pub credits: Decimal,
    pub expires_at: Option<DateTime<Utc>>,
    pub priority: Option<i32>,
}

/// An account's plan: a monthly allowance on a billing day, and its alert thresholds.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub plan_id: String,
    pub monthly_allowance: Decimal,
    /// 1..=31 (29–31 fall on the last day of shorter months).
    pub billing_day: u8,
    pub low_balance_credits: Option<Decimal>,
    pub low_balance_percent: Option<Decimal>,
    /// Allowance-used alert thresholds in percent.
    pub allowance_alert_percents: Vec<u32>,
}

/// The current billing cycle [start, end).
#[derive(Debug, Clone, PartialEq)]
pub struct Cycle {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Credits used in this cycle (debited from grants or recorded as overage).
    pub used: Decimal,
    /// Overage incurred in this cycle.
    pub overage: Decimal,
}

/// A cycle that ended: what the account's billing page reports for it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedCycle {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub allowance: Decimal,
    pub used: Decimal,
    pub overage: Decimal,
    /// Unused allowance that expired at the reset (no carry-over).
    pub allowance_expired: Decimal,
}

/// The grant id of a cycle's allowance: deterministic, so a reset is idempotent.
pub fn allowance_grant_id(cycle_start: DateTime<Utc>) -> String {
    format!(
        "{}{}",
        crate::event::RESERVED_GRANT_PREFIX,
        cycle_start.format("%Y-%m-%d")
    )
}

/// An account's credit state as far as the ledger needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub account_id: String,
    /// Grants that may still be spent or expire, plus every grant touched since loading.
    pub grants: Vec<Grant>,
    /// Unsettled overage credits.
    pub overage: Decimal,
    pub policy: OveragePolicy,
    pub top_up_validity_months: u32,
    /// Highest grant `seq` so far (0: the account never had a grant).
    pub last_seq: i64,
    pub plan: Option<Plan>,
    pub cycle: Option<Cycle>,
    /// Cycles closed since loading (the store records them).
    pub closed: Vec<ClosedCycle>,
}

impl Account {
    pub fn new(account_id: impl Into<String>) -> Self {
        Account {
            account_id: account_id.into(),
            grants: Vec::new(),
            overage: Decimal::ZERO,
            policy: OveragePolicy::SettleFromNextGrant,
            top_up_validity_months: DEFAULT_TOP_UP_VALIDITY_MONTHS,
            last_seq: 0,
            plan: None,
            cycle: None,
            closed: Vec::new(),
        }
    }

    /// Applies a plan. The first plan starts the cycle containing `at` and grants its
    /// allowance; a later plan change takes effect from the next reset.
    pub fn set_plan(
        &mut self,
        plan: Plan,
        policy: OveragePolicy,
        top_up_validity_months: u32,
        at: DateTime<Utc>,
        out: &mut Vec<Entry>,
    ) {
        self.advance(at, out);
        self.policy = policy;
        self.top_up_validity_months = top_up_validity_months;
        let day = plan.billing_day;
        self.plan = Some(plan);
        if self.cycle.is_none() {
            let (start, end) = cycle::containing(at, day);
            self.cycle = Some(Cycle {
                start,
                end,
                used: Decimal::ZERO,
                overage: Decimal::ZERO,
            });
            self.grant_allowance(at, out);
        }
    }

    /// Brings the account to time `at`: every billing date passed closes its cycle (the unused
    /// allowance expires, no carry-over) and grants the new allowance; every grant whose
    /// expiry passed expires. Each is a ledger entry at the time it happened.
    pub fn advance(&mut self, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        while let Some(c) = self.cycle.clone() {
            if at < c.end {
                break;
            }
            let allowance_id = allowance_grant_id(c.start);
            let allowance = self.grants.iter().find(|g| g.grant_id == allowance_id);
            let (granted, unused) =
                allowance.map_or((Decimal::ZERO, Decimal::ZERO), |g| (g.granted, g.remaining));
            self.expire_due(c.end, out);
            if self.policy == OveragePolicy::BillOverage && self.overage > Decimal::ZERO {
                self.overage = Decimal::ZERO;
                out.push(Entry {
                    kind: EntryKind::Reset,
                    grant_id: None,
                    amount: Decimal::ZERO,
                    balance_after: self.balance(),
                    overage_after: Decimal::ZERO,
                    effective_at: c.end,
                });
            }
            self.closed.push(ClosedCycle {
                start: c.start,
                end: c.end,
                allowance: granted,
                used: c.used,
                overage: c.overage,
                allowance_expired: unused,
            });
            let day = self.plan.as_ref().map_or(1, |p| p.billing_day);
            self.cycle = Some(Cycle {
                start: c.end,
                end: cycle::next_boundary(c.end, day),
                used: Decimal::ZERO,
                overage: Decimal::ZERO,
            });
            self.grant_allowance(c.end, out);
        }
        self.expire_due(at, out);
    }

    /// Grants the current cycle's allowance (expiring at the cycle end).
    fn grant_allowance(&mut self, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        let (Some(plan), Some(c)) = (&self.plan, &self.cycle) else {
            return;
        };
        if plan.monthly_allowance <= Decimal::ZERO {
            return;
        }
        let grant = NewGrant {
            grant_id: allowance_grant_id(c.start),
            kind: GrantKind::Allowance,
            credits: plan.monthly_allowance,
            expires_at: Some(c.end),
            priority: None,
        };
        self.add_grant(&grant, at, out);
    }

    /// Credits of the current cycle's allowance still unused, and the allowance granted.
    pub fn allowance_status(&self) -> Option<(Decimal, Decimal)> {
        let c = self.cycle.as_ref()?;
        let id = allowance_grant_id(c.start);
        let g = self.grants.iter().find(|g| g.grant_id == id)?;
        Some((g.granted, g.remaining))
    }

    /// Credits that can be spent at `at`.
    pub fn spendable(&self, at: DateTime<Utc>) -> Decimal {
        self.grants
            .iter()
            .filter(|g| g.live_at(at))
            .map(|g| g.remaining)
            .sum()
    }

    /// Sum of remaining credits over all grants not yet expired by an entry.
    fn balance(&self) -> Decimal {
        self.grants.iter().map(|g| g.remaining).sum()
    }

    /// Expires every grant whose expiry is at or before `at`, in expiry order, each as an
    /// entry dated at its expiry time.
    pub fn expire_due(&mut self, at: DateTime<Utc>, out: &mut Vec<Entry>) {
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
            g.dirty = true;
            let grant_id = g.grant_id.clone();
            out.push(Entry {
                kind: EntryKind::Expiry,
                grant_id: Some(grant_id),
                amount: -amount,
                balance_after: self.balance(),
                overage_after: self.overage,
                effective_at: expired_at,
            });
        }
    }

    /// Adds a grant. `known` tells whether the store already has this grant id (a purchase
    /// delivered twice credits once): then nothing changes and no entry is written.
    pub fn grant(&mut self, new: &NewGrant, at: DateTime<Utc>, known: bool, out: &mut Vec<Entry>) {
        if known || self.grants.iter().any(|g| g.grant_id == new.grant_id) {
            return;
        }
        self.advance(at, out);
        self.add_grant(new, at, out);
    }

    /// Adds a grant without bringing the account to `at` first (the caller did).
    fn add_grant(&mut self, new: &NewGrant, at: DateTime<Utc>, out: &mut Vec<Entry>) {
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
            dirty: true,
        });
        out.push(Entry {
            kind: EntryKind::Grant,
            grant_id: Some(new.grant_id.clone()),
            amount: new.credits,
            balance_after: self.balance(),
            overage_after: self.overage,
            effective_at: at,
        });
        // Each new top-up renews the validity of every remaining top-up credit.
        if new.kind == GrantKind::TopUp {
            if let Some(new_expiry) = expires_at {
                for g in self.grants.iter_mut().filter(|g| {
                    g.kind == GrantKind::TopUp
                        && g.grant_id != new.grant_id
                        && g.remaining > Decimal::ZERO
                        && g.expires_at.is_some_and(|e| e < new_expiry)
                }) {
                    g.expires_at = Some(new_expiry);
                    g.dirty = true;
                    out.push(Entry {
                        kind: EntryKind::Renewal,
                        grant_id: Some(g.grant_id.clone()),
                        amount: Decimal::ZERO,
                        balance_after: Decimal::ZERO, // fixed below
                        overage_after: self.overage,
                        effective_at: at,
                    });
                }
                let balance = self.balance();
                for e in out
                    .iter_mut()
                    .rev()
                    .take_while(|e| e.kind == EntryKind::Renewal)
                {
                    e.balance_after = balance;
                }
            }
        }
        if self.policy == OveragePolicy::SettleFromNextGrant && self.overage > Decimal::ZERO {
            let idx = self.grants.len() - 1;
            let g = &mut self.grants[idx];
            let settled = self.overage.min(g.remaining);
            g.remaining -= settled;
            self.overage -= settled;
            let grant_id = g.grant_id.clone();
            out.push(Entry {
                kind: EntryKind::Settle,
                grant_id: Some(grant_id),
                amount: -settled,
                balance_after: self.balance(),
                overage_after: self.overage,
                effective_at: at,
            });
        }
    }

    /// Takes `credits` from the live grants in consumption order; what they cannot cover is
    /// recorded as overage. Returns nothing for a zero charge.
    pub fn debit(&mut self, credits: Decimal, at: DateTime<Utc>, out: &mut Vec<Entry>) {
        self.advance(at, out);
        if credits <= Decimal::ZERO {
            return;
        }
        if let Some(c) = &mut self.cycle {
            c.used += credits;
        }
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| self.grants[i].live_at(at))
            .collect();
        order.sort_by_key(|&i| self.grants[i].order_key());
        let mut left = credits;
        for i in order {
            if left.is_zero() {
                break;
            }
            let g = &mut self.grants[i];
            let take = left.min(g.remaining);
            g.remaining -= take;
            g.dirty = true;
            left -= take;
            let grant_id = g.grant_id.clone();
            out.push(Entry {
                kind: EntryKind::Debit,
                grant_id: Some(grant_id),
                amount: -take,
                balance_after: self.balance(),
                overage_after: self.overage,
                effective_at: at,
            });
        }
        if left > Decimal::ZERO {
            self.overage += left;
            if let Some(c) = &mut self.cycle {
                c.overage += left;
            }
            out.push(Entry {
                kind: EntryKind::Overage,
                grant_id: None,
                amount: -left,
                balance_after: self.balance(),
                overage_after: self.overage,
                effective_at: at,
            });
        }
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
            false,
            &mut out,
        );
        a.grant(
            &new_grant("promo-late", GrantKind::Promo, dec!(5), Some(t(20))),
            t(1),
            false,
            &mut out,
        );
        a.grant(
            &new_grant("promo-soon", GrantKind::Promo, dec!(5), Some(t(10))),
            t(1),
            false,
            &mut out,
        );
        a.grant(
            &new_grant("allow", GrantKind::Allowance, dec!(3), Some(t(28))),
            t(1),
            false,
            &mut out,
        );
        out.clear();
        a.debit(dec!(12), t(2), &mut out);
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
            false,
            &mut out,
        );
        out.clear();
        a.debit(dec!(5.5), t(2), &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].kind, EntryKind::Overage);
        assert_eq!(out[1].amount, dec!(-3.5));
        assert_eq!(a.overage, dec!(3.5));
        out.clear();
        a.grant(
            &new_grant("g2", GrantKind::TopUp, dec!(10), None),
            t(3),
            false,
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
        a.debit(dec!(4), t(2), &mut out);
        a.grant(
            &new_grant("g", GrantKind::Package, dec!(10), None),
            t(3),
            false,
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
            false,
            &mut out,
        );
        assert_eq!(
            a.grants[0].expires_at,
            Some(Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap())
        );
        a.grant(
            &new_grant("t2", GrantKind::TopUp, dec!(5), None),
            t(15),
            false,
            &mut out,
        );
        let renewed = Utc.with_ymd_and_hms(2026, 4, 15, 0, 0, 0).unwrap();
        assert!(a.grants.iter().all(|g| g.expires_at == Some(renewed)));
        assert_eq!(out.last().unwrap().kind, EntryKind::Renewal);
        out.clear();
        a.debit(dec!(1), renewed, &mut out);
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
        a.grant(&g, t(1), false, &mut out);
        a.grant(&g, t(1), false, &mut out);
        a.grant(
            &new_grant("h", GrantKind::Package, dec!(10), None),
            t(1),
            true,
            &mut out,
        );
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
                        a.grant(&g, at, false, &mut out);
                        grants.push(g);
                    }
                    Op::Debit(c) => {
                        let before = out.len();
                        a.debit(Decimal::new(c, 6), at, &mut out);
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
                if e.kind != EntryKind::Overage {
                    balance += e.amount;
                }
                prop_assert_eq!(e.balance_after, balance, "{:?}", e);
            }
            // replaying every grant changes nothing
            let snapshot = a.clone();
            let mut replay_out = vec![];
            for g in &grants {
                a.grant(g, t(28), false, &mut replay_out);
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
                        a.grant(&new_grant(&format!("g{i}"), kind, Decimal::new(c, 6), None), at, false, &mut out);
                    }
                    LifeOp::Debit(h, c) => {
                        at += chrono::Duration::hours(h.into());
                        a.debit(Decimal::new(c, 6), at, &mut out);
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
                        };
                        let policy = if bill_overage { OveragePolicy::BillOverage } else { OveragePolicy::SettleFromNextGrant };
                        a.set_plan(plan, policy, 3, at, &mut out);
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
                if e.kind != EntryKind::Overage {
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
