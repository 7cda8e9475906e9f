//! Control groups: the one owner of where app processes live in the kernel's cgroup trees,
//! what the kernel holds them to (`memory-limit`, `cpu-limit`, `tasks-limit`), what they
//! cost, and the removal of a version with every process in it (README "Supervision",
//! "Limits and accounting").
//!
//! Layout, under keter's own subtree `BASE` (the `cgroup` key, by default the cgroup keter
//! was started in, which systemd delegates to it with `Delegate=yes` in `debian/keter.service`):
//!
//! * `BASE/keter`: keter itself (and the Nginx master it manages), moved there at its start
//!   on cgroup v2 so that `BASE` has no processes of its own and may hand controllers down;
//! * `BASE/apps/NAME-N`: version `N` of app `NAME` (the number of its folder `temp/NAME-N`);
//! * `BASE/apps/NAME-N/P`: process `P` of that version (its index among the version's
//!   processes), with the stanza's limits. A restart of the process starts in the same group.
//!
//! Names follow from the app and the version number alone, so the keter that takes over after
//! an in-place upgrade or a crash finds the groups again without a record of them, and the
//! kernel keeps the limits with each group: in its files, and in the extended attribute
//! `user.keter.limits` of its folder, which outlives the controllers.
//!
//! Under keter's own systemd unit on cgroup v2, `BASE` is the unit's cgroup, into which systemd
//! puts the next keter after a crash: the kernel refuses that while `BASE` hands controllers
//! down. So the unit's `ExecStopPost=` (which systemd runs in `BASE/.control` once keter is
//! gone) hands them back up, bottom-up ([`release`]); the next keter moves to `BASE/keter`,
//! enables them again and writes each group's limits from its attribute again ([`Cgroups::restore`]).
//! keter enables controllers there only when the unit says that it does this
//! (`KETER_CGROUP_HANDBACK`, `debian/keter.service`).
//!
//! Two layouts are used: cgroup v2 (unified, as on Debian 12 under systemd), where all three
//! limits and every figure are the v2 tree's; and the hybrid layout (v1 controllers under
//! `/sys/fs/cgroup/{memory,cpu,pids}` and a cgroup2 without controllers at
//! `/sys/fs/cgroup/unified`), where the v2 tree groups and kills processes and gives their
//! CPU time, and the same paths under the v1 hierarchies carry the limits. A limit that no
//! hierarchy can enforce is an error naming its key (`enforceable`), never ignored.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a stanza (or the global default) asks the kernel to hold its processes to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// `memory-limit`, bytes.
    pub memory: Option<u64>,
    /// `cpu-limit`, thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// `tasks-limit`: processes and threads.
    pub tasks: Option<u64>,
}

impl Limits {
    /// Each limit of `self`, or `default`'s where `self` has none.
    pub fn or(self, default: Limits) -> Limits {
        Limits {
            memory: self.memory.or(default.memory),
            cpu_millis: self.cpu_millis.or(default.cpu_millis),
            tasks: self.tasks.or(default.tasks),
        }
    }

    /// The limits asked for as the attribute [`LIMITS_XATTR`] keeps them: `memory=N cpu=N tasks=N`.
    fn to_attr(self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("memory", self.memory),
            ("cpu", self.cpu_millis),
            ("tasks", self.tasks),
        ] {
            if let Some(n) = v.filter(|n| *n > 0) {
                parts.push(format!("{k}={n}"));
            }
        }
        parts.join(" ")
    }

    /// Reads [`Limits::to_attr`]'s text; `None` when it is not that.
    fn from_attr(text: &str) -> Option<Limits> {
        let mut l = Limits::default();
        for part in text.split_whitespace() {
            let (k, v) = part.split_once('=')?;
            let n = v.parse::<u64>().ok()?;
            match k {
                "memory" => l.memory = Some(n),
                "cpu" => l.cpu_millis = Some(n),
                "tasks" => l.tasks = Some(n),
                _ => return None,
            }
        }
        Some(l)
    }

    /// The kinds limited (a limit of 0 is none: a stanza's way out of a global default).
    fn asked(&self) -> impl Iterator<Item = Kind> {
        let set = |v: Option<u64>| v.is_some_and(|n| n > 0);
        [
            (set(self.memory), Kind::Memory),
            (set(self.cpu_millis), Kind::Cpu),
            (set(self.tasks), Kind::Tasks),
        ]
        .into_iter()
        .filter_map(|(asked, k)| asked.then_some(k))
    }
}

/// A kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Cpu,
    Tasks,
}

impl Kind {
    /// Its key in the configuration.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Memory => "memory-limit",
            Kind::Cpu => "cpu-limit",
            Kind::Tasks => "tasks-limit",
        }
    }

    /// The kernel's name of the controller.
    fn controller(self) -> &'static str {
        match self {
            Kind::Memory => "memory",
            Kind::Cpu => "cpu",
            Kind::Tasks => "pids",
        }
    }

    const ALL: [Kind; 3] = [Kind::Memory, Kind::Cpu, Kind::Tasks];
}

/// Reads `cpu-limit`: a number of cores (`1.5`), or 0 for no limit.
pub fn parse_cpu(v: &serde_json::Value) -> Result<u64, CpuLimitError> {
    let cores = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match cores {
        Some(c) if c == 0.0 || (0.01..=4096.0).contains(&c) => Ok((c * 1000.0).round() as u64),
        _ => Err(CpuLimitError { found: v.clone() }),
    }
}

/// A `cpu-limit` that is not a number of cores keter can hold a process to ([`parse_cpu`]);
/// the caller names the file and the key.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuLimitError {
    /// The value as the configuration gives it.
    pub found: serde_json::Value,
}

