//! Credits: Tally's one fixed-point amount. Credits, and the quantities rated and stored with
//! them, are decimals with exactly [`SCALE`] (6) places, as TigerBeetle keeps amounts with an
//! asset scale: NUMERIC(.., 6) in PostgreSQL, Decimal(.., 6) in ClickHouse (whose wire carries
//! the mantissa, value × 10^6: [`Credits::micros`]), and 6 places wherever they are shown.
//! Rating rounds an exact price to 6 places half away from zero ([`Credits::round`],
//! [`fixed`]); reports cut derived figures (averages, percentages) toward zero ([`cut`]).
//! This module is the only place that sets the scale or picks a rounding for them. Pure, and a
//! leaf: it imports nothing of the crate.

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};

/// Decimal places of every amount of credits.
pub const SCALE: u32 = 6;

/// How an amount is rounded to [`SCALE`] places: half away from zero (for the non-negative
/// prices of rating, "half up"). Increments and minimums already round the *quantity* in the
/// seller's favour; the last digit of the credits is rounded to the nearest, so per-second
/// pro-rata charges stay within 0.0000005 credit of the exact price, with no systematic bias.
pub const ROUNDING: RoundingStrategy = RoundingStrategy::MidpointAwayFromZero;

/// An amount of credits with exactly [`SCALE`] decimal places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(Decimal);

impl Credits {
    /// 0.000000
    pub const ZERO: Credits = Credits(Decimal::from_parts(0, 0, 0, false, SCALE));

    /// `value` rounded to 6 places ([`ROUNDING`]); None when it is too large to keep 6 places
    /// (beyond about 7.9e22).
    #[inline]
    pub fn round(value: Decimal) -> Option<Credits> {
        Self::exact(fixed(value))
    }

    /// `value` cut toward zero to 6 places; None when it is too large to keep them.
    #[inline]
    pub fn cut(value: Decimal) -> Option<Credits> {
        Self::exact(cut(value, SCALE))
    }

    /// The amount of `micros` millionths of a credit; None beyond `Decimal`'s range.
    #[inline]
    pub fn from_micros(micros: i128) -> Option<Credits> {
        Decimal::try_from_i128_with_scale(micros, SCALE)
            .ok()
            .map(Credits)
    }

    /// The amount in millionths of a credit (its mantissa at scale 6).
    #[inline]
    pub fn micros(self) -> i128 {
        self.0.mantissa()
    }

    /// The amount as a `Decimal` of scale 6.
    #[inline]
    pub fn decimal(self) -> Decimal {
        self.0
    }

    #[inline]
    fn exact(value: Decimal) -> Option<Credits> {
        (value.scale() == SCALE).then_some(Credits(value))
    }
}

impl From<Credits> for Decimal {
    fn from(c: Credits) -> Decimal {
        c.0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `value` with exactly 6 places: rounded past them ([`ROUNDING`]), zeros added below them
/// (or as close to 6 as `Decimal` allows, beyond about 7.9e22).
#[inline]
pub fn fixed(value: Decimal) -> Decimal {
    let mut v = value.round_dp_with_strategy(SCALE, ROUNDING);
    v.rescale(SCALE);
    v
}

/// `value` cut toward zero to `places`, with exactly that many (reports: 6 for amounts and
/// averages, 2 for percentages).
#[inline]
pub fn cut(value: Decimal, places: u32) -> Decimal {
    let mut v = value.round_dp_with_strategy(places, RoundingStrategy::ToZero);
    v.rescale(places);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn six_places_rounded_or_cut() {
        // By hand: 1.2345675 is half-way; away from zero gives ...68, toward zero ...67.
        assert_eq!(fixed(d("1.2345675")).to_string(), "1.234568");
        assert_eq!(fixed(d("-1.2345675")).to_string(), "-1.234568");
        assert_eq!(cut(d("1.2345679"), 6).to_string(), "1.234567");
        assert_eq!(cut(d("-1.2345679"), 6).to_string(), "-1.234567");
        assert_eq!(cut(d("33.339"), 2).to_string(), "33.33");
        assert_eq!(fixed(d("2")).to_string(), "2.000000");
        assert_eq!(Credits::ZERO.to_string(), "0.000000");
        assert_eq!(Credits::round(d("0.0000005")).unwrap().micros(), 1);
        assert_eq!(Credits::cut(d("0.0000009")).unwrap().micros(), 0);
        assert_eq!(
            Credits::from_micros(123_456_789_012_123_456)
                .unwrap()
                .to_string(),
            "123456789012.123456"
        );
        assert_eq!(Credits::round(Decimal::MAX), None, "no room for 6 places");
        assert_eq!(Credits::from_micros(i128::MAX), None);
    }
}
