//! One system user per app, created on the app's first deploy with `useradd`, and recorded in
//! `ROOT/etc/app-users` so that it is the same user, with the same uid, at every later deploy
//! and after restarts (and so that the package's postrm knows which users to remove on purge).
//!
//! A user is named `keter-APP` when the app's name makes a valid user name of at most 32
//! bytes; otherwise the name is cut and followed by 8 hex digits of a hash. Its uid and its
//! own group's gid come from `app-uid-range`; it has no other group, no password, the shell
//! `nologin`, and the home `ROOT/home/APP` (created by keter, mode 0700). Its comment field
//! (`keter app APP in ROOT`) marks it as this keter's: a user of that name that keter did not
//! create (or another keter root's) is never taken over; the app then gets the hashed name.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::IsolationError;
use crate::dirfd::{self, Folder, Kind};
use crate::names::AppName;
use crate::process::{RunAs, UserError};

/// The records file under `ROOT/etc`.
pub const RECORDS: &str = "app-users";
/// Longest user name `useradd` accepts.
const MAX_NAME: usize = 32;
const PREFIX: &str = "keter-";

/// One app's user as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// The per-app users of one keter root.
pub struct AppUsers {
    root: PathBuf,
    records: PathBuf,
    range: RangeInclusive<u32>,
    /// App name to its user; the one owner of the records file. Held only to read or update
    /// it, never while `useradd` runs.
    known: Mutex<BTreeMap<String, Record>>,
    /// Serialises this keter's `useradd` calls (the system serialises them anyway, with its
    /// lock on `/etc/passwd`), so that lookups of existing users never wait for a creation.
    creating: Mutex<()>,
}

/// A user name keter may write into files (passwd, Nginx's `user`): `[a-z_][a-z0-9_-]*`.
pub fn is_plain_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && name.len() <= MAX_NAME
}

