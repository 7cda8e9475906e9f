//! What another user may do to a path, asked of the kernel itself: a short-lived thread takes
//! that user's filesystem identity (fsuid, fsgid and supplementary groups, which Linux keeps per
//! thread) and tries. Modes, ACLs and root's capabilities (dropped with the fsuid) all count as
//! they will for the real process, with no permission logic of keter's own to get wrong.
//!
//! Used before a deploy switches (can Nginx's workers read the static roots?), when an app's
//! user is first used (can it reach its folder, and is it kept out of keter's state?), and to
//! learn who Nginx's workers are.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::unistd::AccessFlags;

use crate::process::UserError;

/// A user's filesystem identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// For messages: the user's name, or its uid when it has none.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl fmt::Display for Ids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "user {}, uid {}, gid {}", self.name, self.uid, self.gid)
    }
}

impl Ids {
    /// The user `name` with its primary group and the groups it is a member of (what a process
    /// started by `initgroups`, like an Nginx worker, has).
    pub fn of_user(name: &str) -> Result<Ids, UserError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|source| UserError::Lookup {
                user: name.to_string(),
                source,
            })?
            .ok_or_else(|| UserError::NoSuchUser(name.to_string()))?;
        let cname =
            std::ffi::CString::new(name).map_err(|_| UserError::NulInName(name.to_string()))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|source| UserError::Groups {
                user: name.to_string(),
                source,
            })?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Ids {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
        })
    }

    /// The owner of a file: its user with its groups, or (a uid with no user) the bare uid with
    /// the file's group `gid` and no other.
    pub fn of_owner(uid: u32, gid: u32) -> Ids {
        match nix::unistd::User::from_uid(uid.into()) {
            Ok(Some(user)) => Ids::of_user(&user.name).unwrap_or(Ids {
                name: user.name,
                uid,
                gid: user.gid.as_raw(),
                groups: vec![user.gid.as_raw()],
            }),
            _ => Ids {
                name: uid.to_string(),
                uid,
                gid,
                groups: vec![gid],
            },
        }
    }

    /// The filesystem identity of a running process, from `/proc/PID/status`.
    pub fn of_process(pid: i32) -> Option<Ids> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        // Real, effective, saved and filesystem ids: the last one decides file access.
        let uid = *field("Uid:").get(3)?;
        let gid = *field("Gid:").get(3)?;
        let name = nix::unistd::User::from_uid(uid.into())
            .ok()
            .flatten()
            .map_or_else(|| uid.to_string(), |u| u.name);
        Some(Ids {
            name,
            uid,
            gid,
            groups: field("Groups:"),
        })
    }

    /// The identity of Nginx's workers under master `master`: whoever the first worker runs as.
    pub fn of_nginx_workers(master: i32) -> Option<Ids> {
        crate::procfs::nginx_workers(master)
            .into_iter()
            .find_map(|(pid, _)| Ids::of_process(pid))
    }

    /// Whether a process with these ids passes every permission check (root's capabilities).
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

/// What a user may not do to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub path: PathBuf,
    pub wanted: Wanted,
    /// The error the kernel gave.
    pub error: Errno,
}

/// The kind of access that was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Search (x) on a folder on the way.
    Search,
    /// Read (r), of a file or the listing of a folder.
    Read,
    /// Write (w) into a folder.
    Write,
}

impl Denied {
    /// `/srv (mode 0700, owner root, group root) does not let them search it (x): Permission
    /// denied`, for messages about `who`.
    pub fn describe(&self) -> String {
        let what = match self.wanted {
            Wanted::Search => "search it (x)",
            Wanted::Read => "read it (r)",
            Wanted::Write => "write into it (w)",
        };
        format!(
            "{} {} does not let them {what}: {}",
            self.path.display(),
            describe_inode(&self.path),
            io::Error::from(self.error)
        )
    }
}

/// `(mode 0750, owner root, group adm)`.
pub fn describe_inode(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => {
            let name = |id: u32, user: bool| {
                let found = if user {
                    nix::unistd::User::from_uid(id.into())
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                } else {
                    nix::unistd::Group::from_gid(id.into())
                        .ok()
                        .flatten()
                        .map(|g| g.name)
                };
                found.unwrap_or_else(|| id.to_string())
            };
            format!(
                "(mode {:04o}, owner {}, group {})",
                m.mode() & 0o7777,
                name(m.uid(), true),
                name(m.gid(), false)
            )
        }
        Err(e) => format!("({e})"),
    }
}

