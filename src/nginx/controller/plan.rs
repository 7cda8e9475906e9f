//! The controller's decisions, apart from the world they act on (`mod.rs` lists the state and
//! the events): which requested changes go into which reload, what is restored when `nginx -t`
//! refuses a batch or Nginx does not confirm it, which answer each requester gets and in which
//! order, and when the managed master is started, replaced and restarted. Everything it does
//! to files and processes goes through [`Effects`].

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use super::{Answered, Effects, NginxCounters, NginxError, Unconfirmed};
use crate::config::{NginxConfig, NginxMode};
use crate::names::AppName;
use crate::nginx::Site;
use crate::process;
use crate::restart::{self, Backoff};

/// One requested change: `site` becomes `app`'s configuration, or `None` takes it out.
pub(super) struct Request {
    pub app: AppName,
    pub site: Option<Site>,
    /// Nothing to do if the file comes out as the live one (`NginxHandle::rewrite`).
    pub unless_same: bool,
}

/// What a requester is answered: the generation that made its change live.
pub(super) type Answer = Result<u64, NginxError>;

/// What an earlier run left on disk, as the world found it at start (`World::prepare`).
pub(super) struct Found {
    /// The files of the apps taken over, which Nginx goes on routing to.
    pub live: BTreeMap<AppName, String>,
    /// The generation `generation.conf` says (at least 1).
    pub generation: u64,
    /// Whether a file Nginx reads changed from what it holds.
    pub changed: bool,
}

/// The running managed master.
struct Master {
    pid: i32,
    started: Instant,
}

pub(super) struct Plan {
    mode: NginxMode,
    reload_timeout: Duration,
    stop_timeout: Duration,
    counters: Arc<NginxCounters>,
    /// Pid of the running managed master for the app workers, 0 when none.
    master_pid: Arc<AtomicI32>,
    /// The generation written to `generation.conf`; only grows.
    generation: u64,
    /// Content of every app file keter has made live.
    live: BTreeMap<AppName, String>,
    /// The names of the worker files each live app file reads.
    live_files: BTreeMap<AppName, Vec<String>>,
    /// Apps whose removal Nginx did not take (a broken file elsewhere, Nginx down). Their
    /// processes are stopped anyway, so every later change takes their files out too, rather
    /// than keeping a route to a dead port for as long as keter runs.
    unremoved: BTreeSet<AppName>,
    master: Option<Master>,
    /// When a managed master that died is started again, and the schedule of those restarts.
    restart_at: Option<Instant>,
    restart: Backoff,
}

impl Plan {
    pub fn new(
        nginx: &NginxConfig,
        stop_timeout: Duration,
        counters: Arc<NginxCounters>,
        master_pid: Arc<AtomicI32>,
    ) -> Plan {
        Plan {
            mode: nginx.mode,
            reload_timeout: nginx.reload_timeout,
            stop_timeout,
            counters,
            master_pid,
            generation: 1,
            live: BTreeMap::new(),
            live_files: BTreeMap::new(),
            unremoved: BTreeSet::new(),
            master: None,
            restart_at: None,
            restart: restart::NGINX_MASTER,
        }
    }

    /// When the managed master that died is due to be started again.
    pub fn restart_at(&self) -> Option<Instant> {
        self.restart_at
    }

    /// Brings Nginx to the files in place. A master that runs on (taken over, or the host's)
    /// with nothing changed is left alone; one that runs on with changes loads them; otherwise
    /// a managed master is started.
    pub fn start(&mut self, fx: &mut impl Effects, found: Found) -> Result<(), NginxError> {
        self.live = found.live;
        self.generation = found.generation.max(1);
        let mut changed = found.changed;
        let adopted = match self.mode {
            NginxMode::Managed => {
                let adopted = self.adopt(fx);
                changed |= fx.write_main(&self.live)?;
                adopted
            }
            NginxMode::System => true,
        };
        // A master that runs on with the files it has loaded needs no test: nothing changed.
        let unchanged = adopted && !changed && self.answers(fx).is_ok();
        if !unchanged {
            fx.test()?;
        }
        if !adopted {
            self.start_master(fx)?;
            self.confirm(fx)?;
        } else if !unchanged {
            // A master that runs on (taken over, or the host's) loads what changed, or what an
            // earlier keter wrote and was killed before it reloaded. (A worker retired by this
            // reload closes its idle keep-alive connections, as at every reload.)
            self.generation += 1;
            fx.write_generation(self.generation)?;
            let live = self.reload(fx).and_then(|()| self.confirm(fx));
            if let Err(e) = live {
                if self.mode == NginxMode::System {
                    return Err(e);
                }
                log::error!(
                    "nginx: the master taken over does not take the configuration ({e}); starting a new one"
                );
                if let Some(m) = self.master.take() {
                    fx.stop_group(m.pid, self.stop_timeout);
                }
                self.start_master(fx)?;
                self.confirm(fx)?;
            }
        }
        self.share(fx);
        log::info!(
            "nginx: running, configuration generation {}",
            self.generation
        );
        Ok(())
    }

