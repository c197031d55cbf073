-- A job hit by a failure of the gateway itself (not of the job or its provider) is run again
-- later, a bounded number of times, instead of failing; a job at a provider is timed from the
-- moment the provider accepted it (the policy's max_wall_clock).

ALTER TABLE jobs ADD COLUMN internal_failures INTEGER NOT NULL DEFAULT 0;  -- gateway failures while running it
ALTER TABLE jobs ADD COLUMN not_before REAL;                               -- a queued job waits until then
ALTER TABLE jobs ADD COLUMN submitted_at REAL;                             -- when its provider accepted it
