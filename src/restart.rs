//! When a supervised process that exited is started again: exponential backoff for webapps
//! (short at first, capped, reset after a healthy minute; a crash loop becomes a visible state
//! instead of a hot loop) and Keter's `restart-count` / `restart-delay-seconds` for background
//! stanzas.
//!
//! Pure logic: every method takes the current time, so the schedule is unit-tested with a fake
//! clock and no sleeps.

use std::time::{Duration, Instant};

/// How a stanza's process is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Webapps: always restarted, after `first`, doubling up to `max`; the delay goes back to
    /// `first` once a run lasted `healthy`.
    Backoff {
        first: Duration,
        max: Duration,
        healthy: Duration,
    },
    /// Background stanzas as in Keter: after a fixed delay, at most `count` times in a row
    /// (`None`: unlimited).
    Fixed { delay: Duration, count: Option<u32> },
}

impl Policy {
    /// The webapp schedule of DESIGN.md 6.8: 0.1 s doubling to 30 s, reset after a minute.
    pub const WEBAPP: Policy = Policy::Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(30),
        healthy: Duration::from_secs(60),
    };
}

/// Failures in a row (each run shorter than this) after which a process counts as crash
/// looping.
pub const CRASH_LOOP_AFTER: u32 = 5;
/// A run at least this long breaks a crash loop even under the fixed policy.
const FIXED_HEALTHY: Duration = Duration::from_secs(60);

/// What to do about an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the process again at this moment.
    RestartAt(Instant),
    /// Leave it stopped (a background stanza's `restart-count` is used up).
    GiveUp,
}

/// The restart state of one supervised process.
#[derive(Debug, Clone)]
pub struct Restarts {
    policy: Policy,
    /// Delay before the next restart (backoff policy).
    next_delay: Duration,
    /// Exits in a row without a healthy run.
    failures: u32,
    /// Restarts done in total, for the status of the app.
    pub total: u64,
}

impl Restarts {
    pub fn new(policy: Policy) -> Restarts {
        let next_delay = match policy {
            Policy::Backoff { first, .. } => first,
            Policy::Fixed { delay, .. } => delay,
        };
        Restarts {
            policy,
            next_delay,
            failures: 0,
            total: 0,
        }
    }

    /// The process exited at `now` after running for `ran`.
    pub fn exited(&mut self, now: Instant, ran: Duration) -> Decision {
        match self.policy {
            Policy::Backoff {
                first,
                max,
                healthy,
            } => {
                if ran >= healthy {
                    self.next_delay = first;
                    self.failures = 0;
                }
                self.failures += 1;
                let delay = self.next_delay;
                self.next_delay = (self.next_delay * 2).min(max);
                self.total += 1;
                Decision::RestartAt(now + delay)
            }
            Policy::Fixed { delay, count } => {
                if ran >= FIXED_HEALTHY {
                    self.failures = 0;
                }
                self.failures += 1;
                if count.is_some_and(|c| self.failures > c) {
                    return Decision::GiveUp;
                }
                self.total += 1;
                Decision::RestartAt(now + delay)
            }
        }
    }

    /// True once the process failed [`CRASH_LOOP_AFTER`] times in a row.
    pub fn crash_looping(&self) -> bool {
        self.failures >= CRASH_LOOP_AFTER
    }

    /// Exits in a row without a healthy run.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(10);

    fn delays(r: &mut Restarts, t0: Instant, runs: &[Duration]) -> Vec<u128> {
        let mut now = t0;
        runs.iter()
            .map(|ran| {
                now += *ran;
                match r.exited(now, *ran) {
                    Decision::RestartAt(at) => {
                        let d = at - now;
                        now = at;
                        d.as_millis()
                    }
                    Decision::GiveUp => u128::MAX,
                }
            })
            .collect()
    }

    #[test]
    fn webapp_backoff_doubles_to_the_cap() {
        let mut r = Restarts::new(Policy::WEBAPP);
        let d = delays(&mut r, Instant::now(), &[SHORT; 12]);
        assert_eq!(
            d,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000
            ]
        );
        assert!(r.crash_looping());
        assert_eq!(r.total, 12);
    }

    #[test]
    fn a_healthy_minute_resets_the_backoff_and_the_crash_loop() {
        let mut r = Restarts::new(Policy::WEBAPP);
        let t0 = Instant::now();
        delays(&mut r, t0, &[SHORT; 6]);
        assert!(r.crash_looping());
        let d = delays(
            &mut r,
            t0 + Duration::from_secs(100),
            &[Duration::from_secs(61), SHORT],
        );
        assert_eq!(d, [100, 200]);
        assert!(!r.crash_looping());
        assert_eq!(r.failures(), 2);
    }

    #[test]
    fn crash_loop_starts_at_the_fifth_failure() {
        let mut r = Restarts::new(Policy::WEBAPP);
        let t0 = Instant::now();
        delays(&mut r, t0, &[SHORT; 4]);
        assert!(!r.crash_looping());
        delays(&mut r, t0 + Duration::from_secs(10), &[SHORT]);
        assert!(r.crash_looping());
    }

    #[test]
    fn fixed_policy_honours_restart_count() {
        let mut r = Restarts::new(Policy::Fixed {
            delay: Duration::from_secs(5),
            count: Some(2),
        });
        let d = delays(&mut r, Instant::now(), &[SHORT; 3]);
        assert_eq!(d, [5000, 5000, u128::MAX]);
        assert_eq!(r.total, 2);
    }

    #[test]
    fn fixed_policy_unlimited_and_reset_by_a_long_run() {
        let mut r = Restarts::new(Policy::Fixed {
            delay: Duration::from_secs(1),
            count: None,
        });
        let d = delays(&mut r, Instant::now(), &[SHORT; 50]);
        assert!(d.iter().all(|d| *d == 1000));
        let mut counted = Restarts::new(Policy::Fixed {
            delay: Duration::ZERO,
            count: Some(1),
        });
        let t0 = Instant::now();
        assert!(matches!(counted.exited(t0, SHORT), Decision::RestartAt(_)));
        assert!(matches!(
            counted.exited(t0, Duration::from_secs(120)),
            Decision::RestartAt(_)
        ));
        assert_eq!(counted.exited(t0, SHORT), Decision::GiveUp);
    }
}
