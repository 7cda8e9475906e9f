//! Health while serving (README "Supervision"): every webapp of the serving version is
//! checked every `health-check-interval` with its readiness check's path and rules (`GET
//! health-check-path` with the first host as `Host`; 5xx, a refused connection or no answer
//! within `health-check-timeout` is a failure). `health-check-failures` failures in a row make
//! it unhealthy, and it is replaced without downtime: a fresh process of the same version on
//! a new port, its readiness, the switch (the site rendered again, as for a moved port), then,
//! once Nginx has taken the switch, the hung process stopped by a stage (SIGTERM, SIGKILL at
//! `stop-timeout`): until then Nginx routes to it, and it serves on while the site is tried
//! again (`REROUTE_RETRY`). A fresh process that does not become ready is stopped and the
//! hung one stays; the replacement is tried again with backoff
//! (`restart::HEALTH_REPLACEMENT`).
//!
//! Each check is a thread of its own ([`Effects::health_check`]); its result comes back as
//! [`Event::Checked`]. No check counts unless the app is settled: serving, no deploy under
//! way, no old version draining, not frozen for an upgrade. The first check comes one interval
//! after the app settled (after a deploy, a takeover, a thaw). A check whose thread started
//! later than its timeout after it was due, or whose timeout came more than its timeout late,
//! tells about keter's own load, not about the app: it does not count.
//!
//! [`Event::Checked`]: super::machine::Event::Checked

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::Effects;
use super::deploy::Check;
use super::machine::{Life, Machine};
use super::version::{ProcState, Role, Version};
use crate::config::HealthChecks;
use crate::process::Running;
use crate::restart::{self, Backoff};

/// One check to make, for [`Effects::health_check`].
#[derive(Debug, Clone)]
pub(super) struct HealthCheck {
    pub version: u64,
    pub proc: usize,
    /// Numbers the checks of one process: a result that is not the one awaited is ignored.
    pub seq: u64,
    pub port: u16,
    pub host: String,
    pub path: String,
    pub timeout: Duration,
}

/// What one check saw.
#[derive(Debug)]
pub(super) struct Outcome {
    /// When its request began and ended.
    pub started: Instant,
    pub finished: Instant,
    /// `Err(why)`: 5xx, refused, no answer in time.
    pub result: Result<(), CheckFailure>,
    /// False when keter could not run it at all (no thread to be had): it does not count.
    pub ran: bool,
}

/// Why a health check failed: what the status interface shows as the last failure and the
/// log as the reason of a replacement.
#[derive(Debug)]
pub(super) enum CheckFailure {
    /// `GET path` answered a 5xx `status`.
    Status { path: String, status: u16 },
    /// Nothing listens on the port.
    Refused,
    /// No answer within `timeout` (`health-check-timeout`).
    TimedOut { timeout: Duration },
    /// Any other failure of `GET path`: a closed connection, an answer that is not HTTP.
    Failed { path: String, source: io::Error },
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Status { path, status } => write!(f, "GET {path} answered {status}"),
            CheckFailure::Refused => f.write_str("connection refused"),
            CheckFailure::TimedOut { timeout } => {
                write!(f, "timed out after {}", seconds(*timeout))
            }
            CheckFailure::Failed { path, source } => write!(f, "GET {path} failed: {source}"),
        }
    }
}

impl std::error::Error for CheckFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckFailure::Failed { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Outcome {
    /// A check keter could not make.
    pub fn not_run() -> Outcome {
        let now = Instant::now();
        Outcome {
            started: now,
            finished: now,
            result: Ok(()),
            ran: false,
        }
    }
}

/// A fresh process started in place of an unhealthy one, waiting for its readiness.
#[derive(Debug, Clone, Copy)]
pub(super) struct Replacement {
    /// Its readiness check's number ([`Effects::readiness`], [`Effects::cancel`]).
    pub id: u64,
    pub port: u16,
    pub running: Running,
}

/// A hung process that a fresh one replaced, serving on until Nginx routes to the fresh one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Superseded {
    pub pid: i32,
    pub port: u16,
}

