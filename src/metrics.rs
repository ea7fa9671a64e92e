//! Process-wide Prometheus metrics: the registry, the metrics the pipelines record (events by
//! kind, dead letters by reason, batch and transaction latency), the consumer-lag gauges the
//! API refreshes at each scrape, the partitions each consumer holds, and the HTTP request
//! metrics. A leaf module: it knows metric
//! names and labels, nothing of Kafka, stores or events; the API serves [`render`] at
//! `/metrics`.
//!
//! Every metric is created once, lazily, on first use; recording is a few atomic operations.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: 1 ms to 30 s.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    dead_letters: IntCounterVec,
    batch_seconds: HistogramVec,
    transaction_seconds: HistogramVec,
    resolve_seconds: HistogramVec,
    hold_lock_seconds: HistogramVec,
    consumer_lag: IntGaugeVec,
    assigned_partitions: IntGaugeVec,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
    http_connections: IntGauge,
    probe_rounds: IntCounterVec,
    retries: IntCounterVec,
    replays: IntCounter,
    replayed_events: IntCounter,
    purged_claims: IntCounter,
    ingest_events: IntCounterVec,
    reconcile_differences: IntGauge,
    reconcile_late: IntGauge,
    reconcile_last_run: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(c.clone()))
            .expect("registered once");
        c
    };
    let histogram = |name: &str, help: &str, labels: &[&str]| {
        let h = HistogramVec::new(
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS_SECONDS.to_vec()),
            labels,
        )
        .expect("valid metric");
        registry
            .register(Box::new(h.clone()))
            .expect("registered once");
        h
    };
    let gauge = |name: &str, help: &str| {
        let g = IntGauge::with_opts(Opts::new(name, help)).expect("valid metric");
        registry
            .register(Box::new(g.clone()))
            .expect("registered once");
        g
    };
    let consumer_lag = IntGaugeVec::new(
        Opts::new(
            "tally_consumer_lag",
            "Records not yet consumed: the partition's high watermark minus the pipeline's stored position (refreshed at each scrape).",
        ),
        &["pipeline", "topic", "partition"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(consumer_lag.clone()))
        .expect("registered once");
    let assigned_partitions = IntGaugeVec::new(
        Opts::new(
            "tally_consumer_assigned_partitions",
            "Partitions assigned to this process's consumer, by pipeline and group; 0 for longer than kafka.unassigned_alert_ms makes /readyz answer 503.",
        ),
        &["pipeline", "group"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(assigned_partitions.clone()))
        .expect("registered once");
    let replays = IntCounter::with_opts(Opts::new(
        "tally_ledger_replays_total",
        "Accounts whose open window the ledger replayed because an event arrived out of event-time order (each writes correction entries); a high rate means producers or topics drift apart.",
    ))
    .expect("valid metric");
    registry
        .register(Box::new(replays.clone()))
        .expect("registered once");
    let replayed_events = IntCounter::with_opts(Opts::new(
        "tally_ledger_replayed_events_total",
        "Open-window events the ledger read back and applied again for its replays (each from the account's newest mark before the event out of order, or from its final point); its rate over tally_ledger_replays_total's is the average replay's length.",
    ))
    .expect("valid metric");
    registry
        .register(Box::new(replayed_events.clone()))
        .expect("registered once");
    let purged_claims = IntCounter::with_opts(Opts::new(
        "tally_ledger_purged_claims_total",
        "Dedupe claims the purge task deleted (claims of events dated before the stored dedupe horizon); its rate should follow the ledger's applied events a dedupe window later.",
    ))
    .expect("valid metric");
    registry
        .register(Box::new(purged_claims.clone()))
        .expect("registered once");
    let resolve_seconds = histogram(
        "tally_analytics_resolve_seconds",
        "How long analytics took to resolve the identities of the batches written since the last resolve (one lookup of usage_copies, whose time grows with the table), then store their positions.",
        &[],
    );
    let hold_lock_seconds = histogram(
        "tally_ledger_hold_lock_seconds",
        "How long a ledger batch held its accounts' hold locks: from taking them (its last round trip) to the end of its COMMIT. A hold request for one of those accounts waits up to this long.",
        &[],
    );
    Metrics {
        replays,
        replayed_events,
        purged_claims,
        resolve_seconds,
        hold_lock_seconds,
        events: counter(
            "tally_events_total",
            "Events decoded and admitted, by pipeline and kind (usage kind, grant, plan); rate() gives events/s.",
            &["pipeline", "kind"],
        ),
        ingest_events: counter(
            "tally_ingest_events_total",
            "Events received by POST /v1/events, by outcome: accepted (published and acknowledged), rejected (invalid, with a reason in the answer), failed (Kafka did not acknowledge: the request answered 503).",
            &["outcome"],
        ),
        retries: counter(
            "tally_retries_total",
            "Transient failures retried with back-off, by operation (e.g. \"ledger transaction\"); a steady rate means an outage.",
            &["operation"],
        ),
        dead_letters: counter(
            "tally_dead_letters_total",
            "Records sent to the dead-letter topic, by reason.",
            &["reason"],
        ),
        batch_seconds: histogram(
            "tally_batch_duration_seconds",
            "A batch from its first record in hand to its commit, by pipeline.",
            &["pipeline"],
        ),
        transaction_seconds: histogram(
            "tally_transaction_duration_seconds",
            "The store-of-record write of a batch, retries included: the PostgreSQL transaction (ledger) or the ClickHouse insert and positions (analytics).",
            &["pipeline"],
        ),
        http_requests: counter(
            "tally_http_requests_total",
            "HTTP requests answered, by route template, method and status.",
            &["route", "method", "status"],
        ),
        http_seconds: histogram(
            "tally_http_request_duration_seconds",
            "HTTP request latency by route template.",
            &["route"],
        ),
        http_connections: {
            let g = IntGauge::with_opts(Opts::new(
                "tally_http_connections_open",
                "HTTP connections being served (at most api.max_connections).",
            ))
            .expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("registered once");
            g
        },
        probe_rounds: counter(
            "tally_dependency_probe_rounds_total",
            "Dependency probe rounds run for /readyz (PostgreSQL, ClickHouse, Kafka) and /metrics (consumer lag); shared for api.probe_cache_ms, so a flood of requests does not multiply them.",
            &["probe"],
        ),
        reconcile_differences: gauge(
            "tally_reconcile_differences",
            "Differences the last `tally reconcile` run of this process found between the ledger, the usage roll-ups and the rated events (account x day x kind, and accounts whose corrections do not net to zero); 0 when they agree.",
        ),
        reconcile_late: gauge(
            "tally_reconcile_late_days",
            "Account x day x kind keys holding late usage (arrived after the grace) in the last reconcile run.",
        ),
        reconcile_last_run: gauge(
            "tally_reconcile_last_run_timestamp_seconds",
            "When the last reconcile run of this process finished (Unix seconds); absent: never ran.",
        ),
        consumer_lag,
        assigned_partitions,
        registry,
    }
});

