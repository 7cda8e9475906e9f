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
//!
//! The parts, as in the app worker (`src/app/machine.rs`, `docs/lifecycle.md`):
//!
//! * `plan.rs` decides, and touches the world only through the `Effects` trait below, so
//!   `tests.rs` drives it with a fake Nginx and a fake clock. Its state: the generation
//!   written to `generation.conf` (only grows), the text of every live app file, the worker
//!   files each names, the apps whose removal Nginx did not take, and the managed master (its
//!   pid and start, or when it is due to be started again, with its backoff). Its events:
//!   `Plan::start` (once, with what an earlier run left on disk), `Plan::apply` (a batch of
//!   requests; returns each requester's answer, in the order decided), `Plan::exited` (a
//!   watched process ended), `Plan::restart_master` (at `Plan::restart_at`) and `Plan::stop`.
//! * `world.rs` is the real world: the files under `ROOT/nginx`, `nginx -t`, SIGHUP, the
//!   control socket, `/proc`, the clock; `master.rs` starts, takes over and watches the
//!   managed master's process.
//! * This file is the thread: it receives the requests, puts everything already waiting into
//!   one batch, feeds the planner, sends the answers, and holds still for an in-place upgrade.
//!
//! Errors are typed in `src/nginx/error.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, unbounded};

mod disk;
mod master;
mod plan;
#[cfg(test)]
mod tests;
mod world;

pub use disk::{live_files, live_sha256, upstream_ports};
use plan::{Plan, Request};
use world::World;

use super::error::{Answered, NginxError, RenderError, Unconfirmed};
use super::system::{self, NotRunning};
use super::{Renderer, Site, SiteFile};
use crate::atomic_file;
use crate::config::{Config, NginxMode};
use crate::names::AppName;

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
    /// The request log was renamed: Nginx is to reopen its log files.
    ReopenLogs,
    /// An in-place upgrade: answer once idle, then do nothing until `Thaw`.
    Freeze(Sender<()>),
    Thaw,
    Shutdown,
}

/// One requested change and where its answer goes.
struct Change {
    request: Request,
    reply: Sender<Result<u64, NginxError>>,
}

/// What the planner asks of the world. Every method acts at once; the slow ones (a test, a
/// master's start) return when done.
trait Effects {
    fn now(&self) -> Instant;
    /// Waits `d` before looking again.
    fn sleep(&mut self, d: Duration);
    /// The text of `site`'s file at `generation`.
    fn render(&self, site: &Site, generation: u64) -> Result<String, RenderError>;
    /// Writes the files `app`'s configuration reads (`worker_files.rs`); they never replace a
    /// live one.
    fn write_site_files(&mut self, app: &AppName, files: &[SiteFile]) -> Result<(), NginxError>;
    /// Removes the files of `app` that `keep` does not name.
    fn prune_site_files(&mut self, app: &AppName, keep: &[String]);
    fn write_generation(&mut self, generation: u64) -> Result<(), NginxError>;
    /// Managed mode: the main configuration for the apps' files `apps` (their bounds set how
    /// long a retired worker serves on); true when it changed.
    fn write_main(&mut self, apps: &BTreeMap<AppName, String>) -> Result<bool, NginxError>;
    fn write_app(&mut self, app: &AppName, text: &str) -> Result<(), NginxError>;
    /// Removes `app`'s file; one that is not there is removed already.
    fn remove_app(&mut self, app: &AppName) -> Result<(), NginxError>;
    /// System mode at exit: removes every file of keter's the host's Nginx includes.
    fn remove_all(&mut self);
    /// `nginx -t` against the real main configuration.
    fn test(&mut self) -> Result<(), NginxError>;
    /// System mode: the master named by the host's pid file.
    fn system_master(&self) -> Result<i32, NotRunning>;
    /// Sends SIGHUP to `pid`.
    fn hangup(&mut self, pid: i32) -> Result<(), NginxError>;
    /// Sends SIGUSR1 to `pid`: the master reopens every log file and has its workers do so.
    fn reopen_logs(&mut self, pid: i32) -> Result<(), NginxError>;
    /// Managed mode: takes over the master an earlier keter left running, if there is one;
    /// its pid and how long it has run.
    fn adopt_master(&mut self) -> Option<(i32, Duration)>;
    /// Managed mode: starts a master on the files in place and watches it; its pid. Its exit
    /// comes back as [`Msg::Exited`].
    fn start_master(&mut self) -> Result<i32, NginxError>;
    fn is_alive(&self, pid: i32) -> bool;
    /// Stops the process group led by `pid`, waiting at most `timeout` before SIGKILL.
    fn stop_group(&mut self, pid: i32, timeout: Duration);
    /// Managed mode at exit: the control socket's file.
    fn remove_control_socket(&mut self);
    /// Asks the control socket once which generation runs: the generation and the pid of the
    /// worker that answered.
    fn ask_generation(&self) -> Result<(u64, i32), Answered>;
    fn parent_of(&self, pid: i32) -> Option<i32>;
    /// Whether the control socket's file exists (system mode: is `http.conf` included?).
    fn control_socket_exists(&self) -> bool;
    /// `http.conf`, for the hint of an unconfirmed reload in system mode.
    fn http_conf(&self) -> PathBuf;
    /// The workers of `master` that accept new connections.
    fn accepting_workers(&self, master: i32) -> Vec<i32>;
    /// Returns once none of `old` accepts new connections any more (at most 2 s).
    fn wait_retired(&mut self, old: &[i32]);
    /// Gives `worker-files/` to the group of `master`'s workers, if that changed.
    fn share_with_workers(&mut self, master: i32);
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
    ) -> Result<Nginx, NginxError> {
        let (tx, rx) = unbounded();
        let master_pid = Arc::new(AtomicI32::new(0));
        let counters = Arc::new(NginxCounters::default());
        let mut world = World::new(config, renderer, tx.clone());
        let found = world.prepare(keep)?;
        let mut plan = Plan::new(
            &config.nginx,
            config.stop_timeout,
            counters.clone(),
            master_pid.clone(),
        );
        plan.start(&mut world, found)?;
        let mut actor = Actor { plan, world };
        let thread = std::thread::Builder::new()
            .name("nginx".into())
            .spawn(move || actor.run(rx))
            .map_err(|e| NginxError::Thread(Arc::new(e)))?;
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

    /// Has Nginx reopen its log files, without waiting: the request log was renamed
    /// (`crate::requests::tailer`). Nothing happens while no master runs; a master started
    /// later opens the file by its name anyway.
    pub fn reopen_logs(&self) {
        let _ = self.tx.send(Msg::ReopenLogs);
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

    /// Hands the change to the controller and returns without waiting for Nginx: the
    /// controller takes changes in the order they were handed over, so a later change of the
    /// same app (a switch, a removal) wins over this one whoever waits for which answer.
    /// [`Pending::wait`] blocks until Nginx runs it.
    pub fn submit(&self, app: &AppName, site: Option<Site>, unless_same: bool) -> Pending {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let msg = Msg::Apply(Change {
            request: Request {
                app: app.clone(),
                site,
                unless_same,
            },
            reply,
        });
        // A controller that has ended drops the reply's sender with the message: the wait
        // then says it stopped.
        let _ = self.tx.send(msg);
        Pending(answer)
    }

    fn send(
        &self,
        app: &AppName,
        site: Option<Site>,
        unless_same: bool,
    ) -> Result<u64, NginxError> {
        self.submit(app, site, unless_same).wait()
    }
}

/// A change handed to the controller ([`NginxHandle::submit`]), its answer still to come.
pub struct Pending(crossbeam_channel::Receiver<Result<u64, NginxError>>);

impl Pending {
    /// Blocks until Nginx runs the change (or the controller says why not); returns the
    /// generation that confirmed it.
    pub fn wait(self) -> Result<u64, NginxError> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(Unconfirmed::Stopped.into()))
    }
}

