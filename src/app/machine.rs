//! The app worker's state machine: what the worker is doing ([`Life`]), what each process is
//! doing ([`ProcState`]), and every transition, driven by [`Event`]s and the clock. It touches
//! the world only through [`Effects`], so it is unit-tested with a fake spawner and a fake
//! clock (`tests.rs` beside this file); `world.rs` is the real thing. Exits, restarts, drains
//! and stops are in `supervise.rs`. `docs/lifecycle.md` draws
//! the states and says who owns what.
//!
//! The deploy's slow stages (unpack, readiness, switch) run elsewhere and come back as events,
//! so the one loop keeps restarting the serving version's processes and draining old versions
//! while a deploy runs.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use super::deploy::{Check, PrepareJob, Prepared, SwitchJob};
use super::error::DeployError;
use super::version::{FileStamp, ProcState, Role, Version};
use super::{Command, Effects};
use crate::names::AppName;
use crate::report::{DeployReport, DeployResult, rfc3339};
use crate::restart::{self, Backoff};

/// Everything an app worker reacts to.
pub(super) enum Event {
    Command(Command),
    /// Process `proc` of version `version` exited.
    Exited {
        version: u64,
        proc: usize,
        pid: i32,
        /// `None` for a process an earlier keter started (only its parent learns the status).
        status: Option<ExitStatus>,
    },
    /// The unpack stage of deploy `id` ended.
    Prepared {
        id: u64,
        result: Result<Prepared, DeployError>,
    },
    /// Every webapp of version `version` answered its health check (or one did not).
    Ready {
        version: u64,
        result: Result<(), DeployError>,
    },
    /// Nginx took version `version`'s site (or did not).
    Switched {
        version: u64,
        result: Result<(), DeployError>,
    },
    /// The ACME thread stored a new certificate (first or renewed) for `hosts`, one of the
    /// app's `ssl: acme` stanzas (`acme::Acme::want`'s callback): the serving version's site
    /// is rendered again with it and Nginx reloaded, the app's processes untouched. Not a
    /// [`Command`]: commands are counted against the daemon's and coalesced, this is neither.
    Certificate {
        hosts: String,
    },
    /// Stop everything and end the worker.
    Shutdown,
    /// A step of an in-place upgrade, for the worker's loop (`freeze.rs`).
    Handover(Handover),
}

/// The steps of an in-place upgrade, as the daemon drives each worker through them.
pub enum Handover {
    /// Come to rest; answer once nothing is in flight.
    Freeze(crossbeam_channel::Sender<()>),
    /// Write the record, answer, and do nothing more until `Thaw`.
    Snapshot(crossbeam_channel::Sender<()>),
    /// The upgrade did not happen: carry on.
    Thaw,
}

/// What the worker is doing. Each state holds exactly what exists in it: a version serves in
/// `Serving`, and may serve in `Deploying` while a candidate is on its way.
pub(super) enum Life {
    /// No version serves and nothing is under way.
    Idle(Why),
    Serving(Version),
    Deploying {
        serving: Option<Version>,
        deploy: Deploy,
    },
    /// Stopping, but a stage of `deploy` is still in flight (an unpack or a switch cannot be
    /// interrupted); once it is back, everything is stopped. `exit`: then end the worker.
    Stopping {
        serving: Option<Version>,
        deploy: Deploy,
        exit: bool,
    },
    /// The worker has stopped everything and ends.
    Ended,
}

/// Why nothing serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// No deploy yet.
    New,
    /// The last deploy failed.
    Failed,
    /// The bundle was deleted.
    Stopped,
}

/// A deploy under way.
pub(super) struct Deploy {
    /// The version it makes; also names its folder `temp/NAME-ID`.
    pub id: u64,
    pub path: PathBuf,
    pub stamp: Option<FileStamp>,
    pub started: Instant,
    pub stage: Stage,
    /// The newest command received meanwhile, acted on when the deploy ends.
    pub pending: Option<Command>,
    /// The backoff of the retries this deploy continues, if it is one.
    pub retries: Option<Backoff>,
}

