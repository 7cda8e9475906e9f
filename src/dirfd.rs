//! File operations through descriptors, for what keter does as root inside a tree that someone
//! less privileged can change: `incoming/` (the deployers') and a version's folder
//! `temp/NAME-N` (its app's, once handed over).
//!
//! A path is resolved afresh at every system call, so between keter's check of a path and its
//! use, an app or a deployer can turn any folder on the way into a symlink to `/etc`: root's
//! `chown` or `chmod` of the path then lands there (runc's CVE-2021-30465 is this race). The
//! rule here: open once, then act on the descriptor; open a name only one component at a time,
//! relative to the descriptor of its folder, with `O_NOFOLLOW` (a symlink is never followed,
//! and nothing leads outside the folder); never open something that may be a FIFO without
//! `O_NONBLOCK` (or as `O_PATH`), and look at what was opened (`fstat`) before using it. README "Security" lists every such
//! operation with what protects it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

/// An open folder: everything below it is reached through this descriptor.
#[derive(Debug)]
pub struct Folder {
    fd: OwnedFd,
}

/// What an entry of a folder is, as `fstatat` saw it without following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Folder,
    File,
    Symlink,
    /// A FIFO, socket or device file.
    Special,
}

impl Kind {
    pub fn of(stat: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Kind::Folder,
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }

    /// For messages: "a symlink", "a FIFO, socket or device file".
    pub fn describe(stat: &FileStat) -> &'static str {
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => "a folder",
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFLNK => "a symlink",
            SFlag::S_IFIFO => "a FIFO",
            SFlag::S_IFSOCK => "a socket",
            _ => "a device file",
        }
    }
}

fn io_err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl Folder {
    /// Opens the folder at `path`, which must not itself be a symlink. The folders above it are
    /// trusted: only keter (root) can change them (`ROOT/temp`, `ROOT/incoming`).
    pub fn open(path: &Path) -> io::Result<Folder> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Folder { fd })
    }

    /// Opens the entry `name` (one component) as a folder, never through a symlink.
    pub fn open_folder(&self, name: &OsStr) -> io::Result<Folder> {
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        Ok(Folder { fd })
    }

    /// Opens the entry `name` (one component) for reading if it is a regular file: never
    /// through a symlink, and without blocking if it is a FIFO (which is then refused).
    pub fn open_file(&self, name: &OsStr) -> Result<(File, FileStat), NotAFile> {
        open_regular(Some(self.fd.as_fd()), name)
    }

    /// The entries of the folder (without `.` and `..`), as the kernel lists them now.
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        let dup = self.fd.try_clone()?;
        let mut dir = nix::dir::Dir::from_fd(dup).map_err(io_err)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                out.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        Ok(out)
    }

    /// What the entry `name` is, without following a symlink.
    pub fn stat_entry(&self, name: &OsStr) -> io::Result<FileStat> {
        nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io_err)
    }

    /// Changes the owner of the symlink `name` itself.
    pub fn chown_symlink(
        &self,
        name: &OsStr,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> io::Result<()> {
        nix::unistd::fchownat(
            self.fd.as_fd(),
            name,
            uid.map(Uid::from_raw),
            gid.map(Gid::from_raw),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io_err)
    }

    /// Opens the entry `name` (one component) as itself, whatever it is, without following a
    /// symlink and without opening it for reading (`O_PATH`: a FIFO does not block, a device
    /// is not touched), with what it is. [`chown_path`] then changes exactly that inode, even if
    /// the name is swapped meanwhile.
    pub fn open_path(&self, name: &OsStr) -> io::Result<(OwnedFd, FileStat)> {
        let fd = nix::fcntl::openat(
            self.fd.as_fd(),
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(io_err)?;
        Ok((fd, st))
    }

    /// The folder's own status.
    pub fn stat(&self) -> io::Result<FileStat> {
        nix::sys::stat::fstat(self.fd.as_fd()).map_err(io_err)
    }

    /// Sets the folder's owner and then its mode (a change of owner clears setgid).
    pub fn set_owner_and_mode(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
        mode: u32,
    ) -> io::Result<()> {
        set_owner_and_mode(self.fd.as_fd(), uid, gid, mode)
    }
}

impl AsFd for Folder {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Changes the owner of what `fd` (from [`Folder::open_path`]) is, a symlink itself included.
pub fn chown_path(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    nix::unistd::fchownat(
        fd,
        "",
        uid.map(Uid::from_raw),
        gid.map(Gid::from_raw),
        nix::fcntl::AtFlags::AT_EMPTY_PATH | nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io_err)
}

/// Sets the owner (`None` keeps it) and then the mode of an open file or folder: changing the
/// owner clears setgid, so the mode comes second. Nothing changes that is already so.
pub fn set_owner_and_mode(
    fd: BorrowedFd<'_>,
    uid: Option<u32>,
    gid: Option<u32>,
    mode: u32,
) -> io::Result<()> {
    let st = nix::sys::stat::fstat(fd).map_err(io_err)?;
    let uid = uid.filter(|u| *u != st.st_uid);
    let gid = gid.filter(|g| *g != st.st_gid);
    if uid.is_some() || gid.is_some() {
        nix::unistd::fchown(fd, uid.map(Uid::from_raw), gid.map(Gid::from_raw)).map_err(io_err)?;
    }
    let now = nix::sys::stat::fstat(fd).map_err(io_err)?.st_mode & 0o7777;
    if now != mode & 0o7777 {
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode & 0o7777)).map_err(io_err)?;
    }
    Ok(())
}

