-- Corrections as entries, never edits (issue 14, item 2): a voided grant and a manual
-- adjustment are ledger lines of their own kinds, each saying who made it and why.
--
-- 'void': a grant's remaining credits removed (the grant is voided: `grants.voided_at`, it no
-- longer counts as purchased). 'adjustment': a manual adjustment, credits added (a bucket of
-- its own, grant id `adjustment:{id}`) or taken from the live grants. A correction (an event
-- out of order) may now correct either kind too.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check
    CHECK (kind IN ('grant', 'debit', 'overage', 'settle', 'expiry', 'renewal', 'reset',
                    'correction', 'void', 'adjustment'));

-- Who made the correction (the API token's name, or the producer's CloudEvents `source`) and
-- why, on every line a void or an adjustment causes; NULL on every other line.
ALTER TABLE ledger_entries
    ADD COLUMN actor  text,
    ADD COLUMN reason text;

-- When the grant was voided (event time); NULL: not voided.
ALTER TABLE grants ADD COLUMN voided_at timestamptz;
