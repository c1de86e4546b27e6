-- depends: 0009_console_indexes
-- Each segment's explicit members, counted as they change, so that a list of segments shows their
-- sizes without counting millions of rows: every statement that adds or removes memberships adds
-- one row per segment it touched, holding the change (statement-level triggers with transition
-- tables: a batch of thousands of memberships costs a few rows, and writers never update a shared
-- counter row, so they never wait for each other here). A segment's count is the sum of its rows;
-- the expiry worker folds them into one row each now and then. Memberships past their expiry
-- count until the expiry worker removes them, as they stay in the table until then.
CREATE TABLE segment_member_counts (
    segment_id bigint NOT NULL,
    members    bigint NOT NULL
);
CREATE INDEX segment_member_counts_segment ON segment_member_counts (segment_id);

CREATE FUNCTION count_memberships_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members)
    SELECT segment_id, count(*) FROM added GROUP BY segment_id;
    RETURN NULL;
END $$;

CREATE FUNCTION count_memberships_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO segment_member_counts (segment_id, members)
    SELECT segment_id, -count(*) FROM removed GROUP BY segment_id;
    RETURN NULL;
END $$;

-- An upsert's updated rows are in neither: an update keeps its membership.
CREATE TRIGGER memberships_counted_in AFTER INSERT ON memberships
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION count_memberships_added();
CREATE TRIGGER memberships_counted_out AFTER DELETE ON memberships
    REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION count_memberships_removed();

-- The counts so far, in the same transaction as the triggers: writers of memberships wait for
-- this count (the triggers' lock) and none is counted twice or missed.
INSERT INTO segment_member_counts (segment_id, members)
SELECT segment_id, count(*) FROM memberships GROUP BY segment_id;
