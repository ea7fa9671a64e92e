//! Rating: one `Usage` + the price table -> a `Charge` (credits, billable quantity, version
//! and rule) or `Unpriced`. Pure, no clock, and no allocation on the success path.

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

use super::table::{Billing, PriceRule, PriceTable, PriceVersion, Unit};
use crate::event::{Quantity, Usage, KIND_CALL};

/// Credits and billable quantities are kept to this many decimal places.
pub const CREDITS_DP: u32 = 6;

/// Rule id reported for an outbound call no rule prices (outbound calls are free by default).
pub const OUTBOUND_FREE_RULE_ID: &str = "builtin:outbound-free";

/// How rounding to 6 dp is done: half away from zero (for the non-negative amounts here,
/// "half up"). Increments and minimums already round the *quantity* in the seller's favour;
/// the last digit of the credits is rounded to the nearest, so per-second pro-rata charges stay
/// within 0.0000005 credit of the exact price, with no systematic bias.
pub const CREDITS_ROUNDING: RoundingStrategy = RoundingStrategy::MidpointAwayFromZero;

/// What a usage costs and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge<'t> {
    /// >= 0, exactly 6 decimal places (scale 6), rounded half away from zero.
    pub credits: Decimal,
    /// Billed quantity in `unit`, after increment and minimum; scale 6 (time units: exact
    /// billable seconds / seconds per unit, rounded half away from zero).
    pub billable_quantity: Decimal,
    /// Billed seconds after increment and minimum, for time units; 0 for count units.
    pub billable_seconds: u64,
    pub unit: Unit,
    pub price_version: &'t str,
    pub rule_id: &'t str,
}

/// Why a usage could not be priced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpricedWhy {
    /// The event time is before the first version, or after the last one's `effective_until`.
    NoVersion,
    /// No rule of the version in force matches the kind and attributes.
    NoRule { version: String },
    /// The rule is a time unit and the usage a count, or the other way round.
    WrongQuantity {
        version: String,
        rule_id: String,
        unit: Unit,
        quantity: Quantity,
    },
    /// A negative count (never produced by the decoder).
    NegativeQuantity { quantity: Decimal },
    /// The charge does not fit in a decimal (an absurd quantity).
    Overflow { version: String, rule_id: String },
}

impl fmt::Display for UnpricedWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpricedWhy::NoVersion => f.write_str("no price table version is in force"),
            UnpricedWhy::NoRule { version } => {
                write!(f, "no rule of version `{version}` matches")
            }
            UnpricedWhy::WrongQuantity {
                version,
                rule_id,
                unit,
                quantity,
            } => {
                let measured = match quantity {
                    Quantity::Seconds(_) => "in seconds",
                    Quantity::Units(_) => "in units",
                };
                write!(
                    f,
                    "rule `{rule_id}` of version `{version}` prices per {unit}, but the usage is measured {measured}"
                )
            }
            UnpricedWhy::NegativeQuantity { quantity } => {
                write!(f, "negative quantity {quantity}")
            }
            UnpricedWhy::Overflow { version, rule_id } => write!(
                f,
                "the charge under rule `{rule_id}` of version `{version}` overflows"
            ),
        }
    }
}

/// A usage no rule prices: the event goes to the dead-letter topic with reason `unpriced`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unpriced {kind} usage at {} with attributes {}: {why}", time.to_rfc3339(), DisplayAttributes(attributes))]
pub struct Unpriced {
    pub kind: String,
    pub time: DateTime<Utc>,
    pub attributes: Vec<(String, String)>,
    pub why: UnpricedWhy,
}

struct DisplayAttributes<'a>(&'a [(String, String)]);

impl fmt::Display for DisplayAttributes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{k} = {v:?}")?;
        }
        f.write_str("}")
    }
}

impl Unpriced {
    fn new(usage: &Usage<'_>, why: UnpricedWhy) -> Self {
        Unpriced {
            kind: usage.kind.to_owned(),
            time: usage.time,
            attributes: usage
                .attributes
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            why,
        }
    }
}

