//! The daemon: sets up the root folder and Nginx, turns changes in `incoming/` into commands
//! for the app workers, ends the workers of deleted apps, and stops everything cleanly on
//! request. It owns the Nginx controller and stops it last (`docs/lifecycle.md`, "Who owns
//! what").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::app::{AppHandle, Command, Shared};
use crate::config::Config;
use crate::isolation::Isolation;
use crate::journal::Journal;
use crate::names::AppName;
use crate::nginx::{Nginx, Renderer};
use crate::report::Reports;
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
}

impl From<Hint> for Input {
    fn from(h: Hint) -> Input {
        Input::Hint(h)
    }
}

/// A reason the daemon cannot run at all (as opposed to one app failing).
#[derive(Debug)]
pub struct Fatal(pub String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// The channel the daemon listens on; `main` sends signals into it.
pub fn channel() -> (Sender<Input>, Receiver<Input>) {
    bounded(4096)
}

/// Runs the daemon until a `Control::Shutdown` arrives on `rx`.
pub fn run(config: Config, tx: Sender<Input>, rx: Receiver<Input>) -> Result<(), Fatal> {
    crate::memory::limit_arenas();
    prepare_root(&config.root)?;
    // Nginx's workers read it for certbot; nobody but root writes it (an app that could
    // would get certificates for every host keter serves).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&config.acme_webroot)
        .map_err(|e| {
            Fatal(format!(
                "cannot create {}: {e}",
                config.acme_webroot.display()
            ))
        })?;
    let isolation = Isolation::new(&config).map_err(Fatal)?;
    log::info!("keter: {}", isolation.describe());
    // Process groups left by a keter that was killed are stopped before anything starts: they
    // hold ports and would answer for apps about to be deployed again.
    let journal = Journal::new(&config.root.join("etc"));
    let leftovers = journal.recover(config.stop_timeout);
    if leftovers > 0 {
        log::warn!("keter: stopped {leftovers} process groups left by an earlier run");
    }
    let mut renderer = Renderer::new(&config).map_err(Fatal)?;
    renderer.worker_user = isolation.managed_worker_user();
    let nginx =
        Nginx::start(&config, Arc::new(renderer)).map_err(|e| Fatal(format!("nginx: {e}")))?;
    isolation.check_acme_webroot(&config.acme_webroot, nginx.handle().master_pid());
    let incoming = config.root.join("incoming");
    let reports = Arc::new(Reports::default());
    let isolation = Arc::new(isolation);
    let status = StatusServer::start(
        &config,
        reports.clone(),
        nginx.counters.clone(),
        isolation.clone(),
    );
    let shared = Arc::new(Shared::new(
        config,
        nginx.handle(),
        journal,
        reports,
        isolation,
    ));
    let watcher = watcher::watch(&incoming, tx.clone())
        .map_err(|e| Fatal(format!("cannot watch {}: {e}", incoming.display())))?;
    let mut daemon = Daemon {
        shared,
        apps: BTreeMap::new(),
        refused: BTreeSet::new(),
        tx,
    };
    log::info!("keter: watching {}", incoming.display());
    daemon.rescan(false);
    while let Ok(input) = rx.recv() {
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
            Input::Stopped { app, commands } => daemon.end_stopped(&app, commands),
        }
        if watcher.overflowed.swap(false, Ordering::Relaxed) {
            daemon.rescan(false);
        }
    }
    drop(watcher);
    if let Some(status) = status {
        status.stop();
    }
    daemon.shutdown();
    // Every worker has ended: nothing asks Nginx for changes any more.
    nginx.shutdown();
    log::info!("keter: stopped");
    Ok(())
}

/// Creates the folders of the README's "Folder layout under `root`" with the modes that keep
/// apps out of them, and empties `temp/` (versions of an earlier run).
fn prepare_root(root: &Path) -> Result<(), Fatal> {
    fs::create_dir_all(root)
        .map_err(|e| Fatal(format!("cannot create {}: {e}", root.display())))?;
    for changed in crate::isolation::prepare_root(root).map_err(Fatal)? {
        log::warn!("keter: {changed}");
    }
    let temp = root.join("temp");
    let entries = fs::read_dir(&temp).map_err(|e| Fatal(format!("{}: {e}", temp.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let removed = match entry.file_type() {
            Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if let Err(e) = removed {
            return Err(Fatal(format!("cannot empty {}: {e}", path.display())));
        }
    }
    Ok(())
}

struct Daemon {
    shared: Arc<Shared>,
    apps: BTreeMap<AppName, AppHandle>,
    /// Names in `incoming/` already reported as unusable (reported once, not at every event).
    refused: BTreeSet<String>,
    /// The daemon's own channel, for the workers' [`Input::Stopped`].
    tx: Sender<Input>,
}

impl Daemon {
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
        if present {
            if !self.apps.contains_key(&app) {
                let tx = self.tx.clone();
                let name = app.clone();
                let on_stopped = Box::new(move |commands| {
                    // Never blocks a worker: a lost note only keeps an idle worker alive.
                    let _ = tx.try_send(Input::Stopped {
                        app: name.clone(),
                        commands,
                    });
                });
                match AppHandle::spawn(app.clone(), self.shared.clone(), on_stopped) {
                    Ok(h) => {
                        self.apps.insert(app.clone(), h);
                    }
                    Err(e) => {
                        log::error!("{app}: cannot start its worker: {e}");
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
