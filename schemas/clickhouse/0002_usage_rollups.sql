-- Tally analytics schema, migration 0002: usage roll-ups for reports and dashboards.
--
-- Two AggregatingMergeTree tables, each kept by a materialized view (`... TO`) over
-- rated_events, partitioned by month. A view sees every block inserted into rated_events, so
-- the roll-ups are exact only if each event identity is inserted once: the sink
-- (AnalyticsSink::insert) drops the rows whose identity is already stored, and repeats within a
-- batch, before inserting; replayed batches are also skipped by the consumer's positions.
-- Read the aggregate columns with the -Merge combinators (sumMerge, countMerge,
-- uniqExactIfMerge), grouping by the key columns you need: several rows may hold parts of the
-- same key until the background merges combine them. docs/analytics.md has every column and
-- ready-to-run queries. Same constraints as 0001: runs unchanged on ClickHouse 18.16 and on
-- current releases. An alias never reuses a source column's name (18.16 resolves aliases
-- first), hence `credits_total` rather than `credits`.

-- Per account × day (UTC, from the event time: late events land on their own day) × usage
-- kind × model × voice tier × instance type ('' where the event has none).
CREATE TABLE IF NOT EXISTS {database}.usage_daily
(
    account_id              String,
    day                     Date,
    kind                    String,
    model                   String,
    voice_tier              String,
    instance_type           String,
    -- sumMerge -> Decimal(38, 6): credits charged.
    credits_total           AggregateFunction(sum, Decimal(18, 6)),
    -- sumMerge -> Decimal(38, 6): the raw measure (seconds for calls and instances, units
    -- for count kinds).
    quantity_total          AggregateFunction(sum, Decimal(38, 6)),
    -- sumMerge -> UInt64: seconds billed after increments and minimums (time kinds).
    billable_seconds_total  AggregateFunction(sum, UInt64),
    -- sumMerge -> Decimal(38, 6): billed units (minutes, hours, responses...).
    billable_quantity_total AggregateFunction(sum, Decimal(18, 6)),
    -- countMerge -> UInt64: rated events.
    event_count             AggregateFunction(count),
    -- sumMerge -> UInt64: calls that were answered.
    answered_calls          AggregateFunction(sum, UInt8),
    -- sumMerge -> UInt64: AI responses (chat_response events carry 1..10000 each).
    ai_responses            AggregateFunction(sum, UInt32),
    -- uniqExactIfMerge -> UInt64: distinct call ids / conversation ids, exact, over any
    -- set of rows merged together (a conversation spanning two days counts once).
    distinct_calls          AggregateFunction(uniqExactIf, String, UInt8),
    distinct_conversations  AggregateFunction(uniqExactIf, String, UInt8)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day, kind, model, voice_tier, instance_type);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.usage_daily_mv
TO {database}.usage_daily
AS SELECT
    account_id,
    event_date AS day,
    kind,
    model,
    voice_tier,
    instance_type,
    sumState(credits) AS credits_total,
    sumState(quantity) AS quantity_total,
    sumState(billable_seconds) AS billable_seconds_total,
    sumState(billable_quantity) AS billable_quantity_total,
    countState() AS event_count,
    sumState(answered) AS answered_calls,
    sumState(responses) AS ai_responses,
    uniqExactIfState(call_id, call_id != '') AS distinct_calls,
    uniqExactIfState(conversation_id, conversation_id != '') AS distinct_conversations
FROM {database}.rated_events
GROUP BY account_id, day, kind, model, voice_tier, instance_type;

-- Per account × day × hour of the day (0-23, UTC) × usage kind: for the busiest hours.
CREATE TABLE IF NOT EXISTS {database}.usage_hourly
(
    account_id    String,
    day           Date,
    hour_of_day   UInt8,
    kind          String,
    credits_total AggregateFunction(sum, Decimal(18, 6)),
    event_count   AggregateFunction(count)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (account_id, day, hour_of_day, kind);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.usage_hourly_mv
TO {database}.usage_hourly
AS SELECT
    account_id,
    event_date AS day,
    toHour(event_time) AS hour_of_day,
    kind,
    sumState(credits) AS credits_total,
    countState() AS event_count
FROM {database}.rated_events
GROUP BY account_id, day, hour_of_day, kind;

-- Backfill: rows stored before this migration (each identity once, FINAL). Runs only while
-- the roll-up is still empty, so re-running the migration never adds them twice. Stop the
-- analytics pipeline while migrating a database that already holds events: rows inserted
-- between the view's creation and this statement would otherwise be left out (the roll-up is
-- no longer empty) or counted twice.
INSERT INTO {database}.usage_daily
SELECT
    account_id,
    event_date AS day,
    kind,
    model,
    voice_tier,
    instance_type,
    sumState(credits) AS credits_total,
    sumState(quantity) AS quantity_total,
    sumState(billable_seconds) AS billable_seconds_total,
    sumState(billable_quantity) AS billable_quantity_total,
    countState() AS event_count,
    sumState(answered) AS answered_calls,
    sumState(responses) AS ai_responses,
    uniqExactIfState(call_id, call_id != '') AS distinct_calls,
    uniqExactIfState(conversation_id, conversation_id != '') AS distinct_conversations
FROM {database}.rated_events FINAL
WHERE (SELECT count() FROM {database}.usage_daily) = 0
GROUP BY account_id, day, kind, model, voice_tier, instance_type;

INSERT INTO {database}.usage_hourly
SELECT
    account_id,
    event_date AS day,
    toHour(event_time) AS hour_of_day,
    kind,
    sumState(credits) AS credits_total,
    countState() AS event_count
FROM {database}.rated_events FINAL
WHERE (SELECT count() FROM {database}.usage_hourly) = 0
GROUP BY account_id, day, hour_of_day, kind
