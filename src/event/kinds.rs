//! The one registry of the event kinds Tally consumes: each kind's CloudEvents `type`, the
//! topic setting that carries it, the usage kind it is rated and stored as, and its JSON
//! Schema (schemas/events/). Decoding, routing (the CLI, the API, the demo), the ledger and
//! analytics read kinds from here: adding a kind starts with a row of [`EventKind::ALL`].
//! Pure: no IO.

use serde::{Deserialize, Serialize};

use super::model::{types, KIND_CALL, KIND_CHAT, KIND_INSTANCE};

/// A kind of event Tally consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Call,
    ChatResponse,
    InstanceHours,
    /// Any other metered usage (AI analysis, media generation...): the event names its usage
    /// kind (`data.kind`) and is priced purely by rules.
    Metered,
    Grant,
    Plan,
    /// A grant voided (corrections travel on the grants topic, in order with grants).
    GrantVoid,
    /// A manual adjustment.
    Adjustment,
    /// A usage event voided (on the grants topic too: in order with the account's other
    /// corrections).
    UsageVoid,
}

/// What the registry knows of one kind.
struct Entry {
    event_type: &'static str,
    /// The kind's name: the stem of its schema file, and the usage kind of the fixed kinds.
    name: &'static str,
    /// The usage kind it is rated and stored as (None: the event says, or not usage).
    usage_kind: Option<&'static str>,
    usage: bool,
    schema: &'static str,
}

/// Rows in the order of [`EventKind::ALL`].
const ENTRIES: [Entry; 9] = [
    Entry {
        event_type: types::CALL,
        name: "call",
        usage_kind: Some(KIND_CALL),
        usage: true,
        schema: include_str!("../../schemas/events/call.schema.json"),
    },
    Entry {
        event_type: types::CHAT_RESPONSE,
        name: "chat_response",
        usage_kind: Some(KIND_CHAT),
        usage: true,
        schema: include_str!("../../schemas/events/chat_response.schema.json"),
    },
    Entry {
        event_type: types::INSTANCE_HOURS,
        name: "instance_hours",
        usage_kind: Some(KIND_INSTANCE),
        usage: true,
        schema: include_str!("../../schemas/events/instance_hours.schema.json"),
    },
    Entry {
        event_type: types::METERED,
        name: "metered",
        usage_kind: None,
        usage: true,
        schema: include_str!("../../schemas/events/metered.schema.json"),
    },
    Entry {
        event_type: types::GRANT,
        name: "grant",
        usage_kind: None,
        usage: false,
        schema: include_str!("../../schemas/events/grant.schema.json"),
    },
    Entry {
        event_type: types::PLAN,
        name: "plan",
        usage_kind: None,
        usage: false,
        schema: include_str!("../../schemas/events/plan.schema.json"),
    },
    Entry {
        event_type: types::GRANT_VOID,
        name: "grant_void",
        usage_kind: None,
        usage: false,
        schema: include_str!("../../schemas/events/grant_void.schema.json"),
    },
    Entry {
        event_type: types::ADJUSTMENT,
        name: "adjustment",
        usage_kind: None,
        usage: false,
        schema: include_str!("../../schemas/events/adjustment.schema.json"),
    },
    Entry {
        event_type: types::USAGE_VOID,
        name: "usage_void",
        usage_kind: None,
        usage: false,
        schema: include_str!("../../schemas/events/usage_void.schema.json"),
    },
];

impl EventKind {
    /// Every kind, usage first, in the order of [`Topics::inputs`].
    pub const ALL: [EventKind; 9] = [
        EventKind::Call,
        EventKind::ChatResponse,
        EventKind::InstanceHours,
        EventKind::Metered,
        EventKind::Grant,
        EventKind::Plan,
        EventKind::GrantVoid,
        EventKind::Adjustment,
        EventKind::UsageVoid,
    ];

