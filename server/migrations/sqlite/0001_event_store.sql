-- The event store: the only source of truth. Everything else in this database is derivable.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT, -- global order; SQLite commits in this order
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    data           TEXT    NOT NULL, -- JSON
    metadata       TEXT    NOT NULL, -- JSON: correlation_id, causation_id, idempotency_key, actor
    recorded_at    TEXT    NOT NULL, -- RFC 3339, UTC
    UNIQUE (stream_id, stream_version)
);

-- One member per email (case-insensitive key), written in the same transaction as the events.
CREATE TABLE email_reservations (
    email     TEXT PRIMARY KEY,
    member_id TEXT NOT NULL
);
CREATE INDEX email_reservations_member ON email_reservations (member_id);

-- The first answer to each idempotency key, written in the same transaction as the events.
CREATE TABLE idempotency_keys (
    scope      TEXT    NOT NULL, -- 'api' for Idempotency-Key headers, a consumer's name for its commands
    key        TEXT    NOT NULL,
    request    TEXT    NOT NULL, -- canonical request (method, path, body) the key was first used with
    status     INTEGER NOT NULL,
    response   TEXT    NOT NULL,
    created_at TEXT    NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- One row per consumer (projection or processor): written with the consumer's effects.
CREATE TABLE checkpoints (
    name       TEXT PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at TEXT    NOT NULL,
    last_error TEXT
);
