//! Bearer tokens: configured as SHA-256 hashes (`[[api.tokens]]`), matched in constant time,
//! never logged. An admin token reads every account and writes grants and plans; an account
//! token reads its own account only — any other account id answers 404, exactly as an
//! unknown account does, so a token cannot probe which accounts exist. An ingest token
//! publishes usage events (`POST /v1/events`), of its configured sources only when it lists
//! any, and reads no account.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::error::ApiError;
use super::AppState;
use crate::config::{valid_account_id, ApiRole, ApiToken};

/// Longest token accepted (longer ones are refused before hashing).
const MAX_TOKEN_BYTES: usize = 4096;

/// Who a request speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin {
        name: String,
    },
    Account {
        account_id: String,
        name: String,
    },
    Ingest {
        name: String,
        /// The CloudEvents sources it may publish; None: any.
        sources: Option<Vec<String>>,
    },
}

impl Principal {
    /// The label logs may show (never the token).
    pub fn name(&self) -> &str {
        match self {
            Principal::Admin { name }
            | Principal::Account { name, .. }
            | Principal::Ingest { name, .. } => name,
        }
    }

    /// May this principal read `account_id`? Returns the id when it may.
    pub fn read<'a>(&self, account_id: &'a str) -> Result<&'a str, ApiError> {
        match self {
            Principal::Ingest { .. } => Err(ApiError::Forbidden("read accounts")),
            Principal::Account {
                account_id: own, ..
            } if own != account_id => Err(ApiError::AccountNotFound),
            _ if !valid_account_id(account_id) => Err(ApiError::invalid(
                "account_id",
                "must match ^[A-Za-z0-9._:-]{1,128}$",
            )),
            _ => Ok(account_id),
        }
    }

    /// May this principal change `account_id` (grants, plans)? Only admins may.
    pub fn write<'a>(&self, account_id: &'a str, what: &'static str) -> Result<&'a str, ApiError> {
        let id = self.read(account_id)?;
        match self {
            Principal::Admin { .. } => Ok(id),
            Principal::Account { .. } | Principal::Ingest { .. } => Err(ApiError::Forbidden(what)),
        }
    }

    /// May this principal place, extend and release holds on `account_id`? Admins and
    /// ingest tokens (the platform whose usage the hold is for) may; an account token
    /// answers as for writes (404 for another account, 403 for its own).
    pub fn hold<'a>(&self, account_id: &'a str) -> Result<&'a str, ApiError> {
        match self {
            Principal::Admin { .. } | Principal::Ingest { .. } => checked(account_id),
            Principal::Account { .. } => self.write(account_id, "place or release holds"),
        }
    }

    /// May this principal read the holds of `account_id`? Those who may place them, and the
    /// account's own token.
    pub fn read_holds<'a>(&self, account_id: &'a str) -> Result<&'a str, ApiError> {
        match self {
            Principal::Ingest { .. } => checked(account_id),
            _ => self.read(account_id),
        }
    }

    /// May this principal publish usage events from `source`? Admins may, and ingest tokens
    /// for their sources.
    pub fn ingest(&self, source: &str) -> Result<(), IngestRefusal> {
        match self {
            Principal::Admin { .. } | Principal::Ingest { sources: None, .. } => Ok(()),
            Principal::Ingest {
                sources: Some(sources),
                ..
            } if sources.iter().any(|s| s == source) => Ok(()),
            Principal::Ingest { .. } => Err(IngestRefusal::Source),
            Principal::Account { .. } => Err(IngestRefusal::Role),
        }
    }
}

/// The account id when it is well-formed.
fn checked(account_id: &str) -> Result<&str, ApiError> {
    if valid_account_id(account_id) {
        Ok(account_id)
    } else {
        Err(ApiError::invalid(
            "account_id",
            "must match ^[A-Za-z0-9._:-]{1,128}$",
        ))
    }
}

/// Why a principal may not publish an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestRefusal {
    /// Not an ingest (or admin) token.
    Role,
    /// An ingest token whose sources do not include the event's.
    Source,
}

