-- The notifications outbox (as ../sqlite/0009_notifications.sql). (0009 is the lead's telemetry
-- migration: numbers need not be contiguous.)
CREATE TABLE notifications (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hook            TEXT NOT NULL,      -- the webhook's name in the policy: its URL and secret stay there
    event           TEXT NOT NULL,      -- approval_needed | storm | budget | breaker
    dedup_key       TEXT UNIQUE,        -- sent once per hook (a budget crossing); NULL for the others
    agent           TEXT,
    project         TEXT,
    job_id          TEXT,
    body            TEXT NOT NULL,      -- the JSON text POSTed (signed when sent, never holding a secret)
    created_at      DOUBLE PRECISION NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,       -- deliveries started
    next_attempt_at DOUBLE PRECISION NOT NULL,  -- when it is due; while claimed, when the claim lapses
    lease_owner     TEXT,               -- the process delivering it now
    last_error      TEXT,
    finished_at     DOUBLE PRECISION
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);
