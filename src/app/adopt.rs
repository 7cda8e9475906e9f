//! Taking over the apps that an earlier keter ran, from their records (`record.rs`): after an
//! in-place upgrade (the same process, a new binary) and after a keter that was killed is
//! started again. Every recorded process is checked before it is trusted: its pid must still
//! name the process with the recorded start time (a pid reused by another program is never
//! signalled), and its output pipe is opened again (passed on by the earlier image, or from
//! `/proc/PID/fd`). Nothing is restarted that still runs (README, "A keter that dies and comes
//! back").
//!
//! What cannot be taken over as it is:
//! * a process that ended while no keter watched it is started again by its restart policy;
//! * a serving version whose folder is gone, or that Nginx does not route to, keeps serving
//!   and is replaced by a fresh deploy of its bundle, switched before the old one stops;
//! * a candidate that Nginx does not route to yet is left out, and the journal stops its
//!   processes (the deploy starts again from `incoming/`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Shared;
use super::machine::{Failure, Life, Machine, Retiring, Why};
use super::record::{AppRecord, ProcRecordState, Standing, VersionRecord};
use super::version::{Proc, ProcState, Version};
use crate::journal::Journal;
use crate::names::{AppName, Hostname};
use crate::process::Running;
use crate::{childwatch, procfs};

/// An output pipe and the start of a line read from it and not logged yet.
pub type Pipe = (File, Vec<u8>);

/// Output pipes that an earlier image of this process passed on, by inode.
pub type Inherited = HashMap<u64, Pipe>;

/// A process of an earlier keter's that this one watches from now on.
pub(super) struct Watch {
    pub version: u64,
    pub proc: usize,
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// Its output pipe, when it was found.
    pub output: Option<Pipe>,
}

/// One app taken over: its worker's state, and the processes to watch.
pub struct Adopted {
    pub name: AppName,
    pub(super) machine: Machine,
    pub(super) watches: Vec<Watch>,
    /// Pipes of processes that ended while no keter ran, kept by systemd: what is left in
    /// them goes to the app's log.
    pub(super) drains: Vec<Pipe>,
}

/// Everything taken over from the records.
#[derive(Default)]
pub struct Recovery {
    pub apps: Vec<Adopted>,
    /// Process groups taken over: the journal keeps them and stops every other one it lists.
    pub groups: BTreeSet<i32>,
    /// Folders of the versions taken over, which `temp/` keeps.
    pub dirs: BTreeSet<PathBuf>,
    /// Apps whose Nginx file stays as it is.
    pub sites: BTreeSet<AppName>,
    ports: Vec<u16>,
    hosts: Vec<(Hostname, AppName)>,
    next_id: u64,
}

impl Recovery {
    /// Processes taken over, running.
    pub fn processes(&self) -> usize {
        self.apps.iter().map(|a| a.watches.len()).sum()
    }

    /// Makes the ports, hosts and version numbers of what was taken over the shared owners'.
    pub fn claim(&self, shared: &Shared) {
        for p in &self.ports {
            shared.ports.claim(*p);
        }
        let mut hosts = shared.hosts.lock().unwrap_or_else(|e| e.into_inner());
        for (h, app) in &self.hosts {
            hosts.insert(h.clone(), app.clone());
        }
        shared
            .next_version
            .fetch_max(self.next_id, Ordering::Relaxed);
    }
}

/// Reads every app's record and takes over what still runs. `live` is the sha256 of the
/// bundle that each app's Nginx file serves (from its header), `routes` the ports it sends
/// requests to.
pub fn recover(
    journal: &Journal,
    live: &BTreeMap<AppName, String>,
    routes: &BTreeMap<AppName, BTreeSet<u16>>,
    inherited: &mut Inherited,
) -> Recovery {
    let mut out = Recovery::default();
    for (name, record) in journal.records::<serde_json::Value>() {
        let record = record
            .map_err(Box::<dyn std::error::Error>::from)
            .and_then(|v| {
                crate::formats::records::read(v).map_err(Box::<dyn std::error::Error>::from)
            });
        match record {
            Ok(r) => {
                let nginx = Routed {
                    sha256: live.get(&name),
                    ports: routes.get(&name),
                };
                let adopted = adopt_app(&name, r, nginx, inherited, &mut out);
                out.apps.push(adopted);
            }
            Err(e) => log::warn!(
                "{name}: its record cannot be read ({e}); its processes are stopped and it is deployed again"
            ),
        }
    }
    out
}

/// What an app's Nginx file routes to: the sha256 of the bundle it serves and the ports it
/// sends requests to.
struct Routed<'a> {
    sha256: Option<&'a String>,
    ports: Option<&'a BTreeSet<u16>>,
}

