//! The daemon: sets up the root folder and Nginx, turns changes in `incoming/` into commands
//! for the app workers, ends the workers of deleted apps, and stops everything cleanly on
//! request. It owns the Nginx controller and stops it last (`docs/lifecycle.md`, "Who owns
//! what").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::app::{AppHandle, Command, Refusal, Shared};
use crate::config::Config;
use crate::isolation::{Isolation, IsolationError};
use crate::journal::Journal;
use crate::names::AppName;
use crate::nginx::{Nginx, Renderer};
use crate::report::Reports;
use crate::rootlock::{LockError, RootLock};
use crate::status::StatusServer;
use crate::watcher::{self, Hint};

/// What the daemon reacts to besides file events: the signals, injected so tests and `main`
/// can drive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// SIGHUP: rescan `incoming/`.
    Rescan,
    /// SIGTERM / SIGINT: stop every app and Nginx, then return.
    Shutdown,
    /// SIGUSR2: re-execute keter's binary and hand everything over (`src/handover.rs`).
    Upgrade,
}

/// Everything that reaches the daemon's loop.
#[derive(Debug)]
pub enum Input {
    Hint(Hint),
    Control(Control),
    /// An app's worker stopped the app after receiving `commands` commands.
    Stopped {
        app: AppName,
        commands: u64,
    },
    /// An operator's request over the control socket (`src/control/`). Boxed: the channel
    /// ([`channel`]) allocates all its slots at once, each the size of the largest input.
    Ask(Box<crate::control::Asked>),
}

impl From<Hint> for Input {
    fn from(h: Hint) -> Input {
        Input::Hint(h)
    }
}

/// A reason the daemon cannot run at all (as opposed to one app failing).
#[derive(Debug)]
pub enum Fatal {
    /// A folder of the root cannot be made, emptied or watched: `what` was done to `path`.
    Folder {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// `incoming/` cannot be watched.
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    /// Another keter holds the root, or its lock cannot be taken.
    Lock(LockError),
    /// The root or the apps' users are not as isolation needs them (README "Security").
    Isolation(IsolationError),
    /// Nginx cannot be configured or started.
    Nginx(Box<dyn std::error::Error + Send + Sync>),
    /// A global limit (`memory-limit: ...`) that this host's cgroups cannot enforce: the key
    /// and why.
    Limits(String),
}

impl Fatal {
    fn folder<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Fatal + 'a {
        move |source| Fatal::Folder {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fatal::Folder { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
            Fatal::Watch { path, source } => {
                write!(f, "cannot watch {}: {source}", path.display())
            }
            Fatal::Lock(e) => write!(f, "{e}"),
            Fatal::Isolation(e) => write!(f, "{e}"),
            Fatal::Nginx(e) => write!(f, "nginx: {e}"),
            Fatal::Limits(e) => write!(f, "the global configuration's {e}"),
        }
    }
}

impl std::error::Error for Fatal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Fatal::Folder { source, .. } => Some(source),
            Fatal::Watch { source, .. } => Some(source),
            Fatal::Lock(e) => Some(e),
            Fatal::Isolation(e) => Some(e),
            Fatal::Nginx(e) => Some(e.as_ref()),
            Fatal::Limits(_) => None,
        }
    }
}

/// Why an in-place upgrade did not happen; the running keter carries on.
#[derive(Debug)]
enum HandOverError {
    /// The app's worker did not finish what it was doing in time (a switch in flight).
    NotAtRest(AppName),
    /// The watch of the apps' output and exits could not be paused.
    Pause(io::Error),
    /// The app's worker did not write its record in time.
    NotRecorded(AppName),
    /// A stop was asked for meanwhile.
    Stopping,
    /// The new program could not be executed.
    Exec(io::Error),
}

