-- The search row holds what staff search and filter by (name, email, tier, status) and changes
-- only with those; balances and lifetime points come from `membership_view` when a page of
-- results is read. So earning and redeeming points, most events, no longer rewrite a search row
-- as well as the view. `position` is now the last event that changed the row.
ALTER TABLE member_search DROP COLUMN points_balance;
ALTER TABLE member_search DROP COLUMN lifetime_points;
