-- depends: 0001_initial_schema
-- Users whose membership a rollout event did not change because, at that moment, they held an
-- explicit membership (in regardless) or an exclusion (out regardless) for the segment. Bounded
-- by explicit rows, never by the number of covered users.
CREATE TABLE rollout_event_overrides (
    event_id bigint NOT NULL REFERENCES rollout_events (id),
    user_id  bigint NOT NULL,
    PRIMARY KEY (event_id, user_id)
);
