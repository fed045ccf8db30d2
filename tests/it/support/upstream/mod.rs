//! Fake upstream HTTP servers for the broker's real HTTP sources.
//!
//! Every server binds `127.0.0.1:0`, is served by axum from a spawned tokio
//! task, and stops when its struct is dropped (a `CancellationToken` drop
//! guard triggers graceful shutdown and cuts short any scripted delay). They
//! run on real time: use them from `#[tokio::test(flavor = "multi_thread")]`
//! tests that do not pause the clock.
//!
//! Contract shared by all servers:
//! - every request is counted and recorded (a [`Recorded`]) when it arrives,
//!   before any scripted delay, whether it is answered by a script entry, the
//!   server's own logic, or rejected;
//! - `script(replies)` queues replies; the next N requests (any method, any
//!   path) get them verbatim and in order, then the server's own logic
//!   answers again;
//! - a [`Reply`] can carry a delay, slept before the response headers go out.
//!
//! The servers:
//! - [`FakeHttp`]: any method, any path, answered by a closure given the
//!   request and its 1-based call number;
//! - [`OAuthServer`]: an RFC 6749 token endpoint at `/oauth2/token` with
//!   client authentication (Basic or body), `client_credentials` and
//!   rotating `refresh_token` grants, and revocable access tokens;
//! - [`OverDriveServer`]: `GET /v1/libraries/{id}` and
//!   `GET /v1/libraries/{id}/advantageAccounts`, authorised by bearer tokens
//!   that an [`OAuthServer`] issued and has not revoked.
//!
//! Nothing here logs; the `Debug` output of [`OAuthConfig`] and [`Recorded`]
//! redacts secrets (client secret, refresh token, `Authorization` header,
//! request bodies).
//!
//! Where each lives: `http` (the shared plumbing: [`Reply`], [`Recorded`],
//! counting, scripting and serving), `json` ([`FakeHttp`], for `http_json`
//! sources), `oauth` ([`OAuthServer`]), `overdrive` ([`OverDriveServer`]),
//! `selftest` (the fakes' own tests).
#![expect(
    dead_code,
    reason = "shared by tests; not every test uses every helper"
)]

mod http;
mod json;
mod oauth;
mod overdrive;
mod selftest;

pub use http::{Recorded, Reply};
pub use json::FakeHttp;
pub use oauth::{ClientAuth, OAuthConfig, OAuthServer};
pub use overdrive::OverDriveServer;