    fn entry(self) -> &'static Entry {
        &ENTRIES[self as usize]
    }

    /// The kind of a CloudEvents `type`, if Tally consumes it. One `match` on the type
    /// constants the rows hold (every message is decoded through it: a match compiles to a
    /// few length and byte comparisons; `each_row_is_its_kind` checks it against the rows).
    pub fn of_type(event_type: &str) -> Option<EventKind> {
        Some(match event_type {
            types::CALL => EventKind::Call,
            types::CHAT_RESPONSE => EventKind::ChatResponse,
            types::INSTANCE_HOURS => EventKind::InstanceHours,
            types::METERED => EventKind::Metered,
            types::GRANT => EventKind::Grant,
            types::PLAN => EventKind::Plan,
            types::GRANT_VOID => EventKind::GrantVoid,
            types::ADJUSTMENT => EventKind::Adjustment,
            types::USAGE_VOID => EventKind::UsageVoid,
            _ => return None,
        })
    }

    /// Its CloudEvents `type`.
    pub fn event_type(self) -> &'static str {
        self.entry().event_type
    }

    /// Its name: the stem of its schema file (`schemas/events/{name}.schema.json`).
    pub fn name(self) -> &'static str {
        self.entry().name
    }

    /// The usage kind its events are rated and stored as; None for metered usage (each
    /// event names its own) and for grants and plans.
    pub fn usage_kind(self) -> Option<&'static str> {
        self.entry().usage_kind
    }

    /// Whether its events are usage (rated and debited), not grants or plans.
    pub fn is_usage(self) -> bool {
        self.entry().usage
    }

    /// Its JSON Schema (draft 2020-12), as shipped in schemas/events/.
    pub fn schema(self) -> &'static str {
        self.entry().schema
    }

    /// The topic that carries it.
    pub fn topic(self, topics: &Topics) -> &str {
        match self {
            EventKind::Call => &topics.calls,
            EventKind::ChatResponse => &topics.chat_responses,
            EventKind::InstanceHours => &topics.instance_hours,
            EventKind::Metered => &topics.metered,
            EventKind::Grant => &topics.grants,
            EventKind::Plan => &topics.plans,
            // Corrections of credits ride the grants topic: in order with the grants they
            // correct, through the one path grants take.
            EventKind::GrantVoid | EventKind::Adjustment | EventKind::UsageVoid => &topics.grants,
        }
    }
}

/// The topic of each kind, and the dead-letter topic (`[kafka.topics]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topics {
    pub calls: String,
    pub chat_responses: String,
    pub instance_hours: String,
    pub metered: String,
    pub grants: String,
    pub plans: String,
    pub dead_letter: String,
}

impl Topics {
    /// Every input topic the pipelines consume.
    pub fn inputs(&self) -> Vec<&str> {
        vec![
            &self.calls,
            &self.chat_responses,
            &self.instance_hours,
            &self.metered,
            &self.grants,
            &self.plans,
        ]
    }

    /// Every topic Tally creates at migrate / start-up.
    pub fn all(&self) -> Vec<&str> {
        let mut all = self.inputs();
        all.push(&self.dead_letter);
        all
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            calls: "usage.calls".into(),
            chat_responses: "usage.chat_responses".into(),
            instance_hours: "usage.instance_hours".into(),
            metered: "usage.metered".into(),
            grants: "credit.grants".into(),
            plans: "account.plans".into(),
            dead_letter: "tally.dead_letter".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_is_its_kind() {
        for (i, k) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(k as usize, i, "ALL is in declaration order");
            assert_eq!(EventKind::of_type(k.event_type()), Some(k));
            let schema: serde_json::Value = serde_json::from_str(k.schema()).unwrap();
            assert_eq!(schema["title"], k.event_type());
        }
        assert_eq!(EventKind::of_type("tally.usage.call.v2"), None);
    }

    #[test]
    fn kinds_are_routed_to_the_input_topics_in_order() {
        let topics = Topics::default();
        let routed: Vec<&str> = EventKind::ALL[..6]
            .iter()
            .map(|k| k.topic(&topics))
            .collect();
        assert_eq!(routed, topics.inputs());
        for k in [
            EventKind::GrantVoid,
            EventKind::Adjustment,
            EventKind::UsageVoid,
        ] {
            assert_eq!(k.topic(&topics), topics.grants);
        }
    }
}