impl fmt::Display for CpuLimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected a number of cores such as 1.5 (at least 0.01; 0 for no limit), found {}",
            self.found
        )
    }
}

impl std::error::Error for CpuLimitError {}

/// Where the limits of one kind are written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Enforcer {
    /// The v2 tree's controller.
    V2,
    /// A v1 hierarchy: its `apps` folder.
    V1(PathBuf),
    /// None: why.
    Missing(String),
}

/// keter's cgroups, found once at its start ([`init`]).
#[derive(Debug)]
pub struct Cgroups {
    /// `BASE/apps` in the v2 tree, where versions' groups are made; `None` when keter has no
    /// v2 tree it can write (then `reason` says why).
    v2: Option<PathBuf>,
    memory: Enforcer,
    cpu: Enforcer,
    tasks: Enforcer,
    /// Why there is no v2 tree, for the log.
    reason: String,
}

static CGROUPS: OnceLock<Cgroups> = OnceLock::new();

/// keter's cgroups, once [`init`] found them; `None` in the commands a user runs (`keter
/// check`) and in unit tests.
pub fn get() -> Option<&'static Cgroups> {
    CGROUPS.get()
}

/// Finds (and on cgroup v2 prepares) keter's subtree: `configured` is the `cgroup` key. Must
/// run before keter starts any process of its own (the Nginx master).
pub fn init(configured: Option<&str>) -> &'static Cgroups {
    CGROUPS.get_or_init(|| {
        let handback = std::env::var_os(HANDBACK).is_some_and(|v| v == "1");
        Cgroups::open(Path::new("/sys/fs/cgroup"), configured, handback)
    })
}

/// Set to 1 by a systemd unit whose `ExecStopPost=` runs `keter --release-cgroup`
/// (`debian/keter.service`): then keter may enable controllers below the unit's own cgroup.
pub const HANDBACK: &str = "KETER_CGROUP_HANDBACK";

/// The command line flag of [`release_own`].
pub const RELEASE: &str = "--release-cgroup";

/// The extended attribute of a process group's folder that keeps its limits
/// (`memory=N cpu=N tasks=N`) while its controllers are disabled.
const LIMITS_XATTR: &str = "user.keter.limits";

/// The cgroup paths of this process, from `/proc/self/cgroup`: the v2 one and the v1 ones by
/// controller.
fn own_paths() -> (Option<String>, Vec<(String, String)>) {
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.push((c.to_string(), path.to_string()));
            }
        }
    }
    (v2, v1)
}

/// `/a/b` under `mount`.
fn under(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

fn write(path: &Path, what: &str) -> io::Result<()> {
    open_for_write(path)?.write_all(what.as_bytes())
}

/// Opens a file of a group for writing.
fn open_for_write(path: &Path) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true);
    // The unit tests' fake trees are plain folders: a file the kernel would have made with
    // its group is made by the first write (truncated: the kernel reads each write whole).
    #[cfg(test)]
    options.create(true).truncate(true);
    options.open(path)
}

/// Creates a folder; one that exists is fine.
fn make(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Why keter's subtree in the v2 tree cannot be prepared ([`Cgroups::open`] logs it as the
/// reason processes are not grouped).
#[derive(Debug)]
enum SubtreeError {
    /// A folder of the subtree cannot be made.
    Create { dir: PathBuf, source: io::Error },
    /// keter cannot move itself into its own leaf `leaf` (`BASE/keter`).
    MoveKeter { leaf: PathBuf, source: io::Error },
}

impl fmt::Display for SubtreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubtreeError::Create { dir, source } => {
                write!(f, "cannot create {}: {source}", dir.display())
            }
            SubtreeError::MoveKeter { leaf, source } => {
                write!(f, "cannot move keter into {}: {source}", leaf.display())
            }
        }
    }
}

impl std::error::Error for SubtreeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SubtreeError::Create { source, .. } | SubtreeError::MoveKeter { source, .. } => {
                Some(source)
            }
        }
    }
}

impl Cgroups {
    fn open(mount: &Path, configured: Option<&str>, handback: bool) -> Cgroups {
        let (own, v1_own) = own_paths();
        let unified = mount.join("cgroup.controllers").exists();
        let v2_mount = if unified {
            Some(mount.to_path_buf())
        } else if mount.join("unified/cgroup.controllers").exists() {
            Some(mount.join("unified"))
        } else {
            None
        };
        // keter's subtree: as configured, or where it was started (less the leaf it moves
        // itself to, when an earlier image of this process did).
        let base = match configured {
            Some(c) => c.to_string(),
            None => {
                let own = own.clone().unwrap_or_else(|| "/".into());
                own.strip_suffix("/keter")
                    .map(str::to_string)
                    .unwrap_or(own)
            }
        };
        let mut cg = Cgroups {
            v2: None,
            memory: Enforcer::Missing(String::new()),
            cpu: Enforcer::Missing(String::new()),
            tasks: Enforcer::Missing(String::new()),
            reason: String::new(),
        };
        let mut v2_controllers = Vec::new();
        let mut no_controllers = None;
        match &v2_mount {
            None => cg.reason = format!("no cgroup2 tree is mounted at {}", mount.display()),
            Some(m) => match Self::open_v2(m, &base, own.as_deref(), unified, handback) {
                Ok((apps, controllers, why)) => {
                    cg.v2 = Some(apps);
                    v2_controllers = controllers;
                    no_controllers = why;
                }
                Err(e) => cg.reason = e.to_string(),
            },
        }
        for kind in Kind::ALL {
            let enforcer = if v2_controllers.iter().any(|c| c == kind.controller()) {
                Enforcer::V2
            } else if unified {
                Enforcer::Missing(match &cg.v2 {
                    None => cg.reason.clone(),
                    Some(_) if no_controllers.is_some() => {
                        no_controllers.clone().unwrap_or_default()
                    }
                    Some(apps) => format!(
                        "the {} controller is not available in {} (under systemd the unit needs Delegate=yes)",
                        kind.controller(),
                        apps.parent().unwrap_or(apps).display()
                    ),
                })
            } else {
                Self::open_v1(mount, kind, &base, &v1_own)
            };
            match kind {
                Kind::Memory => cg.memory = enforcer,
                Kind::Cpu => cg.cpu = enforcer,
                Kind::Tasks => cg.tasks = enforcer,
            }
        }
        cg
    }

