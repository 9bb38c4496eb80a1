-- Identity and access (API.md "Identity and access"). Not events: these rows hold secrets (as
-- hashes) and operational state, which an append-only log would keep forever. Who did what to a
-- membership is still in the events, as `metadata.actor`.

-- Everyone who can sign in: members (bound to their member id; they sign in with their member
-- email, found through `email_reservations`) and people who run the programme (staff, admin).
CREATE TABLE accounts (
    id            TEXT PRIMARY KEY,
    role          TEXT NOT NULL,          -- member | staff | admin
    member_id     TEXT UNIQUE,            -- members only
    email         TEXT UNIQUE,            -- people only, lower-cased
    name          TEXT NOT NULL,          -- people only ('' for members: their name is in their view)
    password_hash TEXT,                   -- PHC string (Argon2id); NULL until set through an access link
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    created_by    TEXT NOT NULL           -- an actor (API.md): member:<id>, user:<id>, key:<id>, system
);

-- Keys of machine clients. The token is `tk_<id>_<secret>`; only the secret's SHA-256 is kept.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,           -- channel | metrics | staff | admin
    secret_hash  TEXT NOT NULL,           -- hex SHA-256 of the secret
    created_at   TEXT NOT NULL,
    created_by   TEXT NOT NULL,
    last_used_at TEXT,                    -- kept to within a minute, written behind
    revoked_at   TEXT
);

-- Access links (`/claim/<token>`): first access and password reset. Single use, 24 hours.
CREATE TABLE access_links (
    token_hash TEXT PRIMARY KEY,          -- hex SHA-256 of the token
    account_id TEXT,                      -- a person's account
    member_id  TEXT,                      -- or a member (whose account may not exist yet)
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at INTEGER NOT NULL,          -- unix seconds
    used_at    TEXT
);
CREATE INDEX access_links_expires ON access_links (expires_at);

-- Signed-in sessions (tower-sessions records). Kept under the SHA-256 of the cookie's id, so a
-- copy of the table signs no one in.
CREATE TABLE sessions (
    id_hash    TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    data       TEXT NOT NULL,             -- the record's fields, JSON
    expires_at INTEGER NOT NULL,          -- unix seconds; idle expiry, moved forward as it is used
    created_at TEXT NOT NULL
);
CREATE INDEX sessions_account ON sessions (account_id);
CREATE INDEX sessions_expires ON sessions (expires_at);
