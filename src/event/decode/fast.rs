//! The decoder's fast path: a strict, allocation-free scanner for the usual shape of a
//! message, filling the same [`RawEnvelope`] serde_json's first pass would. Owns no rule:
//! it reads only a subset of JSON and gives up (returns `None`) on anything else, leaving
//! the message to the serde path, which then decides and words every rejection.
//!
//! The subset: no escapes in strings, integers of at most 18 digits (decimals without
//! exponent in extension attributes), nesting at most [`MAX_DEPTH`] deep, no repeated key in
//! the envelope or in `data`, no unknown key in `data`, each attribute of its expected JSON
//! type (or null), and `data` after `type`, with a known `type`. Within it, the scanner is
//! stricter than serde_json on every point, so whatever it reads serde_json would read the
//! same way: the fast path cannot change an outcome.

use std::borrow::Cow;

use super::data::{
    AdjustmentData, CallData, ChatData, GrantData, InstanceData, MeteredData, PlanData,
    UsageVoidData, VoidGrantData,
};
use super::scalar::{StringMap, Text};
use super::{DataValue, RawEnvelope, TypedData};
use crate::event::EventKind;

/// Deepest nesting read (the envelope object is level 1); serde_json allows 128.
const MAX_DEPTH: u32 = 32;
/// Most digits read in an integer: larger ones might not fit an `i64`.
const MAX_DIGITS: usize = 18;

/// Reads `text` (a whole message) into `env`; `None` when it is outside the subset, in which
/// case `env` may hold part of it and must be reset.
pub(super) fn read_envelope<'a>(text: &'a str, env: &mut RawEnvelope<'a>) -> Option<()> {
    let mut s = Scanner {
        text,
        b: text.as_bytes(),
        i: 0,
    };
    s.ws();
    let mut seen = 0u32;
    s.object(&ENVELOPE_KEYS, |s, key| {
        let Ok(index) = key else {
            // An extension attribute: walked, not kept.
            return s.skip(2);
        };
        once(&mut seen, index)?;
        let slot = match index {
            0 => &mut env.specversion,
            1 => &mut env.id,
            2 => &mut env.source,
            3 => &mut env.event_type,
            4 => &mut env.subject,
            5 => &mut env.time,
            6 => &mut env.datacontenttype,
            _ => {
                let kind = EventKind::of_type(env.event_type.as_ref()?.as_str())?;
                return s.data(kind, &mut env.data);
            }
        };
        s.opt_text(slot)
    })?;
    s.ws();
    (s.i == s.b.len()).then_some(())
}

/// The envelope attributes read, in their usual order (`data` last).
const ENVELOPE_KEYS: [&str; 8] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
];

/// Marks key `index` as seen; `None` if it already was.
#[inline]
fn once(seen: &mut u32, index: usize) -> Option<()> {
    let mask = 1 << index;
    if *seen & mask != 0 {
        return None;
    }
    *seen |= mask;
    Some(())
}

/// Reads the members of a `data` object into `$d`, a `&mut` to the struct of its type: the
/// key at `$index` in the list goes to `$field`, read into it by the [`Scanner`] method
/// `$read`; any other key gives up.
macro_rules! read_data {
    ($s:expr, $d:expr, { $($index:literal $key:literal => $field:ident: $read:ident),* $(,)? }) => {{
        const KEYS: [&str; [$($index),*].len()] = {
            let mut keys = [""; [$($index),*].len()];
            $(keys[$index] = $key;)*
            keys
        };
        let d = $d;
        let mut seen = 0u32;
        $s.object(&KEYS, |s, key| {
            let index = key.ok()?;
            once(&mut seen, index)?;
            match index {
                $($index => s.$read(&mut d.$field),)*
                _ => None,
            }
        })
    }};
}

