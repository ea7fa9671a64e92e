//! Reading requests strictly: query parameters (unknown or repeated names refused, each value
//! checked, errors naming the parameter) and JSON bodies (Content-Type checked, size limited
//! by the router, unknown fields refused by the types' `deny_unknown_fields`, errors naming
//! the field).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::Query;
use axum::http::{header, HeaderMap, StatusCode};
use chrono::NaiveDate;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Query parameters as given.
pub type RawQuery = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// Checked query parameters: each name at most once, and only the allowed names.
#[derive(Debug, Default)]
pub struct Params(BTreeMap<String, String>);

impl Params {
    pub fn parse(query: RawQuery, allowed: &[&str]) -> Result<Params, ApiError> {
        let Query(pairs) =
            query.map_err(|e| ApiError::invalid("query", format!("unreadable: {e}")))?;
        let mut map = BTreeMap::new();
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::invalid(
                    name,
                    format!("unknown parameter (allowed: {})", allowed.join(", ")),
                ));
            }
            if map.contains_key(&name) {
                return Err(ApiError::invalid(name, "given more than once"));
            }
            map.insert(name, value);
        }
        Ok(Params(map))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// A UTC day, `YYYY-MM-DD`.
    pub fn date(&self, name: &str) -> Result<Option<NaiveDate>, ApiError> {
        self.get(name)
            .map(|v| {
                NaiveDate::parse_from_str(v, "%Y-%m-%d")
                    .ok()
                    .filter(|d| v.len() == 10 && *d >= NaiveDate::default())
                    .ok_or_else(|| {
                        ApiError::invalid(name, "must be a date YYYY-MM-DD from 1970-01-01")
                    })
            })
            .transpose()
    }

    /// An integer within `range`.
    pub fn integer(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| range.contains(n) && !v.starts_with('+'))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            name,
                            format!("must be an integer {}..={}", range.start(), range.end()),
                        )
                    })
            })
            .transpose()
    }

    /// One of `choices`.
    pub fn choice<'c>(&self, name: &str, choices: &[&'c str]) -> Result<Option<&'c str>, ApiError> {
        self.get(name)
            .map(|v| {
                choices.iter().find(|c| **c == v).copied().ok_or_else(|| {
                    ApiError::invalid(name, format!("must be one of {}", choices.join(", ")))
                })
            })
            .transpose()
    }
}

/// A JSON body of type `T`: the Content-Type must be `application/json` (parameters
/// allowed); a field error names the field's path (`credits`, `allowance_alert_percents[1]`).
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::invalid("body", e.body_text())
        }
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(ApiError::UnsupportedMediaType("application/json"));
    }
    // serde would read an array positionally into a struct: only objects are bodies.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid("body", "must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // `unknown field `x`, expected ...` / `missing field `x``: name that field itself.
        let field = match (named_field(&message), path.as_str()) {
            (Some(f), ".") => f.to_owned(),
            (Some(f), p) if !p.ends_with(f) => format!("{p}.{f}"),
            (_, ".") => "body".to_owned(),
            _ => path,
        };
        ApiError::invalid(field, strip_position(&message))
    })?;
    de.end()
        .map_err(|e| ApiError::invalid("body", strip_position(&e.to_string())))?;
    Ok(value)
}

/// A JSON integer as JSON Schema (and so `schemas/openapi.yaml`) counts them: `12`, or a
/// number whose fraction is zero (`12.0`). Serialized as the plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct JsonInt(pub i64);

impl<'de> serde::Deserialize<'de> for JsonInt {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = JsonInt;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<JsonInt, E> {
                Ok(JsonInt(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<JsonInt, E> {
                i64::try_from(v)
                    .map(JsonInt)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<JsonInt, E> {
                // Exactly an integer and within i64 (2^63 is the first f64 past it).
                if v.fract() == 0.0
                    && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&v)
                {
                    Ok(JsonInt(v as i64))
                } else {
                    Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("missing field `"))?
        .split('`')
        .next()
}

/// serde_json appends " at line L column C"; the field name says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn integers_as_json_schema_counts_them() {
        let read = |s: &str| serde_json::from_str::<JsonInt>(s).map(|i| i.0).ok();
        assert_eq!(read("12"), Some(12));
        assert_eq!(read("12.0"), Some(12));
        assert_eq!(read("-3.0"), Some(-3));
        assert_eq!(read("1e2"), Some(100));
        assert_eq!(read("9223372036854775807"), Some(i64::MAX));
        for refused in [
            "12.5",
            "\"12\"",
            "null",
            "9223372036854775808",
            "1e19",
            "true",
        ] {
            assert_eq!(read(refused), None, "{refused}");
        }
        assert_eq!(serde_json::to_string(&JsonInt(7)).unwrap(), "7");
    }
    use super::*;
    use axum::http::HeaderValue;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        credits: String,
        percents: Option<Vec<u32>>,
    }

    fn parse(body: &str) -> Result<Body, ApiError> {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        json_body(&h, Ok(Bytes::from(body.to_owned())), 100)
    }

    fn field(e: ApiError) -> String {
        match e {
            ApiError::Invalid { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn body_errors_name_the_field() {
        assert!(parse(r#"{"credits": "1"}"#).is_ok());
        assert_eq!(field(parse(r#"{"credits": 1.5}"#).unwrap_err()), "credits");
        assert_eq!(
            field(parse(r#"{"credits": "1", "extra": 1}"#).unwrap_err()),
            "extra"
        );
        assert_eq!(field(parse(r#"{}"#).unwrap_err()), "credits");
        assert_eq!(field(parse(r#"[]"#).unwrap_err()), "body");
        assert_eq!(
            field(parse(r#"{"credits": "1", "percents": [1, "x"]}"#).unwrap_err()),
            "percents[1]"
        );
        assert_eq!(field(parse(r#"{"credits": "1"} x"#).unwrap_err()), "body");
        assert_eq!(field(parse(r#"{"credits": "#).unwrap_err()), "credits");
        let e = json_body::<Body>(&HeaderMap::new(), Ok(Bytes::from("{}")), 100).unwrap_err();
        assert!(matches!(e, ApiError::UnsupportedMediaType(_)));
    }

    #[test]
    fn params_are_strict() {
        let q = |pairs: &[(&str, &str)]| -> RawQuery {
            Ok(Query(
                pairs
                    .iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect(),
            ))
        };
        let p = Params::parse(
            q(&[("from", "2025-06-01"), ("limit", "5")]),
            &["from", "limit"],
        )
        .unwrap();
        assert_eq!(p.date("from").unwrap(), NaiveDate::from_ymd_opt(2025, 6, 1));
        assert_eq!(p.integer("limit", 1..=10).unwrap(), Some(5));
        assert_eq!(field(p.integer("limit", 6..=10).unwrap_err()), "limit");
        assert_eq!(
            field(Params::parse(q(&[("form", "x")]), &["from"]).unwrap_err()),
            "form"
        );
        assert_eq!(
            field(Params::parse(q(&[("from", "x"), ("from", "y")]), &["from"]).unwrap_err()),
            "from"
        );
        let p = Params::parse(q(&[("from", "2025-6-1"), ("g", "hour")]), &["from", "g"]).unwrap();
        assert_eq!(field(p.date("from").unwrap_err()), "from");
        assert_eq!(field(p.choice("g", &["day", "week"]).unwrap_err()), "g");
    }
}
