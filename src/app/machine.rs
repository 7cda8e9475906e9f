//! The app worker's state machine: what the worker is doing ([`Life`]), what each process is
//! doing ([`ProcState`]), and every transition, driven by [`Event`]s. It touches the world,
//! the clock included, only through [`Effects`], so it is unit-tested with a fake spawner and
//! a fake clock (`tests.rs` beside this file); `world.rs` is the real thing.
//!
//! [`Machine::step`] takes what the worker's loop received (or a [`Event::Tick`] when a
//! deadline came): it merges commands queued together, holds commands while frozen for an
//! upgrade, defers everything while resting after a snapshot, and hands each event to
//! [`Machine::on`], the table: one `match` over (where the worker is, the event) whose arms
//! name the transition. The transitions themselves are below it (deploys), in `supervise.rs`
//! (exits, restarts, ports, drains, retries, stops) and `freeze.rs` (upgrades).
//! `docs/lifecycle.md` draws the states and says who owns what.
//!
//! The slow work runs elsewhere and comes back as events: the deploy's stages (unpack,
//! readiness, switch), stopping a version or the rest of an exited process's group, taking the
//! site out of Nginx, and Nginx's answer to the site rendered again. So the one loop keeps
//! restarting the serving version's processes while an old version takes its `stop-timeout`
//! to stop or Nginx its `reload-timeout` to answer.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::deploy::{Check, PrepareJob, Prepared, SwitchJob};
use super::error::{DeployError, NotReady};
use super::version::{FileStamp, ProcState, Role, Version};
use super::{Command, Effects, Refusal, Reply};
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
    /// A version handed to [`Effects::discard`] is stopped: its processes ended, its ports
    /// given back, its folder deleted.
    Discarded {
        version: u64,
    },
    /// What was left of the group of an exited leader is stopped ([`Effects::reap`]).
    Reaped {
        pid: i32,
    },
    /// Nginx took the serving version `version`'s site rendered again, or its removal (or
    /// did not), after [`Effects::refresh_site`].
    Refreshed {
        version: u64,
        result: Result<u64, DeployError>,
    },
    /// The app's site is out of Nginx (or Nginx did not take its removal), after
    /// [`Effects::leave_nginx`].
    SiteRemoved {
        result: Result<u64, crate::nginx::NginxError>,
    },
    /// Health check `seq` of process `proc` of version `version` is done (`health.rs`).
    Checked {
        version: u64,
        proc: usize,
        seq: u64,
        outcome: super::health::Outcome,
    },
    /// Stop everything and end the worker.
    Shutdown,
    /// A step of an in-place upgrade (`freeze.rs`).
    Handover(Handover),
    /// The moment [`Machine::next_deadline`] named has come.
    Tick,
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
///
/// Versions and the deploy are boxed: a transition moves the life by value (`Life::turn`),
/// and a `Version` inline made each of those moves copy kilobytes through the worker's stack;
/// boxed, a move is a few words.
pub(super) enum Life {
    /// No version serves and nothing is under way.
    Idle(Why),
    Serving(Box<Version>),
    Deploying {
        serving: Option<Box<Version>>,
        deploy: Box<Deploy>,
    },
    /// Stopping, but a stage of `deploy` is still in flight (an unpack or a switch cannot be
    /// interrupted); once it is back, everything is stopped. `exit`: then end the worker.
    Stopping {
        serving: Option<Box<Version>>,
        deploy: Box<Deploy>,
        exit: bool,
    },
    /// Leaving Nginx (`removing`: the versions that wait for the site's removal to come
    /// back, [`Event::SiteRemoved`]), then its versions being stopped
    /// ([`Machine::discarding`]); once the last is, the stop is complete (`Idle(Stopped)`, or
    /// `Ended` with `exit`), and then `pending`, a deploy received meanwhile, is acted on.
    Leaving {
        exit: bool,
        pending: Option<Command>,
        // Boxed as they were in the life, and as `Effects::discard` takes them.
        #[allow(clippy::vec_box)]
        removing: Option<Vec<Box<Version>>>,
    },
    /// The worker has stopped everything and ends.
    Ended,
}

impl Life {
    /// Moves the life to the one `next` makes of it by value, and returns what `next` hands
    /// back (the parts of the old life that the caller acts on). `next` has the life alone,
    /// not the machine: no code runs between the old life and the new one, so the value
    /// that holds the place meanwhile is never seen. Should `next` panic, the worker's
    /// thread ends with the machine, and `Ended` is what the life is then.
    pub(super) fn turn<R>(&mut self, next: impl FnOnce(Life) -> (Life, R)) -> R {
        let (life, handed) = next(std::mem::replace(self, Life::Ended));
        *self = life;
        handed
    }

    /// The deploy under way, in `Deploying` or `Stopping`.
    pub(super) fn deploy_mut(&mut self) -> Option<&mut Deploy> {
        match self {
            Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } => Some(deploy),
            _ => None,
        }
    }
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
    /// An operator's restart or rollback: answered once the deploy ends.
    pub asked: Option<Reply>,
    /// This deploy rolls back to an earlier release.
    pub rollback: Option<super::releases::Rollback>,
}