    /// Makes a batch of requests live with one test and one reload; a batch `nginx -t` refuses
    /// is tried again one request at a time, so that one app's bad file fails only that app.
    /// Returns each request's answer with its index in `requests`, in the order they are
    /// decided: requests that need no reload (or cannot be rendered) first.
    pub fn apply(&mut self, fx: &mut impl Effects, requests: Vec<Request>) -> Vec<(usize, Answer)> {
        let mut answers = Vec::new();
        self.apply_batch(fx, requests.into_iter().enumerate().collect(), &mut answers);
        answers
    }

    fn apply_batch(
        &mut self,
        fx: &mut impl Effects,
        batch: Vec<(usize, Request)>,
        out: &mut Vec<(usize, Answer)>,
    ) {
        let before = self.live.clone();
        let generation = self.generation + 1;
        let mut wanted = self.live.clone();
        wanted.retain(|app, _| !self.unremoved.contains(app));
        let mut ready = Vec::new();
        for (i, request) in batch {
            match &request.site {
                Some(site) => match fx.render(site, generation) {
                    // A site a keter that took over rendered again as it is live: nothing to
                    // reload. (Not for any other change: a certificate renewed into the same
                    // file gives the same text, and Nginx must load it.)
                    Ok(text)
                        if request.unless_same
                            && before
                                .get(&request.app)
                                .is_some_and(|live| same_but_generation(live, &text)) =>
                    {
                        out.push((i, Ok(self.generation)));
                    }
                    Ok(text) => {
                        wanted.insert(request.app.clone(), text);
                        ready.push((i, request));
                    }
                    Err(e) => out.push((i, Err(e.into()))),
                },
                None => {
                    wanted.remove(&request.app);
                    ready.push((i, request));
                }
            }
        }
        // The files the new configurations read go in first; they never replace a live one.
        let mut written = Vec::new();
        for (i, request) in ready {
            let files = request
                .site
                .as_ref()
                .map(|s| s.files.as_slice())
                .unwrap_or(&[]);
            match fx.write_site_files(&request.app, files) {
                Ok(()) => written.push((i, request)),
                Err(e) => {
                    match before.get(&request.app) {
                        Some(text) => wanted.insert(request.app.clone(), text.clone()),
                        None => wanted.remove(&request.app),
                    };
                    out.push((i, Err(e)));
                }
            }
        }
        let ready = written;
        if ready.is_empty() {
            return;
        }
        let result = self.make_live(fx, generation, &before, &wanted);
        for (_, request) in &ready {
            if result.is_ok() {
                let names: Vec<String> = request
                    .site
                    .iter()
                    .flat_map(|s| s.files.iter().map(|f| f.name.clone()))
                    .collect();
                self.live_files.insert(request.app.clone(), names);
            }
            let keep = self
                .live_files
                .get(&request.app)
                .cloned()
                .unwrap_or_default();
            fx.prune_site_files(&request.app, &keep);
        }
        match result {
            Ok(()) => {
                self.unremoved.clear();
                self.share(fx);
                out.extend(ready.into_iter().map(|(i, _)| (i, Ok(generation))));
            }
            Err(NginxError::Rejected(_)) if ready.len() > 1 => {
                for one in ready {
                    self.apply_batch(fx, vec![one], out);
                }
            }
            Err(e) => {
                for (i, request) in ready {
                    if request.site.is_none() {
                        self.unremoved.insert(request.app.clone());
                    }
                    out.push((i, Err(e.clone())));
                }
            }
        }
    }

    /// Writes `wanted` over `before`, tests, reloads and confirms; on any failure puts `before`
    /// back (and reloads it if Nginx may have seen the new files).
    fn make_live(
        &mut self,
        fx: &mut impl Effects,
        generation: u64,
        before: &BTreeMap<AppName, String>,
        wanted: &BTreeMap<AppName, String>,
    ) -> Result<(), NginxError> {
        self.generation = generation;
        if let Err(e) = self.write_files(fx, before, wanted) {
            self.restore(fx, wanted, before);
            return Err(e);
        }
        let t0 = fx.now();
        if let Err(e) = fx.test() {
            self.counters.test_failures.fetch_add(1, Ordering::Relaxed);
            self.restore(fx, wanted, before);
            return Err(e);
        }
        let t1 = fx.now();
        let old_workers = self.accepting_workers(fx);
        let live = self.reload(fx).and_then(|()| self.confirm(fx));
        let t2 = fx.now();
        if live.is_ok() {
            fx.wait_retired(&old_workers);
        }
        log::debug!(
            "nginx: generation {generation}: nginx -t {} ms, reload to confirmed {} ms, old workers retired {} ms later",
            (t1 - t0).as_millis(),
            (t2 - t1).as_millis(),
            fx.now().saturating_duration_since(t2).as_millis()
        );
        if let Err(e) = live {
            self.counters
                .reload_failures
                .fetch_add(1, Ordering::Relaxed);
            log::error!("nginx: {e}; restoring the previous configuration");
            self.restore(fx, wanted, before);
            if self.reload(fx).and_then(|()| self.confirm(fx)).is_err() {
                log::error!("nginx: the previous configuration is not confirmed either");
            }
            return Err(e);
        }
        self.counters.reloads.fetch_add(1, Ordering::Relaxed);
        self.live = wanted.clone();
        Ok(())
    }

