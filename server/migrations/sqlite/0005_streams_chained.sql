-- Streams chained in the log instead of indexed (see `store::heads`): each event names its
-- stream's previous event, and `stream_heads`, written behind the log in bulk, says where each
-- stream ends. The index on (stream_id, stream_version) put a random page into every command's
-- commit; the heads take its place, and the command writer refuses a taken stream version itself
-- (it is the file's one writer and checks every append against the heads).
--
-- SQLite cannot drop a table's UNIQUE constraint, so the table is copied. Positions are kept, and
-- so is AUTOINCREMENT's sequence: a position is never used twice.

CREATE TABLE events_chained (
    position          INTEGER PRIMARY KEY AUTOINCREMENT, -- global order; SQLite commits in this order
    stream_id         TEXT    NOT NULL,
    stream_version    INTEGER NOT NULL,
    previous_position INTEGER,          -- the stream's event before this one; NULL for its first
    event_type        TEXT    NOT NULL,
    schema_version    INTEGER NOT NULL,
    data              TEXT    NOT NULL, -- JSON
    metadata          TEXT    NOT NULL, -- JSON: correlation_id, causation_id, idempotency_key, actor
    recorded_at       TEXT    NOT NULL  -- RFC 3339, UTC
);

INSERT INTO events_chained
    (position, stream_id, stream_version, previous_position, event_type, schema_version, data, metadata, recorded_at)
SELECT position, stream_id, stream_version,
       LAG(position) OVER (PARTITION BY stream_id ORDER BY stream_version),
       event_type, schema_version, data, metadata, recorded_at
FROM events;

CREATE TEMP TABLE kept_sequence AS SELECT seq FROM sqlite_sequence WHERE name = 'events';
DROP TABLE events;
ALTER TABLE events_chained RENAME TO events;
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM temp.kept_sequence), 0)) WHERE name = 'events';
DROP TABLE temp.kept_sequence;

-- Where each stream ends, as of the `stream_heads` checkpoint: streams appended to after it are
-- named by the log itself, which is read back from there at start.
CREATE TABLE stream_heads (
    stream_id TEXT    PRIMARY KEY,
    version   INTEGER NOT NULL,
    position  INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO stream_heads (stream_id, version, position)
SELECT stream_id, MAX(stream_version), MAX(position) FROM events GROUP BY stream_id;

INSERT INTO checkpoints (name, position, updated_at)
VALUES ('stream_heads', (SELECT COALESCE(MAX(position), 0) FROM events), strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