/// Where a deploy is.
pub(super) enum Stage {
    /// Unpacking, validating, claiming hosts, provisioning, planning processes.
    Unpacking,
    /// The candidate's processes run; its webapps' health checks are polled.
    Readiness(Box<Version>),
    /// Nginx is taking the candidate's site.
    Switching(Box<Version>),
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
    pub version: Box<Version>,
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

/// A refresh of the serving version's site that Nginx has not answered yet
/// ([`Machine::refresh`]), and what it was asked for.
pub(super) struct Refreshing {
    pub version: u64,
    /// It renders new certificates (`refresh_due`).
    pub certificate: bool,
    /// It routes to webapps' moved ports (`reroute_due`).
    pub reroute: bool,
    /// It renders the site as this keter writes it (`rewrite_due`): with neither of the
    /// above, Nginx takes it only if the file comes out otherwise than the live one.
    pub rewrite: bool,
    /// It takes the site out of Nginx: a webapp has no port it may use.
    pub stranded: bool,
    /// The webapps' ports it routes to.
    pub ports: Vec<(usize, u16)>,
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
    /// Versions handed to [`Effects::discard`] whose stop has not come back yet
    /// ([`Event::Discarded`]): their processes may still run.
    pub discarding: Vec<u64>,
    /// Exited leaders whose group is being stopped ([`Event::Reaped`]).
    pub reaping: Vec<i32>,
    /// Resting after a snapshot for an upgrade (`freeze.rs`): the events that arrive are kept
    /// here, in order, and handled only if the upgrade does not happen.
    pub resting: Option<Vec<Event>>,
    /// The daemon's answer for a freeze, sent once nothing is in flight ([`Machine::quiet`]).
    pub quiet_reply: Option<crossbeam_channel::Sender<()>>,
    /// A refresh that failed (Nginx did not take it) is tried again at this moment.
    pub refresh_retry_at: Option<Instant>,
    /// The refresh Nginx has not answered yet.
    pub refreshing: Option<Refreshing>,
    /// A webapp of the serving version (or of a candidate being switched) moved to another
    /// port, or has none it may use: the serving version's site is rendered again (or taken
    /// out of Nginx) as soon as no switch is in flight, a deploy under way or not
    /// (`supervise.rs`, `watch_ports`).
    pub reroute_due: bool,
    /// The app's releases (`releases.rs`): added to at each switch to another bundle.
    pub releases: super::releases::Releases,
    /// In maintenance (`maintenance.rs`): every site rendered answers 503 with its page.
    pub maintenance: Option<super::maintenance::Maintenance>,
    /// The operator waiting for maintenance to reach Nginx.
    pub maintenance_reply: Option<Reply>,
    /// A health check's result changed what the report shows: the step publishes (a result
    /// that changed nothing does not, as a tick that only looked does not).
    pub health_news: bool,
    /// The release watched after its switch for an automatic rollback (`autorollback.rs`).
    pub watch: Option<super::autorollback::Watch>,
    /// The last rollback keter made by itself, for the report.
    pub auto_rollback: Option<crate::report::AutoRollbackReport>,
}

/// Where the worker is, as the table ([`Machine::on`]) tells states apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Idle or Serving: nothing under way.
    Settled,
    /// A deploy (id) is under way (`Deploying`, or `Stopping` until its stage is back).
    Deploy(u64, StageAt),
    Leaving,
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageAt {
    Unpacking,
    Readiness(u64),
    Switching(u64),
}

/// How a deploy ended.
pub(super) enum End {
    Deployed,
    SameContent(Option<FileStamp>),
    Superseded,
    /// A stop, keter's shutdown or an upgrade's freeze interrupted it.
    Stopped(&'static str),
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
            refreshing: None,
            reroute_due: false,
            releases: Default::default(),
            maintenance: None,
            maintenance_reply: None,
            health_news: false,
            watch: None,
            auto_rollback: None,
            discarding: Vec::new(),
            reaping: Vec::new(),
            resting: None,
            quiet_reply: None,
        }
    }

    pub fn ended(&self) -> bool {
        matches!(self.life, Life::Ended)
    }

