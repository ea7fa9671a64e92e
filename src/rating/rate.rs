//! Rating: one `Usage` + the price table -> a `Charge` (credits, billable quantity, version
//! and rule) or `Unpriced`. Pure, no clock, and no allocation on the success path.

use std::fmt;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::table::{same, Billing, PriceRule, PriceTable, PriceVersion, Unit, MICROS};
use crate::credits::{Credits, SCALE};
use crate::event::{Quantity, Usage, KIND_CALL};

/// Rule id reported for an outbound call no rule prices (outbound calls are free by default).
pub const OUTBOUND_FREE_RULE_ID: &str = "builtin:outbound-free";

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
    NoRule { version: Box<str> },
    /// The rule is a time unit and the usage a count, or the other way round.
    WrongQuantity {
        version: Box<str>,
        rule_id: Box<str>,
        unit: Unit,
    },
    /// A negative count (never produced by the decoder).
    NegativeQuantity { quantity: Decimal },
    /// The charge does not fit in a decimal (an absurd quantity).
    Overflow {
        version: Box<str>,
        rule_id: Box<str>,
    },
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
            } => {
                let measured = if unit.is_time() {
                    "in units"
                } else {
                    "in seconds"
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
        let outbound = same(usage.kind, KIND_CALL)
            && usage
                .attributes
                .iter()
                .find(|(k, _)| same(k, "direction"))
                .is_some_and(|(_, v)| same(v, "outbound"));
        let rule = version
            .kind_index(usage.kind)
            .and_then(|index| index.find(&version.rules, &usage.attributes, outbound));
        match rule {
            Some(rule) => charge(version, rule, usage),
            None if outbound => Ok(Charge {
                credits: Credits::ZERO.decimal(),
                billable_quantity: Credits::ZERO.decimal(),
                billable_seconds: 0,
                unit: Unit::Second,
                price_version: &version.id,
                rule_id: OUTBOUND_FREE_RULE_ID,
            }),
            None => Err(Unpriced::new(
                usage,
                UnpricedWhy::NoRule {
                    version: version.id.clone(),
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
    match bill(rule, usage.quantity) {
        Ok(billed) => Ok(Charge {
            credits: billed.credits,
            billable_quantity: billed.quantity,
            billable_seconds: billed.seconds,
            unit: rule.unit,
            price_version: &version.id,
            rule_id: &rule.id,
        }),
        Err(error) => {
            let why = match error {
                BillError::WrongQuantity => UnpricedWhy::WrongQuantity {
                    version: version.id.clone(),
                    rule_id: rule.id.clone(),
                    unit: rule.unit,
                },
                BillError::Negative(quantity) => UnpricedWhy::NegativeQuantity { quantity },
                BillError::Overflow => UnpricedWhy::Overflow {
                    version: version.id.clone(),
                    rule_id: rule.id.clone(),
                },
            };
            Err(Unpriced::new(usage, why))
        }
    }
}

/// A billed quantity: credits and quantity in the rule's unit (scale 6), and billed seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Billed {
    pub(crate) credits: Decimal,
    pub(crate) quantity: Decimal,
    pub(crate) seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BillError {
    WrongQuantity,
    Negative(Decimal),
    Overflow,
}

/// Billed base quantity: 0 for 0, else max(minimum, quantity rounded up to the increment).
#[inline]
fn billable(quantity: u128, increment: u128, minimum: u128) -> Option<u128> {
    if quantity == 0 {
        return Some(0);
    }
    div_ceil(quantity, increment)
        .checked_mul(increment)
        .map(|billed| billed.max(minimum))
}

/// Bills a quantity under a rule, in integers (seconds or micro-units, micro-credits): exact,
/// and fast. Amounts beyond the integer range fall back to [`bill_decimal`].
#[inline]
pub(crate) fn bill(rule: &PriceRule, quantity: Quantity) -> Result<Billed, BillError> {
    let (base, increment, minimum, is_time) = match (rule.billing, quantity) {
        (
            Billing::Seconds {
                increment_seconds,
                minimum_seconds,
            },
            Quantity::Seconds(seconds),
        ) => (
            u128::from(seconds),
            u128::from(increment_seconds),
            u128::from(minimum_seconds),
            true,
        ),
        (
            Billing::Units {
                increment_micros,
                minimum_micros,
            },
            Quantity::Units(units),
        ) => {
            if units < Decimal::ZERO {
                return Err(BillError::Negative(units));
            }
            let Some(micros) = micros_ceil(units) else {
                return bill_decimal(rule, quantity);
            };
            (
                micros,
                u128::from(increment_micros),
                u128::from(minimum_micros),
                false,
            )
        }
        _ => return Err(BillError::WrongQuantity),
    };
    let fast = || -> Option<Billed> {
        let billed = billable(base, increment, minimum)?;
        let credits_micros = mul_div_round(billed, rule.factor, rule.divisor)?;
        let per_unit = u128::from(rule.billing.base_per_unit(rule.unit));
        let quantity_micros = mul_div_round(billed, u128::from(MICROS), per_unit)?;
        Some(Billed {
            credits: from_micros(credits_micros)?,
            quantity: from_micros(quantity_micros)?,
            seconds: if is_time {
                u64::try_from(billed).ok()?
            } else {
                0
            },
        })
    };
    match fast() {
        Some(billed) => Ok(billed),
        None => bill_decimal(rule, quantity),
    }
}

/// The same computation in `Decimal` arithmetic: the reference the integer path is tested
/// against, and the fallback for amounts too large for it.
pub(crate) fn bill_decimal(rule: &PriceRule, quantity: Quantity) -> Result<Billed, BillError> {
    let overflow = |_| BillError::Overflow;
    let none = || BillError::Overflow;
    let (billed, seconds) = match (rule.billing, quantity) {
        (
            Billing::Seconds {
                increment_seconds,
                minimum_seconds,
            },
            Quantity::Seconds(seconds),
        ) => {
            let billed = billable(
                u128::from(seconds),
                u128::from(increment_seconds),
                u128::from(minimum_seconds),
            )
            .ok_or_else(none)?;
            let billed = u64::try_from(billed).map_err(overflow)?;
            (Decimal::from(billed), billed)
        }
        (
            Billing::Units {
                increment_micros,
                minimum_micros,
            },
            Quantity::Units(units),
        ) => {
            if units < Decimal::ZERO {
                return Err(BillError::Negative(units));
            }
            let increment = Decimal::from(increment_micros) / Decimal::from(MICROS);
            let minimum = Decimal::from(minimum_micros) / Decimal::from(MICROS);
            let billed = if units.is_zero() {
                Decimal::ZERO
            } else {
                units
                    .checked_div(increment)
                    .ok_or_else(none)?
                    .ceil()
                    .checked_mul(increment)
                    .ok_or_else(none)?
                    .max(minimum)
            };
            (billed, 0)
        }
        _ => return Err(BillError::WrongQuantity),
    };
    let per_unit = Decimal::from(rule.unit.seconds().unwrap_or(1));
    // Multiply before dividing: one rounding, at the end.
    let credits = billed
        .checked_mul(rule.credits_per_unit)
        .and_then(|c| c.checked_div(per_unit))
        .ok_or_else(none)?;
    let quantity = billed.checked_div(per_unit).ok_or_else(none)?;
    // Amounts too large to keep 6 decimal places (beyond ~7.9e22) are refused.
    let exact6 = |value: Decimal| Credits::round(value).map(Decimal::from);
    Ok(Billed {
        credits: exact6(credits).ok_or_else(none)?,
        quantity: exact6(quantity).ok_or_else(none)?,
        seconds,
    })
}

/// A non-negative decimal in millionths, rounded up; None beyond u128.
#[inline]
fn micros_ceil(units: Decimal) -> Option<u128> {
    let mantissa = units.mantissa().unsigned_abs();
    let scale = units.scale();
    if scale <= SCALE {
        mantissa.checked_mul(10u128.pow(SCALE - scale))
    } else {
        Some(div_ceil(mantissa, 10u128.pow(scale - SCALE)))
    }
}

/// round_half_up(x * factor / divisor), with a 64-bit division when the operands fit.
#[inline]
fn mul_div_round(x: u128, factor: u128, divisor: u128) -> Option<u128> {
    let product = x.checked_mul(factor)?;
    if divisor == 1 {
        return Some(product);
    }
    let numerator = product.checked_add(divisor / 2)?;
    Some(match (u64::try_from(numerator), u64::try_from(divisor)) {
        (Ok(n), Ok(d)) => u128::from(n / d),
        _ => numerator / divisor,
    })
}

#[inline]
fn div_ceil(x: u128, d: u128) -> u128 {
    match (u64::try_from(x), u64::try_from(d)) {
        (Ok(x), Ok(d)) => u128::from(x.div_ceil(d)),
        _ => x.div_ceil(d),
    }
}

/// Micro-credits (or micro-units) as a Decimal of scale 6; None beyond Decimal's range.
#[inline]
fn from_micros(micros: u128) -> Option<Decimal> {
    Credits::from_micros(i128::try_from(micros).ok()?).map(Decimal::from)
}
