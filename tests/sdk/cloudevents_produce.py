"""Produces CloudEvents to Kafka with the CloudEvents Python SDK (PyPI `cloudevents`, its
Kafka binding) and confluent-kafka, as a producer platform would. Used by
tests/cloudevents_sdk.rs; scripts/test installs both packages into .services/cloudevents-venv.

    python cloudevents_produce.py BROKERS < events.json

events.json: a JSON list of {"mode": "binary"|"structured", "topic": ..., "attributes":
{...}, "data": {...}}. `time` is an RFC 3339 string (given to the SDK as a datetime); the
account goes in the `partitionkey` extension, which the binding maps to the record key.
Every record must be acknowledged by the broker; prints one JSON line per record sent.
"""

import json
import sys
from datetime import datetime

from cloudevents.core.bindings.kafka import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer


def main() -> int:
    brokers = sys.argv[1]
    events = json.load(sys.stdin)
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    failures = []

    def delivered(err, msg):
        if err is not None:
            failures.append(str(err))

    for spec in events:
        attributes = dict(spec["attributes"])
        if "time" in attributes:
            attributes["time"] = datetime.fromisoformat(attributes["time"].replace("Z", "+00:00"))
        event = CloudEvent(attributes=attributes, data=spec.get("data"))
        if spec["mode"] == "binary":
            message = to_binary_event(event)
        else:
            message = to_structured_event(event)
        producer.produce(
            spec["topic"],
            key=message.key,
            value=message.value,
            headers=list(message.headers.items()),
            on_delivery=delivered,
        )
        print(json.dumps({
            "mode": spec["mode"],
            "key": message.key if isinstance(message.key, str) else None,
            "headers": {k: v.decode() for k, v in message.headers.items()},
            "value": message.value.decode(),
        }))
    remaining = producer.flush(30)
    if remaining or failures:
        print(f"not delivered: {remaining} pending, failures {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
