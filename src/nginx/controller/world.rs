//! The real world of the controller's planner (`plan.rs`): keter's files under `ROOT/nginx`,
//! `nginx -t`, SIGHUP, the control socket, the master's process (`master.rs`), `/proc` and the
//! clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use super::disk::{longest_bound, write_if_changed, written_generation};
use super::plan::Found;
use super::{Answered, Effects, Msg, NginxError, RenderError, Unconfirmed, write_atomic};
use crate::config::{Config, NginxConfig, NginxMode};
use crate::names::AppName;
use crate::nginx::system::{self, Blame, NotRunning};
use crate::nginx::{Paths, Renderer, Site, SiteFile, worker_files};
use crate::{atomic_file, probe, process, procfs};

pub(super) struct World {
    pub(super) paths: Paths,
    pub(super) nginx: NginxConfig,
    pub(super) stop_timeout: Duration,
    renderer: Arc<Renderer>,
    /// Where the watch of the master reports its exit.
    pub(super) tx: Sender<Msg>,
    /// The group of Nginx's workers, once known: owner group of `worker-files/`.
    worker_gid: Option<u32>,
}

impl World {
    pub fn new(config: &Config, renderer: Arc<Renderer>, tx: Sender<Msg>) -> World {
        World {
            paths: renderer.paths().clone(),
            nginx: config.nginx.clone(),
            stop_timeout: config.stop_timeout,
            renderer,
            tx,
            worker_gid: None,
        }
    }

    /// Makes the folders, removes the app files of an earlier run except those of the apps in
    /// `keep`, and writes the shared files; what it found for the planner's start.
    pub fn prepare(&mut self, keep: &BTreeSet<AppName>) -> Result<Found, NginxError> {
        let p = self.paths.clone();
        for dir in [&p.prefix, &p.apps, &p.prefix.join("temp")] {
            fs::create_dir_all(dir).map_err(|e| NginxError::file(dir, e))?;
        }
        // Files of apps taken over stay: Nginx goes on routing to them. Any other file left by
        // an earlier run would route to a dead port.
        let mut changed = false;
        let mut live = BTreeMap::new();
        for entry in fs::read_dir(&p.apps).map_err(|e| NginxError::file(&p.apps, e))? {
            let path = entry.map_err(|e| NginxError::file(&p.apps, e))?.path();
            let app = path
                .file_name()
                .and_then(|n| n.to_str()?.strip_suffix(".conf"))
                .and_then(|n| AppName::new(n).ok())
                .filter(|a| keep.contains(a));
            match app.and_then(|a| Some((a, fs::read_to_string(&path).ok()?))) {
                Some((app, text)) => {
                    live.insert(app, text);
                }
                None => {
                    let _ = fs::remove_file(path);
                    changed = true;
                }
            }
        }
        // The generation goes on from the one an earlier run wrote, so that "confirmed" keeps
        // meaning "this generation or a later one".
        let generation = fs::read_to_string(&p.generation_conf)
            .ok()
            .and_then(|t| written_generation(&t))
            .unwrap_or(1)
            .max(1);
        for (out, inputs) in self.renderer.listener_cert_bundles() {
            write_certificate_bundle(&out, &inputs)?;
        }
        worker_files::prepare(&p, &self.renderer.response_pages(), None)
            .map_err(|e| NginxError::file(&p.worker_files, e))?;
        if self.nginx.mode == NginxMode::System {
            // Fail before writing anything that the host's Nginx would load.
            system::master_pid(&self.nginx.pid_file).map_err(Unconfirmed::NotRunning)?;
            system::remove_stale_socket(&p.control_socket)
                .map_err(|e| NginxError::file(&p.control_socket, e))?;
        }
        let http = self.renderer.http_conf()?;
        changed |=
            write_if_changed(&p.http_conf, &http).map_err(|e| NginxError::file(&p.http_conf, e))?;
        changed |= write_if_changed(&p.generation_conf, &Renderer::generation_conf(generation))
            .map_err(|e| NginxError::file(&p.generation_conf, e))?;
        Ok(Found {
            live,
            generation,
            changed,
        })
    }
}

