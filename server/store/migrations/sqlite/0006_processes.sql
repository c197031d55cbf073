-- What several gateway processes (replicas behind a load balancer, stdio servers of many sessions)
-- share through the database beyond jobs and keys.

-- One row per serving process, rewritten every few seconds and deleted when it stops cleanly. Its
-- policy hashes are how an operator (`qpu-gateway processes`), every process's log and qpu://policy
-- see that the processes on one database do not all run the same policy file.
CREATE TABLE processes (
    id               TEXT PRIMARY KEY,   -- host:pid:random, the process's lease owner
    host             TEXT NOT NULL,
    pid              INTEGER NOT NULL,
    serving          TEXT NOT NULL,      -- "http HOST:PORT", "sse HOST:PORT", "stdio", "in-process"
    started_at       REAL NOT NULL,
    seen_at          REAL NOT NULL,
    policy_path      TEXT NOT NULL,
    policy_sha256    TEXT,               -- NULL: no policy file, the shipped default applies
    overrides_sha256 TEXT,               -- NULL: no overrides file
    policy_error     TEXT                -- the file on disk was refused; the last good policy runs
) WITHOUT ROWID;

-- Secrets every process of one installation must share, created by whichever process needs one
-- first. 'request_state' seals the 2026-07-28 requestState of elicitation rounds, so that a round
-- answered through a load balancer may land on any replica.
CREATE TABLE shared_secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
