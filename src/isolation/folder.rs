//! The permissions of an unpacked version folder `temp/NAME-N`.
//!
//! [`hand_over`] gives every entry to the app's user and closes it to everyone else: each mode
//! keeps only its owner's bits (the owner gets the union of the bits the bundle gave anyone, so
//! a file executable by anyone stays executable by its owner), so the folder is `0700`.
//!
//! [`open_to_web`] then opens exactly what Nginx serves to Nginx's workers, through their
//! group: the static roots and everything in them get that group with read (and, for
//! folders, search and setgid, so files the app adds later get the group too), the folders on
//! the way to a root get search only. Nothing else of the folder is readable by the workers,
//! nor by anyone but the app's user. A symlink in a static root that leads elsewhere in the
//! folder opens its target too (Nginx follows it); the unpacker has checked that bundle
//! symlinks stay inside the folder.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

/// Gives `dir` and everything in it to `owner` (uid, gid; `None` keeps the owner) and keeps
/// only the owner's permissions. Symlinks are changed themselves, never followed.
pub fn hand_over(dir: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        if let Some((uid, gid)) = owner {
            lchown(&p, Some(uid), Some(gid))?;
        }
        let meta = fs::symlink_metadata(&p)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o777;
        let any = (mode >> 6) | (mode >> 3) | mode;
        let mut own = (any & 0o7) << 6;
        if meta.is_dir() {
            // The owner manages its folders (Yesod writes static/tmp).
            own |= 0o700;
            for entry in fs::read_dir(&p)? {
                todo.push(entry?.path());
            }
        }
        if own != meta.mode() & 0o7777 {
            fs::set_permissions(&p, fs::Permissions::from_mode(own))?;
        }
    }
    Ok(())
}

/// Opens the static roots `roots` (inside `dir`) to the group `gid` of Nginx's workers: read
/// on everything in them, search on the folders from `dir` down to each root. Returns the
/// number of entries opened.
pub fn open_to_web(dir: &Path, roots: &[PathBuf], gid: u32) -> io::Result<usize> {
    let dir = fs::canonicalize(dir)?;
    let mut seen = HashSet::new();
    let mut opened = 0;
    let mut trees: Vec<PathBuf> = roots.to_vec();
    while let Some(root) = trees.pop() {
        let Ok(root) = fs::canonicalize(&root) else {
            continue;
        };
        let Ok(rel) = root.strip_prefix(&dir) else {
            // Not the app's (the unpacker and site_of keep roots inside the bundle).
            continue;
        };
        // The folders on the way: search only.
        let mut at = dir.clone();
        grant(&at, gid, 0o010)?;
        for c in rel.parent().into_iter().flat_map(Path::components) {
            at.push(c);
            grant(&at, gid, 0o010)?;
        }
        let mut todo = vec![root];
        while let Some(p) = todo.pop() {
            let meta = fs::symlink_metadata(&p)?;
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            if meta.file_type().is_symlink() {
                // Nginx follows it: its target is served too.
                if let Ok(target) = fs::canonicalize(&p)
                    && target.starts_with(&dir)
                {
                    trees.push(target);
                }
                continue;
            }
            opened += 1;
            if meta.is_dir() {
                grant(&p, gid, 0o2050)?;
                for entry in fs::read_dir(&p)? {
                    todo.push(entry?.path());
                }
            } else if meta.is_file() {
                grant(&p, gid, 0o040)?;
            }
        }
    }
    Ok(opened)
}

/// Sets the group of `p` to `gid` and adds `bits` (group bits, setgid) to its mode.
fn grant(p: &Path, gid: u32, bits: u32) -> io::Result<()> {
    let meta = fs::symlink_metadata(p)?;
    if meta.gid() != gid {
        lchown(p, None, Some(gid))?;
    }
    // chown clears the setgid bit; the mode is read again.
    let mode = fs::symlink_metadata(p)?.mode() & 0o7777;
    if mode & bits != bits {
        fs::set_permissions(p, fs::Permissions::from_mode(mode | bits))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn only_the_owner_keeps_bits_and_static_roots_open_to_the_group() {
        let dir = std::env::temp_dir().join(format!("keter-folder-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
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
        hand_over(&dir, None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("run")), 0o700);
        assert_eq!(mode(&dir.join("config/keter.yaml")), 0o400);
        assert_eq!(mode(&dir.join("public/static/css/a.css")), 0o600);

        let gid = 4242;
        let n = open_to_web(&dir, &[dir.join("public/static")], gid).unwrap();
        let gid_of = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap().gid();
        assert_eq!(mode(&dir), 0o710);
        assert_eq!(mode(&dir.join("public")), 0o710);
        assert_eq!(mode(&dir.join("public/static")), 0o2750);
        assert_eq!(mode(&dir.join("public/static/css/a.css")), 0o640);
        assert_eq!(gid_of("public/static/css/a.css"), gid);
        // Not served: untouched.
        assert_eq!(mode(&dir.join("public/secret")), 0o600);
        assert_ne!(gid_of("public/secret"), gid);
        // Served through the symlink, so opened too.
        assert_eq!(mode(&dir.join("config")), 0o2750);
        assert_eq!(mode(&dir.join("config/keter.yaml")), 0o440);
        assert_eq!(n, 5);
        fs::remove_dir_all(&dir).unwrap();
    }
}
