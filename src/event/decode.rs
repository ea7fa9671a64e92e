//! The decoder: CloudEvents 1.0 structured-mode JSON bytes -> a typed [`Event`], or a
//! [`Rejection`] naming the reason and the field at fault. A Kafka record in binary mode
//! (`ce_*` headers + `data` as the value) is read by `binary` into the same envelope and
//! checked by the same rules. Pure (the caller passes "now");
//! owns the wire rules, not what an event costs or where it goes.
//!
//! Hot path: one UTF-8 check, then one pass of a strict hand-written scanner (`fast`) over
//! the usual shape of a message: strings borrowed, `data` read straight into the struct of
//! its type. Anything outside that shape (escapes, `data` before `type`, a repeated or
//! unknown key, a wrong JSON type, ...) goes to the serde path, which reads the same
//! [`RawEnvelope`] the scanner would have and words every error: one serde_json pass with
//! `data` typed when `type` comes first (else kept raw and read once the type is known);
//! on any serde error, a pass with raw `data`, then a re-parse with path tracking to name
//! the field. Both paths end in the same checks, so they agree on every outcome. RFC 3339
//! and decimals are parsed by hand. Nothing is allocated for a valid event except escaped
//! strings and the lists of metered attributes / plan thresholds.
//!
//! Precedence when a message breaks several rules: `too_large` > `malformed_json` >
//! envelope `missing_field`/`wrong_type` > `unknown_type` > envelope `invalid_value` >
//! errors in `data` (wrong type, then missing, then invalid, in field order).

mod binary;
mod data;
mod fast;
mod scalar;

pub use binary::{content_mode, decode_binary, decode_record, ContentMode};

use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use self::data::{
    clip, id, invalid, printable, required, timestamp, AdjustmentData, CallData, ChatData, Check,
    GrantData, InstanceData, MeteredData, PlanData, UsageVoidData, VoidGrantData,
};
use self::scalar::{is_well_formed, Text, WellFormed};
use super::*;

/// Bounds applied before and while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Larger messages are rejected as `too_large` without being parsed.
    pub max_message_bytes: usize,
    /// An event `time` further than this ahead of "now" is an `invalid_value` (clock skew).
    pub max_future_seconds: i64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_message_bytes: 64 * 1024,
            max_future_seconds: 300,
        }
    }
}

/// The only `specversion` accepted.
pub const SPEC_VERSION: &str = "1.0";
/// Longest `subject` (account id), in bytes.
pub const MAX_SUBJECT_BYTES: usize = 128;

/// Decodes one message. `now` is only used for the future-time check.
pub fn decode<'a>(
    bytes: &'a [u8],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event<'a>, Rejection> {
    decode_with(bytes, now, limits, true)
}

/// [`decode`] by the serde path alone, never the fast path: for the fuzz target that checks
/// both paths agree (`fuzz/fuzz_targets/decode.rs`). Not for production use.
#[doc(hidden)]
pub fn decode_serde_path<'a>(
    bytes: &'a [u8],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event<'a>, Rejection> {
    decode_with(bytes, now, limits, false)
}

/// [`decode`], with or without the fast path (`fast`: whichever reads the envelope, the
/// outcome is the same; tests compare the two).
fn decode_with<'a>(
    bytes: &'a [u8],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
    fast: bool,
) -> Result<Event<'a>, Rejection> {
    if bytes.len() > limits.max_message_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            None,
            format!(
                "{} bytes, at most {}",
                bytes.len(),
                limits.max_message_bytes
            ),
        ));
    }
    // serde would read a top-level array as a struct written positionally: refuse it first.
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => return Err(malformed("the top level is not a JSON object")),
        None => return Err(malformed("empty message")),
    }
    // One UTF-8 check for the whole message (fast on ASCII); neither the scanner nor
    // serde_json's `str` reader re-validates the strings it borrows.
    let text = std::str::from_utf8(bytes).map_err(|e| malformed(format!("invalid UTF-8: {e}")))?;
    let mut envelope = RawEnvelope::default();
    if !fast || fast::read_envelope(text, &mut envelope).is_none() {
        envelope = RawEnvelope::default();
        read_with_serde(text, &mut envelope)?;
    }
    check(&mut envelope, now, limits).map_err(|rejection| {
        // A rejection found after the envelope parsed may still hide nesting deeper than
        // serde_json's limit inside `data` (raw values are skipped without one).
        if is_well_formed(bytes) {
            rejection
        } else {
            malformed("nested too deep")
        }
    })
}