/// The health of one webapp process.
#[derive(Debug, Clone)]
pub(super) struct Health {
    /// When the next check is due; `None` while the app is not settled (then nothing is
    /// checked) or a check is in flight.
    pub next_at: Option<Instant>,
    /// The check in flight: its number and when it was due.
    pub in_flight: Option<(u64, Instant)>,
    pub seq: u64,
    /// Failed checks in a row.
    pub failures: u32,
    /// Reached `health-check-failures`: replaced as soon as `retry_at` has come.
    pub unhealthy: bool,
    pub retry_at: Option<Instant>,
    pub backoff: Backoff,
    pub replacement: Option<Replacement>,
    /// The processes this one replaced whose port Nginx may still route to (the site with
    /// this one's port was not taken yet): stopped once it is ([`Machine::stop_superseded`]).
    pub superseded: Vec<Superseded>,
    /// The last counted check: how long it took and, if it failed, why.
    pub latency: Option<Duration>,
    pub last_failure: Option<String>,
    /// Counted checks (a state other than `unchecked` needs one).
    pub checks: u64,
    /// Replacements that took over from this process's predecessors.
    pub replacements: u64,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            next_at: None,
            in_flight: None,
            seq: 0,
            failures: 0,
            unhealthy: false,
            retry_at: None,
            backoff: restart::HEALTH_REPLACEMENT,
            replacement: None,
            superseded: Vec::new(),
            latency: None,
            last_failure: None,
            checks: 0,
            replacements: 0,
        }
    }
}

impl Health {
    /// As the status interface shows it: `unchecked`, `healthy`, `failing` (some failures,
    /// fewer than the limit), `unhealthy` (waiting for a replacement's retry), `replacing`.
    pub fn state(&self) -> &'static str {
        // Until Nginx routes to the fresh process, the hung one it replaces still serves.
        if self.replacement.is_some() || !self.superseded.is_empty() {
            "replacing"
        } else if self.unhealthy {
            "unhealthy"
        } else if self.failures > 0 {
            "failing"
        } else if self.checks == 0 {
            "unchecked"
        } else {
            "healthy"
        }
    }

    /// Forgets the checks (not the counts shown): the app is not settled, or the process
    /// changed.
    fn reset(&mut self) {
        self.next_at = None;
        self.in_flight = None;
        self.failures = 0;
        self.unhealthy = false;
        self.retry_at = None;
        self.backoff.reset();
    }
}

/// The health checks of webapp `index` of `v`: the stanza's own settings, else the global
/// ones.
pub(super) fn settings(v: &Version, index: usize, global: HealthChecks) -> HealthChecks {
    let w = &v.config.webapps[index];
    HealthChecks {
        interval: w.health_check_interval.unwrap_or(global.interval),
        failures: w.health_check_failures.unwrap_or(global.failures),
        timeout: w.health_check_timeout.unwrap_or(global.timeout),
    }
}

/// A check that scheduling delayed by more than its timeout (the worker's tick, or the
/// check's thread, came late), or whose failure came more than its timeout later than its
/// timeout (its thread was not run meanwhile): keter was overloaded, and the result says
/// nothing about the app.
pub(super) fn late(due: Instant, o: &Outcome, timeout: Duration) -> bool {
    !o.ran
        || o.started.saturating_duration_since(due) > timeout
        || (o.result.is_err() && o.finished.saturating_duration_since(o.started) > timeout * 2)
}

/// Makes one check on this thread: `GET path` with `Host: host` on `127.0.0.1:port`, the
/// status read from the first bytes of the answer's head (as `probe::ready` does for
/// readiness, which stops after the head; written out here because an HTTP client built for
/// every check cost a few hundred microseconds of CPU, most of a check's cost).
pub(super) fn check(c: &HealthCheck) -> Outcome {
    let started = Instant::now();
    let result = match status(c, started + c.timeout) {
        Ok(status) if status < 500 => Ok(()),
        Ok(status) => Err(CheckFailure::Status {
            path: c.path.clone(),
            status,
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Err(CheckFailure::Refused),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) || started.elapsed() >= c.timeout =>
        {
            Err(CheckFailure::TimedOut { timeout: c.timeout })
        }
        Err(source) => Err(CheckFailure::Failed {
            path: c.path.clone(),
            source,
        }),
    };
    Outcome {
        started,
        finished: Instant::now(),
        result,
        ran: true,
    }
}

/// The status of `GET path` on the webapp's port, within `deadline`.
fn status(c: &HealthCheck, deadline: Instant) -> io::Result<u16> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
    };
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, c.port));
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    // The path and the host were checked when the bundle was read: no line breaks.
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: keter\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        c.path, c.host
    );
    stream.write_all(request.as_bytes())?;
    // `HTTP/1.1 200`: twelve bytes say it all.
    let mut head = [0u8; 12];
    let mut n = 0;
    while n < head.len() {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut head[n..])? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection was closed before an answer",
                ));
            }
            got => n += got,
        }
    }
    let status = std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s));
    match status {
        Some(s) if head.starts_with(b"HTTP/1.") && head[8] == b' ' => Ok(s),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the answer is not HTTP/1.x",
        )),
    }
}