impl fmt::Display for HandOverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandOverError::NotAtRest(app) => {
                write!(f, "{app} did not come to rest in time (a switch in flight)")
            }
            HandOverError::Pause(e) => write!(f, "{e}"),
            HandOverError::NotRecorded(app) => {
                write!(f, "{app} did not write its record in time")
            }
            HandOverError::Stopping => f.write_str("keter is asked to stop"),
            HandOverError::Exec(e) => write!(f, "cannot execute it: {e}"),
        }
    }
}

impl std::error::Error for HandOverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandOverError::Pause(e) | HandOverError::Exec(e) => Some(e),
            _ => None,
        }
    }
}

/// The channel the daemon listens on; `main` sends signals into it. Its slots are allocated
/// (and written) all at once, each the size of the largest [`Input`]: keep inputs small.
pub fn channel() -> (Sender<Input>, Receiver<Input>) {
    bounded(4096)
}

/// Runs the daemon until a `Control::Shutdown` arrives on `rx`. `takeover` is what an earlier
/// image of this process handed over before it re-executed keter (`src/handover.rs`); without
/// it keter takes over from the records of a keter that was killed, if there are any. `lock`
/// is the root's lock as that image kept it (`src/rootlock.rs`).
pub fn run(
    config: Config,
    tx: Sender<Input>,
    rx: Receiver<Input>,
    takeover: Option<crate::handover::Takeover>,
    stored: std::collections::HashMap<u64, std::fs::File>,
    lock: Option<std::fs::File>,
) -> Result<(), Fatal> {
    crate::memory::limit_arenas();
    let started = std::time::Instant::now();
    log::info!(
        "keter: keter {} starting on {}",
        crate::build::VERSION,
        config.root.display()
    );
    make_root(&config.root)?;
    // Before anything of the root is read or changed; held until keter exits.
    let lock = RootLock::acquire(&config.root, lock).map_err(Fatal::Lock)?;
    // Nginx's workers read it for certbot; nobody but root writes it (an app that could
    // would get certificates for every host keter serves).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.acme_webroot)
        .map_err(Fatal::folder("cannot create", &config.acme_webroot))?;
    let isolation = Isolation::new(&config).map_err(Fatal::Isolation)?;
    log::info!("keter: {}", isolation.describe());
    // Before keter starts a process of its own (the Nginx master stays in keter's group).
    let cgroups = crate::cgroup::init(config.cgroup.as_deref());
    log::info!("keter: {}", cgroups.describe());
    if let Some((key, why)) = cgroups
        .unenforceable(&config.process_limits)
        .into_iter()
        .next()
    {
        return Err(Fatal::Limits(format!("{key}: {why}")));
    }
    // What an earlier keter ran is taken over from its records before anything starts: the
    // apps that still run go on serving (README, "A keter that dies and comes back").
    let journal = Journal::new(&config.root.join("etc"));
    let nginx_paths = crate::nginx::Paths::new(&config.root);
    let files = crate::nginx::live_files(&nginx_paths);
    let live: BTreeMap<_, _> = files
        .iter()
        .filter_map(|(app, text)| Some((app.clone(), crate::nginx::live_sha256(text)?)))
        .collect();
    let routes: BTreeMap<_, _> = files
        .iter()
        .map(|(app, text)| (app.clone(), crate::nginx::upstream_ports(text)))
        .collect();
    let upgrade = takeover.is_some();
    let since = takeover.as_ref().and_then(|t| t.since);
    let mut inherited = takeover.map(|t| t.pipes).unwrap_or_default();
    // The pipes systemd kept, where the earlier image of this process did not pass them on.
    for (ino, pipe) in stored {
        inherited.entry(ino).or_insert((pipe, Vec::new()));
    }
    let recovery = crate::app::recover(&journal, &live, &routes, &mut inherited);
    // Pipes that no process taken over holds are of no use any more.
    for ino in inherited.keys() {
        crate::systemd::forget_pipe(*ino);
    }
    drop(inherited);
    // Every other group an earlier keter ran is stopped: it holds ports and would answer for
    // apps about to be deployed again.
    let leftovers = journal.recover(&recovery.groups, config.stop_timeout);
    if leftovers > 0 {
        log::warn!("keter: stopped {leftovers} process groups left by an earlier run");
    }
    empty_temp(&config.root, &recovery.dirs)?;
    // The groups of versions that were not taken over go, with whatever still runs in them.
    cgroups.sweep(
        &recovery
            .dirs
            .iter()
            .filter_map(|d| d.file_name()?.to_str().map(str::to_string))
            .collect(),
    );
    // The limits of the groups taken over, which the kernel dropped when the unit's
    // ExecStopPost= handed the controllers back up after a crash (src/cgroup.rs).
    let restored = cgroups.restore();
    if restored > 0 {
        log::info!("keter: wrote the limits of {restored} process groups taken over again");
    }
    let mut renderer = Renderer::new(&config).map_err(|e| Fatal::Nginx(e.into()))?;
    renderer.worker_user = isolation.managed_worker_user();
    // Before Nginx tests a file that names the request log: its folder must exist.
    renderer.request_metrics = config.request_metrics && prepare_requests(&nginx_paths);
    let request_metrics = renderer.request_metrics;
    let isolation = Arc::new(isolation);
    let reports = Arc::new(Reports::default());
    let nginx = Nginx::start(&config, Arc::new(renderer), &recovery.sites)
        .map_err(|e| Fatal::Nginx(e.into()))?;
    let requests = request_metrics
        .then(|| start_requests(&nginx_paths, &reports, nginx.handle()))
        .flatten();
    isolation.check_acme_webroot(&config.acme_webroot, nginx.handle().master_pid());
    let incoming = config.root.join("incoming");
    let status = StatusServer::start(
        &config,
        reports.clone(),
        nginx.counters.clone(),
        nginx.handle(),
        isolation.clone(),
    );
    let control = crate::control::ControlServer::start(
        &config.root,
        tx.clone(),
        isolation.clone(),
        reports.clone(),
    );
    let acme = start_acme(&config);
    if let Some(a) = &acme {
        reports.attach_acme(a.clone());
    }
    let shared = Arc::new(Shared::new(
        config,
        nginx.handle(),
        journal,
        reports,
        isolation,
        acme.clone(),
    ));
    recovery.claim(&shared);
    let watcher = watcher::watch(&incoming, tx.clone()).map_err(|source| Fatal::Watch {
        path: incoming.clone(),
        source,
    })?;
    let mut daemon = Daemon {
        shared,
        apps: BTreeMap::new(),
        refused: BTreeSet::new(),
        unstarted: BTreeMap::new(),
        tx,
    };
    let (apps, processes) = (recovery.apps.len(), recovery.processes());
    for adopted in recovery.apps {
        daemon.adopt(adopted);
    }
    if apps > 0 {
        log::info!(
            "keter: took over {apps} apps and {processes} processes from {} in {} ms",
            if upgrade {
                "the keter before the upgrade"
            } else {
                "an earlier run"
            },
            started.elapsed().as_millis()
        );
    }
    log::info!("keter: watching {}", incoming.display());
    if let Some(since) = since {
        log::info!(
            "keter: upgraded in place to keter {} in {} ms (from the signal to watching again)",
            crate::build::VERSION,
            since.elapsed().as_millis()
        );
    }
    crate::systemd::notify("READY=1");
    // After an upgrade the bundles are looked at as a SIGHUP does, failed ones included.
    daemon.rescan(upgrade);
    let mut queued: Vec<Input> = Vec::new();
    loop {
        let input = match queued.pop() {
            Some(i) => i,
            None => match daemon.next_worker_start() {
                Some(at) => match rx.recv_deadline(at) {
                    Ok(i) => i,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                        daemon.start_workers_due();
                        continue;
                    }
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(i) => i,
                    Err(_) => break,
                },
            },
        };
        match input {
            Input::Hint(Hint::Changed(name)) => daemon.reconcile(&name, false),
            Input::Hint(Hint::Created(name)) => {
                let path = daemon.shared.config.root.join("incoming").join(&name);
                if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                    daemon.reconcile(&name, false);
                }
            }
            Input::Hint(Hint::Rescan) => daemon.rescan(false),
            // An operator's SIGHUP also retries bundles whose deploy failed.
            Input::Control(Control::Rescan) => daemon.rescan(true),
            Input::Control(Control::Shutdown) => break,
            Input::Control(Control::Upgrade) => {
                queued = daemon.upgrade(&nginx, &rx, &lock);
                queued.reverse();
            }
            Input::Stopped { app, commands } => daemon.end_stopped(&app, commands),
            Input::Ask(asked) => daemon.ask(*asked),
        }
        if watcher.overflowed.swap(false, Ordering::Relaxed) {
            daemon.rescan(false);
        }
    }
    crate::systemd::notify("STOPPING=1");
    drop(watcher);
    if let Some(status) = status {
        status.stop();
    }
    if let Some(control) = control {
        control.stop();
    }
    let journal_owner = daemon.shared.clone();
    daemon.shutdown();
    // Every worker has ended and removed its record: nothing is left to take over.
    journal_owner.journal.flush();
    // Nothing asks for certificates or Nginx changes any more.
    if let Some(a) = acme {
        a.stop();
    }
    nginx.shutdown();
    if let Some(r) = requests {
        r.stop();
    }
    log::info!("keter: stopped");
    drop(lock);
    Ok(())
}

