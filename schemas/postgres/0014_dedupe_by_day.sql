-- Dedupe claims partitioned by the UTC day of their event time (issue 12): a day whose every
-- event is before the dedupe horizon is dropped whole (`DROP TABLE`, a catalog change)
-- instead of deleted row by row, so the purge costs the same at 10 or 100,000 events/s and
-- never leaves the ledger's table and indexes to vacuum.
--
-- The identity is (scope, source, id) within the event's day: the key has to hold the
-- partition key. A copy of an event carries its time, so it meets its claim in the same
-- partition and is a duplicate, as before; an id reused with a time on another day is
-- another event (the CloudEvents rule: source + id identify one event, with one time).
--
-- Day partitions (`processed_events_dYYYYMMDD`) are made by `dedupe_day_partition`, ahead of
-- the days the ledger claims in. Claims of a day without one land in the default partition
-- (the claims copied by this migration; rows written by hand, without a day): the purge
-- deletes those in chunks by event time, as before, using its event-time index.
CREATE TABLE processed_events_by_day (
    scope        text NOT NULL DEFAULT 'usage' CHECK (scope IN ('usage', 'grant', 'plan')),
    event_source text NOT NULL,
    event_id     text NOT NULL,
    account_id   text NOT NULL,
    event_time   timestamptz NOT NULL,
    claimed_at   timestamptz NOT NULL DEFAULT now(),
    event_day    date NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (scope, event_source, event_id, event_day)
) PARTITION BY RANGE (event_day);

CREATE TABLE processed_events_default PARTITION OF processed_events_by_day DEFAULT;
CREATE INDEX processed_events_default_event_time ON processed_events_default (event_time);

INSERT INTO processed_events_by_day
    (scope, event_source, event_id, account_id, event_time, claimed_at, event_day)
SELECT scope, event_source, event_id, account_id, event_time, claimed_at,
       (event_time AT TIME ZONE 'UTC')::date
FROM processed_events;

DROP TABLE processed_events;
ALTER TABLE processed_events_by_day RENAME TO processed_events;

-- Makes the partition of `day` unless it exists. False when it cannot: the default partition
-- holds claims of that day (copied by this migration), which stay there until purged.
-- Takes a lock on processed_events for a moment: called outside the ledger's transactions.
CREATE FUNCTION dedupe_day_partition(day date) RETURNS boolean
    LANGUAGE plpgsql AS $$
DECLARE
    part text := 'processed_events_d' || to_char(day, 'YYYYMMDD');
BEGIN
    IF to_regclass(format('%I.%I', current_schema(), part)) IS NOT NULL THEN
        RETURN true;
    END IF;
    EXECUTE format('CREATE TABLE %I PARTITION OF processed_events FOR VALUES FROM (%L) TO (%L)',
                   part, day, day + 1);
    RETURN true;
EXCEPTION
    WHEN duplicate_table THEN
        RETURN true;
    WHEN check_violation THEN
        RETURN false;
END
$$;
