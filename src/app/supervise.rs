//! The supervising half of the worker's state machine (the deploying half is `machine.rs`):
//! process exits and restarts, the ports of webapps that are down (watched, and moved when
//! someone else takes them), draining old versions, deploy retries that are due, stopping,
//! and the app's report.

use std::process::ExitStatus;
use std::time::Instant;

use super::Effects;
use super::machine::{End, Life, Machine, PORT_WATCH, Stage, Why, stop_reason};
use super::version::{ProcState, Role, Version};
use crate::names::Hostname;
use crate::ports::{Look, PortUse};
use crate::report::{AppReport, AppState, ProcessReport, rfc3339};

impl Machine {
    /// Stop (the bundle was deleted) or shutdown (`exit`): the app leaves Nginx, then every
    /// version is handed to a stage that stops it (`Leaving`); the stop is complete when the
    /// last is back ([`Machine::leave_if_done`]). A stage in flight that cannot be interrupted
    /// is waited for first (`Stopping`); a candidate in readiness is stopped at once.
    pub(super) fn stop(&mut self, exit: bool, fx: &mut dyn Effects) {
        match &mut self.life {
            Life::Deploying { deploy, .. } => {
                // A stop supersedes the commands received before it.
                deploy.pending = None;
                if matches!(deploy.stage, Stage::Readiness(_)) {
                    self.fail_candidate(End::Stopped(stop_reason(exit)), fx);
                    // The candidate is gone; now stop what is left.
                    return self.stop(exit, fx);
                }
                // An unpack or a switch in flight is waited for.
                self.life.turn(|life| match life {
                    Life::Deploying { serving, deploy } => (
                        Life::Stopping {
                            serving,
                            deploy,
                            exit,
                        },
                        (),
                    ),
                    other => (other, ()),
                });
            }
            Life::Stopping {
                deploy, exit: was, ..
            } => {
                deploy.pending = None;
                *was |= exit;
            }
            Life::Leaving {
                exit: was, pending, ..
            } => {
                *was |= exit;
                *pending = None;
            }
            Life::Ended => {}
            Life::Serving(_) | Life::Idle(_) => self.leave(exit, fx),
        }
    }

    /// From `Serving` or `Idle`: has the app's site taken out of Nginx (a stage), then every
    /// version stopped; waits for both.
    fn leave(&mut self, exit: bool, fx: &mut dyn Effects) {
        let retiring: Vec<Box<Version>> = self.retiring.drain(..).map(|r| r.version).collect();
        let routed = self.life.turn(|life| {
            let serving = match life {
                Life::Serving(v) => Some(v),
                _ => None,
            };
            let removing = (serving.is_some() || !retiring.is_empty())
                .then(|| serving.into_iter().chain(retiring).collect::<Vec<_>>());
            let routed = removing.is_some();
            (
                Life::Leaving {
                    exit,
                    pending: None,
                    removing,
                },
                routed,
            )
        });
        if routed {
            fx.leave_nginx();
        }
        self.failed = None;
        // The hosts go back once Nginx no longer routes them here: another app may claim
        // them at once.
        if !routed {
            self.release_unused_hosts(fx);
        }
        self.leave_if_done(fx);
    }

    /// The site's removal came back: the versions that waited for it are stopped.
    pub(super) fn left_nginx(
        &mut self,
        result: Result<u64, crate::nginx::NginxError>,
        fx: &mut dyn Effects,
    ) {
        match result {
            Ok(g) => log::info!("{}: removed from Nginx at generation {g}", self.name),
            Err(e) => log::error!(
                "{}: removing from Nginx failed: {e}; stopping anyway",
                self.name
            ),
        }
        let waiting = match &mut self.life {
            Life::Leaving { removing, .. } => removing.take().unwrap_or_default(),
            _ => Vec::new(),
        };
        for v in waiting {
            self.discard(v, fx);
        }
        self.release_unused_hosts(fx);
        self.leave_if_done(fx);
    }