/// Makes the request log's folder (README, "Request metrics"); false, logged, when it cannot
/// be made: keter then goes on without request metrics and no app's file names the log.
fn prepare_requests(paths: &crate::nginx::Paths) -> bool {
    match crate::requests::tailer::prepare(&paths.requests_log) {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "keter: no request metrics: cannot make the folder of {}: {e}",
                paths.requests_log.display()
            );
            false
        }
    }
}

/// The thread that reads Nginx's request log, unless `request-metrics: false`. One that
/// cannot start is logged and keter goes on without request metrics (Nginx goes on logging;
/// the next keter reads what it can of the file).
fn start_requests(
    paths: &crate::nginx::Paths,
    reports: &Reports,
    nginx: crate::nginx::NginxHandle,
) -> Option<crate::requests::tailer::Tailer> {
    let reopen = Box::new(move || nginx.reopen_logs());
    match crate::requests::tailer::Tailer::start(
        &paths.requests_log,
        reports.requests.clone(),
        reopen,
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            log::error!(
                "keter: no request metrics: cannot read {}: {e}",
                paths.requests_log.display()
            );
            None
        }
    }
}

/// The ACME thread, when the configuration has an `acme` section. A thread that cannot start
/// is logged and keter goes on without certificates: `ssl: acme` stanzas are served over plain
/// HTTP, as while the CA is unreachable.
fn start_acme(config: &Config) -> Option<Arc<crate::acme::Acme>> {
    let section = config.acme.clone()?;
    match crate::acme::Acme::start(section, &config.root.join("etc"), &config.acme_webroot) {
        Ok(a) => Some(Arc::new(a)),
        Err(e) => {
            log::error!("keter: the ACME client cannot start: {e}; no certificate is obtained");
            None
        }
    }
}

