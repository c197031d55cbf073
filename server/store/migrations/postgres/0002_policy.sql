-- Policy: priorities, idempotency, dry runs, approvals, and the quota ledger (as ../sqlite/0002_policy.sql).

ALTER TABLE jobs ADD COLUMN priority BIGINT NOT NULL DEFAULT 1;          -- 0 low, 1 normal, 2 high
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN payload_hash TEXT;                           -- what the key was first used for
ALTER TABLE jobs ADD COLUMN dry_run_of TEXT;                             -- the backend a dry run stands in for
ALTER TABLE jobs ADD COLUMN simulator BOOLEAN NOT NULL DEFAULT TRUE;     -- ran on a simulator (simulate-first)
ALTER TABLE jobs ADD COLUMN pricing_known BOOLEAN NOT NULL DEFAULT TRUE;
ALTER TABLE jobs ADD COLUMN qpu_seconds_estimate DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN actual_cost_micro_usd BIGINT;
ALTER TABLE jobs ADD COLUMN actual_qpu_seconds DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN approval_level TEXT;                         -- person | operator, when one was needed
ALTER TABLE jobs ADD COLUMN approval_expires_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN approved_by TEXT;                            -- who said yes, and how

CREATE UNIQUE INDEX jobs_idempotency ON jobs (agent, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_loop_guard ON jobs (agent, backend, fingerprint, created_at);
CREATE INDEX jobs_simulated ON jobs (project, fingerprint, state, simulator);
CREATE INDEX jobs_approval_expiry ON jobs (approval_expires_at) WHERE state = 'pending_approval';
CREATE INDEX jobs_claim_order ON jobs (state, priority DESC, seq);

-- One row per admitted job: what it reserved, and what it finally cost (committed) or gave back
-- (released). Amounts are integers: micro-dollars, and QPU time in milliseconds.
CREATE TABLE ledger (
    job_id          TEXT PRIMARY KEY,
    agent           TEXT NOT NULL,
    project         TEXT NOT NULL,
    day             TEXT NOT NULL,     -- UTC date of admission, 'YYYY-MM-DD'
    month           TEXT NOT NULL,     -- 'YYYY-MM'
    status          TEXT NOT NULL,     -- reserved | committed | released
    cost_micro_usd  BIGINT NOT NULL,
    shots           BIGINT NOT NULL,
    qpu_millis      BIGINT NOT NULL,
    reserved_at     DOUBLE PRECISION NOT NULL,
    settled_at      DOUBLE PRECISION
);
CREATE INDEX ledger_agent ON ledger (agent, status, day);
CREATE INDEX ledger_project ON ledger (project, status, day);

-- Round-robin between agents: the agent whose job was claimed longest ago goes next.
CREATE TABLE agent_turns (
    agent            TEXT PRIMARY KEY,
    last_claimed_at  DOUBLE PRECISION NOT NULL
);