/// Counts a batch's events by kind (aggregated first: one counter update per kind).
pub fn events<'a>(pipeline: &str, kinds: impl IntoIterator<Item = &'a str>) {
    let mut counts: Vec<(&str, u64)> = Vec::new();
    for kind in kinds {
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((kind, 1)),
        }
    }
    for (kind, n) in counts {
        METRICS
            .events
            .with_label_values(&[pipeline, kind])
            .inc_by(n);
    }
}

/// Counts the accounts a ledger batch replayed (events out of order), and the open-window
/// events it read back for them.
pub fn replays(accounts: usize, events: usize) {
    if accounts > 0 {
        METRICS.replays.inc_by(accounts as u64);
        METRICS.replayed_events.inc_by(events as u64);
    }
}

/// Counts dedupe claims the purge deleted.
pub fn purged_claims(n: u64) {
    METRICS.purged_claims.inc_by(n);
}

/// Counts `n` events of `POST /v1/events` with their outcome (accepted, rejected, failed).
pub fn ingest_events(outcome: &str, n: usize) {
    if n > 0 {
        METRICS
            .ingest_events
            .with_label_values(&[outcome])
            .inc_by(n as u64);
    }
}

/// Counts one retry.
pub fn retry(operation: &str) {
    METRICS.retries.with_label_values(&[operation]).inc();
}