/// Where a deploy is.
pub(super) enum Stage {
    /// Unpacking, validating, claiming hosts, provisioning, planning processes.
    Unpacking,
    /// The candidate's processes run; its webapps' health checks are polled.
    Readiness(Version),
    /// Nginx is taking the candidate's site.
    Switching(Version),
}

impl Stage {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Stage::Unpacking => "unpacking",
            Stage::Readiness(_) => "readiness",
            Stage::Switching(_) => "switching",
        }
    }
}

/// An old version after the switch, waiting for its last requests before it is stopped.
pub(super) struct Retiring {
    pub version: Version,
    pub since: Instant,
}

/// The bundle whose deploy failed last: not tried again at repeated events for the same
/// file, but at `retry_at` if the failure may pass.
pub(super) struct Failure {
    pub path: PathBuf,
    pub stamp: Option<FileStamp>,
    pub retry_at: Option<Instant>,
    pub backoff: Backoff,
}

/// A site that Nginx did not take with a new certificate is tried again after this long.
pub(super) const REFRESH_RETRY: Duration = Duration::from_secs(10);

/// How often old versions are checked for remaining connections.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(50);

/// How often keter looks at who listens on the port of a webapp that has no listener of its
/// own there (from its exit until its restarted process listens): with an Nginx reload, how
/// long another program that binds the port meanwhile may get requests before keter moves
/// the webapp (README "Supervision"). Each look wakes the worker: at 20 ms a crash-looping
/// webapp cost its keter 0.4 % of a core (`cargo bench --bench supervision`), at 50 ms 0.2 %.
pub(super) const PORT_WATCH: Duration = Duration::from_millis(50);

/// A site that Nginx did not take with a webapp's new port is tried again after this long:
/// until then Nginx may still route to the old port.
pub(super) const REROUTE_RETRY: Duration = Duration::from_secs(1);

/// One app's worker state.
pub(super) struct Machine {
    pub name: AppName,
    pub life: Life,
    pub retiring: Vec<Retiring>,
    /// Deploys that got as far as starting processes, for the Nginx file header.
    pub deploys: u64,
    pub failed: Option<Failure>,
    pub last_deploy: Option<DeployReport>,
    pub last_error: Option<String>,
    /// Commands received, so that the daemon knows which of its commands a stop answers.
    pub commands: u64,
    /// The serving version was taken over from an earlier keter but cannot stay (its folder
    /// is gone, or Nginx does not route to it): the next deploy of its bundle goes ahead even
    /// when the file and its content are the same (`adopt.rs`).
    pub replace: bool,
    /// Coming to rest for an in-place upgrade (`freeze.rs`): nothing new starts.
    pub frozen: bool,
    /// The command to act on if the upgrade does not happen.
    pub held: Option<Command>,
    /// A certificate of an `ssl: acme` stanza arrived (or a keter started again took the
    /// serving version over): the serving version's site is rendered again and reloaded as
    /// soon as the worker is `Serving` and not frozen (`supervise.rs`, `tick`).
    pub refresh_due: bool,
    /// A keter that took the serving version over renders its site again, as this keter
    /// writes it, once `Serving` and not frozen; Nginx reloads only if the file comes out
    /// otherwise than the one the earlier keter wrote (`adopt.rs`).
    pub rewrite_due: bool,
    /// A refresh that failed (Nginx did not take it) is tried again at this moment.
    pub refresh_retry_at: Option<Instant>,
    /// A webapp of the serving version (or of a candidate being switched) moved to another
    /// port, or has none it may use: the serving version's site is rendered again (or taken
    /// out of Nginx) as soon as no switch is in flight, a deploy under way or not
    /// (`supervise.rs`, `watch_ports`).
    pub reroute_due: bool,
}

/// How a deploy ended.
pub(super) enum End {
    Deployed,
    SameContent(Option<FileStamp>),
    Superseded,
    Failed(DeployError),
}

impl Machine {
    pub fn new(name: AppName) -> Machine {
        Machine {
            name,
            life: Life::Idle(Why::New),
            retiring: Vec::new(),
            deploys: 0,
            failed: None,
            last_deploy: None,
            last_error: None,
            commands: 0,
            replace: false,
            frozen: false,
            held: None,
            refresh_due: false,
            rewrite_due: false,
            refresh_retry_at: None,
            reroute_due: false,
        }
    }

