-- Keys, jobs and the audit log: the gateway core (the same schema as ../sqlite/0001_core.sql).
-- Times are seconds since the epoch (double precision, as SQLite's REAL), money and counts bigint.

CREATE TABLE keys (
    id            TEXT PRIMARY KEY,          -- public part of the key, shown in listings
    secret_hash   TEXT NOT NULL,             -- sha256 of the whole key; the key itself is never stored
    agent         TEXT NOT NULL,
    project       TEXT NOT NULL,
    scopes        TEXT NOT NULL,             -- comma-separated: submit,read,cancel,estimate
    created_at    DOUBLE PRECISION NOT NULL,
    expires_at    DOUBLE PRECISION,
    revoked_at    DOUBLE PRECISION,
    last_used_at  DOUBLE PRECISION
);
CREATE INDEX keys_agent ON keys (agent);

CREATE TABLE jobs (
    seq                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- queue and listing order
    id                  TEXT NOT NULL UNIQUE,
    agent               TEXT NOT NULL,
    project             TEXT NOT NULL,
    key_id              TEXT NOT NULL,
    name                TEXT,
    backend             TEXT NOT NULL,
    shots               BIGINT NOT NULL,
    circuits            TEXT NOT NULL,      -- JSON array of OpenQASM sources, in order
    n_circuits          BIGINT NOT NULL,
    qubits              BIGINT NOT NULL,
    depth               BIGINT NOT NULL,
    two_qubit_gates     BIGINT NOT NULL,
    fingerprint         TEXT NOT NULL,
    estimate_micro_usd  BIGINT NOT NULL,
    state               TEXT NOT NULL,
    version             BIGINT NOT NULL DEFAULT 1,   -- bumped on every change; watchers compare it
    attempts            BIGINT NOT NULL DEFAULT 0,   -- provider calls tried, retries included
    runs                BIGINT NOT NULL DEFAULT 0,   -- times a worker claimed it to run
    created_at          DOUBLE PRECISION NOT NULL,
    updated_at          DOUBLE PRECISION NOT NULL,
    started_at          DOUBLE PRECISION,
    finished_at         DOUBLE PRECISION,
    lease_owner         TEXT,
    lease_expires       DOUBLE PRECISION,
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
    seq         BIGINT PRIMARY KEY,  -- assigned by the store from audit_head (0003), never reused
    at          DOUBLE PRECISION NOT NULL,
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

CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END
$$;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();

-- Every committed change of a job is announced to every gateway process listening (LISTEN
-- qpu_jobs): "id version state". PostgreSQL delivers it at commit, and not at all on rollback.
CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('qpu_jobs', NEW.id || ' ' || NEW.version || ' ' || NEW.state);
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_changed AFTER INSERT OR UPDATE OF version ON jobs
    FOR EACH ROW EXECUTE FUNCTION jobs_notify();

-- This database's identity, made once: replicas sharing a rate-limit storage (Redis) with other
-- installations keep their counts under it (server/jobs/ratelimit.py), however they name the host.
CREATE TABLE installation (
    id  TEXT NOT NULL DEFAULT md5(random()::text || clock_timestamp()::text)
);
INSERT INTO installation DEFAULT VALUES;
