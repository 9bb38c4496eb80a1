-- Materialized views. `position` is the last event applied to the row: updates at or below it are
-- ignored, so a replayed event is harmless.
CREATE TABLE membership_view (
    member_id TEXT PRIMARY KEY,
    version   INTEGER NOT NULL,
    position  INTEGER NOT NULL,
    view      TEXT    NOT NULL -- the JSON answer of GET /api/members/{id}, served as stored
);

CREATE TABLE member_search (
    member_id       TEXT PRIMARY KEY,
    name            TEXT    NOT NULL,
    email           TEXT    NOT NULL,
    search_text     TEXT    NOT NULL, -- lower-cased name and email
    sort_key        TEXT    NOT NULL, -- lower-cased name, for ordering
    tier            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    points_balance  INTEGER NOT NULL,
    lifetime_points INTEGER NOT NULL,
    member_since    TEXT    NOT NULL,
    position        INTEGER NOT NULL
);
CREATE INDEX member_search_sort ON member_search (sort_key, member_id);
CREATE INDEX member_search_tier ON member_search (tier, sort_key, member_id);
CREATE INDEX member_search_status ON member_search (status, sort_key, member_id);
