-- A usage event voided (tally.usage.void.v1, issue 14 item 2): 'reversal' ledger lines give
-- the credits it was charged back, each naming the usage event it reverses; a usage event is
-- voided once (its identity claimed in the dedupe scope 'usage_void').
--
-- The two CHECK constraints are extended, not rewritten: migrations of other branches may
-- have added values of their own to them.
DO $$
DECLARE
    def text;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conrelid = 'ledger_entries'::regclass AND conname = 'ledger_entries_kind_check';
    IF position('''reversal''' IN def) = 0 THEN
        EXECUTE 'ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check';
        EXECUTE 'ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check '
             || replace(def, 'ARRAY[', 'ARRAY[''reversal''::text, ');
    END IF;
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conrelid = 'processed_events'::regclass AND conname = 'processed_events_scope_check';
    IF position('''usage_void''' IN def) = 0 THEN
        EXECUTE 'ALTER TABLE processed_events DROP CONSTRAINT processed_events_scope_check';
        EXECUTE 'ALTER TABLE processed_events ADD CONSTRAINT processed_events_scope_check '
             || replace(def, 'ARRAY[', 'ARRAY[''usage_void''::text, ');
    END IF;
END
$$;

-- The usage event a reversal line gives back (its source and id); NULL on other lines.
ALTER TABLE ledger_entries
    ADD COLUMN reverses_source text,
    ADD COLUMN reverses_id     text;

-- Reversals are few: reconcile leaves the usage they reverse out of the ledger's charges.
CREATE INDEX ledger_entries_reversals ON ledger_entries (account_id)
    WHERE kind = 'reversal';

-- Voids whose usage the ledger has not charged yet (it arrives later, on another topic):
-- kept here, their claim taken, and applied at their own time in the transaction that
-- charges the usage, so the ledger ends the same whichever of the two arrives first.
CREATE TABLE pending_usage_voids (
    account_id   text NOT NULL,
    event_source text NOT NULL,
    event_id     text NOT NULL,
    void_source  text NOT NULL,
    void_id      text NOT NULL,
    void_time    timestamptz NOT NULL,
    actor        text NOT NULL,
    reason       text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, event_source, event_id)
);
