//! Operational routes: liveness (`/healthz`), readiness with the state of each dependency
//! and of this process's consumer groups (`/readyz`), Prometheus metrics with consumer lag
//! refreshed at each scrape (`/metrics`), and the price table (`/v1/prices`). Neither health
//! route says more than up/down and a latency per dependency (error details go to the log),
//! and which consumer group has had no partitions since when.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use chrono::Utc;
use rdkafka::consumer::Consumer;
use serde_json::{json, Value};

use super::AppState;
use crate::kafka::{Positions, TopicPartition};

/// Each readiness probe's time limit.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Time limit of the whole lag refresh inside a scrape.
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

/// GET /healthz — the process serves requests.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Runs a probe with a time limit: (up, milliseconds).
async fn probe<F, E>(name: &'static str, check: F) -> Value
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let up = match tokio::time::timeout(PROBE_TIMEOUT, check).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(dependency = name, error = %e, "readiness probe failed");
            false
        }
        Err(_) => {
            tracing::warn!(
                dependency = name,
                timeout_ms = PROBE_TIMEOUT.as_millis() as u64,
                "readiness probe timed out"
            );
            false
        }
    };
    json!({"status": if up { "up" } else { "down" }, "latency_ms": started.elapsed().as_millis() as u64})
}

/// GET /readyz — PostgreSQL, ClickHouse and Kafka each answer, and no consumer group of this
/// process has been without partitions for longer than `kafka.unassigned_alert_ms`: 200 when
/// all holds, else 503 (`reasons` says what does not). The answer is reused for
/// `api.probe_cache_ms`; requests arriving while a probe runs wait for it and share its
/// answer, so a flood of them probes each dependency once.
pub async fn readyz(State(api): State<AppState>) -> impl IntoResponse {
    let mut cache = api.ready_cache.lock().await;
    if let Some((at, status, body)) = cache.as_ref() {
        if at.elapsed() < api.probe_cache() {
            return (*status, Json(body.clone()));
        }
    }
    let (status, body) = probe_readiness(&api).await;
    *cache = Some((Instant::now(), status, body.clone()));
    (status, Json(body))
}