    pub fn ended(&self) -> bool {
        matches!(self.life, Life::Ended)
    }

    /// The earliest moment something is due: a restart, a drain check, a deploy retry. `None`
    /// when nothing is, so an idle app costs no wake-ups at all.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let restarts = self.supervised().flat_map(|v| {
            v.procs
                .iter()
                .flat_map(|p| p.restart_due().into_iter().chain(p.port_check_at))
        });
        let drains = self.retiring.iter().map(|_| now + DRAIN_POLL);
        let retry = match &self.life {
            Life::Idle(_) | Life::Serving(_) if !self.frozen => {
                self.failed.as_ref().and_then(|f| f.retry_at)
            }
            _ => None,
        };
        let refresh = self
            .site_wanted()
            .then(|| self.refresh_retry_at.unwrap_or(now));
        restarts.chain(drains).chain(retry).chain(refresh).min()
    }

    /// True when the serving version's site is to be rendered again: for a new certificate
    /// once `Serving`; for a moved port as soon as no switch is in flight (a deploy under way
    /// takes long, and Nginx would route to the old port meanwhile; a switch in flight writes
    /// the same file, so it is waited for). Never while frozen: Nginx's controller may be
    /// frozen too, and the next keter sees the difference (`adopt.rs`).
    pub(super) fn site_wanted(&self) -> bool {
        if self.frozen {
            return false;
        }
        match &self.life {
            Life::Serving(_) => self.refresh_due || self.reroute_due || self.rewrite_due,
            Life::Deploying {
                serving: Some(_),
                deploy,
            } => self.reroute_due && !matches!(deploy.stage, Stage::Switching(_)),
            _ => false,
        }
    }

    /// The versions whose processes are restarted by their policy: the serving one, and a
    /// candidate once it runs.
    pub(super) fn supervised(&self) -> impl Iterator<Item = &Version> {
        let (serving, candidate) = match &self.life {
            Life::Serving(v) => (Some(v), None),
            Life::Deploying { serving, deploy }
            | Life::Stopping {
                serving, deploy, ..
            } => {
                let c = match &deploy.stage {
                    Stage::Readiness(c) | Stage::Switching(c) => Some(c),
                    Stage::Unpacking => None,
                };
                (serving.as_ref(), c)
            }
            Life::Idle(_) | Life::Ended => (None, None),
        };
        serving.into_iter().chain(candidate)
    }

    pub(super) fn supervised_mut(&mut self) -> Vec<&mut Version> {
        match &mut self.life {
            Life::Serving(v) => vec![v],
            Life::Deploying { serving, deploy }
            | Life::Stopping {
                serving, deploy, ..
            } => {
                let mut out: Vec<&mut Version> = serving.iter_mut().collect();
                if let Stage::Readiness(c) | Stage::Switching(c) = &mut deploy.stage {
                    out.push(c);
                }
                out
            }
            Life::Idle(_) | Life::Ended => Vec::new(),
        }
    }

    pub(super) fn serving(&self) -> Option<&Version> {
        match &self.life {
            Life::Serving(v) => Some(v),
            Life::Deploying { serving, .. } | Life::Stopping { serving, .. } => serving.as_ref(),
            Life::Idle(_) | Life::Ended => None,
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event, fx: &mut dyn Effects) {
        match event {
            Event::Command(c) => {
                self.commands += 1;
                self.command(c, fx);
            }
            Event::Exited {
                version,
                proc,
                pid,
                status,
            } => self.exited(version, proc, pid, status, fx),
            Event::Prepared { id, result } => self.prepared(id, result, fx),
            Event::Ready { version, result } => self.ready(version, result, fx),
            Event::Switched { version, result } => self.switched(version, result, fx),
            Event::Certificate { hosts } => {
                log::info!(
                    "{}: a new certificate for {hosts}; the site is rendered again with it",
                    self.name
                );
                self.refresh_due = true;
            }
            Event::Shutdown => self.stop(true, fx),
            Event::Handover(_) => {}
        }
    }

    pub(super) fn command(&mut self, c: Command, fx: &mut dyn Effects) {
        match c {
            Command::Deploy { path, retry } => self.deploy_command(path, retry, fx),
            Command::Stop => self.stop(false, fx),
        }
    }

    fn deploy_command(&mut self, path: PathBuf, retry: bool, fx: &mut dyn Effects) {
        let stamp = fx.stamp(&path);
        match &mut self.life {
            Life::Idle(_) | Life::Serving(_) => {}
            Life::Deploying { deploy, serving } => {
                // inotify reports one rename several times: the very file being deployed, or
                // the one serving, is no newer command.
                let repeat = stamp.is_some()
                    && ((deploy.path == path && deploy.stamp == stamp)
                        || (!self.replace
                            && serving.as_ref().is_some_and(|v| Some(v.stamp) == stamp)));
                if repeat {
                    return;
                }
                deploy.pending = Some(Command::Deploy { path, retry });
                // A deploy whose processes only wait for readiness is superseded at once;
                // an unpack or a switch in flight is waited for.
                if matches!(deploy.stage, Stage::Readiness(_)) {
                    self.supersede(fx);
                }
                return;
            }
            Life::Stopping { .. } | Life::Ended => return,
        }
        if !retry
            && let Some(f) = &self.failed
            && f.path == path
            && f.stamp.is_some()
            && f.stamp == stamp
        {
            log::debug!(
                "{}: {}.keter failed before and has not changed",
                self.name,
                self.name
            );
            return;
        }
        if let (Some(v), Some(s)) = (self.serving(), stamp)
            && v.stamp == s
            && !self.replace
        {
            log::debug!(
                "{}: {}.keter is the file already serving",
                self.name,
                self.name
            );
            self.failed = None;
            return;
        }
        let retries = self
            .failed
            .as_ref()
            .filter(|f| f.path == path && f.stamp == stamp)
            .map(|f| f.backoff);
        self.begin(path, stamp, retries, fx);
    }

    /// Starts the unpack stage of a deploy.
    pub(super) fn begin(
        &mut self,
        path: PathBuf,
        stamp: Option<FileStamp>,
        retries: Option<Backoff>,
        fx: &mut dyn Effects,
    ) {
        let serving = match std::mem::replace(&mut self.life, Life::Ended) {
            Life::Serving(v) => Some(v),
            Life::Idle(_) => None,
            other => {
                self.life = other;
                return;
            }
        };
        let id = fx.next_id();
        fx.prepare(PrepareJob {
            id,
            path: path.clone(),
            serving_sha256: serving
                .as_ref()
                .filter(|_| !self.replace)
                .map(|v| v.sha256.clone()),
            started: fx.now(),
        });
        self.life = Life::Deploying {
            serving,
            deploy: Deploy {
                id,
                path,
                stamp,
                started: fx.now(),
                stage: Stage::Unpacking,
                pending: None,
                retries,
            },
        };
    }

    /// Takes the deploy out of the life (which is left `Ended` until the caller settles it),
    /// with the serving version and, when a stop waits for the deploy, whether to exit after.
    fn take_deploy(&mut self) -> Option<(Option<Version>, Deploy, Option<bool>)> {
        match std::mem::replace(&mut self.life, Life::Ended) {
            Life::Deploying { serving, deploy } => Some((serving, deploy, None)),
            Life::Stopping {
                serving,
                deploy,
                exit,
            } => Some((serving, deploy, Some(exit))),
            other => {
                self.life = other;
                None
            }
        }
    }

    /// Puts a taken deploy back.
    fn put_back(&mut self, serving: Option<Version>, deploy: Deploy, stopping: Option<bool>) {
        self.life = match stopping {
            None => Life::Deploying { serving, deploy },
            Some(exit) => Life::Stopping {
                serving,
                deploy,
                exit,
            },
        };
    }

    fn prepared(&mut self, id: u64, result: Result<Prepared, DeployError>, fx: &mut dyn Effects) {
        let Some((serving, mut deploy, stopping)) = self.take_deploy() else {
            if let Ok(Prepared::Version(v)) = result {
                fx.discard(*v);
            }
            return;
        };
        if deploy.id != id || !matches!(deploy.stage, Stage::Unpacking) {
            if let Ok(Prepared::Version(v)) = result {
                fx.discard(*v);
            }
            return self.put_back(serving, deploy, stopping);
        }
        let superseded = stopping.is_some() || deploy.pending.is_some();
        let mut candidate = match result {
            Ok(Prepared::Version(v)) if !superseded => *v,
            Ok(Prepared::Version(v)) => {
                fx.discard(*v);
                return self.conclude(serving, deploy, stopping, End::Superseded, fx);
            }
            Ok(Prepared::SameContent) => {
                let stamp = deploy.stamp;
                return self.conclude(serving, deploy, stopping, End::SameContent(stamp), fx);
            }
            Err(e) => return self.conclude(serving, deploy, stopping, End::Failed(e), fx),
        };
        self.deploys += 1;
        candidate.deploy = self.deploys;
        if let Err(e) = start_all(&mut candidate, fx) {
            fx.discard(candidate);
            return self.conclude(serving, deploy, None, End::Failed(e), fx);
        }
        let checks = readiness_checks(&candidate, fx.readiness_timeout());
        if checks.is_empty() {
            deploy.stage = Stage::Switching(candidate);
            self.life = Life::Deploying { serving, deploy };
            self.begin_switch(fx);
        } else {
            fx.readiness(candidate.id, checks);
            deploy.stage = Stage::Readiness(candidate);
            self.life = Life::Deploying { serving, deploy };
        }
    }

    fn ready(&mut self, version: u64, result: Result<(), DeployError>, fx: &mut dyn Effects) {
        let Life::Deploying { deploy, .. } = &mut self.life else {
            return;
        };
        if !matches!(&deploy.stage, Stage::Readiness(c) if c.id == version) {
            return;
        }
        match result {
            Ok(()) => {
                if let Stage::Readiness(c) = std::mem::replace(&mut deploy.stage, Stage::Unpacking)
                {
                    deploy.stage = Stage::Switching(c);
                }
                self.begin_switch(fx);
            }
            Err(e) => self.fail_candidate(End::Failed(e), fx),
        }
    }

    fn begin_switch(&mut self, fx: &mut dyn Effects) {
        let Life::Deploying { deploy, .. } = &self.life else {
            return;
        };
        let Stage::Switching(c) = &deploy.stage else {
            return;
        };
        fx.switch(switch_job(c, deploy.started));
    }

    /// Renders the serving version's site again (its `ssl: acme` certificates and its
    /// webapps' ports as they are now) and has Nginx reload it; or, when a webapp of it has no
    /// port it may use, takes the site out of Nginx. Runs on the worker's thread, as a stop's
    /// removal of the site does: nothing else may change the app's Nginx file meanwhile.
    pub(super) fn refresh(&mut self, fx: &mut dyn Effects) {
        let Some(v) = self.serving() else {
            self.reroute_due = false;
            return;
        };
        // A certificate's refresh waits for a version to serve; one made for a moved port
        // during a deploy leaves it pending.
        let certificate = self.refresh_due && matches!(self.life, Life::Serving(_));
        let reroute = self.reroute_due;
        let rewrite_only = !certificate && !reroute;
        let stranded = v.procs.iter().any(|p| p.stranded);
        let ports = web_ports(v);
        let result = if stranded {
            fx.remove_site().map_err(DeployError::Nginx)
        } else {
            fx.refresh_site(switch_job(v, fx.now()), rewrite_only)
        };
        match result {
            Ok(g) => {
                self.reroute_due = false;
                self.refresh_due &= !certificate;
                self.rewrite_due &= !matches!(self.life, Life::Serving(_));
                self.refresh_retry_at = None;
                if stranded {
                    log::error!(
                        "{}: removed from Nginx at generation {g}: a webapp's port is held by someone else and no other port is free; it comes back once one is",
                        self.name
                    );
                } else if reroute {
                    let ports: Vec<u16> = ports.iter().map(|(_, p)| *p).collect();
                    log::info!(
                        "{}: Nginx routes to ports {ports:?} from generation {g}",
                        self.name
                    );
                } else if rewrite_only {
                    log::info!(
                        "{}: site rendered again by this keter: Nginx runs it at generation {g}",
                        self.name
                    );
                } else {
                    log::info!(
                        "{}: site rendered again with its certificates at Nginx generation {g}",
                        self.name
                    );
                }
            }
            Err(e) => {
                let retry = if reroute {
                    REROUTE_RETRY
                } else {
                    REFRESH_RETRY
                };
                self.refresh_retry_at = Some(fx.now() + retry);
                let why = if reroute {
                    "for its webapps' new ports"
                } else {
                    "with its certificates"
                };
                log::error!(
                    "{}: rendering the site again {why} failed: {e}; the site stays as it was, tried again in {} s",
                    self.name,
                    retry.as_secs()
                );
                fx.note(&format!("keter: the site {why} failed: {e}"));
            }
        }
    }

    fn switched(&mut self, version: u64, result: Result<(), DeployError>, fx: &mut dyn Effects) {
        let Some((serving, mut deploy, stopping)) = self.take_deploy() else {
            return;
        };
        if !matches!(&deploy.stage, Stage::Switching(c) if c.id == version) {
            return self.put_back(serving, deploy, stopping);
        }
        let Stage::Switching(mut candidate) =
            std::mem::replace(&mut deploy.stage, Stage::Unpacking)
        else {
            unreachable!("checked above");
        };
        match result {
            Ok(()) => {
                candidate.live_since = Some(SystemTime::now());
                if let Some(old) = serving {
                    log::info!(
                        "{}: draining the previous version (ports {:?})",
                        self.name,
                        old.ports()
                    );
                    self.retiring.push(Retiring {
                        version: old,
                        since: fx.now(),
                    });
                }
                self.conclude(Some(candidate), deploy, stopping, End::Deployed, fx);
            }
            Err(e) => {
                fx.discard(candidate);
                self.conclude(serving, deploy, stopping, End::Failed(e), fx);
            }
        }
    }

    /// A newer command arrived while the candidate waits for readiness: it is stopped and the
    /// command acted on.
    fn supersede(&mut self, fx: &mut dyn Effects) {
        self.fail_candidate(End::Superseded, fx);
    }

    /// Ends a deploy in the readiness stage: stops its checks and its processes.
    pub(super) fn fail_candidate(&mut self, end: End, fx: &mut dyn Effects) {
        let Some((serving, mut deploy, stopping)) = self.take_deploy() else {
            return;
        };
        match std::mem::replace(&mut deploy.stage, Stage::Unpacking) {
            Stage::Readiness(c) => {
                fx.cancel(c.id);
                fx.discard(c);
            }
            other => {
                deploy.stage = other;
                return self.put_back(serving, deploy, stopping);
            }
        }
        self.conclude(serving, deploy, stopping, end, fx);
    }

    /// The deploy is over (its candidate is discarded, or serves as `serving`): settles the
    /// life, records the result, then acts on a stop that waited for it or on the newest
    /// command received meanwhile.
    fn conclude(
        &mut self,
        serving: Option<Version>,
        deploy: Deploy,
        stopping: Option<bool>,
        end: End,
        fx: &mut dyn Effects,
    ) {
        let failed = matches!(end, End::Failed(_));
        // Nothing serves: no site is left to route to a moved port.
        self.reroute_due &= serving.is_some();
        self.life = match serving {
            Some(v) => Life::Serving(v),
            None if failed => Life::Idle(Why::Failed),
            None => Life::Idle(Why::New),
        };
        self.release_unused_hosts(fx);
        self.record(&deploy, end, fx);
        match (stopping, deploy.pending) {
            (Some(exit), _) => self.stop(exit, fx),
            (None, Some(c)) => self.command(c, fx),
            (None, None) => {}
        }
    }

    /// Counts, reports and logs how a deploy ended; remembers a failure.
    fn record(&mut self, deploy: &Deploy, end: End, fx: &mut dyn Effects) {
        let now = fx.now();
        let took = now.saturating_duration_since(deploy.started);
        let label = format!("{}.keter", self.name);
        let (result, error) = match &end {
            End::Deployed => (DeployResult::Succeeded, None),
            End::SameContent(_) => (DeployResult::Unchanged, None),
            End::Superseded => (DeployResult::Superseded, None),
            End::Failed(e) => (DeployResult::Failed, Some(e)),
        };
        fx.deploy_finished(result, took);
        let mut report = DeployReport {
            result,
            finished: rfc3339(SystemTime::now()),
            duration_ms: took.as_millis() as u64,
            error: error.map(|e| crate::applog::printable(&e.to_string()).into_owned()),
            error_kind: error.map(|e| e.kind()),
            retry_at: None,
        };
        self.failed = None;
        match end {
            End::Deployed => self.replace = false,
            End::SameContent(stamp) => {
                if let (Life::Serving(v), Some(stamp)) = (&mut self.life, stamp) {
                    v.stamp = stamp;
                }
                log::info!(
                    "{}: {label} is unchanged (same sha256); nothing to do",
                    self.name
                );
            }
            End::Superseded => {
                log::info!(
                    "{}: deploy of {label} superseded by a newer command",
                    self.name
                )
            }
            End::Failed(e) => {
                let keeps = if self.serving().is_some() {
                    "the previous version keeps serving"
                } else {
                    "the app is not running"
                };
                let mut backoff = deploy.retries.unwrap_or(restart::DEPLOY_RETRY);
                let retry_at = e.transient().then(|| now + backoff.failed(Duration::ZERO));
                let retry = match retry_at {
                    Some(at) => format!(
                        "; keter tries again in {} s",
                        at.saturating_duration_since(now).as_secs()
                    ),
                    None => String::new(),
                };
                log::error!(
                    "{}: deploy of {label} failed: {e}; {keeps}{retry}",
                    self.name
                );
                fx.note(&format!("keter: deploy failed: {e}"));
                report.retry_at = retry_at.map(|at| rfc3339(SystemTime::now() + (at - now)));
                self.last_error = Some(crate::applog::printable(&e.to_string()).into_owned());
                self.failed = Some(Failure {
                    path: deploy.path.clone(),
                    stamp: deploy.stamp,
                    retry_at,
                    backoff,
                });
            }
        }
        self.last_deploy = Some(report);
    }
}

