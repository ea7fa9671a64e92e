-- The open window without JSON for the common event (issue 12): a usage debit placed at its
-- own time (not late) is stored as columns — its credits, and the nanoseconds below the
-- microsecond that the `at` column cannot hold — with `placed` NULL. Grants, plans and late
-- usage keep `placed` (the event as the book placed it). Rows written before this migration
-- all have `placed` and are read as before: nothing to convert.
ALTER TABLE open_events
    ALTER COLUMN placed DROP NOT NULL,
    ADD COLUMN credits  numeric,
    ADD COLUMN at_nanos integer NOT NULL DEFAULT 0,
    ADD CONSTRAINT open_events_placed_or_debit CHECK (placed IS NOT NULL OR credits IS NOT NULL);

-- The window is read by account (all of it, or before the final point); the claim already
-- makes each event unique, so the key on four columns, two of them text, is an index that
-- nothing needs: one on (account, place) serves both reads.
ALTER TABLE open_events DROP CONSTRAINT open_events_pkey;
CREATE INDEX open_events_account_at ON open_events (account_id, at);
