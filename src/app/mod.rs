//! One app's worker: a thread that owns the app's processes, ports and folders and takes them
//! through their life (DESIGN.md 6): unpack, provision, start, readiness, switch, drain, stop, and crash
//! restarts in between.
//!
//! Commands reach the worker over its channel, together with the exits of its processes.
//! Actions are serialised; while a deploy runs only the newest pending command is kept, and a
//! newer command supersedes a deploy that has not switched yet (Keter #64/#294: redeploys got
//! stuck behind a crash-looping version). Whatever fails, the version that was serving keeps
//! serving.

mod deploy;
mod site;
mod version;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::applog::{AppLog, LogTarget};
use crate::config::Config;
use crate::isolation::Isolation;
use crate::journal::Journal;
use crate::names::{AppName, Hostname};
use crate::nginx::Nginx;
use crate::ports::PortPool;
use crate::postgres::Provisioner;
use crate::procfs;
use crate::report::{AppReport, AppState, DeployReport, ProcessReport, Reports, rfc3339};

pub use site::{CertSource, SiteSource, site_of};
use version::{FileStamp, Version};

/// What the daemon asks of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Deploy the bundle at this path: a no-op if it is the file already serving, or the file
    /// whose deploy failed last (an unchanged bad bundle is not retried at every event)
    /// unless `retry` (a rescan on SIGHUP) says to try again.
    Deploy { path: PathBuf, retry: bool },
    /// Stop the app: remove its Nginx file, then stop every version.
    Stop,
}

/// Everything an app worker reacts to.
#[derive(Debug)]
enum Event {
    Command(Command),
    /// Process `proc` of version `version` exited.
    Exited {
        version: u64,
        proc: usize,
        pid: i32,
        status: ExitStatus,
    },
    /// Stop everything and end the thread.
    Shutdown,
}

/// What all workers share: configuration and the single owners of ports, hosts, the journal
/// and Nginx.
pub struct Shared {
    pub config: Config,
    pub ports: PortPool,
    pub nginx: Nginx,
    pub journal: Journal,
    pub reports: Reports,
    /// Which app serves each host (DESIGN.md 4: one app per host).
    pub hosts: Mutex<HashMap<Hostname, AppName>>,
    /// Numbers the unpack folders `temp/NAME-N` uniquely within this run.
    pub next_version: AtomicU64,
    /// The postgres plugin, when the global config has a `postgres` section.
    pub postgres: Option<Provisioner>,
    /// Who apps run as and what they may reach.
    pub isolation: Isolation,
}

impl Shared {
    pub fn new(config: Config, nginx: Nginx, journal: Journal, isolation: Isolation) -> Shared {
        Shared {
            ports: PortPool::new(config.port_range.clone()),
            postgres: config
                .postgres
                .clone()
                .map(|admin| Provisioner::new(admin, &config.root)),
            config,
            nginx,
            journal,
            reports: Reports::default(),
            hosts: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
            isolation,
        }
    }
}

/// The daemon's handle on one app's worker thread.
pub struct AppHandle {
    tx: Sender<Event>,
    thread: Option<JoinHandle<()>>,
}

impl AppHandle {
    /// Starts the worker thread of `name`.
    pub fn spawn(name: AppName, shared: Arc<Shared>) -> std::io::Result<AppHandle> {
        let (tx, rx) = unbounded();
        let config = &shared.config;
        let target = if config.rotate_logs {
            LogTarget::File {
                path: config.root.join("log").join(format!("app-{name}.log")),
                max_bytes: config.log_rotate_bytes,
                keep: config.log_rotate_keep,
            }
        } else {
            LogTarget::Stderr(name.to_string())
        };
        let log = AppLog::open(target)?;
        shared.reports.attach_log(&name, log.clone());
        let mut worker = Worker {
            name: name.clone(),
            shared,
            tx: tx.clone(),
            log,
            current: None,
            retiring: Vec::new(),
            pending: None,
            deploys: 0,
            deploying: None,
            failed: None,
            deploy_in_progress: false,
            last_deploy: None,
            last_error: None,
        };
        worker.publish();
        let thread = std::thread::Builder::new()
            .name(format!("app-{name}"))
            .spawn(move || worker.run(rx))?;
        Ok(AppHandle {
            tx,
            thread: Some(thread),
        })
    }

    pub fn send(&self, command: Command) {
        let _ = self.tx.send(Event::Command(command));
    }

    /// Asks the worker to stop everything; [`AppHandle::join`] waits for it.
    pub fn begin_shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }

    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An old version after the switch, waiting for its last requests before it is stopped.
struct Retiring {
    version: Version,
    since: Instant,
}

/// A worker that is shutting down may still be reading a request it accepted before the
/// reload and connect to the old version a moment later; its absence of connections counts
/// only after this long.
const SETTLE: Duration = Duration::from_secs(1);
const DRAIN_POLL: Duration = Duration::from_millis(50);

