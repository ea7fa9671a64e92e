//! The HTTP API and the usage dashboard (axum), served by `tally run`. Owns the routes
//! ([`routes`] is the one list the router is built from and `schemas/openapi.yaml` is
//! checked against), authentication ([`auth`]), request parsing ([`input`]) and error
//! answers ([`error`]). Reads balances from the ledger store (PostgreSQL) and usage from the
//! analytics queries (ClickHouse); writes nothing itself: grants and plans are published to
//! their Kafka topics as CloudEvents, so the ledger applies them exactly once and in order
//! with usage. Must not hold domain logic: figures come from `ledger` and `analytics`.
//!
//! Hardening (see [`serve`]): hyper's HTTP/1 builder closes a connection that has not sent
//! a whole request header within `api.header_read_timeout_ms`; tower-http's timeout layer
//! answers 503 to a request not answered within `api.request_timeout_ms`; at most
//! `api.max_connections` connections are served at once (the next ones wait in the listen
//! backlog); `/readyz` and `/metrics` share one dependency probe per `api.probe_cache_ms`;
//! metric labels are bounded (route templates, `unmatched`, known methods or `other`).
//!
//! ```text
//! /healthz /readyz /metrics            open (no account data)
//! /dashboard/{account}, its assets     open: a static page; its data calls /v1 with a token
//! /v1/...                              bearer token (auth::require_token), then per route:
//!                                      Principal::read (own account or admin) / ::write (admin)
//! ```

pub mod auth;
mod dashboard;
pub mod error;
mod holds;
mod ingest;
pub mod input;
mod read;

pub use holds::hold_document;
pub use read::{balance_document, ledger_line_document};
mod system;
mod write;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::Router;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower_http::timeout::TimeoutLayer;

use crate::analytics::{AnalyticsSink, UsageQueries};
use crate::config::{Config, PostgresConfig};
use crate::ledger::{HoldPool, Store};
use crate::rating::PriceTable;
use auth::Tokens;
use error::ApiError;

/// How long a PostgreSQL call (connection included) may take before the API answers 503.
const PG_TIMEOUT: Duration = Duration::from_secs(10);
/// PostgreSQL connections for hold transactions, at most (opened on demand): a hold request
/// holds one for two round trips and a commit.
const HOLD_CONNECTIONS: usize = 16;
/// How long in-flight requests may run on after shutdown is signalled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a request handler needs, shared.
pub struct Api {
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    tokens: Tokens,
    pg: Pg,
    /// Connections for hold transactions (each holds one while it runs).
    holds: HoldPool,
    usage: UsageQueries,
    sink: AnalyticsSink,
    producer: FutureProducer,
    /// Metadata and watermarks (readiness, lag); its calls block, so they run on the
    /// blocking pool.
    probe: Arc<BaseConsumer>,
    /// The last `/readyz` answer and when it was probed (shared for `api.probe_cache_ms`;
    /// the lock also makes concurrent requests wait for one probe rather than start many).
    ready_cache: tokio::sync::Mutex<Option<(Instant, StatusCode, serde_json::Value)>>,
    /// When `/metrics` last refreshed the consumer lag (same sharing).
    lag_refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// Probe rounds run (readiness and lag), for tests and the probes metric.
    probe_rounds: AtomicU64,
}

pub type AppState = Arc<Api>;

impl Api {
    /// Creates the clients; nothing connects until a request needs it.
    pub fn new(cfg: Arc<Config>, prices: Arc<PriceTable>) -> anyhow::Result<AppState> {
        let producer: FutureProducer = crate::kafka::producer_config(&cfg.kafka)
            .create()
            .context("creating the API's Kafka producer")?;
        let probe: BaseConsumer = crate::kafka::client_config(&cfg.kafka)
            .create()
            .context("creating the API's Kafka client")?;
        Ok(Arc::new(Api {
            tokens: Tokens::from_config(&cfg.api.tokens),
            pg: Pg::new(cfg.postgres.clone()),
            holds: HoldPool::new(cfg.postgres.clone(), HOLD_CONNECTIONS),
            usage: UsageQueries::new(&cfg.clickhouse),
            sink: AnalyticsSink::new(&cfg.clickhouse),
            producer,
            probe: Arc::new(probe),
            prices,
            cfg,
            ready_cache: tokio::sync::Mutex::new(None),
            lag_refreshed: tokio::sync::Mutex::new(None),
            probe_rounds: AtomicU64::new(0),
        }))
    }

    /// How many dependency probe rounds (`/readyz` probes, `/metrics` lag refreshes) this API
    /// has run: a flood of those routes must not multiply them.
    pub fn probe_rounds(&self) -> u64 {
        self.probe_rounds.load(Ordering::Relaxed)
    }

