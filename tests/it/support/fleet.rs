//! A fleet of real `token-broker` processes on one Postgres database and one
//! fake OAuth2 upstream: the config every fleet test serves
//! ([`fleet_config`]), what every sidecar of one fleet shares ([`FleetEnv`]:
//! database URL, key, client secret), how the sidecars reach the database
//! ([`Route`]: straight, or the pool through PgBouncer), and [`Sidecar`] (the
//! real binary, `support::binary`).

use crate::support::postgres::TestDb;
use crate::support::random_secret;

/// The config every fleet test uses: one OAuth client-credentials collection
/// `api` on the shared store, with short test-friendly timings.
pub fn fleet_config(token_url: &str, extra_policy: &str) -> String {
    format!(
        r#"
[store]
database_url_env = "TB_DATABASE_URL"
encryption_key_env = "TB_ENCRYPTION_KEY"
heartbeat_interval = "1s"
query_timeout = "1s"
connect_timeout = "1s"
poll_interval = "5s"

[collections.api]
prefetch = true
source = {{ kind = "oauth2_client_credentials", token_url = "{token_url}", client_id = "fleet", client_secret_env = "TB_CLIENT_SECRET" }}
policy = {{ min_refresh_interval = "1s", refresh_jitter = 0.0 {extra_policy} }}
"#
    )
}

/// What every sidecar of one fleet shares: database, key and client secret.
#[derive(Clone)]
pub struct FleetEnv {
    /// The pool's URL (`TB_DATABASE_URL`).
    pub database_url: String,
    /// Where the listener connects instead, when set: `start` then adds
    /// `listener_url_env = "TB_LISTENER_URL"` to the config's `[store]`.
    pub listener_url: Option<String>,
    pub encryption_key: String,
    pub client_secret: String,
}

impl FleetEnv {
    pub fn new(database_url: String) -> Self {
        use base64::Engine as _;
        let key: [u8; 32] = rand::random();
        Self {
            database_url,
            listener_url: None,
            encryption_key: format!(
                "k1:{}",
                base64::engine::general_purpose::STANDARD.encode(key)
            ),
            client_secret: random_secret("fleet-secret"),
        }
    }

    /// A fleet on `db` by `route`.
    pub fn routed(db: &TestDb, route: Route) -> Self {
        let (pool, listener) = route.urls(db);
        Self {
            listener_url: listener,
            ..Self::new(pool)
        }
    }
}

/// How a fleet's sidecars reach the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Pool and listener straight to Postgres (`database_url` only).
    Direct,
    /// The pool through the transaction-mode PgBouncer of
    /// `scripts/pgbouncer-env`, the listener straight to Postgres
    /// (`listener_url_env`).
    PgBouncer,
}

impl Route {
    /// The pool's URL and, when it differs, the listener's.
    pub fn urls(self, db: &TestDb) -> (String, Option<String>) {
        match self {
            Route::Direct => (db.url.clone(), None),
            Route::PgBouncer => (db.url_through_pgbouncer(), Some(db.url.clone())),
        }
    }
}

/// A fleet member: the real binary (see [`Served`]).
pub use crate::support::binary::Served as Sidecar;

impl FleetEnv {
    /// Starts one sidecar of this fleet serving `config`.
    pub async fn start(&self, config: &str) -> Sidecar {
        let mut env = vec![
            ("TB_DATABASE_URL", self.database_url.as_str()),
            ("TB_ENCRYPTION_KEY", self.encryption_key.as_str()),
            ("TB_CLIENT_SECRET", self.client_secret.as_str()),
        ];
        let mut config = config.to_owned();
        if let Some(listener) = &self.listener_url {
            assert!(config.contains("[store]\n"), "no [store] in {config}");
            config = config.replacen(
                "[store]\n",
                "[store]\nlistener_url_env = \"TB_LISTENER_URL\"\n",
                1,
            );
            env.push(("TB_LISTENER_URL", listener.as_str()));
        }
        Sidecar::start_logging(&config, &env, "info,token_broker=debug").await
    }

    /// Starts `n` sidecars serving `config`.
    pub async fn start_fleet(&self, config: &str, n: usize) -> Vec<Sidecar> {
        let mut sidecars = Vec::new();
        for _ in 0..n {
            sidecars.push(self.start(config).await);
        }
        sidecars
    }
}
