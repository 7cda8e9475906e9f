//! The permissions of an unpacked version folder `temp/NAME-N`, set once, before its app can
//! reach it.
//!
//! [`hand_over`] gives every entry to the app's user and closes it to everyone else: each mode
//! keeps only its owner's bits (the owner gets the union of the bits the bundle gave anyone, so
//! a file executable by anyone stays executable by its owner), so the folder is `0700`. In the
//! same pass it opens exactly what Nginx serves to Nginx's workers, through their group: the
//! static roots and everything in them get that group with read (and, for folders, search and
//! setgid, so files the app adds later get the group too), the folders on the way to a root get
//! search only. A symlink in a static root that leads elsewhere in the folder opens its target
//! too (the unpacker has checked that bundle symlinks stay inside the folder).
//!
//! Why it is safe as root: the unpacker made the folder `0700` and root's, so until its top is
//! handed over nobody but keter can enter it, and the top is handed over last; every change is
//! made through a descriptor opened relative to its folder's descriptor without following a
//! symlink (`src/dirfd.rs`). Nothing here runs again once the app can reach the folder: an app
//! that races the walk (a folder swapped for a symlink to `/etc`) finds nothing to race.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::dirfd::{Folder, Kind, NotAFile};

/// Who gets the folder and what Nginx's workers get of it.
#[derive(Debug, Clone, Copy)]
pub struct Owners {
    /// The app's user and group; `None` keeps keter's own.
    pub app: Option<(u32, u32)>,
    /// The group of Nginx's workers, when the static roots must be opened to it.
    pub web: Option<u32>,
}

/// What [`hand_over`] did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HandedOver {
    pub entries: usize,
    /// Entries opened to Nginx's workers.
    pub opened: usize,
}

/// Gives `dir` and everything in it to `owners.app`, keeps only the owner's permissions, and
/// opens the static roots `roots` (absolute paths inside `dir`, as `bundle::check_config`
/// resolved them) to `owners.web`. `dir` must be keter's own and private (`0700`, as the
/// unpacker makes it): the walk refuses any other.
pub fn hand_over(dir: &Path, roots: &[PathBuf], owners: Owners) -> io::Result<HandedOver> {
    let top = Folder::open(dir)?;
    let st = top.stat()?;
    let me = nix::unistd::geteuid().as_raw();
    if st.st_uid != me || st.st_mode & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not keter's private folder (owner uid {}, mode {:04o}); it is handed over only once",
            dir.display(),
            st.st_uid,
            st.st_mode & 0o7777
        )));
    }
    let served = match owners.web {
        Some(_) => served_folders(dir, roots)?,
        None => BTreeSet::new(),
    };
    let mut walk = Walk {
        owners,
        served,
        done: HandedOver::default(),
    };
    walk.folder(&top, Path::new(""))?;
    // The top last: until now nobody but keter could enter the folder.
    let mode = walk.mode(Path::new(""), Kind::Folder, st.st_mode);
    top.set_owner_and_mode(owners.app.map(|a| a.0), walk.group(Path::new("")), mode)?;
    walk.done.entries += 1;
    Ok(walk.done)
}

/// The folders Nginx serves, relative to `dir`: the static roots and the targets of symlinks
/// in them (Nginx follows those). Read while the folder is still keter's alone, so the paths
/// cannot change before the walk.
fn served_folders(dir: &Path, roots: &[PathBuf]) -> io::Result<BTreeSet<PathBuf>> {
    let real_dir = fs::canonicalize(dir)?;
    let mut served = BTreeSet::new();
    let mut todo: Vec<PathBuf> = roots.to_vec();
    while let Some(root) = todo.pop() {
        let Ok(real) = fs::canonicalize(&root) else {
            continue;
        };
        let Ok(rel) = real.strip_prefix(&real_dir) else {
            // Outside the bundle (an operator's allowed-static-roots): not the app's to open.
            continue;
        };
        let rel = rel.to_path_buf();
        if served.iter().any(|s: &PathBuf| rel.starts_with(s)) {
            continue;
        }
        let mut stack = vec![real.clone()];
        while let Some(p) = stack.pop() {
            let meta = fs::symlink_metadata(&p)?;
            if meta.file_type().is_symlink() {
                todo.push(p);
            } else if meta.is_dir() {
                for entry in fs::read_dir(&p)? {
                    stack.push(entry?.path());
                }
            }
        }
        served.insert(rel);
    }
    Ok(served)
}

struct Walk {
    owners: Owners,
    served: BTreeSet<PathBuf>,
    done: HandedOver,
}

impl Walk {
    /// Inside a served folder (or one itself).
    fn is_served(&self, rel: &Path) -> bool {
        self.served.iter().any(|s| rel.starts_with(s))
    }

    /// A folder above a served one: the workers pass through it.
    fn is_on_the_way(&self, rel: &Path) -> bool {
        self.served
            .iter()
            .any(|s| s.starts_with(rel) && s.as_path() != rel)
    }

    fn group(&self, rel: &Path) -> Option<u32> {
        match self.owners.web {
            Some(web) if self.is_served(rel) || self.is_on_the_way(rel) => Some(web),
            _ => self.owners.app.map(|a| a.1),
        }
    }

    /// Only the owner's bits (the union of everyone's), plus what the workers need.
    fn mode(&self, rel: &Path, kind: Kind, now: u32) -> u32 {
        let bits = now & 0o777;
        let any = (bits >> 6) | (bits >> 3) | bits;
        let mut mode = (any & 0o7) << 6;
        if kind == Kind::Folder {
            // The owner manages its folders (Yesod writes static/tmp).
            mode |= 0o700;
        }
        if self.owners.web.is_some() {
            if self.is_served(rel) {
                mode |= if kind == Kind::Folder { 0o2050 } else { 0o040 };
            } else if kind == Kind::Folder && self.is_on_the_way(rel) {
                mode |= 0o010;
            }
        }
        mode
    }