    /// Completes a stop once no version is being stopped any more: the worker is idle (and
    /// the daemon told, with the commands received), or ends. A deploy received meanwhile is
    /// acted on then.
    pub(super) fn leave_if_done(&mut self, fx: &mut dyn Effects) {
        if !self.discarding.is_empty() || !matches!(self.life, Life::Leaving { removing: None, .. })
        {
            return;
        }
        let (exit, pending) = match &mut self.life {
            Life::Leaving { exit, pending, .. } => (*exit, pending.take()),
            _ => unreachable!("matched above"),
        };
        self.life = if exit {
            Life::Ended
        } else {
            Life::Idle(Why::Stopped)
        };
        if exit {
            return;
        }
        log::info!("{}: stopped", self.name);
        fx.stopped(self.commands);
        if let Some(c) = pending {
            self.command(c, fx);
        }
    }

    /// Gives back the hosts that no version of this app still serves.
    pub(super) fn release_unused_hosts(&self, fx: &mut dyn Effects) {
        let used: Vec<&Hostname> = self
            .serving()
            .into_iter()
            .chain(self.retiring.iter().map(|r| &*r.version))
            .flat_map(|v| v.config.hosts())
            .collect();
        // Certificates first (only the serving version's stanzas are routed to): once a host is
        // given back another app may claim it and want the same set, and a release sent after
        // that would undo its want.
        let wanted = self
            .serving()
            .map(|v| v.config.acme_sets())
            .unwrap_or_default();
        fx.release_certificates(&wanted);
        fx.release_hosts(&used);
    }

    /// A process exited. The supervised versions' processes follow their restart policy,
    /// except a candidate's webapp before it is ready, which fails the deploy; an old
    /// version's are only accounted for.
    pub(super) fn exited(
        &mut self,
        version: u64,
        i: usize,
        pid: i32,
        status: Option<ExitStatus>,
        fx: &mut dyn Effects,
    ) {
        // Members of the group that outlive the leader (a wrapper's children) go with it.
        self.reap(pid, fx);
        if self.replacement_exited(version, pid, fx) || self.superseded_exited(version, pid, fx) {
            return;
        }
        let now = fx.now();
        let name = self.name.clone();
        let mut note = None;
        let mut exit = None;
        // Killed by the kernel for its memory-limit: said so, then the restart policy as for
        // any exit (README "Limits and accounting").
        let how = fx
            .out_of_memory(version, i)
            .unwrap_or_else(|| crate::process::describe_exit(status));
        for v in self.supervised_mut() {
            if v.id == version
                && let Some(p) = v.procs.get_mut(i)
                && p.running().is_some_and(|r| r.pid == pid)
            {
                p.exited(&name, pid, &how, now);
                exit = Some(matches!(p.state, ProcState::GaveUp));
                // Its port is free for anyone to bind until it runs again: watched from now
                // on, starting at once (the tick after this event).
                if matches!(p.role, Role::Web { .. }) {
                    p.port_check_at = Some(now);
                }
                note = Some(format!("pid {pid} ({}) exited with {how}", p.label()));
                break;
            }
        }
        if let Some(gave_up) = exit {
            let label = note.as_deref().unwrap_or_default().to_string();
            self.watch_exit(version, gave_up, &label, now);
        }
        if note.is_some() {
            self.last_error = note;
            return;
        }
        for r in &mut self.retiring {
            if r.version.id == version
                && let Some(p) = r.version.procs.get_mut(i)
                && p.running().is_some_and(|r| r.pid == pid)
            {
                p.state = ProcState::Ended;
            }
        }
    }