/// The controller thread: the planner and the world it acts on (the real one but in tests).
struct Actor<E: Effects> {
    plan: Plan,
    world: E,
}

impl<E: Effects> Actor<E> {
    fn run(&mut self, rx: Receiver<Msg>) {
        loop {
            let msg = match self.plan.restart_at() {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        self.plan.restart_master(&mut self.world);
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
                            Msg::Exited { pid, status } => {
                                self.plan.exited(&mut self.world, pid, status)
                            }
                            Msg::ReopenLogs => self.plan.reopen_logs(&mut self.world),
                            Msg::Freeze(reply) => freeze = Some(reply),
                            Msg::Thaw => {}
                            Msg::Shutdown => shutdown = true,
                        }
                    }
                    self.apply(batch);
                    if shutdown {
                        break;
                    }
                    if let Some(reply) = freeze {
                        self.frozen(reply, &rx);
                    }
                }
                Msg::Exited { pid, status } => self.plan.exited(&mut self.world, pid, status),
                Msg::ReopenLogs => self.plan.reopen_logs(&mut self.world),
                Msg::Freeze(reply) => self.frozen(reply, &rx),
                Msg::Thaw => {}
                Msg::Shutdown => break,
            }
        }
        self.plan.stop(&mut self.world);
    }

    /// Applies a batch and answers each requester as the planner decided.
    fn apply(&mut self, batch: Vec<Change>) {
        let (requests, mut replies): (Vec<Request>, Vec<Option<Sender<_>>>) = batch
            .into_iter()
            .map(|c| (c.request, Some(c.reply)))
            .unzip();
        for (i, answer) in self.plan.apply(&mut self.world, requests) {
            if let Some(reply) = replies.get_mut(i).and_then(Option::take) {
                let _ = reply.send(answer);
            }
        }
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
                Msg::Apply(change) => self.apply(vec![change]),
                Msg::Exited { pid, status } => self.plan.exited(&mut self.world, pid, status),
                Msg::ReopenLogs => self.plan.reopen_logs(&mut self.world),
                Msg::Freeze(reply) => self.frozen(reply, rx),
                Msg::Thaw | Msg::Shutdown => {}
            }
        }
    }
}

/// Writes one of keter's Nginx files so that Nginx never reads half of it.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    atomic_file::replace(path, text.as_bytes(), 0o644)
}
