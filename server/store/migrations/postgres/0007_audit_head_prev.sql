-- The audit head also keeps the hash its last row was chained to, so an append is one statement:
-- `UPDATE audit_head ... RETURNING` takes the head's lock, the next seq, the previous hash and the
-- new one (computed by the server from the row's canonical JSON, which the store sends in two
-- parts around the seq it cannot know), and the same statement inserts the row (a data-modifying
-- WITH). RETURNING gives only new values in PostgreSQL 15, hence the column.
ALTER TABLE audit_head ADD COLUMN prev_hash TEXT;