/// Creates the folders of the README's "Folder layout under `root`" with the modes that keep
/// apps out of them.
fn make_root(root: &Path) -> Result<(), Fatal> {
    fs::create_dir_all(root).map_err(Fatal::folder("cannot create", root))?;
    for changed in crate::isolation::prepare_root(root).map_err(Fatal::Isolation)? {
        log::warn!("keter: {changed}");
    }
    Ok(())
}

/// Empties `temp/` (versions of an earlier run), except the folders of the versions taken
/// over.
fn empty_temp(root: &Path, keep: &BTreeSet<std::path::PathBuf>) -> Result<(), Fatal> {
    let temp = root.join("temp");
    let entries = fs::read_dir(&temp).map_err(Fatal::folder("cannot read", &temp))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if keep.contains(&path) {
            continue;
        }
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        removed.map_err(Fatal::folder("cannot empty", &path))?;
    }
    Ok(())
}

struct Daemon {
    shared: Arc<Shared>,
    apps: BTreeMap<AppName, AppHandle>,
    /// Names in `incoming/` already reported as unusable (reported once, not at every event).
    refused: BTreeSet<String>,
    /// Apps whose worker could not start, tried again on their own: a bundle is never left
    /// waiting for a SIGHUP because keter was out of threads or descriptors for a moment.
    unstarted: BTreeMap<AppName, Unstarted>,
    /// The daemon's own channel, for the workers' [`Input::Stopped`].
    tx: Sender<Input>,
}

