-- The views moved to a file of their own (migrations/sqlite-views). They are derived from the
-- events, so nothing is lost: on a database that had them here, the projections start over from
-- position 0 in the new file and rebuild every view (or run `tally rebuild` first).
DROP TABLE member_search;
DROP TABLE membership_view;
DELETE FROM checkpoints WHERE name IN ('membership_view', 'member_search');