struct Scanner<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Skips JSON whitespace.
    #[inline(always)]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Consumes `word` (a literal such as `null`).
    #[inline]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..self.i + word.len())? != word {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// Reads an object at its `{`, calling `member` at each value with the index of its key
    /// in `keys` (`Err(key)` if it is not there). Keys are usually in the order of `keys`: the
    /// next one is tried first, by a plain comparison.
    #[inline]
    fn object(
        &mut self,
        keys: &[&'static str],
        mut member: impl FnMut(&mut Self, Result<usize, &'a str>) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        let mut next = 0;
        loop {
            let key = match keys.get(next) {
                Some(expected) if self.quoted(expected) => Ok(next),
                _ => {
                    let key = self.string()?;
                    keys.iter().position(|k| *k == key).ok_or(key)
                }
            };
            if let Ok(index) = key {
                next = index + 1;
            }
            if self.punctuation()? != b':' {
                return None;
            }
            self.ws();
            member(self, key)?;
            match self.punctuation()? {
                b',' => self.ws(),
                b'}' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Consumes the next byte that is not whitespace (in compact JSON, the next byte).
    #[inline(always)]
    fn punctuation(&mut self) -> Option<u8> {
        let mut c = self.peek()?;
        if c <= b' ' {
            self.ws();
            c = self.peek()?;
        }
        self.i += 1;
        Some(c)
    }

    /// Consumes the string `"word"` if it comes next (`word` holds no quote or backslash).
    #[inline(always)]
    fn quoted(&mut self, word: &str) -> bool {
        let end = self.i + 1 + word.len();
        let found = self.b.get(end) == Some(&b'"')
            && self.b[self.i] == b'"'
            && same_bytes(&self.b[self.i + 1..end], word.as_bytes());
        if found {
            self.i = end + 1;
        }
        found
    }

    /// Reads an array at its `[`, calling `element` at each element.
    #[inline]
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if self.peek()? != b'[' {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            element(self)?;
            match self.punctuation()? {
                b',' => self.ws(),
                b']' => return Some(()),
                _ => return None,
            }
        }
    }

    /// Reads a string at its `"`. Gives up on an escape or a control character. The text is
    /// valid UTF-8 and the quotes are ASCII, so the slice between them is a `str`.
    #[inline(always)]
    fn string(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let rest = self.b.get(start..)?;
        // Eight bytes at a time (the first special byte found this way is exact), then one.
        let mut chunks = rest.chunks_exact(8);
        let mut end = start;
        for chunk in &mut chunks {
            let found = special_bytes(u64::from_le_bytes(chunk.try_into().ok()?));
            if found != 0 {
                return self.string_end(start, end + (found.trailing_zeros() / 8) as usize);
            }
            end += 8;
        }
        for &c in chunks.remainder() {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return self.string_end(start, end);
            }
            end += 1;
        }
        None
    }

    #[inline]
    fn string_end(&mut self, start: usize, end: usize) -> Option<&'a str> {
        if self.b[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        self.text.get(start..end)
    }

    // The `opt_*` readers write into the slot rather than return a value: a value returned
    // through the stack and moved at once was read back before its stores had landed, which
    // stalled the CPU (store-to-load forwarding) and cost a third of the scanner's time.

    /// A string or null, into `slot`.
    #[inline(always)]
    fn opt_text(&mut self, slot: &mut Option<Text<'a>>) -> Option<()> {
        if self.peek()? == b'n' {
            *slot = None;
            return self.literal(b"null");
        }
        *slot = Some(Text(Cow::Borrowed(self.string()?)));
        Some(())
    }

    /// An integer or null, into `slot`.
    #[inline]
    fn opt_int(&mut self, slot: &mut Option<i64>) -> Option<()> {
        if self.peek()? == b'n' {
            *slot = None;
            return self.literal(b"null");
        }
        *slot = Some(self.int()?);
        Some(())
    }

    /// `0` or `-?[1-9][0-9]{0,17}`, not followed by a fraction or an exponent. (serde_json
    /// reads `-0` as a float, which is no `i64`.)
    #[inline]
    fn int(&mut self) -> Option<i64> {
        let negative = self.peek()? == b'-';
        if negative {
            self.i += 1;
        }
        let start = self.i;
        let mut value: i64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            // Counted before multiplying: a 19th digit could overflow an `i64`.
            if self.i - start == MAX_DIGITS {
                return None;
            }
            value = value * 10 + i64::from(c - b'0');
            self.i += 1;
        }
        let digits = self.i - start;
        if digits == 0
            || (digits > 1 && self.b[start] == b'0')
            || (negative && value == 0)
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some(if negative { -value } else { value })
    }

    /// An object of strings, or null, into `slot`.
    fn opt_string_map(&mut self, slot: &mut Option<StringMap<'a>>) -> Option<()> {
        if self.peek()? == b'n' {
            *slot = None;
            return self.literal(b"null");
        }
        let mut out = Vec::new();
        self.object(&[], |s, key| {
            let key = key.err()?;
            let value = s.string()?;
            out.push((Cow::Borrowed(key), Cow::Borrowed(value)));
            Some(())
        })?;
        *slot = Some(StringMap(out));
        Some(())
    }

    /// An array of integers, or null, into `slot`.
    fn opt_int_list(&mut self, slot: &mut Option<Vec<i64>>) -> Option<()> {
        if self.peek()? == b'n' {
            *slot = None;
            return self.literal(b"null");
        }
        let mut out = Vec::new();
        self.array(|s| {
            out.push(s.int()?);
            Some(())
        })?;
        *slot = Some(out);
        Some(())
    }

    /// Skips any value at nesting level `depth` (numbers: no exponent, at most 18 digits on
    /// either side of the point).
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' if depth <= MAX_DEPTH => self.object(&[], |s, _| s.skip(depth + 1)),
            b'[' if depth <= MAX_DEPTH => self.array(|s| s.skip(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.skip_number(),
            _ => None,
        }
    }

    fn skip_number(&mut self) -> Option<()> {
        if self.peek()? == b'-' {
            self.i += 1;
        }
        let start = self.i;
        self.digits()?;
        if self.i - start > 1 && self.b[start] == b'0' {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digits()?;
        }
        match self.peek() {
            Some(b'e' | b'E' | b'.') => None,
            _ => Some(()),
        }
    }

    /// 1 to 18 digits.
    fn digits(&mut self) -> Option<()> {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        (1..=MAX_DIGITS).contains(&(self.i - start)).then_some(())
    }

    /// `data` (its type known) into `slot`: an object read into the struct of `kind`, in
    /// place, or null.
    fn data(&mut self, kind: EventKind, slot: &mut Option<DataValue<'a>>) -> Option<()> {
        if self.peek()? == b'n' {
            *slot = None;
            return self.literal(b"null");
        }
        /// Puts a default `$ty` in `slot` as `TypedData::$variant`; a `&mut` to it.
        macro_rules! place {
            ($variant:ident, $ty:ident) => {
                match slot.insert(DataValue::Typed(TypedData::$variant($ty::default()))) {
                    DataValue::Typed(TypedData::$variant(d)) => d,
                    _ => unreachable!("just put there"),
                }
            };
            ($variant:ident, boxed $ty:ident) => {
                match slot.insert(DataValue::Typed(TypedData::$variant(Box::<$ty>::default()))) {
                    DataValue::Typed(TypedData::$variant(d)) => &mut **d,
                    _ => unreachable!("just put there"),
                }
            };
        }
        match kind {
            EventKind::Call => read_data!(self, place!(Call, CallData), {
                0 "call_id" => call_id: opt_text,
                1 "direction" => direction: opt_text,
                2 "channel" => channel: opt_text,
                3 "model" => model: opt_text,
                4 "voice_tier" => voice_tier: opt_text,
                5 "started_at" => started_at: opt_text,
                6 "answered_at" => answered_at: opt_text,
                7 "ended_at" => ended_at: opt_text,
                8 "hold_seconds" => hold_seconds: opt_int,
                9 "hold_id" => hold_id: opt_text,
            }),
            EventKind::ChatResponse => read_data!(self, place!(Chat, ChatData), {
                0 "conversation_id" => conversation_id: opt_text,
                1 "model" => model: opt_text,
                2 "voice_tier" => voice_tier: opt_text,
                3 "channel" => channel: opt_text,
                4 "responses" => responses: opt_int,
                5 "hold_id" => hold_id: opt_text,
            }),
            EventKind::InstanceHours => read_data!(self, place!(Instance, InstanceData), {
                0 "instance_id" => instance_id: opt_text,
                1 "instance_type" => instance_type: opt_text,
                2 "started_at" => started_at: opt_text,
                3 "ended_at" => ended_at: opt_text,
                4 "hold_id" => hold_id: opt_text,
            }),
            EventKind::Metered => read_data!(self, place!(Metered, MeteredData), {
                0 "kind" => kind: opt_text,
                1 "quantity" => quantity: opt_text,
                2 "attributes" => attributes: opt_string_map,
                3 "hold_id" => hold_id: opt_text,
            }),
            EventKind::Grant => read_data!(self, place!(Grant, GrantData), {
                0 "grant_id" => grant_id: opt_text,
                1 "kind" => kind: opt_text,
                2 "credits" => credits: opt_text,
                3 "expires_at" => expires_at: opt_text,
                4 "priority" => priority: opt_int,
            }),
            EventKind::Plan => read_data!(self, place!(Plan, boxed PlanData), {
                0 "plan_id" => plan_id: opt_text,
                1 "monthly_allowance" => monthly_allowance: opt_text,
                2 "billing_day" => billing_day: opt_int,
                3 "overage_policy" => overage_policy: opt_text,
                4 "top_up_validity_months" => top_up_validity_months: opt_int,
                5 "low_balance_credits" => low_balance_credits: opt_text,
                6 "low_balance_percent" => low_balance_percent: opt_text,
                7 "allowance_alert_percents" => allowance_alert_percents: opt_int_list,
                8 "recharge_threshold_credits" => recharge_threshold_credits: opt_text,
                9 "recharge_credits" => recharge_credits: opt_text,
            }),
            EventKind::GrantVoid => read_data!(self, place!(GrantVoid, boxed VoidGrantData), {
                0 "grant_id" => grant_id: opt_text,
                1 "reason" => reason: opt_text,
                2 "actor" => actor: opt_text,
            }),
            EventKind::Adjustment => read_data!(self, place!(Adjustment, boxed AdjustmentData), {
                0 "adjustment_id" => adjustment_id: opt_text,
                1 "credits" => credits: opt_text,
                2 "reason" => reason: opt_text,
                3 "actor" => actor: opt_text,
            }),
            EventKind::UsageVoid => read_data!(self, place!(UsageVoid, boxed UsageVoidData), {
                0 "event_source" => event_source: opt_text,
                1 "event_id" => event_id: opt_text,
                2 "reason" => reason: opt_text,
                3 "actor" => actor: opt_text,
            }),
        }
    }
}

/// A word whose lowest set bit marks the first byte of `word` (little-endian) that is `"`,
/// `\` or a control character; 0 if none is. (Bits above the first may be false positives.)
#[inline]
fn special_bytes(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    quote | backslash | control
}

/// `a == b` for slices of the same length, without a call to `memcmp` (keys are short).
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    if n >= 8 {
        // Whole words, the last one overlapping the one before.
        let mut at = 0;
        while at + 8 < n {
            if word(a, at) != word(b, at) {
                return false;
            }
            at += 8;
        }
        word(a, n - 8) == word(b, n - 8)
    } else if n >= 4 {
        half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4)
    } else {
        a.iter().zip(b).all(|(x, y)| x == y)
    }
}