impl PriceTable {
    /// Rates one usage with the version in force at `usage.time`: the most specific matching
    /// rule of that version prices it. Outbound calls only match rules that say
    /// `direction = "outbound"`, and are free (`builtin:outbound-free`) when none does.
    pub fn rate<'t>(&'t self, usage: &Usage<'_>) -> Result<Charge<'t>, Unpriced> {
        let Some(version) = self.version_at(usage.time) else {
            return Err(Unpriced::new(usage, UnpricedWhy::NoVersion));
        };
        let outbound = usage.kind == KIND_CALL
            && usage
                .attributes
                .iter()
                .any(|&(k, v)| k == "direction" && v == "outbound");
        let rule = version.kind_index(usage.kind).and_then(|index| {
            let pool = if outbound {
                &index.outbound
            } else {
                &index.general
            };
            pool.iter()
                .map(|&i| &version.rules[i as usize])
                .find(|rule| rule.matches(&usage.attributes))
        });
        match rule {
            Some(rule) => charge(version, rule, usage),
            None if outbound => Ok(Charge {
                credits: scaled(Decimal::ZERO),
                billable_quantity: scaled(Decimal::ZERO),
                billable_seconds: 0,
                unit: Unit::Second,
                price_version: &version.id,
                rule_id: OUTBOUND_FREE_RULE_ID,
            }),
            None => Err(Unpriced::new(
                usage,
                UnpricedWhy::NoRule {
                    version: version.id.to_string(),
                },
            )),
        }
    }
}

/// Applies the rule's increment, minimum and price to the usage quantity.
fn charge<'t>(
    version: &'t PriceVersion,
    rule: &'t PriceRule,
    usage: &Usage<'_>,
) -> Result<Charge<'t>, Unpriced> {
    let overflow = || {
        Unpriced::new(
            usage,
            UnpricedWhy::Overflow {
                version: version.id.to_string(),
                rule_id: rule.id.to_string(),
            },
        )
    };
    let (credits, billable_quantity, billable_seconds) = match (rule.billing, usage.quantity) {
        (
            Billing::Seconds {
                increment_seconds,
                minimum_seconds,
            },
            Quantity::Seconds(seconds),
        ) => {
            let billable_seconds = if seconds == 0 {
                0
            } else {
                seconds
                    .div_ceil(increment_seconds)
                    .checked_mul(increment_seconds)
                    .ok_or_else(overflow)?
                    .max(minimum_seconds)
            };
            let per_unit = rule.unit.seconds().unwrap_or(1);
            let billed = Decimal::from(billable_seconds);
            // Multiply before dividing: one rounding, at the end.
            let mut credits = billed
                .checked_mul(rule.credits_per_unit)
                .ok_or_else(overflow)?;
            let mut quantity = billed;
            if per_unit != 1 {
                let per_unit = Decimal::from(per_unit);
                credits = credits.checked_div(per_unit).ok_or_else(overflow)?;
                quantity = quantity.checked_div(per_unit).ok_or_else(overflow)?;
            }
            (credits, quantity, billable_seconds)
        }
        (Billing::Units { increment, minimum }, Quantity::Units(units)) => {
            if units < Decimal::ZERO {
                return Err(Unpriced::new(
                    usage,
                    UnpricedWhy::NegativeQuantity { quantity: units },
                ));
            }
            let billable = if units.is_zero() {
                Decimal::ZERO
            } else if increment == Decimal::ONE {
                units.ceil().max(minimum)
            } else {
                units
                    .checked_div(increment)
                    .ok_or_else(overflow)?
                    .ceil()
                    .checked_mul(increment)
                    .ok_or_else(overflow)?
                    .max(minimum)
            };
            let credits = billable
                .checked_mul(rule.credits_per_unit)
                .ok_or_else(overflow)?;
            (credits, billable, 0)
        }
        (_, quantity) => {
            return Err(Unpriced::new(
                usage,
                UnpricedWhy::WrongQuantity {
                    version: version.id.to_string(),
                    rule_id: rule.id.to_string(),
                    unit: rule.unit,
                    quantity,
                },
            ))
        }
    };
    Ok(Charge {
        credits: round6(credits),
        billable_quantity: round6(billable_quantity),
        billable_seconds,
        unit: rule.unit,
        price_version: &version.id,
        rule_id: &rule.id,
    })
}

/// Rounds to 6 dp with [`CREDITS_ROUNDING`] and sets the scale to exactly 6.
#[inline]
pub fn round6(value: Decimal) -> Decimal {
    scaled(value.round_dp_with_strategy(CREDITS_DP, CREDITS_ROUNDING))
}

#[inline]
fn scaled(mut value: Decimal) -> Decimal {
    value.rescale(CREDITS_DP);
    value
}
