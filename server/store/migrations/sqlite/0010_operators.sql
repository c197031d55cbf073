-- The console's operators (people, not agents: they hold no key) and their browser sessions.
-- A password is stored as its scrypt hash with a salt of its own; a session by the sha256 of its
-- id, which lives only in the operator's cookie. (Sessions are not moved by `db copy`: a move
-- signs everyone out.)
CREATE TABLE operators (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL,      -- viewer | approver | admin
    password_hash TEXT NOT NULL,      -- scrypt$N$r$p$salt_hex$hash_hex
    created_at    REAL NOT NULL,
    disabled_at   REAL                -- set: no login, every session ended
);
CREATE TABLE operator_sessions (
    id_hash    TEXT PRIMARY KEY,      -- sha256 hex of the session id
    operator   TEXT NOT NULL REFERENCES operators (name),
    created_at REAL NOT NULL,
    seen_at    REAL NOT NULL          -- its last request: idle expiry counts from here
);
CREATE INDEX operator_sessions_seen ON operator_sessions (seen_at);