/// `5 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} s", d.as_secs_f64())
    }
}

impl Machine {
    /// True when health checks count: serving, nothing under way, nothing draining, not
    /// frozen.
    pub(super) fn health_settled(&self) -> bool {
        matches!(self.life, Life::Serving(_))
            && !self.frozen
            && self.retiring.is_empty()
            && self.resting.is_none()
    }

    /// The earliest moment a check or a replacement is due.
    pub(super) fn health_deadline(&self) -> Option<Instant> {
        if !self.health_settled() {
            return None;
        }
        let v = self.serving()?;
        v.procs
            .iter()
            .filter(|p| p.health.replacement.is_none())
            .flat_map(|p| {
                let retry = p.health.retry_at.filter(|_| p.health.unhealthy);
                p.health.next_at.into_iter().chain(retry)
            })
            .min()
    }

    /// Timed work of the health checks (from `tick`): while settled, schedules and starts the
    /// checks that are due and the replacements whose retry has come; otherwise forgets the
    /// checks and stops any replacement under way. True when the report changed.
    pub(super) fn health_tick(&mut self, fx: &mut dyn Effects) -> bool {
        let now = fx.now();
        let settled = self.health_settled();
        let global = fx.health_defaults();
        let readiness_timeout = fx.readiness_timeout();
        let mut changed = false;
        let mut cancelled = Vec::new();
        let mut to_replace = Vec::new();
        let Some(v) = (match &mut self.life {
            Life::Serving(v) => Some(&mut **v),
            Life::Deploying { serving, .. } | Life::Stopping { serving, .. } => {
                serving.as_deref_mut()
            }
            _ => None,
        }) else {
            return false;
        };
        for i in 0..v.procs.len() {
            let Role::Web { index, port } = v.procs[i].role else {
                continue;
            };
            let s = settings(v, index, global);
            let w = &v.config.webapps[index];
            let (host, path) = (w.hosts[0].to_string(), w.health_check_path.to_string());
            let p = &mut v.procs[i];
            let running = p.running();
            if !settled || running.is_none() || s.interval.is_zero() {
                if let Some(r) = p.health.replacement.take() {
                    cancelled.push(r);
                    changed = true;
                }
                changed |= p.health.failures > 0 || p.health.unhealthy;
                p.health.reset();
                continue;
            }
            let h = &mut p.health;
            if h.replacement.is_some() {
                continue;
            }
            if h.unhealthy && h.retry_at.is_some_and(|at| at <= now) {
                h.retry_at = None;
                to_replace.push(i);
                continue;
            }
            if h.in_flight.is_some() {
                continue;
            }
            match h.next_at {
                None => h.next_at = Some(now + s.interval),
                Some(due) if due <= now => {
                    h.seq += 1;
                    h.next_at = None;
                    h.in_flight = Some((h.seq, due));
                    fx.health_check(HealthCheck {
                        version: v.id,
                        proc: i,
                        seq: h.seq,
                        port,
                        host,
                        path,
                        timeout: s.timeout,
                    });
                }
                Some(_) => {}
            }
        }
        for i in to_replace {
            changed = true;
            self.replace_unhealthy(i, readiness_timeout, now, fx);
        }
        for r in cancelled {
            log::info!(
                "{}: the fresh process pid {} (port {}) is stopped: the app is no longer settled or the process it was to replace is gone",
                self.name,
                r.running.pid,
                r.port
            );
            fx.cancel(r.id);
            fx.release_port(r.port);
            self.stop_process(r.running.pid, fx);
        }
        changed
    }

    /// Hands a process to a stage that stops it (SIGTERM, SIGKILL at `stop-timeout`);
    /// [`super::machine::Event::Reaped`] comes back.
    fn stop_process(&mut self, pid: i32, fx: &mut dyn Effects) {
        self.reaping.push(pid);
        fx.stop_process(pid);
    }

