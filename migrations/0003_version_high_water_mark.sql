-- The highest version ever committed per collection, kept apart from the token
-- row: a row put back to an older state (a hand edit, a partial restore) must
-- not make the next commit reuse a version that already named another value.
-- Commits raise it with greatest(); nothing lowers it.
CREATE TABLE token_broker_versions (
    collection  text   PRIMARY KEY,
    max_version bigint NOT NULL CHECK (max_version >= 0)
);
INSERT INTO token_broker_versions (collection, max_version)
SELECT collection, version FROM token_broker_tokens;