/// The serde path: `data` typed in the same pass when possible, else (or on any error) a
/// second pass with `data` raw, then a third with path tracking to name the field at fault.
fn read_with_serde<'a>(text: &'a str, envelope: &mut RawEnvelope<'a>) -> Check<()> {
    if read_envelope(text, true, envelope).is_err() {
        // Whatever went wrong in `data` must not hide an envelope error.
        *envelope = RawEnvelope::default();
        if let Err(e) = read_envelope(text, false, envelope) {
            return Err(envelope_error(text.as_bytes(), e));
        }
    }
    Ok(())
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::MalformedJson, None, detail)
}

/// `data` as read by the envelope pass. One per decode, on the stack: boxing the typed data
/// (a call's is the largest, with its optional `hold_id`) would allocate for every event on
/// the hot path, so the size difference is kept.
#[allow(clippy::large_enum_variant)]
enum DataValue<'a> {
    /// Read before its type was known, or on the slow path.
    Raw(&'a RawValue),
    /// Read straight into the struct of its type.
    Typed(TypedData<'a>),
}

enum TypedData<'a> {
    Call(CallData<'a>),
    Chat(ChatData<'a>),
    Instance(InstanceData<'a>),
    Metered(MeteredData<'a>),
    Grant(GrantData<'a>),
    /// Boxed: plans are rare, and their fields would make every event's slot larger.
    Plan(Box<PlanData<'a>>),
    /// Boxed, as rare as plans.
    GrantVoid(Box<VoidGrantData<'a>>),
    Adjustment(Box<AdjustmentData<'a>>),
    UsageVoid(Box<UsageVoidData<'a>>),
}

impl<'a> TypedData<'a> {
    fn parse(kind: EventKind, raw: &'a RawValue) -> Check<TypedData<'a>> {
        Ok(match kind {
            EventKind::Call => TypedData::Call(parse_data(raw)?),
            EventKind::ChatResponse => TypedData::Chat(parse_data(raw)?),
            EventKind::InstanceHours => TypedData::Instance(parse_data(raw)?),
            EventKind::Metered => TypedData::Metered(parse_data(raw)?),
            EventKind::Grant => TypedData::Grant(parse_data(raw)?),
            EventKind::Plan => TypedData::Plan(Box::new(parse_data(raw)?)),
            EventKind::GrantVoid => TypedData::GrantVoid(Box::new(parse_data(raw)?)),
            EventKind::Adjustment => TypedData::Adjustment(Box::new(parse_data(raw)?)),
            EventKind::UsageVoid => TypedData::UsageVoid(Box::new(parse_data(raw)?)),
        })
    }

    /// Checks the value rules and builds the payload, taking the fields out (checked in place
    /// rather than moved first: see [`check`]).
    fn check(&mut self) -> Check<Payload<'a>> {
        match self {
            TypedData::Call(d) => d.check(),
            TypedData::Chat(d) => d.check(),
            TypedData::Instance(d) => d.check(),
            TypedData::Metered(d) => d.check(),
            TypedData::Grant(d) => d.check(),
            TypedData::Plan(d) => d.check(),
            TypedData::GrantVoid(d) => d.check(),
            TypedData::Adjustment(d) => d.check(),
            TypedData::UsageVoid(d) => d.check(),
        }
    }
}

fn check<'a>(
    env: &mut RawEnvelope<'a>,
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Check<Event<'a>> {
    let specversion = required(env.specversion.take(), "specversion")?;
    let event_id = required(env.id.take(), "id")?;
    let source = required(env.source.take(), "source")?;
    let event_type = required(env.event_type.take(), "type")?;
    let subject = required(env.subject.take(), "subject")?;
    let time = required(env.time.take(), "time")?;
    // `data` is checked where it lies: moving it out first stalled on the copy.
    let data = required(env.data.as_mut(), "data")?;
    if let DataValue::Raw(raw) = data {
        if !raw.get().starts_with('{') {
            return Err(Rejection::new(
                Reason::WrongType,
                Some("data"),
                "expected an object",
            ));
        }
    }

    let Some(kind) = EventKind::of_type(event_type.as_str()) else {
        return Err(Rejection::new(
            Reason::UnknownType,
            Some("type"),
            format!("{:?} is not a known event type", clip(event_type.as_str())),
        ));
    };

    if let Some(field) = env.duplicate {
        return Err(invalid(field, "appears more than once"));
    }
    if specversion.as_str() != SPEC_VERSION {
        return Err(invalid(
            "specversion",
            format!("{:?}, expected \"1.0\"", clip(specversion.as_str())),
        ));
    }
    if let Some(content_type) = &env.datacontenttype {
        if !is_json_media_type(content_type.as_str()) {
            return Err(invalid(
                "datacontenttype",
                format!(
                    "{:?}, expected application/json",
                    clip(content_type.as_str())
                ),
            ));
        }
        printable(content_type.as_str(), "datacontenttype")?;
    }
    let event_id = id(event_id, "id")?;
    let source = id(source, "source")?;
    if !is_account_id(subject.as_str()) {
        return Err(invalid(
            "subject",
            format!(
                "{:?} does not match ^[A-Za-z0-9._:-]{{1,128}}$",
                clip(subject.as_str())
            ),
        ));
    }
    let time = timestamp(&time, "time")?;
    // A limit too large to add to `now` is no limit.
    let latest = TimeDelta::try_seconds(limits.max_future_seconds)
        .and_then(|ahead| now.checked_add_signed(ahead));
    if latest.is_some_and(|latest| time > latest) {
        return Err(invalid(
            "time",
            format!(
                "{} is more than {} s after now ({})",
                time.to_rfc3339(),
                limits.max_future_seconds,
                now.to_rfc3339()
            ),
        ));
    }

    let payload = match data {
        DataValue::Typed(typed) => typed.check()?,
        DataValue::Raw(raw) => TypedData::parse(kind, raw)?.check()?,
    };
    api_namespace(&source, subject.as_str(), &event_id, &payload)?;

    Ok(Event {
        envelope: Envelope {
            id: event_id,
            source,
            event_type: event_type.0,
            account_id: subject.0,
            time,
        },
        payload,
    })
}

/// Events under the API's source prefix ([`API_SOURCE_PREFIX`]) must have the shape the API
/// gives its own: the source names the event's account, a grant's (a void's, an
/// adjustment's) id is derived from the account and grant (adjustment) id, a plan's id begins
/// `plan:`, and there is no usage. Kafka does not
/// say who wrote a record, so this cannot tell the API from a producer; it makes whatever is
/// written there the same event the API would publish, so no producer can take the identity
/// of an API grant with other terms (a grant is idempotent by account and grant id).
fn api_namespace(
    source: &str,
    account_id: &str,
    event_id: &str,
    payload: &Payload<'_>,
) -> Check<()> {
    if !source.starts_with(API_SOURCE_PREFIX) {
        return Ok(());
    }
    let expected = api_source(account_id);
    if source != expected {
        return Err(invalid(
            "source",
            format!(
                "sources beginning {API_SOURCE_PREFIX:?} are reserved for Tally's API, which publishes this account's events as {expected:?}"
            ),
        ));
    }
    match payload {
        Payload::Grant(g) => {
            let expected = encode::grant_event_id(account_id, &g.grant_id);
            if event_id != expected {
                return Err(invalid(
                    "id",
                    format!("a grant under {API_SOURCE_PREFIX:?} has the id {:?}", clip(&expected)),
                ));
            }
        }
        Payload::VoidGrant(v) => {
            let expected = encode::void_event_id(account_id, &v.grant_id);
            if event_id != expected {
                return Err(invalid(
                    "id",
                    format!("a grant void under {API_SOURCE_PREFIX:?} has the id {:?}", clip(&expected)),
                ));
            }
        }
        Payload::Adjustment(a) => {
            let expected = encode::adjustment_event_id(account_id, &a.adjustment_id);
            if event_id != expected {
                return Err(invalid(
                    "id",
                    format!("an adjustment under {API_SOURCE_PREFIX:?} has the id {:?}", clip(&expected)),
                ));
            }
        }
        Payload::UsageVoid(v) => {
            let expected = encode::usage_void_event_id(account_id, &v.event_source, &v.event_id);
            if event_id != expected {
                return Err(invalid(
                    "id",
                    format!("a usage void under {API_SOURCE_PREFIX:?} has the id {:?}", clip(&expected)),
                ));
            }
        }
        Payload::Plan(_) => {
            if !event_id.starts_with(API_PLAN_ID_PREFIX) {
                return Err(invalid(
                    "id",
                    format!("a plan under {API_SOURCE_PREFIX:?} has an id beginning {API_PLAN_ID_PREFIX:?}"),
                ));
            }
        }
        _ => {
            return Err(invalid(
                "source",
                format!("Tally's API publishes no usage: sources beginning {API_SOURCE_PREFIX:?} are reserved for its grants and plans"),
            ))
        }
    }
    Ok(())
}

/// `application/json`, optionally with parameters (`; charset=utf-8`).
fn is_json_media_type(s: &str) -> bool {
    match s.strip_prefix("application/json") {
        Some(rest) => rest.is_empty() || rest.starts_with(';'),
        None => false,
    }
}

/// `^[A-Za-z0-9._:-]{1,128}$`
fn is_account_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SUBJECT_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn parse_data<'a, T: Deserialize<'a>>(raw: &'a RawValue) -> Check<T> {
    serde_json::from_str(raw.get()).map_err(|e| locate::<T>(raw.get(), e, "data"))
}

/// A serde error while reading the envelope.
fn envelope_error(bytes: &[u8], e: serde_json::Error) -> Rejection {
    if e.classify() != serde_json::error::Category::Data || !is_well_formed(bytes) {
        return malformed(e.to_string());
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, SlowEnvelope>(&mut de) {
        Ok(_) => classify(&e, ""),
        Err(located) => {
            let path = located.path().to_string();
            classify(located.inner(), &path)
        }
    }
}

/// Re-reads `text` (the `data` object) with path tracking to name the field at fault.
fn locate<'a, T: Deserialize<'a>>(text: &'a str, e: serde_json::Error, base: &str) -> Rejection {
    if e.classify() != serde_json::error::Category::Data {
        return malformed(e.to_string());
    }
    let mut de = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(_) => classify(&e, base),
        Err(located) => {
            let path = located.path().to_string();
            let full = if path == "." {
                base.to_owned()
            } else if base.is_empty() {
                path
            } else {
                format!("{base}.{path}")
            };
            classify(located.inner(), &full)
        }
    }
}

/// Maps a serde data error to a reason. `path` is where serde was when it failed; errors
/// about a named field ("duplicate field `x`") may be raised one level up: the name is
/// added when the path does not already end with it.
fn classify(e: &serde_json::Error, path: &str) -> Rejection {
    let message = e.to_string();
    let detail = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    let named = |prefix: &str| -> Option<String> {
        let rest = detail.strip_prefix(prefix)?;
        let name = &rest[..rest.find('`')?];
        Some(if path.is_empty() || path == name {
            name.to_owned()
        } else if path.ends_with(&format!(".{name}")) {
            path.to_owned()
        } else {
            format!("{path}.{name}")
        })
    };
    let field_or_path = |f: Option<String>| f.unwrap_or_else(|| path.to_owned());
    let (reason, field) = if detail.starts_with("invalid type:") {
        (Reason::WrongType, path.to_owned())
    } else if detail.starts_with("missing field `") {
        (
            Reason::MissingField,
            field_or_path(named("missing field `")),
        )
    } else if detail.starts_with("unknown field `") {
        (
            Reason::InvalidValue,
            field_or_path(named("unknown field `")),
        )
    } else if detail.starts_with("duplicate field `") {
        (
            Reason::InvalidValue,
            field_or_path(named("duplicate field `")),
        )
    } else {
        (Reason::InvalidValue, path.to_owned())
    };
    let field = (!field.is_empty()).then_some(field);
    Rejection {
        reason,
        field,
        detail: detail.to_owned(),
    }
}

/// The envelope as read from the wire: every attribute optional (absent and null are told
/// apart from wrong types later).
#[derive(Default)]
struct RawEnvelope<'a> {
    specversion: Option<Text<'a>>,
    id: Option<Text<'a>>,
    source: Option<Text<'a>>,
    event_type: Option<Text<'a>>,
    subject: Option<Text<'a>>,
    time: Option<Text<'a>>,
    datacontenttype: Option<Text<'a>>,
    data: Option<DataValue<'a>>,
    /// The first known attribute that appeared twice.
    duplicate: Option<&'static str>,
}

/// Reads the envelope into `env` (filled in place: it is a few hundred bytes, and moving it
/// through every serde layer showed up in profiles). `typed`: read `data` into its struct
/// when its type is already known.
fn read_envelope<'a>(
    text: &'a str,
    typed: bool,
    env: &mut RawEnvelope<'a>,
) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(EnvelopeVisitor { typed, env })?;
    de.end()
}

/// The slow path's reading (raw `data`), for serde_path_to_error.
struct SlowEnvelope;

impl<'de> Deserialize<'de> for SlowEnvelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut env = RawEnvelope::default();
        deserializer.deserialize_map(EnvelopeVisitor {
            typed: false,
            env: &mut env,
        })?;
        Ok(SlowEnvelope)
    }
}

struct EnvelopeVisitor<'e, 'a> {
    typed: bool,
    env: &'e mut RawEnvelope<'a>,
}

impl<'de> Visitor<'de> for EnvelopeVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CloudEvents object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let env = self.env;
        let mut seen: u8 = 0;
        let mut mark = |bit: u8, name: &'static str, duplicate: &mut Option<&'static str>| {
            if seen & bit != 0 && duplicate.is_none() {
                *duplicate = Some(name);
            }
            seen |= bit;
        };
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let slot = match key.as_str() {
                "specversion" => {
                    mark(1, "specversion", &mut env.duplicate);
                    &mut env.specversion
                }
                "id" => {
                    mark(2, "id", &mut env.duplicate);
                    &mut env.id
                }
                "source" => {
                    mark(4, "source", &mut env.duplicate);
                    &mut env.source
                }
                "type" => {
                    mark(8, "type", &mut env.duplicate);
                    &mut env.event_type
                }
                "subject" => {
                    mark(16, "subject", &mut env.duplicate);
                    &mut env.subject
                }
                "time" => {
                    mark(32, "time", &mut env.duplicate);
                    &mut env.time
                }
                "datacontenttype" => {
                    mark(64, "datacontenttype", &mut env.duplicate);
                    &mut env.datacontenttype
                }
                "data" => {
                    mark(128, "data", &mut env.duplicate);
                    let kind = match (&env.event_type, env.duplicate) {
                        (Some(t), None) if self.typed => EventKind::of_type(t.as_str()),
                        _ => None,
                    };
                    match kind {
                        Some(kind) => map.next_value_seed(TypedSeed {
                            kind,
                            slot: &mut env.data,
                        })?,
                        None => {
                            env.data = map
                                .next_value::<Option<&'de RawValue>>()?
                                .map(DataValue::Raw)
                        }
                    }
                    continue;
                }
                _ => {
                    // Extension attributes are ignored, but still walked within the depth limit.
                    map.next_value::<WellFormed>()?;
                    continue;
                }
            };
            *slot = map.next_value::<Option<Text<'de>>>()?;
        }
        Ok(())
    }
}