    /// Prepares `BASE/apps` in the v2 tree at `mount` and hands the controllers it can down
    /// to it: the folder, the controllers enabled there, and why none are when keter must not
    /// enable any.
    fn open_v2(
        mount: &Path,
        base: &str,
        own: Option<&str>,
        unified: bool,
        handback: bool,
    ) -> Result<(PathBuf, Vec<String>, Option<String>), SubtreeError> {
        let dir = under(mount, base);
        fs::create_dir_all(&dir).map_err(|source| SubtreeError::Create {
            dir: dir.clone(),
            source,
        })?;
        let inside = own.is_some_and(|o| o == base || o.strip_suffix("/keter") == Some(base));
        if unified
            && inside
            && !handback
            && (base.ends_with(".service") || base.ends_with(".scope"))
        {
            // systemd places the next keter of the unit (after a crash, while the apps run on)
            // in the unit's own cgroup, which it cannot do once that cgroup hands controllers
            // down (the kernel's rule that such a cgroup holds no process): the unit would
            // fail to start, unless its ExecStopPost= hands them back up first ([`release`]),
            // which the unit says with KETER_CGROUP_HANDBACK=1. Without: processes are
            // grouped, killed and counted; limits need a subtree outside the unit.
            let apps = dir.join("apps");
            make(&apps).map_err(|source| SubtreeError::Create {
                dir: apps.clone(),
                source,
            })?;
            let why = format!(
                "keter runs in the systemd unit's own control group {base}, and controllers enabled below it would keep systemd from starting keter again after a crash while apps run; give the unit `ExecStopPost=-/usr/bin/keter {RELEASE}` and `Environment={HANDBACK}=1` as debian/keter.service does, or set the global `cgroup` key to a subtree outside the unit (README \"Limits and accounting\")"
            );
            return Ok((apps, Vec::new(), Some(why)));
        }
        // keter leaves BASE for its own leaf: a cgroup that hands controllers down holds no
        // processes itself.
        if unified && own == Some(base) {
            let leaf = dir.join("keter");
            make(&leaf)
                .and_then(|()| write(&leaf.join("cgroup.procs"), &std::process::id().to_string()))
                .map_err(|source| SubtreeError::MoveKeter {
                    leaf: leaf.clone(),
                    source,
                })?;
        }
        let apps = dir.join("apps");
        make(&apps).map_err(|source| SubtreeError::Create {
            dir: apps.clone(),
            source,
        })?;
        let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let mut enabled = Vec::new();
        for c in ["memory", "cpu", "pids"] {
            if !available.split_whitespace().any(|a| a == c) {
                continue;
            }
            let on = format!("+{c}");
            if write(&dir.join("cgroup.subtree_control"), &on).is_ok()
                && write(&apps.join("cgroup.subtree_control"), &on).is_ok()
            {
                enabled.push(c.to_string());
            } else {
                log::warn!(
                    "keter: cannot enable the {c} controller for apps in {}",
                    dir.display()
                );
            }
        }
        Ok((apps, enabled, None))
    }

    /// The v1 hierarchy of `kind` at `mount/CONTROLLER`, with `BASE/apps` made in it.
    fn open_v1(mount: &Path, kind: Kind, base: &str, own: &[(String, String)]) -> Enforcer {
        let c = kind.controller();
        let hierarchy = mount.join(c);
        if !own.iter().any(|(o, _)| o == c) || !hierarchy.join("cgroup.procs").exists() {
            return Enforcer::Missing(format!(
                "this host has no {c} controller keter can use (neither in a cgroup2 tree nor mounted at {})",
                hierarchy.display()
            ));
        }
        let apps = under(&hierarchy, base).join("apps");
        match fs::create_dir_all(&apps) {
            Ok(()) => Enforcer::V1(apps),
            // What systemd-nspawn gives a container on a host with this layout: every v1
            // controller hierarchy mounted read-only (README "Limits and accounting").
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => Enforcer::Missing(format!(
                "the {c} hierarchy {} is mounted read-only (a container given no {c} controller of its own)",
                hierarchy.display()
            )),
            Err(e) => Enforcer::Missing(format!("cannot create {}: {e}", apps.display())),
        }
    }

    fn enforcer(&self, kind: Kind) -> &Enforcer {
        match kind {
            Kind::Memory => &self.memory,
            Kind::Cpu => &self.cpu,
            Kind::Tasks => &self.tasks,
        }
    }

    /// For the log at start: what groups processes and what enforces each limit.
    pub fn describe(&self) -> String {
        let groups = match &self.v2 {
            Some(apps) => format!("app processes are grouped in {}", apps.display()),
            None => format!("app processes are not grouped ({})", self.reason),
        };
        let kinds: Vec<String> = Kind::ALL
            .iter()
            .map(|k| match self.enforcer(*k) {
                Enforcer::V2 => format!("{} by cgroup v2", k.key()),
                Enforcer::V1(_) => format!("{} by cgroup v1", k.key()),
                Enforcer::Missing(_) => format!("no {}", k.key()),
            })
            .collect();
        format!("{groups}; {}", kinds.join(", "))
    }

