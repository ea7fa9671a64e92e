//! The read models (balances, the balance view, books, ledger lines, charges by day, grants)
//! and the row mappers they use.

use std::collections::BTreeSet;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use tokio_postgres::types::Json;

use crate::event::{GrantKind, OveragePolicy};
use crate::ledger::book::{Book, LivePart};
use crate::ledger::buckets::{Account, ClosedCycle, Cycle, Grant, Plan};

use super::*;

impl Store {
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
        // 6 places as stored, also when no grant is left.
        let spendable = crate::credits::fixed(account.spendable(now));
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
        let overage = crate::credits::fixed(account.overage);
        // The book's grants first (live terms), then the table's rows: spent-out grants leave
        // the book but keep their row, and still count until they expire.
        // A voided grant counts nowhere: neither the book's copy nor the table's.
        let mut terms: Vec<GrantTerms> = account
            .grants
            .iter()
            .filter(|g| g.voided_at.is_none())
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
                 WHERE account_id = $1 AND granted_at <= $2 AND voided_at IS NULL
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
            .map(|c| crate::ledger::buckets::allowance_grant_id(c.start));
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
                        effective_at, event_id, rule_id, corrects, late, event_source, actor,
                        reason, reverses_source, reverses_id
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
                event_source: r.get(11),
                actor: r.get(12),
                reason: r.get(13),
                reverses_source: r.get(14),
                reverses_id: r.get(15),
            })
            .collect())
    }

    /// The usage charged per account x UTC day of event time x usage kind, over the days
    /// `from..=to` (one account, or all): see [`ChargedDay`]. Entries written before
    /// migration 0006 without a known event time are left out, and so is voided usage (a
    /// `reversal` line names it: its charge was given back, and analytics leaves it out).
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
                 FROM ledger_entries e
                 WHERE kind IN ('debit', 'overage') AND usage_kind IS NOT NULL
                   AND event_time >= $1 AND event_time < $2
                   AND ($3::text IS NULL OR account_id = $3)
                   AND NOT EXISTS (
                       SELECT 1 FROM ledger_entries r
                       WHERE r.kind = 'reversal' AND r.account_id = e.account_id
                         AND r.reverses_source = e.event_source
                         AND r.reverses_id = e.event_id)
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

    /// What the ledger knows of usage event (`event_source`, `event_id`) for `account_id`:
    /// None when it has not charged it to this account (never arrived, another account's,
    /// or its claim purged after the dedupe window); else whether it is voided already.
    pub async fn usage_void_state(
        &self,
        account_id: &str,
        event_source: &str,
        event_id: &str,
    ) -> Result<Option<UsageVoidState>, StoreError> {
        let row = self
            .client
            .query_opt(
                "SELECT EXISTS (SELECT 1 FROM processed_events v
                                WHERE v.scope = 'usage_void' AND v.event_source = p.event_source
                                  AND v.event_id = p.event_id)
                 FROM processed_events p
                 WHERE p.scope = 'usage' AND p.event_source = $1 AND p.event_id = $2
                   AND p.account_id = $3",
                &[&event_source, &event_id, &account_id],
            )
            .await?;
        Ok(row.map(|r| UsageVoidState { voided: r.get(0) }))
    }

    /// The credits an adjustment event (its source and id) moved, by its own lines
    /// (`adjustment` and `overage`, not corrections): None when the ledger has no line of it.
    pub async fn adjustment_applied(
        &self,
        account_id: &str,
        event_source: &str,
        event_id: &str,
    ) -> Result<Option<Decimal>, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*), COALESCE(sum(amount) FILTER (
                            WHERE kind IN ('adjustment', 'overage') AND corrects IS NULL), 0)
                 FROM ledger_entries
                 WHERE account_id = $1 AND event_source = $2 AND event_id = $3",
                &[&account_id, &event_source, &event_id],
            )
            .await?;
        let lines: i64 = row.get(0);
        Ok((lines > 0).then(|| row.get(1)))
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
    /// The source of the event that caused the line.
    pub event_source: Option<String>,
    /// A correction's (void, adjustment) author: the API token's name, or the producer's
    /// `source`.
    pub actor: Option<String>,
    /// A correction's reason.
    pub reason: Option<String>,
    /// A reversal's usage event (its source and id): the usage voided.
    pub reverses_source: Option<String>,
    pub reverses_id: Option<String>,
}

/// [`Store::usage_void_state`]: the usage is charged to the account; `voided`: a void of it
/// is applied already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageVoidState {
    pub voided: bool,
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
    (crate::credits::fixed(total), seen.len())
}

/// An account's balance by grant.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountBalance {
    pub account_id: String,
    pub spendable: Decimal,
    pub overage: Decimal,
    pub grants: Vec<Grant>,
}

pub(super) fn grant_from_row(r: &tokio_postgres::Row) -> Result<Grant, StoreError> {
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
        voided: Decimal::ZERO,
        adjusted: Decimal::ZERO,
        voided_at: r.get(9),
    })
}

/// The book of an account row, when it has one (accounts written before books have none).
pub(super) fn book_from_row(r: &tokio_postgres::Row) -> Option<Book> {
    match (
        r.get::<_, Option<Json<LivePart>>>(BOOK_COLUMN),
        r.get::<_, Option<Json<Account>>>(BOOK_COLUMN + 1),
    ) {
        (Some(Json(part)), Some(Json(checkpoint))) => Some(Book::from_parts(checkpoint, part)),
        _ => None,
    }
}

pub(super) fn account_from_row(r: &tokio_postgres::Row) -> Result<Account, StoreError> {
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

/// The instants bounding the UTC days `from..=to`: [from 00:00, to + 1 day 00:00).
pub(super) fn day_bounds(from: NaiveDate, to: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let midnight = |d: NaiveDate| d.and_time(chrono::NaiveTime::MIN).and_utc();
    (midnight(from), midnight(to.succ_opt().unwrap_or(to)))
}
