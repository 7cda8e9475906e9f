//! The Nginx controller: the only writer of keter's Nginx files and the only sender of signals
//! to Nginx (README, "How a deploy works", step 6; `docs/lifecycle.md`, "Who owns what").
//!
//! An app worker asks for its site to be set or removed and blocks until the change is live.
//! Requests that arrive while a reload is in progress are applied together with one `nginx -t`
//! and one reload. A change is written into place, tested with `nginx -t` against the real main
//! configuration, and restored if the test fails (Dokku's broken file stayed live and blocked
//! every later deploy); after SIGHUP keter asks Nginx's control socket which configuration
//! generation it runs and reports success only once the new one answers. In managed mode the
//! controller also runs the Nginx master and restarts it if it dies.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

mod disk;
mod master;

pub use disk::{live_files, live_sha256, upstream_ports};
use disk::{longest_bound, write_if_changed, written_generation};
use master::Master;

use super::system::{self, Blame};
use super::{Paths, Renderer, Site, worker_files};
use crate::config::{Config, NginxConfig, NginxMode};
use crate::names::AppName;
use crate::restart::{self, Backoff};
use crate::{atomic_file, probe, process, procfs};

/// Why a change could not be made live. In every case the previous files are back in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NginxError {
    /// `nginx -t` refused the configuration; Nginx's own message.
    Rejected(String),
    /// Nginx did not confirm the new generation in time, or is not running.
    Unconfirmed(String),
    /// Writing the files failed (disk full, permissions) or rendering failed.
    Files(String),
    /// System mode: `nginx -t` fails because of a file that is not keter's (another site on
    /// the host, or the main configuration). Nginx keeps running what it ran before.
    Foreign { file: PathBuf, message: String },
}

impl fmt::Display for NginxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NginxError::Rejected(m) => write!(f, "nginx -t rejected the configuration: {m}"),
            NginxError::Unconfirmed(m) => {
                write!(f, "Nginx did not take the new configuration: {m}")
            }
            NginxError::Files(m) => write!(f, "cannot write the Nginx configuration: {m}"),
            NginxError::Foreign { file, message } => write!(
                f,
                "nginx -t fails because of {}, which is not keter's file; Nginx keeps its running configuration until that file is fixed: {message}",
                file.display()
            ),
        }
    }
}

impl std::error::Error for NginxError {}

/// What the controller has done, for the metrics.
#[derive(Debug, Default)]
pub struct NginxCounters {
    /// Reloads confirmed by Nginx.
    pub reloads: AtomicU64,
    /// Reloads Nginx did not confirm in time.
    pub reload_failures: AtomicU64,
    /// Changes `nginx -t` refused.
    pub test_failures: AtomicU64,
}

/// The controller thread, owned by the daemon: it alone stops it ([`Nginx::shutdown`]), after
/// every app worker has ended. Workers hold [`NginxHandle`]s.
pub struct Nginx {
    pub counters: Arc<NginxCounters>,
    handle: NginxHandle,
    thread: Option<JoinHandle<()>>,
}

/// What an app worker holds to change its site and read the master's pid.
#[derive(Clone)]
pub struct NginxHandle {
    tx: Sender<Msg>,
    /// Pid of the running master, 0 when none (managed mode; written by the controller).
    master_pid: Arc<AtomicI32>,
    mode: NginxMode,
    pid_file: PathBuf,
}

enum Msg {
    Apply(Change),
    Exited {
        pid: i32,
        status: Option<ExitStatus>,
    },
    /// An in-place upgrade: answer once idle, then do nothing until `Thaw`.
    Freeze(Sender<()>),
    Thaw,
    Shutdown,
}

