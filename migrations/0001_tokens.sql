-- One row per collection: the current token, the refresh lease and the shared
-- backoff state. Secrets (value, refresh_token) are AES-256-GCM sealed unless
-- no key is configured; *_key names the key (NULL: plaintext).
CREATE TABLE token_broker_tokens (
    collection        text PRIMARY KEY,
    -- +1 per rotation; 0 until the first token is committed.
    version           bigint      NOT NULL DEFAULT 0 CHECK (version >= 0),
    value             bytea,
    value_key         text,
    fetched_at        timestamptz,
    expires_at        timestamptz,
    refresh_at        timestamptz,
    parent_version    bigint,
    refresh_token     bytea,
    refresh_token_key text,
    -- Fingerprint of the configured seed the refresh token descends from.
    refresh_seed      text,
    -- The refresh lease: who may call the upstream, until when, and a fence
    -- that increases with every grant (writes carry it).
    lease_holder      text,
    lease_until       timestamptz,
    lease_fence       bigint      NOT NULL DEFAULT 0,
    last_attempt_at   timestamptz,
    -- Shared backoff after consecutive failures.
    next_attempt_at   timestamptz,
    failures          integer     NOT NULL DEFAULT 0,
    failure_class     text,
    failure_detail    text,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