/// One round of readiness probes.
async fn probe_readiness(api: &AppState) -> (StatusCode, Value) {
    api.count_probe_round("readyz");
    let postgres = probe("postgresql", async {
        let store = api.store().await.map_err(|e| e.to_string())?;
        store
            .client()
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let clickhouse = probe("clickhouse", api.sink.ping());
    let kafka = probe("kafka", {
        let probe = api.probe.clone();
        let topic = api.cfg.kafka.topics.grants.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
    });
    let (postgres, clickhouse, kafka) = tokio::join!(postgres, clickhouse, kafka);
    let mut reasons: Vec<String> = [
        ("postgresql", &postgres),
        ("clickhouse", &clickhouse),
        ("kafka", &kafka),
    ]
    .iter()
    .filter(|(_, d)| d["status"] != "up")
    .map(|(name, _)| format!("{name} is down"))
    .collect();
    let (groups, group_reasons) = consumer_groups(api);
    reasons.extend(group_reasons);
    let ready = reasons.is_empty();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        json!({
            "status": if ready { "ready" } else { "not_ready" },
            "dependencies": {"postgresql": postgres, "clickhouse": clickhouse, "kafka": kafka},
            "consumer_groups": groups,
            "reasons": reasons,
        }),
    )
}

/// The consumer groups this process runs (its pipelines register them), and a reason for each
/// one that has had no partitions for longer than `kafka.unassigned_alert_ms`.
fn consumer_groups(api: &AppState) -> (Vec<Value>, Vec<String>) {
    let kafka = &api.cfg.kafka;
    let groups =
        crate::kafka::groups::statuses(&[kafka.ledger_group.as_str(), &kafka.analytics_group]);
    let mut reasons = Vec::new();
    let values = groups
        .iter()
        .map(|g| {
            let since = g
                .unassigned_since
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
            if g.alerting {
                reasons.push(format!(
                    "consumer group {} ({}) has had no partitions assigned since {} ({} s, more than kafka.unassigned_alert_ms = {})",
                    g.group_id,
                    g.pipeline,
                    since.as_deref().unwrap_or("?"),
                    g.unassigned_for.as_secs(),
                    kafka.unassigned_alert_ms,
                ));
            }
            json!({
                "pipeline": g.pipeline,
                "group": g.group_id,
                "status": match (g.assigned_partitions, g.alerting) {
                    (0, true) => "no_partitions",
                    (0, false) => "rebalancing",
                    _ => "assigned",
                },
                "assigned_partitions": g.assigned_partitions,
                "unassigned_since": since,
                "unassigned_ms": g.unassigned_for.as_millis() as u64,
            })
        })
        .collect();
    (values, reasons)
}

/// (low, high) watermarks of every partition of the input topics.
fn watermarks(api: &AppState) -> Result<BTreeMap<TopicPartition, (i64, i64)>, String> {
    let topics = api.cfg.kafka.topics.inputs();
    crate::kafka::watermarks(&*api.probe, &topics, PROBE_TIMEOUT).map_err(|e| e.to_string())
}

/// Sets `tally_consumer_lag` for both pipelines: high watermark − stored position (a
/// partition never consumed lags by everything it holds).
async fn refresh_lag(api: &AppState) -> Result<(), String> {
    let marks = {
        let api = api.clone();
        tokio::task::spawn_blocking(move || watermarks(&api))
            .await
            .map_err(|e| e.to_string())??
    };
    let keys: Vec<TopicPartition> = marks.keys().cloned().collect();
    let set = |pipeline: &str, stored: &Positions| {
        for (key, &(low, high)) in &marks {
            let position = stored.get(key).copied().unwrap_or(low);
            crate::metrics::set_consumer_lag(pipeline, &key.0, key.1, (high - position).max(0));
        }
    };
    let store = api.store().await.map_err(|e| e.to_string())?;
    let ledger = store
        .load_offsets(&api.cfg.kafka.ledger_group, &keys)
        .await
        .map_err(|e| e.to_string())?;
    set("ledger", &ledger);
    let analytics = api
        .sink
        .load_positions(&api.cfg.kafka.analytics_group, &keys)
        .await
        .map_err(|e| e.to_string())?;
    set("analytics", &analytics);
    Ok(())
}

/// GET /metrics — Prometheus text format. A lag refresh that fails leaves the last values
/// (and is logged); the other metrics are served regardless. The lag is refreshed at most
/// once per `api.probe_cache_ms` (scrapes in between, or waiting for a refresh in progress,
/// serve the values it left).
pub async fn metrics(State(api): State<AppState>) -> impl IntoResponse {
    {
        let mut refreshed = api.lag_refreshed.lock().await;
        if refreshed.is_none_or(|at| at.elapsed() >= api.probe_cache()) {
            api.count_probe_round("lag");
            match tokio::time::timeout(LAG_TIMEOUT, refresh_lag(&api)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "consumer lag not refreshed"),
                Err(_) => tracing::warn!("consumer lag not refreshed: timed out"),
            }
            *refreshed = Some(Instant::now());
        }
    }
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
}

/// GET /v1/prices — every version of the price table, and the one in force now.
pub async fn prices(State(api): State<AppState>) -> Json<Value> {
    let versions: Vec<Value> = api
        .prices
        .versions()
        .iter()
        .map(|v| {
            json!({
                "id": v.id(),
                "effective_from": v.effective_from(),
                "effective_until": v.effective_until(),
                "rules": v.rules().iter().map(|r| json!({
                    "id": r.id(),
                    "kind": r.kind(),
                    "match": r.conditions().collect::<BTreeMap<_, _>>(),
                    "unit": r.unit().as_str(),
                    "credits_per_unit": r.credits_per_unit(),
                    "increment": r.increment(),
                    "minimum": r.minimum(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({
        "current_version": api.prices.version_at(Utc::now()).map(|v| v.id()),
        "versions": versions,
    }))
}
