//! The price table in memory: effective-dated versions of rules, with the per-version,
//! per-kind index rating uses. Built only by [`super::check`], which validates everything
//! this module assumes (versions in time order, no tied rules, units fit their kinds).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::event::KIND_CALL;

/// The unit a rule prices in. Time units bill `Quantity::Seconds`, count units bill
/// `Quantity::Units`; a count unit is only a label (one unit of quantity = one unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Response,
    Unit,
    Image,
    Analysis,
    Request,
    Token,
}

impl Unit {
    pub const ALL: [Unit; 9] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Response,
        Unit::Unit,
        Unit::Image,
        Unit::Analysis,
        Unit::Request,
        Unit::Token,
    ];

    /// The name used in price tables and stored with rated usage.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Response => "response",
            Unit::Unit => "unit",
            Unit::Image => "image",
            Unit::Analysis => "analysis",
            Unit::Request => "request",
            Unit::Token => "token",
        }
    }

    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| u.as_str() == s)
    }

    /// Seconds in one unit for time units, None for count units.
    pub fn seconds(self) -> Option<u64> {
        match self {
            Unit::Second => Some(1),
            Unit::Minute => Some(60),
            Unit::Hour => Some(3600),
            _ => None,
        }
    }

    pub fn is_time(self) -> bool {
        self.seconds().is_some()
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Increment and minimum of a rule, in the measure of the usage it bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Billing {
    /// Time units: whole seconds; `increment_seconds` > 0, `minimum_seconds` a multiple of it.
    Seconds {
        increment_seconds: u64,
        minimum_seconds: u64,
    },
    /// Count units, in millionths of a unit (`check` allows at most 6 decimal places):
    /// `increment_micros` > 0, `minimum_micros` a multiple of it.
    Units {
        increment_micros: u64,
        minimum_micros: u64,
    },
}

/// Millionths per unit: count quantities are billed in micro-units, credits in micro-credits.
pub(crate) const MICROS: u64 = 1_000_000;

impl Billing {
    /// Billed base quantities (seconds, or micro-units) in one unit of the rule.
    pub(crate) fn base_per_unit(self, unit: Unit) -> u64 {
        match self {
            Billing::Seconds { .. } => unit.seconds().unwrap_or(1),
            Billing::Units { .. } => MICROS,
        }
    }
}

fn micros_to_decimal(micros: u64) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(micros), 6).normalize()
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One price rule: usage of `kind` whose attributes include every `conditions` pair costs
/// `credits_per_unit` per `unit`, after rounding up to the increment and applying the minimum.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceRule {
    pub(crate) id: Box<str>,
    pub(crate) kind: Box<str>,
    pub(crate) conditions: Box<[(Box<str>, Box<str>)]>,
    pub(crate) unit: Unit,
    pub(crate) credits_per_unit: Decimal,
    pub(crate) billing: Billing,
    /// micro-credits = billed base quantity x `factor` / `divisor` (rounded half up), where
    /// the base quantity is seconds or micro-units: the exact price as a reduced fraction.
    pub(crate) factor: u128,
    pub(crate) divisor: u128,
    /// The conditions as (key, value) ids of the kind's [`KindIndex`] dictionaries.
    pub(crate) compiled: Box<[(u8, u16)]>,
    pub(crate) line: usize,
}

