-- An idempotency key keeps the command's outcome (member id, version, position, or transaction id
-- and position) as JSON; the HTTP status is the endpoint's, made by the HTTP layer on every answer.
ALTER TABLE idempotency_keys DROP COLUMN status;
