-- depends: 0003_outcome_actor
-- A version of the segment catalogue, raised in the same transaction as every applied segment
-- command. The hot read's own query returns it, so an API worker whose in-memory list of rollout
-- segments is older reloads the list before answering: every read that starts after a segment
-- command's outcome is stored reflects that command, in every worker.
CREATE TABLE segment_catalogue (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint  NOT NULL
);
INSERT INTO segment_catalogue (version) VALUES (0);
