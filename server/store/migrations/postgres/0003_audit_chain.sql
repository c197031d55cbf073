-- Tamper-evident audit (as ../sqlite/0003_audit_chain.sql): each row carries the hash of the row
-- before it and its own, row_hash = sha256(prev_hash || canonical JSON of the row's content),
-- computed by the store (server/audit/chain.py).
--
-- One chain however many processes append: audit_head is one row holding the last seq assigned
-- and the last row's hash. An append locks it (SELECT ... FOR UPDATE), so appends from every
-- replica queue there and each chains to the one before; a deleted last row does not lower the
-- seq (the verifier then sees the gap, as SQLite's AUTOINCREMENT counter gives).

ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN row_hash TEXT;

CREATE TABLE audit_head (
    one       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    seq       BIGINT NOT NULL,
    row_hash  TEXT
);
INSERT INTO audit_head (seq, row_hash) VALUES (0, NULL);