    /// Everything below `folder` (at `rel`), children before their folder.
    fn folder(&mut self, folder: &Folder, rel: &Path) -> io::Result<()> {
        for name in folder.entries()? {
            let child = rel.join(&name);
            let st = folder.stat_entry(&name).map_err(|e| at(&child, e))?;
            match Kind::of(&st) {
                Kind::Symlink => {
                    let (uid, gid) = self.owners.app.unzip();
                    folder
                        .chown_symlink(&name, uid, gid)
                        .map_err(|e| at(&child, e))?;
                }
                Kind::Folder => {
                    let sub = folder.open_folder(&name).map_err(|e| at(&child, e))?;
                    same(&st, &sub.stat()?, &child)?;
                    self.folder(&sub, &child)?;
                    let mode = self.mode(&child, Kind::Folder, st.st_mode);
                    sub.set_owner_and_mode(self.owners.app.map(|a| a.0), self.group(&child), mode)
                        .map_err(|e| at(&child, e))?;
                    self.count(&child);
                }
                Kind::File => self.file(folder, &name, &child)?,
                // The unpacker refuses them; nothing to give.
                Kind::Special => {}
            }
        }
        Ok(())
    }

    fn file(&mut self, folder: &Folder, name: &OsStr, rel: &Path) -> io::Result<()> {
        let (file, st) = folder.open_file(name).map_err(|e| match e {
            NotAFile::Io(e) => at(rel, e),
            other => at(rel, io::Error::other(other.to_string())),
        })?;
        let mode = self.mode(rel, Kind::File, st.st_mode);
        crate::dirfd::set_owner_and_mode(
            std::os::fd::AsFd::as_fd(&file),
            self.owners.app.map(|a| a.0),
            self.group(rel),
            mode,
        )
        .map_err(|e| at(rel, e))?;
        self.count(rel);
        Ok(())
    }

    fn count(&mut self, rel: &Path) {
        self.done.entries += 1;
        if self.owners.web.is_some() && self.is_served(rel) {
            self.done.opened += 1;
        }
    }
}

/// The folder opened is the one listed (nobody can swap it, but a walk that assumes so should
/// say so when it is wrong).
fn same(
    listed: &nix::sys::stat::FileStat,
    opened: &nix::sys::stat::FileStat,
    rel: &Path,
) -> io::Result<()> {
    if (listed.st_dev, listed.st_ino) == (opened.st_dev, opened.st_ino) {
        Ok(())
    } else {
        Err(at(
            rel,
            io::Error::other("it changed while keter handed the folder over"),
        ))
    }
}

fn at(rel: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", rel.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keter-folder-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn only_the_owner_keeps_bits_and_static_roots_open_to_the_group() {
        let dir = scratch("modes");
        fs::create_dir_all(dir.join("public/static/css")).unwrap();
        fs::create_dir_all(dir.join("config")).unwrap();
        fs::write(dir.join("config/keter.yaml"), "x").unwrap();
        fs::write(dir.join("public/static/css/a.css"), "x").unwrap();
        fs::write(dir.join("public/secret"), "x").unwrap();
        fs::write(dir.join("run"), "x").unwrap();
        fs::set_permissions(dir.join("run"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::set_permissions(
            dir.join("config/keter.yaml"),
            fs::Permissions::from_mode(0o044),
        )
        .unwrap();
        std::os::unix::fs::symlink("../../config", dir.join("public/static/conf")).unwrap();
        let gid = 4242;
        let done = hand_over(
            &dir,
            &[dir.join("public/static")],
            Owners {
                app: None,
                web: Some(gid),
            },
        )
        .unwrap();
        let gid_of = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap().gid();
        assert_eq!(mode(&dir.join("run")), 0o700);
        assert_eq!(mode(&dir), 0o710);
        assert_eq!(mode(&dir.join("public")), 0o710);
        assert_eq!(mode(&dir.join("public/static")), 0o2750);
        assert_eq!(mode(&dir.join("public/static/css/a.css")), 0o640);
        assert_eq!(gid_of("public/static/css/a.css"), gid);
        // Not served: only its owner's bits.
        assert_eq!(mode(&dir.join("public/secret")), 0o600);
        assert_ne!(gid_of("public/secret"), gid);
        // Served through the symlink, so opened too.
        assert_eq!(mode(&dir.join("config")), 0o2750);
        assert_eq!(mode(&dir.join("config/keter.yaml")), 0o440);
        assert_eq!(done.opened, 5);
        assert_eq!(done.entries, 9);
        // Once handed over, it is not the private folder the walk starts from.
        assert!(
            hand_over(
                &dir,
                &[],
                Owners {
                    app: None,
                    web: None
                }
            )
            .is_err()
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_static_roots_everything_is_the_owners_alone() {
        let dir = scratch("plain");
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), "x").unwrap();
        fs::set_permissions(dir.join("a/b/f"), fs::Permissions::from_mode(0o6777)).unwrap();
        hand_over(
            &dir,
            &[dir.join("a")],
            Owners {
                app: None,
                web: None,
            },
        )
        .unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("a")), 0o700);
        assert_eq!(mode(&dir.join("a/b/f")), 0o700);
        fs::remove_dir_all(&dir).unwrap();
    }
}