/// Starts every process of a new version: background stanzas first, then webapps (Keter's
/// order).
fn start_all(v: &mut Version, fx: &mut dyn Effects) -> Result<(), DeployError> {
    for (i, p) in v.procs.iter_mut().enumerate() {
        match fx.spawn(v.id, i, &p.spec, &p.label()) {
            Ok(r) => p.state = ProcState::Running(r),
            Err(source) => {
                return Err(DeployError::Spawn {
                    program: p.spec.program.clone(),
                    source,
                });
            }
        }
    }
    Ok(())
}

/// The readiness checks of a version's webapps, in order.
fn readiness_checks(v: &Version, default_timeout: Duration) -> Vec<Check> {
    v.procs
        .iter()
        .filter_map(|p| match p.role {
            Role::Web { index, port } => {
                let w = &v.config.webapps[index];
                Some(Check {
                    port,
                    pid: p.running().map(|r| r.pid).unwrap_or(0),
                    host: w.hosts[0].to_string(),
                    path: w.health_check_path.as_str().to_string(),
                    timeout: w.readiness_timeout.unwrap_or(default_timeout),
                })
            }
            Role::Background { .. } => None,
        })
        .collect()
}

/// What a version's site is rendered from.
fn switch_job(v: &Version, started: Instant) -> SwitchJob {
    SwitchJob {
        version: v.id,
        deploy: v.deploy,
        sha256: v.sha256.clone(),
        config: v.config.clone(),
        ports: web_ports(v),
        started,
    }
}

/// (webapp index, port) of each webapp.
fn web_ports(v: &Version) -> Vec<(usize, u16)> {
    v.procs
        .iter()
        .filter_map(|p| match p.role {
            Role::Web { index, port } => Some((index, port)),
            Role::Background { .. } => None,
        })
        .collect()
}
