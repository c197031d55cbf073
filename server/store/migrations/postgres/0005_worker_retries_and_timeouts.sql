-- Internal-failure retries and the wall clock from the provider's acceptance (as
-- ../sqlite/0005_worker_retries_and_timeouts.sql).

ALTER TABLE jobs ADD COLUMN internal_failures BIGINT NOT NULL DEFAULT 0;  -- gateway failures while running it
ALTER TABLE jobs ADD COLUMN not_before DOUBLE PRECISION;                  -- a queued job waits until then
ALTER TABLE jobs ADD COLUMN submitted_at DOUBLE PRECISION;                -- when its provider accepted it
