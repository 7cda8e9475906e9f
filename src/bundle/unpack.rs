//! Unpacking a bundle into a fresh private folder, refusing everything that could write or
//! point outside it (README, "How a deploy works", step 2, and "Security: hostile bundles
//! and faults").
//!
//! The `tar` crate's own `unpack` silently skips `..`, creates symlinks that point outside and
//! only rejects an outside hard link after earlier files are written, so every entry is checked
//! and written here by hand: no write ever follows a symlink, and any refusal deletes the folder.
//! The gzip stream is read to its end so that a truncated upload (a bundle still being copied)
//! fails instead of unpacking "fine".

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::config::BundleLimits;
use crate::dirfd::NotAFile;

/// A bundle unpacked into its folder.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The folder now holding the bundle's files.
    pub dir: PathBuf,
    /// Hex SHA-256 of the bundle file as read.
    pub sha256: String,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Archive entries read.
    pub entries: u64,
}

/// Why a bundle could not be unpacked. The folder has been removed.
#[derive(Debug)]
pub enum UnpackError {
    /// The file is not a complete gzip-compressed tar archive: what the decoder or the tar
    /// reader said.
    Corrupt(io::Error),
    /// An entry was refused (path, link, type) or a cap was reached; the message names the
    /// entry and the reason.
    Refused(String),
    /// Reading the bundle or writing the folder failed (disk full, permissions): `op` was
    /// done on `path`.
    Io {
        op: Op,
        path: PathBuf,
        source: io::Error,
    },
    /// The name is not a bundle file keter reads: a symlink, a FIFO, a hard link, a file that
    /// is gone or cannot be opened.
    NotABundleFile { path: PathBuf, why: NotABundle },
}

/// What was being done to a file when an I/O error happened, for [`UnpackError::Io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Create,
    Write,
    /// Looking at what is there (`lstat`, `readlink`, `chmod`).
    Inspect,
}

/// Why a path is not a bundle file keter reads, for [`UnpackError::NotABundleFile`].
#[derive(Debug)]
pub enum NotABundle {
    /// It cannot be opened (gone, unreadable, too many open files).
    Open(io::Error),
    /// It is a symlink (the daemon does not follow one in `incoming/`).
    Symlink,
    /// It is something else than a regular file: "a FIFO", "a directory", ...
    Kind(&'static str),
    /// It is not a regular file (`keter check` and `keter render`).
    NotRegular,
    /// It has this many names while the kernel lets anyone link a file it cannot read.
    HardLinks(u64),
}

impl UnpackError {
    /// The I/O error underneath, if the failure is one: what decides whether trying again may
    /// succeed (`src/app/error.rs`). A corrupt archive is not one, even when the decoder
    /// reports it as an `io::Error`.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            UnpackError::Io { source, .. }
            | UnpackError::NotABundleFile {
                why: NotABundle::Open(source),
                ..
            } => Some(source),
            _ => None,
        }
    }

    fn io(op: Op, path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
        move |source| UnpackError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    fn corrupt(what: &str) -> UnpackError {
        UnpackError::Corrupt(io::Error::new(io::ErrorKind::InvalidData, what))
    }
}

impl fmt::Display for UnpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnpackError::Corrupt(e) => write!(f, "not a complete gzip-compressed tar file: {e}"),
            UnpackError::Refused(m) => write!(f, "refused: {m}"),
            UnpackError::Io { op, path, source } => {
                let path = path.display();
                match op {
                    Op::Read => write!(f, "cannot read {path}: {source}"),
                    Op::Create => write!(f, "cannot create {path}: {source}"),
                    Op::Write => write!(f, "cannot write {path}: {source}"),
                    Op::Inspect => write!(f, "{path}: {source}"),
                }
            }
            UnpackError::NotABundleFile { path, why } => {
                let path = path.display();
                match why {
                    NotABundle::Open(e) => write!(f, "cannot read {path}: {e}"),
                    NotABundle::Symlink => write!(
                        f,
                        "{path} is a symlink; copy the bundle itself into incoming/"
                    ),
                    NotABundle::Kind(kind) => write!(f, "{path} is {kind}, not a regular file"),
                    NotABundle::NotRegular => write!(f, "{path} is not a regular file"),
                    NotABundle::HardLinks(n) => write!(
                        f,
                        "{path} has {n} names (hard links) and this kernel lets anyone link a \
                         file it cannot read (fs.protected_hardlinks is 0); copy the bundle \
                         itself into incoming/"
                    ),
                }
            }
        }
    }
}