    /// Counts one probe round of `what` ("readyz" or "lag").
    fn count_probe_round(&self, what: &'static str) {
        self.probe_rounds.fetch_add(1, Ordering::Relaxed);
        crate::metrics::dependency_probe_round(what);
    }

    /// How long a probe's answer is reused.
    fn probe_cache(&self) -> Duration {
        Duration::from_millis(self.cfg.api.probe_cache_ms)
    }

    /// The ledger store (one shared connection, re-opened when it dies).
    async fn store(&self) -> Result<Arc<Store>, ApiError> {
        self.pg.store().await
    }
}

/// One PostgreSQL connection shared by the handlers (tokio-postgres pipelines concurrent
/// queries on it), replaced when it closes.
struct Pg {
    cfg: PostgresConfig,
    current: tokio::sync::Mutex<Option<Arc<Store>>>,
}

impl Pg {
    fn new(cfg: PostgresConfig) -> Self {
        Pg {
            cfg,
            current: tokio::sync::Mutex::new(None),
        }
    }

    async fn store(&self) -> Result<Arc<Store>, ApiError> {
        let mut current = self.current.lock().await;
        if let Some(store) = current.as_ref().filter(|s| !s.is_closed()) {
            return Ok(store.clone());
        }
        let store = Arc::new(pg(Store::connect(&self.cfg)).await?);
        *current = Some(store.clone());
        Ok(store)
    }
}

/// A PostgreSQL call with the API's time limit and error mapping.
async fn pg<T>(
    call: impl std::future::Future<Output = Result<T, crate::ledger::StoreError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(PG_TIMEOUT, call).await {
        Ok(result) => result.map_err(ApiError::from_store),
        Err(_) => Err(ApiError::Unavailable {
            dependency: "PostgreSQL",
            detail: format!("no answer within {} s", PG_TIMEOUT.as_secs()),
        }),
    }
}

/// The ingest route, whose body limit is `api.ingest_max_bytes`.
const INGEST_PATH: &str = "/v1/events";

/// A route as `schemas/openapi.yaml` must describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: &'static str,
    /// axum's template, which is also OpenAPI's: `/v1/accounts/{id}/balance`.
    pub path: &'static str,
    /// Every status the route answers with.
    pub statuses: &'static [u16],
    /// Needs a bearer token.
    pub bearer: bool,
}

struct Route {
    spec: RouteSpec,
    handler: MethodRouter<AppState>,
}

fn route(
    method: &'static str,
    path: &'static str,
    bearer: bool,
    statuses: &'static [u16],
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        spec: RouteSpec {
            method,
            path,
            statuses,
            bearer,
        },
        handler,
    }
}

/// Every route: the router is built from this list, and the OpenAPI test reads it.
fn routes() -> Vec<Route> {
    const READ: &[u16] = &[200, 400, 401, 404, 500, 503];
    vec![
        route("GET", "/healthz", false, &[200], get(system::healthz)),
        route("GET", "/readyz", false, &[200, 503], get(system::readyz)),
        route("GET", "/metrics", false, &[200], get(system::metrics)),
        route("GET", "/v1/prices", true, &[200, 401], get(system::prices)),
        route(
            "GET",
            "/v1/accounts/{id}/balance",
            true,
            READ,
            get(read::balance),
        ),
        route(
            "GET",
            "/v1/accounts/{id}/usage",
            true,
            READ,
            get(read::usage),
        ),
        route(
            "GET",
            "/v1/accounts/{id}/summary",
            true,
            READ,
            get(read::summary),
        ),
        route(
            "GET",
            "/v1/accounts/{id}/ledger",
            true,
            READ,
            get(read::ledger),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/grants",
            true,
            &[200, 202, 400, 401, 403, 404, 409, 413, 415, 500, 503],
            post(write::grant),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/grants/{grant_id}/void",
            true,
            &[200, 202, 400, 401, 403, 404, 413, 415, 500, 503],
            post(write::void_grant),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/adjustments",
            true,
            &[200, 202, 400, 401, 403, 404, 409, 413, 415, 500, 503],
            post(write::adjustment),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/usage/void",
            true,
            &[200, 202, 400, 401, 403, 404, 413, 415, 500, 503],
            post(write::void_usage),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/holds",
            true,
            &[200, 201, 400, 401, 402, 403, 404, 409, 413, 415, 500, 503],
            post(holds::create),
        ),
        route(
            "GET",
            "/v1/accounts/{id}/holds/{hold_id}",
            true,
            &[200, 400, 401, 404, 500, 503],
            get(holds::get),
        ),
        route(
            "DELETE",
            "/v1/accounts/{id}/holds/{hold_id}",
            true,
            &[200, 400, 401, 403, 404, 500, 503],
            delete(holds::release),
        ),
        route(
            "POST",
            "/v1/accounts/{id}/holds/{hold_id}/heartbeat",
            true,
            &[200, 400, 401, 403, 404, 409, 413, 415, 500, 503],
            post(holds::heartbeat),
        ),
        route(
            "PUT",
            "/v1/accounts/{id}/plan",
            true,
            &[202, 400, 401, 403, 404, 413, 415, 500, 503],
            put(write::plan),
        ),
        route(
            "POST",
            INGEST_PATH,
            true,
            &[202, 400, 401, 403, 413, 415, 500, 503],
            post(ingest::events),
        ),
        route(
            "GET",
            "/dashboard/{id}",
            false,
            &[200],
            get(dashboard::page),
        ),
        route(
            "GET",
            "/dashboard/assets/{file}",
            false,
            &[200, 404],
            get(dashboard::asset),
        ),
    ]
}