    /// Why `limits` cannot be enforced here, by key: empty when all can.
    pub fn unenforceable(&self, limits: &Limits) -> Vec<(&'static str, String)> {
        limits
            .asked()
            .filter_map(|k| match self.enforcer(k) {
                Enforcer::Missing(why) => Some((k.key(), format!("cannot be enforced: {why}"))),
                _ => None,
            })
            .collect()
    }

    /// The folders of group `rel` (`NAME-N` or `NAME-N/P`) in every tree keter uses: the v2
    /// one first.
    fn dirs(&self, rel: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.v2.iter().map(|a| a.join(rel)).collect();
        for k in Kind::ALL {
            if let Enforcer::V1(apps) = self.enforcer(k) {
                let d = apps.join(rel);
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// The folder of `rel` where the files of `kind` are.
    fn dir_of(&self, kind: Kind, rel: &str) -> Option<PathBuf> {
        match self.enforcer(kind) {
            Enforcer::V2 => self.v2.as_ref().map(|a| a.join(rel)),
            Enforcer::V1(apps) => Some(apps.join(rel)),
            Enforcer::Missing(_) => None,
        }
    }

    /// Makes the group of process `proc` of version `version` of `app` (and the version's),
    /// with `limits` when the group is new (a restart keeps what the kernel has), and opens
    /// what puts a process into it ([`Join`]).
    pub fn prepare(&self, rel: &str, limits: &Limits) -> io::Result<Join> {
        let mut fds = Vec::new();
        for dir in self.dirs(rel) {
            let version_dir = dir.parent().unwrap_or(&dir);
            make(version_dir)?;
            if self.v2.as_ref().is_some_and(|a| dir.starts_with(a)) {
                self.hand_down(version_dir)?;
            }
            let new = match fs::create_dir(&dir) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(annotate(e, &dir, "")),
            };
            if new {
                self.write_limits(&dir, limits)?;
            }
            let procs = dir.join("cgroup.procs");
            let f = open_for_write(&procs).map_err(|e| annotate(e, &dir, "cgroup.procs"))?;
            fds.push(OwnedFd::from(f));
        }
        Ok(Join { fds })
    }

    /// Enables the v2 controllers keter uses for the groups below `version_dir` (a version's
    /// processes).
    fn hand_down(&self, version_dir: &Path) -> io::Result<()> {
        let on: Vec<String> = Kind::ALL
            .iter()
            .filter(|k| *self.enforcer(**k) == Enforcer::V2)
            .map(|k| format!("+{}", k.controller()))
            .collect();
        if on.is_empty() {
            return Ok(());
        }
        write(&version_dir.join("cgroup.subtree_control"), &on.join(" "))
            .map_err(|e| annotate(e, version_dir, "cgroup.subtree_control"))
    }

    /// Writes the limits of every process group under `BASE/apps` (the versions taken over)
    /// again, from the attribute [`LIMITS_XATTR`] of its folder, after enabling its version's
    /// controllers again: after a crash under keter's systemd unit, `keter --release-cgroup`
    /// disabled them and the kernel dropped the limits with them. Returns how many groups got
    /// their limits back; a group that cannot is logged, and its processes run on.
    pub fn restore(&self) -> usize {
        let Some(apps) = &self.v2 else {
            return 0;
        };
        let mut restored = 0;
        for version in subdirs(apps) {
            for proc in subdirs(&version) {
                let Some(limits) = get_xattr(&proc, LIMITS_XATTR)
                    .as_deref()
                    .and_then(Limits::from_attr)
                else {
                    continue;
                };
                let rel = match (version.file_name(), proc.file_name()) {
                    (Some(v), Some(p)) => {
                        format!("{}/{}", v.to_string_lossy(), p.to_string_lossy())
                    }
                    _ => continue,
                };
                let done = self.hand_down(&version).and_then(|()| {
                    self.dirs(&rel)
                        .iter()
                        .try_for_each(|d| self.write_limits(d, &limits))
                });
                match done {
                    Ok(()) => restored += 1,
                    Err(e) => log::warn!(
                        "keter: cannot write the limits of group {rel} again ({e}); its processes run without them"
                    ),
                }
            }
        }
        restored
    }

    /// Writes the limits whose files are in `dir`; in the v2 tree, keeps them in the folder's
    /// attribute too, for [`Cgroups::restore`].
    fn write_limits(&self, dir: &Path, limits: &Limits) -> io::Result<()> {
        if self.v2.as_ref().is_some_and(|a| dir.starts_with(a))
            && limits.asked().next().is_some()
            && let Err(e) = set_xattr(dir, LIMITS_XATTR, &limits.to_attr())
        {
            log::warn!(
                "keter: cannot keep the limits of {} in its attribute {LIMITS_XATTR} ({e}): a keter started again after a crash under its systemd unit could not write them again",
                dir.display()
            );
        }
        for kind in limits.asked() {
            let v2 = match self.enforcer(kind) {
                Enforcer::V2 if self.v2.as_ref().is_some_and(|a| dir.starts_with(a)) => true,
                Enforcer::V1(apps) if dir.starts_with(apps) => false,
                Enforcer::Missing(why) => {
                    return Err(io::Error::other(format!(
                        "{} cannot be enforced: {why}",
                        kind.key()
                    )));
                }
                _ => continue,
            };
            let files: Vec<(&str, String)> = match (kind, v2) {
                (Kind::Memory, true) => vec![
                    ("memory.max", limits.memory.unwrap_or(0).to_string()),
                    // Without this, memory over the limit would go to swap instead of the
                    // group's OOM killer (best effort: a kernel without swap accounting).
                    ("memory.swap.max", "0".into()),
                ],
                (Kind::Memory, false) => vec![(
                    "memory.limit_in_bytes",
                    limits.memory.unwrap_or(0).to_string(),
                )],
                (Kind::Cpu, true) => vec![(
                    "cpu.max",
                    format!("{} 100000", limits.cpu_millis.unwrap_or(0) * 100),
                )],
                (Kind::Cpu, false) => vec![
                    ("cpu.cfs_period_us", "100000".into()),
                    (
                        "cpu.cfs_quota_us",
                        (limits.cpu_millis.unwrap_or(0) * 100).to_string(),
                    ),
                ],
                (Kind::Tasks, _) => vec![("pids.max", limits.tasks.unwrap_or(0).to_string())],
            };
            for (file, value) in files {
                let path = dir.join(file);
                match write(&path, &value) {
                    Err(_) if file == "memory.swap.max" => {}
                    Err(e) => return Err(annotate(e, dir, file)),
                    Ok(()) => {}
                }
            }
        }
        Ok(())
    }

    /// What group `rel` costs and is held to, as the kernel counts it now.
    pub fn usage(&self, rel: &str) -> Usage {
        let mut u = Usage::default();
        if let Some(dir) = self.v2.as_ref().map(|a| a.join(rel)) {
            u.cpu_usec = field(&dir.join("cpu.stat"), "usage_usec");
        }
        match (self.dir_of(Kind::Memory, rel), &self.memory) {
            (Some(d), Enforcer::V2) => {
                u.memory_bytes = number(&d.join("memory.current"));
                u.memory_peak_bytes = number(&d.join("memory.peak"));
                u.memory_limit_bytes = number(&d.join("memory.max"));
                u.oom_kills = field(&d.join("memory.events"), "oom_kill");
            }
            (Some(d), _) => {
                u.memory_bytes = number(&d.join("memory.usage_in_bytes"));
                u.memory_peak_bytes = number(&d.join("memory.max_usage_in_bytes"));
                // v1 says "no limit" with the largest page-aligned number.
                u.memory_limit_bytes =
                    number(&d.join("memory.limit_in_bytes")).filter(|n| *n < 1 << 62);
                u.oom_kills = field(&d.join("memory.oom_control"), "oom_kill");
            }
            // Without a memory controller: what its processes have resident now.
            (None, _) => {
                u.memory_bytes = self.v2.as_ref().map(|a| {
                    members(&a.join(rel))
                        .into_iter()
                        .filter_map(resident_bytes)
                        .sum()
                })
            }
        }
        if let Some(d) = self.dir_of(Kind::Cpu, rel) {
            u.cpu_limit_millis = match &self.cpu {
                Enforcer::V2 => fs::read_to_string(d.join("cpu.max")).ok().and_then(|s| {
                    let mut it = s.split_whitespace();
                    let quota = it.next()?.parse::<u64>().ok()?;
                    let period = it.next()?.parse::<u64>().ok()?;
                    Some(quota * 1000 / period.max(1))
                }),
                _ => {
                    let quota = fs::read_to_string(d.join("cpu.cfs_quota_us"))
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                        .filter(|q| *q > 0);
                    let period = number(&d.join("cpu.cfs_period_us"));
                    quota.zip(period).map(|(q, p)| q as u64 * 1000 / p.max(1))
                }
            };
        }
        match self.dir_of(Kind::Tasks, rel) {
            Some(d) => {
                u.tasks = number(&d.join("pids.current"));
                u.tasks_limit = number(&d.join("pids.max"));
            }
            None => {
                u.tasks = self.v2.as_ref().and_then(|a| {
                    fs::read_to_string(a.join(rel).join("cgroup.threads"))
                        .ok()
                        .map(|s| s.lines().count() as u64)
                })
            }
        }
        u
    }

    /// Kills every process of version group `version` (`NAME-N`), waits for them to be gone
    /// and removes its groups from every tree. Processes that left their process group
    /// (`setsid()`) cannot leave their cgroup: this reaches them too.
    pub fn remove(&self, version: &str) {
        let dirs = self.dirs(version);
        if !dirs.iter().any(|d| d.exists()) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids: Vec<i32> = dirs.iter().flat_map(|d| members(d)).collect();
            if pids.is_empty() {
                break;
            }
            let killed = self
                .v2
                .as_ref()
                .map(|a| a.join(version).join("cgroup.kill"))
                .filter(|k| k.exists())
                .is_some_and(|k| write(&k, "1").is_ok());
            if !killed {
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            if Instant::now() >= deadline {
                log::warn!("keter: processes of group {version} outlived SIGKILL for 5 s");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for dir in dirs {
            remove_tree(&dir);
        }
    }

    /// Removes the version groups left by an earlier keter that no version taken over owns
    /// (`keep`: their names, `NAME-N`), with their processes.
    pub fn sweep(&self, keep: &std::collections::BTreeSet<String>) {
        let mut names = std::collections::BTreeSet::new();
        let apps: Vec<PathBuf> = self
            .v2
            .iter()
            .cloned()
            .chain(Kind::ALL.iter().filter_map(|k| match self.enforcer(*k) {
                Enforcer::V1(a) => Some(a.clone()),
                _ => None,
            }))
            .collect();
        for a in apps {
            for e in fs::read_dir(&a).into_iter().flatten().flatten() {
                if e.path().is_dir()
                    && let Some(n) = e.file_name().to_str()
                    && !keep.contains(n)
                {
                    names.insert(n.to_string());
                }
            }
        }
        for n in names {
            log::info!("keter: removing the group {n} left by an earlier run, with its processes");
            self.remove(&n);
        }
    }
}

/// What [`release`] writes, in order: for `unit` and every group below it, children before
/// their parent, `-C` for each controller `C` that its `cgroup.subtree_control` enables (the
/// kernel refuses to disable a controller in a group while a group below it enables it).
fn release_plan(unit: &Path) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for sub in subdirs(dir) {
            walk(&sub, out);
        }
        let file = dir.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&file).unwrap_or_default();
        let off: Vec<String> = enabled
            .split_whitespace()
            .map(|c| format!("-{c}"))
            .collect();
        if !off.is_empty() {
            out.push((file, off.join(" ")));
        }
    }
    let mut out = Vec::new();
    walk(unit, &mut out);
    out
}

/// Hands every controller enabled in `unit` (a systemd unit's cgroup) and below it back up,
/// so that the unit's cgroup may take a process again: what systemd needs to start the next
/// keter there after a crash, while the apps run on in their groups (without their limits
/// until that keter writes them again: [`Cgroups::restore`]). Returns how many groups had
/// controllers enabled.
pub fn release(unit: &Path) -> io::Result<usize> {
    let plan = release_plan(unit);
    for (file, off) in &plan {
        write(file, off)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", file.display())))?;
    }
    Ok(plan.len())
}

/// `keter --release-cgroup`, the `ExecStopPost=` of `debian/keter.service`, which systemd runs
/// in the unit's `.control` group once keter has stopped or died: [`release`] for the unit's
/// cgroup. Only a cgroup that ends in `.service` is touched. Returns what to log.
pub fn release_own() -> Result<String, ReleaseError> {
    let (own, _) = own_paths();
    let Some(own) = own else {
        return Ok("no cgroup2 tree here: no controller to hand back".into());
    };
    let unit = own.strip_suffix("/.control").unwrap_or(&own);
    if !unit.ends_with(".service") {
        return Err(ReleaseError::NotAService {
            cgroup: unit.to_string(),
        });
    }
    let root = Path::new("/sys/fs/cgroup");
    let mount = if root.join("cgroup.controllers").exists() {
        root.to_path_buf()
    } else {
        root.join("unified")
    };
    let dir = under(&mount, unit);
    match release(&dir) {
        Ok(0) => Ok(format!("no controller is enabled below {}", dir.display())),
        Ok(n) => Ok(format!(
            "handed the controllers of {n} groups below {} back up, for the next keter (the apps run without their limits until it writes them again)",
            dir.display()
        )),
        Err(source) => Err(ReleaseError::HandBack(source)),
    }
}

/// Why [`release_own`] handed nothing back.
#[derive(Debug)]
pub enum ReleaseError {
    /// keter does not run in a systemd service's cgroup (`cgroup` is the one it runs in).
    NotAService { cgroup: String },
    /// A group's controllers could not be handed back up (the error names its file).
    HandBack(io::Error),
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReleaseError::NotAService { cgroup } => write!(
                f,
                "{cgroup} is not a systemd service's cgroup: {RELEASE} runs as the ExecStopPost= of keter's unit"
            ),
            ReleaseError::HandBack(e) => write!(f, "cannot hand the controllers back up: {e}"),
        }
    }
}

