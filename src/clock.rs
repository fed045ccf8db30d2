//! The one wall-clock seam.
//!
//! Token timestamps are absolute wall-clock instants (they are shared with other
//! sidecars through the store), so the broker needs `SystemTime`. Every wall-clock
//! reading goes through [`Clock`], and every sleep goes through `tokio::time`, so
//! tests can pause and advance time: [`Clock::tokio_anchored`] derives the wall
//! clock from tokio's (pausable) clock.

use std::time::{Duration, SystemTime};

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// `None`: the system clock. `Some`: wall time = anchor + tokio time elapsed.
    anchor: Option<(SystemTime, tokio::time::Instant)>,
}

impl Clock {
    /// The system's real-time clock.
    pub fn system() -> Self {
        Self { anchor: None }
    }

    /// A wall clock that starts at `start` and follows tokio's clock, so that
    /// `tokio::time::pause()`/`advance()` move it too. For tests.
    pub fn tokio_anchored(start: SystemTime) -> Self {
        Self {
            anchor: Some((start, tokio::time::Instant::now())),
        }
    }

    pub fn now(&self) -> SystemTime {
        match self.anchor {
            None => SystemTime::now(),
            Some((wall, mono)) => wall + mono.elapsed(),
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
}
