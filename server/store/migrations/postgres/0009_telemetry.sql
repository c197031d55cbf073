-- What metrics and traces need from the database (as ../sqlite/0008_telemetry.sql).

-- When a job last entered the queue (at admission or approval), and the traceparent of the call
-- that submitted it (NULL with tracing off).
ALTER TABLE jobs ADD COLUMN queued_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN trace_parent TEXT;

-- Each process's counters and histograms, for `qpu-gateway metrics serve`; rows of processes gone
-- for a while are added into the row '~retired'.
CREATE TABLE metric_snapshots (
    owner      TEXT PRIMARY KEY,
    updated_at DOUBLE PRECISION NOT NULL,
    samples    TEXT NOT NULL
);