impl std::error::Error for ReleaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReleaseError::NotAService { .. } => None,
            ReleaseError::HandBack(e) => Some(e),
        }
    }
}

/// The groups (folders) directly below `dir`, by name.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Sets the extended attribute `name` of `path` to `value`.
fn set_xattr(path: &Path, name: &str, value: &str) -> io::Result<()> {
    let p = c_path(path)?;
    let n = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: the pointers are valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The extended attribute `name` of `path`, if it has it.
fn get_xattr(path: &Path, name: &str) -> Option<String> {
    let p = c_path(path).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: the pointers are valid NUL-terminated strings and a buffer of the given length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    String::from_utf8(buf).ok()
}

/// An io error that names the file.
fn annotate(e: io::Error, dir: &Path, file: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display()))
}

/// The pids in group `dir` and the groups below it.
fn members(dir: &Path) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(members(&e.path()));
        }
    }
    out
}

/// The resident memory of `pid` (`/proc/PID/statm`), bytes.
fn resident_bytes(pid: i32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page)
}

/// Removes an empty group and the groups below it (rmdir: a cgroup's files go with it).
fn remove_tree(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            remove_tree(&e.path());
        }
    }
    // A group whose last process has just exited may still be busy for a moment.
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                log::warn!("keter: cannot remove {}: {e}", dir.display());
                return;
            }
            _ => return,
        }
    }
}

