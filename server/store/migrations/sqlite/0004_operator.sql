-- Operator controls: pauses (an agent's kill switch, a backend's drain), who cancelled a job,
-- and the operator named on the audit rows of their acts.

-- One row per paused agent or backend; resuming deletes it (the audit log keeps the history).
-- Every process reads it: the key check joins it (a paused agent's calls are refused), claims
-- skip its jobs, and admission refuses new jobs for a paused backend, all in the same database.
CREATE TABLE pauses (
    kind       TEXT NOT NULL,       -- agent | backend
    name       TEXT NOT NULL,       -- the agent's name or the backend id
    reason     TEXT,
    paused_by  TEXT NOT NULL,       -- the operator (OS user) who paused it
    paused_at  REAL NOT NULL,
    PRIMARY KEY (kind, name)
) WITHOUT ROWID;

ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;   -- 'agent', 'operator <user>' or 'provider'

-- The operator (OS user) behind an operator act: key changes, quota changes, approvals,
-- pauses, cancels, policy reloads. NULL on every other row, and then left out of the row's
-- hashed content, so rows written before this column existed keep their hashes.
ALTER TABLE audit ADD COLUMN operator TEXT;