impl PriceRule {
    pub(crate) fn new(
        id: String,
        kind: String,
        conditions: Vec<(String, String)>,
        unit: Unit,
        credits_per_unit: Decimal,
        billing: Billing,
        line: usize,
    ) -> Self {
        // credits_per_unit = mantissa / 10^scale (mantissa < 2^96, scale <= 28), so
        // mantissa x 10^6 < 2^116 and 10^scale x base_per_unit <= 10^34: both fit in u128.
        let factor = credits_per_unit.mantissa().unsigned_abs() * u128::from(MICROS);
        let divisor =
            10u128.pow(credits_per_unit.scale()) * u128::from(billing.base_per_unit(unit));
        let common = gcd(factor, divisor).max(1);
        PriceRule {
            id: id.into(),
            kind: kind.into(),
            conditions: conditions
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            unit,
            credits_per_unit,
            billing,
            factor: factor / common,
            divisor: divisor / common,
            compiled: Box::new([]),
            line,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The `match` pairs, in file order.
    pub fn conditions(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.conditions.iter().map(|(k, v)| (&**k, &**v))
    }

    /// Number of `match` pairs: among matching rules, the highest wins.
    pub fn specificity(&self) -> usize {
        self.conditions.len()
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    pub fn credits_per_unit(&self) -> Decimal {
        self.credits_per_unit
    }

    /// Billing increment: seconds for time units, units for count units.
    pub fn increment(&self) -> Decimal {
        match self.billing {
            Billing::Seconds {
                increment_seconds, ..
            } => Decimal::from(increment_seconds),
            Billing::Units {
                increment_micros, ..
            } => micros_to_decimal(increment_micros),
        }
    }

    /// Minimum billed when the quantity is not zero, in the same measure as `increment`.
    pub fn minimum(&self) -> Decimal {
        match self.billing {
            Billing::Seconds {
                minimum_seconds, ..
            } => Decimal::from(minimum_seconds),
            Billing::Units { minimum_micros, .. } => micros_to_decimal(minimum_micros),
        }
    }

    /// 1-based line of the rule's `[[version.rule]]` header in the source file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// True when the attributes have every condition's key with its value (an attribute
    /// given twice counts with its first value).
    #[inline]
    pub(crate) fn matches(&self, attributes: &[(&str, &str)]) -> bool {
        self.conditions.iter().all(|(k, v)| {
            attributes
                .iter()
                .find(|(ak, _)| same(ak, k))
                .is_some_and(|(_, av)| same(av, v))
        })
    }

    /// True for a call rule that explicitly matches `direction = "outbound"`: the only rules
    /// that may price outbound calls.
    pub(crate) fn is_outbound_call(&self) -> bool {
        &*self.kind == KIND_CALL
            && self
                .conditions
                .iter()
                .any(|(k, v)| &**k == "direction" && &**v == "outbound")
    }
}

/// String equality for the short keys and values of the hot path: lengths first, then 8
/// bytes at a time, without a call to `memcmp`.
#[inline(always)]
pub(crate) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut a_words = a.chunks_exact(8);
    let mut b_words = b.chunks_exact(8);
    for (x, y) in (&mut a_words).zip(&mut b_words) {
        if u64::from_ne_bytes(x.try_into().unwrap_or([0; 8]))
            != u64::from_ne_bytes(y.try_into().unwrap_or([0; 8]))
        {
            return false;
        }
    }
    a_words
        .remainder()
        .iter()
        .zip(b_words.remainder())
        .all(|(x, y)| x == y)
}

/// A kind with at most this many distinct `match` keys is matched by ids, not strings.
const MAX_KEYS: usize = 16;
/// Resolved value id of a key the usage does not have.
const ABSENT: u16 = u16::MAX;
/// Resolved value id of a value no rule of the kind mentions.
const UNKNOWN: u16 = u16::MAX - 1;

/// The rules of one kind in one version, as indices into `PriceVersion::rules`, most specific
/// first (file order among equals). For calls, rules matching `direction = "outbound"` are
/// kept apart: only they may price outbound calls.
///
/// Matching compiles the conditions: the kind's distinct `match` keys and, per key, the
/// distinct values. A usage's attributes are resolved once to value ids (one short scan per
/// key), then each rule is a few integer comparisons.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KindIndex {
    pub(crate) kind: Box<str>,
    pub(crate) general: Box<[u32]>,
    pub(crate) outbound: Box<[u32]>,
    keys: Box<[Box<str>]>,
    values: Box<[Box<[Box<str>]>]>,
    /// False when the kind has too many keys or values for ids: match by strings.
    compiled: bool,
}

impl KindIndex {
    /// Builds the index of `kind` and compiles the conditions of its rules.
    fn new(kind: &str, rules: &mut [PriceRule]) -> Self {
        let mut of_kind: Vec<u32> = (0..rules.len() as u32)
            .filter(|&i| &*rules[i as usize].kind == kind)
            .collect();
        // Stable: file order among rules of equal specificity.
        of_kind.sort_by_key(|&i| std::cmp::Reverse(rules[i as usize].specificity()));

        let mut keys: Vec<Box<str>> = Vec::new();
        let mut values: Vec<Vec<Box<str>>> = Vec::new();
        for &i in &of_kind {
            for (k, v) in rules[i as usize].conditions.iter() {
                let key = match keys.iter().position(|known| known == k) {
                    Some(key) => key,
                    None => {
                        keys.push(k.clone());
                        values.push(Vec::new());
                        keys.len() - 1
                    }
                };
                if !values[key].contains(v) {
                    values[key].push(v.clone());
                }
            }
        }
        let compiled =
            keys.len() <= MAX_KEYS && values.iter().all(|v| v.len() < usize::from(UNKNOWN));
        if compiled {
            for &i in &of_kind {
                let rule = &mut rules[i as usize];
                rule.compiled = rule
                    .conditions
                    .iter()
                    .map(|(k, v)| {
                        let key = keys.iter().position(|known| known == k).unwrap_or(0);
                        let value = values[key].iter().position(|known| known == v).unwrap_or(0);
                        (key as u8, value as u16)
                    })
                    .collect();
            }
        }
        let (outbound, general): (Vec<u32>, Vec<u32>) = of_kind
            .into_iter()
            .partition(|&i| rules[i as usize].is_outbound_call());
        KindIndex {
            kind: kind.into(),
            general: general.into(),
            outbound: outbound.into(),
            keys: keys.into(),
            values: values.into_iter().map(Into::into).collect(),
            compiled,
        }
    }

