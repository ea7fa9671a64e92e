//! `tally reconcile`: the ledger's charges against ClickHouse, per account × UTC day of event
//! time × usage kind. Three figures for each key, which must agree exactly:
//!
//! - the ledger ([`crate::ledger::store::Store::charged_by_day`]): the debit and overage
//!   entries of each usage event, summed — each event's own charge, whatever grant or overage
//!   paid it. Corrections only move credits between grants and overage (an out-of-order event
//!   re-allocates the window; `book::corrections` writes the difference per grant), so per
//!   account they must net to zero: an account whose do not is a difference of its own;
//! - the daily roll-up `usage_daily` (what reports, the API and the dashboard read);
//! - the distinct rated events, each identity's counting copy in `usage_events` (what the
//!   roll-up is an aggregate of).
//!
//! [`compare`] is pure; [`reconcile`] reads the three sides and records the outcome in the
//! `tally_reconcile_*` metrics. Owns no SQL: the ledger store and `analytics::reconcile` do.

use std::collections::BTreeMap;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::analytics::reconcile::KindDay;
use crate::analytics::{AnalyticsError, DateRange, UsageQueries};
use crate::config::Config;
use crate::ledger::store::{ChargedDay, StoreError};
use crate::ledger::Store;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading the ledger's charges: {0}")]
    Ledger(#[from] StoreError),
    #[error("reading ClickHouse: {0}")]
    Analytics(#[from] AnalyticsError),
}

/// Credits and the events they come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Figures {
    pub credits: Decimal,
    pub events: u64,
}

/// The three figures of one account × day × kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayFigures {
    pub account_id: String,
    pub day: NaiveDate,
    pub kind: String,
    /// Credits the ledger charged, and the events charged (events that cost nothing have no
    /// ledger entry).
    pub ledger: Figures,
    /// The part of `ledger` that is late usage (arrived after the grace, charged to the
    /// account's open cycle).
    pub late: Figures,
    /// `usage_daily`: credits and every event counted.
    pub rollup: Figures,
    /// The distinct rated events (counting copies): credits and every event.
    pub rated: Figures,
    /// The distinct rated events: those that cost credits (compared with the ledger's).
    pub rated_charged_events: u64,
}

impl DayFigures {
    fn new(account_id: &str, day: NaiveDate, kind: &str) -> DayFigures {
        DayFigures {
            account_id: account_id.to_owned(),
            day,
            kind: kind.to_owned(),
            ledger: Figures::default(),
            late: Figures::default(),
            rollup: Figures::default(),
            rated: Figures::default(),
            rated_charged_events: 0,
        }
    }

    /// The ledger equals the rated events (credits, charged events) and the roll-up equals
    /// them too (credits, events).
    pub fn agrees(&self) -> bool {
        self.ledger.credits == self.rated.credits
            && self.ledger.events == self.rated_charged_events
            && self.rollup == self.rated
    }

    /// Some of the ledger's charge is late usage.
    pub fn has_late(&self) -> bool {
        self.late.events > 0
    }
}

/// One disagreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Difference {
    /// The figures of an account × day × kind differ.
    Day(DayFigures),
    /// An account's corrections of debits and overage (caused by events of the range) do not
    /// net to zero: they changed how much was charged, not only who paid it.
    Corrections {
        account_id: String,
        /// The credits the corrections added to the charges (negative: removed).
        credits: Decimal,
    },
}

/// What one run compared and found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub account_id: Option<String>,
    /// Account × day × kind keys present on any side.
    pub compared: usize,
    /// Keys holding late usage (agreeing or not).
    pub late: usize,
    pub differences: Vec<Difference>,
}

