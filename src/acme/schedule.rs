//! When each wanted certificate is next obtained or renewed, and what its status is: the ACME
//! thread's bookkeeping, kept free of I/O so that it is unit-tested with a fake clock.
//!
//! A host set with no usable certificate is attempted at once; one with a certificate at two
//! thirds of its lifetime ([`Certificate::renew_at`]). A failed attempt is retried after
//! `retry.first`, doubling up to `retry.max`; a rate limit waits at least as long as the CA
//! asked (`Retry-After`) and at least an hour (or `retry.max` if shorter). A success resets the
//! backoff. Asking again for a set already known (a redeploy) keeps its backoff, so redeploys
//! never make keter hammer a CA.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use super::certificate::Certificate;
use super::config::RetryTimings;
use super::error::{AcmeError, ErrorKind};
use super::hosts::HostSet;

/// The shortest wait after a rate limit without `Retry-After` (Let's Encrypt's limits are
/// counted per hour or per week).
const RATE_LIMIT_FLOOR: Duration = Duration::from_secs(3600);

/// Where a host set's certificate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertState {
    /// No certificate yet: attempts are being made (see `last_error` for why one failed).
    Obtaining,
    /// A certificate serves; renewal is not due yet.
    Valid,
    /// A certificate serves and renewal is due: attempts are being made.
    Renewing,
    /// The certificate expired and no new one could be obtained yet.
    Expired,
}

/// The last failed attempt of a host set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LastError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
}

/// A host set's certificate as the status interface shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertStatus {
    /// The certificate file's stem (first host and a hash).
    pub name: String,
    pub hosts: Vec<String>,
    pub state: CertState,
    /// Serial number (hex) of the certificate that serves, if any.
    pub serial: Option<String>,
    /// When that certificate expires ("obtained until").
    #[serde(serialize_with = "rfc3339_opt")]
    pub valid_until: Option<SystemTime>,
    /// When its renewal is due.
    #[serde(serialize_with = "rfc3339_opt")]
    pub renew_at: Option<SystemTime>,
    /// When keter next talks to the CA for this set.
    #[serde(serialize_with = "rfc3339")]
    pub next_attempt: SystemTime,
    /// Failed attempts since the last success.
    pub failures: u32,
    pub last_error: Option<LastError>,
}

/// One wanted host set.
#[derive(Debug, Clone)]
struct Entry {
    hosts: HostSet,
    /// The newest usable certificate (possibly expired by now).
    cert: Option<Certificate>,
    failures: u32,
    next_attempt: SystemTime,
    last_error: Option<LastError>,
}

/// Every wanted host set and when it is due.
#[derive(Debug)]
pub struct Scheduler {
    retry: RetryTimings,
    entries: BTreeMap<HostSet, Entry>,
}

impl Scheduler {
    pub fn new(retry: RetryTimings) -> Scheduler {
        Scheduler {
            retry,
            entries: BTreeMap::new(),
        }
    }

    /// Wants a certificate for `hosts`; `stored` is the usable one on disk, if any. A set
    /// already wanted keeps its schedule (a newer stored certificate is taken over).
    pub fn want(&mut self, hosts: &HostSet, stored: Option<Certificate>, now: SystemTime) {
        if let Some(e) = self.entries.get_mut(hosts) {
            if let Some(s) = stored
                && e.cert.as_ref().is_none_or(|c| c.not_after < s.not_after)
            {
                if e.failures == 0 {
                    e.next_attempt = s.renew_at();
                }
                e.cert = Some(s);
            }
            return;
        }
        let next_attempt = stored.as_ref().map_or(now, Certificate::renew_at);
        self.entries.insert(
            hosts.clone(),
            Entry {
                hosts: hosts.clone(),
                cert: stored,
                failures: 0,
                next_attempt,
                last_error: None,
            },
        );
    }

    /// Stops renewing `hosts` (its file stays, for a later deploy to reuse).
    pub fn release(&mut self, hosts: &HostSet) {
        self.entries.remove(hosts);
    }

    /// Makes `hosts` due now (a forced renewal).
    pub fn force(&mut self, hosts: &HostSet, now: SystemTime) {
        if let Some(e) = self.entries.get_mut(hosts) {
            e.next_attempt = now;
        }
    }

    /// Whether `hosts` is wanted.
    pub fn wants(&self, hosts: &HostSet) -> bool {
        self.entries.contains_key(hosts)
    }

    /// The set due the longest, if any is due at `now`.
    pub fn due(&self, now: SystemTime) -> Option<HostSet> {
        self.entries
            .values()
            .filter(|e| e.next_attempt <= now)
            .min_by_key(|e| e.next_attempt)
            .map(|e| e.hosts.clone())
    }

    /// The earliest next attempt of all sets (`None` when nothing is wanted).
    pub fn next_wakeup(&self) -> Option<SystemTime> {
        self.entries.values().map(|e| e.next_attempt).min()
    }

