//! A watcher's view of one collection: yields every token it is owed, in version
//! order, never one past its hard expiry.
//!
//! Contract: a new watcher first gets the current token; after a token with
//! version `v` was yielded, only versions greater than `v` follow, each still
//! servable and held in the history. A watcher that fell behind by more than the
//! history gets the oldest still-held versions (the latest at least). If the
//! broker's versions are lower than the watcher's `after_version` (the in-memory
//! store restarted), the current token is sent so the watcher is not stuck.

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Served, Snapshot};
use crate::clock::Clock;

pub struct TokenWatch {
    rx: watch::Receiver<Snapshot>,
    last: u64,
    clock: Clock,
    shutdown: CancellationToken,
    /// The open-streams gauge: up while this watch lives.
    open: Gauge,
}

impl Drop for TokenWatch {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl TokenWatch {
    pub(super) fn new(
        rx: watch::Receiver<Snapshot>,
        after_version: u64,
        clock: Clock,
        shutdown: CancellationToken,
        open: Gauge,
    ) -> Self {
        open.inc();
        Self {
            rx,
            last: after_version,
            clock,
            shutdown,
            open,
        }
    }

    /// The next tokens owed, oldest first. `None` when the broker shuts down.
    pub async fn next(&mut self) -> Option<Vec<Served>> {
        loop {
            let batch = {
                let snap = self.rx.borrow_and_update();
                owed(&snap, self.last, self.clock.now())
            };
            if let Some(last) = batch.last() {
                self.last = last.token.version;
                return Some(batch);
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                changed = self.rx.changed() => changed.ok()?,
            }
        }
    }
}

/// The servable tokens newer than `last`, oldest first.
fn owed(snap: &Snapshot, last: u64, now: std::time::SystemTime) -> Vec<Served> {
    let Some(current) = snap.servable(now) else {
        return Vec::new();
    };
    // A new watcher (no `after_version`) is owed the current token only; a
    // watcher from a restarted broker's past (its version is ahead of ours) too.
    if last == 0 || current.version < last {
        return vec![snap.served(current, now)];
    }
    snap.history
        .iter()
        .filter(|t| t.version > last && t.servable_at(now))
        .map(|t| snap.served(t, now))
        .collect()
}

impl std::fmt::Debug for TokenWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenWatch")
            .field("last", &self.last)
            .finish()
    }
}
