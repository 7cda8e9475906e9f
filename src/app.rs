//! One app's worker: a thread that owns the app's processes, ports and folders and takes them
//! through their life (DESIGN.md 6): unpack, provision, start, readiness, switch, drain, stop.
//!
//! Commands reach the worker over its channel, together with the exits of its processes.
//! Actions are serialised; while a deploy runs only the newest pending command is kept, and a
//! newer command supersedes a deploy that has not switched yet (Keter #64/#294: redeploys got
//! stuck behind a crash-looping version). Whatever fails, the version that was serving keeps
//! serving.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

use crate::applog::{AppLog, LogTarget};
use crate::bundle::{self, BundleConfig, WebApp};
use crate::config::Config;
use crate::names::{AppName, Hostname};
use crate::nginx::{Nginx, Site, Upstream};
use crate::ports::PortPool;
use crate::postgres::Provisioner;
use crate::process::{self, Running, Spec};
use crate::{probe, procfs};

/// What the daemon asks of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Deploy the bundle at this path (a no-op if it is the version already serving).
    Deploy(PathBuf),
    /// Stop the app: remove its Nginx file, then stop every version.
    Stop,
}

/// Everything an app worker reacts to.
#[derive(Debug)]
enum Event {
    Command(Command),
    /// A process of version `version`, stanza `stanza`, exited.
    Exited {
        version: u64,
        stanza: usize,
        pid: i32,
        status: ExitStatus,
    },
    /// Stop everything and end the thread.
    Shutdown,
}

/// What all workers share: configuration and the single owners of ports, hosts and Nginx.
pub struct Shared {
    pub config: Config,
    pub ports: PortPool,
    pub nginx: Nginx,
    /// Which app serves each host (DESIGN.md 4: one app per host).
    pub hosts: Mutex<HashMap<Hostname, AppName>>,
    /// Numbers the unpack folders `temp/NAME-N` uniquely within this run.
    pub next_version: AtomicU64,
    /// The postgres plugin, when the global config has a `postgres` section.
    pub postgres: Option<Provisioner>,
}

