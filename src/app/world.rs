//! The real [`Effects`] of an app worker: processes started with [`crate::process`], their
//! exits and the deploy stages' results sent back to the worker's channel, the journal, the
//! port pool, Nginx and the reports. The state machine (`machine.rs`) decides; this carries it
//! out.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::adopt::Watch;
use super::deploy::{self, Check, PrepareJob, SwitchJob};
use super::health::{self, HealthCheck};
use super::machine::Event;
use super::record::AppRecord;
use super::version::{FileStamp, Version};
use super::{DeployError, Effects, EventSender, Shared};
use crate::acme::HostSet;
use crate::applog::AppLog;
use crate::memory::Burst;
use crate::names::{AppName, Hostname};
use crate::ports::{Look, PortUse};
use crate::process::{self, Running, Spec};
use crate::procfs;
use crate::report::DeployResult;

/// A worker that is shutting down may still be reading a request it accepted before the
/// reload and connect to the old version a moment later; its absence of connections counts
/// only after this long.
const SETTLE: Duration = Duration::from_secs(1);

/// A readiness check in flight: set `cancel` to end it; `last` is what it last saw.
struct Probe {
    cancel: Arc<AtomicBool>,
    last: Arc<Mutex<String>>,
}

pub(super) struct World {
    pub name: AppName,
    pub shared: Arc<Shared>,
    pub log: AppLog,
    /// The worker's own channel: process exits and stage results come back on it.
    pub tx: EventSender,
    /// Told, with the number of commands received, when the app has stopped (the bundle was
    /// deleted); the daemon then ends the worker unless it sent a newer command.
    pub on_stopped: Box<dyn Fn(u64) + Send>,
    probes: HashMap<u64, Probe>,
    /// Every stage thread holds a clone until its work is done; the worker drops its own and
    /// waits for the others at its end ([`World::join_stages`]). The threads themselves are
    /// detached: a joinable thread that has ended keeps its stack mapped, and what its exit
    /// left resident (its TLS and the top of the stack, 20-odd KB), until it is joined, which
    /// for the last stage of a deploy was at the next deploy (5 MB for 200 idle apps).
    stages: Option<Sender<()>>,
    stages_done: crossbeam_channel::Receiver<()>,
    /// Held from the start of a deploy to its end (see [`crate::memory::burst`]), until the
    /// app's record is written after it.
    burst: Option<Burst>,
    /// The deploy has ended: the burst ends once the record is written.
    burst_over: bool,
    /// A deploy's burst has ended: the worker's loop gives its stack's unused pages back
    /// ([`World::stack_unused`]).
    stack_unused: bool,
    /// The record last written, so that only a change is written.
    saved: Option<AppRecord>,
    /// The host sets whose certificates this app asked the ACME thread for.
    certificates: BTreeSet<HostSet>,
    /// OOM kills in each process's control group when it was started or taken over, by
    /// version and process: a higher count at its exit means the kernel killed it.
    oom_kills: HashMap<(u64, usize), u64>,
}

impl World {
    pub fn new(
        name: AppName,
        shared: Arc<Shared>,
        log: AppLog,
        tx: EventSender,
        on_stopped: Box<dyn Fn(u64) + Send>,
    ) -> World {
        let (stages, stages_done) = crossbeam_channel::bounded(0);
        World {
            name,
            shared,
            log,
            tx,
            on_stopped,
            probes: HashMap::new(),
            stages: Some(stages),
            stages_done,
            burst: None,
            burst_over: false,
            stack_unused: false,
            saved: None,
            certificates: BTreeSet::new(),
            oom_kills: HashMap::new(),
        }
    }

    /// Watches a process taken over from an earlier keter: its exit comes back as an event
    /// and its output goes on into the app's log.
    pub(super) fn watch(&mut self, w: Watch) {
        let tx = self.tx.clone();
        let (version, proc) = (w.version, w.proc);
        self.count_oom_kills(version, proc);
        let watched = crate::childwatch::exit(
            w.pid,
            w.pidfd,
            Box::new(move |pid, status| {
                let _ = tx.send(Event::Exited {
                    version,
                    proc,
                    pid,
                    status,
                });
            }),
        );
        if let Err(e) = watched {
            log::error!(
                "{}: cannot watch pid {} taken over: {e}; its exit will not be noticed",
                self.name,
                w.pid
            );
        }
        if let Some((pipe, partial)) = w.output
            && let Err(e) = crate::childwatch::output_continued(pipe, self.log.clone(), partial)
        {
            log::error!(
                "{}: cannot read the output of pid {}: {e}",
                self.name,
                w.pid
            );
        }
    }

