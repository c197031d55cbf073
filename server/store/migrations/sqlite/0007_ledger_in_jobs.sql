-- A job's reservation lives in its own row: admission writes one row, not two, and a job that ends
-- settles its reservation in the same UPDATE that ends it (issue 13's statements per job). The
-- `ledger` table, one row per admitted job and nothing else, becomes a view of these columns, so
-- what read it (an operator's query, `SELECT ... FROM ledger`) reads the same rows.
ALTER TABLE jobs ADD COLUMN ledger_status TEXT;       -- reserved | committed | released (NULL: none)
ALTER TABLE jobs ADD COLUMN ledger_day TEXT;          -- UTC date of admission, 'YYYY-MM-DD'
ALTER TABLE jobs ADD COLUMN ledger_month TEXT;        -- 'YYYY-MM'
ALTER TABLE jobs ADD COLUMN ledger_micro_usd INTEGER; -- reserved, then what it finally cost
ALTER TABLE jobs ADD COLUMN ledger_shots INTEGER;
ALTER TABLE jobs ADD COLUMN ledger_qpu_millis INTEGER;
ALTER TABLE jobs ADD COLUMN settled_at REAL;

UPDATE jobs SET (ledger_status, ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis,
                 settled_at) =
    (SELECT status, day, month, cost_micro_usd, shots, qpu_millis, settled_at FROM ledger WHERE job_id = jobs.id)
WHERE id IN (SELECT job_id FROM ledger);

DROP TABLE ledger;

CREATE VIEW ledger (job_id, agent, project, day, month, status, cost_micro_usd, shots, qpu_millis, reserved_at,
                    settled_at) AS
SELECT id, agent, project, ledger_day, ledger_month, ledger_status, ledger_micro_usd, ledger_shots,
       ledger_qpu_millis, created_at, settled_at
FROM jobs WHERE ledger_status IS NOT NULL;

-- Budgets sum an agent's (a project's) reserved and committed amounts: covering indexes, so the sums
-- read the index alone, never a job's row (whose circuits may run to megabytes).
CREATE INDEX jobs_ledger_agent ON jobs (agent, ledger_status, ledger_day, ledger_month, ledger_micro_usd,
                                        ledger_shots, ledger_qpu_millis);
CREATE INDEX jobs_ledger_project ON jobs (project, ledger_status, ledger_day, ledger_month, ledger_micro_usd,
                                          ledger_shots, ledger_qpu_millis);