    /// Writes the generation file, the main configuration if the apps' bounds changed it,
    /// and every app file that differs between `from` and `to`.
    fn write_files(
        &self,
        fx: &mut impl Effects,
        from: &BTreeMap<AppName, String>,
        to: &BTreeMap<AppName, String>,
    ) -> Result<(), NginxError> {
        fx.write_generation(self.generation)?;
        if self.mode == NginxMode::Managed {
            fx.write_main(to)?;
        }
        for (app, text) in to {
            if from.get(app) != Some(text) {
                fx.write_app(app, text)?;
            }
        }
        for app in from.keys() {
            if !to.contains_key(app) {
                fx.remove_app(app)?;
            }
        }
        Ok(())
    }

    fn restore(
        &mut self,
        fx: &mut impl Effects,
        wanted: &BTreeMap<AppName, String>,
        before: &BTreeMap<AppName, String>,
    ) {
        self.generation += 1;
        if let Err(e) = self.write_files(fx, wanted, before) {
            log::error!("nginx: cannot restore the previous files: {e}");
        }
    }

    fn reload(&mut self, fx: &mut impl Effects) -> Result<(), NginxError> {
        match self.mode {
            NginxMode::Managed => match &self.master {
                Some(m) => fx.hangup(m.pid),
                // Nginx is down and waiting for its restart: start it now with the new files.
                None => self.start_master(fx),
            },
            NginxMode::System => {
                let pid = fx.system_master().map_err(Unconfirmed::NotRunning)?;
                fx.hangup(pid)
            }
        }
    }

    /// Waits until the control socket answers the current generation. A managed master that
    /// dies meanwhile is replaced at once (the new one reads the files in place), rather than
    /// waiting out the timeout against its orphaned workers.
    fn confirm(&mut self, fx: &mut impl Effects) -> Result<(), NginxError> {
        let deadline = fx.now() + self.reload_timeout;
        loop {
            if self.mode == NginxMode::Managed
                && let Some(m) = &self.master
                && !fx.is_alive(m.pid)
            {
                let pid = m.pid;
                log::error!(
                    "nginx: the master (pid {pid}) died during a reload; starting a new one"
                );
                fx.stop_group(pid, Duration::from_secs(2));
                self.master = None;
                self.start_master(fx)?;
            }
            let last = match self.answers(fx) {
                Ok(()) => return Ok(()),
                Err(last) => last,
            };
            if fx.now() >= deadline {
                let unincluded = (self.mode == NginxMode::System && !fx.control_socket_exists())
                    .then(|| fx.http_conf());
                return Err(Unconfirmed::Timeout {
                    generation: self.generation,
                    timeout: self.reload_timeout,
                    last,
                    unincluded,
                }
                .into());
            }
            fx.sleep(Duration::from_millis(5));
        }
    }

    /// Whether the current master runs the current generation (or a later one); what the
    /// control socket answered otherwise.
    fn answers(&self, fx: &impl Effects) -> Result<(), Answered> {
        let (generation, worker) = fx.ask_generation()?;
        let master = self.current_master(fx);
        // Workers of a master that died keep answering until stopped: only the current
        // master's workers count.
        if master.is_some() && fx.parent_of(worker) != master {
            Err(Answered::Stranger(worker))
        } else if generation >= self.generation {
            Ok(())
        } else {
            Err(Answered::Older(generation))
        }
    }

    /// The master whose workers must answer: ours in managed mode, the pid file's in system mode.
    fn current_master(&self, fx: &impl Effects) -> Option<i32> {
        match self.mode {
            NginxMode::Managed => self.master.as_ref().map(|m| m.pid),
            NginxMode::System => fx.system_master().ok(),
        }
    }

    fn accepting_workers(&self, fx: &impl Effects) -> Vec<i32> {
        self.current_master(fx)
            .map(|m| fx.accepting_workers(m))
            .unwrap_or_default()
    }

    /// Gives `worker-files/` to the workers' group (at start, and after a host's Nginx was
    /// restarted with another `user`).
    fn share(&self, fx: &mut impl Effects) {
        if let Some(master) = self.current_master(fx) {
            fx.share_with_workers(master);
        }
    }