    /// Notes the OOM kills of a process's group as they are now (see `oom_kills`).
    fn count_oom_kills(&mut self, version: u64, proc: usize) -> Option<u64> {
        let group = crate::cgroup::process_group(self.name.as_str(), version, proc);
        let now = crate::cgroup::get()?.usage(&group).oom_kills?;
        self.oom_kills.insert((version, proc), now)
    }

    /// Writes the app's record if it changed; ends a deploy's burst of allocation after that
    /// (what writing it allocated is freed before the memory goes back to the system).
    pub fn save_record(&mut self, record: AppRecord) {
        if self.saved.as_ref() != Some(&record) {
            self.shared.journal.save_record(&self.name, record.clone());
            self.saved = Some(record);
        }
        if self.burst_over {
            self.burst_over = false;
            self.burst = None;
            self.stack_unused = true;
        }
    }

    /// True once after a deploy has ended: the worker's loop then calls
    /// [`crate::memory::release_stack`] from its own frame, the shallowest it has.
    pub fn stack_unused(&mut self) -> bool {
        std::mem::take(&mut self.stack_unused)
    }

    /// Removes the app's record.
    pub fn forget_record(&mut self) {
        self.shared.journal.forget_record(&self.name);
        self.saved = None;
    }

    /// Runs a stage on a thread that ends with it (its stack goes back to the system: on the
    /// worker's own thread, the pages that unpacking, parsing and rendering touch would stay
    /// resident for as long as the app runs, 11 MB for 200 idle apps), sending its result back
    /// as an event. Without a thread to be had it runs here.
    fn run_stage(&mut self, what: &str, work: impl FnOnce() -> Event + Send + 'static) {
        let tx = self.tx.clone();
        let running = self.stages.clone();
        let (slot, taken) = crossbeam_channel::bounded::<Box<dyn FnOnce() -> Event + Send>>(1);
        let spawned = std::thread::Builder::new()
            .name(format!("{what}-{}", self.name))
            .spawn(move || {
                let _running = running;
                if let Ok(work) = taken.recv() {
                    let _ = tx.send(work());
                }
            });
        let work: Box<dyn FnOnce() -> Event + Send> = Box::new(work);
        match spawned {
            // Detached: see `stages`.
            Ok(_detached) => {
                let _ = slot.send(work);
            }
            Err(e) => {
                log::warn!("{}: {what} on the worker's own thread: {e}", self.name);
                let _ = self.tx.send(work());
            }
        }
    }

    /// Waits until every stage thread has done its work (at the worker's end).
    pub fn join_stages(&mut self) {
        self.stages = None;
        // Ends once the last clone is dropped; nothing is ever sent.
        while self.stages_done.recv().is_ok() {}
    }
}

impl Effects for World {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_clock(&self) -> std::time::SystemTime {
        std::time::SystemTime::now()
    }