/// The routes as the OpenAPI document must list them.
pub fn route_specs() -> Vec<RouteSpec> {
    routes().into_iter().map(|r| r.spec).collect()
}

/// The whole application: routes, token check on /v1, body limit, request metrics.
pub fn router(api: AppState) -> Router {
    let (mut open, mut v1) = (Router::new(), Router::new());
    for r in routes() {
        if r.spec.path == INGEST_PATH {
            // Batches of events: their own, larger body limit (inside the default one).
            let limit = DefaultBodyLimit::max(api.cfg.api.ingest_max_bytes);
            v1 = v1.route(r.spec.path, r.handler.layer(limit));
        } else if r.spec.bearer {
            v1 = v1.route(r.spec.path, r.handler);
        } else {
            open = open.route(r.spec.path, r.handler);
        }
    }
    let v1 = v1.route_layer(middleware::from_fn_with_state(
        api.clone(),
        auth::require_token,
    ));
    let request_timeout = Duration::from_millis(api.cfg.api.request_timeout_ms);
    open.merge(v1)
        .fallback(|| async { ApiError::NotFound })
        // Inside `observe`, so a timed-out request is counted with its 503.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(middleware::from_fn(observe))
        .layer(DefaultBodyLimit::max(api.cfg.api.max_body_bytes))
        .with_state(api)
}

/// The method as a metric label: the standard methods by name, any other as `other`, so a
/// client cannot create label values at will.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Records each request's metrics and sets headers every answer carries.
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let mut response = next.run(req).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    crate::metrics::http_request(&route, method, status, elapsed.as_secs_f64());
    tracing::debug!(%route, %method, status, elapsed_ms = elapsed.as_millis() as u64, "api request");
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if route.starts_with("/v1/") {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Serves on `listener` until `shutdown` turns true, then lets in-flight requests finish
/// (at most [`DRAIN_TIMEOUT`]).
///
/// The accept loop is hyper's own (axum::serve has no header-read timeout nor connection
/// cap): each connection is served by hyper's HTTP/1 builder with a header-read timeout, and
/// holds a permit of a semaphore of `api.max_connections`: while none is free, nothing is
/// accepted and new connections wait in the kernel's listen backlog.
pub async fn serve(
    listener: TcpListener,
    api: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    if api.tokens.is_empty() {
        tracing::warn!(%addr, "no [[api.tokens]] configured: every /v1 request answers 401");
    }
    // The hold connections are opened now, not by the first hold requests.
    let warming = api.clone();
    tokio::spawn(async move {
        match warming.holds.warm().await {
            Ok(n) => tracing::debug!(connections = n, "hold connections opened"),
            Err(e) => {
                tracing::warn!(error = %e, "opening the hold connections failed; requests open them")
            }
        }
    });
    let max_connections = api.cfg.api.max_connections;
    let header_read_timeout = Duration::from_millis(api.cfg.api.header_read_timeout_ms);
    tracing::info!(%addr, max_connections, "API listening");
    let app = router(api);
    let slots = Arc::new(Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = stopped(&mut shutdown) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        crate::metrics::http_connections_open(1);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Header-read timeouts and clients that go away end up here.
                tracing::debug!(error = %e, "API connection closed");
            }
            crate::metrics::http_connections_open(-1);
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("API requests still running after the drain timeout; stopped");
    }
    Ok(())
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// `tally run`'s API task: binds `api.listen`, serves until shutdown.
pub async fn run(
    cfg: Arc<Config>,
    prices: Arc<PriceTable>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<String> {
    let listener = TcpListener::bind(&cfg.api.listen)
        .await
        .with_context(|| format!("api.listen {}: cannot listen", cfg.api.listen))?;
    let api = Api::new(cfg, prices)?;
    serve(listener, api, shutdown).await.context("API server")?;
    Ok("api: stopped".to_owned())
}