fn adopt_app(
    name: &AppName,
    record: AppRecord,
    nginx: Routed,
    inherited: &mut Inherited,
    out: &mut Recovery,
) -> Adopted {
    let live = nginx.sha256;
    let now = Instant::now();
    let mut serving = None;
    let mut candidate = None;
    let mut retiring = Vec::new();
    for v in record.versions {
        match v.standing {
            Standing::Serving => serving = Some(v),
            Standing::Candidate => candidate = Some(v),
            Standing::Retiring => retiring.push(v),
        }
    }
    // A keter killed between Nginx taking a candidate and its worker writing that down: Nginx
    // is what counts.
    if let Some(c) = candidate.take() {
        if live == Some(&c.sha256) && serving.as_ref().is_none_or(|s| Some(&s.sha256) != live) {
            log::info!(
                "{name}: Nginx already routes to deploy {}; it serves",
                c.deploy
            );
            retiring.extend(serving.take());
            serving = Some(c);
        } else {
            log::info!(
                "{name}: the deploy that was under way (deploy {}) is stopped; it starts again from incoming/",
                c.deploy
            );
        }
    }
    let mut watches = Vec::new();
    let mut drains = Vec::new();
    let mut replace = false;
    let serving = serving.and_then(|v| {
        let routed = live == Some(&v.sha256);
        let folder = v.dir.is_dir();
        let version = version(name, v, true, inherited, &mut watches, &mut drains, now)?;
        if !routed || !folder {
            log::warn!(
                "{name}: the serving version {}; it keeps serving until a fresh deploy of its bundle has switched",
                if folder {
                    "is not the one its Nginx file routes to"
                } else {
                    "has lost its folder"
                }
            );
            replace = true;
        }
        Some(version)
    });
    let retiring: Vec<Retiring> = retiring
        .into_iter()
        .filter_map(|v| version(name, v, false, inherited, &mut watches, &mut drains, now))
        .map(|version| Retiring {
            version: Box::new(version),
            since: now,
        })
        .collect();
    for v in serving.iter().chain(retiring.iter().map(|r| &*r.version)) {
        out.dirs.insert(v.dir.clone());
        out.ports.extend(v.ports());
        out.next_id = out.next_id.max(v.id + 1);
        out.hosts
            .extend(v.config.hosts().map(|h| (h.clone(), name.clone())));
    }
    if serving.is_some() || !retiring.is_empty() {
        out.sites.insert(name.clone());
    }
    out.groups.extend(watches.iter().map(|w| w.pid));
    let failed = record.failed.map(|f| Failure {
        path: f.path,
        stamp: f.stamp.map(Into::into),
        retry_at: f.retry_at.map(|m| m.instant()),
        backoff: f.backoff.into(),
    });
    let mut machine = Machine::new(name.clone());
    machine.life = match serving {
        Some(v) => Life::Serving(Box::new(v)),
        None if failed.is_some() => Life::Idle(Why::Failed),
        None => Life::Idle(Why::New),
    };
    machine.retiring = retiring;
    machine.deploys = record.deploys;
    machine.failed = failed;
    machine.last_deploy = record.last_deploy.map(|d| d.report());
    machine.last_error = record.last_error;
    machine.replace = replace;
    // Its `ssl: acme` stanzas ask the ACME thread of this keter again (which returns the stored
    // certificates at once), and the site is rendered with what they have now.
    machine.refresh_due = machine
        .serving()
        .is_some_and(|v| !v.config.acme_sets().is_empty());
    // Any other site is rendered again too, as this keter writes it: the earlier keter may
    // have written it otherwise (one that did not protect static roots as well, say). Nginx
    // is reloaded only if the file comes out different, its generation aside.
    machine.rewrite_due = machine.serving().is_some() && !machine.replace;
    // A webapp that moved to another port just before the earlier keter ended, Nginx not told
    // yet (or told, and the record not written yet): the site is rendered again at once, so
    // that Nginx routes to no port the app does not hold (README "Supervision").
    if let Some(v) = machine.serving()
        && !machine.replace
        && let Some(routed) = nginx.ports
    {
        let ports: BTreeSet<u16> = v.ports().into_iter().collect();
        if &ports != routed {
            log::warn!(
                "{name}: its Nginx file routes to ports {routed:?} but its webapps use {ports:?}; the site is rendered again"
            );
            machine.reroute_due = true;
        }
    }
    Adopted {
        name: name.clone(),
        machine,
        watches,
        drains,
    }
}

