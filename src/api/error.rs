//! The API's errors and how each becomes an HTTP answer: a status and a JSON body
//! `{"error": {"status", "code", "message", "field"?}}`. Details of outside failures go to the
//! log, never to the client; secrets go nowhere.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::analytics::AnalyticsError;
use crate::ledger::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No bearer token, or one that matches no configured hash.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// The token may read this account but not do this.
    #[error("this token may not {0}")]
    Forbidden(&'static str),
    /// Unknown account, or one the token may not see (the same answer, on purpose).
    #[error("account not found")]
    AccountNotFound,
    /// No such route or file.
    #[error("not found")]
    NotFound,
    /// The ledger holds no such grant (a void names one it holds).
    #[error("the ledger holds no grant {0:?} for this account")]
    GrantNotFound(String),
    /// The ledger has not charged this usage event (source, id) to the account (a usage void
    /// names usage it charged).
    #[error("the ledger has not charged usage event (source {0:?}, id {1:?}) to this account")]
    UsageNotFound(String, String),
    /// No hold with this id on the account (or one purged after its retention).
    #[error("hold not found")]
    HoldNotFound,
    /// A hold found no credits available (or fewer than asked, without `partial`).
    #[error("not enough credits available: {available} (spendable {spendable}, held {held})")]
    PaymentRequired {
        available: rust_decimal::Decimal,
        spendable: rust_decimal::Decimal,
        held: rust_decimal::Decimal,
    },
    /// A parameter or body field is wrong; `field` names it.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The Content-Type is not the one the route takes (named).
    #[error("the request body must be {0} (Content-Type)")]
    UnsupportedMediaType(&'static str),

    /// An idempotency key (a grant id) reused with different terms.
    #[error("{field}: {message}")]
    Conflict {
        field: &'static str,
        message: String,
    },
    /// PostgreSQL, ClickHouse or Kafka did not answer in time or refused the connection.
    #[error("{dependency} is unavailable")]
    Unavailable {
        dependency: &'static str,
        detail: String,
    },
    /// A bug or a broken store: logged with its detail, answered without it.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::AccountNotFound
            | ApiError::NotFound
            | ApiError::GrantNotFound(_)
            | ApiError::UsageNotFound(..)
            | ApiError::HoldNotFound => StatusCode::NOT_FOUND,
            ApiError::PaymentRequired { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::AccountNotFound => "account_not_found",
            ApiError::NotFound => "not_found",
            ApiError::GrantNotFound(_) => "grant_not_found",
            ApiError::UsageNotFound(..) => "usage_not_found",
            ApiError::HoldNotFound => "hold_not_found",
            ApiError::PaymentRequired { .. } => "insufficient_credits",
            ApiError::Invalid { .. } => "invalid_request",
            ApiError::TooLarge { .. } => "body_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn from_store(e: StoreError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable {
                dependency: "PostgreSQL",
                detail: e.to_string(),
            }
        } else {
            ApiError::Internal(e.to_string())
        }
    }

    pub fn from_analytics(e: AnalyticsError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable {
                dependency: "ClickHouse",
                detail: e.to_string(),
            }
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Unavailable { dependency, detail } => {
                tracing::warn!(dependency, error = %detail, "API request failed: dependency unavailable");
            }
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "API request failed");
            }
            _ => {}
        }
        let mut error = json!({
            "status": status.as_u16(),
            "code": self.code(),
            "message": self.to_string(),
        });
        match &self {
            ApiError::Invalid { field, .. } => error["field"] = json!(field),
            ApiError::Conflict { field, .. } => error["field"] = json!(field),
            ApiError::GrantNotFound(_) => error["field"] = json!("grant_id"),
            ApiError::UsageNotFound(..) => error["field"] = json!("event_id"),
            ApiError::PaymentRequired {
                available,
                spendable,
                held,
            } => {
                error["available"] = json!(available);
                error["spendable"] = json!(spendable);
                error["held"] = json!(held);
            }
            _ => {}
        }
        let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tally\""),
            );
        }
        response
    }
}
