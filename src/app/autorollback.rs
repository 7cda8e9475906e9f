//! Automatic rollback (README "Releases and rollback"): for `rollback-window` after the
//! switch to a new release, the worker watches it ([`Watch`]), and a release that crash-loops
//! (its processes exit [`CRASHES`] times, or a restart policy gives up), that stays unhealthy
//! while serving (an unhealthy webapp's fresh replacement fails too: `health.rs`), or whose
//! share of failed requests is clearly worse than its predecessor's over as long before the
//! switch ([`errors_worse`], from the request metrics: `src/requests/`) is rolled back to the
//! release before it by the same path as `keter rollback` (`machine.rs`,
//! `Machine::roll_back`): its kept bundle put into `incoming/` and deployed from there.
//!
//! Not watched: an app with no earlier release to go back to, and a release that is itself a
//! rollback (by keter or an operator), so a rollback never loops. Nothing is rolled back
//! while the worker is frozen for an upgrade or a deploy is under way; the cause waits for
//! that to end. The watch lives in this keter only: a keter started again or upgraded in
//! place does not watch the release it takes over.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use super::Effects;
use super::machine::{Life, Machine};
use super::releases::Ended;
use crate::config::AutoRollback;
use crate::report::{AutoRollbackReport, rfc3339};
use crate::requests::ErrorsBeside;

/// Exits of a watched release's processes (all counted together) that make it a crash loop.
/// Three: one crash may be a bad request or a passing fault that a restart cures, the
/// second in the same few minutes is a pattern, and the third rolls back before a webapp's
/// backoff (0.1 s doubling) grows long.
pub const CRASHES: u32 = 3;

/// How often the request metrics are looked at while a release is watched: the store's
/// resolution (`requests::HOUR`).
pub const LOOK: Duration = Duration::from_secs(10);

/// The release being watched after its switch.
pub(super) struct Watch {
    /// Its number in the release list.
    pub release: u64,
    /// The version serving it, and its deploy number (the request metrics' `release`).
    pub version: u64,
    pub deploy: u64,
    /// `incoming/NAME.keter`, where the rollback puts the previous bundle.
    pub path: PathBuf,
    pub since: Instant,
    pub since_wall: SystemTime,
    pub until: Instant,
    pub until_wall: SystemTime,
    pub crashes: u32,
    /// The next look at its failed requests.
    pub next_look: Instant,
    /// Why it is to be rolled back, once it is.
    pub cause: Option<String>,
}

/// Whether a release's failed requests (5xx and upstream failures) since its switch are
/// clearly worse than the app's over as long before it: at least `min_requests` requests, a
/// share of at least `error_ratio` and at least `error_factor` times (and more than) the one
/// before. The reason, when they are.
pub(super) fn errors_worse(e: &ErrorsBeside, s: &AutoRollback) -> Option<String> {
    if e.release.requests < s.min_requests.max(1) {
        return None;
    }
    let (now, before) = (e.release.ratio(), e.before.ratio());
    let worse = now >= s.error_ratio && now >= s.error_factor * before && now > before;
    worse.then(|| {
        format!(
            "{} of its {} requests failed (5xx or upstream failures: {:.1} %), against {:.1} % of {} before its switch",
            e.release.errors,
            e.release.requests,
            now * 100.0,
            before * 100.0,
            e.before.requests
        )
    })
}

impl Machine {
    /// A new release was switched to: watched for its window when it may be rolled back;
    /// any watch of the one before ends.
    pub(super) fn watch_release(
        &mut self,
        version: u64,
        deploy: u64,
        path: PathBuf,
        window: Duration,
        fx: &mut dyn Effects,
    ) {
        self.watch = None;
        let Some(current) = self.releases.current() else {
            return;
        };
        let number = current.number;
        if window.is_zero() {
            return;
        }
        if current.rollback_of.is_some() {
            log::info!(
                "{}: release {number} is a rollback: it is not rolled back automatically",
                self.name
            );
            return;
        }
        let Some(previous) = self.releases.previous() else {
            return;
        };
        log::info!(
            "{}: release {number} is watched for {} s: it is rolled back to release {} if it crash-loops, stays unhealthy or fails its users",
            self.name,
            window.as_secs_f64(),
            previous.number
        );
        let now = fx.now();
        self.watch = Some(Watch {
            release: number,
            version,
            deploy,
            path,
            since: now,
            since_wall: fx.wall_clock(),
            until: now + window,
            until_wall: fx.wall_clock() + window,
            crashes: 0,
            next_look: now + LOOK,
            cause: None,
        });
    }