    /// The earliest moment something is due: a restart, a drain check, a deploy retry. `None`
    /// when nothing is, so an idle app costs no wake-ups at all.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.resting.is_some() {
            return None;
        }
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
        restarts
            .chain(drains)
            .chain(retry)
            .chain(refresh)
            .chain(self.health_deadline())
            .chain(self.watch_deadline())
            .min()
    }

    /// True when the serving version's site is to be rendered again: for a new certificate
    /// once `Serving`; for a moved port as soon as no switch is in flight (a deploy under way
    /// takes long, and Nginx would route to the old port meanwhile; a switch in flight writes
    /// the same file, so it is waited for). Never while frozen: Nginx's controller may be
    /// frozen too, and the next keter sees the difference (`adopt.rs`).
    pub(super) fn site_wanted(&self) -> bool {
        if self.frozen || self.refreshing.is_some() {
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
            Life::Serving(v) => (Some(&**v), None),
            Life::Deploying { serving, deploy }
            | Life::Stopping {
                serving, deploy, ..
            } => {
                let c = match &deploy.stage {
                    Stage::Readiness(c) | Stage::Switching(c) => Some(c),
                    Stage::Unpacking => None,
                };
                (serving.as_deref(), c.map(|c| &**c))
            }
            Life::Idle(_) | Life::Leaving { .. } | Life::Ended => (None, None),
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
                let mut out: Vec<&mut Version> = serving.iter_mut().map(|v| &mut **v).collect();
                if let Stage::Readiness(c) | Stage::Switching(c) = &mut deploy.stage {
                    out.push(c);
                }
                out
            }
            Life::Idle(_) | Life::Leaving { .. } | Life::Ended => Vec::new(),
        }
    }

    pub(super) fn serving(&self) -> Option<&Version> {
        match &self.life {
            Life::Serving(v) => Some(v),
            Life::Deploying { serving, .. } | Life::Stopping { serving, .. } => serving.as_deref(),
            Life::Idle(_) | Life::Leaving { .. } | Life::Ended => None,
        }
    }

    /// Takes what the worker's loop received together, in order (or a lone [`Event::Tick`]),
    /// then does the timed work that is due and publishes the app's report and record if
    /// anything changed; answers a freeze once nothing is in flight.
    ///
    /// Commands queued together are merged: only the newest is acted on (the older ones are
    /// moot), after the other events queued with them; a `Shutdown` among them drops them,
    /// and a `Handover` step is taken after the newest.
    pub fn step(&mut self, events: Vec<Event>, fx: &mut dyn Effects) {
        let mut handled = false;
        let mut events = events.into_iter();
        while let Some(e) = events.next() {
            handled |= !matches!(e, Event::Tick | Event::Checked { .. });
            match e {
                Event::Command(first) if self.resting.is_none() && !self.frozen => {
                    self.commands += 1;
                    let mut newest = first;
                    let mut after = None;
                    for e in events.by_ref() {
                        match e {
                            Event::Command(c) => {
                                self.commands += 1;
                                newest = c;
                            }
                            Event::Shutdown | Event::Handover(_) => {
                                after = Some(e);
                                break;
                            }
                            other => self.on(other, fx),
                        }
                    }
                    match after {
                        Some(Event::Shutdown) => self.on(Event::Shutdown, fx),
                        Some(h) => {
                            self.command(newest, fx);
                            self.on(h, fx);
                        }
                        None => self.command(newest, fx),
                    }
                }
                other => self.on(other, fx),
            }
        }
        if self.resting.is_some() {
            return;
        }
        // A tick that only looked changed nothing to publish (the looks at a port every
        // PORT_WATCH while a webapp waits for its restart would otherwise rebuild the report
        // and the record each time).
        let news = std::mem::take(&mut self.health_news);
        if self.tick(fx) || handled || news {
            self.publish(fx);
        }
        if self.quiet()
            && let Some(reply) = self.quiet_reply.take()
        {
            fx.answer(reply);
        }
    }

    /// Publishes the app's report (for the status interface) and its record (for a later
    /// keter).
    pub(super) fn publish(&self, fx: &mut dyn Effects) {
        let report = self.report(fx.log_lines_dropped(), fx.wall_clock());
        fx.publish(report, self.to_record());
    }

    /// The table: one event, where the worker is. Each arm names the transition; an event
    /// that no longer matches what is under way (the result of a stage that was dropped, an
    /// exit of a process already replaced) is handled as stale.
    ///
    /// | where | event | transition |
    /// |---|---|---|
    /// | resting after a snapshot | anything but `Thaw` | kept for after the thaw |
    /// | any | `Freeze`, `Snapshot`, `Thaw` | `freeze.rs` |
    /// | frozen | a command | held (the newest) |
    /// | Ended | a command | none |
    /// | any | `Stop` | [`Machine::stop`] |
    /// | Idle, Serving | `Deploy` | [`Machine::deploy_command`]: begin, unless nothing changed |
    /// | Deploying | `Deploy` | pending; supersedes a candidate in readiness |
    /// | Stopping, Leaving | `Deploy` | pending until the stop is complete |
    /// | any | `Shutdown` | [`Machine::stop`] and end |
    /// | Deploying/Stopping{Unpacking} of the same id | `Prepared` | [`Machine::prepared`] |
    /// | Deploying{Readiness} of the same version | `Ready` | switch, or fail the candidate |
    /// | Serving, settled | `Ready` of a fresh process replacing an unhealthy one | `health.rs`: switch to it, or keep the old one and retry |
    /// | Deploying/Stopping{Switching} of the same version | `Switched` | [`Machine::switched`] |
    /// | Deploying{Readiness} | `Exited` of a candidate's webapp | fail the candidate |
    /// | any | `Exited` | [`Machine::exited`]: restart policy, or accounted for |
    /// | any | `Refreshed` | [`Machine::refreshed`]: moot unless its version still serves |
    /// | Leaving | `SiteRemoved` | [`Machine::left_nginx`]: its versions handed to be stopped |
    /// | any | `Discarded`, `Reaped` | in flight no more; a stop may be complete |
    /// | any | `Certificate` | `refresh_due` |
    /// | any | `Checked` | `health.rs`: counted only while settled and not late |
    /// | any | `Tick` | none here: [`Machine::tick`] runs after every step |
    pub fn on(&mut self, event: Event, fx: &mut dyn Effects) {
        if let Some(later) = &mut self.resting {
            match event {
                Event::Handover(Handover::Thaw) => {}
                other => {
                    later.push(other);
                    return;
                }
            }
        }
        let at = self.at();
        match (at, event) {
            (_, Event::Handover(Handover::Freeze(reply))) => {
                self.freeze(fx);
                self.quiet_reply = Some(reply);
            }
            (_, Event::Handover(Handover::Snapshot(reply))) => {
                self.publish(fx);
                fx.answer(reply);
                self.resting = Some(Vec::new());
            }
            (_, Event::Handover(Handover::Thaw)) => self.thaw(fx),
            (_, Event::Command(c)) if self.frozen => self.hold(c),
            (At::Ended, Event::Command(_)) => self.commands += 1,
            (_, Event::Command(c)) => {
                self.commands += 1;
                self.command(c, fx);
            }
            (_, Event::Shutdown) => self.stop(true, fx),
            (At::Deploy(id, StageAt::Unpacking), Event::Prepared { id: got, result })
                if id == got =>
            {
                self.prepared(result, fx)
            }
            (_, Event::Prepared { result, .. }) => {
                if let Ok(Prepared::Version(v)) = result {
                    self.discard(v, fx);
                }
            }
            (At::Deploy(_, StageAt::Readiness(c)), Event::Ready { version, result })
                if c == version =>
            {
                match result {
                    Ok(()) => self.ready(fx),
                    Err(e) => self.fail_candidate(End::Failed(e), fx),
                }
            }
            (_, Event::Ready { version, result }) => {
                // A fresh process in place of an unhealthy one; else stale.
                if let Some(i) = self.replacing(version) {
                    self.replacement_ready(i, result, fx)
                }
            }
            (At::Deploy(_, StageAt::Switching(c)), Event::Switched { version, result })
                if c == version =>
            {
                self.switched(result, fx)
            }
            (_, Event::Switched { .. }) => {}
            (
                At::Deploy(_, StageAt::Readiness(c)),
                Event::Exited {
                    version,
                    proc,
                    pid,
                    status,
                },
            ) if c == version && self.candidate_webapp(proc, pid) => {
                self.candidate_exited(version, proc, pid, status, fx)
            }
            (
                _,
                Event::Exited {
                    version,
                    proc,
                    pid,
                    status,
                },
            ) => self.exited(version, proc, pid, status, fx),
            (_, Event::Discarded { version }) => {
                self.discarding.retain(|v| *v != version);
                self.leave_if_done(fx);
            }
            (_, Event::Reaped { pid }) => self.reaping.retain(|p| *p != pid),
            (_, Event::Refreshed { version, result }) => self.refreshed(version, result, fx),
            (At::Leaving, Event::SiteRemoved { result }) => self.left_nginx(result, fx),
            (_, Event::SiteRemoved { .. }) => {}
            (_, Event::Certificate { hosts }) => {
                log::info!(
                    "{}: a new certificate for {hosts}; the site is rendered again with it",
                    self.name
                );
                self.refresh_due = true;
            }
            (
                _,
                Event::Checked {
                    version,
                    proc,
                    seq,
                    outcome,
                },
            ) => self.checked(version, proc, seq, outcome, fx),
            (_, Event::Tick) => {}
        }
    }

    /// Where the worker is, for the table.
    fn at(&self) -> At {
        match &self.life {
            Life::Idle(_) | Life::Serving(_) => At::Settled,
            Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } => At::Deploy(
                deploy.id,
                match &deploy.stage {
                    Stage::Unpacking => StageAt::Unpacking,
                    Stage::Readiness(c) => StageAt::Readiness(c.id),
                    Stage::Switching(c) => StageAt::Switching(c.id),
                },
            ),
            Life::Leaving { .. } => At::Leaving,
            Life::Ended => At::Ended,
        }
    }

    /// True when process `proc` of the candidate in readiness is a webapp running as `pid`.
    fn candidate_webapp(&self, proc: usize, pid: i32) -> bool {
        let Life::Deploying { deploy, .. } = &self.life else {
            return false;
        };
        let Stage::Readiness(c) = &deploy.stage else {
            return false;
        };
        c.procs.get(proc).is_some_and(|p| {
            p.running().is_some_and(|r| r.pid == pid) && matches!(p.role, Role::Web { .. })
        })
    }

    /// Acts on a command (the table has decided that it is to be acted on now).
    pub(super) fn command(&mut self, c: Command, fx: &mut dyn Effects) {
        match c {
            Command::Deploy { path, retry } => self.deploy_command(path, retry, fx),
            Command::Stop => self.stop(false, fx),
            Command::Restart { path, reply } => self.restart_command(path, reply, fx),
            Command::Rollback {
                path,
                to,
                by,
                reply,
            } => self.rollback_command(path, to, by, reply, fx),
            Command::Maintenance { on, reply } => self.maintenance_command(on, reply, fx),
        }
    }

    /// The maintenance page, while the app is in maintenance.
    fn page(&self) -> Option<String> {
        self.maintenance
            .as_ref()
            .map(|m| super::maintenance::page(&self.name, m))
    }

    /// `Maintenance`: kept, then the serving version's site rendered again with (or
    /// without) the page; the operator is answered once Nginx has it. With nothing serving,
    /// the next deploy's site has it.
    fn maintenance_command(
        &mut self,
        on: Option<super::maintenance::Maintenance>,
        mut reply: Reply,
        fx: &mut dyn Effects,
    ) {
        let what = if on.is_some() { "on" } else { "off" };
        log::info!("{}: maintenance {what}", self.name);
        self.maintenance = on;
        fx.save_maintenance(self.maintenance.as_ref());
        if let Some(mut older) = self.maintenance_reply.take() {
            older.refuse(Refusal::Superseded {
                app: self.name.clone(),
            });
        }
        if self.serving().is_some() {
            self.refresh_due = true;
            self.refresh_retry_at = None;
            self.maintenance_reply = Some(reply);
        } else {
            reply.done(format!(
                "{}: maintenance {what}; no version serves now, the next deploy's site has it",
                self.name
            ));
        }
    }

    /// A `Rollback`: puts the kept bundle of the earlier release in `incoming/` (the source
    /// of truth, so that a rescan or a keter started again keeps it) and deploys it from
    /// there as any bundle; once switched, the release it replaced is marked rolled back.
    fn rollback_command(
        &mut self,
        path: PathBuf,
        to: Option<u64>,
        by: u32,
        mut reply: Reply,
        fx: &mut dyn Effects,
    ) {
        let name = self.name.clone();
        let mut refuse = |why: String| {
            log::info!("{name}: rollback refused: {why}");
            reply.refuse(Refusal::NotDone {
                app: name.clone(),
                not: "not rolled back",
                why,
            });
        };
        match &self.life {
            Life::Serving(_) => {}
            Life::Idle(_) => return refuse("no version serves".into()),
            Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } => {
                return refuse(format!("a deploy is under way ({})", deploy.stage.name()));
            }
            Life::Leaving { .. } | Life::Ended => return refuse("the app is stopping".into()),
        }
        let target = match to {
            Some(n) => self.releases.get(n),
            None => self.releases.previous(),
        };
        let Some(target) = target.cloned() else {
            return refuse(match to {
                Some(n) => format!("no release {n} is kept (keter releases {name} lists them)"),
                None => "there is no earlier release to go back to".into(),
            });
        };
        if self.serving().is_some_and(|v| v.sha256 == target.sha256) {
            return refuse(format!("release {} is the bundle serving", target.number));
        }
        let reason = match self.releases.current().map(|c| c.number) {
            Some(c) => format!("release {c} rolled back to {} by uid {by}", target.number),
            None => format!("rolled back to release {} by uid {by}", target.number),
        };
        log::info!(
            "{}: rolling back to release {} (asked by uid {by})",
            self.name,
            target.number
        );
        if let Err((why, mut reply)) = self.roll_back(
            path,
            &target,
            super::releases::Ended::RolledBack,
            reason,
            reply,
            fx,
        ) {
            log::info!("{name}: rollback refused: {why}");
            reply.refuse(Refusal::NotDone {
                app: name,
                not: "not rolled back",
                why,
            });
        }
    }

    /// Deploys release `target` again, by an operator or by keter itself (`autorollback.rs`):
    /// puts its kept bundle at `path` in `incoming/` (the source of truth, so that a rescan
    /// or a keter started again keeps it) and deploys it from there as any bundle; once
    /// switched, the release it replaced is marked as `how` ended, with `reason`. `reply` is
    /// answered when the deploy ends; given back with why when the bundle could not be
    /// placed.
    pub(super) fn roll_back(
        &mut self,
        path: PathBuf,
        target: &super::releases::Release,
        how: super::releases::Ended,
        reason: String,
        reply: Reply,
        fx: &mut dyn Effects,
    ) -> Result<(), (String, Reply)> {
        if let Err(e) = fx.place_release(&target.sha256, target.deployed_by, &path) {
            return Err((
                format!("its bundle could not be put in incoming/: {e}"),
                reply,
            ));
        }
        log::info!(
            "{}: incoming/{}.keter is the bundle of release {} now",
            self.name,
            self.name,
            target.number
        );
        let stamp = fx.stamp(&path);
        self.begin(path, stamp, None, false, fx);
        if let Life::Deploying { deploy, .. } = &mut self.life {
            deploy.asked = Some(reply);
            deploy.rollback = Some(super::releases::Rollback {
                to: target.number,
                sha256: target.sha256.clone(),
                how,
                reason,
            });
        }
        Ok(())
    }

    /// A `Restart`: deploys the serving version's bundle again even though its content is
    /// the same, so that fresh processes take over through the switch as at any deploy. Only
    /// when a version serves, nothing is under way, and `incoming/` still holds the very file
    /// it was deployed from (a newer file there is a deploy of its own, not a restart).
    fn restart_command(&mut self, path: PathBuf, mut reply: Reply, fx: &mut dyn Effects) {
        let refused = match &self.life {
            Life::Serving(v) if fx.stamp(&path) == Some(v.stamp) => None,
            Life::Serving(_) => Some(format!(
                "incoming/{}.keter is not the bundle serving (it changed since that deploy); \
                 a SIGHUP deploys it",
                self.name
            )),
            Life::Idle(_) => Some("no version serves".to_string()),
            Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } => Some(format!(
                "a deploy is under way ({}); its new processes replace the serving ones anyway",
                deploy.stage.name()
            )),
            Life::Leaving { .. } | Life::Ended => Some("the app is stopping".to_string()),
        };
        if let Some(why) = refused {
            log::info!("{}: restart refused: {why}", self.name);
            reply.refuse(Refusal::NotDone {
                app: self.name.clone(),
                not: "not restarted",
                why,
            });
            return;
        }
        log::info!(
            "{}: restarting: fresh processes of the serving version",
            self.name
        );
        let stamp = fx.stamp(&path);
        self.begin(path, stamp, None, true, fx);
        if let Life::Deploying { deploy, .. } = &mut self.life {
            deploy.asked = Some(reply);
        }
    }

    /// A `Deploy`: begins it, unless it is the file already serving or being deployed, or the
    /// unchanged file whose deploy failed last; during a deploy it is the pending command
    /// (superseding a candidate in readiness); during a stop it waits for the stop.
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
                    self.fail_candidate(End::Superseded, fx);
                }
                return;
            }
            Life::Stopping { deploy, exit, .. } => {
                if !*exit {
                    deploy.pending = Some(Command::Deploy { path, retry });
                }
                return;
            }
            Life::Leaving { exit, pending, .. } => {
                if !*exit {
                    *pending = Some(Command::Deploy { path, retry });
                }
                return;
            }
            Life::Ended => return,
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
        self.begin(path, stamp, retries, false, fx);
    }

    /// Starts the unpack stage of a deploy.
    /// With `force`, the bundle is deployed even when its content is the serving version's
    /// (a restart).
    pub(super) fn begin(
        &mut self,
        path: PathBuf,
        stamp: Option<FileStamp>,
        retries: Option<Backoff>,
        force: bool,
        fx: &mut dyn Effects,
    ) {
        let serving_sha256 = match &self.life {
            Life::Serving(v) => Some(v.sha256.clone()),
            Life::Idle(_) => None,
            _ => return,
        };
        let id = fx.next_id();
        let started = fx.now();
        fx.prepare(PrepareJob {
            id,
            path: path.clone(),
            serving_sha256: serving_sha256.filter(|_| !self.replace && !force),
            started,
        });
        let deploy = Box::new(Deploy {
            id,
            path,
            stamp,
            started,
            stage: Stage::Unpacking,
            pending: None,
            retries,
            asked: None,
            rollback: None,
        });
        self.life.turn(|life| {
            let serving = match life {
                Life::Serving(v) => Some(v),
                _ => None,
            };
            (Life::Deploying { serving, deploy }, ())
        });
    }

    /// The unpack stage of the deploy under way came back.
    fn prepared(&mut self, result: Result<Prepared, DeployError>, fx: &mut dyn Effects) {
        let (stopping, superseded, stamp, started) = match &self.life {
            Life::Deploying { deploy, .. } => {
                (None, deploy.pending.is_some(), deploy.stamp, deploy.started)
            }
            Life::Stopping { deploy, exit, .. } => {
                (Some(*exit), true, deploy.stamp, deploy.started)
            }
            _ => unreachable!("the table matched an unpack"),
        };
        let mut candidate = match result {
            Ok(Prepared::Version(v)) if !superseded => v,
            Ok(Prepared::Version(v)) => {
                self.discard(v, fx);
                let end = match stopping {
                    Some(exit) => End::Stopped(stop_reason(exit)),
                    None => End::Superseded,
                };
                return self.conclude(None, end, fx);
            }
            Ok(Prepared::SameContent) => {
                return self.conclude(None, End::SameContent(stamp), fx);
            }
            Err(e) => return self.conclude(None, End::Failed(e), fx),
        };
        self.deploys += 1;
        candidate.deploy = self.deploys;
        if let Err(e) = start_all(&mut candidate, fx) {
            self.discard(candidate, fx);
            return self.conclude(None, End::Failed(e), fx);
        }
        let checks = readiness_checks(&candidate, fx.readiness_timeout());
        let stage = if checks.is_empty() {
            fx.switch(switch_job(&candidate, started, self.page()));
            Stage::Switching(candidate)
        } else {
            fx.readiness(candidate.id, checks);
            Stage::Readiness(candidate)
        };
        if let Some(deploy) = self.life.deploy_mut() {
            deploy.stage = stage;
        }
    }

    /// Every webapp of the candidate answered its health check: the switch begins.
    fn ready(&mut self, fx: &mut dyn Effects) {
        let page = self.page();
        if let Some(deploy) = self.life.deploy_mut()
            && let Stage::Readiness(c) = std::mem::replace(&mut deploy.stage, Stage::Unpacking)
        {
            fx.switch(switch_job(&c, deploy.started, page));
            deploy.stage = Stage::Switching(c);
        }
    }

    /// A webapp of the candidate in readiness exited: the deploy fails at once.
    fn candidate_exited(
        &mut self,
        version: u64,
        proc: usize,
        pid: i32,
        status: Option<ExitStatus>,
        fx: &mut dyn Effects,
    ) {
        self.reap(pid, fx);
        if let Life::Deploying { deploy, .. } = &mut self.life
            && let Stage::Readiness(c) = &mut deploy.stage
        {
            c.procs[proc].state = ProcState::Ended;
        }
        let last = fx.cancel(version);
        let e = DeployError::NotReady(NotReady::Exited {
            status,
            last,
            output: fx.last_output(),
        });
        self.fail_candidate(End::Failed(e), fx);
    }

    /// Hands a version to a stage that stops its processes, gives its ports back and deletes
    /// its folder; [`Event::Discarded`] comes back.
    pub(super) fn discard(&mut self, mut version: Box<Version>, fx: &mut dyn Effects) {
        self.drop_replacements(&mut version, fx);
        self.discarding.push(version.id);
        fx.discard(version);
    }

    /// Hands the rest of an exited leader's group to a stage that stops it;
    /// [`Event::Reaped`] comes back.
    pub(super) fn reap(&mut self, pid: i32, fx: &mut dyn Effects) {
        self.reaping.push(pid);
        fx.reap(pid);
    }

    /// Renders the serving version's site again (its `ssl: acme` certificates and its
    /// webapps' ports as they are now) and hands it to Nginx; or, when a webapp of it has no
    /// port it may use, hands Nginx the site's removal. Nginx's answer comes back as
    /// [`Event::Refreshed`] ([`Machine::refreshed`]): meanwhile the worker restarts processes
    /// and takes commands. One refresh at a time: one asked for meanwhile (`site_wanted`)
    /// waits for the answer. The change is handed to Nginx here, on the worker's thread, so a
    /// switch or a stop's removal that the worker starts later reaches Nginx after it.
    pub(super) fn refresh(&mut self, fx: &mut dyn Effects) {
        if self.refreshing.is_some() {
            return;
        }
        let Some(v) = self.serving() else {
            self.reroute_due = false;
            return;
        };
        // A certificate's refresh waits for a version to serve; one made for a moved port
        // during a deploy leaves it pending.
        let serving = matches!(self.life, Life::Serving(_));
        let certificate = self.refresh_due && serving;
        let reroute = self.reroute_due;
        let rewrite = self.rewrite_due && serving;
        let rewrite_only = !certificate && !reroute;
        let stranded = v.procs.iter().any(|p| p.stranded);
        let job = (!stranded).then(|| switch_job(v, fx.now(), self.page()));
        let version = v.id;
        let refreshing = Refreshing {
            version,
            certificate,
            reroute,
            rewrite,
            stranded,
            ports: web_ports(v),
        };
        // Taken now: what is asked for while Nginx has this one is done after it.
        self.reroute_due = false;
        self.refresh_due &= !certificate;
        self.rewrite_due &= !rewrite;
        self.refresh_retry_at = None;
        self.refreshing = Some(refreshing);
        fx.refresh_site(version, job, rewrite_only);
    }

    /// Nginx's answer to [`Machine::refresh`]. An answer for a version that no longer serves
    /// is moot: the switch or the stop that came after it reached Nginx after it.
    pub(super) fn refreshed(
        &mut self,
        version: u64,
        result: Result<u64, DeployError>,
        fx: &mut dyn Effects,
    ) {
        let Some(r) = self.refreshing.take_if(|r| r.version == version) else {
            return;
        };
        if self.serving().is_none_or(|v| v.id != version) {
            if let Some(mut reply) = self.maintenance_reply.take() {
                reply.done(format!(
                    "{}: maintenance {}; the app's site changed since (a switch or a stop) and has it as it is now",
                    self.name,
                    if self.maintenance.is_some() {
                        "on"
                    } else {
                        "off"
                    }
                ));
            }
            return;
        }
        match result {
            Ok(g) => {
                if r.stranded {
                    log::error!(
                        "{}: removed from Nginx at generation {g}: a webapp's port is held by someone else and no other port is free; it comes back once one is",
                        self.name
                    );
                } else if r.reroute {
                    let ports: Vec<u16> = r.ports.iter().map(|(_, p)| *p).collect();
                    log::info!(
                        "{}: Nginx routes to ports {ports:?} from generation {g}",
                        self.name
                    );
                } else if let Some(mut reply) = self.maintenance_reply.take() {
                    let what = if self.maintenance.is_some() {
                        "on"
                    } else {
                        "off"
                    };
                    log::info!(
                        "{}: maintenance {what}: Nginx runs it at generation {g}",
                        self.name
                    );
                    reply.done(format!(
                        "{}: maintenance {what} (Nginx generation {g})",
                        self.name
                    ));
                } else if !r.certificate {
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
                // Nginx no longer routes to the hung processes that fresh ones replaced.
                self.stop_superseded(fx);
            }
            Err(e) => {
                // Asked for again, as it was.
                self.reroute_due |= r.reroute;
                self.refresh_due |= r.certificate;
                self.rewrite_due |= r.rewrite;
                let retry = if r.reroute {
                    REROUTE_RETRY
                } else {
                    REFRESH_RETRY
                };
                self.refresh_retry_at = Some(fx.now() + retry);
                let why = if r.reroute {
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
                if let Some(mut reply) = self.maintenance_reply.take() {
                    reply.refuse(Refusal::SiteNotTaken {
                        app: self.name.clone(),
                        error: e.to_string(),
                        retry,
                    });
                }
            }
        }
    }

    /// Nginx took the candidate's site (or did not).
    fn switched(&mut self, result: Result<(), DeployError>, fx: &mut dyn Effects) {
        let Some(deploy) = self.life.deploy_mut() else {
            unreachable!("the table matched a switch");
        };
        let Stage::Switching(mut candidate) =
            std::mem::replace(&mut deploy.stage, Stage::Unpacking)
        else {
            unreachable!("the table matched a switch");
        };
        let (path, rollback) = (deploy.path.clone(), deploy.rollback.clone());
        match result {
            Ok(()) => {
                candidate.live_since = Some(fx.wall_clock());
                if let Some(mut arrival) = candidate.arrival.take() {
                    arrival.rollback = rollback;
                    let at = rfc3339(fx.wall_clock());
                    // The app's own keep-releases, over the global one.
                    let keep = candidate
                        .config
                        .keep_releases
                        .unwrap_or_else(|| fx.keep_releases());
                    if self.releases.switched(arrival, at, keep) {
                        fx.write_releases(&self.releases);
                        let window = candidate
                            .config
                            .rollback_window
                            .unwrap_or_else(|| fx.rollback_defaults().window);
                        self.watch_release(candidate.id, candidate.deploy, path, window, fx);
                    } else {
                        // The same release again (`keter restart`): the operator acted.
                        self.watch = None;
                    }
                }
                self.conclude(Some(candidate), End::Deployed, fx);
            }
            Err(e) => {
                self.discard(candidate, fx);
                self.conclude(None, End::Failed(e), fx);
            }
        }
    }

    /// Ends a deploy in the readiness stage: stops its checks and its processes.
    pub(super) fn fail_candidate(&mut self, end: End, fx: &mut dyn Effects) {
        let Some(deploy) = self.life.deploy_mut() else {
            return;
        };
        if !matches!(deploy.stage, Stage::Readiness(_)) {
            return;
        }
        let Stage::Readiness(c) = std::mem::replace(&mut deploy.stage, Stage::Unpacking) else {
            unreachable!("matched above");
        };
        fx.cancel(c.id);
        self.discard(c, fx);
        self.conclude(None, end, fx);
    }

    /// The deploy is over (its candidate is discarded, or is `switched_in`, which then
    /// serves in place of the version that served, now draining): settles the life, records
    /// the result, then acts on a stop that waited for it or on the newest command received
    /// meanwhile.
    fn conclude(&mut self, switched_in: Option<Box<Version>>, end: End, fx: &mut dyn Effects) {
        let (mut deploy, stopping, replaced) =
            self.settle(switched_in, matches!(end, End::Failed(_)));
        if let Some(old) = replaced {
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
        // Nothing serves: no site is left to route to a moved port.
        self.reroute_due &= self.serving().is_some();
        self.release_unused_hosts(fx);
        self.record(&mut deploy, end, fx);
        match (stopping, deploy.pending) {
            (Some(exit), pending) => {
                self.stop(exit, fx);
                if let (Life::Leaving { pending: p, .. }, false) = (&mut self.life, exit) {
                    *p = pending;
                } else if let (Some(c), false) = (pending, exit) {
                    self.command(c, fx);
                }
            }
            (None, Some(c)) => self.command(c, fx),
            (None, None) => {}
        }
    }

    /// Settles the life at the end of the deploy under way: `Serving` (`switched_in`, or the
    /// version that served on) or `Idle`. Returns the deploy, whether a stop waited for it
    /// (and then whether to exit), and the version `switched_in` replaced. Not inlined: the
    /// lives it moves stay out of [`Machine::conclude`]'s frame, which the rest of the
    /// deploy's end runs below.
    #[inline(never)]
    fn settle(
        &mut self,
        switched_in: Option<Box<Version>>,
        failed: bool,
    ) -> (Box<Deploy>, Option<bool>, Option<Box<Version>>) {
        let ended = self.life.turn(|life| {
            let (serving, deploy, stopping) = match life {
                Life::Deploying { serving, deploy } => (serving, deploy, None),
                Life::Stopping {
                    serving,
                    deploy,
                    exit,
                } => (serving, deploy, Some(exit)),
                other => return (other, None),
            };
            let (serving, replaced) = match switched_in {
                Some(v) => (Some(v), serving),
                None => (serving, None),
            };
            let settled = match serving {
                Some(v) => Life::Serving(v),
                None if failed => Life::Idle(Why::Failed),
                None => Life::Idle(Why::New),
            };
            (settled, Some((deploy, stopping, replaced)))
        });
        ended.expect("only the table's arms for a deploy under way conclude one")
    }

    /// Counts, reports and logs how a deploy ended; remembers a failure.
    fn record(&mut self, deploy: &mut Deploy, end: End, fx: &mut dyn Effects) {
        let now = fx.now();
        let took = now.saturating_duration_since(deploy.started);
        let label = format!("{}.keter", self.name);
        let (result, error) = match &end {
            End::Deployed => (DeployResult::Succeeded, None),
            End::SameContent(_) => (DeployResult::Unchanged, None),
            End::Superseded => (DeployResult::Superseded, None),
            End::Stopped(_) => (DeployResult::Stopped, None),
            End::Failed(e) => (DeployResult::Failed, Some(e)),
        };
        fx.deploy_finished(result, took);
        let mut report = DeployReport {
            result,
            finished: rfc3339(fx.wall_clock()),
            duration_ms: took.as_millis() as u64,
            error: error.map(|e| crate::applog::printable(&e.to_string()).into_owned()),
            error_kind: error.map(|e| e.kind()),
            retry_at: None,
        };
        self.failed = None;
        // An automatic rollback that did not switch: the bad release serves on.
        if !matches!(end, End::Deployed)
            && deploy
                .rollback
                .as_ref()
                .is_some_and(|r| r.how == super::releases::Ended::FailedAfterSwitch)
            && let Some(a) = &mut self.auto_rollback
        {
            a.state = "failed";
        }
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
            End::Stopped(why) => {
                log::info!("{}: deploy of {label} stopped: {why}", self.name)
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
                report.retry_at = retry_at.map(|at| rfc3339(fx.wall_clock() + (at - now)));
                self.last_error = Some(crate::applog::printable(&e.to_string()).into_owned());
                self.failed = Some(Failure {
                    path: deploy.path.clone(),
                    stamp: deploy.stamp,
                    retry_at,
                    backoff,
                });
            }
        }
        let answer = deploy.asked.take().map(|reply| {
            let took = took.as_millis();
            let (done, not) = match &deploy.rollback {
                Some(r) => (
                    format!("rolled back to release {}: it serves", r.to),
                    "not rolled back",
                ),
                None => (
                    "restarted: fresh processes serve".to_string(),
                    "not restarted",
                ),
            };
            let outcome = match (&self.last_deploy_result(&report), &report.error) {
                (Ok(()), _) => Ok(format!("{}: {done}, switched in {took} ms", self.name)),
                (Err(what), error) => Err(Refusal::NotDone {
                    app: self.name.clone(),
                    not,
                    why: match error {
                        Some(e) => format!("{what}: {e}"),
                        None => what.to_string(),
                    },
                }),
            };
            (reply, outcome)
        });
        self.last_deploy = Some(report);
        if let Some((mut reply, outcome)) = answer {
            // What the answer tells of is published before it: the asker's next command
            // (`keter releases`, `keter status`) reads the published report.
            self.publish(fx);
            reply.send(outcome);
        }
    }

    /// How a deploy's report reads for an operator who asked for it.
    fn last_deploy_result(&self, report: &DeployReport) -> Result<(), &'static str> {
        match report.result {
            DeployResult::Succeeded => Ok(()),
            DeployResult::Failed => Err("the deploy failed; the previous processes keep serving"),
            DeployResult::Superseded => Err("superseded by a newer command"),
            DeployResult::Stopped => Err("stopped before the switch"),
            DeployResult::Unchanged => Err("unchanged"),
        }
    }
}

/// Why a stop interrupted a deploy, for its report.
pub(super) fn stop_reason(exit: bool) -> &'static str {
    if exit {
        "keter is stopping"
    } else {
        "the bundle was deleted"
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
fn switch_job(v: &Version, started: Instant, maintenance: Option<String>) -> SwitchJob {
    SwitchJob {
        version: v.id,
        deploy: v.deploy,
        sha256: v.sha256.clone(),
        config: v.config.clone(),
        ports: web_ports(v),
        started,
        maintenance,
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
