//! Holds for live usage, the pure part: a hold's terms and states, how many credits a new
//! hold may take from the available credits (`available = spendable - held`), and the lock
//! bucket of an account. The store (`store::holds`) loads, locks and saves; no IO here.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use rust_decimal::Decimal;

/// The TTL of a hold when the request gives none: a hold not extended by a heartbeat (or
/// settled, or released) within it stops counting.
pub const DEFAULT_TTL_SECONDS: u32 = 60;
/// The longest TTL a request may ask for.
pub const MAX_TTL_SECONDS: u32 = 86_400;
/// The most live holds an account may have at once.
pub const MAX_LIVE_HOLDS: usize = 1_000;
/// How long an ended hold (settled, released, expired) is kept: a re-POST of its id within
/// this time answers the ended hold; after it, the id may be used again.
pub const HOLD_RETENTION: TimeDelta = TimeDelta::days(7);
/// Ended holds deleted per purge statement.
pub const HOLD_PURGE_CHUNK_ROWS: i64 = 10_000;

/// Hold locks are per bucket of accounts (an account id's hash modulo this): a batch
/// transaction takes at most this many advisory locks, whatever number of accounts it
/// debits (PostgreSQL's lock table is shared and bounded).
pub const LOCK_BUCKETS: u32 = 1024;

/// The hold lock bucket of an account: FNV-1a of its id, modulo [`LOCK_BUCKETS`]. Stable
/// across processes and versions (every instance must agree on it).
pub fn lock_bucket(account_id: &str) -> u32 {
    fnv1a(account_id.as_bytes()) % LOCK_BUCKETS
}

/// The advisory lock key (second half; the first is a constant class) of an account's
/// bucket in `schema`: the schema's hash in the upper bits, the bucket in the lower ten, so
/// ordering keys orders buckets, and schemas sharing a database do not share locks.
pub fn lock_key(schema: &str, account_id: &str) -> i32 {
    let upper = fnv1a(schema.as_bytes()) & !(LOCK_BUCKETS - 1);
    (upper | lock_bucket(account_id)) as i32
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Where a hold is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldState {
    /// Counting against the available credits until `expires_at`.
    Live,
    /// Ended by the usage event that names it (its real usage debited in the same
    /// transaction).
    Settled,
    /// Ended by the platform (the call ended without usage, or was cancelled).
    Released,
    /// Its TTL passed without a heartbeat.
    Expired,
}

impl HoldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldState::Live => "live",
            HoldState::Settled => "settled",
            HoldState::Released => "released",
            HoldState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<HoldState> {
        [
            HoldState::Live,
            HoldState::Settled,
            HoldState::Released,
            HoldState::Expired,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What a hold request asks for: credits, or the credits a duration of the usage costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Credits(Decimal),
    Seconds(u64),
}

/// A hold request, checked (ids, attribute names, TTL in range).
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRequest {
    pub hold_id: String,
    pub usage_kind: String,
    pub attributes: BTreeMap<String, String>,
    pub ask: Ask,
    /// When fewer credits are available than asked: hold what is available (true), or
    /// refuse (false).
    pub partial: bool,
    pub ttl_seconds: u32,
}

impl HoldRequest {
    /// Whether `hold` was made by this request (a retry): same usage and the same ask.
    pub fn same_terms(&self, hold: &Hold) -> bool {
        let asked = match self.ask {
            Ask::Credits(c) => hold.requested_seconds.is_none() && hold.requested_credits == c,
            Ask::Seconds(s) => hold.requested_seconds == Some(s),
        };
        asked
            && hold.usage_kind == self.usage_kind
            && hold.attributes == self.attributes
            && hold.partial == self.partial
    }
}

/// A hold as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub account_id: String,
    pub hold_id: String,
    pub usage_kind: String,
    pub attributes: BTreeMap<String, String>,
    pub price_version: String,
    pub rule_id: String,
    pub unit: String,
    pub requested_credits: Decimal,
    pub requested_seconds: Option<u64>,
    pub partial: bool,
    /// The credits held.
    pub credits: Decimal,
    /// The usage they pay for ("time to zero"): seconds (time units) or whole units.
    pub covers_seconds: Option<u64>,
    pub covers_units: Option<u64>,
    pub ttl_seconds: u32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub heartbeats: i32,
    /// As stored: a live hold whose `expires_at` passed is [`HoldState::Expired`] at once
    /// ([`Hold::state_at`]), before the scheduler writes it.
    pub state: HoldState,
    pub ended_at: Option<DateTime<Utc>>,
    /// The usage event that settled it: (source, id).
    pub settled_by: Option<(String, String)>,
    pub exhausted_fired: i32,
    pub exhausted_active: bool,
}

impl Hold {
    /// The state at `now`: a live hold past its `expires_at` has expired.
    pub fn state_at(&self, now: DateTime<Utc>) -> HoldState {
        match self.state {
            HoldState::Live if self.expires_at <= now => HoldState::Expired,
            s => s,
        }
    }

    /// Whether it counts against the available credits at `now`.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        self.state_at(now) == HoldState::Live
    }
}

