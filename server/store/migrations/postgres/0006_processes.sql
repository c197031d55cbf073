-- What several gateway processes share beyond jobs and keys (as ../sqlite/0006_processes.sql).

-- One row per serving process, rewritten every few seconds and deleted when it stops cleanly; its
-- policy hashes let `qpu-gateway processes`, every process's log and qpu://policy show replicas
-- that do not run the same policy file.
CREATE TABLE processes (
    id               TEXT PRIMARY KEY,   -- host:pid:random, the process's lease owner
    host             TEXT NOT NULL,
    pid              INTEGER NOT NULL,
    serving          TEXT NOT NULL,      -- "http HOST:PORT", "sse HOST:PORT", "stdio", "in-process"
    started_at       DOUBLE PRECISION NOT NULL,
    seen_at          DOUBLE PRECISION NOT NULL,
    policy_path      TEXT NOT NULL,
    policy_sha256    TEXT,               -- NULL: no policy file, the shipped default applies
    overrides_sha256 TEXT,               -- NULL: no overrides file
    policy_error     TEXT                -- the file on disk was refused; the last good policy runs
);

-- Secrets every process of one installation must share ('request_state' seals the 2026-07-28
-- requestState of elicitation rounds, so a round may land on any replica).
CREATE TABLE shared_secrets (
    name       TEXT PRIMARY KEY,
    value      BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
