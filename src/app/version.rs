//! One unpacked version of an app and its supervised processes: the state of each process
//! ([`ProcState`]), how it is started (environment, user, ports), restarted after an exit, and
//! stopped with its folder. `docs/lifecycle.md` draws the process states.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::bundle::{BundleConfig, Program, WebApp};
use crate::config::Config;
use crate::formats::records::{FileStampRecord, RoleRecord};
use crate::names::AppName;
use crate::process::{self, Running, Spec};
use crate::restart::{Decision, Policy, Restarts};

/// Identity of a bundle file on disk, to skip re-reading a file that did not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    pub(super) fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// The same from `fstat` of an open file.
    pub(super) fn of_stat(st: &nix::sys::stat::FileStat) -> FileStamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// A stamp that stands for the `n`-th file, for tests of the state machine.
    #[cfg(test)]
    pub(super) fn fake(n: u64) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: n,
            size: n,
            mtime_ns: 0,
            ctime_ns: 0,
        }
    }
}

/// The records of these types (`src/formats/records.rs`).
impl From<FileStamp> for FileStampRecord {
    fn from(s: FileStamp) -> FileStampRecord {
        FileStampRecord {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
        }
    }
}

impl From<FileStampRecord> for FileStamp {
    fn from(s: FileStampRecord) -> FileStamp {
        FileStamp {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime_ns: s.mtime_ns,
            ctime_ns: s.ctime_ns,
        }
    }
}

impl From<Role> for RoleRecord {
    fn from(r: Role) -> RoleRecord {
        match r {
            Role::Web { index, port } => RoleRecord::Web { index, port },
            Role::Background { index } => RoleRecord::Background { index },
        }
    }
}

impl From<RoleRecord> for Role {
    fn from(r: RoleRecord) -> Role {
        match r {
            RoleRecord::Web { index, port } => Role::Web { index, port },
            RoleRecord::Background { index } => Role::Background { index },
        }
    }
}

/// One unpacked version of the app and its processes.
pub(super) struct Version {
    /// Unique within this run of keter; names the folder `temp/NAME-ID`.
    pub id: u64,
    pub dir: PathBuf,
    pub sha256: String,
    pub stamp: FileStamp,
    pub config: BundleConfig,
    /// The text of the bundle's `config/keter.yaml`, as `config` was read from it.
    pub config_text: String,
    /// Variables of the plugins (postgres), between the global and the stanza `env`.
    pub plugin_env: BTreeMap<String, String>,
    /// The user its processes run as (`None`: keter's own).
    pub user: Option<crate::process::RunAs>,
    /// Background stanzas first, then webapps, in the order they are started.
    pub procs: Vec<Proc>,
    /// Deploy number of this app within this run.
    pub deploy: u64,
    /// Modification time of the bundle file.
    pub modified: Option<std::time::SystemTime>,
    /// When Nginx started routing to this version.
    pub live_since: Option<std::time::SystemTime>,
    /// What its release is made of, once switched to (`releases.rs`); `None` for a version
    /// taken over from an earlier keter, whose release is already in the list.
    pub arrival: Option<super::releases::Arrival>,
}

impl Version {
    /// The ports of the version's webapps.
    pub fn ports(&self) -> Vec<u16> {
        self.procs.iter().filter_map(|p| p.port()).collect()
    }
}

/// What a process is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// `webapps[index]`, listening on `port`; the port is kept across crash restarts so the
    /// Nginx upstream stays right (Dokku #3396: a changed upstream after a restart meant 502s).
    Web { index: usize, port: u16 },
    /// `background[index]`.
    Background { index: usize },
}

/// Where a supervised process is in its life. Plain data: a process keter did not start
/// itself (known by pid and start time) is `Running` like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcState {
    /// Not started yet: the version's processes are about to start.
    NotStarted,
    Running(Running),
    /// Exited (or could not be started); starts again at `until`.
    Backoff {
        until: Instant,
    },
    /// Its restart policy is used up (a background stanza's `restart-count`); stays stopped.
    GaveUp,
    /// Exited in a version that is no longer supervised (draining, or being discarded).
    Ended,
}

/// A supervised process of a version.
pub(super) struct Proc {
    pub role: Role,
    pub spec: Spec,
    pub state: ProcState,
    pub restarts: Restarts,
    /// A webapp's port is watched from its exit until its own process group listens there
    /// again: this is when keter next looks at who listens on it (`supervise.rs`). `None`
    /// while it is not watched.
    pub port_check_at: Option<Instant>,
    /// Its port is held by someone else and no other port was free: it is not started, and
    /// the version's site is out of Nginx until it has a port again.
    pub stranded: bool,
    /// A webapp's health checks while it serves, and its replacement when it is unhealthy
    /// (`health.rs`).
    pub health: super::health::Health,
}

impl Proc {
    pub fn new(role: Role, spec: Spec, policy: Policy) -> Proc {
        Proc {
            role,
            spec,
            state: ProcState::NotStarted,
            restarts: Restarts::new(policy),
            port_check_at: None,
            stranded: false,
            health: super::health::Health::default(),
        }
    }

    /// Gives a webapp the port `to` instead of the one it had: in its role (which the record
    /// keeps) and in the variables that carry the port to it (`PORT`, `YESOD_PORT` and the
    /// stanza's `port-env-vars`, README "Environment of an app"), so that its next start
    /// binds `to`. Everything else of its environment stays as it was planned.
    pub fn move_port(&mut self, to: u16, webapp: &WebApp) {
        let Role::Web { index, .. } = self.role else {
            return;
        };
        self.spec = self.spec_on(to, webapp);
        self.role = Role::Web { index, port: to };
    }