    fn stamp(&self, path: &Path) -> Option<FileStamp> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| FileStamp::of(&m))
    }

    fn next_id(&mut self) -> u64 {
        self.shared.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn readiness_timeout(&self) -> Duration {
        self.shared.config.readiness_timeout
    }

    fn drain_time(&self) -> Duration {
        self.shared.config.drain_time
    }

    fn prepare(&mut self, job: PrepareJob) {
        self.burst_over = false;
        if self.burst.is_none() {
            self.burst = Some(crate::memory::burst());
        }
        let (shared, name) = (self.shared.clone(), self.name.clone());
        self.run_stage("deploy", move || Event::Prepared {
            id: job.id,
            result: deploy::prepare(&shared, &name, &job),
        });
    }

    fn readiness(&mut self, version: u64, checks: Vec<Check>) {
        let probe = Probe {
            cancel: Arc::new(AtomicBool::new(false)),
            last: Arc::new(Mutex::new(String::new())),
        };
        let (cancel, last) = (probe.cancel.clone(), probe.last.clone());
        self.probes.insert(version, probe);
        let (shared, name, log) = (self.shared.clone(), self.name.clone(), self.log.clone());
        self.run_stage("ready", move || Event::Ready {
            version,
            result: deploy::readiness(&shared, &name, &log, &checks, &cancel, &last),
        });
    }

    fn switch(&mut self, job: SwitchJob) {
        self.probes.remove(&job.version);
        self.certificates.extend(job.config.acme_sets());
        let (shared, name, tx) = (self.shared.clone(), self.name.clone(), self.tx.clone());
        self.run_stage("switch", move || Event::Switched {
            version: job.version,
            result: deploy::switch(&shared, &name, &job, &tx),
        });
    }

    fn cancel(&mut self, version: u64) -> String {
        match self.probes.remove(&version) {
            Some(p) => {
                p.cancel.store(true, Ordering::Relaxed);
                p.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
            }
            None => String::new(),
        }
    }

    fn spawn(
        &mut self,
        version: u64,
        proc: usize,
        spec: &Spec,
        label: &str,
    ) -> io::Result<Running> {
        let group = crate::cgroup::process_group(self.name.as_str(), version, proc);
        let join = match crate::cgroup::get().map(|c| c.prepare(&group, &spec.limits)) {
            Some(Ok(join)) => Some(join),
            // Without limits asked for, the process runs outside its group rather than not
            // at all (it is still stopped by its process group).
            Some(Err(e)) if spec.limits == crate::cgroup::Limits::default() => {
                log::warn!("{}: {label} runs outside its control group: {e}", self.name);
                None
            }
            Some(Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot prepare its control group for its limits: {e}"),
                ));
            }
            None => None,
        };
        self.count_oom_kills(version, proc);
        let tx = self.tx.clone();
        let running = process::spawn(spec, &self.log, join.as_ref(), move |pid, status| {
            let _ = tx.send(Event::Exited {
                version,
                proc,
                pid,
                status,
            });
        })?;
        self.shared.journal.add(running.pid, self.name.as_str());
        log::info!(
            "{}: started {} as pid {} ({label})",
            self.name,
            spec.program.display(),
            running.pid,
        );
        Ok(running)
    }

    fn reap(&mut self, pid: i32) {
        let shared = self.shared.clone();
        self.run_stage("reap", move || {
            process::stop_group(pid, Duration::from_millis(500));
            shared.journal.remove(pid);
            Event::Reaped { pid }
        });
    }

    fn out_of_memory(&mut self, version: u64, proc: usize) -> Option<String> {
        let before = self.count_oom_kills(version, proc);
        let now = *self.oom_kills.get(&(version, proc))?;
        if now <= before.unwrap_or(now) {
            return None;
        }
        let group = crate::cgroup::process_group(self.name.as_str(), version, proc);
        let limit = crate::cgroup::get()?.usage(&group).memory_limit_bytes;
        Some(match limit {
            Some(l) => format!("out of memory (limit {})", crate::cgroup::human_bytes(l)),
            None => "out of memory".to_string(),
        })
    }

    fn port_use(&self, port: u16, own: Option<i32>, look: Look) -> PortUse {
        crate::ports::port_use(port, own, look)
    }

    fn acquire_port(&mut self) -> Option<u16> {
        self.shared.ports.acquire()
    }

    fn release_port(&mut self, port: u16) {
        self.shared.ports.release(port);
    }

    fn discard(&mut self, version: Box<Version>) {
        self.probes.remove(&version.id);
        let (shared, name, id) = (self.shared.clone(), self.name.clone(), version.id);
        self.run_stage("stop", move || {
            deploy::discard(&shared, &name, *version);
            Event::Discarded { version: id }
        });
    }

    fn leave_nginx(&mut self) {
        let (shared, name) = (self.shared.clone(), self.name.clone());
        self.run_stage("leave", move || Event::SiteRemoved {
            result: shared.nginx.apply(&name, None),
        });
    }

    fn drained(&self, version: &Version, age: Duration) -> bool {
        // Only Nginx's workers send requests to an old version, and workers started by the
        // switch know only the new one: once no worker from before it is still finishing its
        // connections, nothing can reach the old version. A lingering worker (an open
        // websocket of any app) makes keter count the old version's own connections.
        let master = self.shared.nginx.master_pid();
        master.is_none_or(|m| procfs::nginx_workers_shutting_down(m) == 0)
            || (age >= SETTLE
                && version
                    .ports()
                    .iter()
                    .all(|p| procfs::connections_to_port(*p) == 0))
    }

    fn release_hosts(&mut self, used: &[&Hostname]) {
        let mut hosts = self.shared.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.retain(|h, owner| owner != &self.name || used.contains(&h));
    }

    fn refresh_site(&mut self, version: u64, job: Option<SwitchJob>, unless_same: bool) {
        let site = match job {
            Some(job) => {
                self.certificates.extend(job.config.acme_sets());
                match deploy::site_for(&self.shared, &self.name, &job, &self.tx) {
                    Ok(site) => Some(site),
                    Err(e) => {
                        let _ = self.tx.send(Event::Refreshed {
                            version,
                            result: Err(e),
                        });
                        return;
                    }
                }
            }
            None => None,
        };
        // Handed over here, on the worker's thread, in order with the switches and removals
        // it starts; only the wait for Nginx's answer runs on the stage's thread.
        let pending = self.shared.nginx.submit(&self.name, site, unless_same);
        self.run_stage("refresh", move || Event::Refreshed {
            version,
            result: pending.wait().map_err(DeployError::Nginx),
        });
    }

    fn release_certificates(&mut self, used: &[HostSet]) {
        let Some(acme) = &self.shared.acme else {
            return;
        };
        self.certificates.retain(|set| {
            let keep = used.contains(set);
            if !keep {
                log::info!(
                    "{}: no longer serves {set}; its certificate is not renewed any more",
                    self.name
                );
                acme.release(set);
            }
            keep
        });
    }

    fn restarted(&mut self) {
        self.shared.reports.restarted(&self.name);
    }

    fn deploy_finished(&mut self, result: DeployResult, took: Duration) {
        self.shared.reports.deploy_finished(result, took);
        let event = match result {
            DeployResult::Succeeded => Some("deploy"),
            DeployResult::Failed => Some("deploy failed"),
            _ => None,
        };
        if let Some(kind) = event {
            let detail = format!("{kind} in {} ms", took.as_millis());
            self.shared.reports.event(&self.name, kind, detail);
        }
        self.burst_over = true;
    }

    fn note(&mut self, line: &str) {
        self.log.line(line);
    }

    fn last_output(&self) -> String {
        deploy::last_output(&self.log)
    }

    fn stopped(&mut self, commands: u64) {
        (self.on_stopped)(commands);
    }

    fn publish(&mut self, report: crate::report::AppReport, record: AppRecord) {
        self.shared.reports.publish(report);
        self.save_record(record);
    }

    fn log_lines_dropped(&self) -> u64 {
        self.log.dropped()
    }

    fn answer(&mut self, reply: Sender<()>) {
        let _ = reply.send(());
    }

    fn place_release(&mut self, sha256: &str, owner: u32, path: &Path) -> std::io::Result<()> {
        let from = super::releases::Releases::bundle(&self.shared.config.root, &self.name, sha256);
        super::releases::place(&from, owner, path)
    }

    fn save_maintenance(&mut self, m: Option<&super::maintenance::Maintenance>) {
        if let Err(e) = super::maintenance::save(&self.shared.config.root, &self.name, m) {
            log::error!(
                "{}: cannot keep its maintenance state under {}: {e}; a keter started again \
                 would not know it",
                self.name,
                self.shared.config.root.join("etc/maintenance").display()
            );
        }
    }

    fn rollback_defaults(&self) -> crate::config::AutoRollback {
        self.shared.config.rollback
    }

    fn errors_since_switch(
        &self,
        deploy: u64,
        switched: std::time::SystemTime,
    ) -> Option<crate::requests::ErrorsBeside> {
        let at = switched
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.shared.reports.requests.errors_since_switch(
            self.name.as_str(),
            deploy,
            at,
            crate::requests::unix_now(),
        )
    }

    fn keep_releases(&self) -> usize {
        self.shared.config.keep_releases
    }

    fn write_releases(&mut self, releases: &super::releases::Releases) {
        let dir = super::releases::Releases::dir(&self.shared.config.root, &self.name);
        if let Err(e) = super::releases::write(&dir, releases) {
            log::error!(
                "{}: cannot write its releases in {}: {e}",
                self.name,
                dir.display()
            );
        }
    }

    fn health_defaults(&self) -> crate::config::HealthChecks {
        self.shared.config.health
    }

    fn health_check(&mut self, check: HealthCheck) {
        // Not a stage: it changes nothing, so the worker's end does not wait for it (a hung
        // app's check may take its whole timeout).
        let tx = self.tx.clone();
        let (version, proc, seq) = (check.version, check.proc, check.seq);
        let spawned = std::thread::Builder::new()
            .name(format!("health-{}", self.name))
            .stack_size(HEALTH_STACK)
            .spawn(move || {
                let outcome = health::check(&check);
                let _ = tx.send(Event::Checked {
                    version,
                    proc,
                    seq,
                    outcome,
                });
            });
        if let Err(e) = spawned {
            log::warn!("{}: no thread for a health check: {e}", self.name);
            let _ = self.tx.send(Event::Checked {
                version,
                proc,
                seq,
                outcome: health::Outcome::not_run(),
            });
        }
    }

    fn stop_process(&mut self, pid: i32) {
        let (shared, name) = (self.shared.clone(), self.name.clone());
        self.run_stage("stop", move || {
            super::version::stop(&name, "replaced", pid, shared.config.stop_timeout);
            shared.journal.remove(pid);
            Event::Reaped { pid }
        });
    }

    fn health_replaced(&mut self) {
        self.shared.reports.health_replaced(&self.name);
    }
}

/// A health check's thread needs little stack: one blocking request.
const HEALTH_STACK: usize = 128 * 1024;
