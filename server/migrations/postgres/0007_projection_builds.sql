-- Blue/green rebuilds of the view projections (see `projector::blue_green`).
--
-- `projection_versions`: the version of each projection's code that built its table. A server
-- whose projection has another version builds the table again, online, at start. The tables that
-- exist when this migration runs were built by version 1.
CREATE TABLE projection_versions (
    name    TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO projection_versions (name, version) VALUES ('membership_view', 1), ('member_search', 1);

-- One row per online build: asked for (by a person, or by a changed version), building (in shadow
-- tables, while the current tables serve), then swapped in, or failed. A build found `building`
-- when the consumers start was cut short (a crash, a new leader): it starts again from position 0.
CREATE TABLE projection_builds (
    id          BIGSERIAL PRIMARY KEY,
    projection  TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    state       TEXT    NOT NULL, -- requested | building | swapped | failed
    reason      TEXT    NOT NULL, -- why it was asked for
    actor       TEXT    NOT NULL, -- who asked ("system" for a changed version)
    phase       TEXT,             -- while building: folding | writing | catching_up | swapping
    applied     BIGINT  NOT NULL DEFAULT 0, -- events folded so far
    total       BIGINT  NOT NULL DEFAULT 0, -- the log's head when the build began (grows while it catches up)
    rate        DOUBLE PRECISION NOT NULL DEFAULT 0, -- events folded per second
    restarts    BIGINT  NOT NULL DEFAULT 0,
    position    BIGINT,           -- swapped: the position the new table was current to
    error       TEXT,
    requested_at TEXT   NOT NULL,
    started_at  TEXT,
    finished_at TEXT
);
CREATE INDEX projection_builds_open ON projection_builds (state) WHERE state IN ('requested', 'building');
