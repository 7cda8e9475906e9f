//! The deploy of one bundle (DESIGN.md 6.1-6.7): unpack, validate, claim hosts, start every
//! stanza's process, wait for the webapps' readiness, switch Nginx over; and the disposal of a
//! version that failed or was replaced.

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::site::{SiteSource, site_of};
use super::version::{self, FileStamp, Proc, Role, Version};
use super::{Command, Event, Retiring, Worker};
use crate::bundle::Tls;
use crate::bundle::{self, BundleConfig, WebApp};
use crate::isolation::Isolation;
use crate::nginx::{CertFiles, Site};
use crate::process::{self, Running, Spec};
use crate::report::{DeployReport, DeployResult, rfc3339};
use crate::restart::Policy;
use crate::{probe, procfs};

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

/// Readiness is polled after 1 ms, then at doubling intervals up to every 20 ms (DESIGN.md
/// 6.5: tens of milliseconds): most apps listen within milliseconds of exec.
/// Unpacking runs only on otherwise idle CPU for this long, then at the normal priority.
const UNPACK_IDLE_GRACE: Duration = Duration::from_millis(100);
const READINESS_POLL_FIRST: Duration = Duration::from_millis(1);
const READINESS_POLL: Duration = Duration::from_millis(20);

impl Worker {
    /// True when `c` asks to deploy the very file (same inode, size and times) that is being
    /// deployed or already serves.
    pub(super) fn is_repeat(&self, c: &Command) -> bool {
        let Command::Deploy { path, .. } = c else {
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

    pub(super) fn deploy(&mut self, path: &Path, retry: bool, rx: &Receiver<Event>) {
        let started = Instant::now();
        let label = format!("{}.keter", self.name);
        let stamp = fs::symlink_metadata(path).ok().map(|m| FileStamp::of(&m));
        if !retry
            && let (Some((failed_path, failed_stamp)), Some(stamp)) = (&self.failed, stamp)
            && failed_path == path
            && *failed_stamp == stamp
        {
            log::debug!("{}: {label} failed before and has not changed", self.name);
            return;
        }
        self.deploy_in_progress = true;
        self.publish();
        let result = self.try_deploy(path, rx, started);
        self.deploying = None;
        self.deploy_in_progress = false;
        let took = started.elapsed();
        let (kind, error) = match &result {
            Ok(Outcome::Deployed) => (Some(DeployResult::Succeeded), None),
            Ok(Outcome::SameFile) => (None, None),
            Ok(Outcome::SameContent) => (Some(DeployResult::Unchanged), None),
            Err(DeployError::Superseded) => (Some(DeployResult::Superseded), None),
            Err(DeployError::Failed(why)) => (Some(DeployResult::Failed), Some(why.clone())),
        };
        if let Some(kind) = kind {
            self.shared.reports.deploy_finished(kind, took);
            self.last_deploy = Some(DeployReport {
                result: kind,
                finished: rfc3339(SystemTime::now()),
                duration_ms: took.as_millis() as u64,
                error: error.clone(),
            });
        }
        self.failed = match (&error, stamp) {
            (Some(_), Some(stamp)) => Some((path.to_path_buf(), stamp)),
            _ => None,
        };
        if let Some(e) = error {
            self.last_error = Some(e);
        }
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
        let config = &self.shared.config;
        let id = self.shared.next_version.fetch_add(1, Ordering::Relaxed);
        let dir = config.root.join("temp").join(format!("{}-{id}", self.name));
        let mut progress = bundle::log_progress(self.name.to_string());
        let unpacked = process::when_idle(UNPACK_IDLE_GRACE, || {
            bundle::unpack_with_progress(path, &dir, &config.limits, &mut progress)
        })
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
        let (bundle_config, warnings) = bundle::read_config(&dir, &format!("{}.keter", self.name))
            .map_err(|e| cleanup(DeployError::Failed(e.to_string())))?;
        for w in &warnings.warnings {
            log::warn!("{w}");
        }
        let isolation = &self.shared.isolation;
        let user = isolation
            .user_of(&self.name)
            .and_then(|user| isolation.hand_over(&dir, user.as_ref()).map(|()| user))
            .map_err(|e| cleanup(DeployError::Failed(e)))?;
        self.claim_hosts(&bundle_config).map_err(cleanup)?;
        let plugin_env = match self.provision(&bundle_config) {
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
            config: bundle_config,
            plugin_env,
            user,
            procs: Vec::new(),
            deploy: self.deploys,
            modified: meta.modified().ok(),
            live_since: None,
        };
        match self.start_and_switch(&mut version, rx, started) {
            Ok(()) => {
                version.live_since = Some(SystemTime::now());
                if let Some(old) = self.current.replace(version) {
                    log::info!(
                        "{}: draining the previous version (ports {:?})",
                        self.name,
                        old.ports()
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

    /// Starts background stanzas, then webapps (Keter's order), waits for every webapp to be
    /// ready and makes the version live in Nginx.
    fn start_and_switch(
        &mut self,
        version: &mut Version,
        rx: &Receiver<Event>,
        started: Instant,
    ) -> Result<(), DeployError> {
        let shared = self.shared.clone();
        let config = &shared.config;
        // Background stanzas first, then webapps, as Keter starts them.
        let plan: Vec<(Role, bundle::Program, Option<WebApp>, Policy)> = version
            .config
            .background
            .iter()
            .enumerate()
            .map(|(index, b)| {
                let policy = Policy::Fixed {
                    delay: b.restart_delay,
                    count: b.restart_count,
                };
                (Role::Background { index }, b.program.clone(), None, policy)
            })
            .chain(version.config.webapps.iter().enumerate().map(|(index, w)| {
                let role = Role::Web { index, port: 0 };
                (role, w.program.clone(), Some(w.clone()), Policy::WEBAPP)
            }))
            .collect();
        let mut procs = Vec::new();
        for (role, program, webapp, policy) in plan {
            let (role, port) = match role {
                Role::Web { index, .. } => {
                    let Some(port) = self.shared.ports.acquire() else {
                        version.procs = procs;
                        return Err(DeployError::Failed(format!(
                            "no free port left in port-range {:?}",
                            config.port_range
                        )));
                    };
                    (Role::Web { index, port }, Some(port))
                }
                role => (role, None),
            };
            let resolved = bundle::resolve_exec(&version.dir, &program.exec);
            let web = webapp.as_ref().zip(port);
            let spec = Spec {
                program: resolved.clone().unwrap_or_default(),
                args: program.args.clone(),
                cwd: version.dir.clone(),
                env: version::environment(
                    config,
                    &version.plugin_env,
                    &program,
                    web,
                    &Isolation::home(version.user.as_ref()),
                ),
                user: version.user.clone(),
            };
            // Recorded before anything can fail, so that `discard` frees the port.
            procs.push(Proc::new(role, spec, policy));
            if let Err(e) = resolved {
                version.procs = procs;
                return Err(DeployError::Failed(format!("{}: {e}", program.key("exec"))));
            }
        }
        version.procs = procs;
        for i in 0..version.procs.len() {
            self.start_proc(version, i).map_err(DeployError::Failed)?;
        }
        for i in 0..version.procs.len() {
            let Role::Web { index, port } = version.procs[i].role else {
                continue;
            };
            let webapp = version.config.webapps[index].clone();
            let waited = self.wait_ready(version, i, &webapp, rx)?;
            self.shared.reports.readiness_wait.observe(waited);
            log::info!(
                "{}: ready on port {port} after {} ms",
                self.name,
                waited.as_millis()
            );
        }
        let site = self.site_for(version).map_err(DeployError::Failed)?;
        self.shared
            .isolation
            .open_to_nginx(&site, &version.dir, self.shared.nginx.master_pid())
            .map_err(DeployError::Failed)?;
        let switching = Instant::now();
        let generation = self
            .shared
            .nginx
            .apply(&self.name, Some(site))
            .map_err(|e| DeployError::Failed(e.to_string()))?;
        log::info!(
            "{}: switched to deploy {} (sha256 {}) at Nginx generation {generation} in {} ms, {} ms after the bundle was picked up",
            self.name,
            version.deploy,
            &version.sha256[..12],
            switching.elapsed().as_millis(),
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// Starts process `i` of `version` and records its group in the journal.
    pub(super) fn start_proc(&self, version: &mut Version, i: usize) -> Result<Running, String> {
        let tx = self.tx.clone();
        let id = version.id;
        let p = &mut version.procs[i];
        let running = process::spawn(&p.spec, &self.log, move |pid, status| {
            let _ = tx.send(Event::Exited {
                version: id,
                proc: i,
                pid,
                status,
            });
        })
        .map_err(|e| format!("cannot start {}: {e}", p.spec.program.display()))?;
        self.shared.journal.add(running.pid, self.name.as_str());
        log::info!(
            "{}: started {} as pid {} ({})",
            self.name,
            p.spec.program.display(),
            running.pid,
            p.label()
        );
        p.running = Some(running);
        Ok(running)
    }

    /// Polls the health check of webapp process `i` until it answers below 500, it exits, a
    /// newer command arrives, or the readiness timeout passes.
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
        let port = version.procs[i].port().unwrap_or(0);
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
            // Events while waiting: an exit of this webapp fails the deploy; a newer command
            // supersedes it; other exits follow their restart policy.
            let wait = poll.min(deadline.saturating_duration_since(Instant::now()));
            poll = (poll * 2).min(READINESS_POLL);
            let mut event = rx.recv_timeout(wait);
            loop {
                match event {
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
                        proc,
                        pid,
                        status,
                    }) if v == version.id => {
                        process::stop_group(pid, Duration::from_millis(500));
                        self.shared.journal.remove(pid);
                        if proc == i {
                            version.procs[i].running = None;
                            return Err(DeployError::Failed(format!(
                                "not ready: the process exited with {} before answering ({last}){}",
                                process::describe_exit(status),
                                self.last_output()
                            )));
                        }
                        version.procs[proc].exited(&self.name, pid, status, Instant::now());
                    }
                    Ok(Event::Exited {
                        version: v,
                        proc,
                        pid,
                        status,
                    }) => self.exited(v, proc, pid, status),
                    Err(_) => break,
                }
                event = rx.try_recv().map_err(|_| RecvTimeoutError::Timeout);
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

    /// DESIGN.md 6.3: the plugins' variables for this bundle (none unless it asks for
    /// postgres). Runs on this worker thread: the sync postgres client must not run on tokio.
    fn provision(
        &self,
        config: &BundleConfig,
    ) -> Result<std::collections::BTreeMap<String, String>, DeployError> {
        if !config.postgres {
            return Ok(Default::default());
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

    /// What Nginx serves for this version: one block per stanza with hosts.
    fn site_for(&self, version: &Version) -> Result<Site, String> {
        let ports: Vec<(usize, u16)> = version
            .procs
            .iter()
            .filter_map(|p| match p.role {
                Role::Web { index, port } => Some((index, port)),
                Role::Background { .. } => None,
            })
            .collect();
        let mut certs = |tls: &Tls, origin: &str| self.copy_certificate(version, tls, origin);
        let site = site_of(
            &self.shared.config,
            &SiteSource {
                app: &self.name,
                bundle: &version.config,
                dir: &version.dir,
                sha256: &version.sha256,
                deploy: version.deploy,
                ports: &ports,
            },
            &mut certs,
        )?;
        let has_tls = self.shared.config.listeners.iter().any(|l| l.tls.is_some());
        if !has_tls && site.blocks.iter().any(|b| b.requires_secure) {
            log::warn!(
                "{}: requires-secure is set but keter has no TLS listener; plain HTTP is served",
                self.name
            );
        }
        Ok(site)
    }

    /// Copies a stanza's own certificate out of the bundle into `ROOT/etc/certs/NAME-ID/`
    /// (mode 0600, chain appended), so that Nginx reads files the app cannot change.
    fn copy_certificate(
        &self,
        version: &Version,
        tls: &Tls,
        origin: &str,
    ) -> Result<Option<CertFiles>, String> {
        let Tls::Own {
            key,
            certificate,
            chain,
        } = tls
        else {
            return Ok(None);
        };
        let read = |p: &Path| -> Result<Vec<u8>, String> {
            let real =
                bundle::resolve_file(&version.dir, p).map_err(|e| format!("{origin}: {e}"))?;
            let meta = fs::metadata(&real).map_err(|e| format!("{origin}: {e}"))?;
            if meta.len() > 1 << 20 {
                return Err(format!("{origin}: {} is larger than 1 MiB", p.display()));
            }
            fs::read(&real).map_err(|e| format!("{origin}: {}: {e}", p.display()))
        };
        let mut cert = read(certificate)?;
        for c in chain {
            if !cert.ends_with(b"\n") {
                cert.push(b'\n');
            }
            cert.extend(read(c)?);
        }
        let key_bytes = read(key)?;
        let dir = version_certs_dir(&self.shared.config.root, &self.name, version.id);
        write_private(&dir, "certificate.pem", &cert)
            .and_then(|c| Ok((c, write_private(&dir, "key.pem", &key_bytes)?)))
            .map(|(certificate, key)| Some(CertFiles { certificate, key }))
            .map_err(|e| format!("{origin}: cannot copy the certificate: {e}"))
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

    /// Stops a version's processes, frees its ports and deletes its folder.
    pub(super) fn discard(&self, version: Version) {
        let grace = self.shared.config.stop_timeout;
        for p in &version.procs {
            if let Some(r) = p.running {
                version::stop(&self.name, &p.label(), r.pid, grace);
                self.shared.journal.remove(r.pid);
            }
            if let Some(port) = p.port() {
                self.shared.ports.release(port);
            }
        }
        let certs = version_certs_dir(&self.shared.config.root, &self.name, version.id);
        if certs.exists() {
            let _ = fs::remove_dir_all(&certs);
        }
        if let Err(e) = fs::remove_dir_all(&version.dir) {
            log::warn!(
                "{}: cannot delete {}: {e}",
                self.name,
                version.dir.display()
            );
        }
    }
}

/// Where a version's own certificates are kept.
fn version_certs_dir(root: &Path, app: &crate::names::AppName, id: u64) -> std::path::PathBuf {
    root.join("etc").join("certs").join(format!("{app}-{id}"))
}

/// Writes a file only its owner can read, created with that mode (never widened first).
fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let path = dir.join(name);
    crate::atomic_file::replace(&path, bytes, 0o600)?;
    Ok(path)
}
