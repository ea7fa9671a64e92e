-- The event-time ledger (docs/billing.md): each account's book (checkpoint and live state,
-- see src/ledger/book.rs) and its open window of events, so the ledger is a function of
-- the set of events whatever their delivery order.

-- The book as JSON: the checkpoint (everything before final_at, now final) and the live
-- state. The columns beside it stay the denormalized view the API and CLI read.
ALTER TABLE accounts
    ADD COLUMN book     jsonb,
    -- The final point: events dated before it are late (charged at the account's time).
    ADD COLUMN final_at timestamptz,
    -- When the scheduler must visit: a boundary, an expiry, or the final point to move.
    ADD COLUMN due_at   timestamptz;
CREATE INDEX accounts_due ON accounts (due_at);
DROP INDEX accounts_cycle_end;

-- Events at or after the account's final point, in event-time order (at, source, id): the
-- window replayed when an event arrives out of order. Folded into the checkpoint (and
-- deleted) once final. `placed` is the event as the book placed it (its `at` to the
-- nanosecond); the `at` column is PostgreSQL's microseconds, for filtering and order.
CREATE TABLE open_events (
    account_id   text NOT NULL REFERENCES accounts (account_id),
    at           timestamptz NOT NULL,
    event_source text NOT NULL,
    event_id     text NOT NULL,
    late         boolean NOT NULL,
    placed       jsonb NOT NULL,
    PRIMARY KEY (account_id, at, event_source, event_id)
);

-- Corrections: the difference an out-of-order event makes, per grant and kind; `late`:
-- usage that arrived after the grace, charged at the account's time.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('grant', 'debit', 'overage', 'settle', 'expiry', 'renewal', 'reset', 'correction'));
ALTER TABLE ledger_entries
    ADD COLUMN corrects text CHECK (corrects IS NULL OR kind = 'correction'),
    ADD COLUMN late     boolean NOT NULL DEFAULT false;

-- A closed cycle is revised until final (its end + grace): then it never changes.
ALTER TABLE cycles
    ADD COLUMN overage_billed numeric(24, 6) NOT NULL DEFAULT 0,
    ADD COLUMN late_used      numeric(24, 6) NOT NULL DEFAULT 0,
    ADD COLUMN final          boolean NOT NULL DEFAULT true;