    /// Timed work: the ports of webapps without a listener of their own, a site to render
    /// again, due restarts, drained old versions, a due deploy retry. False when it only
    /// looked (at ports, at old versions' connections) and changed nothing that the app's
    /// report or record shows: a webapp waiting for its restart is looked at every
    /// `PORT_WATCH`, and the worker need not publish after each look.
    pub fn tick(&mut self, fx: &mut dyn Effects) -> bool {
        let now = fx.now();
        let (lost, mut changed) = self.watch_ports(now, fx);
        if self.site_wanted() && self.refresh_retry_at.is_none_or(|at| at <= now) {
            self.refresh(fx);
            changed = true;
        }
        // Only now, with Nginx routed elsewhere.
        for pid in lost {
            self.reap(pid, fx);
        }
        let name = self.name.clone();
        for v in self.supervised_mut() {
            let id = v.id;
            for (i, p) in v.procs.iter_mut().enumerate() {
                if p.restart_due().is_none_or(|at| at > now) {
                    continue;
                }
                changed = true;
                if p.stranded {
                    p.restart_postponed(&name, now);
                    continue;
                }
                match fx.spawn(id, i, &p.spec, &p.label()) {
                    Ok(r) => {
                        p.state = ProcState::Running(r);
                        p.restarts.restarted();
                        fx.restarted();
                        if matches!(p.role, Role::Web { .. }) {
                            p.port_check_at = Some(now + PORT_WATCH);
                        }
                    }
                    Err(e) => p.restart_failed(&name, &e, now),
                }
            }
        }
        let mut i = 0;
        while i < self.retiring.len() {
            let r = &self.retiring[i];
            let age = now.saturating_duration_since(r.since);
            let drained = fx.drained(&r.version, age);
            if drained || age >= fx.drain_time() {
                let r = self.retiring.remove(i);
                changed = true;
                log::info!(
                    "{}: previous version {} after {} ms; stopping it",
                    self.name,
                    if drained {
                        "drained"
                    } else {
                        "still had connections at drain-time"
                    },
                    age.as_millis()
                );
                self.discard(r.version, fx);
            } else {
                i += 1;
            }
        }
        if matches!(self.life, Life::Idle(_) | Life::Serving(_))
            && !self.frozen
            && let Some(f) = &self.failed
            && f.retry_at.is_some_and(|at| at <= now)
        {
            let (path, stamp, backoff) = (f.path.clone(), f.stamp, f.backoff);
            log::info!(
                "{}: trying the deploy of {}.keter again",
                self.name,
                self.name
            );
            self.begin(path, stamp, Some(backoff), false, fx);
            changed = true;
        }
        changed |= self.health_tick(fx);
        changed |= self.watch_tick(fx);
        changed
    }

    /// Looks at the port of every supervised webapp that is due to restart or is watched (from
    /// its exit until its own process group listens there again; README "Supervision"). A
    /// port held by someone else is not started on again: the webapp moves to a fresh port of
    /// the pool, the old one goes back to the pool (which does not hand it out while it is
    /// held), and the serving site is rendered again (`reroute_due`). A restarted process
    /// that someone else beat to its port is stopped and started again on the new one: the
    /// pids returned, to stop once Nginx routes elsewhere; and whether anything changed
    /// beyond the moments of the next looks.
    fn watch_ports(&mut self, now: Instant, fx: &mut dyn Effects) -> (Vec<i32>, bool) {
        let name = self.name.clone();
        let frozen = self.frozen;
        let mut reroute = false;
        let mut changed = false;
        let mut lost = Vec::new();
        for v in self.supervised_mut() {
            let Version { procs, config, .. } = v;
            for p in procs.iter_mut() {
                let Role::Web { index, port } = p.role else {
                    continue;
                };
                let restart = p.restart_due().is_some_and(|at| at <= now);
                if !restart && p.port_check_at.is_none_or(|at| at > now) {
                    continue;
                }
                let own = p.running().map(|r| r.pid);
                let look = if restart { Look::Full } else { Look::Quick };
                let holder = match fx.port_use(port, own, look) {
                    PortUse::Own => {
                        p.port_check_at = None;
                        continue;
                    }
                    PortUse::Free => {
                        p.port_check_at = Some(now + PORT_WATCH);
                        if std::mem::take(&mut p.stranded) {
                            log::info!(
                                "{name}: port {port} is free again; the webapp starts there"
                            );
                            reroute = true;
                        }
                        continue;
                    }
                    PortUse::Unsure => {
                        p.port_check_at = Some(now + PORT_WATCH);
                        continue;
                    }
                    PortUse::Other(holder) => holder,
                };
                p.port_check_at = Some(now + PORT_WATCH);
                if frozen {
                    // Nginx cannot be changed during a handover: not started on a port that
                    // is not its own, and moved after the thaw or by the next keter.
                    if restart {
                        p.state = ProcState::Backoff {
                            until: now + PORT_WATCH,
                        };
                        changed = true;
                    }
                    log::debug!(
                        "{name}: port {port} is held by {holder}; moved after the handover"
                    );
                    continue;
                }
                // A stranded webapp asks the pool again only when its restart is due, not at
                // every look: a search of the whole range is not free.
                if p.stranded && !restart {
                    continue;
                }
                let Some(to) = fx.acquire_port() else {
                    if !std::mem::replace(&mut p.stranded, true) {
                        log::error!(
                            "{name}: port {port} of webapp {index} is held by another program ({holder}) and no other port of port-range is free; the webapp is not started and the site is taken out of Nginx until a port is free"
                        );
                        reroute = true;
                    }
                    if let Some(pid) = own {
                        p.lost_port(now);
                        lost.push(pid);
                    }
                    continue;
                };
                log::warn!(
                    "{name}: port {port} of webapp {index} is held by another program ({holder}); the webapp moves to port {to}"
                );
                fx.release_port(port);
                p.move_port(to, &config.webapps[index]);
                p.stranded = false;
                reroute = true;
                if let Some(pid) = own {
                    let delay = p.lost_port(now);
                    log::warn!(
                        "{name}: pid {pid} did not get port {port} before that program did; it is stopped and started again on port {to} in {} ms",
                        delay.as_millis()
                    );
                    lost.push(pid);
                }
            }
        }
        self.reroute_due |= reroute;
        let changed = changed || reroute || !lost.is_empty();
        (lost, changed)
    }

