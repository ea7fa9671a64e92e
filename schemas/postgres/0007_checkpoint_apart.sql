-- The book's checkpoint changes only when the final point moves (the scheduler's tick), while
-- the live state changes with every batch: the checkpoint is stored apart so a batch rewrites
-- only `book` (now the live state, the last key applied and the earliest open place).
ALTER TABLE accounts ADD COLUMN checkpoint jsonb;
UPDATE accounts SET checkpoint = book -> 'checkpoint', book = book - 'checkpoint'
WHERE book ? 'checkpoint';
