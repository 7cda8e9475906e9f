//! Packing a bundle folder into a `NAME.keter` file (`keter bundle DIR`): a gzip-compressed
//! tar archive that [`super::unpack`] accepts.
//!
//! The archive holds exactly what `unpack` would let through: folders, regular files and
//! symlinks, with the folder's own relative paths. Anything `unpack` refuses (FIFOs, sockets,
//! devices) is refused here, at the operator's desk, rather than at deploy time. Entries are
//! sorted and owned by uid 0, so packing the same folder twice gives the same archive.
//! The file is written under a hidden temporary name and renamed into place, so that packing
//! straight into `incoming/` never shows keter a half-written bundle.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// Why a folder could not be packed.
#[derive(Debug)]
pub enum PackError {
    /// The folder holds something a bundle cannot carry.
    Refused(String),
    Io(String),
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackError::Refused(m) => write!(f, "refused: {m}"),
            PackError::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for PackError {}

/// What was packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub entries: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Size of the bundle file written.
    pub size: u64,
}

/// Packs the contents of `dir` into the bundle file `out` (replaced if it exists). `out`
/// itself is left out of the archive when it lies inside `dir`.
pub fn pack(dir: &Path, out: &Path) -> Result<Packed, PackError> {
    let io_err = |what: &Path, e: io::Error| PackError::Io(format!("{}: {e}", what.display()));
    let file_name = out
        .file_name()
        .ok_or_else(|| PackError::Io(format!("{} is not a file name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let temp = parent.join(format!(".{}.part", file_name.to_string_lossy()));
    let mut entries = Vec::new();
    let skip = [absolute(out), absolute(&temp)];
    collect(dir, Path::new(""), &skip, &mut entries)?;
    let written = write_archive(dir, &entries, &temp);
    let stats = match written {
        Ok(stats) => stats,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
    };
    fs::rename(&temp, out).map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_err(out, e)
    })?;
    let size = fs::metadata(out).map_err(|e| io_err(out, e))?.len();
    Ok(Packed { size, ..stats })
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Relative paths of everything below `dir`, parents before children, sorted by name.
fn collect(
    dir: &Path,
    rel: &Path,
    skip: &[PathBuf],
    out: &mut Vec<PathBuf>,
) -> Result<(), PackError> {
    let here = dir.join(rel);
    let mut names: Vec<_> = fs::read_dir(&here)
        .map_err(|e| PackError::Io(format!("{}: {e}", here.display())))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| PackError::Io(format!("{}: {e}", here.display())))?;
    names.sort();
    for name in names {
        let child = rel.join(&name);
        let full = dir.join(&child);
        if skip.contains(&absolute(&full)) {
            continue;
        }
        let meta = fs::symlink_metadata(&full)
            .map_err(|e| PackError::Io(format!("{}: {e}", full.display())))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            out.push(child.clone());
            collect(dir, &child, skip, out)?;
        } else if kind.is_file() || kind.is_symlink() {
            out.push(child);
        } else {
            return Err(PackError::Refused(format!(
                "{} is neither a file, a folder nor a symlink (a bundle cannot carry it)",
                child.display()
            )));
        }
    }
    Ok(())
}

fn write_archive(dir: &Path, entries: &[PathBuf], temp: &Path) -> Result<Packed, PackError> {
    let io_err = |what: &Path, e: io::Error| PackError::Io(format!("{}: {e}", what.display()));
    let file = File::create(temp).map_err(|e| io_err(temp, e))?;
    let gz = GzEncoder::new(
        BufWriter::with_capacity(256 * 1024, file),
        Compression::new(6),
    );
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut stats = Packed {
        entries: 0,
        bytes: 0,
        size: 0,
    };
    for rel in entries {
        let full = dir.join(rel);
        tar.append_path_with_name(&full, rel)
            .map_err(|e| io_err(&full, e))?;
        let meta = fs::symlink_metadata(&full).map_err(|e| io_err(&full, e))?;
        if meta.is_file() {
            stats.bytes += meta.size();
        }
        stats.entries += 1;
    }
    let gz = tar.into_inner().map_err(|e| io_err(temp, e))?;
    let mut writer = gz.finish().map_err(|e| io_err(temp, e))?;
    writer.flush().map_err(|e| io_err(temp, e))?;
    let file = writer
        .into_inner()
        .map_err(|e| io_err(temp, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(temp, e))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BundleLimits;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keter-pack-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_packed_folder_unpacks_to_the_same_files() {
        let base = scratch("roundtrip");
        let src = base.join("app");
        fs::create_dir_all(src.join("config")).unwrap();
        fs::create_dir_all(src.join("dist")).unwrap();
        fs::write(src.join("config/keter.yaml"), "exec: ../dist/run\n").unwrap();
        fs::write(src.join("dist/run"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("dist/run"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("run", src.join("dist/start")).unwrap();
        // Packing into the folder itself leaves the bundle out of the archive.
        let out = src.join("app.keter");
        let packed = pack(&src, &out).unwrap();
        assert_eq!(packed.entries, 5, "{packed:?}");
        let again = pack(&src, &out).unwrap();
        assert_eq!(packed, again, "packing is deterministic");

        let mut reports = Vec::new();
        let dest = base.join("unpacked");
        let u = super::super::unpack::tests_support::unpack_small_steps(
            &out,
            &dest,
            &BundleLimits::default(),
            &mut |p| reports.push(*p),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(u.dir.join("config/keter.yaml")).unwrap(),
            "exec: ../dist/run\n"
        );
        let mode = fs::metadata(u.dir.join("dist/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        assert_eq!(
            fs::read_link(u.dir.join("dist/start")).unwrap(),
            PathBuf::from("run")
        );
        assert!(!u.dir.join("app.keter").exists());
        // Progress was reported while reading, ending at the file's size.
        assert!(!reports.is_empty());
        assert!(reports.windows(2).all(|w| w[0].read < w[1].read));
        assert!(
            reports
                .iter()
                .all(|p| p.total == packed.size && p.read <= p.total)
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn special_files_are_refused() {
        let base = scratch("fifo");
        fs::create_dir_all(base.join("app/config")).unwrap();
        nix::unistd::mkfifo(
            &base.join("app/config/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let out = base.join("app.keter");
        let err = pack(&base.join("app"), &out).unwrap_err();
        assert!(err.to_string().contains("config/pipe"), "{err}");
        assert!(!out.exists());
        assert!(!base.join(".app.keter.part").exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