struct Worker {
    name: AppName,
    shared: Arc<Shared>,
    /// Given to process waiter threads so their exits come back here.
    tx: Sender<Event>,
    log: AppLog,
    /// The version Nginx routes to.
    current: Option<Version>,
    retiring: Vec<Retiring>,
    /// The newest command received while another was being carried out.
    pending: Option<Command>,
    /// Deploys attempted, for the Nginx file header.
    deploys: u64,
    /// The bundle file being deployed right now and its identity, to recognise repeated
    /// events for the same file (inotify reports one rename several times).
    deploying: Option<(PathBuf, FileStamp)>,
    /// The bundle file whose deploy failed last, not retried until it changes.
    failed: Option<(PathBuf, FileStamp)>,
    /// For the status report.
    deploy_in_progress: bool,
    last_deploy: Option<DeployReport>,
    last_error: Option<String>,
}

impl Worker {
    fn run(&mut self, rx: Receiver<Event>) {
        loop {
            let event = match self.next_deadline() {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(e) => Some(e),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                },
                None => match rx.recv() {
                    Ok(e) => Some(e),
                    Err(_) => return,
                },
            };
            match event {
                Some(Event::Command(c)) => self.pending = Some(c),
                Some(Event::Exited {
                    version,
                    proc,
                    pid,
                    status,
                }) => self.exited(version, proc, pid, status),
                Some(Event::Shutdown) => {
                    self.stop_all();
                    return;
                }
                None => {}
            }
            // Only the newest of the commands already queued matters.
            if self.absorb(&rx) {
                self.stop_all();
                return;
            }
            while let Some(command) = self.pending.take() {
                match command {
                    Command::Deploy { path, retry } => self.deploy_on_own_stack(&path, retry, &rx),
                    Command::Stop => self.stop_all(),
                }
                if self.absorb(&rx) {
                    self.stop_all();
                    return;
                }
            }
            self.tick();
            self.publish();
        }
    }

    /// Deploys on a thread that ends with the deploy. Unpacking, parsing and rendering touch
    /// about 50 KiB of stack; on the worker's own thread those pages would stay resident for
    /// as long as the app runs (11 MB for 200 idle apps), while a finished thread's stack goes
    /// back to the system.
    fn deploy_on_own_stack(&mut self, path: &std::path::Path, retry: bool, rx: &Receiver<Event>) {
        let _burst = crate::memory::burst();
        let thread = std::thread::Builder::new().name(format!("deploy-{}", self.name));
        let spawned = std::thread::scope(|scope| {
            thread
                .spawn_scoped(scope, || self.deploy(path, retry, rx))
                .map(drop)
        });
        if let Err(e) = spawned {
            log::warn!("{}: deploying on the worker's own thread: {e}", self.name);
            self.deploy(path, retry, rx);
        }
    }

    /// Takes every event already queued without blocking: commands replace `pending`, exits
    /// are handled. Returns true on shutdown.
    fn absorb(&mut self, rx: &Receiver<Event>) -> bool {
        while let Ok(event) = rx.try_recv() {
            match event {
                Event::Command(c) => self.pending = Some(c),
                Event::Exited {
                    version,
                    proc,
                    pid,
                    status,
                } => self.exited(version, proc, pid, status),
                Event::Shutdown => return true,
            }
        }
        false
    }

    /// The earliest moment something is due: a restart or a drain check. `None` when idle,
    /// so an idle app costs no wake-ups at all.
    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self
            .current
            .iter()
            .flat_map(|v| v.procs.iter())
            .filter_map(|p| p.restart_at);
        let drains = self.retiring.iter().map(|_| Instant::now() + DRAIN_POLL);
        restarts.chain(drains).min()
    }

    /// A process exited. The serving version's processes are restarted by their policy; an
    /// old version's are only accounted for.
    fn exited(&mut self, version: u64, proc: usize, pid: i32, status: ExitStatus) {
        // Members of the group that outlive the leader (a wrapper's children) go with it.
        crate::process::stop_group(pid, Duration::from_millis(500));
        self.shared.journal.remove(pid);
        let name = self.name.clone();
        if let Some(cur) = self.current.as_mut().filter(|v| v.id == version)
            && let Some(p) = cur.procs.get_mut(proc)
            && p.running.is_some_and(|r| r.pid == pid)
        {
            p.exited(&name, pid, status, Instant::now());
            self.last_error = Some(format!(
                "pid {pid} ({}) exited with {}",
                p.label(),
                crate::process::describe_exit(status)
            ));
            return;
        }
        for r in &mut self.retiring {
            if r.version.id == version
                && let Some(p) = r.version.procs.get_mut(proc)
                && p.running.is_some_and(|r| r.pid == pid)
            {
                p.running = None;
            }
        }
    }

    /// Timed work: due restarts and drained old versions.
    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(mut cur) = self.current.take() {
            for i in 0..cur.procs.len() {
                if cur.procs[i].restart_at.is_some_and(|at| at <= now) {
                    cur.procs[i].restart_at = None;
                    self.shared.reports.restarted(&self.name);
                    if let Err(e) = self.start_proc(&mut cur, i) {
                        log::error!("{}: restart failed: {e}", self.name);
                        let p = &mut cur.procs[i];
                        p.restart_at = Some(now + Duration::from_secs(1));
                    }
                }
            }
            self.current = Some(cur);
        }
        let drain_time = self.shared.config.drain_time;
        let master = self.shared.nginx.master_pid();
        let mut i = 0;
        while i < self.retiring.len() {
            let r = &self.retiring[i];
            let age = r.since.elapsed();
            // Only Nginx's workers send requests to an old version, and workers started by the
            // switch know only the new one: once no worker from before it is still finishing
            // its connections, nothing can reach the old version. A lingering worker (an open
            // websocket of any app) makes keter count the old version's own connections.
            let drained = master.is_none_or(|m| procfs::nginx_workers_shutting_down(m) == 0)
                || (age >= SETTLE
                    && r.version
                        .ports()
                        .iter()
                        .all(|p| procfs::connections_to_port(*p) == 0));
            if drained || age >= drain_time {
                let r = self.retiring.remove(i);
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
                self.discard(r.version);
            } else {
                i += 1;
            }
        }
    }

    /// Writes this app's entry of the status report from the worker's state.
    fn publish(&self) {
        let mut r = AppReport::new(&self.name);
        let crash_looping = self
            .current
            .iter()
            .flat_map(|v| v.procs.iter())
            .any(|p| p.restarts.crash_looping() && p.running.is_none());
        r.state = match (&self.current, self.deploy_in_progress) {
            (Some(_), true) => AppState::Deploying,
            (Some(_), false) if crash_looping => AppState::CrashLooping,
            (Some(_), false) => AppState::Running,
            (None, true) => AppState::Starting,
            (None, false) if self.last_deploy.as_ref().is_some_and(|d| d.error.is_some()) => {
                AppState::Failed
            }
            (None, false) => AppState::Stopped,
        };
        if let Some(v) = &self.current {
            r.sha256 = Some(v.sha256.clone());
            r.bundle_time = v.modified.map(rfc3339);
            r.deploy = Some(v.deploy);
            r.hosts = v.config.hosts().map(|h| h.to_string()).collect();
            r.processes = v
                .procs
                .iter()
                .map(|p| {
                    let (kind, stanza) = match p.role {
                        version::Role::Web { index, .. } => ("webapp", index),
                        version::Role::Background { index } => ("background", index),
                    };
                    ProcessReport {
                        kind,
                        stanza,
                        port: p.port(),
                        pid: p.running.map(|r| r.pid),
                        restarts: p.restarts.total,
                    }
                })
                .collect();
            r.restarts = v.procs.iter().map(|p| p.restarts.total).sum();
            r.since = v.live_since.map(rfc3339);
            r.live_since = v.live_since;
            r.uptime_seconds = v
                .live_since
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs());
        }
        r.last_deploy = self.last_deploy.clone();
        r.last_error = self.last_error.clone();
        r.log_lines_dropped = self.log.dropped();
        r.draining = self.retiring.len();
        self.shared.reports.publish(r);
    }

    /// Removes the app from Nginx, then stops every version.
    fn stop_all(&mut self) {
        self.pending = None;
        if self.current.is_none() && self.retiring.is_empty() {
            return;
        }
        match self.shared.nginx.apply(&self.name, None) {
            Ok(g) => log::info!("{}: removed from Nginx at generation {g}", self.name),
            Err(e) => log::error!(
                "{}: removing from Nginx failed: {e}; stopping anyway",
                self.name
            ),
        }
        let versions: Vec<Version> = self
            .current
            .take()
            .into_iter()
            .chain(self.retiring.drain(..).map(|r| r.version))
            .collect();
        for v in versions {
            self.discard(v);
        }
        self.release_unused_hosts();
        log::info!("{}: stopped", self.name);
    }

    /// Gives back hosts that no version of this app still serves.
    fn release_unused_hosts(&self) {
        let mut used: Vec<&Hostname> = Vec::new();
        for v in self
            .current
            .iter()
            .chain(self.retiring.iter().map(|r| &r.version))
        {
            used.extend(v.config.hosts());
        }
        let mut hosts = self.shared.hosts.lock().unwrap_or_else(|e| e.into_inner());
        hosts.retain(|h, owner| owner != &self.name || used.contains(&h));
    }
}
