//! Wire scalars of the event format: strings that borrow from the payload, RFC 3339
//! timestamps, decimal strings, and a depth-checking JSON walker. Pure and allocation-free
//! on the happy path; knows nothing of envelopes or event types.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A JSON string that borrows from the message when it holds no escapes.
///
/// (`Option<Cow<'a, str>>` with `#[serde(borrow)]` always allocates; this wrapper does not.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'a> Text<'a> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// A JSON object of string values, kept in wire order (duplicates kept: the caller checks).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StringMap<'a>(pub(crate) Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de: 'a, 'a> Deserialize<'de> for StringMap<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;

        impl<'de> Visitor<'de> for MapVisitor {
            type Value = StringMap<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4).min(17));
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    let value = map.next_value::<Text<'de>>()?;
                    out.push((key.0, value.0));
                }
                Ok(StringMap(out))
            }
        }

        deserializer.deserialize_map(MapVisitor)
    }
}

/// Walks any JSON value through `deserialize_any`, so serde_json's recursion limit applies
/// (its `IgnoredAny` and `RawValue` skip values without one). Accepts every well-formed value.
pub(crate) struct WellFormed;

impl<'de> Deserialize<'de> for WellFormed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WellFormedVisitor)
    }
}

struct WellFormedVisitor;

impl<'de> Visitor<'de> for WellFormedVisitor {
    type Value = WellFormed;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_unit<E: de::Error>(self) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_none<E: de::Error>(self) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WellFormed, A::Error> {
        while seq.next_element::<WellFormed>()?.is_some() {}
        Ok(WellFormed)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WellFormed, A::Error> {
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value::<WellFormed>()?;
        }
        Ok(WellFormed)
    }
}

/// True when `bytes` is one complete, well-formed JSON value within serde_json's nesting limit.
pub(crate) fn is_well_formed(bytes: &[u8]) -> bool {
    serde_json::from_slice::<WellFormed>(bytes).is_ok()
}

/// Parses an RFC 3339 date-time: `YYYY-MM-DD(T|t)HH:MM:SS[.fraction](Z|z|(+|-)HH:MM)`.
///
/// Stricter than the RFC's prose on two points, like most validators: no space separator,
/// and no leap second (`:60`). Fractions beyond nanoseconds are truncated.
pub(crate) fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let year = digits4(&b[0..4])?;
    let month = digits2(&b[5..7])?;
    let day = digits2(&b[8..10])?;
    let hour = digits2(&b[11..13])?;
    let minute = digits2(&b[14..16])?;
    let second = digits2(&b[17..19])?;
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !(1..=12).contains(&month) || day == 0 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }

    let mut i = 19;
    let mut nanos: u32 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        if n < 9 {
            nanos *= 10u32.pow((9 - n) as u32);
        }
    }

    let offset_seconds: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits2(&b[i + 1..i + 3])?;
            let om = digits2(&b[i + 4..i + 6])?;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = i64::from(oh) * 3600 + i64::from(om) * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };

    // from_ymd_opt is a table look-up: cheaper than going through a day count.
    let local = NaiveDate::from_ymd_opt(year as i32, month, day)?
        .and_hms_nano_opt(hour, minute, second, nanos)?
        .and_utc();
    if offset_seconds == 0 {
        Some(local)
    } else {
        local.checked_sub_signed(TimeDelta::seconds(offset_seconds))
    }
}

#[inline]
fn digits2(b: &[u8]) -> Option<u32> {
    let (h, l) = (b[0].wrapping_sub(b'0'), b[1].wrapping_sub(b'0'));
    if h > 9 || l > 9 {
        return None;
    }
    Some(u32::from(h) * 10 + u32::from(l))
}

#[inline]
fn digits4(b: &[u8]) -> Option<u32> {
    Some(digits2(&b[0..2])? * 100 + digits2(&b[2..4])?)
}

/// Most integer digits a decimal string may have (values below 10^12).
pub(crate) const DECIMAL_MAX_INTEGER_DIGITS: usize = 12;
/// Most decimal places a decimal string may have (credits are kept to 6).
pub(crate) const DECIMAL_MAX_SCALE: usize = 6;

/// Why a decimal string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecimalError {
    /// Not `(0|[1-9][0-9]*)(\.[0-9]+)?`: signs, exponents, spaces, leading zeros...
    Malformed,
    /// More than [`DECIMAL_MAX_INTEGER_DIGITS`] digits before the point.
    TooLarge,
    /// More than [`DECIMAL_MAX_SCALE`] digits after the point.
    TooManyPlaces,
}

impl fmt::Display for DecimalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecimalError::Malformed => f.write_str(
                "not a decimal string (digits, optional '.' and digits; no sign, exponent or leading zero)",
            ),
            DecimalError::TooLarge => write!(f, "more than {DECIMAL_MAX_INTEGER_DIGITS} integer digits"),
            DecimalError::TooManyPlaces => write!(f, "more than {DECIMAL_MAX_SCALE} decimal places"),
        }
    }
}

