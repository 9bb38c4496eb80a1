-- The event store: the only source of truth. Everything else in this database is derivable.
CREATE TABLE events (
    position       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    stream_version BIGINT  NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version BIGINT  NOT NULL,
    data           TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    recorded_at    TEXT    NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE email_reservations (
    email     TEXT PRIMARY KEY,
    member_id TEXT NOT NULL
);
CREATE INDEX email_reservations_member ON email_reservations (member_id);

CREATE TABLE idempotency_keys (
    scope      TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    request    TEXT   NOT NULL,
    status     BIGINT NOT NULL,
    response   TEXT   NOT NULL,
    created_at TEXT   NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

CREATE TABLE checkpoints (
    name       TEXT PRIMARY KEY,
    position   BIGINT NOT NULL,
    updated_at TEXT   NOT NULL,
    last_error TEXT
);
