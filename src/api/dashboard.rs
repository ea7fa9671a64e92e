//! The usage dashboard: one static page and its assets (uPlot 1.6.32, vendored under
//! `assets/vendor/`), compiled into the binary, so nothing is fetched from elsewhere at run
//! time. The page holds no account data: its script reads the account from the path and
//! calls the /v1 routes with a bearer token taken from the URL fragment (`#token=...`: never
//! sent to a server, kept in sessionStorage, removed from the address bar), so the page sees
//! exactly what that token may read. A strict Content-Security-Policy allows only Tally's
//! own scripts, styles and API.

use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

const INDEX_HTML: &[u8] = include_bytes!("../../assets/dashboard/index.html");

/// (name, content type, bytes) of every asset the page loads.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/dashboard/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/dashboard/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot-1.6.32/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot-1.6.32/uPlot.min.css"),
    ),
    (
        "uPlot.LICENSE.txt",
        "text/plain; charset=utf-8",
        include_bytes!("../../assets/vendor/uplot-1.6.32/LICENSE"),
    ),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'";

/// GET /dashboard/{id} — the same page for every account (the script reads the path).
pub async fn page(Path(_account): Path<String>) -> Response {
    let headers: [(HeaderName, HeaderValue); 4] = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, INDEX_HTML).into_response()
}

/// GET /dashboard/assets/{file}
pub async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (_, content_type, bytes) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or(ApiError::NotFound)?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=3600"),
            ),
        ],
        *bytes,
    )
        .into_response())
}
