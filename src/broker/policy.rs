//! The refresh policy: when a fetched token is refreshed (soft), when it stops
//! being served (hard), and how long to back off after a failure.
//!
//! Contract: pure functions of their inputs and a random source; every instant is
//! absolute (derived from `fetched_at` and the upstream's expiry), so any sidecar
//! computing from the same row agrees and no clock is ever restarted.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// Per-collection refresh policy (defaults from design.md section 5).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Soft refresh at this fraction of the lifetime...
    pub refresh_fraction: f64,
    /// ...plus or minus this fraction of the lifetime, uniformly.
    pub refresh_jitter: f64,
    /// Hard expiry this long before the upstream's own expiry...
    pub expiry_skew: Duration,
    /// ...or this fraction of the lifetime, when that is shorter.
    pub expiry_skew_fraction: f64,
    /// Opaque tokens (no expiry of their own): refresh after this long.
    pub max_age: Duration,
    /// Opaque tokens: keep serving the last good value this long past `max_age`
    /// while refreshing fails.
    pub max_stale: Duration,
    /// Minimum time between two refresh attempts of one collection, except when
    /// no servable token exists.
    pub min_refresh_interval: Duration,
    /// First backoff cap after a failure; doubles per consecutive failure...
    pub backoff_initial: Duration,
    /// ...up to this cap. The delay is uniform in [0, cap] (full jitter).
    pub backoff_max: Duration,
    /// Upper bound on one upstream fetch.
    pub fetch_timeout: Duration,
    /// Life of the refresh lease in the shared store, renewed by its holder
    /// every third of it while its fetch runs: a holder that dies is replaced
    /// within this long. Independent of `fetch_timeout`.
    pub lease_ttl: Duration,
    /// Tokens are treated as expiring at most this long after their fetch,
    /// whatever the upstream says (`expires_in: 9999999999` is not a reason to
    /// never refresh).
    pub max_lifetime: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            refresh_fraction: 0.75,
            refresh_jitter: 0.10,
            expiry_skew: Duration::from_secs(30),
            expiry_skew_fraction: 0.10,
            max_age: Duration::from_secs(24 * 3600),
            max_stale: Duration::from_secs(7 * 24 * 3600),
            min_refresh_interval: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            fetch_timeout: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(3),
            max_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// The soft and hard instants of a freshly fetched token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_at: SystemTime,
    pub expires_at: SystemTime,
}

impl Policy {
    /// Computes the schedule of a token fetched at `fetched_at` whose upstream
    /// expiry is `upstream_expiry` (`None`: opaque), capped at `max_lifetime`.
    /// Returns `None` when the token is already past its hard expiry, which
    /// makes it unusable.
    ///
    /// The soft refresh leaves room before the hard expiry for a takeover
    /// (one `lease_ttl`, should the holder die mid-call) plus a fetch of about
    /// that long: it comes no later than `2 * lease_ttl` before the hard
    /// expiry, but never before half the servable life, so short tokens are
    /// not refreshed at once.
    pub fn schedule(
        &self,
        fetched_at: SystemTime,
        upstream_expiry: Option<SystemTime>,
        rng: &mut impl Rng,
    ) -> Option<Schedule> {
        let jitter = rng.random_range(-1.0..=1.0) * self.refresh_jitter;
        let schedule = match upstream_expiry {
            Some(upstream) => {
                let lifetime = upstream
                    .duration_since(fetched_at)
                    .ok()?
                    .min(self.max_lifetime);
                let upstream = fetched_at + lifetime;
                let skew = self
                    .expiry_skew
                    .min(lifetime.mul_f64(self.expiry_skew_fraction));
                let expires_at = upstream - skew;
                let soft = lifetime.mul_f64((self.refresh_fraction + jitter).clamp(0.0, 1.0));
                Schedule {
                    refresh_at: (fetched_at + soft).min(expires_at),
                    expires_at,
                }
            }
            None => {
                let expires_at = fetched_at + self.max_age + self.max_stale;
                let soft = self.max_age.mul_f64((1.0 + jitter).max(0.0));
                Schedule {
                    refresh_at: (fetched_at + soft).min(expires_at),
                    expires_at,
                }
            }
        };
        let servable = schedule.expires_at.duration_since(fetched_at).ok()?;
        let room = self.lease_ttl.saturating_mul(2);
        let latest = (fetched_at + servable.saturating_sub(room)).max(fetched_at + servable / 2);
        let schedule = Schedule {
            refresh_at: schedule.refresh_at.min(latest),
            ..schedule
        };
        (schedule.expires_at > fetched_at).then_some(schedule)
    }

