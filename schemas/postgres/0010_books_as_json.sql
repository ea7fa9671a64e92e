-- An account's book is rewritten by every batch that touches the account and read back by the
-- next (issue 12): as `jsonb` PostgreSQL parsed it into its binary form on every write and
-- printed it back as text on every read, though nothing in SQL looks inside it. As `json`
-- it is stored as the text Tally sends, checked for syntax only. Existing books are
-- converted (the text of the same value).
ALTER TABLE accounts
    ALTER COLUMN book TYPE json USING book::json,
    ALTER COLUMN checkpoint TYPE json USING checkpoint::json;
