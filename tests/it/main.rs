//! One integration-test binary: the real server on 127.0.0.1:0 (or a Unix
//! socket in a temp dir), called through the generated client, with scripted
//! upstream sources that count calls. Time-dependent tests pause tokio's clock;
//! the broker's wall clock follows it. Store tests get a fresh Postgres
//! database each (`support::postgres`), fleet tests run the real binary
//! several times over one database (`support::binary`), and fault tests cut it
//! through a TCP proxy (`support::fault_proxy`). The shared harness is all in
//! `support/`; every other module holds tests.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod admin;
mod adversity;
mod api;
mod chaos;
mod chart;
mod cli;
mod client_example;
mod examples;
mod faults;
mod fleet;
mod node_client;
mod postgres_store;
mod python_client;
mod refresh;
mod sources;
mod support;
mod telemetry;
mod tls;
mod tree;
mod unix_socket_and_shutdown;
mod walkthrough;
mod watch;
