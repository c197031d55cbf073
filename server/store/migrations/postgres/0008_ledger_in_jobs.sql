-- A job's reservation lives in its own row (as ../sqlite/0007_ledger_in_jobs.sql): admission writes
-- one row, a job that ends settles its reservation in the UPDATE that ends it, and `ledger` becomes
-- a view of these columns.
ALTER TABLE jobs
    ADD COLUMN ledger_status TEXT,        -- reserved | committed | released (NULL: none)
    ADD COLUMN ledger_day TEXT,           -- UTC date of admission, 'YYYY-MM-DD'
    ADD COLUMN ledger_month TEXT,         -- 'YYYY-MM'
    ADD COLUMN ledger_micro_usd BIGINT,   -- reserved, then what it finally cost
    ADD COLUMN ledger_shots BIGINT,
    ADD COLUMN ledger_qpu_millis BIGINT,
    ADD COLUMN settled_at DOUBLE PRECISION;

UPDATE jobs j SET ledger_status = l.status, ledger_day = l.day, ledger_month = l.month,
    ledger_micro_usd = l.cost_micro_usd, ledger_shots = l.shots, ledger_qpu_millis = l.qpu_millis,
    settled_at = l.settled_at
FROM ledger l WHERE l.job_id = j.id;

DROP TABLE ledger;

CREATE VIEW ledger (job_id, agent, project, day, month, status, cost_micro_usd, shots, qpu_millis, reserved_at,
                    settled_at) AS
SELECT id, agent, project, ledger_day, ledger_month, ledger_status, ledger_micro_usd, ledger_shots,
       ledger_qpu_millis, created_at, settled_at
FROM jobs WHERE ledger_status IS NOT NULL;

-- Budgets sum an agent's (a project's) reserved and committed amounts from the index alone.
CREATE INDEX jobs_ledger_agent ON jobs (agent, ledger_status)
    INCLUDE (ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis);
CREATE INDEX jobs_ledger_project ON jobs (project, ledger_status)
    INCLUDE (ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis);