/// A bundle whose app's worker could not start.
struct Unstarted {
    /// Its name in `incoming/`.
    file_name: String,
    /// The command that failed was a rescan's retry (SIGHUP).
    retry: bool,
    /// When it is tried again.
    at: Instant,
    backoff: crate::restart::Backoff,
}

impl Daemon {
    /// SIGUSR2: asks the binary at keter's start path whether it takes over, brings every
    /// worker, the Nginx controller and the watch thread to rest, flushes the apps' logs and
    /// re-executes keter (`src/handover.rs`). Returns only if that did not happen, with the
    /// inputs that arrived meanwhile; this keter then carries on as before.
    fn upgrade(&mut self, nginx: &Nginx, rx: &Receiver<Input>, lock: &RootLock) -> Vec<Input> {
        let since = std::time::Instant::now();
        let program = crate::handover::program();
        log::info!(
            "keter: SIGUSR2: upgrading in place to {}",
            program.display()
        );
        let answer = match crate::handover::probe(&self.shared.config) {
            Ok(a) => a,
            Err(why) => {
                log::error!(
                    "keter: cannot hand over to {}: {why}; this keter carries on",
                    program.display()
                );
                return Vec::new();
            }
        };
        crate::systemd::notify("RELOADING=1");
        let mut later = Vec::new();
        let result = self.hand_over(nginx, rx, since, &answer, lock, &mut later);
        if let Err(why) = result {
            log::error!(
                "keter: cannot hand over to {}: {why}; this keter carries on",
                program.display()
            );
        }
        crate::systemd::notify("READY=1");
        later
    }

    /// The handover itself: returns only if the exec did not happen, after undoing the rest.
    fn hand_over(
        &mut self,
        nginx: &Nginx,
        rx: &Receiver<Input>,
        since: std::time::Instant,
        answer: &crate::handover::Answer,
        lock: &RootLock,
        later: &mut Vec<Input>,
    ) -> Result<(), HandOverError> {
        let config = &self.shared.config;
        // A switch in flight is waited for: up to a test and a reload that times out.
        let deadline = since + config.nginx.reload_timeout * 3 + std::time::Duration::from_secs(5);
        let quiet: Vec<_> = self.apps.iter().map(|(a, h)| (a, h.freeze())).collect();
        let thaw = |apps: &BTreeMap<AppName, AppHandle>| apps.values().for_each(|h| h.thaw());
        for (app, answer) in &quiet {
            if answer.recv_deadline(deadline).is_err() {
                let app = (*app).clone();
                thaw(&self.apps);
                return Err(HandOverError::NotAtRest(app));
            }
        }
        nginx.freeze();
        let paused = match crate::childwatch::pause() {
            Ok(p) => p,
            Err(e) => {
                nginx.thaw();
                thaw(&self.apps);
                return Err(HandOverError::Pause(e));
            }
        };
        // Nothing reports exits any more: each worker's record is now final.
        let written: Vec<_> = self.apps.iter().map(|(a, h)| (a, h.snapshot())).collect();
        for (app, w) in &written {
            if w.recv_deadline(deadline).is_err() {
                let app = (*app).clone();
                drop(paused);
                nginx.thaw();
                thaw(&self.apps);
                return Err(HandOverError::NotRecorded(app));
            }
        }
        self.shared.journal.flush();
        crate::applog::flush();
        // A stop asked for meanwhile wins: the new image would not know of it.
        while let Ok(input) = rx.try_recv() {
            later.push(input);
        }
        let result = if later
            .iter()
            .any(|i| matches!(i, Input::Control(Control::Shutdown)))
        {
            Err(HandOverError::Stopping)
        } else {
            log::info!(
                "keter: handing {} apps over to keter {} after {} ms",
                self.apps.len(),
                answer.keter,
                since.elapsed().as_millis()
            );
            let e = crate::handover::exec(&paused.pipes(), since, lock.fd());
            Err(HandOverError::Exec(e))
        };
        drop(paused);
        nginx.thaw();
        thaw(&self.apps);
        result
    }

