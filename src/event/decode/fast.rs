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

use super::data::{CallData, ChatData, GrantData, InstanceData, MeteredData, PlanData};
use super::scalar::{StringMap, Text};
use super::{DataValue, Kind, RawEnvelope, TypedData};

/// Deepest nesting read (the envelope object is level 1); serde_json allows 128.
pub(super) const MAX_DEPTH: u32 = 32;
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
    s.object(|s, key| {
        let slot = match key {
            "specversion" => {
                once(&mut seen, 0)?;
                &mut env.specversion
            }
            "id" => {
                once(&mut seen, 1)?;
                &mut env.id
            }
            "source" => {
                once(&mut seen, 2)?;
                &mut env.source
            }
            "type" => {
                once(&mut seen, 3)?;
                &mut env.event_type
            }
            "subject" => {
                once(&mut seen, 4)?;
                &mut env.subject
            }
            "time" => {
                once(&mut seen, 5)?;
                &mut env.time
            }
            "datacontenttype" => {
                once(&mut seen, 6)?;
                &mut env.datacontenttype
            }
            "data" => {
                once(&mut seen, 7)?;
                let kind = Kind::of(env.event_type.as_ref()?.as_str())?;
                env.data = s.data(kind)?;
                return Some(());
            }
            // Extension attributes: walked, not kept.
            _ => return s.skip(2),
        };
        *slot = s.opt_text()?;
        Some(())
    })?;
    s.ws();
    (s.i == s.b.len()).then_some(())
}

/// Marks `bit` as seen; `None` if it already was.
#[inline]
fn once(seen: &mut u32, bit: u32) -> Option<()> {
    let mask = 1 << bit;
    if *seen & mask != 0 {
        return None;
    }
    *seen |= mask;
    Some(())
}

/// Reads the members of a `data` object into the struct of its type: each key a field of
/// the struct, read with the named [`Scanner`] method; any other key gives up.
macro_rules! read_data {
    ($s:expr, $ty:ident { $($bit:literal $key:literal => $field:ident: $read:ident),* $(,)? }) => {{
        let mut d = $ty::default();
        let mut seen = 0u32;
        $s.object(|s, key| {
            match key {
                $($key => {
                    once(&mut seen, $bit)?;
                    d.$field = s.$read()?;
                })*
                _ => return None,
            }
            Some(())
        })?;
        d
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
    #[inline]
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

    /// Reads an object at its `{`, calling `member` at each value with its key.
    #[inline]
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            self.ws();
            member(self, key)?;
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
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
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.ws();
                }
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads a string at its `"`. Gives up on an escape or a control character. The text is
    /// valid UTF-8 and the quotes are ASCII, so the slice between them is a `str`.
    #[inline]
    fn string(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut i = start;
        // Eight bytes at a time (the first special byte found this way is exact), then one.
        while let Some(chunk) = self.b.get(i..i + 8) {
            let word = u64::from_le_bytes(chunk.try_into().ok()?);
            let found = special_bytes(word);
            if found != 0 {
                i += (found.trailing_zeros() / 8) as usize;
                return self.string_end(start, i);
            }
            i += 8;
        }
        while let Some(&c) = self.b.get(i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                return self.string_end(start, i);
            }
            i += 1;
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

    /// A string or null.
    #[inline]
    fn opt_text(&mut self) -> Option<Option<Text<'a>>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.string().map(|s| Some(Text(Cow::Borrowed(s)))),
        }
    }

    /// An integer or null.
    #[inline]
    fn opt_int(&mut self) -> Option<Option<i64>> {
        match self.peek()? {
            b'n' => self.literal(b"null").map(|()| None),
            _ => self.int().map(Some),
        }
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
            value = value * 10 + i64::from(c - b'0');
            self.i += 1;
            if self.i - start > MAX_DIGITS {
                return None;
            }
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

    /// An object of strings, or null.
    fn opt_string_map(&mut self) -> Option<Option<StringMap<'a>>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        let mut out = Vec::new();
        self.object(|s, key| {
            let value = s.string()?;
            out.push((Cow::Borrowed(key), Cow::Borrowed(value)));
            Some(())
        })?;
        Some(Some(StringMap(out)))
    }

    /// An array of integers, or null.
    fn opt_int_list(&mut self) -> Option<Option<Vec<i64>>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        let mut out = Vec::new();
        self.array(|s| {
            out.push(s.int()?);
            Some(())
        })?;
        Some(Some(out))
    }

    /// Skips any value at nesting level `depth` (numbers: no exponent, at most 18 digits on
    /// either side of the point).
    fn skip(&mut self, depth: u32) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' if depth <= MAX_DEPTH => self.object(|s, _| s.skip(depth + 1)),
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

    /// `data` (its type known): an object read into the struct of `kind`, or null.
    fn data(&mut self, kind: Kind) -> Option<Option<DataValue<'a>>> {
        if self.peek()? == b'n' {
            return self.literal(b"null").map(|()| None);
        }
        let typed = match kind {
            Kind::Call => TypedData::Call(read_data!(self, CallData {
                0 "call_id" => call_id: opt_text,
                1 "direction" => direction: opt_text,
                2 "channel" => channel: opt_text,
                3 "model" => model: opt_text,
                4 "voice_tier" => voice_tier: opt_text,
                5 "started_at" => started_at: opt_text,
                6 "answered_at" => answered_at: opt_text,
                7 "ended_at" => ended_at: opt_text,
                8 "hold_seconds" => hold_seconds: opt_int,
            })),
            Kind::Chat => TypedData::Chat(read_data!(self, ChatData {
                0 "conversation_id" => conversation_id: opt_text,
                1 "model" => model: opt_text,
                2 "voice_tier" => voice_tier: opt_text,
                3 "channel" => channel: opt_text,
                4 "responses" => responses: opt_int,
            })),
            Kind::Instance => TypedData::Instance(read_data!(self, InstanceData {
                0 "instance_id" => instance_id: opt_text,
                1 "instance_type" => instance_type: opt_text,
                2 "started_at" => started_at: opt_text,
                3 "ended_at" => ended_at: opt_text,
            })),
            Kind::Metered => TypedData::Metered(read_data!(self, MeteredData {
                0 "kind" => kind: opt_text,
                1 "quantity" => quantity: opt_text,
                2 "attributes" => attributes: opt_string_map,
            })),
            Kind::Grant => TypedData::Grant(read_data!(self, GrantData {
                0 "grant_id" => grant_id: opt_text,
                1 "kind" => kind: opt_text,
                2 "credits" => credits: opt_text,
                3 "expires_at" => expires_at: opt_text,
                4 "priority" => priority: opt_int,
            })),
            Kind::Plan => TypedData::Plan(read_data!(self, PlanData {
                0 "plan_id" => plan_id: opt_text,
                1 "monthly_allowance" => monthly_allowance: opt_text,
                2 "billing_day" => billing_day: opt_int,
                3 "overage_policy" => overage_policy: opt_text,
                4 "top_up_validity_months" => top_up_validity_months: opt_int,
                5 "low_balance_credits" => low_balance_credits: opt_text,
                6 "low_balance_percent" => low_balance_percent: opt_text,
                7 "allowance_alert_percents" => allowance_alert_percents: opt_int_list,
            })),
        };
        Some(Some(DataValue::Typed(typed)))
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