impl Nginx {
    /// Writes the shared files, removes app files left from an earlier run except those of
    /// the apps in `keep` (taken over: Nginx goes on routing to them) and, in managed mode,
    /// takes over the master an earlier keter left running or starts one, and waits until
    /// it answers. An error here is fatal for the daemon.
    pub fn start(
        config: &Config,
        renderer: Arc<Renderer>,
        keep: &BTreeSet<AppName>,
    ) -> Result<Nginx, String> {
        let (tx, rx) = unbounded();
        let paths = renderer.paths().clone();
        let master_pid = Arc::new(AtomicI32::new(0));
        let counters = Arc::new(NginxCounters::default());
        let mut c = Controller {
            counters: counters.clone(),
            master_pid: master_pid.clone(),
            nginx: config.nginx.clone(),
            stop_timeout: config.stop_timeout,
            renderer,
            paths,
            generation: 1,
            live: BTreeMap::new(),
            live_files: BTreeMap::new(),
            worker_gid: None,
            unremoved: BTreeSet::new(),
            master: None,
            restart_at: None,
            restart: restart::NGINX_MASTER,
            tx: tx.clone(),
        };
        c.prepare(keep)?;
        let thread = std::thread::Builder::new()
            .name("nginx".into())
            .spawn(move || c.run(rx))
            .map_err(|e| format!("cannot start the nginx controller thread: {e}"))?;
        Ok(Nginx {
            counters,
            handle: NginxHandle {
                tx,
                master_pid,
                mode: config.nginx.mode,
                pid_file: config.nginx.pid_file.clone(),
            },
            thread: Some(thread),
        })
    }

    /// A handle for an app worker.
    pub fn handle(&self) -> NginxHandle {
        self.handle.clone()
    }