impl std::error::Error for UnpackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UnpackError::Corrupt(e) => Some(e),
            _ => self.io_error().map(|e| e as _),
        }
    }
}

/// Unpacks the bundle file at `bundle` into `dest`, which must not exist yet. On any error
/// `dest` is removed. For the commands a user runs on their own files (`keter check`, `keter
/// render`): a symlink to a bundle is followed, with the user's own rights; the daemon opens
/// what deployers put in `incoming/` with [`open_bundle`] instead.
pub fn unpack(bundle: &Path, dest: &Path, limits: &BundleLimits) -> Result<Unpacked, UnpackError> {
    // O_NONBLOCK: a FIFO is refused below instead of waiting for a writer (a regular file
    // ignores the flag).
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(bundle)
        .map_err(|e| UnpackError::NotABundleFile {
            path: bundle.to_path_buf(),
            why: NotABundle::Open(e),
        })?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(UnpackError::NotABundleFile {
            path: bundle.to_path_buf(),
            why: NotABundle::NotRegular,
        });
    }
    unpack_with_progress(file, bundle, dest, limits, &mut |_| {})
}

/// Opens a bundle file for reading, as `src/dirfd.rs` opens what someone else may change: not
/// through a symlink and never blocking on a FIFO; a file with other names (hard links) only
/// where the kernel lets nobody link a file they could not read and write themselves
/// (`fs.protected_hardlinks`, on in Debian). Returns the file and what `fstat` saw.
pub fn open_bundle(path: &Path) -> Result<(File, nix::sys::stat::FileStat), UnpackError> {
    let not_a_bundle = |why| UnpackError::NotABundleFile {
        path: path.to_path_buf(),
        why,
    };
    let (file, st) = crate::dirfd::open_regular_path(path).map_err(|e| {
        not_a_bundle(match e {
            NotAFile::Symlink => NotABundle::Symlink,
            NotAFile::Kind(kind) => NotABundle::Kind(kind),
            NotAFile::Io(e) => NotABundle::Open(e),
        })
    })?;
    if st.st_nlink > 1 && !hard_links_protected() {
        return Err(not_a_bundle(NotABundle::HardLinks(st.st_nlink)));
    }
    Ok((file, st))
}

/// Whether the kernel refuses a hard link to a file its linker does not own and could not
/// both read and write (`fs.protected_hardlinks`).
fn hard_links_protected() -> bool {
    fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() == "1")
}

/// How far an unpack has come, reported every [`PROGRESS_INTERVAL`] or [`PROGRESS_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes of the bundle file read so far.
    pub read: u64,
    /// Size of the bundle file.
    pub total: u64,
    /// Time since the unpack began.
    pub elapsed: Duration,
}

