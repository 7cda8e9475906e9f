//! Replacing a file so that no reader ever sees it half-written and a crash leaves either the
//! old or the new content: a fresh temp file beside it, created with its final mode (never
//! widened or narrowed after the fact), fsync, rename over the old file, fsync of the folder.
//! Nginx's files, the state journal, the postgres credentials and copied certificates all go
//! through here.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replaces `path` with `bytes`, created with `mode`. The temp file is `.NAME.tmp`: a dot
/// name that does not end in `.conf`, so no Nginx include glob picks it up.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    // A temp file left by a crash may have any mode; it is never reused.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_with_the_mode_given_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("keter-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.conf");
        fs::write(&path, "old").unwrap();
        // A stale temp file with a wide mode is not reused.
        fs::write(dir.join(".f.conf.tmp"), "stale").unwrap();
        fs::set_permissions(dir.join(".f.conf.tmp"), fs::Permissions::from_mode(0o666)).unwrap();
        replace(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.join(".f.conf.tmp").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
