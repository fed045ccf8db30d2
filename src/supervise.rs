//! Supervised background tasks: every long-lived task of the process (a
//! collection's refresher, the store follower, the Postgres listener, the
//! health loop) runs under [`spawn`], whose handle the broker (or the store)
//! owns.
//!
//! Contract:
//! - A task that panics is logged at error level with its name and
//!   collection, counted (`token_broker_task_restarts_total{task,collection}`),
//!   and started again after a backoff (1 s doubling to 30 s, back to 1 s once
//!   it ran for a minute), so nothing a row, an upstream or a caller sends can
//!   stop a collection for good.
//! - A task that returns normally is done; so is every task once `shutdown`
//!   is cancelled (the supervisor does not restart it then).
//! - Dropping the returned [`Supervised`] handle aborts the task; shutdown
//!   awaits it with [`Supervised::join`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::error;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A task that ran this long before it failed starts again at the first backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Restarts after a panic, by (task, collection); read by the metrics.
static RESTARTS: Mutex<BTreeMap<(&'static str, String), u64>> = Mutex::new(BTreeMap::new());

/// Every restart so far: `((task, collection), count)`.
pub fn restarts() -> Vec<((&'static str, String), u64)> {
    RESTARTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// A supervised task; aborted when dropped.
#[derive(Debug)]
pub struct Supervised {
    handle: Option<JoinHandle<()>>,
}

impl Supervised {
    /// Waits until the task has ended (after its shutdown was cancelled).
    pub async fn join(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(h) = &self.handle {
            h.abort();
        }
    }
}

/// Runs `make()` as a task named `task` (and `collection`, if it serves one),
/// starting it again after every panic until `shutdown` is cancelled.
pub fn spawn<F, Fut>(
    task: &'static str,
    collection: Option<String>,
    shutdown: CancellationToken,
    mut make: F,
) -> Supervised
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = tokio::time::Instant::now();
            let run = tokio::spawn(make());
            // Aborting the supervisor must abort the task it runs.
            let abort = run.abort_handle();
            let _guard = AbortOnDrop(abort);
            let outcome = run.await;
            match outcome {
                Err(e) if e.is_panic() && !shutdown.is_cancelled() => {
                    let collection = collection.clone().unwrap_or_default();
                    *RESTARTS
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry((task, collection.clone()))
                        .or_default() += 1;
                    if started.elapsed() >= HEALTHY_RUN {
                        backoff = FIRST_BACKOFF;
                    }
                    error!(
                        task,
                        collection,
                        restart_in = ?backoff,
                        "background task panicked; restarting it"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                _ => return,
            }
        }
    });
    Supervised {
        handle: Some(handle),
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_with_backoff_and_counted() {
        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let task = {
            let runs = runs.clone();
            let shutdown = shutdown.clone();
            spawn(
                "test-panics",
                Some("c".into()),
                shutdown.clone(),
                move || {
                    let runs = runs.clone();
                    let shutdown = shutdown.clone();
                    async move {
                        if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                            panic!("boom");
                        }
                        shutdown.cancelled().await;
                    }
                },
            )
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then a run that lives"
        );
        let counted = restarts()
            .into_iter()
            .find(|((t, c), _)| *t == "test-panics" && c == "c")
            .map(|(_, n)| n);
        assert_eq!(counted, Some(2));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task.join())
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_aborts_the_task() {
        let alive = Arc::new(AtomicU32::new(0));
        let task = {
            let alive = alive.clone();
            spawn("test-abort", None, CancellationToken::new(), move || {
                let alive = alive.clone();
                async move {
                    loop {
                        alive.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(task);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen = alive.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(alive.load(Ordering::SeqCst), seen);
    }
}