    /// The result of check `seq` of process `proc` of version `version`.
    pub(super) fn checked(
        &mut self,
        version: u64,
        proc: usize,
        seq: u64,
        outcome: Outcome,
        fx: &mut dyn Effects,
    ) {
        if !self.health_settled() {
            return;
        }
        let now = fx.now();
        let global = fx.health_defaults();
        let readiness_timeout = fx.readiness_timeout();
        let name = self.name.clone();
        let Life::Serving(v) = &mut self.life else {
            return;
        };
        if v.id != version {
            return;
        }
        let Some(Role::Web { index, port }) = v.procs.get(proc).map(|p| p.role) else {
            return;
        };
        let s = settings(v, index, global);
        let p = &mut v.procs[proc];
        let Some((awaited, due)) = p.health.in_flight else {
            return;
        };
        let Some(pid) = p.running().map(|r| r.pid) else {
            return;
        };
        if awaited != seq {
            return;
        }
        let h = &mut p.health;
        let shown = |h: &Health| {
            (
                h.state(),
                h.failures,
                h.latency.map(|d| d.as_millis()),
                h.last_failure.clone(),
            )
        };
        let before = shown(h);
        h.in_flight = None;
        h.next_at = Some(now + s.interval);
        if late(due, &outcome, s.timeout) {
            log::debug!(
                "{name}: a health check of webapp {index} (pid {pid}) ran late: keter was busy; it does not count"
            );
            return;
        }
        h.checks += 1;
        h.latency = Some(outcome.finished.saturating_duration_since(outcome.started));
        match outcome.result {
            Ok(()) => {
                if h.failures > 0 {
                    log::info!(
                        "{name}: webapp {index} (pid {pid}, port {port}) answers its health check again after {} failed",
                        h.failures
                    );
                }
                h.failures = 0;
                h.unhealthy = false;
                h.retry_at = None;
                h.backoff.reset();
                h.last_failure = None;
                self.health_news |= shown(h) != before;
            }
            Err(why) => {
                self.health_news = true;
                h.failures += 1;
                log::warn!(
                    "{name}: webapp {index} (pid {pid}, port {port}) failed a health check ({why}), {} of {} in a row",
                    h.failures,
                    s.failures
                );
                h.last_failure = Some(why.to_string());
                if h.failures >= s.failures && !h.unhealthy {
                    h.unhealthy = true;
                    let line = format!(
                        "webapp {index} (pid {pid}, port {port}) failed {} health checks in a row ({why}); replacing it",
                        h.failures
                    );
                    log::error!("{name}: {line}");
                    fx.note(&format!("keter: {line}"));
                    self.last_error = Some(line);
                    self.replace_unhealthy(proc, readiness_timeout, now, fx);
                }
            }
        }
    }

    /// Starts a fresh process of the serving version in place of unhealthy process `i`, on
    /// a new port, and its readiness check; or, when it cannot start, retries later.
    fn replace_unhealthy(
        &mut self,
        i: usize,
        readiness_timeout: Duration,
        now: Instant,
        fx: &mut dyn Effects,
    ) {
        let name = self.name.clone();
        let Life::Serving(v) = &mut self.life else {
            return;
        };
        let Role::Web { index, .. } = v.procs[i].role else {
            return;
        };
        let w = &v.config.webapps[index];
        let (host, path) = (w.hosts[0].to_string(), w.health_check_path.to_string());
        let timeout = w.readiness_timeout.unwrap_or(readiness_timeout);
        let Some(port) = fx.acquire_port() else {
            let p = &mut v.procs[i];
            p.health.retry_at = Some(now + p.health.backoff.failed(Duration::ZERO));
            log::error!(
                "{name}: no free port in port-range for a fresh webapp {index}; the unhealthy one stays, tried again in {} s",
                p.health
                    .retry_at
                    .unwrap_or(now)
                    .saturating_duration_since(now)
                    .as_secs()
            );
            return;
        };
        let p = &mut v.procs[i];
        let spec = p.spec_on(port, w);
        let old = p.running().map(|r| r.pid).unwrap_or(0);
        match fx.spawn(v.id, i, &spec, &format!("port {port}, replacing pid {old}")) {
            Ok(running) => {
                let id = fx.next_id();
                fx.readiness(
                    id,
                    vec![Check {
                        port,
                        pid: running.pid,
                        host,
                        path,
                        timeout,
                    }],
                );
                p.health.replacement = Some(Replacement { id, port, running });
            }
            Err(e) => {
                fx.release_port(port);
                let delay = p.health.backoff.failed(Duration::ZERO);
                p.health.retry_at = Some(now + delay);
                log::error!(
                    "{name}: cannot start a fresh webapp {index}: {e}; the unhealthy one stays, tried again in {} s",
                    delay.as_secs()
                );
            }
        }
    }

