-- The two tables written once per event (issue 12) lose their foreign key to accounts: the
-- check ran a lookup and a row lock on the account for every ledger line and every open-window
-- event, though the batch writing them holds that account's row lock already (created in the
-- same transaction when new) and no account is ever deleted. Grants, cycles and alert states
-- (written per account, not per event) keep theirs.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
ALTER TABLE open_events DROP CONSTRAINT open_events_account_id_fkey;
