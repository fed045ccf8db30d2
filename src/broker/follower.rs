//! The follower: one supervised task per broker that turns the store's news
//! ([`StoreEvent`]) into L1 changes. A peer's commit arrives as
//! `Rotated { collection, version, .. }` (Postgres `LISTEN`/`NOTIFY`); the
//! follower re-reads that row, [`Collection::adopt`]s it (which publishes to
//! L1, so every `WatchToken` stream of this sidecar gets the new token from
//! its `watch` channel) and wakes the collection's refresher. A `Resync` (the
//! listener reconnected, a poll tick, or this task restarted after a panic)
//! re-reads every row. A peer's lease announcement (`Lease`) reads nothing:
//! it only holds this sidecar's attempt back (`Collection::note_peer_lease`).
//!
//! Contract: only rows newer than L1 are re-read for a `Rotated` event; the
//! notification lag metric runs from the notice's arrival to the publish.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;
use tracing::debug;

use super::{Collection, Shared};
use crate::store::{Store, StoreEvent};

/// Follows the store's news about other sidecars' writes: reads the rows
/// concerned and adopts them, then wakes their refreshers.
pub(super) async fn follow(
    collections: Vec<Arc<Collection>>,
    mut events: broadcast::Receiver<StoreEvent>,
    shared: Shared,
    store: Arc<dyn Store>,
    restarted: bool,
) {
    // A follower started again after a panic may have missed news: re-read
    // everything first.
    let mut first = restarted.then_some(Ok(StoreEvent::Resync));
    loop {
        let event = match first.take() {
            Some(event) => event,
            None => tokio::select! {
                biased;
                () = shared.shutdown.cancelled() => return,
                event = events.recv() => event,
            },
        };
        // For a rotation: its version and when its commit notice arrived.
        let (stale, rotation): (Vec<&Arc<Collection>>, _) = match event {
            Ok(StoreEvent::Rotated {
                collection,
                version,
                arrived,
                ..
            }) => (
                collections
                    .iter()
                    .filter(|c| c.name == collection && c.current_version() < version)
                    .collect(),
                Some((version, arrived)),
            ),
            Ok(StoreEvent::Lease {
                collection,
                holder,
                until,
            }) => {
                // A peer's lease: no row to read, only a refresh to hold back.
                if *holder != *shared.holder {
                    let now = shared.clock.now();
                    for c in collections.iter().filter(|c| c.name == collection) {
                        c.note_peer_lease(until, now);
                    }
                }
                continue;
            }
            Ok(StoreEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                for c in &collections {
                    c.store_back.store(true, Ordering::Relaxed);
                }
                (collections.iter().collect(), None)
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        for c in stale {
            match store.load(&c.name).await {
                Ok(row) => c.adopt(&shared, row),
                Err(e) => debug!(collection = %c.name, error = %e, "could not re-read a row"),
            }
            c.wake.notify_one();
            // From a peer's commit notice arriving to this sidecar serving
            // its token: after the commit by construction, so neither a slow
            // commit nor a skewed clock counts.
            if let Some((version, arrived)) = rotation
                && c.current_version() >= version
            {
                shared.metrics.notification_lag(arrived.elapsed());
            }
        }
    }
}