    /// The serving process whose replacement's readiness check is `id`, while settled.
    pub(super) fn replacing(&self, id: u64) -> Option<usize> {
        if !self.health_settled() {
            return None;
        }
        self.serving()?
            .procs
            .iter()
            .position(|p| p.health.replacement.is_some_and(|r| r.id == id))
    }

    /// The readiness of the fresh process in place of process `i` came back: the switch to it
    /// and the hung one stopped, or the fresh one stopped and a retry later.
    pub(super) fn replacement_ready(
        &mut self,
        i: usize,
        result: Result<(), super::DeployError>,
        fx: &mut dyn Effects,
    ) {
        let now = fx.now();
        let name = self.name.clone();
        let Life::Serving(v) = &mut self.life else {
            return;
        };
        let Role::Web {
            index,
            port: old_port,
        } = v.procs[i].role
        else {
            return;
        };
        let w = v.config.webapps[index].clone();
        let p = &mut v.procs[i];
        let Some(r) = p.health.replacement.take() else {
            return;
        };
        // Its check is over: forgotten.
        fx.cancel(r.id);
        let old = p.running().map(|r| r.pid).unwrap_or(0);
        if let Err(e) = result {
            let delay = p.health.backoff.failed(Duration::ZERO);
            p.health.retry_at = Some(now + delay);
            let line = format!(
                "the fresh webapp {index} (pid {}, port {}) did not become ready: {e}; the unhealthy pid {old} stays in service, replacement tried again in {} s",
                r.running.pid,
                r.port,
                delay.as_secs()
            );
            log::error!("{name}: {line}");
            fx.note(&format!("keter: {line}"));
            self.last_error = Some(line);
            fx.release_port(r.port);
            let version = v.id;
            self.stop_process(r.running.pid, fx);
            self.watch_unhealthy(
                version,
                &format!("its fresh webapp {index} did not become ready: {e}"),
                now,
            );
            return;
        }
        p.move_port(r.port, &w);
        p.state = ProcState::Running(r.running);
        p.port_check_at = None;
        p.health.reset();
        p.health.replacements += 1;
        p.health.latency = None;
        p.health.last_failure = None;
        p.health.checks = 0;
        p.health.superseded.push(Superseded {
            pid: old,
            port: old_port,
        });
        fx.health_replaced();
        log::info!(
            "{name}: the fresh webapp {index} (pid {}, port {}) is ready; switching to it from the unhealthy pid {old} (port {old_port})",
            r.running.pid,
            r.port
        );
        // The hung one is stopped once Nginx routes to the fresh one (`stop_superseded`).
        self.reroute_due = true;
        self.refresh(fx);
    }

