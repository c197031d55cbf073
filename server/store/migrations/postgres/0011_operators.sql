-- The console's operators and their browser sessions (as ../sqlite/0010_operators.sql).
CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,      -- viewer | approver | admin
    password_hash TEXT NOT NULL,      -- scrypt$N$r$p$salt_hex$hash_hex
    created_at    DOUBLE PRECISION NOT NULL,
    disabled_at   DOUBLE PRECISION    -- set: no login, every session ended
);
CREATE TABLE operator_sessions (
    id_hash    TEXT PRIMARY KEY,      -- sha256 hex of the session id
    operator   TEXT NOT NULL REFERENCES operators (name),
    created_at DOUBLE PRECISION NOT NULL,
    seen_at    DOUBLE PRECISION NOT NULL  -- its last request: idle expiry counts from here
);
CREATE INDEX operator_sessions_seen ON operator_sessions (seen_at);