impl Effects for World {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }

    fn render(&self, site: &Site, generation: u64) -> Result<String, RenderError> {
        self.renderer.app_conf(site, generation)
    }

    fn write_site_files(&mut self, app: &AppName, files: &[SiteFile]) -> Result<(), NginxError> {
        worker_files::write_site_files(&self.paths, app, files, self.worker_gid)
            .map_err(|e| NginxError::file(self.paths.app_files(app), e))
    }

    fn prune_site_files(&mut self, app: &AppName, keep: &[String]) {
        worker_files::prune(&self.paths, app, keep);
    }

    fn write_generation(&mut self, generation: u64) -> Result<(), NginxError> {
        let path = &self.paths.generation_conf;
        write_atomic(path, &Renderer::generation_conf(generation))
            .map_err(|e| NginxError::file(path, e))
    }

    fn write_main(&mut self, apps: &BTreeMap<AppName, String>) -> Result<bool, NginxError> {
        let longest = longest_bound(apps.values(), self.renderer.default_bound());
        let main = self.renderer.main_conf(longest)?;
        let path = &self.paths.main_conf;
        write_if_changed(path, &main).map_err(|e| NginxError::file(path, e))
    }

    fn write_app(&mut self, app: &AppName, text: &str) -> Result<(), NginxError> {
        let path = self.paths.app_conf(app);
        write_atomic(&path, text).map_err(|e| NginxError::file(path, e))
    }

    fn remove_app(&mut self, app: &AppName) -> Result<(), NginxError> {
        let path = self.paths.app_conf(app);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(NginxError::file(path, e)),
            _ => Ok(()),
        }
    }

    fn remove_all(&mut self) {
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
    }

    fn test(&mut self) -> Result<(), NginxError> {
        let mut cmd = std::process::Command::new(&self.nginx.binary);
        cmd.arg("-t").arg("-q");
        if self.nginx.mode == NginxMode::Managed {
            cmd.args(["-e", "stderr", "-p"])
                .arg(&self.paths.prefix)
                .arg("-c")
                .arg(&self.paths.main_conf);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| NginxError::Test {
                binary: self.nginx.binary.clone(),
                source: Arc::new(e),
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

    fn system_master(&self) -> Result<i32, NotRunning> {
        system::master_pid(&self.nginx.pid_file)
    }

    fn hangup(&mut self, pid: i32) -> Result<(), NginxError> {
        signal::kill(Pid::from_raw(pid), Signal::SIGHUP)
            .map_err(|source| Unconfirmed::Signal { pid, source }.into())
    }

    fn reopen_logs(&mut self, pid: i32) -> Result<(), NginxError> {
        signal::kill(Pid::from_raw(pid), Signal::SIGUSR1)
            .map_err(|source| Unconfirmed::Signal { pid, source }.into())
    }

    fn adopt_master(&mut self) -> Option<(i32, Duration)> {
        self.adopt()
    }

    fn start_master(&mut self) -> Result<i32, NginxError> {
        self.spawn_master()
    }

    fn is_alive(&self, pid: i32) -> bool {
        procfs::is_alive(pid)
    }

    fn stop_group(&mut self, pid: i32, timeout: Duration) {
        process::stop_group(pid, timeout);
    }

    fn remove_control_socket(&mut self) {
        let _ = fs::remove_file(&self.paths.control_socket);
    }

    fn ask_generation(&self) -> Result<(u64, i32), Answered> {
        let r = probe::get_unix(
            &self.paths.control_socket,
            "/keter-generation",
            Duration::from_secs(1),
        )
        .map_err(|e| Answered::Nothing(Arc::new(e)))?;
        if r.status != 200 {
            return Err(Answered::Status(r.status));
        }
        let mut words = r.body.split_whitespace();
        let generation = words.next().and_then(|g| g.parse::<u64>().ok());
        let worker = words.next().and_then(|p| p.parse::<i32>().ok());
        generation.zip(worker).ok_or(Answered::Garbled(r.body))
    }

    fn parent_of(&self, pid: i32) -> Option<i32> {
        procfs::parent_of(pid)
    }

    fn control_socket_exists(&self) -> bool {
        self.paths.control_socket.exists()
    }

    fn http_conf(&self) -> PathBuf {
        self.paths.http_conf.clone()
    }

    fn accepting_workers(&self, master: i32) -> Vec<i32> {
        procfs::nginx_workers(master)
            .into_iter()
            .filter(|(_, shutting_down)| !shutting_down)
            .map(|(pid, _)| pid)
            .collect()
    }

    /// After a reload the master runs old and new workers side by side for about 100 ms before
    /// it tells the old ones to stop accepting. Waiting for that makes "live" exact: from here
    /// on every new connection gets the new configuration.
    fn wait_retired(&mut self, old: &[i32]) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let retiring = |pid: &i32| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                cmdline.is_empty() || String::from_utf8_lossy(&cmdline).contains("is shutting down")
            };
            if old.iter().all(retiring) {
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

    fn share_with_workers(&mut self, master: i32) {
        let Some(gid) = worker_files::workers_gid(master) else {
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
}

/// A TLS listener's certificate with its chain appended, as `ssl_certificate` wants it,
/// readable by its owner only.
fn write_certificate_bundle(out: &Path, inputs: &[PathBuf]) -> Result<(), NginxError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut bytes = Vec::new();
    for input in inputs {
        let part = fs::read(input).map_err(|e| NginxError::file(input, e))?;
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
        .map_err(|e| NginxError::file(dir, e))?;
    atomic_file::replace(out, &bytes, 0o600).map_err(|e| NginxError::file(out, e))
}
