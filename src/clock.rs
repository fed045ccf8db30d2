//! The one wall-clock seam.
//!
//! Token timestamps are absolute wall-clock instants (they are shared with other
//! sidecars through the store), so the broker needs `SystemTime`. Every wall-clock
//! reading goes through [`Clock`], and every sleep goes through `tokio::time`, so
//! tests can pause and advance time: [`Clock::tokio_anchored`] derives the wall
//! clock from tokio's (pausable) clock.
//!
//! Contract: with a shared store, a clock [`follows`](Clock::following) the
//! database's clock: the store measures the offset between this host's clock
//! and the database's (on each heartbeat, erring by at most one round trip towards "later")
//! and every reading adds it. So every instant a sidecar writes into the shared
//! row (a token's timestamps, a backoff's end, an attempt's start) and every
//! instant it compares with one read from the row is on the database's clock,
//! whatever this pod's clock says: one pod whose clock runs ahead or behind
//! cannot stall its peers' retries nor make them serve past an expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

/// Offsets larger than this (about 292 years) are not offsets but garbage.
const MAX_OFFSET_US: i64 = i64::MAX / 1_000;

#[derive(Clone, Debug)]
pub struct Clock {
    /// `None`: the system clock. `Some`: wall time = anchor + tokio time elapsed.
    anchor: Option<(SystemTime, tokio::time::Instant)>,
    /// Microseconds to add to every reading (the reference clock minus ours);
    /// `None`: no reference.
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system's real-time clock.
    pub fn system() -> Self {
        Self {
            anchor: None,
            offset: None,
        }
    }

    /// A wall clock that starts at `start` and follows tokio's clock, so that
    /// `tokio::time::pause()`/`advance()` move it too. For tests.
    pub fn tokio_anchored(start: SystemTime) -> Self {
        Self {
            anchor: Some((start, tokio::time::Instant::now())),
            offset: None,
        }
    }

    /// This clock corrected by the offset in `offset` (microseconds, updated
    /// by whoever measures it, e.g. the Postgres store's heartbeat).
    pub fn following(self, offset: Arc<AtomicI64>) -> Self {
        Self {
            offset: Some(offset),
            ..self
        }
    }

    /// The uncorrected reading: the local clock the offset is measured against.
    pub fn local_now(&self) -> SystemTime {
        match self.anchor {
            None => SystemTime::now(),
            Some((wall, mono)) => wall + mono.elapsed(),
        }
    }

    pub fn now(&self) -> SystemTime {
        let local = self.local_now();
        match self.offset.as_ref().map(|o| o.load(Ordering::Relaxed)) {
            None | Some(0) => local,
            Some(us) => shift(local, us),
        }
    }

    /// How long from now until `t` (zero when `t` is not in the future).
    pub fn until(&self, t: SystemTime) -> Duration {
        t.duration_since(self.now()).unwrap_or(Duration::ZERO)
    }

    /// The wall-clock instant that corresponds to a tokio deadline.
    pub fn wall_at(&self, deadline: tokio::time::Instant) -> SystemTime {
        let now = tokio::time::Instant::now();
        self.now() + deadline.saturating_duration_since(now)
    }
}

/// The offset (microseconds) that takes `local` to `reference`, clamped to a
/// sane range.
pub fn offset_us(local: SystemTime, reference: SystemTime) -> i64 {
    let us = match reference.duration_since(local) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(MAX_OFFSET_US),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(-MAX_OFFSET_US, |v| -v),
    };
    us.clamp(-MAX_OFFSET_US, MAX_OFFSET_US)
}

/// `t` moved by `us` microseconds, saturating instead of panicking.
fn shift(t: SystemTime, us: i64) -> SystemTime {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        t.checked_add(d).unwrap_or(t)
    } else {
        t.checked_sub(d).unwrap_or(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn anchored_clock_follows_paused_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::tokio_anchored(start);
        assert_eq!(clock.now(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        assert_eq!(
            clock.until(start + Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(clock.until(start), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_following_clock_adds_the_measured_offset() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let offset = Arc::new(AtomicI64::new(0));
        let clock = Clock::tokio_anchored(start).following(offset.clone());
        assert_eq!(clock.now(), start);
        // This host runs 3 s ahead of the reference.
        offset.store(
            offset_us(start, start - Duration::from_secs(3)),
            Ordering::Relaxed,
        );
        assert_eq!(clock.now(), start - Duration::from_secs(3));
        assert_eq!(clock.local_now(), start);
        offset.store(
            offset_us(start, start + Duration::from_millis(1500)),
            Ordering::Relaxed,
        );
        assert_eq!(clock.now(), start + Duration::from_millis(1500));
        // Garbage offsets saturate instead of panicking.
        offset.store(i64::MIN, Ordering::Relaxed);
        let _ = clock.now();
        offset.store(i64::MAX, Ordering::Relaxed);
        let _ = clock.now();
    }
}
