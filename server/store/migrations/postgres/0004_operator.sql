-- Operator controls (as ../sqlite/0004_operator.sql): pauses, who cancelled a job, and the
-- operator named on the audit rows of their acts.

CREATE TABLE pauses (
    kind       TEXT NOT NULL,       -- agent | backend
    name       TEXT NOT NULL,       -- the agent's name or the backend id
    reason     TEXT,
    paused_by  TEXT NOT NULL,       -- the operator (OS user) who paused it
    paused_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, name)
);

ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;   -- 'agent', 'operator <user>' or 'provider'

ALTER TABLE audit ADD COLUMN operator TEXT;
