//! Price table files: TOML text -> a validated [`PriceTable`], or every error found, each
//! with its 1-based line (`tally prices check FILE`). The file format is documented at the
//! top of `prices/default.toml`.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use toml_edit::{ImDocument, Item, Table, TableLike, Value};

use super::table::{Billing, PriceRule, PriceTable, PriceVersion, Unit, MICROS};
use crate::event::{KIND_CALL, KIND_INSTANCE};

/// One problem in a price table file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    /// 1-based line in the source.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Why a price table file could not be loaded. Display prints one `FILE:LINE: message`
/// line per error (or `FILE: cannot read: ...`).
#[derive(Debug)]
pub enum CheckReport {
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    Invalid {
        path: PathBuf,
        errors: Vec<TableError>,
    },
}

impl CheckReport {
    /// The errors found in the file (empty when it could not be read).
    pub fn errors(&self) -> &[TableError] {
        match self {
            CheckReport::Unreadable { .. } => &[],
            CheckReport::Invalid { errors, .. } => errors,
        }
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckReport::Unreadable { path, source } => {
                write!(f, "{}: cannot read: {source}", path.display())
            }
            CheckReport::Invalid { path, errors } => {
                for (i, e) in errors.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    write!(f, "{}:{}: {}", path.display(), e.line, e.message)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CheckReport {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckReport::Unreadable { source, .. } => Some(source),
            CheckReport::Invalid { .. } => None,
        }
    }
}

/// Reads and checks a price table file.
pub fn check_file(path: impl AsRef<Path>) -> Result<PriceTable, CheckReport> {
    let path = path.as_ref();
    let source = std::fs::read_to_string(path).map_err(|source| CheckReport::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    check(&source).map_err(|errors| CheckReport::Invalid {
        path: path.to_owned(),
        errors,
    })
}

/// Parses and validates a price table. Reports every error found (sorted by line), not just
/// the first; a TOML syntax error stops the check there.
pub fn check(source: &str) -> Result<PriceTable, Vec<TableError>> {
    let mut checker = Checker::new(source);
    let doc = match ImDocument::parse(source) {
        Ok(doc) => doc,
        Err(e) => {
            let line = checker.line_of(e.span());
            let message = e.message().trim().replace('\n', "; ");
            return Err(vec![TableError {
                line,
                message: format!("TOML syntax: {message}"),
            }]);
        }
    };
    let versions = checker.document(doc.as_table());
    checker.versions_in_order(&versions);
    for version in &versions {
        checker.rules_distinct(version);
    }
    for pair in versions.windows(2) {
        checker.coverage(&pair[0], &pair[1]);
    }
    if !checker.errors.is_empty() {
        let mut errors = checker.errors;
        errors.sort_by_key(|e| e.line);
        return Err(errors);
    }
    match build(versions) {
        Some(table) => Ok(table),
        None => Err(vec![TableError {
            line: 1,
            message: "internal error: an incomplete rule passed the checks".into(),
        }]),
    }
}

const VERSION_KEYS: &str = "id, effective_from, effective_until, rule";
const RULE_KEYS: &str = "id, kind, match, unit, credits_per_unit, increment, minimum";

/// The kinds whose usage is measured in seconds; every other kind is counted.
fn is_time_kind(kind: &str) -> bool {
    kind == KIND_CALL || kind == KIND_INSTANCE
}

fn valid_kind(kind: &str) -> bool {
    let mut chars = kind.chars();
    matches!(chars.next(), Some('a'..='z'))
        && kind.len() <= 64
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn time_units() -> String {
    names(Unit::ALL.into_iter().filter(|u| u.is_time()))
}

fn count_units() -> String {
    names(Unit::ALL.into_iter().filter(|u| !u.is_time()))
}

fn names(units: impl Iterator<Item = Unit>) -> String {
    let units: Vec<&str> = units.map(Unit::as_str).collect();
    match units.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A count with at most 6 decimal places, in millionths.
fn micros(value: Decimal) -> Option<u64> {
    value
        .checked_mul(Decimal::from(MICROS))
        .and_then(|m| u64::try_from(m).ok())
}

fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

type Conditions = Vec<(String, String)>;

fn show_conditions(conditions: &[(String, String)]) -> String {
    if conditions.is_empty() {
        return "{}".into();
    }
    let pairs: Vec<String> = conditions
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect();
    format!("{{ {} }}", pairs.join(", "))
}

/// A version as read, with whatever could be parsed.
struct DraftVersion {
    line: usize,
    id: Option<String>,
    effective_from: Option<(DateTime<Utc>, usize)>,
    effective_until: Option<(DateTime<Utc>, usize)>,
    rules: Vec<DraftRule>,
}

impl DraftVersion {
    fn label(&self) -> String {
        match &self.id {
            Some(id) => format!("version `{id}`"),
            None => "version".into(),
        }
    }
}

struct DraftRule {
    line: usize,
    id: Option<String>,
    kind: Option<String>,
    conditions: Option<Conditions>,
    price: Option<(Unit, Decimal, Billing)>,
}

impl DraftRule {
    /// Kind and conditions, when both parsed (enough for the cross-rule checks).
    fn shape(&self) -> Option<(&str, &Conditions)> {
        Some((self.kind.as_deref()?, self.conditions.as_ref()?))
    }
}

fn is_outbound_call(kind: &str, conditions: &Conditions) -> bool {
    kind == KIND_CALL
        && conditions
            .iter()
            .any(|(k, v)| k == "direction" && v == "outbound")
}

/// No key has different values in the two: some event matches both.
fn compatible(a: &Conditions, b: &Conditions) -> bool {
    a.iter()
        .all(|(k, v)| b.iter().all(|(bk, bv)| bk != k || bv == v))
}

fn subset(a: &Conditions, b: &Conditions) -> bool {
    a.iter().all(|pair| b.contains(pair))
}

fn union(a: &Conditions, b: &Conditions) -> Conditions {
    let mut out = a.clone();
    out.extend(b.iter().filter(|pair| !a.contains(pair)).cloned());
    out
}

/// The conditions a call rule really imposes: rules without `direction` only price inbound
/// calls (outbound ones need an explicit `direction = "outbound"`).
fn effective(kind: &str, conditions: &Conditions) -> Conditions {
    let mut out = conditions.clone();
    if kind == KIND_CALL && !out.iter().any(|(k, _)| k == "direction") {
        out.push(("direction".into(), "inbound".into()));
    }
    out
}

struct Checker {
    line_starts: Vec<usize>,
    errors: Vec<TableError>,
}

impl Checker {
    fn new(source: &str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Checker {
            line_starts,
            errors: Vec::new(),
        }
    }

    fn line_of(&self, span: Option<Range<usize>>) -> usize {
        match span {
            Some(span) => self.line_starts.partition_point(|&s| s <= span.start),
            None => 1,
        }
    }

    fn error(&mut self, line: usize, message: impl Into<String>) {
        self.errors.push(TableError {
            line,
            message: message.into(),
        });
    }

    /// Line of `key` in a table (its key, else its value, else `fallback`).
    fn key_line(&self, table: &dyn TableLike, key: &str, fallback: usize) -> usize {
        table
            .key(key)
            .and_then(|k| k.span())
            .or_else(|| table.get(key).and_then(Item::span))
            .map_or(fallback, |span| self.line_of(Some(span)))
    }

    fn document(&mut self, root: &Table) -> Vec<DraftVersion> {
        for (key, _) in root.iter() {
            if key != "version" {
                let line = self.key_line(root, key, 1);
                self.error(
                    line,
                    format!("unknown key `{key}` (a price table holds only [[version]] tables)"),
                );
            }
        }
        match root.get("version") {
            None => {
                self.error(
                    1,
                    "no [[version]]: a price table needs at least one version",
                );
                Vec::new()
            }
            Some(Item::ArrayOfTables(versions)) => {
                versions.iter().map(|table| self.version(table)).collect()
            }
            Some(_) => {
                let line = self.key_line(root, "version", 1);
                self.error(line, "`version` must be written as [[version]] tables");
                Vec::new()
            }
        }
    }

    fn string(
        &mut self,
        table: &dyn TableLike,
        key: &str,
        line: usize,
        what: &str,
    ) -> Option<String> {
        let item = table.get(key)?;
        match item.as_str() {
            Some(s) if !s.trim().is_empty() => Some(s.to_owned()),
            Some(_) => {
                let line = self.key_line(table, key, line);
                self.error(line, format!("{what}: `{key}` must not be empty"));
                None
            }
            None => {
                let line = self.key_line(table, key, line);
                self.error(
                    line,
                    format!(
                        "{what}: `{key}` must be a string, found {}",
                        item.type_name()
                    ),
                );
                None
            }
        }
    }

    fn datetime(
        &mut self,
        table: &Table,
        key: &str,
        line: usize,
        what: &str,
    ) -> Option<(DateTime<Utc>, usize)> {
        let item = table.get(key)?;
        let line = self.key_line(table, key, line);
        let text = match item.as_value() {
            Some(Value::Datetime(dt)) => {
                let dt = dt.value();
                (dt.date.is_some() && dt.time.is_some() && dt.offset.is_some())
                    .then(|| dt.to_string())
            }
            Some(Value::String(s)) => Some(s.value().clone()),
            _ => None,
        };
        match text.and_then(|t| DateTime::parse_from_rfc3339(&t).ok()) {
            Some(time) => Some((time.with_timezone(&Utc), line)),
            None => {
                self.error(
                    line,
                    format!(
                        "{what}: `{key}` must be an RFC 3339 date-time with an offset, e.g. 2025-01-01T00:00:00Z"
                    ),
                );
                None
            }
        }
    }

    fn version(&mut self, table: &Table) -> DraftVersion {
        let line = self.line_of(table.span());
        let id = self.string(table, "id", line, "version");
        let mut version = DraftVersion {
            line,
            id,
            effective_from: None,
            effective_until: None,
            rules: Vec::new(),
        };
        let label = version.label();
        for (key, _) in table.iter() {
            if !matches!(key, "id" | "effective_from" | "effective_until" | "rule") {
                let line = self.key_line(table, key, line);
                self.error(
                    line,
                    format!("{label}: unknown key `{key}` (expected {VERSION_KEYS})"),
                );
            }
        }
        if !table.contains_key("id") {
            self.error(line, format!("{label} is missing `id`"));
        }
        if !table.contains_key("effective_from") {
            self.error(line, format!("{label} is missing `effective_from`"));
        }
        version.effective_from = self.datetime(table, "effective_from", line, &label);
        version.effective_until = self.datetime(table, "effective_until", line, &label);
        match table.get("rule") {
            None => self.error(line, format!("{label} has no [[version.rule]]")),
            Some(Item::ArrayOfTables(rules)) => {
                version.rules = rules.iter().map(|rule| self.rule(rule)).collect();
            }
            Some(_) => {
                let line = self.key_line(table, "rule", line);
                self.error(
                    line,
                    format!("{label}: `rule` must be written as [[version.rule]] tables"),
                );
            }
        }
        version
    }

    /// A decimal written as a string ("1.5") or an integer (2); floats are refused.
    fn decimal(&mut self, table: &Table, key: &str, line: usize, what: &str) -> Option<Decimal> {
        let item = table.get(key)?;
        let line = self.key_line(table, key, line);
        let problem = match item.as_value() {
            Some(Value::String(s)) => match Decimal::from_str_exact(s.value().trim()) {
                Ok(d) => return Some(d),
                Err(_) => format!("`{key}` must be a decimal number, got {:?}", s.value()),
            },
            Some(Value::Integer(i)) => return Some(Decimal::from(*i.value())),
            Some(Value::Float(f)) => format!(
                "`{key}` must be a decimal string such as \"{}\" (floats are inexact)",
                f.value()
            ),
            _ => format!(
                "`{key}` must be a decimal string, found {}",
                item.type_name()
            ),
        };
        self.error(line, format!("{what}: {problem}"));
        None
    }

    fn rule(&mut self, table: &Table) -> DraftRule {
        let line = self.line_of(table.span());
        let id = self.string(table, "id", line, "rule");
        let what = match &id {
            Some(id) => format!("rule `{id}`"),
            None => "rule".into(),
        };
        for (key, _) in table.iter() {
            if !matches!(
                key,
                "id" | "kind" | "match" | "unit" | "credits_per_unit" | "increment" | "minimum"
            ) {
                let line = self.key_line(table, key, line);
                self.error(
                    line,
                    format!("{what}: unknown key `{key}` (expected {RULE_KEYS})"),
                );
            }
        }
        for key in ["id", "kind", "unit", "credits_per_unit"] {
            if !table.contains_key(key) {
                self.error(line, format!("{what} is missing `{key}`"));
            }
        }

        let kind = self.string(table, "kind", line, &what).and_then(|kind| {
            if valid_kind(&kind) {
                Some(kind)
            } else {
                let line = self.key_line(table, "kind", line);
                self.error(
                    line,
                    format!("{what}: kind `{kind}` must match ^[a-z][a-z0-9_]{{0,63}}$"),
                );
                None
            }
        });
        let conditions = self.conditions(table, line, &what, kind.as_deref());

        let unit = self.string(table, "unit", line, &what).and_then(|name| {
            let unit = Unit::parse(&name);
            if unit.is_none() {
                let line = self.key_line(table, "unit", line);
                self.error(
                    line,
                    format!(
                        "{what}: unknown unit `{name}` (expected {})",
                        names(Unit::ALL.into_iter())
                    ),
                );
            }
            unit
        });
        if let (Some(kind), Some(unit)) = (&kind, unit) {
            let unit_line = self.key_line(table, "unit", line);
            if is_time_kind(kind) && !unit.is_time() {
                self.error(
                    unit_line,
                    format!(
                        "{what}: kind `{kind}` is measured in seconds, but `{unit}` is a count unit (use {})",
                        time_units()
                    ),
                );
            } else if !is_time_kind(kind) && unit.is_time() {
                self.error(
                    unit_line,
                    format!(
                        "{what}: kind `{kind}` is counted, but `{unit}` is a time unit (use {})",
                        count_units()
                    ),
                );
            }
        }

        let credits_per_unit = self
            .decimal(table, "credits_per_unit", line, &what)
            .and_then(|price| {
                if price < Decimal::ZERO {
                    let line = self.key_line(table, "credits_per_unit", line);
                    self.error(
                        line,
                        format!("{what}: `credits_per_unit` must not be negative, got {price}"),
                    );
                    None
                } else {
                    Some(price)
                }
            });
        let billing = self.billing(table, line, &what, unit);
        let price = match (unit, credits_per_unit, billing) {
            (Some(unit), Some(price), Some(billing)) => Some((unit, price, billing)),
            _ => None,
        };
        DraftRule {
            line,
            id,
            kind,
            conditions,
            price,
        }
    }

    fn conditions(
        &mut self,
        table: &Table,
        line: usize,
        what: &str,
        kind: Option<&str>,
    ) -> Option<Conditions> {
        let Some(item) = table.get("match") else {
            return Some(Vec::new());
        };
        let Some(pairs) = item.as_table_like() else {
            let line = self.key_line(table, "match", line);
            self.error(
                line,
                format!(
                    "{what}: `match` must be a table such as {{ model = \"gpt-4o\" }}, found {}",
                    item.type_name()
                ),
            );
            return None;
        };
        let mut conditions = Vec::new();
        let mut ok = true;
        for (key, value) in pairs.iter() {
            let value_line = self.key_line(pairs, key, line);
            match value.as_str() {
                Some("") => {
                    self.error(
                        value_line,
                        format!("{what}: `match.{key}` must not be empty"),
                    );
                    ok = false;
                }
                Some(v) => {
                    if kind == Some(KIND_CALL)
                        && key == "direction"
                        && !matches!(v, "inbound" | "outbound")
                    {
                        self.error(
                            value_line,
                            format!("{what}: `match.direction` must be \"inbound\" or \"outbound\", got {v:?}"),
                        );
                        ok = false;
                    }
                    conditions.push((key.to_owned(), v.to_owned()));
                }
                None => {
                    self.error(
                        value_line,
                        format!(
                            "{what}: `match.{key}` must be a string, found {}",
                            value.type_name()
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(conditions)
    }

    /// Increment and minimum: whole seconds for time units, decimals with at most 6 dp for
    /// count units; increment > 0 (default 1), minimum >= 0 (default 0) and a multiple of it.
    fn billing(
        &mut self,
        table: &Table,
        line: usize,
        what: &str,
        unit: Option<Unit>,
    ) -> Option<Billing> {
        let increment_line = self.key_line(table, "increment", line);
        let minimum_line = self.key_line(table, "minimum", line);
        let increment = match table.contains_key("increment") {
            false => Some(Decimal::ONE),
            true => self
                .decimal(table, "increment", line, what)
                .and_then(|increment| {
                    if increment < Decimal::ZERO {
                        self.error(
                            increment_line,
                            format!("{what}: `increment` must be positive, got {increment}"),
                        );
                        None
                    } else if increment.is_zero() {
                        self.error(
                            increment_line,
                            format!("{what}: `increment` must not be zero"),
                        );
                        None
                    } else {
                        Some(increment)
                    }
                }),
        };
        let minimum = match table.contains_key("minimum") {
            false => Some(Decimal::ZERO),
            true => self
                .decimal(table, "minimum", line, what)
                .and_then(|minimum| {
                    if minimum < Decimal::ZERO {
                        self.error(
                            minimum_line,
                            format!("{what}: `minimum` must not be negative, got {minimum}"),
                        );
                        None
                    } else {
                        Some(minimum)
                    }
                }),
        };
        let unit = unit?;
        let (increment, minimum) = (increment?, minimum?);
        let mut ok = true;
        if unit.is_time() {
            for (name, value, at) in [
                ("increment", increment, increment_line),
                ("minimum", minimum, minimum_line),
            ] {
                if !value.fract().is_zero() || u64::try_from(value).is_err() {
                    self.error(
                        at,
                        format!("{what}: `{name}` must be a whole number of seconds, got {value}"),
                    );
                    ok = false;
                }
            }
        } else {
            for (name, value, at) in [
                ("increment", increment, increment_line),
                ("minimum", minimum, minimum_line),
            ] {
                if value.normalize().scale() > 6 {
                    self.error(
                        at,
                        format!("{what}: `{name}` must have at most 6 decimal places, got {value}"),
                    );
                    ok = false;
                } else if micros(value).is_none() {
                    self.error(at, format!("{what}: `{name}` {value} is too large"));
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        if !(minimum % increment).is_zero() {
            self.error(
                minimum_line,
                format!("{what}: `minimum` {minimum} is not a multiple of `increment` {increment}"),
            );
            return None;
        }
        Some(if unit.is_time() {
            Billing::Seconds {
                increment_seconds: u64::try_from(increment).ok()?,
                minimum_seconds: u64::try_from(minimum).ok()?,
            }
        } else {
            Billing::Units {
                increment_micros: micros(increment)?,
                minimum_micros: micros(minimum)?,
            }
        })
    }

    /// Distinct version ids; `effective_from` strictly increasing; `effective_until` after
    /// its own start and equal to the next version's start (no gap, no overlap).
    fn versions_in_order(&mut self, versions: &[DraftVersion]) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for version in versions {
            if let Some(id) = &version.id {
                if let Some(first) = seen.get(id.as_str()) {
                    self.error(
                        version.line,
                        format!("duplicate version id `{id}` (first at line {first})"),
                    );
                } else {
                    seen.insert(id, version.line);
                }
            }
        }
        for (i, version) in versions.iter().enumerate() {
            let label = version.label();
            let next = versions.get(i + 1);
            if let (Some(next), Some((from, _)), Some((next_from, next_line))) = (
                next,
                version.effective_from,
                next.and_then(|n| n.effective_from),
            ) {
                if next_from <= from {
                    self.error(
                        next_line,
                        format!(
                            "{}: effective_from {} is not after the effective_from of {label} ({}): versions must be in time order",
                            next.label(),
                            rfc3339(next_from),
                            rfc3339(from)
                        ),
                    );
                }
            }
            let Some((until, until_line)) = version.effective_until else {
                continue;
            };
            if let Some((from, _)) = version.effective_from {
                if until <= from {
                    self.error(
                        until_line,
                        format!(
                            "{label}: effective_until {} is not after its effective_from {}",
                            rfc3339(until),
                            rfc3339(from)
                        ),
                    );
                    continue;
                }
            }
            let Some(next) = next else { continue };
            let Some((next_from, _)) = next.effective_from else {
                continue;
            };
            if until < next_from {
                self.error(
                    until_line,
                    format!(
                        "{label}: effective_until {} leaves a gap before {} starts at {} (usage in between would be unpriced)",
                        rfc3339(until),
                        next.label(),
                        rfc3339(next_from)
                    ),
                );
            } else if until > next_from {
                self.error(
                    until_line,
                    format!(
                        "{label}: effective_until {} is after {} starts at {} (versions overlap)",
                        rfc3339(until),
                        next.label(),
                        rfc3339(next_from)
                    ),
                );
            }
        }
    }

    /// Distinct rule ids, and no two rules an event could match with the same specificity
    /// (unless a more specific rule takes every such event).
    fn rules_distinct(&mut self, version: &DraftVersion) {
        let label = version.label();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for rule in &version.rules {
            if let Some(id) = &rule.id {
                if let Some(first) = seen.get(id.as_str()) {
                    self.error(
                        rule.line,
                        format!("duplicate rule id `{id}` in {label} (first at line {first})"),
                    );
                } else {
                    seen.insert(id, rule.line);
                }
            }
        }
        for (j, b) in version.rules.iter().enumerate() {
            let Some((kind, b_conditions)) = b.shape() else {
                continue;
            };
            for a in &version.rules[..j] {
                let Some((a_kind, a_conditions)) = a.shape() else {
                    continue;
                };
                if a_kind != kind
                    || a_conditions.len() != b_conditions.len()
                    || is_outbound_call(kind, a_conditions) != is_outbound_call(kind, b_conditions)
                    || !compatible(a_conditions, b_conditions)
                {
                    continue;
                }
                let both = union(a_conditions, b_conditions);
                let settled = version.rules.iter().any(|r| {
                    r.shape().is_some_and(|(r_kind, r_conditions)| {
                        r_kind == kind
                            && r_conditions.len() > b_conditions.len()
                            && subset(r_conditions, &both)
                            && is_outbound_call(kind, r_conditions)
                                == is_outbound_call(kind, b_conditions)
                    })
                });
                if settled {
                    continue;
                }
                let a_name = a.id.as_deref().unwrap_or("?");
                let b_name = b.id.as_deref().unwrap_or("?");
                let message = if a_conditions.len() == both.len() {
                    format!(
                        "rule `{b_name}` has the same {kind} conditions as rule `{a_name}` (line {}): {}",
                        a.line,
                        show_conditions(&both)
                    )
                } else {
                    format!(
                        "rule `{b_name}` ties with rule `{a_name}` (line {}): a {kind} event matching {} matches both with the same specificity; add a rule for exactly those attributes or make one more specific",
                        a.line,
                        show_conditions(&both)
                    )
                };
                self.error(b.line, message);
            }
        }
    }

    /// Everything `prev` prices, `next` prices too: a kind or an attribute combination that
    /// disappears would make its usage unpriced from `next`'s start. (Outbound call rules are
    /// exempt: without them outbound calls are free, not unpriced.)
    fn coverage(&mut self, prev: &DraftVersion, next: &DraftVersion) {
        if next.rules.is_empty() {
            return; // reported already: a version without rules
        }
        let since = next
            .effective_from
            .map(|(t, _)| format!(" from {} on", rfc3339(t)))
            .unwrap_or_default();
        let next_shapes: Vec<(&str, &Conditions)> =
            next.rules.iter().filter_map(DraftRule::shape).collect();
        let mut missing_kinds: Vec<&str> = Vec::new();
        for rule in &prev.rules {
            let Some((kind, conditions)) = rule.shape() else {
                continue;
            };
            if is_outbound_call(kind, conditions) || missing_kinds.contains(&kind) {
                continue;
            }
            let of_kind: Vec<&Conditions> = next_shapes
                .iter()
                .filter(|(k, c)| *k == kind && !is_outbound_call(k, c))
                .map(|(_, c)| *c)
                .collect();
            if of_kind.is_empty() {
                missing_kinds.push(kind);
                self.error(
                    next.line,
                    format!(
                        "{} has no rule for kind `{kind}`, which {} prices: {kind} usage{since} would be unpriced",
                        next.label(),
                        prev.label()
                    ),
                );
                continue;
            }
            let wanted = effective(kind, conditions);
            if !of_kind.iter().any(|c| subset(&effective(kind, c), &wanted)) {
                self.error(
                    next.line,
                    format!(
                        "{} prices no {kind} usage matching {} (rule `{}` of {}, line {}): such usage{since} would be unpriced",
                        next.label(),
                        show_conditions(&wanted),
                        rule.id.as_deref().unwrap_or("?"),
                        prev.label(),
                        rule.line
                    ),
                );
            }
        }
    }
}

/// The table, once every check passed (all drafts complete).
fn build(versions: Vec<DraftVersion>) -> Option<PriceTable> {
    let versions = versions
        .into_iter()
        .map(|v| {
            let rules = v
                .rules
                .into_iter()
                .map(|r| {
                    let (unit, credits_per_unit, billing) = r.price?;
                    Some(PriceRule::new(
                        r.id?,
                        r.kind?,
                        r.conditions?,
                        unit,
                        credits_per_unit,
                        billing,
                        r.line,
                    ))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(PriceVersion::new(
                v.id?,
                v.effective_from?.0,
                v.effective_until.map(|(t, _)| t),
                rules,
                v.line,
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    (!versions.is_empty()).then_some(PriceTable { versions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::KIND_CHAT;

    #[test]
    fn kind_names() {
        assert!(valid_kind("ai_analysis"));
        assert!(valid_kind(KIND_CHAT));
        assert!(!valid_kind("AI"));
        assert!(!valid_kind("9lives"));
        assert!(!valid_kind(""));
    }

    #[test]
    fn unit_lists_read_well() {
        assert_eq!(time_units(), "second, minute or hour");
        assert_eq!(
            count_units(),
            "response, unit, image, analysis, request or token"
        );
    }
}
