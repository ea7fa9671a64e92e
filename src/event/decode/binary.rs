//! The CloudEvents Kafka protocol binding (1.0): which content mode a record uses, and the
//! binary mode's reading (attributes in `ce_*` headers, `data` in the value, its media type in
//! `content-type`). Fills the same [`RawEnvelope`] the structured reading fills and ends in
//! the same [`check`], so both modes give the same event, the same identity (`source`, `id`)
//! and the same rejections (reason and field). Pure, like the rest of the decoder.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::scalar::{is_well_formed, Text};
use super::{check, decode, malformed, DataValue, DecodeLimits, RawEnvelope};
use crate::event::{Event, Reason, Rejection};

/// Prefix of the headers that carry the attributes in binary mode.
pub const HEADER_PREFIX: &str = "ce_";
/// The header holding the structured-mode media type, or in binary mode `datacontenttype`.
pub const CONTENT_TYPE: &str = "content-type";

/// How a Kafka record carries its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// The value is the whole event as CloudEvents JSON (`content-type:
    /// application/cloudevents+json`, or no CloudEvents header at all).
    Structured,
    /// The attributes are `ce_*` headers; the value is `data`.
    Binary,
}

impl ContentMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentMode::Structured => "structured",
            ContentMode::Binary => "binary",
        }
    }
}

/// The binding's rule: a `content-type` beginning `application/cloudevents` is structured
/// mode; otherwise a record with `ce_*` headers is binary mode. A record with neither (how
/// Tally's own producers and most JSON producers write) is read as structured JSON.
pub fn content_mode<'h>(headers: impl IntoIterator<Item = (&'h str, &'h [u8])>) -> ContentMode {
    let mut binary = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(CONTENT_TYPE) {
            let media_type = value.get(..23).unwrap_or(value);
            if media_type.eq_ignore_ascii_case(b"application/cloudevents") {
                return ContentMode::Structured;
            }
        } else if name.starts_with(HEADER_PREFIX) {
            binary = true;
        }
    }
    if binary {
        ContentMode::Binary
    } else {
        ContentMode::Structured
    }
}

/// Decodes one Kafka record in whichever content mode its headers say ([`content_mode`]).
pub fn decode_record<'a>(
    value: &'a [u8],
    headers: &'a [(String, Vec<u8>)],
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event<'a>, Rejection> {
    let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    match content_mode(pairs.clone()) {
        ContentMode::Structured => decode(value, now, limits),
        ContentMode::Binary => decode_binary(value, pairs, now, limits),
    }
}

/// Binary mode: `ce_<attribute>` headers, `content-type` = `datacontenttype`, the value =
/// `data` (empty or JSON `null`: no data). The size limit covers the value and the headers
/// read. Other `ce_*` headers are extension attributes, ignored like structured ones.
pub fn decode_binary<'a>(
    value: &'a [u8],
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
    now: DateTime<Utc>,
    limits: &DecodeLimits,
) -> Result<Event<'a>, Rejection> {
    let header_bytes: usize = headers
        .clone()
        .into_iter()
        .filter(|(name, _)| name.starts_with(HEADER_PREFIX) || is_content_type(name))
        .map(|(name, v)| name.len() + v.len())
        .sum();
    let size = value.len() + header_bytes;
    if size > limits.max_message_bytes {
        return Err(Rejection::new(
            Reason::TooLarge,
            None,
            format!(
                "{size} bytes (value and CloudEvents headers), at most {}",
                limits.max_message_bytes
            ),
        ));
    }

    let mut env = RawEnvelope::default();
    let mut seen: u8 = 0;
    for (name, raw) in headers {
        let (bit, field, slot) = match name {
            "ce_specversion" => (1, "specversion", &mut env.specversion),
            "ce_id" => (2, "id", &mut env.id),
            "ce_source" => (4, "source", &mut env.source),
            "ce_type" => (8, "type", &mut env.event_type),
            "ce_subject" => (16, "subject", &mut env.subject),
            "ce_time" => (32, "time", &mut env.time),
            _ if is_content_type(name) => (64, "datacontenttype", &mut env.datacontenttype),
            _ => continue,
        };
        let text = std::str::from_utf8(raw)
            .map_err(|e| malformed(format!("header {name} is not UTF-8: {e}")))?;
        if seen & bit != 0 && env.duplicate.is_none() {
            env.duplicate = Some(field);
        }
        seen |= bit;
        *slot = Some(Text(Cow::Borrowed(text)));
    }

    if !value.is_empty() {
        let text = std::str::from_utf8(value)
            .map_err(|e| malformed(format!("data (the record's value): invalid UTF-8: {e}")))?;
        let data: Option<&RawValue> = serde_json::from_str(text)
            .map_err(|e| malformed(format!("data (the record's value): {e}")))?;
        env.data = data.map(DataValue::Raw);
    }

    check(&mut env, now, limits).map_err(|rejection| {
        // As in structured mode: nesting deeper than serde_json's limit inside `data` is
        // only seen by a full walk.
        if value.is_empty() || is_well_formed(value) {
            rejection
        } else {
            malformed("nested too deep")
        }
    })
}

fn is_content_type(name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE)
}
