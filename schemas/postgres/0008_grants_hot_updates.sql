-- Grants are now written from the accounts' books (the ledger reads books, not grant rows):
-- a debit rewrites a grant's `remaining`. With `remaining` in the predicates of two partial
-- indexes no such update could stay on its page (HOT); without them it can. The scheduler's
-- credits-expiring query keeps an index on the expiry itself; room is left on each page for
-- the updated row versions.
DROP INDEX grants_live;
DROP INDEX grants_expiry;
CREATE INDEX grants_expires_at ON grants (expires_at);
ALTER TABLE grants SET (fillfactor = 80);