/// A recorded version with the processes that still run taken over. `supervised`: a process
/// that ended meanwhile is due for a restart (else it stays ended). `None` when its
/// configuration cannot be read (its processes are then stopped by the journal).
fn version(
    name: &AppName,
    v: VersionRecord,
    supervised: bool,
    inherited: &mut Inherited,
    watches: &mut Vec<Watch>,
    drains: &mut Vec<Pipe>,
    now: Instant,
) -> Option<Version> {
    let config = match parse_config(name, &v.config) {
        Ok(mut c) => {
            place_static_roots(&mut c, &v.dir);
            c
        }
        Err(e) => {
            log::error!(
                "{name}: deploy {} cannot be taken over: its configuration does not read any more: {e}",
                v.deploy
            );
            return None;
        }
    };
    let mut procs = Vec::new();
    for (i, p) in v.procs.into_iter().enumerate() {
        let mut proc = Proc::new(p.role.into(), p.spec.into(), crate::restart::Policy::WEBAPP);
        proc.restarts = p.restarts.into();
        proc.state = match p.state {
            ProcRecordState::Running { pid, ticks, output } => {
                match take_over(pid, ticks, output, inherited) {
                    Some((pidfd, pipe)) => {
                        if output != 0 && pipe.is_none() {
                            log::warn!(
                                "{name}: pid {pid} ({}): its output pipe was not found; what it prints is lost",
                                proc.label()
                            );
                        }
                        watches.push(Watch {
                            version: v.id,
                            proc: i,
                            pid,
                            pidfd,
                            output: pipe,
                        });
                        let age = procfs::age(pid).unwrap_or_default();
                        ProcState::Running(Running {
                            pid,
                            started: now.checked_sub(age).unwrap_or(now),
                            ticks,
                            output,
                        })
                    }
                    None => {
                        // What it printed before it ended is still in its pipe if systemd
                        // kept the pipe.
                        if let Some(pipe) = inherited.remove(&output).filter(|_| output != 0) {
                            drains.push(pipe);
                        }
                        if supervised {
                            log::warn!(
                                "{name}: pid {pid} ({}) ended while no keter watched it; starting it again",
                                proc.label()
                            );
                            ProcState::Backoff { until: now }
                        } else {
                            ProcState::Ended
                        }
                    }
                }
            }
            ProcRecordState::Backoff { until } if supervised => ProcState::Backoff {
                until: until.instant(),
            },
            ProcRecordState::GaveUp if supervised => ProcState::GaveUp,
            _ => ProcState::Ended,
        };
        // Whether its own process still listens on its port (or, ended, whether someone else
        // took the port while no keter watched) is looked at once it is taken over.
        if supervised && matches!(proc.role, super::version::Role::Web { .. }) {
            proc.port_check_at = Some(now);
        }
        procs.push(proc);
    }
    // Every process of a version runs as the version's user.
    let user = procs.first().and_then(|p: &Proc| p.spec.user.clone());
    Some(Version {
        user,
        id: v.id,
        dir: v.dir,
        sha256: v.sha256,
        stamp: v.stamp.into(),
        config,
        config_text: v.config,
        plugin_env: BTreeMap::new(),
        procs,
        deploy: v.deploy,
        modified: v.modified,
        live_since: v.live_since,
        arrival: None,
    })
}

/// A pidfd of `pid` if it is still the process that started at `ticks`, with its output pipe.
fn take_over(
    pid: i32,
    ticks: u64,
    output: u64,
    inherited: &mut Inherited,
) -> Option<(OwnedFd, Option<Pipe>)> {
    // The pidfd first, then the start time: once the pidfd is open, the pid cannot name
    // another process, so a start time that matches proves the pidfd is the right one.
    let pidfd = childwatch::pidfd_open(pid).ok()?;
    if procfs::start_ticks(pid) != Some(ticks) {
        return None;
    }
    let pipe = if output == 0 {
        None
    } else {
        inherited
            .remove(&output)
            .or_else(|| procfs::open_pipe_of_group(pid, output).map(|f| (f, Vec::new())))
    };
    Some((pidfd, pipe))
}

/// A recorded `keter.yaml` read again, as the deploy read it.
/// Makes the recorded configuration's static roots absolute, as `bundle::check_config` did at
/// the deploy, but by their text alone: the folder is the app's now, and keter does not
/// resolve paths as root in it. A root inside the bundle is checked for symlinks from the
/// version's folder on (`disable_symlinks ... from=`), as at the deploy; a root outside it (in
/// `allowed-static-roots`) on every component, which is stricter and asks nothing of the
/// folder's paths.
fn place_static_roots(config: &mut crate::bundle::BundleConfig, dir: &std::path::Path) {
    for st in &mut config.statics {
        if st.root.is_relative() {
            st.root = crate::config::normalize(&dir.join("config").join(&st.root));
        }
        st.base = st.root.starts_with(dir).then(|| dir.to_path_buf());
    }
}

fn parse_config(
    name: &AppName,
    text: &str,
) -> Result<crate::bundle::BundleConfig, Box<dyn std::error::Error>> {
    let tree = crate::yaml::parse(text)?;
    let mut problems =
        crate::problem::Problems::new(format!("{name}.keter: config/keter.yaml (recorded)"));
    match crate::bundle::config::from_tree(&tree, &mut problems) {
        Some(config) if !problems.has_errors() => Ok(config),
        _ => Err(Box::new(crate::problem::Invalid(problems.errors))),
    }
}
