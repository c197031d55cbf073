-- Tamper-evident audit: each row carries the hash of the row before it and its own hash,
-- row_hash = sha256(prev_hash || canonical JSON of the row's content), computed by the store
-- inside the write transaction that inserts the row (see server/audit.py).
--
-- Rows written before this migration keep NULL hashes: SQLite has no sha256 function to
-- backfill them with, and the append-only triggers below refuse the UPDATE a backfill would
-- need. `qpu-gateway audit verify` counts them as legacy rows and starts the chain at the
-- first hashed row, whose prev_hash is the genesis value (64 zeros).

ALTER TABLE audit ADD COLUMN prev_hash TEXT;
ALTER TABLE audit ADD COLUMN row_hash TEXT;
