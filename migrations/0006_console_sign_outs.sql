-- depends: 0005_partitioned_history_and_inbox
-- Signing out of the web console ends every session of that API key: a session cookie issued at or
-- before its key's not_before is refused. One row per key that ever signed out; the console keeps
-- no other session state, so every API worker and replica reads the same answer here.
CREATE TABLE console_sign_outs (
    key_hash   text        PRIMARY KEY,
    not_before timestamptz NOT NULL
);
