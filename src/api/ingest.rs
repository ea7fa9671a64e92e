//! `POST /v1/events`: usage events over HTTP, for producers without a Kafka client. One
//! event (`application/cloudevents+json`) or a batch (`application/cloudevents-batch+json`,
//! a JSON array, at most `api.ingest_max_events` events and `api.ingest_max_bytes` bytes).
//! Each event is checked exactly as the pipelines will check it (`pipeline::validate`: the
//! decoder, admission, rating), then published as given, in structured mode, to its usage
//! topic keyed by account, and the answer waits for the broker's acknowledgement: what is
//! accepted is in Kafka and will not be dead-lettered for its content. Events are identified
//! by `source` + `id`, so a client may resend a whole batch after a 503 (the ledger claims
//! each event once).
//!
//! The answer is 202 with every event's outcome (accepted, with where it was written, or
//! rejected, with the reason), one event or a batch alike: the request's own faults (not a
//! JSON object or array of objects, too many events, too large) answer 400/413, and Kafka
//! not acknowledging answers 503.
//!
//! Only usage events: grants and plans have their own routes. An `ingest` token whose
//! configuration lists `sources` may publish events of those sources only; admin tokens may
//! publish any; account tokens may not.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;
use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::auth::{IngestRefusal, Principal};
use super::error::ApiError;
use super::AppState;
use crate::event::{Payload, Rejection};

/// One event, CloudEvents JSON (structured mode).
pub const SINGLE: &str = "application/cloudevents+json";
/// A JSON array of events (the CloudEvents JSON batch format).
pub const BATCH: &str = "application/cloudevents-batch+json";
/// How long an event may wait for room in the producer's queue and then for the broker's
/// acknowledgement before the request answers 503.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// Why an event was not published: a dead-letter reason of the pipelines, or one of the
/// route's own.
#[derive(Debug)]
enum Refusal {
    Event(Rejection),
    /// Grants and plans go through their routes.
    NotUsage,
    /// The token may not publish events of this source.
    Source,
    /// The token may not publish at all.
    Role,
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Event(r) => r.reason.as_str(),
            Refusal::NotUsage => "not_usage",
            Refusal::Source => "forbidden_source",
            Refusal::Role => "forbidden",
        }
    }

    fn field(&self) -> Option<&str> {
        match self {
            Refusal::Event(r) => r.field.as_deref(),
            Refusal::NotUsage => Some("type"),
            Refusal::Source => Some("source"),
            Refusal::Role => None,
        }
    }

    fn detail(&self) -> String {
        match self {
            Refusal::Event(r) => r.detail.clone(),
            Refusal::NotUsage => {
                "only usage events are ingested here: grants and plans have their own routes".into()
            }
            Refusal::Source => "this token may not publish events of this source".into(),
            Refusal::Role => "this token may not publish events".into(),
        }
    }
}

/// An event checked and ready to publish.
struct Ready<'b> {
    bytes: &'b [u8],
    topic: String,
    account_id: String,
    source: String,
    id: String,
}