impl AppUsers {
    /// Reads the records of `root` (none yet is fine).
    pub fn load(root: &Path, range: RangeInclusive<u32>) -> Result<AppUsers, IsolationError> {
        let records = root.join("etc").join(RECORDS);
        let known = match fs::read_to_string(&records) {
            Ok(text) => parse(&text).map_err(|(line, text)| IsolationError::Records {
                path: records.clone(),
                line,
                text,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(IsolationError::file("cannot read", &records)(e)),
        };
        Ok(AppUsers {
            root: root.to_path_buf(),
            records,
            range,
            known: Mutex::new(known),
            creating: Mutex::new(()),
        })
    }

    /// The uids of every recorded app user.
    pub fn uids(&self) -> Vec<(u32, String)> {
        self.lock()
            .iter()
            .map(|(app, r)| (r.uid, app.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn range(&self) -> &RangeInclusive<u32> {
        &self.range
    }

    /// The user `app` runs as, created (with its home) on first use. The second value is true
    /// when the user was created just now.
    pub fn user_for(&self, app: &AppName) -> Result<(RunAs, bool), IsolationError> {
        let recorded = self.lock().get(app.as_str()).cloned();
        let mut created = false;
        let record = match &recorded {
            Some(r) => self.still_there(app, r)?,
            None => {
                let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                let (r, new) = self.find_or_create(app)?;
                created = new;
                r
            }
        };
        if recorded.as_ref() != Some(&record) {
            let mut known = self.lock();
            known.insert(app.to_string(), record.clone());
            // The user's comment marks it as this root's: a record that cannot be written
            // now (a full disk) is written at a later deploy, and the user is found again
            // meanwhile. Nothing is lost by going on.
            if let Err(e) = self.write(&known) {
                log::warn!("{app}: {e}; its user {} is recorded later", record.user);
                // Not recorded: the next deploy finds the user by its comment and writes again.
                match &recorded {
                    Some(old) => known.insert(app.to_string(), old.clone()),
                    None => known.remove(app.as_str()),
                };
            }
        }
        let home = self.root.join("home").join(app.as_str());
        make_home(&home, record.uid, record.gid)
            .map_err(IsolationError::file("cannot make the home folder", &home))?;
        Ok((
            RunAs {
                name: record.user,
                uid: record.uid,
                gid: record.gid,
                groups: vec![record.gid],
                home,
            },
            created,
        ))
    }

    /// A recorded user as the system knows it now: the same user; the same user made again
    /// with its uid when it was removed by hand; or, when its name now belongs to a user keter
    /// did not make for this app, another user.
    fn still_there(&self, app: &AppName, r: &Record) -> Result<Record, IsolationError> {
        match nix::unistd::User::from_name(&r.user) {
            Ok(Some(u)) if u.uid.as_raw() == r.uid => Ok(Record {
                gid: u.gid.as_raw(),
                ..r.clone()
            }),
            Ok(Some(u)) if u.gecos.to_str().ok() == Some(self.tag(app).as_str()) => {
                log::warn!(
                    "{app}: its user {} has uid {} now, not {}; the app's files follow it",
                    r.user,
                    u.uid,
                    r.uid
                );
                Ok(Record {
                    user: r.user.clone(),
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                })
            }
            Ok(Some(u)) => {
                log::warn!(
                    "{app}: the name of its user {} (uid {}) now belongs to another user (uid {}); \
                     choosing another",
                    r.user,
                    r.uid,
                    u.uid
                );
                let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                self.find_or_create(app).map(|(r, _)| r)
            }
            Ok(None) => {
                log::warn!(
                    "{app}: its user {} (uid {}) is gone from the system; creating it again",
                    r.user,
                    r.uid
                );
                let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
                match self.create(app, &r.user, Some(r.uid)) {
                    Ok(r) => Ok(r),
                    // The uid (or, a moment later, the name) was taken meanwhile.
                    Err(Created::Taken | Created::Failed(_)) => {
                        self.find_or_create(app).map(|(r, _)| r)
                    }
                }
            }
            Err(source) => Err(IsolationError::User(UserError::Lookup {
                user: r.user.clone(),
                source,
            })),
        }
    }

    /// A user for an app that has no record yet: one of keter's own users of the expected
    /// name (records lost), or a new one.
    fn find_or_create(&self, app: &AppName) -> Result<(Record, bool), IsolationError> {
        let tag = self.tag(app);
        for name in self.names(app) {
            match nix::unistd::User::from_name(&name) {
                Ok(Some(u)) if u.gecos.to_str().ok() == Some(tag.as_str()) => {
                    return Ok((
                        Record {
                            user: name,
                            uid: u.uid.as_raw(),
                            gid: u.gid.as_raw(),
                        },
                        false,
                    ));
                }
                // Someone else's user (or another keter root's): never taken over.
                Ok(Some(_)) => continue,
                Ok(None) => match self.create(app, &name, None) {
                    Ok(r) => return Ok((r, true)),
                    // Another process made a user of that name a moment ago.
                    Err(Created::Taken) => continue,
                    Err(Created::Failed(e)) => return Err(e),
                },
                Err(source) => {
                    return Err(IsolationError::User(UserError::Lookup {
                        user: name,
                        source,
                    }));
                }
            }
        }
        Err(IsolationError::NoFreeName {
            app: app.clone(),
            names: self.names(app),
            root: self.root.clone(),
        })
    }

    /// `keter-APP`, then a name made unique to this root.
    fn names(&self, app: &AppName) -> Vec<String> {
        let name = app.as_str();
        let plain = format!("{PREFIX}{name}");
        let first = if is_plain_name(&plain) {
            plain
        } else {
            hashed(name, name.as_bytes())
        };
        let mut seed = self.root.as_os_str().as_encoded_bytes().to_vec();
        seed.push(0);
        seed.extend(name.as_bytes());
        vec![first, hashed(name, &seed)]
    }

    /// The comment field that marks a user as this root's user of `app`.
    fn tag(&self, app: &AppName) -> String {
        // passwd fields are separated by ':' and subfields by ','.
        let root: String = self
            .root
            .display()
            .to_string()
            .chars()
            .map(|c| {
                if c == ':' || c == ',' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        format!("keter app {app} in {root}")
    }

    fn create(&self, app: &AppName, name: &str, uid: Option<u32>) -> Result<Record, Created> {
        let (first, last) = (self.range.start(), self.range.end());
        let home = self.root.join("home").join(app.as_str());
        let mut cmd = Command::new(sbin("useradd"));
        cmd.args(["--system", "--no-log-init", "--no-create-home", "--shell"])
            .arg(if Path::new("/usr/sbin/nologin").exists() {
                "/usr/sbin/nologin"
            } else {
                "/bin/false"
            })
            .arg("--home-dir")
            .arg(&home)
            .arg("--comment")
            .arg(self.tag(app))
            .args([
                "-K",
                &format!("SYS_UID_MIN={first}"),
                "-K",
                &format!("SYS_UID_MAX={last}"),
                "-K",
                &format!("SYS_GID_MIN={first}"),
                "-K",
                &format!("SYS_GID_MAX={last}"),
            ]);
        match uid {
            // A removed user comes back with its uid, so its files are its own again.
            Some(uid) => {
                cmd.args(["--uid", &uid.to_string()]);
                if nix::unistd::Group::from_name(name).ok().flatten().is_some() {
                    cmd.args(["--gid", name]);
                } else {
                    cmd.arg("--user-group");
                }
            }
            None => {
                cmd.arg("--user-group");
            }
        }
        cmd.arg(name);
        let out = cmd
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| {
                Created::Failed(IsolationError::UseraddSpawn {
                    user: name.to_string(),
                    source,
                })
            })?;
        // useradd(8): 4, the uid is in use; 9, the name is.
        match out.status.code() {
            Some(0) => {}
            Some(4 | 9) => return Err(Created::Taken),
            _ => {
                return Err(Created::Failed(IsolationError::Useradd {
                    user: name.to_string(),
                    app: app.clone(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                }));
            }
        }
        let u = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| Created::Failed(IsolationError::UserVanished(name.to_string())))?;
        log::info!(
            "{app}: created the system user {name} (uid {}, gid {}) for it",
            u.uid,
            u.gid
        );
        Ok(Record {
            user: name.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }

    fn write(&self, known: &BTreeMap<String, Record>) -> Result<(), IsolationError> {
        let mut text = String::from(
            "# keter: the system user of each app: APP USER UID GID. Written by keter; the same\n\
             # user serves the app at every deploy. Purging the Debian package removes these users.\n",
        );
        for (app, r) in known {
            text += &format!("{app} {} {} {}\n", r.user, r.uid, r.gid);
        }
        crate::atomic_file::replace(&self.records, text.as_bytes(), 0o600)
            .map_err(IsolationError::file("cannot write", &self.records))
    }
}

/// Why `useradd` made no user.
enum Created {
    /// The name or the uid is in use (by another process, a moment ago).
    Taken,
    Failed(IsolationError),
}

/// `keter-` + the name cut and cleaned + `-` + 8 hex digits of SHA-256 of `seed`.
fn hashed(name: &str, seed: &[u8]) -> String {
    let hash = Sha256::digest(seed);
    let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    let room = MAX_NAME - PREFIX.len() - 1 - hex.len();
    let clean: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '-') => c,
            _ => '_',
        })
        .take(room)
        .collect();
    format!("{PREFIX}{clean}-{hex}")
}

/// The records of `text`; a line that is not `APP USER UID GID` is an error with its number
/// and its text.
fn parse(text: &str) -> Result<BTreeMap<String, Record>, (usize, String)> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let bad = || (i + 1, line.to_string());
        let [app, user, uid, gid] = fields[..] else {
            return Err(bad());
        };
        out.insert(
            app.to_string(),
            Record {
                user: user.to_string(),
                uid: uid.parse().map_err(|_| bad())?,
                gid: gid.parse().map_err(|_| bad())?,
            },
        );
    }
    Ok(out)
}

/// `ROOT/home/APP`, mode 0700, owned by the app's user. A home left by an earlier user of
/// another uid (the user was removed and made again) is given to the new one.
fn make_home(home: &Path, uid: u32, gid: u32) -> io::Result<()> {
    if let Some(parent) = home.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(parent)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(home) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = fs::symlink_metadata(home)?;
    if !meta.is_dir() {
        return Err(io::Error::other("it exists and is not a folder"));
    }
    if meta.uid() != uid || meta.gid() != gid {
        return chown_tree(home, uid, gid);
    }
    Folder::open(home)?.set_owner_and_mode(None, None, 0o700)
}

/// Gives the folder `p` and everything in it to `uid`:`gid`. The earlier uid may still run
/// something that changes the tree meanwhile, so every entry is opened relative to its
/// folder without following a symlink and changed through that descriptor
/// (`src/dirfd.rs`), and a file with other names is left alone (it may be a hard link to a
/// file outside, which the earlier user could write).
fn chown_tree(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let top = Folder::open(p)?;
    chown_below(&top, uid, gid)?;
    top.set_owner_and_mode(Some(uid), Some(gid), 0o700)
}

fn chown_below(folder: &Folder, uid: u32, gid: u32) -> io::Result<()> {
    for name in folder.entries()? {
        let (fd, st) = match folder.open_path(&name) {
            Ok(x) => x,
            // Gone meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match Kind::of(&st) {
            Kind::Folder => {
                let sub = folder.open_folder(&name)?;
                let now = sub.stat()?;
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) {
                    chown_below(&sub, uid, gid)?;
                }
            }
            _ if st.st_nlink > 1 => continue,
            _ => {}
        }
        dirfd::chown_path(std::os::fd::AsFd::as_fd(&fd), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// `/usr/sbin/NAME` where it is, else NAME on PATH.
fn sbin(name: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(name);
    if p.exists() { p } else { PathBuf::from(name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_user_names_distinct_per_root() {
        let users = |root: &str| AppUsers {
            root: PathBuf::from(root),
            records: PathBuf::new(),
            range: 65536..=99999,
            known: Mutex::new(BTreeMap::new()),
            creating: Mutex::new(()),
        };
        let a = users("/opt/keter");
        let blog = AppName::new("blog").unwrap();
        assert_eq!(a.names(&blog)[0], "keter-blog");
        assert_ne!(a.names(&blog)[1], users("/srv/keter").names(&blog)[1]);
        for name in ["My.App", &"x".repeat(100), "a_b-c", "9lives"] {
            let app = AppName::new(name).unwrap();
            for n in a.names(&app) {
                assert!(is_plain_name(&n), "{name}: {n}");
            }
        }
        assert_eq!(a.names(&AppName::new("9lives").unwrap())[0], "keter-9lives");
        assert_eq!(a.tag(&blog), "keter app blog in /opt/keter");
    }

    #[test]
    fn records_round_trip_and_bad_lines_are_named() {
        let text = "# comment\nblog keter-blog 65600 65600\n";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed["blog"].uid, 65600);
        assert_eq!(
            parse("blog keter-blog x 1\n").unwrap_err(),
            (1, "blog keter-blog x 1".to_string())
        );
    }
}