    /// Starts the worker of an app taken over from an earlier keter.
    fn adopt(&mut self, adopted: crate::app::Adopted) {
        let app = adopted.name.clone();
        match AppHandle::adopt(adopted, self.shared.clone(), self.on_stopped(&app)) {
            Ok(h) => {
                self.apps.insert(app, h);
            }
            Err(e) => log::error!("{app}: cannot start its worker: {e}"),
        }
    }

    /// What a worker calls when its app has stopped.
    fn on_stopped(&self, app: &AppName) -> Box<dyn Fn(u64) + Send> {
        let tx = self.tx.clone();
        let name = app.clone();
        Box::new(move |commands| {
            // Never blocks a worker: a lost note only keeps an idle worker alive.
            let _ = tx.try_send(Input::Stopped {
                app: name.clone(),
                commands,
            });
        })
    }

    /// Looks at every bundle in `incoming/` and every app known.
    fn rescan(&mut self, retry: bool) {
        let incoming = self.shared.config.root.join("incoming");
        let mut names: BTreeSet<String> = match fs::read_dir(&incoming) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) => {
                log::error!("cannot read {}: {e}", incoming.display());
                return;
            }
        };
        names.extend(self.apps.keys().map(|a| format!("{a}.keter")));
        for name in names {
            self.reconcile(&name, retry);
        }
    }

    /// When the next worker that could not start is due to be tried again.
    fn next_worker_start(&self) -> Option<Instant> {
        self.unstarted.values().map(|u| u.at).min()
    }

    /// Tries again the workers that could not start and whose time has come.
    fn start_workers_due(&mut self) {
        let now = Instant::now();
        let due: Vec<AppName> = self
            .unstarted
            .iter()
            .filter(|(_, u)| u.at <= now)
            .map(|(app, _)| app.clone())
            .collect();
        for app in due {
            if let Some(u) = self.unstarted.get(&app) {
                let (file_name, retry) = (u.file_name.clone(), u.retry);
                self.reconcile(&file_name, retry);
            }
        }
    }

    /// Brings the app behind one file name in line with the folder: deploy if the bundle is
    /// there, stop if it is gone.
    fn reconcile(&mut self, file_name: &str, retry: bool) {
        if file_name.starts_with('.') {
            return; // editors' and copy tools' temporary files
        }
        let app = match AppName::from_bundle_file_name(file_name) {
            None => return,
            Some(Ok(app)) => app,
            Some(Err(why)) => {
                let path = self.shared.config.root.join("incoming").join(file_name);
                let present = fs::symlink_metadata(&path).is_ok();
                if present && self.refused.insert(file_name.to_string()) {
                    log::error!("incoming/{}: refused: {why}", file_name.escape_debug());
                } else if !present {
                    self.refused.remove(file_name);
                }
                return;
            }
        };
        let path = self.shared.config.root.join("incoming").join(file_name);
        let present = fs::symlink_metadata(&path).is_ok();
        if !present {
            self.unstarted.remove(&app);
        }
        if present {
            if !self.apps.contains_key(&app) {
                let on_stopped = self.on_stopped(&app);
                match AppHandle::spawn(app.clone(), self.shared.clone(), on_stopped) {
                    Ok(h) => {
                        self.apps.insert(app.clone(), h);
                        self.unstarted.remove(&app);
                    }
                    Err(e) => {
                        let u = self.unstarted.entry(app.clone()).or_insert(Unstarted {
                            file_name: String::new(),
                            retry: false,
                            at: Instant::now(),
                            backoff: crate::restart::WORKER_START,
                        });
                        let delay = u.backoff.failed(std::time::Duration::ZERO);
                        u.file_name = file_name.to_string();
                        // A SIGHUP's retry of a failed deploy is kept until the worker runs.
                        u.retry |= retry;
                        u.at = Instant::now() + delay;
                        log::error!(
                            "{app}: cannot start its worker: {e}; keter tries again in {} s",
                            delay.as_secs_f64()
                        );
                        return;
                    }
                }
            }
            if let Some(h) = self.apps.get_mut(&app) {
                h.send(Command::Deploy { path, retry });
            }
        } else if let Some(h) = self.apps.get_mut(&app) {
            h.send(Command::Stop);
        }
    }

    /// An operator's request (`src/control/`): handed to the app's worker, which answers
    /// once it is done; what cannot be done is answered here.
    fn ask(&mut self, asked: crate::control::Asked) {
        use crate::control::Request;
        let mut reply = asked.reply;
        let app = match AppName::new(asked.request.app()) {
            Ok(a) => a,
            Err(e) => {
                reply.refuse(Refusal::Refused(format!(
                    "{:?} is not an app name: {e}",
                    asked.request.app()
                )));
                return;
            }
        };
        let path = self
            .shared
            .config
            .root
            .join("incoming")
            .join(format!("{app}.keter"));
        let Some(h) = self.apps.get_mut(&app) else {
            reply.refuse(Refusal::NoSuchApp {
                app: app.to_string(),
            });
            return;
        };
        match asked.request {
            Request::Restart { .. } => h.send(Command::Restart { path, reply }),
            Request::Rollback { release, .. } => h.send(Command::Rollback {
                path,
                to: release,
                by: asked.uid,
                reply,
            }),
            Request::Maintenance { on, message, .. } => h.send(Command::Maintenance {
                on: on.then(|| crate::app::maintenance::Maintenance {
                    message,
                    since: crate::report::rfc3339(std::time::SystemTime::now()),
                    by: asked.uid,
                }),
                reply,
            }),
            // The control socket answers it from the reports.
            Request::Releases { .. } => reply.refuse(Refusal::Refused("not a command".into())),
        }
    }

    /// A worker stopped its app: if that answers the last command it was sent (the bundle is
    /// still gone), the worker ends; a newer command keeps it.
    fn end_stopped(&mut self, app: &AppName, commands: u64) {
        if !self
            .apps
            .get(app)
            .is_some_and(|h| h.stopped_after(commands))
        {
            return;
        }
        if let Some(h) = self.apps.remove(app) {
            h.begin_shutdown();
            h.join();
            log::debug!("{app}: worker ended");
        }
    }

    fn shutdown(self) {
        log::info!("keter: stopping {} apps", self.apps.len());
        for h in self.apps.values() {
            h.begin_shutdown();
        }
        for (_, h) in self.apps {
            h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The daemon's channel holds 4096 inputs from its start ([`super::channel`]): at 80 bytes
    /// an input (an operator's request inline) they were 360 KB of the daemon's memory; at 40
    /// (an app's name and a count), 196 KB.
    #[test]
    fn an_input_is_five_words_at_most() {
        let size = std::mem::size_of::<super::Input>();
        assert!(size <= 40, "an Input takes {size} bytes");
    }
}