    /// The most specific rule of the pool (outbound calls, or everything else) matching the
    /// attributes.
    #[inline]
    pub(crate) fn find<'v>(
        &self,
        rules: &'v [PriceRule],
        attributes: &[(&str, &str)],
        outbound: bool,
    ) -> Option<&'v PriceRule> {
        let pool = if outbound {
            &self.outbound
        } else {
            &self.general
        };
        let mut pool = pool.iter().map(|&i| &rules[i as usize]);
        if !self.compiled {
            return pool.find(|rule| rule.matches(attributes));
        }
        let mut resolved = [ABSENT; MAX_KEYS];
        for ((slot, key), values) in resolved.iter_mut().zip(&*self.keys).zip(&*self.values) {
            if let Some((_, value)) = attributes.iter().find(|(k, _)| same(k, key)) {
                *slot = values
                    .iter()
                    .position(|v| same(v, value))
                    .map_or(UNKNOWN, |p| p as u16);
            }
        }
        pool.find(|rule| {
            rule.compiled
                .iter()
                .all(|&(key, value)| resolved[usize::from(key)] == value)
        })
    }

    /// The same answer by comparing strings (the reference for tests).
    #[cfg(test)]
    pub(crate) fn find_by_strings<'v>(
        &self,
        rules: &'v [PriceRule],
        attributes: &[(&str, &str)],
        outbound: bool,
    ) -> Option<&'v PriceRule> {
        let pool = if outbound {
            &self.outbound
        } else {
            &self.general
        };
        pool.iter()
            .map(|&i| &rules[i as usize])
            .find(|rule| rule.matches(attributes))
    }
}

/// A model's price in a version ([`PriceVersion::model_prices`]): "gemini-3-flash
/// (ai_analysis): 0.5 credits per analysis".
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPrice<'a> {
    pub model: &'a str,
    pub kind: &'a str,
    /// The rule's other `match` pairs (e.g. `voice_tier = premium`), in file order.
    pub other_conditions: Vec<(&'a str, &'a str)>,
    pub unit: Unit,
    pub credits_per_unit: Decimal,
    pub rule_id: &'a str,
}