/// Why a name could not be opened as a regular file.
#[derive(Debug)]
pub enum NotAFile {
    /// A symlink (refused, never followed).
    Symlink,
    /// A folder, FIFO, socket or device file: the text says which.
    Kind(&'static str),
    Io(io::Error),
}

impl std::fmt::Display for NotAFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotAFile::Symlink => write!(f, "it is a symlink"),
            NotAFile::Kind(k) => write!(f, "it is {k}, not a regular file"),
            NotAFile::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Opens the regular file `path` for reading: never through a symlink at its last component,
/// never blocking on a FIFO (`O_NONBLOCK`, then `fstat`: only a regular file is read). The
/// folders above `path` are trusted. Returns the file, in blocking mode, and what `fstat` saw
/// (its owner, and its number of names: a hard link may be to someone else's file).
pub fn open_regular_path(path: &Path) -> Result<(File, FileStat), NotAFile> {
    open_regular(None, path.as_os_str())
}

fn open_regular(dir: Option<BorrowedFd<'_>>, name: &OsStr) -> Result<(File, FileStat), NotAFile> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let opened = match dir {
        Some(d) => nix::fcntl::openat(d, name, flags, Mode::empty()),
        None => nix::fcntl::open(name, flags, Mode::empty()),
    };
    let fd = match opened {
        Ok(fd) => fd,
        // O_NOFOLLOW on a symlink.
        Err(Errno::ELOOP) => return Err(NotAFile::Symlink),
        // A unix socket cannot be opened.
        Err(Errno::ENXIO) => return Err(NotAFile::Kind("a socket")),
        Err(e) => return Err(NotAFile::Io(io_err(e))),
    };
    let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|e| NotAFile::Io(io_err(e)))?;
    if Kind::of(&st) != Kind::File {
        return Err(NotAFile::Kind(Kind::describe(&st)));
    }
    // A regular file ignores O_NONBLOCK; cleared anyway, so that nothing reading it is
    // surprised by EAGAIN.
    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|e| NotAFile::Io(io_err(e)))?;
    Ok((File::from(fd), st))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(label: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("keter-dirfd-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_symlink_and_a_fifo_are_not_opened_as_files() {
        let dir = scratch("open");
        std::fs::write(dir.join("plain"), "x").unwrap();
        symlink(dir.join("plain"), dir.join("link")).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let (mut f, st) = open_regular_path(&dir.join("plain")).unwrap();
        assert_eq!(st.st_size, 1);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut f, &mut text).unwrap();
        assert_eq!(text, "x");
        assert!(matches!(
            open_regular_path(&dir.join("link")),
            Err(NotAFile::Symlink)
        ));
        // Without O_NONBLOCK this would wait for a writer forever.
        assert!(matches!(
            open_regular_path(&dir.join("fifo")),
            Err(NotAFile::Kind("a FIFO"))
        ));
        let folder = Folder::open(&dir).unwrap();
        assert!(matches!(
            folder.open_file(OsStr::new("link")),
            Err(NotAFile::Symlink)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_folder_is_opened_through_a_symlink() {
        let dir = scratch("folders");
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
        symlink("../elsewhere", dir.join("a/c")).unwrap();
        let top = Folder::open(&dir).unwrap();
        let a = top.open_folder(OsStr::new("a")).unwrap();
        assert!(a.open_folder(OsStr::new("b")).is_ok());
        assert!(a.open_folder(OsStr::new("c")).is_err());
        assert!(Folder::open(&dir.join("a/c")).is_err());
        let mut names = a.entries().unwrap();
        names.sort();
        assert_eq!(names, vec![OsString::from("b"), OsString::from("c")]);
        assert_eq!(
            Kind::of(&a.stat_entry(OsStr::new("c")).unwrap()),
            Kind::Symlink
        );
        let (fd, st) = a.open_path(OsStr::new("c")).unwrap();
        assert_eq!(Kind::of(&st), Kind::Symlink);
        chown_path(fd.as_fd(), None, None).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
