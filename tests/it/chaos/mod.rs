//! A seeded chaos run with a history checker (issue 11): several real
//! sidecars on one Postgres database reached through the fault proxy, a
//! scripted upstream with latency, 5xx, 429, hangs and a strictly rotating
//! refresh grant, clients recording every token and failure, and events drawn
//! from a seed (kills, the lease holder killed mid-call, database cut, black
//! hole and restart, rolling key rotation, a row rolled back, one sidecar's
//! clock offset). See docs/chaos.md.
//!
//! - `history`: the recorded history and the checker (pure, unit-tested);
//! - `upstream`: the scripted upstream;
//! - `proc`: one sidecar process (env and clock can change between runs);
//! - `clients`: callers and watchers;
//! - `run`: the schedule, the driver and the chaos tests.

pub mod clients;
pub mod history;
pub mod proc;
pub mod run;
pub mod upstream;