    /// How the webapp is started on port `to` instead of its own: the same spec with the
    /// variables that carry the port changed.
    pub fn spec_on(&self, to: u16, webapp: &WebApp) -> Spec {
        let mut spec = self.spec.clone();
        let Role::Web { port, .. } = self.role else {
            return spec;
        };
        let (old, new) = (port.to_string(), to.to_string());
        let carries_port = |name: &str| {
            name == "PORT" || name == "YESOD_PORT" || webapp.port_env_vars.iter().any(|v| v == name)
        };
        for (name, value) in &mut spec.env {
            if carries_port(name) && *value == old {
                value.clone_from(&new);
            }
        }
        spec
    }

    /// A restarted webapp found its port held by someone else before it listened there (it
    /// lost the race to bind it): the caller stops it, and the restart policy starts it again,
    /// as after an exit. The delay until then.
    pub fn lost_port(&mut self, now: Instant) -> Duration {
        let ran = self
            .running()
            .map(|r| now.saturating_duration_since(r.started))
            .unwrap_or_default();
        match self.restarts.exited(now, ran) {
            Decision::RestartAt(at) => {
                self.state = ProcState::Backoff { until: at };
                at.saturating_duration_since(now)
            }
            Decision::GiveUp => {
                self.state = ProcState::GaveUp;
                Duration::ZERO
            }
        }
    }

    pub fn port(&self) -> Option<u16> {
        match self.role {
            Role::Web { port, .. } => Some(port),
            Role::Background { .. } => None,
        }
    }

    /// The process as it runs now.
    pub fn running(&self) -> Option<Running> {
        match self.state {
            ProcState::Running(r) => Some(r),
            _ => None,
        }
    }

    /// When a restart is due.
    pub fn restart_due(&self) -> Option<Instant> {
        match self.state {
            ProcState::Backoff { until } => Some(until),
            _ => None,
        }
    }

    /// How the process is named in the log.
    pub fn label(&self) -> String {
        match self.role {
            Role::Web { port, .. } => format!("port {port}"),
            Role::Background { index } => format!("background stanza {index}"),
        }
    }

    /// The process exited: decides about its restart and says so in the log.
    /// The process exited at `now`, `how` as [`process::describe_exit`] or the supervisor
    /// tells it (`out of memory (limit 512 MiB)`).
    pub fn exited(&mut self, app: &AppName, pid: i32, how: &str, now: Instant) {
        let ran = self
            .running()
            .map(|r| now.saturating_duration_since(r.started))
            .unwrap_or_default();
        self.state = match self.restarts.exited(now, ran) {
            Decision::RestartAt(at) => {
                log::warn!(
                    "{app}: pid {pid} ({}) exited with {how} after {} ms; restarting in {} ms{}",
                    self.label(),
                    ran.as_millis(),
                    at.saturating_duration_since(now).as_millis(),
                    self.looping()
                );
                ProcState::Backoff { until: at }
            }
            Decision::GiveUp => {
                log::error!(
                    "{app}: pid {pid} ({}) exited with {how}; its restart-count is used up, it stays stopped",
                    self.label()
                );
                ProcState::GaveUp
            }
        };
    }

    /// A restart could not start the process: the restart policy decides about the next try,
    /// as for an exit that happened at once.
    pub fn restart_failed(&mut self, app: &AppName, error: &std::io::Error, now: Instant) {
        self.state = match self.restarts.exited(now, Duration::ZERO) {
            Decision::RestartAt(at) => {
                log::error!(
                    "{app}: restart of {} failed: cannot start {}: {error}; trying again in {} ms{}",
                    self.label(),
                    self.spec.program.display(),
                    at.saturating_duration_since(now).as_millis(),
                    self.looping()
                );
                ProcState::Backoff { until: at }
            }
            Decision::GiveUp => {
                log::error!(
                    "{app}: restart of {} failed: cannot start {}: {error}; its restart-count is used up, it stays stopped",
                    self.label(),
                    self.spec.program.display()
                );
                ProcState::GaveUp
            }
        };
    }

    /// A restart is due but the webapp has no port it may use (`stranded`): the restart
    /// policy decides when to look for one again, as for a restart that could not start.
    pub fn restart_postponed(&mut self, app: &AppName, now: Instant) {
        self.state = match self.restarts.exited(now, Duration::ZERO) {
            Decision::RestartAt(at) => {
                log::warn!(
                    "{app}: restart of webapp on {} postponed: that port is held by another program and no other is free; trying again in {} ms{}",
                    self.label(),
                    at.saturating_duration_since(now).as_millis(),
                    self.looping()
                );
                ProcState::Backoff { until: at }
            }
            Decision::GiveUp => ProcState::GaveUp,
        };
    }

    fn looping(&self) -> String {
        if self.restarts.crash_looping() {
            format!(
                "; crash-looping ({} failures in a row)",
                self.restarts.failures()
            )
        } else {
            String::new()
        }
    }
}

/// The environment of one process (README "Environment of an app"), built by
/// `bundle::env`.
pub(super) fn environment(
    config: &Config,
    plugin_env: &BTreeMap<String, String>,
    program: &Program,
    web: Option<(&WebApp, u16)>,
    home: &str,
) -> Vec<(String, String)> {
    crate::bundle::env::environment(config, plugin_env, program, web, home)
}

/// Stops a process group and waits, SIGTERM then SIGKILL after `grace`; says how it ended.
pub(super) fn stop(app: &AppName, label: &str, pid: i32, grace: Duration) {
    let how = process::stop_group(pid, grace);
    log::info!(
        "{app}: stopped pid {pid} ({label}) ({})",
        match how {
            process::Stopped::Terminated => "SIGTERM",
            process::Stopped::Killed => "SIGKILL after stop-timeout",
        }
    );
}
