-- Lease fences come from one sequence, so a fence never goes backwards, even
-- when a row is deleted and created again (a fence restarting at 1 could match
-- a stale holder's). It starts above every fence already granted.
CREATE SEQUENCE token_broker_lease_fence AS bigint;
SELECT setval('token_broker_lease_fence',
              greatest((SELECT max(lease_fence) FROM token_broker_tokens), 0) + 1,
              false);