impl Progress {
    /// Bytes per second read so far.
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

/// A progress report is due after this long, or after this many bytes, whichever comes first:
/// an operator watching the log of a large deploy sees it move.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
pub const PROGRESS_BYTES: u64 = 64 << 20;

/// [`unpack`], calling `progress` while the bundle file is read (never for a bundle read in
/// under a second and 64 MiB).
/// `file` is the bundle opened by [`open_bundle`], `label` its path for messages.
pub fn unpack_with_progress(
    file: File,
    label: &Path,
    dest: &Path,
    limits: &BundleLimits,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Unpacked, UnpackError> {
    unpack_reporting(file, label, dest, limits, progress, PROGRESS_BYTES)
}

/// [`unpack_with_progress`] with the byte step as a parameter (unit tests use small steps).
fn unpack_reporting(
    file: File,
    label: &Path,
    dest: &Path,
    limits: &BundleLimits,
    progress: &mut dyn FnMut(&Progress),
    step_bytes: u64,
) -> Result<Unpacked, UnpackError> {
    // Private until it is handed over: nobody else may read a bundle's files, nor be inside
    // the folder while keter works in it as root (`src/isolation/folder.rs`).
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(UnpackError::io(Op::Create, dest))?;
    match unpack_into(file, label, dest, limits, progress, step_bytes) {
        Ok(u) => Ok(u),
        Err(e) => {
            let _ = fs::remove_dir_all(dest);
            Err(e)
        }
    }
}

/// A `progress` callback that logs each report as `LABEL: unpacking: N MiB of M MiB (P%), R
/// MiB/s`.
pub fn log_progress(label: String) -> impl FnMut(&Progress) {
    move |p: &Progress| {
        let mib = |b: f64| b / (1024.0 * 1024.0);
        let percent = if p.total > 0 {
            p.read as f64 * 100.0 / p.total as f64
        } else {
            0.0
        };
        log::info!(
            "{label}: unpacking: {:.1} MiB of {:.1} MiB read ({percent:.0}%), {:.1} MiB/s",
            mib(p.read as f64),
            mib(p.total as f64),
            mib(p.rate())
        );
    }
}

/// Counts and hashes the raw bytes read from the bundle file, and reports progress.
struct HashingReader<'p, R> {
    inner: R,
    hasher: Sha256,
    read: u64,
    total: u64,
    started: Instant,
    /// When and at how many bytes the next report is due.
    next_at: Instant,
    next_bytes: u64,
    step_bytes: u64,
    progress: &'p mut dyn FnMut(&Progress),
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        if n > 0 && (self.read >= self.next_bytes || Instant::now() >= self.next_at) {
            (self.progress)(&Progress {
                read: self.read,
                total: self.total,
                elapsed: self.started.elapsed(),
            });
            self.next_at = Instant::now() + PROGRESS_INTERVAL;
            self.next_bytes = self.read + self.step_bytes;
        }
        Ok(n)
    }
}

fn corrupt(e: io::Error) -> UnpackError {
    UnpackError::Corrupt(e)
}

