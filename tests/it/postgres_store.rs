//! The Postgres store against a real Postgres, one database per test: the
//! lease (exclusive, expiring, fenced), version monotonicity, encryption at
//! rest with key rotation, the refresh token committed with its access token,
//! NOTIFY on rotation only, race-free migrations and listener recovery.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use sqlx::Row as _;
use token_broker::source::FailureClass;
use token_broker::store::crypto::Keyring;
use token_broker::store::{
    Acquired, Backoff, Lease, NewToken, PgSettings, PgStore, Store, StoreError, StoreEvent,
};
use token_broker::token::Secret;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::support::postgres::TestDb;

struct Opened {
    store: Arc<PgStore>,
    shutdown: CancellationToken,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn settings(db: &TestDb, keyring: Keyring) -> PgSettings {
    PgSettings {
        url: Secret::new(db.url.clone()),
        keyring,
        heartbeat_interval: Duration::from_millis(500),
        query_timeout: Duration::from_secs(2),
        ..PgSettings::default()
    }
}

async fn open(db: &TestDb, keyring: Keyring) -> Opened {
    let shutdown = CancellationToken::new();
    let store = PgStore::start(settings(db, keyring), shutdown.clone())
        .await
        .unwrap();
    Opened { store, shutdown }
}

fn keyring(entries: &[(&str, u8)]) -> Keyring {
    let text: Vec<String> = entries
        .iter()
        .map(|(id, b)| {
            format!(
                "{id}:{}",
                base64::engine::general_purpose::STANDARD.encode([*b; 32])
            )
        })
        .collect();
    Keyring::parse(&text.join("\n")).unwrap()
}

fn new_token(value: &str) -> NewToken {
    let now = SystemTime::now();
    NewToken {
        value: Secret::new(value),
        fetched_at: now,
        expires_at: now + Duration::from_secs(300),
        refresh_at: now + Duration::from_secs(200),
        refresh_token: None,
        refresh_seed: None,
        parent_version: None,
        min_version: 0,
    }
}

async fn grant(store: &PgStore, holder: &str, ttl: Duration) -> Lease {
    match store
        .acquire("c", holder, ttl, SystemTime::now())
        .await
        .unwrap()
    {
        Acquired::Granted { lease, .. } => lease,
        other => panic!("expected a grant, got {other:?}"),
    }
}

async fn commit(store: &PgStore, token: NewToken) -> (u64, bool) {
    let lease = grant(store, "me", Duration::from_secs(20)).await;
    let c = store.commit_token(lease, token).await.unwrap();
    (c.token.version, c.rotated)
}

/// Waits for the next `Rotated` event, skipping resyncs.
async fn next_rotation(
    rx: &mut broadcast::Receiver<StoreEvent>,
    within: Duration,
) -> Option<(String, u64)> {
    tokio::time::timeout(within, async {
        loop {
            match rx.recv().await.unwrap() {
                StoreEvent::Rotated {
                    collection,
                    version,
                    committed_at,
                    ..
                } => {
                    // The commit's database time rides along (the lag metric).
                    let at = committed_at.expect("payload carries the commit time");
                    let age = std::time::SystemTime::now()
                        .duration_since(at)
                        .unwrap_or_default();
                    assert!(age < Duration::from_secs(60), "commit time {age:?} ago");
                    return (collection, version);
                }
                StoreEvent::Resync | StoreEvent::Lease { .. } => {}
            }
        }
    })
    .await
    .ok()
}

/// Waits for the next `Lease` announcement, skipping everything else.
async fn next_lease(
    rx: &mut broadcast::Receiver<StoreEvent>,
    within: Duration,
) -> Option<(String, String, Option<SystemTime>)> {
    tokio::time::timeout(within, async {
        loop {
            if let StoreEvent::Lease {
                collection,
                holder,
                until,
            } = rx.recv().await.unwrap()
            {
                return (collection, holder, until);
            }
        }
    })
    .await
    .ok()
}

async fn next_resync(rx: &mut broadcast::Receiver<StoreEvent>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while rx.recv().await.unwrap() != StoreEvent::Resync {}
    })
    .await
    .is_ok()
}