/// A number alone in a file (`max` is none).
fn number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`usage_usec 123`).
fn field(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The group of process `proc` of version `version` of `app`, relative to `BASE/apps`.
pub fn process_group(app: &str, version: u64, proc: usize) -> String {
    format!("{app}-{version}/{proc}")
}

/// The group of version `version` of `app`, relative to `BASE/apps` (the same name as its
/// folder `temp/NAME-N`).
pub fn version_group(app: &str, version: u64) -> String {
    format!("{app}-{version}")
}

/// What puts a starting process into its groups: a `cgroup.procs` of each tree, opened
/// before the fork; the child writes `0` (itself) into each before it executes the program,
/// so that nothing it starts is ever outside them.
#[derive(Debug, Default)]
pub struct Join {
    fds: Vec<OwnedFd>,
}

impl Join {
    /// The descriptors, for the child (`crate::process::spawn`).
    pub fn raw(&self) -> Vec<i32> {
        self.fds.iter().map(|f| f.as_raw_fd()).collect()
    }
}

/// Reads the three limit keys of a process stanza or of the global configuration.
pub fn read_limits(f: &mut crate::yaml::Fields, problems: &mut crate::problem::Problems) -> Limits {
    let memory = f.size("memory-limit", problems);
    if let Some(m) = memory
        && m > 0
        && m < 1 << 20
    {
        problems.error(
            f.path("memory-limit"),
            format!(
                "{m} bytes is too little for any program; give at least 1m (or 0 for no limit)"
            ),
        );
    }
    let cpu_millis = f.raw("cpu-limit").and_then(|v| {
        parse_cpu(v)
            .map_err(|e| problems.error(f.path("cpu-limit"), e))
            .ok()
    });
    let tasks = f.uint("tasks-limit", 4_194_304, problems);
    Limits {
        memory,
        cpu_millis,
        tasks,
    }
}

/// What a group costs and is held to; `None` for what this host cannot tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// CPU time used, microseconds.
    #[serde(rename = "cpu_seconds", serialize_with = "micros_as_seconds")]
    pub cpu_usec: Option<u64>,
    /// `cpu-limit` as the kernel has it, thousandths of a core.
    #[serde(rename = "cpu_limit_cores", serialize_with = "millis_as_units")]
    pub cpu_limit_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub tasks: Option<u64>,
    pub tasks_limit: Option<u64>,
    /// Processes the kernel's OOM killer killed in the group.
    pub oom_kills: Option<u64>,
}

