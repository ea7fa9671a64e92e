//! The demo stream behind `tally produce` and the integration tests: a pure, seeded and
//! deterministic generator of realistic CloudEvents records (grants and plans first, then
//! usage of every kind in time order, with exact resends and malformed records mixed in),
//! each tagged with what the pipeline must do with it. No IO, no clock.

use chrono::{DateTime, Duration, Timelike, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use serde_json::{json, Map, Value};

use crate::event::{encode, types, EventKind, Reason};

/// What the pipeline must do with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expect {
    /// Decoded, rated (usage) or applied (grants, plans).
    Valid,
    /// An exact resend of an earlier record (same `source` + `id`): must count once.
    Duplicate,
    /// Dead-lettered with this reason.
    Rejected(Reason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoRecord {
    pub topic: EventKind,
    /// The Kafka key: the account id.
    pub key: String,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoConfig {
    pub seed: u64,
    /// Accounts `acct-0001`, `acct-0002`...
    pub accounts: usize,
    /// Usage records, duplicates and malformed ones included (grants and plans come on top).
    pub events: usize,
    /// Usage event times fall in [start, end); grants and plans are dated `start`.
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    /// Every Nth usage record is an exact resend of one of the 1000 valid usage records before
    /// it (0 = none).
    pub duplicate_every: usize,
    /// Every Nth usage record is malformed (0 = none); a record that is both is a duplicate.
    pub malformed_every: usize,
}

pub const SOURCE_CALLS: &str = "//voice.example/calls";
pub const SOURCE_CHAT: &str = "//chat.example/responses";
pub const SOURCE_INSTANCES: &str = "//compute.example/instances";
pub const SOURCE_METERED: &str = "//ai.example/metered";
pub const SOURCE_GRANTS: &str = "//billing.example/grants";
pub const SOURCE_PLANS: &str = "//billing.example/plans";

/// The account id of the 0-based account `index`.
pub fn account_id(index: usize) -> String {
    format!("acct-{:04}", index + 1)
}

/// Generates the whole stream: per account its grants (a package and a top-up, every third
/// account a plan too), then `cfg.events` usage records in time order.
pub fn generate(cfg: &DemoConfig) -> Vec<DemoRecord> {
    let mut g = Generator {
        rng: SmallRng::seed_from_u64(cfg.seed),
        seed: cfg.seed,
        next_id: 0,
        buf: Vec::with_capacity(512),
    };
    let accounts: Vec<String> = (0..cfg.accounts).map(account_id).collect();
    let mut out = Vec::with_capacity(cfg.accounts * 3 + cfg.events);

    for (i, account) in accounts.iter().enumerate() {
        out.push(g.grant(account, cfg.start, "package"));
        out.push(g.grant(account, cfg.start, "top_up"));
        if i % 3 == 2 {
            out.push(g.plan(account, cfg.start));
        }
    }
    if accounts.is_empty() {
        return out;
    }

    let span_ms = (cfg.end - cfg.start).num_milliseconds().max(1);
    // Indices (into `out`) of valid usage records, for resends.
    let mut valid_usage: Vec<usize> = Vec::with_capacity(cfg.events);
    for n in 1..=cfg.events {
        // Monotonic times: slot n of `events` equal slots, at a random point within it,
        // truncated to whole seconds.
        let offset_ms = (n as i64 - 1) * span_ms / cfg.events as i64
            + g.rng.gen_range(0..(span_ms / cfg.events as i64).max(1));
        let time = trunc_seconds(cfg.start + Duration::milliseconds(offset_ms)).max(cfg.start);

        if cfg.duplicate_every > 0 && n % cfg.duplicate_every == 0 && !valid_usage.is_empty() {
            // Producers retry soon after: resend one of the last 1000 valid usage records.
            let from = valid_usage.len().saturating_sub(1000);
            let pick = valid_usage[g.rng.gen_range(from..valid_usage.len())];
            let mut record = out[pick].clone();
            record.expect = Expect::Duplicate;
            out.push(record);
            continue;
        }
        // Busier accounts first: account k is picked with a weight falling with k.
        let u: f64 = g.rng.gen();
        let account = &accounts[((u * u) * accounts.len() as f64) as usize];
        if cfg.malformed_every > 0 && n % cfg.malformed_every == 0 {
            let variant = (n / cfg.malformed_every) % MALFORMED_VARIANTS;
            out.push(g.malformed(account, time, variant));
            continue;
        }
        valid_usage.push(out.len());
        out.push(g.usage(account, time));
    }
    out
}

fn trunc_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_nanosecond(0).unwrap_or(t)
}

struct Generator {
    rng: SmallRng,
    seed: u64,
    next_id: u64,
    buf: Vec<u8>,
}

/// The attributes of a usage event, drawn once and then written (valid or corrupted).
enum Draw {
    Call {
        inbound: bool,
        channel: &'static str,
        voice_tier: &'static str,
        model: &'static str,
        started: DateTime<Utc>,
        answered: Option<DateTime<Utc>>,
        ended: DateTime<Utc>,
        hold_seconds: i64,
        null_answer: bool,
    },
    Chat {
        conversation: u32,
        model: &'static str,
        channel: &'static str,
        voice_tier: Option<&'static str>,
        responses: i64,
    },
    Instance {
        instance: u32,
        instance_type: &'static str,
        started: DateTime<Utc>,
    },
    Metered {
        kind: &'static str,
        model: &'static str,
        quantity: &'static str,
    },
}

const MALFORMED_VARIANTS: usize = 10;

/// How a malformed record is broken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flaw {
    None,
    HoldAsString,
    NegativeHold,
    HangUpBeforeAnswer,
    NoSubject,
    UnknownType,
    ZeroQuantity,
    FractionalResponses,
}

impl Generator {
    fn next_event_id(&mut self) -> String {
        self.next_id += 1;
        format!("evt-{}-{}", self.seed, self.next_id)
    }

    fn pick<T: Copy>(&mut self, weighted: &[(T, u32)]) -> T {
        let total: u32 = weighted.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.gen_range(0..total);
        for &(v, w) in weighted {
            if x < w {
                return v;
            }
            x -= w;
        }
        weighted[weighted.len() - 1].0
    }

    /// Encodes one event into `self.buf` (the one encoder: `event::encode`).
    fn emit(
        &mut self,
        id: &str,
        source: &str,
        event_type: &str,
        subject: Option<&str>,
        at: DateTime<Utc>,
        data: Value,
    ) {
        self.buf = encode::structured(event_type, source, id, subject, at, &data);
    }

    fn record(&self, topic: EventKind, account: &str, expect: Expect) -> DemoRecord {
        DemoRecord {
            topic,
            key: account.to_owned(),
            payload: self.buf.clone(),
            expect,
        }
    }

    fn grant(&mut self, account: &str, time: DateTime<Utc>, kind: &str) -> DemoRecord {
        let credits = match kind {
            "package" => self.pick(&[("1000", 2), ("2000", 5), ("5000", 2), ("20000", 1)]),
            _ => self.pick(&[
                ("500", 3),
                ("1000", 3),
                ("2500", 2),
                ("10000", 1),
                ("99.5", 1),
            ]),
        };
        let id = self.next_event_id();
        let grant_id = format!("grant-{}-{account}-{kind}", self.seed);
        let data = json!({"grant_id": grant_id, "kind": kind, "credits": credits});
        self.emit(&id, SOURCE_GRANTS, types::GRANT, Some(account), time, data);
        self.record(EventKind::Grant, account, Expect::Valid)
    }

    fn plan(&mut self, account: &str, time: DateTime<Utc>) -> DemoRecord {
        let (plan_id, allowance) = self.pick(&[(("starter", "1000"), 2), (("pro", "5000"), 1)]);
        let billing_day = self.pick(&[(1, 3), (15, 2), (28, 1), (31, 1)]);
        let id = self.next_event_id();
        let data = json!({
            "plan_id": plan_id,
            "monthly_allowance": allowance,
            "billing_day": billing_day,
            "overage_policy": "bill_overage",
            "top_up_validity_months": 3,
            "low_balance_percent": "25",
            "allowance_alert_percents": [50, 80, 100],
        });
        self.emit(&id, SOURCE_PLANS, types::PLAN, Some(account), time, data);
        self.record(EventKind::Plan, account, Expect::Valid)
    }

    fn draw(&mut self, time: DateTime<Utc>) -> Draw {
        match self.rng.gen_range(0..100) {
            0..=34 => {
                let inbound = self.rng.gen_bool(0.7);
                let channel = self.pick(&[("phone", 5), ("web", 3), ("whatsapp", 2)]);
                let voice_tier = self.pick(&[("standard", 3), ("premium", 1)]);
                let model = self.pick(&[("gpt-4o-mini", 6), ("gpt-4o", 3), ("claude-sonnet", 2)]);
                let ended = time;
                if self.rng.gen_bool(0.1) {
                    let ring = self.rng.gen_range(5..=40);
                    Draw::Call {
                        inbound,
                        channel,
                        voice_tier,
                        model,
                        started: ended - Duration::seconds(ring),
                        answered: None,
                        ended,
                        hold_seconds: 0,
                        null_answer: self.rng.gen_bool(0.5),
                    }
                } else {
                    let ring = self.rng.gen_range(1..=20);
                    // Mostly short calls, a few long ones.
                    let talk = match self.rng.gen_range(0..10) {
                        0..=5 => self.rng.gen_range(5..=180),
                        6..=8 => self.rng.gen_range(180..=900),
                        _ => self.rng.gen_range(900..=3600),
                    };
                    let hold_seconds = if self.rng.gen_bool(0.2) {
                        self.rng.gen_range(0..=talk / 3)
                    } else {
                        0
                    };
                    let answered = ended - Duration::seconds(talk);
                    Draw::Call {
                        inbound,
                        channel,
                        voice_tier,
                        model,
                        started: answered - Duration::seconds(ring),
                        answered: Some(answered),
                        ended,
                        hold_seconds,
                        null_answer: false,
                    }
                }
            }
            35..=74 => {
                let model = self.pick(&[("gpt-4o-mini", 6), ("gpt-4o", 2), ("claude-sonnet", 2)]);
                let voice = self.rng.gen_bool(0.3);
                let voice_tier = if voice {
                    Some(self.pick(&[("standard", 2), ("premium", 1)]))
                } else {
                    None
                };
                let responses = if self.rng.gen_bool(0.8) {
                    1
                } else {
                    self.rng.gen_range(2..=5)
                };
                Draw::Chat {
                    conversation: self.rng.gen_range(1..=500),
                    model,
                    channel: if voice { "voice" } else { "text" },
                    voice_tier,
                    responses,
                }
            }
            75..=79 => {
                let instance_type =
                    self.pick(&[("cpu.standard", 6), ("gpu.a10", 3), ("gpu.h100", 1)]);
                let minutes = self.rng.gen_range(5..=240);
                Draw::Instance {
                    instance: self.rng.gen_range(1..=5),
                    instance_type,
                    started: time - Duration::minutes(minutes),
                }
            }
            _ => {
                if self.rng.gen_bool(0.8) {
                    Draw::Metered {
                        kind: "ai_analysis",
                        model: self.pick(&[("gemini-3-flash", 7), ("gpt-4o", 3)]),
                        quantity: self.pick(&[("1", 6), ("2", 2), ("3", 1), ("2.5", 1)]),
                    }
                } else {
                    Draw::Metered {
                        kind: "media_generation",
                        model: "image-v2",
                        quantity: self.pick(&[("1", 3), ("2", 1), ("4", 1)]),
                    }
                }
            }
        }
    }

    fn usage(&mut self, account: &str, time: DateTime<Utc>) -> DemoRecord {
        let draw = self.draw(time);
        let topic = self.write_usage(account, time, &draw, Flaw::None);
        self.record(topic, account, Expect::Valid)
    }

    /// Writes a usage event into `self.buf`, with `flaw` applied; returns its topic.
    fn write_usage(
        &mut self,
        account: &str,
        time: DateTime<Utc>,
        draw: &Draw,
        flaw: Flaw,
    ) -> EventKind {
        let id = self.next_event_id();
        let subject = (flaw != Flaw::NoSubject).then_some(account);
        let (topic, source) = match draw {
            Draw::Call { .. } => (EventKind::Call, SOURCE_CALLS),
            Draw::Chat { .. } => (EventKind::ChatResponse, SOURCE_CHAT),
            Draw::Instance { .. } => (EventKind::InstanceHours, SOURCE_INSTANCES),
            Draw::Metered { .. } => (EventKind::Metered, SOURCE_METERED),
        };
        let event_type = if flaw == Flaw::UnknownType {
            "tally.usage.sms.v1"
        } else {
            topic.event_type()
        };
        let mut d = Map::new();
        let mut put = |key: &str, value: Value| {
            d.insert(key.to_owned(), value);
        };
        let at = |t: DateTime<Utc>| Value::String(encode::time(t));
        match *draw {
            Draw::Call {
                inbound,
                channel,
                voice_tier,
                model,
                started,
                answered,
                ended,
                hold_seconds,
                null_answer,
            } => {
                put("call_id", json!(format!("call-{}", &id[4..])));
                put(
                    "direction",
                    json!(if inbound { "inbound" } else { "outbound" }),
                );
                put("channel", json!(channel));
                put("model", json!(model));
                put("voice_tier", json!(voice_tier));
                put("started_at", at(started));
                match (answered, flaw) {
                    (Some(_), Flaw::HangUpBeforeAnswer) => {
                        put("answered_at", at(ended + Duration::seconds(5)))
                    }
                    (Some(a), _) => put("answered_at", at(a)),
                    (None, _) if null_answer => put("answered_at", Value::Null),
                    (None, _) => {}
                }
                put("ended_at", at(ended));
                match flaw {
                    Flaw::HoldAsString => put("hold_seconds", json!(hold_seconds.to_string())),
                    Flaw::NegativeHold => put("hold_seconds", json!(-hold_seconds.max(1))),
                    _ if hold_seconds > 0 => put("hold_seconds", json!(hold_seconds)),
                    _ => {}
                }
            }
            Draw::Chat {
                conversation,
                model,
                channel,
                voice_tier,
                responses,
            } => {
                put(
                    "conversation_id",
                    json!(format!("conv-{account}-{conversation}")),
                );
                put("model", json!(model));
                put("channel", json!(channel));
                if let Some(tier) = voice_tier {
                    put("voice_tier", json!(tier));
                }
                if flaw == Flaw::FractionalResponses {
                    put("responses", json!(1.5));
                } else if responses != 1 {
                    put("responses", json!(responses));
                }
            }
            Draw::Instance {
                instance,
                instance_type,
                started,
            } => {
                put("instance_id", json!(format!("i-{account}-{instance}")));
                put("instance_type", json!(instance_type));
                put("started_at", at(started));
                put("ended_at", at(time));
            }
            Draw::Metered {
                kind,
                model,
                quantity,
            } => {
                put("kind", json!(kind));
                let quantity = if flaw == Flaw::ZeroQuantity {
                    "0"
                } else {
                    quantity
                };
                put("quantity", json!(quantity));
                put("attributes", json!({ "model": model }));
            }
        }
        self.emit(&id, source, event_type, subject, time, Value::Object(d));
        topic
    }

    /// Draws until an answered call comes up (cheap: about a third of draws are).
    fn answered_call(&mut self, time: DateTime<Utc>) -> Draw {
        loop {
            let d = self.draw(time);
            if matches!(
                d,
                Draw::Call {
                    answered: Some(_),
                    ..
                }
            ) {
                return d;
            }
        }
    }

    /// A broken usage record; `variant` (0..MALFORMED_VARIANTS) chooses how.
    fn malformed(&mut self, account: &str, time: DateTime<Utc>, variant: usize) -> DemoRecord {
        let (topic, reason) = match variant {
            0 => {
                let d = self.draw(time);
                let topic = self.write_usage(account, time, &d, Flaw::None);
                let cut = self.rng.gen_range(1..self.buf.len());
                self.buf.truncate(cut);
                (topic, Reason::MalformedJson)
            }
            1 => {
                let d = self.answered_call(time);
                (
                    self.write_usage(account, time, &d, Flaw::HoldAsString),
                    Reason::WrongType,
                )
            }
            2 => {
                let d = self.draw(time);
                (
                    self.write_usage(account, time, &d, Flaw::UnknownType),
                    Reason::UnknownType,
                )
            }
            3 => {
                let d = self.answered_call(time);
                (
                    self.write_usage(account, time, &d, Flaw::NegativeHold),
                    Reason::InvalidValue,
                )
            }
            4 => {
                let d = self.draw(time);
                (
                    self.write_usage(account, time, &d, Flaw::NoSubject),
                    Reason::MissingField,
                )
            }
            5 => {
                let d = self.answered_call(time);
                (
                    self.write_usage(account, time, &d, Flaw::HangUpBeforeAnswer),
                    Reason::InvalidValue,
                )
            }
            6 => {
                // Invalid UTF-8 inside a string.
                let d = self.draw(time);
                let topic = self.write_usage(account, time, &d, Flaw::None);
                let at = find(&self.buf, b"\"source\":\"").map_or(1, |p| p + 10);
                self.buf.splice(at..at, [0xff, 0xfe]);
                (topic, Reason::MalformedJson)
            }
            7 => {
                let d = Draw::Metered {
                    kind: "ai_analysis",
                    model: "gemini-3-flash",
                    quantity: "1",
                };
                (
                    self.write_usage(account, time, &d, Flaw::ZeroQuantity),
                    Reason::InvalidValue,
                )
            }
            8 => {
                let d = Draw::Chat {
                    conversation: 1,
                    model: "gpt-4o-mini",
                    channel: "text",
                    voice_tier: None,
                    responses: 1,
                };
                (
                    self.write_usage(account, time, &d, Flaw::FractionalResponses),
                    Reason::WrongType,
                )
            }
            _ => {
                self.buf.clear();
                self.buf.extend_from_slice(b"call ended after 42 seconds");
                (EventKind::Call, Reason::MalformedJson)
            }
        };
        self.record(topic, account, Expect::Rejected(reason))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{decode, DecodeLimits, Payload};
    use chrono::TimeZone;
    use std::collections::{HashMap, HashSet};

    fn cfg(seed: u64, events: usize) -> DemoConfig {
        let end = Utc.with_ymd_and_hms(2025, 6, 15, 12, 0, 0).unwrap();
        DemoConfig {
            seed,
            accounts: 12,
            events,
            start: end - Duration::days(5),
            end,
            duplicate_every: 50,
            malformed_every: 40,
        }
    }

    #[test]
    fn is_deterministic() {
        assert_eq!(generate(&cfg(7, 3000)), generate(&cfg(7, 3000)));
        assert_ne!(generate(&cfg(7, 3000)), generate(&cfg(8, 3000)));
    }

    #[test]
    fn counts() {
        let c = cfg(1, 10_000);
        let records = generate(&c);
        let grants = records
            .iter()
            .filter(|r| r.topic == EventKind::Grant)
            .count();
        let plans = records
            .iter()
            .filter(|r| r.topic == EventKind::Plan)
            .count();
        assert_eq!(grants, 2 * c.accounts);
        assert_eq!(plans, c.accounts / 3);
        assert_eq!(records.len(), grants + plans + c.events);
        let dups = records
            .iter()
            .filter(|r| r.expect == Expect::Duplicate)
            .count();
        let bad = records
            .iter()
            .filter(|r| matches!(r.expect, Expect::Rejected(_)))
            .count();
        assert_eq!(dups, c.events / c.duplicate_every);
        // Records that are both "every 50th" and "every 40th" are duplicates.
        assert_eq!(bad, c.events / c.malformed_every - c.events / 200);

        let none = generate(&DemoConfig {
            duplicate_every: 0,
            malformed_every: 0,
            ..c.clone()
        });
        assert!(none.iter().all(|r| r.expect == Expect::Valid));
        assert!(generate(&DemoConfig { accounts: 0, ..c }).is_empty());
    }

    #[test]
    fn every_record_decodes_as_expected() {
        let c = cfg(3, 20_000);
        let records = generate(&c);
        let limits = DecodeLimits::default();
        let mut ids = HashSet::new();
        let mut first_seen = HashMap::new();
        let mut kinds: HashMap<String, usize> = HashMap::new();
        let mut reasons: HashMap<Reason, usize> = HashMap::new();
        let mut last_usage_time = c.start;
        for (i, r) in records.iter().enumerate() {
            let decoded = decode(&r.payload, c.end, &limits);
            match r.expect {
                Expect::Valid => {
                    let e = decoded.unwrap_or_else(|rej| {
                        panic!("{rej}: {}", String::from_utf8_lossy(&r.payload))
                    });
                    assert_eq!(e.envelope.account_id, r.key.as_str());
                    assert_eq!(EventKind::of_type(&e.envelope.event_type), Some(r.topic));
                    assert!(
                        ids.insert((e.envelope.source.to_string(), e.envelope.id.to_string())),
                        "identity reused by a valid record"
                    );
                    first_seen.insert(r.payload.clone(), i);
                    assert!(e.envelope.time >= c.start && e.envelope.time < c.end);
                    if let Some(usage) = e.usage() {
                        assert!(e.envelope.time >= last_usage_time, "usage in time order");
                        last_usage_time = e.envelope.time;
                        *kinds.entry(usage.kind.to_owned()).or_default() += 1;
                    } else {
                        assert!(!e.payload.kind().is_usage());
                    }
                }
                Expect::Duplicate => {
                    decoded.expect("a resend decodes");
                    let original = first_seen
                        .get(&r.payload)
                        .expect("resend of an earlier record");
                    assert_eq!(records[*original].topic, r.topic);
                    assert_eq!(records[*original].key, r.key);
                }
                Expect::Rejected(reason) => {
                    let rej = decoded.expect_err("malformed record rejected");
                    assert_eq!(
                        rej.reason,
                        reason,
                        "{rej}: {}",
                        String::from_utf8_lossy(&r.payload)
                    );
                    *reasons.entry(reason).or_default() += 1;
                }
            }
        }
        for kind in [
            "call",
            "chat_response",
            "instance_hours",
            "ai_analysis",
            "media_generation",
        ] {
            assert!(
                kinds.get(kind).copied().unwrap_or(0) > 50,
                "{kind}: {kinds:?}"
            );
        }
        for reason in [
            Reason::MalformedJson,
            Reason::WrongType,
            Reason::UnknownType,
            Reason::MissingField,
            Reason::InvalidValue,
        ] {
            assert!(reasons.contains_key(&reason), "{reason}: {reasons:?}");
        }
    }

    #[test]
    fn usage_has_the_promised_variety() {
        let c = cfg(5, 5000);
        let records = generate(&c);
        let now = c.end;
        let limits = DecodeLimits::default();
        let (mut unanswered, mut held, mut outbound, mut premium_chat, mut plans) = (0, 0, 0, 0, 0);
        for r in records.iter().filter(|r| r.expect == Expect::Valid) {
            match decode(&r.payload, now, &limits).unwrap().payload {
                Payload::Call(c) => {
                    unanswered += usize::from(c.answered_at.is_none());
                    held += usize::from(c.hold_seconds > 0);
                    outbound += usize::from(c.direction == crate::event::Direction::Outbound);
                }
                Payload::Chat(c) => {
                    premium_chat += usize::from(c.voice_tier.as_deref() == Some("premium"))
                }
                Payload::Plan(_) => plans += 1,
                _ => {}
            }
        }
        assert!(unanswered > 10 && held > 10 && outbound > 10 && premium_chat > 10);
        assert_eq!(plans, 4);
    }
}
