-- depends: 0002_rollout_event_overrides
-- Who issued each command (its `actor`; through the HTTP gateway, the name of the caller's API key),
-- so an outcome says who did what. Nullable and without a default: adding it rewrites nothing.
ALTER TABLE command_outcomes ADD COLUMN actor text;