fn unpack_into(
    file: File,
    bundle: &Path,
    dest: &Path,
    limits: &BundleLimits,
    progress: &mut dyn FnMut(&Progress),
    step_bytes: u64,
) -> Result<Unpacked, UnpackError> {
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let reader = HashingReader {
        inner: BufReader::with_capacity(256 * 1024, file),
        hasher: Sha256::new(),
        read: 0,
        total,
        started,
        next_at: started + PROGRESS_INTERVAL,
        next_bytes: step_bytes,
        step_bytes,
        progress,
    };
    let mut archive = tar::Archive::new(GzDecoder::new(reader));
    let mut writer = Writer {
        dest,
        limits,
        dirs: HashSet::new(),
        symlinks: Vec::new(),
        bytes: 0,
        entries: 0,
    };
    let mut saw_end = false;
    for entry in archive.entries().map_err(corrupt)? {
        let entry = entry.map_err(corrupt)?;
        writer.entry(entry)?;
        saw_end = true;
    }
    if !saw_end {
        return Err(UnpackError::corrupt("the archive has no entries"));
    }
    // tar stops at the end-of-archive blocks, before the gzip trailer: read the rest of the
    // stream so that the CRC and length are checked and a truncated file is an error.
    let mut gz = archive.into_inner();
    io::copy(&mut gz, &mut io::sink()).map_err(corrupt)?;
    let mut raw = gz.into_inner();
    io::copy(&mut raw, &mut io::sink()).map_err(UnpackError::io(Op::Read, bundle))?;
    for link in &writer.symlinks {
        resolves_inside(dest, link)?;
    }
    Ok(Unpacked {
        dir: dest.to_path_buf(),
        sha256: hex(&raw.hasher.finalize()),
        bytes: writer.bytes,
        entries: writer.entries,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes checked entries below `dest`.
struct Writer<'a> {
    dest: &'a Path,
    limits: &'a BundleLimits,
    /// Relative folders known to be real directories created by us.
    dirs: HashSet<PathBuf>,
    /// Relative paths of symlinks created, checked again once everything is written.
    symlinks: Vec<PathBuf>,
    bytes: u64,
    entries: u64,
}

impl Writer<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::Refused(format!(
                "more than {} entries (max-bundle-entries)",
                self.limits.max_entries
            )));
        }
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        let raw_path = entry.path().map_err(corrupt)?.into_owned();
        let Some(rel) = relative_path(&raw_path)? else {
            return Ok(()); // "./": the folder itself
        };
        let depth = rel.components().count();
        if depth > self.limits.max_depth {
            return Err(UnpackError::Refused(format!(
                "{} is nested {depth} folders deep (max-bundle-depth is {})",
                raw_path.display(),
                self.limits.max_depth
            )));
        }
        match kind {
            EntryType::Directory => self.make_dirs(&rel, &raw_path),
            EntryType::Regular | EntryType::Continuous => {
                if let Some(parent) = rel.parent() {
                    self.make_dirs(parent, &raw_path)?;
                }
                let size = entry.header().size().map_err(corrupt)?;
                if self.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(UnpackError::Refused(format!(
                        "the bundle unpacks to more than {} bytes (max-bundle-bytes)",
                        self.limits.max_bytes
                    )));
                }
                let mode = entry.header().mode().map_err(corrupt)?;
                self.write_file(&rel, &raw_path, mode, &mut entry)?;
                Ok(())
            }
            EntryType::Symlink => {
                if let Some(parent) = rel.parent() {
                    self.make_dirs(parent, &raw_path)?;
                }
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| UnpackError::corrupt("a symlink without a target"))?
                    .into_owned();
                check_link_target(&rel, &target, &raw_path)?;
                let path = self.dest.join(&rel);
                std::os::unix::fs::symlink(&target, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        UnpackError::Refused(format!(
                            "{} appears twice in the archive",
                            raw_path.display()
                        ))
                    } else {
                        UnpackError::io(Op::Create, &path)(e)
                    }
                })?;
                self.symlinks.push(rel);
                Ok(())
            }
            EntryType::Link => Err(UnpackError::Refused(format!(
                "{} is a hard link; bundles may not contain hard links",
                raw_path.display()
            ))),
            EntryType::Char | EntryType::Block => Err(UnpackError::Refused(format!(
                "{} is a device file",
                raw_path.display()
            ))),
            EntryType::Fifo => Err(UnpackError::Refused(format!(
                "{} is a FIFO",
                raw_path.display()
            ))),
            other => Err(UnpackError::Refused(format!(
                "{} has an unsupported entry type {other:?}",
                raw_path.display()
            ))),
        }
    }

    /// Creates every folder of `rel`, refusing to go through anything but real directories.
    fn make_dirs(&mut self, rel: &Path, shown: &Path) -> Result<(), UnpackError> {
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            prefix.push(c);
            if self.dirs.contains(&prefix) {
                continue;
            }
            let path = self.dest.join(&prefix);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::Refused(format!(
                        "{} goes through the symlink {}",
                        shown.display(),
                        prefix.display()
                    )));
                }
                Ok(_) => {
                    return Err(UnpackError::Refused(format!(
                        "{} goes through the file {}",
                        shown.display(),
                        prefix.display()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&path).map_err(UnpackError::io(Op::Create, &path))?;
                }
                Err(e) => return Err(UnpackError::io(Op::Inspect, &path)(e)),
            }
            self.dirs.insert(prefix.clone());
        }
        Ok(())
    }

    fn write_file(
        &mut self,
        rel: &Path,
        shown: &Path,
        mode: u32,
        data: &mut impl Read,
    ) -> Result<(), UnpackError> {
        let path = self.dest.join(rel);
        if self.dirs.contains(rel) {
            return Err(UnpackError::Refused(format!(
                "{} is both a folder and a file",
                shown.display()
            )));
        }
        // setuid, setgid, sticky and world-writable bits are dropped.
        let mode = (mode & 0o777 & !0o002) | 0o600;
        let open = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
        };
        let mut file = match open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A later entry of the same name replaces a regular file, as tar does; never a
                // symlink (writing through it is the classic escape).
                let m = fs::symlink_metadata(&path).map_err(UnpackError::io(Op::Inspect, &path))?;
                if !m.file_type().is_file() {
                    return Err(UnpackError::Refused(format!(
                        "{} would replace a symlink or folder of the same name",
                        shown.display()
                    )));
                }
                fs::remove_file(&path)
                    .and_then(|()| open(&path))
                    .map_err(UnpackError::io(Op::Create, &path))?
            }
            Err(e) => return Err(UnpackError::io(Op::Create, &path)(e)),
        };
        let room = self.limits.max_bytes - self.bytes;
        let written = copy_limited(data, &mut file, room).map_err(|e| match e {
            CopyError::Read(e) => corrupt(e),
            CopyError::Write(e) => UnpackError::io(Op::Write, &path)(e),
            CopyError::TooLarge => UnpackError::Refused(format!(
                "the bundle unpacks to more than {} bytes (max-bundle-bytes)",
                self.limits.max_bytes
            )),
        })?;
        self.bytes += written;
        // The umask may have narrowed the mode at creation.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(UnpackError::io(Op::Inspect, &path))?;
        Ok(())
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    TooLarge,
}