/// POST /v1/events
pub async fn events(
    State(api): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let limit = api.cfg.api.ingest_max_bytes;
    if matches!(who, Principal::Account { .. }) {
        return Err(ApiError::Forbidden("publish events"));
    }
    let batch = match media_type(&headers).as_deref() {
        Some(SINGLE) => false,
        Some(BATCH) => true,
        _ => return Err(ApiError::UnsupportedMediaType(MEDIA_TYPES)),
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit }
        } else {
            ApiError::invalid("body", e.body_text())
        }
    })?;
    let raw: Vec<&[u8]> = if batch {
        let items: Vec<&RawValue> = serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid("body", format!("must be a JSON array of events: {e}"))
        })?;
        if items.is_empty() {
            return Err(ApiError::invalid("body", "the batch is empty"));
        }
        let max = api.cfg.api.ingest_max_events;
        if items.len() > max {
            return Err(ApiError::invalid(
                "body",
                format!("{} events, at most {max} in one batch", items.len()),
            ));
        }
        for (i, item) in items.iter().enumerate() {
            if !item.get().starts_with('{') {
                return Err(ApiError::invalid(
                    format!("body[{i}]"),
                    "each event must be a JSON object",
                ));
            }
        }
        items.iter().map(|r| r.get().as_bytes()).collect()
    } else {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid(
                "body",
                "must be a JSON object (one event)",
            ));
        }
        vec![&body[..]]
    };

    let now = Utc::now();
    let admission = crate::pipeline::limits(&api.cfg.pipeline).1;
    let checked: Vec<Result<Ready, Refusal>> = raw
        .iter()
        .map(|bytes| {
            let event = crate::pipeline::validate(bytes, &api.prices, now, &admission)
                .map_err(Refusal::Event)?;
            let topics = &api.cfg.kafka.topics;
            let topic = match &event.payload {
                Payload::Call(_) => &topics.calls,
                Payload::Chat(_) => &topics.chat_responses,
                Payload::Instance(_) => &topics.instance_hours,
                Payload::Metered(_) => &topics.metered,
                Payload::Grant(_)
                | Payload::Plan(_)
                | Payload::VoidGrant(_)
                | Payload::Adjustment(_)
                | Payload::UsageVoid(_) => return Err(Refusal::NotUsage),
            };
            let env = &event.envelope;
            who.ingest(&env.source).map_err(|r| match r {
                IngestRefusal::Source => Refusal::Source,
                IngestRefusal::Role => Refusal::Role,
            })?;
            Ok(Ready {
                bytes,
                topic: topic.clone(),
                account_id: env.account_id.to_string(),
                source: env.source.to_string(),
                id: env.id.to_string(),
            })
        })
        .collect();

    // Every valid event is handed to the producer at once; the answer waits for all.
    let sends = checked.iter().map(|c| async {
        let ready = c.as_ref().ok()?;
        let record = FutureRecord::to(&ready.topic)
            .key(ready.account_id.as_bytes())
            .payload(ready.bytes)
            .headers(OwnedHeaders::new().insert(Header {
                key: "content-type",
                value: Some(SINGLE),
            }));
        let sent =
            tokio::time::timeout(PUBLISH_TIMEOUT, api.producer.send(record, PUBLISH_TIMEOUT));
        Some(match sent.await {
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
            Ok(Err((e, _))) => Err(format!("publishing to {}: {e}", ready.topic)),
            Err(_) => Err(format!(
                "publishing to {}: no acknowledgement within {} s",
                ready.topic,
                PUBLISH_TIMEOUT.as_secs()
            )),
        })
    });
    let delivered = join_all(sends).await;

    let (mut accepted, mut rejected, mut failed) = (0usize, 0usize, 0usize);
    let mut first_failure = None;
    let outcomes: Vec<Value> = checked
        .iter()
        .zip(delivered)
        .enumerate()
        .map(|(index, (check, delivery))| match (check, delivery) {
            (Ok(ready), Some(Ok((partition, offset)))) => {
                accepted += 1;
                json!({"index": index, "status": "accepted", "source": ready.source,
                       "id": ready.id, "topic": ready.topic, "partition": partition,
                       "offset": offset})
            }
            (Ok(ready), delivery) => {
                failed += 1;
                let detail = match delivery {
                    Some(Err(detail)) => detail,
                    _ => "not published".to_owned(),
                };
                first_failure.get_or_insert_with(|| detail.clone());
                json!({"index": index, "status": "failed", "source": ready.source,
                       "id": ready.id, "detail": detail})
            }
            (Err(refusal), _) => {
                rejected += 1;
                let mut outcome = json!({"index": index, "status": "rejected",
                    "reason": refusal.reason(), "detail": refusal.detail()});
                if let Some(field) = refusal.field() {
                    outcome["field"] = json!(field);
                }
                outcome
            }
        })
        .collect();
    crate::metrics::ingest_events("accepted", accepted);
    crate::metrics::ingest_events("rejected", rejected);
    crate::metrics::ingest_events("failed", failed);
    if let Some(detail) = first_failure {
        // Resending the whole request is safe: the ledger claims each event once.
        return Err(ApiError::Unavailable {
            dependency: "Kafka",
            detail,
        });
    }
    let document = json!({
        "accepted": accepted,
        "rejected": rejected,
        "events": outcomes,
    });
    Ok((StatusCode::ACCEPTED, Json(document)).into_response())
}

/// What the route accepts, for the 415 answer.
const MEDIA_TYPES: &str = "application/cloudevents+json or application/cloudevents-batch+json";

/// The request's media type, lower-case, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mime = value.split(';').next()?.trim();
    Some(mime.to_ascii_lowercase())
}
