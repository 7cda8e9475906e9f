//! When something that failed is tried again. One [`Backoff`] type (short at first, doubling,
//! capped, reset after a healthy run) serves the webapps' crash restarts, the managed Nginx
//! master, the retries of deploys that failed for a passing reason and of app workers that
//! could not start; [`Restarts`] adds
//! Keter's `restart-count` / `restart-delay-seconds` for background stanzas. A crash loop
//! becomes a visible state instead of a hot loop (README, "Supervision").
//!
//! Pure logic: every method takes the current time or the length of the run, so schedules are
//! unit-tested with a fake clock and no sleeps.

use std::time::{Duration, Instant};

use crate::formats::records::{BackoffRecord, PolicyRecord, RestartsRecord};

/// Exponential backoff: `first`, doubling up to `max`; a run of at least `healthy` brings the
/// delay back to `first` and clears the failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    healthy: Duration,
    /// Delay before the next attempt.
    next: Duration,
    /// Failures in a row without a healthy run.
    failures: u32,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration, healthy: Duration) -> Backoff {
        Backoff {
            first,
            max,
            healthy,
            next: first,
            failures: 0,
        }
    }

    /// A failure after a run of `ran` (zero for an attempt that never started): the delay
    /// before the next attempt.
    pub fn failed(&mut self, ran: Duration) -> Duration {
        if ran >= self.healthy {
            self.reset();
        }
        self.failures += 1;
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Back to the first delay, as after a healthy run.
    pub fn reset(&mut self) {
        self.next = self.first;
        self.failures = 0;
    }

    /// Failures in a row without a healthy run.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The webapps' schedule (README, "Supervision"): 0.1 s doubling to 30 s, reset after a minute.
pub const WEBAPP: Backoff = Backoff::new(
    Duration::from_millis(100),
    Duration::from_secs(30),
    Duration::from_secs(60),
);

/// A managed Nginx master that died: 0.1 s doubling to 10 s, reset after a minute.
pub const NGINX_MASTER: Backoff = Backoff::new(
    Duration::from_millis(100),
    Duration::from_secs(10),
    Duration::from_secs(60),
);

/// A deploy that failed for a passing reason (database or Nginx unreachable, disk full, no
/// free port, not ready in time): tried again after 5 s, doubling up to 5 minutes. A deploy
/// that goes live ends the series.
pub const DEPLOY_RETRY: Backoff = Backoff::new(
    Duration::from_secs(5),
    Duration::from_secs(300),
    Duration::MAX,
);

/// A fresh process started in place of an unhealthy webapp that did not become ready (README
/// "Supervision", health while serving): the unhealthy one stays, and a fresh one is tried
/// again after 10 s, doubling up to 5 minutes, until one is ready or the old one recovers.
pub const HEALTH_REPLACEMENT: Backoff = Backoff::new(
    Duration::from_secs(10),
    Duration::from_secs(300),
    Duration::MAX,
);

/// An app's worker that could not start (no thread, or no descriptor for its log, say while
/// keter is out of descriptors): its bundle is tried again after 1 s, doubling up to a
/// minute, until the worker starts or the bundle is gone.
pub const WORKER_START: Backoff = Backoff::new(
    Duration::from_secs(1),
    Duration::from_secs(60),
    Duration::MAX,
);

/// How a stanza's process is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Webapps: always restarted, with backoff.
    Backoff(Backoff),
    /// Background stanzas as in Keter: after a fixed delay, at most `count` times in a row
    /// (`None`: unlimited).
    Fixed { delay: Duration, count: Option<u32> },
}

impl Policy {
    /// The webapp policy: [`WEBAPP`].
    pub const WEBAPP: Policy = Policy::Backoff(WEBAPP);
}

/// Failures in a row (each run shorter than a healthy one) after which a process counts as
/// crash looping.
pub const CRASH_LOOP_AFTER: u32 = 5;
/// A run at least this long breaks a crash loop even under the fixed policy.
const FIXED_HEALTHY: Duration = Duration::from_secs(60);
/// The least pause before a background stanza's restart, whatever its
/// `restart-delay-seconds`: 0.1 s after its first exit, doubling with each exit in a row
/// (before a run of [`FIXED_HEALTHY`]) up to [`FLOOR_MAX`]. Keter restarts at once with
/// `restart-delay-seconds: 0`; a program that exits at once then cost keter most of a core.
const FLOOR_FIRST: Duration = Duration::from_millis(100);
/// The highest floor: a longer `restart-delay-seconds` is kept as it is.
const FLOOR_MAX: Duration = Duration::from_secs(1);

/// The floor after `failures` exits in a row (at least 1).
fn floor(failures: u32) -> Duration {
    FLOOR_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(FLOOR_MAX)
}

/// What to do about an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the process again at this moment.
    RestartAt(Instant),
    /// Leave it stopped (a background stanza's `restart-count` is used up).
    GiveUp,
}

/// The restart state of one supervised process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restarts {
    policy: Policy,
    /// Failures in a row of the fixed policy (the backoff counts its own).
    fixed_failures: u32,
    /// Restarts that started a process, for the status of the app.
    pub total: u64,
}

impl Restarts {
    pub fn new(policy: Policy) -> Restarts {
        Restarts {
            policy,
            fixed_failures: 0,
            total: 0,
        }
    }

