//! `ROOT/nginx/worker-files/`: the files Nginx's workers read while serving (the operator's
//! response pages in `responses/`, basic-auth password files in `apps/NAME/`). Workers do not
//! run as root (Debian's run as www-data, a managed Nginx's as nobody), and apps must not read
//! these files, so the folder and everything in it belong to keter's user and the workers'
//! group, folders mode 0710 and files 0640: readable by the workers, not by an app running
//! under another user. The workers open each file by the name their configuration gives and
//! never list a folder, so the folders give them search only: a directory listing that an app
//! could steer here (a symlink swapped in between Nginx's check of a static folder and its
//! `autoindex`, README "Generated Nginx files") lists nothing.
//!
//! An app's files are named by their content (`site::SiteFile`): a new version's file never
//! replaces the one the running configuration names, so a failed switch needs no restore; the
//! files no live configuration names are removed after each switch. Only the nginx controller
//! calls this module.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use super::{Paths, SiteFile};
use crate::atomic_file;
use crate::names::AppName;

/// The group of the workers of `master`, read from `/proc` (effective gid of the first worker).
pub fn workers_gid(master: i32) -> Option<u32> {
    let (worker, _) = *crate::procfs::nginx_workers(master).first()?;
    let status = fs::read_to_string(format!("/proc/{worker}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Creates the folders and writes the operator's response pages.
pub fn prepare(paths: &Paths, pages: &[(&str, &[u8])], gid: Option<u32>) -> io::Result<()> {
    for dir in [
        paths.worker_files.clone(),
        paths.responses(),
        paths.worker_files.join("apps"),
    ] {
        make_dir(&dir, gid)?;
    }
    // Pages of an earlier run that this configuration no longer names.
    for entry in fs::read_dir(paths.responses())? {
        let path = entry?.path();
        let named = pages
            .iter()
            .any(|(name, _)| path.file_name().is_some_and(|f| f == *name));
        if !named {
            let _ = fs::remove_file(&path);
        }
    }
    for (name, bytes) in pages {
        write(&paths.responses().join(name), bytes, gid)?;
    }
    Ok(())
}

/// Writes the files of `app` that are not there yet.
pub fn write_site_files(
    paths: &Paths,
    app: &AppName,
    files: &[SiteFile],
    gid: Option<u32>,
) -> io::Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let dir = paths.app_files(app);
    make_dir(&dir, gid)?;
    for f in files {
        let path = dir.join(&f.name);
        if !path.exists() {
            write(&path, &f.bytes, gid)?;
        }
    }
    Ok(())
}

/// Removes the files of `app` that `keep` does not name (all of them, and the folder, when
/// `keep` is empty).
pub fn prune(paths: &Paths, app: &AppName, keep: &[String]) {
    let dir = paths.app_files(app);
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
    if keep.is_empty() {
        let _ = fs::remove_dir(&dir);
    }
}

/// Gives the whole folder to the workers' group (after Nginx started, or its workers changed
/// their group), its folders with search only (an earlier keter made them listable).
pub fn share(paths: &Paths, gid: u32) -> io::Result<()> {
    fn walk(p: &Path, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(p, None, Some(gid))?;
        if fs::symlink_metadata(p)?.is_dir() {
            fs::set_permissions(p, fs::Permissions::from_mode(FOLDER_MODE))?;
            for entry in fs::read_dir(p)? {
                walk(&entry?.path(), gid)?;
            }
        }
        Ok(())
    }
    walk(&paths.worker_files, gid)
}

/// Folders: keter's user manages them, the workers' group searches them, nobody lists them.
const FOLDER_MODE: u32 = 0o710;

fn make_dir(dir: &Path, gid: Option<u32>) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(FOLDER_MODE)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(FOLDER_MODE))?;
    set_group(dir, gid)
}

fn write(path: &Path, bytes: &[u8], gid: Option<u32>) -> io::Result<()> {
    atomic_file::replace(path, bytes, 0o640)?;
    set_group(path, gid)
}

/// Sets the group when it is known and keter may (as root, or a member of it).
fn set_group(path: &Path, gid: Option<u32>) -> io::Result<()> {
    match gid {
        Some(gid) => match std::os::unix::fs::lchown(path, None, Some(gid)) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
            other => other,
        },
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn folders_are_searched_and_never_listed_files_are_read() {
        let root = std::env::temp_dir().join(format!("keter-worker-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let paths = Paths::new(&root);
        // A folder an earlier keter made listable.
        fs::create_dir_all(paths.worker_files.join("apps/old")).unwrap();
        fs::set_permissions(
            paths.worker_files.join("apps/old"),
            fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        prepare(&paths, &[("proxy-exception.html", b"<h1>x</h1>")], None).unwrap();
        let app = AppName::new("shop").unwrap();
        let file = SiteFile::new(b"jon:x\n".to_vec(), "htpasswd");
        write_site_files(&paths, &app, std::slice::from_ref(&file), None).unwrap();
        let gid = fs::metadata(&root).unwrap().gid();
        share(&paths, gid).unwrap();
        for dir in [
            paths.worker_files.clone(),
            paths.responses(),
            paths.worker_files.join("apps"),
            paths.app_files(&app),
            paths.worker_files.join("apps/old"),
        ] {
            assert_eq!(mode(&dir), 0o710, "{}", dir.display());
        }
        assert_eq!(mode(&paths.app_files(&app).join(&file.name)), 0o640);
        assert_eq!(mode(&paths.responses().join("proxy-exception.html")), 0o640);
        fs::remove_dir_all(&root).unwrap();
    }
}