pub fn dead_letter(reason: &str) {
    METRICS.dead_letters.with_label_values(&[reason]).inc();
}

/// Records how long a batch took, from first record to commit.
pub fn batch_seconds(pipeline: &str, seconds: f64) {
    METRICS
        .batch_seconds
        .with_label_values(&[pipeline])
        .observe(seconds);
}

/// Records how long a batch's store-of-record write took.
pub fn transaction_seconds(pipeline: &str, seconds: f64) {
    METRICS
        .transaction_seconds
        .with_label_values(&[pipeline])
        .observe(seconds);
}

/// Records how long analytics took to resolve the identities of pending batches and store
/// their positions.
pub fn resolve_seconds(seconds: f64) {
    METRICS
        .resolve_seconds
        .with_label_values::<&str>(&[])
        .observe(seconds);
}

/// Records how long a ledger batch held the hold locks of its accounts (through COMMIT).
pub fn hold_lock_seconds(seconds: f64) {
    METRICS
        .hold_lock_seconds
        .with_label_values::<&str>(&[])
        .observe(seconds);
}

/// Sets the lag of one partition for one pipeline.
pub fn set_consumer_lag(pipeline: &str, topic: &str, partition: i32, lag: i64) {
    METRICS
        .consumer_lag
        .with_label_values(&[pipeline, topic, &partition.to_string()])
        .set(lag);
}

/// Sets the number of partitions a pipeline's consumer holds in its group.
pub fn set_assigned_partitions(pipeline: &str, group: &str, partitions: i64) {
    METRICS
        .assigned_partitions
        .with_label_values(&[pipeline, group])
        .set(partitions);
}

/// Drops a consumer's assigned-partitions gauge (the consumer is gone).
pub fn remove_assigned_partitions(pipeline: &str, group: &str) {
    let _ = METRICS
        .assigned_partitions
        .remove_label_values(&[pipeline, group]);
}

/// Records one answered HTTP request.
pub fn http_request(route: &str, method: &str, status: u16, seconds: f64) {
    METRICS
        .http_requests
        .with_label_values(&[route, method, &status.to_string()])
        .inc();
    METRICS
        .http_seconds
        .with_label_values(&[route])
        .observe(seconds);
}

/// Adds `delta` (+1 or -1) to the open HTTP connections.
pub fn http_connections_open(delta: i64) {
    METRICS.http_connections.add(delta);
}

/// Counts one dependency probe round (`readyz` or `lag`).
pub fn dependency_probe_round(probe: &str) {
    METRICS.probe_rounds.with_label_values(&[probe]).inc();
}

/// Records a finished reconcile run: its differences and late keys, and now.
pub fn reconciled(differences: usize, late: usize) {
    let m = &*METRICS;
    m.reconcile_differences
        .set(i64::try_from(differences).unwrap_or(i64::MAX));
    m.reconcile_late
        .set(i64::try_from(late).unwrap_or(i64::MAX));
    m.reconcile_last_run.set(chrono::Utc::now().timestamp());
}

/// Every metric in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let families = METRICS.registry.gather();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("the text encoder writes to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_renders() {
        events("unit-test", ["call", "call", "grant"]);
        dead_letter("unit_test_reason");
        batch_seconds("unit-test", 0.02);
        transaction_seconds("unit-test", 0.01);
        set_consumer_lag("unit-test", "t.calls", 2, 7);
        reconciled(3, 1);
        let text = render();
        assert!(text.contains("tally_reconcile_differences 3"), "{text}");
        assert!(text.contains("tally_reconcile_late_days 1"), "{text}");
        assert!(
            text.contains(r#"tally_events_total{kind="call",pipeline="unit-test"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"tally_dead_letters_total{reason="unit_test_reason"} 1"#));
        assert!(text.contains(
            r#"tally_consumer_lag{partition="2",pipeline="unit-test",topic="t.calls"} 7"#
        ));
        assert!(text.contains("tally_batch_duration_seconds_bucket"));
        assert!(text.contains("tally_transaction_duration_seconds_count"));
    }
}
