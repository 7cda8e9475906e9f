//! Who each app runs as and what it can reach: the one place that decides an app's user, gives
//! its unpacked folder to it, opens exactly the static roots to Nginx's workers, lays out the
//! root folder's permissions, and tells the status interface which connections come from apps.
//! README "Security" describes the model.
//!
//! | keter runs as | configuration | apps run as |
//! |---|---|---|
//! | root | (default) | one system user per app ([`users`]) |
//! | root | `setuid: USER` | USER, every app (Keter's meaning) |
//! | root | `run-apps-as-root: true` | root, as Keter ran them |
//! | another user | | that user, every app: it can become no one else |

pub mod access;
mod error;
pub mod folder;
pub mod users;

pub use error::IsolationError;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use access::Ids;

use crate::config::{Config, NginxMode};
use crate::names::AppName;
use crate::process::RunAs;

/// How apps are separated from each other and from keter.
pub enum Mode {
    /// keter is not root: apps run as keter's own user, which can become no other.
    OwnUser { uid: u32 },
    /// `run-apps-as-root: true`.
    Root,
    /// `setuid: USER`: every app as USER.
    Shared(RunAs),
    /// One system user per app.
    PerApp(users::AppUsers),
}

/// The isolation of one keter root.
pub struct Isolation {
    mode: Mode,
    root: PathBuf,
    own_uid: u32,
    /// Nginx's workers as configured, for managed mode (`None` when they run as keter).
    managed_workers: Option<Ids>,
    nginx_mode: NginxMode,
    /// Apps whose user passed the confinement check in this run.
    checked: Mutex<BTreeSet<String>>,
    /// Uids refused by the status interface and logged already (logged once each).
    refused_logged: Mutex<BTreeSet<u32>>,
    /// The users Nginx's workers were seen to run as in this run, by uid.
    workers_seen: Mutex<BTreeMap<u32, String>>,
}

/// The folders under `root`, with the mode each is given (README "Folder layout"). What must
/// hold: apps cannot write any of them; nobody but keter and its operators lists `incoming/`,
/// `log/` or `etc/`; Nginx's workers and apps can pass through `temp/`, `nginx/` and `home/`
/// (to their own folders), but not list them.
const LAYOUT: &[(&str, u32)] = &[
    ("incoming", 0o700),
    ("temp", 0o711),
    ("log", 0o750),
    ("etc", 0o700),
    ("nginx", 0o711),
    ("nginx/apps", 0o700),
    ("home", 0o711),
];