    /// A process of version `version` exited (`gave_up`: its restart policy is used up),
    /// `how` as the log says it: counted when that version is the watched release's.
    pub(super) fn watch_exit(&mut self, version: u64, gave_up: bool, how: &str, now: Instant) {
        let Some(w) = &mut self.watch else {
            return;
        };
        if w.version != version || w.cause.is_some() || now >= w.until {
            return;
        }
        w.crashes += 1;
        let after = now.saturating_duration_since(w.since).as_secs();
        if gave_up {
            w.cause = Some(format!(
                "{how} {after} s after its switch, and its restart-count is used up"
            ));
        } else if w.crashes >= CRASHES {
            w.cause = Some(format!(
                "crash-looping: its processes exited {} times within {after} s of its switch (the last: {how})",
                w.crashes
            ));
        }
    }

    /// An unhealthy webapp of version `version` could not be replaced (its fresh process
    /// was not ready, or exited, or could not start): the release is rolled back when it is
    /// the watched one.
    pub(super) fn watch_unhealthy(&mut self, version: u64, why: &str, now: Instant) {
        let Some(w) = &mut self.watch else {
            return;
        };
        if w.version != version || w.cause.is_some() || now >= w.until {
            return;
        }
        w.cause = Some(format!(
            "unhealthy {} s after its switch, and {why}",
            now.saturating_duration_since(w.since).as_secs()
        ));
    }

    /// When the watch wants the worker next: the next look at the requests, or the end of
    /// the window.
    pub(super) fn watch_deadline(&self) -> Option<Instant> {
        let w = self.watch.as_ref().filter(|w| w.cause.is_none())?;
        Some(w.next_look.min(w.until))
    }

    /// Timed work of the watch: the window's end, a look at the requests, and the rollback
    /// once there is a cause and nothing is in the way. True when the report changed.
    pub(super) fn watch_tick(&mut self, fx: &mut dyn Effects) -> bool {
        let now = fx.now();
        let name = self.name.clone();
        let Some(w) = &mut self.watch else {
            return false;
        };
        match &self.life {
            Life::Idle(_) | Life::Leaving { .. } | Life::Ended => {
                self.watch = None;
                return true;
            }
            _ => {}
        }
        if w.cause.is_none() && now >= w.until {
            log::info!(
                "{name}: release {} passed its rollback window: it is no longer rolled back automatically",
                w.release
            );
            self.watch = None;
            return true;
        }
        if w.cause.is_none() && now >= w.next_look {
            w.next_look = now + LOOK;
            let settings = fx.rollback_defaults();
            if let Some(errors) = fx.errors_since_switch(w.deploy, w.since_wall)
                && let Some(why) = errors_worse(&errors, &settings)
            {
                w.cause = Some(why);
            }
        }
        if w.cause.is_none() || self.frozen {
            return false;
        }
        match &self.life {
            Life::Serving(v) if v.id == w.version => {}
            // The watched version no longer serves (a deploy switched, which watches anew).
            Life::Serving(_) => {
                self.watch = None;
                return true;
            }
            // A deploy under way: the cause waits for it.
            _ => return false,
        }
        let Some(w) = self.watch.take() else {
            return false;
        };
        self.roll_back_by_itself(w, fx);
        true
    }

    /// Rolls the watched release back to the one before it, as `keter rollback` does.
    fn roll_back_by_itself(&mut self, w: Watch, fx: &mut dyn Effects) {
        let cause = w.cause.unwrap_or_default();
        let Some(target) = self
            .releases
            .current()
            .filter(|c| c.number == w.release)
            .and_then(|_| self.releases.previous())
            .cloned()
        else {
            return;
        };
        let reason = format!(
            "release {} rolled back to {} automatically: {cause}",
            w.release, target.number
        );
        log::error!("{}: {reason}", self.name);
        fx.note(&format!("keter: {reason}"));
        self.last_error = Some(crate::applog::printable(&reason).into_owned());
        self.auto_rollback = Some(AutoRollbackReport {
            release: w.release,
            state: "rolled-back",
            until: None,
            to: Some(target.number),
            reason: Some(cause),
            at: Some(rfc3339(fx.wall_clock())),
        });
        if let Err((why, _)) = self.roll_back(
            w.path,
            &target,
            Ended::FailedAfterSwitch,
            reason,
            Default::default(),
            fx,
        ) {
            log::error!(
                "{}: the automatic rollback did not start: {why}; release {} keeps serving",
                self.name,
                w.release
            );
            if let Some(r) = &mut self.auto_rollback {
                r.state = "failed";
            }
        }
    }

    /// What the report shows of automatic rollback: the watched release and the end of its
    /// window, or the last rollback keter made by itself.
    pub(super) fn auto_rollback_report(&self) -> Option<AutoRollbackReport> {
        match &self.watch {
            Some(w) => Some(AutoRollbackReport {
                release: w.release,
                state: if w.cause.is_some() { "due" } else { "watching" },
                until: Some(rfc3339(w.until_wall)),
                to: None,
                reason: w.cause.clone(),
                at: None,
            }),
            None => self.auto_rollback.clone(),
        }
    }
}
