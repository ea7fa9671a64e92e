//! Time to zero: how much usage of one kind a number of credits pays for, under the rule
//! that would rate it at a given time (holds for live usage answer it). Pure: the usage is
//! rated by [`PriceTable::rate`] itself, so a covered quantity, once used, costs at most the
//! credits (increments and minimums included).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::rate::Unpriced;
use super::table::{PriceTable, Unit};
use crate::event::{Quantity, Usage};

/// The longest usage a cover reports, in seconds: the longest call or instance period an
/// event may carry (31 days). Usage that costs nothing (or little enough) covers this much.
pub const MAX_COVER_SECONDS: u64 = 31 * 86_400;

/// The most units a cover reports.
pub const MAX_COVER_UNITS: u64 = 1_000_000_000;

/// The usage some credits pay for, and the rule that prices it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cover<'t> {
    pub unit: Unit,
    /// For time units: the longest usage, in whole seconds, that costs at most the credits.
    pub seconds: Option<u64>,
    /// For count units: the most whole units that cost at most the credits.
    pub units: Option<u64>,
    pub price_version: &'t str,
    pub rule_id: &'t str,
}

impl Cover<'_> {
    /// Whether the credits pay for no usage at all (not even the first increment).
    pub fn is_nothing(&self) -> bool {
        self.seconds.or(self.units) == Some(0)
    }
}

impl PriceTable {
    /// What `credits` pay for of usage `kind` with `attributes` at `time`: the largest
    /// quantity whose charge is at most `credits` (the charge never falls as the quantity
    /// grows, so a binary search over whole seconds or units finds it).
    pub fn cover<'t>(
        &'t self,
        kind: &str,
        attributes: &[(&str, &str)],
        time: DateTime<Utc>,
        credits: Decimal,
    ) -> Result<Cover<'t>, Unpriced> {
        let usage = |quantity| Usage {
            kind,
            time,
            attributes: attributes.to_vec(),
            quantity,
        };
        // The rule and its unit: a time rule refuses a count, and the other way round.
        let probe = match self.rate(&usage(Quantity::Seconds(0))) {
            Ok(c) => c,
            Err(_) => self.rate(&usage(Quantity::Units(Decimal::ZERO)))?,
        };
        let time_unit = probe.unit.is_time();
        let quantity = |n: u64| {
            if time_unit {
                Quantity::Seconds(n)
            } else {
                Quantity::Units(Decimal::from(n))
            }
        };
        let max = if time_unit {
            MAX_COVER_SECONDS
        } else {
            MAX_COVER_UNITS
        };
        let fits = |n: u64| -> Result<bool, Unpriced> {
            Ok(self.rate(&usage(quantity(n)))?.credits <= credits)
        };
        let covered = if fits(max)? {
            max
        } else {
            // fits(lo) and !fits(hi).
            let (mut lo, mut hi) = (0u64, max);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if fits(mid)? {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            lo
        };
        Ok(Cover {
            unit: probe.unit,
            seconds: time_unit.then_some(covered),
            units: (!time_unit).then_some(covered),
            price_version: probe.price_version,
            rule_id: probe.rule_id,
        })
    }

    /// The credits a usage of `seconds` (time units) costs, under the rule in force at
    /// `time`.
    pub fn charge_seconds(
        &self,
        kind: &str,
        attributes: &[(&str, &str)],
        time: DateTime<Utc>,
        seconds: u64,
    ) -> Result<Decimal, Unpriced> {
        Ok(self
            .rate(&Usage {
                kind,
                time,
                attributes: attributes.to_vec(),
                quantity: Quantity::Seconds(seconds),
            })?
            .credits)
    }
}
