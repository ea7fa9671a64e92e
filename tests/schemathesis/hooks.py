"""Schemathesis hooks for tests/schemathesis.rs (SCHEMATHESIS_HOOKS=tests.schemathesis.hooks
is not used: the test passes this file's directory on PYTHONPATH and SCHEMATHESIS_HOOKS=hooks).

schemas/openapi.yaml states every rule a single value must follow. Three rules OpenAPI cannot
state are written in its descriptions and applied here to the values schemathesis generates,
so a schema-valid request is one the server accepts:

- against the clock: a grant's `expires_at` is in the future; the `effective_at` of a grant,
  a plan, a void or an adjustment is not in the future and at most `[billing] grace` ago;
- between two parameters: `from` is not after `to` (default today) and the usage range is at
  most 1096 days; a hold gives exactly one of `credits` and `seconds`;
- against the price table: a hold's usage is one the price table prices (an inbound call).

Only values that already are valid date-times / dates are moved: a value schemathesis made
invalid on purpose (negative testing) stays invalid.
"""

from datetime import date, datetime, timedelta, timezone

import schemathesis

MAX_USAGE_DAYS = 1096


def _is_datetime(value):
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        return "T" in value or "t" in value
    except ValueError:
        return False


def _date(value):
    if not isinstance(value, str) or len(value) != 10:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@schemathesis.hook
def map_case(context, case):
    label = context.operation.label if context.operation else ""
    now = datetime.now(timezone.utc)
    body = case.body
    if label in (
        "POST /v1/accounts/{id}/grants",
        "PUT /v1/accounts/{id}/plan",
        "POST /v1/accounts/{id}/grants/{grant_id}/void",
        "POST /v1/accounts/{id}/adjustments",
        "POST /v1/accounts/{id}/usage/void",
    ) and isinstance(body, dict):
        if _is_datetime(body.get("effective_at")):
            body["effective_at"] = _rfc3339(now - timedelta(minutes=5))
        if label.startswith("POST") and _is_datetime(body.get("expires_at")):
            body["expires_at"] = _rfc3339(now + timedelta(days=30))
    if label == "POST /v1/accounts/{id}/holds" and isinstance(body, dict):
        import re

        if isinstance(body.get("kind"), str) and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", body["kind"]):
            attributes = body.get("attributes")
            if attributes is None:
                body["kind"], body["attributes"] = "call", {"direction": "inbound"}
            elif isinstance(attributes, dict) and (len(attributes) < 16 or "direction" in attributes):
                body["kind"] = "call"
                attributes["direction"] = "inbound"
        credits, seconds = body.get("credits"), body.get("seconds")
        if credits is not None and seconds is not None:
            del body["seconds"]
        elif credits is None and seconds is None:
            body["credits"] = "1"
    if label == "GET /v1/accounts/{id}/usage" and isinstance(case.query, dict):
        query = case.query
        today = now.date()
        start, end = _date(query.get("from")), _date(query.get("to"))
        if start is not None and "to" not in query:
            end_default = today
            if start > end_default:
                query["from"] = end_default.isoformat()
            elif (end_default - start).days >= MAX_USAGE_DAYS:
                query["from"] = (end_default - timedelta(days=MAX_USAGE_DAYS - 1)).isoformat()
        elif start is not None and end is not None:
            if start > end:
                start, end = end, start
            if (end - start).days >= MAX_USAGE_DAYS:
                start = end - timedelta(days=MAX_USAGE_DAYS - 1)
            query["from"], query["to"] = start.isoformat(), end.isoformat()
    return case