/// Parses a non-negative decimal string: `(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?`.
pub(crate) fn parse_decimal(s: &str) -> Result<Decimal, DecimalError> {
    let b = s.as_bytes();
    let (int_part, frac_part) = match memchr_dot(b) {
        Some(p) => (&b[..p], Some(&b[p + 1..])),
        None => (b, None),
    };
    if int_part.is_empty()
        || !int_part.iter().all(u8::is_ascii_digit)
        || (int_part.len() > 1 && int_part[0] == b'0')
    {
        return Err(DecimalError::Malformed);
    }
    if let Some(frac) = frac_part {
        if frac.is_empty() || !frac.iter().all(u8::is_ascii_digit) {
            return Err(DecimalError::Malformed);
        }
    }
    if int_part.len() > DECIMAL_MAX_INTEGER_DIGITS {
        return Err(DecimalError::TooLarge);
    }
    let frac = frac_part.unwrap_or(&[]);
    if frac.len() > DECIMAL_MAX_SCALE {
        return Err(DecimalError::TooManyPlaces);
    }
    let mut mantissa: i64 = 0;
    for &d in int_part.iter().chain(frac) {
        mantissa = mantissa * 10 + i64::from(d - b'0');
    }
    Ok(Decimal::new(mantissa, frac.len() as u32))
}

#[inline]
fn memchr_dot(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    #[test]
    fn rfc3339_accepts_the_usual_forms() {
        let t = |s| parse_rfc3339(s).unwrap_or_else(|| panic!("{s} should parse"));
        let base = Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap();
        assert_eq!(t("2025-06-15T12:00:00Z"), base);
        assert_eq!(t("2025-06-15t12:00:00z"), base);
        assert_eq!(t("2025-06-15T14:00:00+02:00"), base);
        assert_eq!(t("2025-06-15T09:30:00-02:30"), base);
        assert_eq!(
            t("2025-06-15T12:00:00.5Z"),
            base + chrono::Duration::milliseconds(500)
        );
        assert_eq!(
            t("2025-06-15T12:00:00.123456789123Z"),
            base + chrono::Duration::nanoseconds(123_456_789)
        );
        assert_eq!(
            t("2024-02-29T00:00:00Z"),
            Utc.with_ymd_and_hms(2024, 2, 29, 0, 0, 0).unwrap()
        );
        assert_eq!(
            t("1969-12-31T23:59:59Z"),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 59, 59).unwrap()
        );
    }

    #[test]
    fn rfc3339_agrees_with_chrono_on_many_dates() {
        let mut t = Utc.with_ymd_and_hms(1999, 12, 25, 3, 4, 5).unwrap();
        for _ in 0..2000 {
            let s = t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            assert_eq!(parse_rfc3339(&s), Some(t), "{s}");
            let s = t.to_rfc3339();
            assert_eq!(parse_rfc3339(&s), Some(t), "{s}");
            t += chrono::Duration::seconds(86_400 * 13 + 3_601);
        }
    }

    #[test]
    fn rfc3339_rejects_near_misses() {
        for s in [
            "",
            "2025-06-15",
            "2025-06-15T12:00:00",
            "2025-06-15 12:00:00Z",
            "2025-06-15T12:00Z",
            "2025-13-01T00:00:00Z",
            "2025-00-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-04-31T00:00:00Z",
            "2025-06-15T24:00:00Z",
            "2025-06-15T23:60:00Z",
            "2025-06-15T23:59:60Z",
            "2025-06-15T12:00:00.Z",
            "2025-06-15T12:00:00+0200",
            "2025-06-15T12:00:00+24:00",
            "2025-06-15T12:00:00Z ",
            "2025-06-15T12:00:00ZZ",
            "20x5-06-15T12:00:00Z",
            "yesterday at noon...",
            "1718452800",
        ] {
            assert_eq!(parse_rfc3339(s), None, "{s:?} should be rejected");
        }
    }

    #[test]
    fn decimals_parse_exactly() {
        let d = |s: &str| Decimal::from_str(s).unwrap();
        assert_eq!(parse_decimal("0"), Ok(d("0")));
        assert_eq!(parse_decimal("3"), Ok(d("3")));
        assert_eq!(parse_decimal("2.5"), Ok(d("2.5")));
        assert_eq!(parse_decimal("0.000001"), Ok(d("0.000001")));
        assert_eq!(
            parse_decimal("999999999999.999999"),
            Ok(d("999999999999.999999"))
        );
        assert_eq!(parse_decimal("10.50").unwrap().scale(), 2);
    }

    #[test]
    fn decimals_reject_other_spellings() {
        use DecimalError::*;
        for (s, e) in [
            ("", Malformed),
            ("-1", Malformed),
            ("+1", Malformed),
            ("1e3", Malformed),
            (".5", Malformed),
            ("5.", Malformed),
            ("01", Malformed),
            ("1_000", Malformed),
            (" 1", Malformed),
            ("1.2.3", Malformed),
            ("NaN", Malformed),
            ("1000000000000", TooLarge),
            ("1.0000001", TooManyPlaces),
        ] {
            assert_eq!(parse_decimal(s), Err(e), "{s:?}");
        }
    }

    #[test]
    fn well_formed_enforces_the_nesting_limit() {
        assert!(is_well_formed(
            br#"{"a":[1,2.5,-3,"x",null,true,{"b":{}}]}"#
        ));
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(!is_well_formed(deep.as_bytes()));
        // RawValue and IgnoredAny would accept it: that is why WellFormed exists.
        assert!(serde_json::from_str::<de::IgnoredAny>(&deep).is_ok());
        assert!(!is_well_formed(b"{\"a\":1"));
        assert!(!is_well_formed(b"{\"a\":1} x"));
    }

    #[test]
    fn text_borrows_unless_escaped() {
        let t: Text = serde_json::from_str(r#""plain""#).unwrap();
        assert!(matches!(t.0, Cow::Borrowed("plain")));
        let t: Text = serde_json::from_str(r#""a\"b""#).unwrap();
        assert!(matches!(t.0, Cow::Owned(ref s) if s == "a\"b"));
    }
}
