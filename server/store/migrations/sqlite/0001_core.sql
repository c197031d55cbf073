-- Keys, jobs and the audit log: the gateway core.

CREATE TABLE keys (
    id            TEXT PRIMARY KEY,          -- public part of the key, shown in listings
    secret_hash   TEXT NOT NULL,             -- sha256 of the whole key; the key itself is never stored
    agent         TEXT NOT NULL,
    project       TEXT NOT NULL,
    scopes        TEXT NOT NULL,             -- comma-separated: submit,read,cancel,estimate
    created_at    REAL NOT NULL,
    expires_at    REAL,
    revoked_at    REAL,
    last_used_at  REAL
);
CREATE INDEX keys_agent ON keys (agent);

CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue and listing order
    id                  TEXT NOT NULL UNIQUE,
    agent               TEXT NOT NULL,
    project             TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    name                TEXT,
    backend             TEXT NOT NULL,
    shots               INTEGER NOT NULL,
    circuits            TEXT NOT NULL,      -- JSON array of OpenQASM sources, in order
    n_circuits          INTEGER NOT NULL,
    qubits              INTEGER NOT NULL,
    depth               INTEGER NOT NULL,
    two_qubit_gates     INTEGER NOT NULL,
    fingerprint         TEXT NOT NULL,
    estimate_micro_usd  INTEGER NOT NULL,
    state               TEXT NOT NULL,
    version             INTEGER NOT NULL DEFAULT 1,   -- bumped on every change; watchers compare it
    attempts            INTEGER NOT NULL DEFAULT 0,   -- provider calls tried, retries included
    runs                INTEGER NOT NULL DEFAULT 0,   -- times a worker claimed it to run
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    lease_owner         TEXT,
    lease_expires       REAL,
    provider_ref        TEXT,
    result              TEXT,               -- JSON: counts per circuit, per classical register
    error_code          TEXT,
    error_message       TEXT
);
CREATE INDEX jobs_agent_seq ON jobs (agent, seq DESC);
CREATE INDEX jobs_agent_state_seq ON jobs (agent, state, seq DESC);
CREATE INDEX jobs_state_backend_seq ON jobs (state, backend, seq);
CREATE INDEX jobs_lease ON jobs (lease_expires) WHERE lease_owner IS NOT NULL;

CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          REAL NOT NULL,
    agent       TEXT,
    project     TEXT,
    key_id      TEXT,
    tool        TEXT NOT NULL,     -- tool or resource called, or "job.<state>" for a worker's move
    decision    TEXT NOT NULL,     -- ok | refused | error | event
    error_code  TEXT,
    args_hash   TEXT,              -- sha256 of the canonical JSON arguments
    job_id      TEXT,
    detail      TEXT
);
CREATE INDEX audit_job ON audit (job_id);
CREATE INDEX audit_agent_seq ON audit (agent, seq);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