    /// An attempt for `hosts` stored `cert`.
    pub fn succeeded(&mut self, hosts: &HostSet, cert: Certificate, now: SystemTime) {
        let first = self.retry.first;
        if let Some(e) = self.entries.get_mut(hosts) {
            // A CA issuing a certificate that is due for renewal at once must not make keter
            // ask again in a loop.
            e.next_attempt = cert.renew_at().max(now + first);
            e.cert = Some(cert);
            e.failures = 0;
            e.last_error = None;
        }
    }

    /// An attempt for `hosts` failed with `error`; returns when the next one is due.
    pub fn failed(
        &mut self,
        hosts: &HostSet,
        error: &AcmeError,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let retry = self.retry;
        let e = self.entries.get_mut(hosts)?;
        e.failures = e.failures.saturating_add(1);
        let mut wait = backoff(retry, e.failures);
        if error.kind == ErrorKind::RateLimited {
            wait = wait.max(RATE_LIMIT_FLOOR.min(retry.max));
        }
        let mut next = now + wait;
        if let Some(after) = error.retry_after {
            next = next.max(after);
        }
        e.next_attempt = next;
        e.last_error = Some(LastError {
            kind: error.kind,
            message: error.message.clone(),
            at: now,
        });
        Some(next)
    }

    /// The usable certificate of `hosts`, if it has one.
    pub fn certificate(&self, hosts: &HostSet) -> Option<&Certificate> {
        self.entries.get(hosts)?.cert.as_ref()
    }

    pub fn status(&self, hosts: &HostSet, now: SystemTime) -> Option<CertStatus> {
        self.entries.get(hosts).map(|e| status(e, now))
    }

    /// Every wanted set's status, in the order of their sorted names.
    pub fn statuses(&self, now: SystemTime) -> Vec<CertStatus> {
        self.entries.values().map(|e| status(e, now)).collect()
    }
}

/// `first` after the first failure, doubling, at most `max`.
fn backoff(retry: RetryTimings, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    retry
        .first
        .checked_mul(1u32 << doublings)
        .unwrap_or(retry.max)
        .min(retry.max)
}

fn status(e: &Entry, now: SystemTime) -> CertStatus {
    let state = match &e.cert {
        None => CertState::Obtaining,
        Some(c) if c.not_after <= now => CertState::Expired,
        Some(c) if c.renew_at() <= now => CertState::Renewing,
        Some(_) => CertState::Valid,
    };
    CertStatus {
        name: e.hosts.file_stem(),
        hosts: e.hosts.hosts().iter().map(|h| h.to_string()).collect(),
        state,
        serial: e.cert.as_ref().map(|c| c.serial.clone()),
        valid_until: e.cert.as_ref().map(|c| c.not_after),
        renew_at: e.cert.as_ref().map(Certificate::renew_at),
        next_attempt: e.next_attempt,
        failures: e.failures,
        last_error: e.last_error.clone(),
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::report::rfc3339(*t))
}