impl Shared {
    pub fn new(config: Config, nginx: Nginx) -> Shared {
        Shared {
            ports: PortPool::new(config.port_range.clone()),
            postgres: config
                .postgres
                .clone()
                .map(|admin| Provisioner::new(admin, &config.root)),
            config,
            nginx,
            hosts: Mutex::new(HashMap::new()),
            next_version: AtomicU64::new(1),
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
        let target = if shared.config.rotate_logs {
            LogTarget::File(
                shared
                    .config
                    .root
                    .join("log")
                    .join(format!("app-{name}.log")),
            )
        } else {
            LogTarget::Stderr(name.to_string())
        };
        let log = AppLog::open(target)?;
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
        };
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

/// Identity of a bundle file on disk, to skip re-reading a file that did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// One unpacked version of the app and its processes.
struct Version {
    id: u64,
    dir: PathBuf,
    sha256: String,
    stamp: FileStamp,
    config: BundleConfig,
    /// Variables of the plugins (postgres), between the global and the stanza `env`.
    plugin_env: BTreeMap<String, String>,
    procs: Vec<Proc>,
    deploy: u64,
}

/// A webapp stanza's process, kept on its port across crash restarts (Dokku #3396: a changed
/// upstream after a restart meant 502s).
struct Proc {
    spec: Spec,
    port: u16,
    running: Option<Running>,
    /// When a crashed process is due to start again.
    restart_at: Option<Instant>,
    backoff: Duration,
}

/// An old version after the switch, waiting for its last requests before it is stopped.
struct Retiring {
    version: Version,
    since: Instant,
}

/// How a deploy that did not fail ended.
enum Outcome {
    Deployed,
    /// The very file already serving (a repeated event).
    SameFile,
    /// Another file with the content already serving.
    SameContent,
}

/// Why a deploy did not go live. The previous version (if any) still serves.
#[derive(Debug)]
enum DeployError {
    /// A newer command arrived before the switch; not an error of the bundle.
    Superseded,
    Failed(String),
}

impl fmt::Display for DeployError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeployError::Superseded => f.write_str("superseded by a newer command"),
            DeployError::Failed(m) => f.write_str(m),
        }
    }
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Readiness is polled after 1 ms, then at doubling intervals up to every 20 ms (DESIGN.md
/// 6.5: tens of milliseconds): most apps listen within milliseconds of exec.
const READINESS_POLL_FIRST: Duration = Duration::from_millis(1);
const READINESS_POLL: Duration = Duration::from_millis(20);
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
                    stanza,
                    pid,
                    status,
                }) => self.exited(version, stanza, pid, status),
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
                    Command::Deploy(path) => self.deploy(&path, &rx),
                    Command::Stop => self.stop_all(),
                }
                if self.absorb(&rx) {
                    self.stop_all();
                    return;
                }
            }
            self.tick();
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
                    stanza,
                    pid,
                    status,
                } => self.exited(version, stanza, pid, status),
                Event::Shutdown => return true,
            }
        }
        false
    }

    /// The earliest moment something is due: a crash restart or a drain check.
    fn next_deadline(&self) -> Option<Instant> {
        let restarts = self
            .current
            .iter()
            .flat_map(|v| v.procs.iter())
            .filter_map(|p| p.restart_at);
        let drains = self.retiring.iter().map(|_| Instant::now() + DRAIN_POLL);
        restarts.chain(drains).min()
    }

    /// True when `c` asks to deploy the very file (same inode, size and times) that is being
    /// deployed or already serves.
    fn is_repeat(&self, c: &Command) -> bool {
        let Command::Deploy(path) = c else {
            return false;
        };
        let Ok(meta) = fs::symlink_metadata(path) else {
            return false;
        };
        let stamp = FileStamp::of(&meta);
        self.deploying
            .as_ref()
            .is_some_and(|(p, s)| p == path && *s == stamp)
            || self.current.as_ref().is_some_and(|v| v.stamp == stamp)
    }

    fn deploy(&mut self, path: &Path, rx: &Receiver<Event>) {
        let started = Instant::now();
        let label = format!("{}.keter", self.name);
        let result = self.try_deploy(path, rx, started);
        self.deploying = None;
        match result {
            Ok(Outcome::Deployed) => {}
            Ok(Outcome::SameFile) => {
                log::debug!("{}: {label} is the file already serving", self.name)
            }
            Ok(Outcome::SameContent) => {
                log::info!(
                    "{}: {label} is unchanged (same sha256); nothing to do",
                    self.name
                )
            }
            Err(DeployError::Superseded) => {
                log::info!(
                    "{}: deploy of {label} superseded by a newer command",
                    self.name
                )
            }
            Err(DeployError::Failed(why)) => {
                let keeps = if self.current.is_some() {
                    "the previous version keeps serving"
                } else {
                    "the app is not running"
                };
                log::error!("{}: deploy of {label} failed: {why}; {keeps}", self.name);
                self.log.line(&format!("keter: deploy failed: {why}"));
            }
        }
    }

    fn try_deploy(
        &mut self,
        path: &Path,
        rx: &Receiver<Event>,
        started: Instant,
    ) -> Result<Outcome, DeployError> {
        let meta = fs::symlink_metadata(path)
            .map_err(|e| DeployError::Failed(format!("cannot read {}: {e}", path.display())))?;
        if meta.file_type().is_symlink() {
            return Err(DeployError::Failed(format!(
                "{} is a symlink; copy the bundle itself into incoming/",
                path.display()
            )));
        }
        if !meta.is_file() {
            return Err(DeployError::Failed(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let stamp = FileStamp::of(&meta);
        if self.current.as_ref().is_some_and(|v| v.stamp == stamp) {
            return Ok(Outcome::SameFile);
        }
        self.deploying = Some((path.to_path_buf(), stamp));
        let id = self.shared.next_version.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .shared
            .config
            .root
            .join("temp")
            .join(format!("{}-{id}", self.name));
        let unpacked = bundle::unpack(path, &dir, &self.shared.config.limits)
            .map_err(|e| DeployError::Failed(e.to_string()))?;
        log::info!(
            "{}: unpacked {} bytes in {} entries into {} in {} ms",
            self.name,
            unpacked.bytes,
            unpacked.entries,
            dir.display(),
            started.elapsed().as_millis()
        );
        let cleanup = |e: DeployError| {
            let _ = fs::remove_dir_all(&dir);
            e
        };
        if let Some(cur) = &mut self.current
            && cur.sha256 == unpacked.sha256
        {
            cur.stamp = stamp;
            let _ = fs::remove_dir_all(&dir);
            return Ok(Outcome::SameContent);
        }
        let (config, warnings) = bundle::read_config(&dir, &format!("{}.keter", self.name))
            .map_err(|e| cleanup(DeployError::Failed(e.to_string())))?;
        for w in &warnings.warnings {
            log::warn!("{w}");
        }
        self.claim_hosts(&config).map_err(cleanup)?;
        let plugin_env = match self.provision(&config) {
            Ok(env) => env,
            Err(e) => {
                self.release_unused_hosts();
                return Err(cleanup(e));
            }
        };
        self.deploys += 1;
        let mut version = Version {
            id,
            dir: dir.clone(),
            sha256: unpacked.sha256,
            stamp,
            config,
            plugin_env,
            procs: Vec::new(),
            deploy: self.deploys,
        };
        match self.start_and_switch(&mut version, rx, started) {
            Ok(()) => {
                if let Some(old) = self.current.replace(version) {
                    log::info!(
                        "{}: draining the previous version (ports {:?})",
                        self.name,
                        ports_of(&old)
                    );
                    self.retiring.push(Retiring {
                        version: old,
                        since: Instant::now(),
                    });
                }
                self.release_unused_hosts();
                Ok(Outcome::Deployed)
            }
            Err(e) => {
                self.discard(version);
                self.release_unused_hosts();
                Err(e)
            }
        }
    }

    fn start_and_switch(
        &mut self,
        version: &mut Version,
        rx: &Receiver<Event>,
        started: Instant,
    ) -> Result<(), DeployError> {
        let webapps = version.config.webapps.clone();
        for (i, webapp) in webapps.iter().enumerate() {
            let port = self.shared.ports.acquire().ok_or_else(|| {
                DeployError::Failed(format!(
                    "no free port left in port-range {:?}",
                    self.shared.config.port_range
                ))
            })?;
            let program = bundle::resolve_exec(&version.dir, &webapp.exec)
                .map_err(|e| DeployError::Failed(format!("exec: {e}")))?;
            let spec = Spec {
                program,
                args: webapp.args.clone(),
                cwd: version.dir.clone(),
                env: self.environment(webapp, &version.plugin_env, port),
            };
            version.procs.push(Proc {
                spec,
                port,
                running: None,
                restart_at: None,
                backoff: BACKOFF_FIRST,
            });
            let running = self.spawn(version.id, i, &version.procs[i].spec)?;
            log::info!(
                "{}: started {} as pid {} on port {port}",
                self.name,
                webapp.exec.display(),
                running.pid
            );
            version.procs[i].running = Some(running);
        }
        for (i, webapp) in webapps.iter().enumerate() {
            let waited = self.wait_ready(version, i, webapp, rx)?;
            log::info!(
                "{}: ready on port {} after {} ms",
                self.name,
                version.procs[i].port,
                waited.as_millis()
            );
        }
        let site = Site {
            app: self.name.clone(),
            bundle: format!("{}.keter", self.name),
            sha256: version.sha256.clone(),
            deploy: version.deploy,
            upstreams: webapps
                .iter()
                .zip(&version.procs)
                .map(|(w, p)| Upstream {
                    port: p.port,
                    hosts: w.hosts.clone(),
                    timeout: w
                        .connection_time_bound
                        .unwrap_or(self.shared.config.connection_time_bound),
                })
                .collect(),
        };
        let generation = self
            .shared
            .nginx
            .apply(&self.name, Some(site))
            .map_err(|e| DeployError::Failed(e.to_string()))?;
        log::info!(
            "{}: switched to deploy {} (sha256 {}) at Nginx generation {generation}, {} ms after the bundle was picked up",
            self.name,
            version.deploy,
            &version.sha256[..12],
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// DESIGN.md 6.3: the plugins' variables for this bundle (none unless it asks for
    /// postgres). Runs on this worker thread: the sync postgres client must not run on tokio.
    fn provision(&self, config: &BundleConfig) -> Result<BTreeMap<String, String>, DeployError> {
        if !config.postgres {
            return Ok(BTreeMap::new());
        }
        let Some(pg) = &self.shared.postgres else {
            return Err(DeployError::Failed(
                "the bundle asks for the postgres plugin, but keter's configuration has no `postgres` section naming the server".into(),
            ));
        };
        let started = Instant::now();
        let creds = pg
            .provision(&self.name)
            .map_err(|e| DeployError::Failed(format!("postgres plugin: {e}")))?;
        log::info!(
            "{}: database {} (role {}) on {} ready in {} ms",
            self.name,
            creds.database,
            creds.role,
            creds.server,
            started.elapsed().as_millis()
        );
        Ok(creds.env())
    }

    /// The environment of DESIGN.md 7, lowest precedence first; keter's own variables last.
    fn environment(
        &self,
        webapp: &WebApp,
        plugin_env: &BTreeMap<String, String>,
        port: u16,
    ) -> Vec<(String, String)> {
        let config = &self.shared.config;
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into());
        env.insert(
            "HOME".into(),
            std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        );
        env.extend(config.env.clone());
        env.extend(plugin_env.clone());
        for name in &webapp.forward_env {
            if let Ok(v) = std::env::var(name) {
                env.insert(name.clone(), v);
            }
        }
        env.extend(webapp.env.clone());
        let (scheme, external, default) = if webapp.ssl {
            ("https", config.external_https_port, 443)
        } else {
            ("http", config.external_http_port, 80)
        };
        let host = webapp.hosts[0].as_str();
        let approot = if external == default {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{external}")
        };
        env.insert("PORT".into(), port.to_string());
        env.insert("YESOD_PORT".into(), port.to_string());
        env.insert("APPROOT".into(), approot.clone());
        env.insert("YESOD_APPROOT".into(), approot);
        env.into_iter().collect()
    }

    fn spawn(&self, version: u64, stanza: usize, spec: &Spec) -> Result<Running, DeployError> {
        let tx = self.tx.clone();
        process::spawn(spec, &self.log, move |pid, status| {
            let _ = tx.send(Event::Exited {
                version,
                stanza,
                pid,
                status,
            });
        })
        .map_err(|e| DeployError::Failed(format!("cannot start {}: {e}", spec.program.display())))
    }

    /// Polls the health check until the app answers below 500, it exits, a newer command
    /// arrives, or the readiness timeout passes.
    fn wait_ready(
        &mut self,
        version: &mut Version,
        i: usize,
        webapp: &WebApp,
        rx: &Receiver<Event>,
    ) -> Result<Duration, DeployError> {
        let timeout = webapp
            .readiness_timeout
            .unwrap_or(self.shared.config.readiness_timeout);
        let start = Instant::now();
        let deadline = start + timeout;
        let port = version.procs[i].port;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let host = webapp.hosts[0].as_str();
        let path = webapp.health_check_path.as_str();
        let mut last = format!("never listened on port {port}");
        let mut poll = READINESS_POLL_FIRST;
        loop {
            let pid = version.procs[i].running.map(|r| r.pid).unwrap_or(0);
            let per_try = deadline
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(50), Duration::from_secs(2));
            match probe::get_tcp(addr, host, path, per_try) {
                Ok(r) if r.status < 500 => {
                    // Readiness must come from this version's processes, not from a stale
                    // process of someone else that took the port.
                    if procfs::port_listener_in_group(port, pid) {
                        return Ok(start.elapsed());
                    }
                    last = format!("port {port} is answered by a process that is not this app's");
                }
                Ok(r) => last = format!("GET {path} (Host: {host}) answered {}", r.status),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => last = format!("GET {path} (Host: {host}) failed: {e}"),
            }
            // Events while waiting: this version's exit fails the deploy; a newer command
            // supersedes it; other exits are the running version's business.
            let wait = poll.min(deadline.saturating_duration_since(Instant::now()));
            poll = (poll * 2).min(READINESS_POLL);
            let mut waited_event = rx.recv_timeout(wait);
            loop {
                match waited_event {
                    Ok(Event::Command(c)) if self.is_repeat(&c) => {}
                    Ok(Event::Command(c)) => {
                        self.pending = Some(c);
                        return Err(DeployError::Superseded);
                    }
                    Ok(Event::Shutdown) => {
                        self.pending = None;
                        // Put the shutdown back so the main loop sees it.
                        let _ = self.tx.send(Event::Shutdown);
                        return Err(DeployError::Superseded);
                    }
                    Ok(Event::Exited {
                        version: v,
                        stanza,
                        pid,
                        status,
                    }) => {
                        if v == version.id {
                            version.procs[stanza].running = None;
                            return Err(DeployError::Failed(format!(
                                "not ready: the process exited with {} before answering ({last}){}",
                                process::describe_exit(status),
                                self.last_output()
                            )));
                        }
                        self.exited(v, stanza, pid, status);
                    }
                    Err(_) => break,
                }
                waited_event = rx.try_recv().map_err(|_| RecvTimeoutError::Timeout);
            }
            if Instant::now() >= deadline {
                return Err(DeployError::Failed(format!(
                    "not ready within {:?} (readiness-timeout): {last}{}",
                    timeout,
                    self.last_output()
                )));
            }
        }
    }

    fn last_output(&self) -> String {
        let lines = self.log.tail(5);
        if lines.is_empty() {
            "; the app printed nothing".to_string()
        } else {
            format!("; last output: {}", lines.join(" | "))
        }
    }

    /// Reserves this bundle's hosts for the app; refused if another app serves one of them.
    fn claim_hosts(&self, config: &BundleConfig) -> Result<(), DeployError> {
        let mut hosts = self.shared.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for h in config.hosts() {
            if let Some(owner) = hosts.get(h)
                && owner != &self.name
            {
                return Err(DeployError::Failed(format!(
                    "the host {h} is already served by the app {owner}"
                )));
            }
        }
        for h in config.hosts() {
            hosts.insert(h.clone(), self.name.clone());
        }
        Ok(())
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

    /// Stops a version's processes, frees its ports and deletes its folder.
    fn discard(&self, version: Version) {
        for p in &version.procs {
            if let Some(r) = p.running {
                let how = process::stop_group(r.pid, self.shared.config.stop_timeout);
                log::info!(
                    "{}: stopped pid {} on port {} ({})",
                    self.name,
                    r.pid,
                    p.port,
                    match how {
                        process::Stopped::Terminated => "SIGTERM",
                        process::Stopped::Killed => "SIGKILL after stop-timeout",
                    }
                );
            }
            self.shared.ports.release(p.port);
        }
        if let Err(e) = fs::remove_dir_all(&version.dir) {
            log::warn!(
                "{}: cannot delete {}: {e}",
                self.name,
                version.dir.display()
            );
        }
    }

    /// A process exited: restart it with backoff if it belongs to the serving version.
    fn exited(&mut self, version: u64, stanza: usize, pid: i32, status: ExitStatus) {
        let name = self.name.clone();
        let Some(cur) = self.current.as_mut().filter(|v| v.id == version) else {
            return;
        };
        let Some(p) = cur.procs.get_mut(stanza) else {
            return;
        };
        if p.running.map(|r| r.pid) != Some(pid) {
            return;
        }
        let ran = p.running.map(|r| r.started.elapsed()).unwrap_or_default();
        p.running = None;
        if ran >= HEALTHY_AFTER {
            p.backoff = BACKOFF_FIRST;
        }
        // Leftover members of the group (children of a wrapper script) go with it.
        process::stop_group(pid, Duration::from_millis(500));
        log::warn!(
            "{name}: pid {pid} on port {} exited with {} after {} ms; restarting in {} ms",
            p.port,
            process::describe_exit(status),
            ran.as_millis(),
            p.backoff.as_millis()
        );
        p.restart_at = Some(Instant::now() + p.backoff);
        p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
    }

    /// Timed work: due crash restarts and drained old versions.
    fn tick(&mut self) {
        let now = Instant::now();
        if let Some(mut cur) = self.current.take() {
            for i in 0..cur.procs.len() {
                if cur.procs[i].restart_at.is_some_and(|at| at <= now) {
                    cur.procs[i].restart_at = None;
                    match self.spawn(cur.id, i, &cur.procs[i].spec) {
                        Ok(r) => {
                            log::info!(
                                "{}: restarted as pid {} on port {}",
                                self.name,
                                r.pid,
                                cur.procs[i].port
                            );
                            cur.procs[i].running = Some(r);
                        }
                        Err(e) => {
                            log::error!("{}: restart failed: {e}", self.name);
                            let p = &mut cur.procs[i];
                            p.restart_at = Some(now + p.backoff);
                            p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
                        }
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
                    && ports_of(&r.version)
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
}

fn ports_of(v: &Version) -> Vec<u16> {
    v.procs.iter().map(|p| p.port).collect()
}