    /// The process exited at `now` after running for `ran`, or a restart could not start it
    /// at all (`ran` zero): when to try again. Spawn failures go through the same schedule
    /// as exits, so a missing executable is neither a hot loop nor retried past
    /// `restart-count`.
    pub fn exited(&mut self, now: Instant, ran: Duration) -> Decision {
        match &mut self.policy {
            Policy::Backoff(b) => Decision::RestartAt(now + b.failed(ran)),
            Policy::Fixed { delay, count } => {
                if ran >= FIXED_HEALTHY {
                    self.fixed_failures = 0;
                }
                self.fixed_failures += 1;
                if count.is_some_and(|c| self.fixed_failures > c) {
                    return Decision::GiveUp;
                }
                Decision::RestartAt(now + (*delay).max(floor(self.fixed_failures)))
            }
        }
    }

    /// A restart started the process again.
    pub fn restarted(&mut self) {
        self.total += 1;
    }

    /// True once the process failed [`CRASH_LOOP_AFTER`] times in a row.
    pub fn crash_looping(&self) -> bool {
        self.failures() >= CRASH_LOOP_AFTER
    }

    /// Exits in a row without a healthy run.
    pub fn failures(&self) -> u32 {
        match &self.policy {
            Policy::Backoff(b) => b.failures(),
            Policy::Fixed { .. } => self.fixed_failures,
        }
    }
}

/// The records of these types (`src/formats/records.rs`).
impl From<Backoff> for BackoffRecord {
    fn from(b: Backoff) -> BackoffRecord {
        BackoffRecord {
            first: b.first,
            max: b.max,
            healthy: b.healthy,
            next: b.next,
            failures: b.failures,
        }
    }
}

impl From<BackoffRecord> for Backoff {
    fn from(b: BackoffRecord) -> Backoff {
        Backoff {
            first: b.first,
            max: b.max,
            healthy: b.healthy,
            next: b.next,
            failures: b.failures,
        }
    }
}

impl From<Policy> for PolicyRecord {
    fn from(p: Policy) -> PolicyRecord {
        match p {
            Policy::Backoff(b) => PolicyRecord::Backoff(b.into()),
            Policy::Fixed { delay, count } => PolicyRecord::Fixed { delay, count },
        }
    }
}

impl From<PolicyRecord> for Policy {
    fn from(p: PolicyRecord) -> Policy {
        match p {
            PolicyRecord::Backoff(b) => Policy::Backoff(b.into()),
            PolicyRecord::Fixed { delay, count } => Policy::Fixed { delay, count },
        }
    }
}

impl From<&Restarts> for RestartsRecord {
    fn from(r: &Restarts) -> RestartsRecord {
        RestartsRecord {
            policy: r.policy.into(),
            fixed_failures: r.fixed_failures,
            total: r.total,
        }
    }
}

impl From<RestartsRecord> for Restarts {
    fn from(r: RestartsRecord) -> Restarts {
        Restarts {
            policy: r.policy.into(),
            fixed_failures: r.fixed_failures,
            total: r.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(10);

    /// Delays chosen for runs of these lengths, each restart succeeding.
    fn delays(r: &mut Restarts, t0: Instant, runs: &[Duration]) -> Vec<u128> {
        let mut now = t0;
        runs.iter()
            .map(|ran| {
                now += *ran;
                match r.exited(now, *ran) {
                    Decision::RestartAt(at) => {
                        let d = at - now;
                        now = at;
                        r.restarted();
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

    #[test]
    fn no_delay_still_has_a_floor_that_doubles_to_a_second() {
        let mut r = Restarts::new(Policy::Fixed {
            delay: Duration::ZERO,
            count: None,
        });
        let d = delays(&mut r, Instant::now(), &[Duration::ZERO; 7]);
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000, 1000]);
        // A healthy run starts the floor again; a delay above it is kept.
        let t0 = Instant::now() + Duration::from_secs(100);
        let d = delays(&mut r, t0, &[Duration::from_secs(61), SHORT]);
        assert_eq!(d, [100, 200]);
        let mut slow = Restarts::new(Policy::Fixed {
            delay: Duration::from_millis(300),
            count: None,
        });
        let d = delays(&mut slow, Instant::now(), &[SHORT; 4]);
        assert_eq!(d, [300, 300, 400, 800]);
    }

    #[test]
    fn failed_spawns_count_as_failures_but_not_as_restarts() {
        let mut r = Restarts::new(Policy::Fixed {
            delay: Duration::from_secs(1),
            count: Some(2),
        });
        let t0 = Instant::now();
        assert!(matches!(r.exited(t0, SHORT), Decision::RestartAt(_)));
        // The restart cannot start the process: the same schedule, no restart counted.
        assert!(matches!(
            r.exited(t0, Duration::ZERO),
            Decision::RestartAt(_)
        ));
        assert_eq!(r.exited(t0, Duration::ZERO), Decision::GiveUp);
        assert_eq!(r.total, 0);
    }

    #[test]
    fn one_backoff_for_the_nginx_master_and_deploy_retries() {
        let mut b = NGINX_MASTER;
        let d: Vec<u128> = (0..9).map(|_| b.failed(SHORT).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        assert_eq!(b.failed(Duration::from_secs(61)).as_millis(), 100);
        let mut retry = DEPLOY_RETRY;
        let d: Vec<u64> = (0..8).map(|_| retry.failed(SHORT).as_secs()).collect();
        assert_eq!(d, [5, 10, 20, 40, 80, 160, 300, 300]);
    }
}
