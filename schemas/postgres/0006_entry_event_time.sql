-- The event time of the event that caused a ledger entry (issue 11, `tally reconcile`).
--
-- `effective_at` is when the ledger applied an entry: the event's own time in the common
-- case, but the account's time for late usage and for the provisional charge of an event that
-- arrived out of order. `event_time` is always the causing event's own time (NULL for the
-- entries time causes: resets, expiries), so the ledger's charges can be summed per UTC day of
-- event time, as ClickHouse does, and compared.
ALTER TABLE ledger_entries ADD COLUMN event_time timestamptz;

-- Entries written before this migration: the event time from the usage event's dedupe claim
-- while it is kept (the dedupe window), else `effective_at` for usage charged in order (not
-- late: there the two are equal up to an out-of-order arrival). Late usage whose claim was
-- purged keeps NULL: `tally reconcile` cannot place it on a day.
UPDATE ledger_entries e SET event_time = p.event_time
FROM processed_events p
WHERE p.scope = 'usage' AND p.event_source = e.event_source AND p.event_id = e.event_id
  AND e.usage_kind IS NOT NULL;
UPDATE ledger_entries SET event_time = effective_at
WHERE event_time IS NULL AND usage_kind IS NOT NULL AND NOT late;

-- The charges of a range of days, every account (`tally reconcile`).
CREATE INDEX ledger_entries_event_time ON ledger_entries (event_time)
    WHERE event_time IS NOT NULL;
