-- The notifications outbox: one row per event and webhook, written with the event (in the same
-- transaction where the event is a write of its own, as an admission that holds a job), delivered by
-- whichever process's loop claims it, and kept after delivery or after giving up, so an operator can
-- list what was sent. (0008 is the lead's telemetry migration: numbers need not be contiguous.)
CREATE TABLE notifications (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    hook            TEXT NOT NULL,      -- the webhook's name in the policy: its URL and secret stay there
    event           TEXT NOT NULL,      -- approval_needed | storm | budget | breaker
    dedup_key       TEXT UNIQUE,        -- sent once per hook (a budget crossing); NULL for the others
    agent           TEXT,
    project         TEXT,
    job_id          TEXT,
    body            TEXT NOT NULL,      -- the JSON text POSTed (signed when sent, never holding a secret)
    created_at      REAL NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',  -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,       -- deliveries started
    next_attempt_at REAL NOT NULL,      -- when it is due; while claimed, when the claim lapses
    lease_owner     TEXT,               -- the process delivering it now
    last_error      TEXT,
    finished_at     REAL
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);
