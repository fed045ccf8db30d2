//! Clients of a fleet that record what they see, and the checks on it:
//! [`watch_each`] opens `WatchToken` streams from the start and records every
//! token each gets ([`Seen`]); [`Readers`] call `GetCollectionToken` in a loop,
//! each on its own connection, recording every answer ([`Read`]) and counting
//! failures; [`assert_in_order`] and [`assert_one_value_per_version`] check the
//! records. Every client reads collection `api` and runs until stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use token_broker::grpc::pb::WatchTokenRequest;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::fleet::Sidecar;
use crate::support::{get, ts};

/// One token as a watcher received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: u64,
    pub value: String,
    pub at: Instant,
}

/// A `WatchToken` stream from the start, recording every token it gets.
async fn watcher(sidecar: &Sidecar, collection: &str) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut client = sidecar.client().await;
    let mut stream = client
        .watch_token(WatchTokenRequest {
            collection: collection.to_owned(),
            after_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let out = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(msg)) = stream.message().await {
            let t = msg.token.unwrap();
            out.lock().unwrap().push(Seen {
                version: t.version,
                value: t.value,
                at: Instant::now(),
            });
        }
    });
    seen
}

/// A watched sidecar's record of tokens, tagged with the sidecar's index.
pub type Watched = (usize, Arc<Mutex<Vec<Seen>>>);

/// `per` watchers from the start on each sidecar.
pub async fn watch_each(sidecars: &[Sidecar], per: usize) -> Vec<Watched> {
    let mut watchers = Vec::new();
    for (i, s) in sidecars.iter().enumerate() {
        for _ in 0..per {
            watchers.push((i, watcher(s, "api").await));
        }
    }
    watchers
}

/// Checks one watcher's record: strictly increasing versions with no gap after
/// the first, and returns them.
pub fn assert_in_order(seen: &[Seen], label: &str) {
    for pair in seen.windows(2) {
        assert_eq!(
            pair[1].version,
            pair[0].version + 1,
            "{label}: versions out of order or skipped: {:?}",
            seen.iter().map(|s| s.version).collect::<Vec<_>>()
        );
    }
}

/// Every (version, value) pair across all records names one value per version.
pub fn assert_one_value_per_version<'a>(records: impl IntoIterator<Item = &'a Seen>) {
    let mut by_version: HashMap<u64, &str> = HashMap::new();
    for s in records {
        let v = by_version.entry(s.version).or_insert(&s.value);
        assert!(
            *v == s.value,
            "two different tokens were handed out under version {}",
            s.version
        );
    }
}

/// One client read.
pub struct Read {
    /// The index of the sidecar it was read from.
    pub sidecar: usize,
    pub seen: Seen,
    pub latency: Duration,
    /// Wall clock, when the answer arrived.
    pub received: SystemTime,
    /// The token's `fetched_at`: when the broker saw the upstream issue it.
    pub fetched_at: SystemTime,
}

/// Clients reading `api` in a loop with a random 50-150 ms pause between
/// reads, spread over the sidecars round-robin, each on its own connection.
/// A failed read is counted and printed (to stderr), never retried.
pub struct Readers {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    reads: Arc<Mutex<Vec<Read>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Readers {
    /// Starts `n` clients over `sidecars` (client `k` reads from sidecar
    /// `k % sidecars.len()`); each connects in its own task.
    pub fn start(sidecars: &Arc<Vec<Sidecar>>, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let mut clients = Vec::new();
        for k in 0..n {
            let (sidecars, stop, failures, reads) = (
                sidecars.clone(),
                stop.clone(),
                failures.clone(),
                reads.clone(),
            );
            clients.push(tokio::spawn(async move {
                let i = k % sidecars.len();
                let mut client = sidecars[i].client().await;
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match get(&mut client, "api", Duration::from_secs(5)).await {
                        Ok(t) => mine.push(Read {
                            sidecar: i,
                            latency: started.elapsed(),
                            received: SystemTime::now(),
                            fetched_at: ts(&t.fetched_at),
                            seen: Seen {
                                version: t.version,
                                value: t.value,
                                at: Instant::now(),
                            },
                        }),
                        Err(e) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            eprintln!("client {k} on sidecar {i}: {e:?}");
                        }
                    }
                    let pause = 50 + rand::random::<u64>() % 100;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                reads.lock().unwrap().extend(mine);
            }));
        }
        Self {
            stop,
            failures,
            reads,
            clients,
        }
    }

    /// Stops every client and waits for it (panics if one panicked); returns
    /// every read, each client's in order, and the number of failed reads.
    pub async fn stop(self) -> (Vec<Read>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        let reads = std::mem::take(&mut *self.reads.lock().unwrap());
        (reads, self.failures.load(Ordering::Relaxed))
    }
}
