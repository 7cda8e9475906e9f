//! One keter per root (README, "Running keter"): two daemons on one root would both unpack
//! into `temp/`, write Nginx's files and stop each other's apps as leftovers. The daemon takes
//! an exclusive `flock` on `ROOT/etc/keter.lock` before it touches anything else of the root,
//! writes its pid into the file, and holds the lock until it exits; a second keter finds it
//! taken and stops at once, naming the root and the holder's pid.
//!
//! The kernel releases the lock when the last descriptor of its open file is closed, so a
//! keter that dies (SIGKILL, a panic) frees its root at once, provided no other process holds
//! a copy of that descriptor: it is opened close-on-exec, and apps and the managed Nginx are
//! started with nothing beyond 0, 1 and 2 (`src/process.rs`). An in-place upgrade
//! (`src/handover.rs`) keeps it across the exec: the descriptor loses close-on-exec just
//! before the exec and its number is passed in [`FD_VAR`], so the root is never free between
//! the two images; the new image takes it back ([`inherited`], then [`RootLock::acquire`],
//! where `flock` on the same open file succeeds).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The environment variable that names the lock's descriptor in the new image of an upgrade.
pub const FD_VAR: &str = "KETER_ROOT_LOCK_FD";

/// The lock file, relative to the root.
pub const FILE: &str = "etc/keter.lock";

/// The held lock; released when dropped (or when the process ends).
pub struct RootLock {
    file: Flock<File>,
}

/// Why the lock of a root was not taken.
#[derive(Debug)]
pub enum LockError {
    /// The lock file cannot be opened or created.
    Open { path: PathBuf, source: io::Error },
    /// `flock` failed for another reason than a holder.
    Lock { path: PathBuf, source: Errno },
    /// Another process holds it: `holder` is the pid written in the file, when it names one.
    Busy {
        root: PathBuf,
        path: PathBuf,
        holder: Option<u32>,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Open { path, source } => {
                write!(f, "cannot open {}: {source}", path.display())
            }
            LockError::Lock { path, source } => {
                write!(
                    f,
                    "cannot lock {}: {}",
                    path.display(),
                    io::Error::from(*source)
                )
            }
            LockError::Busy { root, path, holder } => {
                match holder {
                    Some(pid) => write!(f, "another keter (pid {pid})")?,
                    None => f.write_str("another keter")?,
                }
                write!(
                    f,
                    " runs on the root {}: it holds the lock {}; two keters on one root would stop each other's apps (stop that one first, or give this one another root)",
                    root.display(),
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Open { source, .. } => Some(source),
            LockError::Lock { source, .. } => Some(source),
            LockError::Busy { .. } => None,
        }
    }
}

impl RootLock {
    /// Takes the lock of `root`, whose `etc/` exists. `inherited` is what [`inherited`]
    /// returned: used when it is this root's lock file, closed otherwise. Fails at once,
    /// without waiting, when another process holds it.
    pub fn acquire(root: &Path, inherited: Option<File>) -> Result<RootLock, LockError> {
        let path = root.join(FILE);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| LockError::Open {
                path: path.clone(),
                source,
            })?;
        let same = |f: &File| match (f.metadata(), opened.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        // The inherited descriptor holds the lock already; a fresh one of the same file would
        // find it taken.
        let file = match inherited {
            Some(f) if same(&f) => f,
            _ => opened,
        };
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(file) => file,
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Busy {
                    root: root.to_path_buf(),
                    holder: holder(&path),
                    path,
                });
            }
            Err((_, source)) => return Err(LockError::Lock { path, source }),
        };
        let mut lock = RootLock { file };
        if let Err(e) = lock.write_pid() {
            log::warn!("keter: cannot write its pid into {}: {e}", path.display());
        }
        Ok(lock)
    }

    fn write_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}", std::process::id())?;
        self.file.sync_data()
    }

    /// The descriptor, for the upgrade's exec.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The pid written in the lock file, if it reads as one.
fn holder(path: &Path) -> Option<u32> {
    let mut text = String::new();
    File::open(path).ok()?.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// In the new image of an upgrade: the lock's descriptor the earlier image kept across the
/// exec, close-on-exec again. Must run before other threads start (it removes a variable from
/// the environment).
pub fn inherited() -> Option<File> {
    let fd: RawFd = std::env::var(FD_VAR).ok()?.parse().ok()?;
    // SAFETY: called at the start of `main`, before any other thread exists.
    unsafe { std::env::remove_var(FD_VAR) };
    // Only an open regular file is taken: a number alone proves nothing. (`stat` of its name
    // in /proc, since a descriptor not known to be open cannot be borrowed.)
    if fd < 3
        || !std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| m.file_type().is_file())
    {
        return None;
    }
    set_cloexec(fd, true);
    // SAFETY: the earlier image passed this descriptor for us alone; nothing else owns it.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// Sets or clears close-on-exec; async-signal-safe (the upgrade calls it just before exec).
pub fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on a descriptor the caller owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_root_fails_naming_the_holder() {
        let root = std::env::temp_dir().join(format!("keter-unit-rootlock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let first = RootLock::acquire(&root, None).unwrap();
        let e = RootLock::acquire(&root, None).err().unwrap().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&root.display().to_string()), "{e}");
        // The holder's own descriptor, as an upgrade passes it on, takes it again.
        let again = File::open(root.join(FILE)).unwrap();
        assert!(RootLock::acquire(&root, Some(again)).is_err());
        let kept = first.file.try_clone().unwrap();
        drop(first);
        let second = RootLock::acquire(&root, Some(kept)).unwrap();
        assert!(RootLock::acquire(&root, None).is_err());
        // Released with its descriptor.
        drop(second);
        RootLock::acquire(&root, None).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