    /// Takes over the managed master an earlier keter left running; true when there was one.
    fn adopt(&mut self, fx: &mut impl Effects) -> bool {
        let Some((pid, age)) = fx.adopt_master() else {
            return false;
        };
        let now = fx.now();
        self.master = Some(Master {
            pid,
            started: now.checked_sub(age).unwrap_or(now),
        });
        self.master_pid.store(pid, Ordering::Relaxed);
        log::info!("nginx: took over the master, pid {pid}");
        true
    }

    fn start_master(&mut self, fx: &mut impl Effects) -> Result<(), NginxError> {
        let pid = fx.start_master()?;
        log::info!("nginx: started the master, pid {pid}");
        self.master = Some(Master {
            pid,
            started: fx.now(),
        });
        self.master_pid.store(pid, Ordering::Relaxed);
        self.restart_at = None;
        Ok(())
    }

    /// A process the world watches exited; when it is the managed master, its restart is
    /// scheduled with backoff.
    pub fn exited(&mut self, fx: &mut impl Effects, pid: i32, status: Option<ExitStatus>) {
        let Some(m) = &self.master else { return };
        if m.pid != pid {
            return;
        }
        let ran = fx.now().saturating_duration_since(m.started);
        self.master = None;
        self.master_pid.store(0, Ordering::Relaxed);
        // Its workers outlive it and keep the listening sockets: stop the whole group.
        fx.stop_group(pid, Duration::from_secs(2));
        let delay = self.restart.failed(ran);
        log::error!(
            "nginx: the master (pid {pid}) stopped with {}; restarting it in {delay:?}",
            process::describe_exit(status),
        );
        self.restart_at = Some(fx.now() + delay);
    }

    /// The restart of the master is due ([`Plan::restart_at`]).
    pub fn restart_master(&mut self, fx: &mut impl Effects) {
        self.restart_at = None;
        let result = self.start_master(fx).and_then(|()| self.confirm(fx));
        if let Err(e) = result {
            log::error!("nginx: restart failed: {e}");
            self.master_pid.store(0, Ordering::Relaxed);
            if let Some(m) = self.master.take() {
                fx.stop_group(m.pid, Duration::from_secs(1));
            }
            self.restart_at = Some(fx.now() + self.restart.failed(Duration::ZERO));
        }
    }

    /// The request log was renamed (`crate::requests::tailer`): the running master (managed,
    /// or the host's) reopens its log files. Without one nothing is sent: a master started
    /// later opens the log by its name.
    pub fn reopen_logs(&mut self, fx: &mut impl Effects) {
        let pid = match self.mode {
            NginxMode::Managed => self.master.as_ref().map(|m| m.pid),
            NginxMode::System => fx.system_master().ok(),
        };
        if let Some(pid) = pid
            && let Err(e) = fx.reopen_logs(pid)
        {
            log::warn!("nginx: cannot have the master reopen its logs: {e}");
        }
    }

    /// At exit: stops a managed master; takes keter's files out of a system Nginx.
    pub fn stop(&mut self, fx: &mut impl Effects) {
        if self.mode == NginxMode::System {
            self.leave_system_nginx(fx);
            return;
        }
        self.master_pid.store(0, Ordering::Relaxed);
        if let Some(m) = self.master.take() {
            log::info!("nginx: stopping the master (pid {})", m.pid);
            fx.stop_group(m.pid, self.stop_timeout);
        }
        fx.remove_control_socket();
    }

    /// System mode at exit: the host's Nginx goes on serving other sites, so keter takes all of
    /// its files out (every app is stopped by now) and reloads, leaving Nginx as it would be
    /// without keter. Nginx then closes the control socket and deletes its file itself; keter
    /// does not touch it while Nginx may still listen on it.
    fn leave_system_nginx(&mut self, fx: &mut impl Effects) {
        fx.remove_all();
        self.live.clear();
        let left = fx.test().and_then(|()| self.reload(fx));
        match left {
            Ok(()) => log::info!("nginx: keter's files removed from the system Nginx"),
            Err(e) => log::error!(
                "nginx: keter's files are removed but Nginx was not reloaded ({e}); it drops them at its next reload"
            ),
        }
    }

    #[cfg(test)]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    #[cfg(test)]
    pub fn master(&self) -> Option<i32> {
        self.master.as_ref().map(|m| m.pid)
    }
}

/// Whether two app files say the same but for their header's `# deploy N of this app, Nginx
/// configuration generation G` line.
fn same_but_generation(a: &str, b: &str) -> bool {
    fn body(t: &str) -> impl Iterator<Item = &str> {
        t.lines().filter(|l| !l.starts_with("# deploy "))
    }
    body(a).eq(body(b))
}
