//! The decoder: CloudEvents 1.0 structured-mode JSON bytes -> a typed [`Event`], or a
//! [`Rejection`] naming the reason and the field at fault. Pure (the caller passes "now");
//! owns the wire rules, not what an event costs or where it goes.
//!
//! Hot path: one serde_json pass over the envelope (strings borrowed, `data` kept as a raw
//! slice), one pass over `data` into the struct of its type, RFC 3339 and decimals parsed
//! by hand. Nothing is allocated for a valid event except escaped strings and the lists of
//! metered attributes / plan thresholds. The error path re-parses to name the field.
//!
//! Precedence when a message breaks several rules: `too_large` > `malformed_json` >
//! envelope `missing_field`/`wrong_type` > `unknown_type` > envelope `invalid_value` >
//! errors in `data` (wrong type, then missing, then invalid, in field order).

mod data;
mod scalar;

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use self::data::{
    clip, id, invalid, required, timestamp, CallData, ChatData, Check, GrantData, InstanceData,
    MeteredData, PlanData,
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
    let envelope: RawEnvelope<'a> = match serde_json::from_slice(bytes) {
        Ok(envelope) => envelope,
        Err(e) => return Err(envelope_error(bytes, e)),
    };
    check(envelope, now, limits).map_err(|rejection| {
        // A rejection found after the envelope parsed may still hide nesting deeper than
        // serde_json's limit inside `data` (raw values are skipped without one).
        if is_well_formed(bytes) {
            rejection
        } else {
            malformed("nested too deep")
        }
    })
}

fn malformed(detail: impl Into<String>) -> Rejection {
    Rejection::new(Reason::MalformedJson, None, detail)
}

#[derive(Clone, Copy)]
enum Kind {
    Call,
    Chat,
    Instance,
    Metered,
    Grant,
    Plan,
}

fn check<'a>(
    env: RawEnvelope<'a>,
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Check<Event<'a>> {
    let specversion = required(env.specversion, "specversion")?;
    let event_id = required(env.id, "id")?;
    let source = required(env.source, "source")?;
    let event_type = required(env.event_type, "type")?;
    let subject = required(env.subject, "subject")?;
    let time = required(env.time, "time")?;
    let data = required(env.data, "data")?;
    if !data.get().starts_with('{') {
        return Err(Rejection::new(
            Reason::WrongType,
            Some("data"),
            "expected an object",
        ));
    }

    let kind = match event_type.as_str() {
        types::CALL => Kind::Call,
        types::CHAT_RESPONSE => Kind::Chat,
        types::INSTANCE_HOURS => Kind::Instance,
        types::METERED => Kind::Metered,
        types::GRANT => Kind::Grant,
        types::PLAN => Kind::Plan,
        other => {
            return Err(Rejection::new(
                Reason::UnknownType,
                Some("type"),
                format!("{:?} is not a known event type", clip(other)),
            ))
        }
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
    if time > now + Duration::seconds(limits.max_future_seconds) {
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

    let payload = match kind {
        Kind::Call => parse_data::<CallData>(data)?.check()?,
        Kind::Chat => parse_data::<ChatData>(data)?.check()?,
        Kind::Instance => parse_data::<InstanceData>(data)?.check()?,
        Kind::Metered => parse_data::<MeteredData>(data)?.check()?,
        Kind::Grant => parse_data::<GrantData>(data)?.check()?,
        Kind::Plan => parse_data::<PlanData>(data)?.check()?,
    };

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
        && s
            .bytes()
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
    match serde_path_to_error::deserialize::<_, RawEnvelope>(&mut de) {
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
/// about a named field ("unknown field `x`") are raised one level up, so the name is added.
fn classify(e: &serde_json::Error, path: &str) -> Rejection {
    let message = e.to_string();
    let detail = message
        .rsplit_once(" at line ")
        .map_or(message.as_str(), |(m, _)| m);
    let named = |prefix: &str| -> Option<String> {
        let rest = detail.strip_prefix(prefix)?;
        let name = &rest[..rest.find('`')?];
        Some(if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        })
    };
    let field_or_path = |f: Option<String>| f.unwrap_or_else(|| path.to_owned());
    let (reason, field) = if detail.starts_with("invalid type:") {
        (Reason::WrongType, path.to_owned())
    } else if detail.starts_with("missing field `") {
        (Reason::MissingField, field_or_path(named("missing field `")))
    } else if detail.starts_with("unknown field `") {
        (Reason::InvalidValue, field_or_path(named("unknown field `")))
    } else if detail.starts_with("duplicate field `") {
        (Reason::InvalidValue, field_or_path(named("duplicate field `")))
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
/// apart from wrong types later), `data` kept raw until the type is known.
struct RawEnvelope<'a> {
    specversion: Option<Text<'a>>,
    id: Option<Text<'a>>,
    source: Option<Text<'a>>,
    event_type: Option<Text<'a>>,
    subject: Option<Text<'a>>,
    time: Option<Text<'a>>,
    datacontenttype: Option<Text<'a>>,
    data: Option<&'a RawValue>,
    /// The first known attribute that appeared twice.
    duplicate: Option<&'static str>,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEnvelope<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EnvelopeVisitor)
    }
}

struct EnvelopeVisitor;

impl<'de> Visitor<'de> for EnvelopeVisitor {
    type Value = RawEnvelope<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CloudEvents object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut env = RawEnvelope {
            specversion: None,
            id: None,
            source: None,
            event_type: None,
            subject: None,
            time: None,
            datacontenttype: None,
            data: None,
            duplicate: None,
        };
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
                    env.data = map.next_value::<Option<&'de RawValue>>()?;
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
        Ok(env)
    }
}

#[cfg(test)]
mod tests;
