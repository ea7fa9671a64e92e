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
    /// Count units: increment > 0 and minimum >= 0 (a multiple of the increment), at most 6 dp.
    Units { increment: Decimal, minimum: Decimal },
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
    pub(crate) line: usize,
}

impl PriceRule {
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
            Billing::Units { increment, .. } => increment,
        }
    }

    /// Minimum billed when the quantity is not zero, in the same measure as `increment`.
    pub fn minimum(&self) -> Decimal {
        match self.billing {
            Billing::Seconds {
                minimum_seconds, ..
            } => Decimal::from(minimum_seconds),
            Billing::Units { minimum, .. } => minimum,
        }
    }

    /// 1-based line of the rule's `[[version.rule]]` header in the source file.
    pub fn line(&self) -> usize {
        self.line
    }

    /// True when every condition is among the attributes.
    #[inline]
    pub(crate) fn matches(&self, attributes: &[(&str, &str)]) -> bool {
        self.conditions.iter().all(|(k, v)| {
            attributes
                .iter()
                .any(|(ak, av)| *ak == &**k && *av == &**v)
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

/// The rules of one kind in one version, as indices into `PriceVersion::rules`, most specific
/// first (file order among equals). For calls, rules matching `direction = "outbound"` are
/// kept apart: only they may price outbound calls.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct KindIndex {
    pub(crate) kind: Box<str>,
    pub(crate) general: Box<[u32]>,
    pub(crate) outbound: Box<[u32]>,
}

/// One effective-dated version of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceVersion {
    pub(crate) id: Box<str>,
    pub(crate) effective_from: DateTime<Utc>,
    pub(crate) effective_until: Option<DateTime<Utc>>,
    pub(crate) rules: Vec<PriceRule>,
    /// Sorted by kind (binary search).
    pub(crate) index: Vec<KindIndex>,
    pub(crate) line: usize,
}

impl PriceVersion {
    pub(crate) fn new(
        id: String,
        effective_from: DateTime<Utc>,
        effective_until: Option<DateTime<Utc>>,
        rules: Vec<PriceRule>,
        line: usize,
    ) -> Self {
        let mut kinds: Vec<&str> = rules.iter().map(|r| &*r.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let index = kinds
            .into_iter()
            .map(|kind| {
                let mut of_kind: Vec<u32> = (0..rules.len() as u32)
                    .filter(|&i| &*rules[i as usize].kind == kind)
                    .collect();
                // Stable: file order among rules of equal specificity.
                of_kind.sort_by_key(|&i| std::cmp::Reverse(rules[i as usize].specificity()));
                let (outbound, general): (Vec<u32>, Vec<u32>) = of_kind
                    .into_iter()
                    .partition(|&i| rules[i as usize].is_outbound_call());
                KindIndex {
                    kind: kind.into(),
                    general: general.into(),
                    outbound: outbound.into(),
                }
            })
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

    /// The usage kinds this version prices.
    pub fn kinds(&self) -> impl Iterator<Item = &str> + '_ {
        self.index.iter().map(|k| &*k.kind)
    }

    /// 1-based line of the `[[version]]` header.
    pub fn line(&self) -> usize {
        self.line
    }

    #[inline]
    pub(crate) fn kind_index(&self, kind: &str) -> Option<&KindIndex> {
        self.index
            .binary_search_by(|k| (*k.kind).cmp(kind))
            .ok()
            .map(|i| &self.index[i])
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