/// Runs `work` with the filesystem identity `ids`, on a thread of its own that ends with it.
/// keter must be root for any identity but its own; a non-root keter gets an error instead.
pub fn as_user<T: Send>(ids: &Ids, work: impl FnOnce() -> T + Send) -> io::Result<T> {
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if euid != 0 {
        if ids.uid == euid && ids.gid == egid {
            return Ok(work());
        }
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("keter does not run as root and cannot act as {ids}"),
        ));
    }
    let groups: Vec<libc::gid_t> = ids.groups.clone();
    let (uid, gid) = (ids.uid, ids.gid);
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("as-user".into())
            .spawn_scoped(scope, move || {
                // Raw system calls on purpose: glibc's wrappers (and nix's) change every
                // thread of the process, the kernel's calls change only this one. The
                // thread ends after `work`, and its identity with it.
                // SAFETY: plain system calls on this thread's credentials, with a valid
                // array of `groups.len()` group ids.
                unsafe {
                    if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::syscall(libc::SYS_setfsgid, gid);
                    libc::syscall(libc::SYS_setfsuid, uid);
                    // setfsuid reports no error: asking with an invalid id answers the current
                    // one.
                    let now_uid = libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32;
                    let now_gid = libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32;
                    if now_uid != uid || now_gid != gid {
                        return Err(io::Error::other(format!(
                            "could not take the filesystem identity uid {uid}, gid {gid}"
                        )));
                    }
                }
                Ok(work())
            })?
            .join()
            .map_err(|_| io::Error::other("the check panicked"))?
    })
}

/// `faccessat` with the calling thread's filesystem identity (AT_EACCESS; without it the
/// kernel would check the real uid, root's).
fn access(path: &Path, mode: AccessFlags) -> Result<(), Errno> {
    nix::unistd::faccessat(AT_FDCWD, path, mode, AtFlags::AT_EACCESS)
}

/// Checks, as the calling thread's identity, that every folder on the way to `path` can be
/// searched; the first that cannot.
fn reach(path: &Path) -> Result<(), Denied> {
    let mut at = PathBuf::new();
    let mut components = path.components().peekable();
    while let Some(c) = components.next() {
        at.push(c);
        if components.peek().is_none() {
            break;
        }
        if matches!(c, Component::Prefix(_)) {
            continue;
        }
        access(&at, AccessFlags::X_OK).map_err(|error| Denied {
            path: at.clone(),
            wanted: Wanted::Search,
            error,
        })?;
    }
    Ok(())
}

/// As the calling thread's identity: can `dir` be reached and searched?
pub fn can_enter(dir: &Path) -> Result<(), Denied> {
    reach(dir)?;
    access(dir, AccessFlags::X_OK).map_err(|error| Denied {
        path: dir.to_path_buf(),
        wanted: Wanted::Search,
        error,
    })
}

/// As the calling thread's identity: may something be created in `dir`?
pub fn can_write_into(dir: &Path) -> bool {
    reach(dir).is_ok() && access(dir, AccessFlags::W_OK | AccessFlags::X_OK).is_ok()
}

/// As the calling thread's identity: can `path` (a file, or a folder's listing) be read?
pub fn can_read(path: &Path) -> bool {
    reach(path).is_ok()
        && if path.is_dir() {
            fs::read_dir(path).is_ok()
        } else {
            fs::File::open(path).is_ok()
        }
}

/// Most entries a static tree is checked for; bundles are capped by `max-bundle-entries`, and
/// what an app adds later is its own business.
const MAX_CHECKED: usize = 200_000;

/// As the calling thread's identity: can everything Nginx would serve from `root` be read, as
/// Nginx reads it (following symlinks)? Every folder on the way must be searchable, every
/// folder in the tree listable and searchable, every file readable.
pub fn can_read_tree(root: &Path) -> Result<(), Denied> {
    reach(root)?;
    let mut seen = HashSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        if seen.len() >= MAX_CHECKED {
            break;
        }
        let Ok(meta) = fs::metadata(&path) else {
            // A dangling symlink serves nothing; a real refusal shows on the folder above.
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let denied = |error: io::Error, wanted| Denied {
            path: path.clone(),
            wanted,
            error: Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO)),
        };
        if meta.is_dir() {
            access(&path, AccessFlags::X_OK).map_err(|error| Denied {
                path: path.clone(),
                wanted: Wanted::Search,
                error,
            })?;
            let entries = fs::read_dir(&path).map_err(|e| denied(e, Wanted::Read))?;
            for e in entries.flatten() {
                todo.push(e.path());
            }
        } else if meta.is_file() {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(|e| denied(e, Wanted::Read))?;
        }
    }
    Ok(())
}
