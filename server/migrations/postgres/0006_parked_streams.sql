-- Poison events (see `projector::parking`): a consumer that keeps failing on an event parks it
-- and every later event of the same stream, and goes on with the other streams. A row is one
-- stretch of a stream held back from one consumer: from `from_position` on while parked, through
-- `skipped_through` once an admin skipped it (kept: the record of what was skipped, and why).
CREATE TABLE parked_streams (
    consumer        TEXT   NOT NULL,
    stream_id       TEXT   NOT NULL,
    from_position   BIGINT NOT NULL, -- the event that failed
    event_type      TEXT   NOT NULL,
    error           TEXT   NOT NULL, -- the last failure (shown to staff only)
    attempts        INTEGER NOT NULL,
    parked_at       TEXT   NOT NULL,
    action          TEXT,            -- 'retry' or 'skip', asked for and not carried out yet
    reason          TEXT,            -- why it was skipped
    actor           TEXT,            -- who asked for the action
    skipped_through BIGINT,          -- NULL while parked
    skipped_at      TEXT,
    PRIMARY KEY (consumer, stream_id, from_position)
);