/// The configured tokens, as raw SHA-256 digests.
pub struct Tokens {
    entries: Vec<([u8; 32], Principal)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish()
    }
}

impl Tokens {
    /// From validated configuration (`Config::validate` checked the hex and the roles).
    pub fn from_config(tokens: &[ApiToken]) -> Tokens {
        let entries = tokens
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let digest = hex32(t.sha256.expose())?;
                let name = t.name.clone().unwrap_or_else(|| format!("token-{}", i + 1));
                let principal = match (t.role, &t.account_id) {
                    (ApiRole::Admin, _) => Principal::Admin { name },
                    (ApiRole::Account, Some(id)) => Principal::Account {
                        account_id: id.clone(),
                        name,
                    },
                    (ApiRole::Account, None) => return None,
                    (ApiRole::Ingest, _) => Principal::Ingest {
                        name,
                        sources: t.sources.clone(),
                    },
                };
                Some((digest, principal))
            })
            .collect();
        Tokens { entries }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal of a presented token. Every configured digest is compared, in constant
    /// time, whatever matches: the time taken says nothing about which hash is close.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = u32::MAX;
        for (i, (hash, _)) in self.entries.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            found.conditional_assign(&index, hash.ct_eq(&digest));
        }
        self.entries
            .get(usize::try_from(found).ok()?)
            .map(|(_, p)| p.clone())
    }
}

/// The SHA-256 of a token as configuration stores it (lower-case hex).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Middleware of every /v1 route: the request goes on with its [`Principal`] in its
/// extensions, or is answered 401.
pub async fn require_token(State(api): State<AppState>, mut req: Request, next: Next) -> Response {
    match bearer(req.headers()).and_then(|t| api.tokens.authenticate(t)) {
        Some(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn tokens() -> Tokens {
        Tokens::from_config(&[
            ApiToken {
                name: Some("ops".into()),
                sha256: Secret::new(sha256_hex("admin-secret")),
                role: ApiRole::Admin,
                account_id: None,
                sources: None,
            },
            ApiToken {
                name: None,
                sha256: Secret::new(sha256_hex("acme-secret").to_uppercase()),
                role: ApiRole::Account,
                account_id: Some("acme".into()),
                sources: None,
            },
        ])
    }

    #[test]
    fn tokens_match_their_hash_only() {
        let t = tokens();
        assert_eq!(
            t.authenticate("admin-secret"),
            Some(Principal::Admin { name: "ops".into() })
        );
        assert_eq!(
            t.authenticate("acme-secret"),
            Some(Principal::Account {
                account_id: "acme".into(),
                name: "token-2".into()
            })
        );
        for wrong in [
            "",
            "admin-secre",
            "admin-secret ",
            "ACME-SECRET",
            &sha256_hex("admin-secret"),
        ] {
            assert_eq!(t.authenticate(wrong), None, "{wrong}");
        }
        assert_eq!(t.authenticate(&"x".repeat(MAX_TOKEN_BYTES + 1)), None);
        assert!(!format!("{t:?}").contains(&sha256_hex("admin-secret")));
    }

    #[test]
    fn bearer_header_forms() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn account_tokens_see_their_account_only() {
        let acme = Principal::Account {
            account_id: "acme".into(),
            name: "a".into(),
        };
        let admin = Principal::Admin { name: "o".into() };
        assert!(acme.read("acme").is_ok());
        assert!(matches!(acme.read("other"), Err(ApiError::AccountNotFound)));
        assert!(matches!(
            acme.read("bad/id"),
            Err(ApiError::AccountNotFound)
        ));
        assert!(matches!(
            acme.write("acme", "x"),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            acme.write("other", "x"),
            Err(ApiError::AccountNotFound)
        ));
        assert!(admin.write("other", "x").is_ok());
        assert!(matches!(
            admin.read("bad/id"),
            Err(ApiError::Invalid { .. })
        ));
    }
}