/// The credits of the holds live at `now`, and how many they are.
pub fn held<'h>(holds: impl IntoIterator<Item = &'h Hold>, now: DateTime<Utc>) -> (Decimal, usize) {
    holds
        .into_iter()
        .filter(|h| h.is_live(now))
        .fold((Decimal::ZERO, 0), |(sum, n), h| (sum + h.credits, n + 1))
}

/// The credits a new hold takes: what it asks when that much is available; what is
/// available when less is and `partial` allows it; None (refused) when nothing is available
/// (`available <= 0`) or less than asked without `partial`.
pub fn decide(requested: Decimal, available: Decimal, partial: bool) -> Option<Decimal> {
    if available <= Decimal::ZERO {
        None
    } else if requested <= available {
        Some(requested)
    } else if partial {
        Some(available)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn a_hold_takes_what_it_asks_or_what_is_left_or_nothing() {
        assert_eq!(decide(dec!(60), dec!(100), false), Some(dec!(60)));
        assert_eq!(decide(dec!(60), dec!(40), false), None);
        assert_eq!(decide(dec!(60), dec!(40), true), Some(dec!(40)));
        assert_eq!(decide(dec!(60), dec!(0), true), None);
        assert_eq!(decide(dec!(60), dec!(-5), true), None);
        assert_eq!(decide(dec!(40), dec!(40), false), Some(dec!(40)));
    }

    #[test]
    fn lock_keys_order_buckets_and_stay_put() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
        for a in ["acct-1", "acct-2", "x"] {
            assert!(lock_bucket(a) < LOCK_BUCKETS);
            assert_eq!(lock_key("s", a) as u32 % LOCK_BUCKETS, lock_bucket(a));
            assert_eq!(
                lock_key("s", a) as u32 & !(LOCK_BUCKETS - 1),
                fnv1a(b"s") & !1023
            );
        }
    }

    #[test]
    fn a_live_hold_past_its_expiry_has_expired() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let mut h = Hold {
            account_id: "a".into(),
            hold_id: "h".into(),
            usage_kind: "call".into(),
            attributes: BTreeMap::new(),
            price_version: "v".into(),
            rule_id: "r".into(),
            unit: "minute".into(),
            requested_credits: dec!(5),
            requested_seconds: None,
            partial: true,
            credits: dec!(5),
            covers_seconds: Some(300),
            covers_units: None,
            ttl_seconds: 60,
            created_at: t("2026-01-01T00:00:00Z"),
            expires_at: t("2026-01-01T00:01:00Z"),
            heartbeats: 0,
            state: HoldState::Live,
            ended_at: None,
            settled_by: None,
            exhausted_fired: 0,
            exhausted_active: false,
        };
        assert!(h.is_live(t("2026-01-01T00:00:59Z")));
        assert_eq!(h.state_at(t("2026-01-01T00:01:00Z")), HoldState::Expired);
        assert_eq!(held([&h], t("2026-01-01T00:00:30Z")), (dec!(5), 1));
        assert_eq!(held([&h], t("2026-01-01T00:01:30Z")), (dec!(0), 0));
        h.state = HoldState::Released;
        assert_eq!(h.state_at(t("2026-01-01T00:00:30Z")), HoldState::Released);
    }
}