fn rfc3339_opt<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acme::certificate::tests::set;
    use std::time::UNIX_EPOCH;

    const RETRY: RetryTimings = RetryTimings {
        first: Duration::from_secs(60),
        max: Duration::from_secs(3600 * 6),
    };

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn cert(from: u64, days: u64, serial: &str) -> Certificate {
        Certificate {
            path: "/r/etc/acme/certs/x.pem".into(),
            not_before: t(from),
            not_after: t(from + days * 86_400),
            serial: serial.into(),
            names: vec!["shop.test".into()],
        }
    }

    fn err(kind: ErrorKind) -> AcmeError {
        AcmeError::new(kind, "it failed")
    }

    #[test]
    fn a_new_set_is_due_at_once_and_renewed_at_two_thirds() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        assert_eq!((s.due(t(0)), s.next_wakeup()), (None, None));
        s.want(&hosts, None, t(0));
        assert_eq!(s.due(t(0)), Some(hosts.clone()));
        assert_eq!(s.status(&hosts, t(0)).unwrap().state, CertState::Obtaining);
        s.succeeded(&hosts, cert(0, 90, "01"), t(5));
        let day = 86_400;
        assert_eq!(s.next_wakeup(), Some(t(60 * day)));
        assert_eq!(s.due(t(60 * day - 1)), None);
        let st = s.status(&hosts, t(10)).unwrap();
        assert_eq!(st.state, CertState::Valid);
        assert_eq!(st.valid_until, Some(t(90 * day)));
        assert_eq!(st.renew_at, Some(t(60 * day)));
        assert_eq!(st.serial.as_deref(), Some("01"));
        assert_eq!(s.due(t(60 * day)), Some(hosts.clone()));
        assert_eq!(
            s.status(&hosts, t(60 * day)).unwrap().state,
            CertState::Renewing
        );
        assert_eq!(
            s.status(&hosts, t(90 * day)).unwrap().state,
            CertState::Expired
        );
    }

    #[test]
    fn a_stored_certificate_is_reused_until_its_renewal() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, Some(cert(0, 90, "01")), t(86_400));
        assert_eq!(s.due(t(86_400)), None);
        assert_eq!(s.next_wakeup(), Some(t(60 * 86_400)));
        assert_eq!(s.certificate(&hosts).unwrap().serial, "01");
        // Stored long ago: renewal is due at once, and the old one still serves meanwhile.
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, Some(cert(0, 90, "01")), t(70 * 86_400));
        assert_eq!(s.due(t(70 * 86_400)), Some(hosts.clone()));
        assert_eq!(
            s.status(&hosts, t(70 * 86_400)).unwrap().state,
            CertState::Renewing
        );
    }

    #[test]
    fn failures_back_off_doubling_to_the_cap_and_success_resets() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, None, t(0));
        let mut now = t(0);
        let mut waits = Vec::new();
        for _ in 0..12 {
            let next = s
                .failed(&hosts, &err(ErrorKind::CaUnreachable), now)
                .unwrap();
            waits.push(next.duration_since(now).unwrap().as_secs());
            assert_eq!(s.due(now), None);
            assert_eq!(s.due(next), Some(hosts.clone()));
            now = next;
        }
        assert_eq!(
            waits,
            [
                60, 120, 240, 480, 960, 1920, 3840, 7680, 15360, 21600, 21600, 21600
            ]
        );
        let st = s.status(&hosts, now).unwrap();
        assert_eq!(st.failures, 12);
        let last = st.last_error.unwrap();
        assert_eq!(
            (last.kind, last.message.as_str()),
            (ErrorKind::CaUnreachable, "it failed")
        );
        s.succeeded(&hosts, cert(1_000_000, 90, "02"), now);
        let st = s.status(&hosts, now).unwrap();
        assert_eq!((st.failures, st.last_error), (0, None));
        let next = s.failed(&hosts, &err(ErrorKind::Other), now).unwrap();
        assert_eq!(next, now + Duration::from_secs(60));
    }

    #[test]
    fn a_rate_limit_waits_an_hour_or_what_the_ca_asks() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, None, t(0));
        let next = s
            .failed(&hosts, &err(ErrorKind::RateLimited), t(0))
            .unwrap();
        assert_eq!(next, t(3600));
        let mut limited = err(ErrorKind::RateLimited);
        limited.retry_after = Some(t(3600 + 7200));
        assert_eq!(s.failed(&hosts, &limited, t(3600)), Some(t(3600 + 7200)));
        assert_eq!(
            s.status(&hosts, t(3600)).unwrap().last_error.unwrap().kind,
            ErrorKind::RateLimited
        );
        // With a cap below an hour (tests, impatient operators) the cap wins.
        let short = RetryTimings {
            first: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        let mut s = Scheduler::new(short);
        s.want(&hosts, None, t(0));
        assert_eq!(
            s.failed(&hosts, &err(ErrorKind::RateLimited), t(0)),
            Some(t(5))
        );
    }

    #[test]
    fn asking_again_keeps_the_backoff_and_release_forgets() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, None, t(0));
        s.failed(&hosts, &err(ErrorKind::ChallengeFailed), t(0));
        s.failed(&hosts, &err(ErrorKind::ChallengeFailed), t(60));
        // A redeploy asks again: the schedule stays.
        s.want(&hosts, None, t(70));
        assert_eq!(s.due(t(70)), None);
        assert_eq!(s.status(&hosts, t(70)).unwrap().failures, 2);
        s.force(&hosts, t(80));
        assert_eq!(s.due(t(80)), Some(hosts.clone()));
        // A newer certificate found on disk is taken over.
        s.want(&hosts, Some(cert(0, 90, "03")), t(90));
        assert_eq!(s.certificate(&hosts).unwrap().serial, "03");
        s.release(&hosts);
        assert!(!s.wants(&hosts));
        assert_eq!((s.due(t(100)), s.next_wakeup()), (None, None));
        assert!(s.failed(&hosts, &err(ErrorKind::Other), t(100)).is_none());
    }

    #[test]
    fn a_certificate_due_at_once_does_not_loop() {
        let hosts = set(&["shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, None, t(0));
        let mut c = cert(0, 0, "04");
        c.not_after = t(30);
        s.succeeded(&hosts, c, t(40));
        assert_eq!(s.next_wakeup(), Some(t(100)));
    }

    #[test]
    fn the_status_serialises_times_as_rfc3339() {
        let hosts = set(&["shop.test", "www.shop.test"]);
        let mut s = Scheduler::new(RETRY);
        s.want(&hosts, None, t(0));
        s.failed(&hosts, &err(ErrorKind::ChallengeFailed), t(0));
        let json = serde_json::to_value(s.status(&hosts, t(1)).unwrap()).unwrap();
        assert_eq!(json["state"], "obtaining");
        assert_eq!(
            json["hosts"],
            serde_json::json!(["shop.test", "www.shop.test"])
        );
        assert_eq!(json["valid_until"], serde_json::Value::Null);
        assert_eq!(json["last_error"]["kind"], "challenge-failed");
        let next = json["next_attempt"].as_str().unwrap();
        assert!(
            next.starts_with("2027-01-15T08:") && next.ends_with('Z'),
            "{next}"
        );
    }
}