impl Reconciliation {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Compares the three sides (any order; a key missing on a side counts as zero there).
pub fn compare(
    range: &DateRange,
    account_id: Option<&str>,
    ledger: &[ChargedDay],
    rollup: &[KindDay],
    rated: &[KindDay],
    corrections: &[(String, Decimal)],
) -> Reconciliation {
    let mut keys: BTreeMap<(&str, NaiveDate, &str), DayFigures> = BTreeMap::new();
    for l in ledger {
        let f = keys
            .entry((&l.account_id, l.day, &l.usage_kind))
            .or_insert_with(|| DayFigures::new(&l.account_id, l.day, &l.usage_kind));
        f.ledger.credits += l.credits;
        f.ledger.events += l.events;
        f.late.credits += l.late_credits;
        f.late.events += l.late_events;
    }
    for r in rollup {
        let f = keys
            .entry((&r.account_id, r.day, &r.kind))
            .or_insert_with(|| DayFigures::new(&r.account_id, r.day, &r.kind));
        f.rollup.credits += r.credits;
        f.rollup.events += r.events;
    }
    for r in rated {
        let f = keys
            .entry((&r.account_id, r.day, &r.kind))
            .or_insert_with(|| DayFigures::new(&r.account_id, r.day, &r.kind));
        f.rated.credits += r.credits;
        f.rated.events += r.events;
        f.rated_charged_events += r.charged_events.unwrap_or(0);
    }
    let compared = keys.len();
    let late = keys.values().filter(|f| f.has_late()).count();
    let mut differences: Vec<Difference> = keys
        .into_values()
        .filter(|f| !f.agrees())
        .map(Difference::Day)
        .collect();
    differences.extend(
        corrections
            .iter()
            .filter(|(_, credits)| !credits.is_zero())
            .map(|(account_id, credits)| Difference::Corrections {
                account_id: account_id.clone(),
                credits: *credits,
            }),
    );
    Reconciliation {
        from: range.from,
        to: range.to,
        account_id: account_id.map(str::to_owned),
        compared,
        late,
        differences,
    }
}

/// Reads the ledger (PostgreSQL) and ClickHouse for the days of `range` (one account, or
/// all), compares them, and records the number of differences in the metrics. Run it when
/// both pipelines are caught up: usage one side has applied and the other not yet shows as a
/// difference until it has.
pub async fn reconcile(
    cfg: &Config,
    range: &DateRange,
    account_id: Option<&str>,
) -> Result<Reconciliation, ReconcileError> {
    let store = Store::connect(&cfg.postgres).await?;
    let queries = UsageQueries::new(&cfg.clickhouse);
    let ledger = store
        .charged_by_day(range.from, range.to, account_id)
        .await?;
    let corrections = store
        .uneven_corrections(range.from, range.to, account_id)
        .await?;
    let rollup = queries.rollup_days(range, account_id).await?;
    let rated = queries.rated_days(range, account_id).await?;
    let outcome = compare(range, account_id, &ledger, &rollup, &rated, &corrections);
    crate::metrics::reconciled(outcome.differences.len(), outcome.late);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn charged(a: &str, day: &str, kind: &str, credits: Decimal, events: u64) -> ChargedDay {
        ChargedDay {
            account_id: a.into(),
            day: d(day),
            usage_kind: kind.into(),
            credits,
            events,
            late_credits: Decimal::ZERO,
            late_events: 0,
        }
    }

    fn ch(a: &str, day: &str, kind: &str, credits: Decimal, events: u64, rated: bool) -> KindDay {
        KindDay {
            account_id: a.into(),
            day: d(day),
            kind: kind.into(),
            credits,
            events,
            charged_events: rated.then_some(events),
        }
    }

    #[test]
    fn equal_sides_agree_and_each_gap_is_one_difference() {
        let range = DateRange::new(d("2025-06-01"), d("2025-06-02")).unwrap();
        let mut late = charged("a", "2025-06-01", "call", dec!(3.5), 2);
        late.late_credits = dec!(1.5);
        late.late_events = 1;
        let ledger = vec![
            late,
            charged("b", "2025-06-02", "chat_response", dec!(2), 2),
        ];
        let rollup = vec![
            ch("a", "2025-06-01", "call", dec!(3.500000), 2, false),
            ch("b", "2025-06-02", "chat_response", dec!(2), 2, false),
        ];
        let mut rated = vec![
            ch("a", "2025-06-01", "call", dec!(3.5), 2, true),
            ch("b", "2025-06-02", "chat_response", dec!(2), 2, true),
        ];
        let r = compare(&range, None, &ledger, &rollup, &rated, &[]);
        assert!(r.is_clean(), "{r:?}");
        assert_eq!((r.compared, r.late), (2, 1));

        // An unanswered call: counted by ClickHouse, no ledger entry, still agreeing.
        rated[0].events = 3;
        let mut rollup3 = rollup.clone();
        rollup3[0].events = 3;
        let r = compare(&range, None, &ledger, &rollup3, &rated, &[]);
        assert!(r.is_clean(), "{r:?}");

        // The roll-up misses an event of b; a's corrections do not net to zero.
        let r = compare(
            &range,
            None,
            &ledger,
            &rollup3[..1],
            &rated,
            &[("a".into(), dec!(0.25))],
        );
        assert_eq!(r.differences.len(), 2);
        match &r.differences[0] {
            Difference::Day(f) => {
                assert_eq!(
                    (f.account_id.as_str(), f.kind.as_str()),
                    ("b", "chat_response")
                );
                assert_eq!(
                    f.ledger,
                    Figures {
                        credits: dec!(2),
                        events: 2
                    }
                );
                assert_eq!(f.rollup, Figures::default());
                assert_eq!(
                    f.rated,
                    Figures {
                        credits: dec!(2),
                        events: 2
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            r.differences[1],
            Difference::Corrections {
                account_id: "a".into(),
                credits: dec!(0.25)
            }
        );
    }
}
