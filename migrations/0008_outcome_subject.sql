-- depends: 0007_membership_changes_outbox
-- What each command was about, so that the console's activity page links every command to the
-- user or segment it changed without reading its record back from Kafka: the user of a user
-- command, the segment of a segment command (NULL for a record too malformed to say). Nullable
-- without defaults: adding them rewrites nothing.
ALTER TABLE command_outcomes ADD COLUMN subject_user_id bigint, ADD COLUMN subject_slug text;

-- Recent commands first, for the activity page's keyset pages.
CREATE INDEX command_outcomes_recent ON command_outcomes (recorded_at DESC, command_id DESC);
