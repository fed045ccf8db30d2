-- Who presented the row's refresh token to the upstream and has not yet
-- stored the result (a rotating grant): while that holder may still be alive
-- with the rotated token, a peer must not present the spent one again (a
-- strict upstream would revoke the grant). Set under the lease just before the
-- upstream call; cleared by the commit that stores the result, by the
-- holder's recorded failure, or by its saved refresh token.
ALTER TABLE token_broker_tokens
    ADD COLUMN spend_holder  text,
    ADD COLUMN spend_session text,
    ADD COLUMN spend_at      timestamptz;

-- The lease holder that committed the current token: it makes the next soft
-- refresh while it lives, and the other sidecars stand by for a moment
-- before trying the lease, so a rotation is not a herd on one row.
ALTER TABLE token_broker_tokens ADD COLUMN refreshed_by text;