    /// This app's entry of the status report.
    pub fn report(&self, log_lines_dropped: u64, now: std::time::SystemTime) -> AppReport {
        let mut r = AppReport::new(&self.name);
        let serving = self.serving();
        let crash_looping = serving
            .iter()
            .flat_map(|v| v.procs.iter())
            .any(|p| p.restarts.crash_looping() && p.running().is_none());
        r.state = match &self.life {
            Life::Idle(Why::Failed) => AppState::Failed,
            Life::Idle(Why::New | Why::Stopped) | Life::Ended => AppState::Stopped,
            Life::Leaving { .. } => AppState::Stopping,
            Life::Serving(_) if crash_looping => AppState::CrashLooping,
            Life::Serving(_) => AppState::Running,
            Life::Deploying {
                serving: Some(_), ..
            }
            | Life::Stopping {
                serving: Some(_), ..
            } => AppState::Deploying,
            Life::Deploying { serving: None, .. } | Life::Stopping { serving: None, .. } => {
                AppState::Starting
            }
        };
        if let Some(v) = serving {
            r.sha256 = Some(v.sha256.clone());
            r.bundle_time = v.modified.map(rfc3339);
            r.deploy = Some(v.deploy);
            r.hosts = v.config.hosts().map(|h| h.to_string()).collect();
            r.certificate_names = v.config.acme_sets().iter().map(|s| s.file_stem()).collect();
            r.processes = v
                .procs
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (kind, stanza) = match p.role {
                        Role::Web { index, .. } => ("webapp", index),
                        Role::Background { index } => ("background", index),
                    };
                    ProcessReport {
                        kind,
                        stanza,
                        port: p.port(),
                        pid: p.running().map(|r| r.pid),
                        restarts: p.restarts.total,
                        health: match p.role {
                            Role::Web { .. } => Some(p.health.state()),
                            Role::Background { .. } => None,
                        },
                        health_latency_ms: p.health.latency.map(|d| d.as_millis() as u64),
                        health_failures: p.health.failures,
                        health_error: p.health.last_failure.clone(),
                        health_replacements: p.health.replacements,
                        usage: Default::default(),
                        group: Some(crate::cgroup::process_group(self.name.as_str(), v.id, i)),
                    }
                })
                .collect();
            r.restarts = v.procs.iter().map(|p| p.restarts.total).sum();
            r.since = v.live_since.map(rfc3339);
            r.live_since = v.live_since;
            r.uptime_seconds = v
                .live_since
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs());
        }
        r.deploy_stage = match &self.life {
            Life::Deploying { deploy, .. } | Life::Stopping { deploy, .. } => {
                Some(deploy.stage.name())
            }
            _ => None,
        };
        r.site_pending = self.refreshing.is_some();
        r.last_deploy = self.last_deploy.clone();
        r.last_error = self.last_error.clone();
        r.log_lines_dropped = log_lines_dropped;
        r.draining = self.retiring.len();
        r.releases = self.releases.releases.clone();
        r.releases_bytes = self.releases.bytes();
        r.maintenance = self.maintenance.clone();
        r.auto_rollback = self.auto_rollback_report();
        r
    }
}