    /// Stops the hung processes that fresh ones replaced in the serving version, and gives
    /// their ports back: once Nginx took the serving version's site as it is now (or no
    /// longer has it), and when freezing for an upgrade (the record does not say them; the
    /// next keter renders the site again, `adopt.rs`).
    pub(super) fn stop_superseded(&mut self, fx: &mut dyn Effects) {
        let Some(v) = self.serving_mut() else {
            return;
        };
        let hung: Vec<Superseded> = v
            .procs
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.health.superseded))
            .collect();
        for s in hung {
            log::info!(
                "{}: stopping the unhealthy pid {} (port {}): a fresh process serves in its place",
                self.name,
                s.pid,
                s.port
            );
            fx.release_port(s.port);
            self.stop_process(s.pid, fx);
        }
    }

    /// The fresh process in place of an unhealthy one exited before it was ready (`pid`):
    /// true if it was one.
    pub(super) fn replacement_exited(
        &mut self,
        version: u64,
        pid: i32,
        fx: &mut dyn Effects,
    ) -> bool {
        let now = fx.now();
        let name = self.name.clone();
        let Some(v) = self.serving_mut() else {
            return false;
        };
        if v.id != version {
            return false;
        }
        let Some(p) = v
            .procs
            .iter_mut()
            .find(|p| p.health.replacement.is_some_and(|r| r.running.pid == pid))
        else {
            return false;
        };
        let Some(r) = p.health.replacement.take() else {
            return false;
        };
        let delay = p.health.backoff.failed(Duration::ZERO);
        p.health.retry_at = Some(now + delay);
        let old = p.running().map(|r| r.pid).unwrap_or(0);
        let line = format!(
            "the fresh webapp (pid {pid}, port {}) exited before it was ready; the unhealthy pid {old} stays in service, replacement tried again in {} s",
            r.port,
            delay.as_secs()
        );
        log::error!("{name}: {line}");
        fx.note(&format!("keter: {line}"));
        fx.cancel(r.id);
        fx.release_port(r.port);
        self.last_error = Some(line);
        self.watch_unhealthy(
            version,
            "the fresh webapp in place of an unhealthy one exited before it was ready",
            now,
        );
        true
    }

    /// A hung process that a fresh one replaced exited by itself before Nginx was routed away
    /// from it (`pid`, its group reaped already): forgotten, its port given back. True if it
    /// was one.
    pub(super) fn superseded_exited(
        &mut self,
        version: u64,
        pid: i32,
        fx: &mut dyn Effects,
    ) -> bool {
        let Some(v) = self.serving_mut().filter(|v| v.id == version) else {
            return false;
        };
        for p in &mut v.procs {
            if let Some(at) = p.health.superseded.iter().position(|s| s.pid == pid) {
                let s = p.health.superseded.remove(at);
                fx.release_port(s.port);
                return true;
            }
        }
        false
    }

    /// Stops the fresh processes of a version leaving the machine (discarded): its stop
    /// stage stops only the processes it knows.
    pub(super) fn drop_replacements(&mut self, v: &mut Version, fx: &mut dyn Effects) {
        for p in &mut v.procs {
            if let Some(r) = p.health.replacement.take() {
                fx.cancel(r.id);
                fx.release_port(r.port);
                self.stop_process(r.running.pid, fx);
            }
            // Nginx no longer routes to a version that leaves.
            for s in std::mem::take(&mut p.health.superseded) {
                fx.release_port(s.port);
                self.stop_process(s.pid, fx);
            }
        }
    }

    fn serving_mut(&mut self) -> Option<&mut Version> {
        match &mut self.life {
            Life::Serving(v) => Some(v),
            Life::Deploying { serving, .. } | Life::Stopping { serving, .. } => {
                serving.as_deref_mut()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_on(port: u16, timeout: Duration) -> Outcome {
        check(&HealthCheck {
            version: 1,
            proc: 0,
            seq: 1,
            port,
            host: "app.example.com".into(),
            path: "/up".into(),
            timeout,
        })
    }

    /// A listener that answers every connection with `answer` (or, `None`, reads the request
    /// and never answers).
    fn serve(answer: Option<&'static str>) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).unwrap_or(0);
                let text = String::from_utf8_lossy(&req[..n]).to_string();
                assert!(text.starts_with("GET /up HTTP/1.1\r\nHost: app.example.com\r\n"));
                match answer {
                    Some(a) => {
                        let _ = s.write_all(a.as_bytes());
                    }
                    None => std::thread::sleep(Duration::from_secs(5)),
                }
            }
        });
        port
    }

    #[test]
    fn a_check_reads_the_status_and_tells_failures_apart() {
        let ok = serve(Some("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"));
        let why = |o: Outcome| o.result.map_err(|e| e.to_string());
        assert_eq!(why(check_on(ok, Duration::from_secs(5))), Ok(()));
        let redirect = serve(Some("HTTP/1.0 301 Moved\r\n\r\n"));
        assert_eq!(why(check_on(redirect, Duration::from_secs(5))), Ok(()));
        let busy = serve(Some("HTTP/1.1 503 Busy\r\n\r\n"));
        assert_eq!(
            why(check_on(busy, Duration::from_secs(5))),
            Err("GET /up answered 503".into())
        );
        let hung = serve(None);
        let o = check_on(hung, Duration::from_millis(300));
        assert!(o.finished - o.started >= Duration::from_millis(290));
        assert_eq!(why(o), Err("timed out after 0.3 s".into()));
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            why(check_on(free, Duration::from_secs(1))),
            Err("connection refused".into())
        );
        let garbage = serve(Some("SSH-2.0-OpenSSH_9\r\n"));
        assert_eq!(
            why(check_on(garbage, Duration::from_secs(1))),
            Err("GET /up failed: the answer is not HTTP/1.x".into())
        );
    }
}