/// One effective-dated version of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceVersion {
    pub(crate) id: Box<str>,
    pub(crate) effective_from: DateTime<Utc>,
    pub(crate) effective_until: Option<DateTime<Utc>>,
    pub(crate) rules: Vec<PriceRule>,
    /// Sorted by kind.
    pub(crate) index: Vec<KindIndex>,
    pub(crate) line: usize,
}

impl PriceVersion {
    pub(crate) fn new(
        id: String,
        effective_from: DateTime<Utc>,
        effective_until: Option<DateTime<Utc>>,
        mut rules: Vec<PriceRule>,
        line: usize,
    ) -> Self {
        let mut kinds: Vec<Box<str>> = rules.iter().map(|r| r.kind.clone()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let index = kinds
            .iter()
            .map(|kind| KindIndex::new(kind, &mut rules))
            .collect();
        PriceVersion {
            id: id.into(),
            effective_from,
            effective_until,
            rules,
            index,
            line,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn effective_from(&self) -> DateTime<Utc> {
        self.effective_from
    }

    /// Only the last version may end without a successor (`check` makes any other
    /// `effective_until` equal to the next version's `effective_from`).
    pub fn effective_until(&self) -> Option<DateTime<Utc>> {
        self.effective_until
    }

    /// Rules in file order.
    pub fn rules(&self) -> &[PriceRule] {
        &self.rules
    }

    /// The price of each model in this version: every rule whose `match` names a `model`,
    /// by (model, kind, then the fewest other conditions first: the model's base price
    /// before its variants such as a premium voice), file order among equals. Rules without
    /// a model (calls by channel, instances by type) are not model prices.
    pub fn model_prices(&self) -> Vec<ModelPrice<'_>> {
        let mut out: Vec<ModelPrice<'_>> = self
            .rules
            .iter()
            .filter_map(|r| {
                let model = r.conditions().find(|(k, _)| *k == "model")?.1;
                Some(ModelPrice {
                    model,
                    kind: r.kind(),
                    other_conditions: r.conditions().filter(|(k, _)| *k != "model").collect(),
                    unit: r.unit(),
                    credits_per_unit: r.credits_per_unit(),
                    rule_id: r.id(),
                })
            })
            .collect();
        // Stable: file order among equals.
        out.sort_by(|a, b| {
            (a.model, a.kind, a.other_conditions.len()).cmp(&(
                b.model,
                b.kind,
                b.other_conditions.len(),
            ))
        });
        out
    }

    /// The usage kinds this version prices.
    pub fn kinds(&self) -> impl Iterator<Item = &str> + '_ {
        self.index.iter().map(|k| &*k.kind)
    }

    /// 1-based line of the `[[version]]` header.
    pub fn line(&self) -> usize {
        self.line
    }

    /// A linear scan: a version prices a handful of kinds, and `same` rejects most of them
    /// on their length alone.
    #[inline]
    pub(crate) fn kind_index(&self, kind: &str) -> Option<&KindIndex> {
        self.index.iter().find(|k| same(&k.kind, kind))
    }
}

/// A validated price table: versions in strictly increasing `effective_from` order.
/// Build it with [`super::check`] / [`super::check_file`] / [`PriceTable::load`].
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    pub(crate) versions: Vec<PriceVersion>,
}

impl PriceTable {
    /// Reads and checks a price table file (the only IO in `rating`).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<PriceTable, super::CheckReport> {
        super::check_file(path)
    }

    pub fn versions(&self) -> &[PriceVersion] {
        &self.versions
    }

    /// The version in force at `time`: `effective_from <= time` and before the next version
    /// (or its own `effective_until`). None before the first version or after the end.
    #[inline]
    pub fn version_at(&self, time: DateTime<Utc>) -> Option<&PriceVersion> {
        let after = self.versions.partition_point(|v| v.effective_from <= time);
        let version = self.versions.get(after.checked_sub(1)?)?;
        match version.effective_until {
            Some(until) if time >= until => None,
            _ => Some(version),
        }
    }
}
