-- Dedupe identity and purge horizon (issue 9, item 7).
--
-- A claim is scoped by what the event does: usage ('usage'), a grant ('grant') or a plan
-- ('plan'). The same (source, id) in two scopes are two events, so a usage event can never
-- take a grant's or a plan's identity and make it disappear as a duplicate. Claims made
-- before this migration do not say what they were and become 'usage': a grant or plan event
-- claimed before the upgrade and sent again inside the window afterwards is applied once
-- more in its own scope (a grant changes nothing: grants are idempotent by account and
-- grant id; a plan sets the same plan again).
ALTER TABLE processed_events
    ADD COLUMN scope text NOT NULL DEFAULT 'usage'
    CHECK (scope IN ('usage', 'grant', 'plan'));
ALTER TABLE processed_events DROP CONSTRAINT processed_events_pkey;
ALTER TABLE processed_events ADD PRIMARY KEY (scope, event_source, event_id);

-- The purge keys on event time (Tally's clock, like admission), no longer on claimed_at
-- (PostgreSQL's clock).
DROP INDEX processed_events_claimed_at;
CREATE INDEX processed_events_event_time ON processed_events (event_time);

-- One row: claims of events dated before `purged_before` may have been purged, so such an
-- event is refused (too_late) whatever the dedupe window is now. It only moves forward.
-- No row: nothing was purged by event time yet.
CREATE TABLE dedupe_horizon (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_before timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The horizon as a claiming transaction must see it: under a shared advisory lock (per
-- schema) that a purge takes exclusively while it moves the horizon, so a transaction that
-- read the old horizon has committed its claims before any claim under the new horizon is
-- deleted. VOLATILE: the SELECT takes its snapshot after the lock is granted.
CREATE FUNCTION dedupe_claim_horizon() RETURNS timestamptz
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(7421002, hashtext(current_schema()));
    RETURN (SELECT purged_before FROM dedupe_horizon);
END
$$;