fn micros_as_seconds<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    v.map(|n| n as f64 / 1e6).serialize(s)
}

fn millis_as_units<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    v.map(|n| n as f64 / 1e3).serialize(s)
}

impl Usage {
    /// The sum of several groups' (an app's processes): limits are not summed.
    pub fn add(&mut self, o: &Usage) {
        fn sum(a: &mut Option<u64>, b: Option<u64>) {
            *a = match (*a, b) {
                (Some(x), Some(y)) => Some(x + y),
                (x, y) => x.or(y),
            };
        }
        sum(&mut self.cpu_usec, o.cpu_usec);
        sum(&mut self.memory_bytes, o.memory_bytes);
        sum(&mut self.memory_peak_bytes, o.memory_peak_bytes);
        sum(&mut self.tasks, o.tasks);
        sum(&mut self.oom_kills, o.oom_kills);
    }
}

/// A size for people: `512 MiB`, `1.5 GiB`, `900 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 || v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{:.1} {}", v, UNITS[unit]).replace(".0 ", " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(512 << 20), "512 MiB");
        assert_eq!(human_bytes(1536 << 20), "1.5 GiB");
        assert_eq!(human_bytes(100), "100 B");
    }

    #[test]
    fn cpu_limits_in_cores() {
        assert_eq!(parse_cpu(&serde_json::json!(1.5)), Ok(1500));
        assert_eq!(parse_cpu(&serde_json::json!("0.25")), Ok(250));
        assert_eq!(parse_cpu(&serde_json::json!(0)), Ok(0));
        assert!(parse_cpu(&serde_json::json!(0.001)).is_err());
        assert!(
            parse_cpu(&serde_json::json!("lots"))
                .unwrap_err()
                .to_string()
                .contains("\"lots\"")
        );
    }

    #[test]
    fn limits_fall_back_to_the_defaults_one_by_one() {
        let stanza = Limits {
            memory: Some(1),
            ..Limits::default()
        };
        let global = Limits {
            memory: Some(2),
            tasks: Some(3),
            cpu_millis: None,
        };
        assert_eq!(
            stanza.or(global),
            Limits {
                memory: Some(1),
                tasks: Some(3),
                cpu_millis: None
            }
        );
    }

    #[test]
    fn a_host_without_controllers_refuses_limits_by_key() {
        // A folder with no cgroup tree in it: neither v2 nor any v1 controller.
        let mount = std::env::temp_dir().join(format!("keter-no-cgroups-{}", std::process::id()));
        fs::create_dir_all(&mount).unwrap();
        let cg = Cgroups::open(&mount, Some("/keter"), false);
        let asked = Limits {
            memory: Some(64 << 20),
            cpu_millis: Some(0),
            tasks: Some(10),
        };
        let refused = cg.unenforceable(&asked);
        let keys: Vec<&str> = refused.iter().map(|(k, _)| *k).collect();
        // cpu-limit: 0 asks for nothing.
        assert_eq!(keys, ["memory-limit", "tasks-limit"]);
        assert!(
            refused[0].1.starts_with("cannot be enforced: ") && refused[0].1.contains("memory"),
            "{refused:?}"
        );
        assert!(cg.unenforceable(&Limits::default()).is_empty());
        assert!(cg.describe().contains("not grouped"), "{}", cg.describe());
        let _ = fs::remove_dir_all(&mount);
    }

    #[test]
    fn in_its_own_systemd_unit_keter_groups_but_enables_no_controller() {
        let mount = std::env::temp_dir().join(format!("keter-unified-{}", std::process::id()));
        let base = "/system.slice/keter.service";
        fs::create_dir_all(under(&mount, base)).unwrap();
        fs::write(
            under(&mount, base).join("cgroup.controllers"),
            "cpu memory pids",
        )
        .unwrap();
        let (apps, enabled, why) = Cgroups::open_v2(&mount, base, Some(base), true, false).unwrap();
        assert_eq!(apps, under(&mount, base).join("apps"));
        assert!(apps.is_dir());
        assert!(enabled.is_empty());
        assert!(why.unwrap().contains("set the global `cgroup` key"));
        // keter stays in the unit's cgroup, where systemd put it.
        assert!(!under(&mount, base).join("keter").exists());
        let _ = fs::remove_dir_all(&mount);
    }

    /// A folder of the temporary directory, made afresh, for a fake cgroup tree.
    fn fake_tree(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keter-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn put(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn in_its_own_systemd_unit_with_the_handback_keter_moves_to_its_leaf_and_enables_controllers() {
        let mount = fake_tree("unit-handback");
        let base = "/system.slice/keter.service";
        let dir = under(&mount, base);
        put(&dir.join("cgroup.controllers"), "cpu io memory pids");
        let (apps, enabled, why) = Cgroups::open_v2(&mount, base, Some(base), true, true).unwrap();
        assert_eq!(apps, dir.join("apps"));
        assert_eq!(enabled, ["memory", "cpu", "pids"]);
        assert!(why.is_none());
        // keter left the unit's cgroup for BASE/keter, so that BASE may hand controllers down.
        assert_eq!(
            fs::read_to_string(dir.join("keter/cgroup.procs")).unwrap(),
            std::process::id().to_string()
        );
        let _ = fs::remove_dir_all(&mount);
    }

    #[test]
    fn the_release_disables_controllers_below_before_above() {
        let unit = fake_tree("release-order");
        // What the kernel shows in each group's cgroup.subtree_control while apps run.
        put(&unit.join("cgroup.subtree_control"), "cpu memory pids");
        put(&unit.join("keter/cgroup.subtree_control"), "");
        put(&unit.join(".control/cgroup.subtree_control"), "");
        put(&unit.join("apps/cgroup.subtree_control"), "cpu memory pids");
        put(
            &unit.join("apps/a-1/cgroup.subtree_control"),
            "cpu memory pids",
        );
        put(&unit.join("apps/a-1/0/cgroup.subtree_control"), "");
        put(&unit.join("apps/b-2/cgroup.subtree_control"), "memory");
        put(&unit.join("apps/b-2/0/cgroup.subtree_control"), "");
        let plan = release_plan(&unit);
        let order: Vec<String> = plan
            .iter()
            .map(|(f, w)| {
                let group = f.parent().unwrap().strip_prefix(&unit).unwrap();
                format!("{}: {w}", group.display())
            })
            .collect();
        assert_eq!(
            order,
            [
                "apps/a-1: -cpu -memory -pids",
                "apps/b-2: -memory",
                "apps: -cpu -memory -pids",
                ": -cpu -memory -pids",
            ]
        );
        assert_eq!(release(&unit).unwrap(), 4);
        assert_eq!(
            fs::read_to_string(unit.join("cgroup.subtree_control")).unwrap(),
            "-cpu -memory -pids"
        );
        assert_eq!(
            fs::read_to_string(unit.join("apps/b-2/0/cgroup.subtree_control")).unwrap(),
            ""
        );
        let _ = fs::remove_dir_all(&unit);
    }

    #[test]
    fn limits_dropped_by_the_release_are_written_again_from_the_groups_attribute() {
        let root = fake_tree("restore");
        let apps = root.join("apps");
        fs::create_dir_all(&apps).unwrap();
        let cg = Cgroups {
            v2: Some(apps.clone()),
            memory: Enforcer::V2,
            cpu: Enforcer::V2,
            tasks: Enforcer::V2,
            reason: String::new(),
        };
        let limits = Limits {
            memory: Some(64 << 20),
            cpu_millis: Some(500),
            tasks: Some(32),
        };
        cg.prepare("web-3/0", &limits).unwrap();
        cg.prepare("web-3/1", &Limits::default()).unwrap();
        let proc0 = apps.join("web-3/0");
        assert_eq!(
            get_xattr(&proc0, LIMITS_XATTR).as_deref(),
            Some("memory=67108864 cpu=500 tasks=32")
        );
        assert_eq!(get_xattr(&apps.join("web-3/1"), LIMITS_XATTR), None);
        // The release: controllers disabled bottom-up, the kernel drops the limits' files.
        put(
            &apps.join("web-3/cgroup.subtree_control"),
            "cpu memory pids",
        );
        release(&root).unwrap();
        for f in ["memory.max", "memory.swap.max", "cpu.max", "pids.max"] {
            fs::remove_file(proc0.join(f)).unwrap();
        }
        assert_eq!(cg.restore(), 1);
        // The version's controllers first, then the process's limits.
        assert_eq!(
            fs::read_to_string(apps.join("web-3/cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        let read = |f: &str| fs::read_to_string(proc0.join(f)).unwrap();
        assert_eq!(read("memory.max"), "67108864");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "32");
        assert!(!apps.join("web-3/1/memory.max").exists());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn limits_attribute_round_trip() {
        let l = Limits {
            memory: Some(1 << 20),
            cpu_millis: None,
            tasks: Some(0),
        };
        assert_eq!(l.to_attr(), "memory=1048576");
        assert_eq!(
            Limits::from_attr("memory=1048576"),
            Some(Limits {
                memory: Some(1 << 20),
                ..Limits::default()
            })
        );
        assert_eq!(Limits::from_attr("swap=1"), None);
    }

    #[test]
    fn flat_keyed_files() {
        let p = std::env::temp_dir().join(format!("keter-memory.events-{}", std::process::id()));
        fs::write(&p, "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(field(&p, "oom_kill"), Some(1));
        assert_eq!(field(&p, "oom"), Some(1));
        assert_eq!(field(&p, "nothing"), None);
        let _ = fs::remove_file(&p);
    }
}