/// Creates the root's folders and takes away what others must not have: any access for
/// others to `incoming/`, `log/` and `etc/`, and write (or listing) for anyone but keter
/// elsewhere. Group bits that an operator gave (the package's deployers' group on
/// `incoming/`, `adm` on `log/`) are kept where the layout allows them. Returns a line per
/// folder changed.
pub fn prepare_root(root: &Path) -> Result<Vec<String>, IsolationError> {
    let mut changed = Vec::new();
    // The root itself: nobody but its owner writes it (a tmpfs or a hand-made folder may be
    // 1777).
    let meta = fs::metadata(root).map_err(IsolationError::file("", root))?;
    let now = meta.mode() & 0o7777;
    if now & 0o022 != 0 {
        let wanted = now & !0o1022;
        fs::set_permissions(root, fs::Permissions::from_mode(wanted))
            .map_err(IsolationError::file("cannot set the mode of", root))?;
        changed.push(format!(
            "{} was mode {now:04o}, now {wanted:04o}: apps must not write it",
            root.display()
        ));
    }
    for (sub, mode) in LAYOUT {
        let dir = root.join(sub);
        match fs::DirBuilder::new().mode(*mode).create(&dir) {
            Ok(()) => {
                // The umask may have narrowed the mode.
                fs::set_permissions(&dir, fs::Permissions::from_mode(*mode))
                    .map_err(IsolationError::file("cannot set the mode of", &dir))?;
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(IsolationError::file("cannot create", &dir)(e)),
        }
        let meta = fs::metadata(&dir).map_err(IsolationError::file("", &dir))?;
        if !meta.is_dir() {
            return Err(IsolationError::NotAFolder(dir));
        }
        let now = meta.mode() & 0o7777;
        // The owner keeps its bits (at least the layout's) and setgid stays; the group keeps
        // what an operator gave it on incoming/ (deployers) and log/ (readers), and gets the
        // layout's bits elsewhere; others get exactly the layout's bits.
        let group = match *sub {
            "incoming" => now & 0o070,
            "log" => now & 0o050,
            _ => mode & 0o070,
        };
        let wanted = (now & 0o2000) | ((now | mode) & 0o700) | group | (mode & 0o007);
        if wanted != now {
            fs::set_permissions(&dir, fs::Permissions::from_mode(wanted))
                .map_err(IsolationError::file("cannot set the mode of", &dir))?;
            changed.push(format!(
                "{} was mode {now:04o}, now {wanted:04o}: apps must not reach it",
                dir.display()
            ));
        }
    }
    Ok(changed)
}

impl Isolation {
    /// Decides how apps run, for the daemon about to start. Errors are fatal: a configuration
    /// that would let apps reach keter's state is refused, not run.
    pub fn new(config: &Config) -> Result<Isolation, IsolationError> {
        let own_uid = nix::unistd::geteuid().as_raw();
        let mode = if own_uid != 0 {
            if config.run_apps_as_root {
                return Err(IsolationError::NotRootForRoot { uid: own_uid });
            }
            if let Some(user) = &config.run_as
                && user.uid != own_uid
            {
                return Err(IsolationError::NotRootForUser {
                    uid: own_uid,
                    user: user.name.clone(),
                    user_uid: user.uid,
                });
            }
            Mode::OwnUser { uid: own_uid }
        } else if config.run_apps_as_root {
            Mode::Root
        } else if let Some(user) = &config.run_as {
            Mode::Shared(user.clone())
        } else {
            Mode::PerApp(users::AppUsers::load(
                &config.root,
                config.app_uid_range.clone(),
            )?)
        };
        let managed_workers = match (config.nginx.mode, own_uid) {
            (NginxMode::Managed, 0) => {
                Some(Ids::of_user(&managed_nginx_user(config)).map_err(IsolationError::User)?)
            }
            _ => None,
        };
        let isolation = Isolation {
            mode,
            root: config.root.clone(),
            own_uid,
            managed_workers,
            nginx_mode: config.nginx.mode,
            checked: Mutex::new(BTreeSet::new()),
            refused_logged: Mutex::new(BTreeSet::new()),
            workers_seen: Mutex::new(BTreeMap::new()),
        };
        if let Mode::Shared(user) = &isolation.mode {
            let breaches = isolation.breaches(&ids_of(user))?;
            if !breaches.is_empty() {
                return Err(IsolationError::SharedUserBreaches {
                    user: user.name.clone(),
                    breaches,
                });
            }
        }
        Ok(isolation)
    }

    /// One line for the log saying how apps run.
    pub fn describe(&self) -> String {
        match &self.mode {
            Mode::OwnUser { uid } => format!(
                "apps run as keter's own user (uid {uid}): keter is not root, so apps are not \
                 separated from each other or from keter"
            ),
            Mode::Root => "apps run as root (run-apps-as-root: true): they are not separated \
                           from each other or from keter"
                .into(),
            Mode::Shared(u) => format!(
                "every app runs as {} (uid {}, setuid): apps are kept out of keter's state, \
                 not separated from each other",
                u.name, u.uid
            ),
            Mode::PerApp(users) => format!(
                "each app runs as a system user of its own (uids {}-{}, recorded in {})",
                users.range().start(),
                users.range().end(),
                self.root.join("etc").join(users::RECORDS).display()
            ),
        }
    }

    /// The user `app` runs as; `None` for keter's own user.
    pub fn user_of(&self, app: &AppName) -> Result<Option<RunAs>, IsolationError> {
        let started = Instant::now();
        let (user, created) = match &self.mode {
            Mode::OwnUser { .. } | Mode::Root => return Ok(None),
            Mode::Shared(u) => return Ok(Some(u.clone())),
            Mode::PerApp(users) => users.user_for(app)?,
        };
        let first_use = self
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(app.to_string());
        if first_use {
            let breaches = self.breaches(&ids_of(&user))?;
            if !breaches.is_empty() {
                self.checked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(app.as_str());
                return Err(IsolationError::AppUserBreaches {
                    user: user.name.clone(),
                    breaches,
                });
            }
        }
        // The figures bench reads these lines: what isolation costs a deploy.
        log::debug!(
            "{app}: isolation: user {} {} in {} us",
            user.name,
            if created { "created" } else { "looked up" },
            started.elapsed().as_micros()
        );
        Ok(Some(user))
    }

    /// `HOME` of an app running as `user`.
    pub fn home(user: Option<&RunAs>) -> String {
        match user {
            Some(u) => u.home.display().to_string(),
            None => std::env::var("HOME").unwrap_or_else(|_| "/".into()),
        }
    }

    /// Gives the unpacked folder `dir` to `user`, closes it to everyone else and opens its
    /// static roots `roots` (absolute, as `bundle::check_config` resolved them) to Nginx's
    /// workers, in one walk made before the app can reach the folder (`folder.rs` says why that
    /// is safe as root). Then checks that the user can reach its folder (a root under a folder
    /// it cannot search would make every start fail with a bare "Permission denied") and, as
    /// Nginx's workers, that they can read every file of every static root: the error names the
    /// folder, the workers' user and the missing permission. `master` is the running Nginx
    /// master, whose workers are asked who they are.
    pub fn hand_over(
        &self,
        dir: &Path,
        user: Option<&RunAs>,
        roots: &[PathBuf],
        master: Option<i32>,
    ) -> Result<(), IsolationError> {
        let started = Instant::now();
        let workers = if roots.is_empty() {
            None
        } else {
            Some(
                self.nginx_workers(master)
                    .ok_or(IsolationError::NoWorkers)?,
            )
        };
        let owner_uid = user.map_or(self.own_uid, |u| u.uid);
        // Workers that run as root or as the folder's owner read it without help.
        let web = workers
            .as_ref()
            .filter(|w| !w.is_root() && w.uid != owner_uid)
            .map(|w| w.gid);
        let owners = folder::Owners {
            app: user.map(|u| (u.uid, u.gid)),
            web,
        };
        let done =
            folder::hand_over(dir, roots, owners).map_err(|source| IsolationError::HandOver {
                dir: dir.to_path_buf(),
                user: user.map_or("keter", |u| u.name.as_str()).to_string(),
                source,
            })?;
        if let Some(user) = user {
            let ids = ids_of(user);
            access::as_user(&ids, || access::can_enter(dir))
                .map_err(|source| IsolationError::Check {
                    user: ids.name.clone(),
                    source,
                })?
                .map_err(|denied| IsolationError::Unreachable {
                    ids: ids.to_string(),
                    denied,
                })?;
        }
        if let Some(workers) = &workers {
            for root in roots {
                access::as_user(workers, || access::can_read_tree(root))
                    .map_err(|source| IsolationError::Check {
                        user: workers.name.clone(),
                        source,
                    })?
                    .map_err(|denied| IsolationError::UnreadableRoot {
                        root: root.clone(),
                        workers: workers.to_string(),
                        denied,
                    })?;
            }
        }
        // The figures bench reads these lines: what isolation costs a deploy.
        log::debug!(
            "isolation: {} handed over ({} entries, {} opened to Nginx's workers{}) and checked in {} us",
            dir.display(),
            done.entries,
            done.opened,
            workers
                .as_ref()
                .map(|w| format!(" {}", w.name))
                .unwrap_or_default(),
            started.elapsed().as_micros()
        );
        Ok(())
    }

    /// At start: warns when Nginx's workers cannot read the ACME webroot (certbot would then
    /// fail with a 403 or 404 that says nothing about why).
    pub fn check_acme_webroot(&self, webroot: &Path, master: Option<i32>) {
        let Some(workers) = self.nginx_workers(master) else {
            return;
        };
        match access::as_user(&workers, || access::can_read_tree(webroot)) {
            Ok(Err(d)) => log::warn!(
                "keter: the ACME webroot {} is not readable by Nginx's workers ({workers}): {}; \
                 certbot --webroot will fail",
                webroot.display(),
                d.describe()
            ),
            Ok(Ok(())) => {}
            Err(e) => log::debug!("keter: cannot check the ACME webroot: {e}"),
        }
    }

    /// Who Nginx's workers are: the running workers themselves, else (managed mode, Nginx
    /// restarting) the configured user.
    fn nginx_workers(&self, master: Option<i32>) -> Option<Ids> {
        master
            .and_then(Ids::of_nginx_workers)
            .or_else(|| match self.nginx_mode {
                NginxMode::Managed => self
                    .managed_workers
                    .clone()
                    .or_else(|| Ids::of_process(std::process::id() as i32)),
                NginxMode::System => None,
            })
    }

    /// The `user` line of the managed Nginx's main configuration: (user, group), when keter
    /// runs as root.
    pub fn managed_worker_user(&self) -> Option<(String, String)> {
        let ids = self.managed_workers.as_ref()?;
        let group = nix::unistd::Group::from_gid(ids.gid.into())
            .ok()
            .flatten()
            .map(|g| g.name)?;
        Some((ids.name.clone(), group))
    }

    /// The status interface asks: is a connection from `uid` one of the apps? `Some(what)`
    /// names it. keter's own user and root are never refused: when apps run as one of them
    /// (keter not root, `run-apps-as-root`) apps cannot be told from operators (README says
    /// so).
    pub fn app_of_uid(&self, uid: u32) -> Option<String> {
        if uid == 0 || uid == self.own_uid {
            return None;
        }
        match &self.mode {
            Mode::OwnUser { .. } | Mode::Root => None,
            Mode::Shared(u) => (u.uid == uid).then(|| format!("the apps' user {}", u.name)),
            Mode::PerApp(users) => users
                .uids()
                .into_iter()
                .find(|(u, _)| *u == uid)
                .map(|(_, app)| format!("the user of the app {app}"))
                .or_else(|| {
                    users
                        .range()
                        .contains(&uid)
                        .then(|| "in app-uid-range, the apps' users".to_string())
                }),
        }
    }

    /// The status interface asks: is a TCP connection from `uid` one of Nginx's workers?
    /// `Some(name)` of their user, unless it is root or keter's own user (operators share
    /// those; with workers running as keter's user, only the bundle check keeps Nginx away
    /// from the status interface). `master` is the running Nginx master. A user the workers
    /// were once seen to run as stays one, so that a refusal does not depend on finding
    /// workers at that moment (Nginx restarting).
    pub fn nginx_workers_user(&self, uid: u32, master: Option<i32>) -> Option<String> {
        if uid == 0 || uid == self.own_uid {
            return None;
        }
        if let Some(ids) = &self.managed_workers
            && ids.uid == uid
        {
            return Some(ids.name.clone());
        }
        let mut seen = self.workers_seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(name) = seen.get(&uid) {
            return Some(name.clone());
        }
        // Looked up only for a uid that is not known yet (a scan of /proc).
        let workers = self.nginx_workers(master)?;
        if workers.uid == 0 || workers.uid == self.own_uid {
            return None;
        }
        seen.insert(workers.uid, workers.name.clone());
        (workers.uid == uid).then_some(workers.name)
    }

    /// True the first time `uid` is refused (so that a refusal is logged once, not at every
    /// request of a hostile app).
    pub fn first_refusal(&self, uid: u32) -> bool {
        self.refused_logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid)
    }

    /// What a user could do to keter's state that an app must not: write the root,
    /// `incoming/`, `temp/`, `nginx/`, `log/`, `etc/`, `home/`, or read `etc/`.
    fn breaches(&self, ids: &Ids) -> Result<Vec<String>, IsolationError> {
        let root = self.root.clone();
        access::as_user(ids, move || {
            let mut out = Vec::new();
            for sub in [
                "",
                "incoming",
                "temp",
                "nginx",
                "nginx/apps",
                "log",
                "etc",
                "home",
            ] {
                let dir = root.join(sub);
                if dir.exists() && access::can_write_into(&dir) {
                    out.push(format!("may write {}", dir.display()));
                }
            }
            let etc = root.join("etc");
            if access::can_read(&etc) {
                out.push(format!("may read {}", etc.display()));
            }
            out
        })
        .map_err(|source| IsolationError::Check {
            user: ids.name.clone(),
            source,
        })
    }
}