/// Reads `data` (an object, or null) straight into the struct of a known type, in place.
struct TypedSeed<'s, 'a> {
    kind: EventKind,
    slot: &'s mut Option<DataValue<'a>>,
}

impl<'de> DeserializeSeed<'de> for TypedSeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for TypedSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        *self.slot = None;
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.visit_none()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        // deserialize_map, not the derived deserialize_struct: the latter also accepts an array.
        deserializer.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let de = de::value::MapAccessDeserializer::new(map);
        *self.slot = Some(DataValue::Typed(match self.kind {
            EventKind::Call => TypedData::Call(CallData::deserialize(de)?),
            EventKind::ChatResponse => TypedData::Chat(ChatData::deserialize(de)?),
            EventKind::InstanceHours => TypedData::Instance(InstanceData::deserialize(de)?),
            EventKind::Metered => TypedData::Metered(MeteredData::deserialize(de)?),
            EventKind::Grant => TypedData::Grant(GrantData::deserialize(de)?),
            EventKind::Plan => TypedData::Plan(Box::new(PlanData::deserialize(de)?)),
            EventKind::GrantVoid => TypedData::GrantVoid(Box::new(VoidGrantData::deserialize(de)?)),
            EventKind::Adjustment => {
                TypedData::Adjustment(Box::new(AdjustmentData::deserialize(de)?))
            }
            EventKind::UsageVoid => TypedData::UsageVoid(Box::new(UsageVoidData::deserialize(de)?)),
        }));
        Ok(())
    }
}

#[cfg(test)]
mod agreement;
#[cfg(test)]
mod tests;