    /// The delay before the next attempt after `failures` consecutive failures
    /// (`failures >= 1`): uniform in [0, min(max, initial * 2^(failures-1))].
    pub fn backoff(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let cap = self
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        cap.mul_f64(rng.random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn long_token_refreshes_within_jitter_and_expires_30s_early() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            let s = p.schedule(t(0), Some(t(3600)), &mut rng).unwrap();
            assert_eq!(s.expires_at, t(3570));
            assert!(s.refresh_at >= t(2340) && s.refresh_at <= t(3060), "{s:?}");
        }
    }

    #[test]
    fn short_token_uses_ten_percent_skew_and_stays_servable() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let s = p.schedule(t(0), Some(t(3)), &mut rng).unwrap();
        assert_eq!(s.expires_at, t(0) + Duration::from_millis(2700));
        assert!(s.refresh_at < s.expires_at);
        // Too short for the takeover room: refreshed at half its servable life.
        assert_eq!(s.refresh_at, t(0) + Duration::from_millis(1350));
    }

    #[test]
    fn soft_refresh_leaves_room_for_a_takeover_and_a_fetch() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..1000 {
            // 20 s tokens: servable 18 s; room 6 s -> refresh by 12 s.
            let s = p.schedule(t(0), Some(t(20)), &mut rng).unwrap();
            assert_eq!(s.expires_at, t(18));
            assert!(s.refresh_at <= t(12) && s.refresh_at >= t(9), "{s:?}");
        }
    }

    #[test]
    fn lifetimes_are_capped() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        // expires_in: 9999999999 (316 years) lives at most max_lifetime.
        let s = p.schedule(t(0), Some(t(9_999_999_999)), &mut rng).unwrap();
        assert_eq!(s.expires_at, t(24 * 3600 - 30));
        assert!(s.refresh_at <= t(24 * 3600 * 85 / 100));
    }

    #[test]
    fn expired_or_backdated_token_has_no_schedule() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(p.schedule(t(100), Some(t(100)), &mut rng), None);
        assert_eq!(p.schedule(t(100), Some(t(50)), &mut rng), None);
    }

    #[test]
    fn opaque_token_uses_max_age_and_max_stale() {
        let p = Policy {
            max_age: Duration::from_secs(100),
            max_stale: Duration::from_secs(1000),
            ..Policy::default()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let s = p.schedule(t(0), None, &mut rng).unwrap();
        assert_eq!(s.expires_at, t(1100));
        assert!(s.refresh_at >= t(90) && s.refresh_at <= t(110));
    }

    #[test]
    fn backoff_doubles_to_cap_with_full_jitter() {
        let p = Policy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut max_seen = [Duration::ZERO; 10];
        for _ in 0..2000 {
            for (i, seen) in max_seen.iter_mut().enumerate() {
                let d = p.backoff(i as u32 + 1, &mut rng);
                let cap = Duration::from_secs(1 << i).min(Duration::from_secs(60));
                assert!(d <= cap);
                *seen = (*seen).max(d);
            }
        }
        // Full jitter reaches close to each cap.
        assert!(max_seen[0] > Duration::from_millis(950));
        assert!(max_seen[9] > Duration::from_secs(55));
        assert!(p.backoff(1000, &mut rng) <= Duration::from_secs(60));
    }
}
