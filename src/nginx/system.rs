//! System mode (`nginx.mode: system`): Nginx is the host's service, run by the OS, and keter is
//! one tenant of its configuration among others. This module holds what only that mode needs:
//! finding the running master from its pid file without trusting a stale file, and telling
//! whether a failed `nginx -t` is keter's doing or a broken file of someone else's in
//! `/etc/nginx`.
//!
//! The main configuration includes keter's `ROOT/nginx/http.conf` through the package's
//! `/etc/nginx/conf.d/keter.conf`; keter itself never writes outside its root.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why no Nginx master can be signalled.
#[derive(Debug, Clone)]
pub enum NotRunning {
    /// The pid file does not exist or cannot be read: Nginx is stopped.
    NoPidFile(PathBuf, Arc<io::Error>),
    /// The pid file does not hold a pid.
    Garbled(PathBuf),
    /// The pid file names a process that is gone, or one that is not an Nginx master (the
    /// file survived a crash and the pid was reused: SIGHUP would hit an unrelated process).
    Stale(PathBuf, i32),
}

impl fmt::Display for NotRunning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotRunning::NoPidFile(p, e) => {
                write!(f, "Nginx is not running (no pid file {}: {e})", p.display())
            }
            NotRunning::Garbled(p) => {
                write!(f, "Nginx's pid file {} holds no pid", p.display())
            }
            NotRunning::Stale(p, pid) => write!(
                f,
                "Nginx is not running: the pid file {} is stale (pid {pid} is not an Nginx master)",
                p.display()
            ),
        }
    }
}

impl std::error::Error for NotRunning {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NotRunning::NoPidFile(_, e) => Some(&**e),
            NotRunning::Garbled(_) | NotRunning::Stale(..) => None,
        }
    }
}

/// The pid of the running Nginx master named by `pid_file`, checked against `/proc`.
pub fn master_pid(pid_file: &Path) -> Result<i32, NotRunning> {
    let text = fs::read_to_string(pid_file)
        .map_err(|e| NotRunning::NoPidFile(pid_file.to_path_buf(), Arc::new(e)))?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| NotRunning::Garbled(pid_file.to_path_buf()))?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    // Nginx renames its master process "nginx: master process /usr/sbin/nginx ...".
    if cmdline.starts_with(b"nginx: master process") {
        Ok(pid)
    } else {
        Err(NotRunning::Stale(pid_file.to_path_buf(), pid))
    }
}

/// Whose file made `nginx -t` fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blame {
    /// A file under keter's own folder.
    Keter,
    /// A file outside it: another site on the host, or the main configuration.
    Foreign(PathBuf),
    /// Nginx named no file (for example a hash size that is too small for the host names).
    Unknown,
}

/// Reads the file that Nginx names in its error messages (`... in /etc/nginx/x.conf:12`) and
/// says whether it lies under `ours` (keter's `ROOT/nginx`).
pub fn blame(message: &str, ours: &Path) -> Blame {
    for line in message.lines() {
        if !(line.contains("[emerg]") || line.contains("[alert]") || line.contains("[crit]")) {
            continue;
        }
        let Some((_, tail)) = line.rsplit_once(" in /") else {
            continue;
        };
        let file = tail.rsplit_once(':').map_or(tail, |(f, _)| f);
        let file = PathBuf::from(format!("/{file}"));
        return if file.starts_with(ours) {
            Blame::Keter
        } else {
            Blame::Foreign(file)
        };
    }
    Blame::Unknown
}

/// Removes keter's control socket when nothing listens on it any more. An Nginx master that
/// was killed leaves the file behind, and a new master cannot bind over it.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match UnixStream::connect(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            log::warn!(
                "nginx: removing {}, a control socket nothing listens on",
                path.display()
            );
            fs::remove_file(path)
        }
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "/opt/keter/nginx";

    #[test]
    fn a_broken_site_elsewhere_is_foreign() {
        let msg = "nginx: [emerg] unknown directive \"bogus\" in /etc/nginx/sites-enabled/shop:3\n";
        assert_eq!(
            blame(msg, Path::new(OURS)),
            Blame::Foreign(PathBuf::from("/etc/nginx/sites-enabled/shop"))
        );
    }

    #[test]
    fn keters_own_files_are_keters() {
        let msg = "nginx: [emerg] duplicate upstream \"keter-a\" in /opt/keter/nginx/apps/a.conf:7";
        assert_eq!(blame(msg, Path::new(OURS)), Blame::Keter);
    }

    #[test]
    fn warnings_and_messages_without_a_file_blame_nobody() {
        let msg = "nginx: [warn] conflicting server name \"a\" on 0.0.0.0:80, ignored\n\
                   nginx: [emerg] could not build server_names_hash, you should increase server_names_hash_bucket_size: 64";
        assert_eq!(blame(msg, Path::new(OURS)), Blame::Unknown);
    }

    #[test]
    fn a_pid_file_naming_another_process_is_stale() {
        let dir = std::env::temp_dir().join(format!("keter-pid-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("nginx.pid");
        fs::write(&file, format!("{}\n", std::process::id())).unwrap();
        let got = master_pid(&file);
        fs::write(&file, "garbage").unwrap();
        let garbled = master_pid(&file);
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            matches!(&got, Err(NotRunning::Stale(f, pid)) if *f == file && *pid == std::process::id() as i32),
            "{got:?}"
        );
        assert!(
            matches!(&garbled, Err(NotRunning::Garbled(f)) if *f == file),
            "{garbled:?}"
        );
        assert!(matches!(
            master_pid(Path::new("/nonexistent/nginx.pid")),
            Err(NotRunning::NoPidFile(..))
        ));
    }
}