fn copy_limited(src: &mut impl Read, dst: &mut File, room: u64) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        total += n as u64;
        if total > room {
            return Err(CopyError::TooLarge);
        }
        dst.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

/// The entry's path as plain relative components, or `None` for the folder itself.
fn relative_path(raw: &Path) -> Result<Option<PathBuf>, UnpackError> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(UnpackError::Refused(format!(
                    "{} contains '..'",
                    raw.display()
                )));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::Refused(format!(
                    "{} is an absolute path",
                    raw.display()
                )));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// A first, lexical check of a symlink target when the link is created.
fn check_link_target(rel: &Path, target: &Path, shown: &Path) -> Result<(), UnpackError> {
    if target.is_absolute() {
        return Err(UnpackError::Refused(format!(
            "{} is a symlink to the absolute path {}",
            shown.display(),
            target.display()
        )));
    }
    let mut depth = rel.components().count() as i64 - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(UnpackError::Refused(format!(
                "{} is a symlink pointing outside the bundle ({})",
                shown.display(),
                target.display()
            )));
        }
    }
    Ok(())
}

/// Resolves the symlink `link` (relative to `root`) component by component, following other
/// symlinks, and refuses it if the resolution leaves `root` at any point. Run after every entry
/// is written, since a later entry can change what an earlier link resolves through.
fn resolves_inside(root: &Path, link: &Path) -> Result<(), UnpackError> {
    let escape = || {
        UnpackError::Refused(format!(
            "the symlink {} resolves outside the bundle",
            link.display()
        ))
    };
    let mut stack: Vec<OsString> = link
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let target = fs::read_link(root.join(link)).map_err(UnpackError::io(Op::Inspect, link))?;
    let mut queue: VecDeque<OsString> = VecDeque::new();
    push_front(&mut queue, &target).ok_or_else(escape)?;
    let mut hops = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            stack.pop().ok_or_else(escape)?;
            continue;
        }
        let mut here: PathBuf = root.to_path_buf();
        here.extend(&stack);
        here.push(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(UnpackError::Refused(format!(
                        "the symlink {} is part of a loop",
                        link.display()
                    )));
                }
                let next = fs::read_link(&here).map_err(UnpackError::io(Op::Inspect, &here))?;
                push_front(&mut queue, &next).ok_or_else(escape)?;
            }
            // A missing component ends physical resolution: nothing below it exists.
            _ => stack.push(c),
        }
    }
    Ok(())
}

/// Puts a relative target's components in front of the queue; `None` if it is absolute.
fn push_front(queue: &mut VecDeque<OsString>, target: &Path) -> Option<()> {
    let mut parts = Vec::new();
    for c in target.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_os_string()),
            Component::ParentDir => parts.push("..".into()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    for p in parts.into_iter().rev() {
        queue.push_front(p);
    }
    Some(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// [`unpack_with_progress`] reporting after every read of the bundle file.
    pub fn unpack_small_steps(
        bundle: &Path,
        dest: &Path,
        limits: &BundleLimits,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Unpacked, UnpackError> {
        let (file, _) = open_bundle(bundle)?;
        unpack_reporting(file, bundle, dest, limits, progress, 1)
    }
}