/// The user of a managed Nginx's workers when keter is root: `nginx.user`, else `www-data`
/// where it exists (Debian's), else `nobody` (what Nginx itself falls back to).
fn managed_nginx_user(config: &Config) -> String {
    if let Some(u) = &config.nginx.user {
        return u.clone();
    }
    match nix::unistd::User::from_name("www-data") {
        Ok(Some(_)) => "www-data".into(),
        _ => "nobody".into(),
    }
}

fn ids_of(user: &RunAs) -> Ids {
    Ids {
        name: user.name.clone(),
        uid: user.uid,
        gid: user.gid,
        groups: user.groups.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_root_is_laid_out_and_wider_folders_are_narrowed() {
        let root = std::env::temp_dir().join(format!("keter-layout-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
        // As an older package left them, and an operator's deployers' group on incoming/.
        for (sub, m) in [("incoming", 0o2777), ("temp", 0o750), ("etc", 0o755)] {
            fs::create_dir(root.join(sub)).unwrap();
            fs::set_permissions(root.join(sub), fs::Permissions::from_mode(m)).unwrap();
        }
        let changed = prepare_root(&root).unwrap();
        assert_eq!(mode(&root.join("incoming")), 0o2770);
        assert_eq!(mode(&root.join("temp")), 0o711);
        assert_eq!(mode(&root.join("etc")), 0o700);
        assert_eq!(mode(&root.join("nginx/apps")), 0o700);
        assert_eq!(mode(&root.join("log")), 0o750);
        assert_eq!(mode(&root), 0o755);
        assert_eq!(changed.len(), 4, "{changed:?}");
        assert!(prepare_root(&root).unwrap().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
