-- SQLite keeps the views in a file of their own, next to the event store (see `store::views_file`),
-- so the projections write beside the commands instead of after them. Each projection's
-- checkpoint lives here too and commits with its views. The same tables as the event store's
-- migrations 0002 and 0003 had, which 0004 there drops.

CREATE TABLE checkpoints (
    name       TEXT PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at TEXT    NOT NULL,
    last_error TEXT
);

-- `position` is the last event applied to the row: updates at or below it are ignored, so a
-- replayed event is harmless.
CREATE TABLE membership_view (
    member_id TEXT PRIMARY KEY,
    version   INTEGER NOT NULL,
    position  INTEGER NOT NULL,
    view      TEXT    NOT NULL -- the JSON answer of GET /api/members/{id}, served as stored
);

-- What staff search and filter by; balances come from `membership_view` when results are read.
-- `position` is the last event that changed the row.
CREATE TABLE member_search (
    member_id    TEXT PRIMARY KEY,
    name         TEXT    NOT NULL,
    email        TEXT    NOT NULL,
    search_text  TEXT    NOT NULL, -- lower-cased name and email
    sort_key     TEXT    NOT NULL, -- lower-cased name, for ordering
    tier         TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    member_since TEXT    NOT NULL,
    position     INTEGER NOT NULL
);
CREATE INDEX member_search_sort ON member_search (sort_key, member_id);
CREATE INDEX member_search_tier ON member_search (tier, sort_key, member_id);
CREATE INDEX member_search_status ON member_search (status, sort_key, member_id);