#[tokio::test]
async fn the_lease_is_exclusive_expires_and_fences_the_old_holder() {
    let db = TestDb::create().await;
    let a = open(&db, Keyring::plaintext()).await;
    let b = open(&db, Keyring::plaintext()).await;
    let first = grant(&a.store, "a", Duration::from_millis(400)).await;
    match b
        .store
        .acquire("c", "b", Duration::from_secs(20), SystemTime::now())
        .await
        .unwrap()
    {
        Acquired::Held { until, .. } => assert!(until > SystemTime::now()),
        other => panic!("expected the lease to be held, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Expired: b takes over, and a's late writes are refused.
    let second = grant(&b.store, "b", Duration::from_secs(20)).await;
    assert!(second.fence > first.fence);
    assert!(matches!(
        a.store.commit_token(first.clone(), new_token("late")).await,
        Err(StoreError::LeaseLost(_))
    ));
    let backoff = Backoff {
        failures: 1,
        next_attempt_at: SystemTime::now() + Duration::from_secs(5),
        class: FailureClass::Timeout,
        detail: "no answer".into(),
    };
    assert!(matches!(
        a.store.commit_failure(first.clone(), backoff.clone()).await,
        Err(StoreError::LeaseLost(_))
    ));
    assert!(matches!(
        a.store.release(first).await,
        Err(StoreError::LeaseLost(_))
    ));
    b.store
        .commit_failure(second, backoff.clone())
        .await
        .unwrap();
    let row = a.store.load("c").await.unwrap();
    assert_eq!(row.token, None, "the fenced-out write left nothing");
    let stored = row.backoff.unwrap();
    assert_eq!((stored.failures, stored.class), (1, FailureClass::Timeout));
    assert_eq!(stored.detail, "no answer");
    // Released by the failure commit: the next acquire is granted at once.
    let third = grant(&a.store, "a", Duration::from_secs(20)).await;
    a.store.release(third).await.unwrap();
    grant(&b.store, "b", Duration::from_secs(20)).await;
}

#[tokio::test]
async fn versions_only_increase_and_a_refetch_keeps_its_version() {
    let db = TestDb::create().await;
    let s = open(&db, Keyring::plaintext()).await;
    assert_eq!(commit(&s.store, new_token("a")).await, (1, true));
    let again = new_token("a");
    let fetched_at = again.fetched_at;
    assert_eq!(commit(&s.store, again).await, (1, false));
    let row = s.store.load("c").await.unwrap();
    let t = row.token.unwrap();
    // Microseconds survive; the refetch's timestamps replaced the old ones.
    let diff = fetched_at
        .duration_since(t.fetched_at)
        .unwrap_or_else(|e| e.duration());
    assert!(diff < Duration::from_micros(1), "{diff:?}");
    assert_eq!(commit(&s.store, new_token("b")).await, (2, true));
    // A token first published locally as version 5 keeps that version...
    let local = NewToken {
        min_version: 5,
        ..new_token("c")
    };
    assert_eq!(commit(&s.store, local).await, (5, true));
    // ...and one published as 3 (a tie or lower) still goes above the row.
    let lower = NewToken {
        min_version: 3,
        ..new_token("d")
    };
    assert_eq!(commit(&s.store, lower).await, (6, true));
    // The same value under a higher local version is a rotation, not a refetch.
    let relabelled = NewToken {
        min_version: 8,
        ..new_token("d")
    };
    assert_eq!(commit(&s.store, relabelled).await, (8, true));
}

#[tokio::test]
async fn secrets_are_sealed_at_rest_and_survive_key_rotation() {
    let db = TestDb::create().await;
    let token = format!("access-{}", crate::support::random_secret("tok"));
    let refresh = format!("refresh-{}", crate::support::random_secret("rt"));
    let old = open(&db, keyring(&[("k1", 1)])).await;
    let lease = grant(&old.store, "me", Duration::from_secs(20)).await;
    old.store
        .commit_token(
            lease,
            NewToken {
                refresh_token: Some(Secret::new(refresh.clone())),
                ..new_token(&token)
            },
        )
        .await
        .unwrap();
    let pool = db.pool().await;
    let raw = sqlx::query("SELECT value, value_key, refresh_token, refresh_token_key, encode(value, 'escape') AS v, encode(refresh_token, 'escape') AS r FROM token_broker_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    let value: Vec<u8> = raw.get("value");
    let rt: Vec<u8> = raw.get("refresh_token");
    assert_eq!(
        raw.get::<Option<String>, _>("value_key").as_deref(),
        Some("k1")
    );
    assert_eq!(
        raw.get::<Option<String>, _>("refresh_token_key").as_deref(),
        Some("k1")
    );
    for (bytes, secret) in [(&value, &token), (&rt, &refresh)] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    let escaped: String = raw.get("v");
    assert!(!escaped.contains(&token) && !escaped.contains("access-"));
    let escaped: String = raw.get("r");
    assert!(!escaped.contains(&refresh));
    // Rotate: k2 encrypts, k1 still decrypts.
    drop(old);
    let rotated = open(&db, keyring(&[("k2", 2), ("k1", 1)])).await;
    let row = rotated.store.load("c").await.unwrap();
    assert_eq!(row.token.unwrap().value, Secret::new(token.clone()));
    assert_eq!(row.refresh_token, Some(Secret::new(refresh.clone())));
    assert_eq!(
        commit(&rotated.store, new_token("next-token")).await,
        (2, true)
    );
    let key: Option<String> = sqlx::query_scalar("SELECT value_key FROM token_broker_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(key.as_deref(), Some("k2"));
    // Without the key the refresh token (still under k1) reads as absent, never as garbage.
    drop(rotated);
    let k2_only = open(&db, keyring(&[("k2", 2)])).await;
    let row = k2_only.store.load("c").await.unwrap();
    assert_eq!(row.token.unwrap().value, Secret::new("next-token"));
    assert_eq!(row.refresh_token, None);
    // No key at all: plaintext with a NULL key id.
    drop(k2_only);
    let plain = open(&db, Keyring::plaintext()).await;
    commit(&plain.store, new_token("plain-token")).await;
    let (bytes, key): (Vec<u8>, Option<String>) =
        sqlx::query_as("SELECT value, value_key FROM token_broker_tokens")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((bytes.as_slice(), key), (b"plain-token".as_slice(), None));
}

#[tokio::test]
async fn the_refresh_token_is_committed_with_its_access_token() {
    let db = TestDb::create().await;
    let s = open(&db, keyring(&[("k1", 7)])).await;
    let lease = grant(&s.store, "me", Duration::from_secs(20)).await;
    s.store
        .commit_token(
            lease,
            NewToken {
                refresh_token: Some(Secret::new("rt-1")),
                refresh_seed: Some("seed-fp-1".into()),
                ..new_token("at-1")
            },
        )
        .await
        .unwrap();
    let row = s.store.load("c").await.unwrap();
    assert_eq!(row.token.unwrap().value, Secret::new("at-1"));
    assert_eq!(row.refresh_token, Some(Secret::new("rt-1")));
    assert_eq!(row.refresh_seed.as_deref(), Some("seed-fp-1"));
    // A commit without a new refresh token keeps the stored one (and its seed).
    commit(&s.store, new_token("at-2")).await;
    assert_eq!(
        s.store.load("c").await.unwrap().refresh_token,
        Some(Secret::new("rt-1"))
    );
    // A fenced-out commit writes neither.
    let stale = grant(&s.store, "me", Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fresh = grant(&s.store, "peer", Duration::from_secs(20)).await;
    let refused = s
        .store
        .commit_token(
            stale,
            NewToken {
                refresh_token: Some(Secret::new("rt-stale")),
                ..new_token("at-stale")
            },
        )
        .await;
    assert!(matches!(refused, Err(StoreError::LeaseLost(_))));
    s.store
        .commit_token(
            fresh,
            NewToken {
                refresh_token: Some(Secret::new("rt-3")),
                ..new_token("at-3")
            },
        )
        .await
        .unwrap();
    let row = s.store.load("c").await.unwrap();
    assert_eq!(
        (row.token.unwrap().value, row.refresh_token),
        (Secret::new("at-3"), Some(Secret::new("rt-3")))
    );
}

#[tokio::test]
async fn a_rotation_notifies_peers_and_a_refetch_does_not() {
    let db = TestDb::create().await;
    let writer = open(&db, Keyring::plaintext()).await;
    let reader = open(&db, Keyring::plaintext()).await;
    let mut events = reader.store.events();
    assert!(
        next_resync(&mut events, Duration::from_secs(5)).await,
        "the listener resyncs once it is listening"
    );
    commit(&writer.store, new_token("a")).await;
    assert_eq!(
        next_rotation(&mut events, Duration::from_secs(5)).await,
        Some(("c".to_owned(), 1))
    );
    commit(&writer.store, new_token("a")).await;
    assert_eq!(
        next_rotation(&mut events, Duration::from_millis(500)).await,
        None,
        "a refetch of the same value notifies no one"
    );
    commit(&writer.store, new_token("b")).await;
    assert_eq!(
        next_rotation(&mut events, Duration::from_secs(5)).await,
        Some(("c".to_owned(), 2))
    );
}

/// A grant is announced with its holder and end, and so is a give-back (by
/// release or by a failure commit), so peers need not try a lease that is
/// held; a lease found held announces nothing.
#[tokio::test]
async fn lease_grants_and_give_backs_are_announced_to_peers() {
    let db = TestDb::create().await;
    let holder = open(&db, Keyring::plaintext()).await;
    let peer = open(&db, Keyring::plaintext()).await;
    let mut events = peer.store.events();
    assert!(next_resync(&mut events, Duration::from_secs(5)).await);
    let lease = grant(&holder.store, "h/1/0a", Duration::from_secs(3)).await;
    let (collection, who, until) = next_lease(&mut events, Duration::from_secs(5))
        .await
        .expect("a grant is announced");
    assert_eq!((collection.as_str(), who.as_str()), ("c", "h/1/0a"));
    let until = until.expect("a grant carries its end");
    let off = until
        .duration_since(lease.until)
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_millis(1),
        "announced {until:?}, granted {:?}",
        lease.until
    );
    // Found held: no announcement.
    assert!(matches!(
        peer.store
            .acquire("c", "p/2/0b", Duration::from_secs(3), SystemTime::now())
            .await
            .unwrap(),
        Acquired::Held { .. }
    ));
    holder.store.release(lease).await.unwrap();
    assert_eq!(
        next_lease(&mut events, Duration::from_secs(5)).await,
        Some(("c".to_owned(), "h/1/0a".to_owned(), None)),
        "the give-back comes next, not an announcement of the failed acquire"
    );
    let lease = grant(&holder.store, "h/1/0a", Duration::from_secs(3)).await;
    assert!(
        next_lease(&mut events, Duration::from_secs(5))
            .await
            .is_some()
    );
    let backoff = Backoff {
        failures: 1,
        next_attempt_at: SystemTime::now() + Duration::from_secs(5),
        class: FailureClass::Timeout,
        detail: "no answer".into(),
    };
    holder.store.commit_failure(lease, backoff).await.unwrap();
    assert_eq!(
        next_lease(&mut events, Duration::from_secs(5)).await,
        Some(("c".to_owned(), "h/1/0a".to_owned(), None)),
        "a failure commit gives the lease back"
    );
}

/// The app awaits the store's listener at a stop (`Store::close`): it ends
/// once the shutdown token is cancelled (an exit is not held up), and the
/// store still answers after.
#[tokio::test]
async fn close_returns_once_shutdown_is_cancelled_and_the_store_still_answers() {
    let db = TestDb::create().await;
    let s = open(&db, Keyring::plaintext()).await;
    let mut events = s.store.events();
    assert!(next_resync(&mut events, Duration::from_secs(5)).await);
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), s.store.close())
        .await
        .expect("the listener ends within 2 s of the shutdown");
    assert_eq!(commit(&s.store, new_token("a")).await, (1, true));
}

#[tokio::test]
async fn a_killed_listener_backend_reconnects_and_resyncs() {
    let db = TestDb::create().await;
    let writer = open(&db, Keyring::plaintext()).await;
    let reader = open(&db, Keyring::plaintext()).await;
    let mut events = reader.store.events();
    assert!(next_resync(&mut events, Duration::from_secs(5)).await);
    let pool = db.pool().await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE 'token-broker listener %' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(killed, vec![true, true], "one listener per store");
    assert!(
        next_resync(&mut events, Duration::from_secs(5)).await,
        "the listener came back and asked for a resync"
    );
    commit(&writer.store, new_token("after")).await;
    assert_eq!(
        next_rotation(&mut events, Duration::from_secs(5)).await,
        Some(("c".to_owned(), 1))
    );
}

#[tokio::test]
async fn concurrent_migrations_apply_once() {
    let db = TestDb::create().await;
    let s = settings(&db, Keyring::plaintext());
    let runs = futures_join_all((0..6).map(|_| {
        let s = s.clone();
        tokio::spawn(async move { PgStore::migrate(&s).await.unwrap() })
    }))
    .await;
    let applied: Vec<i64> = runs.into_iter().flatten().collect();
    assert_eq!(
        applied,
        vec![1, 2, 3, 4],
        "exactly one run applied each migration"
    );
    let pool = db.pool().await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM token_broker_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 4);
    // A store that must not migrate refuses a database without the schema.
    let empty = TestDb::create().await;
    let refused = PgStore::start(
        PgSettings {
            migrate: false,
            ..settings(&empty, Keyring::plaintext())
        },
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(refused.contains("token-broker migrate"), "{refused}");
}

async fn futures_join_all<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A value sealed with a key this store lacks still holds its version: a
/// commit goes above it, never reuses it (two values under one version).
#[tokio::test]
async fn an_unreadable_value_still_holds_its_version() {
    let db = TestDb::create().await;
    let k2 = open(&db, keyring(&[("k2", 2), ("k1", 1)])).await;
    commit(&k2.store, new_token("one")).await;
    commit(&k2.store, new_token("two")).await;
    let k1 = open(&db, keyring(&[("k1", 1)])).await;
    assert_eq!(
        k1.store.load("c").await.unwrap().token,
        None,
        "a value sealed with an unknown key reads as absent"
    );
    // Even the same value as the unreadable one is not "the same": k1 cannot know.
    assert_eq!(commit(&k1.store, new_token("two")).await, (3, true));
    // A floor from the committer's own L1 is honoured too.
    let floored = NewToken {
        min_version: 9,
        ..new_token("three")
    };
    assert_eq!(commit(&k1.store, floored).await, (9, true));
}

/// With keys configured, a row written without a key id (a hand edit, an
/// attacker with write access) is never served.
#[tokio::test]
async fn a_value_without_a_key_id_is_refused_when_keys_are_configured() {
    let db = TestDb::create().await;
    let store = open(&db, keyring(&[("k1", 1)])).await;
    commit(&store.store, new_token("genuine")).await;
    let pool = db.pool().await;
    sqlx::query(
        "UPDATE token_broker_tokens
            SET value = 'attacker-chosen-token'::bytea, value_key = NULL, version = version + 1",
    )
    .execute(&pool)
    .await
    .unwrap();
    let row = store.store.load("c").await.unwrap();
    assert_eq!(row.token, None, "a plaintext value is refused");
    // The next commit goes above the forged version.
    assert_eq!(commit(&store.store, new_token("next")).await, (3, true));
}

/// Timestamps a restore or a hand edit can leave (`'infinity'`, years past
/// 9999) make the row's token ignored, never a panic; other rows still read.
#[tokio::test]
async fn out_of_range_timestamps_make_a_row_ignored_not_a_panic() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    commit(&store.store, new_token("fine")).await;
    let pool = db.pool().await;
    sqlx::query("INSERT INTO token_broker_tokens (collection) VALUES ('other')")
        .execute(&pool)
        .await
        .unwrap();
    for bad in [
        "infinity",
        "-infinity",
        "12000-01-01T00:00:00Z",
        "1900-01-01T00:00:00Z",
    ] {
        sqlx::query(
            "UPDATE token_broker_tokens SET expires_at = $1::timestamptz WHERE collection = 'c'",
        )
        .bind(bad)
        .execute(&pool)
        .await
        .unwrap();
        let row = store.store.load("c").await.unwrap();
        assert_eq!(row.token, None, "{bad}");
        assert!(store.store.load("other").await.is_ok());
        // The lease still works on such a row, and a commit repairs it.
        let lease = grant(&store.store, "me", Duration::from_secs(20)).await;
        let c = store
            .store
            .commit_token(lease, new_token("fine"))
            .await
            .unwrap();
        // The same value: a refetch that repairs the timestamps, same version.
        assert_eq!(c.token.version, 1, "{bad}");
        assert!(store.store.load("c").await.unwrap().token.is_some());
    }
    assert!(!store.store.degraded(), "a hostile row is not an outage");
}

/// Fences never go backwards, even when the row is deleted and created again,
/// and a lease is the holder's only: the same fence under another holder id
/// is refused.
#[tokio::test]
async fn fences_never_go_backwards_and_bind_the_holder() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    let first = grant(&store.store, "a", Duration::from_secs(20)).await;
    store.store.release(first.clone()).await.unwrap();
    let second = grant(&store.store, "a", Duration::from_secs(20)).await;
    assert!(second.fence > first.fence);
    let pool = db.pool().await;
    sqlx::query("DELETE FROM token_broker_tokens")
        .execute(&pool)
        .await
        .unwrap();
    let third = grant(&store.store, "b", Duration::from_secs(20)).await;
    assert!(
        third.fence > second.fence,
        "{} after {}",
        third.fence,
        second.fence
    );
    // Another process that believes it is "b" with the same fence is refused.
    let forged = Lease {
        holder: "b-impostor".into(),
        ..third.clone()
    };
    assert!(matches!(
        store.store.commit_token(forged, new_token("x")).await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .store
        .commit_token(third, new_token("x"))
        .await
        .unwrap();
}

/// A holder renews its short lease; a peer cannot take it while renewed, and
/// a renewal after a takeover is refused.
#[tokio::test]
async fn a_renewed_lease_stays_and_a_lost_one_cannot_be_renewed() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    let ttl = Duration::from_millis(1200);
    let lease = grant(&store.store, "holder", ttl).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        store
            .store
            .renew(&lease, ttl, SystemTime::now())
            .await
            .unwrap();
    }
    // 1.6 s after the grant, past the 1.2 s TTL: still held thanks to the renewals.
    assert!(matches!(
        store
            .store
            .acquire("c", "peer", ttl, SystemTime::now())
            .await
            .unwrap(),
        Acquired::Held { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let taken = grant(&store.store, "peer", ttl).await;
    assert!(matches!(
        store.store.renew(&lease, ttl, SystemTime::now()).await,
        Err(StoreError::LeaseLost(_))
    ));
    store
        .store
        .commit_token(taken, new_token("peer's"))
        .await
        .unwrap();
}

/// After a refused commit, a rotated refresh token is kept only while the row
/// still holds the one that was spent for it.
#[tokio::test]
async fn a_rotated_refresh_token_is_kept_only_over_the_one_it_replaced() {
    let db = TestDb::create().await;
    let store = open(&db, keyring(&[("k1", 1)])).await;
    let seeded = NewToken {
        refresh_token: Some(Secret::new("rt-1")),
        ..new_token("a")
    };
    commit(&store.store, seeded).await;
    let s = &store.store;
    // rt-1 was spent for rt-2: the row still holds rt-1, so rt-2 is kept.
    assert!(
        s.save_refresh_token(
            "c",
            "me",
            Some(Secret::new("rt-1")),
            Secret::new("rt-2"),
            None
        )
        .await
        .unwrap()
    );
    assert_eq!(
        s.load("c").await.unwrap().refresh_token,
        Some(Secret::new("rt-2"))
    );
    // A late one spent from rt-1 again must not overwrite rt-2.
    assert!(
        !s.save_refresh_token(
            "c",
            "me",
            Some(Secret::new("rt-1")),
            Secret::new("rt-x"),
            None
        )
        .await
        .unwrap()
    );
    assert_eq!(
        s.load("c").await.unwrap().refresh_token,
        Some(Secret::new("rt-2"))
    );
}

/// The store measures the database's clock against this host's: on one
/// machine the offset is about zero.
#[tokio::test]
async fn the_database_clock_offset_is_measured() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    let offset = store.store.clock_offset().expect("Postgres has a clock");
    let us = offset.load(std::sync::atomic::Ordering::Relaxed);
    assert!(us.abs() < 500_000, "offset {us} us on one host");
    // Taken against the moment the query was sent, so on one host it is the
    // round trip's share, above zero: zero would mean it was never measured.
    assert!(
        us > 0,
        "offset {us} us: the start-up measurement did not run"
    );
}

/// A row put back to an older state (a hand edit, a partial restore) does not
/// make the next commit reuse a version that already named another value,
/// even from a sidecar that never saw the newer one.
#[tokio::test]
async fn a_rolled_back_row_never_makes_a_version_name_two_values() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    commit(&store.store, new_token("v1")).await;
    commit(&store.store, new_token("v2")).await;
    assert_eq!(commit(&store.store, new_token("v3")).await, (3, true));
    let pool = db.pool().await;
    sqlx::query(
        "UPDATE token_broker_tokens SET version = 1, value = 'v1'::bytea WHERE collection = 'c'",
    )
    .execute(&pool)
    .await
    .unwrap();
    // The same value as the rolled-back row keeps its version (v1 named it).
    assert_eq!(commit(&store.store, new_token("v1")).await, (1, false));
    // A new value goes above version 3, not to 2.
    assert_eq!(commit(&store.store, new_token("v4")).await, (4, true));
}

/// A spend of the rotating refresh token is recorded under the lease, names
/// the spender's listener session (alive while it is connected, not after
/// its store is gone), and is resolved by the spender's commit, its recorded
/// failure or its saved refresh token; a peer's commit without a refresh
/// token leaves it.
#[tokio::test]
async fn a_refresh_token_spend_is_recorded_and_resolved() {
    let db = TestDb::create().await;
    let spender = open(&db, Keyring::plaintext()).await;
    let peer = open(&db, Keyring::plaintext()).await;
    let s = &spender.store;
    let ttl = Duration::from_secs(20);
    let spend = async |s: &PgStore| s.load("c").await.unwrap().spend;

    // Recorded under the lease, fenced.
    let lease = grant(s, "me", ttl).await;
    s.mark_spending(&lease).await.unwrap();
    let recorded = spend(s).await.expect("spend recorded");
    assert_eq!(recorded.holder, "me");
    assert!(recorded.session.starts_with("token-broker listener "));
    let stale = Lease {
        fence: lease.fence - 1,
        ..lease.clone()
    };
    assert!(matches!(
        s.mark_spending(&stale).await,
        Err(StoreError::LeaseLost(_))
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !peer.store.spender_alive(&recorded).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spender's listener session never showed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The spender's failure resolves it.
    let backoff = Backoff {
        failures: 1,
        next_attempt_at: SystemTime::now(),
        class: token_broker::source::FailureClass::Timeout,
        detail: "x".into(),
    };
    s.commit_failure(lease, backoff.clone()).await.unwrap();
    assert_eq!(spend(s).await, None);

    // A peer's commit without a refresh token (a reconciled token) leaves it;
    // the spender's commit resolves it.
    let lease = grant(s, "me", ttl).await;
    s.mark_spending(&lease).await.unwrap();
    s.release(lease).await.unwrap();
    let other = grant(&peer.store, "peer", ttl).await;
    peer.store
        .commit_token(other, new_token("reconciled"))
        .await
        .unwrap();
    assert!(spend(s).await.is_some());
    let lease = grant(s, "me", ttl).await;
    s.commit_token(lease, new_token("fetched")).await.unwrap();
    assert_eq!(spend(s).await, None);

    // A peer's commit that stores a refresh token resolves it.
    let lease = grant(s, "me", ttl).await;
    s.mark_spending(&lease).await.unwrap();
    s.release(lease).await.unwrap();
    let other = grant(&peer.store, "peer", ttl).await;
    let with_rt = NewToken {
        refresh_token: Some(Secret::new("rt-peer")),
        ..new_token("peer's")
    };
    peer.store.commit_token(other, with_rt).await.unwrap();
    assert_eq!(spend(s).await, None);

    // The spender's saved refresh token resolves it, stored or not.
    let lease = grant(s, "me", ttl).await;
    s.mark_spending(&lease).await.unwrap();
    s.release(lease).await.unwrap();
    assert!(
        !s.save_refresh_token(
            "c",
            "me",
            Some(Secret::new("rt-old")),
            Secret::new("rt-x"),
            None
        )
        .await
        .unwrap()
    );
    assert_eq!(spend(s).await, None);

    // Once the spender's store is gone, its session is too.
    let lease = grant(s, "me", ttl).await;
    s.mark_spending(&lease).await.unwrap();
    let recorded = spend(s).await.unwrap();
    drop(spender);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while peer.store.spender_alive(&recorded).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the spender's session outlived its store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A refresh token sealed with a key this sidecar lacks reads as absent, and
/// the row says so (a rotating grant must not fall back to an older copy).
#[tokio::test]
async fn an_unreadable_refresh_token_is_flagged_not_just_absent() {
    let db = TestDb::create().await;
    let writer = open(&db, keyring(&[("k1", 1)])).await;
    let with_rt = NewToken {
        refresh_token: Some(Secret::new("rt-1")),
        ..new_token("a")
    };
    commit(&writer.store, with_rt).await;
    let row = writer.store.load("c").await.unwrap();
    assert_eq!(row.refresh_token, Some(Secret::new("rt-1")));
    assert!(!row.refresh_token_unreadable);
    let other = open(&db, keyring(&[("k2", 2)])).await;
    let row = other.store.load("c").await.unwrap();
    assert_eq!(row.refresh_token, None);
    assert!(row.refresh_token_unreadable);
}

/// A start that finds the schema current takes no lock: with the migration
/// lock held elsewhere (a peer migrating, or stuck), it still completes.
#[tokio::test]
async fn a_current_schema_is_checked_without_the_migration_lock() {
    let db = TestDb::create().await;
    let s = settings(&db, Keyring::plaintext());
    PgStore::migrate(&s).await.unwrap();
    let pool = db.pool().await;
    let mut holder = pool.begin().await.unwrap();
    // migrate.rs's LOCK_KEY ("tokenbro").
    sqlx::query("SELECT pg_advisory_xact_lock(8390042714202337903)")
        .execute(&mut *holder)
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_secs(20), PgStore::migrate(&s)).await;
    assert_eq!(
        again.expect("blocked behind the migration lock").unwrap(),
        Vec::<i64>::new()
    );
    holder.rollback().await.unwrap();
}

/// `listener_url` sends the one `LISTEN` connection elsewhere than the pool
/// (straight to Postgres while the pool goes through PgBouncer): here through
/// a proxy that counts connections, which sees exactly one, however much the
/// pool works.
#[tokio::test]
async fn the_listener_connects_to_its_own_url() {
    let db = TestDb::create().await;
    let proxy = crate::support::fault_proxy::FaultProxy::start(db.server_addr()).await;
    let shutdown = CancellationToken::new();
    let store = PgStore::start(
        PgSettings {
            listener_url: Some(Secret::new(db.url_via(proxy.addr()))),
            ..settings(&db, Keyring::plaintext())
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let opened = Opened { store, shutdown };
    let mut events = opened.store.events();
    for i in 0..5 {
        commit(&opened.store, new_token(&format!("v{i}"))).await;
    }
    // The listener is up (a resync follows every connection) and alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.live_connections() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), events.recv()).await;
    assert_eq!(proxy.live_connections(), 1);
}

/// A spend no sidecar could have written (a holder id of 10 KB) is ignored,
/// not waited for, and never reaches a log.
#[tokio::test]
async fn a_hostile_spend_is_ignored() {
    let db = TestDb::create().await;
    let store = open(&db, Keyring::plaintext()).await;
    let lease = grant(&store.store, "me", Duration::from_secs(20)).await;
    store.store.mark_spending(&lease).await.unwrap();
    assert!(store.store.load("c").await.unwrap().spend.is_some());
    let pool = db.pool().await;
    sqlx::query("UPDATE token_broker_tokens SET spend_holder = repeat('x', 10000)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(store.store.load("c").await.unwrap().spend, None);
}
