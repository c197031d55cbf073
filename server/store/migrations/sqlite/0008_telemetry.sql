-- What metrics and traces need from the database (server/telemetry/).

-- When a job last entered the queue at admission or at its approval (the queue-wait histogram
-- counts from here, not from admission, so a job held for a person does not count its wait for
-- them as queueing), and the W3C traceparent of the call that submitted it (NULL with tracing
-- off): a worker in any process continues that trace.
ALTER TABLE jobs ADD COLUMN queued_at REAL;
ALTER TABLE jobs ADD COLUMN trace_parent TEXT;

-- Each process's counters and histograms, rewritten every few seconds, so `qpu-gateway metrics
-- serve` can expose the sum over every process on this database (stdio installations have one
-- process per client session and nothing else to scrape). The rows of processes gone for a while
-- are added into the row '~retired', so totals never go down and the table stays small.
CREATE TABLE metric_snapshots (
    owner      TEXT PRIMARY KEY,   -- the process id (host:pid:random), or '~retired'
    updated_at REAL NOT NULL,
    samples    TEXT NOT NULL       -- JSON, server/telemetry/snapshots.py
) WITHOUT ROWID;
