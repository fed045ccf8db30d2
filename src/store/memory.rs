//! The in-memory store: the embedded default when no database is configured.
//! Rows live as long as the process, so versions restart at 1 with it.
//!
//! A `std::sync::Mutex` is the right lock here: it is held only for a few map
//! operations and never across an `.await`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::{
    Acquired, Backoff, Committed, Lease, NewToken, Row, Spend, Store, StoreError, StoreEvent,
};
use crate::source::BoxFuture;
use crate::token::Secret;

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// This process is the only writer, so nothing is ever sent.
    events: tokio::sync::broadcast::Sender<StoreEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            events: tokio::sync::broadcast::channel(1).0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<String, Entry>,
    next_fence: u64,
}

#[derive(Debug, Default)]
struct Entry {
    row: Row,
    lease: Option<Lease>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock cannot leave a row half-written (each
        // closure writes whole values), so a poisoned lock is safe to reuse.
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

fn fenced<'a>(inner: &'a mut Inner, lease: &Lease) -> Result<&'a mut Entry, StoreError> {
    match inner.rows.get_mut(&lease.collection) {
        Some(entry)
            if entry
                .lease
                .as_ref()
                .is_some_and(|l| l.fence == lease.fence && l.holder == lease.holder) =>
        {
            Ok(entry)
        }
        _ => Err(StoreError::LeaseLost(lease.collection.clone())),
    }
}

/// Clears `holder`'s own spend: it stored its result, or gave up on it.
fn resolve(row: &mut Row, holder: &str) {
    if row.spend.as_ref().is_some_and(|s| s.holder == holder) {
        row.spend = None;
    }
}

impl Store for MemoryStore {
    fn load(&self, collection: &str) -> BoxFuture<'_, Result<Row, StoreError>> {
        let row = self.with(|inner| {
            inner
                .rows
                .get(collection)
                .map(|e| e.row.clone())
                .unwrap_or_default()
        });
        Box::pin(async move { Ok(row) })
    }

    fn acquire(
        &self,
        collection: &str,
        holder: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<Acquired, StoreError>> {
        let result = self.with(|inner| {
            inner.next_fence += 1;
            let fence = inner.next_fence;
            let entry = inner.rows.entry(collection.to_owned()).or_default();
            if let Some(lease) = &entry.lease
                && lease.until > now
                && lease.holder != holder
            {
                return Acquired::Held {
                    until: lease.until,
                    row: entry.row.clone(),
                };
            }
            let lease = Lease {
                collection: collection.to_owned(),
                holder: holder.to_owned(),
                fence,
                until: now + ttl,
            };
            entry.lease = Some(lease.clone());
            entry.row.last_attempt_at = Some(now);
            Acquired::Granted {
                lease,
                row: entry.row.clone(),
            }
        });
        Box::pin(async move { Ok(result) })
    }

    fn commit_token(
        &self,
        lease: Lease,
        new: NewToken,
    ) -> BoxFuture<'_, Result<Committed, StoreError>> {
        let result = self.with(|inner| {
            let entry = fenced(inner, &lease)?;
            let old = entry.row.token.as_ref();
            let (version, rotated) =
                new.version_over(old.map_or(0, |t| t.version), old.map(|t| &t.value));
            if let Some(rt) = new.refresh_token.clone() {
                entry.row.refresh_token = Some(rt);
                entry.row.refresh_seed = new.refresh_seed.clone();
                entry.row.spend = None;
            }
            resolve(&mut entry.row, &lease.holder);
            let token = new.into_token(version);
            entry.row.token = Some(token.clone());
            entry.row.refreshed_by = Some(lease.holder.clone());
            entry.row.backoff = None;
            entry.lease = None;
            Ok(Committed { token, rotated })
        });
        Box::pin(async move { result })
    }

    fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
        now: SystemTime,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = self.with(|inner| {
            let entry = fenced(inner, lease)?;
            if let Some(held) = entry.lease.as_mut() {
                held.until = now + ttl;
            }
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn save_refresh_token(
        &self,
        collection: &str,
        holder: &str,
        replaced: Option<Secret>,
        new: Secret,
        seed: Option<String>,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let saved = self.with(|inner| {
            let Some(entry) = inner.rows.get_mut(collection) else {
                return false;
            };
            resolve(&mut entry.row, holder);
            if entry.row.refresh_token != replaced {
                return false;
            }
            entry.row.refresh_token = Some(new);
            entry.row.refresh_seed = seed;
            true
        });
        Box::pin(async move { Ok(saved) })
    }

    fn mark_spending(&self, lease: &Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = self.with(|inner| {
            let entry = fenced(inner, lease)?;
            entry.row.spend = Some(Spend {
                holder: lease.holder.clone(),
                session: String::new(),
                at: SystemTime::now(),
            });
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn commit_failure(
        &self,
        lease: Lease,
        backoff: Backoff,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = self.with(|inner| {
            let entry = fenced(inner, &lease)?;
            entry.row.backoff = Some(backoff);
            resolve(&mut entry.row, &lease.holder);
            entry.lease = None;
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn release(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = self.with(|inner| {
            fenced(inner, &lease)?.lease = None;
            Ok(())
        });
        Box::pin(async move { result })
    }

    fn events(&self) -> tokio::sync::broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FailureClass;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn new_token(value: &str, at: u64) -> NewToken {
        NewToken {
            value: Secret::new(value),
            fetched_at: t(at),
            expires_at: t(at + 100),
            refresh_at: t(at + 75),
            refresh_token: None,
            refresh_seed: None,
            parent_version: None,
            min_version: 0,
        }
    }

    async fn grant(store: &MemoryStore, now: u64) -> Lease {
        match store
            .acquire("c", "me", Duration::from_secs(20), t(now))
            .await
            .unwrap()
        {
            Acquired::Granted { lease, .. } => lease,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn versions_increase_only_on_new_values() {
        let store = MemoryStore::new();
        let l = grant(&store, 0).await;
        let c = store.commit_token(l, new_token("a", 0)).await.unwrap();
        assert_eq!((c.token.version, c.rotated), (1, true));
        let l = grant(&store, 10).await;
        let c = store.commit_token(l, new_token("a", 10)).await.unwrap();
        assert_eq!((c.token.version, c.rotated), (1, false));
        assert_eq!(c.token.fetched_at, t(10));
        let l = grant(&store, 20).await;
        let c = store.commit_token(l, new_token("b", 20)).await.unwrap();
        assert_eq!((c.token.version, c.rotated), (2, true));
    }

    #[tokio::test]
    async fn lease_is_exclusive_until_it_expires_and_fences_the_old_holder() {
        let store = MemoryStore::new();
        let first = grant(&store, 0).await;
        assert!(matches!(
            store.acquire("c", "peer", Duration::from_secs(20), t(19)).await.unwrap(),
            Acquired::Held { until, .. } if until == t(20)
        ));
        // Expired: a peer takes over and the old holder's write is refused.
        let second = grant(&store, 20).await;
        assert!(matches!(
            store.commit_token(first.clone(), new_token("old", 0)).await,
            Err(StoreError::LeaseLost(_))
        ));
        let backoff = Backoff {
            failures: 1,
            next_attempt_at: t(30),
            class: FailureClass::Timeout,
            detail: "x".into(),
        };
        assert!(store.commit_failure(first, backoff.clone()).await.is_err());
        store.commit_failure(second, backoff.clone()).await.unwrap();
        let row = store.load("c").await.unwrap();
        assert_eq!(row.backoff, Some(backoff));
        assert_eq!(row.last_attempt_at, Some(t(20)));
        assert_eq!(row.token, None);
    }
}