    /// For an in-place upgrade: returns once the controller is idle (no change in flight, no
    /// master being started), and keeps it so until [`Nginx::thaw`]. What it would have done
    /// meanwhile (a master that died, restarted) the next keter does.
    pub fn freeze(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.handle.tx.send(Msg::Freeze(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The upgrade did not happen: the controller carries on.
    pub fn thaw(&self) {
        let _ = self.handle.tx.send(Msg::Thaw);
    }

    /// Stops a managed Nginx (system mode: takes keter's files out of the host's Nginx) and
    /// ends the controller thread.
    pub fn shutdown(mut self) {
        let _ = self.handle.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl NginxHandle {
    /// The pid of the Nginx master, if one is known to run.
    pub fn master_pid(&self) -> Option<i32> {
        match self.mode {
            NginxMode::Managed => Some(self.master_pid.load(Ordering::Relaxed)).filter(|p| *p > 0),
            NginxMode::System => system::master_pid(&self.pid_file).ok(),
        }
    }

    /// Makes `site` the live configuration of `app` (or removes the app's file with `None`).
    /// Blocks until Nginx runs it and returns the generation that confirmed it.
    pub fn apply(&self, app: &AppName, site: Option<Site>) -> Result<u64, NginxError> {
        self.send(app, site, false)
    }

    /// [`NginxHandle::apply`], except that a site whose file would come out as the live one
    /// (its generation aside) changes nothing and reloads nothing: for a keter that took an
    /// app over and renders its site again, in case the earlier keter wrote it otherwise.
    pub fn rewrite(&self, app: &AppName, site: Site) -> Result<u64, NginxError> {
        self.send(app, Some(site), true)
    }

    fn send(
        &self,
        app: &AppName,
        site: Option<Site>,
        unless_same: bool,
    ) -> Result<u64, NginxError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let msg = Msg::Apply(Change {
            app: app.clone(),
            site,
            reply,
            unless_same,
        });
        if self.tx.send(msg).is_err() {
            return Err(NginxError::Unconfirmed(
                "the nginx controller has stopped".into(),
            ));
        }
        answer.recv().unwrap_or_else(|_| {
            Err(NginxError::Unconfirmed(
                "the nginx controller has stopped".into(),
            ))
        })
    }
}

struct Controller {
    counters: Arc<NginxCounters>,
    master_pid: Arc<AtomicI32>,
    nginx: NginxConfig,
    stop_timeout: Duration,
    renderer: Arc<Renderer>,
    paths: Paths,
    /// The generation written to `generation.conf`; only grows.
    generation: u64,
    /// Content of every app file keter has made live.
    live: BTreeMap<AppName, String>,
    /// The names of the worker files each live app file reads.
    live_files: BTreeMap<AppName, Vec<String>>,
    /// The group of Nginx's workers, once known: owner group of `worker-files/`.
    worker_gid: Option<u32>,
    /// Apps whose removal Nginx did not take (a broken file elsewhere, Nginx down). Their
    /// processes are stopped anyway, so every later change takes their files out too, rather
    /// than keeping a route to a dead port for as long as keter runs.
    unremoved: BTreeSet<AppName>,
    master: Option<Master>,
    /// When a managed master that died is started again, and the schedule of those restarts.
    restart_at: Option<Instant>,
    restart: Backoff,
    tx: Sender<Msg>,
}

/// One requested change within a batch.
struct Change {
    app: AppName,
    site: Option<Site>,
    reply: Sender<Result<u64, NginxError>>,
    /// Nothing to do if the file comes out as the live one (`NginxHandle::rewrite`).
    unless_same: bool,
}

impl Controller {
    fn prepare(&mut self, keep: &BTreeSet<AppName>) -> Result<(), String> {
        let p = self.paths.clone();
        for dir in [&p.prefix, &p.apps, &p.prefix.join("temp")] {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // Files of apps taken over stay: Nginx goes on routing to them. Any other file left by
        // an earlier run would route to a dead port.
        let mut changed = false;
        for entry in fs::read_dir(&p.apps).map_err(|e| format!("{}: {e}", p.apps.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            let app = path
                .file_name()
                .and_then(|n| n.to_str()?.strip_suffix(".conf"))
                .and_then(|n| AppName::new(n).ok())
                .filter(|a| keep.contains(a));
            match app.and_then(|a| Some((a, fs::read_to_string(&path).ok()?))) {
                Some((app, text)) => {
                    self.live.insert(app, text);
                }
                None => {
                    let _ = fs::remove_file(path);
                    changed = true;
                }
            }
        }
        // The generation goes on from the one an earlier run wrote, so that "confirmed" keeps
        // meaning "this generation or a later one".
        if let Some(g) = fs::read_to_string(&p.generation_conf)
            .ok()
            .and_then(|t| written_generation(&t))
        {
            self.generation = g.max(1);
        }
        for (out, inputs) in self.renderer.listener_cert_bundles() {
            write_certificate_bundle(&out, &inputs)?;
        }
        worker_files::prepare(&p, &self.renderer.response_pages(), None)
            .map_err(|e| format!("{}: {e}", p.worker_files.display()))?;
        let adopted = if self.nginx.mode == NginxMode::Managed {
            let adopted = self.adopt_master();
            changed |= self.write_main(&self.live.clone())?;
            adopted
        } else {
            // Fail before writing anything that the host's Nginx would load.
            system::master_pid(&self.nginx.pid_file).map_err(|e| e.to_string())?;
            system::remove_stale_socket(&p.control_socket)
                .map_err(|e| format!("{}: {e}", p.control_socket.display()))?;
            true
        };
        let http = self.renderer.http_conf()?;
        changed |= write_if_changed(&p.http_conf, &http).map_err(|e| e.to_string())?;
        changed |= write_if_changed(
            &p.generation_conf,
            &Renderer::generation_conf(self.generation),
        )
        .map_err(|e| e.to_string())?;
        // A master that runs on with the files it has loaded needs no test: nothing changed.
        let unchanged = adopted && !changed && self.answers().is_ok();
        if !unchanged {
            self.test().map_err(|e| e.to_string())?;
        }
        if !adopted {
            self.start_master().map_err(|e| e.to_string())?;
            self.confirm().map_err(|e| e.to_string())?;
        } else if !unchanged {
            // A master that runs on (taken over, or the host's) loads what changed, or what an
            // earlier keter wrote and was killed before it reloaded. (A worker retired by this
            // reload closes its idle keep-alive connections, as at every reload.)
            self.generation += 1;
            write_atomic(
                &p.generation_conf,
                &Renderer::generation_conf(self.generation),
            )
            .map_err(|e| e.to_string())?;
            let live = self.reload().and_then(|()| self.confirm());
            if let Err(e) = live {
                if self.nginx.mode == NginxMode::System {
                    return Err(e.to_string());
                }
                log::error!(
                    "nginx: the master taken over does not take the configuration ({e}); starting a new one"
                );
                if let Some(m) = self.master.take() {
                    process::stop_group(m.pid, self.stop_timeout);
                }
                self.start_master().map_err(|e| e.to_string())?;
                self.confirm().map_err(|e| e.to_string())?;
            }
        }
        self.share_with_workers();
        log::info!(
            "nginx: running, configuration generation {}",
            self.generation
        );
        Ok(())
    }

    /// Gives `worker-files/` to the group the workers run as, when that is new (at start, and
    /// after a host's Nginx was restarted with another `user`).
    fn share_with_workers(&mut self) {
        let Some(gid) = self.current_master().and_then(worker_files::workers_gid) else {
            return;
        };
        if self.worker_gid == Some(gid) {
            return;
        }
        match worker_files::share(&self.paths, gid) {
            Ok(()) => self.worker_gid = Some(gid),
            Err(e) => log::error!(
                "nginx: cannot give {} to the workers' group {gid}: {e}",
                self.paths.worker_files.display()
            ),
        }
    }

    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let msg = match self.restart_at {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.restart_master();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            match msg {
                Msg::Apply(change) => {
                    let mut batch = vec![change];
                    let mut shutdown = false;
                    // Everything already waiting shares this reload.
                    let mut freeze = None;
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            Msg::Apply(change) => batch.push(change),
                            Msg::Exited { pid, status } => self.exited(pid, status),
                            Msg::Freeze(reply) => freeze = Some(reply),
                            Msg::Thaw => {}
                            Msg::Shutdown => shutdown = true,
                        }
                    }
                    self.apply_batch(batch);
                    if shutdown {
                        break;
                    }
                    if let Some(reply) = freeze {
                        self.frozen(reply, &rx);
                    }
                }
                Msg::Exited { pid, status } => self.exited(pid, status),
                Msg::Freeze(reply) => self.frozen(reply, &rx),
                Msg::Thaw => {}
                Msg::Shutdown => break,
            }
        }
        self.stop_master();
    }

    /// Answers a freeze and waits for the thaw; what came meanwhile is handled after it.
    fn frozen(&mut self, reply: Sender<()>, rx: &Receiver<Msg>) {
        let _ = reply.send(());
        let mut later = Vec::new();
        loop {
            match rx.recv() {
                Ok(Msg::Thaw) | Err(_) => break,
                Ok(m) => later.push(m),
            }
        }
        for m in later {
            match m {
                Msg::Apply(change) => self.apply_batch(vec![change]),
                Msg::Exited { pid, status } => self.exited(pid, status),
                Msg::Freeze(reply) => self.frozen(reply, rx),
                Msg::Thaw | Msg::Shutdown => {}
            }
        }
    }

    fn apply_batch(&mut self, batch: Vec<Change>) {
        let before = self.live.clone();
        let generation = self.generation + 1;
        let mut wanted = self.live.clone();
        wanted.retain(|app, _| !self.unremoved.contains(app));
        let mut ready = Vec::new();
        for change in batch {
            match &change.site {
                Some(site) => match self.renderer.app_conf(site, generation) {
                    // A site a keter that took over rendered again as it is live: nothing to
                    // reload. (Not for any other change: a certificate renewed into the same
                    // file gives the same text, and Nginx must load it.)
                    Ok(text)
                        if change.unless_same
                            && before
                                .get(&change.app)
                                .is_some_and(|live| same_but_generation(live, &text)) =>
                    {
                        let _ = change.reply.send(Ok(self.generation));
                    }
                    Ok(text) => {
                        wanted.insert(change.app.clone(), text);
                        ready.push(change);
                    }
                    Err(e) => {
                        let _ = change.reply.send(Err(NginxError::Files(e)));
                    }
                },
                None => {
                    wanted.remove(&change.app);
                    ready.push(change);
                }
            }
        }
        // The files the new configurations read go in first; they never replace a live one.
        let mut written = Vec::new();
        for change in ready {
            let files = change
                .site
                .as_ref()
                .map(|s| s.files.as_slice())
                .unwrap_or(&[]);
            match worker_files::write_site_files(&self.paths, &change.app, files, self.worker_gid) {
                Ok(()) => written.push(change),
                Err(e) => {
                    match before.get(&change.app) {
                        Some(text) => wanted.insert(change.app.clone(), text.clone()),
                        None => wanted.remove(&change.app),
                    };
                    let _ = change.reply.send(Err(NginxError::Files(format!(
                        "{}: {e}",
                        self.paths.app_files(&change.app).display()
                    ))));
                }
            }
        }
        let ready = written;
        if ready.is_empty() {
            return;
        }
        let result = self.make_live(generation, &before, &wanted);
        for c in &ready {
            if result.is_ok() {
                let names: Vec<String> = c
                    .site
                    .iter()
                    .flat_map(|s| s.files.iter().map(|f| f.name.clone()))
                    .collect();
                self.live_files.insert(c.app.clone(), names);
            }
            let keep = self.live_files.get(&c.app).cloned().unwrap_or_default();
            worker_files::prune(&self.paths, &c.app, &keep);
        }
        match result {
            Ok(()) => {
                self.unremoved.clear();
                self.share_with_workers();
                for c in ready {
                    let _ = c.reply.send(Ok(generation));
                }
            }
            // A batch that fails the test is retried one change at a time, so that one app's
            // bad file fails only that app.
            Err(NginxError::Rejected(_)) if ready.len() > 1 => {
                for c in ready {
                    self.apply_batch(vec![c]);
                }
            }
            Err(e) => {
                for c in ready {
                    if c.site.is_none() {
                        self.unremoved.insert(c.app.clone());
                    }
                    let _ = c.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Writes `wanted` over `before`, tests, reloads and confirms; on any failure puts `before`
    /// back (and reloads it if Nginx may have seen the new files).
    fn make_live(
        &mut self,
        generation: u64,
        before: &BTreeMap<AppName, String>,
        wanted: &BTreeMap<AppName, String>,
    ) -> Result<(), NginxError> {
        self.generation = generation;
        if let Err(e) = self.write_files(before, wanted) {
            self.restore(wanted, before);
            return Err(NginxError::Files(e.to_string()));
        }
        let t0 = Instant::now();
        if let Err(e) = self.test() {
            self.counters.test_failures.fetch_add(1, Ordering::Relaxed);
            self.restore(wanted, before);
            return Err(e);
        }
        let t1 = Instant::now();
        let old_workers = self.accepting_workers();
        let live = self.reload().and_then(|()| self.confirm());
        let t2 = Instant::now();
        if live.is_ok() {
            self.wait_retired(&old_workers);
        }
        log::debug!(
            "nginx: generation {generation}: nginx -t {} ms, reload to confirmed {} ms, old workers retired {} ms later",
            (t1 - t0).as_millis(),
            (t2 - t1).as_millis(),
            t2.elapsed().as_millis()
        );
        if live.is_ok() {
            self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = live {
            self.counters
                .reload_failures
                .fetch_add(1, Ordering::Relaxed);
            log::error!("nginx: {e}; restoring the previous configuration");
            self.restore(wanted, before);
            if self.reload().and_then(|()| self.confirm()).is_err() {
                log::error!("nginx: the previous configuration is not confirmed either");
            }
            return Err(e);
        }
        self.live = wanted.clone();
        Ok(())
    }

    /// Writes the generation file, the main configuration if the apps' bounds changed it,
    /// and every app file that differs between `from` and `to`.
    fn write_files(
        &self,
        from: &BTreeMap<AppName, String>,
        to: &BTreeMap<AppName, String>,
    ) -> io::Result<()> {
        write_atomic(
            &self.paths.generation_conf,
            &Renderer::generation_conf(self.generation),
        )?;
        if self.nginx.mode == NginxMode::Managed {
            self.write_main(to).map_err(io::Error::other)?;
        }
        for (app, text) in to {
            if from.get(app) != Some(text) {
                write_atomic(&self.paths.app_conf(app), text)?;
            }
        }
        for app in from.keys() {
            if !to.contains_key(app) {
                match fs::remove_file(self.paths.app_conf(app)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    fn restore(&mut self, wanted: &BTreeMap<AppName, String>, before: &BTreeMap<AppName, String>) {
        self.generation += 1;
        if let Err(e) = self.write_files(wanted, before) {
            log::error!("nginx: cannot restore the previous files: {e}");
        }
    }

    /// Writes the managed main configuration for the apps' files `apps` (their bounds set how
    /// long a retired worker serves on); true when it changed.
    fn write_main(&self, apps: &BTreeMap<AppName, String>) -> Result<bool, String> {
        let longest = longest_bound(apps.values(), self.renderer.default_bound());
        let main = self.renderer.main_conf(longest)?;
        write_if_changed(&self.paths.main_conf, &main)
            .map_err(|e| format!("{}: {e}", self.paths.main_conf.display()))
    }

    /// `nginx -t` against the real main configuration.
    fn test(&self) -> Result<(), NginxError> {
        let mut cmd = std::process::Command::new(&self.nginx.binary);
        cmd.arg("-t").arg("-q");
        if self.nginx.mode == NginxMode::Managed {
            cmd.args(["-e", "stderr", "-p"])
                .arg(&self.paths.prefix)
                .arg("-c")
                .arg(&self.paths.main_conf);
        }
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
            NginxError::Rejected(format!("cannot run {}: {e}", self.nginx.binary.display()))
        })?;
        let text = String::from_utf8_lossy(&out.stderr);
        let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if out.status.success() {
            // Warnings matter in system mode: another site claiming an app's host name wins
            // or loses silently otherwise ("conflicting server name").
            for line in lines {
                log::warn!("nginx -t: {line}");
            }
            return Ok(());
        }
        let message = lines
            .filter(|l| !l.ends_with("test failed"))
            .collect::<Vec<_>>()
            .join(" / ");
        if self.nginx.mode == NginxMode::System
            && let Blame::Foreign(file) = system::blame(&text, &self.paths.prefix)
        {
            return Err(NginxError::Foreign { file, message });
        }
        Err(NginxError::Rejected(message))
    }

    fn reload(&mut self) -> Result<(), NginxError> {
        match self.nginx.mode {
            NginxMode::Managed => match &self.master {
                Some(m) => signal::kill(Pid::from_raw(m.pid), Signal::SIGHUP)
                    .map_err(|e| NginxError::Unconfirmed(format!("cannot signal Nginx: {e}"))),
                // Nginx is down and waiting for its restart: start it now with the new files.
                None => self.start_master(),
            },
            NginxMode::System => {
                let pid = system::master_pid(&self.nginx.pid_file)
                    .map_err(|e| NginxError::Unconfirmed(e.to_string()))?;
                signal::kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| {
                    NginxError::Unconfirmed(format!("cannot signal Nginx (pid {pid}): {e}"))
                })
            }
        }
    }

    /// Waits until the control socket answers the current generation. A managed master that
    /// dies meanwhile is replaced at once (the new one reads the files in place), rather than
    /// waiting out the timeout against its orphaned workers.
    fn confirm(&mut self) -> Result<(), NginxError> {
        let deadline = Instant::now() + self.nginx.reload_timeout;
        loop {
            if self.nginx.mode == NginxMode::Managed
                && let Some(m) = &self.master
                && !procfs::is_alive(m.pid)
            {
                let pid = m.pid;
                log::error!(
                    "nginx: the master (pid {pid}) died during a reload; starting a new one"
                );
                process::stop_group(pid, Duration::from_secs(2));
                self.master = None;
                self.start_master()?;
            }
            let last = match self.answers() {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if Instant::now() >= deadline {
                let hint = if self.nginx.mode == NginxMode::System
                    && !self.paths.control_socket.exists()
                {
                    format!(
                        "; is {} included by Nginx's main configuration? The package's /etc/nginx/conf.d/keter.conf includes it for the root /opt/keter",
                        self.paths.http_conf.display()
                    )
                } else {
                    String::new()
                };
                return Err(NginxError::Unconfirmed(format!(
                    "generation {} not confirmed within {:?} ({last}){hint}",
                    self.generation, self.nginx.reload_timeout
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the control socket once whether the current master runs the current generation
    /// (or a later one); what it answered otherwise.
    fn answers(&self) -> Result<(), String> {
        let r = probe::get_unix(
            &self.paths.control_socket,
            "/keter-generation",
            Duration::from_secs(1),
        )
        .map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        let mut words = r.body.split_whitespace();
        let generation = words.next().and_then(|g| g.parse::<u64>().ok());
        let worker = words.next().and_then(|p| p.parse::<i32>().ok());
        let master = self.current_master();
        match (generation, worker) {
            // Workers of a master that died keep answering until stopped: only the current
            // master's workers count.
            (Some(_), Some(w)) if master.is_some() && procfs::parent_of(w) != master => Err(
                format!("answered by worker {w}, which is not the current master's"),
            ),
            (Some(g), Some(_)) if g >= self.generation => Ok(()),
            (Some(g), Some(_)) => Err(format!("still generation {g}")),
            _ => Err(format!("unexpected answer {:?}", r.body)),
        }
    }

    /// The workers of the current master that accept new connections.
    fn accepting_workers(&self) -> Vec<i32> {
        self.current_master()
            .map(procfs::nginx_workers)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, shutting_down)| !shutting_down)
            .map(|(pid, _)| pid)
            .collect()
    }

    /// After a reload the master runs old and new workers side by side for about 100 ms before
    /// it tells the old ones to stop accepting. Waiting for that makes "live" exact: from here
    /// on every new connection gets the new configuration.
    fn wait_retired(&self, old_workers: &[i32]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let retiring = |pid: &i32| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.is_empty() || String::from_utf8_lossy(&cmdline).contains("is shutting down")
            };
            if old_workers.iter().all(retiring) {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "nginx: workers from before the reload still accept connections after 2 s"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// System mode at exit: the host's Nginx goes on serving other sites, so keter takes all of
    /// its files out (every app is stopped by now) and reloads, leaving Nginx as it would be
    /// without keter. Nginx then closes the control socket and deletes its file itself; keter
    /// does not touch it while Nginx may still listen on it.
    fn leave_system_nginx(&mut self) {
        let p = &self.paths;
        let mut files: Vec<PathBuf> = fs::read_dir(&p.apps)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.extend([p.http_conf.clone(), p.generation_conf.clone()]);
        for f in files {
            match fs::remove_file(&f) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    log::error!("nginx: cannot remove {}: {e}", f.display())
                }
                _ => {}
            }
        }
        self.live.clear();
        let left = self.test().and_then(|()| self.reload());
        match left {
            Ok(()) => log::info!("nginx: keter's files removed from the system Nginx"),
            Err(e) => log::error!(
                "nginx: keter's files are removed but Nginx was not reloaded ({e}); it drops them at its next reload"
            ),
        }
    }
}

/// A TLS listener's certificate with its chain appended, as `ssl_certificate` wants it,
/// readable by its owner only.
fn write_certificate_bundle(out: &Path, inputs: &[std::path::PathBuf]) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let mut bytes = Vec::new();
    for input in inputs {
        let part = fs::read(input).map_err(|e| format!("{}: {e}", input.display()))?;
        bytes.extend(&part);
        if !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
    }
    let dir = out.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    atomic_file::replace(out, &bytes, 0o600).map_err(|e| format!("{}: {e}", out.display()))
}

/// Writes one of keter's Nginx files so that Nginx never reads half of it.
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    atomic_file::replace(path, text.as_bytes(), 0o644)
}

/// Whether two app files say the same but for their header's `# deploy N of this app, Nginx
/// configuration generation G` line.
fn same_but_generation(a: &str, b: &str) -> bool {
    fn body(t: &str) -> impl Iterator<Item = &str> {
        t.lines().filter(|l| !l.starts_with("# deploy "))
    }
    body(a).eq(body(b))
}
